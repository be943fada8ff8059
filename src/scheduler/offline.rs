//! The status without a daemon: what `kluis status` shows when no kluisd answers, from the
//! repositories and the plan the daemon would make.

use jiff::Timestamp;

use super::{History, TaskKind, plan};
use crate::config::Loaded;
use crate::jobs;
use crate::source::postgres::redact;
use crate::status::{DrillStatus, JobStatus, RepositoryStatus, Status};

/// `kluis status` without a daemon: each repository's state, each job's newest snapshot and
/// each drill's last report, read from the repositories (never creating one), and the next
/// runs the daemon would plan at `now` (its catch-up included; jitter aside).
pub async fn from_repositories(config: &Loaded, now: Timestamp) -> Status {
    let mut status = Status {
        source: "repositories".into(),
        ..Status::default()
    };
    let mut lists = std::collections::BTreeMap::new();
    for (name, r) in &config.repositories {
        let listed = jobs::snapshots(config, name).await;
        status.repositories.push(RepositoryStatus {
            name: name.clone(),
            location: redact(&r.url),
            snapshots: listed.as_ref().ok().map(Vec::len),
            error: listed.as_ref().err().map(|e| e.to_string()),
        });
        lists.insert(name.clone(), listed.unwrap_or_default());
    }
    let mut history = History::default();
    let mut reports = Vec::new();
    for job in &config.jobs {
        history.saw_job(job, lists.get(&job.repository).map_or(&[][..], |l| &l[..]));
    }
    for drill in &config.drills {
        let found = crate::drill::reports_in(config, &drill.repository).await;
        history.saw_drill(drill, &found);
        reports.push(found);
    }
    let planned: std::collections::BTreeMap<_, _> = plan(config, &history, now, |_| 0)
        .into_iter()
        .map(|(work, next)| ((work.kind(), work.name().to_string()), next))
        .collect();
    let next = |kind, name: &str| {
        planned
            .get(&(kind, name.to_string()))
            .copied()
            .filter(|t| *t != Timestamp::MAX)
    };
    for job in &config.jobs {
        let last = lists
            .get(&job.repository)
            .and_then(|l| jobs::last_of(job, l));
        status.jobs.push(JobStatus {
            name: job.name.clone(),
            repository: job.repository.clone(),
            schedule: job.schedule.to_string(),
            running: None,
            next_run: next(TaskKind::Backup, &job.name),
            last_run: None,
            last_result: None,
            last_success: last.map(|s| s.time),
            last_snapshot: last.map(|s| s.id.to_hex()),
        });
    }
    for (drill, found) in config.drills.iter().zip(&reports) {
        let next = next(TaskKind::Drill, &drill.name);
        status
            .drills
            .push(DrillStatus::from_history(drill, found, next));
    }
    status
}
