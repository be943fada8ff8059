//! The index: which pack holds each blob, and where.
//!
//! On storage the index is a set of immutable segments (`index/<epoch>/<id>`), each written by
//! one backup session after the packs it lists are durable, and before the snapshot that
//! needs them. A segment may name segments it supersedes (compaction); readers drop those.
//! In memory, [`Index`] maps blob ids to compact locations, about 60 bytes a blob.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::object::Epoch;
use crate::pack::{BlobEntry, BlobKind, Compression};

/// One pack as listed in an index segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPack {
    pub id: ObjectId,
    /// Total length of the pack object in bytes.
    pub length: u32,
    pub blobs: Vec<BlobEntry>,
}

/// The plaintext of one index segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSegment {
    pub supersedes: Vec<ObjectId>,
    pub packs: Vec<IndexedPack>,
}

const ENTRY_LEN: usize = 1 + 1 + 32 + 4 + 4 + 4;

impl IndexSegment {
    pub fn blob_count(&self) -> usize {
        self.packs.iter().map(|p| p.blobs.len()).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            8 + 16 * self.supersedes.len() + self.packs.len() * 24 + self.blob_count() * ENTRY_LEN,
        );
        out.extend_from_slice(&(self.supersedes.len() as u32).to_le_bytes());
        for s in &self.supersedes {
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for p in &self.packs {
            out.extend_from_slice(p.id.as_bytes());
            out.extend_from_slice(&p.length.to_le_bytes());
            out.extend_from_slice(&(p.blobs.len() as u32).to_le_bytes());
            for b in &p.blobs {
                out.push(b.kind as u8);
                out.push(b.compression as u8);
                out.extend_from_slice(b.id.as_bytes());
                out.extend_from_slice(&b.offset.to_le_bytes());
                out.extend_from_slice(&b.length.to_le_bytes());
                out.extend_from_slice(&b.raw_length.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(object: &str, bytes: &[u8]) -> Result<IndexSegment> {
        let mut r = Reader { bytes, object };
        let mut seg = IndexSegment::default();
        let n = r.u32()? as usize;
        for _ in 0..n {
            seg.supersedes
                .push(ObjectId::from_slice(r.take(16)?).expect("16"));
        }
        let packs = r.u32()? as usize;
        for _ in 0..packs {
            let id = ObjectId::from_slice(r.take(16)?).expect("16");
            let length = r.u32()?;
            let count = r.u32()? as usize;
            if count.saturating_mul(ENTRY_LEN) > r.bytes.len() {
                return Err(Error::corrupt(object, "blob count exceeds segment length"));
            }
            let mut blobs = Vec::with_capacity(count);
            for _ in 0..count {
                let raw = r.take(ENTRY_LEN)?;
                let entry = BlobEntry {
                    kind: BlobKind::from_u8(raw[0])
                        .ok_or_else(|| Error::corrupt(object, "unknown blob kind"))?,
                    compression: Compression::from_u8(raw[1])
                        .ok_or_else(|| Error::corrupt(object, "unknown compression"))?,
                    id: BlobId::from_slice(&raw[2..34]).expect("32"),
                    offset: u32::from_le_bytes(raw[34..38].try_into().expect("4")),
                    length: u32::from_le_bytes(raw[38..42].try_into().expect("4")),
                    raw_length: u32::from_le_bytes(raw[42..46].try_into().expect("4")),
                };
                if u64::from(entry.offset) + u64::from(entry.length) > u64::from(length) {
                    return Err(Error::corrupt(
                        object,
                        format!("blob {} lies outside pack {id}", entry.id),
                    ));
                }
                blobs.push(entry);
            }
            seg.packs.push(IndexedPack { id, length, blobs });
        }
        if !r.bytes.is_empty() {
            return Err(Error::corrupt(object, "trailing bytes after the last pack"));
        }
        Ok(seg)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    object: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(Error::corrupt(self.object, "index segment is truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
}

/// Blob ids are keyed hashes, uniformly distributed and not chosen by an attacker who lacks
/// the key: their first eight bytes are as good a hash as any.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// A pack known to the in-memory index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackInfo {
    pub id: ObjectId,
    pub epoch: Epoch,
    pub key_id: ObjectId,
    pub length: u32,
}

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pack: u32,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    pub kind: BlobKind,
    pub compression: Compression,
}

impl Location {
    pub fn entry(&self, id: BlobId) -> BlobEntry {
        BlobEntry {
            id,
            kind: self.kind,
            compression: self.compression,
            offset: self.offset,
            length: self.length,
            raw_length: self.raw_length,
        }
    }
}

/// The in-memory index of a repository, or of one epoch of it.
#[derive(Default)]
pub struct Index {
    packs: Vec<PackInfo>,
    pack_numbers: IdMap<ObjectId, u32>,
    blobs: IdMap<BlobId, Location>,
}

impl Index {
    /// Adds every blob of `segment` (whose packs belong to `epoch`, under key `key_id`).
    pub fn add_segment(&mut self, epoch: Epoch, key_id: ObjectId, segment: &IndexSegment) {
        for p in &segment.packs {
            self.add_pack(epoch, key_id, p.id, p.length, &p.blobs);
        }
    }

    /// Adds one pack's blobs; a blob already indexed keeps its first location.
    pub fn add_pack(
        &mut self,
        epoch: Epoch,
        key_id: ObjectId,
        id: ObjectId,
        length: u32,
        blobs: &[BlobEntry],
    ) {
        let number = *self.pack_numbers.entry(id).or_insert_with(|| {
            self.packs.push(PackInfo {
                id,
                epoch,
                key_id,
                length,
            });
            (self.packs.len() - 1) as u32
        });
        for b in blobs {
            self.blobs.entry(b.id).or_insert(Location {
                pack: number,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
                kind: b.kind,
                compression: b.compression,
            });
        }
    }

    /// Forgets every blob located in one of `packs` (packs a prune condemned: a writer must not
    /// deduplicate against them). A blob with another copy elsewhere is stored again; harmless.
    pub fn exclude_packs(&mut self, packs: &IdSet<ObjectId>) {
        if packs.is_empty() {
            return;
        }
        let excluded: Vec<bool> = self.packs.iter().map(|p| packs.contains(&p.id)).collect();
        self.blobs.retain(|_, loc| !excluded[loc.pack as usize]);
    }

    /// The number of the pack holding `id`, an index into [`Index::packs`].
    pub fn pack_number(&self, id: &BlobId) -> Option<u32> {
        self.blobs.get(id).map(|loc| loc.pack)
    }

    pub fn get(&self, id: &BlobId) -> Option<(&PackInfo, Location)> {
        let loc = *self.blobs.get(id)?;
        Some((&self.packs[loc.pack as usize], loc))
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains_key(id)
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    pub fn pack(&self, id: &ObjectId) -> Option<&PackInfo> {
        self.pack_numbers.get(id).map(|&n| &self.packs[n as usize])
    }

    /// Every blob with its location, grouped by nothing in particular.
    pub fn blobs(&self) -> impl Iterator<Item = (&BlobId, &PackInfo, &Location)> {
        self.blobs
            .iter()
            .map(|(id, loc)| (id, &self.packs[loc.pack as usize], loc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, offset: u32) -> BlobEntry {
        BlobEntry {
            id: BlobId([n; 32]),
            kind: if n % 2 == 0 {
                BlobKind::Data
            } else {
                BlobKind::Tree
            },
            compression: Compression::Zstd,
            offset,
            length: 100,
            raw_length: 250,
        }
    }

    #[test]
    fn segment_round_trip_and_lookup() {
        let seg = IndexSegment {
            supersedes: vec![ObjectId::random()],
            packs: vec![
                IndexedPack {
                    id: ObjectId::random(),
                    length: 1000,
                    blobs: vec![entry(1, 24), entry(2, 124)],
                },
                IndexedPack {
                    id: ObjectId::random(),
                    length: 500,
                    blobs: vec![entry(3, 24)],
                },
            ],
        };
        let bytes = seg.encode();
        assert_eq!(IndexSegment::decode("i", &bytes).unwrap(), seg);
        for cut in 0..bytes.len() {
            assert!(IndexSegment::decode("i", &bytes[..cut]).is_err());
        }
        let mut index = Index::default();
        let epoch = Epoch::parse("2026-11").unwrap();
        index.add_segment(epoch, ObjectId::default(), &seg);
        let (pack, loc) = index.get(&BlobId([2; 32])).unwrap();
        assert_eq!(pack.id, seg.packs[0].id);
        assert_eq!(loc.entry(BlobId([2; 32])), entry(2, 124));
        assert_eq!(index.blob_count(), 3);
        assert!(!index.contains(&BlobId([9; 32])));
    }

    #[test]
    fn blob_outside_its_pack_is_corrupt() {
        let seg = IndexSegment {
            supersedes: vec![],
            packs: vec![IndexedPack {
                id: ObjectId::random(),
                length: 50,
                blobs: vec![entry(1, 24)],
            }],
        };
        assert!(IndexSegment::decode("i", &seg.encode()).is_err());
    }
}
