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

/// The whole picture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `daemon` (asked the running kluisd) or `repositories` (worked out without it).
    pub source: String,
    pub jobs: Vec<JobStatus>,
    pub repositories: Vec<RepositoryStatus>,
}

/// The daemon's copy, updated as jobs run.
#[derive(Default)]
pub struct Board {
    jobs: Mutex<BTreeMap<String, JobStatus>>,
    repositories: Mutex<BTreeMap<String, RepositoryStatus>>,
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
        }
    }
}
