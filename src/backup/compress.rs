//! One worker's compression, sealing and the check before upload: every blob must decrypt
//! and decompress to exactly its input before it enters a pack (restic #4523).

use crate::error::{Error, Result};
use crate::pack::{self, Compression};

use super::pipeline::LARGE_CHUNK;
use super::*;

/// A worker's zstd contexts and buffers, reused from blob to blob. The buffers are reserved
/// for the largest chunk up front (address space only: pages are touched as data fills them)
/// so they never move: growing them blob by blob left freed copies in glibc's arenas. There are
/// as few as the work allows: `out` holds the compressed payload, then the copy of the sealed
/// blob that verification decrypts in place.
pub(super) struct Compressors {
    small: zstd::bulk::Compressor<'static>,
    large: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
    out: Vec<u8>,
    sealed: Vec<u8>,
    check: Vec<u8>,
}

pub(super) fn zstd_error(e: std::io::Error) -> Error {
    Error::io("zstd", e)
}

impl Compressors {
    pub(super) fn new(level: i32, max_chunk: usize) -> Result<Compressors> {
        let small = zstd::bulk::Compressor::new(level).map_err(zstd_error)?;
        // At level 1, a hash table of 2^12 entries instead of 2^13 compresses large chunks 8 %
        // faster for 1.6 % more bytes (the 368 MB dump of docs/BENCHMARKS.md in 1 MiB blocks).
        // Small chunks (database sources cut 16 KiB ones) keep zstd's own choice: for them the
        // explicit parameter was slower.
        let mut large = zstd::bulk::Compressor::new(level).map_err(zstd_error)?;
        if level == 1 {
            large
                .set_parameter(zstd::zstd_safe::CParameter::HashLog(12))
                .map_err(zstd_error)?;
        }
        Ok(Compressors {
            small,
            large,
            decompressor: zstd::bulk::Decompressor::new().map_err(zstd_error)?,
            out: Vec::with_capacity(
                zstd::zstd_safe::compress_bound(max_chunk) + pack::BLOB_OVERHEAD,
            ),
            sealed: Vec::with_capacity(
                zstd::zstd_safe::compress_bound(max_chunk) + pack::BLOB_OVERHEAD,
            ),
            check: Vec::with_capacity(max_chunk),
        })
    }

    /// Compresses and seals one blob, verifies it, and adds it to its pack.
    ///
    /// Every blob is verified before it goes into a pack (the guard restic added after a
    /// compression library bug corrupted data, restic #4523): its sealed bytes are decrypted
    /// and decompressed again and must equal, byte for byte, the plaintext its id was hashed
    /// from. That is the same proof as hashing it again, at a fraction of the cost, while the
    /// data is in cache.
    pub(super) fn store(&mut self, ctx: &Shared, job: Job) -> Result<()> {
        let data = &job.data[..];
        self.out.clear();
        self.out
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        let compressor = if data.len() >= LARGE_CHUNK {
            &mut self.large
        } else {
            &mut self.small
        };
        let compressed = compressor
            .compress_to_buffer(data, &mut self.out)
            .map_err(zstd_error)?;
        let (compression, payload) = if compressed < data.len() {
            (Compression::Zstd, &self.out[..compressed])
        } else {
            (Compression::None, data)
        };
        let raw = data.len() as u32;
        let keys = ctx.blob_keys();
        pack::seal_blob(
            keys.epoch_key,
            keys.repo_id,
            job.id,
            job.kind,
            compression,
            raw,
            payload,
            &mut self.sealed,
        );
        let entry = pack::BlobEntry {
            id: job.id,
            kind: job.kind,
            compression,
            offset: 0,
            length: self.sealed.len() as u32,
            raw_length: raw,
        };
        verify_sealed(
            keys,
            &entry,
            &self.sealed,
            data,
            &mut self.out,
            &mut self.check,
            &mut self.decompressor,
        )?;
        ctx.add(
            job.id,
            job.kind,
            compression,
            data.len(),
            &self.sealed,
            &mut self.out,
        )
    }
}

/// The check before upload: `sealed`, which `entry` describes, must decrypt and decompress to
/// exactly `data`. `scratch` and `check` are buffers kept from blob to blob.
pub(super) fn verify_sealed(
    keys: pack::BlobKeys,
    entry: &pack::BlobEntry,
    sealed: &[u8],
    data: &[u8],
    scratch: &mut Vec<u8>,
    check: &mut Vec<u8>,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> Result<()> {
    scratch.clear();
    scratch.extend_from_slice(sealed);
    let object = format!("blob {}", entry.id);
    let failed = |why: String| {
        Error::corrupt(
            &object,
            format!("failed verification before upload, nothing was written: {why}"),
        )
    };
    let plain = pack::open_sealed(&object, keys, entry, scratch)
        .map_err(|_| failed("it does not decrypt (authentication failed)".into()))?;
    let same = match entry.compression {
        // Compared where it was decrypted: no copy of an incompressible chunk.
        Compression::None => *plain == *data,
        Compression::Zstd => {
            // Grown, never shrunk: zeroing it for every blob cost more than the comparison.
            if check.len() < data.len() {
                check.resize(data.len(), 0);
            }
            let check = &mut check[..data.len()];
            let n = decompressor
                .decompress_to_buffer(&*plain, check)
                .map_err(|e| failed(format!("decompression failed: {e}")))?;
            n == data.len() && *check == *data
        }
    };
    if !same {
        return Err(failed(
            "it does not decrypt and decompress to its input".into(),
        ));
    }
    Ok(())
}
