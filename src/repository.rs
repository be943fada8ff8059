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
use crate::keys::{KdfParams, KeySlot, Secret, SlotKeys, Unlocked};
use crate::object::{self, Epoch, Header, Kind, name};
use crate::pack::{self, BlobEntry};
use crate::snapshot::Snapshot;
use crate::store::Store;

mod erasures;
mod keys;
mod writer;

pub use erasures::{DestroyedEpoch, ErasedSnapshot, ErasureRecord};
pub use keys::{EpochKey, KeySlotInfo};
pub use writer::SEALED_EPOCH_KEY_LEN;
pub(crate) use writer::Writer;

mod records;

pub use records::UnreadableSnapshot;

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

/// An open, unlocked repository.
pub struct Repository {
    store: Store,
    config: RepoConfig,
    /// What the slot that opened it unlocks.
    access: Access,
    /// Other key generations the same secret opens: an interrupted rotation leaves two,
    /// and epoch keys made meanwhile may be wrapped under either (read, and carried over by
    /// the next rotation, with these).
    others: Vec<SlotKeys>,
    slot_id: ObjectId,
    epoch_keys: Mutex<HashMap<(Epoch, ObjectId), Arc<EpochKey>>>,
}

/// What the slot that opened a repository unlocks.
pub(crate) enum Access {
    /// The records key and this key generation's epoch-wrapping key: everything.
    Full(SlotKeys),
    /// The records key and a writer key: new backups under its own epoch keys, and nothing
    /// it did not write (docs/FORMAT.md §3.5).
    WriteOnly(Writer),
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
        let keys = SlotKeys::new();
        let creator = crate::keys::Creator {
            host: opts.host,
            user: crate::os_user(),
        };
        let slot = KeySlot::create(&keys, config.id, secret, opts.kdf, creator, None)?;
        store.put(&slot.name(), Bytes::from(slot.encode())).await?;
        let sealed = object::seal(
            Header {
                kind: Kind::Config,
                key_id: ObjectId::default(),
            },
            &keys.records,
            &config.id,
            name::CONFIG,
            &serde_json::to_vec(&config).expect("config serializes"),
        );
        // The config is written last: its presence is what makes a repository.
        store.put(name::CONFIG, Bytes::from(sealed)).await?;
        Ok(Repository {
            store,
            config,
            access: Access::Full(keys),
            others: Vec::new(),
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
                Ok(slot) => match slot.unwrap_keys(secret) {
                    Ok(Some(keys)) => {
                        unlocked = Some((keys, slot.id, slot.repository));
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
        let Some((keys, slot_id, repo_id)) = unlocked else {
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
        // A write-only slot's config comes with its grant, sealed for it: it does not hold
        // the records key.
        let (plain, access) = match keys {
            Unlocked::Full(k) => (
                object::open(header, &k.records, &repo_id, name::CONFIG, &config_bytes)?,
                Access::Full(k),
            ),
            Unlocked::WriteOnly(w) => {
                let (writer, config) = Writer::open(&store, &repo_id, slot_id, w).await?;
                (config, Access::WriteOnly(writer))
            }
        };
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
        let mut others: Vec<SlotKeys> = Vec::new();
        if let Access::Full(k) = &access {
            for slot in slots.iter().flatten() {
                let other = !slot.write_only()
                    && slot.generation != k.generation
                    && others.iter().all(|o| o.generation != slot.generation);
                if other {
                    if let Ok(Some(Unlocked::Full(o))) = slot.unwrap_keys(secret) {
                        others.push(o);
                    }
                }
            }
        }
        Ok(Repository {
            store,
            config,
            access,
            others,
            slot_id,
            epoch_keys: Mutex::default(),
        })
    }

    /// The key records of `kind` are sealed under: the prune records key for prune's, the
    /// records key (config, drill, forget, erasure and audit records) for the others.
    fn records_key(&self, kind: Kind) -> Result<Key> {
        match (&self.access, kind) {
            (Access::Full(k), Kind::Prune) => Ok(k.prune_key(&self.config.id)),
            (Access::Full(k), _) => Ok(k.records.clone()),
            (Access::WriteOnly(w), Kind::Prune) => Ok(w.keys.prune.clone()),
            (Access::WriteOnly(_), _) => Err(Error::WriteOnly(
                "read or write the repository's records (drill reports, forget, erasure and \
                 audit records)"
                    .into(),
            )),
        }
    }

    /// The keys of a full slot; a write-only slot cannot `what`.
    pub(crate) fn full(&self, what: &str) -> Result<&SlotKeys> {
        match &self.access {
            Access::Full(k) => Ok(k),
            Access::WriteOnly(_) => Err(Error::WriteOnly(what.to_string())),
        }
    }

    /// Refuses a write-only slot, which cannot `what`.
    pub fn require_full(&self, what: &str) -> Result<()> {
        self.full(what).map(|_| ())
    }

    /// Whether it was opened with a write-only slot.
    pub fn write_only(&self) -> bool {
        matches!(self.access, Access::WriteOnly(_))
    }

    /// Where a write-only host keeps the key of the month it writes (`DIR/writer-keys/...`),
    /// so its next backup of the month deduplicates against this one. Without it, each
    /// backup makes a new epoch key. Full slots ignore it.
    pub fn with_state_dir(mut self, dir: &std::path::Path) -> Repository {
        if let Access::WriteOnly(w) = &mut self.access {
            w.state = Some(dir.join("writer-keys"));
        }
        self
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

    /// Seals a repository-wide record: prune's (marks, sweep records, leases, clock objects)
    /// under the prune records key, every other kind under the records key, which a
    /// write-only slot does not hold.
    pub fn seal_master(&self, kind: Kind, object: &str, plaintext: &[u8]) -> Result<Bytes> {
        Ok(Bytes::from(object::seal(
            Header {
                kind,
                key_id: ObjectId::default(),
            },
            &self.records_key(kind)?,
            &self.config.id,
            object,
            plaintext,
        )))
    }

    /// Reads and opens a repository-wide object sealed by [`Repository::seal_master`].
    pub async fn open_master(&self, kind: Kind, object: &str) -> Result<Vec<u8>> {
        let key = self.records_key(kind)?;
        let bytes = self.store.get_bounded(object, self.max_len(kind)).await?;
        let header = Header::decode(object, &bytes, kind)?;
        object::open(header, &key, &self.config.id, object, &bytes)
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
                        name::epoch_key(epoch, &header.key_id, self.generation().as_ref())
                    ),
                ),
                e => e,
            })?;
        let plain = object::open(header, &key.key, &self.config.id, object, bytes)?;
        Ok((header.key_id, plain))
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
