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
use kluis::status::Status;

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
        None => kluis::scheduler::from_repositories(&config, Timestamp::now()).await,
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
