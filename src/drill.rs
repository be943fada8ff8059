//! Restore drills: a snapshot restored into a scratch target on a schedule, checked, timed and
//! removed, with a report stored (encrypted) in the repository.
//!
//! A drill takes the job's newest snapshot (and, when configured, a random older one, so old
//! snapshots and copies are proven too), restores it into a target named
//! `kluis_drill_<drill>_<time>` (a database on the configured scratch server, or a file or
//! directory under `<state_dir>/drills/`), and checks, in order:
//!
//! 1. `hash`: every restored stream and file matches the SHA-256 its snapshot records (the
//!    restore verifies it end to end, as every restore does);
//! 2. `engine`: the engine accepted it: `psql` loaded every stream stopping at the first error;
//!    MySQL's `CHECK TABLE` finds every table OK; SQLite's `PRAGMA integrity_check` says ok;
//! 3. `rows`: every table's row count equals the count recorded at backup time (for a
//!    directory: the number of files);
//! 4. each configured assertion: SQL that must return true;
//! 5. `budget`: the restore finished within the recovery-time budget.
//!
//! The target is dropped afterwards whatever happened. Targets a crash left behind are
//! dropped when kluisd starts, and before the drill's next run once older than its timeout
//! (a run elsewhere may still use a younger one). A drill never touches a database or file not
//! named exactly as its own targets are (`is_leftover`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::config::{Drill, DrillKind, Loaded};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::object::{Kind, name};
use crate::progress::Cancel;
use crate::repository::Repository;
use crate::restore::{RestoreOptions, Restorer};
use crate::snapshot::{Snapshot, Source as SnapshotSource};
use crate::source::mysql::{self, MyConn};
use crate::source::postgres::{self, PgConn};

/// One check of a drill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What one drill of one snapshot found. Stored in the repository as `drills/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub id: ObjectId,
    /// The drill's configured name.
    pub drill: String,
    pub job: String,
    pub repository: String,
    /// The host that ran the drill.
    pub host: String,
    pub snapshot: ObjectId,
    pub snapshot_time: Timestamp,
    pub snapshot_name: String,
    /// `newest`, `older` (the random pick), or `chosen` (asked for by id).
    pub pick: String,
    /// `postgres`, `mysql`, `sqlite`, `directory` or `stream`.
    pub kind: String,
    /// The scratch database or path restored into.
    pub target: String,
    pub started: Timestamp,
    pub finished: Timestamp,
    /// The measured recovery time: from the start of the restore until the data was usable.
    pub restore_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<f64>,
    pub checks: Vec<Check>,
    pub passed: bool,
    /// Why it failed (`corrupt`, `restore`, `rows`, `assertion`, `budget`, `scratch`,
    /// `storage`, `interrupted`, `other`); the metric label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the scratch target was removed afterwards.
    pub cleaned_up: bool,
    /// Its place in the drilling host's chain of records (see [`crate::ledger`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<crate::ledger::Chain>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub program: String,
}

/// How to run a drill.
#[derive(Debug, Clone, Default)]
pub struct DrillOptions {
    /// Test this snapshot (id prefix) instead of the newest and the random older one.
    pub snapshot: Option<String>,
    pub cancel: Cancel,
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

/// Runs a drill now: restores and checks the chosen snapshots, stores a report of each in the
/// repository and returns them. A snapshot failing its checks is a report with
/// `passed: false`; an error means no drill could be run (no snapshot, the repository
/// unreachable).
pub async fn run(config: &Loaded, drill: &Drill, opts: &DrillOptions) -> Result<Vec<DrillReport>> {
    let repo = crate::jobs::open_existing(config, &drill.repository).await?;
    let (list, _) = repo.snapshots().await?;
    let mine: Vec<Snapshot> = list
        .into_iter()
        .filter(|s| s.name == drill.job.snapshot_name)
        .collect();
    let picks: Vec<(&Snapshot, &str)> = match &opts.snapshot {
        Some(spec) => vec![(
            crate::snapshot::select(&mine, spec, Some(&drill.job.snapshot_name))?,
            "chosen",
        )],
        None => {
            let newest = crate::snapshot::select(&mine, "latest", Some(&drill.job.snapshot_name))
                .map_err(|_| {
                Error::SnapshotNotFound(format!(
                    "of job {} in repository {} to drill",
                    drill.job.name, drill.repository
                ))
            })?;
            let mut picks = vec![(newest, "newest")];
            let older: Vec<&Snapshot> = mine.iter().filter(|s| s.id != newest.id).collect();
            if drill.older && !older.is_empty() {
                picks.push((older[random_below(older.len())], "older"));
            }
            picks
        }
    };
    let scratch = Scratch::new(config, drill)?;
    let mut reports = Vec::new();
    for (n, (snapshot, pick)) in picks.into_iter().enumerate() {
        if opts.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let mut report = drill_one(&repo, drill, &scratch, snapshot, pick, n, &opts.cancel).await;
        // A repository the drill may only read (credentials for the foreign copy that cannot
        // write) still gets its drill: the report is then only in the log and the metrics.
        let ledger = crate::ledger::Ledger::open(&config.state_dir, &repo);
        if let Err(e) = save(&repo, &mut report, ledger.as_ref().ok()).await {
            report.warnings.push(format!(
                "the report could not be stored in repository {}: {e}",
                drill.repository
            ));
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Stores a report in the repository, chained to this host's records when it has a ledger.
async fn save(
    repo: &Repository,
    report: &mut DrillReport,
    ledger: Option<&crate::ledger::Ledger>,
) -> Result<()> {
    let object = format!("{}/{}", name::DRILLS, report.id);
    let link = crate::ledger::try_link(ledger, &mut report.warnings).await;
    report.chain = link.as_ref().map(|l| l.chain.clone());
    let plain = serde_json::to_vec(report).expect("reports serialize");
    repo.store()
        .put(&object, repo.seal_master(Kind::Drill, &object, &plain))
        .await?;
    if let Some(link) = link {
        if let Err(e) = link.committed(&object) {
            report.warnings.push(format!(
                "this host's ledger could not record the report: {e}"
            ));
        }
    }
    Ok(())
}

/// Every drill report in the repository, oldest first, and the objects that could not be read.
pub async fn history(repo: &Repository) -> Result<(Vec<DrillReport>, Vec<Error>)> {
    let listed = repo.store().list(name::DRILLS).await?;
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for o in listed {
        let read = async {
            let plain = repo.open_master(Kind::Drill, &o.name).await?;
            serde_json::from_slice::<DrillReport>(&plain)
                .map_err(|e| Error::corrupt(&o.name, format!("drill report does not parse: {e}")))
        };
        match read.await {
            Ok(r) => reports.push(r),
            Err(e) => errors.push(e),
        }
    }
    reports.sort_by_key(|r| r.started);
    Ok((reports, errors))
}

fn random_below(n: usize) -> usize {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0;
    }
    (u64::from_le_bytes(b) % n.max(1) as u64) as usize
}

/// Where a drill restores: a scratch server, or the state directory.
enum Scratch {
    Postgres(PgConn),
    /// The server URL (without a database) and its password.
    Mysql(String, Option<zeroize::Zeroizing<String>>),
    Files(PathBuf),
}

/// `scheme://authority/db?query` from a server URL without a database.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("", base));
    let authority = rest.split('/').next().unwrap_or("");
    format!("{scheme}://{authority}/{db}{query}")
}

impl Scratch {
    fn new(config: &Loaded, drill: &Drill) -> Result<Scratch> {
        let password = || {
            let file = drill.scratch_password_file.clone().or_else(|| {
                std::env::var_os("CREDENTIALS_DIRECTORY")
                    .map(|d| Path::new(&d).join("kluis-scratch-password"))
                    .filter(|p| p.exists())
            });
            file.map(|p| crate::keys::read_secret_line(&p)).transpose()
        };
        let url = drill.scratch.as_deref().unwrap_or_default();
        Ok(match drill.kind {
            DrillKind::Postgres => Scratch::Postgres(
                PgConn::parse_server(url, password()?)?
                    .with_bin_dir(postgres::tools_dir(None))
                    .with_database("postgres"),
            ),
            DrillKind::Mysql => {
                // Checked now: a bad URL is a configuration error, not a failed drill.
                MyConn::parse(&with_database(url, "mysql"), None)?;
                Scratch::Mysql(url.to_string(), password()?)
            }
            _ => Scratch::Files(config.state_dir.join("drills")),
        })
    }

    fn mysql(&self, db: &str) -> Result<MyConn> {
        match self {
            Scratch::Mysql(url, pw) => MyConn::parse(&with_database(url, db), pw.clone()),
            _ => Err(Error::invalid("not a MySQL scratch server")),
        }
    }

    /// Reaches the scratch place and drops what earlier drills of `prefix` left behind:
    /// targets named exactly as this drill names them, created before `before` (none: any
    /// time). Returns the names dropped.
    fn clean(&self, prefix: &str, before: Option<Timestamp>) -> Result<Vec<String>> {
        let like = prefix.replace('_', "\\_") + "%";
        let ours = |name: &str| is_leftover(name, prefix, before);
        let mut dropped = Vec::new();
        match self {
            Scratch::Postgres(server) => {
                let rows = server.query_one(&format!(
                    "SELECT coalesce(string_agg(datname, E'\\n'), '') FROM pg_database \
                     WHERE datname LIKE {}",
                    postgres::literal(&like)
                ))?;
                for db in rows.lines().filter(|l| ours(l)) {
                    server.query_one(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        postgres::ident(db)
                    ))?;
                    dropped.push(db.to_string());
                }
            }
            Scratch::Mysql(..) => {
                let conn = self.mysql("mysql")?;
                let rows = conn.query(&format!(
                    "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE {}",
                    mysql::sql_literal(&like)
                ))?;
                for db in rows.iter().filter(|l| ours(l)) {
                    conn.query(&format!("DROP DATABASE IF EXISTS {}", mysql::ident(db)))?;
                    dropped.push(db.clone());
                }
            }
            Scratch::Files(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                    let entry = entry.map_err(|e| Error::io(dir, e))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !ours(&name) {
                        continue;
                    }
                    let path = entry.path();
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(|e| Error::io(&path, e))?;
                    dropped.push(name);
                }
            }
        }
        Ok(dropped)
    }
}

/// Whether `name` is a target this drill made (`<prefix><YYYYmmddHHMMSS>[_n]`), made before
/// `before` if given.
fn is_leftover(name: &str, prefix: &str, before: Option<Timestamp>) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let (stamp, n) = rest.split_at(rest.len().min(14));
    let well_formed = stamp.len() == 14
        && stamp.bytes().all(|b| b.is_ascii_digit())
        && (n.is_empty()
            || n.strip_prefix('_')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())));
    if !well_formed {
        return false;
    }
    let Some(before) = before else { return true };
    jiff::civil::DateTime::strptime("%Y%m%d%H%M%S", stamp)
        .ok()
        .and_then(|t| t.to_zoned_datetime(jiff::tz::TimeZone::UTC).ok())
        .is_some_and(|t| t.timestamp() < before)
}

/// Drops what earlier drills of every configured drill left behind (kluisd start-up: none of
/// its drills runs yet).
pub async fn clean_leftovers(config: &Loaded) -> Vec<String> {
    let mut log = Vec::new();
    for drill in &config.drills {
        let prefix = target_prefix(&drill.name);
        let cleaned = match Scratch::new(config, drill) {
            Ok(s) => tokio::task::spawn_blocking(move || s.clean(&prefix, None))
                .await
                .unwrap_or_else(|e| Err(Error::invalid(format!("drill clean-up crashed: {e}")))),
            Err(e) => Err(e),
        };
        match cleaned {
            Ok(names) if names.is_empty() => {}
            Ok(names) => log.push(format!(
                "drill {}: dropped {} left behind by an earlier drill: {}",
                drill.name,
                names.len(),
                names.join(", ")
            )),
            Err(e) => log.push(format!(
                "drill {}: cannot clean its scratch place: {e}",
                drill.name
            )),
        }
    }
    log
}

/// The checks and their outcome so far.
struct Checks {
    list: Vec<Check>,
    reason: Option<&'static str>,
}

impl Checks {
    fn pass(&mut self, name: &str, detail: impl Into<String>) {
        self.list.push(Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        });
    }

    fn fail(&mut self, name: &str, reason: &'static str, detail: impl Into<String>) {
        self.list.push(Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
        });
        self.reason.get_or_insert(reason);
    }
}

/// What a restore error means for the drill: the check that failed and the reason label.
fn classify(e: &Error) -> (&'static str, &'static str) {
    match e {
        Error::Corrupt { .. } | Error::MissingBlob(_) | Error::MissingObject { .. } => {
            ("hash", "corrupt")
        }
        Error::TargetFailed(_) => ("engine", "restore"),
        Error::Interrupted => ("restore", "interrupted"),
        Error::Store { .. } | Error::RepositoryNotFound { .. } => ("restore", "storage"),
        _ => ("restore", "other"),
    }
}

/// Runs blocking database work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::invalid(format!("drill check crashed: {e}")))?
}

async fn drill_one(
    repo: &Repository,
    drill: &Drill,
    scratch: &Scratch,
    snapshot: &Snapshot,
    pick: &str,
    n: usize,
    cancel: &Cancel,
) -> DrillReport {
    let started = Timestamp::now();
    let prefix = target_prefix(&drill.name);
    let mut target = format!(
        "{prefix}{}",
        started
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .strftime("%Y%m%d%H%M%S")
    );
    if n > 0 {
        target.push_str(&format!("_{n}"));
    }
    let mut checks = Checks {
        list: Vec::new(),
        reason: None,
    };
    let mut warnings = Vec::new();
    let kind = match drill.kind {
        DrillKind::Postgres => "postgres",
        DrillKind::Mysql => "mysql",
        DrillKind::Sqlite => "sqlite",
        DrillKind::Directory => "directory",
        DrillKind::Stream => "stream",
    };
    let mut shown_target = target.clone();
    let mut restore_seconds = 0.0;
    let mut cleaned_up = true;
    // Reach the scratch place, dropping leftovers of earlier runs of this drill: those older
    // than any run of it can be (another process, a CLI `kluis drill run` say, may be running
    // it right now).
    let reached = {
        let (s, p) = (scratch_clone(scratch), prefix.clone());
        let limit = drill.timeout + Duration::from_secs(300);
        let before = started.checked_sub(jiff::SignedDuration::try_from(limit).unwrap_or_default());
        blocking(move || s.clean(&p, before.ok())).await
    };
    match reached {
        Err(e) => checks.fail(
            "scratch",
            "scratch",
            format!("the scratch place cannot be used: {e}"),
        ),
        Ok(dropped) => {
            if !dropped.is_empty() {
                warnings.push(format!(
                    "dropped what an earlier drill left behind: {}",
                    dropped.join(", ")
                ));
            }
            let place = Place::new(scratch, &target);
            shown_target = place.shown();
            let clock = Instant::now();
            let restored = restore(repo, snapshot, &place, cancel).await;
            restore_seconds = clock.elapsed().as_secs_f64();
            match restored {
                Err(e) => {
                    let (check, reason) = classify(&e);
                    checks.fail(check, reason, e.to_string());
                }
                Ok(files) => {
                    let what = if drill.kind == DrillKind::Directory {
                        "file(s)"
                    } else {
                        "stream(s)"
                    };
                    checks.pass(
                        "hash",
                        format!(
                            "{} {what}, {} bytes: every SHA-256 matches the snapshot",
                            files.0, files.1
                        ),
                    );
                    verify(&place, snapshot, drill, &mut checks, files.0).await;
                }
            }
            if let Some(budget) = drill.budget {
                let took = Duration::from_secs_f64(restore_seconds);
                if took <= budget {
                    checks.pass(
                        "budget",
                        format!(
                            "restored in {:.1} s, within the budget of {}",
                            restore_seconds,
                            humantime::format_duration(budget)
                        ),
                    );
                } else {
                    checks.fail(
                        "budget",
                        "budget",
                        format!(
                            "restored in {:.1} s, over the budget of {}",
                            restore_seconds,
                            humantime::format_duration(budget)
                        ),
                    );
                }
            }
            if let Err(e) = place.remove().await {
                cleaned_up = false;
                warnings.push(format!("cannot remove {shown_target}: {e}"));
            }
        }
    }
    DrillReport {
        id: ObjectId::random(),
        drill: drill.name.clone(),
        job: drill.job.name.clone(),
        repository: drill.repository.clone(),
        host: crate::hostname(),
        snapshot: snapshot.id,
        snapshot_time: snapshot.time,
        snapshot_name: snapshot.name.clone(),
        pick: pick.into(),
        kind: kind.into(),
        chain: None,
        target: shown_target,
        started,
        finished: Timestamp::now(),
        restore_seconds,
        budget_seconds: drill.budget.map(|b| b.as_secs_f64()),
        passed: checks.reason.is_none(),
        reason: checks.reason.map(String::from),
        checks: checks.list,
        cleaned_up,
        warnings,
        program: format!("kluis {}", env!("CARGO_PKG_VERSION")),
    }
}

fn scratch_clone(s: &Scratch) -> Scratch {
    match s {
        Scratch::Postgres(c) => Scratch::Postgres(c.clone()),
        Scratch::Mysql(u, p) => Scratch::Mysql(u.clone(), p.clone()),
        Scratch::Files(d) => Scratch::Files(d.clone()),
    }
}

/// One drill's scratch target.
enum Place {
    Postgres(PgConn),
    Mysql(Result<MyConn>, String),
    File(PathBuf),
}

impl Place {
    fn new(scratch: &Scratch, target: &str) -> Place {
        match scratch {
            Scratch::Postgres(server) => Place::Postgres(server.with_database(target)),
            Scratch::Mysql(..) => Place::Mysql(scratch.mysql(target), target.to_string()),
            Scratch::Files(dir) => Place::File(dir.join(target)),
        }
    }

    fn shown(&self) -> String {
        match self {
            Place::Postgres(c) => format!("database {} on {}", c.database, c.display),
            Place::Mysql(Ok(c), _) => c.display.clone(),
            Place::Mysql(Err(_), name) => name.clone(),
            Place::File(p) => p.display().to_string(),
        }
    }

    async fn remove(&self) -> Result<()> {
        match self {
            Place::Postgres(c) => {
                let (server, db) = (c.with_database("postgres"), c.database.clone());
                blocking(move || {
                    server
                        .query_one(&format!(
                            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                            postgres::ident(&db)
                        ))
                        .map(drop)
                })
                .await
            }
            Place::Mysql(Ok(c), db) => {
                let (c, db) = (c.clone(), db.clone());
                blocking(move || {
                    c.query(&format!("DROP DATABASE IF EXISTS {}", mysql::ident(&db)))
                        .map(drop)
                })
                .await
            }
            Place::Mysql(Err(_), _) => Ok(()),
            Place::File(p) => {
                let p = p.clone();
                blocking(move || {
                    let removed = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                    match removed {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&p, e)),
                        _ => Ok(()),
                    }
                })
                .await
            }
        }
    }
}

/// Restores `snapshot` into `place`; returns the files (streams) and bytes restored.
async fn restore(
    repo: &Repository,
    snapshot: &Snapshot,
    place: &Place,
    cancel: &Cancel,
) -> Result<(u64, u64)> {
    let opts = RestoreOptions {
        cancel: cancel.clone(),
        ..RestoreOptions::default()
    };
    let restorer = Restorer::new(repo, snapshot, opts).await?;
    let report = match (place, &snapshot.source) {
        (Place::Postgres(c), SnapshotSource::Postgres(_)) => {
            restorer.to_postgres(c, false, 2).await?
        }
        (Place::Mysql(c, _), SnapshotSource::Mysql(_)) => {
            let c = c.as_ref().map_err(|e| Error::invalid(e.to_string()))?;
            restorer.to_mysql(c, false).await?
        }
        (Place::File(p), SnapshotSource::Sqlite(_)) => restorer.to_sqlite(p, false).await?,
        (Place::File(p), SnapshotSource::Paths { .. }) => restorer.to_directory(p).await?,
        (Place::File(p), _) => {
            let file = std::fs::File::create(p).map_err(|e| Error::io(p, e))?;
            restorer.stream_to(Box::new(file)).await?
        }
        (_, s) => {
            return Err(Error::invalid(format!(
                "snapshot {} holds a {} snapshot, not what this drill's scratch server takes",
                snapshot.id.short(),
                match s {
                    SnapshotSource::Postgres(_) => "PostgreSQL",
                    SnapshotSource::Mysql(_) => "MySQL",
                    SnapshotSource::Sqlite(_) => "SQLite",
                    _ => "file",
                }
            )));
        }
    };
    Ok((report.files, report.bytes))
}

/// The timestamp literal `{snapshot_time}` stands for in an assertion.
/// Microseconds, UTC: what all three engines keep.
fn time_literal(kind: DrillKind, t: Timestamp) -> String {
    let utc = t.to_zoned_datetime(jiff::tz::TimeZone::UTC);
    match kind {
        DrillKind::Postgres => format!("'{}'::timestamptz", utc.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")),
        _ => format!("'{}'", utc.strftime("%Y-%m-%d %H:%M:%S%.6f")),
    }
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "t" | "true" | "1")
}

/// The checks after a successful restore: the engine's own, row counts, assertions.
async fn verify(
    place: &Place,
    snapshot: &Snapshot,
    drill: &Drill,
    checks: &mut Checks,
    files: u64,
) {
    let tables = match &snapshot.source {
        SnapshotSource::Postgres(r) | SnapshotSource::Mysql(r) | SnapshotSource::Sqlite(r) => {
            r.tables.clone()
        }
        _ => Vec::new(),
    };
    let when = time_literal(drill.kind, snapshot.time);
    let assertions: Vec<(String, String)> = drill
        .assertions
        .iter()
        .map(|a| (a.name.clone(), a.sql.replace("{snapshot_time}", &when)))
        .collect();
    match place {
        Place::Postgres(c) => {
            checks.pass(
                "engine",
                "psql loaded every stream with ON_ERROR_STOP: no error",
            );
            let counts = {
                let (c, t) = (c.clone(), tables.clone());
                blocking(move || {
                    let exprs: Vec<String> = t
                        .iter()
                        .map(|t| {
                            format!(
                                "(SELECT count(*) FROM ONLY {}.{})",
                                postgres::ident(&t.schema),
                                postgres::ident(&t.name)
                            )
                        })
                        .collect();
                    count_rows(&exprs, |sql| c.query_one(sql))
                })
                .await
            };
            compare_rows(checks, &tables, counts);
            for (name, sql) in assertions {
                let c = c.clone();
                let got = blocking(move || c.query_one(&sql)).await;
                assertion(checks, &name, got);
            }
        }
        Place::Mysql(Ok(c), _) => {
            let names: Vec<String> = tables.iter().map(|t| mysql::ident(&t.name)).collect();
            if names.is_empty() {
                checks.pass("engine", "no tables to check");
            } else {
                let c2 = c.clone();
                let list = names.join(", ");
                let rows = blocking(move || c2.query_in(&format!("CHECK TABLE {list}"))).await;
                match rows {
                    Err(e) => checks.fail("engine", "restore", format!("CHECK TABLE failed: {e}")),
                    Ok(rows) => {
                        let bad: Vec<&String> = rows
                            .iter()
                            .filter(|r| {
                                let f: Vec<&str> = r.split('\t').collect();
                                f.len() >= 4
                                    && (f[2].eq_ignore_ascii_case("error")
                                        || (f[2].eq_ignore_ascii_case("status")
                                            && !f[3].eq_ignore_ascii_case("ok")))
                            })
                            .collect();
                        if bad.is_empty() {
                            checks.pass(
                                "engine",
                                format!("CHECK TABLE: all {} table(s) OK", names.len()),
                            );
                        } else {
                            checks.fail(
                                "engine",
                                "restore",
                                format!(
                                    "CHECK TABLE: {}",
                                    bad.iter()
                                        .map(|s| s.replace('\t', " "))
                                        .collect::<Vec<_>>()
                                        .join("; ")
                                ),
                            );
                        }
                    }
                }
            }
            let counts = {
                let (c, names) = (c.clone(), names.clone());
                blocking(move || {
                    let exprs: Vec<String> = names
                        .iter()
                        .map(|t| format!("(SELECT COUNT(*) FROM {t})"))
                        .collect();
                    count_rows(&exprs, |sql| c.query_in(sql).map(|r| r.join("\n")))
                })
                .await
            };
            compare_rows(checks, &tables, counts);
            for (name, sql) in assertions {
                let c = c.clone();
                let got = blocking(move || c.query_in(&sql).map(|r| r.join("\n"))).await;
                assertion(checks, &name, got);
            }
        }
        Place::Mysql(Err(_), _) => {}
        Place::File(p) => match drill.kind {
            DrillKind::Sqlite => {
                checks.pass("engine", "PRAGMA integrity_check: ok");
                let (p2, t) = (p.clone(), tables.clone());
                let counts = blocking(move || {
                    let c = rusqlite::Connection::open_with_flags(
                        &p2,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )
                    .map_err(|e| Error::TargetFailed(format!("{}: {e}", p2.display())))?;
                    t.iter()
                        .map(|t| {
                            c.query_row(
                                &format!(
                                    "SELECT count(*) FROM \"{}\"",
                                    t.name.replace('"', "\"\"")
                                ),
                                [],
                                |r| r.get::<_, i64>(0),
                            )
                            .map(|n| n.max(0) as u64)
                            .map_err(|e| {
                                Error::TargetFailed(format!("count rows of {}: {e}", t.name))
                            })
                        })
                        .collect::<Result<Vec<u64>>>()
                })
                .await;
                compare_rows(checks, &tables, counts);
                for (name, sql) in assertions {
                    let p2 = p.clone();
                    let got = blocking(move || {
                        let c = rusqlite::Connection::open_with_flags(
                            &p2,
                            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                        )
                        .map_err(|e| Error::TargetFailed(e.to_string()))?;
                        c.query_row(&sql, [], |r| {
                            Ok(match r.get_ref(0)? {
                                rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                                rusqlite::types::ValueRef::Real(f) => f.to_string(),
                                rusqlite::types::ValueRef::Text(t) => {
                                    String::from_utf8_lossy(t).into_owned()
                                }
                                rusqlite::types::ValueRef::Null => "NULL".into(),
                                rusqlite::types::ValueRef::Blob(_) => "(blob)".into(),
                            })
                        })
                        .map_err(|e| Error::TargetFailed(e.to_string()))
                    })
                    .await;
                    assertion(checks, &name, got);
                }
            }
            DrillKind::Directory => {
                if files == snapshot.summary.files {
                    checks.pass("files", format!("{files} file(s), as the snapshot records"));
                } else {
                    checks.fail(
                        "files",
                        "rows",
                        format!(
                            "{files} file(s) restored, the snapshot records {}",
                            snapshot.summary.files
                        ),
                    );
                }
            }
            _ => {}
        },
    }
}

/// Counts rows with one query per 100 tables: the subqueries' counts joined by commas
/// (`concat_ws` means the same to PostgreSQL and MySQL).
fn count_rows(exprs: &[String], query: impl Fn(&str) -> Result<String>) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    // PostgreSQL takes at most 100 arguments to a function.
    for part in exprs.chunks(90) {
        let got = query(&format!("SELECT concat_ws(',', {})", part.join(", ")))?;
        for n in got.trim().split(',') {
            out.push(
                n.trim()
                    .parse()
                    .map_err(|_| Error::TargetFailed(format!("row count {n:?} is not a number")))?,
            );
        }
    }
    Ok(out)
}

fn compare_rows(
    checks: &mut Checks,
    tables: &[crate::snapshot::TableRecord],
    counts: Result<Vec<u64>>,
) {
    match counts {
        Err(e) => checks.fail("rows", "rows", format!("cannot count rows: {e}")),
        Ok(counts) if counts.len() != tables.len() => checks.fail(
            "rows",
            "rows",
            format!(
                "counted {} tables, the snapshot records {}",
                counts.len(),
                tables.len()
            ),
        ),
        Ok(counts) => {
            let wrong: Vec<String> = tables
                .iter()
                .zip(&counts)
                .filter(|(t, n)| t.rows != **n)
                .map(|(t, n)| format!("{}.{}: {n} rows, recorded {}", t.schema, t.name, t.rows))
                .collect();
            if wrong.is_empty() {
                checks.pass(
                    "rows",
                    format!(
                        "{} table(s), {} rows, as recorded at backup time",
                        tables.len(),
                        counts.iter().sum::<u64>()
                    ),
                );
            } else {
                checks.fail("rows", "rows", wrong.join("; "));
            }
        }
    }
}

fn assertion(checks: &mut Checks, name: &str, got: Result<String>) {
    let label = format!("assert: {name}");
    match got {
        Ok(v) if truthy(&v) => checks.pass(&label, "true"),
        Ok(v) => checks.fail(
            &label,
            "assertion",
            format!("returned {:?}, not true", v.trim()),
        ),
        Err(e) => checks.fail(&label, "assertion", format!("failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_named_by_job_and_cannot_escape_their_prefix() {
        let p = target_prefix("shop");
        let t: Timestamp = "2026-11-25T12:00:00Z".parse().unwrap();
        assert!(is_leftover("kluis_drill_shop_20261125110000", &p, None));
        assert!(is_leftover(
            "kluis_drill_shop_20261125110000_1",
            &p,
            Some(t)
        ));
        assert!(!is_leftover("kluis_drill_shop_20261125130000", &p, Some(t)));
        for other in [
            "kluis_drill_shop_eu_20261125110000",
            "kluis_drill_shopping",
            "kluis_drill_shop_2026112511000",
            "kluis_drill_shop_20261125110000_",
            "kluis_drill_shop_20261125110000x",
            "shop_20261125110000",
        ] {
            assert!(!is_leftover(other, &p, None), "{other}");
        }
        assert_eq!(target_prefix("billing"), "kluis_drill_billing_");
        assert_eq!(target_prefix("Shop-EU 1"), "kluis_drill_shop_eu_1_");
        assert_eq!(
            target_prefix(&"x".repeat(80)).len(),
            "kluis_drill__".len() + 30
        );
        assert_eq!(
            with_database(
                "mysql://root@localhost/?socket=/run/m.sock",
                "kluis_drill_a_1"
            ),
            "mysql://root@localhost/kluis_drill_a_1?socket=/run/m.sock"
        );
        assert_eq!(
            with_database("postgres://kluis@scratch:5433", "d"),
            "postgres://kluis@scratch:5433/d"
        );
    }

    #[test]
    fn assertions_are_true_only_when_they_say_so() {
        for v in ["t", "true", "1", " TRUE\n"] {
            assert!(truthy(v), "{v}");
        }
        for v in ["f", "false", "0", "", "NULL", "yes"] {
            assert!(!truthy(v), "{v}");
        }
        let t: Timestamp = "2026-11-25T02:30:00.5Z".parse().unwrap();
        assert_eq!(
            time_literal(DrillKind::Mysql, t),
            "'2026-11-25 02:30:00.500000'"
        );
        assert_eq!(
            time_literal(DrillKind::Postgres, t),
            "'2026-11-25T02:30:00.500000Z'::timestamptz"
        );
    }
}
