//! Point-in-time recovery of a PostgreSQL cluster: a base backup (`source::postgres::base`)
//! restored into a new data directory, the archived WAL it needs (`crate::wal`) fetched beside
//! it, and the recovery settings written, so that the server started on the directory replays
//! to the target and promotes itself (docs/FORMAT.md §4.9).
//!
//! The WAL is fetched before the server starts, into `DIR/kluis_wal`, and the server's
//! `restore_command` copies from there: the restored server needs neither the repository's
//! secret nor its storage credentials. `archive_mode` is turned off in the restored directory
//! unless asked otherwise: a copy restored beside production (a drill, an investigation) must
//! not archive its new timeline into the production cluster's archive, where the next restore
//! to `latest` would follow it. A restored server that replaces the primary keeps archiving.

use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::repository::Repository;
use crate::restore::{RestoreOptions, Restorer};
use crate::snapshot::{BaseRecord, Snapshot, Source};
use crate::source::postgres::base::{parse_lsn, segment_number};
use crate::wal::{self, WalFile, WalKind};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The end of the archived WAL.
    Latest,
    /// Just after the last transaction that committed at or before this time.
    Time(Timestamp),
    /// A WAL location (`X/Y`).
    Lsn(String),
    /// A restore point made with `pg_create_restore_point(NAME)`.
    Name(String),
}

/// The directory the WAL is fetched into, in the restored data directory.
pub const WAL_DIR: &str = "kluis_wal";

/// How long after a target time WAL keeps being fetched for certain (PostgreSQL must read the
/// first commit after the target to stop there; clocks of the database host and the store may
/// be apart), beyond which one more segment per timeline is fetched.
const TIME_MARGIN: jiff::SignedDuration = jiff::SignedDuration::from_secs(600);

/// What a point-in-time restore did.
#[derive(Debug, Clone, Serialize)]
pub struct PitrReport {
    pub base: String,
    pub base_stopped: Timestamp,
    pub target: Target,
    pub data_directory: PathBuf,
    pub bytes: u64,
    pub wal_files: usize,
    pub wal_bytes: u64,
    /// The settings written into `postgresql.auto.conf`.
    pub settings: Vec<String>,
}

/// The base backup of `cluster`'s snapshots `name` a recovery to `target` starts from: for a
/// time, the newest that ended at or before it; else the newest.
pub fn select_base<'a>(list: &'a [Snapshot], name: &str, target: &Target) -> Result<&'a Snapshot> {
    let bases = list
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| match &s.source {
            Source::PostgresBase(b) => Some((s, b)),
            _ => None,
        });
    let found = match target {
        Target::Time(at) => bases
            .filter(|(_, b)| b.stopped <= *at)
            .max_by_key(|(s, _)| s.time),
        _ => bases.max_by_key(|(s, _)| s.time),
    };
    found.map(|(s, _)| s).ok_or_else(|| {
        Error::SnapshotNotFound(match target {
            Target::Time(at) => format!("a base backup {name} that ended at or before {at}"),
            _ => format!("a base backup {name}"),
        })
    })
}

/// Restores base backup `base` into the new data directory `dir` and prepares its recovery to
/// `target` (see the module's documentation).
pub async fn restore(
    repo: &Repository,
    base: &Snapshot,
    dir: &Path,
    target: Target,
    keep_archiving: bool,
    opts: RestoreOptions,
) -> Result<PitrReport> {
    let Source::PostgresBase(record) = &base.source else {
        return Err(Error::invalid(format!(
            "snapshot {} is not a PostgreSQL base backup",
            base.id.short()
        )));
    };
    let shown = dir.display().to_string();
    if shown.contains(['\'', '"', '\\']) {
        return Err(Error::invalid(format!(
            "{shown}: a data directory whose path has quotes or backslashes cannot be named in \
             restore_command; choose another"
        )));
    }
    let dir = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
    new_directory(&dir)?;
    let bytes = untar(repo, base, &dir, opts).await?;
    let wal_dir = dir.join(WAL_DIR);
    std::fs::create_dir(&wal_dir).map_err(|e| Error::io(&wal_dir, e))?;
    let (wal_files, wal_bytes) = fetch_wal(repo, record, &target, &wal_dir).await?;
    let settings = settings(&wal_dir, &target, keep_archiving);
    write_recovery(&dir, base, &settings)?;
    owned_like_the_data(&dir)?;
    Ok(PitrReport {
        base: base.id.to_hex(),
        base_stopped: record.stopped,
        target,
        data_directory: dir,
        bytes,
        wal_files,
        wal_bytes,
        settings,
    })
}

/// Creates `dir` (mode 0700, as PostgreSQL wants its data directory), or takes it if it is
/// an empty directory.
fn new_directory(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::invalid(format!(
                    "{}: not empty; a base backup is restored into a new or empty directory",
                    dir.display()
                )));
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(dir, e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e)),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// The base backup's tar stream, verified as it is read, unpacked into `dir` by `tar`.
async fn untar(
    repo: &Repository,
    base: &Snapshot,
    dir: &Path,
    opts: RestoreOptions,
) -> Result<u64> {
    let mut tar = crate::source::child_command("tar");
    tar.args(["-x", "-f", "-", "-C"])
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = tar
        .spawn()
        .map_err(|e| Error::TargetFailed(format!("cannot start tar: {e}")))?;
    let stdin = child.stdin.take().expect("piped");
    let restored = Restorer::new(repo, base, opts)
        .await?
        .stream_to(Box::new(stdin))
        .await;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::TargetFailed(format!("tar: {e}")))?;
    let report = restored?;
    if !out.status.success() {
        return Err(Error::TargetFailed(format!(
            "tar could not unpack the base backup into {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(report.bytes)
}

/// Fetches into `into` the WAL a recovery from `base` to `target` replays: every timeline
/// history file, and every segment from the base's first on (of its timeline and later ones);
/// for a time, those archived up to the target and the margin, and the next one of each
/// timeline. Each segment must come from the base's cluster.
async fn fetch_wal(
    repo: &Repository,
    base: &BaseRecord,
    target: &Target,
    into: &Path,
) -> Result<(usize, u64)> {
    let start = segment_number(parse_lsn(&base.start_lsn)?, base.wal_segment_size);
    let system: u64 = base.system_identifier.trim().parse().unwrap_or(0);
    let until = match target {
        Target::Time(at) => at.checked_add(TIME_MARGIN).ok(),
        _ => None,
    };
    let mut wanted: Vec<String> = Vec::new();
    let mut past: std::collections::BTreeMap<u32, (u64, String)> = Default::default();
    for a in wal::list(repo, &base.cluster).await? {
        let Ok(file) = WalFile::parse(&a.file) else {
            continue;
        };
        match file.kind() {
            WalKind::History { .. } => wanted.push(a.file),
            WalKind::Segment { timeline, number }
                if timeline >= base.timeline && number >= start =>
            {
                match until {
                    Some(until) if a.archived > until => {
                        let first = past.entry(timeline).or_insert((number, a.file.clone()));
                        if number < first.0 {
                            *first = (number, a.file);
                        }
                    }
                    _ => wanted.push(a.file),
                }
            }
            _ => {}
        }
    }
    wanted.extend(past.into_values().map(|(_, f)| f));
    if !wanted.contains(&base.start_wal) {
        return Err(Error::MissingObject {
            object: format!(
                "WAL segment {} of cluster {} (where base backup's WAL starts)",
                base.start_wal, base.cluster
            ),
        });
    }
    let mut bytes = 0;
    for file in &wanted {
        let got = wal::fetch(repo, &base.cluster, file, &into.join(file))
            .await?
            .ok_or_else(|| Error::MissingObject {
                object: format!("WAL file {file} of cluster {}", base.cluster),
            })?;
        if got.system != 0 && system != 0 && got.system != system {
            return Err(Error::invalid(format!(
                "WAL segment {file} of cluster {} belongs to database system {}, the base \
                 backup to {system}: two clusters archive under one name",
                base.cluster, got.system
            )));
        }
        bytes += got.bytes;
    }
    Ok((wanted.len(), bytes))
}

/// The recovery settings for `target`, with WAL from `wal_dir`.
fn settings(wal_dir: &Path, target: &Target, keep_archiving: bool) -> Vec<String> {
    let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
    let mut out = vec![
        format!(
            "restore_command = {}",
            quote(&format!("cp \"{}/%f\" \"%p\"", wal_dir.display()))
        ),
        "recovery_target_timeline = 'latest'".to_string(),
    ];
    if !keep_archiving {
        out.push("archive_mode = 'off'".to_string());
    }
    match target {
        Target::Latest => {}
        Target::Time(t) => {
            let utc = t.to_zoned_datetime(jiff::tz::TimeZone::UTC);
            let micros = utc.subsec_nanosecond() / 1000;
            let at = format!("{}.{micros:06}+00", utc.strftime("%Y-%m-%d %H:%M:%S"));
            out.push(format!("recovery_target_time = {}", quote(&at)));
        }
        Target::Lsn(l) => out.push(format!("recovery_target_lsn = {}", quote(l))),
        Target::Name(n) => out.push(format!("recovery_target_name = {}", quote(n))),
    }
    if *target != Target::Latest {
        out.push("recovery_target_action = 'promote'".to_string());
    }
    out
}

/// `recovery.signal`, and the settings at the end of `postgresql.auto.conf` (which the server
/// reads last).
fn write_recovery(dir: &Path, base: &Snapshot, settings: &[String]) -> Result<()> {
    let signal = dir.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(|e| Error::io(&signal, e))?;
    let auto = dir.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&auto)
        .map_err(|e| Error::io(&auto, e))?;
    let mut text = format!(
        "\n# kluis restore of base backup {} ({}), {}\n",
        base.id.short(),
        base.name,
        Timestamp::now()
    );
    for s in settings {
        text.push_str(s);
        text.push('\n');
    }
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&auto, e))
}

/// When kluis runs as root, gives what it created (the directory itself, the WAL it fetched,
/// the recovery files) to the owner the tar stream gave the data (`PG_VERSION`'s): the server
/// refuses a data directory it does not own.
fn owned_like_the_data(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let probe = dir.join("PG_VERSION");
    let meta = std::fs::metadata(&probe).map_err(|e| Error::io(&probe, e))?;
    let (uid, gid) = (meta.uid(), meta.gid());
    let mut paths = vec![
        dir.to_path_buf(),
        dir.join("recovery.signal"),
        dir.join("postgresql.auto.conf"),
        dir.join(WAL_DIR),
    ];
    for e in std::fs::read_dir(dir.join(WAL_DIR)).map_err(|e| Error::io(dir, e))? {
        paths.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    for p in paths {
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}
