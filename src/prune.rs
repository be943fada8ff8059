//! `prune`: give back the space of forgotten snapshots, safely while other hosts back up.
//!
//! Writers take no locks. Prune deletes in two phases (docs/FORMAT.md §6.6):
//!
//! 1. **Mark.** Packs that no snapshot needs (and superseded index segments, and packs whose
//!    used blobs were just copied into new packs by a repack) are written into a *mark*
//!    (`prune/marks/<id>`), with its time and the grace period. From then on writers treat
//!    the marked packs as absent: they never deduplicate against them.
//! 2. **Sweep.** A later prune, once the grace period has passed, lists every snapshot again
//!    (those committed in between included) and deletes only the marked packs whose used blobs
//!    all live in some pack that stays. It first rewrites the index without the doomed packs,
//!    then deletes them, then records the sweep (`prune/swept/<id>`).
//!
//! A backup that started before a mark was written may have deduplicated against a marked
//! pack. Before it commits, it lists the marks again: if a mark it did not see condemns a pack
//! it reused and that mark's sweep is near or done, it refuses to commit ([`WriterView`]).
//! Otherwise its snapshot lands before the sweep lists snapshots, and the sweep keeps the pack.
//!
//! Where each part lives: `records` (marks and sweep records), `writer` (the writer's
//! side: [`WriterView`]), `lease` (one prune at a time), `run` (one run, in order), `sweep`,
//! `repack`, `keys` (epoch keys of months that hold nothing any more: marked, then swept like
//! packs).
//!
//! Two prunes never run at once ([`LeaseGuard`]). Every time the protocol compares is the store's
//! ([`crate::clock`]): when a mark was written, when a sweep finished, when a lease was
//! renewed; no host's wall clock decides what is deleted. Every listing error aborts; an
//! unreadable snapshot or index segment aborts, because prune would not know what it needs.

mod keys;
pub(crate) mod lease;
mod records;
mod repack;
mod run;
mod sweep;
mod writer;

pub use lease::{LEASE_TTL, Lease, LeaseGuard};
pub use records::{Mark, Swept};
pub use writer::WriterView;

use records::{get_json, list_records, put_json};

use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use serde::Serialize;

use crate::clock::Stopwatch;
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::index::{IdMap, IdSet, Index};
use crate::object::Epoch;
use crate::pack::BlobEntry;
use crate::progress::Cancel;
use crate::repository::Repository;

/// How long a marked pack stays before a sweep may delete it: longer than the longest backup.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The shortest grace period the command line accepts without `--unsafe-short-grace`.
pub const MIN_GRACE: Duration = Duration::from_secs(3600);
/// A pack whose unused share of bytes reaches this is repacked.
pub const DEFAULT_REPACK_THRESHOLD: f64 = 0.2;
/// How long a swept mark is kept, so a writer that started before the mark can still see it.
/// A backup running longer than this refuses to commit.
pub const TOMBSTONE_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A clock object (`prune/clock/<id>`) older than this was left by a killed process.
const CLOCK_LEFTOVER: Duration = Duration::from_secs(3600);
/// Index entries per segment written by prune.
const SEGMENT_BLOBS: usize = 65_536;
/// Objects deleted or fetched at once.
const CONCURRENCY: usize = 16;

/// How to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Marked objects are deleted only this long after they were marked.
    pub grace: Duration,
    /// Packs with at least this share of unused bytes are repacked (0..=1; above 1: never).
    pub repack_threshold: f64,
    /// Report what would happen; write and delete nothing.
    pub dry_run: bool,
    pub host: String,
    pub cancel: Cancel,
    /// The prune lease's time to live; it is renewed every quarter of it.
    pub lease_ttl: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: DEFAULT_GRACE,
            repack_threshold: DEFAULT_REPACK_THRESHOLD,
            dry_run: false,
            host: crate::hostname(),
            cancel: Cancel::new(),
            lease_ttl: LEASE_TTL,
        }
    }
}

/// What a prune did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub packs: usize,
    pub blobs_used: usize,
    /// Marks whose grace period had passed and that this run swept.
    pub marks_swept: usize,
    pub packs_deleted: usize,
    /// Bytes of the packs deleted.
    pub bytes_reclaimed: u64,
    /// Marked packs the sweep kept, because a snapshot committed since needs them.
    pub packs_kept: usize,
    pub segments_written: usize,
    pub segments_deleted: usize,
    /// Epoch keys of months that hold nothing any more, deleted by this run's sweep (every
    /// key generation's copy of each).
    pub keys_deleted: usize,
    /// Condemned epoch keys the sweep kept: their month holds something again.
    pub keys_kept: usize,
    /// Packs marked by this run (the sweep of a later run deletes them).
    pub packs_marked: usize,
    pub bytes_marked: u64,
    pub segments_marked: usize,
    /// Epoch keys marked by this run (their month holds no snapshot, index segment or pack).
    pub keys_marked: usize,
    pub packs_repacked: usize,
    /// Bytes written into new packs by repacking.
    pub bytes_repacked: u64,
    /// Staging files of writers killed mid-write (local stores), older than the grace period,
    /// deleted (or, with `dry_run`, found).
    pub staging_deleted: usize,
    pub staging_bytes: u64,
    /// Manifests a forget record names that were present again, deleted.
    pub forgotten_deleted: usize,
    /// When the objects marked by this run may be deleted.
    pub next_sweep: Option<Timestamp>,
    /// Marks still inside their grace period (not swept by this run).
    pub marks_pending: usize,
    pub warnings: Vec<String>,
    pub duration_seconds: f64,
}

/// Prunes the repository: sweeps marks whose grace period has passed, then marks what is
/// unused now. Holds the prune lease while it runs.
pub async fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    repo.full("prune")?;
    if opts.repack_threshold.is_nan() || opts.repack_threshold < 0.0 {
        return Err(Error::invalid("repack threshold must be between 0 and 1"));
    }
    let begun = Stopwatch::start();
    let mut report = if opts.dry_run {
        // A dry run writes nothing, not even a lease or a clock object: it goes by this
        // host's clock, so under clock skew its "would" may differ from a real run.
        Pruner::new(repo, opts, None, Timestamp::now())
            .run()
            .await?
    } else {
        let lease = LeaseGuard::acquire(repo, &opts.host, opts.lease_ttl).await?;
        let result = lease
            .hold(Pruner::new(repo, opts, Some(&lease), lease.acquired).run())
            .await;
        let released = lease.release().await;
        let report = result?;
        released?;
        report
    };
    report.duration_seconds = begun.elapsed().as_secs_f64();
    if !opts.dry_run {
        let event = crate::audit::Event::new("prune", repo.store().location())
            .with("packs_deleted", report.packs_deleted)
            .with("packs_marked", report.packs_marked)
            .with("packs_repacked", report.packs_repacked)
            .with("bytes_reclaimed", report.bytes_reclaimed);
        if let Some(w) = crate::audit::record(repo, event, None).await {
            report.warnings.push(w);
        }
    }
    Ok(report)
}

/// One pack as prune sees it.
struct PackRec {
    epoch: Epoch,
    key_id: ObjectId,
    length: u32,
    entries: Vec<BlobEntry>,
    /// The size the data listing reports; `None` when the pack is missing.
    listed: Option<u64>,
}

/// A live (not superseded) index segment.
struct LiveSegment {
    object: String,
    id: ObjectId,
    epoch: Epoch,
    key_id: ObjectId,
    packs: Vec<ObjectId>,
    /// The segments it supersedes.
    supersedes: Vec<ObjectId>,
}

struct Pruner<'a> {
    repo: &'a Repository,
    opts: &'a PruneOptions,
    /// The lease this run holds (none in a dry run).
    lease: Option<&'a LeaseGuard<'a>>,
    /// The store's time when the run began.
    now: Timestamp,
    report: PruneReport,
    /// Segments this run's sweep superseded; the next sweep deletes them.
    retired: Vec<String>,
}

/// Prune cannot go on past `e` on `object` (`why`): damage keeps its corrupt-data meaning
/// (exit code 13) and says that prune stopped; other errors (storage) pass unchanged.
fn stopped(e: Error, object: &str, why: &str) -> Error {
    let note = format!("prune stopped and changed nothing: {why} (run `kluis check`)");
    match e {
        Error::Corrupt { object, detail } => Error::Corrupt {
            object,
            detail: format!("{detail}; {note}"),
        },
        Error::MissingObject { object } => Error::corrupt(object, format!("missing; {note}")),
        Error::Store { .. } | Error::Io { .. } | Error::Interrupted => e,
        other => Error::corrupt(object, format!("{other}; {note}")),
    }
}

async fn delete_all(repo: &Repository, objects: Vec<String>) -> Result<()> {
    futures::stream::iter(objects)
        .map(|o| async move { repo.store().delete(&o).await })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<Result<()>>>()
        .await
        .into_iter()
        .collect()
}

/// The index prune resolves blobs with: each blob's home is its copy in a pack that stays,
/// preferring packs no mark condemns, so a pack is never judged redundant because of a copy
/// that is itself on its way out.
fn home_index(
    packs: &IdMap<ObjectId, PackRec>,
    gone: &IdSet<ObjectId>,
    condemned: &IdSet<ObjectId>,
) -> Index {
    let mut index = Index::default();
    let mut ordered: Vec<(&ObjectId, &PackRec)> = packs
        .iter()
        .filter(|(id, p)| !gone.contains(*id) && p.listed.is_some())
        .collect();
    ordered.sort_by_key(|(id, _)| (condemned.contains(*id), **id));
    for (id, p) in ordered {
        index.add_pack(p.epoch, p.key_id, *id, p.length, &p.entries);
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::name;
    use bytes::Bytes;

    async fn repo() -> Repository {
        crate::repository::for_tests("memory://").await
    }

    #[tokio::test]
    async fn stray_objects_under_prune_are_named_and_stop_nothing() {
        // Issue 18, defect 6: one junk object under prune/marks/ stopped every backup.
        let repo = repo().await;
        repo.store()
            .put("prune/marks/notes.txt", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let junk = name::prune_object(name::PRUNE_MARKS, &ObjectId::random());
        repo.store()
            .put(&junk, Bytes::from_static(b"not a mark"))
            .await
            .unwrap();
        let view = WriterView::read(&repo).await.unwrap();
        let warnings = view.warnings().join("\n");
        assert!(warnings.contains("prune/marks/notes.txt"), "{warnings}");
        assert!(warnings.contains(&junk), "{warnings}");
        assert!(view.condemned().is_empty());
        view.check_commit(
            &repo,
            &[ObjectId::random()].into_iter().collect(),
            (Epoch::of(jiff::Timestamp::now()), ObjectId::random()),
        )
        .await
        .unwrap();
        let report = prune(
            &repo,
            &PruneOptions {
                grace: Duration::from_secs(0),
                ..PruneOptions::default()
            },
        )
        .await
        .unwrap();
        assert!(
            report.warnings.iter().any(|w| w.contains(&junk)),
            "{report:?}"
        );
    }

    #[test]
    fn margins_stay_inside_the_grace_period() {
        assert_eq!(
            writer::margin(Duration::from_secs(4)),
            Duration::from_secs(1)
        );
        assert_eq!(writer::margin(DEFAULT_GRACE), Duration::from_secs(600));
    }
}
