//! `kluis drill`: restore drills by hand, and their history (see `kluis::drill`).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use kluis::config::Loaded;
use kluis::drill::{self, DrillOptions, DrillReport};
use kluis::error::exit;
use kluis::progress::Cancel;

use crate::output;

#[derive(Subcommand)]
pub enum DrillCommand {
    /// Run a configured drill now: restore, check, time and remove; the report is stored in
    /// the repository. Exit code 6 if a check failed.
    Run(RunArgs),
    /// The drill reports stored in the repositories
    History(HistoryArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The drill (a `[drills.NAME]` section; by default named after its job)
    drill: String,
    /// The configuration file (default: the embedded one)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Test this snapshot (id prefix) instead of the newest (and the random older one)
    #[arg(long)]
    snapshot: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct HistoryArgs {
    /// The configuration file (default: the embedded one)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Only this drill's reports
    #[arg(long)]
    drill: Option<String>,
    /// Only this repository's reports (default: every repository a drill restores from)
    #[arg(long)]
    repository: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn run(c: DrillCommand, cancel: Cancel) -> anyhow::Result<i32> {
    match c {
        DrillCommand::Run(a) => run_drill(a, cancel).await,
        DrillCommand::History(a) => history(a).await,
    }
}

async fn run_drill(a: RunArgs, cancel: Cancel) -> anyhow::Result<i32> {
    let config = Loaded::from_file_or_embedded(a.config.as_deref())?;
    let d = config
        .drills
        .iter()
        .find(|d| d.name == a.drill)
        .ok_or_else(|| {
            kluis::Error::InvalidInput(format!(
                "no drill {:?} in {} (there are: {})",
                a.drill,
                config.origin,
                config
                    .drills
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let opts = DrillOptions {
        snapshot: a.snapshot.map(|s| s.to_ascii_lowercase()),
        cancel,
    };
    let reports = drill::run(&config, d, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print_report(r);
        }
    }
    Ok(if reports.iter().all(|r| r.passed) {
        exit::OK
    } else {
        exit::DRILL_FAILED
    })
}

fn print_report(r: &DrillReport) {
    println!(
        "drill {} of snapshot {} ({} {}, {}) into {}:",
        r.drill,
        &r.snapshot.to_hex()[..8],
        r.snapshot_name,
        output::local_time(r.snapshot_time),
        r.pick,
        r.target
    );
    for c in &r.checks {
        println!(
            "  {} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    println!(
        "  {} in {:.1} s (restore {:.1} s){}",
        if r.passed {
            "PASSED".to_string()
        } else {
            format!("FAILED ({})", r.reason.as_deref().unwrap_or("other"))
        },
        (r.finished.as_millisecond() - r.started.as_millisecond()) as f64 / 1000.0,
        r.restore_seconds,
        if r.cleaned_up {
            "; scratch target removed"
        } else {
            "; the scratch target could NOT be removed"
        }
    );
}

async fn history(a: HistoryArgs) -> anyhow::Result<i32> {
    let config = Loaded::from_file_or_embedded(a.config.as_deref())?;
    let mut repositories: Vec<String> = match &a.repository {
        Some(r) => vec![r.clone()],
        None => config.drills.iter().map(|d| d.repository.clone()).collect(),
    };
    repositories.sort();
    repositories.dedup();
    let mut all = Vec::new();
    let mut damaged = 0;
    for name in &repositories {
        let repo = kluis::jobs::open_existing(&config, name).await?;
        let (reports, errors) = drill::history(&repo).await?;
        for e in &errors {
            eprintln!("warning: repository {name}: {e}");
        }
        damaged += errors.len();
        all.extend(
            reports
                .into_iter()
                .filter(|r| a.drill.as_ref().is_none_or(|d| &r.drill == d)),
        );
    }
    all.sort_by_key(|r| r.started);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        let rows: Vec<Vec<String>> = all
            .iter()
            .map(|r| {
                vec![
                    output::local_time(r.started),
                    r.drill.clone(),
                    r.repository.clone(),
                    r.snapshot.to_hex()[..8].to_string(),
                    r.pick.clone(),
                    format!("{:.1} s", r.restore_seconds),
                    if r.passed {
                        "passed".into()
                    } else {
                        format!("FAILED ({})", r.reason.as_deref().unwrap_or("other"))
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            output::table(
                &[
                    "STARTED",
                    "DRILL",
                    "REPOSITORY",
                    "SNAPSHOT",
                    "PICK",
                    "RESTORE",
                    "RESULT"
                ],
                &rows
            )
        );
        println!("{} drill report(s)", all.len());
    }
    Ok(if damaged == 0 {
        exit::OK
    } else {
        exit::CORRUPT
    })
}
