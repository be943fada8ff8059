//! Restore: a snapshot's stream to a writer, or its tree into a directory, verified end to end.
//!
//! Content is fetched with ranged reads that cover runs of adjacent blobs, several at once;
//! blobs are decrypted (which authenticates them) and decompressed on the blocking pool; one
//! writer thread puts them in order and computes the SHA-256 that must match the snapshot.
//! A file is written under a temporary name and renamed into place only once it verifies.
//! Restores into a directory walk it by handles (`restore/dir.rs`).

mod database;
pub use database::DatabaseTarget;
mod dir;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{StreamExt, TryStreamExt};

use crate::buffer::BufferPool;
use crate::crypto::Sha256;
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::id::ObjectId;
use crate::index::{Index, PackInfo};
use crate::object::name;
use crate::pack::{self, BlobEntry};
use crate::progress::{Cancel, Progress};
use crate::repository::EpochKey;
use crate::repository::Repository;
use crate::snapshot::{Snapshot, Source as SnapshotSource};
use crate::source::StderrPolicy;
use crate::source::mysql::{self, MyConn};
use crate::source::postgres::{PgConn, globals};
use crate::source::sqlite;
use crate::tree::{self, Node, NodeType, Tree};

/// Largest ranged read: a run of adjacent blobs up to this many stored bytes, and up to
/// [`RANGE_RAW_BYTES`] once decoded (a range holds at least one blob). With the default four
/// fetches, two decoders, and [`QUEUED_RANGES`] decoded ranges queued for the writer and as
/// many for the hasher, at most 4 x 2 MiB stored plus about 9 x max(4 MiB, the largest blob)
/// decoded bytes are in memory at once, however well the data compresses.
const RANGE_BYTES: u64 = 2 << 20;

/// Largest decoded size of a ranged read of several blobs: without it, 2 MiB of well
/// compressed blobs could decode to gigabytes.
const RANGE_RAW_BYTES: u64 = 4 << 20;

/// Decoded ranges queued before the writer and before the hasher. One each left the stages
/// waiting on one another. Three were no faster than two for the 368 MB dump, and restoring
/// 1 GiB of zeros (8 MiB blobs) peaked at 93 MB instead of 77 MB.
const QUEUED_RANGES: usize = 2;

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Ranged reads in flight (each decoded on the blocking pool as it arrives).
    pub fetches: usize,
    /// Replace existing files in the target directory.
    pub overwrite: bool,
    /// Restore setuid and setgid bits (off: they are dropped, and the report says so).
    pub keep_setid: bool,
    pub cancel: Cancel,
    pub progress: Arc<Progress>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            fetches: 4,
            overwrite: false,
            keep_setid: false,
            cancel: Cancel::new(),
            progress: Progress::new(),
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Metadata that could not be applied (ownership when not root, say).
    pub warnings: Vec<String>,
}

/// Restores a snapshot's content for reading: the index of its epoch and its root tree.
pub struct Restorer<'a> {
    repo: &'a Repository,
    snapshot: &'a Snapshot,
    index: Arc<Index>,
    /// Unreadable index segments: reported if the snapshot needs a blob they may list.
    index_errors: Vec<Error>,
    opts: RestoreOptions,
    report: RestoreReport,
    /// Decoded-range buffers, recycled by the writer.
    buffers: Arc<BufferPool>,
    /// Fetched (stored) range buffers, recycled once decoded.
    stored_buffers: Arc<BufferPool>,
    /// The packs this restore has read from, each checked once: see [`Restorer::verify_pack`].
    verified: std::sync::Mutex<HashMap<ObjectId, Arc<tokio::sync::OnceCell<()>>>>,
    /// Entries whose setuid or setgid bits were not restored.
    setid_dropped: u64,
}

impl<'a> Restorer<'a> {
    pub async fn new(
        repo: &'a Repository,
        snapshot: &'a Snapshot,
        opts: RestoreOptions,
    ) -> Result<Restorer<'a>> {
        repo.full("restore")?;
        let (index, index_errors) = repo.load_index_epoch(snapshot.epoch()).await?;
        opts.progress.total_bytes.store(
            snapshot.summary.logical_bytes,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(Restorer {
            repo,
            snapshot,
            index: Arc::new(index),
            index_errors,
            buffers: Arc::new(BufferPool::new(opts.fetches + 4 + 2 * QUEUED_RANGES, 0)),
            stored_buffers: Arc::new(BufferPool::new(opts.fetches + 4, 0)),
            opts,
            report: RestoreReport::default(),
            verified: Default::default(),
            setid_dropped: 0,
        })
    }

    /// Checks a pack the first time this restore reads from it: its header, and its table of
    /// contents, authenticated (the header is in its associated data) and agreeing with the
    /// index on where each blob is. Damage to any part of a pack a restore reads, not only to
    /// the blobs it needs, then fails the restore and names the pack. Costs two small ranged
    /// reads per pack (its first 24 bytes and its last 64 KiB), made beside the first blob
    /// read.
    async fn verify_pack(&self, pack: &PackInfo) -> Result<()> {
        let cell = {
            let mut map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(pack.id).or_default().clone()
        };
        cell.get_or_try_init(|| self.check_pack(pack)).await?;
        Ok(())
    }

    async fn check_pack(&self, pack: &PackInfo) -> Result<()> {
        let name = name::pack(pack.epoch, &pack.id);
        let len = u64::from(pack.length);
        let store = self.repo.store();
        let head_len = (crate::object::HEADER_LEN as u64).min(len);
        let guess = (pack::TOC_TAIL_GUESS + 4).min(len);
        let (head, tail) = tokio::try_join!(
            store.get_range(&name, 0..head_len),
            store.get_range(&name, len - guess..len),
        )?;
        let mut tail = tail;
        if let Some(last) = tail.last_chunk::<4>() {
            let need = u64::from(u32::from_le_bytes(*last)) + 4;
            if need > tail.len() as u64 && need <= len {
                tail = store.get_range(&name, len - need..len).await?;
            }
        }
        let key = self.repo.epoch_key(pack.epoch, pack.key_id).await?;
        let repo_id = self.repo.id();
        let index = self.index.clone();
        let pack = pack.clone();
        tokio::task::spawn_blocking(move || {
            pack::check_key_id(&name, &head, &pack.key_id)?;
            let pkey = pack::pack_key(key.key(), &repo_id, &name);
            let toc = pack::read_toc_parts(&name, &head, &tail, len, &pkey, &repo_id)?;
            for e in &toc {
                if let Some((p, loc)) = index.get(&e.id) {
                    if p.id == pack.id && (loc.offset != e.offset || loc.length != e.length) {
                        return Err(Error::corrupt(
                            &name,
                            format!(
                                "blob {} is at {}+{} in its table of contents, at {}+{} in \
                                 the index",
                                e.id, e.offset, e.length, loc.offset, loc.length
                            ),
                        ));
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::invalid(format!("restore crashed: {e}")))?
    }

    /// Checks the pack that holds `id` (see [`Restorer::verify_pack`]).
    async fn verify_pack_of(&self, id: &BlobId) -> Result<()> {
        let pack = self.index.get(id).map(|(p, _)| p.clone());
        match pack {
            Some(p) => self.verify_pack(&p).await,
            // Not indexed: reading it reports that.
            None => Ok(()),
        }
    }

    pub(crate) async fn tree(&self, id: &BlobId) -> Result<Tree> {
        self.verify_pack_of(id).await.map_err(|e| self.context(e))?;
        let bytes = self
            .repo
            .read_blob(&self.index, id)
            .await
            .map_err(|e| self.context(e))?;
        Tree::decode(
            &format!("tree {id} of snapshot {}", self.snapshot.id.short()),
            &bytes,
        )
    }

    pub(crate) fn context(&self, e: Error) -> Error {
        match e {
            Error::MissingBlob(id) => match self.index_errors.first() {
                Some(Error::Corrupt { object, detail }) => Error::corrupt(
                    object.clone(),
                    format!(
                        "{detail}; snapshot {} needs blob {id}, which it may list",
                        self.snapshot.id.short()
                    ),
                ),
                _ => Error::corrupt(
                    format!("blob {id}"),
                    format!(
                        "missing from the index (needed by snapshot {})",
                        self.snapshot.id.short()
                    ),
                ),
            },
            Error::Corrupt { object, detail } => Error::Corrupt {
                object,
                detail: format!("{detail} (needed by snapshot {})", self.snapshot.id.short()),
            },
            e => e,
        }
    }

    /// Writes the snapshot's stream to `out`: its single file, or for a database snapshot its
    /// streams one after the other (a plain SQL dump); fails for a file tree.
    pub async fn stream_to(mut self, mut out: Box<dyn Write + Send>) -> Result<RestoreReport> {
        let root = self.tree(&self.snapshot.tree).await?;
        let streams = matches!(self.snapshot.source, SnapshotSource::Postgres(_))
            && root.nodes.iter().all(|n| n.node_type == NodeType::File);
        let nodes = match root.nodes.as_slice() {
            [n] if n.node_type == NodeType::File => vec![n.clone()],
            _ if streams => root.nodes.clone(),
            _ => {
                return Err(Error::invalid(format!(
                    "snapshot {} holds files and directories, not one stream: restore it with --target DIR",
                    self.snapshot.id.short()
                )));
            }
        };
        for node in &nodes {
            let (bytes, back) = self.write_content(node, out).await?;
            out = back;
            self.report.files += 1;
            self.report.bytes += bytes;
        }
        Ok(self.report)
    }

    /// Streams a file node's content into `out`, verifying size and SHA-256.
    async fn write_content(
        &self,
        node: &Node,
        out: Box<dyn Write + Send>,
    ) -> Result<(u64, Box<dyn Write + Send>)> {
        let label = format!(
            "{} in snapshot {}",
            node.name.to_display(),
            self.snapshot.id.short()
        );
        // A tokio channel and a oneshot for the result: the writer may block in `write` (a
        // pipe nobody reads), and that must never block a runtime thread with it.
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUED_RANGES);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let writer_label = label.clone();
        let progress = self.opts.progress.clone();
        let buffers = self.buffers.clone();
        std::thread::Builder::new()
            .name("kluis-restore-writer".into())
            .spawn(move || {
                let _ = done_tx.send(write_blobs(rx, out, &writer_label, &progress, &buffers));
            })
            .map_err(|e| Error::io("restore writer thread", e))?;
        let fetched = self.fetch_all(node, tx).await;
        let written = done_rx
            .await
            .unwrap_or_else(|_| Err(Error::invalid("the restore writer crashed")));
        let (size, digest, out) = match (fetched, written) {
            (Err(e), _) => return Err(self.context(e)),
            (Ok(()), Err(e)) => return Err(e),
            (Ok(()), Ok(w)) => w,
        };
        if Some(size) != node.size {
            return Err(Error::corrupt(
                label,
                format!(
                    "restored {size} bytes, the snapshot recorded {}",
                    node.size.unwrap_or(0)
                ),
            ));
        }
        if let Some(want) = node.sha256 {
            if want != digest {
                return Err(Error::corrupt(
                    label,
                    "SHA-256 of the restored data differs from the snapshot's",
                ));
            }
        }
        Ok((size, out))
    }

    /// Fetches and decodes the node's blobs in order, feeding the writer.
    async fn fetch_all(&self, node: &Node, tx: tokio::sync::mpsc::Sender<Vec<u8>>) -> Result<()> {
        for list in content_lists(node) {
            let ids = self.content_ids(node, list).await?;
            let mut decoded = self.decoded(&ids)?;
            while let Some(d) = decoded.try_next().await? {
                if self.opts.cancel.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                let sent = tokio::select! {
                    r = tx.send(d.plain) => r.is_ok(),
                    () = self.opts.cancel.cancelled() => return Err(Error::Interrupted),
                };
                if !sent {
                    // The writer failed; its error is the one to report.
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The blob ids of one part of a file's content: its inline ids (`list` none), or those
    /// of one of its content lists; see [`content_lists`].
    pub(crate) async fn content_ids(
        &self,
        node: &Node,
        list: Option<BlobId>,
    ) -> Result<Vec<BlobId>> {
        match list {
            None => Ok(node.content.clone()),
            Some(id) => {
                self.verify_pack_of(&id)
                    .await
                    .map_err(|e| self.context(e))?;
                let bytes = self
                    .repo
                    .read_blob(&self.index, &id)
                    .await
                    .map_err(|e| self.context(e))?;
                tree::decode_list(&format!("content list {id}"), &bytes)
            }
        }
    }

    /// Fetches and decodes blobs in order: ranged reads in flight, then decoding on as many
    /// threads as cores, yielding each range's plaintext.
    pub(crate) fn decoded<'s>(
        &'s self,
        ids: &[BlobId],
    ) -> Result<impl futures::Stream<Item = Result<Decoded>> + 's> {
        let decoders = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .saturating_sub(1)
            .max(1);
        let ranges = plan_ranges(&self.index, ids).map_err(|e| self.context(e))?;
        Ok(futures::stream::iter(ranges)
            .map(|range| self.fetch_range(range))
            .buffered(self.opts.fetches.max(1))
            .map(|fetched| {
                let buffers = self.buffers.clone();
                let stored_buffers = self.stored_buffers.clone();
                async move {
                    let fetched = fetched?;
                    tokio::task::spawn_blocking(move || fetched.decode(&buffers, &stored_buffers))
                        .await
                        .map_err(|e| Error::invalid(format!("restore decoder crashed: {e}")))?
                }
            })
            .buffered(decoders + 1))
    }

    async fn fetch_range(&self, range: Range) -> Result<Fetched> {
        let pack_name = name::pack(range.pack.epoch, &range.pack.id);
        let start = u64::from(range.entries[0].offset);
        let end = range
            .entries
            .last()
            .map_or(start, |e| u64::from(e.offset) + u64::from(e.length));
        let (_, stored) = tokio::try_join!(
            self.verify_pack(&range.pack),
            self.repo
                .store()
                .get_range_into(&pack_name, start..end, self.stored_buffers.take()),
        )?;
        Progress::add(&self.opts.progress.stored_bytes, stored.len() as u64);
        let key = self
            .repo
            .epoch_key(range.pack.epoch, range.pack.key_id)
            .await?;
        Ok(Fetched {
            pack_name,
            key,
            repo_id: self.repo.id(),
            entries: range.entries,
            start,
            stored,
        })
    }
}

/// The parts of a file's content in order: its inline ids, or each of its content lists.
pub(crate) fn content_lists(node: &Node) -> Vec<Option<BlobId>> {
    if node.content_lists.is_empty() {
        vec![None]
    } else {
        node.content_lists.iter().copied().map(Some).collect()
    }
}

/// A ranged read, decoded: its blobs' plaintexts one after the other.
pub(crate) struct Decoded {
    pub plain: Vec<u8>,
    /// Each blob's plaintext length, in order.
    pub lengths: Vec<u32>,
}

/// A ranged read's stored bytes, not yet decoded.
struct Fetched {
    pack_name: String,
    /// The epoch key the pack's blobs were sealed under.
    key: Arc<EpochKey>,
    repo_id: ObjectId,
    entries: Vec<BlobEntry>,
    start: u64,
    stored: Vec<u8>,
}

/// A ranged read: adjacent blobs of one pack.
struct Range {
    pack: PackInfo,
    entries: Vec<BlobEntry>,
    /// Their decoded size.
    raw: u64,
}

/// Groups blob ids, in order, into ranged reads of adjacent blobs.
fn plan_ranges(index: &Index, ids: &[BlobId]) -> Result<Vec<Range>> {
    let mut ranges: Vec<Range> = Vec::new();
    for id in ids {
        let (pack, loc) = index.get(id).ok_or(Error::MissingBlob(*id))?;
        let entry = loc.entry(*id);
        if let Some(last) = ranges.last_mut() {
            let prev = last.entries.last().expect("ranges are never empty");
            let first = last.entries[0].offset;
            if last.pack.id == pack.id
                && prev.offset + prev.length == entry.offset
                && u64::from(entry.offset + entry.length - first) <= RANGE_BYTES
                && last.raw + u64::from(entry.raw_length) <= RANGE_RAW_BYTES
            {
                last.raw += u64::from(entry.raw_length);
                last.entries.push(entry);
                continue;
            }
        }
        ranges.push(Range {
            pack: pack.clone(),
            raw: u64::from(entry.raw_length),
            entries: vec![entry],
        });
    }
    Ok(ranges)
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

impl Fetched {
    /// Decrypts (authenticating) and decompresses the range's blobs into one buffer.
    fn decode(self, buffers: &BufferPool, stored_buffers: &BufferPool) -> Result<Decoded> {
        let keys = pack::BlobKeys {
            epoch_key: self.key.key(),
            repo_id: &self.repo_id,
        };
        let mut stored = self.stored;
        let total: usize = self.entries.iter().map(|e| e.raw_length as usize).sum();
        // Recycled buffers keep their initialized bytes: only growth is zeroed (zeroing every
        // range cost 4 % of a restore's CPU time).
        let mut out = buffers.take_initialized(total);
        out.truncate(total);
        let decoded = DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| Error::io("zstd", e))?);
            }
            let dec = slot.as_mut().expect("set above");
            let mut at = 0;
            for e in &self.entries {
                let from = (u64::from(e.offset) - self.start) as usize;
                let blob = &mut stored[from..from + e.length as usize];
                let raw = e.raw_length as usize;
                pack::open_blob_into(&self.pack_name, keys, e, blob, dec, &mut out[at..at + raw])?;
                at += raw;
            }
            Ok(Decoded {
                plain: out,
                lengths: self.entries.iter().map(|e| e.raw_length).collect(),
            })
        });
        stored_buffers.give_initialized(stored);
        decoded
    }
}

/// Writes decoded ranges in order while a second thread hashes them (SHA-256 is sequential and
/// as costly as the write, so the two run side by side); returns the size and the digest.
fn write_blobs(
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    mut out: Box<dyn Write + Send>,
    label: &str,
    progress: &Progress,
    buffers: &Arc<BufferPool>,
) -> Result<(u64, [u8; 32], Box<dyn Write + Send>)> {
    let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUED_RANGES);
    let pool = buffers.clone();
    let hasher = std::thread::Builder::new()
        .name("kluis-restore-hasher".into())
        .spawn(move || {
            let mut sha = Sha256::default();
            for b in hash_rx {
                sha.update(&b);
                pool.give_initialized(b);
            }
            sha.finish()
        })
        .map_err(|e| Error::io("restore hasher thread", e))?;
    let mut size = 0u64;
    let err = |e: std::io::Error| Error::io(label, e);
    let written = (|| {
        while let Some(b) = rx.blocking_recv() {
            for piece in b.chunks(crate::store::WRITE_PIECE) {
                out.write_all(piece).map_err(err)?;
            }
            size += b.len() as u64;
            Progress::add(&progress.bytes, b.len() as u64);
            if hash_tx.send(b).is_err() {
                return Err(Error::invalid("the restore hasher stopped"));
            }
        }
        out.flush().map_err(err)
    })();
    drop(hash_tx);
    let digest = hasher
        .join()
        .map_err(|_| Error::invalid("the restore hasher crashed"))?;
    written?;
    Ok((size, digest, out))
}
