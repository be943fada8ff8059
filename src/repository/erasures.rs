//! Erasure records (`erasures/<id>`, sealed under the records key): what `kluis erase` was
//! asked to erase and destroyed. Written before anything is changed, so an interrupted
//! erasure is finished by the next one; read by auditors (`kluis erase --list`), and by
//! readers, which then say that an epoch key was destroyed, not that it is missing.

use super::*;

/// One erasure, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureRecord {
    pub id: ObjectId,
    /// Every snapshot taken before this time was to be erased.
    pub before: Timestamp,
    /// When it was requested.
    pub time: Timestamp,
    /// Who asked: the operating system user and host.
    pub by: String,
    /// The repository, as its location was given.
    pub repository: String,
    /// Epochs wholly before `before`: their keys are destroyed, their objects deleted.
    pub destroyed: Vec<DestroyedEpoch>,
    /// Epochs partly before `before`: their erased snapshots' data is deleted by prune; their
    /// key stays (later snapshots of the epoch use it).
    pub deleted_only: Vec<Epoch>,
    /// The snapshots erased.
    pub snapshots: Vec<ErasedSnapshot>,
    /// The key generation before and after (see `crate::keyring`); the same when every slot
    /// was kept (a scheduled erasure).
    pub generation_before: Option<ObjectId>,
    pub generation_after: Option<ObjectId>,
    /// Whether every secret kept after the erasure is a new one (see docs/FORMAT.md §6.10).
    pub secrets_changed: bool,
    pub program: String,
}

/// An epoch whose keys an erasure destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyedEpoch {
    pub epoch: Epoch,
    pub keys: Vec<ObjectId>,
}

/// A snapshot an erasure removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasedSnapshot {
    pub id: ObjectId,
    pub name: String,
    pub host: String,
    pub time: Timestamp,
}

impl Repository {
    /// Every erasure record, oldest first, and the errors of those that cannot be read.
    pub async fn erasures(&self) -> Result<(Vec<ErasureRecord>, Vec<Error>)> {
        self.require_full("read the erasure records")?;
        let mut records = Vec::new();
        let mut errors = Vec::new();
        for o in self.store.list(name::ERASURES).await? {
            let read = async {
                let id = name::parse_prune_object(name::ERASURES, &o.name)
                    .ok_or_else(|| Error::corrupt(&o.name, "not an erasure record name"))?;
                let plain = self.open_master(Kind::Erasure, &o.name).await?;
                let r: ErasureRecord = serde_json::from_slice(&plain)
                    .map_err(|e| Error::corrupt(&o.name, format!("does not parse: {e}")))?;
                if r.id != id {
                    return Err(Error::corrupt(&o.name, "id differs from the object's name"));
                }
                Ok(r)
            };
            match read.await {
                Ok(r) => records.push(r),
                Err(e @ (Error::Corrupt { .. } | Error::MissingObject { .. })) => errors.push(e),
                Err(e) => return Err(e),
            }
        }
        records.sort_by_key(|r| r.time);
        Ok((records, errors))
    }

    /// Writes an erasure record; returns its object's name.
    pub async fn put_erasure(&self, record: &ErasureRecord) -> Result<String> {
        let object = name::prune_object(name::ERASURES, &record.id);
        let plain = serde_json::to_vec(record).expect("erasure records serialize");
        self.store
            .put(&object, self.seal_master(Kind::Erasure, &object, &plain)?)
            .await?;
        Ok(object)
    }

    /// The erasure that destroyed `epoch`'s keys, if one did (for "destroyed, not missing").
    pub(super) async fn destroyed_by(&self, epoch: Epoch) -> Option<ErasureRecord> {
        let (records, _) = self.erasures().await.ok()?;
        records
            .into_iter()
            .rev()
            .find(|r| r.destroyed.iter().any(|d| d.epoch == epoch))
    }
}

/// The error for an object whose epoch key `erasure` destroyed.
pub(super) fn destroyed(object: &str, epoch: Epoch, erasure: &ErasureRecord) -> Error {
    Error::KeyDestroyed(format!(
        "{object}: the key of epoch {epoch} was destroyed by erasure {} on {} (requested by \
         {}): its data cannot be recovered",
        erasure.id.short(),
        erasure.time,
        erasure.by
    ))
}
