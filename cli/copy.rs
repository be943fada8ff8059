//! `kluis copy`: snapshots from one repository to another, re-encrypted under the
//! destination's keys, uploading only the blobs it lacks (see `kluis::copy`).

use std::path::PathBuf;

use clap::Args;

use kluis::config::Loaded;
use kluis::copy::{self, CopyOptions, CopyReport, Selection};
use kluis::error::exit;
use kluis::keys::Secret;
use kluis::progress::{Cancel, Progress};
use kluis::repository::Repository;
use kluis::store::Store;

use crate::output::{self, ProgressLine, human_bytes};
use crate::{Global, show_progress};

#[derive(Args)]
pub struct CopyArgs {
    /// Snapshot to copy: an id prefix, or `latest` (of --name); default: every snapshot the
    /// destination has no copy of yet
    #[arg(conflicts_with = "latest")]
    snapshot: Option<String>,
    /// Copy the newest snapshot of each host and name (of --name)
    #[arg(long)]
    latest: bool,
    /// Only snapshots with this name (repeatable)
    #[arg(long)]
    name: Vec<String>,
    /// Source repository (default: --repo / KLUIS_REPOSITORY); with --config, a configured
    /// repository's name
    #[arg(long)]
    from: Option<String>,
    /// Destination repository: a path, file:// or s3:// URL; with --config, a configured
    /// repository's name
    #[arg(long)]
    to: String,
    /// File holding the destination's password (mode 0600 or stricter)
    #[arg(long, env = "KLUIS_TO_PASSWORD_FILE")]
    to_password_file: Option<PathBuf>,
    /// Key file of the destination
    #[arg(long, env = "KLUIS_TO_KEY_FILE", conflicts_with = "to_password_file")]
    to_key_file: Option<PathBuf>,
    /// --from and --to name repositories of this kluisd configuration (their secrets too)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Show what would be copied; copy nothing
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

/// The destination's secret: its own, never the source's.
fn to_secret(a: &CopyArgs) -> anyhow::Result<Secret> {
    let lookup = kluis::secrets::Lookup {
        key_file: a.to_key_file.as_deref(),
        password_file: a.to_password_file.as_deref(),
        passphrase_var: Some("KLUIS_TO_PASSWORD"),
        credentials: None,
    };
    if let Some(secret) = lookup.find()? {
        return Ok(secret);
    }
    Err(kluis::Error::InvalidInput(
        "no password for the destination: pass --to-password-file or --to-key-file, or set \
         KLUIS_TO_PASSWORD_FILE, KLUIS_TO_KEY_FILE or KLUIS_TO_PASSWORD"
            .into(),
    )
    .into())
}

/// The source and destination, and the state directory whose ledger the copy joins (the
/// configuration's with --config, as the daemon's copies do).
async fn repositories(
    g: &Global,
    a: &CopyArgs,
) -> anyhow::Result<(Repository, Repository, std::path::PathBuf)> {
    if let Some(path) = &a.config {
        let config = Loaded::from_file(path)?;
        let from = a.from.as_deref().ok_or_else(|| {
            kluis::Error::InvalidInput("with --config, --from names the source repository".into())
        })?;
        let src = kluis::jobs::open_existing(&config, from).await?;
        let dst = kluis::jobs::open_repository(&config, &a.to).await?;
        return Ok((src, dst, config.state_dir.clone()));
    }
    let src = match &a.from {
        Some(url) => {
            let secret = crate::secret(g)?;
            Repository::open(Store::open(url, false)?, &secret).await?
        }
        None => crate::open(g).await?,
    };
    let dst = Repository::open(Store::open(&a.to, false)?, &to_secret(a)?).await?;
    Ok((src, dst, crate::state_dir(g)))
}

pub async fn run(g: &Global, a: CopyArgs, cancel: Cancel) -> anyhow::Result<i32> {
    let (src, dst, state_dir) = repositories(g, &a).await?;
    let selection = match (&a.snapshot, a.latest) {
        (Some(s), _) => Selection::Id(s.to_ascii_lowercase()),
        (None, true) => Selection::Latest,
        (None, false) => Selection::All,
    };
    let progress = Progress::new();
    let opts = CopyOptions {
        selection,
        names: a.name.clone(),
        dry_run: a.dry_run,
        cancel,
        progress: progress.clone(),
        ledger: crate::ledger(&state_dir, &dst),
        ..CopyOptions::default()
    };
    let line = show_progress(g).then(|| ProgressLine::start("copy", "files", progress));
    let report = copy::copy(&src, &dst, &opts).await;
    drop(line);
    let report = report?;
    print(&report, a.json)?;
    Ok(exit::OK)
}

fn print(r: &CopyReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for c in &r.copied {
        println!(
            "copied snapshot {} ({} of {} at {}) as {}: {} read, {} new, {} uploaded in {}",
            &c.source[..8],
            c.name,
            c.host,
            output::local_time(c.time),
            &c.snapshot[..8],
            human_bytes(c.logical_bytes),
            human_bytes(c.new_bytes),
            human_bytes(c.stored_bytes),
            output::human_duration(std::time::Duration::from_secs_f64(c.seconds)),
        );
    }
    for id in &r.would_copy {
        println!("would copy snapshot {}", &id[..8]);
    }
    println!(
        "{} snapshot(s) {}copied to {}, {} uploaded; {} already there",
        if r.dry_run {
            r.would_copy.len()
        } else {
            r.copied.len()
        },
        if r.dry_run { "would be " } else { "" },
        r.destination,
        human_bytes(r.stored_bytes()),
        r.already_copied.len()
    );
    Ok(())
}
