//! `kluis backup`: files and directories, standard input, a command, or databases.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use jiff::Timestamp;

use kluis::backup::{self, BackupOptions, Source};
use kluis::config::Loaded;
use kluis::error::exit;
use kluis::jobs::{self, Planned, ServerDatabases};
use kluis::progress::{Cancel, Progress};
use kluis::scheduler::Timed;
use kluis::source::command::CommandSource;
use kluis::source::database;
use kluis::source::postgres::{self, PgConn};

use crate::databases::{Engine, database_url, db_password, places};
use crate::output::{ProgressLine, human_bytes, human_duration};
use crate::{Global, open, parse_time, show_progress};

#[derive(Args)]
pub struct BackupArgs {
    /// Files and directories to back up, or one database URL: postgres://[user@]host[:port]/db,
    /// mysql://[user@]host[:port]/db (or ?socket=PATH), sqlite:///path/to/file
    paths: Vec<PathBuf>,
    /// Read the data from standard input (requires --name)
    #[arg(long, conflicts_with = "paths")]
    stdin: bool,
    /// Back up the standard output of this shell command (requires --name); a non-zero exit
    /// or an error on its stderr fails the backup
    #[arg(long, conflicts_with_all = ["paths", "stdin"])]
    command: Option<String>,
    /// Snapshot name (default for paths: the first path's base name; for a database: its name)
    #[arg(long)]
    name: Option<String>,
    /// Host name to record (default: this host)
    #[arg(long)]
    host: Option<String>,
    /// Snapshot time instead of now: RFC 3339, or "YYYY-MM-DD[ HH:MM[:SS]]" in local time
    #[arg(long, value_parser = parse_time)]
    time: Option<Timestamp>,
    /// Tag the snapshot (repeatable)
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Compression threads (default: one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Concurrent pack uploads (default: 1 to a local directory, 2 to S3); each holds a
    /// pack in memory
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    uploads: usize,
    /// Print the snapshot as JSON
    #[arg(long)]
    json: bool,
    /// With a postgres:// URL of a server: back up this database (repeatable), each as a
    /// snapshot named after it
    #[arg(long = "database", value_name = "NAME")]
    databases: Vec<String>,
    /// With a postgres:// URL of a server: back up every database that accepts connections
    #[arg(long, conflicts_with = "databases")]
    all_databases: bool,
    /// Run this job of a kluisd configuration now (its repository, source and tags)
    #[arg(long, conflicts_with_all = ["paths", "stdin", "command"])]
    job: Option<String>,
    /// With --job: the configuration file (default: the embedded one)
    #[arg(long, requires = "job")]
    config: Option<PathBuf>,
    /// With a postgres:// URL: also back up the server's roles and tablespaces
    /// (pg_dumpall --globals-only, needs a superuser) as the snapshot `postgres-globals`
    #[arg(long)]
    globals: bool,
    /// With a postgres:// URL of a server: a physical base backup of the whole cluster
    /// (pg_basebackup, needs the REPLICATION privilege) for point-in-time recovery with the
    /// WAL `kluis wal push --cluster NAME` archives; snapshot name `NAME.base`
    #[arg(long, value_name = "NAME", conflicts_with_all = ["databases", "all_databases", "globals"])]
    base_backup: Option<String>,
}

/// What the arguments ask for: usually one snapshot; one per database (and one of the roles)
/// for a PostgreSQL server with --database, --all-databases or --globals.
fn plan(g: &Global, a: &BackupArgs, cancel: &Cancel) -> anyhow::Result<Vec<Planned>> {
    let one = |name: Option<String>, source: Source| {
        let name = a.name.clone().or(name);
        Ok::<_, anyhow::Error>(vec![Planned {
            name: name.unwrap_or_default(),
            source,
            time: None,
            set: None,
        }])
    };
    let server_wide = a.all_databases || a.globals || !a.databases.is_empty();
    if server_wide && !matches!(database_url(&a.paths), Some((Engine::Postgres, _))) {
        bail!(kluis::Error::InvalidInput(
            "--database, --all-databases and --globals go with a postgres:// URL".into()
        ));
    }
    if a.stdin {
        if a.name.is_none() {
            bail!(kluis::Error::InvalidInput(
                "--stdin needs --name NAME".into()
            ));
        }
        // Read so that an interruption stops the backup even while standard input is silent.
        let stdin = kluis::source::FdInput::new(std::io::stdin(), cancel.clone());
        return one(None, Source::Stream(Box::new(stdin)));
    }
    if let Some(cmd) = &a.command {
        let Some(name) = &a.name else {
            bail!(kluis::Error::InvalidInput(
                "--command needs --name NAME".into()
            ));
        };
        let source = CommandSource::new(cmd.clone(), name.clone());
        return one(None, Source::Streams(Box::new(source)));
    }
    if let Some(cluster) = &a.base_backup {
        let Some((Engine::Postgres, url)) = database_url(&a.paths) else {
            bail!(kluis::Error::InvalidInput(
                "--base-backup goes with a postgres:// URL of the server".into()
            ));
        };
        let server = PgConn::parse_server(&url, db_password(g)?)?
            .with_bin_dir(postgres::tools_dir(g.pg_bin_dir.as_deref()));
        let source = postgres::base::BaseSource::new(server, cluster.clone())?;
        return one(
            Some(format!("{cluster}.base")),
            Source::Streams(Box::new(source)),
        );
    }
    if let Some((engine, url)) = database_url(&a.paths) {
        return match engine {
            Engine::Postgres if server_wide => plan_postgres_server(g, a, &url),
            _ => {
                let (name, set) = database::open(&url, db_password(g)?, &places(g))?;
                one(name, Source::Streams(set))
            }
        };
    }
    if let Some(p) = a
        .paths
        .iter()
        .find(|p| p.to_str().is_some_and(|s| s.contains("://")))
    {
        bail!(kluis::Error::InvalidInput(format!(
            "{}: back up one database URL at a time (postgres://, mysql://, sqlite://), \
             without other paths",
            postgres::redact(&p.to_string_lossy())
        )));
    }
    if a.paths.is_empty() {
        bail!(kluis::Error::InvalidInput(
            "nothing to back up: give paths, a database URL, --command, or --stdin --name NAME"
                .into()
        ));
    }
    let first =
        std::path::absolute(&a.paths[0]).with_context(|| a.paths[0].display().to_string())?;
    let name = first
        .file_name()
        .map_or_else(|| "root".into(), |n| n.to_string_lossy().into_owned());
    one(Some(name), Source::Paths(a.paths.clone()))
}

/// A PostgreSQL server (see [`jobs::plan_postgres_server`]).
fn plan_postgres_server(g: &Global, a: &BackupArgs, url: &str) -> anyhow::Result<Vec<Planned>> {
    let server = PgConn::parse_server(url, db_password(g)?)?
        .with_bin_dir(postgres::tools_dir(g.pg_bin_dir.as_deref()));
    let databases = if a.all_databases {
        ServerDatabases::All
    } else if a.databases.is_empty() {
        ServerDatabases::Named
    } else {
        ServerDatabases::List(a.databases.clone())
    };
    Ok(jobs::plan_postgres_server(
        &server,
        &databases,
        a.globals,
        a.name.as_deref(),
    )?)
}

/// `--job NAME`: the job's repository, source and snapshot name, from its configuration.
async fn run_job(g: &Global, a: &BackupArgs, name: &str, cancel: Cancel) -> anyhow::Result<i32> {
    let config = Loaded::from_file_or_embedded(a.config.as_deref())?;
    let Some(job) = config.jobs.iter().find(|j| j.name == name) else {
        bail!(kluis::Error::InvalidInput(format!(
            "{} has no job {name:?} (it has: {})",
            config.origin,
            config
                .jobs
                .iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| config.state_dir.display().to_string())?;
    let progress = Progress::new();
    let opts = a.options(String::new(), cancel.clone(), progress.clone());
    let unit = match job.source {
        kluis::config::JobSource::Paths(_) => "files",
        _ => "streams",
    };
    let line = show_progress(g).then(|| ProgressLine::start("backup", unit, progress));
    // The daemon's run, under the job's timeout as in the daemon.
    let run = jobs::run(&config, job, opts);
    let timed = kluis::scheduler::with_timeout(run, job.timeout, &cancel).await;
    drop(line);
    let report = match timed {
        Timed::Done(report) => report?,
        Timed::TimedOut { .. } => bail!(
            "job {name}: cancelled after its timeout of {}",
            humantime::format_duration(job.timeout)
        ),
    };
    let several = report.committed.len() + report.failed.len() > 1;
    let mut code = exit::OK;
    let mut saved = Vec::new();
    for r in report.committed {
        if show(g, a, &r) != exit::OK {
            code = exit::INCOMPLETE;
        }
        saved.push(r.snapshot);
    }
    for (member, e) in &report.failed {
        eprintln!("error: {member}: {e}");
    }
    if a.json {
        print_json(&saved, several)?;
    }
    match report.failed.into_iter().next() {
        Some((_, e)) => Err(anyhow::Error::from(e)
            .context("some backups failed (see above); the others are committed")),
        None => Ok(code),
    }
}

impl BackupArgs {
    /// The options of one snapshot: the arguments that apply to any backup.
    fn options(&self, name: String, cancel: Cancel, progress: Arc<Progress>) -> BackupOptions {
        let mut opts = BackupOptions::new(name);
        opts.host = self.host.clone().unwrap_or_else(kluis::hostname);
        opts.time = self.time;
        opts.tags = self.tags.clone();
        opts.threads = self.threads;
        opts.uploads = self.uploads;
        opts.cancel = cancel;
        opts.progress = progress;
        opts
    }
}

pub async fn run(g: &Global, a: BackupArgs, cancel: Cancel) -> anyhow::Result<i32> {
    if let Some(name) = &a.job {
        return run_job(g, &a, name, cancel).await;
    }
    let planned = plan(g, &a, &cancel)?;
    let repo = open(g).await?;
    let ledger = crate::ledger(&crate::state_dir(g), &repo);
    back_up_planned(g, &a, (&repo, ledger), planned, cancel).await
}

/// Takes each planned snapshot; with several, one failure does not stop the others.
async fn back_up_planned(
    g: &Global,
    a: &BackupArgs,
    (repo, ledger): (
        &kluis::repository::Repository,
        Option<kluis::ledger::Ledger>,
    ),
    planned: Vec<Planned>,
    cancel: Cancel,
) -> anyhow::Result<i32> {
    let several = planned.len() > 1;
    let mut code = exit::OK;
    let mut first_error = None;
    let mut saved = Vec::new();
    for p in planned {
        if cancel.is_cancelled() {
            break;
        }
        let name = p.name.clone();
        let to = (repo, ledger.clone());
        match backup_one(g, a, to, p, cancel.clone()).await {
            Ok((c, snapshot)) => {
                if code == exit::OK {
                    code = c;
                }
                saved.push(snapshot);
            }
            // With several databases, one failure does not stop the others.
            Err(e) if several => {
                eprintln!("error: {name}: {e:#}");
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if a.json {
        print_json(&saved, several)?;
    }
    match first_error {
        Some(e) => Err(e.context("some backups failed (see above); the others are committed")),
        None => Ok(code),
    }
}

async fn backup_one(
    g: &Global,
    a: &BackupArgs,
    (repo, ledger): (
        &kluis::repository::Repository,
        Option<kluis::ledger::Ledger>,
    ),
    Planned {
        name,
        source,
        time,
        set,
    }: Planned,
    cancel: Cancel,
) -> anyhow::Result<(i32, kluis::snapshot::Snapshot)> {
    let progress = Progress::new();
    let mut opts = a.options(name, cancel, progress.clone());
    opts.ledger = ledger;
    opts.time = a.time.or(time);
    opts.set = set;
    let unit = match source {
        Source::Streams(_) => "streams",
        _ => "files",
    };
    let line = show_progress(g).then(|| ProgressLine::start("backup", unit, progress));
    let result = backup::backup(repo, source, opts).await;
    drop(line);
    let report = result?;
    let code = show(g, a, &report);
    Ok((code, report.snapshot))
}

/// One object for one snapshot, an array for several.
fn print_json(saved: &[kluis::snapshot::Snapshot], several: bool) -> anyhow::Result<()> {
    let text = match saved {
        [one] if !several => serde_json::to_string_pretty(one)?,
        all => serde_json::to_string_pretty(all)?,
    };
    println!("{text}");
    Ok(())
}

/// Prints what a committed backup says; its exit code: [`exit::INCOMPLETE`] when files could
/// not be read.
fn show(g: &Global, a: &BackupArgs, report: &backup::BackupReport) -> i32 {
    let s = &report.snapshot;
    for skipped in &report.skipped {
        if !g.quiet {
            eprintln!("skipped {skipped}");
        }
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for e in &s.summary.errors {
        eprintln!("warning: {e}");
    }
    if !a.json && !g.quiet {
        let elapsed = report.elapsed;
        println!(
            "snapshot {} of {} saved: {} read, {} new, {} stored, in {} ({}/s)",
            s.id.short(),
            s.name,
            human_bytes(s.summary.logical_bytes),
            human_bytes(s.summary.new_bytes),
            human_bytes(s.summary.stored_bytes),
            human_duration(elapsed),
            human_bytes((s.summary.logical_bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64),
        );
    }
    if s.summary.errors.is_empty() {
        exit::OK
    } else {
        eprintln!(
            "warning: {} file(s) could not be read; the snapshot is committed without them",
            s.summary.errors.len()
        );
        exit::INCOMPLETE
    }
}
