//! Prune's records in the repository: marks, sweep records, and reading them (docs/FORMAT.md
//! §6.6). Names that are not records, and marks that cannot be read, are reported and ignored.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::add;
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::object::{Epoch, Kind, name};
use crate::repository::Repository;

use super::CONCURRENCY;

/// A mark: what a prune condemned, and from when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    pub id: ObjectId,
    /// By the marking host's clock: for people. The protocol uses the store's time of the
    /// mark object.
    pub created: Timestamp,
    pub host: String,
    /// The sweep may delete the marked objects from the mark object's store time plus this.
    pub grace_seconds: u64,
    /// Pack object names (`data/E/xx/id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<String>,
    /// Superseded index segment names (`index/E/id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
    /// Epoch keys of months that hold nothing any more, by name without a key generation
    /// (`epochs/E/id`): the sweep deletes every generation's object of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
}

impl Mark {
    pub(super) fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }

    /// When the sweep may run, for a mark the store timed `stored`: the earliest store time
    /// at which a sweep could delete (writers compare with this).
    pub fn due(&self, stored: Timestamp) -> Timestamp {
        add(stored, self.grace())
    }

    pub(super) fn pack_ids(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.packs
            .iter()
            .filter_map(|p| name::parse_epoch_object(name::DATA, p).map(|(_, id)| id))
    }

    /// The epoch keys it condemns.
    pub(super) fn key_ids(&self) -> impl Iterator<Item = (Epoch, ObjectId)> + '_ {
        self.keys
            .iter()
            .filter_map(|k| name::parse_epoch_key(k).map(|(e, id, _)| (e, id)))
    }
}

/// The record that a mark's sweep finished (its store time says when).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Swept {
    pub id: ObjectId,
    pub swept: Timestamp,
}

pub(super) async fn put_json<T: Serialize>(
    repo: &Repository,
    object: &str,
    value: &T,
) -> Result<()> {
    let plain = serde_json::to_vec(value).expect("prune records serialize");
    repo.store()
        .put(object, repo.seal_master(Kind::Prune, object, &plain)?)
        .await
}

pub(super) async fn get_json<T: DeserializeOwned>(repo: &Repository, object: &str) -> Result<T> {
    let plain = repo.open_master(Kind::Prune, object).await?;
    serde_json::from_slice(&plain)
        .map_err(|e| Error::corrupt(object, format!("does not parse: {e}")))
}

/// The ids under one of the `prune/` prefixes, each with its store time. A name that is not
/// a record's (left by someone else) is added to `junk` and otherwise ignored: no object
/// prune writes has it, so nothing depends on it.
pub(super) async fn list_records(
    repo: &Repository,
    prefix: &str,
    junk: &mut Vec<String>,
) -> Result<Vec<(ObjectId, Timestamp)>> {
    let mut records = Vec::new();
    for o in repo.store().list(prefix).await? {
        match name::parse_prune_object(prefix, &o.name) {
            Some(id) => records.push((id, o.modified)),
            None => junk.push(format!(
                "{}: not a kluis object name under {prefix}/, ignored (remove it)",
                o.name
            )),
        }
    }
    Ok(records)
}

/// Marks, and the marks that were swept, each with its store time.
pub(super) type Marks = (Vec<(ObjectId, Timestamp)>, HashMap<ObjectId, Timestamp>);

pub(super) async fn list_marks(repo: &Repository, junk: &mut Vec<String>) -> Result<Marks> {
    // Sweep records first: prune expires a mark before its record, so a mark listed after
    // the records is either known swept or not yet expired.
    let swept = list_records(repo, name::PRUNE_SWEPT, junk).await?;
    let marks = list_records(repo, name::PRUNE_MARKS, junk).await?;
    Ok((marks, swept.into_iter().collect()))
}

/// Reads marks; each comes back with its store time. A mark deleted since it was listed
/// (expired, long after its sweep) is left out. A mark that cannot be read (damaged, or not
/// prune's) is added to `junk` and left out: nobody sweeps what it condemns, and the next
/// prune marks again whatever of it is still unused, so ignoring it deletes nothing early.
pub(super) async fn read_marks(
    repo: &Repository,
    listed: &[(ObjectId, Timestamp)],
    junk: &mut Vec<String>,
) -> Result<Vec<(Mark, Timestamp)>> {
    let objects: Vec<(ObjectId, Timestamp, String)> = listed
        .iter()
        .map(|(id, stored)| (*id, *stored, name::prune_object(name::PRUNE_MARKS, id)))
        .collect();
    let read = futures::stream::iter(objects)
        .map(|(id, stored, object)| async move {
            let mark: Mark = match get_json(repo, &object).await {
                Ok(m) => m,
                Err(Error::MissingObject { .. }) => return Ok(None),
                Err(e @ Error::Corrupt { .. }) => return Ok(Some(Err(e.to_string()))),
                Err(e) => return Err(e),
            };
            if mark.id != id {
                return Ok(Some(Err(format!(
                    "{object}: id differs from the object's name"
                ))));
            }
            Ok(Some(Ok((mark, stored))))
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<Result<Option<std::result::Result<(Mark, Timestamp), String>>>>>()
        .await;
    let mut marks = Vec::new();
    for read in read {
        match read? {
            Some(Ok(mark)) => marks.push(mark),
            Some(Err(why)) => junk.push(format!("{why}; this mark is ignored")),
            None => {}
        }
    }
    Ok(marks)
}
