//! The schedule as pure functions of time: no clock, no storage, no randomness but what the
//! caller passes in. The daemon and `kluis status` both plan with these.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use super::Work;
use crate::config::{Drill, Job, Loaded};
use crate::schedule::Schedule;

/// What the plan needs to know of the past, read from the repositories (so it survives
/// restarts and moves with the configuration to another host).
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Each job's newest snapshot, by job name.
    pub job_last: BTreeMap<String, Timestamp>,
    /// Each drill's newest report, by drill name.
    pub drill_last: BTreeMap<String, Timestamp>,
}

impl History {
    /// Notes `job`'s newest snapshot among `snapshots` (those of its repository).
    pub fn saw_job(&mut self, job: &Job, snapshots: &[crate::snapshot::Snapshot]) {
        if let Some(s) = crate::jobs::last_of(job, snapshots) {
            self.job_last.insert(job.name.clone(), s.time);
        }
    }

    /// Notes `drill`'s newest report among `reports` (its repository's drill history).
    pub fn saw_drill(&mut self, drill: &Drill, reports: &[crate::drill::DrillReport]) {
        let last = reports
            .iter()
            .filter(|r| r.drill == drill.name)
            .map(|r| r.finished)
            .max();
        if let Some(t) = last {
            self.drill_last.insert(drill.name.clone(), t);
        }
    }
}

/// Whether a run missed while the daemon was down is made up at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// From the last success (none: it never ran, so it runs now): a run due after it and
    /// within the catch-up window runs now. Jobs and drills.
    Last(Option<Timestamp>),
    /// No record of the last run: a run due within the catch-up window runs now. Copies (a
    /// monthly copy missed would otherwise wait a month; running one again is harmless).
    Window,
    /// Never made up: the next scheduled time. Maintenance.
    Never,
}

/// A task's first run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// At start-up (a missed run made up, or a first run).
    Now,
    /// At its next scheduled time (before jitter).
    At(Timestamp),
}

/// The first time `schedule` fires after `after`; a schedule that never fires again: the end
/// of time.
pub fn next_after(schedule: &Schedule, tz: &TimeZone, after: Timestamp) -> Timestamp {
    schedule.next_after(after, tz).unwrap_or(Timestamp::MAX)
}

/// A task's first run at `now` by its catch-up rule, within a catch-up `window`.
pub fn first_run(
    schedule: &Schedule,
    tz: &TimeZone,
    catch_up: CatchUp,
    now: Timestamp,
    window: Duration,
) -> Due {
    let window = SignedDuration::try_from(window).unwrap_or(SignedDuration::ZERO);
    let from = now.checked_sub(window).unwrap_or(Timestamp::MIN);
    let since = match catch_up {
        CatchUp::Last(None) => return Due::Now,
        CatchUp::Last(Some(last)) => last.max(from),
        CatchUp::Window => from,
        CatchUp::Never => return Due::At(next_after(schedule, tz, now)),
    };
    match schedule.next_after(since, tz) {
        Some(due) if due <= now => Due::Now,
        _ => Due::At(next_after(schedule, tz, now)),
    }
}

/// `t` delayed by `nanos` of jitter (never past the end of time).
pub fn jittered(t: Timestamp, nanos: i64) -> Timestamp {
    t.checked_add(SignedDuration::from_nanos(nanos))
        .unwrap_or(t)
}

/// Every task of `config` with its first run: jobs, then maintenance, copies and drills (the
/// order they start in when due at once). `jitter` draws a delay of up to its argument, in
/// nanoseconds (the daemon: [`jitter_nanos`]; tests: fixed).
pub fn plan(
    config: &Loaded,
    history: &History,
    now: Timestamp,
    mut jitter: impl FnMut(Duration) -> i64,
) -> Vec<(Work, Timestamp)> {
    let work = config
        .jobs
        .iter()
        .map(|j| {
            let last = history.job_last.get(&j.name).copied();
            (Work::Backup(j.clone()), CatchUp::Last(last))
        })
        .chain(
            config
                .prunes
                .iter()
                .map(|m| (Work::Maintenance(m.clone()), CatchUp::Never)),
        )
        .chain(
            config
                .copies
                .iter()
                .map(|c| (Work::Copy(c.clone()), CatchUp::Window)),
        )
        .chain(config.drills.iter().map(|d| {
            let last = history.drill_last.get(&d.name).copied();
            (Work::Drill(d.clone()), CatchUp::Last(last))
        }));
    work.map(|(work, catch_up)| {
        let first = first_run(
            work.schedule(),
            &config.time_zone,
            catch_up,
            now,
            config.daemon.catch_up,
        );
        let next = match first {
            Due::Now => now,
            Due::At(t) => jittered(t, jitter(work.jitter())),
        };
        (work, next)
    })
    .collect()
}

/// The run after one that started at `now`: the schedule's next time plus jitter.
pub fn next_run(work: &Work, tz: &TimeZone, now: Timestamp, jitter_nanos: i64) -> Timestamp {
    jittered(next_after(work.schedule(), tz, now), jitter_nanos)
}

/// The keys whose next run is due at `now`, in key order.
pub fn due<K: Clone + Ord>(
    nexts: impl IntoIterator<Item = (K, Timestamp)>,
    now: Timestamp,
) -> Vec<K> {
    let mut due: Vec<K> = nexts
        .into_iter()
        .filter(|(_, next)| *next <= now)
        .map(|(k, _)| k)
        .collect();
    due.sort();
    due
}

/// How long to sleep at `now` before the earliest of `nexts`: at most a minute (so a clock
/// that jumps is noticed), nothing if one is past.
pub fn wake_in(nexts: impl IntoIterator<Item = Timestamp>, now: Timestamp) -> Duration {
    let cap = Duration::from_secs(60);
    nexts
        .into_iter()
        .min()
        .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO))
        .unwrap_or(cap)
        .min(cap)
}

/// A random delay of up to `max`, in nanoseconds.
pub fn jitter_nanos(max: Duration) -> i64 {
    if max.is_zero() {
        return 0;
    }
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0;
    }
    let nanos = max.as_nanos().min(i64::MAX as u128) as u64;
    (u64::from_le_bytes(b) % nanos.max(1)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn daily() -> Schedule {
        Schedule::parse("daily at 02:30").unwrap()
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn a_task_that_never_ran_runs_now() {
        let now = at("2026-12-03T12:00:00Z");
        let first = first_run(&daily(), &TimeZone::UTC, CatchUp::Last(None), now, DAY);
        assert_eq!(first, Due::Now);
    }

    #[test]
    fn a_run_missed_within_the_window_is_made_up_once() {
        let now = at("2026-12-03T12:00:00Z");
        // Last success two days ago; 02:30 today was missed and is within a day.
        let last = Some(at("2026-12-01T02:31:00Z"));
        let first = first_run(&daily(), &TimeZone::UTC, CatchUp::Last(last), now, DAY);
        assert_eq!(first, Due::Now);
        // Today's run happened: tomorrow.
        let last = Some(at("2026-12-03T02:31:00Z"));
        let first = first_run(&daily(), &TimeZone::UTC, CatchUp::Last(last), now, DAY);
        assert_eq!(first, Due::At(at("2026-12-04T02:30:00Z")));
    }

    #[test]
    fn a_run_missed_before_the_window_waits_for_its_time() {
        let now = at("2026-12-03T12:00:00Z");
        let last = Some(at("2026-11-01T02:31:00Z"));
        let monthly = Schedule::parse("monthly on 1 at 04:00").unwrap();
        // Due 2026-12-01 04:00: more than an hour ago.
        let hour = Duration::from_secs(3600);
        let first = first_run(&monthly, &TimeZone::UTC, CatchUp::Last(last), now, hour);
        assert_eq!(first, Due::At(at("2027-01-01T04:00:00Z")));
        // Within three days it is made up.
        let first = first_run(&monthly, &TimeZone::UTC, CatchUp::Last(last), now, 3 * DAY);
        assert_eq!(first, Due::Now);
    }

    #[test]
    fn copies_catch_up_by_the_window_and_maintenance_never() {
        let now = at("2026-12-01T09:00:00Z");
        let monthly = Schedule::parse("monthly on 1 at 04:00").unwrap();
        let tz = TimeZone::UTC;
        assert_eq!(
            first_run(&monthly, &tz, CatchUp::Window, now, DAY),
            Due::Now
        );
        assert_eq!(
            first_run(
                &monthly,
                &tz,
                CatchUp::Window,
                now,
                Duration::from_secs(3600)
            ),
            Due::At(at("2027-01-01T04:00:00Z"))
        );
        assert_eq!(
            first_run(&monthly, &tz, CatchUp::Never, now, DAY),
            Due::At(at("2027-01-01T04:00:00Z"))
        );
    }

    #[test]
    fn a_schedule_in_a_zone_is_read_in_that_zone() {
        let tz = TimeZone::get("Europe/Amsterdam").unwrap();
        let now = at("2026-12-03T12:00:00Z");
        let last = Some(at("2026-12-03T01:31:00Z")); // 02:31 in Amsterdam: today's ran
        let first = first_run(&daily(), &tz, CatchUp::Last(last), now, DAY);
        assert_eq!(first, Due::At(at("2026-12-04T01:30:00Z")));
    }

    #[test]
    fn due_and_wake() {
        let now = at("2026-12-03T12:00:00Z");
        let nexts = [
            ("b", now),
            ("a", at("2026-12-03T11:00:00Z")),
            ("c", at("2026-12-03T12:00:10Z")),
        ];
        assert_eq!(due(nexts, now), vec!["a", "b"]);
        assert_eq!(
            wake_in([at("2026-12-03T12:00:10Z")], now),
            Duration::from_secs(10)
        );
        assert_eq!(wake_in([at("2026-12-03T11:00:00Z")], now), Duration::ZERO);
        assert_eq!(
            wake_in([at("2026-12-04T12:00:00Z")], now),
            Duration::from_secs(60)
        );
        assert_eq!(wake_in([], now), Duration::from_secs(60));
        assert_eq!(wake_in([Timestamp::MAX], now), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        assert_eq!(jitter_nanos(Duration::ZERO), 0);
        let max = Duration::from_secs(600);
        let draws: Vec<i64> = (0..1000).map(|_| jitter_nanos(max)).collect();
        assert!(
            draws
                .iter()
                .all(|&j| (0..max.as_nanos() as i64).contains(&j))
        );
        // Spread out, not stuck at one value.
        let low = draws
            .iter()
            .filter(|&&j| j < max.as_nanos() as i64 / 2)
            .count();
        assert!((300..700).contains(&low), "{low} of 1000 in the lower half");
        assert_eq!(jittered(Timestamp::MAX, 5), Timestamp::MAX);
    }

    #[test]
    fn a_whole_configuration_is_planned_in_order_with_jitter_on_jobs_only() {
        let config = Loaded::parse(
            r#"
            [daemon]
            time_zone = "UTC"
            catch_up = "1h"
            [repositories.r]
            url = "/nonexistent/kluis-plan-test"
            key_file = "/nonexistent/key"
            prune = { schedule = "daily at 05:00" }
            [repositories.far]
            url = "/nonexistent/kluis-plan-test-far"
            key_file = "/nonexistent/key"
            [jobs.a]
            repository = "r"
            paths = ["/etc"]
            schedule = "daily at 02:30"
            jitter = "10m"
            [jobs.b]
            repository = "r"
            paths = ["/etc"]
            schedule = "hourly at :15"
            [copies.monthly]
            from = "r"
            to = "far"
            schedule = "monthly on 1 at 04:00"
            [drills.a]
            schedule = "daily at 06:00"
            "#,
            "test",
        )
        .unwrap();
        let now = at("2026-12-03T12:00:00Z");
        let mut history = History::default();
        history
            .job_last
            .insert("a".into(), at("2026-12-03T02:40:00Z"));
        history
            .drill_last
            .insert("a".into(), at("2026-12-03T06:01:00Z"));
        let planned = plan(&config, &history, now, |max| {
            i64::try_from(max.as_nanos() / 2).unwrap()
        });
        let got: Vec<(String, Timestamp)> = planned.iter().map(|(w, t)| (w.label(), *t)).collect();
        assert_eq!(
            got,
            vec![
                ("job a".into(), at("2026-12-04T02:35:00Z")),
                // Never ran: now.
                ("job b".into(), now),
                (
                    "repository r: maintenance".into(),
                    at("2026-12-04T05:00:00Z")
                ),
                ("copy monthly".into(), at("2027-01-01T04:00:00Z")),
                ("drill a".into(), at("2026-12-04T06:00:00Z")),
            ]
        );
    }
}
