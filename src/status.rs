//! What each job is doing: the daemon keeps it up to date and serves it on `/status`;
//! `kluis status` shows it, or works it out from the repositories when no daemon runs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// One job's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    pub repository: String,
    pub schedule: String,
    /// Whether a run is going (unknown, `None`, without a daemon).
    pub running: Option<bool>,
    pub next_run: Option<Timestamp>,
    /// When the last run ended, and how (`success`, or `failure: REASON: MESSAGE`).
    pub last_run: Option<Timestamp>,
    pub last_result: Option<String>,
    /// The newest snapshot's time and id.
    pub last_success: Option<Timestamp>,
    pub last_snapshot: Option<String>,
}

/// A repository's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryStatus {
    pub name: String,
    pub location: String,
    /// `None` when it could not be read; `error` says why.
    pub snapshots: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One restore drill's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillStatus {
    pub name: String,
    pub job: String,
    pub repository: String,
    pub schedule: String,
    pub next_run: Option<Timestamp>,
    /// When the last drill ended, and how (`passed`, `FAILED (reason)`, or why it could not
    /// run).
    pub last_run: Option<Timestamp>,
    pub last_result: Option<String>,
    pub last_success: Option<Timestamp>,
    /// The measured recovery time of the last drill, in milliseconds.
    pub last_restore_ms: Option<u64>,
}

impl DrillStatus {
    /// A drill's state from its reports (the repository's drill history).
    pub fn from_history(
        drill: &crate::config::Drill,
        history: &[crate::drill::DrillReport],
        next_run: Option<Timestamp>,
    ) -> DrillStatus {
        let mut status = DrillStatus {
            name: drill.name.clone(),
            job: drill.job.name.clone(),
            repository: drill.repository.clone(),
            schedule: drill.schedule.to_string(),
            next_run,
            ..DrillStatus::default()
        };
        let mine: Vec<&crate::drill::DrillReport> =
            history.iter().filter(|r| r.drill == drill.name).collect();
        if let Some(last) = mine.iter().max_by_key(|r| r.finished) {
            status.record(last);
        }
        status.last_success = mine.iter().filter(|r| r.passed).map(|r| r.finished).max();
        status
    }

    /// Takes in a report of this drill.
    pub fn record(&mut self, r: &crate::drill::DrillReport) {
        self.last_run = Some(r.finished);
        self.last_result = Some(if r.passed {
            "passed".into()
        } else {
            format!("FAILED ({})", r.reason.as_deref().unwrap_or("other"))
        });
        self.last_restore_ms = Some((r.restore_seconds * 1000.0) as u64);
        if r.passed {
            self.last_success = Some(r.finished);
        }
    }
}

/// The whole picture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `daemon` (asked the running kluisd) or `repositories` (worked out without it).
    pub source: String,
    pub jobs: Vec<JobStatus>,
    pub repositories: Vec<RepositoryStatus>,
    #[serde(default)]
    pub drills: Vec<DrillStatus>,
}

/// The daemon's copy, updated as jobs run.
#[derive(Default)]
pub struct Board {
    jobs: Mutex<BTreeMap<String, JobStatus>>,
    repositories: Mutex<BTreeMap<String, RepositoryStatus>>,
    drills: Mutex<BTreeMap<String, DrillStatus>>,
}

impl Board {
    /// Changes one job's entry (created on first use).
    pub fn job(&self, name: &str, change: impl FnOnce(&mut JobStatus)) {
        let mut jobs = self.jobs.lock().expect("not poisoned");
        let entry = jobs.entry(name.to_string()).or_insert_with(|| JobStatus {
            name: name.to_string(),
            running: Some(false),
            ..JobStatus::default()
        });
        change(entry);
    }

    /// Changes one drill's entry (created on first use).
    pub fn drill(&self, name: &str, change: impl FnOnce(&mut DrillStatus)) {
        let mut drills = self.drills.lock().expect("not poisoned");
        let entry = drills
            .entry(name.to_string())
            .or_insert_with(|| DrillStatus {
                name: name.to_string(),
                ..DrillStatus::default()
            });
        change(entry);
    }

    /// Forgets drills that are no longer configured (after a reload).
    pub fn retain_drills(&self, names: &[String]) {
        self.drills
            .lock()
            .expect("not poisoned")
            .retain(|n, _| names.contains(n));
    }

    pub fn repository(&self, status: RepositoryStatus) {
        self.repositories
            .lock()
            .expect("not poisoned")
            .insert(status.name.clone(), status);
    }

    /// Forgets jobs that are no longer configured (after a reload).
    pub fn retain_jobs(&self, names: &[String]) {
        self.jobs
            .lock()
            .expect("not poisoned")
            .retain(|n, _| names.contains(n));
    }

    pub fn snapshot(&self) -> Status {
        Status {
            source: "daemon".into(),
            jobs: self
                .jobs
                .lock()
                .expect("not poisoned")
                .values()
                .cloned()
                .collect(),
            repositories: self
                .repositories
                .lock()
                .expect("not poisoned")
                .values()
                .cloned()
                .collect(),
            drills: self
                .drills
                .lock()
                .expect("not poisoned")
                .values()
                .cloned()
                .collect(),
        }
    }
}
