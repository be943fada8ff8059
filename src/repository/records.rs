//! Typed records: snapshot manifests (listed, saved, forgotten), index segments and blobs.

use super::*;

/// A snapshot manifest that is listed but cannot be read.
#[derive(Debug)]
pub struct UnreadableSnapshot {
    /// The manifest's object name.
    pub object: String,
    /// The snapshot id its name carries, if the name parses.
    pub id: Option<ObjectId>,
    /// Why it cannot be read; it may name another object, e.g. the epoch key.
    pub error: Error,
}

impl std::fmt::Display for UnreadableSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.error.to_string();
        if e.starts_with(&self.object) {
            f.write_str(&e)
        } else {
            write!(f, "snapshot {}: {e}", self.object)
        }
    }
}

impl Repository {
    /// Writes a snapshot manifest: the commit point of a backup.
    pub async fn save_snapshot(&self, key: &EpochKey, snapshot: &Snapshot) -> Result<String> {
        if snapshot.epoch() != key.epoch {
            return Err(Error::invalid("snapshot time and key epoch disagree"));
        }
        let object = name::snapshot(key.epoch, &snapshot.id);
        let sealed = self.seal(Kind::Snapshot, key, &object, &snapshot.encode());
        self.store.put(&object, sealed).await?;
        Ok(object)
    }

    /// Deletes a snapshot's manifest: the snapshot is gone; the data only it used is garbage
    /// for a later prune. Manifests go before their data, never the other way round.
    pub async fn forget(&self, snapshot: &Snapshot) -> Result<()> {
        self.store
            .delete(&name::snapshot(snapshot.epoch(), &snapshot.id))
            .await
    }

    /// Writes an index segment; returns its name and stored size.
    pub async fn save_index(
        &self,
        key: &EpochKey,
        segment: &IndexSegment,
    ) -> Result<(String, u64)> {
        let object = name::index(key.epoch, &ObjectId::random());
        let sealed = self.seal(Kind::Index, key, &object, &segment.encode());
        let size = sealed.len() as u64;
        self.store.put(&object, sealed).await?;
        Ok((object, size))
    }

    /// Every readable snapshot, oldest first, and an error for each that is not.
    pub async fn snapshots(&self) -> Result<(Vec<Snapshot>, Vec<UnreadableSnapshot>)> {
        let listed = self.store.list(name::SNAPSHOTS).await?;
        let mut errors = Vec::new();
        let mut wanted = Vec::new();
        for o in listed {
            match name::parse_epoch_object(name::SNAPSHOTS, &o.name) {
                Some((epoch, id)) => wanted.push((o.name, epoch, id)),
                None => errors.push(UnreadableSnapshot {
                    error: Error::corrupt(&o.name, "not a snapshot name"),
                    object: o.name,
                    id: None,
                }),
            }
        }
        let results: Vec<(String, ObjectId, Result<Snapshot>)> = futures::stream::iter(wanted)
            .map(|(object, epoch, id)| async move {
                let read = async {
                    let (_, plain) = self.open_object(Kind::Snapshot, epoch, &object).await?;
                    let s = Snapshot::decode(&object, id, &plain)?;
                    if s.epoch() != epoch {
                        return Err(Error::corrupt(
                            &object,
                            "snapshot time lies outside its epoch",
                        ));
                    }
                    Ok(s)
                };
                let result = read.await;
                (object, id, result)
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut snapshots = Vec::new();
        for (object, id, r) in results {
            match r {
                Ok(s) => snapshots.push(s),
                // Forgotten between the listing and the read: gone, not damaged.
                Err(Error::MissingObject {
                    object: ref missing,
                }) if missing == &object => {}
                // Another host's, or of another month, opened with a write-only key: not
                // this host's to read, and not damaged.
                Err(Error::WriteOnly(_)) => {}
                Err(error) => errors.push(UnreadableSnapshot {
                    object,
                    id: Some(id),
                    error,
                }),
            }
        }
        snapshots.sort_by_key(|s| (s.time, s.finished));
        Ok((snapshots, errors))
    }

    /// Loads index segments into memory: all of them, or only those of one epoch key (what a
    /// writer may deduplicate against). Returns the index and an error per unreadable segment.
    pub async fn load_index(&self, only: Option<(Epoch, ObjectId)>) -> Result<(Index, Vec<Error>)> {
        match only {
            Some((epoch, key_id)) => self.load_index_scope(Some(epoch), Some(key_id)).await,
            None => self.load_index_scope(None, None).await,
        }
    }

    /// Loads the index segments of one epoch, whatever their key.
    pub async fn load_index_epoch(&self, epoch: Epoch) -> Result<(Index, Vec<Error>)> {
        self.load_index_scope(Some(epoch), None).await
    }

    async fn load_index_scope(
        &self,
        epoch: Option<Epoch>,
        key: Option<ObjectId>,
    ) -> Result<(Index, Vec<Error>)> {
        let prefix = match epoch {
            Some(epoch) => format!("{}/{epoch}", name::INDEX),
            None => name::INDEX.to_string(),
        };
        let segments = self.index_segments(&prefix).await?;
        let mut errors = Vec::new();
        let mut loaded = Vec::new();
        for (object, result) in segments {
            match result {
                Ok((epoch, key_id, seg)) => {
                    if key.is_none_or(|k| k == key_id) {
                        loaded.push((object, epoch, key_id, seg));
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let superseded: std::collections::HashSet<ObjectId> = loaded
            .iter()
            .flat_map(|(_, _, _, s)| s.supersedes.iter().copied())
            .collect();
        let mut index = Index::default();
        for (object, epoch, key_id, seg) in &loaded {
            let id = name::parse_epoch_object(name::INDEX, object).map(|(_, id)| id);
            if id.is_some_and(|id| superseded.contains(&id)) {
                continue;
            }
            index.add_segment(*epoch, *key_id, seg);
        }
        Ok((index, errors))
    }

    /// Every index segment under `prefix`, decoded, with its name.
    #[allow(clippy::type_complexity)]
    pub async fn index_segments(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Result<(Epoch, ObjectId, IndexSegment)>)>> {
        let listed = self.store.list(prefix).await?;
        let out = futures::stream::iter(listed)
            .map(|o| async move {
                let result = async {
                    let (epoch, _) = name::parse_epoch_object(name::INDEX, &o.name)
                        .ok_or_else(|| Error::corrupt(&o.name, "not an index segment name"))?;
                    let (key_id, plain) = self.open_object(Kind::Index, epoch, &o.name).await?;
                    Ok((epoch, key_id, IndexSegment::decode(&o.name, &plain)?))
                }
                .await;
                (o.name, result)
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        Ok(out)
    }

    /// Reads, decrypts and checks one blob.
    pub async fn read_blob(&self, index: &Index, id: &BlobId) -> Result<Vec<u8>> {
        let (pack, loc) = index.get(id).ok_or(Error::MissingBlob(*id))?;
        let pack_name = name::pack(pack.epoch, &pack.id);
        let entry = loc.entry(*id);
        let mut stored = self
            .store
            .get_range(
                &pack_name,
                u64::from(entry.offset)..u64::from(entry.offset) + u64::from(entry.length),
            )
            .await?
            .to_vec();
        let ek = self.epoch_key(pack.epoch, pack.key_id).await?;
        self.decode_blob(&ek, &pack_name, &entry, &mut stored)
    }

    /// Decrypts, decompresses and checks the id of one stored blob.
    pub fn decode_blob(
        &self,
        ek: &EpochKey,
        pack_name: &str,
        entry: &BlobEntry,
        stored: &mut [u8],
    ) -> Result<Vec<u8>> {
        let keys = pack::BlobKeys {
            epoch_key: &ek.key,
            repo_id: &self.config.id,
        };
        let mut dec = zstd::bulk::Decompressor::new().map_err(|e| Error::io("zstd", e))?;
        let plain = pack::open_blob(pack_name, keys, entry, stored, &mut dec)?;
        if ek.blob_id(&plain) != entry.id {
            return Err(Error::corrupt(
                pack_name,
                format!("blob {} does not hash to its id", entry.id),
            ));
        }
        Ok(plain)
    }
}
