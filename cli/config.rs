//! `kluis config check`: validates a `kluisd` configuration and shows what would run when.

use std::path::PathBuf;

use clap::Subcommand;
use jiff::Timestamp;

use kluis::config::{JobSource, Loaded};
use kluis::error::exit;
use kluis::source::postgres::redact;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Check a kluisd configuration file (default: the embedded one) and print each job's
    /// next runs
    Check {
        /// The file (default: the embedded config/kluis.toml)
        path: Option<PathBuf>,
        /// How many upcoming runs to show per job
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

pub fn run(c: ConfigCommand) -> anyhow::Result<i32> {
    let ConfigCommand::Check { path, runs } = c;
    let config = Loaded::from_file_or_embedded(path.as_deref())?;
    println!(
        "{}: valid; state in {}, time zone {}, at most {} job(s) at once, metrics on {}",
        config.origin,
        config.state_dir.display(),
        config.time_zone.iana_name().unwrap_or("(system)"),
        config.daemon.max_concurrent_jobs,
        config.http.listen
    );
    for (name, r) in &config.repositories {
        println!(
            "repository {name}: {}{}",
            redact(&r.url),
            if r.init { " (created if missing)" } else { "" }
        );
    }
    let now = Timestamp::now();
    let print_runs = |schedule: &kluis::schedule::Schedule| {
        let mut at = now;
        for _ in 0..runs {
            match schedule.next_after(at, &config.time_zone) {
                Some(next) => {
                    println!(
                        "  {}",
                        next.to_zoned_datetime(config.time_zone.clone())
                            .strftime("%a %F %T %Z")
                    );
                    at = next;
                }
                None => {
                    println!("  (never)");
                    break;
                }
            }
        }
    };
    for job in &config.jobs {
        let what = match &job.source {
            JobSource::Paths(p) => p
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            JobSource::Database(url) => redact(url),
            JobSource::PostgresGlobals(url) => format!("roles and tablespaces of {}", redact(url)),
            JobSource::PostgresServer {
                url,
                databases,
                globals,
            } => {
                let mut parts = Vec::new();
                if *globals {
                    parts.push("roles and tablespaces".to_string());
                }
                match databases {
                    kluis::config::ServerDatabases::All => parts.push("every database".into()),
                    kluis::config::ServerDatabases::List(l) if !l.is_empty() => {
                        parts.push(format!("databases {}", l.join(", ")))
                    }
                    _ => {}
                }
                format!(
                    "{} of {} (one set per run)",
                    parts.join(" and "),
                    redact(url)
                )
            }
            JobSource::Command(c) => {
                format!("command {:?}", c.split_whitespace().next().unwrap_or(""))
            }
        };
        println!(
            "job {}: {what} -> {} as {:?}, {}, timeout {}",
            job.name,
            job.repository,
            job.snapshot_name,
            job.schedule,
            humantime::format_duration(job.timeout)
        );
        print_runs(&job.schedule);
    }
    for m in &config.prunes {
        println!(
            "maintenance of {}: forget, then prune, {}, timeout {}",
            m.repository,
            m.schedule,
            humantime::format_duration(m.timeout)
        );
        print_runs(&m.schedule);
    }
    for c in &config.copies {
        println!(
            "copy {}: {} -> {}, {} snapshot(s){}, {}, timeout {}",
            c.name,
            c.from,
            c.to,
            match c.select {
                kluis::config::CopySelect::Latest => "the newest",
                kluis::config::CopySelect::All => "all",
            },
            if c.names.is_empty() {
                String::new()
            } else {
                format!(" named {}", c.names.join(", "))
            },
            c.schedule,
            humantime::format_duration(c.timeout)
        );
        print_runs(&c.schedule);
    }
    for d in &config.drills {
        println!(
            "drill {}: job {} from {}{}{}, {}, timeout {}",
            d.name,
            d.job.name,
            d.repository,
            d.scratch
                .as_deref()
                .map(|s| format!(" into {}", kluis::source::postgres::redact(s)))
                .unwrap_or_default(),
            d.budget
                .map(|b| format!(", budget {}", humantime::format_duration(b)))
                .unwrap_or_default(),
            d.schedule,
            humantime::format_duration(d.timeout)
        );
        print_runs(&d.schedule);
    }
    Ok(exit::OK)
}
