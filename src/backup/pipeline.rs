//! The pipeline's plumbing: upload tokens, the open packs workers fill and ship, batches of
//! new blobs, and the worker threads.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use crate::chunker::ChunkerParams;
use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::index::{IdSet, Index};
use crate::pack::{self, BlobKind, Compression, PackWriter};
use crate::progress::Cancel;
use crate::snapshot::Summary;

use super::*;

impl Drop for Token {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

impl Tokens {
    pub(super) fn new(n: usize) -> Tokens {
        let (give, take) = sync_channel(n);
        for _ in 0..n {
            give.send(()).expect("capacity n");
        }
        Tokens {
            give,
            take: Mutex::new(take),
        }
    }

    pub(super) fn acquire(&self) -> Token {
        self.take
            .lock()
            .expect("not poisoned")
            .recv()
            .expect("Tokens holds a sender");
        Token(self.give.clone())
    }
}

impl Shared {
    pub(super) fn new_pack(&self, kind: BlobKind) -> PackWriter {
        // Tree packs are usually small: they grow as needed instead of taking a pack buffer.
        let buf = match kind {
            BlobKind::Data => self.buffers.take(),
            BlobKind::Tree => Vec::new(),
        };
        PackWriter::with_buffer(self.epoch, self.key.id, self.key.key(), self.repo_id, buf)
    }

    /// Appends a sealed, verified blob to the open pack of its kind; seals and ships the pack
    /// when it is full (`scratch` is the caller's buffer for the pack's check).
    pub(super) fn add(
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

    pub(super) fn blob_keys(&self) -> pack::BlobKeys<'_> {
        pack::BlobKeys {
            epoch_key: self.key.key(),
            repo_id: &self.repo_id,
        }
    }

    pub(super) fn ship(
        &self,
        writer: PackWriter,
        token: Token,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
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
    pub(super) fn flush(&self) -> Result<()> {
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

impl<'a> Batch<'a> {
    pub(super) fn new(to: &'a SyncSender<Vec<Job>>, cancel: &'a Cancel) -> Batch<'a> {
        Batch {
            jobs: Vec::new(),
            bytes: 0,
            to,
            cancel,
        }
    }

    /// Adds a blob; sends the batch once it is full.
    pub(super) fn push(&mut self, job: Job) -> Result<()> {
        self.bytes += job.data.len();
        self.jobs.push(job);
        if self.bytes >= BATCH_BYTES {
            self.send()?;
        }
        Ok(())
    }

    /// Hands the blobs to the workers.
    pub(super) fn send(&mut self) -> Result<()> {
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

pub(super) fn run_pipeline(
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
pub(super) const LARGE_CHUNK: usize = 256 << 10;

/// A compression worker: takes batches of new blobs and stores each (see
/// [`Compressors::store`]) until the reader is done.
pub(super) fn worker(ctx: &Shared, jobs: &Mutex<Receiver<Vec<Job>>>) -> Result<()> {
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
