//! `kluis forget`: applies a retention policy, listing every snapshot with keep or remove and
//! the rule that decided, and deletes the removed snapshots' manifests (their data is garbage
//! for a later prune).

use std::time::Duration;

use clap::Args;

use kluis::config::Loaded;
use kluis::error::exit;
use kluis::progress::Cancel;
use kluis::retention::Policy;

use crate::output;
use crate::{Global, open};

#[derive(Args)]
pub struct ForgetArgs {
    /// Keep the N newest snapshots
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the N newest hours that have one
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// ... days
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// ... ISO weeks
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// ... months
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// ... years
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
    /// Keep every snapshot taken within this long before the newest (e.g. 7d)
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
    /// Remove every snapshot older than this (e.g. 30d), whatever keeps it: the storage limit
    #[arg(long, value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// Only snapshots of this name
    #[arg(long)]
    name: Option<String>,
    /// Only snapshots of this host
    #[arg(long)]
    host: Option<String>,
    /// The IANA time zone of the calendar buckets (default: the host's)
    #[arg(long)]
    time_zone: Option<String>,
    /// Apply the retention policy this repository has in a kluisd configuration (with --config)
    #[arg(long, conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly",
        "keep_monthly", "keep_yearly", "keep_within", "max_age"])]
    repository: Option<String>,
    /// With --repository: the configuration file (default: the embedded one)
    #[arg(long, requires = "repository")]
    config: Option<std::path::PathBuf>,
    /// Show what would be removed; remove nothing
    #[arg(long)]
    dry_run: bool,
    /// Then prune: sweep earlier marks past their grace period and mark what is now unused
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    prune_args: crate::prune::PruneArgs,
    #[arg(long)]
    json: bool,
}

pub async fn run(g: &Global, a: ForgetArgs, cancel: Cancel) -> anyhow::Result<i32> {
    let config = match &a.repository {
        Some(_) => Some(Loaded::from_file_or_embedded(a.config.as_deref())?),
        None => None,
    };
    // A configured repository: its policy, prune settings, time zone and this host's ledger,
    // as the daemon's maintenance takes them.
    let configured = match (&config, &a.repository) {
        (Some(config), Some(name)) => {
            let m = kluis::jobs::for_maintenance(config, name).await?;
            let policy = m.settings.retention.clone().ok_or_else(|| {
                kluis::Error::InvalidInput(format!(
                    "repositories.{name} in {} has no retention policy",
                    config.origin
                ))
            })?;
            Some((config, m, policy))
        }
        _ => None,
    };
    let policy = match &configured {
        Some((_, _, p)) => p.clone(),
        None => Policy {
            keep_last: a.keep_last,
            keep_hourly: a.keep_hourly,
            keep_daily: a.keep_daily,
            keep_weekly: a.keep_weekly,
            keep_monthly: a.keep_monthly,
            keep_yearly: a.keep_yearly,
            keep_within: a.keep_within,
            max_age: a.max_age,
        },
    };
    policy.validate()?;
    // Prune's options are checked before anything is forgotten.
    let prune_opts = if a.prune {
        let configured = configured
            .as_ref()
            .and_then(|(_, m, _)| m.settings.prune.as_ref());
        Some(crate::prune::options(
            &a.prune_args,
            configured,
            a.dry_run,
            cancel.clone(),
        )?)
    } else {
        None
    };
    let tz = match (&a.time_zone, &configured) {
        (Some(name), _) => jiff::tz::TimeZone::get(name)
            .map_err(|e| kluis::Error::InvalidInput(format!("--time-zone {name:?}: {e}")))?,
        (None, Some((config, _, _))) => config.time_zone.clone(),
        (None, None) => jiff::tz::TimeZone::system(),
    };
    let (repo, ledger) = match configured {
        Some((_, m, _)) => (m.repo, m.ledger),
        None => {
            let repo = open(g).await?;
            let ledger = crate::ledger(&crate::state_dir(g), &repo);
            (repo, ledger)
        }
    };
    let only = |s: &kluis::snapshot::Snapshot| {
        a.name.as_ref().is_none_or(|n| &s.name == n) && a.host.as_ref().is_none_or(|h| &s.host == h)
    };
    let done = kluis::forget::forget(
        &repo,
        kluis::forget::ForgetOptions {
            policy: &policy,
            time_zone: tz,
            only: Some(&only),
            dry_run: a.dry_run,
            ledger: if a.dry_run { None } else { ledger },
            cancel: cancel.clone(),
        },
    )
    .await?;
    for w in &done.warnings {
        eprintln!("warning: {w}");
    }
    let (decisions, removed) = (done.decisions, done.removed);
    if a.json && !a.prune {
        println!("{}", serde_json::to_string_pretty(&decisions)?);
    } else if !a.json {
        let rows: Vec<Vec<String>> = decisions
            .iter()
            .map(|d| {
                vec![
                    d.id[..8].to_string(),
                    output::local_time(d.time),
                    d.host.clone(),
                    d.name.clone(),
                    if d.keep { "keep" } else { "remove" }.to_string(),
                    d.reasons.join(", "),
                ]
            })
            .collect();
        print!(
            "{}",
            output::table(&["ID", "TIME", "HOST", "NAME", "DECISION", "WHY"], &rows)
        );
        let remove = decisions.iter().filter(|d| !d.keep).count();
        if a.dry_run {
            println!(
                "dry run: {remove} of {} snapshot(s) would be removed",
                decisions.len()
            );
        } else {
            println!(
                "removed {removed} of {} snapshot(s); their data is freed by the next prune",
                decisions.len()
            );
        }
    }
    if let Some(opts) = prune_opts {
        let report = crate::prune::execute(&repo, &opts).await?;
        if a.json {
            let both = serde_json::json!({ "forget": decisions, "prune": report });
            println!("{}", serde_json::to_string_pretty(&both)?);
        } else {
            crate::prune::print(&report, false)?;
        }
    }
    Ok(exit::OK)
}
