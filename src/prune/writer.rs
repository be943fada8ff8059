//! The writer's side of prune's protocol: what a backup or copy must not deduplicate against
//! (packs) or write under (epoch keys), and whether it may still write an object that
//! references packs, or uses a key, that a prune condemned.

use std::collections::HashSet;
use std::time::Duration;

use jiff::Timestamp;

use crate::clock::{self, Stopwatch, add};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::index::IdSet;
use crate::object::{Epoch, name};
use crate::repository::Repository;

use super::TOMBSTONE_LIFE;
use super::records::{list_marks, read_marks};

/// How far a writer stays from a sweep: clocks of different hosts may disagree by this much.
pub(super) fn margin(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(600))
}

/// What a writer (backup, copy) learned about prune before it started: the marks it saw, the
/// packs they condemn, which it must not deduplicate against, and the epoch keys they
/// condemn, which it must not write under; and the erasures it saw.
#[derive(Debug)]
pub struct WriterView {
    seen: HashSet<ObjectId>,
    condemned: IdSet<ObjectId>,
    condemned_keys: HashSet<(Epoch, ObjectId)>,
    erasures: HashSet<String>,
    started: Stopwatch,
    /// Objects under `prune/` that are not prune's or cannot be read: ignored, reported.
    warnings: Vec<String>,
}

impl WriterView {
    /// Reads the marks. Call it before loading the index.
    pub async fn read(repo: &Repository) -> Result<WriterView> {
        let started = Stopwatch::start();
        let mut warnings = Vec::new();
        let (marks, swept) = list_marks(repo, &mut warnings).await?;
        let live: Vec<(ObjectId, Timestamp)> = marks
            .iter()
            .filter(|(m, _)| !swept.contains_key(m))
            .copied()
            .collect();
        let mut condemned = IdSet::default();
        let mut condemned_keys = HashSet::new();
        for (mark, _) in read_marks(repo, &live, &mut warnings).await? {
            condemned.extend(mark.pack_ids());
            condemned_keys.extend(mark.key_ids());
        }
        let erasures = repo
            .store()
            .list(name::ERASURES)
            .await?
            .into_iter()
            .map(|o| o.name)
            .collect();
        Ok(WriterView {
            seen: marks.into_iter().map(|(id, _)| id).collect(),
            condemned,
            condemned_keys,
            erasures,
            started,
            warnings,
        })
    }

    /// What the writer should report: objects under `prune/` it ignored.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Packs the writer must treat as absent.
    pub fn condemned(&self) -> &IdSet<ObjectId> {
        &self.condemned
    }

    /// Epoch keys the writer must not write under (a sweep will delete them).
    pub fn condemned_keys(&self) -> &HashSet<(Epoch, ObjectId)> {
        &self.condemned_keys
    }

    /// Before the manifest: refuses when an erasure that started since [`WriterView::read`]
    /// destroys the keys of `key`'s epoch. Its data would be sealed under a key that no
    /// longer exists. (A write-only host, which cannot read erasure records, checks that its
    /// key is still there.)
    pub async fn check_not_erased(&self, repo: &Repository, key: (Epoch, ObjectId)) -> Result<()> {
        let (epoch, id) = key;
        let listed = repo.store().list(name::ERASURES).await?;
        if listed.iter().all(|o| self.erasures.contains(&o.name)) {
            return Ok(());
        }
        if repo.write_only() {
            let keys = repo
                .store()
                .list(&format!("{}/{epoch}", name::EPOCHS))
                .await?;
            if keys
                .iter()
                .any(|o| name::parse_epoch_key(&o.name).is_some_and(|(_, k, _)| k == id))
            {
                return Ok(());
            }
            return Err(Error::Conflict(format!(
                "an erasure destroyed the key of {epoch} this snapshot is sealed under; \
                 nothing was committed"
            )));
        }
        let (records, _) = repo.erasures().await?;
        for r in records {
            if !self
                .erasures
                .contains(&name::prune_object(name::ERASURES, &r.id))
                && r.destroyed.iter().any(|d| d.epoch == epoch)
            {
                return Err(Error::Conflict(format!(
                    "erasure {} (by {}) destroys the keys of {epoch}, the month this snapshot is \
                     for; nothing was committed",
                    r.id.short(),
                    r.by
                )));
            }
        }
        Ok(())
    }

    /// Decides whether the writer may still write an object, sealed under epoch key `key`,
    /// that references the packs `needed`: an index segment listing packs it uploaded, or the
    /// snapshot manifest (which needs the packs it deduplicated against *and* those its run
    /// uploaded). It may not if a mark written since [`WriterView::read`] condemns one of them,
    /// or the key, and that mark's sweep is done or near (within the margin), by the store's
    /// clock: a writer whose own clock is wrong decides the same. A segment listing a swept
    /// pack would make later backups deduplicate against data that is gone; an object under
    /// a swept key cannot be read.
    pub async fn check_commit(
        &self,
        repo: &Repository,
        needed: &IdSet<ObjectId>,
        key: (Epoch, ObjectId),
    ) -> Result<()> {
        let elapsed = self.started.elapsed();
        if elapsed >= TOMBSTONE_LIFE {
            return Err(Error::Conflict(format!(
                "this run took {}, longer than prune's record keeping ({}); nothing was committed, run it again",
                crate::retention::show(elapsed),
                crate::retention::show(TOMBSTONE_LIFE)
            )));
        }
        let (marks, swept) = list_marks(repo, &mut Vec::new()).await?;
        let new: Vec<(ObjectId, Timestamp)> = marks
            .into_iter()
            .filter(|(m, _)| !self.seen.contains(m))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // The store's clock, read only when a new mark touches this snapshot (rare).
        let mut now = None;
        for (mark, stored) in read_marks(repo, &new, &mut Vec::new()).await? {
            let what = if mark.pack_ids().any(|p| needed.contains(&p)) {
                "data this snapshot needs"
            } else if mark.key_ids().any(|k| k == key) {
                "the epoch key this snapshot is sealed under"
            } else {
                continue;
            };
            let refuse = |why: String| {
                Err(Error::Conflict(format!(
                    "a prune (mark {}, host {}) condemned {what}, and {why}; nothing was \
                     committed, run it again",
                    mark.id.short(),
                    mark.host,
                )))
            };
            if swept.contains_key(&mark.id) {
                return refuse("has already deleted it".into());
            }
            let now = match now {
                Some(n) => n,
                None => *now.insert(clock::store_now(repo).await?),
            };
            let due = mark.due(stored);
            if add(now.latest(), margin(mark.grace())) >= due {
                return refuse(format!(
                    "its grace period ends at {due} by the store's clock (now {})",
                    now.earliest
                ));
            }
        }
        Ok(())
    }
}
