//! Retention: which snapshots a policy keeps, and the rule that decided.
//!
//! Snapshots are grouped by host and name (one database, one job); each group is decided on
//! its own. Within a group, newest first:
//! - `keep_last N`: the N newest;
//! - `keep_hourly/daily/weekly/monthly/yearly N`: the newest snapshot of each of the N newest
//!   hours (days, ISO weeks, months, years) that have one, by calendar in the policy's zone;
//! - `keep_within D`: every snapshot taken within D before the group's newest (relative to the
//!   newest, not to now, so backups that stop do not age everything away);
//! - `max_age D`: nothing older than D before *now* survives, whatever keeps it: the storage
//!   limit the AVG/GDPR asks for. It wins over every keep rule.
//!
//! A policy with no keep rule keeps everything that `max_age` allows; a policy with neither is
//! refused rather than read as "remove everything".

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::object::Epoch;
use crate::snapshot::Snapshot;

/// A retention policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    #[serde(default, with = "opt_human")]
    pub keep_within: Option<Duration>,
    #[serde(default, with = "opt_human")]
    pub max_age: Option<Duration>,
}

/// Optional durations as humantime strings (also for the configuration file).
pub(crate) mod opt_human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(&s)
                .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e})")))
        })
        .transpose()
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

impl Policy {
    fn has_keep_rule(&self) -> bool {
        self.keep_last > 0
            || self.keep_hourly > 0
            || self.keep_daily > 0
            || self.keep_weekly > 0
            || self.keep_monthly > 0
            || self.keep_yearly > 0
            || self.keep_within.is_some()
    }

    /// Refuses a policy that says nothing.
    pub fn validate(&self) -> Result<()> {
        if !self.has_keep_rule() && self.max_age.is_none() {
            return Err(Error::invalid(
                "a retention policy needs a keep rule (keep-last, keep-daily, ...) or max-age; \
                 an empty one would remove every snapshot",
            ));
        }
        Ok(())
    }
}

/// The calendar bucket (hour, day, week, month or year) a local time falls in.
type BucketOf = fn(&jiff::civil::DateTime) -> (i16, i16, i16, i16);

/// What the policy decided for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub time: Timestamp,
    pub host: String,
    pub name: String,
    pub keep: bool,
    /// The rules that keep it (`last 1`, `daily 3`, `within 7d`), or why it goes
    /// (`older than max-age 30d`, `no rule keeps it`).
    pub reasons: Vec<String>,
}

/// Every snapshot kept (no retention policy), grouped and ordered as [`decide`] does.
fn keep_all(snapshots: &[Snapshot]) -> Vec<Decision> {
    let mut all: Vec<&Snapshot> = snapshots.iter().collect();
    all.sort_by(|a, b| {
        (a.host.as_str(), a.name.as_str())
            .cmp(&(b.host.as_str(), b.name.as_str()))
            .then(b.time.cmp(&a.time))
            .then(b.id.to_hex().cmp(&a.id.to_hex()))
    });
    all.into_iter()
        .map(|s| Decision {
            id: s.id.to_hex(),
            time: s.time,
            host: s.host.clone(),
            name: s.name.clone(),
            keep: true,
            reasons: vec!["no retention policy".into()],
        })
        .collect()
}

/// Decides every snapshot, as of `now`, with calendar buckets in `tz`. The result is grouped
/// by (host, name) and newest first within each group.
pub fn decide(
    snapshots: &[Snapshot],
    policy: &Policy,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<Vec<Decision>> {
    policy.validate()?;
    let mut groups: BTreeMap<(&str, &str), Vec<&Snapshot>> = BTreeMap::new();
    for s in snapshots {
        groups
            .entry((s.host.as_str(), s.name.as_str()))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        group.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.to_hex().cmp(&a.id.to_hex())));
        let newest = group[0].time;
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); group.len()];
        for (i, r) in reasons
            .iter_mut()
            .enumerate()
            .take(policy.keep_last as usize)
        {
            r.push(format!("last {}", i + 1));
        }
        let buckets: [(&str, u32, BucketOf); 5] = [
            ("hourly", policy.keep_hourly, |d| {
                (d.year(), d.month() as i16, d.day() as i16, d.hour() as i16)
            }),
            ("daily", policy.keep_daily, |d| {
                (d.year(), d.month() as i16, d.day() as i16, 0)
            }),
            ("weekly", policy.keep_weekly, |d| {
                let w = d.date().iso_week_date();
                (w.year(), w.week() as i16, 0, 0)
            }),
            ("monthly", policy.keep_monthly, |d| {
                (d.year(), d.month() as i16, 0, 0)
            }),
            ("yearly", policy.keep_yearly, |d| (d.year(), 0, 0, 0)),
        ];
        for (label, n, bucket_of) in buckets {
            let mut seen = 0u32;
            let mut last = None;
            for (i, s) in group.iter().enumerate() {
                if seen == n {
                    break;
                }
                let b = bucket_of(&tz.to_datetime(s.time));
                if last != Some(b) {
                    last = Some(b);
                    seen += 1;
                    reasons[i].push(format!("{label} {seen}"));
                }
            }
        }
        if let Some(within) = policy.keep_within {
            let d = SignedDuration::try_from(within).unwrap_or(SignedDuration::MAX);
            for (i, s) in group.iter().enumerate() {
                if newest.duration_since(s.time) <= d {
                    reasons[i].push(format!("within {}", show(within)));
                }
            }
        }
        if !policy.has_keep_rule() {
            for r in &mut reasons {
                r.push("no keep rule: kept unless too old".into());
            }
        }
        for (s, mut why) in group.into_iter().zip(reasons) {
            let too_old = policy.max_age.is_some_and(|max| {
                let max = SignedDuration::try_from(max).unwrap_or(SignedDuration::MAX);
                now.duration_since(s.time) > max
            });
            let keep = !why.is_empty() && !too_old;
            if too_old {
                why = vec![format!(
                    "older than max-age {}",
                    show(policy.max_age.unwrap_or_default())
                )];
            } else if why.is_empty() {
                why.push("no rule keeps it".into());
            }
            out.push(Decision {
                id: s.id.to_hex(),
                time: s.time,
                host: s.host.clone(),
                name: s.name.clone(),
                keep,
                reasons: why,
            });
        }
    }
    Ok(out)
}

/// A duration as people write retention: whole days as `30d`, else humantime's form.
pub fn show(d: Duration) -> String {
    let secs = d.as_secs();
    if secs > 0 && secs % 86400 == 0 && d.subsec_nanos() == 0 {
        format!("{}d", secs / 86400)
    } else {
        humantime::format_duration(d).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;

    fn snap(n: u32, time: &str, host: &str, name: &str) -> Snapshot {
        let id = format!("{n:032x}").parse::<ObjectId>().unwrap();
        Snapshot::for_test(id, time, host, name)
    }

    /// A nightly database backup at 02:30 UTC from 2026-01-01 to 2026-03-31, plus a few extra
    /// runs on some days.
    fn nightly() -> Vec<Snapshot> {
        let mut out = Vec::new();
        let mut day = jiff::civil::date(2026, 1, 1);
        let mut n = 0;
        while day <= jiff::civil::date(2026, 3, 31) {
            n += 1;
            out.push(snap(n, &format!("{day}T02:30:00Z"), "db1", "billing"));
            if day.day() == 15 {
                n += 1;
                out.push(snap(n, &format!("{day}T14:00:00Z"), "db1", "billing"));
            }
            day = day.tomorrow().unwrap();
        }
        out
    }

    fn kept(decisions: &[Decision]) -> Vec<String> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.time.to_string())
            .collect()
    }

    fn policy(f: impl FnOnce(&mut Policy)) -> Policy {
        let mut p = Policy::default();
        f(&mut p);
        p
    }

    const NOW: &str = "2026-04-01T00:00:00Z";

    #[test]
    fn table_of_rules() {
        let utc = TimeZone::UTC;
        let now: Timestamp = NOW.parse().unwrap();
        let all = nightly();
        let days = |d: u64| Some(Duration::from_secs(d * 86400));
        let cases: Vec<(&str, Policy, Vec<&str>)> = vec![
            (
                "keep-last 2",
                policy(|p| p.keep_last = 2),
                vec!["2026-03-31T02:30:00Z", "2026-03-30T02:30:00Z"],
            ),
            (
                "keep-daily 2 keeps the newest of a day with two runs",
                policy(|p| p.keep_daily = 2),
                vec!["2026-03-31T02:30:00Z", "2026-03-30T02:30:00Z"],
            ),
            (
                "keep-daily 17: the 15th's afternoon run, not its night run",
                policy(|p| p.keep_daily = 17),
                (15..=31)
                    .rev()
                    .map(|d| {
                        if d == 15 {
                            "2026-03-15T14:00:00Z"
                        } else {
                            Box::leak(format!("2026-03-{d:02}T02:30:00Z").into_boxed_str())
                        }
                    })
                    .collect(),
            ),
            (
                "keep-monthly 2",
                policy(|p| p.keep_monthly = 2),
                vec!["2026-03-31T02:30:00Z", "2026-02-28T02:30:00Z"],
            ),
            (
                "keep-yearly 5 with one year of data",
                policy(|p| p.keep_yearly = 5),
                vec!["2026-03-31T02:30:00Z"],
            ),
            (
                // ISO weeks: 2026-03-30 is a Monday, so the 29th ends the week before.
                "keep-weekly 3",
                policy(|p| p.keep_weekly = 3),
                vec![
                    "2026-03-31T02:30:00Z",
                    "2026-03-29T02:30:00Z",
                    "2026-03-22T02:30:00Z",
                ],
            ),
            (
                "keep-hourly 2 over nightly runs is the two newest",
                policy(|p| p.keep_hourly = 2),
                vec!["2026-03-31T02:30:00Z", "2026-03-30T02:30:00Z"],
            ),
            (
                "keep-within 2d is relative to the newest snapshot",
                policy(|p| p.keep_within = days(2)),
                vec![
                    "2026-03-31T02:30:00Z",
                    "2026-03-30T02:30:00Z",
                    "2026-03-29T02:30:00Z",
                ],
            ),
            (
                "max-age wins over keep-last",
                policy(|p| {
                    p.keep_last = 100;
                    p.max_age = days(3);
                }),
                vec![
                    "2026-03-31T02:30:00Z",
                    "2026-03-30T02:30:00Z",
                    "2026-03-29T02:30:00Z",
                ],
            ),
            (
                "max-age wins over keep-monthly",
                policy(|p| {
                    p.keep_monthly = 12;
                    p.max_age = days(40);
                }),
                vec!["2026-03-31T02:30:00Z", "2026-02-28T02:30:00Z"],
            ),
            (
                "max-age alone keeps everything younger",
                policy(|p| p.max_age = days(2)),
                vec!["2026-03-31T02:30:00Z", "2026-03-30T02:30:00Z"],
            ),
            (
                "rules add up: last 1 + monthly 3",
                policy(|p| {
                    p.keep_last = 1;
                    p.keep_monthly = 3;
                }),
                vec![
                    "2026-03-31T02:30:00Z",
                    "2026-02-28T02:30:00Z",
                    "2026-01-31T02:30:00Z",
                ],
            ),
        ];
        for (label, p, want) in cases {
            let d = decide(&all, &p, now, &utc).unwrap();
            assert_eq!(d.len(), all.len(), "{label}: every snapshot is decided");
            assert_eq!(kept(&d), want, "{label}");
        }
    }

    #[test]
    fn reasons_name_the_rules() {
        let now: Timestamp = NOW.parse().unwrap();
        let p = policy(|p| {
            p.keep_last = 1;
            p.keep_daily = 2;
            p.max_age = Some(Duration::from_secs(60 * 86400));
        });
        let d = decide(&nightly(), &p, now, &TimeZone::UTC).unwrap();
        assert_eq!(d[0].reasons, ["last 1", "daily 1"]);
        assert_eq!(d[1].reasons, ["daily 2"]);
        assert_eq!(d[2].reasons, ["no rule keeps it"]);
        assert!(!d[2].keep);
        let oldest = d.last().unwrap();
        assert_eq!(oldest.reasons, ["older than max-age 60d"]);
        assert!(!oldest.keep);
    }

    #[test]
    fn groups_are_decided_apart() {
        let now: Timestamp = NOW.parse().unwrap();
        let snaps = vec![
            snap(1, "2026-03-01T00:00:00Z", "db1", "billing"),
            snap(2, "2026-03-02T00:00:00Z", "db1", "billing"),
            snap(3, "2026-03-01T00:00:00Z", "db2", "billing"),
            snap(4, "2026-03-01T00:00:00Z", "db1", "shop"),
        ];
        let d = decide(&snaps, &policy(|p| p.keep_last = 1), now, &TimeZone::UTC).unwrap();
        let kept: Vec<u32> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| u32::from_str_radix(&d.id, 16).unwrap())
            .collect();
        assert_eq!(kept, [2, 4, 3]);
    }

    #[test]
    fn empty_one_and_nothing_policies() {
        let now: Timestamp = NOW.parse().unwrap();
        assert!(
            decide(&[], &policy(|p| p.keep_last = 1), now, &TimeZone::UTC)
                .unwrap()
                .is_empty()
        );
        let one = vec![snap(1, "2026-03-01T00:00:00Z", "h", "n")];
        let d = decide(&one, &policy(|p| p.keep_daily = 7), now, &TimeZone::UTC).unwrap();
        assert!(d[0].keep);
        // The only snapshot, too old: removed. The storage limit is the law.
        let d = decide(
            &one,
            &policy(|p| {
                p.keep_last = 1;
                p.max_age = Some(Duration::from_secs(86400));
            }),
            now,
            &TimeZone::UTC,
        )
        .unwrap();
        assert!(!d[0].keep);
        assert!(decide(&one, &Policy::default(), now, &TimeZone::UTC).is_err());
    }

    #[test]
    fn days_follow_the_zone() {
        // 23:30 UTC on 1 March is already 2 March in Amsterdam.
        let snaps = vec![
            snap(1, "2026-03-01T22:30:00Z", "h", "n"),
            snap(2, "2026-03-01T23:30:00Z", "h", "n"),
        ];
        let now: Timestamp = NOW.parse().unwrap();
        let p = policy(|p| p.keep_daily = 5);
        let utc = decide(&snaps, &p, now, &TimeZone::UTC).unwrap();
        assert_eq!(utc.iter().filter(|d| d.keep).count(), 1);
        let ams = TimeZone::get("Europe/Amsterdam").unwrap();
        let local = decide(&snaps, &p, now, &ams).unwrap();
        assert_eq!(local.iter().filter(|d| d.keep).count(), 2);
    }
}

/// One row of `kluis retention report`: until when a snapshot can be recovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Expiry {
    pub id: String,
    pub time: Timestamp,
    pub host: String,
    pub name: String,
    /// What the policy decides today, and why.
    pub keep: bool,
    pub reasons: Vec<String>,
    /// When `max_age` (or the repository's `erase_after`) removes it at the latest (none
    /// without either).
    pub expires: Option<Timestamp>,
    /// The first maintenance run at or after `expires` forgets it; the first one after that
    /// plus the grace period deletes its last data. `None`: no upper bound (no `max_age`, or
    /// no maintenance schedule). Never after `key_destroyed_by`.
    pub unrecoverable_by: Option<Timestamp>,
    /// With `erase_after`: the maintenance run that destroys the keys of its month (the first
    /// at or after the month's end plus `erase_after`), after which no secret decrypts it.
    pub key_destroyed_by: Option<Timestamp>,
}

/// For each snapshot, the date by which it will be unrecoverable: its expiry under `max_age`
/// or `erase_after` (or now, if the policy already removes it), then the maintenance run that
/// forgets it, then the grace period, then the run that sweeps its data; and, with
/// `erase_after`, the run that destroys its month's keys.
pub fn report(
    snapshots: &[Snapshot],
    policy: Option<&Policy>,
    erase_after: Option<Duration>,
    grace: Duration,
    schedule: Option<&crate::schedule::Schedule>,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<Vec<Expiry>> {
    let everything = Policy::default();
    let decisions = match policy {
        Some(p) => decide(snapshots, p, now, tz)?,
        None => keep_all(snapshots),
    };
    let policy = policy.unwrap_or(&everything);
    let span = |d: Duration| jiff::SignedDuration::try_from(d).ok();
    let grace = span(grace).unwrap_or(jiff::SignedDuration::MAX);
    let run_at = |t: Timestamp| schedule.and_then(|s| s.next_after(t.max(now), tz));
    Ok(decisions
        .into_iter()
        .map(|d| {
            let after = |limit: Option<Duration>| {
                limit
                    .and_then(span)
                    .and_then(|m| d.time.checked_add(m).ok())
            };
            let expires = if !d.keep {
                Some(now)
            } else {
                [after(policy.max_age), after(erase_after)]
                    .into_iter()
                    .flatten()
                    .min()
            };
            let key_destroyed_by = erase_after
                .and_then(span)
                .and_then(|m| Epoch::of(d.time).end().checked_add(m).ok())
                .and_then(run_at);
            let swept = expires
                .and_then(run_at)
                .and_then(|f| f.checked_add(grace).ok())
                .and_then(run_at);
            let unrecoverable_by = [swept, key_destroyed_by].into_iter().flatten().min();
            Expiry {
                id: d.id,
                time: d.time,
                host: d.host,
                name: d.name,
                keep: d.keep,
                reasons: d.reasons,
                expires,
                unrecoverable_by,
                key_destroyed_by,
            }
        })
        .collect())
}
