//! The sweep: what due marks condemned is deleted, after the index is rewritten without it,
//! and never a pack a snapshot committed since needs.

use std::collections::{HashMap, HashSet};

use jiff::Timestamp;

use crate::error::Result;
use crate::id::{BlobId, ObjectId};
use crate::index::{IdMap, IdSet, IndexSegment, IndexedPack};
use crate::object::{Epoch, name};

use super::records::put_json;
use super::*;

/// What a sweep deleted and rewrote.
pub(super) struct Sweep {
    pub(super) packs: IdSet<ObjectId>,
    /// The epochs it wrote new index segments in.
    pub(super) rewritten: HashSet<Epoch>,
}

impl Pruner<'_> {
    /// Deletes the packs and segments the due marks condemned and nothing a snapshot needs;
    /// returns what it deleted and rewrote (or, dry, would). The marks' keys are swept next
    /// ([`Pruner::sweep_keys`]), then the sweep is recorded ([`Pruner::record_swept`]).
    pub(super) async fn sweep(
        &mut self,
        due: &[&Mark],
        packs: &IdMap<ObjectId, PackRec>,
        used: &IdSet<BlobId>,
        listed: &HashMap<String, u64>,
        live: &mut Vec<LiveSegment>,
    ) -> Result<Sweep> {
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
        let wrote: HashSet<Epoch> = groups.iter().map(|((e, _), _)| *e).collect();
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
        }
        Ok(Sweep {
            packs: deleted,
            rewritten: wrote,
        })
    }

    /// Records that the due marks' sweep finished (after their packs, segments and keys).
    pub(super) async fn record_swept(&mut self, due: &[&Mark]) -> Result<()> {
        if !self.opts.dry_run {
            for m in due {
                put_json(
                    self.repo,
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
        Ok(())
    }

    /// Writes the packs `ids` as index segments of `(epoch, key_id)`, one segment of at most
    /// 65,536 entries in memory at a time; the last carries `supersedes`, so the old segments
    /// drop out only once every new one is durable.
    pub(super) async fn write_segments(
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

    pub(super) async fn save_segment(
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
}
