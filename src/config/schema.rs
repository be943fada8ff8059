//! The file as written: what TOML deserializes into, with its defaults. Checked into the
//! model ([`super::Loaded`]) by [`super::Loaded::parse`].

use super::*;

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub repositories: BTreeMap<String, RepositoryConfig>,
    #[serde(default)]
    pub jobs: BTreeMap<String, JobConfig>,
    #[serde(default)]
    pub copies: BTreeMap<String, CopyConfig>,
    #[serde(default)]
    pub drills: BTreeMap<String, DrillConfig>,
}

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where the daemon keeps its state (default: systemd's `$STATE_DIRECTORY`, else
    /// `/var/lib/kluis` for root and `~/.local/state/kluis` for others).
    pub state_dir: Option<PathBuf>,
    /// The IANA time zone schedules are read in (default: the host's).
    pub time_zone: Option<String>,
    /// Jobs running at once, whatever their schedules.
    #[serde(default = "one")]
    pub max_concurrent_jobs: usize,
    /// A run missed while the daemon was down is made up at start-up when it was due at most
    /// this long ago. A job that has never succeeded runs at start-up in any case.
    #[serde(default = "default_catch_up", with = "human")]
    pub catch_up: Duration,
    /// On SIGTERM, how long running jobs may take to finish before they are aborted.
    #[serde(default = "default_grace", with = "human")]
    pub shutdown_grace: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            state_dir: None,
            time_zone: None,
            max_concurrent_jobs: 1,
            catch_up: default_catch_up(),
            shutdown_grace: default_grace(),
        }
    }
}

/// `[http]`: `/metrics` and `/healthz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}

/// `[repositories.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A path, `file://` or `s3://` URL, as for `kluis --repo`.
    pub url: String,
    /// A key file (from `kluis key generate`).
    pub key_file: Option<PathBuf>,
    /// A file whose first line is the passphrase.
    pub password_file: Option<PathBuf>,
    /// A systemd credential (in `$CREDENTIALS_DIRECTORY`) holding a key file.
    pub key_credential: Option<String>,
    /// Create the repository, and its key file if missing, when there is none yet.
    #[serde(default)]
    pub init: bool,
    /// How long its snapshots are kept (`kluis forget --config FILE --repository NAME`):
    /// `{ keep_daily = 14, keep_monthly = 6, max_age = "200d" }`; see [`crate::retention`].
    pub retention: Option<crate::retention::Policy>,
    /// Scheduled maintenance: `{ schedule = "daily at 05:00", grace = "24h" }`. Each run
    /// forgets by `retention` (if set), erases by `erase_after` (if set), then prunes.
    pub prune: Option<PruneConfig>,
    /// A hard age, enforced by destroying keys (`"400d"`): each maintenance run erases every
    /// snapshot older than this (`kluis erase --before`, keeping every key slot). Months that
    /// end before it lose their keys and objects; the month it falls in loses the older
    /// snapshots by deletion. Needs `prune.schedule`; at least `retention.max_age`.
    #[serde(default, with = "crate::retention::opt_human")]
    pub erase_after: Option<Duration>,
}

/// `[repositories.NAME] prune = { ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneConfig {
    /// When it runs (kluisd); see [`crate::schedule`].
    pub schedule: Option<Spanned<String>>,
    /// Marked data is deleted only this long after it was marked. It must be longer than the
    /// timeout of every job and copy writing to the repository.
    #[serde(default = "default_prune_grace", with = "human")]
    pub grace: Duration,
    /// Packs with at least this share (0 to 1) of unused bytes are repacked.
    #[serde(default = "default_repack_threshold")]
    pub repack_threshold: f64,
    /// A prune running longer is stopped (what it did so far stays consistent).
    #[serde(default = "default_timeout", with = "human")]
    pub timeout: Duration,
}

impl PruneConfig {
    pub fn options(&self) -> crate::prune::PruneOptions {
        crate::prune::PruneOptions {
            grace: self.grace,
            repack_threshold: self.repack_threshold,
            ..crate::prune::PruneOptions::default()
        }
    }
}

fn default_prune_grace() -> Duration {
    crate::prune::DEFAULT_GRACE
}

fn default_repack_threshold() -> f64 {
    crate::prune::DEFAULT_REPACK_THRESHOLD
}

/// `[jobs.NAME]`: what to back up, where, and when.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// The name of a `[repositories.NAME]` section.
    pub repository: Spanned<String>,
    /// Files and directories.
    pub paths: Option<Vec<PathBuf>>,
    /// A database URL: `postgres://`, `mysql://` or `sqlite://`.
    pub database: Option<String>,
    /// A shell command whose standard output is backed up.
    pub command: Option<String>,
    /// A PostgreSQL server (`postgres://user@host/`): its roles and tablespaces
    /// (`pg_dumpall --globals-only`, needs a superuser), which per-database jobs do not carry.
    pub postgres_globals: Option<String>,
    /// With a `postgres://` server URL in `database`: these databases of the server, each
    /// run one set of snapshots named `<snapshot_name>.<database>`.
    pub databases: Option<Vec<String>>,
    /// With a `postgres://` server URL in `database`: every database that accepts
    /// connections, listed at each run.
    #[serde(default)]
    pub all_databases: bool,
    /// With a `postgres://` URL in `database`: the server's roles and tablespaces too, first,
    /// as `<snapshot_name>.postgres-globals` in the same set (needs a superuser).
    #[serde(default)]
    pub globals: bool,
    /// The database password, for `database` (also the systemd credential
    /// `kluis-db-password`).
    pub db_password_file: Option<PathBuf>,
    /// When it runs; see [`crate::schedule`].
    pub schedule: Spanned<String>,
    /// A random delay of up to this much before each run (spreads many hosts' load).
    #[serde(default, with = "human")]
    pub jitter: Duration,
    /// A run taking longer is aborted cleanly (nothing partial is committed).
    #[serde(default = "default_timeout", with = "human")]
    pub timeout: Duration,
    /// The snapshot name (default: the job's name).
    pub snapshot_name: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `[copies.NAME]`: snapshots of one repository copied to another on a schedule, e.g. the
/// newest of each job to a bucket in another country on the 1st of the month.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// The repository copied from (a `[repositories.NAME]`).
    pub from: Spanned<String>,
    /// The repository copied to, with its own key.
    pub to: Spanned<String>,
    /// When it runs; see [`crate::schedule`].
    pub schedule: Spanned<String>,
    /// `latest`: the newest snapshot of each host and name; `all`: every snapshot not copied
    /// yet.
    #[serde(default)]
    pub select: CopySelect,
    /// Only snapshots with these names (default: all).
    #[serde(default)]
    pub names: Vec<String>,
    /// A run taking longer is stopped; nothing partial is committed.
    #[serde(default = "default_timeout", with = "human")]
    pub timeout: Duration,
}

/// `[drills.NAME]`: a restore drill. On its schedule, the job's newest snapshot (and, with
/// `older`, a random older one) is restored into a scratch target, checked, timed and removed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// The job whose snapshots are tested (default: the section's name).
    pub job: Option<Spanned<String>>,
    /// The repository restored from (default: the job's); a copy's destination proves the
    /// copy.
    pub repository: Option<Spanned<String>>,
    /// When it runs; see [`crate::schedule`].
    pub schedule: Spanned<String>,
    /// For PostgreSQL and MySQL jobs: a server where kluis may create and drop databases named
    /// `kluis_drill_<drill>_<time>`, as a URL without a database (`postgres://kluis@scratch/`).
    pub scratch: Option<String>,
    /// The scratch server's password (also the systemd credential `kluis-scratch-password`).
    pub scratch_password_file: Option<PathBuf>,
    /// Also test a random older snapshot of the job.
    #[serde(default)]
    pub older: bool,
    /// The recovery-time budget: a restore taking longer fails the drill (`"30m"`).
    pub budget: Option<String>,
    /// A drill running longer is stopped and fails.
    #[serde(default = "default_timeout", with = "human")]
    pub timeout: Duration,
    /// SQL that must return true on the restored database; `{snapshot_time}` stands for the
    /// snapshot's time as an SQL timestamp literal.
    #[serde(default)]
    pub assert: Vec<AssertionConfig>,
}

/// `[[drills.NAME.assert]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionConfig {
    pub name: String,
    pub sql: String,
    /// For a job of a whole server: the database it is run in (default: every one).
    pub database: Option<String>,
}

/// Which snapshots a copy rule copies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopySelect {
    #[default]
    Latest,
    All,
}

fn one() -> usize {
    1
}

fn default_catch_up() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_grace() -> Duration {
    Duration::from_secs(60)
}

fn default_timeout() -> Duration {
    Duration::from_secs(6 * 3600)
}

fn default_listen() -> String {
    "127.0.0.1:9911".into()
}

/// Durations as humantime strings.
mod human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e})")))
    }
}
