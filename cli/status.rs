//! `kluis status`: each job's last run, result and next run, and the repositories' state: from
//! the running kluisd (its `/status`), or, when none answers, from the repositories.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use jiff::Timestamp;

use kluis::config::Loaded;
use kluis::error::exit;
use kluis::jobs;
use kluis::scheduler::TaskKind;
use kluis::source::postgres::redact;
use kluis::status::{DrillStatus, JobStatus, RepositoryStatus, Status};

use crate::output;

#[derive(Args)]
pub struct StatusArgs {
    /// The kluisd configuration (default: the embedded one)
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub async fn run(a: StatusArgs) -> anyhow::Result<i32> {
    let config = Loaded::from_file_or_embedded(a.config.as_deref())?;
    let status = match ask_daemon(&config.http.listen) {
        Some(s) => s,
        None => from_repositories(&config).await,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(exit::OK);
    }
    let when = |t: Option<Timestamp>| t.map_or_else(|| "-".to_string(), output::local_time);
    let rows: Vec<Vec<String>> = status
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.name.clone(),
                match j.running {
                    Some(true) => "running".into(),
                    Some(false) => "idle".into(),
                    None => "?".into(),
                },
                when(j.last_success),
                when(j.last_run),
                j.last_result.clone().unwrap_or_else(|| "-".into()),
                when(j.next_run),
                j.schedule.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        match status.source.as_str() {
            "daemon" => format!("from the running kluisd on {}", config.http.listen),
            _ => "kluisd is not answering: from the repositories".to_string(),
        }
    );
    print!(
        "{}",
        output::table(
            &[
                "JOB",
                "STATE",
                "LAST SUCCESS",
                "LAST RUN",
                "RESULT",
                "NEXT RUN",
                "SCHEDULE"
            ],
            &rows
        )
    );
    if !status.drills.is_empty() {
        let rows: Vec<Vec<String>> = status
            .drills
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    d.repository.clone(),
                    when(d.last_run),
                    d.last_result.clone().unwrap_or_else(|| "-".into()),
                    d.last_restore_ms
                        .map_or_else(|| "-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
                    when(d.last_success),
                    when(d.next_run),
                ]
            })
            .collect();
        print!(
            "{}",
            output::table(
                &[
                    "DRILL",
                    "REPOSITORY",
                    "LAST RUN",
                    "RESULT",
                    "RESTORE",
                    "LAST PASSED",
                    "NEXT RUN"
                ],
                &rows
            )
        );
    }
    for r in &status.repositories {
        match (r.snapshots, &r.error) {
            (Some(n), _) => println!("repository {}: {} snapshot(s) at {}", r.name, n, r.location),
            (None, Some(e)) => println!("repository {}: cannot be read: {e}", r.name),
            (None, None) => println!("repository {}: unknown", r.name),
        }
    }
    Ok(exit::OK)
}

/// The daemon's own view, if one answers on `listen`.
fn ask_daemon(listen: &str) -> Option<Status> {
    let addr = listen.to_socket_addrs().ok()?.next()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: kluisd\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).ok()?;
    let text = String::from_utf8(response).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// Without a daemon: each job's newest snapshot and next scheduled run.
async fn from_repositories(config: &Loaded) -> Status {
    let mut status = Status {
        source: "repositories".into(),
        ..Status::default()
    };
    let mut lists = std::collections::BTreeMap::new();
    for (name, r) in &config.repositories {
        let listed = jobs::snapshots(config, name).await;
        status.repositories.push(RepositoryStatus {
            name: name.clone(),
            location: redact(&r.url),
            snapshots: listed.as_ref().ok().map(Vec::len),
            error: listed.as_ref().err().map(|e| e.to_string()),
        });
        lists.insert(name.clone(), listed.unwrap_or_default());
    }
    // What the daemon would plan now (its catch-up included; jitter aside).
    let mut history = kluis::scheduler::History::default();
    let mut reports = Vec::new();
    for job in &config.jobs {
        history.saw_job(job, lists.get(&job.repository).map_or(&[][..], |l| &l[..]));
    }
    for drill in &config.drills {
        let found = match jobs::open_existing(config, &drill.repository).await {
            Ok(repo) => kluis::drill::history(&repo)
                .await
                .map(|(h, _)| h)
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        history.saw_drill(drill, &found);
        reports.push(found);
    }
    let planned: std::collections::BTreeMap<_, _> =
        kluis::scheduler::plan(config, &history, Timestamp::now(), |_| 0)
            .into_iter()
            .map(|(work, next)| ((work.kind(), work.name().to_string()), next))
            .collect();
    let next = |kind, name: &str| {
        planned
            .get(&(kind, name.to_string()))
            .copied()
            .filter(|t| *t != Timestamp::MAX)
    };
    for job in &config.jobs {
        let last = lists
            .get(&job.repository)
            .and_then(|l| jobs::last_of(job, l));
        status.jobs.push(JobStatus {
            name: job.name.clone(),
            repository: job.repository.clone(),
            schedule: job.schedule.to_string(),
            running: None,
            next_run: next(TaskKind::Backup, &job.name),
            last_run: None,
            last_result: None,
            last_success: last.map(|s| s.time),
            last_snapshot: last.map(|s| s.id.to_hex()),
        });
    }
    for (drill, found) in config.drills.iter().zip(&reports) {
        let next = next(TaskKind::Drill, &drill.name);
        status
            .drills
            .push(DrillStatus::from_history(drill, found, next));
    }
    status
}
