//! PostgreSQL's write-ahead log, archived into the repository: `kluis wal push` is the
//! `archive_command`, `kluis wal fetch` the `restore_command` (docs/FORMAT.md §4.9).
//!
//! Each WAL file PostgreSQL archives (a segment, a timeline history file, a backup history
//! file) becomes one object, `wal/<YYYY-MM>/<cluster>/<name>`, compressed and sealed under the
//! epoch key of the month it was archived in, so an erasure of that month covers it. It is
//! opened and compared with the file again before it is uploaded, and a push returns only once
//! the object is durable in the store: PostgreSQL recycles a segment only after its
//! `archive_command` succeeded, so no segment is reported archived that the archive does not
//! hold. A file that is archived already (PostgreSQL retries after a crash) is accepted when
//! its content is the same, refused when it differs.
//!
//! WAL is compressed but not chunked: every WAL page header carries its own address (the
//! LSN), so no two pages are alike and deduplication would find nothing.

use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use serde::Serialize;

use crate::crypto::Sha256;
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::object::{self, Epoch, Header, Kind, name};
use crate::repository::{EpochKey, Repository};

mod file;

pub use file::{WalFile, WalKind, parse_cluster};

/// The version byte that starts every WAL object's plaintext.
const VERSION: u8 = 1;
/// The plaintext's header: version, compression, raw length, SHA-256, system identifier.
const HEAD_LEN: usize = 1 + 1 + 8 + 32 + 8;
/// Compression values.
const NONE: u8 = 0;
const ZSTD: u8 = 1;

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub file: String,
    pub object: String,
    pub bytes: u64,
    /// Bytes stored (compressed and sealed); 0 when it was archived already.
    pub stored: u64,
    /// It was in the archive already, with the same content.
    pub already: bool,
}

/// One archived WAL file, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Archived {
    pub file: String,
    pub object: String,
    pub epoch: Epoch,
    /// Stored bytes.
    pub size: u64,
    /// When the store took it: when PostgreSQL handed it over, at the latest.
    pub archived: jiff::Timestamp,
}

/// An archived WAL file, opened.
struct Opened {
    raw: Vec<u8>,
    sha256: [u8; 32],
    system: u64,
}

/// Archives the WAL file at `path` for `cluster` (see the module's documentation).
pub async fn push(repo: &Repository, cluster: &str, path: &Path) -> Result<PushReport> {
    parse_cluster(cluster)?;
    let file = WalFile::of_path(path)?;
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    file.check_size(raw.len() as u64)?;
    let sha256 = Sha256::digest(&raw);
    if let Some(report) = already(repo, cluster, &file, &raw, &sha256).await? {
        return Ok(report);
    }
    let now = jiff::Timestamp::now();
    let epoch = Epoch::of(now);
    let view = crate::prune::WriterView::read(repo).await?;
    let (key, _) = repo.write_key(epoch, view.condemned_keys()).await?;
    let object = name::wal(epoch, cluster, file.name());
    let sealed = seal(repo, &key, &object, &file, &raw, &sha256)?;
    // Verified before it leaves: what is uploaded opens, decompresses and hashes back to the
    // file (restic #4523: a compression bug once stored data that did not).
    let back = open(repo, &key, &object, &sealed)?;
    if back.raw != raw {
        return Err(Error::corrupt(
            &object,
            "the sealed WAL file does not open back to the file; nothing was uploaded",
        ));
    }
    view.check_commit(repo, &Default::default(), (epoch, key.id))
        .await?;
    let stored = sealed.len() as u64;
    repo.store().put(&object, Bytes::from(sealed)).await?;
    Ok(PushReport {
        file: file.name().to_string(),
        object,
        bytes: raw.len() as u64,
        stored,
        already: false,
    })
}

/// Whether `file` of `cluster` is in the archive already: `Some` when it is, with the same
/// content; an error when the archive holds other content under its name.
async fn already(
    repo: &Repository,
    cluster: &str,
    file: &WalFile,
    raw: &[u8],
    sha256: &[u8; 32],
) -> Result<Option<PushReport>> {
    let Some(object) = find(repo, cluster, file.name()).await? else {
        return Ok(None);
    };
    let report = PushReport {
        file: file.name().to_string(),
        object: object.clone(),
        bytes: raw.len() as u64,
        stored: 0,
        already: true,
    };
    let opened = match read(repo, &object).await {
        Ok(o) => o,
        // A write-only key cannot read what an earlier month's key sealed; the object is
        // whole (puts are atomic), so it is taken as archived.
        Err(Error::WriteOnly(_)) => return Ok(Some(report)),
        Err(e) => return Err(e),
    };
    if &opened.sha256 != sha256 {
        return Err(Error::Conflict(format!(
            "{object}: WAL file {} is archived already with other content (SHA-256 {} there, \
             {} here); refusing to replace it. Do two clusters archive under one cluster name?",
            file.name(),
            hex::encode(opened.sha256),
            hex::encode(sha256)
        )));
    }
    Ok(Some(report))
}

/// The object holding `file` of `cluster`, newest epoch first; `None` when it is not archived.
async fn find(repo: &Repository, cluster: &str, file: &str) -> Result<Option<String>> {
    let mut epochs: Vec<Epoch> = repo
        .store()
        .list_dirs(name::WAL)
        .await?
        .iter()
        .filter_map(|d| Epoch::parse(d.strip_prefix(name::WAL)?.strip_prefix('/')?))
        .collect();
    epochs.sort();
    for epoch in epochs.into_iter().rev() {
        let object = name::wal(epoch, cluster, file);
        if repo.store().exists(&object).await? {
            return Ok(Some(object));
        }
    }
    Ok(None)
}

/// A WAL file fetched.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    pub bytes: u64,
    /// The system identifier its segment records (0: none).
    pub system: u64,
}

/// Restores WAL file `file` of `cluster` to `dest` (written whole, then renamed into place);
/// `None` when the archive does not hold it (the end of the WAL, to a recovery).
pub async fn fetch(
    repo: &Repository,
    cluster: &str,
    file: &str,
    dest: &Path,
) -> Result<Option<Fetched>> {
    parse_cluster(cluster)?;
    let file = WalFile::parse(file)?;
    let Some(object) = find(repo, cluster, file.name()).await? else {
        return Ok(None);
    };
    let opened = read(repo, &object).await?;
    let tmp = dest.with_file_name(format!(
        ".{}.kluis-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal"),
        ObjectId::random().short()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&opened.raw)?;
        f.sync_all()
    })();
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, dest)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(dest, e));
    }
    Ok(Some(Fetched {
        bytes: opened.raw.len() as u64,
        system: opened.system,
    }))
}

/// Every archived WAL file of `cluster`, by file name (a file archived twice, in two months,
/// once: the newest).
pub async fn list(repo: &Repository, cluster: &str) -> Result<Vec<Archived>> {
    parse_cluster(cluster)?;
    let mut found: std::collections::BTreeMap<String, Archived> = Default::default();
    for o in repo.store().list(name::WAL).await? {
        let Some((epoch, c, file)) = name::parse_wal(&o.name) else {
            continue;
        };
        if c != cluster || WalFile::parse(file).is_err() {
            continue;
        }
        let entry = Archived {
            file: file.to_string(),
            object: o.name.clone(),
            epoch,
            size: o.size,
            archived: o.modified,
        };
        match found.get(file) {
            Some(e) if e.epoch >= epoch => {}
            _ => {
                found.insert(file.to_string(), entry);
            }
        }
    }
    Ok(found.into_values().collect())
}

/// Reads and opens the WAL object `object`.
async fn read(repo: &Repository, object: &str) -> Result<Opened> {
    let (epoch, _, _) =
        name::parse_wal(object).ok_or_else(|| Error::corrupt(object, "not a WAL object name"))?;
    let bytes = repo
        .store()
        .get_bounded(object, repo.max_len(Kind::Wal))
        .await?;
    let header = Header::decode(object, &bytes, Kind::Wal)?;
    let key = repo
        .epoch_key(epoch, header.key_id)
        .await
        .map_err(|e| match e {
            Error::MissingObject { .. } => Error::corrupt(
                object,
                format!(
                    "its epoch key {} of {epoch} is missing",
                    header.key_id.short()
                ),
            ),
            e => e,
        })?;
    open(repo, &key, object, &bytes)
}

/// Seals a WAL file's content as object `object` under `key`.
fn seal(
    repo: &Repository,
    key: &EpochKey,
    object: &str,
    file: &WalFile,
    raw: &[u8],
    sha256: &[u8; 32],
) -> Result<Vec<u8>> {
    let compressed = zstd::bulk::compress(raw, repo.config().compression_level)
        .map_err(|e| Error::invalid(format!("{}: zstd failed: {e}", file.name())))?;
    let (compression, payload) = if compressed.len() < raw.len() {
        (ZSTD, &compressed[..])
    } else {
        (NONE, raw)
    };
    let mut plain = Vec::with_capacity(HEAD_LEN + payload.len());
    plain.push(VERSION);
    plain.push(compression);
    plain.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    plain.extend_from_slice(sha256);
    plain.extend_from_slice(&file.system_identifier(raw).unwrap_or(0).to_le_bytes());
    plain.extend_from_slice(payload);
    Ok(repo.seal(Kind::Wal, key, object, &plain).to_vec())
}

/// Opens a sealed WAL object: its AEAD, its header, the decompressed length and SHA-256.
fn open(repo: &Repository, key: &EpochKey, object: &str, bytes: &[u8]) -> Result<Opened> {
    let header = Header::decode(object, bytes, Kind::Wal)?;
    let plain = object::open(header, key.key(), &repo.id(), object, bytes)?;
    if plain.len() < HEAD_LEN || plain[0] != VERSION {
        return Err(Error::corrupt(object, "not a WAL object of this format"));
    }
    let raw_len = u64::from_le_bytes(plain[2..10].try_into().expect("8 bytes"));
    let sha256: [u8; 32] = plain[10..42].try_into().expect("32 bytes");
    let system = u64::from_le_bytes(plain[42..50].try_into().expect("8 bytes"));
    let payload = &plain[HEAD_LEN..];
    if raw_len > file::MAX_SIZE {
        return Err(Error::corrupt(
            object,
            format!("{raw_len} bytes: too large"),
        ));
    }
    let raw = match plain[1] {
        NONE => payload.to_vec(),
        ZSTD => zstd::bulk::decompress(payload, raw_len as usize)
            .map_err(|e| Error::corrupt(object, format!("does not decompress: {e}")))?,
        other => {
            return Err(Error::corrupt(
                object,
                format!("unknown compression {other}"),
            ));
        }
    };
    if raw.len() as u64 != raw_len || Sha256::digest(&raw) != sha256 {
        return Err(Error::corrupt(
            object,
            "its content does not match its recorded length and SHA-256",
        ));
    }
    Ok(Opened {
        raw,
        sha256,
        system,
    })
}

/// The system identifier a WAL object records (0: not a segment), for checks that an archive
/// and a base backup belong to one cluster.
pub async fn system_identifier(repo: &Repository, object: &str) -> Result<u64> {
    Ok(read(repo, object).await?.system)
}

#[cfg(test)]
mod tests;

/// What `kluis check` found of the WAL archive.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalCheck {
    /// Archived WAL files, of every cluster.
    pub files: usize,
    pub clusters: Vec<String>,
    /// Segments missing between the first one a base backup (or the archive) starts from and
    /// the newest archived, by cluster and timeline; a base backup whose first segment is
    /// missing; and, with `read_data`, WAL objects that do not open.
    pub problems: Vec<String>,
}

/// Checks every cluster's archive for gaps (see [`WalCheck`]); with `read_data` every WAL
/// object is read and verified as well.
pub async fn check(
    repo: &Repository,
    snapshots: &[crate::snapshot::Snapshot],
    read_data: bool,
) -> Result<WalCheck> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut out = WalCheck::default();
    // cluster -> timeline -> segment numbers
    let mut archived: BTreeMap<String, BTreeMap<u32, BTreeSet<u64>>> = BTreeMap::new();
    for o in repo.store().list(name::WAL).await? {
        let Some((_, cluster, file)) = name::parse_wal(&o.name) else {
            out.problems
                .push(format!("{}: not a WAL object name", o.name));
            continue;
        };
        let Ok(parsed) = WalFile::parse(file) else {
            out.problems
                .push(format!("{}: not a WAL file name", o.name));
            continue;
        };
        out.files += 1;
        let timelines = archived.entry(cluster.to_string()).or_default();
        if let WalKind::Segment { timeline, number } = parsed.kind() {
            timelines.entry(timeline).or_default().insert(number);
        }
        if read_data {
            if let Err(e) = read(repo, &o.name).await {
                out.problems.push(e.to_string());
            }
        }
    }
    let bases: Vec<&crate::snapshot::BaseRecord> = snapshots
        .iter()
        .filter_map(|s| match &s.source {
            crate::snapshot::Source::PostgresBase(b) => Some(b),
            _ => None,
        })
        .collect();
    for (cluster, timelines) in &archived {
        let size = bases
            .iter()
            .find(|b| &b.cluster == cluster)
            .map_or(16 << 20, |b| b.wal_segment_size);
        let per_log = (0x1_0000_0000 / size.max(1)).max(1);
        let next = |n: u64| {
            if (n & 0xFFFF_FFFF) + 1 < per_log {
                n + 1
            } else {
                ((n >> 32) + 1) << 32
            }
        };
        for (&timeline, numbers) in timelines {
            let (Some(&first), Some(&last)) = (numbers.first(), numbers.last()) else {
                continue;
            };
            let from = bases
                .iter()
                .filter(|b| &b.cluster == cluster && b.timeline == timeline)
                .filter_map(|b| WalFile::parse(&b.start_wal).ok())
                .filter_map(|f| match f.kind() {
                    WalKind::Segment { number, .. } => Some(number),
                    _ => None,
                })
                .min()
                .map_or(first, |start| start.min(first));
            let mut gap: Option<(u64, u64)> = None;
            let mut n = from;
            let show = |n: u64| format!("{timeline:08X}{:08X}{:08X}", n >> 32, n & 0xFFFF_FFFF);
            let report = |g: (u64, u64), out: &mut WalCheck| {
                let what = if g.0 == g.1 {
                    format!("segment {} is missing", show(g.0))
                } else {
                    format!("segments {} to {} are missing", show(g.0), show(g.1))
                };
                out.problems.push(format!(
                    "WAL of cluster {cluster}, timeline {timeline}: {what}; no point in time \
                     after it can be recovered from a base backup before it"
                ));
            };
            while n <= last {
                if numbers.contains(&n) {
                    if let Some(g) = gap.take() {
                        report(g, &mut out);
                    }
                } else {
                    gap = Some(gap.map_or((n, n), |(a, _)| (a, n)));
                }
                n = next(n);
            }
        }
        out.clusters.push(cluster.clone());
    }
    for b in &bases {
        let held = archived
            .get(&b.cluster)
            .and_then(|t| t.get(&b.timeline))
            .is_some_and(|n| !n.is_empty());
        if !held {
            out.problems.push(format!(
                "base backup of cluster {} needs WAL from segment {}, and the archive holds none \
                 of that cluster and timeline: it cannot be recovered",
                b.cluster, b.start_wal
            ));
        }
    }
    Ok(out)
}
