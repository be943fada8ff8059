//! `kluis erase --before DATE`: every snapshot taken before DATE removed, by destroying keys
//! where it can and by deletion where it cannot (docs/FORMAT.md §6.10).
//!
//! Epochs are months. An epoch wholly before DATE is erased cryptographically: its epoch keys
//! are not carried into a new key generation ([`crate::keyring`]), so no slot and no object of
//! the repository holds them any more, and its objects are deleted. The epoch that DATE falls
//! in keeps its key (its later snapshots use it): its snapshots before DATE are forgotten and
//! their data is deleted by prune, which the report says. An erasure record, written before
//! anything changes, lets readers say "destroyed" rather than "missing", lets the next erasure
//! finish an interrupted one, and is what an auditor reads.

use std::collections::BTreeSet;

use jiff::Timestamp;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::keyring::{NewSlot, RotateOptions, RotateReport};
use crate::keys::{Creator, SlotKeys};
use crate::ledger::Ledger;
use crate::object::{Epoch, name};
use crate::prune::lease::{LEASE_TTL, LeaseGuard};
use crate::prune::{PruneOptions, PruneReport};
use crate::repository::{DestroyedEpoch, ErasedSnapshot, ErasureRecord, Repository};
use crate::snapshot::Snapshot;

/// What becomes of the key slots.
pub enum Slots {
    /// A new key generation, with a slot for each of these secrets; every other slot is
    /// removed. `changed`: each is a new secret (the guarantee against old copies of the
    /// bucket depends on it: docs/FORMAT.md §6.10).
    Rotate { slots: Vec<NewSlot>, changed: bool },
    /// Every slot stays, and the key generation with it; the destroyed epochs' key objects
    /// are deleted in place. A scheduled erasure has no new secrets to give, and must not
    /// lock out the holders of other slots.
    Keep,
}

/// What to erase, and how.
pub struct EraseOptions {
    pub before: Timestamp,
    /// Plan and report; change nothing.
    pub dry_run: bool,
    pub slots: Slots,
    pub creator: Creator,
    /// This host's ledger of the repository (the forget record's chain).
    pub ledger: Option<Ledger>,
    /// How the epoch DATE falls in is pruned.
    pub prune: PruneOptions,
    /// Write nothing, not even the erasure record, when there is nothing to erase (a
    /// scheduled erasure, which runs every day); the report then says `nothing_to_do`.
    pub only_if_needed: bool,
    /// Lower the repack threshold of that prune to repack every pack holding erased data
    /// (`kluis erase`); else it repacks as configured, and what stays in packs that are mostly
    /// in use goes with the month's key (a scheduled erasure, which runs every day).
    pub repack_all: bool,
}

/// What an erasure did (or, dry, would do): the record, and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct EraseReport {
    pub dry_run: bool,
    pub record: ErasureRecord,
    /// Objects of the destroyed epochs deleted (packs, index segments, manifests).
    pub objects_deleted: usize,
    pub rotation: Option<RotateReport>,
    pub prune: Option<PruneReport>,
    /// What can no longer be recovered, and the limits, in words for an auditor.
    pub statement: Vec<String>,
    pub warnings: Vec<String>,
    /// No snapshot and no epoch lay before the date, and (`only_if_needed`) nothing was
    /// written.
    pub nothing_to_do: bool,
}

/// Erases everything of `repo` before `opts.before`; returns the repository opened with the
/// new key generation (unchanged when dry), and the report.
pub async fn erase(repo: Repository, opts: EraseOptions) -> Result<(Repository, EraseReport)> {
    if matches!(&opts.slots, Slots::Rotate { slots, .. } if slots.is_empty()) && !opts.dry_run {
        return Err(Error::invalid(
            "an erasure needs at least one secret for the new key generation",
        ));
    }
    let plan = plan(&repo, &opts).await?;
    let mut report = EraseReport {
        dry_run: opts.dry_run,
        record: plan.record,
        objects_deleted: 0,
        rotation: None,
        prune: None,
        statement: Vec::new(),
        warnings: plan.warnings,
        nothing_to_do: false,
    };
    report.nothing_to_do = report.record.snapshots.is_empty() && report.record.destroyed.is_empty();
    if report.nothing_to_do && opts.only_if_needed {
        return Ok((repo, report));
    }
    let kept_slots = match &opts.slots {
        Slots::Rotate { slots, .. } => Some(slots.len()),
        Slots::Keep => None,
    };
    if opts.dry_run {
        report.objects_deleted = plan.objects.len();
        report.statement = statement(&report, kept_slots, opts.repack_all);
        return Ok((repo, report));
    }
    // 1. The record, before anything changes.
    repo.put_erasure(&report.record).await?;
    // 2. The snapshots, through a forget record (the ledger then knows they went on purpose).
    let doomed: Vec<&Snapshot> = plan.snapshots.iter().collect();
    let destroy: BTreeSet<Epoch> = report.record.destroyed.iter().map(|d| d.epoch).collect();
    let warnings =
        crate::ledger::forget(&repo, &doomed, opts.ledger.as_ref(), &opts.creator.host).await?;
    report.warnings.extend(warnings);
    // 3. The keys: a new generation without the destroyed epochs (or, keeping every slot,
    // their key objects deleted); then their objects.
    let lease = LeaseGuard::acquire(&repo, &opts.creator.host, LEASE_TTL).await?;
    let work = async {
        let rotated = match opts.slots {
            Slots::Rotate { slots, .. } => {
                let rotate = RotateOptions {
                    slots,
                    destroy: destroy.clone(),
                    creator: opts.creator.clone(),
                    next: Some(plan.next),
                };
                Some(crate::keyring::rotate_under(&repo, &rotate, &lease).await?)
            }
            Slots::Keep => {
                for o in repo.store().list(name::EPOCHS).await? {
                    if name::parse_epoch_key(&o.name).is_some_and(|(e, ..)| destroy.contains(&e)) {
                        repo.store().delete(&o.name).await?;
                    }
                }
                None
            }
        };
        lease.check().await?;
        let mut deleted = 0;
        let listed = epoch_objects(&repo).await?;
        for (_, object) in listed.into_iter().filter(|(e, _)| destroy.contains(e)) {
            repo.store().delete(&object).await?;
            deleted += 1;
        }
        Ok((rotated, deleted))
    };
    let result = lease.hold(work).await;
    let released = lease.release().await;
    let (rotated, deleted) = result?;
    released?;
    // The manifests of those epochs went with the forget record (step 2).
    let forgotten = plan
        .snapshots
        .iter()
        .filter(|s| destroy.contains(&s.epoch()))
        .count();
    report.objects_deleted = deleted + forgotten;
    let repo = match rotated {
        Some((keys, slot, rotation)) => {
            report.rotation = Some(rotation);
            repo.with_keys(keys, slot)
        }
        None => repo,
    };
    // 4. The epoch DATE falls in: its erased snapshots' data, by prune.
    if !report.record.deleted_only.is_empty() {
        let mut prune = opts.prune;
        if opts.repack_all {
            prune.repack_threshold = f64::MIN_POSITIVE;
        }
        report.prune = Some(crate::prune::prune(&repo, &prune).await?);
    }
    report.statement = statement(&report, kept_slots, opts.repack_all);
    let destroyed: Vec<String> = report
        .record
        .destroyed
        .iter()
        .map(|d| d.epoch.to_string())
        .collect();
    let event = crate::audit::Event::new("erase", report.record.id.to_hex())
        .with("before", report.record.before)
        .with("snapshots", report.record.snapshots.len())
        .with("keys_destroyed", destroyed.join(","))
        .with("objects_deleted", report.objects_deleted)
        .with("secrets_changed", report.record.secrets_changed);
    if let Some(w) = crate::audit::record(&repo, event, opts.ledger.as_ref()).await {
        report.warnings.push(w);
    }
    Ok((repo, report))
}

/// What an erasure will do.
struct Plan {
    record: ErasureRecord,
    snapshots: Vec<Snapshot>,
    /// Objects of the destroyed epochs (for a dry run's count).
    objects: Vec<String>,
    next: SlotKeys,
    warnings: Vec<String>,
}

async fn plan(repo: &Repository, opts: &EraseOptions) -> Result<Plan> {
    let before = opts.before;
    let (mut list, unreadable) = repo.snapshots().await?;
    if !opts.dry_run {
        crate::ledger::finish_forgets(repo, &mut list).await?;
    }
    // Every epoch the repository holds anything of.
    let mut epochs = BTreeSet::new();
    let mut keys: Vec<(Epoch, ObjectId)> = Vec::new();
    for o in repo.store().list(name::EPOCHS).await? {
        if let Some((epoch, id, g)) = name::parse_epoch_key(&o.name) {
            if g == repo.generation() {
                keys.push((epoch, id));
                epochs.insert(epoch);
            }
        }
    }
    let objects = epoch_objects(repo).await?;
    epochs.extend(objects.iter().map(|(e, _)| *e));
    let mut destroy: BTreeSet<Epoch> = epochs
        .iter()
        .copied()
        .filter(|e| e.end() <= before)
        .collect();
    // An earlier erasure that was interrupted: its epochs are finished now.
    let (records, _) = repo.erasures().await?;
    for r in &records {
        destroy.extend(
            r.destroyed
                .iter()
                .map(|d| d.epoch)
                .filter(|e| epochs.contains(e)),
        );
    }
    let within = Epoch::of(before);
    let partial = (within.start() < before && !destroy.contains(&within)).then_some(within);
    let mut warnings = Vec::new();
    for u in &unreadable {
        let epoch = name::parse_epoch_object(name::SNAPSHOTS, &u.object).map(|(e, _)| e);
        match epoch {
            Some(e) if destroy.contains(&e) => {}
            Some(e) if Some(e) == partial => {
                return Err(Error::Corrupt {
                    object: u.object.clone(),
                    detail: format!(
                        "cannot be read, so whether it was taken before {before} is unknown; \
                         nothing was erased ({})",
                        u.error
                    ),
                });
            }
            _ => warnings.push(format!(
                "{}: cannot be read ({}); its epoch is not erased",
                u.object, u.error
            )),
        }
    }
    let snapshots: Vec<Snapshot> = list.into_iter().filter(|s| s.time < before).collect();
    let deleted_only: Vec<Epoch> = partial
        .filter(|p| snapshots.iter().any(|s| s.epoch() == *p))
        .into_iter()
        .collect();
    let next = repo.full("erase")?.next_generation();
    let (generation_after, secrets_changed) = match &opts.slots {
        Slots::Rotate { changed, .. } => (next.generation, *changed),
        Slots::Keep => (repo.generation(), false),
    };
    let record = ErasureRecord {
        id: ObjectId::random(),
        before,
        time: Timestamp::now(),
        by: format!(
            "{}@{}",
            opts.creator.user.as_deref().unwrap_or("?"),
            opts.creator.host
        ),
        repository: repo.store().location().to_string(),
        destroyed: destroy
            .iter()
            .map(|&epoch| DestroyedEpoch {
                epoch,
                keys: keys
                    .iter()
                    .filter(|(e, _)| *e == epoch)
                    .map(|(_, id)| *id)
                    .collect(),
            })
            .collect(),
        deleted_only,
        snapshots: snapshots
            .iter()
            .map(|s| ErasedSnapshot {
                id: s.id,
                name: s.name.clone(),
                host: s.host.clone(),
                time: s.time,
            })
            .collect(),
        generation_before: repo.generation(),
        generation_after,
        secrets_changed,
        program: format!("kluis {}", env!("CARGO_PKG_VERSION")),
    };
    let objects = objects
        .into_iter()
        .filter(|(e, _)| destroy.contains(e))
        .map(|(_, name)| name)
        .collect();
    Ok(Plan {
        record,
        snapshots,
        objects,
        next,
        warnings,
    })
}

/// Every pack, index segment, manifest and archived WAL file, with its epoch (manifests first,
/// so a deletion cut short leaves no manifest whose data is gone).
async fn epoch_objects(repo: &Repository) -> Result<Vec<(Epoch, String)>> {
    let mut out = Vec::new();
    for prefix in [name::SNAPSHOTS, name::INDEX, name::DATA] {
        for o in repo.store().list(prefix).await? {
            if let Some((epoch, _)) = name::parse_epoch_object(prefix, &o.name) {
                out.push((epoch, o.name));
            }
        }
    }
    for o in repo.store().list(name::WAL).await? {
        if let Some((epoch, ..)) = name::parse_wal(&o.name) {
            out.push((epoch, o.name));
        }
    }
    Ok(out)
}

/// What can no longer be recovered, and what still can, in words. `kept_slots`: the slots of
/// the new key generation; `None`: every slot was kept, with its generation.
fn statement(report: &EraseReport, kept_slots: Option<usize>, repack_all: bool) -> Vec<String> {
    let r = &report.record;
    let mut out = Vec::new();
    let when = if report.dry_run { "would be" } else { "are" };
    let count = |epoch: Epoch| {
        r.snapshots
            .iter()
            .filter(|s| Epoch::of(s.time) == epoch)
            .count()
    };
    if r.destroyed.is_empty() {
        out.push(format!(
            "No epoch lies wholly before {}: no key is destroyed.",
            r.before
        ));
    } else {
        let epochs: Vec<String> = r
            .destroyed
            .iter()
            .map(|d| format!("{} ({} snapshot(s))", d.epoch, count(d.epoch)))
            .collect();
        out.push(format!(
            "Cryptographically erased: the epoch keys of {} {when} destroyed. No key slot and no \
             object of this repository holds them after the erasure, so no secret can decrypt \
             the snapshots of those months from this repository again.",
            epochs.join(", ")
        ));
        let previous = r.generation_before.map_or_else(
            || "the master key".to_string(),
            |g| format!("key generation {}", g.short()),
        );
        if kept_slots.is_none() {
            out.push(format!(
                "Limit: every key slot was kept, and the key generation with it. A copy of the \
                 bucket made before this erasure (a provider's backup, object versions, a stolen \
                 disk) still holds the destroyed keys wrapped under {previous}, which every \
                 secret that opens this repository now also opens. Rotate to new secrets \
                 (`kluis key rotate --new-password-file ...`) and destroy the old ones to close \
                 this."
            ));
        } else if !r.secrets_changed {
            out.push(format!(
                "Limit: the secrets were not changed. A copy of the bucket made before this \
                 erasure (a provider's backup, object versions, a stolen disk) still holds the \
                 destroyed keys wrapped under {previous}, and a secret that opens this \
                 repository now also opens that copy's slots. Rotate to new secrets (`kluis key \
                 rotate --new-password-file ...`) and destroy the old ones to close this."
            ));
        } else if r.generation_before.is_none() {
            out.push(
                "Limit: this repository was made before key generations, and its old master key \
                 remains its records key; a copy of the bucket made before this erasure holds the \
                 destroyed keys wrapped under that key, which the new slots still hold. Copy the \
                 repository into a new one (`kluis copy`) for a full erasure."
                    .to_string(),
            );
        } else {
            out.push(format!(
                "Old copies of the bucket (a provider's backup, object versions, a stolen disk) \
                 hold the destroyed keys only wrapped under {previous}, whose slots only the \
                 retired secrets open: with the secrets kept now ({} slot(s) of key generation \
                 {}), none of it decrypts. Destroy the retired secrets.",
                kept_slots.unwrap_or(0),
                r.generation_after.map_or_else(String::new, |g| g.short())
            ));
        }
    }
    for epoch in &r.deleted_only {
        let next = report
            .prune
            .as_ref()
            .and_then(|p| p.next_sweep)
            .map_or_else(
                || "the next prune after its grace period".to_string(),
                |t| format!("the first prune after {t}"),
            );
        out.push(format!(
            "Deleted only: {} snapshot(s) of {epoch} taken before {}. The month's key stays (its \
             later snapshots use it); their manifests {when} deleted and their data is deleted by \
             {next}{}. A copy of that data made before then can still be decrypted with the \
             month's key.",
            count(*epoch),
            r.before,
            if repack_all {
                ""
            } else {
                ", except data in packs mostly in use by later snapshots (the repack threshold \
                 keeps them), which goes when the month's key is destroyed"
            }
        ));
    }
    out
}
