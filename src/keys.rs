//! Key slots and the secrets that open them.
//!
//! A repository has a random records key and, per key generation, a random epoch-wrapping key
//! (a repository made before key generations has one master key that is both). Each key slot
//! (`keys/<id>`) holds them wrapped (AES-256-GCM) under a key-encryption key derived from one
//! secret: a passphrase (Argon2id) or a key file (HKDF). Adding a passphrase adds a slot;
//! removing one deletes it; `kluis key rotate` makes a new generation; the data is never
//! re-encrypted. Slots are the only objects not sealed by a repository key, so each carries a
//! SHA-256 checksum that tells corruption apart from a wrong password.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{Key, NONCE_LEN, Sha256, random_array};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::object::{HEADER_LEN, Header, Kind};

/// The secret an operator unlocks a repository with.
pub enum Secret {
    Passphrase(Zeroizing<String>),
    KeyFile(Key),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Passphrase(_) => f.write_str("Secret::Passphrase(<secret>)"),
            Secret::KeyFile(_) => f.write_str("Secret::KeyFile(<secret>)"),
        }
    }
}

const KEY_FILE_PREFIX: &str = "kluis-key-file-v1:";

impl Secret {
    pub fn passphrase(s: impl Into<String>) -> Secret {
        Secret::Passphrase(Zeroizing::new(s.into()))
    }

    /// Reads a passphrase file: its first line, without the line ending.
    pub fn from_password_file(path: &Path) -> Result<Secret> {
        Ok(Secret::passphrase(read_secret_line(path)?.as_str()))
    }

    /// Reads a key file written by [`generate_key_file`].
    pub fn from_key_file(path: &Path) -> Result<Secret> {
        let text = read_secret_file(path)?;
        let bad = || {
            Error::invalid(format!(
                "{}: not a kluis key file (expected one line `{KEY_FILE_PREFIX}<64 hex digits>`)",
                path.display()
            ))
        };
        let hex_part = text.trim().strip_prefix(KEY_FILE_PREFIX).ok_or_else(bad)?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_part, &mut bytes[..]).map_err(|_| bad())?;
        Ok(Secret::KeyFile(Key::from_bytes(*bytes)))
    }

    fn kind(&self) -> SlotKind {
        match self {
            Secret::Passphrase(_) => SlotKind::Passphrase,
            Secret::KeyFile(_) => SlotKind::KeyFile,
        }
    }
}

/// Refuses a secret file that group or others can access, then reads it.
/// The first line of a secret file (checked like [`read_secret_file`]); an empty one is an error.
pub fn read_secret_line(path: &Path) -> Result<Zeroizing<String>> {
    let text = read_secret_file(path)?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(Error::invalid(format!(
            "{}: password file is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(line.to_string()))
}

/// Refuses a secret file that group or others can access, or that belongs to another user
/// than this one or root; then reads it. The checks and the read use one open file, so the
/// file cannot be swapped between them.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecureSecretFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    let user = rustix::process::geteuid().as_raw();
    if meta.uid() != user && meta.uid() != 0 {
        return Err(Error::SecretFileOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            user,
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::invalid(format!("{}: secret file is not UTF-8", path.display())))?;
    Ok(Zeroizing::new(text.to_string()))
}

/// Writes a new random key file with mode 0600; refuses to overwrite an existing file.
pub fn generate_key_file(path: &Path) -> Result<()> {
    let key = Key::random();
    let line = Zeroizing::new(format!(
        "{KEY_FILE_PREFIX}{}\n",
        hex::encode(key.as_bytes())
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.write_all(line.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    Passphrase,
    KeyFile,
}

/// Argon2id cost parameters, stored in each passphrase slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

/// The most Argon2 memory a slot may ask for: 2 GiB.
pub const MAX_KDF_MEMORY_KIB: u32 = 2 << 20;
/// The most passes a slot may ask for.
pub const MAX_KDF_ITERATIONS: u32 = 10;
/// The most lanes a slot may ask for.
pub const MAX_KDF_PARALLELISM: u32 = 16;
/// The most work one slot may cost: memory times passes, 4 GiB-passes (about 3 s here; the
/// default is 192 MiB-passes). A slot asking more cannot make unlocking hang.
pub const MAX_KDF_COST_KIB: u64 = 4 << 20;

impl KdfParams {
    /// Memory times passes.
    pub fn cost(&self) -> u64 {
        u64::from(self.memory_kib) * u64::from(self.iterations)
    }

    /// Whether these parameters are within what kluis creates and reads: `None`, or why not.
    pub fn out_of_bounds(&self) -> Option<String> {
        if self.iterations == 0 || self.iterations > MAX_KDF_ITERATIONS {
            return Some(format!(
                "Argon2 passes {} outside 1..={MAX_KDF_ITERATIONS}",
                self.iterations
            ));
        }
        if self.parallelism == 0 || self.parallelism > MAX_KDF_PARALLELISM {
            return Some(format!(
                "Argon2 lanes {} outside 1..={MAX_KDF_PARALLELISM}",
                self.parallelism
            ));
        }
        if self.memory_kib > MAX_KDF_MEMORY_KIB {
            return Some(format!(
                "Argon2 memory {} KiB over {MAX_KDF_MEMORY_KIB} KiB",
                self.memory_kib
            ));
        }
        if self.cost() > MAX_KDF_COST_KIB {
            return Some(format!(
                "Argon2 memory times passes {} KiB over {MAX_KDF_COST_KIB} KiB",
                self.cost()
            ));
        }
        None
    }
}

impl Default for KdfParams {
    /// RFC 9106's second recommended option, with one lane: 64 MiB, 3 passes.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// What a key slot unlocks: the records key (config, prune, drill and forget records) and the
/// key generation's epoch-wrapping key (every epoch key object of that generation). A slot of a
/// repository made before key generations wraps one master key, which is both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotKeys {
    pub records: Key,
    pub epochs: Key,
    /// The key generation (see `kluis key rotate`); `None` for the master key of a repository
    /// made before key generations.
    pub generation: Option<ObjectId>,
}

impl SlotKeys {
    /// A new repository's keys: all random, generation one.
    pub fn new() -> SlotKeys {
        SlotKeys {
            records: Key::random(),
            epochs: Key::random(),
            generation: Some(ObjectId::random()),
        }
    }

    /// The key prune's records (marks, sweep records, leases, clock objects) are sealed
    /// under: derived from the records key, and all a write-only slot holds of it.
    pub fn prune_key(&self, repository: &ObjectId) -> Key {
        prune_key(&self.records, repository)
    }

    /// The same records key, a new generation with a new epoch-wrapping key.
    pub fn next_generation(&self) -> SlotKeys {
        SlotKeys {
            records: self.records.clone(),
            epochs: Key::random(),
            generation: Some(ObjectId::random()),
        }
    }
}

impl Default for SlotKeys {
    fn default() -> Self {
        SlotKeys::new()
    }
}

/// What a slot lets its holder do, when it is not everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Back up, and read nothing it did not write (docs/FORMAT.md §3.5): the slot holds the
    /// prune records key and its own writer key; neither the records key nor an
    /// epoch-wrapping key.
    WriteOnly,
}

/// What a write-only slot unlocks: the prune records key (prune's marks, which every writer
/// must read), and the slot's writer key, which opens the slot's grants (a key generation's
/// public key and the repository's config, sealed for it) and its host's own epoch keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterKeys {
    pub prune: Key,
    pub writer: Key,
}

/// What a secret opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unlocked {
    Full(SlotKeys),
    WriteOnly(WriterKeys),
}

/// The prune records key of a repository whose records key is `records`.
pub fn prune_key(records: &Key, repository: &ObjectId) -> Key {
    records.derive(repository.as_bytes(), &[b"kluis prune records v1"])
}

/// Who made a key slot (for `kluis key list`).
#[derive(Debug, Clone)]
pub struct Creator {
    pub host: String,
    /// The operating system user.
    pub user: Option<String>,
}

impl Creator {
    /// This host and process's user.
    pub fn here() -> Creator {
        Creator {
            host: crate::hostname(),
            user: crate::os_user(),
        }
    }
}

/// The JSON body of a key slot object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    pub id: ObjectId,
    pub repository: ObjectId,
    pub kind: SlotKind,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kdf: Option<KdfParams>,
    #[serde(with = "hex::serde")]
    pub salt: [u8; 32],
    #[serde(with = "hex::serde")]
    pub nonce: [u8; NONCE_LEN],
    #[serde(with = "hex::serde")]
    pub wrapped: Vec<u8>,
    pub created: Timestamp,
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub label: Option<String>,
    /// The key generation whose keys it wraps (records key and epoch-wrapping key, 64 bytes);
    /// absent: the one master key of a repository made before key generations (32 bytes).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub generation: Option<ObjectId>,
    /// The operating system user who made it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    /// Absent: a full slot. `write-only`: it wraps the records key and a writer key (64
    /// bytes), and has no generation.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role: Option<Role>,
}

impl KeySlot {
    /// Wraps `keys` under `secret` in a new slot.
    pub fn create(
        keys: &SlotKeys,
        repository: ObjectId,
        secret: &Secret,
        kdf: KdfParams,
        creator: Creator,
        label: Option<String>,
    ) -> Result<KeySlot> {
        let mut plain = Zeroizing::new(keys.records.as_bytes().to_vec());
        if keys.generation.is_some() {
            plain.extend_from_slice(keys.epochs.as_bytes());
        } else if keys.records != keys.epochs {
            return Err(Error::invalid(
                "a slot without a key generation wraps one master key",
            ));
        }
        let mut slot = KeySlot::blank(repository, secret, kdf, creator, label)?;
        slot.generation = keys.generation;
        slot.seal(secret, &plain)?;
        Ok(slot)
    }

    /// Wraps a write-only host's keys under `secret` in a new slot.
    pub fn create_write_only(
        keys: &WriterKeys,
        repository: ObjectId,
        secret: &Secret,
        kdf: KdfParams,
        creator: Creator,
        label: Option<String>,
    ) -> Result<KeySlot> {
        let mut plain = Zeroizing::new(keys.prune.as_bytes().to_vec());
        plain.extend_from_slice(keys.writer.as_bytes());
        let mut slot = KeySlot::blank(repository, secret, kdf, creator, label)?;
        slot.role = Some(Role::WriteOnly);
        slot.seal(secret, &plain)?;
        Ok(slot)
    }

    /// A new slot for `secret` that wraps nothing yet.
    fn blank(
        repository: ObjectId,
        secret: &Secret,
        kdf: KdfParams,
        creator: Creator,
        label: Option<String>,
    ) -> Result<KeySlot> {
        if let Some(why) = kdf
            .out_of_bounds()
            .filter(|_| secret.kind() == SlotKind::Passphrase)
        {
            return Err(Error::invalid(format!("key derivation parameters: {why}")));
        }
        Ok(KeySlot {
            id: ObjectId::random(),
            repository,
            kind: secret.kind(),
            kdf: matches!(secret, Secret::Passphrase(_)).then_some(kdf),
            salt: random_array(),
            nonce: random_array(),
            wrapped: Vec::new(),
            created: Timestamp::now(),
            host: creator.host,
            label,
            generation: None,
            user: creator.user,
            role: None,
        })
    }

    /// Wraps `plain` under `secret`, with the slot's fields (generation and role among them)
    /// in the associated data.
    fn seal(&mut self, secret: &Secret, plain: &[u8]) -> Result<()> {
        let kek = self.key_encryption_key(secret)?;
        self.wrapped = kek.cipher().seal(self.nonce, &self.aad(), plain);
        Ok(())
    }

    fn aad(&self) -> Vec<u8> {
        let mut aad = b"kluis key slot v1".to_vec();
        aad.extend_from_slice(self.id.as_bytes());
        aad.extend_from_slice(self.repository.as_bytes());
        aad.extend_from_slice(serde_json::to_string(&self.kind).expect("enum").as_bytes());
        if let Some(k) = self.kdf {
            for v in [k.memory_kib, k.iterations, k.parallelism] {
                aad.extend_from_slice(&v.to_le_bytes());
            }
        }
        if let Some(g) = self.generation {
            aad.extend_from_slice(b"generation");
            aad.extend_from_slice(g.as_bytes());
        }
        if self.role == Some(Role::WriteOnly) {
            aad.extend_from_slice(b"role write-only");
        }
        aad
    }

    fn key_encryption_key(&self, secret: &Secret) -> Result<Key> {
        match (secret, self.kdf) {
            (Secret::Passphrase(p), Some(k)) => {
                if let Some(why) = k.out_of_bounds() {
                    return Err(Error::corrupt(
                        self.name(),
                        format!("{why}: not tried (a slot must not make unlocking hang)"),
                    ));
                }
                let params =
                    argon2::Params::new(k.memory_kib, k.iterations, k.parallelism, Some(32))
                        .map_err(|e| {
                            Error::corrupt(self.name(), format!("invalid Argon2 parameters: {e}"))
                        })?;
                let argon = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params,
                );
                let mut out = Zeroizing::new([0u8; 32]);
                argon
                    .hash_password_into(p.as_bytes(), &self.salt, &mut out[..])
                    .map_err(|e| Error::corrupt(self.name(), format!("Argon2 failed: {e}")))?;
                Ok(Key::from_bytes(*out))
            }
            (Secret::KeyFile(k), None) => Ok(k.derive(&self.salt, &[b"kluis key-file slot v1"])),
            _ => Err(Error::corrupt(
                self.name(),
                "slot kind and parameters disagree",
            )),
        }
    }

    /// What trying this slot costs (Argon2 memory times passes; 0 for a key-file slot).
    pub fn cost(&self) -> u64 {
        self.kdf.map_or(0, |k| k.cost())
    }

    /// Unwraps the slot's keys, or `None` if `secret` is not this slot's secret.
    pub fn unwrap_keys(&self, secret: &Secret) -> Result<Option<Unlocked>> {
        if secret.kind() != self.kind {
            return Ok(None);
        }
        let kek = self.key_encryption_key(secret)?;
        let Ok(bytes) = kek.cipher().open(self.nonce, &self.aad(), &self.wrapped) else {
            return Ok(None);
        };
        let bytes = Zeroizing::new(bytes);
        let key = |range: std::ops::Range<usize>| -> Result<Key> {
            let arr: [u8; 32] = bytes
                .get(range)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Error::corrupt(self.name(), "wrapped key has the wrong length"))?;
            Ok(Key::from_bytes(arr))
        };
        let want = if self.generation.is_some() || self.role.is_some() {
            64
        } else {
            32
        };
        if bytes.len() != want {
            return Err(Error::corrupt(
                self.name(),
                "wrapped key has the wrong length",
            ));
        }
        let records = key(0..32)?;
        if self.role == Some(Role::WriteOnly) {
            if self.generation.is_some() {
                return Err(Error::corrupt(
                    self.name(),
                    "a write-only slot holds no key generation",
                ));
            }
            return Ok(Some(Unlocked::WriteOnly(WriterKeys {
                prune: records,
                writer: key(32..64)?,
            })));
        }
        let epochs = match self.generation {
            Some(_) => key(32..64)?,
            None => records.clone(),
        };
        Ok(Some(Unlocked::Full(SlotKeys {
            records,
            epochs,
            generation: self.generation,
        })))
    }

    /// Whether it is a write-only slot.
    pub fn write_only(&self) -> bool {
        self.role == Some(Role::WriteOnly)
    }

    pub fn name(&self) -> String {
        crate::object::name::key_slot(&self.id)
    }

    /// The stored form: header, JSON body, SHA-256 of both.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Header {
            kind: Kind::KeySlot,
            key_id: self.id,
        }
        .encode()
        .to_vec();
        serde_json::to_writer(&mut out, self).expect("key slot serializes");
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    pub fn decode(name: &str, bytes: &[u8]) -> Result<KeySlot> {
        let header = Header::decode(name, bytes, Kind::KeySlot)?;
        if bytes.len() < HEADER_LEN + 32 {
            return Err(Error::corrupt(name, "truncated key slot"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body) != sum {
            return Err(Error::corrupt(name, "key slot checksum mismatch"));
        }
        let slot: KeySlot = serde_json::from_slice(&body[HEADER_LEN..])
            .map_err(|e| Error::corrupt(name, format!("key slot does not parse: {e}")))?;
        if slot.id != header.key_id || slot.name() != name {
            return Err(Error::corrupt(name, "key slot id does not match its name"));
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests;
