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

use toml::Spanned;

use crate::error::{Error, Result};
use crate::keys::Secret;
use crate::schedule::Schedule;

mod check;
mod schema;

pub use schema::*;

/// The default configuration, embedded in the binary: it runs on any machine with nothing
/// installed (a local repository under the state directory, backing up `/etc`).
pub const EMBEDDED: &str = include_str!("../config/kluis.toml");

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

/// The prefix of every scratch target of a drill (a drill is named after its job unless it
/// says otherwise): `kluis_drill_<name>_`, the name reduced to `[a-z0-9_]`, at most 30 long.
pub fn target_prefix(drill: &str) -> String {
    let mut clean: String = drill
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    clean.truncate(30);
    format!("kluis_drill_{clean}_")
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
