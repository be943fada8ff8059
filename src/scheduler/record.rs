//! The daemon's [`Runner`]: each task's work (a backup, a repository's maintenance, a copy, a
//! drill), its outcome logged and recorded in the metrics and the status board; and what the
//! plan needs, read from the repositories, with what was seen of each recorded too.

use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;

use super::{History, Outcome, Runner, TaskKind, Timed, Work, log, with_timeout};
use crate::config::{Job, Loaded};
use crate::error::Error;
use crate::jobs;
use crate::metrics::{self, Metrics};
use crate::progress::{Cancel, Progress};
use crate::status::{Board, RepositoryStatus};

mod maintain;
use maintain::run_maintenance;

/// Runs tasks for real and records them in `metrics` (served on /metrics) and `board` (served
/// on /status).
#[derive(Clone)]
pub struct DaemonRunner {
    pub metrics: Arc<Metrics>,
    pub board: Arc<Board>,
}

impl Runner for DaemonRunner {
    fn run(&self, config: Arc<Loaded>, work: Work, cancel: Cancel) -> BoxFuture<'static, Outcome> {
        let (metrics, board) = (self.metrics.clone(), self.board.clone());
        async move {
            match &work {
                Work::Backup(job) => run_job(&config, job, cancel, &metrics, &board).await,
                Work::Maintenance(task) => run_maintenance(&config, task, cancel, &metrics).await,
                Work::Copy(rule) => run_copy(&config, rule, cancel, &metrics).await,
                Work::Drill(drill) => run_drill(&config, drill, cancel, &metrics, &board).await,
            }
        }
        .boxed()
    }

    fn observe(&self, config: Arc<Loaded>) -> BoxFuture<'static, History> {
        let (metrics, board) = (self.metrics.clone(), self.board.clone());
        async move { observe(&config, &metrics, &board).await }.boxed()
    }

    fn planned(&self, work: &Work, next: Timestamp) {
        match work {
            Work::Backup(job) => {
                self.metrics
                    .job_next_run
                    .with_label_values(&[&job.name])
                    .set(next.as_millisecond() as f64 / 1000.0);
                self.board.job(&job.name, |j| j.next_run = Some(next));
            }
            Work::Drill(drill) => self.board.drill(&drill.name, |d| d.next_run = Some(next)),
            Work::Maintenance(_) | Work::Copy(_) => {}
        }
    }

    fn skipped(&self, work: &Work) {
        if let Work::Backup(job) = work {
            self.metrics
                .job_skipped
                .with_label_values(&[&job.name])
                .inc();
        }
    }

    fn ended(&self, kind: TaskKind, name: &str) {
        if kind == TaskKind::Backup {
            self.metrics.job_running.with_label_values(&[name]).set(0);
            self.board.job(name, |j| j.running = Some(false));
        }
    }

    fn reloaded(&self, result: std::result::Result<&Loaded, &Error>) {
        match result {
            Err(_) => {
                self.metrics.config_reload_failures.inc();
                self.metrics.config_last_reload_ok.set(0);
            }
            Ok(new) => {
                // The reload is an audit record in every repository it names.
                let config = new.clone();
                tokio::spawn(async move {
                    for name in config.repositories.keys() {
                        let Ok(repo) = jobs::open_existing(&config, name).await else {
                            continue;
                        };
                        let ledger = crate::ledger::Ledger::open(&config.state_dir, &repo).ok();
                        let event =
                            crate::audit::Event::new("config-reload", config.origin.to_string())
                                .with("jobs", config.jobs.len())
                                .with("copies", config.copies.len())
                                .with("drills", config.drills.len());
                        if let Some(w) = crate::audit::record(&repo, event, ledger.as_ref()).await {
                            log(format!("repository {name}: {w}"));
                        }
                    }
                });
                let names: Vec<String> = new.jobs.iter().map(|j| j.name.clone()).collect();
                self.board.retain_jobs(&names);
                let drills: Vec<String> = new.drills.iter().map(|d| d.name.clone()).collect();
                self.board.retain_drills(&drills);
                self.metrics.config_last_reload_ok.set(1);
                self.metrics
                    .config_last_reload
                    .set(Timestamp::now().as_millisecond() as f64 / 1000.0);
            }
        }
    }
}

/// Reads each repository (its snapshots, verified against this host's ledger; where its data
/// lands) and each drill's history; records all of it; returns what the plan needs.
async fn observe(config: &Loaded, metrics: &Metrics, board: &Board) -> History {
    let mut history = History::default();
    let mut listed = std::collections::BTreeMap::new();
    for (name, r) in &config.repositories {
        let location = crate::source::postgres::redact(&r.url);
        match jobs::survey(config, name).await {
            Ok((list, verification, trail)) => {
                metrics.record_repository(name, &list);
                record_integrity(metrics, name, &verification, &trail);
                board.repository(RepositoryStatus {
                    name: name.clone(),
                    location,
                    snapshots: Some(list.len()),
                    error: None,
                });
                listed.insert(name.clone(), list);
            }
            Err(e) => {
                log(format!("repository {name}: cannot be read ({e})"));
                metrics.repository_up.with_label_values(&[name]).set(0);
                board.repository(RepositoryStatus {
                    name: name.clone(),
                    location,
                    snapshots: None,
                    error: Some(e.to_string()),
                });
            }
        }
        // (After the listing, which creates a repository configured with `init`.) Where each
        // repository's data lands, so an operator sees the foreign copy really goes to another
        // region.
        match crate::store::Store::open(&r.url, false) {
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
                metrics.record_placement(name, p);
            }
            Err(Error::RepositoryNotFound { location }) => log(format!(
                "repository {name}: file store {location}, not created yet"
            )),
            Err(e) => log(format!("repository {name}: {e}")),
        }
    }
    for job in &config.jobs {
        metrics.declare_job(&job.name);
        let list = listed.get(&job.repository).map_or(&[][..], |l| &l[..]);
        history.saw_job(job, list);
        let last = jobs::last_of(job, list);
        if let Some(s) = last {
            metrics
                .job_last_success
                .with_label_values(&[&job.name])
                .set(s.time.as_millisecond() as f64 / 1000.0);
        }
        board.job(&job.name, |j| {
            j.repository = job.repository.clone();
            j.schedule = job.schedule.to_string();
            if let Some(s) = last {
                j.last_success = Some(s.time);
                j.last_snapshot = Some(s.id.to_hex());
            }
        });
    }
    for task in &config.prunes {
        metrics.declare_prune(&task.repository);
        if config
            .repositories
            .get(&task.repository)
            .is_some_and(|r| r.erase_after.is_some())
        {
            metrics.declare_erase(&task.repository);
        }
    }
    for rule in &config.copies {
        metrics.declare_copy(rule);
        // The newest copy in the destination is the rule's last success, across restarts.
        let newest = listed
            .get(&rule.to)
            .into_iter()
            .flatten()
            .filter(|s| {
                s.origin.is_some() && (rule.names.is_empty() || rule.names.contains(&s.name))
            })
            .map(|s| s.finished)
            .max();
        if let Some(t) = newest {
            metrics
                .copy_last_success
                .with_label_values(&[&rule.name])
                .set(t.as_millisecond() as f64 / 1000.0);
        }
    }
    for drill in &config.drills {
        // The drill history lives in the repository: the last success survives restarts.
        let reports = crate::drill::reports_in(config, &drill.repository).await;
        metrics.declare_drill(&drill.job.name, &drill.repository, &reports);
        history.saw_drill(drill, &reports);
        let status = crate::status::DrillStatus::from_history(drill, &reports, None);
        board.drill(&drill.name, |d| *d = status);
    }
    history
}

/// A verification's outcome: metrics, and each problem in the log.
fn record_integrity(
    metrics: &Metrics,
    repository: &str,
    verification: &crate::ledger::Verification,
    trail: &crate::audit::Trail,
) {
    metrics.record_integrity(repository, verification);
    metrics.record_audit(repository, trail);
    for f in verification.problems() {
        log(format!("repository {repository}: integrity: {f}"));
    }
    for p in &trail.problems {
        log(format!("repository {repository}: audit trail: {p}"));
    }
}

/// One run of a restore drill, with its timeout; logs each check and records the result.
async fn run_drill(
    config: &Loaded,
    drill: &crate::config::Drill,
    cancel: Cancel,
    metrics: &Metrics,
    board: &Board,
) -> Outcome {
    let name = &drill.name;
    let (job, repository) = (drill.job.name.as_str(), drill.repository.as_str());
    log(format!(
        "drill {name}: starting (job {job}, repository {repository})"
    ));
    let opts = crate::drill::DrillOptions {
        snapshot: None,
        cancel: cancel.clone(),
    };
    let run = crate::drill::run(config, drill, &opts);
    let (result, timed_out) = match with_timeout(run, drill.timeout, &cancel).await {
        Timed::Done(r) => (r, false),
        Timed::TimedOut { .. } => (Err(Error::Interrupted), true),
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
        Err(e @ (Error::SnapshotNotFound(_) | Error::RepositoryNotFound { .. })) => {
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
) -> (Outcome, Result<crate::snapshot::Snapshot, String>) {
    let mut opts = crate::backup::BackupOptions::new(&job.name);
    opts.cancel = cancel.clone();
    let run = jobs::run(config, job, opts);
    let result = {
        match with_timeout(run, job.timeout, &cancel).await {
            Timed::Done(r) => r,
            Timed::TimedOut { stopped } => {
                if !stopped {
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
            let elapsed = started.elapsed().as_secs_f64();
            for r in &report.committed {
                let s = &r.snapshot;
                for w in r.warnings.iter().chain(&s.summary.errors) {
                    log(format!("job {}: warning: {w}", job.name));
                }
                let of = if job.makes_sets() {
                    format!(" of {}", s.name)
                } else {
                    String::new()
                };
                log(format!(
                    "job {}: snapshot {}{of} saved: {} bytes read, {} new, {} stored, in {:.1} s",
                    job.name,
                    s.id.short(),
                    s.summary.logical_bytes,
                    s.summary.new_bytes,
                    s.summary.stored_bytes,
                    elapsed
                ));
            }
            for (name, e) in &report.failed {
                log(format!("job {}: {name}: backup failed: {e}", job.name));
            }
            match jobs::survey(config, &job.repository).await {
                Ok((list, verification, trail)) => {
                    metrics.record_repository(&job.repository, &list);
                    record_integrity(metrics, &job.repository, &verification, &trail);
                }
                Err(_) => metrics
                    .repository_up
                    .with_label_values(&[&job.repository])
                    .set(0),
            }
            if let Some(e) = report.first_failure() {
                let reason = metrics::failure_reason(e);
                metrics.record_failure(&job.name, reason, elapsed);
                let failed: Vec<&str> = report.failed.iter().map(|(n, _)| n.as_str()).collect();
                log(format!(
                    "job {}: the set is incomplete: {} of {} snapshot(s) failed ({}); the {} \
                     committed are kept",
                    job.name,
                    failed.len(),
                    failed.len() + report.committed.len(),
                    failed.join(", "),
                    report.committed.len()
                ));
                return (
                    Outcome::Failed,
                    Err(format!("{reason}: {} failed: {e}", failed.join(", "))),
                );
            }
            let snapshots: Vec<_> = report.committed.into_iter().map(|r| r.snapshot).collect();
            metrics.record_success(&job.name, &job.repository, &snapshots, elapsed);
            let first = snapshots.into_iter().next();
            match first {
                Some(s) => (Outcome::Ok, Ok(s)),
                None => (Outcome::Failed, Err("nothing was backed up".into())),
            }
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

/// One run of a copy rule, with its timeout; logs the result and records it in the metrics.
async fn run_copy(
    config: &Loaded,
    rule: &crate::config::CopyRule,
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
    let (result, timed_out) = match with_timeout(run, rule.timeout, &cancel).await {
        Timed::Done(r) => (r, false),
        Timed::TimedOut { .. } => (Err(Error::Interrupted), true),
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
            if let Ok((list, verification, trail)) = jobs::survey(config, &rule.to).await {
                metrics.record_repository(&rule.to, &list);
                record_integrity(metrics, &rule.to, &verification, &trail);
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
