//! `kluis restore`: a snapshot to standard output, a directory, or a database.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use jiff::Timestamp;

use kluis::error::exit;
use kluis::progress::{Cancel, Progress};
use kluis::restore::{DatabaseTarget, RestoreOptions, Restorer};
use kluis::snapshot::{self, Source as SnapshotSource};

use crate::databases::{db_password, places};
use crate::output::{self, ProgressLine, human_bytes, human_duration};
use crate::{Global, open, parse_time, show_progress, stdout_file};

#[derive(Args)]
pub struct RestoreArgs {
    /// Snapshot id, id prefix, or `latest` (or give --at)
    #[arg(required_unless_present = "at", conflicts_with = "at")]
    snapshot: Option<String>,
    /// The newest snapshot taken at or before this time: RFC 3339, "YYYY-MM-DD[ HH:MM[:SS]]"
    /// in local time, or an age such as 36h or 2days
    #[arg(long, value_parser = parse_at)]
    at: Option<Timestamp>,
    /// With `latest` or --at: only snapshots of this name
    #[arg(long)]
    name: Option<String>,
    /// Write the stream to standard output (a database snapshot: as a plain SQL dump)
    #[arg(long, conflicts_with_all = ["target", "to"], required_unless_present_any = ["target", "to"])]
    stdout: bool,
    /// Restore a database snapshot into this database: postgres://[user@]host[:port]/newdb,
    /// mysql://[user@]host[:port]/newdb or sqlite:///path/new.db (created if missing; an
    /// existing non-empty one is refused unless --force)
    #[arg(long, conflicts_with = "target")]
    to: Option<String>,
    /// With --to: drop and recreate a target database that is not empty
    #[arg(long, requires = "to")]
    force: bool,
    /// With --to: tables loaded at once
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// With --to postgres://: first restore the server's roles and tablespaces from the newest
    /// `postgres-globals` snapshot of the same host taken at or before this one
    /// (`kluis backup --globals`); roles that exist already are kept
    #[arg(long, requires = "to")]
    roles: bool,
    /// Restore files and directories into this directory
    #[arg(long)]
    target: Option<PathBuf>,
    /// Replace files that already exist under --target
    #[arg(long)]
    overwrite: bool,
    /// Restore setuid and setgid bits under --target (dropped unless asked for)
    #[arg(long)]
    keep_setid: bool,
    /// Ranged reads in flight
    #[arg(long, default_value_t = 4)]
    fetches: usize,
    /// A PostgreSQL base backup (`kluis backup --base-backup`) into --target DIR: recover to
    /// this WAL location (X/Y) instead of a time or the end of the archive
    #[arg(long, conflicts_with_all = ["at", "until_restore_point"], requires = "target")]
    until_lsn: Option<String>,
    /// ... or to this restore point (`pg_create_restore_point`)
    #[arg(long, conflicts_with = "at", requires = "target")]
    until_restore_point: Option<String>,
    /// A base backup restored to replace the primary: keep its WAL archiving on (by default
    /// it is turned off, so that a copy beside production never archives its new timeline
    /// into production's archive)
    #[arg(long, requires = "target")]
    keep_archiving: bool,
}

/// A point in time, or an age before now ("36h", "2days").
fn parse_at(s: &str) -> Result<Timestamp, String> {
    if let Ok(age) = humantime::parse_duration(s) {
        let age = jiff::SignedDuration::try_from(age).map_err(|e| format!("{s:?}: {e}"))?;
        return Timestamp::now()
            .checked_sub(age)
            .map_err(|e| format!("{s:?}: {e}"));
    }
    parse_time(s).map_err(|e| format!("{e}, or an age such as 36h"))
}

pub async fn run(g: &Global, a: RestoreArgs, cancel: Cancel) -> anyhow::Result<i32> {
    let repo = open(g).await?;
    repo.require_full("restore")?;
    let (list, errors) = repo.snapshots().await?;
    for err in &errors {
        eprintln!("warning: {err}");
    }
    let wanted = a
        .snapshot
        .clone()
        .unwrap_or_else(|| "latest".into())
        .to_ascii_lowercase();
    let selected = match a.at {
        Some(at) => snapshot::select_at(&list, at, a.name.as_deref()),
        None => snapshot::select(&list, &wanted, a.name.as_deref()),
    };
    let snap = match selected {
        Ok(s) => s,
        Err(e) => {
            // A snapshot that cannot be read is not listed: if it may be the one asked for,
            // its damage is the error, not "not found".
            let culprit = errors.into_iter().find(|u| {
                wanted == "latest" || u.id.is_some_and(|id| id.to_hex().starts_with(&wanted))
            });
            return Err(culprit.map_or_else(|| e.into(), |u| u.error.into()));
        }
    };
    if a.at.is_some() && !g.quiet {
        eprintln!(
            "snapshot {} of {} ({})",
            snap.id.short(),
            output::local_time(snap.time),
            snap.name
        );
    }
    if let SnapshotSource::PostgresBase(_) = &snap.source {
        return restore_base(g, &repo, &list, snap, &a, cancel).await;
    }
    if a.until_lsn.is_some() || a.until_restore_point.is_some() {
        bail!(kluis::Error::InvalidInput(format!(
            "--until-lsn and --until-restore-point go with a PostgreSQL base backup; snapshot \
             {} is not one",
            snap.id.short()
        )));
    }
    if !errors.is_empty() && wanted == "latest" {
        eprintln!(
            "warning: {} snapshot(s) could not be read; `latest` is the newest readable one",
            errors.len()
        );
    }
    let progress = Progress::new();
    let opts = RestoreOptions {
        fetches: a.fetches.max(1),
        overwrite: a.overwrite,
        keep_setid: a.keep_setid,
        cancel,
        progress: progress.clone(),
    };
    let started = Instant::now();
    let to = match &a.to {
        Some(url) => Some(DatabaseTarget::parse(url, db_password(g)?, &places(g))?),
        None => None,
    };
    if a.roles {
        let Some(DatabaseTarget::Postgres(target)) = &to else {
            bail!(kluis::Error::InvalidInput(
                "--roles goes with --to postgres://".into()
            ));
        };
        let roles = kluis::snapshot::roles_for(&list, snap).ok_or_else(|| {
            kluis::Error::SnapshotNotFound(format!(
                "postgres-globals of host {} at or before {} (back up with --globals)",
                snap.host, snap.time
            ))
        })?;
        let server = target.with_database("postgres");
        let report = Restorer::new(&repo, roles, opts.clone())
            .await?
            .to_postgres_globals(&server)
            .await?;
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        if !g.quiet {
            eprintln!("restored roles from snapshot {}", roles.id.short());
        }
    }
    let restorer = Restorer::new(&repo, snap, opts).await?;
    // What the progress line and the last line count.
    let tables = match &snap.source {
        SnapshotSource::Postgres(db) | SnapshotSource::Mysql(db) | SnapshotSource::Sqlite(db) => {
            Some(db.tables.len() as u64)
        }
        _ => None,
    };
    let unit = match (&a.target, tables) {
        (Some(_), _) => "files",
        (None, Some(_)) => "tables",
        (None, None) => "streams",
    };
    let line = show_progress(g).then(|| ProgressLine::start("restore", unit, progress));
    let result = if let Some(target) = &to {
        restorer.to_database(target, a.force, a.jobs).await
    } else if a.stdout {
        let out = stdout_file()?;
        restorer.stream_to(Box::new(out)).await
    } else {
        let target = a
            .target
            .clone()
            .expect("clap requires --stdout or --target");
        restorer.to_directory(&target).await
    };
    drop(line);
    // Who restored what, where, and how it went: in the repository's audit trail.
    let target = match (&to, &a.target) {
        (Some(t), _) => t.shown(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => "standard output".to_string(),
    };
    let event = kluis::audit::Event::new("restore", snap.id.to_hex())
        .with("name", &snap.name)
        .with("snapshot_time", snap.time)
        .with("target", target)
        .outcome(&result);
    let ledger = crate::ledger(&crate::state_dir(g), &repo);
    if let Some(w) = kluis::audit::record(&repo, event, ledger.as_ref()).await {
        eprintln!("warning: {w}");
    }
    if result.is_err() && a.to.is_some() {
        eprintln!(
            "note: the target may hold part of the snapshot; drop it, or restore again with --force"
        );
    }
    let report = result?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !g.quiet {
        let elapsed = started.elapsed();
        eprintln!(
            "restored snapshot {} ({}): {} {unit}, {}, verified, in {} ({}/s)",
            snap.id.short(),
            snap.name,
            match (unit, tables) {
                ("tables", Some(n)) => n,
                _ => report.files,
            },
            human_bytes(report.bytes),
            human_duration(elapsed),
            human_bytes((report.bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64),
        );
    }
    Ok(exit::OK)
}

/// A PostgreSQL base backup into a new data directory, with the WAL to recover to the target
/// (see `kluis::pitr`).
async fn restore_base(
    g: &Global,
    repo: &kluis::repository::Repository,
    list: &[kluis::snapshot::Snapshot],
    chosen: &kluis::snapshot::Snapshot,
    a: &RestoreArgs,
    cancel: Cancel,
) -> anyhow::Result<i32> {
    use kluis::pitr::{self, Target};
    let Some(dir) = &a.target else {
        bail!(kluis::Error::InvalidInput(format!(
            "snapshot {} is a PostgreSQL base backup: restore it with --target DIR (a new data \
             directory)",
            chosen.id.short()
        )));
    };
    let target = match (&a.at, &a.until_lsn, &a.until_restore_point) {
        (Some(at), _, _) => Target::Time(*at),
        (None, Some(lsn), _) => {
            kluis::source::postgres::base::parse_lsn(lsn)?;
            Target::Lsn(lsn.clone())
        }
        (None, None, Some(name)) => Target::Name(name.clone()),
        (None, None, None) => Target::Latest,
    };
    let base = match &target {
        Target::Time(_) => pitr::select_base(list, &chosen.name, &target)?,
        _ => chosen,
    };
    let opts = RestoreOptions {
        fetches: a.fetches.max(1),
        cancel,
        ..RestoreOptions::default()
    };
    let result = pitr::restore(repo, base, dir, target, a.keep_archiving, opts).await;
    let event = kluis::audit::Event::new("restore", base.id.to_hex())
        .with("name", &base.name)
        .with("snapshot_time", base.time)
        .with("target", dir.display())
        .outcome(&result);
    let ledger = crate::ledger(&crate::state_dir(g), repo);
    if let Some(w) = kluis::audit::record(repo, event, ledger.as_ref()).await {
        eprintln!("warning: {w}");
    }
    let report = result?;
    if !g.quiet {
        eprintln!(
            "restored base backup {} ({}, ended {}) into {}: {}, and {} WAL file(s) ({}) in {}",
            &report.base[..8],
            base.name,
            output::local_time(report.base_stopped),
            report.data_directory.display(),
            human_bytes(report.bytes),
            report.wal_files,
            human_bytes(report.wal_bytes),
            kluis::pitr::WAL_DIR
        );
        eprintln!("recovery settings added to postgresql.auto.conf:");
        for s in &report.settings {
            eprintln!("  {s}");
        }
        eprintln!(
            "start the server on it (pg_ctl -D {} start): it replays the WAL to the target and \
             promotes itself",
            report.data_directory.display()
        );
    }
    Ok(exit::OK)
}
