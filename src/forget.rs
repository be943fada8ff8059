//! Forgetting by a retention policy, once for `kluis forget` and the daemon's maintenance:
//! finish an interrupted forget, refuse to decide around a snapshot that cannot be read,
//! decide, then write the forget record and delete (see [`crate::ledger`]).

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::progress::Cancel;
use crate::repository::Repository;
use crate::retention::{Decision, Policy};
use crate::snapshot::Snapshot;

/// What a forget is asked to do.
pub struct ForgetOptions<'a> {
    pub policy: &'a Policy,
    /// The zone calendar rules (daily, monthly) count days in.
    pub time_zone: TimeZone,
    /// Only the snapshots this keeps are decided on (none: all).
    pub only: Option<&'a (dyn Fn(&Snapshot) -> bool + Sync)>,
    /// Decide, but change nothing.
    pub dry_run: bool,
    /// This host's view of the repository (for the forget record's chain).
    pub ledger: Option<Ledger>,
    pub cancel: Cancel,
}

/// What a forget decided and did.
#[derive(Debug)]
pub struct Forgotten {
    /// Every snapshot decided on, kept or removed, with the reasons.
    pub decisions: Vec<Decision>,
    /// How many were removed (none in a dry run).
    pub removed: usize,
    pub warnings: Vec<String>,
}

/// Applies `opts.policy` to `repo`'s snapshots now. A snapshot manifest that cannot be read
/// stops it before anything is forgotten (forgetting around it could keep too little of its
/// group): [`Error::Corrupt`], exit 13, in the command line and the daemon alike.
pub async fn forget(repo: &Repository, opts: ForgetOptions<'_>) -> Result<Forgotten> {
    repo.full("forget snapshots")?;
    let (mut list, unreadable) = repo.snapshots().await?;
    if !opts.dry_run {
        // An earlier forget that was interrupted after its record: finished first.
        crate::ledger::finish_forgets(repo, &mut list).await?;
    }
    if let Some(first) = unreadable.first() {
        return Err(Error::Corrupt {
            object: format!("{} snapshot manifest(s)", unreadable.len()),
            detail: format!(
                "cannot be read (first: {first}); nothing was forgotten (run `kluis check`)"
            ),
        });
    }
    if let Some(only) = opts.only {
        list.retain(|s| only(s));
    }
    let decisions =
        crate::retention::decide(&list, opts.policy, Timestamp::now(), &opts.time_zone)?;
    if opts.dry_run {
        return Ok(Forgotten {
            decisions,
            removed: 0,
            warnings: Vec::new(),
        });
    }
    if opts.cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    let doomed: Vec<&Snapshot> = decisions
        .iter()
        .filter(|d| !d.keep)
        .filter_map(|d| list.iter().find(|s| s.id.to_hex() == d.id))
        .collect();
    // A forget record names them before they go.
    let mut warnings =
        crate::ledger::forget(repo, &doomed, opts.ledger.as_ref(), &crate::hostname()).await?;
    let removed = doomed.len();
    if removed > 0 {
        let ids: Vec<String> = doomed.iter().map(|s| s.id.short()).collect();
        let event = crate::audit::Event::new("forget", ids.join(","))
            .with("removed", removed)
            .with("policy", format!("{:?}", opts.policy));
        if let Some(w) = crate::audit::record(repo, event, opts.ledger.as_ref()).await {
            warnings.push(w);
        }
    }
    Ok(Forgotten {
        decisions,
        removed,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{BackupOptions, Source, backup};

    async fn with_snapshots(n: usize) -> Repository {
        let repo = crate::repository::for_tests("memory://").await;
        for i in 0..n {
            let data = format!("snapshot {i}").into_bytes();
            let source = Source::Stream(Box::new(std::io::Cursor::new(data)));
            let mut opts = BackupOptions::new("db");
            opts.time = Some(Timestamp::now() - jiff::SignedDuration::from_hours(i as i64));
            backup(&repo, source, opts).await.unwrap();
        }
        repo
    }

    fn keep_last(n: u32) -> Policy {
        Policy {
            keep_last: n,
            ..Policy::default()
        }
    }

    fn options(policy: &Policy, dry_run: bool) -> ForgetOptions<'_> {
        ForgetOptions {
            policy,
            time_zone: TimeZone::UTC,
            only: None,
            dry_run,
            ledger: None,
            cancel: Cancel::new(),
        }
    }

    #[tokio::test]
    async fn a_policy_forgets_what_it_does_not_keep_and_a_dry_run_nothing() {
        let repo = with_snapshots(3).await;
        let policy = keep_last(1);
        let dry = forget(&repo, options(&policy, true)).await.unwrap();
        assert_eq!((dry.decisions.len(), dry.removed), (3, 0));
        assert_eq!(repo.snapshots().await.unwrap().0.len(), 3);
        let done = forget(&repo, options(&policy, false)).await.unwrap();
        assert_eq!(done.removed, 2);
        assert_eq!(repo.snapshots().await.unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn an_unreadable_manifest_stops_it_as_corrupt_before_anything_goes() {
        let repo = with_snapshots(3).await;
        let manifests = repo.store().list("snapshots/").await.unwrap();
        let victim = &manifests[0].name;
        repo.store()
            .put(victim, bytes::Bytes::from_static(b"not a manifest"))
            .await
            .unwrap();
        let policy = keep_last(1);
        let err = forget(&repo, options(&policy, false)).await.unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert_eq!(err.exit_code(), crate::error::exit::CORRUPT, "{err}");
        assert!(err.to_string().contains("nothing was forgotten"), "{err}");
        assert_eq!(repo.store().list("snapshots/").await.unwrap().len(), 3);
    }
}
