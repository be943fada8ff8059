//! The audit trail: every restore, drill, copy, forget, prune, erasure, key change and
//! configuration reload leaves an audit record in the repository it concerns (docs/FORMAT.md
//! §6.11), and one structured line on standard error (the journal, under systemd).
//!
//! A record is sealed under the records key and named `audit/<time>-<digest>`, where `digest`
//! is the SHA-256 of its plaintext; each record names the digest of the newest record its
//! writer saw (`previous`), so the records form a hash chain (a tree where two writers raced).
//! Verification ([`verify`]) recomputes every digest and follows every `previous`: a record
//! altered or put under another name, and a record removed from the middle, are reported. The
//! newest records have no successor to vouch for them: each host keeps the names of the records
//! it wrote beside its ledger (see [`crate::ledger`]) and reports those that are gone. A record
//! never holds a secret or row data: who, what (ids, names, targets without passwords), when, and
//! the result.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crypto::Sha256;
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::ledger::Ledger;
use crate::object::Kind;
use crate::repository::Repository;

/// The prefix of audit records.
pub const AUDIT: &str = "audit";

/// What happened, as its caller tells it.
#[derive(Debug, Clone)]
pub struct Event {
    /// `restore`, `drill`, `copy`, `forget`, `prune`, `erase`, `key-add`, `key-remove`,
    /// `key-passwd`, `key-rotate`, `config-reload`.
    pub kind: &'static str,
    /// What it acted on: a snapshot id, a key slot, a configuration file.
    pub subject: String,
    /// Further facts (a target without its password, counts), never a secret or row data.
    pub detail: BTreeMap<String, String>,
    /// `ok`, or why it failed.
    pub result: String,
}

impl Event {
    pub fn new(kind: &'static str, subject: impl Into<String>) -> Event {
        Event {
            kind,
            subject: subject.into(),
            detail: BTreeMap::new(),
            result: "ok".into(),
        }
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Event {
        self.detail.insert(key.to_string(), value.to_string());
        self
    }

    /// The result of `outcome`: `ok`, or the error's words.
    pub fn outcome<T>(mut self, outcome: &Result<T, impl std::fmt::Display>) -> Event {
        if let Err(e) = outcome {
            self.result = format!("failed: {e}");
        }
        self
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub id: ObjectId,
    pub time: Timestamp,
    pub kind: String,
    /// The operating system user and host that did it.
    pub user: String,
    pub host: String,
    pub subject: String,
    pub detail: BTreeMap<String, String>,
    pub result: String,
    /// The key slot that opened the repository (`kluis key list` shows each slot's last use).
    pub slot: ObjectId,
    /// The digest (hex SHA-256 of the plaintext) of the newest record the writer saw; none
    /// for the first.
    pub previous: Option<String>,
    pub program: String,
}

/// A record's object name: `audit/<time>-<digest>`.
fn object_name(time: Timestamp, digest: &str) -> String {
    format!("{AUDIT}/{}-{digest}", time.strftime("%Y%m%dT%H%M%S%.6fZ"))
}

/// The digest in an audit record's name.
fn digest_of_name(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(AUDIT)?.strip_prefix('/')?;
    let (_, digest) = rest.rsplit_once('-')?;
    (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(digest)
}

/// Writes `event` as the newest audit record of `repo` and prints it as one line on standard
/// error; `ledger` (this host's) remembers its name. A record that cannot be written is a
/// warning, returned: the operation it records has happened either way.
pub async fn record(repo: &Repository, event: Event, ledger: Option<&Ledger>) -> Option<String> {
    // A write-only key holds no records key (and does nothing the trail records but a
    // configuration reload in its kluisd, which the line on stderr still shows).
    if repo.write_only() {
        let line = serde_json::json!({
            "kind": event.kind,
            "subject": event.subject,
            "detail": event.detail,
            "result": event.result,
            "recorded": "no: the key is write-only",
        });
        eprintln!("audit: {line}");
        return None;
    }
    match write(repo, &event, ledger).await {
        Ok(record) => {
            eprintln!(
                "audit: {}",
                serde_json::to_string(&record).expect("audit records serialize")
            );
            None
        }
        Err(e) => Some(format!(
            "the audit record of this {} could not be written to {}: {e}",
            event.kind,
            repo.store().location()
        )),
    }
}

async fn write(repo: &Repository, event: &Event, ledger: Option<&Ledger>) -> Result<AuditRecord> {
    let previous = repo
        .store()
        .list(AUDIT)
        .await?
        .into_iter()
        .filter(|o| digest_of_name(&o.name).is_some())
        .map(|o| o.name)
        .max()
        .and_then(|n| digest_of_name(&n).map(String::from));
    let record = AuditRecord {
        id: ObjectId::random(),
        time: Timestamp::now(),
        kind: event.kind.to_string(),
        user: crate::os_user().unwrap_or_default(),
        host: crate::hostname(),
        subject: event.subject.clone(),
        detail: event.detail.clone(),
        result: event.result.clone(),
        slot: repo.slot_id(),
        previous,
        program: format!("kluis {}", env!("CARGO_PKG_VERSION")),
    };
    let plain = serde_json::to_vec(&record).expect("audit records serialize");
    let digest = hex::encode(Sha256::digest(&plain));
    let name = object_name(record.time, &digest);
    repo.store()
        .put(&name, repo.seal_master(Kind::Audit, &name, &plain)?)
        .await?;
    if let Some(ledger) = ledger {
        // Best effort: the record is written; only its tail protection on this host is lost.
        let _ = remember(ledger, &name);
    }
    Ok(record)
}

/// Where this host keeps the names of the audit records it wrote to a repository.
fn written_path(ledger: &Ledger) -> PathBuf {
    ledger.path().with_extension("audit.json")
}

fn written(ledger: &Ledger) -> Result<BTreeSet<String>> {
    let path = written_path(ledger);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid(format!("{}: does not parse ({e})", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn remember(ledger: &Ledger, name: &str) -> Result<()> {
    let path = written_path(ledger);
    let mut names = written(ledger)?;
    names.insert(name.to_string());
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(&names).expect("names serialize");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(&path, e))
}

/// The audit trail of a repository, verified.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trail {
    /// Every record that reads, oldest first, with its object name.
    pub records: Vec<(String, AuditRecord)>,
    /// What is wrong with the chain: records altered, removed, unreadable, or gone that this
    /// host wrote.
    pub problems: Vec<String>,
}

/// Reads and verifies every audit record of `repo` (see the module's documentation).
pub async fn verify(repo: &Repository, ledger: Option<&Ledger>) -> Result<Trail> {
    repo.require_full("read the audit trail")?;
    let mut trail = Trail::default();
    let listed = repo.store().list(AUDIT).await?;
    let names: BTreeSet<String> = listed.into_iter().map(|o| o.name).collect();
    let mut digests = BTreeSet::new();
    for name in &names {
        let Some(digest) = digest_of_name(name) else {
            trail
                .problems
                .push(format!("{name}: not an audit record name"));
            continue;
        };
        let plain = match repo.open_master(Kind::Audit, name).await {
            Ok(p) => p,
            Err(e @ (Error::Corrupt { .. } | Error::MissingObject { .. })) => {
                trail.problems.push(format!("{e}"));
                continue;
            }
            Err(e) => return Err(e),
        };
        if hex::encode(Sha256::digest(&plain)) != digest {
            trail.problems.push(format!(
                "{name}: altered: its content does not match the digest in its name"
            ));
            continue;
        }
        match serde_json::from_slice::<AuditRecord>(&plain) {
            Ok(r) => {
                digests.insert(digest.to_string());
                trail.records.push((name.clone(), r));
            }
            Err(e) => trail.problems.push(format!("{name}: does not parse: {e}")),
        }
    }
    for (name, r) in &trail.records {
        if let Some(p) = &r.previous {
            if !digests.contains(p) {
                trail.problems.push(format!(
                    "{name}: the record before it (digest {}) is gone or altered",
                    &p[..16.min(p.len())]
                ));
            }
        }
    }
    if let Some(ledger) = ledger {
        for name in written(ledger)? {
            if !names.contains(&name) {
                trail
                    .problems
                    .push(format!("{name}: written by this host, and gone"));
            }
        }
    }
    trail
        .records
        .sort_by(|a, b| (a.1.time, &a.0).cmp(&(b.1.time, &b.0)));
    Ok(trail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_time_and_digest() {
        let t: Timestamp = "2026-12-03T23:44:21.5Z".parse().unwrap();
        let d = "ab".repeat(32);
        let name = object_name(t, &d);
        assert_eq!(name, format!("audit/20261203T234421.500000Z-{d}"));
        assert_eq!(digest_of_name(&name), Some(d.as_str()));
        assert_eq!(digest_of_name("audit/junk"), None);
        assert_eq!(digest_of_name("audit/x-abc"), None);
    }

    #[tokio::test]
    async fn a_chain_reports_records_altered_or_removed() {
        let repo = crate::repository::for_tests("memory://").await;
        for i in 0..4 {
            assert_eq!(
                record(&repo, Event::new("restore", format!("s{i}")), None).await,
                None
            );
        }
        let trail = verify(&repo, None).await.unwrap();
        assert_eq!(trail.records.len(), 4);
        assert!(trail.problems.is_empty(), "{:?}", trail.problems);
        // Each names the one before.
        for pair in trail.records.windows(2) {
            let before = digest_of_name(&pair[0].0).unwrap();
            assert_eq!(pair[1].1.previous.as_deref(), Some(before));
        }
        // One from the middle removed: its successor says so.
        repo.store().delete(&trail.records[1].0).await.unwrap();
        let broken = verify(&repo, None).await.unwrap();
        assert_eq!(broken.problems.len(), 1, "{:?}", broken.problems);
        assert!(broken.problems[0].contains("is gone or altered"));
        // One re-sealed under another name with other content (an insider with the key).
        let (name, mut r) = trail.records[2].clone();
        r.result = "ok, honestly".into();
        let plain = serde_json::to_vec(&r).unwrap();
        repo.store()
            .put(&name, repo.seal_master(Kind::Audit, &name, &plain).unwrap())
            .await
            .unwrap();
        let altered = verify(&repo, None).await.unwrap();
        assert!(
            altered.problems.iter().any(|p| p.contains("altered")),
            "{:?}",
            altered.problems
        );
    }
}
