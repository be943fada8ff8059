//! The ledger: removal, rollback and replay of records made detectable.
//!
//! Someone who can write to the bucket but holds no key cannot forge or alter a record (every
//! record is sealed, and its name is in its associated data, so a record can only live at its
//! own name and a name is never reused). They can delete records, put back an old copy of the
//! whole bucket, or put back a manifest that was forgotten. Three things catch that:
//!
//! - **Chains.** Every record a host writes (snapshot manifests, drill reports, forget records)
//!   carries a [`Chain`]: this host's chain id for the repository, a sequence number, and the
//!   name of the previous record of the chain. A record that a later record names must still
//!   exist, or be named by a forget record.
//! - **Forget records** (`forgotten/<id>`): `kluis forget` and kluisd's retention write one,
//!   naming the manifests they remove, *before* removing them. A manifest a forget record names
//!   that is present again was replayed (or its forget was interrupted); prune deletes it.
//! - **What this host saw** (`<state dir>/ledger/<repository id>.json`): the head of its chain
//!   and every record it saw at its last verification. A record it saw that is gone without a
//!   forget record was deleted, or the repository was rolled back.
//!
//! [`verify`] compares; `kluis check` and kluisd run it (metric
//! `kluis_repository_integrity_problems`, and an alert). Writers hold a lock on the state file
//! from reading the chain's head until their record is written, so a host's records form one
//! chain even when its jobs run side by side.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::object::{Kind, name};
use crate::repository::{Repository, UnreadableSnapshot};
use crate::snapshot::Snapshot;

pub use crate::snapshot::Chain;

/// `forgotten/<id>`: manifests removed on purpose, named before they were removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forgotten {
    pub id: ObjectId,
    pub time: Timestamp,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Chain>,
    /// Object names of the removed records.
    pub records: Vec<String>,
}

/// This host's view of one repository, kept in its state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    repository: ObjectId,
    location: String,
    chain: ObjectId,
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head: Option<String>,
    /// Every record seen at the last verification (and every record written since).
    seen: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verified: Option<Timestamp>,
}

/// A host's ledger of one repository: where its state lives.
#[derive(Debug, Clone)]
pub struct Ledger {
    path: PathBuf,
    repository: ObjectId,
    location: String,
}

impl Ledger {
    /// The ledger of `repo` under `state_dir` (created when missing, private): one per
    /// repository and location, so a copy of a bucket used from this host has its own.
    pub fn open(state_dir: &Path, repo: &Repository) -> Result<Ledger> {
        let dir = state_dir.join("ledger");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let location = repo.store().location().to_string();
        let place = blake3::hash(location.as_bytes()).to_hex();
        Ok(Ledger {
            path: dir.join(format!("{}.{}.json", repo.id(), &place[..8])),
            repository: repo.id(),
            location,
        })
    }

    /// Where this host keeps it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    fn load(&self) -> Result<State> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes).map_err(|e| {
                Error::invalid(format!(
                    "{}: does not parse ({e}); move it aside to start this host's ledger afresh",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
                repository: self.repository,
                location: self.location.clone(),
                chain: ObjectId::random(),
                ..State::default()
            }),
            Err(e) => Err(Error::io(&self.path, e)),
        }
    }

    fn save(&self, state: &State) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("ledger state serializes");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| Error::io(&self.path, e))
    }

    /// Writes this host's state for the repository if it has none yet (so a repository this
    /// host created is known here before anything was written to it).
    pub fn touch(&self) -> Result<()> {
        if self.path.exists() {
            return Ok(());
        }
        self.save(&self.load()?)
    }

    /// Takes this host's chain of the repository for one record: the lock is held until the
    /// returned [`Link`] is committed or dropped. Take it before the last checks that make the
    /// record safe to write (prune's commit check): waiting for it must not come between them.
    pub async fn link(&self) -> Result<Link<'_>> {
        let lock = lock(&self.lock_path()).await?;
        let state = self.load()?;
        let chain = Chain {
            id: state.chain,
            seq: state.seq + 1,
            previous: state.head.clone(),
        };
        Ok(Link {
            ledger: self,
            _lock: lock,
            state,
            chain,
        })
    }
}

/// Takes an exclusive `flock` on `path`, waiting without blocking a runtime thread.
async fn lock(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(Error::io(path, std::io::Error::from(e))),
        }
    }
}

/// One record's place in the chain, held while it is written.
pub struct Link<'a> {
    ledger: &'a Ledger,
    _lock: std::fs::File,
    state: State,
    /// What the record carries.
    pub chain: Chain,
}

impl Link<'_> {
    /// The record `object` was written: it is the chain's new head.
    pub fn committed(mut self, object: &str) -> Result<()> {
        self.state.seq = self.chain.seq;
        self.state.head = Some(object.to_string());
        self.state.seen.insert(object.to_string());
        self.ledger.save(&self.state)
    }
}

/// Takes `ledger`'s link for one record, or none (with why in `warnings`) when the state
/// directory cannot be used: a ledger problem never stops a backup, a drill or a forget.
pub async fn try_link<'a>(
    ledger: Option<&'a Ledger>,
    warnings: &mut Vec<String>,
) -> Option<Link<'a>> {
    match ledger?.link().await {
        Ok(link) => Some(link),
        Err(e) => {
            warnings.push(format!(
                "this host's ledger cannot be used ({e}): the record carries no chain"
            ));
            None
        }
    }
}

/// Every forget record: the object names they list, each with the record that lists it, and
/// the forget records that could not be read.
pub async fn forgotten(
    repo: &Repository,
) -> Result<(BTreeMap<String, Arc<Forgotten>>, Vec<Error>)> {
    let listed = repo.store().list(name::FORGOTTEN).await?;
    let read: Vec<Result<Forgotten>> = futures::stream::iter(listed)
        .map(|o| async move {
            let id = name::parse_prune_object(name::FORGOTTEN, &o.name)
                .ok_or_else(|| Error::corrupt(&o.name, "not a forget record name"))?;
            let plain = repo.open_master(Kind::Forgotten, &o.name).await?;
            let f: Forgotten = serde_json::from_slice(&plain)
                .map_err(|e| Error::corrupt(&o.name, format!("does not parse: {e}")))?;
            if f.id != id {
                return Err(Error::corrupt(&o.name, "id differs from the object's name"));
            }
            Ok(f)
        })
        // Few at once: each may be large (one name per snapshot a retention run forgot).
        .buffer_unordered(4)
        .collect()
        .await;
    let mut by_record = BTreeMap::new();
    let mut errors = Vec::new();
    for r in read {
        match r {
            Ok(f) => {
                let f = Arc::new(f);
                for record in &f.records {
                    by_record.insert(record.clone(), f.clone());
                }
            }
            Err(e @ (Error::Corrupt { .. } | Error::MissingObject { .. })) => errors.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok((by_record, errors))
}

/// Leaves out of `snapshots` the manifests a forget record names, and deletes them: the rest
/// of a forget that was interrupted between its record and its deletes (or manifests put back
/// since). Retention must not decide over them. Returns how many were deleted.
pub async fn finish_forgets(repo: &Repository, snapshots: &mut Vec<Snapshot>) -> Result<usize> {
    let (forgotten, _) = forgotten(repo).await?;
    let mut done = 0;
    let mut kept = Vec::with_capacity(snapshots.len());
    for s in snapshots.drain(..) {
        if forgotten.contains_key(&name::snapshot(s.epoch(), &s.id)) {
            repo.forget(&s).await?;
            done += 1;
        } else {
            kept.push(s);
        }
    }
    *snapshots = kept;
    Ok(done)
}

/// Forgets snapshots: a forget record naming them is written first (chained when `ledger` is
/// given), then their manifests are deleted. Returns warnings (a ledger that cannot be used).
pub async fn forget(
    repo: &Repository,
    snapshots: &[&Snapshot],
    ledger: Option<&Ledger>,
    host: &str,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    if snapshots.is_empty() {
        return Ok(warnings);
    }
    let records = snapshots
        .iter()
        .map(|s| name::snapshot(s.epoch(), &s.id))
        .collect();
    write_forgotten(repo, records, ledger, host, &mut warnings).await?;
    for s in snapshots {
        repo.forget(s).await?;
    }
    Ok(warnings)
}

/// Writes a forget record naming `records`, chained when `ledger` is given and usable.
async fn write_forgotten(
    repo: &Repository,
    records: Vec<String>,
    ledger: Option<&Ledger>,
    host: &str,
    warnings: &mut Vec<String>,
) -> Result<String> {
    let link = try_link(ledger, warnings).await;
    let record = Forgotten {
        id: ObjectId::random(),
        time: Timestamp::now(),
        host: host.to_string(),
        chain: link.as_ref().map(|l| l.chain.clone()),
        records,
    };
    let object = name::prune_object(name::FORGOTTEN, &record.id);
    let plain = serde_json::to_vec(&record).expect("forget records serialize");
    repo.store()
        .put(&object, repo.seal_master(Kind::Forgotten, &object, &plain)?)
        .await?;
    if let Some(link) = link {
        if let Err(e) = link.committed(&object) {
            warnings.push(format!("this host's ledger could not record {object}: {e}"));
        }
    }
    Ok(object)
}

/// What [`verify`] found wrong with one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The record's object name.
    pub object: String,
    /// `missing` (deleted, or the repository rolled back), `replayed` (forgotten, yet present).
    pub problem: &'static str,
    pub detail: String,
    /// Accepted by the operator (`kluis check --acknowledge`): a forget record now names it.
    pub acknowledged: bool,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.detail)?;
        if self.acknowledged {
            f.write_str(" (acknowledged: a forget record names it now)")?;
        }
        Ok(())
    }
}

impl Verification {
    /// Findings not acknowledged: what monitoring alerts on.
    pub fn problems(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| !f.acknowledged)
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    /// Records present (manifests, drill reports, forget records).
    pub records: usize,
    pub findings: Vec<Finding>,
    /// Whether this host's own view was compared (a state directory was given).
    pub with_host_view: bool,
}

/// The chain links of the drill reports that can be read (an unreadable one still counts
/// as present). Only the id and chain are read: the report's other fields are the drill's.
async fn drill_chains(repo: &Repository, drills: &[crate::store::ObjectInfo]) -> Vec<ChainOf> {
    let mut found = Vec::new();
    for o in drills {
        if let Ok(plain) = repo.open_master(crate::object::Kind::Drill, &o.name).await {
            if let Ok(r) = serde_json::from_slice::<ChainOf>(&plain) {
                found.push(r);
            }
        }
    }
    found
}

/// A record's id and chain, whatever else it holds.
#[derive(Deserialize)]
struct ChainOf {
    id: ObjectId,
    #[serde(default)]
    chain: Option<Chain>,
}

/// Compares the repository's records with their chains, the forget records and, with
/// `ledger`, what this host saw last time. `snapshots` and `unreadable` are the manifests as
/// listed (readable or not: an unreadable one still exists). With `acknowledge`, this host's
/// records found missing are accepted: a forget record names them (so every host stops
/// reporting them), and this host's view is reset to the repository as it is now.
pub async fn verify(
    repo: &Repository,
    snapshots: &[Snapshot],
    unreadable: &[UnreadableSnapshot],
    ledger: Option<&Ledger>,
    acknowledge: bool,
) -> Result<Verification> {
    let (forgotten, _) = forgotten(repo).await?;
    let drills = repo.store().list(name::DRILLS).await?;
    let reports = drill_chains(repo, &drills).await;
    let forget_records = repo.store().list(name::FORGOTTEN).await?;

    // Every record present, and the chain links they carry.
    let mut present: BTreeSet<String> = BTreeSet::new();
    let mut links: Vec<(String, &Chain)> = Vec::new();
    for s in snapshots {
        let object = name::snapshot(s.epoch(), &s.id);
        if let Some(c) = &s.chain {
            links.push((object.clone(), c));
        }
        present.insert(object);
    }
    present.extend(unreadable.iter().map(|u| u.object.clone()));
    present.extend(drills.into_iter().map(|o| o.name));
    for r in &reports {
        if let Some(c) = &r.chain {
            links.push((format!("{}/{}", name::DRILLS, r.id), c));
        }
    }
    let mut forget_chains = Vec::new();
    for f in forgotten.values() {
        forget_chains.push((name::prune_object(name::FORGOTTEN, &f.id), f.chain.clone()));
    }
    forget_chains.sort_by(|a, b| a.0.cmp(&b.0));
    forget_chains.dedup_by(|a, b| a.0 == b.0);
    for (object, chain) in &forget_chains {
        if let Some(c) = chain {
            links.push((object.clone(), c));
        }
    }
    present.extend(forget_records.into_iter().map(|o| o.name));

    let mut findings = Vec::new();
    let gone = |object: &str| !present.contains(object) && !forgotten.contains_key(object);
    for (object, chain) in &links {
        if let Some(previous) = &chain.previous {
            if gone(previous) && !exists(repo, previous).await? {
                findings.push(Finding {
                    object: previous.clone(),
                    problem: "missing",
                    acknowledged: false,
                    detail: format!(
                        "gone without a forget record, yet {object} names it as the record \
                         before it: deleted, or the repository was rolled back"
                    ),
                });
            }
        }
    }
    for object in &present {
        if let Some(f) = forgotten.get(object) {
            // A forget deleting it right now is no replay.
            if !exists(repo, object).await? {
                continue;
            }
            findings.push(Finding {
                object: object.clone(),
                problem: "replayed",
                acknowledged: false,
                detail: format!(
                    "forgotten on {} by {} (record {}), yet present again: put back by someone, \
                     or a forget that did not finish; the next prune deletes it",
                    f.time,
                    f.host,
                    name::prune_object(name::FORGOTTEN, &f.id)
                ),
            });
        }
    }
    let mut with_host_view = false;
    let mut host_view = None;
    if let Some(ledger) = ledger {
        with_host_view = true;
        let lock = lock(&ledger.lock_path()).await?;
        let mut state = ledger.load()?;
        let mut still_seen = BTreeSet::new();
        for object in &state.seen {
            if present.contains(object) {
                still_seen.insert(object.clone());
            } else if forgotten.contains_key(object) {
                // Forgotten on purpose: no longer expected.
            } else if exists(repo, object).await? {
                // Written since the listing above (this host's other jobs run meanwhile).
                still_seen.insert(object.clone());
            } else {
                still_seen.insert(object.clone());
                if !findings.iter().any(|f| &f.object == object) {
                    findings.push(Finding {
                        object: object.clone(),
                        problem: "missing",
                        acknowledged: false,
                        detail: format!(
                            "this host saw it{} and it is gone without a forget record: deleted, \
                             or the repository was rolled back",
                            state
                                .verified
                                .map(|t| format!(" (last verified {t})"))
                                .unwrap_or_default()
                        ),
                    });
                }
            }
        }
        state.seen = still_seen
            .into_iter()
            .chain(present.iter().cloned())
            .collect();
        state.verified = Some(Timestamp::now());
        ledger.save(&state)?;
        host_view = Some(lock);
    }
    if acknowledge {
        // Only what is verified gone (above, after the listing) is accepted: a forget record
        // naming a present record would have the next forget delete it.
        let missing: Vec<String> = findings
            .iter()
            .filter(|f| f.problem == "missing")
            .map(|f| f.object.clone())
            .collect();
        if !missing.is_empty() {
            // The lock is released first: writing the record takes it again.
            drop(host_view.take());
            let mut warnings = Vec::new();
            write_forgotten(repo, missing, ledger, &crate::hostname(), &mut warnings).await?;
            for f in findings.iter_mut().filter(|f| f.problem == "missing") {
                f.acknowledged = true;
            }
        }
    }
    drop(host_view);
    findings.sort_by(|a, b| a.object.cmp(&b.object));
    findings.dedup_by(|a, b| a.object == b.object && a.problem == b.problem);
    Ok(Verification {
        records: present.len(),
        findings,
        with_host_view,
    })
}

/// Whether `object` exists in the store now.
async fn exists(repo: &Repository, object: &str) -> Result<bool> {
    repo.store().exists(object).await
}

/// The repository this host last saw at `location`, if its state directory has one (and the
/// file that says so): `init` must not silently create a new repository where one vanished.
pub fn known_at(
    state_dir: &Path,
    location: &str,
) -> Option<(ObjectId, Option<Timestamp>, PathBuf)> {
    let dir = state_dir.join("ledger");
    for entry in std::fs::read_dir(&dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if let Ok(state) = serde_json::from_slice::<State>(&bytes) {
            if state.location == location {
                return Some((state.repository, state.verified, path));
            }
        }
    }
    None
}
