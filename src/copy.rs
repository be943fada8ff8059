//! Copy: snapshots from one repository to another (the monthly foreign-region copy).
//!
//! A copy is the same snapshot (time, host, name, source record, stream digests) stored again
//! under the destination's own keys: a key of the source opens nothing in the destination.
//! Blob ids are keyed hashes, so they differ between repositories; the copy therefore reads
//! every blob of the snapshot from the source (ranged reads, authenticated on decryption),
//! hashes it under the destination's key, and uploads only the blobs the destination lacks, in
//! the destination's own packs, each verified before upload as a backup's are. Blob boundaries
//! are kept: copies of nightly snapshots deduplicate in the destination as they did in the
//! source. Every file's content is checked against the size and SHA-256 its node records
//! before the tree that holds it is written.
//!
//! The copy goes through the backup pipeline ([`crate::backup::Source::Copy`]), so it commits
//! the way a backup does: packs, index segments (every few packs, the checkpoint an
//! interrupted copy resumes from), then the manifest; it respects a running prune's marks.
//! The manifest records its [`Origin`]; a snapshot the destination already holds a copy of is
//! skipped, so running the same copy again does nothing.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use serde::Serialize;

use crate::backup::feed::{CopyEvent, CopyFeed, IN_FLIGHT_BYTES, kib};
use crate::backup::{self, BackupOptions, BackupReport, Source};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::progress::{Cancel, Progress};
use crate::repository::Repository;
use crate::restore::{self, RestoreOptions, Restorer};
use crate::snapshot::{Origin, Snapshot};
use crate::tree::NodeType;

/// Which snapshots to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every snapshot the destination has no copy of yet.
    All,
    /// The newest snapshot of each host and name.
    Latest,
    /// One snapshot: an id prefix, or `latest` (of `--name`).
    Id(String),
}

/// How to copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub selection: Selection,
    /// Only snapshots with one of these names (all when empty).
    pub names: Vec<String>,
    /// Compression workers for the destination (default: one per core).
    pub threads: usize,
    /// Packs uploading at once (0: the destination store's default).
    pub uploads: usize,
    /// Ranged reads from the source in flight.
    pub fetches: usize,
    /// Select and report; copy nothing.
    pub dry_run: bool,
    pub cancel: Cancel,
    pub progress: Arc<Progress>,
    /// This host's ledger of the destination: copies join its chain.
    pub ledger: Option<crate::ledger::Ledger>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            selection: Selection::Latest,
            names: Vec::new(),
            threads: 0,
            uploads: 0,
            fetches: 4,
            dry_run: false,
            cancel: Cancel::new(),
            ledger: None,
            progress: Progress::new(),
        }
    }
}

/// One snapshot copied.
#[derive(Debug, Clone, Serialize)]
pub struct Copied {
    /// Its id in the source.
    pub source: String,
    /// Its id in the destination.
    pub snapshot: String,
    pub name: String,
    pub host: String,
    pub time: jiff::Timestamp,
    pub logical_bytes: u64,
    /// Plaintext bytes the destination did not have.
    pub new_bytes: u64,
    /// Bytes uploaded to the destination.
    pub stored_bytes: u64,
    pub seconds: f64,
}

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub source: String,
    pub destination: String,
    pub dry_run: bool,
    pub copied: Vec<Copied>,
    /// Selected snapshots the destination already holds (source ids).
    pub already_copied: Vec<String>,
    /// With `dry_run`: the snapshots that would be copied (source ids).
    pub would_copy: Vec<String>,
    /// Source snapshots that could not be read (not copied).
    pub warnings: Vec<String>,
}

impl CopyReport {
    pub fn stored_bytes(&self) -> u64 {
        self.copied.iter().map(|c| c.stored_bytes).sum()
    }
}

/// Copies the selected snapshots of `src` that `dst` has no copy of yet, oldest first.
pub async fn copy(src: &Repository, dst: &Repository, opts: &CopyOptions) -> Result<CopyReport> {
    src.full("copy from the repository")?;
    dst.full("copy into the repository (it must list what the destination holds)")?;
    if src.id() == dst.id() {
        return Err(Error::invalid(format!(
            "{} and {} are the same repository ({}); copy to another one",
            src.store().location(),
            dst.store().location(),
            src.id().short()
        )));
    }
    let (snapshots, unreadable) = src.snapshots().await?;
    let (held, _) = dst.snapshots().await?;
    let mut report = CopyReport {
        source: src.store().location().to_string(),
        destination: dst.store().location().to_string(),
        dry_run: opts.dry_run,
        warnings: unreadable.iter().map(|u| u.to_string()).collect(),
        ..CopyReport::default()
    };
    let selected = select(&snapshots, opts)?;
    for s in selected {
        if already_in(&held, src.id(), dst.id(), s) {
            report.already_copied.push(s.id.to_hex());
            continue;
        }
        if opts.dry_run {
            report.would_copy.push(s.id.to_hex());
            continue;
        }
        if opts.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let started = std::time::Instant::now();
        let done = copy_snapshot(src, dst, s, opts).await?;
        let summary = &done.snapshot.summary;
        report.copied.push(Copied {
            source: s.id.to_hex(),
            snapshot: done.snapshot.id.to_hex(),
            name: s.name.clone(),
            host: s.host.clone(),
            time: s.time,
            logical_bytes: summary.logical_bytes,
            new_bytes: summary.new_bytes,
            stored_bytes: summary.stored_bytes,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    if !opts.dry_run && !report.copied.is_empty() {
        let copied: Vec<String> = report
            .copied
            .iter()
            .map(|c| c.source[..8].to_string())
            .collect();
        for (repo, role) in [(dst, "to"), (src, "from")] {
            let event = crate::audit::Event::new("copy", copied.join(","))
                .with("from", src.store().location())
                .with("to", dst.store().location())
                .with("snapshots", report.copied.len())
                .with("side", role);
            let ledger = if role == "to" {
                opts.ledger.as_ref()
            } else {
                None
            };
            if let Some(w) = crate::audit::record(repo, event, ledger).await {
                report.warnings.push(w);
            }
        }
    }
    Ok(report)
}

/// The snapshots `opts` selects, oldest first.
fn select<'a>(snapshots: &'a [Snapshot], opts: &CopyOptions) -> Result<Vec<&'a Snapshot>> {
    let named = |s: &&Snapshot| opts.names.is_empty() || opts.names.contains(&s.name);
    let mut out: Vec<&Snapshot> = match &opts.selection {
        Selection::All => snapshots.iter().filter(named).collect(),
        Selection::Latest => {
            let mut newest: std::collections::BTreeMap<(&str, &str), &Snapshot> =
                Default::default();
            for s in snapshots.iter().filter(named) {
                let e = newest.entry((&s.host, &s.name)).or_insert(s);
                if (s.time, s.finished) > (e.time, e.finished) {
                    *e = s;
                }
            }
            newest.into_values().collect()
        }
        Selection::Id(spec) => {
            let name = match opts.names.as_slice() {
                [] => None,
                [n] => Some(n.as_str()),
                _ => return Err(Error::invalid("a snapshot id goes with at most one --name")),
            };
            vec![crate::snapshot::select(snapshots, spec, name)?]
        }
    };
    out.sort_by_key(|s| (s.time, s.finished));
    Ok(out)
}

/// Whether `held` (the destination's snapshots) already holds `s`: a copy of it, or, for a
/// snapshot that is itself a copy from the destination, its original.
fn already_in(held: &[Snapshot], src: ObjectId, dst: ObjectId, s: &Snapshot) -> bool {
    held.iter().any(|h| {
        h.origin
            .as_ref()
            .is_some_and(|o| o.repository == src && o.snapshot == s.id)
    }) || s
        .origin
        .as_ref()
        .is_some_and(|o| o.repository == dst && held.iter().any(|h| h.id == o.snapshot))
}

/// Copies one snapshot, whether or not the destination has it already.
pub async fn copy_snapshot(
    src: &Repository,
    dst: &Repository,
    snapshot: &Snapshot,
    opts: &CopyOptions,
) -> Result<BackupReport> {
    opts.progress.total_bytes.store(
        snapshot.summary.logical_bytes,
        std::sync::atomic::Ordering::Relaxed,
    );
    let restorer = Restorer::new(
        src,
        snapshot,
        RestoreOptions {
            fetches: opts.fetches,
            overwrite: false,
            keep_setid: false,
            cancel: opts.cancel.clone(),
            // The destination's pipeline counts the bytes; the source's reads would double them.
            progress: Progress::new(),
        },
    )
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let budget = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BYTES / 1024));
    let feed = CopyFeed {
        events: rx,
        snapshot: snapshot.clone(),
        budget: budget.clone(),
    };
    let mut bopts = BackupOptions::new(snapshot.name.clone());
    bopts.host = snapshot.host.clone();
    bopts.time = Some(snapshot.time);
    bopts.tags = snapshot.tags.clone();
    bopts.threads = opts.threads;
    bopts.uploads = opts.uploads;
    bopts.cancel = opts.cancel.clone();
    bopts.progress = opts.progress.clone();
    bopts.ledger = opts.ledger.clone();
    bopts.set = snapshot.set.clone();
    bopts.origin = Some(Origin {
        repository: src.id(),
        snapshot: snapshot.id,
    });
    let walk = async {
        let walked = walk(&restorer, snapshot, &tx, &budget).await;
        drop(tx);
        if walked.is_err() {
            // The pipeline sees the feed close and stops; nothing is committed.
            opts.cancel.cancel();
        }
        walked
    };
    let (walked, copied) = tokio::join!(
        walk,
        backup::backup(dst, Source::Copy(Box::new(feed)), bopts)
    );
    match (walked, copied) {
        (Err(e), _) => Err(e),
        (Ok(()), r) => r,
    }
}

/// Sends the snapshot's tree, depth first, with every file's blobs. A closed channel (the
/// destination's pipeline failed; its error is the one reported) ends the walk quietly.
async fn walk(
    r: &Restorer<'_>,
    snapshot: &Snapshot,
    tx: &tokio::sync::mpsc::Sender<CopyEvent>,
    budget: &tokio::sync::Semaphore,
) -> Result<()> {
    let walked = match walk_tree(r, snapshot.tree, tx, budget).await {
        Ok(()) => send(tx, CopyEvent::Done).await,
        e => e,
    };
    match walked {
        Ok(()) | Err(Stop::Closed) => Ok(()),
        Err(Stop::Failed(e)) => Err(e),
    }
}

enum Stop {
    /// The receiving pipeline is gone.
    Closed,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Failed(e)
    }
}

async fn send(tx: &tokio::sync::mpsc::Sender<CopyEvent>, e: CopyEvent) -> Result<(), Stop> {
    tx.send(e).await.map_err(|_| Stop::Closed)
}

fn walk_tree<'a>(
    r: &'a Restorer<'_>,
    id: crate::id::BlobId,
    tx: &'a tokio::sync::mpsc::Sender<CopyEvent>,
    budget: &'a tokio::sync::Semaphore,
) -> futures::future::BoxFuture<'a, Result<(), Stop>> {
    Box::pin(async move {
        let tree = r.tree(&id).await?;
        for node in tree.nodes {
            match node.node_type {
                NodeType::Dir => {
                    let subtree = node.subtree.expect("checked by Tree::decode");
                    send(tx, CopyEvent::Dir(node)).await?;
                    walk_tree(r, subtree, tx, budget).await?;
                    send(tx, CopyEvent::EndDir).await?;
                }
                NodeType::Symlink => send(tx, CopyEvent::Symlink(node)).await?,
                NodeType::File => {
                    let parts = restore::content_lists(&node);
                    let file = node.clone();
                    send(tx, CopyEvent::File(file)).await?;
                    for part in parts {
                        let ids = r.content_ids(&node, part).await?;
                        let mut ranges = r.decoded(&ids)?;
                        while let Some(d) = ranges.try_next().await.map_err(|e| r.context(e))? {
                            let plain = Bytes::from(d.plain);
                            let mut at = 0;
                            for len in d.lengths {
                                let end = at + len as usize;
                                budget
                                    .acquire_many(kib(len as usize))
                                    .await
                                    .map_err(|_| Stop::Closed)?
                                    .forget();
                                send(tx, CopyEvent::Blob(plain.slice(at..end))).await?;
                                at = end;
                            }
                        }
                    }
                    send(tx, CopyEvent::EndFile).await?;
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(n: u8, time: &str, host: &str, name: &str) -> Snapshot {
        Snapshot::for_test(ObjectId([n; 16]), time, host, name)
    }

    #[test]
    fn latest_is_the_newest_of_each_host_and_name_oldest_first() {
        let list = vec![
            snap(1, "2026-10-01T02:00:00Z", "a", "db"),
            snap(2, "2026-10-02T02:00:00Z", "a", "db"),
            snap(3, "2026-10-01T03:00:00Z", "b", "db"),
            snap(4, "2026-09-30T02:00:00Z", "a", "files"),
        ];
        let opts = CopyOptions::default();
        let ids: Vec<u8> = select(&list, &opts)
            .unwrap()
            .iter()
            .map(|s| s.id.0[0])
            .collect();
        assert_eq!(ids, vec![4, 3, 2]);
        let opts = CopyOptions {
            names: vec!["db".into()],
            ..CopyOptions::default()
        };
        let ids: Vec<u8> = select(&list, &opts)
            .unwrap()
            .iter()
            .map(|s| s.id.0[0])
            .collect();
        assert_eq!(ids, vec![3, 2]);
        let opts = CopyOptions {
            selection: Selection::All,
            ..CopyOptions::default()
        };
        assert_eq!(select(&list, &opts).unwrap().len(), 4);
    }

    #[test]
    fn a_snapshot_is_held_by_its_copy_or_its_original() {
        let (src, dst) = (ObjectId([10; 16]), ObjectId([20; 16]));
        let s = snap(1, "2026-10-01T02:00:00Z", "a", "db");
        let mut copy = snap(2, "2026-10-01T02:00:00Z", "a", "db");
        copy.origin = Some(Origin {
            repository: src,
            snapshot: s.id,
        });
        assert!(already_in(std::slice::from_ref(&copy), src, dst, &s));
        assert!(!already_in(std::slice::from_ref(&copy), dst, src, &s));
        assert!(!already_in(&[], src, dst, &s));
        // Copying the copy back finds the original.
        assert!(already_in(std::slice::from_ref(&s), dst, src, &copy));
    }
}
