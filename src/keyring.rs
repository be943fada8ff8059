//! Key management that changes more than one object: changing a slot's secret (`kluis key
//! passwd`) and rotating the key generation (`kluis key rotate`).
//!
//! A key generation is an epoch-wrapping key and the slots that hold it (docs/FORMAT.md §3.4).
//! A rotation makes a new one: every epoch key of the old generation is wrapped again under
//! the new key (`epochs/E/K.NEW`), a slot of the new generation is written for each secret
//! given, then every slot of the old generation is deleted, then every epoch key object of the
//! old generation. No data is re-encrypted or uploaded again. Each step is idempotent and the
//! order keeps a repository that some key opens at every point: until the old slots are gone
//! the old generation is whole; from then on the new one is. A backup that creates the first
//! key of a month while a rotation runs either has it carried over (the rotation lists the old
//! generation's keys again after deleting its slots) or sees its generation gone and fails
//! before it writes data under it ([`Repository::write_key`]).

use std::collections::BTreeSet;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::keys::{Creator, KdfParams, Secret, SlotKeys};
use crate::object::{Epoch, name};
use crate::prune::lease::{LEASE_TTL, LeaseGuard};
use crate::repository::{KeySlotInfo, Repository, SEALED_EPOCH_KEY_LEN};

/// A secret that gets a slot of the new generation.
pub struct NewSlot {
    pub secret: Secret,
    pub kdf: KdfParams,
    pub label: Option<String>,
}

/// What to rotate.
pub struct RotateOptions {
    /// The secrets that get a slot of the new generation. Every other slot is removed: its
    /// secret cannot be carried over without being known.
    pub slots: Vec<NewSlot>,
    /// Epochs whose keys are not carried into the new generation: they are destroyed with the
    /// old one (erasure).
    pub destroy: BTreeSet<Epoch>,
    pub creator: Creator,
    /// The new generation's keys (default: made here).
    pub next: Option<SlotKeys>,
}

/// What a rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct RotateReport {
    /// The new key generation.
    pub generation: ObjectId,
    /// The generation it replaced (absent: the master key of a repository made before key
    /// generations).
    pub previous: Option<ObjectId>,
    /// Epoch keys wrapped again under the new generation.
    pub epoch_keys: usize,
    /// Epoch keys destroyed (not carried over), by epoch.
    pub destroyed: Vec<(Epoch, ObjectId)>,
    /// The slots written, in the order of the secrets given.
    pub slots: Vec<ObjectId>,
    /// The slots removed, the one in use among them.
    pub removed_slots: Vec<KeySlotInfo>,
    /// The write-only slots granted the new generation (they stay; their hosts' secrets do
    /// not change).
    pub write_only_slots: Vec<ObjectId>,
    /// Epoch key objects deleted (of the old generation, and any older one an interrupted
    /// rotation left).
    pub deleted_objects: usize,
    /// Epoch key objects of the old generation that could not be read: not carried over.
    pub warnings: Vec<String>,
}

/// Rotates the key generation of `repo` (see the module's documentation); returns the
/// repository opened with the first new slot, and the report.
pub async fn rotate(repo: Repository, opts: RotateOptions) -> Result<(Repository, RotateReport)> {
    let lease = LeaseGuard::acquire(&repo, &opts.creator.host, LEASE_TTL).await?;
    let result = lease.hold(rotate_under(&repo, &opts, &lease)).await;
    let released = lease.release().await;
    let (keys, slot, report) = result?;
    released?;
    let repo = repo.with_keys(keys, slot);
    let event = crate::audit::Event::new("key-rotate", report.generation.to_hex())
        .with(
            "previous",
            report
                .previous
                .map_or_else(|| "master key".into(), |g| g.to_hex()),
        )
        .with("epoch_keys", report.epoch_keys)
        .with("slots_written", report.slots.len())
        .with("slots_removed", report.removed_slots.len());
    let mut report = report;
    if let Some(w) = crate::audit::record(&repo, event, None).await {
        report.warnings.push(w);
    }
    Ok((repo, report))
}

/// The rotation's steps, under `lease` (held by the caller); returns the new keys and the id
/// of the first new slot.
pub(crate) async fn rotate_under(
    repo: &Repository,
    opts: &RotateOptions,
    lease: &LeaseGuard<'_>,
) -> Result<(SlotKeys, ObjectId, RotateReport)> {
    if opts.slots.is_empty() {
        return Err(Error::invalid(
            "a rotation needs at least one secret for the new generation",
        ));
    }
    let old = repo.full("rotate the keys")?.clone();
    let new = match &opts.next {
        Some(keys) => keys.clone(),
        None => old.next_generation(),
    };
    let new_gen = new.generation.expect("a new generation has an id");
    let mut report = RotateReport {
        generation: new_gen,
        previous: old.generation,
        epoch_keys: 0,
        destroyed: Vec::new(),
        slots: Vec::new(),
        removed_slots: Vec::new(),
        write_only_slots: Vec::new(),
        deleted_objects: 0,
        warnings: Vec::new(),
    };
    // 1. Every epoch key of the old generation, wrapped under the new one.
    let mut carried = BTreeSet::new();
    carry_over(repo, opts, &new, &mut carried, &mut report).await?;
    // 2. Write-only slots granted the new generation (before any slot of it exists, so a
    //    write-only host never finds the new generation in use without its grant), then the
    //    new generation's slots.
    lease.check().await?;
    let (slots, _) = repo.slots().await?;
    for s in slots.iter().filter(|s| s.write_only()) {
        let mut escrowed = None;
        for keys in repo.generations() {
            escrowed = repo.escrowed(keys, s.id).await?;
            if escrowed.is_some() {
                break;
            }
        }
        match escrowed {
            Some(writer) => {
                repo.put_grant(&new, s.id, &writer).await?;
                report.write_only_slots.push(s.id);
            }
            None => report.warnings.push(format!(
                "write-only key slot {} has no grant of key generation {}: it cannot back up \
                 after this rotation (remove it and add it again)",
                s.id.short(),
                old.generation.map_or_else(|| "none".into(), |g| g.short())
            )),
        }
    }
    for s in &opts.slots {
        let slot = repo
            .put_slot(
                &new,
                &s.secret,
                s.kdf,
                opts.creator.clone(),
                s.label.clone(),
            )
            .await?;
        report.slots.push(slot.id);
    }
    // 3. Every other slot: from here on only the new generation opens the repository.
    lease.check().await?;
    let (slots, _) = repo.slots().await?;
    for s in slots
        .iter()
        .filter(|s| s.generation != Some(new_gen) && !s.write_only())
    {
        repo.store().delete(&s.name()).await?;
        report
            .removed_slots
            .push(KeySlotInfo::of(s, repo.slot_id()));
    }
    // 4. A key a backup created meanwhile under the old generation.
    carry_over(repo, opts, &new, &mut carried, &mut report).await?;
    // 5. The old generations' epoch key objects.
    for o in repo.store().list(name::EPOCHS).await? {
        match name::parse_epoch_key(&o.name) {
            Some((_, _, g)) if g == Some(new_gen) => {}
            Some(_) => {
                repo.store().delete(&o.name).await?;
                report.deleted_objects += 1;
            }
            None => report
                .warnings
                .push(format!("{}: not an epoch key name; left as it is", o.name)),
        }
    }
    //    And the grants of other generations (and of slots removed since).
    for o in repo.store().list(name::GRANTS).await? {
        match name::parse_grant(&o.name) {
            Some((slot, g, _)) if g == new_gen && report.write_only_slots.contains(&slot) => {}
            Some(_) => repo.store().delete(&o.name).await?,
            None => report
                .warnings
                .push(format!("{}: not a grant's name; left as it is", o.name)),
        }
    }
    let first = report.slots[0];
    Ok((new, first, report))
}

/// Wraps every epoch key of `repo`'s generation not yet in `carried` under `new` (those of
/// `opts.destroy` excepted: they are listed as destroyed).
async fn carry_over(
    repo: &Repository,
    opts: &RotateOptions,
    new: &SlotKeys,
    carried: &mut BTreeSet<(Epoch, ObjectId)>,
    report: &mut RotateReport,
) -> Result<()> {
    // Of every generation the secret opens: after an interrupted rotation, a backup may have
    // made a key under either.
    let held = repo.generations();
    let mut found = Vec::new();
    for o in repo.store().list(name::EPOCHS).await? {
        if let Some((epoch, id, g)) = name::parse_epoch_key(&o.name) {
            let Some(keys) = held.iter().find(|k| k.generation == g) else {
                continue;
            };
            if g != new.generation && !carried.contains(&(epoch, id)) {
                found.push((epoch, id, o.size == SEALED_EPOCH_KEY_LEN as u64, *keys));
            }
        }
    }
    found.sort_by_key(|(epoch, id, ..)| (*epoch, *id));
    for (epoch, id, sealed, keys) in found {
        if !carried.insert((epoch, id)) {
            continue; // under two generations: carried from the first
        }
        if opts.destroy.contains(&epoch) {
            report.destroyed.push((epoch, id));
            continue;
        }
        match repo.read_epoch_key(keys, epoch, id).await {
            // A write-only host's key stays its own: sealed to the new generation's public
            // key, never one a full writer would pick.
            Ok(key) if sealed => {
                repo.put_sealed_epoch_key_for(new, epoch, id, key.key())
                    .await?;
                report.epoch_keys += 1;
            }
            Ok(key) => {
                repo.put_epoch_key_for(new, epoch, id, key.key()).await?;
                report.epoch_keys += 1;
            }
            Err(e @ (Error::Corrupt { .. } | Error::MissingObject { .. })) => report
                .warnings
                .push(format!("{e}: not carried over (it opened nothing)")),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Changes the secret of the slot `repo` was opened with (`kluis key passwd`): a slot for
/// `new` holding the same keys, with the same label, then the old slot deleted. Killed between
/// the two, both secrets open the repository. Returns the new slot's id.
pub async fn change_secret(repo: &Repository, new: &Secret, kdf: KdfParams) -> Result<ObjectId> {
    let (slots, _) = repo.slots().await?;
    let old = slots
        .iter()
        .find(|s| s.id == repo.slot_id())
        .ok_or_else(|| {
            Error::Conflict(format!(
                "key slot {} that opened the repository is gone",
                repo.slot_id().short()
            ))
        })?;
    let slot = repo
        .put_slot(
            repo.full("change its secret (a holder of a full key adds a new write-only slot)")?,
            new,
            kdf,
            Creator::here(),
            old.label.clone(),
        )
        .await?;
    repo.store().delete(&old.name()).await?;
    let event =
        crate::audit::Event::new("key-passwd", slot.id.to_hex()).with("replaced", old.id.to_hex());
    if let Some(w) = crate::audit::record(repo, event, None).await {
        eprintln!("warning: {w}");
    }
    Ok(slot.id)
}
