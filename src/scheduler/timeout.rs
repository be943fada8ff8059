//! The one run-with-timeout every scheduled task goes through.

use std::future::Future;
use std::time::Duration;

use crate::progress::Cancel;

/// How long a run cancelled at its timeout gets to stop before it is abandoned: it stops at
/// its next step; one stuck in storage is left behind.
pub const STOP_WAIT: Duration = Duration::from_secs(60);

/// A run's result, or its timeout.
#[derive(Debug, PartialEq, Eq)]
pub enum Timed<T> {
    Done(T),
    /// Cancelled at its timeout; `stopped`: it then stopped within [`STOP_WAIT`] (else it was
    /// abandoned).
    TimedOut {
        stopped: bool,
    },
}

/// Runs `run` for at most `timeout`; past it, sets `cancel` (which `run` polls) and waits up
/// to [`STOP_WAIT`] for it to stop.
pub async fn with_timeout<F: Future>(
    run: F,
    timeout: Duration,
    cancel: &Cancel,
) -> Timed<F::Output> {
    tokio::pin!(run);
    match tokio::time::timeout(timeout, &mut run).await {
        Ok(r) => Timed::Done(r),
        Err(_) => {
            cancel.cancel();
            let stopped = tokio::time::timeout(STOP_WAIT, run).await.is_ok();
            Timed::TimedOut { stopped }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_run_within_its_timeout_is_left_alone() {
        let cancel = Cancel::new();
        let run = async {
            tokio::time::sleep(Duration::from_secs(59)).await;
            7
        };
        let got = with_timeout(run, Duration::from_secs(60), &cancel).await;
        assert_eq!(got, Timed::Done(7));
        assert!(!cancel.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_past_its_timeout_is_cancelled_and_waited_for() {
        let cancel = Cancel::new();
        let started = Instant::now();
        let polled = cancel.clone();
        // Checks its flag every 5 s, as a backup checks between packs.
        let run = async move {
            loop {
                if polled.is_cancelled() {
                    return "stopped";
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        };
        let got = with_timeout(run, Duration::from_secs(600), &cancel).await;
        assert_eq!(got, Timed::TimedOut { stopped: true });
        assert!(cancel.is_cancelled());
        let took = started.elapsed();
        assert!(
            (Duration::from_secs(600)..=Duration::from_secs(605)).contains(&took),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_ignores_its_cancellation_is_abandoned_after_a_minute() {
        let cancel = Cancel::new();
        let started = Instant::now();
        let run = std::future::pending::<()>();
        let got = with_timeout(run, Duration::from_secs(10), &cancel).await;
        assert_eq!(got, Timed::TimedOut { stopped: false });
        assert_eq!(started.elapsed(), Duration::from_secs(10) + STOP_WAIT);
    }
}
