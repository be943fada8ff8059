//! `kluis audit`: the repository's audit trail, verified.

use clap::Args;
use jiff::Timestamp;

use kluis::error::exit;

use crate::output::{self, local_time};
use crate::{Global, open, parse_time};

#[derive(Args)]
pub struct AuditArgs {
    /// Only records at or after this time: RFC 3339, or "YYYY-MM-DD[ HH:MM[:SS]]" in local time
    #[arg(long, value_parser = parse_time)]
    since: Option<Timestamp>,
    /// Only records of this kind (restore, drill, copy, forget, prune, erase, key-add,
    /// key-remove, key-passwd, key-rotate, config-reload)
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    json: bool,
}

/// Lists the records and verifies the whole chain; exit 13 when a record was altered or
/// removed.
pub async fn run(g: &Global, a: AuditArgs) -> anyhow::Result<i32> {
    let repo = open(g).await?;
    let ledger = crate::ledger(&crate::state_dir(g), &repo);
    let trail = kluis::audit::verify(&repo, ledger.as_ref()).await?;
    let shown: Vec<&kluis::audit::AuditRecord> = trail
        .records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| a.since.is_none_or(|t| r.time >= t))
        .filter(|r| a.kind.as_ref().is_none_or(|k| &r.kind == k))
        .collect();
    if a.json {
        let v = serde_json::json!({ "records": shown, "problems": trail.problems });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let rows: Vec<Vec<String>> = shown
            .iter()
            .map(|r| {
                let detail: Vec<String> =
                    r.detail.iter().map(|(k, v)| format!("{k}={v}")).collect();
                vec![
                    local_time(r.time),
                    r.kind.clone(),
                    format!("{}@{}", r.user, r.host),
                    r.subject.chars().take(32).collect(),
                    r.result.clone(),
                    detail.join(" "),
                ]
            })
            .collect();
        print!(
            "{}",
            output::table(
                &["TIME", "KIND", "BY", "SUBJECT", "RESULT", "DETAIL"],
                &rows
            )
        );
        for p in &trail.problems {
            println!("error: {p}");
        }
        println!(
            "{} record(s) shown of {}; chain {}",
            shown.len(),
            trail.records.len(),
            if trail.problems.is_empty() {
                "verified".to_string()
            } else {
                format!("BROKEN: {} problem(s)", trail.problems.len())
            }
        );
    }
    Ok(if trail.problems.is_empty() {
        exit::OK
    } else {
        exit::CORRUPT
    })
}
