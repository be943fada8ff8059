//! What each run, drill, copy and survey records in the metrics (the series are defined in [`super::Metrics::new`]).

use super::*;

impl Metrics {
    /// A job's labels exist from the start, so a dashboard shows 0 rather than nothing.
    pub fn declare_job(&self, job: &str) {
        for result in ["success", "failure"] {
            self.job_runs.with_label_values(&[job, result]);
        }
        // Created at 0 if new; a job still running through a reload keeps its 1.
        self.job_running.with_label_values(&[job]);
        self.job_skipped.with_label_values(&[job]);
    }

    /// Records a successful run's snapshot.
    pub fn record_success(
        &self,
        job: &str,
        repository: &str,
        snapshots: &[Snapshot],
        seconds: f64,
    ) {
        let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        // A set's figures are its members' sums; its time is theirs.
        let mut sum = crate::snapshot::Summary::default();
        for s in snapshots {
            sum.logical_bytes += s.summary.logical_bytes;
            sum.new_bytes += s.summary.new_bytes;
            sum.stored_bytes += s.summary.stored_bytes;
        }
        self.job_last_run.with_label_values(&[job]).set(now);
        if let Some(time) = snapshots.iter().map(|s| s.time).max() {
            self.job_last_success
                .with_label_values(&[job])
                .set(time.as_millisecond() as f64 / 1000.0);
        }
        self.job_duration.with_label_values(&[job]).set(seconds);
        self.job_read_bytes
            .with_label_values(&[job])
            .set(sum.logical_bytes as i64);
        self.job_new_bytes
            .with_label_values(&[job])
            .set(sum.new_bytes as i64);
        self.job_stored_bytes
            .with_label_values(&[job])
            .set(sum.stored_bytes as i64);
        let ratio = if sum.logical_bytes == 0 {
            1.0
        } else {
            1.0 - (sum.new_bytes.min(sum.logical_bytes) as f64 / sum.logical_bytes as f64)
        };
        self.job_dedup_ratio.with_label_values(&[job]).set(ratio);
        self.job_runs.with_label_values(&[job, "success"]).inc();
        self.repository_last_write
            .with_label_values(&[repository])
            .set(now);
    }

    /// Records a failed run and why.
    pub fn record_failure(&self, job: &str, reason: &str, seconds: f64) {
        let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        self.job_last_run.with_label_values(&[job]).set(now);
        self.job_duration.with_label_values(&[job]).set(seconds);
        self.job_runs.with_label_values(&[job, "failure"]).inc();
        self.job_failures.with_label_values(&[job, reason]).inc();
    }

    /// A repository's maintenance labels exist from the start.
    pub fn declare_prune(&self, repository: &str) {
        for result in ["success", "failure"] {
            self.prune_runs.with_label_values(&[repository, result]);
        }
        self.prune_reclaimed_bytes.with_label_values(&[repository]);
        self.prune_packs_deleted.with_label_values(&[repository]);
        self.forget_removed.with_label_values(&[repository]);
    }

    /// A repository's scheduled erasure labels exist from the start.
    pub fn declare_erase(&self, repository: &str) {
        self.erase_snapshots.with_label_values(&[repository]);
        self.erase_epochs.with_label_values(&[repository]);
    }

    /// Records a maintenance run: what forget removed, what the erasure destroyed and what
    /// prune did, or its failure.
    pub fn record_prune(
        &self,
        repository: &str,
        result: Result<&crate::jobs::MaintenanceReport, ()>,
        seconds: f64,
    ) {
        let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        let r = [repository];
        self.prune_last_run.with_label_values(&r).set(now);
        self.prune_duration.with_label_values(&r).set(seconds);
        match result {
            Ok(done) => {
                let (removed, report) = (done.forgotten, &done.prune);
                if let Some(e) = &done.erased {
                    self.erase_snapshots
                        .with_label_values(&r)
                        .inc_by(e.record.snapshots.len() as u64);
                    self.erase_epochs
                        .with_label_values(&r)
                        .inc_by(e.record.destroyed.len() as u64);
                    self.erase_before
                        .with_label_values(&r)
                        .set(e.record.before.as_millisecond() as f64 / 1000.0);
                }
                self.prune_last_success.with_label_values(&r).set(now);
                self.prune_runs
                    .with_label_values(&[repository, "success"])
                    .inc();
                self.prune_reclaimed_bytes
                    .with_label_values(&r)
                    .inc_by(report.bytes_reclaimed);
                self.prune_packs_deleted
                    .with_label_values(&r)
                    .inc_by(report.packs_deleted as u64);
                self.prune_marked_bytes
                    .with_label_values(&r)
                    .set(report.bytes_marked as i64);
                self.forget_removed
                    .with_label_values(&r)
                    .inc_by(removed as u64);
            }
            Err(()) => {
                self.prune_runs
                    .with_label_values(&[repository, "failure"])
                    .inc();
            }
        }
    }

    /// A copy rule's labels exist from the start.
    pub fn declare_copy(&self, rule: &crate::config::CopyRule) {
        let c = rule.name.as_str();
        for result in ["success", "failure"] {
            self.copy_runs.with_label_values(&[c, result]);
        }
        self.copy_snapshots.with_label_values(&[c]);
        self.copy_uploaded_bytes.with_label_values(&[c]);
        self.copy_read_bytes.with_label_values(&[c]);
        self.copy_info
            .with_label_values(&[c, &rule.from, &rule.to])
            .set(1);
    }

    /// Records a copy run: what it copied, or why it failed.
    pub fn record_copy(
        &self,
        copy: &str,
        result: Result<&crate::copy::CopyReport, &str>,
        seconds: f64,
    ) {
        let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        let c = [copy];
        self.copy_last_run.with_label_values(&c).set(now);
        self.copy_duration.with_label_values(&c).set(seconds);
        match result {
            Ok(report) => {
                self.copy_last_success.with_label_values(&c).set(now);
                self.copy_runs.with_label_values(&[copy, "success"]).inc();
                self.copy_snapshots
                    .with_label_values(&c)
                    .inc_by(report.copied.len() as u64);
                self.copy_uploaded_bytes
                    .with_label_values(&c)
                    .inc_by(report.stored_bytes());
                self.copy_read_bytes
                    .with_label_values(&c)
                    .inc_by(report.copied.iter().map(|x| x.logical_bytes).sum());
            }
            Err(reason) => {
                self.copy_runs.with_label_values(&[copy, "failure"]).inc();
                self.copy_failures.with_label_values(&[copy, reason]).inc();
            }
        }
    }

    /// A drill's labels exist from the start; its history (from the repository) sets the
    /// last run, success and result.
    pub fn declare_drill(
        &self,
        job: &str,
        repository: &str,
        history: &[crate::drill::DrillReport],
    ) {
        for result in ["success", "failure"] {
            self.drill_runs
                .with_label_values(&[job, repository, result]);
        }
        let l = [job, repository];
        let secs = |t: jiff::Timestamp| t.as_millisecond() as f64 / 1000.0;
        let mine = history
            .iter()
            .filter(|r| r.job == job && r.repository == repository);
        if let Some(last) = mine.clone().max_by_key(|r| r.finished) {
            self.drill_last_run
                .with_label_values(&l)
                .set(secs(last.finished));
            self.drill_last_result
                .with_label_values(&l)
                .set(i64::from(last.passed));
            self.drill_duration
                .with_label_values(&l)
                .set(last.restore_seconds);
        }
        if let Some(ok) = mine.filter(|r| r.passed).max_by_key(|r| r.finished) {
            self.drill_last_success
                .with_label_values(&l)
                .set(secs(ok.finished));
        }
    }

    /// Records a drill run: its reports, or why none could be made.
    pub fn record_drill(
        &self,
        job: &str,
        repository: &str,
        result: Result<&[crate::drill::DrillReport], &str>,
    ) {
        let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        let l = [job, repository];
        self.drill_last_run.with_label_values(&l).set(now);
        match result {
            Ok(reports) => {
                for r in reports {
                    let result = if r.passed { "success" } else { "failure" };
                    self.drill_runs
                        .with_label_values(&[job, repository, result])
                        .inc();
                    if let Some(reason) = &r.reason {
                        self.drill_failures
                            .with_label_values(&[job, repository, reason])
                            .inc();
                    }
                }
                if let Some(first) = reports.first() {
                    self.drill_duration
                        .with_label_values(&l)
                        .set(first.restore_seconds);
                }
                let passed = reports.iter().all(|r| r.passed);
                self.drill_last_result
                    .with_label_values(&l)
                    .set(i64::from(passed));
                if passed {
                    self.drill_last_success.with_label_values(&l).set(now);
                }
            }
            Err(reason) => {
                self.drill_runs
                    .with_label_values(&[job, repository, "failure"])
                    .inc();
                self.drill_failures
                    .with_label_values(&[job, repository, reason])
                    .inc();
                self.drill_last_result.with_label_values(&l).set(0);
            }
        }
    }

    /// Where a repository's data lives.
    pub fn record_placement(&self, repository: &str, p: &crate::store::Placement) {
        self.repository_info
            .with_label_values(&[repository, p.kind, &p.endpoint, &p.region])
            .set(1);
    }

    /// The outcome of a verification of a repository's records ([`crate::ledger::verify`]).
    pub fn record_integrity(&self, repository: &str, v: &crate::ledger::Verification) {
        self.repository_integrity_problems
            .with_label_values(&[repository])
            .set(v.problems().count() as i64);
        self.repository_integrity_verified
            .with_label_values(&[repository])
            .set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
    }

    /// A repository's audit trail, after a verification: its records by kind (the counter
    /// follows the trail's count) and its problems.
    pub fn record_audit(&self, repository: &str, trail: &crate::audit::Trail) {
        let mut by_kind = std::collections::BTreeMap::<&str, u64>::new();
        for (_, r) in &trail.records {
            *by_kind.entry(r.kind.as_str()).or_default() += 1;
        }
        for (kind, n) in by_kind {
            let c = self.audit_records.with_label_values(&[repository, kind]);
            if n > c.get() {
                c.inc_by(n - c.get());
            }
        }
        self.audit_problems
            .with_label_values(&[repository])
            .set(trail.problems.len() as i64);
    }

    /// A repository's snapshots, after a listing.
    pub fn record_repository(&self, repository: &str, snapshots: &[Snapshot]) {
        self.repository_up.with_label_values(&[repository]).set(1);
        self.repository_snapshots
            .with_label_values(&[repository])
            .set(snapshots.len() as i64);
        let stored: u64 = snapshots.iter().map(|s| s.summary.stored_bytes).sum();
        self.repository_stored_bytes
            .with_label_values(&[repository])
            .set(stored as i64);
    }
}
