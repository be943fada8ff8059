//! A repository: its config and keys, and typed access to its objects.
//!
//! Opening a repository lists the key slots, unwraps the master key with the operator's secret,
//! then reads and checks the sealed config. Epoch keys are fetched on demand and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::crypto::{ChunkHasher, Key, random_array};
use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::index::{Index, IndexSegment};
use crate::keys::{KdfParams, KeySlot, Secret};
use crate::object::{self, Epoch, Header, Kind, name};
use crate::pack::{self, BlobEntry};
use crate::snapshot::Snapshot;
use crate::store::Store;

/// The repository format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Objects fetched concurrently when loading many small objects.
const FETCH_CONCURRENCY: usize = 16;

/// Algorithms, recorded so a future version can change them without guessing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Algorithms {
    pub aead: String,
    pub kdf: String,
    pub passphrase_kdf: String,
    pub chunk_id: String,
    pub stream_digest: String,
    pub chunker: String,
    pub compression: String,
}

impl Default for Algorithms {
    fn default() -> Self {
        Algorithms {
            aead: "aes-256-gcm".into(),
            kdf: "hkdf-sha256".into(),
            passphrase_kdf: "argon2id".into(),
            chunk_id: "blake3-keyed".into(),
            stream_digest: "sha256".into(),
            chunker: "fastcdc-2020".into(),
            compression: "zstd".into(),
        }
    }
}

/// The repository config, sealed under the master key in the object `config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    pub id: ObjectId,
    pub created: Timestamp,
    pub algorithms: Algorithms,
    pub chunker: ChunkerParams,
    /// zstd level for new blobs.
    pub compression_level: i32,
    /// Target size of a pack in bytes.
    pub pack_size: u32,
    /// Key scope: "month".
    pub epoch: String,
}

/// Choices made at `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunk_sizes: Option<(u32, u32, u32)>,
    pub compression_level: i32,
    pub pack_size: u32,
    pub kdf: KdfParams,
    pub host: String,
}

/// zstd level 1: on SQL dumps in blob-sized pieces it stores 0.2-2.8 % more than level 3 and
/// runs 1.24-1.66x faster (docs/BENCHMARKS.md, `benches/micro.sh`).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
pub const DEFAULT_PACK_SIZE: u32 = 16 << 20;

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_sizes: None,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            pack_size: DEFAULT_PACK_SIZE,
            kdf: KdfParams::default(),
            host: crate::hostname(),
        }
    }
}

/// A per-epoch data key and what derives from it.
pub struct EpochKey {
    pub epoch: Epoch,
    pub id: ObjectId,
    key: Key,
    hasher: ChunkHasher,
}

impl EpochKey {
    fn new(epoch: Epoch, id: ObjectId, key: Key) -> EpochKey {
        let hasher = ChunkHasher::new(&key.derive(b"", &[b"kluis chunk id v1"]));
        EpochKey {
            epoch,
            id,
            key,
            hasher,
        }
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    pub fn hasher(&self) -> &ChunkHasher {
        &self.hasher
    }

    pub fn blob_id(&self, data: &[u8]) -> BlobId {
        BlobId(self.hasher.hash(data))
    }
}

/// A key slot as listed for `kluis key list`.
#[derive(Debug, Clone, Serialize)]
pub struct KeySlotInfo {
    pub id: ObjectId,
    pub kind: crate::keys::SlotKind,
    pub created: Timestamp,
    pub host: String,
    pub label: Option<String>,
    pub current: bool,
}

/// An open, unlocked repository.
pub struct Repository {
    store: Store,
    config: RepoConfig,
    master: Key,
    slot_id: ObjectId,
    epoch_keys: Mutex<HashMap<(Epoch, ObjectId), Arc<EpochKey>>>,
}

impl Repository {
    /// Creates a repository in an empty location.
    pub async fn init(store: Store, secret: &Secret, opts: InitOptions) -> Result<Repository> {
        if store.exists(name::CONFIG).await? {
            return Err(Error::RepositoryExists {
                location: store.location().to_string(),
            });
        }
        let stray = store.list(name::KEYS).await?;
        // A repository whose config vanished (deleted by someone, or a partial restore of the
        // bucket) must never be silently replaced by a new one over its data.
        for prefix in [
            name::SNAPSHOTS,
            name::DATA,
            name::INDEX,
            name::EPOCHS,
            name::DRILLS,
            name::FORGOTTEN,
        ] {
            if store.has_any(prefix).await? {
                return Err(Error::invalid(format!(
                    "{} holds kluis data ({prefix}/) but no config: the repository's config is \
                     gone (deleted, or a partial copy); restore `config` from a copy of the \
                     bucket instead of creating a new repository over it",
                    store.location()
                )));
            }
        }
        if !stray.is_empty() {
            return Err(Error::invalid(format!(
                "{} holds key slots but no config: an earlier init did not finish; remove it first",
                store.location()
            )));
        }
        let seed = u64::from_le_bytes(random_array());
        let mut chunker = ChunkerParams::files(seed);
        if let Some((min, avg, max)) = opts.chunk_sizes {
            chunker = ChunkerParams {
                min_size: min,
                avg_size: avg,
                max_size: max,
                seed,
            };
        }
        chunker.validate()?;
        if !(-7..=22).contains(&opts.compression_level) {
            return Err(Error::invalid(format!(
                "compression level {} is outside zstd's range -7..22",
                opts.compression_level
            )));
        }
        if !(64 << 10..=256 << 20).contains(&opts.pack_size) {
            return Err(Error::invalid(
                "pack size must be between 64 KiB and 256 MiB",
            ));
        }
        let config = RepoConfig {
            version: FORMAT_VERSION,
            id: ObjectId::random(),
            created: Timestamp::now(),
            algorithms: Algorithms::default(),
            chunker,
            compression_level: opts.compression_level,
            pack_size: opts.pack_size,
            epoch: "month".into(),
        };
        let master = Key::random();
        let slot = KeySlot::create(&master, config.id, secret, opts.kdf, opts.host, None)?;
        store.put(&slot.name(), Bytes::from(slot.encode())).await?;
        let sealed = object::seal(
            Header {
                kind: Kind::Config,
                key_id: ObjectId::default(),
            },
            &master,
            &config.id,
            name::CONFIG,
            &serde_json::to_vec(&config).expect("config serializes"),
        );
        // The config is written last: its presence is what makes a repository.
        store.put(name::CONFIG, Bytes::from(sealed)).await?;
        Ok(Repository {
            store,
            config,
            master,
            slot_id: slot.id,
            epoch_keys: Mutex::default(),
        })
    }

    /// Opens and unlocks an existing repository.
    pub async fn open(store: Store, secret: &Secret) -> Result<Repository> {
        let config_bytes = match store
            .get_bounded(name::CONFIG, Kind::Config.max_len())
            .await
        {
            Ok(b) => b,
            Err(Error::MissingObject { .. }) => {
                return Err(Error::RepositoryNotFound {
                    location: store.location().to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        let header = Header::decode(name::CONFIG, &config_bytes, Kind::Config)?;
        let mut slots = load_slots(&store).await?;
        // Cheapest first (then by id, so the order is the same every time): a slot planted
        // with costly parameters is tried after the real ones. Every slot's cost is bounded
        // (`KdfParams::out_of_bounds`).
        slots.sort_by_key(|s| match s {
            Ok(s) => (s.cost(), s.id),
            Err(_) => (u64::MAX, ObjectId::default()),
        });
        let mut corrupt = None;
        let mut unlocked = None;
        for slot in &slots {
            match slot {
                // A bad slot (parameters out of bounds, kind and parameters disagreeing) is
                // reported if nothing opens, and never stops the slots after it.
                Ok(slot) => match slot.unwrap_master(secret) {
                    Ok(Some(master)) => {
                        unlocked = Some((master, slot.id, slot.repository));
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        corrupt.get_or_insert_with(|| e.to_string());
                    }
                },
                Err(e) => {
                    corrupt.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let Some((master, slot_id, repo_id)) = unlocked else {
            if let Some(detail) = corrupt {
                return Err(Error::corrupt(
                    name::KEYS,
                    format!("no key slot opens with the given secret, and {detail}"),
                ));
            }
            return Err(Error::WrongPassword {
                location: store.location().to_string(),
                slots: slots.len(),
            });
        };
        let plain = object::open(header, &master, &repo_id, name::CONFIG, &config_bytes)?;
        let value: serde_json::Value = serde_json::from_slice(&plain)
            .map_err(|e| Error::corrupt(name::CONFIG, format!("config does not parse: {e}")))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version > u64::from(FORMAT_VERSION) {
            return Err(Error::NewerFormat {
                object: name::CONFIG.into(),
                found: version as u32,
                supported: FORMAT_VERSION,
            });
        }
        let config: RepoConfig = serde_json::from_value(value)
            .map_err(|e| Error::corrupt(name::CONFIG, format!("config does not parse: {e}")))?;
        if config.id != repo_id {
            return Err(Error::corrupt(
                name::CONFIG,
                "repository id differs from the key slot's",
            ));
        }
        config
            .chunker
            .validate()
            .map_err(|e| Error::corrupt(name::CONFIG, e.to_string()))?;
        Ok(Repository {
            store,
            config,
            master,
            slot_id,
            epoch_keys: Mutex::default(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The largest object of `kind` this repository's format allows ([`Kind::max_len`]), with
    /// index segments bounded by its pack size: at most 65,536 entries beyond the blobs of one
    /// pack (each at least 28 bytes), 46 bytes each, and as many pack records and superseded
    /// segment ids.
    pub fn max_len(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Index => {
                let per_pack = u64::from(self.config.pack_size) / 28 + 1;
                let entries = 65_536 + per_pack;
                let bound = (64 << 10) + 46 * entries + (24 + 16) * 65_536;
                bound.min(Kind::Index.max_len())
            }
            other => other.max_len(),
        }
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn id(&self) -> ObjectId {
        self.config.id
    }

    /// The key of `epoch` with id `key_id`.
    pub async fn epoch_key(&self, epoch: Epoch, key_id: ObjectId) -> Result<Arc<EpochKey>> {
        if let Some(k) = self
            .epoch_keys
            .lock()
            .expect("not poisoned")
            .get(&(epoch, key_id))
        {
            return Ok(k.clone());
        }
        let object = name::epoch_key(epoch, &key_id);
        let bytes = self
            .store
            .get_bounded(&object, Kind::EpochKey.max_len())
            .await?;
        let header = Header::decode(&object, &bytes, Kind::EpochKey)?;
        if header.key_id != key_id {
            return Err(Error::corrupt(
                &object,
                "key id differs from the object's name",
            ));
        }
        let plain = zeroize::Zeroizing::new(object::open(
            header,
            &self.master,
            &self.config.id,
            &object,
            &bytes,
        )?);
        let raw: [u8; 32] = plain[..]
            .try_into()
            .map_err(|_| Error::corrupt(&object, "epoch key has the wrong length"))?;
        let key = Arc::new(EpochKey::new(epoch, key_id, Key::from_bytes(raw)));
        self.epoch_keys
            .lock()
            .expect("not poisoned")
            .insert((epoch, key_id), key.clone());
        Ok(key)
    }

    /// The key new data of `epoch` is written under, created when the epoch has none yet.
    /// Writers that race to create one converge on the readable key with the smallest id. An
    /// epoch key object that cannot be read (damaged, or junk a bucket writer put there) is
    /// skipped and returned as a warning: it must not stop every backup of the month.
    pub async fn write_key(&self, epoch: Epoch) -> Result<(Arc<EpochKey>, Vec<Error>)> {
        let prefix = format!("{}/{epoch}", name::EPOCHS);
        let mut unreadable = Vec::new();
        if let Some(key) = self.first_key(&prefix, epoch, &mut unreadable).await? {
            return Ok((key, unreadable));
        }
        let id = ObjectId::random();
        let key = Key::random();
        let object = name::epoch_key(epoch, &id);
        let sealed = object::seal(
            Header {
                kind: Kind::EpochKey,
                key_id: id,
            },
            &self.master,
            &self.config.id,
            &object,
            key.as_bytes(),
        );
        self.store.put(&object, Bytes::from(sealed)).await?;
        let chosen = match self.first_key(&prefix, epoch, &mut Vec::new()).await? {
            Some(k) => k,
            None => self.epoch_key(epoch, id).await?,
        };
        Ok((chosen, unreadable))
    }

    /// The readable key of `epoch` with the smallest id; keys that are damaged or missing on
    /// reading are added to `unreadable`. Other errors (storage) stop it.
    async fn first_key(
        &self,
        prefix: &str,
        epoch: Epoch,
        unreadable: &mut Vec<Error>,
    ) -> Result<Option<Arc<EpochKey>>> {
        for id in self.epoch_key_ids(prefix, epoch).await? {
            match self.epoch_key(epoch, id).await {
                Ok(key) => return Ok(Some(key)),
                Err(e @ (Error::Corrupt { .. } | Error::MissingObject { .. })) => {
                    unreadable.push(e)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    async fn epoch_key_ids(&self, prefix: &str, epoch: Epoch) -> Result<Vec<ObjectId>> {
        let mut ids: Vec<ObjectId> = self
            .store
            .list(prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let (e, id) = name::parse_epoch_object(name::EPOCHS, &o.name)?;
                (e == epoch).then_some(id)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Seals an epoch-scoped object (index segment or snapshot) under its epoch key.
    pub fn seal(&self, kind: Kind, key: &EpochKey, object: &str, plaintext: &[u8]) -> Bytes {
        Bytes::from(object::seal(
            Header {
                kind,
                key_id: key.id,
            },
            &key.key,
            &self.config.id,
            object,
            plaintext,
        ))
    }

    /// Seals a repository-wide object (prune's bookkeeping) under the master key.
    pub fn seal_master(&self, kind: Kind, object: &str, plaintext: &[u8]) -> Bytes {
        Bytes::from(object::seal(
            Header {
                kind,
                key_id: ObjectId::default(),
            },
            &self.master,
            &self.config.id,
            object,
            plaintext,
        ))
    }

    /// Reads and opens a repository-wide object sealed by [`Repository::seal_master`].
    pub async fn open_master(&self, kind: Kind, object: &str) -> Result<Vec<u8>> {
        let bytes = self.store.get_bounded(object, self.max_len(kind)).await?;
        let header = Header::decode(object, &bytes, kind)?;
        object::open(header, &self.master, &self.config.id, object, &bytes)
    }

    /// Reads and opens an epoch-scoped object.
    pub async fn open_object(
        &self,
        kind: Kind,
        epoch: Epoch,
        object: &str,
    ) -> Result<(ObjectId, Vec<u8>)> {
        let bytes = self.store.get_bounded(object, self.max_len(kind)).await?;
        self.open_bytes(kind, epoch, object, &bytes).await
    }

    pub async fn open_bytes(
        &self,
        kind: Kind,
        epoch: Epoch,
        object: &str,
        bytes: &[u8],
    ) -> Result<(ObjectId, Vec<u8>)> {
        let header = Header::decode(object, bytes, kind)?;
        let key = self
            .epoch_key(epoch, header.key_id)
            .await
            .map_err(|e| match e {
                Error::MissingObject { .. } => Error::corrupt(
                    object,
                    format!(
                        "its epoch key {} is missing (erased epoch?)",
                        name::epoch_key(epoch, &header.key_id)
                    ),
                ),
                e => e,
            })?;
        let plain = object::open(header, &key.key, &self.config.id, object, bytes)?;
        Ok((header.key_id, plain))
    }

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

    /// Key slots, for `kluis key list`.
    pub async fn key_slots(&self) -> Result<(Vec<KeySlotInfo>, Vec<Error>)> {
        let mut infos = Vec::new();
        let mut errors = Vec::new();
        for slot in load_slots(&self.store).await? {
            match slot {
                Ok(s) => infos.push(KeySlotInfo {
                    id: s.id,
                    kind: s.kind,
                    created: s.created,
                    host: s.host,
                    label: s.label,
                    current: s.id == self.slot_id,
                }),
                Err(e) => errors.push(e),
            }
        }
        infos.sort_by_key(|i| i.created);
        Ok((infos, errors))
    }

    /// Adds a key slot for `secret`.
    pub async fn add_key(
        &self,
        secret: &Secret,
        kdf: KdfParams,
        host: String,
        label: Option<String>,
    ) -> Result<ObjectId> {
        let slot = KeySlot::create(&self.master, self.config.id, secret, kdf, host, label)?;
        self.store
            .put(&slot.name(), Bytes::from(slot.encode()))
            .await?;
        Ok(slot.id)
    }

    /// Removes a key slot; refuses the one in use, so the operator cannot lock themselves out.
    pub async fn remove_key(&self, id: ObjectId) -> Result<()> {
        if id == self.slot_id {
            return Err(Error::invalid(
                "refusing to remove the key slot this command was unlocked with; unlock with another key",
            ));
        }
        let object = name::key_slot(&id);
        if !self.store.exists(&object).await? {
            return Err(Error::invalid(format!("no key slot {id}")));
        }
        self.store.delete(&object).await
    }

    /// Resolves a key slot id prefix.
    pub async fn find_key(&self, prefix: &str) -> Result<ObjectId> {
        let (slots, _) = self.key_slots().await?;
        let matches: Vec<_> = slots
            .iter()
            .filter(|s| s.id.to_hex().starts_with(prefix))
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.id),
            [] => Err(Error::invalid(format!("no key slot matches {prefix:?}"))),
            _ => Err(Error::invalid(format!(
                "key slot prefix {prefix:?} is ambiguous"
            ))),
        }
    }
}

async fn load_slots(store: &Store) -> Result<Vec<Result<KeySlot>>> {
    let listed = store.list(name::KEYS).await?;
    let slots = futures::stream::iter(listed)
        .map(|o| async move {
            let bytes = store.get_bounded(&o.name, Kind::KeySlot.max_len()).await?;
            KeySlot::decode(&o.name, &bytes)
        })
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    Ok(slots)
}

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

/// A repository for unit tests at `url` (`memory://`, or a directory), with the passphrase
/// "pw" and Argon2 parameters cheap enough to be instant.
#[cfg(test)]
pub(crate) async fn for_tests(url: &str) -> Repository {
    let opts = InitOptions {
        kdf: crate::keys::KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        ..InitOptions::default()
    };
    let store = Store::open(url, true).expect("a test store opens");
    Repository::init(store, &Secret::passphrase("pw"), opts)
        .await
        .expect("a test repository initialises")
}
