//! Repository objects: their names, their common header, and sealing of small objects.
//!
//! Every object starts with the same 24-byte header (magic, object format version, kind, key
//! id); see docs/FORMAT.md. Small objects (config, epoch keys, index segments, snapshots) are
//! *sealed*: AES-256-GCM under a key derived for that one object from its parent key, with a
//! random nonce, and associated data binding the header, the repository id and the object's
//! name. Moving, renaming or splicing objects therefore fails authentication.

use std::fmt;

use jiff::Timestamp;

use crate::crypto::{Key, NONCE_LEN, TAG_LEN, random_array};
use crate::error::{Error, Result};
use crate::id::ObjectId;

pub const MAGIC: &[u8; 6] = b"kluis\0";
/// The object format version this build writes and the newest it reads.
pub const OBJECT_FORMAT: u8 = 1;
pub const HEADER_LEN: usize = 24;

/// What an object is. The discriminant is stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Config = 1,
    KeySlot = 2,
    EpochKey = 3,
    Pack = 4,
    Index = 5,
    Snapshot = 6,
    /// Prune's bookkeeping: marks, sweep records and leases (`prune/...`).
    Prune = 7,
    /// A restore drill's report (`drills/<id>`).
    Drill = 8,
    /// A forget record (`forgotten/<id>`): manifests removed on purpose (see `crate::ledger`).
    Forgotten = 9,
    /// An erasure record (`erasures/<id>`): what `kluis erase` destroyed and deleted.
    Erasure = 10,
    /// An audit record (`audit/<time>-<digest>`, see `crate::audit`).
    Audit = 11,
    /// A write-only slot's grant (`grants/<slot>/<generation>`: the generation's public key
    /// and the repository's config, sealed under the slot's writer key) or its escrow (`grants/<slot>/<generation>.key`:
    /// the writer key, sealed under the generation's epoch-wrapping key).
    Grant = 12,
    /// A WAL file PostgreSQL archived (`wal/<YYYY-MM>/<cluster>/<name>`, see `crate::wal`).
    Wal = 13,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Config,
            2 => Kind::KeySlot,
            3 => Kind::EpochKey,
            4 => Kind::Pack,
            5 => Kind::Index,
            6 => Kind::Snapshot,
            7 => Kind::Prune,
            8 => Kind::Drill,
            9 => Kind::Forgotten,
            10 => Kind::Erasure,
            11 => Kind::Audit,
            12 => Kind::Grant,
            13 => Kind::Wal,
            _ => return None,
        })
    }

    /// The largest object of this kind a reader loads whole, by what the format allows;
    /// anything larger is damage or a planted object, refused before it is read. Packs and
    /// index segments depend on the repository's pack size: see
    /// [`crate::repository::Repository::max_len`].
    pub fn max_len(self) -> u64 {
        match self {
            Kind::Config | Kind::KeySlot => 64 << 10,
            // Header, (sealed to a key generation's public key: an ephemeral X25519 public
            // key,) nonce, 32 key bytes, tag.
            Kind::EpochKey => (HEADER_LEN + 32 + NONCE_LEN + 32 + TAG_LEN) as u64,
            Kind::Pack => u64::from(u32::MAX),
            Kind::Index => 1 << 30,
            // A database of 100,000 tables records about 22 MB.
            Kind::Snapshot => 32 << 20,
            // About a million pack names.
            Kind::Prune => 64 << 20,
            Kind::Drill => 16 << 20,
            // About a million forgotten snapshots' names.
            Kind::Forgotten => 64 << 20,
            // About 200,000 erased snapshots.
            Kind::Erasure => 64 << 20,
            Kind::Audit => 1 << 20,
            // A public key and the config.
            Kind::Grant => (HEADER_LEN + NONCE_LEN + 32 + TAG_LEN) as u64 + (64 << 10),
            // A segment of PostgreSQL's largest size, stored as it is, and a header.
            Kind::Wal => (1 << 30) + (1 << 20),
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Kind::Config => b"config",
            Kind::KeySlot => b"key-slot",
            Kind::EpochKey => b"epoch-key",
            Kind::Pack => b"pack",
            Kind::Index => b"index",
            Kind::Snapshot => b"snapshot",
            Kind::Prune => b"prune",
            Kind::Drill => b"drill",
            Kind::Forgotten => b"forgotten",
            Kind::Erasure => b"erasure",
            Kind::Audit => b"audit",
            Kind::Grant => b"grant",
            Kind::Wal => b"wal",
        }
    }
}

/// The header every object starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The id of the key the object is encrypted under: an epoch key id for packs, index
    /// segments and snapshots; the slot id for key slots; zero for master-key objects.
    pub key_id: ObjectId,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..6].copy_from_slice(MAGIC);
        out[6] = OBJECT_FORMAT;
        out[7] = self.kind as u8;
        out[8..].copy_from_slice(self.key_id.as_bytes());
        out
    }

    /// Parses and checks the header of object `name`.
    pub fn decode(name: &str, bytes: &[u8], expected: Kind) -> Result<Header> {
        if bytes.len() < HEADER_LEN || &bytes[..6] != MAGIC {
            return Err(Error::corrupt(name, "not a kluis object (bad magic)"));
        }
        if bytes[6] > OBJECT_FORMAT {
            return Err(Error::NewerFormat {
                object: name.to_string(),
                found: u32::from(bytes[6]),
                supported: u32::from(OBJECT_FORMAT),
            });
        }
        if bytes[6] == 0 {
            return Err(Error::corrupt(name, "object format version 0"));
        }
        let kind = Kind::from_u8(bytes[7])
            .ok_or_else(|| Error::corrupt(name, format!("unknown object kind {}", bytes[7])))?;
        if kind != expected {
            return Err(Error::corrupt(
                name,
                format!("expected a {:?} object, found a {kind:?}", expected),
            ));
        }
        let key_id = ObjectId::from_slice(&bytes[8..HEADER_LEN]).expect("16 bytes");
        Ok(Header { kind, key_id })
    }
}

fn object_key(parent: &Key, repo_id: &ObjectId, kind: Kind, name: &str) -> Key {
    parent.derive(
        repo_id.as_bytes(),
        &[b"kluis object v1 ", kind.label(), b" ", name.as_bytes()],
    )
}

fn aad(header: &[u8], repo_id: &ObjectId, name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + 16 + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(repo_id.as_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Seals `plaintext` as object `name`: header, nonce, ciphertext and tag.
pub fn seal(
    header: Header,
    parent: &Key,
    repo_id: &ObjectId,
    name: &str,
    plaintext: &[u8],
) -> Vec<u8> {
    let head = header.encode();
    let nonce: [u8; NONCE_LEN] = random_array();
    let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&head);
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    object_key(parent, repo_id, header.kind, name)
        .cipher()
        .seal_in_place(nonce, &aad(&head, repo_id, name), &mut out, start);
    out
}

/// Opens a sealed object whose header has already been decoded.
pub fn open(
    header: Header,
    parent: &Key,
    repo_id: &ObjectId,
    name: &str,
    bytes: &[u8],
) -> Result<Vec<u8>> {
    if bytes.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
        return Err(Error::corrupt(
            name,
            format!("truncated ({} bytes)", bytes.len()),
        ));
    }
    let nonce: [u8; NONCE_LEN] = bytes[HEADER_LEN..HEADER_LEN + NONCE_LEN]
        .try_into()
        .expect("12 bytes");
    object_key(parent, repo_id, header.kind, name)
        .cipher()
        .open(
            nonce,
            &aad(&bytes[..HEADER_LEN], repo_id, name),
            &bytes[HEADER_LEN + NONCE_LEN..],
        )
        .map_err(|_| Error::corrupt(name, "authentication failed"))
}

/// A calendar month in UTC, the unit of key scope and of erasure ("2026-11").
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch {
    year: u16,
    month: u8,
}

impl Epoch {
    pub fn of(time: Timestamp) -> Epoch {
        let date = time.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
        Epoch {
            year: date.year() as u16,
            month: date.month() as u8,
        }
    }

    /// The first instant of this month (UTC).
    pub fn start(self) -> Timestamp {
        jiff::civil::date(self.year as i16, self.month as i8, 1)
            .at(0, 0, 0, 0)
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp())
            .unwrap_or(Timestamp::MAX)
    }

    /// The first instant of the next month (UTC): every time of this epoch is before it.
    pub fn end(self) -> Timestamp {
        let (year, month) = if self.month == 12 {
            (self.year + 1, 1)
        } else {
            (self.year, self.month + 1)
        };
        Epoch { year, month }.start()
    }

    pub fn parse(s: &str) -> Option<Epoch> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let year: u16 = y.parse().ok()?;
        let month: u8 = m.parse().ok()?;
        (1..=12).contains(&month).then_some(Epoch { year, month })
    }
}

impl serde::Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Epoch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Epoch, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Epoch::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not YYYY-MM")))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({self})")
    }
}

/// Object names. A name is the object's path relative to the repository root.
pub mod name {
    use super::Epoch;
    use crate::id::ObjectId;

    pub const CONFIG: &str = "config";
    pub const KEYS: &str = "keys";
    pub const EPOCHS: &str = "epochs";
    pub const DATA: &str = "data";
    pub const INDEX: &str = "index";
    pub const SNAPSHOTS: &str = "snapshots";
    pub const PRUNE_MARKS: &str = "prune/marks";
    pub const PRUNE_SWEPT: &str = "prune/swept";
    pub const PRUNE_LEASES: &str = "prune/leases";
    /// Objects written only to read the store's clock back (`crate::clock`), then deleted.
    pub const PRUNE_CLOCK: &str = "prune/clock";
    /// Restore drill reports: `drills/<id>`.
    pub const DRILLS: &str = "drills";
    /// Forget records: `forgotten/<id>`.
    pub const FORGOTTEN: &str = "forgotten";
    /// Erasure records: `erasures/<id>`.
    pub const ERASURES: &str = "erasures";
    /// Archived WAL files: `wal/<YYYY-MM>/<cluster>/<name>`.
    pub const WAL: &str = "wal";

    pub fn wal(epoch: Epoch, cluster: &str, file: &str) -> String {
        format!("{WAL}/{epoch}/{cluster}/{file}")
    }

    /// Splits a WAL object's name into its epoch, cluster and file name.
    pub fn parse_wal(name: &str) -> Option<(Epoch, &str, &str)> {
        let rest = name.strip_prefix(WAL)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let epoch = Epoch::parse(parts.next()?)?;
        let (cluster, file) = (parts.next()?, parts.next()?);
        (parts.next().is_none() && !cluster.is_empty() && !file.is_empty())
            .then_some((epoch, cluster, file))
    }

    /// Write-only slots' grants: `grants/<slot>/<generation>` and `.../<generation>.key`.
    pub const GRANTS: &str = "grants";

    /// `grants/<slot>`: the prefix of a write-only slot's grants.
    pub fn grants_of(slot: &ObjectId) -> String {
        format!("{GRANTS}/{slot}")
    }

    /// `grants/<slot>/<generation>`, or with `escrow` its `.key`.
    pub fn grant(slot: &ObjectId, generation: &ObjectId, escrow: bool) -> String {
        let suffix = if escrow { ".key" } else { "" };
        format!("{GRANTS}/{slot}/{generation}{suffix}")
    }

    /// Splits a grant's name into its slot, generation and whether it is the escrow.
    pub fn parse_grant(name: &str) -> Option<(ObjectId, ObjectId, bool)> {
        let rest = name.strip_prefix(GRANTS)?.strip_prefix('/')?;
        let (slot, last) = rest.split_once('/')?;
        let (generation, escrow) = match last.strip_suffix(".key") {
            Some(g) => (g, true),
            None => (last, false),
        };
        Some((slot.parse().ok()?, generation.parse().ok()?, escrow))
    }

    /// `prune/marks/<id>` and friends: repository-wide objects named by a random id.
    pub fn prune_object(prefix: &str, id: &ObjectId) -> String {
        format!("{prefix}/{id}")
    }

    pub fn parse_prune_object(prefix: &str, name: &str) -> Option<ObjectId> {
        name.strip_prefix(prefix)?.strip_prefix('/')?.parse().ok()
    }

    pub fn key_slot(id: &ObjectId) -> String {
        format!("{KEYS}/{id}")
    }

    /// `epochs/EPOCH/ID` (a repository made before key generations), or `epochs/EPOCH/ID.GEN`:
    /// epoch key `ID` wrapped by key generation `GEN`.
    pub fn epoch_key(epoch: Epoch, id: &ObjectId, generation: Option<&ObjectId>) -> String {
        match generation {
            Some(g) => format!("{EPOCHS}/{epoch}/{id}.{g}"),
            None => format!("{EPOCHS}/{epoch}/{id}"),
        }
    }

    /// Splits an epoch key object's name into its epoch, key id and key generation.
    pub fn parse_epoch_key(name: &str) -> Option<(Epoch, ObjectId, Option<ObjectId>)> {
        let rest = name.strip_prefix(EPOCHS)?.strip_prefix('/')?;
        let (epoch, last) = rest.split_once('/')?;
        let epoch = Epoch::parse(epoch)?;
        match last.split_once('.') {
            Some((id, g)) => Some((epoch, id.parse().ok()?, Some(g.parse().ok()?))),
            None => Some((epoch, last.parse().ok()?, None)),
        }
    }

    pub fn pack(epoch: Epoch, id: &ObjectId) -> String {
        format!("{DATA}/{epoch}/{}/{id}", &id.to_hex()[..2])
    }

    pub fn index(epoch: Epoch, id: &ObjectId) -> String {
        format!("{INDEX}/{epoch}/{id}")
    }

    pub fn snapshot(epoch: Epoch, id: &ObjectId) -> String {
        format!("{SNAPSHOTS}/{epoch}/{id}")
    }

    /// Splits `prefix/EPOCH/[xx/]ID` into its epoch and id; `None` for anything else
    /// (a stray file an operator left, say), which callers report rather than trust.
    pub fn parse_epoch_object(prefix: &str, name: &str) -> Option<(Epoch, ObjectId)> {
        let rest = name.strip_prefix(prefix)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let epoch = Epoch::parse(parts.next()?)?;
        let mut last = parts.next()?;
        if prefix == DATA {
            let fanout = last;
            last = parts.next()?;
            if !last.starts_with(fanout) || fanout.len() != 2 {
                return None;
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((epoch, last.parse().ok()?))
    }

    pub fn parse_key_slot(name: &str) -> Option<ObjectId> {
        name.strip_prefix(KEYS)?.strip_prefix('/')?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_name_repository_and_header() {
        let key = Key::random();
        let repo = ObjectId::random();
        let header = Header {
            kind: Kind::Snapshot,
            key_id: ObjectId::random(),
        };
        let sealed = seal(header, &key, &repo, "snapshots/2026-11/aa", b"payload");
        let decoded = Header::decode("x", &sealed, Kind::Snapshot).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(
            open(header, &key, &repo, "snapshots/2026-11/aa", &sealed).unwrap(),
            b"payload"
        );
        assert!(open(header, &key, &repo, "snapshots/2026-11/ab", &sealed).is_err());
        assert!(
            open(
                header,
                &key,
                &ObjectId::random(),
                "snapshots/2026-11/aa",
                &sealed
            )
            .is_err()
        );
        let mut tampered = sealed.clone();
        tampered[8] ^= 1; // key id in the header
        assert!(open(header, &key, &repo, "snapshots/2026-11/aa", &tampered).is_err());
        assert!(matches!(
            Header::decode("x", &sealed, Kind::Index),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn newer_format_is_refused_by_name() {
        let mut bytes = Header {
            kind: Kind::Config,
            key_id: ObjectId::default(),
        }
        .encode()
        .to_vec();
        bytes[6] = OBJECT_FORMAT + 1;
        let err = Header::decode("config", &bytes, Kind::Config).unwrap_err();
        assert!(matches!(err, Error::NewerFormat { .. }));
        assert!(err.to_string().contains("config"));
    }

    #[test]
    fn names_parse_back() {
        let epoch = Epoch::parse("2026-11").unwrap();
        let id = ObjectId::random();
        assert_eq!(
            name::parse_epoch_object(name::DATA, &name::pack(epoch, &id)),
            Some((epoch, id))
        );
        assert_eq!(
            name::parse_epoch_object(name::SNAPSHOTS, &name::snapshot(epoch, &id)),
            Some((epoch, id))
        );
        assert_eq!(
            name::parse_epoch_object(name::INDEX, "index/2026-13/00"),
            None
        );
        assert_eq!(
            name::parse_epoch_object(name::DATA, "data/2026-11/zz/00"),
            None
        );
        assert_eq!(name::parse_key_slot(&name::key_slot(&id)), Some(id));
        assert_eq!(
            Epoch::of("2026-02-28T23:59:59Z".parse().unwrap()).to_string(),
            "2026-02"
        );
        assert_eq!(Epoch::parse("2026-00"), None);
    }
}
