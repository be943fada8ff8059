//! `kluis`: the command line for operators and on-call engineers.
//!
//! Thin by design: parse arguments, find the repository and the secret, call the engine, print.
//! Data goes to stdout, messages and progress to stderr. Exit codes: see `kluis::error::exit`.

mod output;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use jiff::Timestamp;

use kluis::backup::{self, BackupOptions, Source};
use kluis::check::{self, CheckOptions};
use kluis::error::{self, exit};
use kluis::keys::{self, KdfParams, Secret};
use kluis::progress::{Cancel, Progress};
use kluis::repository::{InitOptions, Repository};
use kluis::restore::{RestoreOptions, Restorer};
use kluis::snapshot;
use kluis::source::command::CommandSource;
use kluis::source::mysql::{MyConn, MysqlSource};
use kluis::source::postgres::{self, PgConn, PostgresSource};
use kluis::source::sqlite::{self, SqliteSource};
use kluis::store::Store;

use output::{ProgressLine, human_bytes, human_duration};

#[derive(Parser)]
#[command(
    name = "kluis",
    version,
    about = "Encrypted, deduplicated backups to object storage"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Repository: a path, file:///path or s3://bucket/prefix[?endpoint=URL&region=R&path-style=BOOL]
    #[arg(long, short = 'r', global = true, env = "KLUIS_REPOSITORY")]
    repo: Option<String>,
    /// File holding the repository password (mode 0600 or stricter)
    #[arg(long, global = true, env = "KLUIS_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Key file created by `kluis key generate` (mode 0600 or stricter)
    #[arg(long, global = true, env = "KLUIS_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// No progress display and fewer messages
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    /// File holding the database password (mode 0600 or stricter); also the systemd credential
    /// `kluis-db-password`
    #[arg(long, global = true, env = "KLUIS_DB_PASSWORD_FILE")]
    db_password_file: Option<PathBuf>,
    /// Directory of the PostgreSQL client tools (default: PATH, then the newest
    /// /usr/lib/postgresql/N/bin)
    #[arg(long, global = true, env = "KLUIS_PG_BIN_DIR")]
    pg_bin_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new repository
    Init(InitArgs),
    /// Back up a database (postgres://...), a command's output, standard input, or files and
    /// directories
    Backup(BackupArgs),
    /// List snapshots
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot to standard output or into a directory
    Restore(RestoreArgs),
    /// Verify the repository's integrity
    Check(CheckArgs),
    /// Manage the key slots that open the repository
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Args)]
struct InitArgs {
    /// Chunk sizes in bytes: MIN,AVG,MAX (default 524288,1048576,8388608)
    #[arg(long, value_parser = parse_chunk_sizes)]
    chunk_sizes: Option<(u32, u32, u32)>,
    /// zstd level for new data (-7..22)
    #[arg(long, default_value_t = kluis::repository::DEFAULT_COMPRESSION_LEVEL, allow_hyphen_values = true)]
    compression_level: i32,
    /// Target pack size in bytes
    #[arg(long, default_value_t = kluis::repository::DEFAULT_PACK_SIZE)]
    pack_size: u32,
    /// Argon2id memory in KiB for the passphrase slot
    #[arg(long, default_value_t = KdfParams::default().memory_kib, hide = true)]
    kdf_memory: u32,
    /// Argon2id passes for the passphrase slot
    #[arg(long, default_value_t = KdfParams::default().iterations, hide = true)]
    kdf_iterations: u32,
}

#[derive(Args)]
struct BackupArgs {
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
    /// Concurrent pack uploads
    #[arg(long, default_value_t = 2)]
    uploads: usize,
    /// Print the snapshot as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SnapshotsArgs {
    /// Only snapshots with this name
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RestoreArgs {
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
    /// Restore files and directories into this directory
    #[arg(long)]
    target: Option<PathBuf>,
    /// Replace files that already exist under --target
    #[arg(long)]
    overwrite: bool,
    /// Ranged reads in flight
    #[arg(long, default_value_t = 4)]
    fetches: usize,
}

#[derive(Args)]
struct CheckArgs {
    /// Also read and verify every pack (downloads the whole repository)
    #[arg(long)]
    read_data: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Add a key slot for a new password or key file
    Add {
        /// File holding the new password
        #[arg(
            long,
            required_unless_present = "new_key_file",
            conflicts_with = "new_key_file"
        )]
        new_password_file: Option<PathBuf>,
        /// Key file (from `kluis key generate`) for the new slot
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        /// A note to recognise the slot by, e.g. who holds it
        #[arg(long)]
        label: Option<String>,
    },
    /// List key slots
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a key slot (not the one in use)
    Remove {
        /// Slot id or unique prefix
        id: String,
    },
    /// Write a new random key file (mode 0600); it opens nothing until `init` or `key add` uses it
    Generate { path: PathBuf },
}

fn parse_chunk_sizes(s: &str) -> Result<(u32, u32, u32), String> {
    let parts: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse::<u32>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match parts.as_slice() {
        [a, b, c] => Ok((*a, *b, *c)),
        _ => Err("expected MIN,AVG,MAX".into()),
    }
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let civil = s
        .parse::<jiff::civil::DateTime>()
        .or_else(|_| {
            s.parse::<jiff::civil::Date>()
                .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
        })
        .map_err(|_| {
            format!("{s:?}: expected RFC 3339 (2026-11-25T02:30:00Z) or YYYY-MM-DD[ HH:MM[:SS]]")
        })?;
    civil
        .to_zoned_datetime(jiff::tz::TimeZone::system())
        .map(|z| z.timestamp())
        .map_err(|e| format!("{s:?}: {e}"))
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE as u8);
        }
    };
    let cancel = Cancel::new();
    // Set by a signal only: the engine also cancels `cancel` itself when one of its workers
    // fails, and that failure is not an interruption.
    let signalled = Cancel::new();
    let code = runtime.block_on(async {
        let watcher = tokio::spawn(watch_signals(cancel.clone(), signalled.clone()));
        let result = run(cli, cancel.clone()).await;
        watcher.abort();
        match result {
            Ok(code) => code,
            Err(e) => {
                let code = if signalled.is_cancelled() {
                    exit::INTERRUPTED
                } else {
                    error::exit_code_of(e.as_ref())
                };
                eprintln!("error: {e:#}");
                code
            }
        }
    });
    // Do not wait for stray blocking reads (an idle stdin) to finish.
    runtime.shutdown_background();
    ExitCode::from(code as u8)
}

/// SIGINT or SIGTERM cancel the operation cleanly; a second one exits at once.
async fn watch_signals(cancel: Cancel, signalled: Cancel) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    for round in 0.. {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        if round > 0 {
            std::process::exit(exit::INTERRUPTED);
        }
        eprintln!(
            "\ninterrupted: stopping; nothing partial will be committed (again to exit at once)"
        );
        signalled.cancel();
        cancel.cancel();
    }
}

fn repo_url(global: &Global) -> anyhow::Result<String> {
    global
        .repo
        .clone()
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            anyhow::Error::new(kluis::Error::InvalidInput(
                "no repository: pass --repo or set KLUIS_REPOSITORY".into(),
            ))
        })
}

/// The secret, from the first source that is set: --key-file, --password-file, KLUIS_PASSWORD,
/// or a systemd credential (`kluis-key-file`, `kluis-password`).
fn secret(global: &Global) -> anyhow::Result<Secret> {
    if let Some(p) = &global.key_file {
        return Ok(Secret::from_key_file(p)?);
    }
    if let Some(p) = &global.password_file {
        return Ok(Secret::from_password_file(p)?);
    }
    if let Ok(p) = std::env::var("KLUIS_PASSWORD") {
        if !p.is_empty() {
            return Ok(Secret::passphrase(p));
        }
    }
    if let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") {
        let dir = Path::new(&dir);
        if dir.join("kluis-key-file").exists() {
            return Ok(Secret::from_key_file(&dir.join("kluis-key-file"))?);
        }
        if dir.join("kluis-password").exists() {
            return Ok(Secret::from_password_file(&dir.join("kluis-password"))?);
        }
    }
    Err(kluis::Error::InvalidInput(
        "no password: pass --password-file or --key-file, or set KLUIS_PASSWORD_FILE, KLUIS_KEY_FILE or KLUIS_PASSWORD"
            .into(),
    )
    .into())
}

async fn open(global: &Global) -> anyhow::Result<Repository> {
    let url = repo_url(global)?;
    let secret = secret(global)?;
    let store = Store::open(&url, false)?;
    Ok(Repository::open(store, &secret).await?)
}

fn show_progress(global: &Global) -> bool {
    !global.quiet && std::io::stderr().is_terminal()
}

async fn run(cli: Cli, cancel: Cancel) -> anyhow::Result<i32> {
    let g = &cli.global;
    match cli.command {
        Command::Init(a) => {
            let url = repo_url(g)?;
            let secret = secret(g)?;
            let store = Store::open(&url, true)?;
            let opts = InitOptions {
                chunk_sizes: a.chunk_sizes,
                compression_level: a.compression_level,
                pack_size: a.pack_size,
                kdf: KdfParams {
                    memory_kib: a.kdf_memory,
                    iterations: a.kdf_iterations,
                    parallelism: 1,
                },
                ..InitOptions::default()
            };
            let repo = Repository::init(store, &secret, opts).await?;
            println!(
                "created repository {} at {}",
                repo.id().short(),
                repo.store().location()
            );
            Ok(exit::OK)
        }
        Command::Backup(a) => backup_cmd(g, a, cancel).await,
        Command::Snapshots(a) => {
            let repo = open(g).await?;
            let (mut list, errors) = repo.snapshots().await?;
            if let Some(n) = &a.name {
                list.retain(|s| &s.name == n);
            }
            for e in &errors {
                eprintln!("warning: {e}");
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", output::snapshot_table(&list));
            }
            Ok(if errors.is_empty() {
                exit::OK
            } else {
                exit::CORRUPT
            })
        }
        Command::Restore(a) => restore_cmd(g, a, cancel).await,
        Command::Check(a) => {
            let repo = open(g).await?;
            let progress = Progress::new();
            let line = show_progress(g).then(|| ProgressLine::start("check", progress.clone()));
            let report = check::check(
                &repo,
                CheckOptions {
                    read_data: a.read_data,
                    concurrency: 2,
                    cancel,
                    progress,
                },
            )
            .await;
            drop(line);
            let report = report?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for p in &report.problems {
                    println!("error: {p}");
                }
                if !report.unindexed_packs.is_empty() {
                    println!(
                        "{} pack(s) not in any index: leftovers of interrupted backups, removed by prune",
                        report.unindexed_packs.len()
                    );
                }
                println!(
                    "checked {} snapshot(s), {} index segment(s), {} pack(s), {} blob(s), {} tree(s){}",
                    report.snapshots,
                    report.index_segments,
                    report.packs,
                    report.blobs,
                    report.trees,
                    if a.read_data {
                        format!(
                            "; read {} in {} pack(s)",
                            human_bytes(report.bytes_read),
                            report.packs_read
                        )
                    } else {
                        String::new()
                    }
                );
            }
            if report.problems.is_empty() {
                if !a.json {
                    println!("no problems found");
                }
                Ok(exit::OK)
            } else {
                Err(kluis::Error::CheckFailed(report.problems.len()).into())
            }
        }
        Command::Key(k) => key_cmd(g, k).await,
    }
}

/// The database password: --db-password-file, or the systemd credential `kluis-db-password`.
fn db_password(g: &Global) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
    let path = match &g.db_password_file {
        Some(p) => Some(p.clone()),
        None => std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|d| Path::new(&d).join("kluis-db-password"))
            .filter(|p| p.exists()),
    };
    match path {
        None => Ok(None),
        Some(p) => Ok(Some(keys::read_secret_line(&p)?)),
    }
}

fn pg_conn(g: &Global, url: &str) -> anyhow::Result<PgConn> {
    let conn = PgConn::parse(url, db_password(g)?)?;
    Ok(conn.with_bin_dir(postgres::tools_dir(g.pg_bin_dir.as_deref())))
}

/// The database engines a URL can name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Postgres,
    Mysql,
    Sqlite,
}

fn engine_of(url: &str) -> Option<Engine> {
    let scheme = url.split_once("://")?.0;
    match scheme {
        "postgres" | "postgresql" => Some(Engine::Postgres),
        "mysql" | "mariadb" => Some(Engine::Mysql),
        "sqlite" => Some(Engine::Sqlite),
        _ => None,
    }
}

/// A database URL given where paths go.
fn database_url(paths: &[PathBuf]) -> Option<(Engine, String)> {
    match paths {
        [p] => {
            let s = p.to_str()?;
            engine_of(s).map(|e| (e, s.to_string()))
        }
        _ => None,
    }
}

async fn backup_cmd(g: &Global, a: BackupArgs, cancel: Cancel) -> anyhow::Result<i32> {
    let mut default_name = None;
    let source = if a.stdin {
        if a.name.is_none() {
            bail!(kluis::Error::InvalidInput(
                "--stdin needs --name NAME".into()
            ));
        }
        Source::Stream(Box::new(std::io::stdin()))
    } else if let Some(cmd) = &a.command {
        let Some(name) = &a.name else {
            bail!(kluis::Error::InvalidInput(
                "--command needs --name NAME".into()
            ));
        };
        Source::Streams(Box::new(CommandSource::new(cmd.clone(), name.clone())))
    } else if let Some((engine, url)) = database_url(&a.paths) {
        match engine {
            Engine::Postgres => {
                let conn = pg_conn(g, &url)?;
                default_name = Some(conn.database.clone());
                Source::Streams(Box::new(PostgresSource::new(conn)))
            }
            Engine::Mysql => {
                let conn = MyConn::parse(&url, db_password(g)?)?;
                default_name = Some(conn.database.clone());
                Source::Streams(Box::new(MysqlSource::new(conn)))
            }
            Engine::Sqlite => {
                let path = sqlite::parse_url(&url)?;
                default_name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                Source::Streams(Box::new(SqliteSource::new(path, None)))
            }
        }
    } else if a
        .paths
        .iter()
        .any(|p| p.to_str().is_some_and(|s| s.contains("://")))
    {
        bail!(kluis::Error::InvalidInput(format!(
            "{}: back up one database URL at a time (postgres://, mysql://, sqlite://), \
             without other paths",
            a.paths
                .iter()
                .find(|p| p.to_str().is_some_and(|s| s.contains("://")))
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )));
    } else if a.paths.is_empty() {
        bail!(kluis::Error::InvalidInput(
            "nothing to back up: give paths, or --stdin --name NAME".into()
        ));
    } else {
        Source::Paths(a.paths.clone())
    };
    let name = match a.name.clone().or(default_name) {
        Some(n) => n,
        None => {
            let first = std::path::absolute(&a.paths[0])
                .with_context(|| a.paths[0].display().to_string())?;
            first
                .file_name()
                .map_or_else(|| "root".into(), |n| n.to_string_lossy().into_owned())
        }
    };
    let repo = open(g).await?;
    let progress = Progress::new();
    let mut opts = BackupOptions::new(name);
    opts.host = a.host.clone().unwrap_or_else(kluis::hostname);
    opts.time = a.time;
    opts.tags = a.tags.clone();
    opts.threads = a.threads;
    opts.uploads = a.uploads;
    opts.cancel = cancel;
    opts.progress = progress.clone();
    let started = Instant::now();
    let line = show_progress(g).then(|| ProgressLine::start("backup", progress));
    let result = backup::backup(&repo, source, opts).await;
    drop(line);
    let report = result?;
    let s = &report.snapshot;
    for skipped in &report.skipped {
        if !g.quiet {
            eprintln!("skipped {skipped}");
        }
    }
    for e in &s.summary.errors {
        eprintln!("warning: {e}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(s)?);
    } else {
        let elapsed = started.elapsed();
        println!(
            "snapshot {} saved: {} read, {} new, {} stored, in {} ({}/s)",
            s.id.short(),
            human_bytes(s.summary.logical_bytes),
            human_bytes(s.summary.new_bytes),
            human_bytes(s.summary.stored_bytes),
            human_duration(elapsed),
            human_bytes((s.summary.logical_bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64),
        );
    }
    if s.summary.errors.is_empty() {
        Ok(exit::OK)
    } else {
        eprintln!(
            "warning: {} file(s) could not be read; the snapshot is committed without them",
            s.summary.errors.len()
        );
        Ok(exit::INCOMPLETE)
    }
}

async fn restore_cmd(g: &Global, a: RestoreArgs, cancel: Cancel) -> anyhow::Result<i32> {
    let repo = open(g).await?;
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
        cancel,
        progress: progress.clone(),
    };
    let started = Instant::now();
    let restorer = Restorer::new(&repo, snap, opts).await?;
    let line = show_progress(g).then(|| ProgressLine::start("restore", progress));
    let result = if let Some(url) = &a.to {
        match engine_of(url) {
            Some(Engine::Postgres) => {
                let target = pg_conn(g, url)?;
                restorer.to_postgres(&target, a.force, a.jobs).await
            }
            Some(Engine::Mysql) => {
                let target = MyConn::parse(url, db_password(g)?)?;
                restorer.to_mysql(&target, a.force).await
            }
            Some(Engine::Sqlite) => {
                let target = sqlite::parse_url(url)?;
                restorer.to_sqlite(&target, a.force).await
            }
            None => bail!(kluis::Error::InvalidInput(format!(
                "--to {url}: expected postgres://, mysql:// or sqlite:// (for files: --target DIR)"
            ))),
        }
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
    let report = result?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !g.quiet {
        let elapsed = started.elapsed();
        eprintln!(
            "restored snapshot {} ({}): {} file(s), {}, verified, in {} ({}/s)",
            snap.id.short(),
            snap.name,
            report.files,
            human_bytes(report.bytes),
            human_duration(elapsed),
            human_bytes((report.bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64),
        );
    }
    Ok(exit::OK)
}

/// Standard output as a plain file: no line buffering for binary streams.
fn stdout_file() -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot use standard output")?;
    Ok(std::fs::File::from(fd))
}

async fn key_cmd(g: &Global, k: KeyCommand) -> anyhow::Result<i32> {
    match k {
        KeyCommand::Generate { path } => {
            keys::generate_key_file(&path)?;
            println!(
                "wrote key file {} (mode 0600); keep a copy somewhere safe",
                path.display()
            );
            Ok(exit::OK)
        }
        KeyCommand::Add {
            new_password_file,
            new_key_file,
            label,
        } => {
            let new_secret = match (new_password_file, new_key_file) {
                (Some(p), _) => Secret::from_password_file(&p)?,
                (None, Some(k)) => Secret::from_key_file(&k)?,
                (None, None) => bail!(kluis::Error::InvalidInput(
                    "give --new-password-file or --new-key-file".into()
                )),
            };
            let repo = open(g).await?;
            let id = repo
                .add_key(&new_secret, KdfParams::default(), kluis::hostname(), label)
                .await?;
            println!("added key slot {}", id.short());
            Ok(exit::OK)
        }
        KeyCommand::List { json } => {
            let repo = open(g).await?;
            let (slots, errors) = repo.key_slots().await?;
            for e in &errors {
                eprintln!("warning: {e}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&slots)?);
            } else {
                print!("{}", output::key_table(&slots));
            }
            Ok(if errors.is_empty() {
                exit::OK
            } else {
                exit::CORRUPT
            })
        }
        KeyCommand::Remove { id } => {
            let repo = open(g).await?;
            let id = repo.find_key(&id.to_ascii_lowercase()).await?;
            repo.remove_key(id).await?;
            println!("removed key slot {}", id.short());
            Ok(exit::OK)
        }
    }
}
