//! The backup pipeline: source -> chunks -> compressed, encrypted, verified packs -> storage,
//! then index segment, then snapshot manifest (the commit point).
//!
//! Stages and the memory each may hold (all bounded by configuration, none by source size):
//! - one reader thread: reads, hashes (SHA-256 per stream, keyed BLAKE3 per chunk), chunks,
//!   deduplicates, and walks directories; it queues at most `2 * threads` new chunks;
//! - `threads` workers: compress (zstd) and append to the one open data pack or tree pack;
//!   whoever fills a pack seals it and verifies it (decrypt, decompress, hash) before upload;
//! - the uploader (async): at most `uploads` sealed packs exist at once, uploading or waiting.
//!
//! A failure anywhere stops every stage and nothing is committed; packs already uploaded are
//! garbage that a later prune removes. No snapshot without every byte it references.
//!
//! Parts: `reader` (the stream-ordered stage), `pipeline` (tokens, open packs, workers),
//! `compress` (one worker's compress, seal and verify), `upload` (packs and index checkpoints
//! to storage); this file holds the types, `backup()` itself and its commit.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use jiff::Timestamp;

use crate::buffer::BufferPool;
use crate::chunker::ChunkerParams;
use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::index::{IdSet, Index, IndexSegment};
use crate::object::Epoch;
use crate::pack::{BlobKind, FinishedPack, PackWriter};
use crate::progress::{Cancel, Progress};
use crate::repository::{EpochKey, Repository};
use crate::snapshot::{Snapshot, Source as SnapshotSource, StreamDigest, Summary};
use crate::source::StreamSet;

mod compress;
pub(crate) mod feed;
mod pipeline;
mod reader;
mod upload;

use compress::Compressors;
#[cfg(test)]
use compress::verify_sealed;
use pipeline::run_pipeline;
use upload::upload_packs;

/// Index entries per segment before a backup writes one mid-way.
const SEGMENT_BLOBS: usize = 65_536;

/// Packs uploaded before their index segment is written mid-way: the checkpoint an interrupted
/// backup or copy resumes from (its next run finds those blobs in the index and skips them).
const SEGMENT_PACKS: usize = 16;

/// What to back up.
pub enum Source {
    /// A byte stream, e.g. standard input or a database dump.
    Stream(Box<dyn Read + Send>),
    /// Files and directories; each becomes an entry of the snapshot's root, by its base name.
    Paths(Vec<PathBuf>),
    /// Named streams from a database or a command, each a file of the snapshot's root. Any
    /// stream's failure fails the backup.
    Streams(Box<dyn StreamSet>),
    /// Another repository's snapshot, walked by [`crate::copy`]: its blobs keep their
    /// boundaries and are stored again under this repository's keys.
    Copy(Box<feed::CopyFeed>),
}

/// How to back up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub name: String,
    pub host: String,
    /// The snapshot's time (default: now). It decides the epoch.
    pub time: Option<Timestamp>,
    pub tags: Vec<String>,
    /// Compression workers (default: one per core).
    pub threads: usize,
    /// Packs uploading or ready to upload at once (0: the store's default, see
    /// [`crate::store::Store::default_uploads`]). Each is a pack-sized buffer.
    pub uploads: usize,
    pub cancel: Cancel,
    pub progress: Arc<Progress>,
    /// For a copy: the snapshot it copies.
    pub origin: Option<crate::snapshot::Origin>,
    /// This host's ledger of the repository: the snapshot joins its chain (see
    /// [`crate::ledger`]). Without one the snapshot carries no chain.
    pub ledger: Option<crate::ledger::Ledger>,
    /// For a member of a set (see [`crate::snapshot::SetRecord`]).
    pub set: Option<crate::snapshot::SetRecord>,
}

impl BackupOptions {
    pub fn new(name: impl Into<String>) -> BackupOptions {
        BackupOptions {
            name: name.into(),
            host: crate::hostname(),
            time: None,
            tags: Vec::new(),
            threads: 0,
            uploads: 0,
            cancel: Cancel::new(),
            progress: Progress::new(),
            origin: None,
            ledger: None,
            set: None,
        }
    }
}

/// A committed backup.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub snapshot: Snapshot,
    /// The manifest's object name.
    pub object: String,
    /// Special files that were skipped (sockets, devices, FIFOs).
    pub skipped: Vec<String>,
    /// What a stream source's tools printed on standard error without failing (warnings).
    pub warnings: Vec<String>,
    /// How long the backup took, from its start to its commit.
    pub elapsed: std::time::Duration,
}

/// Backs up `source` and commits a snapshot.
pub async fn backup(
    repo: &Repository,
    source: Source,
    opts: BackupOptions,
) -> Result<BackupReport> {
    if opts.name.is_empty() || opts.name.contains(['/', '\0']) {
        return Err(Error::invalid(format!(
            "snapshot name {:?} must be non-empty without '/'",
            opts.name
        )));
    }
    let clock = std::time::Instant::now();
    let started = Timestamp::now();
    let time = opts.time.unwrap_or(started);
    let epoch = Epoch::of(time);
    // Prune's marks before the index: packs they condemn are not deduplicated against.
    let prune_view = crate::prune::WriterView::read(repo).await?;
    let (key, unreadable_keys) = repo.write_key(epoch, prune_view.condemned_keys()).await?;
    let (mut index, _) = repo.load_index(Some((epoch, key.id))).await?;
    index.exclude_packs(prune_view.condemned());
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let uploads = match opts.uploads {
        0 => repo.store().default_uploads(),
        n => n,
    };
    let (pack_tx, pack_rx) = tokio::sync::mpsc::channel(uploads);
    let pack_size = repo.config().pack_size as usize;
    // One buffer per sealed pack plus the open data pack; a pack overshoots its target by at
    // most one blob (a maximal chunk, stored uncompressed).
    let buffers = Arc::new(BufferPool::new(
        uploads + 1,
        pack_size + repo.config().chunker.max_size as usize + (64 << 10),
    ));
    let source_kind = match &source {
        Source::Stream(_) => SnapshotSource::Stdin,
        Source::Paths(p) => SnapshotSource::Paths {
            paths: p.iter().map(|p| p.display().to_string()).collect(),
        },
        // Replaced by what the source reports once it is done.
        Source::Streams(_) | Source::Copy(_) => SnapshotSource::Stdin,
    };
    let ctx = Arc::new(Shared {
        key: key.clone(),
        repo_id: repo.id(),
        epoch,
        pack_size,
        max_chunk: repo.config().chunker.max_size as usize,
        buffers: buffers.clone(),
        level: repo.config().compression_level,
        cancel: opts.cancel.clone(),
        progress: opts.progress.clone(),
        data_pack: Mutex::new(None),
        tree_pack: Mutex::new(None),
        tokens: Tokens::new(uploads),
        pack_tx,
    });
    let params = repo.config().chunker;
    let name = opts.name.clone();
    let pipeline = {
        let ctx = ctx.clone();
        tokio::task::spawn_blocking(move || run_pipeline(ctx, index, params, source, name, threads))
    };
    drop(ctx);
    let uploader = upload_packs(
        UploadTo {
            repo,
            key: &key,
            prune_view: &prune_view,
        },
        pack_rx,
        uploads,
        &buffers,
        &opts.cancel,
        &opts.progress,
    );
    let (pipeline, uploaded) = tokio::join!(pipeline, uploader);
    let pipeline = pipeline.map_err(|e| Error::invalid(format!("backup pipeline crashed: {e}")))?;
    let (pending, mut stored) = match (pipeline, uploaded) {
        (_, Err(e)) => return Err(e),
        (Err(e), _) => return Err(e),
        (Ok(_), Ok(_)) if opts.cancel.is_cancelled() => return Err(Error::Interrupted),
        (Ok(out), Ok(up)) => (out, up),
    };
    let PipelineOutput {
        tree,
        mut summary,
        streams,
        skipped,
        warnings,
        record,
        mut reused,
    } = pending;
    let source_kind = record.unwrap_or(source_kind);
    if opts.cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    // The host's chain is held from reading its head until the manifest is written, and taken
    // before the commit check: waiting for it must not come between the check and the writes
    // the check makes safe (they must land within prune's margin).
    let mut ledger_warnings = Vec::new();
    let link = crate::ledger::try_link(opts.ledger.as_ref(), &mut ledger_warnings).await;
    // The snapshot needs the packs it reused and every pack this run uploaded: a prune that
    // ran meanwhile saw the latter unindexed (or indexed by no snapshot) and may have marked
    // them too. Checked before the last index segment, which must not list a swept pack.
    reused.extend(stored.packs.iter().copied());
    prune_view
        .check_commit(repo, &reused, (epoch, key.id))
        .await?;
    if !stored.pending.packs.is_empty() {
        let (_, size) = repo.save_index(&key, &stored.pending).await?;
        stored.bytes += size;
    }
    summary.stored_bytes = stored.bytes;
    let snapshot = Snapshot {
        id: ObjectId::random(),
        time,
        host: opts.host.clone(),
        name: opts.name.clone(),
        source: source_kind,
        tags: opts.tags.clone(),
        tree,
        started,
        finished: Timestamp::now(),
        summary,
        streams,
        program: format!("kluis {}", env!("CARGO_PKG_VERSION")),
        origin: opts.origin.clone(),
        set: opts.set.clone(),
        chain: None,
    };
    if opts.cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    prune_view.check_not_erased(repo, (epoch, key.id)).await?;
    let mut snapshot = snapshot;
    snapshot.chain = link.as_ref().map(|l| l.chain.clone());
    let object = repo.save_snapshot(&key, &snapshot).await?;
    if let Some(link) = link {
        if let Err(e) = link.committed(&object) {
            ledger_warnings.push(format!(
                "the snapshot is committed, but this host's ledger could not record it: {e}"
            ));
        }
    }
    let mut warnings = warnings;
    warnings.extend(ledger_warnings);
    warnings.extend(prune_view.warnings().iter().cloned());
    warnings.extend(
        unreadable_keys
            .iter()
            .map(|e| format!("{e} (skipped: this epoch's new data went under another key)")),
    );
    Ok(BackupReport {
        snapshot,
        object,
        skipped,
        warnings,
        elapsed: clock.elapsed(),
    })
}

/// State shared by the reader, the workers and the uploader.
struct Shared {
    key: Arc<EpochKey>,
    repo_id: ObjectId,
    epoch: Epoch,
    pack_size: usize,
    /// The repository's largest chunk: what the workers' buffers are reserved for.
    max_chunk: usize,
    /// Data pack buffers, recycled once uploaded.
    buffers: Arc<BufferPool>,
    level: i32,
    cancel: Cancel,
    progress: Arc<Progress>,
    data_pack: Mutex<Option<PackWriter>>,
    tree_pack: Mutex<Option<PackWriter>>,
    tokens: Tokens,
    pack_tx: tokio::sync::mpsc::Sender<SealedPack>,
}

/// A sealed, verified pack on its way to storage, holding one of the upload tokens.
struct SealedPack {
    pack: FinishedPack,
    _token: Token,
}

/// A counting semaphore bounding how many sealed packs exist at once.
struct Tokens {
    give: SyncSender<()>,
    take: Mutex<Receiver<()>>,
}

struct Token(SyncSender<()>);

struct Job {
    id: BlobId,
    kind: BlobKind,
    data: Bytes,
}

/// New blobs on their way to the workers, sent together: one channel message and at most one
/// wakeup per batch instead of per blob. Database streams are cut into 16 KiB chunks, and
/// waking a worker for each cost about 6 % of a backup's CPU time.
///
/// A blob in a batch is already in the backup's `seen` set, so later files deduplicate
/// against it: a batch is sent whatever way it goes out of scope. (A file whose read failed
/// half-way is skipped with a warning; the chunks read before the error must still be stored.)
struct Batch<'a> {
    jobs: Vec<Job>,
    bytes: usize,
    to: &'a SyncSender<Vec<Job>>,
    cancel: &'a Cancel,
}

/// A batch is sent once it holds this many bytes (a large chunk goes alone).
const BATCH_BYTES: usize = 256 << 10;

struct PipelineOutput {
    tree: BlobId,
    summary: Summary,
    streams: Vec<StreamDigest>,
    skipped: Vec<String>,
    warnings: Vec<String>,
    /// What a stream source reported about itself.
    record: Option<SnapshotSource>,
    /// Packs of the repository this backup deduplicated against.
    reused: IdSet<ObjectId>,
}

/// The reader stage: everything that must happen in stream order.
struct Reader<'a> {
    ctx: &'a Shared,
    index: Index,
    /// Per pack of `index`: whether this backup deduplicated against it.
    reused: Vec<AtomicBool>,
    /// Blobs submitted by this backup; shared by streams read at once.
    seen: Mutex<IdSet<BlobId>>,
    /// Counts kept by `submit` and `read_content`, which may run on several threads.
    counts: ReadCounts,
    jobs: SyncSender<Vec<Job>>,
    params: ChunkerParams,
    /// The chunkers' read buffers, shared by every file of the backup.
    read_buffers: Arc<BufferPool>,
    summary: Summary,
    skipped: Vec<String>,
    /// A stream source's warnings, once it finished.
    warnings: Vec<String>,
}

/// The summary's counts that stream readers running at once add to.
#[derive(Default)]
struct ReadCounts {
    logical_bytes: AtomicU64,
    blobs: AtomicU64,
    new_blobs: AtomicU64,
    new_bytes: AtomicU64,
}

/// A file's content as a node needs it.
struct Content {
    size: u64,
    sha256: [u8; 32],
    inline: Vec<BlobId>,
    lists: Vec<BlobId>,
}

enum ReadError {
    /// The source failed: for a file, reported and skipped; for a stream, fatal.
    Source(std::io::Error),
    /// The pipeline stopped.
    Pipeline(Error),
}

/// What the uploader hands back: packs not yet in a written segment, and bytes stored.
struct Uploaded {
    pending: IndexSegment,
    bytes: u64,
    /// Every pack this run uploaded: the snapshot needs them as much as the packs it reused.
    packs: IdSet<ObjectId>,
}

/// Where the uploader writes packs and index segments, and what it checks before a segment.
struct UploadTo<'a> {
    repo: &'a Repository,
    key: &'a EpochKey,
    prune_view: &'a crate::prune::WriterView,
}

#[cfg(test)]
mod tests;
