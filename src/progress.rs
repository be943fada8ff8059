//! Progress counters shared between a running operation and whoever displays them.
//!
//! The engine only counts (relaxed atomics, a few per chunk); the command line renders a line
//! on a terminal, and the daemon later turns the same counters into metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of a backup, restore or check in progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read from the source (backup) or written to the target (restore).
    pub bytes: AtomicU64,
    /// Total bytes expected, when known (restore, check); 0 when not.
    pub total_bytes: AtomicU64,
    /// Bytes of new blobs (backup).
    pub new_bytes: AtomicU64,
    /// Bytes written to or read from the repository.
    pub stored_bytes: AtomicU64,
    /// Files (backup, directory restore) or tables (database restore) done.
    pub files: AtomicU64,
    /// How many `files` there are in all, when known; 0 when not.
    pub total_files: AtomicU64,
    pub errors: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A flag an operation polls to stop early (SIGINT, a daemon timeout, a failed upload).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Completes once cancelled (checked every 50 ms), for a `select!` beside a wait that
    /// would otherwise not notice.
    pub async fn cancelled(&self) {
        while !self.is_cancelled() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
