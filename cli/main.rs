//! `kluis`: the command line for operators and on-call engineers.
//!
//! Thin by design: parse arguments, find the repository and the secret, call the engine, print.
//! Data goes to stdout, messages and progress to stderr. Exit codes: see `kluis::error::exit`.

mod audit;
mod backup;
mod config;
mod copy;
mod databases;
mod drill;
mod erase;
mod forget;
mod output;
mod prune;
mod restore;
mod retention;
mod status;
mod wal;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use jiff::Timestamp;

use kluis::check::{self, CheckOptions};
use kluis::error::{self, exit};
use kluis::keys::{self, KdfParams, Secret};
use kluis::progress::{Cancel, Progress};
use kluis::repository::{InitOptions, Repository};
use kluis::store::Store;

use output::{ProgressLine, human_bytes};

mod signals;

mod key;

use key::{KeyCommand, key_cmd};
use signals::watch_signals;

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
    /// This host's state directory: its ledger of each repository (default: $STATE_DIRECTORY,
    /// else /var/lib/kluis for root, ~/.local/state/kluis for others)
    #[arg(long, global = true, env = "KLUIS_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new repository
    Init(InitArgs),
    /// Back up a database (postgres://...), a command's output, standard input, or files and
    /// directories
    Backup(backup::BackupArgs),
    /// List snapshots
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot to standard output or into a directory
    Restore(restore::RestoreArgs),
    /// Verify the repository's integrity
    Check(CheckArgs),
    /// Manage the key slots that open the repository
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check a kluisd configuration file
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Each configured job's last run, result and next run, and the repositories' state
    Status(status::StatusArgs),
    /// Remove snapshots by a retention policy (keep-last, keep-daily, ..., max-age)
    Forget(forget::ForgetArgs),
    /// Delete data no snapshot needs, in two phases: mark now, delete after a grace period
    Prune(prune::PruneCommand),
    /// The audit trail: who restored, drilled, copied, forgot, pruned, erased or changed keys,
    /// when; verified (a removed or altered record is reported, exit 13)
    Audit(audit::AuditArgs),
    /// Erase every snapshot before a date: destroy the keys of the months wholly before it,
    /// delete the rest; the report for an auditor
    Erase(erase::EraseArgs),
    /// Retention reports for auditors
    #[command(subcommand)]
    Retention(retention::RetentionCommand),
    /// Copy snapshots to another repository (e.g. in another region), re-encrypted under its
    /// own keys, uploading only what it lacks
    Copy(copy::CopyArgs),
    /// Restore drills: restore a snapshot into a scratch target, check it, time it
    #[command(subcommand)]
    Drill(drill::DrillCommand),
    /// PostgreSQL's write-ahead log: archive_command (push), restore_command (fetch), list
    #[command(subcommand)]
    Wal(wal::WalCommand),
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
struct SnapshotsArgs {
    /// Only snapshots with this name
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// Also read and verify every pack (downloads the whole repository)
    #[arg(long)]
    read_data: bool,
    /// Take the repository's records as they are now as what this host has seen: clears
    /// findings of removed records once they have been looked into
    #[arg(long)]
    acknowledge: bool,
    #[arg(long)]
    json: bool,
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

/// `kluis snapshots | head`: standard output closed early ends the program quietly with the
/// status a shell expects of a tool killed by SIGPIPE (141), not with a panic. Rust ignores
/// SIGPIPE, so `println!` reports the closed pipe by panicking.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    kluis::private_files();
    quiet_on_closed_stdout();
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
                eprintln!("error: {}", error_chain(&e));
                code
            }
        }
    });
    // Do not wait for stray blocking reads (an idle stdin) to finish.
    runtime.shutdown_background();
    ExitCode::from(code as u8)
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
    let lookup = kluis::secrets::Lookup {
        key_file: global.key_file.as_deref(),
        password_file: global.password_file.as_deref(),
        passphrase_var: Some("KLUIS_PASSWORD"),
        credentials: Some(("kluis-key-file", "kluis-password")),
    };
    if let Some(secret) = lookup.find()? {
        return Ok(secret);
    }
    Err(kluis::Error::InvalidInput(
        "no password: pass --password-file or --key-file, or set KLUIS_PASSWORD_FILE, KLUIS_KEY_FILE or KLUIS_PASSWORD"
            .into(),
    )
    .into())
}

/// This host's state directory.
fn state_dir(global: &Global) -> PathBuf {
    global
        .state_dir
        .clone()
        .unwrap_or_else(kluis::config::default_state_dir)
}

/// This host's ledger of `repo` under `dir`; without one (the directory cannot be written)
/// records carry no chain, and that is said.
fn ledger(dir: &std::path::Path, repo: &Repository) -> Option<kluis::ledger::Ledger> {
    match kluis::ledger::Ledger::open(dir, repo) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("warning: no ledger for this host ({e}): removal of records goes unnoticed");
            None
        }
    }
}

async fn open(global: &Global) -> anyhow::Result<Repository> {
    let url = repo_url(global)?;
    let secret = secret(global)?;
    let store = Store::open(&url, false)?;
    Ok(Repository::open(store, &secret)
        .await?
        .with_state_dir(&state_dir(global)))
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
        Command::Backup(a) => backup::run(g, a, cancel).await,
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
        Command::Restore(a) => restore::run(g, a, cancel).await,
        Command::Check(a) => {
            let repo = open(g).await?;
            let progress = Progress::new();
            let line =
                show_progress(g).then(|| ProgressLine::start("check", "files", progress.clone()));
            let report = check::check(
                &repo,
                CheckOptions {
                    read_data: a.read_data,
                    concurrency: 2,
                    cancel,
                    progress,
                    ledger: ledger(&state_dir(g), &repo),
                    acknowledge: a.acknowledge,
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
                for f in report.ledger.findings.iter().filter(|f| f.acknowledged) {
                    println!("note: {f}");
                }
                if !report.old_generation_keys.is_empty() {
                    println!(
                        "{} epoch key object(s) of an older key generation: left by an interrupted \
                         `kluis key rotate`; run it again to delete them",
                        report.old_generation_keys.len()
                    );
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
        Command::Config(c) => config::run(c),
        Command::Status(a) => status::run(a).await,
        Command::Forget(a) => forget::run(g, a, cancel).await,
        Command::Prune(a) => prune::run(g, a, cancel).await,
        Command::Erase(a) => erase::run(g, a, cancel).await,
        Command::Audit(a) => audit::run(g, a).await,
        Command::Wal(c) => wal::run(g, c).await,
        Command::Retention(c) => retention::run(c).await,
        Command::Copy(a) => copy::run(g, a, cancel).await,
        Command::Drill(c) => drill::run(c, cancel).await,
    }
}

/// An error and its causes, each once: many errors (object_store's among them) already print
/// their causes, and `{:#}` would repeat them.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_print_each_cause_once() {
        #[derive(Debug)]
        struct Disk;
        impl std::fmt::Display for Disk {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("disk on fire")
            }
        }
        impl std::error::Error for Disk {}
        #[derive(Debug)]
        struct Write(Disk);
        impl std::fmt::Display for Write {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "write failed: {}", self.0)
            }
        }
        impl std::error::Error for Write {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Write(Disk)).context("backup of db");
        assert_eq!(error_chain(&e), "backup of db: write failed: disk on fire");
        let plain = anyhow::Error::new(Disk).context("restore");
        assert_eq!(error_chain(&plain), "restore: disk on fire");
    }
}
