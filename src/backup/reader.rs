//! The reader stage: everything that must happen in stream order (reading, hashing, chunking,
//! deduplicating, walking directories, writing trees).

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use bytes::Bytes;
use jiff::Timestamp;

use crate::chunker::{Chunker, ChunkerParams};
use crate::crypto::Sha256;
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::pack::BlobKind;
use crate::progress::Progress;
use crate::snapshot::{Source as SnapshotSource, StreamDigest, Summary};
use crate::source::{self, StreamSet};
use crate::tree::{self, NameBytes, Node, NodeType, Tree};

use super::*;

impl ReadCounts {
    pub(super) fn add_to(&self, summary: &mut Summary) {
        summary.logical_bytes += Progress::get(&self.logical_bytes);
        summary.blobs += Progress::get(&self.blobs);
        summary.new_blobs += Progress::get(&self.new_blobs);
        summary.new_bytes += Progress::get(&self.new_bytes);
    }
}

impl Reader<'_> {
    pub(super) fn read_source(
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
    pub(super) fn read_copy(
        &mut self,
        feed: super::feed::CopyFeed,
    ) -> Result<(BlobId, Vec<StreamDigest>, Option<SnapshotSource>)> {
        use super::feed::CopyEvent;
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
                                feed.budget.add_permits(super::feed::kib(b.len()) as usize);
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
    pub(super) fn submit(&self, kind: BlobKind, data: Bytes, batch: &mut Batch) -> Result<BlobId> {
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

    pub(super) fn submit_tree(&self, tree: &Tree) -> Result<BlobId> {
        let mut batch = Batch::new(&self.jobs, &self.ctx.cancel);
        let id = self.submit(BlobKind::Tree, Bytes::from(tree.encode()), &mut batch)?;
        batch.send()?;
        Ok(id)
    }

    pub(super) fn read_content(&self, reader: impl Read) -> Result<Content, ReadError> {
        let mut chunker = Chunker::with_pool(reader, &self.params, self.read_buffers.clone());
        self.read_chunks(|| chunker.next_chunk().map_err(ReadError::Source))
    }

    /// Stores a file's content given as chunks, in order, until `next` returns `None`.
    pub(super) fn read_chunks(
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
    pub(super) fn read_streams(
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

    pub(super) fn warn(&mut self, path: &Path, what: &str, e: impl std::fmt::Display) {
        self.summary
            .errors
            .push(format!("{}: {what}: {e}", path.display()));
        Progress::add(&self.ctx.progress.errors, 1);
    }

    /// The node for one directory entry; `None` if it was skipped or unreadable.
    pub(super) fn node(
        &mut self,
        path: &Path,
        name: NameBytes,
        meta: &fs::Metadata,
    ) -> Result<Option<Node>> {
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

pub(super) fn file_node(
    name: NameBytes,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    c: Content,
) -> Node {
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
