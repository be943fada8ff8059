//! Repacking: the blobs snapshots need are copied out of mostly unused packs, checked on the
//! way, into new packs of the same epoch key; the old packs are marked.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::index::{IdMap, IdSet, Index, IndexSegment, IndexedPack};
use crate::object::name;
use crate::pack::{self, PackWriter};

use super::*;

impl Pruner<'_> {
    /// Copies the blobs snapshots need out of half-empty packs into new packs, indexes them,
    /// and marks the old packs. Each blob is checked (decrypt, decompress, hash) on the way:
    /// repacking never carries damage forward.
    pub(super) async fn repack(
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

    pub(super) async fn upload_pack(
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
