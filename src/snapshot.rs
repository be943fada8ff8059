//! Snapshot manifests: the single commit point of a backup.
//!
//! A manifest is written last, after every pack and index segment it needs is durable; a
//! snapshot exists exactly when its manifest does. It records what was backed up, from where,
//! when, how much, and a SHA-256 of every stream so a restore can verify end to end.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{BlobId, ObjectId};
use crate::object::Epoch;

/// What a snapshot was taken of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// Standard input, stored as one file named after the snapshot.
    Stdin,
    /// Files and directories, by the paths given on the command line.
    Paths { paths: Vec<String> },
    /// The standard output of a command (`sh -c`), stored as one file named after the snapshot.
    Command { command: String },
    /// A PostgreSQL database, as the streams of a plain SQL dump (see `source::postgres`).
    Postgres(DatabaseRecord),
    /// A PostgreSQL server's roles and tablespaces (`pg_dumpall --globals-only`).
    #[serde(rename = "postgres-globals")]
    PostgresGlobals(GlobalsRecord),
    /// A MySQL or MariaDB database, as one `mariadb-dump` stream (see `source::mysql`).
    Mysql(DatabaseRecord),
    /// A SQLite database, as a consistent copy of its file (see `source::sqlite`).
    Sqlite(DatabaseRecord),
    /// A PostgreSQL cluster's physical base backup, one tar stream (see
    /// `source::postgres::base`), for point-in-time recovery with its archived WAL.
    #[serde(rename = "postgres-base")]
    PostgresBase(BaseRecord),
}

/// What a base backup holds, and where its WAL starts and ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRecord {
    /// The server's URL, without secrets.
    pub server: String,
    pub server_version: String,
    /// The cluster's name in the WAL archive (`kluis wal push --cluster`).
    pub cluster: String,
    /// The cluster's system identifier (decimal, as `pg_control_system()` gives it): its WAL
    /// must have the same.
    pub system_identifier: String,
    /// The timeline the backup started on.
    pub timeline: u32,
    /// Where the backup's WAL starts (`X/Y`): recovery replays from here.
    pub start_lsn: String,
    /// Where it ends: recovery must replay at least this far to be consistent.
    pub stop_lsn: String,
    /// The WAL segments holding `start_lsn` and `stop_lsn`.
    pub start_wal: String,
    pub stop_wal: String,
    pub wal_segment_size: u64,
    /// When the backup ended (this host's clock): the earliest time it can be recovered to.
    pub stopped: Timestamp,
}

/// What a database snapshot holds, for restores and restore drills.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseRecord {
    /// The server's URL, without secrets.
    pub server: String,
    pub database: String,
    pub server_version: String,
    pub encoding: String,
    /// The database's default collation (MySQL), to create the restore target with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collation: Option<String>,
    /// Every table whose rows the snapshot holds, in stream order.
    pub tables: Vec<TableRecord>,
}

/// What a snapshot of a PostgreSQL server's globals holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalsRecord {
    /// The server's URL, without secrets.
    pub server: String,
    pub server_version: String,
}

/// One table of a database snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRecord {
    pub schema: String,
    pub name: String,
    pub rows: u64,
    /// The primary key its rows are ordered by, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Sizes and counts of one backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    /// Bytes read from the source.
    pub logical_bytes: u64,
    /// Plaintext bytes of blobs the repository did not have yet.
    pub new_bytes: u64,
    /// Bytes this backup added to the repository (packs after compression and encryption).
    pub stored_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub blobs: u64,
    pub new_blobs: u64,
    /// Files that could not be read, with the reason; the snapshot is still usable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// End-to-end digest of one stream (a file or standard input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDigest {
    pub path: String,
    pub size: u64,
    #[serde(with = "hex::serde")]
    pub sha256: [u8; 32],
}

/// The manifest stored in `snapshots/<epoch>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub id: ObjectId,
    /// The snapshot's time; it decides the epoch.
    pub time: Timestamp,
    pub host: String,
    pub name: String,
    pub source: Source,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    pub tree: BlobId,
    pub started: Timestamp,
    pub finished: Timestamp,
    pub summary: Summary,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamDigest>,
    /// The program that wrote it, e.g. "kluis 0.1.0".
    pub program: String,
    /// Set on a copy (`kluis copy`): the snapshot it was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Its place in the writing host's chain of records (see [`crate::ledger`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Chain>,
    /// Set when the snapshot is one of a set one run made (a whole PostgreSQL server: its
    /// roles and each database); every member has the same time and the same record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<SetRecord>,
}

/// The set a snapshot belongs to: the set at a time is complete when a snapshot of each
/// member name has that time and this record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRecord {
    /// The set's name (a job's snapshot name).
    pub name: String,
    /// The snapshot name of every member, in the order they are taken (roles first).
    pub members: Vec<String>,
}

/// A record's place in the chain of the host that wrote it (see [`crate::ledger`]): snapshot
/// manifests, drill reports and forget records carry one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chain {
    /// The chain: one per state directory and repository.
    pub id: ObjectId,
    /// 1 for the chain's first record.
    pub seq: u64,
    /// The object name of the chain's previous record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// Where a copied snapshot came from: it is the same snapshot (time, host, name, content,
/// digests), stored again under another repository's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// The source repository's id.
    pub repository: ObjectId,
    /// The snapshot's id in the source repository.
    pub snapshot: ObjectId,
}

impl Snapshot {
    pub fn epoch(&self) -> Epoch {
        Epoch::of(self.time)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("snapshots serialize")
    }

    pub fn decode(object: &str, id: ObjectId, bytes: &[u8]) -> Result<Snapshot> {
        let s: Snapshot = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(object, format!("snapshot does not parse: {e}")))?;
        if s.id != id {
            return Err(Error::corrupt(
                object,
                "snapshot id does not match its name",
            ));
        }
        Ok(s)
    }
}

/// The roles and tablespaces to restore before the database snapshot `db`: its set's
/// `postgres-globals` member when it is one of a set, else the newest roles snapshot of the
/// same host at or before it.
pub fn roles_for<'a>(snapshots: &'a [Snapshot], db: &Snapshot) -> Option<&'a Snapshot> {
    let roles = |s: &&Snapshot| matches!(s.source, Source::PostgresGlobals(_));
    if let Some(set) = &db.set {
        let same_set = snapshots
            .iter()
            .filter(roles)
            .filter(|s| s.time == db.time && s.set.as_ref().is_some_and(|t| t.name == set.name))
            .max_by_key(|s| s.finished);
        if same_set.is_some() {
            return same_set;
        }
    }
    snapshots
        .iter()
        .filter(roles)
        .filter(|s| s.host == db.host && s.time <= db.time)
        .max_by_key(|s| s.time)
}

/// Finds the snapshot an operator means: `latest` (optionally of a name), or an id prefix.
pub fn select<'a>(
    snapshots: &'a [Snapshot],
    spec: &str,
    name: Option<&str>,
) -> Result<&'a Snapshot> {
    let candidates = snapshots
        .iter()
        .filter(|s| name.is_none_or(|n| s.name == n));
    if spec == "latest" {
        return candidates
            .max_by_key(|s| (s.time, s.finished))
            .ok_or_else(|| {
                Error::SnapshotNotFound(match name {
                    Some(n) => format!("latest (no snapshot named {n:?})"),
                    None => "latest (the repository has no snapshots)".into(),
                })
            });
    }
    let spec_lower = spec.to_ascii_lowercase();
    if spec_lower.is_empty() || !spec_lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!(
            "{spec:?} is not a snapshot id, id prefix or `latest`"
        )));
    }
    let matches: Vec<&Snapshot> = candidates
        .filter(|s| s.id.to_hex().starts_with(&spec_lower))
        .collect();
    match matches.len() {
        0 => Err(Error::SnapshotNotFound(spec.to_string())),
        1 => Ok(matches[0]),
        _ => Err(Error::AmbiguousSnapshot {
            prefix: spec.to_string(),
            matches: matches
                .iter()
                .map(|s| s.id.short())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The newest snapshot taken at or before `at` (optionally of a name): what an operator means
/// by "the state as of yesterday 14:00".
pub fn select_at<'a>(
    snapshots: &'a [Snapshot],
    at: Timestamp,
    name: Option<&str>,
) -> Result<&'a Snapshot> {
    snapshots
        .iter()
        .filter(|s| name.is_none_or(|n| s.name == n) && s.time <= at)
        .max_by_key(|s| (s.time, s.finished))
        .ok_or_else(|| {
            Error::SnapshotNotFound(format!(
                "at or before {at}{}",
                name.map(|n| format!(" named {n:?}")).unwrap_or_default()
            ))
        })
}

#[cfg(test)]
impl Snapshot {
    /// A minimal snapshot for unit tests: a stdin snapshot with nothing in it.
    pub(crate) fn for_test(id: ObjectId, time: &str, host: &str, name: &str) -> Snapshot {
        let t: Timestamp = time.parse().expect("a test time parses");
        Snapshot {
            id,
            time: t,
            host: host.into(),
            name: name.into(),
            source: Source::Stdin,
            tags: vec![],
            tree: BlobId::default(),
            started: t,
            finished: t,
            summary: Summary::default(),
            streams: vec![],
            program: "kluis test".into(),
            origin: None,
            chain: None,
            set: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, time: &str, name: &str) -> Snapshot {
        Snapshot::for_test(id.parse().unwrap(), time, "h", name)
    }

    #[test]
    fn selection() {
        let all = vec![
            snap(
                "aa000000000000000000000000000000",
                "2026-11-01T00:00:00Z",
                "db",
            ),
            snap(
                "ab000000000000000000000000000000",
                "2026-11-03T00:00:00Z",
                "files",
            ),
            snap(
                "bb000000000000000000000000000000",
                "2026-11-02T00:00:00Z",
                "db",
            ),
        ];
        assert_eq!(select(&all, "latest", None).unwrap().id.short(), "ab000000");
        assert_eq!(
            select(&all, "latest", Some("db")).unwrap().id.short(),
            "bb000000"
        );
        assert_eq!(select(&all, "BB", None).unwrap().id.short(), "bb000000");
        assert!(matches!(
            select(&all, "a", None),
            Err(Error::AmbiguousSnapshot { .. })
        ));
        assert!(matches!(
            select(&all, "cc", None),
            Err(Error::SnapshotNotFound(_))
        ));
        assert!(matches!(
            select(&all, "latest", Some("x")),
            Err(Error::SnapshotNotFound(_))
        ));
        assert!(matches!(
            select(&all, "../x", None),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            select(&[], "latest", None),
            Err(Error::SnapshotNotFound(_))
        ));
    }

    #[test]
    fn selection_at_a_time() {
        let all = vec![
            snap(
                "aa000000000000000000000000000000",
                "2026-11-01T02:30:00Z",
                "db",
            ),
            snap(
                "bb000000000000000000000000000000",
                "2026-11-02T02:30:00Z",
                "db",
            ),
            snap(
                "cc000000000000000000000000000000",
                "2026-11-02T03:00:00Z",
                "files",
            ),
        ];
        let at = |t: &str| t.parse::<Timestamp>().unwrap();
        let pick = |t: &str, n: Option<&str>| select_at(&all, at(t), n).map(|s| s.id.short());
        assert_eq!(pick("2026-11-02T02:30:00Z", None).unwrap(), "bb000000");
        assert_eq!(pick("2026-11-02T02:29:59Z", None).unwrap(), "aa000000");
        assert_eq!(
            pick("2026-11-09T00:00:00Z", Some("db")).unwrap(),
            "bb000000"
        );
        assert_eq!(pick("2026-11-09T00:00:00Z", None).unwrap(), "cc000000");
        assert!(matches!(
            pick("2026-11-01T02:29:59Z", None),
            Err(Error::SnapshotNotFound(_))
        ));
        assert!(pick("2026-11-09T00:00:00Z", Some("nope")).is_err());
    }

    #[test]
    fn manifest_round_trip_checks_id() {
        let s = snap(
            "aa000000000000000000000000000000",
            "2026-11-01T00:00:00Z",
            "db",
        );
        let bytes = s.encode();
        assert_eq!(Snapshot::decode("s", s.id, &bytes).unwrap(), s);
        assert!(Snapshot::decode("s", ObjectId::random(), &bytes).is_err());
        assert_eq!(s.epoch().to_string(), "2026-11");
    }

    #[test]
    fn the_roles_of_a_set_go_with_its_databases() {
        let member = |id: &str, set: &str, name: &str, roles: bool| {
            let mut s = snap(id, "2026-11-01T02:00:00Z", name);
            s.set = Some(SetRecord {
                name: set.into(),
                members: vec![],
            });
            if roles {
                s.source = Source::PostgresGlobals(GlobalsRecord {
                    server: set.into(),
                    server_version: "16".into(),
                });
            }
            s
        };
        // Two servers backed up from one host at the same time, and older loose roles.
        let mut loose = snap(
            "00000000000000000000000000000005",
            "2026-10-01T00:00:00Z",
            "r",
        );
        loose.source = Source::PostgresGlobals(GlobalsRecord {
            server: "x".into(),
            server_version: "16".into(),
        });
        let all = vec![
            member(
                "00000000000000000000000000000001",
                "a",
                "a.postgres-globals",
                true,
            ),
            member("00000000000000000000000000000002", "a", "a.shop", false),
            member(
                "00000000000000000000000000000003",
                "b",
                "b.postgres-globals",
                true,
            ),
            member("00000000000000000000000000000004", "b", "b.shop", false),
            loose.clone(),
        ];
        assert_eq!(roles_for(&all, &all[3]).unwrap().id, all[2].id);
        assert_eq!(roles_for(&all, &all[1]).unwrap().id, all[0].id);
        // Not in a set: the newest roles of the host at or before it.
        let plain = snap(
            "00000000000000000000000000000006",
            "2026-10-15T00:00:00Z",
            "db",
        );
        assert_eq!(roles_for(&all, &plain).unwrap().id, loose.id);
        assert!(roles_for(&all[..4], &plain).is_none());
    }
}
