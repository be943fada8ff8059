//! When jobs run: cron expressions, readable forms, and fixed intervals, in a time zone.
//!
//! Accepted forms (case-insensitive):
//! - `every 30s`, `every 15m`, `every 6h` (any humantime duration of at least a second):
//!   at multiples of the interval since the Unix epoch, so a restart does not shift them;
//! - `hourly at :15`, `daily at 02:30`, `weekly on sunday at 03:00`,
//!   `monthly on 1 at 04:00`: shorthands for the cron expressions they mean;
//! - five-field cron, `minute hour day-of-month month day-of-week`, with `*`, lists, ranges,
//!   steps, and month and day names (`*/15 9-17 * * mon-fri`). When both day fields are
//!   restricted, either may match (as in cron).
//!
//! Calendar schedules are evaluated in local (civil) time of the schedule's zone, one civil
//! minute at a time, so daylight saving is right: a time that does not exist on the spring
//! change-over day (02:30 in Europe/Amsterdam) runs once, at the same instant an hour later
//! on the clock (03:30); a time that happens twice on the autumn day runs once, the first time.

use std::fmt;
use std::time::Duration;

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{Disambiguation, TimeZone};
use jiff::{Timestamp, ToSpan};

use crate::error::{Error, Result};

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<Cron>),
}

/// The five fields of a cron expression, as sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: Vec<u8>,
    hours: Vec<u8>,
    days: Vec<u8>,
    months: Vec<u8>,
    weekdays: Vec<u8>,
    /// Whether the day-of-month and day-of-week fields start with `*` (`*`, `*/2`).
    any_day: bool,
    any_weekday: bool,
    text: String,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Schedule::Cron(c) => write!(f, "cron {}", c.text),
        }
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const FULL_WEEKDAYS: [&str; 7] = [
    "sunday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
];

/// The longest interval `every` takes.
const MAX_INTERVAL: Duration = Duration::from_secs(366 * 86400);

impl Schedule {
    /// Parses one of the forms in the module documentation.
    pub fn parse(text: &str) -> Result<Schedule> {
        let bad = |why: String| Error::invalid(format!("schedule {text:?}: {why}"));
        let lower = text.trim().to_ascii_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        match words.as_slice() {
            ["every", rest @ ..] => {
                let d =
                    humantime::parse_duration(&rest.join(" ")).map_err(|e| bad(e.to_string()))?;
                if d < Duration::from_secs(1) || d > MAX_INTERVAL {
                    return Err(bad(
                        "the interval must be at least one second and at most 366 days".into(),
                    ));
                }
                Ok(Schedule::Every(d))
            }
            ["hourly", "at", m] => {
                let m = m.trim_start_matches(':');
                let minute = parse_number(m, 0, 59).map_err(bad)?;
                Cron::parse(&format!("{minute} * * * *"), text)
                    .map(Box::new)
                    .map(Schedule::Cron)
            }
            ["daily", "at", t] => {
                let (h, m) = parse_clock(t).map_err(bad)?;
                Cron::parse(&format!("{m} {h} * * *"), text)
                    .map(Box::new)
                    .map(Schedule::Cron)
            }
            ["weekly", "on", day, "at", t] => {
                let (h, m) = parse_clock(t).map_err(bad)?;
                let day = WEEKDAYS
                    .iter()
                    .zip(FULL_WEEKDAYS)
                    .position(|(short, full)| *day == *short || *day == full)
                    .ok_or_else(|| bad(format!("{day:?} is not a day of the week")))?;
                Cron::parse(&format!("{m} {h} * * {day}"), text)
                    .map(Box::new)
                    .map(Schedule::Cron)
            }
            ["monthly", "on", day, "at", t] => {
                let (h, m) = parse_clock(t).map_err(bad)?;
                let day = parse_number(day, 1, 31).map_err(bad)?;
                Cron::parse(&format!("{m} {h} {day} * *"), text)
                    .map(Box::new)
                    .map(Schedule::Cron)
            }
            [_, _, _, _, _] => Cron::parse(&lower, text).map(Box::new).map(Schedule::Cron),
            _ => Err(bad(
                "expected \"every 6h\", \"hourly at :15\", \"daily at 02:30\", \"weekly on \
                 sunday at 03:00\", \"monthly on 1 at 04:00\" or a five-field cron expression"
                    .into(),
            )),
        }
    }

    /// The first run strictly after `after`, or `None` if there is none within five years
    /// (`0 0 31 2 *`).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        match self {
            Schedule::Every(d) => {
                let step = d.as_secs().max(1) as i64;
                let next = (after.as_second().div_euclid(step) + 1) * step;
                Timestamp::from_second(next).ok()
            }
            Schedule::Cron(c) => c.next_after(after, tz),
        }
    }
}

fn parse_number(s: &str, min: u8, max: u8) -> std::result::Result<u8, String> {
    match s.parse::<u8>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number from {min} to {max}")),
    }
}

fn parse_clock(s: &str) -> std::result::Result<(u8, u8), String> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not a time of day (HH:MM)"))?;
    Ok((parse_number(h, 0, 23)?, parse_number(m, 0, 59)?))
}

impl Cron {
    fn parse(expr: &str, text: &str) -> Result<Cron> {
        let bad = |why: String| Error::invalid(format!("schedule {text:?}: {why}"));
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let [min, hour, dom, mon, dow] = fields.as_slice() else {
            return Err(bad("a cron expression has five fields".into()));
        };
        let field = |s: &str, lo: u8, hi: u8, names: &[&str], what: &str| {
            parse_field(s, lo, hi, names).map_err(|e| bad(format!("{what} field {s:?}: {e}")))
        };
        let mut weekdays = field(dow, 0, 7, &WEEKDAYS, "day-of-week")?;
        // 7 is Sunday too.
        for d in &mut weekdays {
            if *d == 7 {
                *d = 0;
            }
        }
        weekdays.sort_unstable();
        weekdays.dedup();
        Ok(Cron {
            minutes: field(min, 0, 59, &[], "minute")?,
            hours: field(hour, 0, 23, &[], "hour")?,
            days: field(dom, 1, 31, &[], "day-of-month")?,
            months: field(mon, 1, 12, &MONTHS, "month")?,
            weekdays,
            any_day: dom.starts_with('*'),
            any_weekday: dow.starts_with('*'),
            text: expr.to_string(),
        })
    }

    fn day_matches(&self, d: Date) -> bool {
        if !self.months.contains(&(d.month() as u8)) {
            return false;
        }
        let dom = self.days.contains(&(d.day() as u8));
        let dow = self
            .weekdays
            .contains(&(d.weekday().to_sunday_zero_offset() as u8));
        // As Vixie cron: when either day field starts with `*` (`*`, `*/2`), both must
        // match; when both are restricted, either may.
        if self.any_day || self.any_weekday {
            dom && dow
        } else {
            dom || dow
        }
    }

    fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let local = tz.to_datetime(after);
        // The first civil minute that may run: the one `after` falls in (its instant may
        // still come later, after a change-over), then every minute after it.
        let start = DateTime::from_parts(
            local.date(),
            Time::constant(local.hour(), local.minute(), 0, 0),
        );
        let mut date = start.date();
        for _ in 0..(366 * 5) {
            if self.day_matches(date) {
                for &h in &self.hours {
                    for &m in &self.minutes {
                        let civil =
                            DateTime::from_parts(date, Time::constant(h as i8, m as i8, 0, 0));
                        if civil < start {
                            continue;
                        }
                        let Ok(t) = tz
                            .to_ambiguous_timestamp(civil)
                            .disambiguate(Disambiguation::Compatible)
                        else {
                            continue;
                        };
                        if t > after {
                            return Some(t);
                        }
                    }
                }
            }
            date = date.checked_add(1.day()).ok()?;
        }
        None
    }
}

/// One cron field as the sorted set of values it allows.
fn parse_field(s: &str, lo: u8, hi: u8, names: &[&str]) -> std::result::Result<Vec<u8>, String> {
    let value = |v: &str| -> std::result::Result<u8, String> {
        if let Some(i) = names.iter().position(|n| *n == v) {
            // Month names count from 1, weekday names from 0 (Sunday).
            return Ok(i as u8 + if lo == 1 { 1 } else { 0 });
        }
        parse_number(v, lo, hi)
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st = st.parse::<u8>().ok().filter(|&n| n > 0);
                (
                    r,
                    st.ok_or_else(|| format!("step {part:?} is not a positive number"))?,
                )
            }
            None => (part, 1),
        };
        let (from, to) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            (v, if part.contains('/') { hi } else { v })
        };
        if from > to {
            return Err(format!("range {range:?} runs backwards"));
        }
        out.extend((from..=to).step_by(step as usize));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ams() -> TimeZone {
        TimeZone::get("Europe/Amsterdam").unwrap()
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Every run in [from, to).
    fn runs(s: &Schedule, from: &str, to: &str, tz: &TimeZone) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = t(from);
        while let Some(next) = s.next_after(at, tz) {
            if next >= t(to) {
                break;
            }
            out.push(
                next.to_zoned_datetime(tz.clone())
                    .strftime("%F %T %:z")
                    .to_string(),
            );
            at = next;
        }
        out
    }

    #[test]
    fn daylight_saving_days_run_a_daily_job_exactly_once() {
        let s = Schedule::parse("daily at 02:30").unwrap();
        // Spring forward: 2026-03-29 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
        assert_eq!(
            runs(&s, "2026-03-27T12:00:00Z", "2026-03-31T00:00:00Z", &ams()),
            [
                "2026-03-28 02:30:00 +01:00",
                "2026-03-29 03:30:00 +02:00",
                "2026-03-30 02:30:00 +02:00",
            ]
        );
        // Fall back: 2026-10-25 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
        assert_eq!(
            runs(&s, "2026-10-23T12:00:00Z", "2026-10-27T00:00:00Z", &ams()),
            [
                "2026-10-24 02:30:00 +02:00",
                "2026-10-25 02:30:00 +02:00",
                "2026-10-26 02:30:00 +01:00",
            ]
        );
    }

    #[test]
    fn readable_forms_and_cron() {
        let utc = TimeZone::UTC;
        let s = Schedule::parse("*/15 9-10 * * mon-fri").unwrap();
        // 2026-11-27 is a Friday.
        assert_eq!(
            runs(&s, "2026-11-27T10:20:00Z", "2026-11-30T09:20:00Z", &utc),
            [
                "2026-11-27 10:30:00 +00:00",
                "2026-11-27 10:45:00 +00:00",
                "2026-11-30 09:00:00 +00:00",
                "2026-11-30 09:15:00 +00:00",
            ]
        );
        let weekly = Schedule::parse("Weekly on Sunday at 03:00").unwrap();
        assert_eq!(
            weekly.next_after(t("2026-11-25T00:00:00Z"), &utc),
            Some(t("2026-11-29T03:00:00Z"))
        );
        let monthly = Schedule::parse("monthly on 1 at 04:00").unwrap();
        assert_eq!(
            monthly.next_after(t("2026-11-01T04:00:00Z"), &utc),
            Some(t("2026-12-01T04:00:00Z"))
        );
        let hourly = Schedule::parse("hourly at :15").unwrap();
        assert_eq!(
            hourly.next_after(t("2026-11-25T10:15:00Z"), &utc),
            Some(t("2026-11-25T11:15:00Z"))
        );
        // Both day fields restricted: either matches (1st of the month, or any Sunday).
        let either = Schedule::parse("0 0 1 * sun").unwrap();
        assert_eq!(
            either.next_after(t("2026-11-25T00:00:00Z"), &utc),
            Some(t("2026-11-29T00:00:00Z"))
        );
        assert_eq!(
            Schedule::parse("0 0 29 feb *")
                .unwrap()
                .next_after(t("2026-03-01T00:00:00Z"), &utc),
            Some(t("2028-02-29T00:00:00Z"))
        );
        assert_eq!(
            Schedule::parse("0 0 31 2 *")
                .unwrap()
                .next_after(t("2026-03-01T00:00:00Z"), &utc),
            None
        );
        // A stepped star is still a star: every other day of the month, whatever the weekday.
        let odd = Schedule::parse("0 0 */2 * *").unwrap();
        assert_eq!(
            runs(&odd, "2026-11-28T12:00:00Z", "2026-12-04T00:00:00Z", &utc),
            [
                "2026-11-29 00:00:00 +00:00",
                "2026-12-01 00:00:00 +00:00",
                "2026-12-03 00:00:00 +00:00",
            ]
        );
        // 7 is Sunday, as 0 is.
        for sunday in ["0 12 * * 7", "0 12 * * 0", "0 12 * * sun"] {
            assert_eq!(
                Schedule::parse(sunday)
                    .unwrap()
                    .next_after(t("2026-11-25T00:00:00Z"), &utc),
                Some(t("2026-11-29T12:00:00Z")),
                "{sunday}"
            );
        }
    }

    #[test]
    fn intervals_are_aligned_to_the_epoch() {
        let s = Schedule::parse("every 30s").unwrap();
        assert_eq!(
            s.next_after(t("2026-11-25T10:00:10Z"), &TimeZone::UTC),
            Some(t("2026-11-25T10:00:30Z"))
        );
        assert_eq!(
            s.next_after(t("2026-11-25T10:00:30Z"), &TimeZone::UTC),
            Some(t("2026-11-25T10:01:00Z"))
        );
        let h = Schedule::parse("every 6h").unwrap();
        assert_eq!(
            h.next_after(t("2026-11-25T13:00:00Z"), &TimeZone::UTC),
            Some(t("2026-11-25T18:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (text, want) in [
            ("daily at 25:00", "0 to 23"),
            ("every 0s", "at least one second"),
            ("every soon", "every soon"),
            ("61 * * * *", "minute field"),
            ("* * * * funday", "day-of-week field"),
            ("weekly on ééé at 03:00", "not a day of the week"),
            ("weekly on mon-fri at 03:00", "not a day of the week"),
            ("every 400d", "at most 366 days"),
            ("5-1 * * * *", "backwards"),
            ("*/0 * * * *", "step"),
            ("whenever", "expected"),
        ] {
            let e = Schedule::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
