//! `kluis wal`: PostgreSQL's write-ahead log in the repository. `push` is the
//! `archive_command` (it succeeds only once the file is durable in the repository), `fetch`
//! the `restore_command` (exit 1 when the archive does not hold the file: the end of the WAL).

use std::path::PathBuf;

use clap::Subcommand;

use kluis::error::exit;

use crate::{Global, open, output};

#[derive(Subcommand)]
pub enum WalCommand {
    /// Archive a WAL file: `archive_command = 'kluis wal push --cluster NAME %p'`
    Push {
        /// The cluster's name in the repository (its WAL is kept apart from other clusters')
        #[arg(long)]
        cluster: String,
        /// The WAL file (PostgreSQL's %p)
        path: PathBuf,
    },
    /// Restore a WAL file: `restore_command = 'kluis wal fetch --cluster NAME %f %p'`
    Fetch {
        #[arg(long)]
        cluster: String,
        /// The WAL file's name (%f)
        file: String,
        /// Where to write it (%p)
        dest: PathBuf,
    },
    /// The archived WAL files of a cluster
    List {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(g: &Global, c: WalCommand) -> anyhow::Result<i32> {
    let repo = open(g).await?;
    match c {
        WalCommand::Push { cluster, path } => {
            let report = kluis::wal::push(&repo, &cluster, &path).await?;
            if !g.quiet {
                let done = if report.already {
                    "archived already".to_string()
                } else {
                    format!(
                        "archived ({} in {})",
                        output::human_bytes(report.bytes),
                        output::human_bytes(report.stored)
                    )
                };
                eprintln!("kluis wal push: {} {done}", report.file);
            }
            Ok(exit::OK)
        }
        WalCommand::Fetch {
            cluster,
            file,
            dest,
        } => {
            if kluis::wal::fetch(&repo, &cluster, &file, &dest)
                .await?
                .is_some()
            {
                Ok(exit::OK)
            } else {
                eprintln!("kluis wal fetch: {file} is not in the archive of cluster {cluster}");
                Ok(exit::FAILURE)
            }
        }
        WalCommand::List { cluster, json } => {
            let listed = kluis::wal::list(&repo, &cluster).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                let rows: Vec<Vec<String>> = listed
                    .iter()
                    .map(|a| {
                        vec![
                            a.file.clone(),
                            output::local_time(a.archived),
                            output::human_bytes(a.size),
                        ]
                    })
                    .collect();
                print!("{}", output::table(&["FILE", "ARCHIVED", "STORED"], &rows));
            }
            Ok(exit::OK)
        }
    }
}
