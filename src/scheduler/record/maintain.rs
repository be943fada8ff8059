//! A repository's scheduled maintenance, as the daemon runs it: forget, erase, prune; logged
//! and recorded in the metrics.

use std::time::Instant;

use super::super::{Outcome, Timed, log, with_timeout};
use crate::config::Loaded;
use crate::error::Error;
use crate::jobs;
use crate::metrics::Metrics;
use crate::progress::Cancel;

/// One maintenance run of a repository (forget by its retention, erase by its `erase_after`,
/// then prune), with its timeout; logs the result and records it in the metrics.
pub(super) async fn run_maintenance(
    config: &Loaded,
    task: &crate::config::Maintenance,
    cancel: Cancel,
    metrics: &Metrics,
) -> Outcome {
    let started = Instant::now();
    let name = &task.repository;
    log(format!("repository {name}: maintenance starting"));
    let run = jobs::maintain(config, name, cancel.clone());
    let result = match with_timeout(run, task.timeout, &cancel).await {
        Timed::Done(r) => r,
        Timed::TimedOut { .. } => Err(Error::Interrupted),
    };
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(done) => {
            if let Some(e) = done.erased.as_ref().filter(|e| !e.nothing_to_do) {
                let r = &e.record;
                let destroyed: Vec<String> =
                    r.destroyed.iter().map(|d| d.epoch.to_string()).collect();
                log(format!(
                    "repository {name}: erasure {} of everything before {}: {} snapshot(s), keys destroyed: {}, {} object(s) deleted",
                    r.id.short(),
                    r.before,
                    r.snapshots.len(),
                    if destroyed.is_empty() {
                        "none".to_string()
                    } else {
                        destroyed.join(", ")
                    },
                    e.objects_deleted
                ));
            }
            let report = &done.prune;
            log(format!(
                "repository {name}: forgot {} snapshot(s); prune deleted {} pack(s) ({} bytes), marked {} pack(s) ({} bytes), in {seconds:.1} s",
                done.forgotten,
                report.packs_deleted,
                report.bytes_reclaimed,
                report.packs_marked,
                report.bytes_marked
            ));
            for w in &report.warnings {
                log(format!("repository {name}: prune warning: {w}"));
            }
            metrics.record_prune(name, Ok(&done), seconds);
            Outcome::Ok
        }
        Err(e) => {
            log(format!("repository {name}: maintenance failed: {e}"));
            metrics.record_prune(name, Err(()), seconds);
            Outcome::Failed
        }
    }
}
