//! Keys: each epoch's data keys (wrapped by the key generation's epoch-wrapping key, cached),
//! the key slots that hold the repository's keys, and their rotation.

use super::*;

/// A per-epoch data key and what derives from it.
pub struct EpochKey {
    pub epoch: Epoch,
    pub id: ObjectId,
    pub(super) key: Key,
    hasher: ChunkHasher,
}

impl EpochKey {
    pub(super) fn new(epoch: Epoch, id: ObjectId, key: Key) -> EpochKey {
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
    /// The operating system user who made it (absent in slots made before it was recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub label: Option<String>,
    /// The key generation it holds (absent: a repository made before key generations, or a
    /// write-only slot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<ObjectId>,
    /// `write-only`: it backs up and reads nothing it did not write (absent: a full slot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::keys::Role>,
    /// Whether it opened this command's repository.
    pub current: bool,
    /// When it last opened the repository for something the audit trail records (filled by
    /// `kluis key list` from the trail; none when it records nothing of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Timestamp>,
}

impl KeySlotInfo {
    /// A slot as listed; `current`: the slot in use.
    pub fn of(s: &KeySlot, current: ObjectId) -> KeySlotInfo {
        KeySlotInfo {
            id: s.id,
            kind: s.kind,
            created: s.created,
            host: s.host.clone(),
            user: s.user.clone(),
            label: s.label.clone(),
            generation: s.generation,
            role: s.role,
            current: s.id == current,
            last_used: None,
        }
    }
}

impl Repository {
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
        let keys = match &self.access {
            Access::Full(k) => k,
            Access::WriteOnly(w) => {
                if let Some(kept) = self.kept_key(w, epoch).filter(|k| k.id == key_id) {
                    return Ok(self.cache(kept));
                }
                return Err(Error::WriteOnly(format!(
                    "read epoch key {} of {epoch}, which another host or month wrote",
                    key_id.short()
                )));
            }
        };
        let mut missing = None;
        for k in std::iter::once(keys).chain(&self.others) {
            match self.read_epoch_key(k, epoch, key_id).await {
                Ok(key) => return Ok(self.cache(key)),
                Err(e @ Error::MissingObject { .. }) => {
                    missing.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let missing = missing.expect("one generation was tried");
        // Destroyed on purpose, or missing: the error says which.
        let object = name::epoch_key(epoch, &key_id, keys.generation.as_ref());
        Err(match self.destroyed_by(epoch).await {
            Some(erasure) => super::erasures::destroyed(&object, epoch, &erasure),
            None => missing,
        })
    }

    /// Epoch key `key_id` of `epoch`, as the key generation `keys` holds wraps it.
    pub(crate) async fn read_epoch_key(
        &self,
        keys: &SlotKeys,
        epoch: Epoch,
        key_id: ObjectId,
    ) -> Result<EpochKey> {
        let object = name::epoch_key(epoch, &key_id, keys.generation.as_ref());
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
        let plain = zeroize::Zeroizing::new(if bytes.len() == writer::SEALED_EPOCH_KEY_LEN {
            writer::open_sealed(keys, &self.config.id, header, &object, &bytes)?
        } else {
            object::open(header, &keys.epochs, &self.config.id, &object, &bytes)?
        });
        let raw: [u8; 32] = plain[..]
            .try_into()
            .map_err(|_| Error::corrupt(&object, "epoch key has the wrong length"))?;
        Ok(EpochKey::new(epoch, key_id, Key::from_bytes(raw)))
    }

    /// Every key generation this repository was opened with: its own, then the others the
    /// same secret opens (see `others`).
    pub(crate) fn generations(&self) -> Vec<&SlotKeys> {
        match &self.access {
            Access::Full(k) => std::iter::once(k).chain(&self.others).collect(),
            Access::WriteOnly(_) => Vec::new(),
        }
    }

    /// The key new data of `epoch` is written under, created when the epoch has none yet.
    /// Writers that race to create one converge on the readable key with the smallest id.
    /// Keys in `condemned` (a prune will delete them: their month held nothing) are passed
    /// over. An epoch key object that cannot be read (damaged, or junk a bucket writer put
    /// there) is skipped and returned as a warning: it must not stop every backup of the month.
    pub async fn write_key(
        &self,
        epoch: Epoch,
        condemned: &std::collections::HashSet<(Epoch, ObjectId)>,
    ) -> Result<(Arc<EpochKey>, Vec<Error>)> {
        if let Access::WriteOnly(w) = &self.access {
            return Ok((self.own_key(w, epoch, condemned).await?, Vec::new()));
        }
        let prefix = format!("{}/{epoch}", name::EPOCHS);
        let mut unreadable = Vec::new();
        if let Some(key) = self
            .first_key(&prefix, epoch, condemned, &mut unreadable)
            .await?
        {
            return Ok((key, unreadable));
        }
        let id = ObjectId::random();
        let key = Key::random();
        let object = self.put_epoch_key(epoch, id, &key).await?;
        // A rotation that removed this generation's slots before this key was written has
        // not wrapped it into the next generation: the key would be lost with this one.
        if !self.generation_alive().await? {
            let _ = self.store.delete(&object).await;
            return Err(Error::Conflict(
                "the repository's keys were rotated while this command ran (its key generation \
                 is gone); run it again"
                    .into(),
            ));
        }
        let chosen = match self
            .first_key(&prefix, epoch, condemned, &mut Vec::new())
            .await?
        {
            Some(k) => k,
            None => self.epoch_key(epoch, id).await?,
        };
        Ok((chosen, unreadable))
    }

    /// The readable key of `epoch` with the smallest id that is not `condemned`; keys that
    /// are damaged or missing on reading are added to `unreadable`. Other errors (storage)
    /// stop it.
    async fn first_key(
        &self,
        prefix: &str,
        epoch: Epoch,
        condemned: &std::collections::HashSet<(Epoch, ObjectId)>,
        unreadable: &mut Vec<Error>,
    ) -> Result<Option<Arc<EpochKey>>> {
        for id in self.epoch_key_ids(prefix, epoch).await? {
            if condemned.contains(&(epoch, id)) {
                continue;
            }
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

    /// Seals `key` as epoch key `id` of `epoch` under this generation; returns its name.
    async fn put_epoch_key(&self, epoch: Epoch, id: ObjectId, key: &Key) -> Result<String> {
        self.put_epoch_key_for(self.full("make an epoch key")?, epoch, id, key)
            .await
    }

    /// Whether some full key slot still holds this repository's key generation.
    pub(super) async fn generation_alive(&self) -> Result<bool> {
        let generation = self.generation();
        Ok(load_slots(&self.store)
            .await?
            .iter()
            .flatten()
            .any(|s| !s.write_only() && s.generation == generation))
    }

    /// The ids of `epoch`'s keys of this key generation that full hosts write under: those a
    /// write-only host made (sealed to the generation's public key) are its own. Names that
    /// do not parse are left to `check`.
    async fn epoch_key_ids(&self, prefix: &str, epoch: Epoch) -> Result<Vec<ObjectId>> {
        let generation = self.generation();
        let mut ids: Vec<ObjectId> = self
            .store
            .list(prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let (e, id, g) = name::parse_epoch_key(&o.name)?;
                (e == epoch && g == generation && o.size != writer::SEALED_EPOCH_KEY_LEN as u64)
                    .then_some(id)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Key slots, for `kluis key list`.
    pub async fn key_slots(&self) -> Result<(Vec<KeySlotInfo>, Vec<Error>)> {
        let (slots, errors) = self.slots().await?;
        let mut infos: Vec<KeySlotInfo> = slots
            .iter()
            .map(|s| KeySlotInfo::of(s, self.slot_id))
            .collect();
        infos.sort_by_key(|i| i.created);
        Ok((infos, errors))
    }

    /// Every key slot that decodes, and the errors of those that do not.
    pub async fn slots(&self) -> Result<(Vec<KeySlot>, Vec<Error>)> {
        let mut slots = Vec::new();
        let mut errors = Vec::new();
        for slot in load_slots(&self.store).await? {
            match slot {
                Ok(s) => slots.push(s),
                Err(e) => errors.push(e),
            }
        }
        Ok((slots, errors))
    }

    /// The slot this repository was opened with.
    pub fn slot_id(&self) -> ObjectId {
        self.slot_id
    }

    /// The key generation this repository was opened with (`None`: made before key
    /// generations).
    pub fn generation(&self) -> Option<ObjectId> {
        match &self.access {
            Access::Full(k) => k.generation,
            Access::WriteOnly(w) => Some(w.grant.generation),
        }
    }

    /// Adds a key slot for `secret`, holding the keys this repository was opened with.
    pub async fn add_key(
        &self,
        secret: &Secret,
        kdf: KdfParams,
        creator: crate::keys::Creator,
        label: Option<String>,
    ) -> Result<ObjectId> {
        let keys = self.full("add a key slot")?;
        Ok(self.put_slot(keys, secret, kdf, creator, label).await?.id)
    }

    /// Writes a slot for `secret` holding `keys`.
    pub(crate) async fn put_slot(
        &self,
        keys: &SlotKeys,
        secret: &Secret,
        kdf: KdfParams,
        creator: crate::keys::Creator,
        label: Option<String>,
    ) -> Result<KeySlot> {
        let slot = KeySlot::create(keys, self.config.id, secret, kdf, creator, label)?;
        self.store
            .put(&slot.name(), Bytes::from(slot.encode()))
            .await?;
        Ok(slot)
    }

    /// The same repository, opened with other keys (after a rotation).
    pub(crate) fn with_keys(self, keys: SlotKeys, slot_id: ObjectId) -> Repository {
        Repository {
            access: Access::Full(keys),
            others: Vec::new(),
            slot_id,
            epoch_keys: Mutex::default(),
            ..self
        }
    }

    /// Seals epoch key `id` of `epoch` under another key generation's `keys`; returns its
    /// object's name.
    pub(crate) async fn put_epoch_key_for(
        &self,
        keys: &SlotKeys,
        epoch: Epoch,
        id: ObjectId,
        key: &Key,
    ) -> Result<String> {
        let object = name::epoch_key(epoch, &id, keys.generation.as_ref());
        let sealed = object::seal(
            Header {
                kind: Kind::EpochKey,
                key_id: id,
            },
            &keys.epochs,
            &self.config.id,
            &object,
            key.as_bytes(),
        );
        self.store.put(&object, Bytes::from(sealed)).await?;
        Ok(object)
    }

    /// Removes a key slot; refuses the one in use, so the operator cannot lock themselves out.
    pub async fn remove_key(&self, id: ObjectId) -> Result<()> {
        if id == self.slot_id {
            return Err(Error::invalid(
                "refusing to remove the key slot this command was unlocked with; unlock with another key",
            ));
        }
        self.full("remove a key slot")?;
        let object = name::key_slot(&id);
        if !self.store.exists(&object).await? {
            return Err(Error::invalid(format!("no key slot {id}")));
        }
        self.store.delete(&object).await?;
        // A write-only slot's grants open nothing without it.
        for o in self.store.list(&name::grants_of(&id)).await? {
            self.store.delete(&o.name).await?;
        }
        Ok(())
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
