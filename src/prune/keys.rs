//! Epoch keys of months that hold nothing any more: listed, marked by a run (in `run`), and
//! deleted by the sweep of their mark, one grace period later, only if their month still
//! holds nothing (docs/FORMAT.md §6.6).

use std::collections::{BTreeMap, HashSet};

use jiff::Timestamp;

use crate::error::Result;
use crate::id::ObjectId;
use crate::object::{Epoch, name};
use crate::repository::Repository;

use super::*;

/// Every epoch key object, by `(epoch, key id)`: each key generation's copy with its store
/// time. Names that do not parse are left to `check`.
pub(super) struct EpochKeys(pub(super) BTreeMap<(Epoch, ObjectId), Vec<(String, Timestamp)>>);

impl EpochKeys {
    pub(super) async fn list(repo: &Repository) -> Result<EpochKeys> {
        let mut keys: BTreeMap<(Epoch, ObjectId), Vec<(String, Timestamp)>> = BTreeMap::new();
        for o in repo.store().list(name::EPOCHS).await? {
            if let Some((epoch, id, _)) = name::parse_epoch_key(&o.name) {
                keys.entry((epoch, id))
                    .or_default()
                    .push((o.name, o.modified));
            }
        }
        Ok(EpochKeys(keys))
    }
}

impl Pruner<'_> {
    /// Deletes the keys the due marks condemned whose month still holds nothing (`occupied`
    /// lists the months holding a snapshot, index segment or pack, as this run read them,
    /// after the marks): every key generation's object of each.
    pub(super) async fn sweep_keys(
        &mut self,
        due: &[&Mark],
        occupied: &HashSet<Epoch>,
        keys: &EpochKeys,
    ) -> Result<()> {
        let condemned: HashSet<(Epoch, ObjectId)> = due.iter().flat_map(|m| m.key_ids()).collect();
        let mut doomed = Vec::new();
        for key in condemned {
            if occupied.contains(&key.0) {
                self.report.keys_kept += 1;
                continue;
            }
            let Some(objects) = keys.0.get(&key) else {
                continue; // already gone (an earlier sweep of this mark was cut short)
            };
            self.report.keys_deleted += 1;
            doomed.extend(objects.iter().map(|(o, _)| o.clone()));
        }
        if !self.opts.dry_run && !doomed.is_empty() {
            self.may_change().await?;
            delete_all(self.repo, doomed).await?;
        }
        Ok(())
    }
}
