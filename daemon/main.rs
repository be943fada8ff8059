//! `kluisd`: runs the configured backup jobs, each repository's maintenance (forget, then
//! prune) and the copy rules on their schedules.
//!
//! ```text
//! kluisd                         # the embedded default (config/kluis.toml)
//! kluisd --config /etc/kluis/kluisd.toml
//! kluisd --config FILE --once    # every job once, now, then copies, drills, maintenance; exit 0 if all succeeded
//! ```
//!
//! Scheduling: each job's next run comes from its schedule in the configured time zone, plus a
//! random jitter. A job runs once at a time: a run that comes due while the previous one still
//! runs is skipped and logged. At most `max_concurrent_jobs` run at once; the others wait for
//! a turn. A job whose last snapshot (read from its repository, so it survives restarts) is
//! older than its last due run, by at most `catch_up`, runs at start-up; so does a job that
//! never succeeded. A run past its `timeout` is cancelled: nothing partial is committed.
//!
//! SIGTERM or SIGINT: no new runs; running ones get `shutdown_grace`, then are cancelled. Exit
//! code 0 when nothing was cut short, 1 when a run was cancelled, 2 when the configuration
//! does not load or its address cannot be listened on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

mod systemd;

use kluis::config::{Job, Loaded};
use kluis::jobs;
use kluis::metrics::{self, Metrics};
use kluis::progress::{Cancel, Progress};
use kluis::status::{Board, RepositoryStatus};

/// A verification's outcome: metrics, and each problem in the log.
fn record_integrity(
    metrics: &Metrics,
    repository: &str,
    verification: &kluis::ledger::Verification,
) {
    metrics.record_integrity(repository, verification);
    for f in verification.problems() {
        log(format!("repository {repository}: integrity: {f}"));
    }
}

fn log(msg: impl std::fmt::Display) {
    eprintln!(
        "{} kluisd: {msg}",
        Timestamp::now()
            .round(jiff::Unit::Millisecond)
            .unwrap_or(Timestamp::now())
    );
}

struct Args {
    config: Option<PathBuf>,
    once: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        once: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => {
                args.config = Some(it.next().ok_or("--config needs a file")?.into());
            }
            "--once" => args.once = true,
            "--version" | "-V" => {
                println!("kluisd {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!(
                    "kluisd: runs kluis backup jobs on their schedules\n\n\
                     usage: kluisd [--config FILE] [--once]\n\n\
                     --config FILE  the configuration (default: the embedded config/kluis.toml)\n\
                     --once         every job once, now, then copies, drills, maintenance;\n               exit 0 if all succeeded"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    kluis::private_files();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kluisd: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(p) => Loaded::from_file(p),
        None => Loaded::embedded(),
    };
    let config = match config {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("kluisd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kluisd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        if let Err(e) = std::fs::create_dir_all(&config.state_dir) {
            log(format!(
                "cannot create the state directory {}: {e}",
                config.state_dir.display()
            ));
            return 1;
        }
        log(format!(
            "configuration {}: {} job(s), state in {}, time zone {}",
            config.origin,
            config.jobs.len(),
            config.state_dir.display(),
            config.time_zone.iana_name().unwrap_or("(system)")
        ));
        let metrics = Arc::new(Metrics::new());
        if args.once {
            return run_once(config, metrics).await;
        }
        let listener = match tokio::net::TcpListener::bind(&config.http.listen).await {
            Ok(l) => l,
            Err(e) => {
                log(format!(
                    "cannot listen on {} for /metrics: {e}",
                    config.http.listen
                ));
                return 2;
            }
        };
        log(format!(
            "serving /metrics and /healthz on http://{}",
            listener
                .local_addr()
                .map_or(config.http.listen.clone(), |a| a.to_string())
        ));
        let board = Arc::new(Board::default());
        let server = tokio::spawn(metrics::serve(listener, metrics.clone(), board.clone()));
        let code = Daemon::new(config, args.config.clone(), metrics, board)
            .run()
            .await;
        server.abort();
        code
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

/// `--once`: every job now, as many at once as allowed; then every copy rule, every drill,
/// and every repository's scheduled maintenance, one after the other.
async fn run_once(config: Arc<Loaded>, metrics: Arc<Metrics>) -> u8 {
    let permits = Arc::new(Semaphore::new(config.daemon.max_concurrent_jobs));
    let mut set = JoinSet::new();
    for job in config.jobs.clone() {
        let (config, permits, metrics) = (config.clone(), permits.clone(), metrics.clone());
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            run_job(&config, &job, Cancel::new(), &metrics, &Board::default()).await
        });
    }
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        if !matches!(r, Ok(Outcome::Ok)) {
            failed += 1;
        }
    }
    // Then the copies (of what the jobs just made), the drills, and the maintenance.
    for rule in &config.copies {
        if run_copy(&config, rule, Cancel::new(), &metrics).await != Outcome::Ok {
            failed += 1;
        }
    }
    for line in kluis::drill::clean_leftovers(&config).await {
        log(line);
    }
    for drill in &config.drills {
        if run_drill(&config, drill, Cancel::new(), &metrics, &Board::default()).await
            != Outcome::Ok
        {
            failed += 1;
        }
    }
    for task in &config.prunes {
        if run_maintenance(&config, task, Cancel::new(), &metrics).await != Outcome::Ok {
            failed += 1;
        }
    }
    u8::from(failed > 0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    TimedOut,
    /// Nothing to do yet (a drill before its job's first snapshot): try again soon.
    NotYet,
}

/// One run of a restore drill, with its timeout; logs each check and records the result.
async fn run_drill(
    config: &Loaded,
    drill: &kluis::config::Drill,
    cancel: Cancel,
    metrics: &Metrics,
    board: &Board,
) -> Outcome {
    let name = &drill.name;
    let (job, repository) = (drill.job.name.as_str(), drill.repository.as_str());
    log(format!(
        "drill {name}: starting (job {job}, repository {repository})"
    ));
    let opts = kluis::drill::DrillOptions {
        snapshot: None,
        cancel: cancel.clone(),
    };
    let run = kluis::drill::run(config, drill, &opts);
    tokio::pin!(run);
    let (result, timed_out) = match tokio::time::timeout(drill.timeout, &mut run).await {
        Ok(r) => (r, false),
        Err(_) => {
            cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(60), run).await;
            (Err(kluis::Error::Interrupted), true)
        }
    };
    match result {
        Ok(reports) => {
            for r in &reports {
                for c in &r.checks {
                    log(format!(
                        "drill {name}: snapshot {}: {} {}: {}",
                        r.snapshot.short(),
                        if c.ok { "ok" } else { "FAILED" },
                        c.name,
                        c.detail
                    ));
                }
                for w in &r.warnings {
                    log(format!("drill {name}: warning: {w}"));
                }
                log(format!(
                    "drill {name}: snapshot {} ({}) {} in {:.1} s of restore into {}{}",
                    r.snapshot.short(),
                    r.pick,
                    if r.passed {
                        "passed".to_string()
                    } else {
                        format!("FAILED ({})", r.reason.as_deref().unwrap_or("other"))
                    },
                    r.restore_seconds,
                    r.target,
                    if r.cleaned_up {
                        ", removed"
                    } else {
                        ", which could NOT be removed"
                    }
                ));
            }
            metrics.record_drill(job, repository, Ok(&reports));
            board.drill(name, |d| {
                for r in &reports {
                    d.record(r);
                }
            });
            if reports.iter().all(|r| r.passed) {
                Outcome::Ok
            } else {
                Outcome::Failed
            }
        }
        Err(e @ (kluis::Error::SnapshotNotFound(_) | kluis::Error::RepositoryNotFound { .. })) => {
            // Nothing to drill yet: not a failed drill. A job's first backup is due soon, so
            // a drill of the job's own repository tries again in a minute; one of a copy
            // waits for its next scheduled time.
            let again = if repository == drill.job.repository {
                "trying again in a minute"
            } else {
                "trying again at its next scheduled time"
            };
            log(format!("drill {name}: nothing to drill yet ({e}); {again}"));
            Outcome::NotYet
        }
        Err(e) => {
            let reason = if timed_out {
                log(format!(
                    "drill {name}: cancelled after its timeout of {}",
                    humantime::format_duration(drill.timeout)
                ));
                "timeout"
            } else {
                log(format!("drill {name}: could not run: {e}"));
                metrics::failure_reason(&e)
            };
            metrics.record_drill(job, repository, Err(reason));
            board.drill(name, |d| {
                d.last_run = Some(Timestamp::now());
                d.last_result = Some(format!("could not run ({reason}): {e}"));
            });
            Outcome::Failed
        }
    }
}

/// One run of a job, with its timeout; logs the result and records it in the metrics.
async fn run_job(
    config: &Loaded,
    job: &Job,
    cancel: Cancel,
    metrics: &Metrics,
    board: &Board,
) -> Outcome {
    let started = Instant::now();
    log(format!("job {}: backup starting", job.name));
    let running = metrics.job_running.with_label_values(&[&job.name]);
    running.set(1);
    board.job(&job.name, |j| j.running = Some(true));
    let (outcome, result) = run_job_inner(config, job, cancel, metrics, started).await;
    running.set(0);
    board.job(&job.name, |j| {
        j.running = Some(false);
        j.last_run = Some(Timestamp::now());
        match &result {
            Ok(snapshot) => {
                j.last_result = Some("success".into());
                j.last_success = Some(snapshot.time);
                j.last_snapshot = Some(snapshot.id.to_hex());
            }
            Err(why) => j.last_result = Some(format!("failure: {why}")),
        }
    });
    outcome
}

async fn run_job_inner(
    config: &Loaded,
    job: &Job,
    cancel: Cancel,
    metrics: &Metrics,
    started: Instant,
) -> (Outcome, Result<kluis::snapshot::Snapshot, String>) {
    let run = jobs::run(config, job, cancel.clone(), Progress::new());
    let result = {
        tokio::pin!(run);
        match tokio::time::timeout(job.timeout, &mut run).await {
            Ok(r) => r,
            Err(_) => {
                cancel.cancel();
                // It stops at its next step; one stuck in storage is abandoned after a minute.
                if tokio::time::timeout(Duration::from_secs(60), run)
                    .await
                    .is_err()
                {
                    log(format!(
                        "job {}: did not stop within a minute of its cancellation; abandoned",
                        job.name
                    ));
                }
                log(format!(
                    "job {}: cancelled after its timeout of {}; nothing was committed",
                    job.name,
                    humantime::format_duration(job.timeout)
                ));
                metrics.record_failure(&job.name, "timeout", started.elapsed().as_secs_f64());
                return (
                    Outcome::TimedOut,
                    Err(format!(
                        "timeout: cancelled after {}",
                        humantime::format_duration(job.timeout)
                    )),
                );
            }
        }
    };
    match result {
        Ok(report) => {
            let s = &report.snapshot;
            for w in report.warnings.iter().chain(&s.summary.errors) {
                log(format!("job {}: warning: {w}", job.name));
            }
            log(format!(
                "job {}: snapshot {} saved: {} bytes read, {} new, {} stored, in {:.1} s",
                job.name,
                s.id.short(),
                s.summary.logical_bytes,
                s.summary.new_bytes,
                s.summary.stored_bytes,
                started.elapsed().as_secs_f64()
            ));
            metrics.record_success(
                &job.name,
                &job.repository,
                s,
                started.elapsed().as_secs_f64(),
            );
            match jobs::survey(config, &job.repository).await {
                Ok((list, verification)) => {
                    metrics.record_repository(&job.repository, &list);
                    record_integrity(metrics, &job.repository, &verification);
                }
                Err(_) => metrics
                    .repository_up
                    .with_label_values(&[&job.repository])
                    .set(0),
            }
            (Outcome::Ok, Ok(report.snapshot))
        }
        Err(e) => {
            log(format!("job {}: backup failed: {e}", job.name));
            let reason = metrics::failure_reason(&e);
            metrics.record_failure(&job.name, reason, started.elapsed().as_secs_f64());
            if reason == "storage" {
                metrics
                    .repository_up
                    .with_label_values(&[&job.repository])
                    .set(0);
            }
            (Outcome::Failed, Err(format!("{reason}: {e}")))
        }
    }
}

/// One maintenance run of a repository (forget by its retention, then prune), with its
/// timeout; logs the result and records it in the metrics.
async fn run_maintenance(
    config: &Loaded,
    task: &kluis::config::Maintenance,
    cancel: Cancel,
    metrics: &Metrics,
) -> Outcome {
    let started = Instant::now();
    let name = &task.repository;
    log(format!("repository {name}: maintenance starting"));
    let run = jobs::maintain(config, name, cancel.clone());
    tokio::pin!(run);
    let result = match tokio::time::timeout(task.timeout, &mut run).await {
        Ok(r) => r,
        Err(_) => {
            cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(60), run).await;
            Err(kluis::Error::Interrupted)
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok((removed, report)) => {
            log(format!(
                "repository {name}: forgot {removed} snapshot(s); prune deleted {} pack(s) ({} bytes), marked {} pack(s) ({} bytes), in {seconds:.1} s",
                report.packs_deleted,
                report.bytes_reclaimed,
                report.packs_marked,
                report.bytes_marked
            ));
            for w in &report.warnings {
                log(format!("repository {name}: prune warning: {w}"));
            }
            metrics.record_prune(name, Ok((removed, &report)), seconds);
            Outcome::Ok
        }
        Err(e) => {
            log(format!("repository {name}: maintenance failed: {e}"));
            metrics.record_prune(name, Err(()), seconds);
            Outcome::Failed
        }
    }
}

/// One run of a copy rule, with its timeout; logs the result and records it in the metrics.
async fn run_copy(
    config: &Loaded,
    rule: &kluis::config::CopyRule,
    cancel: Cancel,
    metrics: &Metrics,
) -> Outcome {
    let started = Instant::now();
    let name = &rule.name;
    log(format!(
        "copy {name}: starting ({} -> {})",
        rule.from, rule.to
    ));
    let run = jobs::copy(config, rule, cancel.clone(), Progress::new());
    tokio::pin!(run);
    let (result, timed_out) = match tokio::time::timeout(rule.timeout, &mut run).await {
        Ok(r) => (r, false),
        Err(_) => {
            cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(60), run).await;
            (Err(kluis::Error::Interrupted), true)
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(report) => {
            for c in &report.copied {
                log(format!(
                    "copy {name}: snapshot {} ({} of {}) copied to {} as {}: {} bytes read, {} uploaded",
                    &c.source[..8],
                    c.name,
                    c.host,
                    rule.to,
                    &c.snapshot[..8],
                    c.logical_bytes,
                    c.stored_bytes
                ));
            }
            for w in &report.warnings {
                log(format!("copy {name}: warning: {w}"));
            }
            log(format!(
                "copy {name}: {} snapshot(s) copied, {} already there, in {seconds:.1} s",
                report.copied.len(),
                report.already_copied.len()
            ));
            metrics.record_copy(name, Ok(&report), seconds);
            if let Ok((list, verification)) = jobs::survey(config, &rule.to).await {
                metrics.record_repository(&rule.to, &list);
                record_integrity(metrics, &rule.to, &verification);
            }
            Outcome::Ok
        }
        Err(e) => {
            let reason = if timed_out {
                log(format!(
                    "copy {name}: cancelled after its timeout of {}; nothing partial was committed",
                    humantime::format_duration(rule.timeout)
                ));
                "timeout"
            } else {
                log(format!("copy {name}: failed: {e}"));
                metrics::failure_reason(&e)
            };
            metrics.record_copy(name, Err(reason), seconds);
            if timed_out {
                Outcome::TimedOut
            } else {
                Outcome::Failed
            }
        }
    }
}

/// A job's place in the schedule.
struct Slot {
    job: Job,
    next: Timestamp,
}

/// A run in progress: which job, and how to cancel it. Kept apart from the schedule, so a
/// reload that drops or re-adds a job neither loses a run nor starts a second one beside it.
struct Run {
    /// The job's, repository's or copy rule's name.
    job: String,
    cancel: Cancel,
    kind: RunKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    Backup,
    /// A repository's maintenance (forget, then prune).
    Maintenance,
    Copy,
    Drill,
}

/// A repository's maintenance in the schedule.
struct MaintenanceSlot {
    task: kluis::config::Maintenance,
    next: Timestamp,
}

/// A copy rule in the schedule.
struct CopySlot {
    rule: kluis::config::CopyRule,
    next: Timestamp,
}

/// A restore drill in the schedule.
struct DrillSlot {
    drill: kluis::config::Drill,
    next: Timestamp,
}

struct Daemon {
    config: Arc<Loaded>,
    /// The file the configuration came from (none: the embedded default), for reloads.
    config_path: Option<PathBuf>,
    slots: BTreeMap<String, Slot>,
    /// Maintenance by repository name.
    maintenance: BTreeMap<String, MaintenanceSlot>,
    /// Copy rules by name.
    copies: BTreeMap<String, CopySlot>,
    /// Restore drills by name.
    drills: BTreeMap<String, DrillSlot>,
    /// Runs in progress, by their task's id.
    runs: BTreeMap<tokio::task::Id, Run>,
    tasks: JoinSet<Outcome>,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    board: Arc<Board>,
    notifier: systemd::Notifier,
}

impl Daemon {
    fn new(
        config: Arc<Loaded>,
        config_path: Option<PathBuf>,
        metrics: Arc<Metrics>,
        board: Arc<Board>,
    ) -> Daemon {
        let permits = Arc::new(Semaphore::new(config.daemon.max_concurrent_jobs));
        Daemon {
            config,
            config_path,
            slots: BTreeMap::new(),
            maintenance: BTreeMap::new(),
            copies: BTreeMap::new(),
            drills: BTreeMap::new(),
            runs: BTreeMap::new(),
            tasks: JoinSet::new(),
            permits,
            metrics,
            board,
            notifier: systemd::Notifier::from_env(),
        }
    }

    /// A STATUS line for `systemctl status`: what runs, and what is next.
    fn status(&self) {
        let running: Vec<&str> = self.runs.values().map(|r| r.job.as_str()).collect();
        let next = self.slots.values().min_by_key(|s| s.next).map(|s| {
            format!(
                "next: {} at {}",
                s.job.name,
                s.next
                    .to_zoned_datetime(self.config.time_zone.clone())
                    .strftime("%F %T %Z")
            )
        });
        let now = if running.is_empty() {
            "idle".to_string()
        } else {
            format!("running {}", running.join(", "))
        };
        self.notifier.send(&format!(
            "STATUS={now}; {}",
            next.unwrap_or_else(|| "no jobs".into())
        ));
    }

    /// SIGHUP: reads the configuration file again. A file that does not check leaves the
    /// daemon on the configuration it had; running jobs finish under the one they started with.
    async fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            log("SIGHUP: running on the embedded configuration; there is no file to reload");
            return;
        };
        self.notifier.send("RELOADING=1");
        match Loaded::from_file(&path) {
            Err(e) => {
                log(format!(
                    "reload failed, still running the previous configuration: {e}"
                ));
                self.metrics.config_reload_failures.inc();
                self.metrics.config_last_reload_ok.set(0);
            }
            Ok(new) => {
                if new.http.listen != self.config.http.listen {
                    log("http.listen changed: it takes effect at the next start");
                }
                if new.daemon.max_concurrent_jobs != self.config.daemon.max_concurrent_jobs {
                    self.permits = Arc::new(Semaphore::new(new.daemon.max_concurrent_jobs));
                }
                let names: Vec<String> = new.jobs.iter().map(|j| j.name.clone()).collect();
                self.board.retain_jobs(&names);
                let drills: Vec<String> = new.drills.iter().map(|d| d.name.clone()).collect();
                self.board.retain_drills(&drills);
                self.config = Arc::new(new);
                self.slots.clear();
                self.plan().await;
                log(format!(
                    "configuration reloaded from {}: {} job(s)",
                    path.display(),
                    self.config.jobs.len()
                ));
                self.metrics.config_last_reload_ok.set(1);
                self.metrics
                    .config_last_reload
                    .set(Timestamp::now().as_millisecond() as f64 / 1000.0);
            }
        }
        self.notifier.send("READY=1");
        self.status();
    }

    fn set_next(&mut self, name: &str, next: Timestamp) {
        if let Some(slot) = self.slots.get_mut(name) {
            slot.next = next;
        }
        self.metrics
            .job_next_run
            .with_label_values(&[name])
            .set(next.as_millisecond() as f64 / 1000.0);
        self.board.job(name, |j| j.next_run = Some(next));
    }

    /// The run after `after`, with jitter.
    fn next_run(&self, job: &Job, after: Timestamp) -> Timestamp {
        let next = job
            .schedule
            .next_after(after, &self.config.time_zone)
            .unwrap_or_else(|| after + jiff::SignedDuration::from_hours(24 * 365));
        next + jiff::SignedDuration::from_nanos(jitter_nanos(job.jitter))
    }

    /// When each job runs first: now if its last due run was missed within the catch-up
    /// window, or if it never succeeded; else at its next scheduled time.
    async fn plan(&mut self) {
        let now = Timestamp::now();
        let mut listed: BTreeMap<String, Option<Vec<kluis::snapshot::Snapshot>>> = BTreeMap::new();
        for name in self.config.repositories.keys() {
            let location = kluis::source::postgres::redact(&self.config.repositories[name].url);
            let list = match jobs::survey(&self.config, name).await {
                Ok((list, verification)) => {
                    self.metrics.record_repository(name, &list);
                    record_integrity(&self.metrics, name, &verification);
                    self.board.repository(RepositoryStatus {
                        name: name.clone(),
                        location,
                        snapshots: Some(list.len()),
                        error: None,
                    });
                    Some(list)
                }
                Err(e) => {
                    log(format!("repository {name}: cannot be read ({e})"));
                    self.metrics.repository_up.with_label_values(&[name]).set(0);
                    self.board.repository(RepositoryStatus {
                        name: name.clone(),
                        location,
                        snapshots: None,
                        error: Some(e.to_string()),
                    });
                    None
                }
            };
            listed.insert(name.clone(), list);
            // (After the listing, which creates a repository configured with `init`.) Where each
            // repository's data lands, so an operator sees the foreign copy
            // really goes to another region.
            match kluis::store::Store::open(&self.config.repositories[name].url, false) {
                Ok(store) => {
                    let p = store.placement();
                    log(format!(
                        "repository {name}: {} store {}{}",
                        p.kind,
                        p.endpoint,
                        if p.region.is_empty() {
                            String::new()
                        } else {
                            format!(", region {}", p.region)
                        }
                    ));
                    self.metrics.record_placement(name, p);
                }
                Err(kluis::Error::RepositoryNotFound { location }) => log(format!(
                    "repository {name}: file store {location}, not created yet"
                )),
                Err(e) => log(format!("repository {name}: {e}")),
            }
        }
        let window = jiff::SignedDuration::try_from(self.config.daemon.catch_up)
            .unwrap_or(jiff::SignedDuration::ZERO);
        for job in self.config.jobs.clone() {
            self.metrics.declare_job(&job.name);
            let last = listed
                .get(&job.repository)
                .and_then(|l| l.as_deref())
                .and_then(|l| jobs::last_of(&job, l));
            if let Some(s) = last {
                self.metrics
                    .job_last_success
                    .with_label_values(&[&job.name])
                    .set(s.time.as_millisecond() as f64 / 1000.0);
            }
            self.board.job(&job.name, |j| {
                j.repository = job.repository.clone();
                j.schedule = job.schedule.to_string();
                if let Some(s) = last {
                    j.last_success = Some(s.time);
                    j.last_snapshot = Some(s.id.to_hex());
                }
            });
            let next = match last {
                None => now,
                // A run was due after the last snapshot and within the window: make it up.
                Some(s) => match job.schedule.next_after(
                    s.time
                        .max(now.checked_sub(window).unwrap_or(Timestamp::MIN)),
                    &self.config.time_zone,
                ) {
                    Some(due) if due <= now => now,
                    _ => self.next_run(&job, now),
                },
            };
            log(format!(
                "job {}: {}, next run {}",
                job.name,
                job.schedule,
                next.to_zoned_datetime(self.config.time_zone.clone())
                    .strftime("%F %T %Z")
            ));
            let name = job.name.clone();
            self.slots.insert(name.clone(), Slot { job, next });
            self.set_next(&name, next);
        }
        self.maintenance.clear();
        for task in self.config.prunes.clone() {
            self.metrics.declare_prune(&task.repository);
            // Maintenance is not made up at start-up: it runs at its next time.
            let next = task
                .schedule
                .next_after(now, &self.config.time_zone)
                .unwrap_or(Timestamp::MAX);
            log(format!(
                "repository {}: maintenance (forget, then prune) {}, next run {}",
                task.repository,
                task.schedule,
                next.to_zoned_datetime(self.config.time_zone.clone())
                    .strftime("%F %T %Z")
            ));
            self.maintenance
                .insert(task.repository.clone(), MaintenanceSlot { task, next });
        }
        self.copies.clear();
        for rule in self.config.copies.clone() {
            self.metrics.declare_copy(&rule);
            // The newest copy in the destination is the rule's last success, across restarts.
            let newest = listed
                .get(&rule.to)
                .and_then(|l| l.as_deref())
                .into_iter()
                .flatten()
                .filter(|s| {
                    s.origin.is_some() && (rule.names.is_empty() || rule.names.contains(&s.name))
                })
                .map(|s| s.finished)
                .max();
            if let Some(t) = newest {
                self.metrics
                    .copy_last_success
                    .with_label_values(&[&rule.name])
                    .set(t.as_millisecond() as f64 / 1000.0);
            }
            // A copy due within the catch-up window runs now: a monthly copy missed while the
            // daemon was down would otherwise wait a month. Running it again is harmless: it
            // skips what the destination holds.
            let missed = rule
                .schedule
                .next_after(
                    now.checked_sub(window).unwrap_or(Timestamp::MIN),
                    &self.config.time_zone,
                )
                .is_some_and(|due| due <= now);
            let next = if missed {
                now
            } else {
                rule.schedule
                    .next_after(now, &self.config.time_zone)
                    .unwrap_or(Timestamp::MAX)
            };
            log(format!(
                "copy {}: {} -> {}, {}, next run {}",
                rule.name,
                rule.from,
                rule.to,
                rule.schedule,
                next.to_zoned_datetime(self.config.time_zone.clone())
                    .strftime("%F %T %Z")
            ));
            self.copies
                .insert(rule.name.clone(), CopySlot { rule, next });
        }
        self.drills.clear();
        for drill in self.config.drills.clone() {
            // The drill history lives in the repository: the last success survives restarts.
            let history = match jobs::open_existing(&self.config, &drill.repository).await {
                Ok(repo) => kluis::drill::history(&repo)
                    .await
                    .map(|(h, _)| h)
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            self.metrics
                .declare_drill(&drill.job.name, &drill.repository, &history);
            let status = kluis::status::DrillStatus::from_history(&drill, &history, None);
            let last = history
                .iter()
                .filter(|r| r.drill == drill.name)
                .map(|r| r.finished)
                .max();
            // Never drilled: now (after the jobs started with it, so a new setup sees a
            // restore proven within minutes); a run missed within the catch-up window: now.
            let next = match last {
                None => now,
                Some(t) => match drill.schedule.next_after(
                    t.max(now.checked_sub(window).unwrap_or(Timestamp::MIN)),
                    &self.config.time_zone,
                ) {
                    Some(due) if due <= now => now,
                    _ => drill
                        .schedule
                        .next_after(now, &self.config.time_zone)
                        .unwrap_or(Timestamp::MAX),
                },
            };
            log(format!(
                "drill {}: job {} from repository {}, {}, next run {}",
                drill.name,
                drill.job.name,
                drill.repository,
                drill.schedule,
                next.to_zoned_datetime(self.config.time_zone.clone())
                    .strftime("%F %T %Z")
            ));
            self.board.drill(&drill.name, |d| {
                *d = status;
                d.next_run = Some(next);
            });
            self.drills
                .insert(drill.name.clone(), DrillSlot { drill, next });
        }
    }

    /// The first time `schedule` fires after `after` (never: the end of time).
    fn next_time(&self, schedule: &kluis::schedule::Schedule, after: Timestamp) -> Timestamp {
        schedule
            .next_after(after, &self.config.time_zone)
            .unwrap_or(Timestamp::MAX)
    }

    /// Starts a due drill, unless its previous run still goes.
    fn start_drill(&mut self, name: &str, now: Timestamp) {
        let next = self.next_time(&self.drills[name].drill.schedule, now);
        let slot = self.drills.get_mut(name).expect("planned");
        slot.next = next;
        let drill = slot.drill.clone();
        self.board.drill(name, |d| d.next_run = Some(next));
        let (config, metrics, board) = (
            self.config.clone(),
            self.metrics.clone(),
            self.board.clone(),
        );
        self.spawn_unless_running(
            name,
            RunKind::Drill,
            &format!("drill {name}"),
            move |cancel| async move { run_drill(&config, &drill, cancel, &metrics, &board).await },
        );
    }

    /// Starts a due copy rule, unless its previous run still goes.
    fn start_copy(&mut self, name: &str, now: Timestamp) {
        let next = self.next_time(&self.copies[name].rule.schedule, now);
        let slot = self.copies.get_mut(name).expect("planned");
        slot.next = next;
        let rule = slot.rule.clone();
        let (config, metrics) = (self.config.clone(), self.metrics.clone());
        self.spawn_unless_running(
            name,
            RunKind::Copy,
            &format!("copy {name}"),
            move |cancel| async move { run_copy(&config, &rule, cancel, &metrics).await },
        );
    }

    /// Starts a repository's due maintenance, unless the previous one still runs.
    fn start_maintenance(&mut self, repository: &str, now: Timestamp) {
        let next = self.next_time(&self.maintenance[repository].task.schedule, now);
        let slot = self.maintenance.get_mut(repository).expect("planned");
        slot.next = next;
        let task = slot.task.clone();
        let (config, metrics) = (self.config.clone(), self.metrics.clone());
        let what = format!("repository {repository}: maintenance");
        self.spawn_unless_running(
            repository,
            RunKind::Maintenance,
            &what,
            move |cancel| async move { run_maintenance(&config, &task, cancel, &metrics).await },
        );
    }

    /// Starts a run, unless a run of the same kind and name still goes (then logs that this
    /// one is skipped and returns false).
    fn spawn_unless_running<F>(
        &mut self,
        name: &str,
        kind: RunKind,
        what: &str,
        work: impl FnOnce(Cancel) -> F,
    ) -> bool
    where
        F: std::future::Future<Output = Outcome> + Send + 'static,
    {
        if self.runs.values().any(|r| r.kind == kind && r.job == name) {
            log(format!(
                "{what}: due again while the previous run is still going; this run is skipped"
            ));
            return false;
        }
        self.spawn_run(name, kind, work);
        true
    }

    /// Starts a run once a permit is free; it is recorded in `runs` so shutdown can cancel it.
    fn spawn_run<F>(&mut self, name: &str, kind: RunKind, work: impl FnOnce(Cancel) -> F)
    where
        F: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let cancel = Cancel::new();
        let permits = self.permits.clone();
        let task_cancel = cancel.clone();
        let run = work(cancel.clone());
        let handle = self.tasks.spawn(async move {
            // Closed at shutdown: a run still waiting for its turn then never starts.
            let Ok(_permit) = permits.acquire_owned().await else {
                return Outcome::Failed;
            };
            if task_cancel.is_cancelled() {
                return Outcome::Failed;
            }
            run.await
        });
        self.runs.insert(
            handle.id(),
            Run {
                job: name.to_string(),
                cancel,
                kind,
            },
        );
    }

    async fn run(mut self) -> u8 {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            log("cannot install signal handlers");
            return 1;
        };
        for line in kluis::drill::clean_leftovers(&self.config).await {
            log(line);
        }
        self.plan().await;
        // The configuration file is watched: a change is a reload, as SIGHUP is.
        let (changed_tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
        let _watcher = self
            .config_path
            .as_deref()
            .and_then(|p| watch(p, changed_tx));
        self.notifier.send("READY=1");
        let watchdog_every = systemd::Notifier::watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        loop {
            let now = Timestamp::now();
            let due = due_by(&self.slots, now, |s| s.next);
            let maintenance_due = due_by(&self.maintenance, now, |m| m.next);
            let copies_due = due_by(&self.copies, now, |c| c.next);
            let drills_due = due_by(&self.drills, now, |d| d.next);
            let started = !due.is_empty()
                || !maintenance_due.is_empty()
                || !copies_due.is_empty()
                || !drills_due.is_empty();
            for name in due {
                self.start(&name, now);
            }
            for repository in maintenance_due {
                self.start_maintenance(&repository, now);
            }
            for name in copies_due {
                self.start_copy(&name, now);
            }
            for name in drills_due {
                self.start_drill(&name, now);
            }
            if started {
                self.status();
            }
            let wake = self
                .slots
                .values()
                .map(|s| s.next)
                .chain(self.maintenance.values().map(|m| m.next))
                .chain(self.copies.values().map(|c| c.next))
                .chain(self.drills.values().map(|d| d.next))
                .min()
                .map(|t| t.duration_since(Timestamp::now()))
                .map(|d| Duration::try_from(d).unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wake) => {}
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(done);
                    self.status();
                }
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    self.notifier.send("WATCHDOG=1");
                }
                _ = hup.recv() => self.reload().await,
                Some(()) = changed.recv() => {
                    // Editors write in several steps: let them finish.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    while changed.try_recv().is_ok() {}
                    log("the configuration file changed");
                    self.reload().await;
                }
                _ = term.recv() => return self.shut_down().await,
                _ = int.recv() => return self.shut_down().await,
            }
        }
    }

    /// A run's task ended (or crashed): it no longer runs. Returns whether it succeeded.
    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
    ) -> bool {
        let (id, outcome) = match done {
            Ok((id, outcome)) => (id, outcome),
            Err(e) => (e.id(), Outcome::Failed),
        };
        let ok = matches!(outcome, Outcome::Ok | Outcome::NotYet);
        let run = self.runs.remove(&id);
        if let Some(run) = run.as_ref().filter(|r| r.kind == RunKind::Drill) {
            if outcome == Outcome::NotYet {
                if let Some(slot) = self
                    .drills
                    .get_mut(&run.job)
                    .filter(|s| s.drill.repository == s.drill.job.repository)
                {
                    slot.next = slot
                        .next
                        .min(Timestamp::now() + jiff::SignedDuration::from_secs(60));
                }
            }
        }
        if let Some(run) = run.filter(|r| r.kind == RunKind::Backup) {
            self.metrics
                .job_running
                .with_label_values(&[&run.job])
                .set(0);
            self.board.job(&run.job, |j| j.running = Some(false));
        }
        ok
    }

    /// Starts a due job, unless its previous run is still going.
    fn start(&mut self, name: &str, now: Timestamp) {
        let next = {
            let slot = &self.slots[name];
            self.next_run(&slot.job, now)
        };
        self.set_next(name, next);
        let config = self.config.clone();
        let job = self.slots[name].job.clone();
        let (metrics, board) = (self.metrics.clone(), self.board.clone());
        let started = self.spawn_unless_running(name, RunKind::Backup, &format!("job {name}"), {
            let metrics = metrics.clone();
            move |cancel| async move { run_job(&config, &job, cancel, &metrics, &board).await }
        });
        if !started {
            self.metrics.job_skipped.with_label_values(&[name]).inc();
        }
    }

    async fn shut_down(mut self) -> u8 {
        self.notifier.send("STOPPING=1");
        self.permits.close();
        if self.tasks.is_empty() {
            log("stopping");
            return 0;
        }
        let grace = self.config.daemon.shutdown_grace;
        log(format!(
            "stopping: {} job(s) running, waiting up to {} for them",
            self.tasks.len(),
            humantime::format_duration(grace)
        ));
        let deadline = tokio::time::Instant::now() + grace;
        let mut cut = 0;
        loop {
            tokio::select! {
                done = self.tasks.join_next_with_id() => match done {
                    None => break,
                    Some(done) => {
                        self.finished(done);
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    for run in self.runs.values() {
                        run.cancel.cancel();
                    }
                    // Cancelled runs stop at their next step; one stuck in storage is left
                    // behind after a further grace (the process exit ends it).
                    let hard = tokio::time::Instant::now() + grace.max(Duration::from_secs(10));
                    loop {
                        tokio::select! {
                            done = self.tasks.join_next_with_id() => match done {
                                None => break,
                                Some(done) => {
                                    if !self.finished(done) {
                                        cut += 1;
                                    }
                                }
                            },
                            _ = tokio::time::sleep_until(hard) => {
                                cut += self.tasks.len();
                                log(format!("{} run(s) did not stop after cancelling", self.tasks.len()));
                                break;
                            }
                        }
                    }
                    break;
                }
            }
        }
        if cut > 0 {
            log(format!(
                "stopped: {cut} job(s) cut short; nothing partial was committed"
            ));
            1
        } else {
            log("stopped");
            0
        }
    }
}

/// The names in `slots` whose next run (`next`) is due at `now`.
fn due_by<T>(
    slots: &BTreeMap<String, T>,
    now: Timestamp,
    next: impl Fn(&T) -> Timestamp,
) -> Vec<String> {
    slots
        .iter()
        .filter(|(_, s)| next(s) <= now)
        .map(|(n, _)| n.clone())
        .collect()
}

/// Watches the directory of the configuration file (editors replace files by renaming) and
/// signals changes to that file. `None` if watching is not possible: SIGHUP still works.
fn watch(
    path: &std::path::Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let path = std::path::absolute(path).ok()?;
    let name = path.file_name()?.to_os_string();
    let dir = path.parent()?.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()));
        if ours && (event.kind.is_modify() || event.kind.is_create() || event.kind.is_remove()) {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| {
        log(format!(
            "cannot watch the configuration file ({e}); SIGHUP reloads it"
        ))
    })
    .ok()?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| {
            log(format!(
                "cannot watch {} ({e}); SIGHUP reloads the configuration",
                dir.display()
            ))
        })
        .ok()?;
    Some(watcher)
}

/// A random delay of up to `max`.
fn jitter_nanos(max: Duration) -> i64 {
    if max.is_zero() {
        return 0;
    }
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0;
    }
    let nanos = max.as_nanos().min(i64::MAX as u128) as u64;
    (u64::from_le_bytes(b) % nanos.max(1)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_bound() {
        assert_eq!(jitter_nanos(Duration::ZERO), 0);
        let max = Duration::from_secs(600);
        let draws: Vec<i64> = (0..1000).map(|_| jitter_nanos(max)).collect();
        assert!(
            draws
                .iter()
                .all(|&j| (0..max.as_nanos() as i64).contains(&j))
        );
        // Spread out, not stuck at one value.
        let low = draws
            .iter()
            .filter(|&&j| j < max.as_nanos() as i64 / 2)
            .count();
        assert!((300..700).contains(&low), "{low} of 1000 in the lower half");
    }
}
