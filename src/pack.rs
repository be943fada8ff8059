//! Packs: many encrypted blobs in one object, with an encrypted table of contents at the end.
//!
//! Layout (docs/FORMAT.md): a 24-byte object header, the blobs back to back, the sealed table
//! of contents, and its length as a little-endian u32. Each pack has its own AES-256-GCM key,
//! derived from the epoch key and the pack's name; a blob's nonce is its offset in the pack, so
//! nonces are unique under that key by construction. A blob's associated data binds its id,
//! kind, compression and plaintext length: a blob cannot be moved, swapped or relabelled.

use bytes::Bytes;

use crate::crypto::{ChunkHasher, Cipher, Key, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::object::{Epoch, HEADER_LEN, Header, Kind, name};

/// What a blob holds; data and metadata blobs live in separate packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// File or stream content.
    Data = 0,
    /// Metadata: directory trees and content lists.
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

/// How a blob's plaintext is encoded before encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

impl Compression {
    pub fn from_u8(v: u8) -> Option<Compression> {
        match v {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// One blob's entry in a pack's table of contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobEntry {
    pub id: BlobId,
    pub kind: BlobKind,
    pub compression: Compression,
    /// Offset of the ciphertext from the start of the pack.
    pub offset: u32,
    /// Stored length: ciphertext plus tag.
    pub length: u32,
    /// Plaintext length after decompression.
    pub raw_length: u32,
}

const ENTRY_LEN: usize = 1 + 1 + 32 + 4 + 4;
const TOC_NONCE: [u8; NONCE_LEN] = [0xff; NONCE_LEN];
/// Packs larger than this are refused on read: offsets are 32-bit.
pub const MAX_PACK_LEN: usize = u32::MAX as usize;

/// The key of pack `name`.
pub fn pack_key(epoch_key: &Key, repo_id: &ObjectId, name: &str) -> Key {
    epoch_key.derive(repo_id.as_bytes(), &[b"kluis pack v1 ", name.as_bytes()])
}

fn blob_nonce(offset: u32) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&u64::from(offset).to_be_bytes());
    n
}

fn blob_aad(e: &BlobEntry) -> [u8; 48] {
    let mut aad = [0u8; 48];
    aad[..8].copy_from_slice(b"kluisblb");
    aad[8] = e.kind as u8;
    aad[9] = e.compression as u8;
    aad[12..16].copy_from_slice(&e.raw_length.to_le_bytes());
    aad[16..].copy_from_slice(e.id.as_bytes());
    aad
}

fn toc_aad(header: &[u8], repo_id: &ObjectId, name: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(repo_id.as_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Builds one pack in memory.
pub struct PackWriter {
    id: ObjectId,
    name: String,
    repo_id: ObjectId,
    buf: Vec<u8>,
    cipher: Cipher,
    entries: Vec<BlobEntry>,
}

/// A complete pack, ready to verify and upload.
pub struct FinishedPack {
    pub id: ObjectId,
    pub epoch: Epoch,
    pub name: String,
    pub bytes: Bytes,
    pub entries: Vec<BlobEntry>,
}

impl PackWriter {
    pub fn new(
        epoch: Epoch,
        key_id: ObjectId,
        epoch_key: &Key,
        repo_id: ObjectId,
        capacity: usize,
    ) -> PackWriter {
        let buf = Vec::with_capacity(capacity + (capacity >> 4));
        PackWriter::with_buffer(epoch, key_id, epoch_key, repo_id, buf)
    }

    /// A pack written into `buf` (cleared first), e.g. one recycled from an uploaded pack.
    pub fn with_buffer(
        epoch: Epoch,
        key_id: ObjectId,
        epoch_key: &Key,
        repo_id: ObjectId,
        mut buf: Vec<u8>,
    ) -> PackWriter {
        let id = ObjectId::random();
        let name = name::pack(epoch, &id);
        buf.clear();
        buf.extend_from_slice(
            &Header {
                kind: Kind::Pack,
                key_id,
            }
            .encode(),
        );
        PackWriter {
            cipher: pack_key(epoch_key, &repo_id, &name).cipher(),
            id,
            name,
            repo_id,
            buf,
            entries: Vec::new(),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Encrypts `payload` (already compressed as `compression` says) into the pack.
    pub fn add(
        &mut self,
        id: BlobId,
        kind: BlobKind,
        compression: Compression,
        raw_length: u32,
        payload: &[u8],
    ) {
        let offset = self.buf.len() as u32;
        let mut entry = BlobEntry {
            id,
            kind,
            compression,
            offset,
            length: (payload.len() + TAG_LEN) as u32,
            raw_length,
        };
        self.buf.extend_from_slice(payload);
        self.cipher.seal_in_place(
            blob_nonce(offset),
            &blob_aad(&entry),
            &mut self.buf,
            offset as usize,
        );
        entry.length = self.buf.len() as u32 - offset;
        self.entries.push(entry);
    }

    /// Seals the table of contents and returns the finished pack.
    pub fn finish(mut self, epoch: Epoch) -> FinishedPack {
        let mut toc = Vec::with_capacity(4 + self.entries.len() * ENTRY_LEN);
        toc.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            toc.push(e.kind as u8);
            toc.push(e.compression as u8);
            toc.extend_from_slice(e.id.as_bytes());
            toc.extend_from_slice(&e.length.to_le_bytes());
            toc.extend_from_slice(&e.raw_length.to_le_bytes());
        }
        let sealed = self.cipher.seal(
            TOC_NONCE,
            &toc_aad(&self.buf[..HEADER_LEN], &self.repo_id, &self.name),
            &toc,
        );
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        FinishedPack {
            id: self.id,
            epoch,
            name: self.name,
            bytes: Bytes::from(self.buf),
            entries: self.entries,
        }
    }
}

/// Reads a pack's table of contents from the whole pack.
pub fn read_toc(
    pack_name: &str,
    bytes: &[u8],
    key: &Key,
    repo_id: &ObjectId,
) -> Result<Vec<BlobEntry>> {
    let corrupt = |d: &str| Error::corrupt(pack_name, d.to_string());
    Header::decode(pack_name, bytes, Kind::Pack)?;
    if bytes.len() > MAX_PACK_LEN {
        return Err(corrupt("pack larger than 4 GiB"));
    }
    if bytes.len() < HEADER_LEN + 4 + TAG_LEN {
        return Err(corrupt("truncated pack"));
    }
    let toc_len =
        u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes")) as usize;
    let end = bytes.len() - 4;
    if toc_len < 4 + TAG_LEN || toc_len > end - HEADER_LEN {
        return Err(corrupt("table of contents length out of range"));
    }
    let toc_start = end - toc_len;
    let toc = key
        .cipher()
        .open(
            TOC_NONCE,
            &toc_aad(&bytes[..HEADER_LEN], repo_id, pack_name),
            &bytes[toc_start..end],
        )
        .map_err(|_| corrupt("table of contents fails authentication"))?;
    let count = u32::from_le_bytes(toc[..4].try_into().expect("4 bytes")) as usize;
    if toc.len() != 4 + count * ENTRY_LEN {
        return Err(corrupt("table of contents has the wrong length"));
    }
    let mut offset = HEADER_LEN;
    let mut entries = Vec::with_capacity(count);
    for raw in toc[4..].chunks_exact(ENTRY_LEN) {
        let kind = BlobKind::from_u8(raw[0]).ok_or_else(|| corrupt("unknown blob kind"))?;
        let compression =
            Compression::from_u8(raw[1]).ok_or_else(|| corrupt("unknown compression"))?;
        let length = u32::from_le_bytes(raw[34..38].try_into().expect("4 bytes"));
        let raw_length = u32::from_le_bytes(raw[38..42].try_into().expect("4 bytes"));
        if (length as usize) < TAG_LEN || offset + length as usize > toc_start {
            return Err(corrupt("blob extends past the blobs area"));
        }
        entries.push(BlobEntry {
            id: BlobId::from_slice(&raw[2..34]).expect("32 bytes"),
            kind,
            compression,
            offset: offset as u32,
            length,
            raw_length,
        });
        offset += length as usize;
    }
    if offset != toc_start {
        return Err(corrupt("blobs do not fill the pack"));
    }
    Ok(entries)
}

/// Decrypts and decompresses one blob from its stored bytes.
pub fn open_blob(
    pack_name: &str,
    cipher: &Cipher,
    entry: &BlobEntry,
    stored: &mut [u8],
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; entry.raw_length as usize];
    open_blob_into(pack_name, cipher, entry, stored, decompressor, &mut out)?;
    Ok(out)
}

/// Like [`open_blob`], into `out`, which must be exactly `entry.raw_length` bytes long: lets
/// callers decode into buffers they reuse.
pub fn open_blob_into(
    pack_name: &str,
    cipher: &Cipher,
    entry: &BlobEntry,
    stored: &mut [u8],
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    out: &mut [u8],
) -> Result<()> {
    let corrupt = |d: &str| Error::corrupt(pack_name, format!("blob {}: {d}", entry.id));
    if stored.len() != entry.length as usize {
        return Err(corrupt("stored length differs from the index"));
    }
    if out.len() != entry.raw_length as usize {
        return Err(corrupt("output buffer does not fit the plaintext length"));
    }
    let plain = cipher
        .open_in_place(blob_nonce(entry.offset), &blob_aad(entry), stored)
        .map_err(|_| corrupt("authentication failed"))?;
    match entry.compression {
        Compression::None => {
            if plain.len() != out.len() {
                return Err(corrupt("plaintext length differs from the index"));
            }
            out.copy_from_slice(plain);
        }
        Compression::Zstd => {
            let n = decompressor
                .decompress_to_buffer(&*plain, out)
                .map_err(|e| corrupt(&format!("decompression failed: {e}")))?;
            if n != out.len() {
                return Err(corrupt("decompressed length differs from the index"));
            }
        }
    }
    Ok(())
}

/// The pre-upload check of a pack whose compressed blobs were each checked, right after
/// compression, to decompress to the plaintext their id was hashed from (the backup does that
/// while the plaintext is still in cache, which is cheaper than hashing it again here): the
/// table of contents reads back and matches what was written, every blob authenticates under
/// its nonce and associated data, and every blob stored uncompressed hashes to its id.
pub fn verify_sealed(
    pack: &FinishedPack,
    key: &Key,
    repo_id: &ObjectId,
    hasher: &ChunkHasher,
) -> Result<()> {
    let entries = read_toc(&pack.name, &pack.bytes, key, repo_id)?;
    if entries != pack.entries {
        return Err(Error::corrupt(
            &pack.name,
            "table of contents differs from what was written",
        ));
    }
    let cipher = key.cipher();
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        for e in &entries {
            scratch.clear();
            scratch
                .extend_from_slice(&pack.bytes[e.offset as usize..(e.offset + e.length) as usize]);
            let corrupt = |d: &str| Error::corrupt(&pack.name, format!("blob {}: {d}", e.id));
            let plain = cipher
                .open_in_place(blob_nonce(e.offset), &blob_aad(e), scratch)
                .map_err(|_| corrupt("authentication failed"))?;
            if e.compression == Compression::None
                && (plain.len() != e.raw_length as usize || BlobId(hasher.hash(plain)) != e.id)
            {
                return Err(corrupt("does not hash to its id"));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(blobs: &[&[u8]]) -> (FinishedPack, Key, ObjectId, ChunkHasher) {
        let epoch_key = Key::random();
        let repo = ObjectId::random();
        let epoch = Epoch::parse("2026-11").unwrap();
        let hasher = ChunkHasher::new(&Key::random());
        let mut w = PackWriter::new(epoch, ObjectId::random(), &epoch_key, repo, 1 << 20);
        for (i, b) in blobs.iter().enumerate() {
            let id = BlobId(hasher.hash(b));
            if i % 2 == 0 {
                let c = zstd::bulk::compress(b, 1).unwrap();
                w.add(id, BlobKind::Data, Compression::Zstd, b.len() as u32, &c);
            } else {
                w.add(id, BlobKind::Tree, Compression::None, b.len() as u32, b);
            }
        }
        let pack = w.finish(epoch);
        let key = pack_key(&epoch_key, &repo, &pack.name);
        (pack, key, repo, hasher)
    }

    #[test]
    fn round_trip_and_verify() {
        let blobs: [&[u8]; 3] = [b"first blob first blob first blob", b"second", b""];
        let (pack, key, repo, hasher) = build(&blobs);
        verify_sealed(&pack, &key, &repo, &hasher).unwrap();
        let toc = read_toc(&pack.name, &pack.bytes, &key, &repo).unwrap();
        let mut dec = zstd::bulk::Decompressor::new().unwrap();
        for (e, want) in toc.iter().zip(blobs) {
            let mut stored = pack.bytes[e.offset as usize..(e.offset + e.length) as usize].to_vec();
            assert_eq!(
                open_blob(&pack.name, &key.cipher(), e, &mut stored, &mut dec).unwrap(),
                want
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (pack, key, repo, hasher) = build(&[b"aaaaaaaaaaaaaaaaaaaaaaaaa", b"bbbb"]);
        for i in 0..pack.bytes.len() {
            let mut bytes = pack.bytes.to_vec();
            bytes[i] ^= 0x01;
            let tampered = FinishedPack {
                bytes: bytes.into(),
                entries: pack.entries.clone(),
                name: pack.name.clone(),
                id: pack.id,
                epoch: pack.epoch,
            };
            let err = verify_sealed(&tampered, &key, &repo, &hasher).unwrap_err();
            assert!(err.to_string().contains(&pack.name), "byte {i}: {err}");
        }
    }
}
