//! `kluis key`: key files and key slots (list, add, remove).

use super::*;
use kluis::keyring;
use kluis::keys::Creator;
use std::path::Path;

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// Add a key slot for a new password or key file
    Add {
        #[command(flatten)]
        new: NewSecret,
        /// A note to recognise the slot by, e.g. who holds it
        #[arg(long)]
        label: Option<String>,
        /// A write-only slot, for a database host: it backs up (under epoch keys of its own,
        /// sealed so that only full keys open them) and can read, restore or delete nothing
        #[arg(long)]
        write_only: bool,
    },
    /// List key slots
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a key slot (not the one in use)
    Remove {
        /// Slot id or unique prefix
        id: String,
    },
    /// Write a new random key file (mode 0600); it opens nothing until `init` or `key add` uses it
    Generate { path: PathBuf },
    /// Change the secret of the slot in use: a slot for the new secret (same keys, same
    /// label), then the old slot removed
    Passwd {
        #[command(flatten)]
        new: NewSecret,
    },
    /// A new key generation: every epoch key wrapped again under a new key, a slot of the new
    /// generation for the secret in use (or --new-*) and each --keep-*, then every other slot
    /// and every old wrapped epoch key deleted; no data is uploaded again
    Rotate {
        /// The new generation's slot for this command's user gets this password instead of
        /// the one in use
        #[arg(long, conflicts_with = "new_key_file")]
        new_password_file: Option<PathBuf>,
        /// ... or this key file
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        /// Also give the new generation a slot for this password (repeatable); every slot
        /// whose secret is not given is removed
        #[arg(long = "keep-password-file", value_name = "FILE")]
        keep_password_files: Vec<PathBuf>,
        /// ... or for this key file (repeatable)
        #[arg(long = "keep-key-file", value_name = "FILE")]
        keep_key_files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// The new secret of `key add` and `key passwd`.
#[derive(clap::Args)]
pub(crate) struct NewSecret {
    /// File holding the new password
    #[arg(
        long,
        required_unless_present = "new_key_file",
        conflicts_with = "new_key_file"
    )]
    new_password_file: Option<PathBuf>,
    /// Key file (from `kluis key generate`) for the new secret
    #[arg(long)]
    new_key_file: Option<PathBuf>,
}

impl NewSecret {
    fn secret(&self) -> anyhow::Result<Secret> {
        match new_secret(
            self.new_password_file.as_deref(),
            self.new_key_file.as_deref(),
        )? {
            Some(s) => Ok(s),
            None => bail!(kluis::Error::InvalidInput(
                "give --new-password-file or --new-key-file".into()
            )),
        }
    }
}

/// The secret a `--new-password-file` or `--new-key-file` names, if any.
fn new_secret(password: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Option<Secret>> {
    Ok(match (password, key) {
        (Some(p), _) => Some(Secret::from_password_file(p)?),
        (None, Some(k)) => Some(Secret::from_key_file(k)?),
        (None, None) => None,
    })
}

pub(crate) async fn key_cmd(g: &Global, k: KeyCommand) -> anyhow::Result<i32> {
    match k {
        KeyCommand::Generate { path } => {
            keys::generate_key_file(&path)?;
            println!(
                "wrote key file {} (mode 0600); keep a copy somewhere safe",
                path.display()
            );
            Ok(exit::OK)
        }
        KeyCommand::Add {
            new,
            label,
            write_only,
        } => {
            let new_secret = new.secret()?;
            let repo = open(g).await?;
            let label_shown = label.clone();
            let (kdf, creator) = (KdfParams::default(), Creator::here());
            let id = if write_only {
                repo.add_write_only_key(&new_secret, kdf, creator, label)
                    .await?
            } else {
                repo.add_key(&new_secret, kdf, creator, label).await?
            };
            let event = kluis::audit::Event::new("key-add", id.to_hex())
                .with("label", label_shown.unwrap_or_default())
                .with("write_only", write_only);
            let ledger = crate::ledger(&crate::state_dir(g), &repo);
            if let Some(w) = kluis::audit::record(&repo, event, ledger.as_ref()).await {
                eprintln!("warning: {w}");
            }
            let what = if write_only {
                "write-only key slot"
            } else {
                "key slot"
            };
            println!("added {what} {}", id.short());
            Ok(exit::OK)
        }
        KeyCommand::List { json } => {
            let repo = open(g).await?;
            let (mut slots, errors) = repo.key_slots().await?;
            // Each slot's last use, as the audit trail records it.
            if let Ok(trail) = kluis::audit::verify(&repo, None).await {
                for (_, r) in &trail.records {
                    if let Some(s) = slots.iter_mut().find(|s| s.id == r.slot) {
                        s.last_used = s.last_used.max(Some(r.time));
                    }
                }
            }
            for e in &errors {
                eprintln!("warning: {e}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&slots)?);
            } else {
                print!("{}", output::key_table(&slots));
            }
            Ok(if errors.is_empty() {
                exit::OK
            } else {
                exit::CORRUPT
            })
        }
        KeyCommand::Passwd { new } => {
            let new_secret = new.secret()?;
            let repo = open(g).await?;
            let old = repo.slot_id();
            let id = keyring::change_secret(&repo, &new_secret, KdfParams::default()).await?;
            println!(
                "key slot {} replaced by {} for the new secret; the old secret opens nothing",
                old.short(),
                id.short()
            );
            Ok(exit::OK)
        }
        KeyCommand::Rotate {
            new_password_file,
            new_key_file,
            keep_password_files,
            keep_key_files,
            json,
        } => {
            let mine = match new_secret(new_password_file.as_deref(), new_key_file.as_deref())? {
                Some(s) => s,
                None => secret(g)?,
            };
            let mut slots = vec![mine];
            for p in &keep_password_files {
                slots.push(Secret::from_password_file(p)?);
            }
            for k in &keep_key_files {
                slots.push(Secret::from_key_file(k)?);
            }
            let repo = open(g).await?;
            // The slot in use: its label, and its Argon2 parameters for the new passphrase
            // slots (an operator's choice at `init`).
            let (current, _) = repo.slots().await?;
            let current = current.into_iter().find(|s| s.id == repo.slot_id());
            let label = current.as_ref().and_then(|s| s.label.clone());
            let kdf = current.and_then(|s| s.kdf).unwrap_or_default();
            let opts = keyring::RotateOptions {
                slots: slots
                    .into_iter()
                    .enumerate()
                    .map(|(i, secret)| keyring::NewSlot {
                        secret,
                        kdf,
                        label: if i == 0 { label.clone() } else { None },
                    })
                    .collect(),
                destroy: Default::default(),
                creator: Creator::here(),
                next: None,
            };
            let (_, report) = keyring::rotate(repo, opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "key generation {} replaces {}: {} epoch key(s) wrapped again, {} slot(s) \
                     written, {} slot(s) removed, {} old wrapped key(s) deleted",
                    report.generation.short(),
                    report
                        .previous
                        .map_or_else(|| "the master key".to_string(), |g| g.short()),
                    report.epoch_keys,
                    report.slots.len(),
                    report.removed_slots.len(),
                    report.deleted_objects
                );
                let others: Vec<_> = report.removed_slots.iter().filter(|s| !s.current).collect();
                if !others.is_empty() {
                    println!(
                        "removed slots whose secret was not given (add them again with `kluis key add`):"
                    );
                    print!("{}", output::key_table(&report.removed_slots));
                }
            }
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            Ok(exit::OK)
        }
        KeyCommand::Remove { id } => {
            let repo = open(g).await?;
            let id = repo.find_key(&id.to_ascii_lowercase()).await?;
            repo.remove_key(id).await?;
            let event = kluis::audit::Event::new("key-remove", id.to_hex());
            let ledger = crate::ledger(&crate::state_dir(g), &repo);
            if let Some(w) = kluis::audit::record(&repo, event, ledger.as_ref()).await {
                eprintln!("warning: {w}");
            }
            println!("removed key slot {}", id.short());
            Ok(exit::OK)
        }
    }
}
