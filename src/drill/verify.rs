//! The checks after a drill's restore: the engine accepts it, row counts match the backup's,
//! the configured assertions hold.

use super::*;

pub(super) fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "t" | "true" | "1")
}

/// The checks after a successful restore: the engine's own, row counts, assertions (each
/// engine answers through [`Inspect`]); for a directory, the number of files.
pub(super) async fn verify(
    place: &Place,
    snapshot: &Snapshot,
    drill: &Drill,
    checks: &mut Checks,
    files: u64,
) {
    let tables = match &snapshot.source {
        SnapshotSource::Postgres(r) | SnapshotSource::Mysql(r) | SnapshotSource::Sqlite(r) => {
            r.tables.clone()
        }
        _ => Vec::new(),
    };
    if let Some(db) = place.inspect() {
        let verdict = {
            let (db, t) = (db.clone(), tables.clone());
            blocking(move || Ok(db.verdict(&t))).await
        };
        match verdict {
            Ok(Ok(detail)) => checks.pass("engine", detail),
            Ok(Err(words)) => checks.fail("engine", "restore", words),
            Err(e) => checks.fail("engine", "restore", e.to_string()),
        }
        let counts = {
            let (db, t) = (db.clone(), tables.clone());
            blocking(move || db.count_rows(&t)).await
        };
        compare_rows(checks, &tables, counts);
        let when = db.time_literal(snapshot.time);
        for a in &drill.assertions {
            let (db, sql) = (db.clone(), a.sql.replace("{snapshot_time}", &when));
            let got = blocking(move || db.value(&sql)).await;
            assertion(checks, &a.name, got);
        }
        return;
    }
    if drill.kind == DrillKind::Directory {
        if files == snapshot.summary.files {
            checks.pass("files", format!("{files} file(s), as the snapshot records"));
        } else {
            checks.fail(
                "files",
                "rows",
                format!(
                    "{files} file(s) restored, the snapshot records {}",
                    snapshot.summary.files
                ),
            );
        }
    }
}

pub(super) fn compare_rows(
    checks: &mut Checks,
    tables: &[crate::snapshot::TableRecord],
    counts: Result<Vec<u64>>,
) {
    match counts {
        Err(e) => checks.fail("rows", "rows", format!("cannot count rows: {e}")),
        Ok(counts) if counts.len() != tables.len() => checks.fail(
            "rows",
            "rows",
            format!(
                "counted {} tables, the snapshot records {}",
                counts.len(),
                tables.len()
            ),
        ),
        Ok(counts) => {
            let wrong: Vec<String> = tables
                .iter()
                .zip(&counts)
                .filter(|(t, n)| t.rows != **n)
                .map(|(t, n)| format!("{}.{}: {n} rows, recorded {}", t.schema, t.name, t.rows))
                .collect();
            if wrong.is_empty() {
                checks.pass(
                    "rows",
                    format!(
                        "{} table(s), {} rows, as recorded at backup time",
                        tables.len(),
                        counts.iter().sum::<u64>()
                    ),
                );
            } else {
                checks.fail("rows", "rows", wrong.join("; "));
            }
        }
    }
}

pub(super) fn assertion(checks: &mut Checks, name: &str, got: Result<String>) {
    let label = format!("assert: {name}");
    match got {
        Ok(v) if truthy(&v) => checks.pass(&label, "true"),
        Ok(v) => checks.fail(
            &label,
            "assertion",
            format!("returned {:?}, not true", v.trim()),
        ),
        Err(e) => checks.fail(&label, "assertion", format!("failed: {e}")),
    }
}
