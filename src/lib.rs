//! kluis: encrypted, deduplicated backups of databases and directories to object storage.
//!
//! The engine, one noun per module:
//! - [`store`]: where objects live (local directory, S3-compatible bucket, memory).
//! - [`object`]: object names, the common header, sealing of small objects.
//! - [`crypto`], [`keys`]: AES-256-GCM, HKDF, keyed hashes; key slots and secrets;
//!   [`secrets`]: where each secret comes from (files, variables, systemd credentials);
//!   [`keyring`]: key rotation and a slot's new secret; [`erase`]: erasure before a date.
//! - [`repository`]: config, epoch keys, typed access to snapshots, index and blobs.
//! - [`chunker`], [`pack`], [`index`], [`tree`], [`snapshot`]: the repository format
//!   (docs/FORMAT.md).
//! - [`source`]: database and command sources (dump tools run as children, checked).
//! - [`backup`], [`restore`], [`check`], [`copy`], [`forget`], [`prune`], [`drill`]: the
//!   operations; [`jobs`]: a configured job, copy or maintenance run once.
//! - [`config`]: the configuration file, checked; [`retention`]: which snapshots a policy keeps.
//! - [`ledger`]: chains, forget records and this host's view: removal, rollback and replay of
//!   records are detected.
//! - [`clock`]: the store's time, which prune's protocol uses instead of hosts' clocks.
//! - [`schedule`] (when: expressions), [`scheduler`] (the daemon's loop: jobs, copies, drills
//!   and maintenance on their schedules, with catch-up, timeouts and recorded outcomes).
//! - [`metrics`], [`status`]: what the daemon shows (Prometheus, `/status`, `kluis status`).
//!
//! docs/ARCHITECTURE.md draws the map and follows a backup, a restore and a scheduled run.
//!
//! ```no_run
//! # async fn demo() -> kluis::Result<()> {
//! use kluis::{backup, keys::Secret, repository::Repository, store::Store};
//! let store = Store::open("/srv/backups/repo", false)?;
//! let repo = Repository::open(store, &Secret::passphrase("correct horse")).await?;
//! let dump = std::process::Command::new("pg_dump").stdout(std::process::Stdio::piped()).spawn().unwrap();
//! let source = backup::Source::Stream(Box::new(dump.stdout.unwrap()));
//! let report = backup::backup(&repo, source, backup::BackupOptions::new("shop")).await?;
//! println!("snapshot {}", report.snapshot.id);
//! # Ok(()) }
//! ```

pub mod audit;
pub mod backup;
pub mod buffer;
pub mod check;
pub mod chunker;
pub mod clock;
pub mod config;
pub mod copy;
pub mod crypto;
pub mod drill;
pub mod erase;
pub mod error;
pub mod forget;
pub mod id;
pub mod index;
pub mod jobs;
pub mod keyring;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod object;
pub mod pack;
pub mod pitr;
pub mod progress;
pub mod prune;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod scheduler;
pub mod secrets;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod store;
pub mod tree;
pub mod wal;

pub use error::{Error, Result};

/// Makes every file and directory this process creates private to its user (umask 077):
/// repository objects in a local directory, key slots among them, the state directory,
/// temporary files. Restored files get their recorded modes explicitly. Both binaries call it
/// first; the library never changes it.
pub fn private_files() {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
}

/// This host's name, as recorded in snapshots and key slots.
/// The operating system user this process runs as: its name from `/etc/passwd`, else
/// `uid N` (for key slots and audit records).
pub fn os_user() -> Option<String> {
    let uid = rustix::process::geteuid().as_raw();
    let named = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut f = line.split(':');
                let name = f.next()?;
                let id: u32 = f.nth(1)?.parse().ok()?;
                (id == uid && !name.is_empty()).then(|| name.to_string())
            })
        });
    Some(named.unwrap_or_else(|| format!("uid {uid}")))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
