//! The scheduler's loop: tasks start when due (unless their previous run still goes), wait for
//! a turn within `max_concurrent_jobs`, end; the configuration is reloaded on request; at the
//! stop, running tasks get `shutdown_grace` before they are cancelled.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::plan::{self, jitter_nanos};
use super::{Clock, Outcome, Runner, TaskKind, Work, log};
use crate::config::Loaded;
use crate::progress::Cancel;

/// What the daemon's signals and its systemd watchdog ask of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Read the configuration file again (SIGHUP, or the file changed): `why`, for the log.
    Reload { why: String },
    /// Ping systemd's watchdog (from the loop itself, so a stuck loop is noticed).
    Watchdog,
    /// SIGTERM or SIGINT: no new runs; running ones get the grace, then are cancelled.
    Stop,
}

/// A task and its next run.
struct Task {
    work: Work,
    next: Timestamp,
}

/// A run in progress: which task, and how to cancel it. Kept apart from the schedule, so a
/// reload that drops or re-adds a task neither loses a run nor starts a second one beside it.
struct Run {
    kind: TaskKind,
    name: String,
    cancel: Cancel,
}

type Key = (TaskKind, String);

pub struct Scheduler<R: Runner> {
    config: Arc<Loaded>,
    /// The file the configuration came from (none: the embedded default), for reloads.
    config_path: Option<PathBuf>,
    runner: Arc<R>,
    tasks: BTreeMap<Key, Task>,
    /// Runs in progress, by their tokio task's id.
    runs: BTreeMap<tokio::task::Id, Run>,
    set: JoinSet<Outcome>,
    permits: Arc<Semaphore>,
    /// Tells systemd (`READY=1`, `STATUS=...`); does nothing without it.
    notify: Box<dyn Fn(&str) + Send + Sync>,
    clock: Clock,
    /// Draws a job's jitter (nanoseconds of up to its argument).
    jitter: fn(Duration) -> i64,
}

impl<R: Runner> Scheduler<R> {
    pub fn new(config: Arc<Loaded>, config_path: Option<PathBuf>, runner: Arc<R>) -> Self {
        let permits = Arc::new(Semaphore::new(config.daemon.max_concurrent_jobs));
        Scheduler {
            config,
            config_path,
            runner,
            tasks: BTreeMap::new(),
            runs: BTreeMap::new(),
            set: JoinSet::new(),
            permits,
            notify: Box::new(|_| {}),
            clock: Clock::System,
            jitter: jitter_nanos,
        }
    }

    /// Where systemd notifications go.
    pub fn notifying(mut self, notify: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.notify = Box::new(notify);
        self
    }

    /// Another clock and jitter (tests: tokio's paused clock, no jitter).
    pub fn with_clock(mut self, clock: Clock, jitter: fn(Duration) -> i64) -> Self {
        self.clock = clock;
        self.jitter = jitter;
        self
    }

    /// Runs until [`Control::Stop`] (or the control channel closes); the exit code: 0 when
    /// nothing was cut short, 1 when a run was cancelled at the stop.
    pub async fn serve(mut self, mut control: mpsc::Receiver<Control>) -> u8 {
        for line in crate::drill::clean_leftovers(&self.config).await {
            log(line);
        }
        self.plan().await;
        (self.notify)("READY=1");
        loop {
            let now = self.clock.now();
            let due = plan::due(self.tasks.iter().map(|(k, t)| (k.clone(), t.next)), now);
            for key in &due {
                self.start(key, now);
            }
            if !due.is_empty() {
                self.status();
            }
            let wake = plan::wake_in(self.tasks.values().map(|t| t.next), self.clock.now());
            tokio::select! {
                _ = tokio::time::sleep(wake) => {}
                Some(done) = self.set.join_next_with_id(), if !self.set.is_empty() => {
                    self.finished(done);
                    self.status();
                }
                c = control.recv() => match c {
                    Some(Control::Reload { why }) => {
                        log(why);
                        self.reload().await;
                    }
                    Some(Control::Watchdog) => (self.notify)("WATCHDOG=1"),
                    Some(Control::Stop) | None => return self.shut_down().await,
                },
            }
        }
    }

    /// Reads the repositories and plans every task's first run.
    async fn plan(&mut self) {
        let history = self.runner.observe(self.config.clone()).await;
        let now = self.clock.now();
        let tz = self.config.time_zone.clone();
        self.tasks.clear();
        for (work, next) in plan::plan(&self.config, &history, now, self.jitter) {
            let when = next.to_zoned_datetime(tz.clone()).strftime("%F %T %Z");
            log(match &work {
                Work::Backup(j) => format!("job {}: {}, next run {when}", j.name, j.schedule),
                Work::Maintenance(m) => format!(
                    "repository {}: maintenance (forget, then prune) {}, next run {when}",
                    m.repository, m.schedule
                ),
                Work::Copy(c) => format!(
                    "copy {}: {} -> {}, {}, next run {when}",
                    c.name, c.from, c.to, c.schedule
                ),
                Work::Drill(d) => format!(
                    "drill {}: job {} from repository {}, {}, next run {when}",
                    d.name, d.job.name, d.repository, d.schedule
                ),
            });
            self.runner.planned(&work, next);
            let key = (work.kind(), work.name().to_string());
            self.tasks.insert(key, Task { work, next });
        }
    }

    /// Starts a due task, unless its previous run still goes; plans its next run.
    fn start(&mut self, key: &Key, now: Timestamp) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        let jitter = (self.jitter)(task.work.jitter());
        task.next = plan::next_run(&task.work, &self.config.time_zone, now, jitter);
        let work = task.work.clone();
        self.runner.planned(&work, task.next);
        if self
            .runs
            .values()
            .any(|r| r.kind == key.0 && r.name == key.1)
        {
            log(format!(
                "{}: due again while the previous run is still going; this run is skipped",
                work.label()
            ));
            self.runner.skipped(&work);
            return;
        }
        let cancel = Cancel::new();
        let permits = self.permits.clone();
        let task_cancel = cancel.clone();
        let run = self.runner.run(self.config.clone(), work, cancel.clone());
        let handle = self.set.spawn(async move {
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
                kind: key.0,
                name: key.1.clone(),
                cancel,
            },
        );
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
        let Some(run) = self.runs.remove(&id) else {
            return matches!(outcome, Outcome::Ok | Outcome::NotYet);
        };
        if outcome == Outcome::NotYet {
            // A drill of a job's own repository before the job's first snapshot: the backup
            // is due soon, so it tries again in a minute (one of a copy waits for its time).
            let soon = self.clock.now() + jiff::SignedDuration::from_secs(60);
            let key = (run.kind, run.name.clone());
            if let Some(task) = self
                .tasks
                .get_mut(&key)
                .filter(|t| matches!(&t.work, Work::Drill(d) if d.repository == d.job.repository))
            {
                task.next = task.next.min(soon);
                self.runner.planned(&task.work, task.next);
            }
        }
        self.runner.ended(run.kind, &run.name);
        matches!(outcome, Outcome::Ok | Outcome::NotYet)
    }

    /// A STATUS line for `systemctl status`: what runs, and which job is next.
    fn status(&self) {
        let running: Vec<&str> = self.runs.values().map(|r| r.name.as_str()).collect();
        let next = self
            .tasks
            .values()
            .filter(|t| t.work.kind() == TaskKind::Backup)
            .min_by_key(|t| t.next)
            .map(|t| {
                format!(
                    "next: {} at {}",
                    t.work.name(),
                    t.next
                        .to_zoned_datetime(self.config.time_zone.clone())
                        .strftime("%F %T %Z")
                )
            });
        let now = if running.is_empty() {
            "idle".to_string()
        } else {
            format!("running {}", running.join(", "))
        };
        (self.notify)(&format!(
            "STATUS={now}; {}",
            next.unwrap_or_else(|| "no jobs".into())
        ));
    }

    /// Reads the configuration file again. A file that does not check leaves the scheduler on
    /// the configuration it had; running tasks finish under the one they started with.
    async fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            log("running on the embedded configuration; there is no file to reload");
            return;
        };
        (self.notify)("RELOADING=1");
        match Loaded::from_file(&path) {
            Err(e) => {
                log(format!(
                    "reload failed, still running the previous configuration: {e}"
                ));
                self.runner.reloaded(Err(&e));
            }
            Ok(new) => {
                if new.http.listen != self.config.http.listen {
                    log("http.listen changed: it takes effect at the next start");
                }
                if new.daemon.max_concurrent_jobs != self.config.daemon.max_concurrent_jobs {
                    self.permits = Arc::new(Semaphore::new(new.daemon.max_concurrent_jobs));
                }
                self.config = Arc::new(new);
                self.plan().await;
                log(format!(
                    "configuration reloaded from {}: {} job(s)",
                    path.display(),
                    self.config.jobs.len()
                ));
                self.runner.reloaded(Ok(&self.config));
            }
        }
        (self.notify)("READY=1");
        self.status();
    }

    async fn shut_down(mut self) -> u8 {
        (self.notify)("STOPPING=1");
        self.permits.close();
        if self.set.is_empty() {
            log("stopping");
            return 0;
        }
        let grace = self.config.daemon.shutdown_grace;
        log(format!(
            "stopping: {} job(s) running, waiting up to {} for them",
            self.set.len(),
            humantime::format_duration(grace)
        ));
        let deadline = tokio::time::Instant::now() + grace;
        let mut cut = 0;
        loop {
            tokio::select! {
                done = self.set.join_next_with_id() => match done {
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
                            done = self.set.join_next_with_id() => match done {
                                None => break,
                                Some(done) => {
                                    if !self.finished(done) {
                                        cut += 1;
                                    }
                                }
                            },
                            _ = tokio::time::sleep_until(hard) => {
                                cut += self.set.len();
                                log(format!("{} run(s) did not stop after cancelling", self.set.len()));
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

/// `kluisd --once`: every job now, as many at once as allowed; then every copy rule, every
/// drill, and every repository's scheduled maintenance, one after the other. 0 when all
/// succeeded, else 1.
pub async fn once<R: Runner>(config: Arc<Loaded>, runner: Arc<R>) -> u8 {
    let permits = Arc::new(Semaphore::new(config.daemon.max_concurrent_jobs));
    let mut set = JoinSet::new();
    for job in &config.jobs {
        let permits = permits.clone();
        let run = runner.run(config.clone(), Work::Backup(job.clone()), Cancel::new());
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            run.await
        });
    }
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        if !matches!(r, Ok(Outcome::Ok)) {
            failed += 1;
        }
    }
    // Then the copies (of what the jobs just made), the drills, and the maintenance.
    let then = |work| runner.run(config.clone(), work, Cancel::new());
    for rule in &config.copies {
        failed += usize::from(then(Work::Copy(rule.clone())).await != Outcome::Ok);
    }
    for line in crate::drill::clean_leftovers(&config).await {
        log(line);
    }
    for drill in &config.drills {
        failed += usize::from(then(Work::Drill(drill.clone())).await != Outcome::Ok);
    }
    for task in &config.prunes {
        failed += usize::from(then(Work::Maintenance(task.clone())).await != Outcome::Ok);
    }
    u8::from(failed > 0)
}
