//! Time that every host agrees on: the store's.
//!
//! Prune's protocol compares times written by different hosts (when a mark was made, when a
//! lease was last renewed, how long ago a sweep finished). Wall clocks of hosts disagree: a VM
//! without NTP can be hours off. So the protocol never trusts a timestamp a host wrote into an
//! object. It uses the time the *store* gave the object (S3 `Last-Modified`, a local file's
//! mtime): one clock for everybody. A host learns the store's "now" by writing a small object
//! and reading its time back ([`store_now`]).
//!
//! Durations a single process measures (how long a backup has been running) use the host's
//! boot-time clock ([`Stopwatch`]), which no wall-clock step moves and which keeps counting
//! while the machine is suspended.

use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;

use crate::error::Result;
use crate::id::ObjectId;
use crate::object::{Kind, name};
use crate::repository::Repository;

/// How far a store time read back may be from the moment it names: HTTP dates (`HEAD`) are
/// whole seconds, and the time is taken when the store received the request.
pub const SLACK: Duration = Duration::from_secs(2);

/// `t + d`, saturating.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// `t - d`, saturating.
pub fn sub(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(Timestamp::MIN)
}

/// `t` as a [`std::time::SystemTime`] (before 1970: the epoch).
pub fn system_time(t: Timestamp) -> std::time::SystemTime {
    let since = Duration::try_from(t.duration_since(Timestamp::UNIX_EPOCH)).unwrap_or_default();
    std::time::UNIX_EPOCH
        .checked_add(since)
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// The store's current time, bracketed: the store's time is at least `earliest` and at most
/// `latest` at the moment [`store_now`] returns (plus the time since, which
/// [`StoreNow::latest`] adds).
#[derive(Debug, Clone, Copy)]
pub struct StoreNow {
    /// The time the store gave the clock object (never later than now).
    pub earliest: Timestamp,
    watch: Stopwatch,
}

impl StoreNow {
    /// A time the store's clock has certainly not passed yet.
    pub fn latest(&self) -> Timestamp {
        add(self.earliest, SLACK + self.watch.elapsed())
    }
}

/// Reads the store's clock: puts `prune/clock/<id>` (sealed, empty), reads its time, deletes
/// it. Three requests; a crash between them leaves a small object that prune removes.
pub async fn store_now(repo: &Repository) -> Result<StoreNow> {
    let watch = Stopwatch::start();
    let object = name::prune_object(name::PRUNE_CLOCK, &ObjectId::random());
    let sealed: Bytes = repo.seal_master(Kind::Prune, &object, b"")?;
    repo.store().put(&object, sealed).await?;
    let earliest = repo.store().modified(&object).await;
    repo.store().delete(&object).await?;
    Ok(StoreNow {
        earliest: earliest?,
        watch,
    })
}

/// Elapsed time on the host's boot-time clock (`CLOCK_BOOTTIME`): monotonic, and counting
/// while the host is suspended, unlike [`std::time::Instant`].
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    start: Duration,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch { start: boottime() }
    }

    pub fn elapsed(&self) -> Duration {
        boottime().saturating_sub(self.start)
    }
}

fn boottime() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stopwatch_counts_forward() {
        let w = Stopwatch::start();
        std::thread::sleep(Duration::from_millis(20));
        let e = w.elapsed();
        assert!(
            e >= Duration::from_millis(20) && e < Duration::from_secs(5),
            "{e:?}"
        );
    }

    #[test]
    fn saturating_arithmetic() {
        assert_eq!(add(Timestamp::MAX, Duration::from_secs(1)), Timestamp::MAX);
        assert_eq!(sub(Timestamp::MIN, Duration::from_secs(1)), Timestamp::MIN);
        let t = Timestamp::from_second(1_000).unwrap();
        assert_eq!(sub(add(t, SLACK), SLACK), t);
    }
}
