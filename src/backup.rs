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

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jiff::Timestamp;

use crate::buffer::BufferPool;
use crate::chunker::{Chunker, ChunkerParams};
use crate::crypto::Sha256;
use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::index::{IdSet, Index, IndexSegment, IndexedPack};
use crate::object::Epoch;
use crate::pack::{self, BlobKind, Compression, FinishedPack, PackWriter};
use crate::progress::{Cancel, Progress};
use crate::repository::{EpochKey, Repository};
use crate::snapshot::{Snapshot, Source as SnapshotSource, StreamDigest, Summary};
use crate::source::{self, StreamSet};
use crate::tree::{self, NameBytes, Node, NodeType, Tree};

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
    Copy(Box<crate::copy::CopyFeed>),
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
    let started = Timestamp::now();
    let time = opts.time.unwrap_or(started);
    let epoch = Epoch::of(time);
    // Prune's marks before the index: packs they condemn are not deduplicated against.
    let prune_view = crate::prune::WriterView::read(repo).await?;
    let (key, unreadable_keys) = repo.write_key(epoch).await?;
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
    prune_view.check_commit(repo, &reused).await?;
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
        chain: None,
    };
    if opts.cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
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

impl Drop for Token {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

impl Tokens {
    fn new(n: usize) -> Tokens {
        let (give, take) = sync_channel(n);
        for _ in 0..n {
            give.send(()).expect("capacity n");
        }
        Tokens {
            give,
            take: Mutex::new(take),
        }
    }

    fn acquire(&self) -> Token {
        self.take
            .lock()
            .expect("not poisoned")
            .recv()
            .expect("Tokens holds a sender");
        Token(self.give.clone())
    }
}

impl Shared {
    fn new_pack(&self, kind: BlobKind) -> PackWriter {
        // Tree packs are usually small: they grow as needed instead of taking a pack buffer.
        let buf = match kind {
            BlobKind::Data => self.buffers.take(),
            BlobKind::Tree => Vec::new(),
        };
        PackWriter::with_buffer(self.epoch, self.key.id, self.key.key(), self.repo_id, buf)
    }

    /// Appends a sealed, verified blob to the open pack of its kind; seals and ships the pack
    /// when it is full (`scratch` is the caller's buffer for the pack's check).
    fn add(
        &self,
        id: BlobId,
        kind: BlobKind,
        compression: Compression,
        raw: usize,
        sealed: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let slot = match kind {
            BlobKind::Data => &self.data_pack,
            BlobKind::Tree => &self.tree_pack,
        };
        let full = {
            let mut open = slot.lock().expect("not poisoned");
            let writer = open.get_or_insert_with(|| self.new_pack(kind));
            writer.add_sealed(id, kind, compression, raw as u32, sealed);
            if writer.len() >= self.pack_size {
                // Taking the token while holding the lock applies backpressure to every
                // worker when storage is the bottleneck.
                let token = self.tokens.acquire();
                open.take().map(|w| (w, token))
            } else {
                None
            }
        };
        match full {
            Some((writer, token)) => self.ship(writer, token, scratch),
            None => Ok(()),
        }
    }

    fn blob_keys(&self) -> pack::BlobKeys<'_> {
        pack::BlobKeys {
            epoch_key: self.key.key(),
            repo_id: &self.repo_id,
        }
    }

    fn ship(&self, writer: PackWriter, token: Token, scratch: &mut Vec<u8>) -> Result<()> {
        let pack = writer.finish(self.epoch);
        let key = pack::pack_key(self.key.key(), &self.repo_id, &pack.name);
        pack::verify_sealed(&pack, &key, self.blob_keys(), scratch).map_err(|e| {
            Error::corrupt(
                &pack.name,
                format!("pack failed verification before upload, nothing was written: {e}"),
            )
        })?;
        self.pack_tx
            .blocking_send(SealedPack {
                pack,
                _token: token,
            })
            .map_err(|_| Error::Interrupted)
    }

    /// Seals and ships the partly filled packs once every blob is in.
    fn flush(&self) -> Result<()> {
        let mut scratch = Vec::new();
        for slot in [&self.data_pack, &self.tree_pack] {
            let open = slot.lock().expect("not poisoned").take();
            if let Some(writer) = open.filter(|w| !w.is_empty()) {
                let token = self.tokens.acquire();
                self.ship(writer, token, &mut scratch)?;
            }
        }
        Ok(())
    }
}

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

impl<'a> Batch<'a> {
    fn new(to: &'a SyncSender<Vec<Job>>, cancel: &'a Cancel) -> Batch<'a> {
        Batch {
            jobs: Vec::new(),
            bytes: 0,
            to,
            cancel,
        }
    }

    /// Adds a blob; sends the batch once it is full.
    fn push(&mut self, job: Job) -> Result<()> {
        self.bytes += job.data.len();
        self.jobs.push(job);
        if self.bytes >= BATCH_BYTES {
            self.send()?;
        }
        Ok(())
    }

    /// Hands the blobs to the workers.
    fn send(&mut self) -> Result<()> {
        self.bytes = 0;
        if self.jobs.is_empty() {
            return Ok(());
        }
        self.to
            .send(std::mem::take(&mut self.jobs))
            .map_err(|_| Error::Interrupted)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // A cancelled backup stores nothing more: the workers are stopping, and a send to a
        // full channel they no longer read would wait for ever. Without workers (the backup
        // failed) the send fails, and there is nothing left to store the blobs for.
        if !self.cancel.is_cancelled() {
            let _ = self.send();
        }
    }
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

fn run_pipeline(
    ctx: Arc<Shared>,
    index: Index,
    params: ChunkerParams,
    source: Source,
    name: String,
    threads: usize,
) -> Result<PipelineOutput> {
    let (job_tx, job_rx) = sync_channel::<Vec<Job>>(2 * threads);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let ctx = ctx.clone();
            let rx = job_rx.clone();
            std::thread::Builder::new()
                .name(format!("kluis-compress-{i}"))
                .spawn(move || worker(&ctx, &rx))
                .expect("spawn worker thread")
        })
        .collect();
    // The workers hold the only receivers: once they have all stopped (cancelled, or failed),
    // a send fails instead of waiting for ever on a full channel.
    drop(job_rx);
    let mut reader = Reader {
        ctx: &ctx,
        reused: (0..index.packs().len())
            .map(|_| AtomicBool::new(false))
            .collect(),
        index,
        seen: Mutex::new(IdSet::default()),
        counts: ReadCounts::default(),
        jobs: job_tx,
        read_buffers: crate::chunker::buffer_pool(&params),
        params,
        summary: Summary::default(),
        skipped: Vec::new(),
        warnings: Vec::new(),
    };
    let read = reader.read_source(source, &name);
    // Dropping the job sender is what tells the workers the input is over.
    let Reader {
        mut summary,
        counts,
        skipped,
        warnings,
        jobs,
        index,
        reused,
        ..
    } = reader;
    let reused: IdSet<ObjectId> = index
        .packs()
        .iter()
        .zip(&reused)
        .filter(|(_, r)| r.load(std::sync::atomic::Ordering::Relaxed))
        .map(|(p, _)| p.id)
        .collect();
    counts.add_to(&mut summary);
    drop(jobs);
    let mut first_error = None;
    for w in workers {
        let result = w
            .join()
            .unwrap_or_else(|_| Err(Error::invalid("a compression worker crashed")));
        if let Err(e) = result {
            if !matches!(e, Error::Interrupted) || first_error.is_none() {
                first_error.get_or_insert(e);
            }
        }
    }
    if first_error.is_none() && read.is_ok() && !ctx.cancel.is_cancelled() {
        if let Err(e) = ctx.flush() {
            first_error = Some(e);
        }
    }
    match (read, first_error) {
        (Err(e), _) if !matches!(e, Error::Interrupted) => Err(e),
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(e),
        (Ok((tree, streams, record)), None) => Ok(PipelineOutput {
            tree,
            summary,
            streams,
            skipped,
            warnings,
            record,
            reused,
        }),
    }
}

/// Chunks from this size on are compressed with [`Compressors::large`].
const LARGE_CHUNK: usize = 256 << 10;

/// A compression worker: takes batches of new blobs and stores each (see
/// [`Compressors::store`]) until the reader is done.
fn worker(ctx: &Shared, jobs: &Mutex<Receiver<Vec<Job>>>) -> Result<()> {
    let mut compressors = Compressors::new(ctx.level, ctx.max_chunk)?;
    loop {
        let batch = jobs.lock().expect("not poisoned").recv();
        let Ok(batch) = batch else { return Ok(()) };
        for job in batch {
            if ctx.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            compressors.store(ctx, job)?;
        }
    }
}

/// A worker's zstd contexts and buffers, reused from blob to blob. The buffers are reserved
/// for the largest chunk up front (address space only: pages are touched as data fills them)
/// so they never move: growing them blob by blob left freed copies in glibc's arenas. There are
/// as few as the work allows: `out` holds the compressed payload, then the copy of the sealed
/// blob that verification decrypts in place.
struct Compressors {
    small: zstd::bulk::Compressor<'static>,
    large: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
    out: Vec<u8>,
    sealed: Vec<u8>,
    check: Vec<u8>,
}

fn zstd_error(e: std::io::Error) -> Error {
    Error::io("zstd", e)
}

impl Compressors {
    fn new(level: i32, max_chunk: usize) -> Result<Compressors> {
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
    fn store(&mut self, ctx: &Shared, job: Job) -> Result<()> {
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
fn verify_sealed(
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

impl ReadCounts {
    fn add_to(&self, summary: &mut Summary) {
        summary.logical_bytes += Progress::get(&self.logical_bytes);
        summary.blobs += Progress::get(&self.blobs);
        summary.new_blobs += Progress::get(&self.new_blobs);
        summary.new_bytes += Progress::get(&self.new_bytes);
    }
}

/// A file's content as a node needs it.
struct Content {
    size: u64,
    sha256: [u8; 32],
    inline: Vec<BlobId>,
    lists: Vec<BlobId>,
}

impl Reader<'_> {
    fn read_source(
        &mut self,
        source: Source,
        name: &str,
    ) -> Result<(BlobId, Vec<StreamDigest>, Option<SnapshotSource>)> {
        match source {
            Source::Stream(r) => {
                let c = self.read_content(r).map_err(|e| match e {
                    ReadError::Source(e) if source::is_cancelled(&e) => Error::Interrupted,
                    ReadError::Source(e) => Error::io("standard input", e),
                    ReadError::Pipeline(e) => e,
                })?;
                let digest = StreamDigest {
                    path: name.to_string(),
                    size: c.size,
                    sha256: c.sha256,
                };
                let now = Timestamp::now().as_nanosecond() as i64;
                let node = file_node(NameBytes(name.as_bytes().to_vec()), 0o600, 0, 0, now, c);
                self.summary.files += 1;
                let tree = self.submit_tree(&Tree { nodes: vec![node] })?;
                Ok((tree, vec![digest], None))
            }
            Source::Streams(mut set) => {
                let (min, avg, max) = set.chunk_sizes();
                self.params = ChunkerParams {
                    min_size: min,
                    avg_size: avg,
                    max_size: max,
                    seed: self.params.seed,
                };
                self.params.validate()?;
                set.attach_cancel(self.ctx.cancel.clone());
                let now = Timestamp::now().as_nanosecond() as i64;
                let (nodes, digests) = self.read_streams(set.as_mut(), now)?;
                self.summary.files += nodes.len() as u64;
                let record = set.finish()?;
                self.warnings = set.warnings();
                let tree = self.submit_tree(&Tree { nodes })?;
                Ok((tree, digests, Some(record)))
            }
            Source::Paths(paths) => {
                let mut nodes = Vec::new();
                for p in paths {
                    let path = std::path::absolute(&p).map_err(|e| Error::io(&p, e))?;
                    let base = path
                        .file_name()
                        .map_or_else(|| b"root".to_vec(), |n| n.as_bytes().to_vec());
                    let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
                    if let Some(node) = self.node(&path, NameBytes(base), &meta)? {
                        if nodes.iter().any(|n: &Node| n.name == node.name) {
                            return Err(Error::invalid(format!(
                                "two paths share the base name {:?}; back them up separately",
                                node.name.to_display()
                            )));
                        }
                        nodes.push(node);
                    }
                }
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                Ok((self.submit_tree(&Tree { nodes })?, Vec::new(), None))
            }
            Source::Copy(feed) => self.read_copy(*feed),
        }
    }

    /// Rebuilds a source repository's snapshot from the walk [`crate::copy`] feeds: every
    /// tree again (blob ids differ under this repository's keys), every file's content
    /// verified against the SHA-256 and size its node records.
    fn read_copy(
        &mut self,
        feed: crate::copy::CopyFeed,
    ) -> Result<(BlobId, Vec<StreamDigest>, Option<SnapshotSource>)> {
        use crate::copy::CopyEvent;
        let mut feed = feed;
        let snapshot = feed.snapshot.clone();
        let label = |node: &Node| {
            format!(
                "{} in snapshot {} of the source",
                node.name.to_display(),
                snapshot.id.short()
            )
        };
        let unexpected = || Error::invalid("copy: the source walk sent events out of order");
        self.summary.errors = snapshot.summary.errors.clone();
        // Directories being rebuilt: each one's node (none for the root) and its children.
        let mut open: Vec<(Option<Node>, Vec<Node>)> = vec![(None, Vec::new())];
        loop {
            // A closed feed means the walk stopped; `copy` reports why.
            let event = feed.events.blocking_recv().ok_or(Error::Interrupted)?;
            match event {
                CopyEvent::Dir(node) => open.push((Some(node), Vec::new())),
                CopyEvent::EndDir => {
                    let (Some(mut node), children) = open.pop().ok_or_else(unexpected)? else {
                        return Err(unexpected());
                    };
                    node.subtree = Some(self.submit_tree(&Tree { nodes: children })?);
                    self.summary.dirs += 1;
                    open.last_mut().ok_or_else(unexpected)?.1.push(node);
                }
                CopyEvent::Symlink(node) => {
                    self.summary.symlinks += 1;
                    open.last_mut().ok_or_else(unexpected)?.1.push(node);
                }
                CopyEvent::File(node) => {
                    let content = self
                        .read_chunks(|| match feed.events.blocking_recv() {
                            Some(CopyEvent::Blob(b)) => {
                                feed.budget.add_permits(crate::copy::kib(b.len()) as usize);
                                Ok(Some(b))
                            }
                            Some(CopyEvent::EndFile) => Ok(None),
                            Some(_) => Err(ReadError::Pipeline(unexpected())),
                            None => Err(ReadError::Pipeline(Error::Interrupted)),
                        })
                        .map_err(|e| match e {
                            ReadError::Source(e) => Error::io(label(&node), e),
                            ReadError::Pipeline(e) => e,
                        })?;
                    if Some(content.size) != node.size || Some(content.sha256) != node.sha256 {
                        return Err(Error::corrupt(
                            label(&node),
                            "its content does not match the size and SHA-256 the snapshot \
                             records; nothing was copied",
                        ));
                    }
                    self.summary.files += 1;
                    Progress::add(&self.ctx.progress.files, 1);
                    let n = file_node(
                        node.name,
                        node.mode,
                        node.uid,
                        node.gid,
                        node.mtime_ns,
                        content,
                    );
                    open.last_mut().ok_or_else(unexpected)?.1.push(n);
                }
                CopyEvent::Blob(_) | CopyEvent::EndFile => return Err(unexpected()),
                CopyEvent::Done => break,
            }
        }
        let (None, nodes) = open.pop().ok_or_else(unexpected)? else {
            return Err(unexpected());
        };
        if !open.is_empty() {
            return Err(unexpected());
        }
        let tree = self.submit_tree(&Tree { nodes })?;
        Ok((
            tree,
            snapshot.streams.clone(),
            Some(snapshot.source.clone()),
        ))
    }

    /// Hashes a blob and adds it to `batch` for storage unless the repository or this backup
    /// has it.
    fn submit(&self, kind: BlobKind, data: Bytes, batch: &mut Batch) -> Result<BlobId> {
        if self.ctx.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let id = self.ctx.key.blob_id(&data);
        if let Some(pack) = self.index.pack_number(&id) {
            self.reused[pack as usize].store(true, std::sync::atomic::Ordering::Relaxed);
        } else if self.seen.lock().expect("not poisoned").insert(id) {
            Progress::add(&self.counts.new_blobs, 1);
            Progress::add(&self.counts.new_bytes, data.len() as u64);
            Progress::add(&self.ctx.progress.new_bytes, data.len() as u64);
            batch.push(Job { id, kind, data })?;
        }
        Ok(id)
    }

    fn submit_tree(&self, tree: &Tree) -> Result<BlobId> {
        let mut batch = Batch::new(&self.jobs, &self.ctx.cancel);
        let id = self.submit(BlobKind::Tree, Bytes::from(tree.encode()), &mut batch)?;
        batch.send()?;
        Ok(id)
    }

    fn read_content(&self, reader: impl Read) -> Result<Content, ReadError> {
        let mut chunker = Chunker::with_pool(reader, &self.params, self.read_buffers.clone());
        self.read_chunks(|| chunker.next_chunk().map_err(ReadError::Source))
    }

    /// Stores a file's content given as chunks, in order, until `next` returns `None`.
    fn read_chunks(
        &self,
        mut next: impl FnMut() -> Result<Option<Bytes>, ReadError>,
    ) -> Result<Content, ReadError> {
        let mut sha = Sha256::default();
        let mut size = 0u64;
        let mut ids = Vec::new();
        let mut lists = Vec::new();
        let mut batch = Batch::new(&self.jobs, &self.ctx.cancel);
        while let Some(chunk) = next()? {
            sha.update(&chunk);
            size += chunk.len() as u64;
            Progress::add(&self.ctx.progress.bytes, chunk.len() as u64);
            Progress::add(&self.counts.logical_bytes, chunk.len() as u64);
            Progress::add(&self.counts.blobs, 1);
            ids.push(
                self.submit(BlobKind::Data, chunk, &mut batch)
                    .map_err(ReadError::Pipeline)?,
            );
            if ids.len() == tree::LIST_LEN {
                let list = Bytes::from(tree::encode_list(&ids));
                lists.push(
                    self.submit(BlobKind::Tree, list, &mut batch)
                        .map_err(ReadError::Pipeline)?,
                );
                ids.clear();
            }
        }
        if !lists.is_empty() || ids.len() > tree::INLINE_CONTENT {
            if !ids.is_empty() {
                let list = Bytes::from(tree::encode_list(&ids));
                lists.push(
                    self.submit(BlobKind::Tree, list, &mut batch)
                        .map_err(ReadError::Pipeline)?,
                );
            }
            ids = Vec::new();
        }
        batch.send().map_err(ReadError::Pipeline)?;
        Ok(Content {
            size,
            sha256: sha.finish(),
            inline: ids,
            lists,
        })
    }

    /// Reads a source's streams, up to [`StreamSet::parallel_streams`] at once, each on its own
    /// thread (the tools behind them then run side by side too); returns their nodes and
    /// digests sorted by name (the restore order), whatever order the source gave them in
    /// (largest first keeps the slots busy to the end). A finished stream's slot goes to the next stream at once,
    /// whichever stream it was: waiting for streams in order left a slot idle while a large
    /// table was still being read (a third of a PostgreSQL backup at scale 6). The first
    /// failure cancels the streams still being read.
    fn read_streams(
        &self,
        set: &mut dyn StreamSet,
        now: i64,
    ) -> Result<(Vec<Node>, Vec<StreamDigest>)> {
        let parallel = set.parallel_streams().max(1);
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let mut names: Vec<String> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut contents: Vec<Option<Content>> = Vec::new();
            let mut running = 0usize;
            let mut more = true;
            let result = (|| loop {
                while more && running < parallel {
                    let Some(stream) = set.next_stream()? else {
                        more = false;
                        break;
                    };
                    let bytes = stream.name.as_bytes();
                    if bytes.is_empty()
                        || bytes.contains(&b'/')
                        || bytes.contains(&0)
                        || !seen.insert(stream.name.clone())
                    {
                        return Err(Error::invalid(format!(
                            "stream name {:?} is empty, holds '/', or repeats",
                            stream.name
                        )));
                    }
                    let i = names.len();
                    names.push(stream.name);
                    contents.push(None);
                    let reader = stream.reader;
                    let done = done_tx.clone();
                    std::thread::Builder::new()
                        .name("kluis-stream".into())
                        .spawn_scoped(scope, move || {
                            let read =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    self.read_content(reader)
                                }));
                            // The receiver is gone only when the backup has already failed.
                            let _ = done.send((i, read));
                        })
                        .map_err(|e| Error::io("stream reader thread", e))?;
                    running += 1;
                }
                if running == 0 {
                    return Ok(());
                }
                let (i, read) = done_rx
                    .recv()
                    .map_err(|_| Error::invalid("the stream readers stopped"))?;
                running -= 1;
                let content = read
                    .unwrap_or_else(|_| {
                        Err(ReadError::Pipeline(Error::invalid(
                            "a stream reader crashed",
                        )))
                    })
                    .map_err(|e| match e {
                        ReadError::Source(e) => source::read_error(&names[i], e),
                        ReadError::Pipeline(e) => e,
                    })?;
                contents[i] = Some(content);
                Progress::add(&self.ctx.progress.files, 1);
            })();
            if result.is_err() {
                // The other readers stop at their next chunk; their tools are killed as their
                // outputs are dropped.
                self.ctx.cancel.cancel();
            }
            result?;
            let mut read: Vec<(String, Option<Content>)> =
                names.into_iter().zip(contents).collect();
            read.sort_by(|a, b| a.0.cmp(&b.0));
            let mut nodes = Vec::with_capacity(read.len());
            let mut digests = Vec::with_capacity(read.len());
            for (name, content) in read {
                let content = content.expect("every stream was read");
                digests.push(StreamDigest {
                    path: name.clone(),
                    size: content.size,
                    sha256: content.sha256,
                });
                nodes.push(file_node(
                    NameBytes(name.into_bytes()),
                    0o600,
                    0,
                    0,
                    now,
                    content,
                ));
            }
            Ok((nodes, digests))
        })
    }

    fn warn(&mut self, path: &Path, what: &str, e: impl std::fmt::Display) {
        self.summary
            .errors
            .push(format!("{}: {what}: {e}", path.display()));
        Progress::add(&self.ctx.progress.errors, 1);
    }

    /// The node for one directory entry; `None` if it was skipped or unreadable.
    fn node(&mut self, path: &Path, name: NameBytes, meta: &fs::Metadata) -> Result<Option<Node>> {
        let ft = meta.file_type();
        let mtime_ns = meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec());
        let mut node = Node {
            name,
            node_type: NodeType::File,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns,
            size: None,
            sha256: None,
            content: Vec::new(),
            content_lists: Vec::new(),
            subtree: None,
            target: None,
        };
        if ft.is_dir() {
            let mut children = Vec::new();
            match fs::read_dir(path) {
                Ok(entries) => {
                    let mut entries: Vec<_> = entries.collect();
                    entries.sort_by(|a, b| match (a, b) {
                        (Ok(a), Ok(b)) => a.file_name().cmp(&b.file_name()),
                        _ => std::cmp::Ordering::Equal,
                    });
                    for entry in entries {
                        let entry = match entry {
                            Ok(e) => e,
                            Err(e) => {
                                self.warn(path, "cannot list directory entry", e);
                                continue;
                            }
                        };
                        let child = entry.path();
                        match entry.metadata() {
                            Ok(m) => {
                                let n = NameBytes(entry.file_name().as_bytes().to_vec());
                                if let Some(c) = self.node(&child, n, &m)? {
                                    children.push(c);
                                }
                            }
                            Err(e) => self.warn(&child, "cannot stat", e),
                        }
                    }
                }
                Err(e) => self.warn(path, "cannot list directory", e),
            }
            self.summary.dirs += 1;
            node.node_type = NodeType::Dir;
            node.subtree = Some(self.submit_tree(&Tree { nodes: children })?);
        } else if ft.is_symlink() {
            match fs::read_link(path) {
                Ok(target) => {
                    self.summary.symlinks += 1;
                    node.node_type = NodeType::Symlink;
                    node.target = Some(NameBytes(target.as_os_str().as_bytes().to_vec()));
                }
                Err(e) => {
                    self.warn(path, "cannot read symlink", e);
                    return Ok(None);
                }
            }
        } else if ft.is_file() {
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) => {
                    self.warn(path, "cannot open", e);
                    return Ok(None);
                }
            };
            let content = match self.read_content(file) {
                Ok(c) => c,
                Err(ReadError::Source(e)) => {
                    self.warn(path, "cannot read", e);
                    return Ok(None);
                }
                Err(ReadError::Pipeline(e)) => return Err(e),
            };
            self.summary.files += 1;
            Progress::add(&self.ctx.progress.files, 1);
            let n = file_node(node.name, node.mode, node.uid, node.gid, mtime_ns, content);
            return Ok(Some(n));
        } else {
            let what = if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "FIFO"
            } else {
                "device"
            };
            self.skipped.push(format!("{} ({what})", path.display()));
            return Ok(None);
        }
        Ok(Some(node))
    }
}

enum ReadError {
    /// The source failed: for a file, reported and skipped; for a stream, fatal.
    Source(std::io::Error),
    /// The pipeline stopped.
    Pipeline(Error),
}

fn file_node(name: NameBytes, mode: u32, uid: u32, gid: u32, mtime_ns: i64, c: Content) -> Node {
    Node {
        name,
        node_type: NodeType::File,
        mode,
        uid,
        gid,
        mtime_ns,
        size: Some(c.size),
        sha256: Some(c.sha256),
        content: c.inline,
        content_lists: c.lists,
        subtree: None,
        target: None,
    }
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

async fn upload_packs(
    to: UploadTo<'_>,
    mut rx: tokio::sync::mpsc::Receiver<SealedPack>,
    uploads: usize,
    buffers: &BufferPool,
    cancel: &Cancel,
    progress: &Progress,
) -> Result<Uploaded> {
    let UploadTo {
        repo,
        key,
        prune_view,
    } = to;
    let mut done = Uploaded {
        pending: IndexSegment::default(),
        bytes: 0,
        packs: IdSet::default(),
    };
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = rx.recv(), if open && inflight.len() < uploads => match next {
                Some(sealed) => inflight.push(async move {
                    let SealedPack { pack, _token } = sealed;
                    let len = pack.bytes.len();
                    repo.store().put(&pack.name, pack.bytes.clone()).await?;
                    buffers.give_bytes(pack.bytes);
                    Ok::<_, Error>(IndexedPack { id: pack.id, length: len as u32, blobs: pack.entries })
                }),
                None => open = false,
            },
            Some(result) = inflight.next(), if !inflight.is_empty() => {
                let indexed = match result {
                    Ok(p) => p,
                    Err(e) => {
                        cancel.cancel();
                        return Err(e);
                    }
                };
                done.bytes += u64::from(indexed.length);
                done.packs.insert(indexed.id);
                Progress::add(&progress.stored_bytes, u64::from(indexed.length));
                done.pending.packs.push(indexed);
                if done.pending.blob_count() >= SEGMENT_BLOBS
                    || done.pending.packs.len() >= SEGMENT_PACKS
                {
                    let segment = std::mem::take(&mut done.pending);
                    // A checkpoint must not list a pack a prune swept meanwhile: later
                    // backups would deduplicate against data that is gone.
                    let packs = segment.packs.iter().map(|p| p.id).collect();
                    if let Err(e) = prune_view.check_commit(repo, &packs).await {
                        cancel.cancel();
                        return Err(e);
                    }
                    let (_, size) = repo.save_index(key, &segment).await?;
                    done.bytes += size;
                }
            },
            else => break,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key;
    use crate::snapshot::Source as SourceRecord;
    use crate::source::NamedStream;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_blob_that_would_not_restore_is_caught_before_upload() {
        let (key, repo) = (Key::random(), ObjectId::random());
        let keys = || pack::BlobKeys {
            epoch_key: &key,
            repo_id: &repo,
        };
        let data = b"INSERT INTO t VALUES (1, 'x');\n".repeat(500);
        let other = b"INSERT INTO t VALUES (2, 'y');\n".repeat(500);
        let compressed = zstd::bulk::compress(&data, 1).unwrap();
        let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
        let (mut scratch, mut check) = (Vec::new(), Vec::new());
        let id = BlobId([5; 32]);
        for (compression, payload) in [
            (Compression::Zstd, &compressed[..]),
            (Compression::None, &data[..]),
        ] {
            let mut sealed = Vec::new();
            pack::seal_blob(
                &key,
                &repo,
                id,
                BlobKind::Data,
                compression,
                data.len() as u32,
                payload,
                &mut sealed,
            );
            let entry = pack::BlobEntry {
                id,
                kind: BlobKind::Data,
                compression,
                offset: 0,
                length: sealed.len() as u32,
                raw_length: data.len() as u32,
            };
            let mut verify = |sealed: &[u8], data: &[u8]| {
                verify_sealed(
                    keys(),
                    &entry,
                    sealed,
                    data,
                    &mut scratch,
                    &mut check,
                    &mut decompressor,
                )
            };
            verify(&sealed, &data).unwrap();
            // Other plaintext than the id was hashed from: a compressor that got it wrong.
            let err = verify(&sealed, &other).unwrap_err().to_string();
            assert!(
                err.contains("does not decrypt and decompress to its input"),
                "{err}"
            );
            assert!(err.contains("nothing was written"), "{err}");
            // Sealed bytes damaged after sealing.
            let mut bad = sealed.clone();
            let last = bad.len() - 20;
            bad[last] ^= 1;
            let err = verify(&bad, &data).unwrap_err().to_string();
            assert!(
                err.contains("does not decrypt (authentication failed)"),
                "{err}"
            );
        }
    }

    /// Three streams read two at a time; the first one's data only arrives once the third
    /// stream has been opened (or after 10 s).
    struct Staggered {
        next: usize,
        third_opened: Option<mpsc::Sender<()>>,
        wait: Option<mpsc::Receiver<()>>,
        in_time: Arc<AtomicBool>,
    }

    /// Yields `data` once `gate` fires; records whether it fired in time.
    struct Gated {
        gate: Option<mpsc::Receiver<()>>,
        data: std::io::Cursor<Vec<u8>>,
        in_time: Arc<AtomicBool>,
    }

    impl Read for Gated {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                let fired = gate.recv_timeout(Duration::from_secs(10)).is_ok();
                self.in_time
                    .store(fired, std::sync::atomic::Ordering::SeqCst);
            }
            self.data.read(buf)
        }
    }

    fn data(i: usize) -> Vec<u8> {
        format!("stream {i}\n")
            .repeat(10_000 * (i + 1))
            .into_bytes()
    }

    impl StreamSet for Staggered {
        fn next_stream(&mut self) -> Result<Option<NamedStream>> {
            let i = self.next;
            self.next += 1;
            let reader: Box<dyn Read + Send> = match i {
                0 => Box::new(Gated {
                    gate: self.wait.take(),
                    data: std::io::Cursor::new(data(0)),
                    in_time: self.in_time.clone(),
                }),
                1 => Box::new(std::io::Cursor::new(data(1))),
                2 => {
                    let _ = self.third_opened.take().expect("opened once").send(());
                    Box::new(std::io::Cursor::new(data(2)))
                }
                _ => return Ok(None),
            };
            // Not in name order: the snapshot sorts them.
            Ok(Some(NamedStream {
                name: ["a.txt", "c.txt", "b.txt"][i].into(),
                reader,
            }))
        }

        fn finish(&mut self) -> Result<SourceRecord> {
            Ok(SourceRecord::Command {
                command: "staggered".into(),
            })
        }

        fn parallel_streams(&self) -> usize {
            2
        }
    }

    #[test]
    fn a_batch_going_out_of_scope_unsent_still_reaches_the_workers() {
        // As when a file's read fails half-way: its first chunks are in `seen` already.
        let (tx, rx) = sync_channel(4);
        let cancel = Cancel::new();
        {
            let mut batch = Batch::new(&tx, &cancel);
            batch.push(test_job()).unwrap();
        }
        let sent = rx.try_recv().expect("the batch was sent as it was dropped");
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].id, BlobId([7; 32]));
    }

    fn test_job() -> Job {
        Job {
            id: BlobId([7; 32]),
            kind: BlobKind::Data,
            data: Bytes::from_static(b"read before the error"),
        }
    }

    #[test]
    fn a_cancelled_batch_is_dropped_without_waiting_on_a_full_channel() {
        // The workers have stopped reading; the channel is full.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (tx, _rx) = sync_channel(1);
            tx.send(vec![test_job()]).unwrap();
            let cancel = Cancel::new();
            cancel.cancel();
            {
                let mut batch = Batch::new(&tx, &cancel);
                batch.push(test_job()).unwrap();
            }
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("dropping the batch blocked");
    }

    /// A stream that finishes early hands its slot to the next stream while an earlier,
    /// slower one is still being read; the snapshot lists the streams by name.
    #[tokio::test]
    async fn a_finished_stream_frees_its_slot_at_once() {
        let repo = crate::repository::for_tests("memory://").await;
        let (tx, rx) = mpsc::channel();
        let in_time = Arc::new(AtomicBool::new(false));
        let set = Staggered {
            next: 0,
            third_opened: Some(tx),
            wait: Some(rx),
            in_time: in_time.clone(),
        };
        let report = backup(
            &repo,
            Source::Streams(Box::new(set)),
            BackupOptions::new("staggered"),
        )
        .await
        .unwrap();
        assert!(
            in_time.load(std::sync::atomic::Ordering::SeqCst),
            "stream 2 was not opened while stream 0 was still being read"
        );
        let streams = &report.snapshot.streams;
        let names: Vec<&str> = streams.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(names, ["a.txt", "b.txt", "c.txt"]);
        for (s, i) in streams.iter().zip([0, 2, 1]) {
            assert_eq!(s.size, data(i).len() as u64);
            assert_eq!(s.sha256, Sha256::digest(&data(i)));
        }
    }
}
