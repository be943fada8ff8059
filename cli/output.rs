//! Human-readable output: sizes, durations, tables and the progress line.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kluis::progress::Progress;
use kluis::repository::KeySlotInfo;
use kluis::snapshot::{Snapshot, Source};

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.2} s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h{:02}m", d.as_secs() / 3600, (d.as_secs() / 60) % 60)
    }
}

pub fn local_time(t: jiff::Timestamp) -> String {
    t.to_zoned_datetime(jiff::tz::TimeZone::system())
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

pub fn snapshot_table(list: &[Snapshot]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.short(),
                local_time(s.time),
                s.host.clone(),
                s.name.clone(),
                human_bytes(s.summary.logical_bytes),
                human_bytes(s.summary.stored_bytes),
                match &s.source {
                    Source::Stdin => "stdin".to_string(),
                    Source::Paths { paths } => paths.join(" "),
                    Source::Command { command } => format!(
                        "command {}",
                        command.split_whitespace().next().unwrap_or("")
                    ),
                    Source::Postgres(db) => database_summary("postgresql", db),
                    Source::PostgresGlobals(g) => {
                        format!("postgresql roles and tablespaces ({})", g.server_version)
                    }
                    Source::Mysql(db) => database_summary("mysql", db),
                    Source::Sqlite(db) => database_summary("sqlite", db),
                    Source::PostgresBase(b) => format!(
                        "postgresql base backup of {} ({}, WAL {}..{})",
                        b.cluster, b.server_version, b.start_lsn, b.stop_lsn
                    ),
                },
            ]
        })
        .collect();
    let mut out = table(
        &["ID", "TIME", "HOST", "NAME", "SIZE", "ADDED", "SOURCE"],
        &rows,
    );
    let _ = writeln!(out, "{} snapshot(s)", list.len());
    out
}

fn database_summary(engine: &str, db: &kluis::snapshot::DatabaseRecord) -> String {
    format!(
        "{engine} {} ({} tables, {})",
        db.database,
        db.tables.len(),
        db.server_version
    )
}

pub fn key_table(slots: &[KeySlotInfo]) -> String {
    let rows: Vec<Vec<String>> = slots
        .iter()
        .map(|k| {
            vec![
                format!("{}{}", if k.current { "*" } else { " " }, k.id.short()),
                serde_json::to_value(k.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                local_time(k.created),
                match &k.user {
                    Some(u) => format!("{u}@{}", k.host),
                    None => k.host.clone(),
                },
                match (k.role, k.generation) {
                    (Some(_), _) => "write-only".into(),
                    (None, g) => g.map_or_else(|| "-".into(), |g| g.short()),
                },
                k.last_used.map_or_else(|| "-".into(), local_time),
                k.label.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            " ID",
            "KIND",
            "CREATED",
            "BY",
            "GENERATION",
            "LAST USED",
            "LABEL",
        ],
        &rows,
    )
}

/// A progress line on stderr, redrawn a few times a second until dropped.
pub struct ProgressLine {
    task: tokio::task::JoinHandle<()>,
}

impl ProgressLine {
    /// `unit` names what `progress.files` counts: "files", or "tables" for a database.
    pub fn start(label: &'static str, unit: &'static str, progress: Arc<Progress>) -> ProgressLine {
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let bytes = Progress::get(&progress.bytes);
                let total = Progress::get(&progress.total_bytes);
                let rate = bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let mut line = format!("{label}: {}", human_bytes(bytes));
                if total > 0 {
                    let _ = write!(
                        line,
                        " of {} ({:.0}%)",
                        human_bytes(total),
                        100.0 * bytes as f64 / total as f64
                    );
                }
                let new = Progress::get(&progress.new_bytes);
                if new > 0 {
                    let _ = write!(line, ", {} new", human_bytes(new));
                }
                let files = Progress::get(&progress.files);
                let total_files = Progress::get(&progress.total_files);
                if total_files > 0 {
                    let _ = write!(line, ", {files}/{total_files} {unit}");
                } else if files > 0 {
                    let _ = write!(line, ", {files} {unit}");
                }
                let errors = Progress::get(&progress.errors);
                if errors > 0 {
                    let _ = write!(line, ", {errors} errors");
                }
                let _ = write!(
                    line,
                    ", {}/s, {}",
                    human_bytes(rate as u64),
                    human_duration(started.elapsed())
                );
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
            }
        });
        ProgressLine { task }
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.task.abort();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(Duration::from_millis(1234)), "1.23 s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m05s");
    }
}
