//! Running a configured job: open (or create) its repository, build its source, back it up.
//!
//! Shared by `kluisd`, which runs jobs on their schedules, and `kluis backup --job`.

use crate::backup::{self, BackupOptions, BackupReport, Source};
use crate::config::{Job, JobSource, Loaded};
use crate::error::{Error, Result};
use crate::keys;
use crate::progress::{Cancel, Progress};
use crate::repository::{InitOptions, Repository};
use crate::snapshot::Snapshot;
use crate::source::command::CommandSource;
use crate::source::database;
use crate::source::postgres::{self, PgConn, globals::GlobalsSource};
use crate::store::Store;

/// Opens the repository `name`; one configured with `init = true` is created when missing,
/// its key file too. Only writers (jobs, a copy's destination) create: a reader racing a
/// writer's first start must not initialise the same location beside it.
pub async fn open_repository(config: &Loaded, name: &str) -> Result<Repository> {
    open_with(config, name, true).await
}

/// Opens the repository `name`, never creating it (drills, a copy's source, maintenance).
pub async fn open_existing(config: &Loaded, name: &str) -> Result<Repository> {
    open_with(config, name, false).await
}

async fn open_with(config: &Loaded, name: &str, create: bool) -> Result<Repository> {
    let r = config
        .repositories
        .get(name)
        .ok_or_else(|| Error::invalid(format!("no repository {name:?} in {}", config.origin)))?;
    let init = r.init && create;
    if r.init && !create && r.key_file.as_ref().is_some_and(|k| !k.exists()) {
        // Its first writer has not created it (nor its key file) yet.
        return Err(Error::RepositoryNotFound {
            location: r.url.clone(),
        });
    }
    if init {
        if let Some(key) = &r.key_file {
            if !key.exists() {
                if let Some(dir) = key.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                }
                keys::generate_key_file(key)?;
            }
        }
    }
    let secret = config.secret(name)?;
    let store = Store::open(&r.url, init)?;
    match Repository::open(store.clone(), &secret).await {
        Err(Error::RepositoryNotFound { .. }) if init => {
            let known = crate::ledger::known_at(&config.state_dir, store.location());
            if let Some((id, seen, file)) = known {
                return Err(Error::invalid(format!(
                    "repositories.{name}: {} has no repository, but this host used repository \
                     {} there{}: its config is gone. Not creating a new one over it (`init = \
                     true` only creates a repository where this host never saw one); restore \
                     it, or remove {} to start afresh",
                    store.location(),
                    id.short(),
                    seen.map(|t| format!(" (last verified {t})"))
                        .unwrap_or_default(),
                    file.display()
                )));
            }
            let repo = Repository::init(store, &secret, InitOptions::default()).await?;
            // Remember it from the start: if it vanishes, the next start says so.
            if let Ok(ledger) = crate::ledger::Ledger::open(&config.state_dir, &repo) {
                let _ = ledger.touch();
            }
            Ok(repo)
        }
        other => other,
    }
}

/// The source a job describes.
pub fn source(config: &Loaded, job: &Job) -> Result<Source> {
    Ok(match &job.source {
        JobSource::Paths(p) => Source::Paths(p.clone()),
        JobSource::Command(c) => Source::Streams(Box::new(CommandSource::new(
            c.clone(),
            job.snapshot_name.clone(),
        ))),
        JobSource::Database(url) => {
            let places = database::Places {
                pg_bin_dir: None,
                // The consistent SQLite copy goes to the state directory, not a small /tmp.
                temp_dir: Some(config.state_dir.clone()),
            };
            let password = database::password(job.db_password_file.as_deref())?;
            Source::Streams(database::open(url, password, &places)?.1)
        }
        JobSource::PostgresGlobals(url) => {
            let password = database::password(job.db_password_file.as_deref())?;
            let server =
                PgConn::parse_server(url, password)?.with_bin_dir(postgres::tools_dir(None));
            Source::Streams(Box::new(GlobalsSource::new(server)))
        }
    })
}

/// The snapshot name of a PostgreSQL server's roles and tablespaces.
pub const GLOBALS_NAME: &str = "postgres-globals";

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

/// One snapshot a server-wide backup makes: its name and source.
pub struct Planned {
    pub name: String,
    pub source: Source,
}

/// A PostgreSQL server backed up whole: its roles and tablespaces first (with `globals`), so
/// a restore finds them at or before the databases, then each database as a snapshot named
/// after it. `name` renames the one snapshot (refused when there are several).
pub fn plan_postgres_server(
    server: &PgConn,
    databases: &ServerDatabases,
    globals: bool,
    name: Option<&str>,
) -> Result<Vec<Planned>> {
    let databases = match databases {
        ServerDatabases::All => postgres::list_databases(server)?,
        ServerDatabases::List(l) => l.clone(),
        ServerDatabases::Named if server.names_database && !globals => {
            vec![server.database.clone()]
        }
        ServerDatabases::Named => Vec::new(),
    };
    if name.is_some() && databases.len() + usize::from(globals) > 1 {
        return Err(Error::invalid(
            "--name names one snapshot; with several databases each is named after its database",
        ));
    }
    let named = |default: &str| name.map_or_else(|| default.to_string(), str::to_string);
    let mut planned = Vec::new();
    if globals {
        planned.push(Planned {
            name: named(GLOBALS_NAME),
            source: Source::Streams(Box::new(GlobalsSource::new(server.clone()))),
        });
    }
    for db in databases {
        planned.push(Planned {
            name: named(&db),
            source: Source::Streams(Box::new(crate::source::postgres::PostgresSource::new(
                server.with_database(&db),
            ))),
        });
    }
    Ok(planned)
}

/// Backs the job up now.
pub async fn run(
    config: &Loaded,
    job: &Job,
    cancel: Cancel,
    progress: std::sync::Arc<Progress>,
) -> Result<BackupReport> {
    let repo = open_repository(config, &job.repository).await?;
    let source = source(config, job)?;
    let mut opts = BackupOptions::new(job.snapshot_name.clone());
    opts.ledger = crate::ledger::Ledger::open(&config.state_dir, &repo).ok();
    opts.tags = job.tags.clone();
    opts.cancel = cancel;
    opts.progress = progress;
    backup::backup(&repo, source, opts).await
}

/// Every readable snapshot of a repository: a job's last success survives restarts because it
/// is read from where the backups are.
pub async fn snapshots(config: &Loaded, repository: &str) -> Result<Vec<Snapshot>> {
    let repo = open_repository(config, repository).await?;
    Ok(repo.snapshots().await?.0)
}

/// Every readable snapshot of a repository, and the verification of its records against
/// their chains, the forget records and what this host saw (see [`crate::ledger`]).
pub async fn survey(
    config: &Loaded,
    repository: &str,
) -> Result<(Vec<Snapshot>, crate::ledger::Verification)> {
    let repo = open_repository(config, repository).await?;
    let (list, unreadable) = repo.snapshots().await?;
    let ledger = crate::ledger::Ledger::open(&config.state_dir, &repo).ok();
    let verification =
        crate::ledger::verify(&repo, &list, &unreadable, ledger.as_ref(), false).await?;
    Ok((list, verification))
}

/// A job's newest snapshot among `snapshots`.
pub fn last_of<'a>(job: &Job, snapshots: &'a [Snapshot]) -> Option<&'a Snapshot> {
    snapshots
        .iter()
        .filter(|s| s.name == job.snapshot_name)
        .max_by_key(|s| s.time)
}

/// A repository's maintenance: forget by its retention policy (if it has one), then prune with
/// its prune settings. Returns how many snapshots were forgotten and what prune did.
pub async fn maintain(
    config: &Loaded,
    repository: &str,
    cancel: Cancel,
) -> Result<(usize, crate::prune::PruneReport)> {
    let r = config
        .repositories
        .get(repository)
        .ok_or_else(|| Error::invalid(format!("no repository {repository:?}")))?;
    let repo = open_existing(config, repository).await?;
    let (mut removed, mut warnings) = (0, Vec::new());
    if let Some(policy) = &r.retention {
        let done = crate::forget::forget(
            &repo,
            crate::forget::ForgetOptions {
                policy,
                time_zone: config.time_zone.clone(),
                only: None,
                dry_run: false,
                ledger: crate::ledger::Ledger::open(&config.state_dir, &repo).ok(),
                cancel: cancel.clone(),
            },
        )
        .await?;
        (removed, warnings) = (done.removed, done.warnings);
    }
    let mut opts = r.prune.as_ref().map(|p| p.options()).unwrap_or_default();
    opts.cancel = cancel;
    let mut report = crate::prune::prune(&repo, &opts).await?;
    report.warnings.extend(warnings);
    Ok((removed, report))
}

/// Runs a copy rule now: its selection of `from`'s snapshots that `to` has no copy of yet.
pub async fn copy(
    config: &Loaded,
    rule: &crate::config::CopyRule,
    cancel: Cancel,
    progress: std::sync::Arc<Progress>,
) -> Result<crate::copy::CopyReport> {
    let src = open_existing(config, &rule.from).await?;
    let dst = open_repository(config, &rule.to).await?;
    let opts = crate::copy::CopyOptions {
        ledger: crate::ledger::Ledger::open(&config.state_dir, &dst).ok(),
        selection: match rule.select {
            crate::config::CopySelect::Latest => crate::copy::Selection::Latest,
            crate::config::CopySelect::All => crate::copy::Selection::All,
        },
        names: rule.names.clone(),
        cancel,
        progress,
        ..Default::default()
    };
    crate::copy::copy(&src, &dst, &opts).await
}
