//! `kluis key`: key files and key slots (list, add, remove).

use super::*;

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// Add a key slot for a new password or key file
    Add {
        /// File holding the new password
        #[arg(
            long,
            required_unless_present = "new_key_file",
            conflicts_with = "new_key_file"
        )]
        new_password_file: Option<PathBuf>,
        /// Key file (from `kluis key generate`) for the new slot
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        /// A note to recognise the slot by, e.g. who holds it
        #[arg(long)]
        label: Option<String>,
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
            new_password_file,
            new_key_file,
            label,
        } => {
            let new_secret = match (new_password_file, new_key_file) {
                (Some(p), _) => Secret::from_password_file(&p)?,
                (None, Some(k)) => Secret::from_key_file(&k)?,
                (None, None) => bail!(kluis::Error::InvalidInput(
                    "give --new-password-file or --new-key-file".into()
                )),
            };
            let repo = open(g).await?;
            let id = repo
                .add_key(&new_secret, KdfParams::default(), kluis::hostname(), label)
                .await?;
            println!("added key slot {}", id.short());
            Ok(exit::OK)
        }
        KeyCommand::List { json } => {
            let repo = open(g).await?;
            let (slots, errors) = repo.key_slots().await?;
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
        KeyCommand::Remove { id } => {
            let repo = open(g).await?;
            let id = repo.find_key(&id.to_ascii_lowercase()).await?;
            repo.remove_key(id).await?;
            println!("removed key slot {}", id.short());
            Ok(exit::OK)
        }
    }
}
