//! The `kluisd` configuration file: repositories, jobs and the daemon's own settings.
//!
//! One TOML file. Unknown keys are errors (a typo must not silently disable a backup);
//! durations are humantime strings (`"90s"`, `"36h"`, `"7d"`); secrets are never inline, only
//! files or systemd credentials. `{state_dir}` in a path or URL stands for the state directory.
//! Every error names the file and, where it can, the line and the key.
//!
//! ```toml
//! [daemon]
//! state_dir = "/var/lib/kluis"
//! time_zone = "Europe/Amsterdam"
//!
//! [repositories.offsite]
//! url = "s3://backups/db1?endpoint=https://s3.nl-ams.scw.cloud&region=nl-ams"
//! key_file = "/etc/kluis/offsite.key"
//!
//! [jobs.billing]
//! repository = "offsite"
//! database = "postgres://backup@db1/billing"
//! db_password_file = "/etc/kluis/pg-password"
//! schedule = "daily at 02:30"
//! timeout = "2h"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};
use crate::keys::Secret;
use crate::schedule::Schedule;

/// The default configuration, embedded in the binary: it runs on any machine with nothing
/// installed (a local repository under the state directory, backing up `/etc`).
pub const EMBEDDED: &str = include_str!("../config/kluis.toml");

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
    /// forgets by `retention` (if set), then prunes.
    pub prune: Option<PruneConfig>,
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

/// What a drill restores into, by the job's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillKind {
    Postgres,
    Mysql,
    Sqlite,
    /// A file tree, restored into a temporary directory.
    Directory,
    /// A command's output or standard input, restored into a temporary file.
    Stream,
}

/// A restore drill, checked.
#[derive(Debug, Clone)]
pub struct Drill {
    pub name: String,
    pub job: Job,
    pub repository: String,
    pub schedule: Schedule,
    pub kind: DrillKind,
    pub scratch: Option<String>,
    pub scratch_password_file: Option<PathBuf>,
    pub older: bool,
    pub budget: Option<Duration>,
    pub timeout: Duration,
    pub assertions: Vec<AssertionConfig>,
}

/// Which snapshots a copy rule copies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopySelect {
    #[default]
    Latest,
    All,
}

/// A copy rule, checked.
#[derive(Debug, Clone)]
pub struct CopyRule {
    pub name: String,
    pub from: String,
    pub to: String,
    pub schedule: Schedule,
    pub select: CopySelect,
    pub names: Vec<String>,
    pub timeout: Duration,
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

/// A repository's scheduled maintenance, checked.
#[derive(Debug, Clone)]
pub struct Maintenance {
    pub repository: String,
    pub schedule: Schedule,
    pub timeout: Duration,
}

/// A job, checked and ready to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub snapshot_name: String,
    pub repository: String,
    pub source: JobSource,
    pub db_password_file: Option<PathBuf>,
    pub schedule: Schedule,
    pub jitter: Duration,
    pub timeout: Duration,
    pub tags: Vec<String>,
}

/// What a job backs up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSource {
    Paths(Vec<PathBuf>),
    Database(String),
    Command(String),
    /// A PostgreSQL server's roles and tablespaces.
    PostgresGlobals(String),
    /// A PostgreSQL server backed up whole: each run one set of snapshots (see
    /// [`crate::snapshot::SetRecord`]), its roles first with `globals`.
    PostgresServer {
        url: String,
        databases: ServerDatabases,
        globals: bool,
    },
}

impl Job {
    /// Whether each run makes a set of snapshots rather than one.
    pub fn makes_sets(&self) -> bool {
        matches!(self.source, JobSource::PostgresServer { .. })
    }
}

/// Which databases of a PostgreSQL server a server-wide backup takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerDatabases {
    /// The one the URL names, if it names one.
    Named,
    /// These.
    List(Vec<String>),
    /// Every database that accepts connections (templates aside).
    All,
}

/// A configuration file, loaded and checked.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Where it came from, for messages (`(embedded default)` for [`EMBEDDED`]).
    pub origin: String,
    pub daemon: DaemonConfig,
    pub http: HttpConfig,
    pub state_dir: PathBuf,
    pub time_zone: jiff::tz::TimeZone,
    pub repositories: BTreeMap<String, RepositoryConfig>,
    pub jobs: Vec<Job>,
    /// Scheduled maintenance (forget by retention, then prune), one per repository.
    pub prunes: Vec<Maintenance>,
    pub copies: Vec<CopyRule>,
    pub drills: Vec<Drill>,
}

impl Loaded {
    /// Reads and checks the file at `path`.
    pub fn from_file(path: &Path) -> Result<Loaded> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Loaded::parse(&text, &path.display().to_string())
    }

    /// Checks the embedded default.
    /// The file at `path`, or the embedded default when there is none.
    pub fn from_file_or_embedded(path: Option<&Path>) -> Result<Loaded> {
        match path {
            Some(p) => Loaded::from_file(p),
            None => Loaded::embedded(),
        }
    }

    pub fn embedded() -> Result<Loaded> {
        Loaded::parse(EMBEDDED, "(embedded default)")
    }

    /// Parses and checks `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Loaded> {
        let config: Config = toml::from_str(text)
            .map_err(|e| Error::invalid(format!("config {origin}: {}", e.to_string().trim())))?;
        let at = |span: std::ops::Range<usize>, key: &str, why: String| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            Error::invalid(format!("config {origin}:{line}: {key}: {why}"))
        };
        let state_dir = match &config.daemon.state_dir {
            Some(d) => d.clone(),
            None => default_state_dir(),
        };
        let time_zone = match &config.daemon.time_zone {
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| {
                Error::invalid(format!(
                    "config {origin}: daemon.time_zone {name:?} is not a known IANA time zone ({e})"
                ))
            })?,
            None => jiff::tz::TimeZone::system(),
        };
        if config.daemon.catch_up > Duration::from_secs(366 * 86400) {
            return Err(Error::invalid(format!(
                "config {origin}: daemon.catch_up is at most 366 days"
            )));
        }
        if config.daemon.max_concurrent_jobs == 0 {
            return Err(Error::invalid(format!(
                "config {origin}: daemon.max_concurrent_jobs must be at least 1"
            )));
        }
        let expand = |s: &str| s.replace("{state_dir}", &state_dir.to_string_lossy());
        let expand_path = |p: &PathBuf| PathBuf::from(expand(&p.to_string_lossy()));
        let mut repositories = BTreeMap::new();
        for (name, r) in config.repositories {
            let secrets = [
                r.key_file.is_some(),
                r.password_file.is_some(),
                r.key_credential.is_some(),
            ];
            if secrets.iter().filter(|s| **s).count() != 1 {
                return Err(Error::invalid(format!(
                    "config {origin}: repositories.{name}: give exactly one of key_file, \
                     password_file, key_credential"
                )));
            }
            if let Some(p) = &r.retention {
                p.validate().map_err(|e| {
                    Error::invalid(format!(
                        "config {origin}: repositories.{name}.retention: {e}"
                    ))
                })?;
            }
            if r.init && r.key_file.is_none() {
                return Err(Error::invalid(format!(
                    "config {origin}: repositories.{name}: init needs a key_file (created when \
                     missing)"
                )));
            }
            repositories.insert(
                name,
                RepositoryConfig {
                    url: expand(&r.url),
                    key_file: r.key_file.as_ref().map(expand_path),
                    password_file: r.password_file.as_ref().map(expand_path),
                    ..r
                },
            );
        }
        // A reference to a repository must name a `[repositories.NAME]` section.
        let known_repository = |r: &Spanned<String>, key: &str| -> Result<()> {
            if repositories.contains_key(r.get_ref()) {
                return Ok(());
            }
            Err(at(
                r.span(),
                key,
                format!(
                    "no [repositories.{}] section (there are: {})",
                    r.get_ref(),
                    repositories.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ))
        };
        let mut jobs = Vec::new();
        for (name, j) in config.jobs {
            if name.is_empty() || name.contains(['/', '\0']) {
                return Err(Error::invalid(format!(
                    "config {origin}: job name {name:?} must be non-empty without '/'"
                )));
            }
            let key = |k: &str| format!("jobs.{name}.{k}");
            known_repository(&j.repository, &key("repository"))?;
            let source = match (&j.paths, &j.database, &j.command, &j.postgres_globals) {
                (Some(p), None, None, None) if !p.is_empty() => {
                    JobSource::Paths(p.iter().map(expand_path).collect())
                }
                (None, Some(d), None, None) => JobSource::Database(expand(d)),
                (None, None, Some(c), None) => JobSource::Command(c.clone()),
                (None, None, None, Some(u)) => {
                    let url = expand(u);
                    if crate::source::database::engine_of(&url)
                        != Some(crate::source::database::Engine::Postgres)
                    {
                        return Err(Error::invalid(format!(
                            "config {origin}: {}: {} is not a postgres:// URL",
                            key("postgres_globals"),
                            crate::source::url::redact(&url)
                        )));
                    }
                    JobSource::PostgresGlobals(url)
                }
                _ => {
                    return Err(at(
                        j.schedule.span(),
                        &format!("jobs.{name}"),
                        "give exactly one of paths, database, command, postgres_globals".into(),
                    ));
                }
            };
            let source = server_source(source, &j)
                .map_err(|why| at(j.schedule.span(), &format!("jobs.{name}"), why.to_string()))?;
            let schedule = Schedule::parse(j.schedule.get_ref())
                .map_err(|e| at(j.schedule.span(), &key("schedule"), e.to_string()))?;
            if j.timeout.is_zero() {
                return Err(Error::invalid(format!(
                    "config {origin}: {}: must be more than 0s",
                    key("timeout")
                )));
            }
            jobs.push(Job {
                snapshot_name: j.snapshot_name.clone().unwrap_or_else(|| name.clone()),
                name,
                repository: j.repository.into_inner(),
                source,
                db_password_file: j.db_password_file.as_ref().map(expand_path),
                schedule,
                jitter: j.jitter,
                timeout: j.timeout,
                tags: j.tags,
            });
        }
        let mut copies = Vec::new();
        for (name, c) in config.copies {
            let key = |k: &str| format!("copies.{name}.{k}");
            known_repository(&c.from, &key("from"))?;
            known_repository(&c.to, &key("to"))?;
            if c.from.get_ref() == c.to.get_ref()
                || repositories[c.from.get_ref()].url == repositories[c.to.get_ref()].url
            {
                return Err(at(
                    c.to.span(),
                    &key("to"),
                    "copies to the repository it copies from".into(),
                ));
            }
            let schedule = Schedule::parse(c.schedule.get_ref())
                .map_err(|e| at(c.schedule.span(), &key("schedule"), e.to_string()))?;
            if c.timeout.is_zero() {
                return Err(Error::invalid(format!(
                    "config {origin}: {}: must be more than 0s",
                    key("timeout")
                )));
            }
            copies.push(CopyRule {
                name,
                from: c.from.into_inner(),
                to: c.to.into_inner(),
                schedule,
                select: c.select,
                names: c.names,
                timeout: c.timeout,
            });
        }
        let mut drills = Vec::new();
        for (name, d) in config.drills {
            let key = |k: &str| format!("drills.{name}.{k}");
            let schedule = Schedule::parse(d.schedule.get_ref())
                .map_err(|e| at(d.schedule.span(), &key("schedule"), e.to_string()))?;
            let job_name = d
                .job
                .as_ref()
                .map_or(name.as_str(), |j| j.get_ref().as_str());
            let job = jobs
                .iter()
                .find(|j| j.name == job_name)
                .cloned()
                .ok_or_else(|| {
                    let why = format!(
                        "no [jobs.{job_name}] section (there are: {})",
                        jobs.iter()
                            .map(|j| j.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    match &d.job {
                        Some(j) => at(j.span(), &key("job"), why),
                        None => at(d.schedule.span(), &format!("drills.{name}"), why),
                    }
                })?;
            let repository = match &d.repository {
                Some(r) => {
                    known_repository(r, &key("repository"))?;
                    r.get_ref().clone()
                }
                None => job.repository.clone(),
            };
            let kind = match &job.source {
                JobSource::PostgresGlobals(_) => {
                    return Err(at(
                        d.schedule.span(),
                        &format!("drills.{name}"),
                        format!(
                            "job {} backs up a server's roles, which a drill cannot restore                              without changing the scratch server's roles: drill the                              database jobs (whose drills need those roles on the scratch server)",
                            job.name
                        ),
                    ));
                }
                JobSource::PostgresServer {
                    databases: ServerDatabases::List(list),
                    ..
                } if list.is_empty() => {
                    return Err(at(
                        d.schedule.span(),
                        &format!("drills.{name}"),
                        format!(
                            "job {} backs up a server's roles only: a drill restores databases \
                             (give the job databases or all_databases)",
                            job.name
                        ),
                    ));
                }
                JobSource::PostgresServer { .. } => DrillKind::Postgres,
                JobSource::Paths(_) => DrillKind::Directory,
                JobSource::Command(_) => DrillKind::Stream,
                JobSource::Database(url) => match crate::source::database::engine_of(url) {
                    Some(crate::source::database::Engine::Postgres) => DrillKind::Postgres,
                    Some(crate::source::database::Engine::Mysql) => DrillKind::Mysql,
                    _ => DrillKind::Sqlite,
                },
            };
            let here = |why: String| at(d.schedule.span(), &format!("drills.{name}"), why);
            match (kind, &d.scratch) {
                (DrillKind::Postgres | DrillKind::Mysql, None) => {
                    return Err(here(format!(
                        "job {} backs up a database server: give scratch = \"{}://USER@HOST/\", \
                         a server where kluis may create and drop drill databases",
                        job.name,
                        if kind == DrillKind::Postgres {
                            "postgres"
                        } else {
                            "mysql"
                        }
                    )));
                }
                (DrillKind::Postgres | DrillKind::Mysql, Some(url)) => {
                    let engine = crate::source::database::engine_of(url);
                    let want = if kind == DrillKind::Postgres {
                        crate::source::database::Engine::Postgres
                    } else {
                        crate::source::database::Engine::Mysql
                    };
                    if engine != Some(want) {
                        return Err(here(format!(
                            "scratch {url:?} is not a server of the job's engine ({want:?})"
                        )));
                    }
                }
                (_, Some(_)) => {
                    return Err(here(format!(
                        "job {} restores without a server: scratch is for PostgreSQL and MySQL jobs",
                        job.name
                    )));
                }
                (_, None) => {}
            }
            if !d.assert.is_empty() && matches!(kind, DrillKind::Directory | DrillKind::Stream) {
                return Err(here("assertions are SQL: they need a database job".into()));
            }
            for a in &d.assert {
                let Some(db) = &a.database else { continue };
                match &job.source {
                    JobSource::PostgresServer {
                        databases: ServerDatabases::List(list),
                        ..
                    } if !list.contains(db) => {
                        return Err(here(format!(
                            "assertion {:?} is for database {db:?}, which job {} does not back \
                             up (it backs up: {})",
                            a.name,
                            job.name,
                            list.join(", ")
                        )));
                    }
                    JobSource::PostgresServer { .. } => {}
                    _ => {
                        return Err(here(format!(
                            "assertion {:?} names a database: that is for jobs of a whole \
                             server (databases or all_databases)",
                            a.name
                        )));
                    }
                }
            }
            let budget = d
                .budget
                .as_deref()
                .map(|b| {
                    humantime::parse_duration(b)
                        .map_err(|e| here(format!("budget {b:?} is not a duration ({e})")))
                })
                .transpose()?;
            if d.timeout.is_zero() {
                return Err(here("timeout must be more than 0s".into()));
            }
            let prefix = crate::drill::target_prefix(&name);
            if let Some(other) = drills
                .iter()
                .find(|o: &&Drill| crate::drill::target_prefix(&o.name) == prefix)
            {
                return Err(here(format!(
                    "its scratch targets would be named like those of drills.{} ({prefix}...); \
                     rename one",
                    other.name
                )));
            }
            drills.push(Drill {
                name,
                job,
                repository,
                schedule,
                kind,
                scratch: d.scratch.as_deref().map(expand),
                scratch_password_file: d.scratch_password_file.as_ref().map(expand_path),
                older: d.older,
                budget,
                timeout: d.timeout,
                assertions: d.assert,
            });
        }
        let mut prunes: Vec<Maintenance> = Vec::new();
        for (name, r) in &repositories {
            let Some(p) = &r.prune else { continue };
            let key = format!("repositories.{name}.prune");
            if !(0.0..=1.0).contains(&p.repack_threshold) {
                return Err(Error::invalid(format!(
                    "config {origin}: {key}.repack_threshold must be between 0 and 1"
                )));
            }
            // The grace period is what keeps a backup's reused data alive until it commits:
            // it must outlast every run writing to the repository.
            let writers = jobs
                .iter()
                .filter(|j| &j.repository == name)
                .map(|j| (format!("jobs.{}", j.name), j.timeout))
                .chain(
                    copies
                        .iter()
                        .filter(|c| &c.to == name)
                        .map(|c| (format!("copies.{}", c.name), c.timeout)),
                );
            if let Some((writer, timeout)) = writers
                .max_by_key(|(_, t)| *t)
                .filter(|(_, t)| *t >= p.grace)
            {
                return Err(Error::invalid(format!(
                    "config {origin}: {key}.grace ({}) must be longer than the timeout of every job and copy writing to it; {writer}.timeout is {}",
                    humantime::format_duration(p.grace),
                    humantime::format_duration(timeout)
                )));
            }
            if let Some(s) = &p.schedule {
                let schedule = Schedule::parse(s.get_ref())
                    .map_err(|e| at(s.span(), &format!("{key}.schedule"), e.to_string()))?;
                prunes.push(Maintenance {
                    repository: name.clone(),
                    schedule,
                    timeout: p.timeout,
                });
            }
        }
        Ok(Loaded {
            prunes,
            copies,
            drills,
            origin: origin.to_string(),
            daemon: config.daemon,
            http: config.http,
            state_dir,
            time_zone,
            repositories,
            jobs,
        })
    }

    /// The secret that opens a repository.
    pub fn secret(&self, repository: &str) -> Result<Secret> {
        let r = self.repositories.get(repository).ok_or_else(|| {
            Error::invalid(format!("no repository {repository:?} in {}", self.origin))
        })?;
        let lookup = crate::secrets::Lookup {
            key_file: r.key_file.as_deref(),
            password_file: r.password_file.as_deref(),
            ..Default::default()
        };
        if let Some(secret) = lookup.find()? {
            return Ok(secret);
        }
        let name = r.key_credential.as_deref().unwrap_or_default();
        let what = format!("repositories.{repository}.key_credential");
        Secret::from_key_file(&crate::secrets::required_credential(name, &what)?)
    }
}

/// A job's source with `databases`, `all_databases` or `globals`: a whole PostgreSQL server.
fn server_source(source: JobSource, j: &JobConfig) -> std::result::Result<JobSource, String> {
    if j.databases.is_none() && !j.all_databases && !j.globals {
        return Ok(source);
    }
    let url = match source {
        JobSource::Database(url)
            if crate::source::database::engine_of(&url)
                == Some(crate::source::database::Engine::Postgres) =>
        {
            url
        }
        _ => {
            return Err("databases, all_databases and globals go with database = \
                        \"postgres://USER@HOST/\" (a PostgreSQL server)"
                .into());
        }
    };
    let conn =
        crate::source::postgres::PgConn::parse_server(&url, None).map_err(|e| e.to_string())?;
    let databases = match (&j.databases, j.all_databases) {
        (Some(_), true) => return Err("give databases or all_databases, not both".into()),
        (Some(list), false) => {
            if list.is_empty() || list.iter().any(|d| d.is_empty()) {
                return Err("databases must name at least one database, none empty".into());
            }
            if conn.names_database {
                return Err(format!(
                    "with databases, the URL names the server only: {}",
                    crate::source::url::redact(&url)
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(twice) = list.iter().find(|d| !seen.insert(d.as_str())) {
                return Err(format!("databases names {twice:?} twice"));
            }
            ServerDatabases::List(list.clone())
        }
        (None, true) => ServerDatabases::All,
        // The database the URL names, if it names one, beside the roles.
        (None, false) if conn.names_database => ServerDatabases::List(vec![conn.database]),
        (None, false) => ServerDatabases::List(Vec::new()),
    };
    if let ServerDatabases::List(list) = &databases {
        if j.globals && list.iter().any(|d| d == GLOBALS_NAME) {
            return Err(format!(
                "a database named {GLOBALS_NAME:?} would share its snapshot name with the roles"
            ));
        }
    }
    Ok(JobSource::PostgresServer {
        url,
        databases,
        globals: j.globals,
    })
}

/// The snapshot name of a PostgreSQL server's roles and tablespaces.
pub const GLOBALS_NAME: &str = "postgres-globals";

/// systemd's `$STATE_DIRECTORY`, else `/var/lib/kluis` for root, `~/.local/state/kluis` for
/// others.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return PathBuf::from(first);
        }
    }
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    match std::env::var_os("HOME") {
        Some(home) if !root => Path::new(&home).join(".local/state/kluis"),
        _ => PathBuf::from("/var/lib/kluis"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_loads() {
        let c = Loaded::embedded().unwrap();
        assert!(!c.jobs.is_empty());
        for j in &c.jobs {
            assert!(c.repositories.contains_key(&j.repository));
        }
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let text = "[repositories.r]\nurl = \"/x\"\nkey_file = \"/k\"\n\n[jobs.a]\n\
                    repository = \"r\"\npaths = [\"/etc\"]\nschedule = \"daily at 25:00\"\n";
        let e = Loaded::parse(text, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("t.toml:8: jobs.a.schedule") && e.contains("0 to 23"),
            "{e}"
        );

        let text = text
            .replace("daily at 25:00", "daily at 02:30")
            .replace("\"r\"", "\"nope\"");
        let e = Loaded::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("t.toml:6: jobs.a.repository") && e.contains("nope"),
            "{e}"
        );

        let e = Loaded::parse("[jobs.a]\nrepository = \"r\"\nshedule = \"x\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml") && e.contains("shedule") && e.contains("line 3"),
            "{e}"
        );

        let e = Loaded::parse("[daemon]\ncatch_up = \"soon\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon") && e.contains("line 2"), "{e}");

        let two = "[repositories.r]\nurl = \"/x\"\nkey_file = \"/k\"\n[jobs.a]\n\
                   repository = \"r\"\npaths = [\"/etc\"]\ncommand = \"x\"\nschedule = \"every 1h\"\n";
        let e = Loaded::parse(two, "t.toml").unwrap_err().to_string();
        assert!(e.contains("exactly one of paths, database, command"), "{e}");
    }

    #[test]
    fn state_dir_is_substituted() {
        let text = "[daemon]\nstate_dir = \"/srv/k\"\n[repositories.r]\nurl = \"{state_dir}/repo\"\n\
                    key_file = \"{state_dir}/key\"\ninit = true\n[jobs.a]\nrepository = \"r\"\n\
                    database = \"sqlite://{state_dir}/app.db\"\nschedule = \"every 10m\"\n";
        let c = Loaded::parse(text, "t").unwrap();
        assert_eq!(c.repositories["r"].url, "/srv/k/repo");
        assert_eq!(
            c.repositories["r"].key_file.as_deref(),
            Some(Path::new("/srv/k/key"))
        );
        assert_eq!(
            c.jobs[0].source,
            JobSource::Database("sqlite:///srv/k/app.db".into())
        );
        assert_eq!(c.jobs[0].snapshot_name, "a");
    }
}
