//! `kluis prune`: sweeps what earlier prunes marked once their grace period has passed, then
//! marks what no snapshot needs now (docs/FORMAT.md §6.6). Also run by `kluis forget --prune`.

use std::time::Duration;

use clap::Args;

use kluis::error::exit;
use kluis::progress::Cancel;
use kluis::prune::{self, PruneOptions, PruneReport};
use kluis::repository::Repository;

use crate::output;
use crate::{Global, open};

#[derive(Args, Clone)]
pub struct PruneArgs {
    /// Marked data is deleted only this long after it was marked; longer than the longest
    /// backup (default 24h)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub grace: Option<Duration>,
    /// Accept a --grace shorter than 1h (tests, or a repository nobody else writes to)
    #[arg(long)]
    pub unsafe_short_grace: bool,
    /// Repack packs with at least this percentage of unused bytes (default 20)
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub repack_threshold: Option<u8>,
}

#[derive(Args)]
pub struct PruneCommand {
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Use this repository of a kluisd configuration (its prune settings too)
    #[arg(long)]
    pub repository: Option<String>,
    /// With --repository: the configuration file (default: the embedded one)
    #[arg(long, requires = "repository")]
    pub config: Option<std::path::PathBuf>,
    /// Show what would be deleted and marked; change nothing
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

/// The options for a prune: the command line's, else the configured ones, else the defaults.
/// A grace period from the command line below [`prune::MIN_GRACE`] is refused unless the
/// operator says so: nothing on this host knows how long other hosts' backups run.
pub fn options(
    a: &PruneArgs,
    configured: Option<&kluis::config::PruneConfig>,
    dry_run: bool,
    cancel: Cancel,
) -> anyhow::Result<PruneOptions> {
    let mut o = match configured {
        Some(c) => c.options(),
        None => PruneOptions::default(),
    };
    if let Some(g) = a.grace {
        if g < prune::MIN_GRACE && !a.unsafe_short_grace {
            return Err(kluis::Error::InvalidInput(format!(
                "--grace {} is shorter than {}: a backup or copy that runs longer than the grace \
                 period fails to commit, and a restore that started before the sweep finds its \
                 data gone; pass --unsafe-short-grace if nothing reads or writes this \
                 repository for longer than {}",
                humantime::format_duration(g),
                humantime::format_duration(prune::MIN_GRACE),
                humantime::format_duration(g),
            ))
            .into());
        }
        o.grace = g;
    }
    if let Some(t) = a.repack_threshold {
        o.repack_threshold = f64::from(t) / 100.0;
    }
    o.dry_run = dry_run;
    o.cancel = cancel;
    Ok(o)
}

pub async fn run(g: &Global, a: PruneCommand, cancel: Cancel) -> anyhow::Result<i32> {
    let (repo, configured) = match &a.repository {
        Some(name) => {
            let config = kluis::config::Loaded::from_file_or_embedded(a.config.as_deref())?;
            let m = kluis::jobs::for_maintenance(&config, name).await?;
            (m.repo, m.settings.prune.clone())
        }
        None => (open(g).await?, None),
    };
    let opts = options(&a.prune, configured.as_ref(), a.dry_run, cancel)?;
    let report = execute(&repo, &opts).await?;
    print(&report, a.json)?;
    Ok(exit::OK)
}

pub async fn execute(repo: &Repository, opts: &PruneOptions) -> anyhow::Result<PruneReport> {
    Ok(prune::prune(repo, opts).await?)
}

pub fn print(r: &PruneReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let would = if r.dry_run { "would " } else { "" };
    println!(
        "{} snapshot(s), {} pack(s), {} blob(s) in use",
        r.snapshots, r.packs, r.blobs_used
    );
    println!(
        "sweep: {} mark(s) past their grace period; {would}delete {} pack(s) ({}), {} index segment(s); {} marked pack(s) kept because a snapshot needs them",
        r.marks_swept,
        r.packs_deleted,
        output::human_bytes(r.bytes_reclaimed),
        r.segments_deleted,
        r.packs_kept
    );
    println!(
        "mark: {would}mark {} pack(s) ({}) and {} index segment(s); repacked {} pack(s) into {}",
        r.packs_marked,
        output::human_bytes(r.bytes_marked),
        r.segments_marked,
        r.packs_repacked,
        output::human_bytes(r.bytes_repacked)
    );
    if r.keys_marked + r.keys_deleted + r.keys_kept > 0 {
        println!(
            "epoch keys of months that hold nothing: {would}delete {}, {would}mark {}; {} kept because their month holds data again",
            r.keys_deleted, r.keys_marked, r.keys_kept
        );
    }
    if r.staging_deleted > 0 {
        println!(
            "{would}delete {} half-written file(s) of killed writers ({})",
            r.staging_deleted,
            output::human_bytes(r.staging_bytes)
        );
    }
    match r.next_sweep {
        Some(t) => println!(
            "marked data is deleted by the first prune after {}",
            output::local_time(t)
        ),
        None => println!("nothing is marked"),
    }
    Ok(())
}
