//! `kluis erase --before DATE`: every snapshot before DATE erased, in this repository or in
//! every repository a kluisd configuration names; the report for an auditor.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use jiff::Timestamp;

use kluis::erase::{EraseOptions, EraseReport, Slots};
use kluis::error::exit;
use kluis::keyring::NewSlot;
use kluis::keys::{Creator, KdfParams, Secret};
use kluis::progress::Cancel;
use kluis::repository::Repository;

use crate::output::local_time;
use crate::{Global, open, parse_time, secret};

#[derive(Args)]
pub struct EraseArgs {
    /// Erase every snapshot taken before this time: RFC 3339, or "YYYY-MM-DD[ HH:MM[:SS]]" in
    /// local time
    #[arg(long, value_parser = parse_time, required_unless_present = "list")]
    before: Option<Timestamp>,
    /// List the erasures recorded in the repository (what was asked, by whom, when, what
    /// went), instead of erasing
    #[arg(long, conflicts_with_all = ["before", "dry_run", "config"])]
    list: bool,
    /// Show what would be erased; change nothing
    #[arg(long)]
    dry_run: bool,
    /// The new key generation's slot for this command's user gets this new password (the old
    /// secrets are retired: old copies of the bucket do not open with the new one)
    #[arg(long, conflicts_with_all = ["new_key_file", "keep_secret"])]
    new_password_file: Option<PathBuf>,
    /// ... or this new key file (from `kluis key generate`)
    #[arg(long, conflicts_with = "keep_secret")]
    new_key_file: Option<PathBuf>,
    /// A slot of the new generation for another holder's new password (repeatable); every
    /// other slot is removed
    #[arg(long = "also-password-file", value_name = "FILE")]
    also_password_files: Vec<PathBuf>,
    /// ... or for another holder's new key file (repeatable)
    #[arg(long = "also-key-file", value_name = "FILE")]
    also_key_files: Vec<PathBuf>,
    /// Keep the secret in use instead (weaker: a copy of the bucket made before the erasure
    /// still opens with it; the report says so). Every other slot is removed
    #[arg(long)]
    keep_secret: bool,
    /// Erase in every repository this kluisd configuration names (each with its configured
    /// secret, kept), or in those named by --repository
    #[arg(long)]
    config: Option<PathBuf>,
    /// With --config: only this repository (repeatable)
    #[arg(long = "repository", requires = "config", value_name = "NAME")]
    repositories: Vec<String>,
    #[arg(long)]
    json: bool,
}

pub async fn run(g: &Global, a: EraseArgs, _cancel: Cancel) -> anyhow::Result<i32> {
    if a.list {
        return list(g, a.json).await;
    }
    let mut reports = Vec::new();
    match &a.config {
        Some(path) => {
            if a.new_password_file.is_some() || a.new_key_file.is_some() {
                bail!(kluis::Error::InvalidInput(
                    "--config erases with each repository's configured secret; give new \
                     secrets per repository with --repo instead"
                        .into()
                ));
            }
            let config = kluis::config::Loaded::from_file(path)?;
            let names: Vec<String> = if a.repositories.is_empty() {
                config.repositories.keys().cloned().collect()
            } else {
                a.repositories.clone()
            };
            for name in names {
                let m = kluis::jobs::for_maintenance(&config, &name).await?;
                let mut slots = vec![new_slot(config.secret(&name)?, None)];
                slots.extend(also(&a)?);
                let prune = m
                    .settings
                    .prune
                    .as_ref()
                    .map(|p| p.options())
                    .unwrap_or_default();
                let opts = options(&a, slots, false, m.ledger, prune);
                let (_, report) = kluis::erase::erase(m.repo, opts).await?;
                reports.push((name, report));
            }
        }
        None => {
            let (mine, changed) = match (&a.new_password_file, &a.new_key_file) {
                (Some(p), _) => (Secret::from_password_file(p)?, true),
                (None, Some(k)) => (Secret::from_key_file(k)?, true),
                (None, None) if a.keep_secret => (secret(g)?, false),
                (None, None) if a.dry_run => (secret(g)?, false),
                (None, None) => bail!(kluis::Error::InvalidInput(
                    "give a new secret (--new-password-file or --new-key-file), so that old \
                     copies of the bucket do not open with the one in use, or --keep-secret"
                        .into()
                )),
            };
            let repo = open(g).await?;
            let label = current_label(&repo).await?;
            let mut slots = vec![new_slot(mine, label)];
            slots.extend(also(&a)?);
            let ledger = crate::ledger(&crate::state_dir(g), &repo);
            let location = repo.store().location().to_string();
            let opts = options(&a, slots, changed, ledger, Default::default());
            let (_, report) = kluis::erase::erase(repo, opts).await?;
            reports.push((location, report));
        }
    }
    if a.json {
        let all: Vec<&EraseReport> = reports.iter().map(|(_, r)| r).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for (name, report) in &reports {
            print!("{}", text(name, report));
        }
    }
    for (name, report) in &reports {
        for w in &report.warnings {
            eprintln!("warning: {name}: {w}");
        }
    }
    Ok(exit::OK)
}

fn new_slot(secret: Secret, label: Option<String>) -> NewSlot {
    NewSlot {
        secret,
        kdf: KdfParams::default(),
        label,
    }
}

/// The other holders' new secrets.
fn also(a: &EraseArgs) -> anyhow::Result<Vec<NewSlot>> {
    let mut out = Vec::new();
    for p in &a.also_password_files {
        out.push(new_slot(Secret::from_password_file(p)?, None));
    }
    for k in &a.also_key_files {
        out.push(new_slot(Secret::from_key_file(k)?, None));
    }
    Ok(out)
}

async fn current_label(repo: &Repository) -> anyhow::Result<Option<String>> {
    let (slots, _) = repo.slots().await?;
    Ok(slots
        .into_iter()
        .find(|s| s.id == repo.slot_id())
        .and_then(|s| s.label))
}

fn options(
    a: &EraseArgs,
    slots: Vec<NewSlot>,
    secrets_changed: bool,
    ledger: Option<kluis::ledger::Ledger>,
    prune: kluis::prune::PruneOptions,
) -> EraseOptions {
    EraseOptions {
        before: a.before.expect("clap requires --before unless --list"),
        dry_run: a.dry_run,
        slots: Slots::Rotate {
            slots,
            changed: secrets_changed,
        },
        creator: Creator::here(),
        ledger,
        prune,
        only_if_needed: false,
        repack_all: true,
    }
}

/// `--list`: the erasure records, oldest first.
async fn list(g: &Global, json: bool) -> anyhow::Result<i32> {
    let repo = open(g).await?;
    let (records, errors) = repo.erasures().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        for r in &records {
            print!("{}", record_text(&format!("erasure {}", r.id.short()), r));
        }
        println!("{} erasure(s)", records.len());
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok(if errors.is_empty() {
        exit::OK
    } else {
        exit::CORRUPT
    })
}

/// The report as text: what was asked, by whom, what went, and what can no longer be
/// recovered.
fn text(name: &str, report: &EraseReport) -> String {
    let r = &report.record;
    let dry = if report.dry_run { " (dry run)" } else { "" };
    let out = record_text(&format!("erasure {} of {name}{dry}", r.id.short()), r);
    outcome(report, out)
}

/// An erasure record as text.
fn record_text(title: &str, r: &kluis::repository::ErasureRecord) -> String {
    let mut out = format!("{title}\n");
    out.push_str(&format!("  repository: {}\n", r.repository));
    out.push_str(&format!("  requested: everything before {}\n", r.before));
    out.push_str(&format!(
        "  by:        {} at {}\n",
        r.by,
        local_time(r.time)
    ));
    out.push_str(&format!("  snapshots: {}\n", r.snapshots.len()));
    for s in &r.snapshots {
        out.push_str(&format!(
            "    {}  {}  {}  {}\n",
            s.id.short(),
            local_time(s.time),
            s.host,
            s.name
        ));
    }
    let destroyed: Vec<String> = r.destroyed.iter().map(|d| d.epoch.to_string()).collect();
    out.push_str(&format!(
        "  keys destroyed: {}\n",
        if destroyed.is_empty() {
            "none".to_string()
        } else {
            destroyed.join(", ")
        }
    ));
    if !r.deleted_only.is_empty() {
        let partial: Vec<String> = r.deleted_only.iter().map(|e| e.to_string()).collect();
        out.push_str(&format!("  deleted only: {}\n", partial.join(", ")));
    }
    out.push_str(&format!(
        "  secrets: {}\n",
        if r.secrets_changed {
            "changed (the old ones retired)"
        } else {
            "kept"
        }
    ));
    out
}

fn outcome(report: &EraseReport, mut out: String) -> String {
    out.push_str(&format!(
        "  objects deleted: {}{}\n",
        report.objects_deleted,
        if report.dry_run { " (would be)" } else { "" }
    ));
    if let Some(rot) = &report.rotation {
        out.push_str(&format!(
            "  key generation: {} -> {}; {} slot(s) written, {} removed\n",
            rot.previous
                .map_or_else(|| "master key".to_string(), |g| g.short()),
            rot.generation.short(),
            rot.slots.len(),
            rot.removed_slots.len()
        ));
    }
    for line in &report.statement {
        out.push_str(&format!("  - {line}\n"));
    }
    out
}
