//! Write-only access (docs/FORMAT.md §3.5): a slot that backs up and reads nothing it did not
//! write.
//!
//! Each key generation has an X25519 key pair derived from its epoch-wrapping key, so every
//! full slot of the generation holds the private half and nothing new is stored for it. A
//! write-only slot holds the prune records key (prune's marks, which every writer reads) and a
//! writer key of its own; not the records key, so it reads and writes no drill report, forget,
//! erasure or audit record. Its *grant* (`grants/<slot>/<generation>`, sealed under the writer
//! key) gives it the generation's public key and the repository's config; the grant's
//! *escrow* (`.key`, the writer key sealed under the generation's epoch-wrapping key) lets a
//! rotation grant the next generation without the host's secret.
//!
//! A write-only host makes its own epoch key for each month it writes, sealed to the
//! generation's public key (readable by every full slot, not by it), and keeps the key itself
//! only on its own disk, sealed under its writer key, until the month is over. Full writers
//! never write under such a key. So a stolen database host holds the key of the current
//! month's backups of its own data, and nothing else of the repository.

use std::path::{Path, PathBuf};

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::*;
use crate::keys::WriterKeys;
use crate::object::HEADER_LEN;

/// The size of an epoch key object a write-only slot made: the header, its ephemeral X25519
/// public key, then nonce, key and tag as in every sealed object.
pub const SEALED_EPOCH_KEY_LEN: usize = HEADER_LEN + 32 + 12 + 32 + 16;

/// A write-only slot's keys, and the key generation it writes for.
pub(crate) struct Writer {
    pub(crate) keys: WriterKeys,
    pub(crate) grant: Grant,
    /// Where it keeps the key of the month it writes (`None`: a new key for every backup).
    pub(crate) state: Option<PathBuf>,
}

/// A key generation's public key, as a write-only slot's grant gives it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grant {
    pub(crate) generation: ObjectId,
    pub(crate) public: [u8; 32],
}

/// The X25519 private key of the key generation whose epoch-wrapping key is `epochs`.
fn generation_secret(epochs: &Key, repo: &ObjectId) -> StaticSecret {
    let k = epochs.derive(repo.as_bytes(), &[b"kluis generation x25519 v1"]);
    StaticSecret::from(*k.as_bytes())
}

/// The public key of the key generation `keys` holds.
pub(crate) fn generation_public(keys: &SlotKeys, repo: &ObjectId) -> [u8; 32] {
    PublicKey::from(&generation_secret(&keys.epochs, repo)).to_bytes()
}

/// The key an epoch key sealed to a generation is sealed under: from the X25519 shared
/// secret, bound to both public keys.
fn shared_key(shared: &[u8; 32], ephemeral: &[u8; 32], public: &[u8; 32]) -> Key {
    let mut salt = ephemeral.to_vec();
    salt.extend_from_slice(public);
    Key::from_bytes(*shared).derive(&salt, &[b"kluis epoch key to generation v1"])
}

/// Seals epoch key `key` (object `name`, key id `id`) to a key generation's public key.
fn seal_to(public: &[u8; 32], repo: &ObjectId, id: ObjectId, name: &str, key: &Key) -> Vec<u8> {
    let ephemeral = StaticSecret::from(crate::crypto::random_array::<32>());
    let mine = PublicKey::from(&ephemeral).to_bytes();
    let shared = ephemeral.diffie_hellman(&PublicKey::from(*public));
    let parent = shared_key(shared.as_bytes(), &mine, public);
    let header = Header {
        kind: Kind::EpochKey,
        key_id: id,
    };
    let sealed = object::seal(header, &parent, repo, name, key.as_bytes());
    let mut out = Vec::with_capacity(SEALED_EPOCH_KEY_LEN);
    out.extend_from_slice(&sealed[..HEADER_LEN]);
    out.extend_from_slice(&mine);
    out.extend_from_slice(&sealed[HEADER_LEN..]);
    out
}

/// Opens an epoch key a write-only slot sealed to the generation `keys` holds.
pub(crate) fn open_sealed(
    keys: &SlotKeys,
    repo: &ObjectId,
    header: Header,
    name: &str,
    bytes: &[u8],
) -> Result<Vec<u8>> {
    let ephemeral: [u8; 32] = bytes[HEADER_LEN..HEADER_LEN + 32]
        .try_into()
        .map_err(|_| Error::corrupt(name, "truncated"))?;
    let public = generation_public(keys, repo);
    let shared = generation_secret(&keys.epochs, repo).diffie_hellman(&PublicKey::from(ephemeral));
    if !shared.was_contributory() {
        return Err(Error::corrupt(name, "not a key sealed to a key generation"));
    }
    let parent = shared_key(shared.as_bytes(), &ephemeral, &public);
    let mut rest = bytes[..HEADER_LEN].to_vec();
    rest.extend_from_slice(&bytes[HEADER_LEN + 32..]);
    object::open(header, &parent, repo, name, &rest)
}

impl Writer {
    /// The write-only slot `slot`'s keys, with the grant of a live key generation (one a full
    /// slot still holds; of several, during a rotation, the one granted last), and the
    /// repository's config (its plaintext JSON) from the grant.
    pub(super) async fn open(
        store: &Store,
        repo: &ObjectId,
        slot: ObjectId,
        keys: WriterKeys,
    ) -> Result<(Writer, Vec<u8>)> {
        let live: Vec<ObjectId> = load_slots(store)
            .await?
            .iter()
            .flatten()
            .filter(|s| !s.write_only())
            .filter_map(|s| s.generation)
            .collect();
        let mut grants = Vec::new();
        for o in store.list(&name::grants_of(&slot)).await? {
            match name::parse_grant(&o.name) {
                Some((s, g, false)) if s == slot && live.contains(&g) => {
                    grants.push((o.modified, g, o.name))
                }
                _ => {}
            }
        }
        grants.sort();
        let Some((_, generation, object)) = grants.pop() else {
            return Err(Error::Conflict(format!(
                "write-only key slot {} has no grant of a key generation in use (a rotation \
                 that was stopped before granting it, or the repository predates key \
                 generations): add it again with `kluis key add --write-only`",
                slot.short()
            )));
        };
        let bytes = store.get_bounded(&object, Kind::Grant.max_len()).await?;
        let header = Header::decode(&object, &bytes, Kind::Grant)?;
        let plain = object::open(header, &keys.writer, repo, &object, &bytes)?;
        let (public, config) = plain
            .split_first_chunk::<32>()
            .ok_or_else(|| Error::corrupt(&object, "a grant holds a 32-byte public key"))?;
        let writer = Writer {
            keys,
            grant: Grant {
                generation,
                public: *public,
            },
            state: None,
        };
        Ok((writer, config.to_vec()))
    }

    /// The file that keeps this host's key of `epoch`.
    fn key_file(&self, repo: &ObjectId, slot: &ObjectId, epoch: Epoch) -> Option<PathBuf> {
        Some(
            self.state
                .as_ref()?
                .join(repo.to_hex())
                .join(slot.to_hex())
                .join(epoch.to_string()),
        )
    }
}

impl Repository {
    /// Writes a write-only slot `slot`'s grant of this repository's key generation (its
    /// public key and the repository's config), and its escrow first (so a rotation can
    /// always grant the next one).
    pub(crate) async fn put_grant(
        &self,
        keys: &SlotKeys,
        slot: ObjectId,
        writer: &Key,
    ) -> Result<()> {
        let generation = keys.generation.ok_or_else(|| {
            Error::invalid(
                "this repository was made before key generations: run `kluis key rotate` once \
                 before adding a write-only key",
            )
        })?;
        let header = Header {
            kind: Kind::Grant,
            key_id: slot,
        };
        let escrow = name::grant(&slot, &generation, true);
        let sealed = object::seal(
            header,
            &keys.epochs,
            &self.config.id,
            &escrow,
            writer.as_bytes(),
        );
        self.store.put(&escrow, Bytes::from(sealed)).await?;
        let grant = name::grant(&slot, &generation, false);
        let mut plain = generation_public(keys, &self.config.id).to_vec();
        serde_json::to_writer(&mut plain, &self.config).expect("config serializes");
        let sealed = object::seal(header, writer, &self.config.id, &grant, &plain);
        self.store.put(&grant, Bytes::from(sealed)).await
    }

    /// The writer key of write-only slot `slot`, from its escrow under the key generation
    /// `keys` holds; `None` if it has none.
    pub(crate) async fn escrowed(&self, keys: &SlotKeys, slot: ObjectId) -> Result<Option<Key>> {
        let Some(generation) = keys.generation else {
            return Ok(None);
        };
        let object = name::grant(&slot, &generation, true);
        let bytes = match self.store.get_bounded(&object, Kind::Grant.max_len()).await {
            Err(Error::MissingObject { .. }) => return Ok(None),
            other => other?,
        };
        let header = Header::decode(&object, &bytes, Kind::Grant)?;
        let plain = Zeroizing::new(object::open(
            header,
            &keys.epochs,
            &self.config.id,
            &object,
            &bytes,
        )?);
        let raw: [u8; 32] = plain[..]
            .try_into()
            .map_err(|_| Error::corrupt(&object, "an escrow holds a 32-byte key"))?;
        Ok(Some(Key::from_bytes(raw)))
    }

    /// Adds a write-only slot for `secret` (`kluis key add --write-only`): its escrow and
    /// grant, then the slot. Returns its id.
    pub async fn add_write_only_key(
        &self,
        secret: &Secret,
        kdf: KdfParams,
        creator: crate::keys::Creator,
        label: Option<String>,
    ) -> Result<ObjectId> {
        let keys = self.full("add a key slot")?;
        let writer = WriterKeys {
            prune: keys.prune_key(&self.config.id),
            writer: Key::random(),
        };
        let slot =
            KeySlot::create_write_only(&writer, self.config.id, secret, kdf, creator, label)?;
        self.put_grant(keys, slot.id, &writer.writer).await?;
        self.store
            .put(&slot.name(), Bytes::from(slot.encode()))
            .await?;
        Ok(slot.id)
    }

    /// Seals epoch key `id` of `epoch`, made by a write-only slot, to the public key of the
    /// generation `keys` holds (a rotation carrying it over); returns the object's name.
    pub(crate) async fn put_sealed_epoch_key_for(
        &self,
        keys: &SlotKeys,
        epoch: Epoch,
        id: ObjectId,
        key: &Key,
    ) -> Result<String> {
        let object = name::epoch_key(epoch, &id, keys.generation.as_ref());
        let public = generation_public(keys, &self.config.id);
        let sealed = seal_to(&public, &self.config.id, id, &object, key);
        self.store.put(&object, Bytes::from(sealed)).await?;
        Ok(object)
    }

    /// A write-only host's key for `epoch`: the one it keeps on its disk, if the repository
    /// still has it and no prune condemned it, else a new one, sealed to the generation's
    /// public key and kept on its disk.
    pub(super) async fn own_key(
        &self,
        w: &Writer,
        epoch: Epoch,
        condemned: &std::collections::HashSet<(Epoch, ObjectId)>,
    ) -> Result<Arc<EpochKey>> {
        let repo = self.config.id;
        let file = w.key_file(&repo, &self.slot_id, epoch);
        let listed: Vec<ObjectId> = self
            .store
            .list(&format!("{}/{epoch}", name::EPOCHS))
            .await?
            .into_iter()
            .filter_map(|o| name::parse_epoch_key(&o.name).map(|(_, id, _)| id))
            .collect();
        if let Some(kept) = self.kept_key(w, epoch) {
            if listed.contains(&kept.id) && !condemned.contains(&(epoch, kept.id)) {
                return Ok(self.cache(kept));
            }
        }
        let id = ObjectId::random();
        let key = Key::random();
        let object = name::epoch_key(epoch, &id, Some(&w.grant.generation));
        let sealed = seal_to(&w.grant.public, &repo, id, &object, &key);
        self.store.put(&object, Bytes::from(sealed)).await?;
        // As for a full writer: a rotation that removed the generation's slots before this
        // put did not carry the key over.
        if !self.generation_alive().await? {
            let _ = self.store.delete(&object).await;
            return Err(Error::Conflict(
                "the repository's keys were rotated while this command ran (its key generation \
                 is gone); run it again"
                    .into(),
            ));
        }
        let made = EpochKey::new(epoch, id, key);
        // Only the current month's (or a later one's) key is kept: a month that is over is
        // not written again, and a stolen host must not hold its key.
        if let Some(f) = file
            .as_ref()
            .filter(|_| epoch >= Epoch::of(Timestamp::now()))
        {
            keep(f, w, &repo, &made)?;
        }
        Ok(self.cache(made))
    }

    /// The key this write-only host keeps on its disk for `epoch`, if any.
    pub(super) fn kept_key(&self, w: &Writer, epoch: Epoch) -> Option<EpochKey> {
        let file = w.key_file(&self.config.id, &self.slot_id, epoch)?;
        read_kept(&file, w, &self.config.id, epoch)
    }

    pub(super) fn cache(&self, key: EpochKey) -> Arc<EpochKey> {
        let key = Arc::new(key);
        self.epoch_keys
            .lock()
            .expect("not poisoned")
            .insert((key.epoch, key.id), key.clone());
        key
    }
}

/// The key a write-only host kept for `epoch`, if its file opens.
fn read_kept(file: &Path, w: &Writer, repo: &ObjectId, epoch: Epoch) -> Option<EpochKey> {
    let bytes = std::fs::read(file).ok()?;
    let header = Header::decode("kept epoch key", &bytes, Kind::EpochKey).ok()?;
    let label = format!("writer-keys/{epoch}");
    let plain = Zeroizing::new(object::open(header, &w.keys.writer, repo, &label, &bytes).ok()?);
    let raw: [u8; 32] = plain[..].try_into().ok()?;
    Some(EpochKey::new(epoch, header.key_id, Key::from_bytes(raw)))
}

/// Keeps `key` on this host's disk (mode 0600, sealed under the writer key, written whole or
/// not at all), and removes the keys it kept of other months before the current one: a
/// stolen host holds no key of a month that is over.
fn keep(file: &Path, w: &Writer, repo: &ObjectId, key: &EpochKey) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = file.parent().expect("a kept key's file has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    let header = Header {
        kind: Kind::EpochKey,
        key_id: key.id,
    };
    let label = format!("writer-keys/{}", key.epoch);
    let sealed = object::seal(header, &w.keys.writer, repo, &label, key.key().as_bytes());
    let tmp = dir.join(format!(".{}.tmp", ObjectId::random()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(&sealed)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, file).map_err(|e| Error::io(file, e))?;
    let now = Epoch::of(Timestamp::now());
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(Epoch::parse)
            .is_some_and(|e| e != key.epoch && e < now);
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_key_sealed_to_a_generation_opens_with_its_private_key_only() {
        let repo = ObjectId::random();
        let keys = SlotKeys::new();
        let other = keys.next_generation();
        let id = ObjectId::random();
        let name = name::epoch_key(
            Epoch::parse("2026-12").unwrap(),
            &id,
            keys.generation.as_ref(),
        );
        let key = Key::random();
        let sealed = seal_to(&generation_public(&keys, &repo), &repo, id, &name, &key);
        assert_eq!(sealed.len(), SEALED_EPOCH_KEY_LEN);
        let header = Header::decode(&name, &sealed, Kind::EpochKey).unwrap();
        let opened = open_sealed(&keys, &repo, header, &name, &sealed).unwrap();
        assert_eq!(&opened[..], key.as_bytes());
        // Another generation (a rotation's next, or a write-only host's writer key) does not
        // open it, nor does it open under another name or repository.
        assert!(open_sealed(&other, &repo, header, &name, &sealed).is_err());
        assert!(open_sealed(&keys, &ObjectId::random(), header, &name, &sealed).is_err());
        assert!(open_sealed(&keys, &repo, header, &format!("{name}x"), &sealed).is_err());
        // Every byte is bound: the header, the ephemeral public key, the sealed key.
        for i in 0..sealed.len() {
            let mut b = sealed.clone();
            b[i] ^= 0x01;
            let opened = Header::decode(&name, &b, Kind::EpochKey)
                .and_then(|h| open_sealed(&keys, &repo, h, &name, &b));
            assert!(opened.is_err(), "byte {i} flipped, still opens");
        }
        // A low-order ephemeral key (all zeros) gives no shared secret: refused as corrupt.
        let mut zero = sealed.clone();
        zero[HEADER_LEN..HEADER_LEN + 32].fill(0);
        let e = open_sealed(&keys, &repo, header, &name, &zero).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a key sealed to a key generation"),
            "{e}"
        );
    }
}
