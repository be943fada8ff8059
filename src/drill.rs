//! Restore drills: a snapshot restored into a scratch target on a schedule, checked, timed and
//! removed, with a report stored (encrypted) in the repository.
//!
//! A drill takes the job's newest snapshot (and, when configured, a random older one, so old
//! snapshots and copies are proven too), restores it into a target named
//! `kluis_drill_<drill>_<time>` (a database on the configured scratch server, or a file or
//! directory under `<state_dir>/drills/`), and checks, in order:
//!
//! 1. `hash`: every restored stream and file matches the SHA-256 its snapshot records (the
//!    restore verifies it end to end, as every restore does);
//! 2. `engine`: the engine accepted it: `psql` loaded every stream stopping at the first error;
//!    MySQL's `CHECK TABLE` finds every table OK; SQLite's `PRAGMA integrity_check` says ok;
//! 3. `rows`: every table's row count equals the count recorded at backup time (for a
//!    directory: the number of files);
//! 4. each configured assertion: SQL that must return true;
//! 5. `budget`: the restore finished within the recovery-time budget.
//!
//! The target is dropped afterwards whatever happened. Targets a crash left behind are
//! dropped when kluisd starts, and before the drill's next run once older than its timeout
//! (a run elsewhere may still use a younger one). A drill never touches a database or file not
//! named exactly as its own targets are (`is_leftover`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use crate::config::target_prefix;
use crate::config::{Drill, DrillKind, Loaded};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::object::{Kind, name};
use crate::progress::Cancel;
use crate::repository::Repository;
use crate::restore::{RestoreOptions, Restorer};
use crate::snapshot::{Snapshot, Source as SnapshotSource};
use crate::source::mysql::MyConn;
use crate::source::postgres::{self, PgConn};

mod scratch;
mod set;
mod verify;

pub use scratch::clean_leftovers;
use scratch::{Place, Scratch, scratch_clone};
#[cfg(test)]
use scratch::{is_leftover, with_database};
#[cfg(test)]
use verify::truthy;
use verify::verify;

/// One check of a drill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What one drill of one snapshot found. Stored in the repository as `drills/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub id: ObjectId,
    /// The drill's configured name.
    pub drill: String,
    pub job: String,
    pub repository: String,
    /// The host that ran the drill.
    pub host: String,
    pub snapshot: ObjectId,
    pub snapshot_time: Timestamp,
    pub snapshot_name: String,
    /// `newest`, `older` (the random pick), or `chosen` (asked for by id).
    pub pick: String,
    /// `postgres`, `mysql`, `sqlite`, `directory` or `stream`.
    pub kind: String,
    /// The scratch database or path restored into.
    pub target: String,
    pub started: Timestamp,
    pub finished: Timestamp,
    /// The measured recovery time: from the start of the restore until the data was usable.
    pub restore_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<f64>,
    pub checks: Vec<Check>,
    pub passed: bool,
    /// Why it failed (`corrupt`, `restore`, `rows`, `assertion`, `budget`, `scratch`,
    /// `storage`, `interrupted`, `other`); the metric label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the scratch target was removed afterwards.
    pub cleaned_up: bool,
    /// Its place in the drilling host's chain of records (see [`crate::ledger`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<crate::ledger::Chain>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub program: String,
}

/// How to run a drill.
#[derive(Debug, Clone, Default)]
pub struct DrillOptions {
    /// Test this snapshot (id prefix) instead of the newest and the random older one.
    pub snapshot: Option<String>,
    pub cancel: Cancel,
}

/// Runs a drill now: restores and checks the chosen snapshots, stores a report of each in the
/// repository and returns them. A snapshot failing its checks is a report with
/// `passed: false`; an error means no drill could be run (no snapshot, the repository
/// unreachable).
pub async fn run(config: &Loaded, drill: &Drill, opts: &DrillOptions) -> Result<Vec<DrillReport>> {
    let repo = crate::jobs::open_existing(config, &drill.repository).await?;
    let (list, _) = repo.snapshots().await?;
    let picks = if drill.job.makes_sets() {
        set::picks(drill, &list, opts)?
    } else {
        picks(drill, &list, opts)?
    };
    let scratch = Scratch::new(config, drill)?;
    let mut reports = Vec::new();
    let mut n = 0;
    for (members, pick) in picks {
        if opts.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let mut made = if drill.job.makes_sets() {
            set::drill_set(&repo, drill, &scratch, &members, pick, &mut n, &opts.cancel).await
        } else {
            n += 1;
            vec![
                drill_one(
                    &repo,
                    drill,
                    &scratch,
                    &members[0],
                    pick,
                    n - 1,
                    &opts.cancel,
                )
                .await,
            ]
        };
        for report in &mut made {
            // A repository the drill may only read (credentials for the foreign copy that
            // cannot write) still gets its drill: the report is then only in the log and the
            // metrics.
            let ledger = crate::ledger::Ledger::open(&config.state_dir, &repo);
            if let Err(e) = save(&repo, report, ledger.as_ref().ok()).await {
                report.warnings.push(format!(
                    "the report could not be stored in repository {}: {e}",
                    drill.repository
                ));
            }
        }
        reports.extend(made);
    }
    Ok(reports)
}

/// The snapshots a drill of a one-snapshot job tests: the one asked for, or the newest and
/// (with `older`) a random older one.
fn picks(
    drill: &Drill,
    list: &[Snapshot],
    opts: &DrillOptions,
) -> Result<Vec<(Vec<Snapshot>, &'static str)>> {
    let name = &drill.job.snapshot_name;
    let mine: Vec<Snapshot> = list.iter().filter(|s| &s.name == name).cloned().collect();
    if let Some(spec) = &opts.snapshot {
        let chosen = crate::snapshot::select(&mine, spec, Some(name))?;
        return Ok(vec![(vec![chosen.clone()], "chosen")]);
    }
    let newest = crate::snapshot::select(&mine, "latest", Some(name)).map_err(|_| {
        Error::SnapshotNotFound(format!(
            "of job {} in repository {} to drill",
            drill.job.name, drill.repository
        ))
    })?;
    let mut picks = vec![(vec![newest.clone()], "newest")];
    let older: Vec<&Snapshot> = mine.iter().filter(|s| s.id != newest.id).collect();
    if drill.older && !older.is_empty() {
        picks.push((vec![older[random_below(older.len())].clone()], "older"));
    }
    Ok(picks)
}

/// Stores a report in the repository, chained to this host's records when it has a ledger.
async fn save(
    repo: &Repository,
    report: &mut DrillReport,
    ledger: Option<&crate::ledger::Ledger>,
) -> Result<()> {
    let object = format!("{}/{}", name::DRILLS, report.id);
    let link = crate::ledger::try_link(ledger, &mut report.warnings).await;
    report.chain = link.as_ref().map(|l| l.chain.clone());
    let plain = serde_json::to_vec(report).expect("reports serialize");
    repo.store()
        .put(&object, repo.seal_master(Kind::Drill, &object, &plain)?)
        .await?;
    if let Some(link) = link {
        if let Err(e) = link.committed(&object) {
            report.warnings.push(format!(
                "this host's ledger could not record the report: {e}"
            ));
        }
    }
    let event = crate::audit::Event::new("drill", report.snapshot.to_hex())
        .with("drill", &report.drill)
        .with("snapshot_name", &report.snapshot_name)
        .with("target", &report.target)
        .with("report", report.id.to_hex());
    let event = match (&report.reason, report.passed) {
        (_, true) => event,
        (reason, false) => crate::audit::Event {
            result: format!("failed: {}", reason.as_deref().unwrap_or("a check failed")),
            ..event
        },
    };
    if let Some(w) = crate::audit::record(repo, event, ledger).await {
        report.warnings.push(w);
    }
    Ok(())
}

/// The drill reports a configured repository holds, oldest first; none when it cannot be
/// read (the drill history lives in the repository, so a last success survives restarts).
pub async fn reports_in(config: &Loaded, repository: &str) -> Vec<DrillReport> {
    match crate::jobs::open_existing(config, repository).await {
        Ok(repo) => history(&repo).await.map(|(h, _)| h).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Every drill report in the repository, oldest first, and the objects that could not be read.
pub async fn history(repo: &Repository) -> Result<(Vec<DrillReport>, Vec<Error>)> {
    let listed = repo.store().list(name::DRILLS).await?;
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for o in listed {
        let read = async {
            let plain = repo.open_master(Kind::Drill, &o.name).await?;
            serde_json::from_slice::<DrillReport>(&plain)
                .map_err(|e| Error::corrupt(&o.name, format!("drill report does not parse: {e}")))
        };
        match read.await {
            Ok(r) => reports.push(r),
            Err(e) => errors.push(e),
        }
    }
    reports.sort_by_key(|r| r.started);
    Ok((reports, errors))
}

fn random_below(n: usize) -> usize {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0;
    }
    (u64::from_le_bytes(b) % n.max(1) as u64) as usize
}

/// The checks and their outcome so far.
pub(super) struct Checks {
    list: Vec<Check>,
    reason: Option<&'static str>,
}

impl Checks {
    pub(super) fn pass(&mut self, name: &str, detail: impl Into<String>) {
        self.list.push(Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        });
    }

    pub(super) fn fail(&mut self, name: &str, reason: &'static str, detail: impl Into<String>) {
        self.list.push(Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
        });
        self.reason.get_or_insert(reason);
    }
}

/// What a restore error means for the drill: the check that failed and the reason label.
pub(super) fn classify(e: &Error) -> (&'static str, &'static str) {
    match e {
        Error::Corrupt { .. } | Error::MissingBlob(_) | Error::MissingObject { .. } => {
            ("hash", "corrupt")
        }
        Error::TargetFailed(_) => ("engine", "restore"),
        Error::Interrupted => ("restore", "interrupted"),
        Error::Store { .. } | Error::RepositoryNotFound { .. } => ("restore", "storage"),
        _ => ("restore", "other"),
    }
}

/// Runs blocking database work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::invalid(format!("drill check crashed: {e}")))?
}

async fn drill_one(
    repo: &Repository,
    drill: &Drill,
    scratch: &Scratch,
    snapshot: &Snapshot,
    pick: &str,
    n: usize,
    cancel: &Cancel,
) -> DrillReport {
    let started = Timestamp::now();
    let prefix = target_prefix(&drill.name);
    let mut target = format!(
        "{prefix}{}",
        started
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .strftime("%Y%m%d%H%M%S")
    );
    if n > 0 {
        target.push_str(&format!("_{n}"));
    }
    let mut checks = Checks {
        list: Vec::new(),
        reason: None,
    };
    let mut warnings = Vec::new();
    let kind = match drill.kind {
        DrillKind::Postgres => "postgres",
        DrillKind::Mysql => "mysql",
        DrillKind::Sqlite => "sqlite",
        DrillKind::Directory => "directory",
        DrillKind::Stream => "stream",
    };
    let mut shown_target = target.clone();
    let mut restore_seconds = 0.0;
    let mut cleaned_up = true;
    // Reach the scratch place, dropping leftovers of earlier runs of this drill: those older
    // than any run of it can be (another process, a CLI `kluis drill run` say, may be running
    // it right now).
    let reached = {
        let (s, p) = (scratch_clone(scratch), prefix.clone());
        let limit = drill.timeout + Duration::from_secs(300);
        let before = started.checked_sub(jiff::SignedDuration::try_from(limit).unwrap_or_default());
        blocking(move || s.clean(&p, before.ok())).await
    };
    match reached {
        Err(e) => checks.fail(
            "scratch",
            "scratch",
            format!("the scratch place cannot be used: {e}"),
        ),
        Ok(dropped) => {
            if !dropped.is_empty() {
                warnings.push(format!(
                    "dropped what an earlier drill left behind: {}",
                    dropped.join(", ")
                ));
            }
            let place = Place::new(scratch, drill.kind, &target);
            shown_target = place.shown();
            let clock = Instant::now();
            let restored = restore(repo, snapshot, &place, cancel).await;
            restore_seconds = clock.elapsed().as_secs_f64();
            match restored {
                Err(e) => {
                    let (check, reason) = classify(&e);
                    checks.fail(check, reason, e.to_string());
                }
                Ok(files) => {
                    let what = if drill.kind == DrillKind::Directory {
                        "file(s)"
                    } else {
                        "stream(s)"
                    };
                    checks.pass(
                        "hash",
                        format!(
                            "{} {what}, {} bytes: every SHA-256 matches the snapshot",
                            files.0, files.1
                        ),
                    );
                    verify(&place, snapshot, drill, &mut checks, files.0).await;
                }
            }
            if let Some(budget) = drill.budget {
                let took = Duration::from_secs_f64(restore_seconds);
                if took <= budget {
                    checks.pass(
                        "budget",
                        format!(
                            "restored in {:.1} s, within the budget of {}",
                            restore_seconds,
                            humantime::format_duration(budget)
                        ),
                    );
                } else {
                    checks.fail(
                        "budget",
                        "budget",
                        format!(
                            "restored in {:.1} s, over the budget of {}",
                            restore_seconds,
                            humantime::format_duration(budget)
                        ),
                    );
                }
            }
            if let Err(e) = place.remove().await {
                cleaned_up = false;
                warnings.push(format!("cannot remove {shown_target}: {e}"));
            }
        }
    }
    DrillReport {
        id: ObjectId::random(),
        drill: drill.name.clone(),
        job: drill.job.name.clone(),
        repository: drill.repository.clone(),
        host: crate::hostname(),
        snapshot: snapshot.id,
        snapshot_time: snapshot.time,
        snapshot_name: snapshot.name.clone(),
        pick: pick.into(),
        kind: kind.into(),
        chain: None,
        target: shown_target,
        started,
        finished: Timestamp::now(),
        restore_seconds,
        budget_seconds: drill.budget.map(|b| b.as_secs_f64()),
        passed: checks.reason.is_none(),
        reason: checks.reason.map(String::from),
        checks: checks.list,
        cleaned_up,
        warnings,
        program: format!("kluis {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Restores `snapshot` into `place`; returns the files (streams) and bytes restored.
async fn restore(
    repo: &Repository,
    snapshot: &Snapshot,
    place: &Place,
    cancel: &Cancel,
) -> Result<(u64, u64)> {
    let opts = RestoreOptions {
        cancel: cancel.clone(),
        ..RestoreOptions::default()
    };
    let restorer = Restorer::new(repo, snapshot, opts).await?;
    let report = match (place, &snapshot.source) {
        (Place::Database(t), source) if t.takes(source) => {
            restorer.to_database(t, false, 2).await?
        }
        (Place::Unusable(_, why), _) => return Err(Error::invalid(why.clone())),
        (Place::File(p), SnapshotSource::Paths { .. }) => restorer.to_directory(p).await?,
        (Place::File(p), _) => {
            let file = std::fs::File::create(p).map_err(|e| Error::io(p, e))?;
            restorer.stream_to(Box::new(file)).await?
        }
        (_, s) => {
            return Err(Error::invalid(format!(
                "snapshot {} holds a {} snapshot, not what this drill's scratch server takes",
                snapshot.id.short(),
                match s {
                    SnapshotSource::Postgres(_) => "PostgreSQL",
                    SnapshotSource::Mysql(_) => "MySQL",
                    SnapshotSource::Sqlite(_) => "SQLite",
                    _ => "file",
                }
            )));
        }
    };

    Ok((report.files, report.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_named_by_job_and_cannot_escape_their_prefix() {
        let p = target_prefix("shop");
        let t: Timestamp = "2026-11-25T12:00:00Z".parse().unwrap();
        assert!(is_leftover("kluis_drill_shop_20261125110000", &p, None));
        assert!(is_leftover(
            "kluis_drill_shop_20261125110000_1",
            &p,
            Some(t)
        ));
        assert!(!is_leftover("kluis_drill_shop_20261125130000", &p, Some(t)));
        for other in [
            "kluis_drill_shop_eu_20261125110000",
            "kluis_drill_shopping",
            "kluis_drill_shop_2026112511000",
            "kluis_drill_shop_20261125110000_",
            "kluis_drill_shop_20261125110000x",
            "shop_20261125110000",
        ] {
            assert!(!is_leftover(other, &p, None), "{other}");
        }
        assert_eq!(target_prefix("billing"), "kluis_drill_billing_");
        assert_eq!(target_prefix("Shop-EU 1"), "kluis_drill_shop_eu_1_");
        assert_eq!(
            target_prefix(&"x".repeat(80)).len(),
            "kluis_drill__".len() + 30
        );
        assert_eq!(
            with_database(
                "mysql://root@localhost/?socket=/run/m.sock",
                "kluis_drill_a_1"
            ),
            "mysql://root@localhost/kluis_drill_a_1?socket=/run/m.sock"
        );
        assert_eq!(
            with_database("postgres://kluis@scratch:5433", "d"),
            "postgres://kluis@scratch:5433/d"
        );
    }

    #[test]
    fn assertions_are_true_only_when_they_say_so() {
        for v in ["t", "true", "1", " TRUE\n"] {
            assert!(truthy(v), "{v}");
        }
        for v in ["f", "false", "0", "", "NULL", "yes"] {
            assert!(!truthy(v), "{v}");
        }
        let t: Timestamp = "2026-11-25T02:30:00.5Z".parse().unwrap();
        use crate::source::database::Inspect;
        assert_eq!(
            crate::source::sqlite::SqliteFile(PathBuf::from("x")).time_literal(t),
            "'2026-11-25 02:30:00.500000'"
        );
        let pg = PgConn::parse("postgres://u@h/d", None).unwrap();
        assert_eq!(
            pg.time_literal(t),
            "'2026-11-25T02:30:00.500000Z'::timestamptz"
        );
    }
}
