//! `check`: prove the repository is readable and complete, and name whatever is not.
//!
//! Without `read_data`: every key slot, epoch key, snapshot and index segment opens; every pack
//! the index names exists with the recorded size; every tree of every snapshot decrypts and
//! parses; every blob a snapshot references is indexed. With `read_data`: additionally every
//! indexed pack is read whole, its table of contents must match the index, and every blob must
//! decrypt, decompress and hash to its id. Packs that no index names are the leftovers of an
//! interrupted backup: reported as garbage for prune, not as damage.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;

use crate::error::Result;
use crate::id::{BlobId, ObjectId};
use crate::index::{IdMap, IdSet, Index};
use crate::object::{Epoch, name};
use crate::pack::{self, BlobEntry, BlobKind};
use crate::progress::{Cancel, Progress};
use crate::repository::Repository;
use crate::snapshot::Snapshot;
use crate::tree::{self, Tree};

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    pub read_data: bool,
    /// Packs read at once with `read_data`.
    pub concurrency: usize,
    pub cancel: Cancel,
    pub progress: Arc<Progress>,
    /// This host's ledger of the repository: what it saw last time is compared too.
    pub ledger: Option<crate::ledger::Ledger>,
    /// Take the repository as it is now as what this host has seen (after findings were
    /// looked into).
    pub acknowledge: bool,
}

/// What `check` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub index_segments: usize,
    pub packs: usize,
    pub blobs: usize,
    pub trees: usize,
    pub packs_read: usize,
    pub bytes_read: u64,
    /// Packs no index lists: garbage from interrupted backups, removed by prune.
    pub unindexed_packs: Vec<String>,
    /// Epoch key objects of another key generation than the one in use: left by an
    /// interrupted `kluis key rotate`, deleted when it runs again.
    pub old_generation_keys: Vec<String>,
    /// Damage, each naming the object and, where known, the snapshots it affects.
    pub problems: Vec<String>,
    /// Records removed, rolled back or replayed (also counted in `problems`).
    pub ledger: crate::ledger::Verification,
    /// The WAL archive: its files and gaps (gaps are also in `problems`).
    pub wal: crate::wal::WalCheck,
}

pub async fn check(repo: &Repository, opts: CheckOptions) -> Result<CheckReport> {
    repo.full("check the repository")?;
    let mut report = CheckReport::default();

    let (_, slot_errors) = repo.key_slots().await?;
    report
        .problems
        .extend(slot_errors.iter().map(|e| e.to_string()));

    for o in repo.store().list(name::EPOCHS).await? {
        match name::parse_epoch_key(&o.name) {
            Some((_, _, g)) if g != repo.generation() => {
                report.old_generation_keys.push(o.name.clone())
            }
            Some((epoch, id, _)) => {
                if let Err(e) = repo.epoch_key(epoch, id).await {
                    report.problems.push(e.to_string());
                }
            }
            None => report
                .problems
                .push(format!("{}: not an epoch key name", o.name)),
        }
    }

    let (snapshots, snapshot_errors) = repo.snapshots().await?;
    report.snapshots = snapshots.len();
    report.wal = crate::wal::check(repo, &snapshots, opts.read_data).await?;
    report.problems.extend(report.wal.problems.iter().cloned());
    report
        .problems
        .extend(snapshot_errors.iter().map(|e| e.to_string()));
    report.ledger = crate::ledger::verify(
        repo,
        &snapshots,
        &snapshot_errors,
        opts.ledger.as_ref(),
        opts.acknowledge,
    )
    .await?;
    report
        .problems
        .extend(report.ledger.problems().map(|f| f.to_string()));

    let segments = repo.index_segments(name::INDEX).await?;
    report.index_segments = segments.len();
    let mut index = Index::default();
    let mut superseded = std::collections::HashSet::new();
    let mut loaded = Vec::new();
    for (object, result) in segments {
        match result {
            Ok((epoch, key_id, seg)) => {
                superseded.extend(seg.supersedes.iter().copied());
                loaded.push((object, epoch, key_id, seg));
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    for (object, epoch, key_id, seg) in &loaded {
        if name::parse_epoch_object(name::INDEX, object)
            .is_some_and(|(_, id)| superseded.contains(&id))
        {
            continue;
        }
        index.add_segment(*epoch, *key_id, seg);
    }
    report.packs = index.packs().len();
    report.blobs = index.blob_count();

    let listed: HashMap<String, u64> = repo.store().sizes(name::DATA).await?;
    let mut indexed_names = std::collections::HashSet::new();
    for p in index.packs() {
        let pack_name = name::pack(p.epoch, &p.id);
        match listed.get(&pack_name) {
            None => report.problems.push(format!(
                "{pack_name}: pack is missing but the index lists it"
            )),
            Some(&size) if size != u64::from(p.length) => report.problems.push(format!(
                "{pack_name}: pack is {size} bytes, the index says {}",
                p.length
            )),
            Some(_) => {}
        }
        indexed_names.insert(pack_name);
    }
    for name in listed.keys() {
        if !indexed_names.contains(name) {
            if name::parse_epoch_object(name::DATA, name).is_some() {
                report.unindexed_packs.push(name.clone());
            } else {
                report.problems.push(format!("{name}: not a pack name"));
            }
        }
    }
    report.unindexed_packs.sort();

    // Which snapshot first needs each blob, to name the damage a bad pack does.
    let mut users: IdMap<BlobId, u32> = IdMap::default();
    let mut trees_seen: IdSet<BlobId> = IdSet::default();
    for (n, snapshot) in snapshots.iter().enumerate() {
        if opts.cancel.is_cancelled() {
            return Err(crate::Error::Interrupted);
        }
        let mut walker = Walker {
            repo,
            index: &index,
            snapshot,
            number: n as u32,
            users: &mut users,
            trees_seen: &mut trees_seen,
            problems: &mut report.problems,
            trees: 0,
        };
        walker.walk(snapshot.tree).await;
        report.trees += walker.trees;
    }

    if opts.read_data {
        let mut by_pack: HashMap<ObjectId, Vec<BlobEntry>> = HashMap::new();
        for (id, pack, loc) in index.blobs() {
            by_pack.entry(pack.id).or_default().push(loc.entry(*id));
        }
        let packs: Vec<_> = index
            .packs()
            .iter()
            .filter(|p| listed.contains_key(&name::pack(p.epoch, &p.id)))
            .cloned()
            .collect();
        let total: u64 = packs.iter().map(|p| u64::from(p.length)).sum();
        opts.progress
            .total_bytes
            .store(total, std::sync::atomic::Ordering::Relaxed);
        let by_pack = &by_pack;
        let mut results = futures::stream::iter(packs)
            .map(|p| async move {
                let pack_name = name::pack(p.epoch, &p.id);
                let mut expected = by_pack.get(&p.id).cloned().unwrap_or_default();
                expected.sort_by_key(|e| e.offset);
                let result =
                    read_pack(repo, (p.epoch, p.key_id), &pack_name, p.length, expected).await;
                (pack_name, p.length, result)
            })
            .buffer_unordered(opts.concurrency.max(1));
        while let Some((pack_name, length, result)) = results.next().await {
            if opts.cancel.is_cancelled() {
                return Err(crate::Error::Interrupted);
            }
            report.packs_read += 1;
            report.bytes_read += u64::from(length);
            Progress::add(&opts.progress.bytes, u64::from(length));
            if let Err((e, bad_blobs)) = result {
                let mut affected: Vec<String> = bad_blobs
                    .iter()
                    .filter_map(|b| users.get(b))
                    .map(|&n| snapshots[n as usize].id.short())
                    .collect();
                affected.sort();
                affected.dedup();
                if affected.is_empty() {
                    report.problems.push(format!("{pack_name}: {e}"));
                } else {
                    report.problems.push(format!(
                        "{pack_name}: {e} (affects snapshot {})",
                        affected.join(", ")
                    ));
                }
            }
        }
    }
    Ok(report)
}

/// Reads one pack and checks it against the index; on failure, the error and the blobs lost.
async fn read_pack(
    repo: &Repository,
    (epoch, key_id): (Epoch, ObjectId),
    pack_name: &str,
    length: u32,
    expected: Vec<BlobEntry>,
) -> std::result::Result<(), (crate::Error, Vec<BlobId>)> {
    let all = || expected.iter().map(|e| e.id).collect::<Vec<_>>();
    // No more than the index says the pack holds: a pack swapped for a huge object since the
    // listing is damage, not a reason to fill memory.
    let bytes = repo
        .store()
        .get_bounded(pack_name, u64::from(length))
        .await
        .map_err(|e| (e, all()))?;
    let key = repo
        .epoch_key(epoch, key_id)
        .await
        .map_err(|e| (e, all()))?;
    let repo_id = repo.id();
    let name = pack_name.to_string();
    tokio::task::spawn_blocking(move || {
        let all = || expected.iter().map(|e| e.id).collect::<Vec<_>>();
        let pkey = pack::pack_key(key.key(), &repo_id, &name);
        let toc = pack::read_toc(&name, &bytes, &pkey, &repo_id).map_err(|e| (e, all()))?;
        pack::check_key_id(&name, &bytes, &key_id).map_err(|e| (e, all()))?;
        for e in &expected {
            if !toc.contains(e) {
                return Err((
                    crate::Error::corrupt(
                        &name,
                        format!(
                            "blob {} is indexed but not in the pack's table of contents",
                            e.id
                        ),
                    ),
                    vec![e.id],
                ));
            }
        }
        let keys = pack::BlobKeys {
            epoch_key: key.key(),
            repo_id: &repo_id,
        };
        let mut dec =
            zstd::bulk::Decompressor::new().map_err(|e| (crate::Error::io("zstd", e), vec![]))?;
        for e in &toc {
            let mut stored = bytes[e.offset as usize..(e.offset + e.length) as usize].to_vec();
            let plain = pack::open_blob(&name, keys, e, &mut stored, &mut dec)
                .map_err(|err| (err, vec![e.id]))?;
            if key.blob_id(&plain) != e.id {
                return Err((
                    crate::Error::corrupt(&name, format!("blob {} does not hash to its id", e.id)),
                    vec![e.id],
                ));
            }
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| {
        Err((
            crate::Error::invalid(format!("check worker crashed: {e}")),
            vec![],
        ))
    })
}

struct Walker<'a> {
    repo: &'a Repository,
    index: &'a Index,
    snapshot: &'a Snapshot,
    number: u32,
    users: &'a mut IdMap<BlobId, u32>,
    trees_seen: &'a mut IdSet<BlobId>,
    problems: &'a mut Vec<String>,
    trees: usize,
}

impl Walker<'_> {
    fn problem(&mut self, what: String) {
        self.problems.push(format!(
            "{what} (affects snapshot {})",
            self.snapshot.id.short()
        ));
    }

    fn use_blob(&mut self, id: BlobId, kind: BlobKind) -> bool {
        self.users.entry(id).or_insert(self.number);
        match self.index.get(&id) {
            Some((_, loc)) if loc.kind == kind => true,
            Some(_) => {
                self.problem(format!("blob {id}: indexed with the wrong kind"));
                false
            }
            None => {
                self.problem(format!(
                    "blob {id}: referenced but not in any index segment"
                ));
                false
            }
        }
    }

    fn walk(&mut self, tree_id: BlobId) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            if !self.trees_seen.insert(tree_id) {
                self.users.entry(tree_id).or_insert(self.number);
                return;
            }
            if !self.use_blob(tree_id, BlobKind::Tree) {
                return;
            }
            self.trees += 1;
            let tree = match self.repo.read_blob(self.index, &tree_id).await {
                Ok(bytes) => match Tree::decode(&format!("tree {tree_id}"), &bytes) {
                    Ok(t) => t,
                    Err(e) => return self.problem(e.to_string()),
                },
                Err(e) => return self.problem(e.to_string()),
            };
            for node in tree.nodes {
                for id in &node.content {
                    self.use_blob(*id, BlobKind::Data);
                }
                for list in &node.content_lists {
                    if !self.use_blob(*list, BlobKind::Tree) {
                        continue;
                    }
                    match self.repo.read_blob(self.index, list).await {
                        Ok(bytes) => {
                            match tree::decode_list(&format!("content list {list}"), &bytes) {
                                Ok(ids) => {
                                    for id in ids {
                                        self.use_blob(id, BlobKind::Data);
                                    }
                                }
                                Err(e) => self.problem(e.to_string()),
                            }
                        }
                        Err(e) => self.problem(e.to_string()),
                    }
                }
                if let Some(sub) = node.subtree {
                    self.walk(sub).await;
                }
            }
        })
    }
}
