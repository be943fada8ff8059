//! The daemon's scheduler: when backup jobs, copies, drills and each repository's maintenance
//! run, and what is recorded of every run.
//!
//! One task model for all four: a [`Work`] (what runs) with its next time. A task runs once at a
//! time (a run that comes due while the previous one still goes is skipped and logged); at most
//! `max_concurrent_jobs` runs go at once, the others wait for a turn; each run has its timeout,
//! after which it is cancelled (nothing partial is committed).
//!
//! Parts:
//! - `plan`: pure functions of time: each task's first run (catch-up of runs missed while the
//!   daemon was down), its next runs (with jitter), what is due, when to wake;
//! - `timeout`: the one run-with-timeout (cancel, then wait a minute for the run to stop);
//! - `record`: the daemon's [`Runner`]: each task's work, its outcome logged and recorded in
//!   the metrics and the status board, and what the plan needs read from the repositories;
//! - `serve`: the loop ([`Scheduler::serve`]): start, skip, finish, reload, shut down; and
//!   [`once`] (`kluisd --once`).
//!
//! kluisd keeps its arguments, the runtime, signals and systemd's protocol: it turns signals
//! into [`Control`] events and hands the scheduler a way to notify systemd.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;

use crate::config::{CopyRule, Drill, Job, Loaded, Maintenance};
use crate::progress::Cancel;
use crate::schedule::Schedule;

mod offline;
mod plan;
mod record;
mod serve;
mod timeout;

pub use offline::from_repositories;
pub use plan::{CatchUp, Due, History, first_run, jitter_nanos, next_after, plan};
pub use record::DaemonRunner;
pub use serve::{Control, Scheduler, once};
pub use timeout::{STOP_WAIT, Timed, with_timeout};

/// The four kinds of scheduled task, in the order due tasks start within one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskKind {
    Backup,
    /// A repository's maintenance: forget by its retention policy, then prune.
    Maintenance,
    Copy,
    Drill,
}

/// What a scheduled task runs.
#[derive(Debug, Clone)]
pub enum Work {
    Backup(Job),
    Maintenance(Maintenance),
    Copy(CopyRule),
    Drill(Drill),
}

impl Work {
    pub fn kind(&self) -> TaskKind {
        match self {
            Work::Backup(_) => TaskKind::Backup,
            Work::Maintenance(_) => TaskKind::Maintenance,
            Work::Copy(_) => TaskKind::Copy,
            Work::Drill(_) => TaskKind::Drill,
        }
    }

    /// The job's, repository's (maintenance), copy rule's or drill's name.
    pub fn name(&self) -> &str {
        match self {
            Work::Backup(j) => &j.name,
            Work::Maintenance(m) => &m.repository,
            Work::Copy(c) => &c.name,
            Work::Drill(d) => &d.name,
        }
    }

    pub fn schedule(&self) -> &Schedule {
        match self {
            Work::Backup(j) => &j.schedule,
            Work::Maintenance(m) => &m.schedule,
            Work::Copy(c) => &c.schedule,
            Work::Drill(d) => &d.schedule,
        }
    }

    /// The random delay added to each scheduled run (only jobs have one).
    pub fn jitter(&self) -> Duration {
        match self {
            Work::Backup(j) => j.jitter,
            _ => Duration::ZERO,
        }
    }

    /// How the log names it: `job etc`, `repository local: maintenance`, `copy monthly`.
    pub fn label(&self) -> String {
        match self {
            Work::Backup(j) => format!("job {}", j.name),
            Work::Maintenance(m) => format!("repository {}: maintenance", m.repository),
            Work::Copy(c) => format!("copy {}", c.name),
            Work::Drill(d) => format!("drill {}", d.name),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    TimedOut,
    /// Nothing to do yet (a drill before its job's first snapshot): try again soon.
    NotYet,
}

/// What runs the tasks and records their outcomes. The daemon's is [`DaemonRunner`]; the
/// scheduler's tests run fakes on tokio's paused clock.
pub trait Runner: Send + Sync + 'static {
    /// One run of `work`, to its end: its timeout included, its outcome logged and recorded.
    fn run(&self, config: Arc<Loaded>, work: Work, cancel: Cancel) -> BoxFuture<'static, Outcome>;

    /// What the plan needs to know of the past (each job's last snapshot, each drill's last
    /// report), read where it survives restarts; also records what it saw of each repository.
    fn observe(&self, config: Arc<Loaded>) -> BoxFuture<'static, History>;

    /// A task's next run is now `next`.
    fn planned(&self, _work: &Work, _next: Timestamp) {}

    /// A run came due while the previous one still went; it was skipped.
    fn skipped(&self, _work: &Work) {}

    /// A run's task ended, however it ended (a crashed task too).
    fn ended(&self, _kind: TaskKind, _name: &str) {}

    /// A reload: the new configuration, or why the file did not load.
    fn reloaded(&self, _result: std::result::Result<&Loaded, &crate::Error>) {}
}

/// One line to the daemon's log (stderr, which systemd's journal keeps), time-stamped.
pub fn log(msg: impl std::fmt::Display) {
    let now = Timestamp::now();
    eprintln!(
        "{} kluisd: {msg}",
        now.round(jiff::Unit::Millisecond).unwrap_or(now)
    );
}

/// The scheduler's time: the system's clock, or (in tests) one that follows tokio's clock, so
/// a paused runtime moves schedules forward as it moves timers.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    Tokio {
        base: Timestamp,
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `base` now and advances with `tokio::time`.
    pub fn following_tokio(base: Timestamp) -> Clock {
        Clock::Tokio {
            base,
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => Timestamp::now(),
            Clock::Tokio { base, at } => {
                let passed = jiff::SignedDuration::try_from(at.elapsed())
                    .unwrap_or(jiff::SignedDuration::MAX);
                base.checked_add(passed).unwrap_or(Timestamp::MAX)
            }
        }
    }
}

#[cfg(test)]
mod tests;
