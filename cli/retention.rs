//! `kluis retention report`: for each snapshot, the date by which it will be unrecoverable
//! under the repository's configured retention and maintenance: what an auditor asks.

use clap::{Args, Subcommand};
use jiff::Timestamp;

use kluis::config::Loaded;
use kluis::error::exit;

use crate::output;

#[derive(Subcommand)]
pub enum RetentionCommand {
    /// For each snapshot: what the policy decides, when it expires, the date by which it is
    /// unrecoverable (its expiry, the maintenance run that forgets it, the prune grace period,
    /// the run that deletes its data) and, with `erase_after`, the run that destroys its
    /// month's keys
    Report(ReportArgs),
}

#[derive(Args)]
pub struct ReportArgs {
    /// The repository, by its name in the configuration
    #[arg(long)]
    repository: String,
    /// The kluisd configuration file (default: the embedded one)
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

pub async fn run(c: RetentionCommand) -> anyhow::Result<i32> {
    let RetentionCommand::Report(a) = c;
    let config = Loaded::from_file_or_embedded(a.config.as_deref())?;
    let r = config.repositories.get(&a.repository).ok_or_else(|| {
        kluis::Error::InvalidInput(format!(
            "{} has no repository {:?}",
            config.origin, a.repository
        ))
    })?;
    if r.retention.is_none() && r.erase_after.is_none() {
        return Err(kluis::Error::InvalidInput(format!(
            "repositories.{} in {} has no retention policy and no erase_after: nothing ever \
             expires",
            a.repository, config.origin
        ))
        .into());
    }
    let policy = r.retention.clone();
    let grace = r
        .prune
        .as_ref()
        .map_or(kluis::prune::DEFAULT_GRACE, |p| p.grace);
    let schedule = config
        .prunes
        .iter()
        .find(|m| m.repository == a.repository)
        .map(|m| m.schedule.clone());
    let repo = kluis::jobs::open_repository(&config, &a.repository).await?;
    let (list, errors) = repo.snapshots().await?;
    for e in &errors {
        eprintln!("error: {e}");
    }
    let rows = kluis::retention::report(
        &list,
        policy.as_ref(),
        r.erase_after,
        grace,
        schedule.as_ref(),
        Timestamp::now(),
        &config.time_zone,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let show =
            |t: Option<Timestamp>, none: &str| t.map_or(none.to_string(), output::local_time);
        let unbounded = if schedule.is_none() {
            "no prune schedule"
        } else {
            "no max_age"
        };
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|e| {
                let mut row = vec![
                    e.id[..8].to_string(),
                    output::local_time(e.time),
                    e.host.clone(),
                    e.name.clone(),
                    if e.keep { "keep" } else { "remove" }.to_string(),
                    show(e.expires, "no max_age"),
                    show(e.unrecoverable_by, unbounded),
                ];
                if r.erase_after.is_some() {
                    row.push(show(e.key_destroyed_by, unbounded));
                }
                row
            })
            .collect();
        let mut head = vec![
            "ID",
            "TIME",
            "HOST",
            "NAME",
            "TODAY",
            "EXPIRES",
            "UNRECOVERABLE BY",
        ];
        if r.erase_after.is_some() {
            head.push("KEY DESTROYED BY");
        }
        print!("{}", output::table(&head, &table));
        println!(
            "policy {}; erase after {}; prune grace {}; maintenance {}",
            policy.as_ref().map_or("none".to_string(), |p| {
                serde_json::to_string(p).unwrap_or_default()
            }),
            r.erase_after
                .map_or("never".to_string(), kluis::retention::show),
            humantime::format_duration(grace),
            schedule.map_or("not scheduled".to_string(), |s| s.to_string())
        );
    }
    Ok(if errors.is_empty() {
        exit::OK
    } else {
        exit::CORRUPT
    })
}
