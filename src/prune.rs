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
//! Two prunes never run at once ([`lease`]). Every time the protocol compares is the store's
//! ([`crate::clock`]): when a mark was written, when a sweep finished, when a lease was
//! renewed; no host's wall clock decides what is deleted. Every listing error aborts; an
//! unreadable snapshot or index segment aborts, because prune would not know what it needs.

mod lease;

pub use lease::{LEASE_TTL, Lease, LeaseGuard};

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::{self, Stopwatch, add};
use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::index::{IdMap, IdSet, Index, IndexSegment, IndexedPack};
use crate::object::{Epoch, Kind, name};
use crate::pack::{self, BlobEntry, PackWriter};
use crate::progress::Cancel;
use crate::repository::Repository;
use crate::tree::{self, Tree};

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

/// A mark: what a prune condemned, and from when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    pub id: ObjectId,
    /// By the marking host's clock: for people. The protocol uses the store's time of the
    /// mark object.
    pub created: Timestamp,
    pub host: String,
    /// The sweep may delete the marked objects from the mark object's store time plus this.
    pub grace_seconds: u64,
    /// Pack object names (`data/E/xx/id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<String>,
    /// Superseded index segment names (`index/E/id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
}

impl Mark {
    fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }

    /// When the sweep may run, for a mark the store timed `stored`: the earliest store time
    /// at which a sweep could delete (writers compare with this).
    pub fn due(&self, stored: Timestamp) -> Timestamp {
        add(stored, self.grace())
    }

    fn pack_ids(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.packs
            .iter()
            .filter_map(|p| name::parse_epoch_object(name::DATA, p).map(|(_, id)| id))
    }
}

/// The record that a mark's sweep finished (its store time says when).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Swept {
    pub id: ObjectId,
    pub swept: Timestamp,
}

/// How far a writer stays from a sweep: clocks of different hosts may disagree by this much.
fn margin(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(600))
}

async fn put_json<T: Serialize>(repo: &Repository, object: &str, value: &T) -> Result<()> {
    let plain = serde_json::to_vec(value).expect("prune records serialize");
    repo.store()
        .put(object, repo.seal_master(Kind::Prune, object, &plain))
        .await
}

async fn get_json<T: DeserializeOwned>(repo: &Repository, object: &str) -> Result<T> {
    let plain = repo.open_master(Kind::Prune, object).await?;
    serde_json::from_slice(&plain)
        .map_err(|e| Error::corrupt(object, format!("does not parse: {e}")))
}

/// The ids under one of the `prune/` prefixes, each with its store time. A name that is not
/// a record's (left by someone else) is added to `junk` and otherwise ignored: no object
/// prune writes has it, so nothing depends on it.
async fn list_records(
    repo: &Repository,
    prefix: &str,
    junk: &mut Vec<String>,
) -> Result<Vec<(ObjectId, Timestamp)>> {
    let mut records = Vec::new();
    for o in repo.store().list(prefix).await? {
        match name::parse_prune_object(prefix, &o.name) {
            Some(id) => records.push((id, o.modified)),
            None => junk.push(format!(
                "{}: not a kluis object name under {prefix}/, ignored (remove it)",
                o.name
            )),
        }
    }
    Ok(records)
}

/// Marks, and the marks that were swept, each with its store time.
type Marks = (Vec<(ObjectId, Timestamp)>, HashMap<ObjectId, Timestamp>);

async fn list_marks(repo: &Repository, junk: &mut Vec<String>) -> Result<Marks> {
    // Sweep records first: prune expires a mark before its record, so a mark listed after
    // the records is either known swept or not yet expired.
    let swept = list_records(repo, name::PRUNE_SWEPT, junk).await?;
    let marks = list_records(repo, name::PRUNE_MARKS, junk).await?;
    Ok((marks, swept.into_iter().collect()))
}

/// Reads marks; each comes back with its store time. A mark deleted since it was listed
/// (expired, long after its sweep) is left out. A mark that cannot be read (damaged, or not
/// prune's) is added to `junk` and left out: nobody sweeps what it condemns, and the next
/// prune marks again whatever of it is still unused, so ignoring it deletes nothing early.
async fn read_marks(
    repo: &Repository,
    listed: &[(ObjectId, Timestamp)],
    junk: &mut Vec<String>,
) -> Result<Vec<(Mark, Timestamp)>> {
    let objects: Vec<(ObjectId, Timestamp, String)> = listed
        .iter()
        .map(|(id, stored)| (*id, *stored, name::prune_object(name::PRUNE_MARKS, id)))
        .collect();
    let read = futures::stream::iter(objects)
        .map(|(id, stored, object)| async move {
            let mark: Mark = match get_json(repo, &object).await {
                Ok(m) => m,
                Err(Error::MissingObject { .. }) => return Ok(None),
                Err(e @ Error::Corrupt { .. }) => return Ok(Some(Err(e.to_string()))),
                Err(e) => return Err(e),
            };
            if mark.id != id {
                return Ok(Some(Err(format!(
                    "{object}: id differs from the object's name"
                ))));
            }
            Ok(Some(Ok((mark, stored))))
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<Result<Option<std::result::Result<(Mark, Timestamp), String>>>>>()
        .await;
    let mut marks = Vec::new();
    for read in read {
        match read? {
            Some(Ok(mark)) => marks.push(mark),
            Some(Err(why)) => junk.push(format!("{why}; this mark is ignored")),
            None => {}
        }
    }
    Ok(marks)
}

/// What a writer (backup, copy) learned about prune before it started: the marks it saw, and
/// the packs they condemn, which it must not deduplicate against.
#[derive(Debug)]
pub struct WriterView {
    seen: HashSet<ObjectId>,
    condemned: IdSet<ObjectId>,
    started: Stopwatch,
    /// Objects under `prune/` that are not prune's or cannot be read: ignored, reported.
    warnings: Vec<String>,
}

impl WriterView {
    /// Reads the marks. Call it before loading the index.
    pub async fn read(repo: &Repository) -> Result<WriterView> {
        let started = Stopwatch::start();
        let mut warnings = Vec::new();
        let (marks, swept) = list_marks(repo, &mut warnings).await?;
        let live: Vec<(ObjectId, Timestamp)> = marks
            .iter()
            .filter(|(m, _)| !swept.contains_key(m))
            .copied()
            .collect();
        let mut condemned = IdSet::default();
        for (mark, _) in read_marks(repo, &live, &mut warnings).await? {
            condemned.extend(mark.pack_ids());
        }
        Ok(WriterView {
            seen: marks.into_iter().map(|(id, _)| id).collect(),
            condemned,
            started,
            warnings,
        })
    }

    /// What the writer should report: objects under `prune/` it ignored.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Packs the writer must treat as absent.
    pub fn condemned(&self) -> &IdSet<ObjectId> {
        &self.condemned
    }

    /// Decides whether the writer may still write an object that references the packs
    /// `needed`: an index segment listing packs it uploaded, or the snapshot manifest (which
    /// needs the packs it deduplicated against *and* those its run uploaded). It may not if a
    /// mark written since [`WriterView::read`] condemns one of them and that mark's sweep is
    /// done or near (within the margin), by the store's clock: a writer whose own clock is
    /// wrong decides the same. A segment listing a swept pack would make later backups
    /// deduplicate against data that is gone.
    pub async fn check_commit(&self, repo: &Repository, needed: &IdSet<ObjectId>) -> Result<()> {
        let elapsed = self.started.elapsed();
        if elapsed >= TOMBSTONE_LIFE {
            return Err(Error::Conflict(format!(
                "this run took {}, longer than prune's record keeping ({}); nothing was committed, run it again",
                crate::retention::show(elapsed),
                crate::retention::show(TOMBSTONE_LIFE)
            )));
        }
        let (marks, swept) = list_marks(repo, &mut Vec::new()).await?;
        let new: Vec<(ObjectId, Timestamp)> = marks
            .into_iter()
            .filter(|(m, _)| !self.seen.contains(m))
            .collect();
        if new.is_empty() || needed.is_empty() {
            return Ok(());
        }
        // The store's clock, read only when a new mark touches this snapshot (rare).
        let mut now = None;
        for (mark, stored) in read_marks(repo, &new, &mut Vec::new()).await? {
            if !mark.pack_ids().any(|p| needed.contains(&p)) {
                continue;
            }
            let refuse = |why: String| {
                Err(Error::Conflict(format!(
                    "a prune (mark {}, host {}) condemned data this snapshot needs, and {why}; \
                     nothing was committed, run it again",
                    mark.id.short(),
                    mark.host,
                )))
            };
            if swept.contains_key(&mark.id) {
                return refuse("has already deleted it".into());
            }
            let now = match now {
                Some(n) => n,
                None => *now.insert(clock::store_now(repo).await?),
            };
            let due = mark.due(stored);
            if add(now.latest(), margin(mark.grace())) >= due {
                return refuse(format!(
                    "its grace period ends at {due} by the store's clock (now {})",
                    now.earliest
                ));
            }
        }
        Ok(())
    }
}

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
    /// Packs marked by this run (the sweep of a later run deletes them).
    pub packs_marked: usize,
    pub bytes_marked: u64,
    pub segments_marked: usize,
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

impl<'a> Pruner<'a> {
    fn new(
        repo: &'a Repository,
        opts: &'a PruneOptions,
        lease: Option<&'a LeaseGuard<'a>>,
        now: Timestamp,
    ) -> Self {
        Pruner {
            repo,
            opts,
            lease,
            now,
            report: PruneReport {
                dry_run: opts.dry_run,
                ..PruneReport::default()
            },
            retired: Vec::new(),
        }
    }

    fn cancelled(&self) -> Result<()> {
        if self.opts.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        Ok(())
    }

    /// Before a step that changes the repository: still cancelled-free and still the lease
    /// holder.
    async fn may_change(&self) -> Result<()> {
        self.cancelled()?;
        match self.lease {
            Some(lease) => lease.check().await,
            None => Ok(()),
        }
    }

    async fn run(mut self) -> Result<PruneReport> {
        let repo = self.repo;
        let now = self.now;

        // Marks first: a mark read after the snapshots could name a pack a snapshot listed
        // before it needed. `now` was read from the store before this listing, so every
        // snapshot committed before a due mark's due time is in the listing below.
        let mut junk = Vec::new();
        let (mark_ids, swept) = list_marks(repo, &mut junk).await?;
        let marks = read_marks(repo, &mark_ids, &mut junk).await?;
        self.report.warnings.extend(junk);
        let (due, pending): (Vec<_>, Vec<_>) = marks
            .iter()
            .filter(|(m, _)| !swept.contains_key(&m.id))
            .map(|(m, stored)| (m, *stored))
            .partition(|(m, stored)| m.due(*stored) <= now);
        let due: Vec<&Mark> = due.into_iter().map(|(m, _)| m).collect();
        self.report.marks_pending = pending.len();
        let pending_due = pending.iter().map(|(m, stored)| m.due(*stored)).min();
        let pending: Vec<&Mark> = pending.into_iter().map(|(m, _)| m).collect();

        let (mut snapshots, mut unreadable) = repo.snapshots().await?;
        // Manifests a forget record names are gone on purpose: one present again was put back
        // (a replay) or its forget did not finish. Prune neither keeps data for it nor stops
        // on it, and deletes it.
        let (forgotten, forget_errors) = crate::ledger::forgotten(repo).await?;
        self.report
            .warnings
            .extend(forget_errors.iter().map(|e| format!("{e} (ignored)")));
        let mut replayed: Vec<String> = Vec::new();
        snapshots.retain(|s| {
            let object = name::snapshot(s.epoch(), &s.id);
            let keep = !forgotten.contains_key(&object);
            if !keep {
                replayed.push(object);
            }
            keep
        });
        unreadable.retain(|u| {
            let keep = !forgotten.contains_key(&u.object);
            if !keep {
                replayed.push(u.object.clone());
            }
            keep
        });
        // Drill reports and forget records a forget record names (accepted as gone by
        // `check --acknowledge`) that are back: deleted as well.
        for prefix in [name::DRILLS, name::FORGOTTEN] {
            for o in repo.store().list(prefix).await? {
                if forgotten.contains_key(&o.name) {
                    replayed.push(o.name);
                }
            }
        }
        if let Some(bad) = unreadable.into_iter().next() {
            let what = bad.object.clone();
            return Err(stopped(
                bad.error,
                &what,
                "prune must know what every snapshot needs",
            ));
        }
        self.report.snapshots = snapshots.len();

        // Every index segment; an unreadable one stops prune, as it may list needed packs.
        let mut loaded = Vec::new();
        for (object, result) in repo.index_segments(name::INDEX).await? {
            let (epoch, key_id, seg) =
                result.map_err(|e| stopped(e, &object, "prune must read every index segment"))?;
            let id = name::parse_epoch_object(name::INDEX, &object)
                .map(|(_, id)| id)
                .ok_or_else(|| Error::corrupt(&object, "not an index segment name"))?;
            loaded.push((object, id, epoch, key_id, seg));
        }
        let superseded: HashSet<ObjectId> = loaded
            .iter()
            .flat_map(|(_, _, _, _, s)| s.supersedes.iter().copied())
            .collect();
        let listed: HashMap<String, u64> = repo.store().sizes(name::DATA).await?;

        let mut packs: IdMap<ObjectId, PackRec> = IdMap::default();
        let mut live = Vec::new();
        let mut old_segments = Vec::new();
        for (object, id, epoch, key_id, seg) in loaded {
            if superseded.contains(&id) {
                old_segments.push(object);
                continue;
            }
            let mut ids = Vec::with_capacity(seg.packs.len());
            for p in seg.packs {
                ids.push(p.id);
                let listed = listed.get(&name::pack(epoch, &p.id)).copied();
                packs.entry(p.id).or_insert(PackRec {
                    epoch,
                    key_id,
                    length: p.length,
                    entries: p.blobs,
                    listed,
                });
            }
            live.push(LiveSegment {
                object,
                id,
                epoch,
                key_id,
                packs: ids,
            });
        }
        self.report.packs = packs.len();
        for (id, p) in &packs {
            if p.listed.is_none() {
                self.report.warnings.push(format!(
                    "{}: pack is missing but the index lists it (run `kluis check`)",
                    name::pack(p.epoch, id)
                ));
            }
        }

        let mut condemned: IdSet<ObjectId> = IdSet::default();
        for (m, _) in &marks {
            if !swept.contains_key(&m.id) {
                condemned.extend(m.pack_ids());
            }
        }
        let mut index = home_index(&packs, &IdSet::default(), &condemned);
        let used = self.used_blobs(&index, &snapshots).await?;
        self.report.blobs_used = used.len();
        self.cancelled()?;

        // Sweep.
        let mut deleted: IdSet<ObjectId> = IdSet::default();
        if !due.is_empty() {
            self.may_change().await?;
            deleted = self.sweep(&due, &packs, &used, &listed, &mut live).await?;
            if !deleted.is_empty() {
                let pending_packs = pending.iter().flat_map(|m| m.pack_ids()).collect();
                // One index at a time: the old one goes before the new one is built.
                drop(std::mem::take(&mut index));
                index = home_index(&packs, &deleted, &pending_packs);
            }
        }
        self.cancelled()?;

        // Mark.
        self.may_change().await?;
        let mut already: IdSet<ObjectId> = IdSet::default();
        let mut already_segments: HashSet<&str> = HashSet::new();
        for m in &pending {
            already.extend(m.pack_ids());
            already_segments.extend(m.segments.iter().map(String::as_str));
        }
        let mut mark = Mark {
            id: ObjectId::random(),
            created: Timestamp::now(),
            host: self.opts.host.clone(),
            grace_seconds: self.opts.grace.as_secs(),
            packs: Vec::new(),
            segments: Vec::new(),
        };
        let swept_segments: HashSet<&str> = due
            .iter()
            .flat_map(|m| m.segments.iter().map(String::as_str))
            .collect();
        for object in old_segments.iter().chain(&self.retired) {
            if !already_segments.contains(object.as_str())
                && !swept_segments.contains(object.as_str())
            {
                mark.segments.push(object.clone());
            }
        }
        // Packs the index lists.
        let mut repack: Vec<ObjectId> = Vec::new();
        for (id, p) in &packs {
            let Some(size) = p.listed else { continue };
            if deleted.contains(id) || already.contains(id) {
                continue;
            }
            let mut used_bytes = 0u64;
            let mut homed = false;
            for e in &p.entries {
                if used.contains(&e.id) {
                    used_bytes += u64::from(e.length);
                    homed |= index.get(&e.id).is_some_and(|(home, _)| home.id == *id);
                }
            }
            if used_bytes == 0 || !homed {
                // Nothing needs it, or every blob it holds that something needs is also
                // stored in another pack (an interrupted repack leaves such packs).
                mark.packs.push(name::pack(p.epoch, id));
                self.report.bytes_marked += size;
            } else {
                let unused = 1.0 - used_bytes as f64 / f64::from(p.length.max(1));
                if unused >= self.opts.repack_threshold && self.opts.repack_threshold <= 1.0 {
                    repack.push(*id);
                }
            }
        }
        // Packs no index lists: leftovers of interrupted backups, or packs a backup is
        // uploading right now and will index later; the grace period tells them apart.
        for (object, &size) in &listed {
            let Some((_, id)) = name::parse_epoch_object(name::DATA, object) else {
                continue;
            };
            if packs.contains_key(&id) || deleted.contains(&id) || already.contains(&id) {
                continue;
            }
            mark.packs.push(object.clone());
            self.report.bytes_marked += size;
        }
        self.cancelled()?;
        if !repack.is_empty() {
            repack.sort_by_key(|id| (packs[id].epoch, packs[id].key_id, *id));
            self.repack(&repack, &packs, &used, &index, &mut mark)
                .await?;
        }
        mark.packs.sort();
        mark.segments.sort();
        self.report.packs_marked = mark.packs.len();
        self.report.segments_marked = mark.segments.len();
        if !mark.packs.is_empty() || !mark.segments.is_empty() {
            self.report.next_sweep = Some(mark.due(now));
            if !self.opts.dry_run {
                self.may_change().await?;
                let object = name::prune_object(name::PRUNE_MARKS, &mark.id);
                put_json(repo, &object, &mark).await?;
                let stored = repo.store().modified(&object).await?;
                self.report.next_sweep = Some(mark.due(stored));
            }
        } else if let Some(first) = pending_due {
            self.report.next_sweep = Some(first);
        }

        if !replayed.is_empty() {
            self.report.warnings.extend(replayed.iter().map(|o| {
                format!("{o}: forgotten earlier, yet present (replayed, or an unfinished forget); deleted")
            }));
            self.report.forgotten_deleted = replayed.len();
            if !self.opts.dry_run {
                self.may_change().await?;
                delete_all(repo, replayed).await?;
            }
        }

        // Half-written objects of killed writers: no name refers to them, and once they are
        // older than the grace period no live writer is still writing them. (Local stores
        // only; a file's mtime is the store's clock there.)
        self.may_change().await?;
        let before = clock::system_time(clock::sub(now, self.opts.grace));
        // A walk of the whole directory: off the async threads, so lease renewal goes on.
        let store = repo.store().clone();
        let stale = tokio::task::spawn_blocking(move || store.stale_staging(before))
            .await
            .map_err(|e| Error::invalid(format!("the staging file walk crashed: {e}")))??;
        self.may_change().await?;
        for (object, size) in stale {
            if !self.opts.dry_run {
                repo.store().remove_staging(&object)?;
            }
            self.report.staging_deleted += 1;
            self.report.staging_bytes += size;
        }

        // Swept marks past their record-keeping time (by the store's clock): the mark goes
        // first, then its record. Clock objects of killed processes go too.
        if !self.opts.dry_run {
            for (id, stored) in swept {
                if add(stored, TOMBSTONE_LIFE) <= now {
                    repo.store()
                        .delete(&name::prune_object(name::PRUNE_MARKS, &id))
                        .await?;
                    repo.store()
                        .delete(&name::prune_object(name::PRUNE_SWEPT, &id))
                        .await?;
                }
            }
            for (id, stored) in list_records(repo, name::PRUNE_CLOCK, &mut Vec::new()).await? {
                if add(stored, CLOCK_LEFTOVER) <= now {
                    repo.store()
                        .delete(&name::prune_object(name::PRUNE_CLOCK, &id))
                        .await?;
                }
            }
        }
        Ok(self.report)
    }

    /// Every blob (data, tree, content list) some snapshot needs.
    async fn used_blobs(
        &self,
        index: &Index,
        snapshots: &[crate::snapshot::Snapshot],
    ) -> Result<IdSet<BlobId>> {
        let mut used: IdSet<BlobId> = IdSet::default();
        let mut trees: Vec<(BlobId, ObjectId)> = Vec::new();
        for s in snapshots {
            if used.insert(s.tree) {
                trees.push((s.tree, s.id));
            }
        }
        let needed = |id: &BlobId, snapshot: &ObjectId| -> Result<()> {
            if index.contains(id) {
                Ok(())
            } else {
                Err(Error::corrupt(
                    format!("blob {id}"),
                    format!(
                        "needed by snapshot {}, it is in no index segment; prune stopped and \
                         changed nothing (run `kluis check`)",
                        snapshot.short()
                    ),
                ))
            }
        };
        while let Some((tree_id, snapshot)) = trees.pop() {
            self.cancelled()?;
            needed(&tree_id, &snapshot)?;
            let bytes = self.repo.read_blob(index, &tree_id).await?;
            let tree = Tree::decode(&format!("tree {tree_id}"), &bytes)?;
            for node in tree.nodes {
                for id in node.content {
                    needed(&id, &snapshot)?;
                    used.insert(id);
                }
                for list in node.content_lists {
                    needed(&list, &snapshot)?;
                    if used.insert(list) {
                        let bytes = self.repo.read_blob(index, &list).await?;
                        for id in tree::decode_list(&format!("content list {list}"), &bytes)? {
                            needed(&id, &snapshot)?;
                            used.insert(id);
                        }
                    }
                }
                if let Some(sub) = node.subtree {
                    if used.insert(sub) {
                        trees.push((sub, snapshot));
                    }
                }
            }
        }
        Ok(used)
    }

    /// Deletes what the due marks condemned and nothing a snapshot needs; returns the packs
    /// deleted (or, dry, that would be).
    async fn sweep(
        &mut self,
        due: &[&Mark],
        packs: &IdMap<ObjectId, PackRec>,
        used: &IdSet<BlobId>,
        listed: &HashMap<String, u64>,
        live: &mut Vec<LiveSegment>,
    ) -> Result<IdSet<ObjectId>> {
        let repo = self.repo;
        let mut condemned: Vec<(String, ObjectId)> = due
            .iter()
            .flat_map(|m| m.packs.iter())
            .filter_map(|p| name::parse_epoch_object(name::DATA, p).map(|(_, id)| (p.clone(), id)))
            .collect();
        condemned.sort();
        condemned.dedup();
        let candidates: IdSet<ObjectId> = condemned.iter().map(|(_, id)| *id).collect();

        // Blobs some snapshot needs that live in a condemned pack and nowhere else (yet).
        let mut need: IdSet<BlobId> = IdSet::default();
        for id in &candidates {
            if let Some(p) = packs.get(id) {
                need.extend(p.entries.iter().map(|e| e.id).filter(|b| used.contains(b)));
            }
        }
        if !need.is_empty() {
            for (id, p) in packs {
                if !candidates.contains(id) && p.listed.is_some() {
                    for e in &p.entries {
                        need.remove(&e.id);
                    }
                }
            }
        }
        let mut doomed: Vec<(String, u64)> = Vec::new();
        let mut deleted: IdSet<ObjectId> = IdSet::default();
        for (object, id) in &condemned {
            let Some(&size) = listed.get(object) else {
                continue; // already gone (an earlier sweep of this mark crashed half-way)
            };
            if let Some(p) = packs.get(id) {
                if p.entries.iter().any(|e| need.contains(&e.id)) {
                    // A snapshot committed since the mark needs it: keep it.
                    self.report.packs_kept += 1;
                    for e in &p.entries {
                        need.remove(&e.id);
                    }
                    continue;
                }
            }
            doomed.push((object.clone(), size));
            deleted.insert(*id);
        }

        // The index first: new segments without the doomed packs supersede the old ones, so
        // no reader finds a blob in a pack that is about to go.
        let mut groups: HashMap<(Epoch, ObjectId), Vec<usize>> = HashMap::new();
        for (n, seg) in live.iter().enumerate() {
            if seg.packs.iter().any(|p| deleted.contains(p)) {
                groups.entry((seg.epoch, seg.key_id)).or_default().push(n);
            }
        }
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|(k, _)| *k);
        let mut retired = HashSet::new();
        for ((epoch, key_id), members) in groups {
            self.cancelled()?;
            let supersedes: Vec<ObjectId> = members.iter().map(|&n| live[n].id).collect();
            let mut kept: Vec<ObjectId> = Vec::new();
            let mut seen = IdSet::default();
            for &n in &members {
                for id in &live[n].packs {
                    if !deleted.contains(id) && seen.insert(*id) {
                        kept.push(*id);
                    }
                }
            }
            self.write_segments(epoch, key_id, &kept, packs, supersedes)
                .await?;
            retired.extend(members);
        }
        // The superseded segments are marked for a later sweep (a reader may be loading them).
        let mut n = 0;
        live.retain(|seg| {
            n += 1;
            if retired.contains(&(n - 1)) {
                self.retired.push(seg.object.clone());
                return false;
            }
            true
        });

        for (_, size) in &doomed {
            self.report.bytes_reclaimed += size;
        }
        self.report.packs_deleted = doomed.len();
        if !self.opts.dry_run {
            self.may_change().await?;
            delete_all(repo, doomed.iter().map(|(o, _)| o.clone()).collect()).await?;
        }
        // Segments the due marks condemned: superseded for a whole grace period by now.
        let segments: Vec<String> = due
            .iter()
            .flat_map(|m| m.segments.iter().cloned())
            .collect();
        self.report.segments_deleted = segments.len();
        if !self.opts.dry_run {
            delete_all(repo, segments).await?;
            for m in due {
                put_json(
                    repo,
                    &name::prune_object(name::PRUNE_SWEPT, &m.id),
                    &Swept {
                        id: m.id,
                        swept: Timestamp::now(),
                    },
                )
                .await?;
            }
        }
        self.report.marks_swept = due.len();
        Ok(deleted)
    }

    /// Writes the packs `ids` as index segments of `(epoch, key_id)`, one segment of at most
    /// 65,536 entries in memory at a time; the last carries `supersedes`, so the old segments
    /// drop out only once every new one is durable.
    async fn write_segments(
        &mut self,
        epoch: Epoch,
        key_id: ObjectId,
        ids: &[ObjectId],
        packs: &IdMap<ObjectId, PackRec>,
        supersedes: Vec<ObjectId>,
    ) -> Result<()> {
        let mut start = 0;
        while start < ids.len() || (start == 0 && ids.is_empty()) {
            let mut end = start;
            let mut blobs = 0;
            while end < ids.len() {
                let n = packs[&ids[end]].entries.len();
                if end > start && blobs + n > SEGMENT_BLOBS {
                    break;
                }
                blobs += n;
                end += 1;
            }
            let last = end >= ids.len();
            let segment = IndexSegment {
                supersedes: if last { supersedes.clone() } else { Vec::new() },
                packs: ids[start..end]
                    .iter()
                    .map(|id| {
                        let p = &packs[id];
                        IndexedPack {
                            id: *id,
                            length: p.length,
                            blobs: p.entries.clone(),
                        }
                    })
                    .collect(),
            };
            self.save_segment(epoch, key_id, &segment).await?;
            if last {
                break;
            }
            start = end;
        }
        Ok(())
    }

    async fn save_segment(
        &mut self,
        epoch: Epoch,
        key_id: ObjectId,
        segment: &IndexSegment,
    ) -> Result<()> {
        self.report.segments_written += 1;
        if self.opts.dry_run {
            return Ok(());
        }
        let key = self.repo.epoch_key(epoch, key_id).await?;
        self.repo.save_index(&key, segment).await?;
        Ok(())
    }

    /// Copies the blobs snapshots need out of half-empty packs into new packs, indexes them,
    /// and marks the old packs. Each blob is checked (decrypt, decompress, hash) on the way:
    /// repacking never carries damage forward.
    async fn repack(
        &mut self,
        ids: &[ObjectId],
        packs: &IdMap<ObjectId, PackRec>,
        used: &IdSet<BlobId>,
        index: &Index,
        mark: &mut Mark,
    ) -> Result<()> {
        let repo = self.repo;
        let pack_size = repo.config().pack_size as usize;
        let mut copied: IdSet<BlobId> = IdSet::default();
        let mut start = 0;
        while start < ids.len() {
            let (epoch, key_id) = (packs[&ids[start]].epoch, packs[&ids[start]].key_id);
            let end = start
                + ids[start..]
                    .iter()
                    .take_while(|id| packs[*id].epoch == epoch && packs[*id].key_id == key_id)
                    .count();
            let key = repo.epoch_key(epoch, key_id).await?;
            let mut writer: Option<PackWriter> = None;
            let mut done: Vec<IndexedPack> = Vec::new();
            for id in &ids[start..end] {
                self.cancelled()?;
                let p = &packs[id];
                let object = name::pack(epoch, id);
                let bytes = repo
                    .store()
                    .get_bounded(&object, u64::from(p.length))
                    .await?;
                for e in &p.entries {
                    // Only the copy the index resolves to is carried over; duplicates go.
                    let home = index.get(&e.id).is_some_and(|(h, _)| h.id == *id);
                    if !used.contains(&e.id) || !home || !copied.insert(e.id) {
                        continue;
                    }
                    let range = e.offset as usize..(e.offset as usize + e.length as usize);
                    let Some(stored) = bytes.get(range) else {
                        return Err(Error::corrupt(
                            &object,
                            format!("blob {} lies outside the pack", e.id),
                        ));
                    };
                    let mut check = stored.to_vec();
                    repo.decode_blob(&key, &object, e, &mut check)?;
                    let w = writer.get_or_insert_with(|| {
                        PackWriter::new(epoch, key_id, key.key(), repo.id(), pack_size)
                    });
                    w.add_sealed(e.id, e.kind, e.compression, e.raw_length, stored);
                    if w.len() >= pack_size {
                        let full = writer.take().expect("open pack");
                        done.push(self.upload_pack(&key, full).await?);
                    }
                }
                mark.packs.push(object);
                self.report.packs_repacked += 1;
                self.report.bytes_marked += p.listed.unwrap_or(u64::from(p.length));
            }
            if let Some(w) = writer.take() {
                done.push(self.upload_pack(&key, w).await?);
            }
            // At most 65,536 entries a segment (beyond one pack's): what readers' size bound
            // for a segment assumes.
            let mut segment = IndexSegment::default();
            for pack in done {
                if !segment.packs.is_empty()
                    && segment.blob_count() + pack.blobs.len() > SEGMENT_BLOBS
                {
                    self.save_segment(epoch, key_id, &std::mem::take(&mut segment))
                        .await?;
                }
                segment.packs.push(pack);
            }
            if !segment.packs.is_empty() {
                self.save_segment(epoch, key_id, &segment).await?;
            }
            start = end;
        }
        Ok(())
    }

    async fn upload_pack(
        &mut self,
        key: &crate::repository::EpochKey,
        writer: PackWriter,
    ) -> Result<IndexedPack> {
        let repo = self.repo;
        let pack = writer.finish(key.epoch);
        let pkey = pack::pack_key(key.key(), &repo.id(), &pack.name);
        pack::verify_sealed(
            &pack,
            &pkey,
            pack::BlobKeys {
                epoch_key: key.key(),
                repo_id: &repo.id(),
            },
            &mut Vec::new(),
        )?;
        let length = pack.bytes.len();
        self.report.bytes_repacked += length as u64;
        if !self.opts.dry_run {
            repo.store()
                .put(&pack.name, Bytes::clone(&pack.bytes))
                .await?;
        }
        Ok(IndexedPack {
            id: pack.id,
            length: length as u32,
            blobs: pack.entries,
        })
    }
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
        view.check_commit(&repo, &[ObjectId::random()].into_iter().collect())
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
        assert_eq!(margin(Duration::from_secs(4)), Duration::from_secs(1));
        assert_eq!(margin(DEFAULT_GRACE), Duration::from_secs(600));
    }
}
