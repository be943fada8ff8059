//! Packs: many encrypted blobs in one object, with an encrypted table of contents at the end.
//!
//! Layout (docs/FORMAT.md): a 24-byte object header, the blobs back to back, the sealed table
//! of contents, and its length as a little-endian u32. Each blob is sealed on its own with
//! AES-256-GCM under a key derived from the epoch key and the blob's id, with a random 96-bit
//! nonce stored in front of it: a worker seals a blob, and verifies it, before it knows which
//! pack it lands in, and a key sees a handful of messages, far from GCM's nonce limits. A blob's
//! associated data binds its id, kind, compression and plaintext length: a blob cannot be
//! swapped or relabelled. The table of contents is sealed under the pack's own key, derived
//! from the epoch key and the pack's name, and binds the header and every blob's place.

use bytes::Bytes;

use crate::crypto::{Cipher, Key, NONCE_LEN, TAG_LEN};
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
    /// Offset of the stored blob (its nonce comes first) from the start of the pack.
    pub offset: u32,
    /// Stored length: nonce, ciphertext and tag.
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

/// The key a blob is sealed with.
fn blob_cipher(epoch_key: &Key, repo_id: &ObjectId, id: &BlobId) -> Cipher {
    epoch_key
        .derive(repo_id.as_bytes(), &[b"kluis blob v1 ", id.as_bytes()])
        .cipher()
}

/// Smallest stored blob: nonce and tag around an empty ciphertext.
pub const BLOB_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Seals a blob's payload (compressed as `compression` says) into `out`: a random nonce, the
/// ciphertext and the tag. The stored form [`PackWriter::add_sealed`] takes.
#[allow(clippy::too_many_arguments)]
pub fn seal_blob(
    epoch_key: &Key,
    repo_id: &ObjectId,
    id: BlobId,
    kind: BlobKind,
    compression: Compression,
    raw_length: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let nonce = crate::crypto::random_array::<NONCE_LEN>();
    let entry = BlobEntry {
        id,
        kind,
        compression,
        offset: 0,
        length: 0,
        raw_length,
    };
    out.clear();
    out.reserve(payload.len() + BLOB_OVERHEAD);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(payload);
    blob_cipher(epoch_key, repo_id, &id).seal_in_place(nonce, &blob_aad(&entry), out, NONCE_LEN);
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
    /// Seals the table of contents.
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

    /// Appends a blob sealed by [`seal_blob`].
    pub fn add_sealed(
        &mut self,
        id: BlobId,
        kind: BlobKind,
        compression: Compression,
        raw_length: u32,
        sealed: &[u8],
    ) {
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(sealed);
        self.entries.push(BlobEntry {
            id,
            kind,
            compression,
            offset,
            length: sealed.len() as u32,
            raw_length,
        });
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
    read_toc_parts(pack_name, bytes, bytes, bytes.len() as u64, key, repo_id)
}

/// Checks that the pack header at the start of `head` names the epoch key `key_id`, the one
/// the index segment listing the pack names (readers take the key from the segment).
pub fn check_key_id(pack_name: &str, head: &[u8], key_id: &ObjectId) -> Result<()> {
    let header = Header::decode(pack_name, head, Kind::Pack)?;
    if header.key_id != *key_id {
        return Err(Error::corrupt(
            pack_name,
            format!(
                "its header names epoch key {}, its index segment {key_id}",
                header.key_id
            ),
        ));
    }
    Ok(())
}

/// How much of a pack's end a reader fetches to find its table of contents in one request:
/// enough for a 16 MiB pack of 16 KiB chunks (about 1,100 entries of 42 bytes).
pub const TOC_TAIL_GUESS: u64 = 64 << 10;

/// Reads a pack's table of contents from its parts, without its blobs: `head` begins at the
/// pack's start (at least its header), `tail` ends at the pack's end (the sealed TOC and its
/// length, at least), `len` is the pack's length. The header is checked and authenticated (it
/// is in the TOC's associated data); the blobs must fill the pack up to the TOC exactly.
pub fn read_toc_parts(
    pack_name: &str,
    head: &[u8],
    tail: &[u8],
    len: u64,
    key: &Key,
    repo_id: &ObjectId,
) -> Result<Vec<BlobEntry>> {
    let corrupt = |d: &str| Error::corrupt(pack_name, d.to_string());
    Header::decode(pack_name, head, Kind::Pack)?;
    if len > MAX_PACK_LEN as u64 {
        return Err(corrupt("pack larger than 4 GiB"));
    }
    let len = len as usize;
    if len < HEADER_LEN + 4 + TAG_LEN || tail.len() < 4 || tail.len() > len {
        return Err(corrupt("truncated pack"));
    }
    let toc_len = u32::from_le_bytes(tail[tail.len() - 4..].try_into().expect("4 bytes")) as usize;
    let end = len - 4;
    if toc_len < 4 + TAG_LEN || toc_len > end - HEADER_LEN {
        return Err(corrupt("table of contents length out of range"));
    }
    let toc_start = end - toc_len;
    // Where the tail begins in the pack; the TOC must be inside it.
    let tail_start = len - tail.len();
    if toc_start < tail_start {
        return Err(Error::invalid(format!(
            "{pack_name}: its table of contents ({toc_len} bytes) begins before the {} bytes read",
            tail.len()
        )));
    }
    let toc = key
        .cipher()
        .open(
            TOC_NONCE,
            &toc_aad(&head[..HEADER_LEN], repo_id, pack_name),
            &tail[toc_start - tail_start..tail.len() - 4],
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
        if (length as usize) < BLOB_OVERHEAD || offset + length as usize > toc_start {
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
    keys: BlobKeys,
    entry: &BlobEntry,
    stored: &mut [u8],
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; entry.raw_length as usize];
    open_blob_into(pack_name, keys, entry, stored, decompressor, &mut out)?;
    Ok(out)
}

/// What opening a blob needs: the epoch key it was sealed under and the repository id.
#[derive(Clone, Copy)]
pub struct BlobKeys<'a> {
    pub epoch_key: &'a Key,
    pub repo_id: &'a ObjectId,
}

/// Decrypts (authenticating) a stored blob in place; returns the payload.
pub(crate) fn open_sealed<'s>(
    pack_name: &str,
    keys: BlobKeys,
    entry: &BlobEntry,
    stored: &'s mut [u8],
) -> Result<&'s mut [u8]> {
    let corrupt = |d: &str| Error::corrupt(pack_name, format!("blob {}: {d}", entry.id));
    if stored.len() != entry.length as usize || stored.len() < BLOB_OVERHEAD {
        return Err(corrupt("stored length differs from the index"));
    }
    let (nonce, sealed) = stored.split_at_mut(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().expect("NONCE_LEN bytes");
    blob_cipher(keys.epoch_key, keys.repo_id, &entry.id)
        .open_in_place(nonce, &blob_aad(entry), sealed)
        .map_err(|_| corrupt("authentication failed"))
}

/// Like [`open_blob`], into `out`, which must be exactly `entry.raw_length` bytes long: lets
/// callers decode into buffers they reuse.
pub fn open_blob_into(
    pack_name: &str,
    keys: BlobKeys,
    entry: &BlobEntry,
    stored: &mut [u8],
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    out: &mut [u8],
) -> Result<()> {
    let corrupt = |d: &str| Error::corrupt(pack_name, format!("blob {}: {d}", entry.id));
    if out.len() != entry.raw_length as usize {
        return Err(corrupt("output buffer does not fit the plaintext length"));
    }
    let plain = open_sealed(pack_name, keys, entry, stored)?;
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

/// The pre-upload check of a finished pack whose blobs were each verified when sealed (the
/// backup decrypts and decompresses every sealed blob and compares it with the plaintext its id
/// was hashed from, before the blob goes into a pack): the table of contents reads back and
/// matches what was written, and every blob still authenticates where it now lies, which
/// catches any damage to the pack buffer in between.
pub fn verify_sealed(
    pack: &FinishedPack,
    pack_key: &Key,
    keys: BlobKeys,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let entries = read_toc(&pack.name, &pack.bytes, pack_key, keys.repo_id)?;
    if entries != pack.entries {
        return Err(Error::corrupt(
            &pack.name,
            "table of contents differs from what was written",
        ));
    }
    for e in &entries {
        scratch.clear();
        scratch.extend_from_slice(&pack.bytes[e.offset as usize..(e.offset + e.length) as usize]);
        open_sealed(&pack.name, keys, e, scratch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
