//! One prune run: read what the repository holds and needs, sweep the due marks, mark what is
//! unused now, collect staging files and expired records.

use std::collections::{HashMap, HashSet};

use jiff::Timestamp;

use crate::clock::{self, add};
use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::index::{IdMap, IdSet, Index};
use crate::object::{Epoch, name};
use crate::repository::Repository;
use crate::tree::{self, Tree};

use super::keys::EpochKeys;
use super::records::{list_marks, list_records, put_json, read_marks};
use super::*;

impl<'a> Pruner<'a> {
    pub(super) fn new(
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

    pub(super) fn cancelled(&self) -> Result<()> {
        if self.opts.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        Ok(())
    }

    /// Before a step that changes the repository: still cancelled-free and still the lease
    /// holder.
    pub(super) async fn may_change(&self) -> Result<()> {
        self.cancelled()?;
        match self.lease {
            Some(lease) => lease.check().await,
            None => Ok(()),
        }
    }

    pub(super) async fn run(mut self) -> Result<PruneReport> {
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
        // Everything of an epoch: while a month holds any of it, its keys stay. The keys are
        // listed after the snapshots, segments and packs, so a key made since is younger than
        // the grace period and is not marked.
        let mut held: Vec<(Epoch, String)> = Vec::new();
        held.extend(snapshots.iter().map(|s| (s.epoch(), String::new())));
        held.extend(replayed.iter().filter_map(|o| {
            name::parse_epoch_object(name::SNAPSHOTS, o).map(|(e, _)| (e, String::new()))
        }));
        held.extend(loaded.iter().map(|(o, _, e, _, _)| (*e, o.clone())));
        held.extend(
            listed.keys().filter_map(|o| {
                name::parse_epoch_object(name::DATA, o).map(|(e, _)| (e, o.clone()))
            }),
        );
        // Archived WAL (crate::wal) is sealed under its month's key too; prune deletes none.
        for o in repo.store().list(name::WAL).await? {
            if let Some((e, ..)) = name::parse_wal(&o.name) {
                held.push((e, String::new()));
            }
        }
        let present_segments: HashSet<ObjectId> = loaded.iter().map(|(_, id, ..)| *id).collect();
        let keys = EpochKeys::list(repo).await?;

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
                supersedes: seg.supersedes,
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
        // Epochs the sweep wrote new index segments in: they hold something, whatever the
        // listing before it said.
        let mut rewritten: HashSet<Epoch> = HashSet::new();
        let due_segments: HashSet<&str> = due
            .iter()
            .flat_map(|m| m.segments.iter().map(String::as_str))
            .collect();
        if !due.is_empty() {
            self.may_change().await?;
            let swept_now = self.sweep(&due, &packs, &used, &listed, &mut live).await?;
            deleted = swept_now.packs;
            rewritten = swept_now.rewritten;
            let mut occupied = occupied(&held, |o| {
                due_segments.contains(o) || pack_in(o, |id| deleted.contains(id))
            });
            occupied.extend(rewritten.iter().copied());
            self.sweep_keys(&due, &occupied, &keys).await?;
            self.record_swept(&due).await?;
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
        let mut already_keys: HashSet<(Epoch, ObjectId)> = HashSet::new();
        for m in &pending {
            already.extend(m.pack_ids());
            already_segments.extend(m.segments.iter().map(String::as_str));
            already_keys.extend(m.key_ids());
        }
        let mut mark = Mark {
            id: ObjectId::random(),
            created: Timestamp::now(),
            host: self.opts.host.clone(),
            grace_seconds: self.opts.grace.as_secs(),
            packs: Vec::new(),
            segments: Vec::new(),
            keys: Vec::new(),
        };
        for object in old_segments.iter().chain(&self.retired) {
            if !already_segments.contains(object.as_str())
                && !due_segments.contains(object.as_str())
            {
                mark.segments.push(object.clone());
            }
        }
        // A segment that lists no pack was written by a sweep to supersede others; once they
        // are gone it has nothing left to do.
        for seg in &live {
            if seg.packs.is_empty()
                && !already_segments.contains(seg.object.as_str())
                && !due_segments.contains(seg.object.as_str())
                && seg.supersedes.iter().all(|old| {
                    !present_segments.contains(old)
                        || due_segments.contains(name::index(seg.epoch, old).as_str())
                })
            {
                mark.segments.push(seg.object.clone());
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
                // The share of the blobs' bytes no snapshot needs: the pack's header and table
                // of contents do not count, or a pack of one small blob (what a repack of a
                // mostly unused pack can leave) would be repacked by every prune, forever.
                let blob_bytes: u64 = p.entries.iter().map(|e| u64::from(e.length)).sum();
                let unused = 1.0 - used_bytes as f64 / blob_bytes.max(1) as f64;
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
        // Keys of months that will hold nothing once this mark and the pending ones are
        // swept, each of whose objects is older than the grace period (a backup that just
        // made one has not uploaded yet). A writer that read the marks before this one and
        // still uses such a key refuses to commit near the sweep, and the sweep deletes a key
        // only if its month then holds nothing.
        let condemned_now: HashSet<&str> = mark
            .packs
            .iter()
            .chain(&mark.segments)
            .map(String::as_str)
            .collect();
        let mut occupied = occupied(&held, |o| {
            condemned_now.contains(o)
                || already_segments.contains(o)
                || due_segments.contains(o)
                || pack_in(o, |id| deleted.contains(id) || already.contains(id))
        });
        occupied.extend(rewritten.iter().copied());
        let swept_keys: HashSet<(Epoch, ObjectId)> = due.iter().flat_map(|m| m.key_ids()).collect();
        let settled = clock::sub(now, self.opts.grace);
        for (&(epoch, id), objects) in &keys.0 {
            if !occupied.contains(&epoch)
                && !already_keys.contains(&(epoch, id))
                && !swept_keys.contains(&(epoch, id))
                && objects.iter().all(|(_, stored)| *stored <= settled)
            {
                mark.keys.push(name::epoch_key(epoch, &id, None));
            }
        }
        mark.packs.sort();
        mark.segments.sort();
        self.report.packs_marked = mark.packs.len();
        self.report.segments_marked = mark.segments.len();
        self.report.keys_marked = mark.keys.len();
        if !mark.packs.is_empty() || !mark.segments.is_empty() || !mark.keys.is_empty() {
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
    pub(super) async fn used_blobs(
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
}

/// The epochs that hold an object of `held` (snapshots have an empty name) that `gone` does
/// not take away.
fn occupied(held: &[(Epoch, String)], gone: impl Fn(&str) -> bool) -> HashSet<Epoch> {
    held.iter()
        .filter(|(_, o)| o.is_empty() || !gone(o))
        .map(|(e, _)| *e)
        .collect()
}

/// Whether `object` is a pack whose id satisfies `test`.
fn pack_in(object: &str, test: impl Fn(&ObjectId) -> bool) -> bool {
    name::parse_epoch_object(name::DATA, object).is_some_and(|(_, id)| test(&id))
}
