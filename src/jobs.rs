//! Running a configured job: open (or create) its repository, build its source, back it up.
//!
//! Shared by `kluisd`, which runs jobs on their schedules, and `kluis backup --job`.

use crate::backup::{self, BackupOptions, BackupReport, Source};
use crate::config::{Job, JobSource, Loaded};
use crate::error::{Error, Result};
use crate::keys;
use crate::progress::{Cancel, Progress};
use crate::repository::{InitOptions, Repository};
use crate::snapshot::{SetRecord, Snapshot};
use crate::source::command::CommandSource;
use crate::source::database;
use crate::source::postgres::{self, PgConn, globals::GlobalsSource};
use crate::store::Store;
use jiff::Timestamp;

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
        other => other.map(|repo| repo.with_state_dir(&config.state_dir)),
    }
}

/// What one run of the job takes: one snapshot, or for a whole server a set of them (its
/// roles first, then each database, named `<snapshot_name>.<database>`, all with one time).
pub fn plan(config: &Loaded, job: &Job) -> Result<Vec<Planned>> {
    let JobSource::PostgresServer {
        url,
        databases,
        globals,
    } = &job.source
    else {
        return Ok(vec![Planned {
            name: job.snapshot_name.clone(),
            source: source(config, job)?,
            time: None,
            set: None,
        }]);
    };
    let password = crate::secrets::db_password(job.db_password_file.as_deref())?;
    let server = PgConn::parse_server(url, password)?.with_bin_dir(postgres::tools_dir(None));
    let mut planned = plan_postgres_server(&server, databases, *globals, None)?;
    let members: Vec<String> = planned
        .iter()
        .map(|p| format!("{}.{}", job.snapshot_name, p.name))
        .collect();
    let set = SetRecord {
        name: job.snapshot_name.clone(),
        members: members.clone(),
    };
    // One time for the whole set: it names the set, and every member lands in one epoch.
    let time = Timestamp::now();
    for (p, name) in planned.iter_mut().zip(members) {
        p.name = name;
        p.time = Some(time);
        p.set = Some(set.clone());
    }
    Ok(planned)
}

/// The source of a job that takes one snapshot.
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
            let password = crate::secrets::db_password(job.db_password_file.as_deref())?;
            Source::Streams(database::open(url, password, &places)?.1)
        }
        JobSource::PostgresGlobals(url) => {
            let password = crate::secrets::db_password(job.db_password_file.as_deref())?;
            let server =
                PgConn::parse_server(url, password)?.with_bin_dir(postgres::tools_dir(None));
            Source::Streams(Box::new(GlobalsSource::new(server)))
        }
        JobSource::PostgresServer { .. } => {
            return Err(Error::invalid(format!(
                "job {} takes a set of snapshots: see jobs::plan",
                job.name
            )));
        }
    })
}

pub use crate::config::{GLOBALS_NAME, ServerDatabases};

/// One snapshot to take: its name and source, and for a member of a set, the set's time
/// and record.
pub struct Planned {
    pub name: String,
    pub source: Source,
    pub time: Option<Timestamp>,
    pub set: Option<SetRecord>,
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
    if globals && databases.iter().any(|d| d == GLOBALS_NAME) {
        return Err(Error::invalid(format!(
            "the server has a database named {GLOBALS_NAME:?}, which would share its snapshot \
             name with the roles: list the databases without it"
        )));
    }
    if databases.is_empty() && !globals {
        return Err(Error::invalid(format!(
            "the server {} has no database to back up",
            server.display
        )));
    }
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
            time: None,
            set: None,
        });
    }
    for db in databases {
        planned.push(Planned {
            name: named(&db),
            source: Source::Streams(Box::new(crate::source::postgres::PostgresSource::new(
                server.with_database(&db),
            ))),
            time: None,
            set: None,
        });
    }
    Ok(planned)
}

/// What one run of a job made: a snapshot, or the members of a set that were committed and
/// those that failed (the others are still taken: one database down loses no other's backup).
pub struct JobReport {
    pub committed: Vec<BackupReport>,
    pub failed: Vec<(String, Error)>,
}

impl JobReport {
    /// The first failure, whose kind (storage, source, ...) the run is counted as.
    pub fn first_failure(&self) -> Option<&Error> {
        self.failed.first().map(|(_, e)| e)
    }
}

/// Backs the job up now, each planned snapshot with `opts` as its template (cancel, progress,
/// host, threads, uploads; a `time` replaces the planned one; `tags` are added to the job's).
/// An error means nothing was committed. `kluis backup --job` and the daemon both run it.
pub async fn run(config: &Loaded, job: &Job, opts: BackupOptions) -> Result<JobReport> {
    let repo = open_repository(config, &job.repository).await?;
    let planned = plan(config, job)?;
    let several = planned.len() > 1;
    let mut report = JobReport {
        committed: Vec::new(),
        failed: Vec::new(),
    };
    let ledger = crate::ledger::Ledger::open(&config.state_dir, &repo).ok();
    for p in planned {
        if opts.cancel.is_cancelled() {
            report.failed.push((p.name, Error::Interrupted));
            continue;
        }
        let mut opts = opts.clone();
        opts.name = p.name.clone();
        opts.ledger = ledger.clone();
        opts.tags = job.tags.iter().chain(&opts.tags).cloned().collect();
        opts.time = opts.time.or(p.time);
        opts.set = p.set;
        match backup::backup(&repo, p.source, opts).await {
            Ok(r) => report.committed.push(r),
            Err(e) if several => report.failed.push((p.name, e)),
            Err(e) => return Err(e),
        }
    }
    if report.committed.is_empty() {
        if let Some((_, e)) = report.failed.pop() {
            return Err(e);
        }
    }
    Ok(report)
}

/// Every readable snapshot of a repository: a job's last success survives restarts because it
/// is read from where the backups are.
/// A reader: it never creates the repository.
pub async fn snapshots(config: &Loaded, repository: &str) -> Result<Vec<Snapshot>> {
    let repo = open_existing(config, repository).await?;
    Ok(repo.snapshots().await?.0)
}

/// Every readable snapshot of a repository, and the verification of its records against
/// their chains, the forget records and what this host saw (see [`crate::ledger`]). The
/// daemon, a writer, surveys at its start: a repository configured with `init` is created then.
pub async fn survey(
    config: &Loaded,
    repository: &str,
) -> Result<(
    Vec<Snapshot>,
    crate::ledger::Verification,
    crate::audit::Trail,
)> {
    let repo = open_repository(config, repository).await?;
    let (list, unreadable) = repo.snapshots().await?;
    if repo.write_only() {
        // It cannot read the records it would verify: hosts with a full key do.
        return Ok((list, Default::default(), Default::default()));
    }
    let ledger = crate::ledger::Ledger::open(&config.state_dir, &repo).ok();
    let verification =
        crate::ledger::verify(&repo, &list, &unreadable, ledger.as_ref(), false).await?;
    let trail = crate::audit::verify(&repo, ledger.as_ref()).await?;
    Ok((list, verification, trail))
}

/// A job's newest snapshot among `snapshots`; for a job that makes sets, the first member of
/// its newest complete set.
pub fn last_of<'a>(job: &Job, snapshots: &'a [Snapshot]) -> Option<&'a Snapshot> {
    if job.makes_sets() {
        return sets_of(&job.snapshot_name, snapshots)
            .pop()
            .and_then(|set| set.into_iter().next());
    }
    snapshots
        .iter()
        .filter(|s| s.name == job.snapshot_name)
        .max_by_key(|s| s.time)
}

/// The complete sets named `name` among `snapshots`, oldest first, each in member order. A set
/// is complete when a snapshot of every member it records has the set's time (a run where a
/// database failed leaves an incomplete set: its snapshots are kept, but it is not the job's
/// success, and a drill does not pick it).
pub fn sets_of<'a>(name: &str, snapshots: &'a [Snapshot]) -> Vec<Vec<&'a Snapshot>> {
    let mut by_time: std::collections::BTreeMap<Timestamp, Vec<&Snapshot>> = Default::default();
    for s in snapshots {
        if s.set.as_ref().is_some_and(|set| set.name == name) {
            by_time.entry(s.time).or_default().push(s);
        }
    }
    by_time
        .into_values()
        .filter_map(|found| {
            let members = &found[0].set.as_ref()?.members;
            members
                .iter()
                .map(|m| {
                    found
                        .iter()
                        .filter(|s| &s.name == m)
                        .max_by_key(|s| s.finished)
                        .copied()
                })
                .collect::<Option<Vec<_>>>()
        })
        .collect()
}

/// A configured repository opened for maintenance, with its settings and this host's ledger
/// of it: what the daemon's maintenance and `kluis forget`/`kluis prune --repository` use.
/// A reader of what exists: it never creates the repository.
pub struct Maintained<'a> {
    pub repo: crate::repository::Repository,
    pub settings: &'a crate::config::RepositoryConfig,
    pub ledger: Option<crate::ledger::Ledger>,
}

/// Opens the configured repository `name` for maintenance (see [`Maintained`]).
pub async fn for_maintenance<'a>(config: &'a Loaded, name: &str) -> Result<Maintained<'a>> {
    let settings = config
        .repositories
        .get(name)
        .ok_or_else(|| Error::invalid(format!("{} has no repository {name:?}", config.origin)))?;
    let repo = open_existing(config, name).await?;
    let ledger = crate::ledger::Ledger::open(&config.state_dir, &repo).ok();
    Ok(Maintained {
        repo,
        settings,
        ledger,
    })
}

/// What a maintenance run did.
#[derive(Debug)]
pub struct MaintenanceReport {
    /// Snapshots the retention policy forgot.
    pub forgotten: usize,
    /// The erasure `erase_after` asked for, if it is set.
    pub erased: Option<crate::erase::EraseReport>,
    pub prune: crate::prune::PruneReport,
}

/// A repository's maintenance: forget by its retention policy (if it has one), erase what is
/// older than its `erase_after` (if set; every key slot kept), then prune with its prune
/// settings.
pub async fn maintain(
    config: &Loaded,
    repository: &str,
    cancel: Cancel,
) -> Result<MaintenanceReport> {
    let Maintained {
        repo,
        settings,
        ledger,
    } = for_maintenance(config, repository).await?;
    let (mut forgotten, mut warnings) = (0, Vec::new());
    if let Some(policy) = &settings.retention {
        let done = crate::forget::forget(
            &repo,
            crate::forget::ForgetOptions {
                policy,
                time_zone: config.time_zone.clone(),
                only: None,
                dry_run: false,
                ledger: ledger.clone(),
                cancel: cancel.clone(),
            },
        )
        .await?;
        (forgotten, warnings) = (done.removed, done.warnings);
    }
    let mut opts = settings
        .prune
        .as_ref()
        .map(|p| p.options())
        .unwrap_or_default();
    opts.cancel = cancel.clone();
    let (repo, mut erased) = match settings.erase_after {
        Some(after) => {
            let before = crate::clock::sub(Timestamp::now(), after);
            let (repo, report) = crate::erase::erase(
                repo,
                crate::erase::EraseOptions {
                    before,
                    dry_run: false,
                    slots: crate::erase::Slots::Keep,
                    creator: crate::keys::Creator::here(),
                    ledger,
                    prune: opts.clone(),
                    only_if_needed: true,
                    repack_all: false,
                },
            )
            .await?;
            (repo, Some(report))
        }
        None => (repo, None),
    };
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    // The erasure pruned already when it forgot snapshots of the month it falls in.
    let mut prune = match erased.as_mut().and_then(|e| e.prune.take()) {
        Some(done) => done,
        None => crate::prune::prune(&repo, &opts).await?,
    };
    prune.warnings.extend(warnings);
    if let Some(e) = &erased {
        prune.warnings.extend(e.warnings.iter().cloned());
    }
    Ok(MaintenanceReport {
        forgotten,
        erased,
        prune,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u8, time: &str, name: &str, members: &[&str]) -> Snapshot {
        let mut s = Snapshot::for_test(crate::id::ObjectId([id; 16]), time, "h", name);
        s.set = Some(SetRecord {
            name: "pg".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        });
        s
    }

    #[test]
    fn a_set_is_complete_when_every_member_has_its_time() {
        let m = ["pg.postgres-globals", "pg.shop"];
        let (t1, t2, t3) = (
            "2026-11-01T02:00:00Z",
            "2026-11-02T02:00:00Z",
            "2026-11-03T02:00:00Z",
        );
        let list = vec![
            member(1, t1, "pg.postgres-globals", &m),
            member(2, t1, "pg.shop", &m),
            // The shop failed on the 2nd; on the 3rd it ran at another time than the roles.
            member(3, t2, "pg.postgres-globals", &m),
            member(4, t3, "pg.shop", &m),
            // Another set's member, and a snapshot of no set, with the same time.
            {
                let mut s = member(5, t2, "pg.shop", &m);
                s.set.as_mut().unwrap().name = "other".into();
                s
            },
            Snapshot::for_test(crate::id::ObjectId([6; 16]), t2, "h", "pg.shop"),
        ];
        let sets = sets_of("pg", &list);
        assert_eq!(sets.len(), 1);
        let ids: Vec<u8> = sets[0].iter().map(|s| s.id.as_bytes()[0]).collect();
        assert_eq!(ids, [1, 2], "members in the recorded order");
        assert!(sets_of("nothing", &list).is_empty());
    }
}
