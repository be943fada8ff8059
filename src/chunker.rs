//! Content-defined chunking (FastCDC 2020) of a byte stream into owned, zero-copy chunks.
//!
//! The gear table is XORed with a secret per-repository seed (kept in the encrypted config),
//! so chunk boundaries, and therefore stored chunk sizes, do not fingerprint known files.
//! Chunks are handed out as [`Bytes`] slices of a shared read buffer: no copy per chunk.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use fastcdc::v2020::{Normalization, cut_gear, get_gear_with_seed, select_masks};
use serde::{Deserialize, Serialize};

use crate::buffer::BufferPool;
use crate::error::{Error, Result};

/// Chunk size limits, stored in the repository config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
    /// Secret: XORed into the gear table.
    pub seed: u64,
}

impl ChunkerParams {
    /// The sizes restic, rustic and borg settled on for files: 512 KiB / 1 MiB / 8 MiB.
    pub fn files(seed: u64) -> ChunkerParams {
        ChunkerParams {
            min_size: 512 << 10,
            avg_size: 1 << 20,
            max_size: 8 << 20,
            seed,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = self.min_size >= 64
            && self.min_size <= 1 << 20
            && self.avg_size >= 256
            && self.avg_size <= 4 << 20
            && self.max_size >= 1024
            && self.max_size <= 16 << 20
            && self.min_size < self.avg_size
            && self.avg_size < self.max_size
            && self.min_size % 2 == 0
            && self.avg_size % 2 == 0
            && self.max_size % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "invalid chunk sizes min {} / avg {} / max {}: need even sizes with \
                 64 <= min < avg < max, avg <= 4 MiB, max <= 16 MiB",
                self.min_size, self.avg_size, self.max_size
            )))
        }
    }
}

/// The size of a read buffer: what is left of the previous buffer (the start of a chunk not
/// cut yet) plus what is read after it. A chunk whose end is not in the buffered data is
/// scanned again after the next read, so larger buffers mean fewer rescans; each buffer stays
/// alive while any chunk cut from it is queued, so smaller buffers mean less memory.
const READ_BLOCK: usize = 4 << 20;

/// At least this much is read after what is left, when that is most of a buffer already: a
/// buffer grows past [`READ_BLOCK`] only for a chunk that is longer than that, by this much.
/// (Reading a whole `READ_BLOCK` after any leftover let the pooled buffers grow towards
/// `max + READ_BLOCK` each.)
const MIN_READ: usize = 1 << 20;

/// Splits a reader into content-defined chunks.
pub struct Chunker<R> {
    reader: R,
    /// Read buffers, shared by every chunker of a backup and recycled once the last chunk cut
    /// from a buffer is dropped: a long backup touches the same few megabytes over and over
    /// instead of faulting in fresh memory for every read.
    pool: Arc<BufferPool>,
    /// The filled part of the current buffer, shared with the chunks cut from it.
    current: Bytes,
    /// Where the data not yet chunked starts in `current`.
    pos: usize,
    eof: bool,
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: Vec<u64>,
    gear_ls: Vec<u64>,
}

/// Hands a read buffer back to its pool when the last chunk referring to it is dropped.
///
/// The buffer keeps its length (its bytes stay initialized) so the next read into it does not
/// zero it first: zeroing every read buffer cost 4 % of a backup's CPU time.
struct Pooled {
    buf: Vec<u8>,
    /// How much of `buf` holds data.
    filled: usize,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.filled]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_initialized(std::mem::take(&mut self.buf));
    }
}

/// A pool for [`Chunker::with_pool`]: room for the buffers a backup pipeline keeps alive.
pub fn buffer_pool(params: &ChunkerParams) -> Arc<BufferPool> {
    Arc::new(BufferPool::new(
        4,
        READ_BLOCK.max(params.max_size as usize + MIN_READ),
    ))
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, params: &ChunkerParams) -> Chunker<R> {
        Chunker::with_pool(reader, params, buffer_pool(params))
    }

    /// A chunker that takes its read buffers from `pool`.
    pub fn with_pool(reader: R, params: &ChunkerParams, pool: Arc<BufferPool>) -> Chunker<R> {
        let (mask_s, mask_l) = select_masks(params.avg_size as usize, Normalization::Level1);
        let (gear, gear_ls) = get_gear_with_seed(params.seed);
        Chunker {
            reader,
            pool,
            current: Bytes::new(),
            pos: 0,
            eof: false,
            min: params.min_size as usize,
            avg: params.avg_size as usize,
            max: params.max_size as usize,
            mask_s,
            mask_l,
            gear: gear.into_owned(),
            gear_ls: gear_ls.into_owned(),
        }
    }

    /// Moves the data not yet chunked into a fresh buffer and fills it up to `READ_BLOCK`
    /// (or `MIN_READ` past the leftover); sets `eof` at the end of the source.
    fn read_more(&mut self) -> io::Result<()> {
        let tail = &self.current[self.pos..];
        let end = READ_BLOCK.max(tail.len() + MIN_READ);
        let mut buf = self.pool.take_initialized(end);
        buf[..tail.len()].copy_from_slice(tail);
        let mut filled = tail.len();
        // Fill all the room (pipes deliver 64 KiB at a time): each read-more means a rescan.
        while filled < end {
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.pool.give_initialized(buf);
                    return Err(e);
                }
            }
        }
        self.current = Bytes::from_owner(Pooled {
            buf,
            filled,
            pool: self.pool.clone(),
        });
        self.pos = 0;
        Ok(())
    }

    /// The next chunk, or `None` at the end of the stream.
    ///
    /// A cut point found inside the buffered data is final: FastCDC decides a boundary from the
    /// bytes before it only. So the chunker reads more only when the buffered data holds no
    /// boundary and is shorter than the maximum chunk, instead of always keeping `max` bytes of
    /// lookahead (which copied most of every buffer into the next).
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let available = self.current.len() - self.pos;
            if available > 0 {
                let (_, len) = cut_gear(
                    &self.current[self.pos..],
                    self.min,
                    self.avg,
                    self.max,
                    self.mask_s,
                    self.mask_l,
                    self.mask_s << 1,
                    self.mask_l << 1,
                    &self.gear,
                    &self.gear_ls,
                );
                if len < available || available >= self.max || self.eof {
                    let chunk = self.current.slice(self.pos..self.pos + len);
                    self.pos += len;
                    return Ok(Some(chunk));
                }
            } else if self.eof {
                return Ok(None);
            }
            self.read_more()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn small(seed: u64) -> ChunkerParams {
        ChunkerParams {
            min_size: 2048,
            avg_size: 8192,
            max_size: 32768,
            seed,
        }
    }

    fn chunks(data: &[u8], params: &ChunkerParams) -> Vec<Bytes> {
        let mut c = Chunker::new(data, params);
        let mut out = Vec::new();
        while let Some(chunk) = c.next_chunk().unwrap() {
            out.push(chunk);
        }
        out
    }

    /// A reader that returns at most 7 bytes per call, to exercise partial reads.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(7).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn chunks_cover_the_stream_within_limits() {
        let data = pseudo_random(1 << 20, 3);
        let p = small(0);
        let cs = chunks(&data, &p);
        assert_eq!(cs.concat(), data);
        for c in &cs[..cs.len() - 1] {
            assert!(c.len() >= 2048 && c.len() <= 32768, "{}", c.len());
        }
        let avg = data.len() / cs.len();
        assert!((4096..16384).contains(&avg), "average {avg}");
    }

    #[test]
    fn boundaries_do_not_depend_on_read_sizes() {
        let data = pseudo_random(300_000, 5);
        let p = small(77);
        let mut c = Chunker::new(Trickle(&data), &p);
        let mut trickled = Vec::new();
        while let Some(chunk) = c.next_chunk().unwrap() {
            trickled.push(chunk);
        }
        assert_eq!(trickled, chunks(&data, &p));
    }

    /// Recycled read buffers keep the bytes of their last use: none of them may show up in a
    /// later stream's chunks, whatever its length (shorter streams end inside stale data).
    #[test]
    fn recycled_buffers_never_leak_old_bytes() {
        let p = small(9);
        let pool = buffer_pool(&p);
        let first = vec![0xAAu8; READ_BLOCK + 12_345];
        let mut c = Chunker::with_pool(&first[..], &p, pool.clone());
        while let Some(chunk) = c.next_chunk().unwrap() {
            assert!(chunk.iter().all(|&b| b == 0xAA));
        }
        drop(c);
        for len in [0, 1, 5000, 70_001, READ_BLOCK - 3] {
            let data = pseudo_random(len, len as u64 + 1);
            let mut c = Chunker::with_pool(Trickle(&data), &p, pool.clone());
            let mut got = Vec::new();
            while let Some(chunk) = c.next_chunk().unwrap() {
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, data, "stream of {len} bytes");
        }
    }

    /// Boundaries are exactly FastCDC's over the whole stream at once, however the reads fall,
    /// including maximal chunks (a run of zeros) and odd-sized reads.
    #[test]
    fn boundaries_match_fastcdc_over_the_whole_stream() {
        let mut data = pseudo_random(200_000, 8);
        data.extend_from_slice(&[0u8; 100_000]);
        data.extend_from_slice(&pseudo_random(150_001, 9));
        let p = small(5);
        let c = Chunker::new(&data[..], &p);
        let mut reference = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let (_, len) = cut_gear(
                &data[at..],
                p.min_size as usize,
                p.avg_size as usize,
                p.max_size as usize,
                c.mask_s,
                c.mask_l,
                c.mask_s << 1,
                c.mask_l << 1,
                &c.gear,
                &c.gear_ls,
            );
            reference.push(len);
            at += len;
        }
        for reader in [0, 1] {
            let lens: Vec<usize> = if reader == 0 {
                chunks(&data, &p).iter().map(|c| c.len()).collect()
            } else {
                let mut c = Chunker::new(Trickle(&data), &p);
                std::iter::from_fn(|| c.next_chunk().unwrap())
                    .map(|c| c.len())
                    .collect()
            };
            assert_eq!(lens, reference, "reader {reader}");
        }
        assert!(
            reference.contains(&(p.max_size as usize)),
            "no maximal chunk"
        );
    }

    #[test]
    fn an_insertion_only_changes_nearby_chunks() {
        let data = pseudo_random(1 << 20, 9);
        let mut edited = data.clone();
        edited.splice(500_000..500_000, b"inserted".iter().copied());
        let p = small(1);
        let a = chunks(&data, &p);
        let b = chunks(&edited, &p);
        let shared = a.iter().filter(|c| b.contains(c)).count();
        assert!(
            shared + 3 >= a.len(),
            "{shared} of {} chunks shared",
            a.len()
        );
    }

    #[test]
    fn the_seed_changes_boundaries() {
        let data = pseudo_random(1 << 20, 11);
        let a = chunks(&data, &small(1));
        let b = chunks(&data, &small(2));
        assert_ne!(
            a.iter().map(Bytes::len).collect::<Vec<_>>(),
            b.iter().map(Bytes::len).collect::<Vec<_>>()
        );
    }

    #[test]
    fn empty_stream_and_validation() {
        assert!(chunks(b"", &small(0)).is_empty());
        assert!(ChunkerParams::files(0).validate().is_ok());
        let mut bad = small(0);
        bad.max_size = 1000;
        assert!(bad.validate().is_err());
    }
}
