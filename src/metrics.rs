//! The daemon's Prometheus metrics, and the tiny HTTP endpoint that serves them.
//!
//! Names follow Prometheus conventions (`kluis_<noun>_<unit>[_total]`); labels are bounded:
//! `job`, `repository`, and small fixed sets (`result`, `reason`), never a snapshot id. Every
//! metric is listed, with its meaning, in the README.

mod http;

pub use http::serve;

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::error::Error;
use crate::snapshot::Snapshot;

mod record;

/// Every metric of `kluisd`.
pub struct Metrics {
    registry: Registry,
    pub job_last_run: GaugeVec,
    pub job_last_success: GaugeVec,
    pub job_duration: GaugeVec,
    pub job_read_bytes: IntGaugeVec,
    pub job_new_bytes: IntGaugeVec,
    pub job_stored_bytes: IntGaugeVec,
    pub job_dedup_ratio: GaugeVec,
    pub job_runs: IntCounterVec,
    pub job_failures: IntCounterVec,
    pub job_skipped: IntCounterVec,
    pub job_next_run: GaugeVec,
    pub job_running: IntGaugeVec,
    pub repository_snapshots: IntGaugeVec,
    pub repository_stored_bytes: IntGaugeVec,
    pub repository_last_write: GaugeVec,
    pub repository_up: IntGaugeVec,
    pub audit_records: IntCounterVec,
    pub audit_problems: IntGaugeVec,
    pub repository_integrity_problems: IntGaugeVec,
    pub repository_integrity_verified: GaugeVec,
    pub prune_last_run: GaugeVec,
    pub prune_last_success: GaugeVec,
    pub prune_duration: GaugeVec,
    pub prune_runs: IntCounterVec,
    pub prune_reclaimed_bytes: IntCounterVec,
    pub prune_packs_deleted: IntCounterVec,
    pub prune_marked_bytes: IntGaugeVec,
    pub forget_removed: IntCounterVec,
    pub erase_snapshots: IntCounterVec,
    pub erase_epochs: IntCounterVec,
    pub erase_before: GaugeVec,
    pub copy_last_run: GaugeVec,
    pub copy_last_success: GaugeVec,
    pub copy_duration: GaugeVec,
    pub copy_runs: IntCounterVec,
    pub copy_failures: IntCounterVec,
    pub copy_snapshots: IntCounterVec,
    pub copy_uploaded_bytes: IntCounterVec,
    pub copy_read_bytes: IntCounterVec,
    pub copy_info: IntGaugeVec,
    pub repository_info: IntGaugeVec,
    pub drill_last_run: GaugeVec,
    pub drill_last_success: GaugeVec,
    pub drill_duration: GaugeVec,
    pub drill_last_result: IntGaugeVec,
    pub drill_runs: IntCounterVec,
    pub drill_failures: IntCounterVec,
    pub config_reload_failures: IntCounter,
    pub config_last_reload_ok: IntGauge,
    pub config_last_reload: Gauge,
}

/// How a run ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    Success,
    Failure,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! register {
            ($kind:ident, $name:expr, $help:expr, $labels:expr) => {{
                let m = $kind::new(Opts::new($name, $help), $labels).expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("each metric registered once");
                m
            }};
        }
        let build = register!(
            IntGaugeVec,
            "kluis_build_info",
            "Always 1; the version label says which kluis runs.",
            &["version"]
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        macro_rules! single {
            ($kind:ident, $name:expr, $help:expr) => {{
                let m = $kind::with_opts(Opts::new($name, $help)).expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("each metric registered once");
                m
            }};
        }
        let config_last_reload_ok = single!(
            IntGauge,
            "kluis_config_last_reload_successful",
            "1 if the configuration in use is the file's current content, 0 if the last reload failed (the daemon keeps the previous configuration)."
        );
        config_last_reload_ok.set(1);
        let config_last_reload = single!(
            Gauge,
            "kluis_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (Unix time)."
        );
        config_last_reload.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
        Metrics {
            config_reload_failures: single!(
                IntCounter,
                "kluis_config_reload_failures_total",
                "Reloads (SIGHUP, or the file changed) that failed: the file did not parse or check."
            ),
            config_last_reload_ok,
            config_last_reload,
            job_last_run: register!(
                GaugeVec,
                "kluis_job_last_run_timestamp_seconds",
                "When the job's last run ended, successful or not (Unix time).",
                &["job"]
            ),
            job_last_success: register!(
                GaugeVec,
                "kluis_job_last_success_timestamp_seconds",
                "The time of the job's newest snapshot (Unix time); read from the repository at start-up.",
                &["job"]
            ),
            job_duration: register!(
                GaugeVec,
                "kluis_job_last_duration_seconds",
                "How long the job's last run took.",
                &["job"]
            ),
            job_read_bytes: register!(
                IntGaugeVec,
                "kluis_job_last_read_bytes",
                "Bytes the job's last successful run read from its source.",
                &["job"]
            ),
            job_new_bytes: register!(
                IntGaugeVec,
                "kluis_job_last_new_bytes",
                "Bytes of new (not deduplicated) data in the job's last successful run, before compression.",
                &["job"]
            ),
            job_stored_bytes: register!(
                IntGaugeVec,
                "kluis_job_last_stored_bytes",
                "Bytes the job's last successful run added to its repository (compressed and encrypted).",
                &["job"]
            ),
            job_dedup_ratio: register!(
                GaugeVec,
                "kluis_job_last_dedup_ratio",
                "Share of the last successful run's data that was already in the repository (0 to 1).",
                &["job"]
            ),
            job_runs: register!(
                IntCounterVec,
                "kluis_job_runs_total",
                "Runs of the job that ended, by result (success, failure).",
                &["job", "result"]
            ),
            job_failures: register!(
                IntCounterVec,
                "kluis_job_failures_total",
                "Failed runs of the job, by reason (source, storage, corrupt, timeout, interrupted, config, other).",
                &["job", "reason"]
            ),
            job_skipped: register!(
                IntCounterVec,
                "kluis_job_skipped_runs_total",
                "Runs that came due while the job's previous run was still going, and were skipped.",
                &["job"]
            ),
            job_next_run: register!(
                GaugeVec,
                "kluis_job_next_run_timestamp_seconds",
                "When the job runs next (Unix time).",
                &["job"]
            ),
            job_running: register!(
                IntGaugeVec,
                "kluis_job_running",
                "1 while the job runs, else 0.",
                &["job"]
            ),
            repository_snapshots: register!(
                IntGaugeVec,
                "kluis_repository_snapshots",
                "Snapshots in the repository.",
                &["repository"]
            ),
            repository_stored_bytes: register!(
                IntGaugeVec,
                "kluis_repository_stored_bytes",
                "Bytes the repository's snapshots added to it, summed (compressed and encrypted).",
                &["repository"]
            ),
            repository_last_write: register!(
                GaugeVec,
                "kluis_repository_last_write_timestamp_seconds",
                "When a snapshot was last committed to the repository by this daemon (Unix time).",
                &["repository"]
            ),
            audit_records: register!(
                IntCounterVec,
                "kluis_audit_records_total",
                "Audit records in the repository's trail, by kind (restore, drill, copy, forget, prune, erase, key-*, config-reload), as of its last verification.",
                &["repository", "kind"]
            ),
            audit_problems: register!(
                IntGaugeVec,
                "kluis_audit_chain_problems",
                "Problems the last verification of the repository's audit trail found: records altered, removed, or gone that this host wrote. Not 0: alert.",
                &["repository"]
            ),
            repository_up: register!(
                IntGaugeVec,
                "kluis_repository_up",
                "1 if the repository could be opened and listed the last time it was tried, else 0.",
                &["repository"]
            ),
            repository_integrity_problems: register!(
                IntGaugeVec,
                "kluis_repository_integrity_problems",
                "Records of the repository found removed, rolled back or replayed at its last verification (0: none).",
                &["repository"]
            ),
            repository_integrity_verified: register!(
                GaugeVec,
                "kluis_repository_integrity_verified_timestamp_seconds",
                "When the repository's records were last verified against their chains, the forget records and what this host saw (Unix time).",
                &["repository"]
            ),
            prune_last_run: register!(
                GaugeVec,
                "kluis_prune_last_run_timestamp_seconds",
                "When the repository's last maintenance run (forget, then prune) ended (Unix time).",
                &["repository"]
            ),
            prune_last_success: register!(
                GaugeVec,
                "kluis_prune_last_success_timestamp_seconds",
                "When the repository's last successful maintenance run ended (Unix time).",
                &["repository"]
            ),
            prune_duration: register!(
                GaugeVec,
                "kluis_prune_last_duration_seconds",
                "How long the last maintenance run took.",
                &["repository"]
            ),
            prune_runs: register!(
                IntCounterVec,
                "kluis_prune_runs_total",
                "Maintenance runs that ended, by result (success, failure).",
                &["repository", "result"]
            ),
            prune_reclaimed_bytes: register!(
                IntCounterVec,
                "kluis_prune_reclaimed_bytes_total",
                "Bytes of packs prune deleted.",
                &["repository"]
            ),
            prune_packs_deleted: register!(
                IntCounterVec,
                "kluis_prune_packs_deleted_total",
                "Packs prune deleted.",
                &["repository"]
            ),
            prune_marked_bytes: register!(
                IntGaugeVec,
                "kluis_prune_marked_bytes",
                "Bytes the last prune marked, deleted by the first prune after the grace period.",
                &["repository"]
            ),
            forget_removed: register!(
                IntCounterVec,
                "kluis_forget_removed_snapshots_total",
                "Snapshots removed by the repository's retention policy.",
                &["repository"]
            ),
            erase_snapshots: register!(
                IntCounterVec,
                "kluis_erase_snapshots_total",
                "Snapshots the repository's scheduled erasure (erase_after) erased.",
                &["repository"]
            ),
            erase_epochs: register!(
                IntCounterVec,
                "kluis_erase_epochs_destroyed_total",
                "Months whose keys the repository's scheduled erasure destroyed.",
                &["repository"]
            ),
            erase_before: register!(
                GaugeVec,
                "kluis_erase_before_timestamp_seconds",
                "Everything before this time was erased by the repository's last scheduled erasure (Unix time).",
                &["repository"]
            ),
            copy_last_run: register!(
                GaugeVec,
                "kluis_copy_last_run_timestamp_seconds",
                "When the copy rule's last run ended, successful or not (Unix time).",
                &["copy"]
            ),
            copy_last_success: register!(
                GaugeVec,
                "kluis_copy_last_success_timestamp_seconds",
                "When the copy rule's last successful run ended (Unix time).",
                &["copy"]
            ),
            copy_duration: register!(
                GaugeVec,
                "kluis_copy_last_duration_seconds",
                "How long the copy rule's last run took.",
                &["copy"]
            ),
            copy_runs: register!(
                IntCounterVec,
                "kluis_copy_runs_total",
                "Copy runs that ended, by result (success, failure).",
                &["copy", "result"]
            ),
            copy_failures: register!(
                IntCounterVec,
                "kluis_copy_failures_total",
                "Failed copy runs by reason (storage, corrupt, timeout, interrupted, ...).",
                &["copy", "reason"]
            ),
            copy_snapshots: register!(
                IntCounterVec,
                "kluis_copy_snapshots_total",
                "Snapshots copied to the destination.",
                &["copy"]
            ),
            copy_uploaded_bytes: register!(
                IntCounterVec,
                "kluis_copy_uploaded_bytes_total",
                "Bytes uploaded to the destination (only what it lacked, compressed and encrypted).",
                &["copy"]
            ),
            copy_read_bytes: register!(
                IntCounterVec,
                "kluis_copy_read_bytes_total",
                "Plaintext bytes of the copied snapshots read from the source.",
                &["copy"]
            ),
            copy_info: register!(
                IntGaugeVec,
                "kluis_copy_info",
                "Always 1: which repository a copy rule copies from and to.",
                &["copy", "from", "to"]
            ),
            repository_info: register!(
                IntGaugeVec,
                "kluis_repository_info",
                "Always 1: where a repository's data lives (store kind file or s3, endpoint, region).",
                &["repository", "store", "endpoint", "region"]
            ),
            drill_last_run: register!(
                GaugeVec,
                "kluis_drill_last_run_timestamp_seconds",
                "When the job's last restore drill from the repository ended, passed or not (Unix time).",
                &["job", "repository"]
            ),
            drill_last_success: register!(
                GaugeVec,
                "kluis_drill_last_success_timestamp_seconds",
                "When the job's last passing restore drill from the repository ended (Unix time); read from the repository's drill reports at start-up.",
                &["job", "repository"]
            ),
            drill_duration: register!(
                GaugeVec,
                "kluis_drill_last_duration_seconds",
                "The measured recovery time of the last drill: how long restoring the newest snapshot took.",
                &["job", "repository"]
            ),
            drill_last_result: register!(
                IntGaugeVec,
                "kluis_drill_last_result",
                "1 if the last drill passed every check, 0 if it failed.",
                &["job", "repository"]
            ),
            drill_runs: register!(
                IntCounterVec,
                "kluis_drill_runs_total",
                "Snapshots drilled, by result (success, failure).",
                &["job", "repository", "result"]
            ),
            drill_failures: register!(
                IntCounterVec,
                "kluis_drill_failures_total",
                "Failed drills by reason (corrupt, restore, rows, assertion, budget, scratch, storage, timeout, other).",
                &["job", "repository", "reason"]
            ),
            registry,
        }
    }

    /// The page `/metrics` serves.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `reason` label of a failure.
pub fn failure_reason(e: &Error) -> &'static str {
    match e {
        Error::SourceFailed(_) => "source",
        Error::Store { .. } | Error::Io { .. } | Error::RepositoryNotFound { .. } => "storage",
        Error::Corrupt { .. } | Error::MissingBlob(_) | Error::MissingObject { .. } => "corrupt",
        Error::Interrupted => "interrupted",
        Error::InvalidInput(_)
        | Error::InsecureSecretFile { .. }
        | Error::SecretFileOwner { .. }
        | Error::WrongPassword { .. } => "config",
        _ => "other",
    }
}
