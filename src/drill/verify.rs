//! The checks after a drill's restore: the engine accepts it, row counts match the backup's,
//! the configured assertions hold.

use super::*;

/// The timestamp literal `{snapshot_time}` stands for in an assertion.
/// Microseconds, UTC: what all three engines keep.
pub(super) fn time_literal(kind: DrillKind, t: Timestamp) -> String {
    let utc = t.to_zoned_datetime(jiff::tz::TimeZone::UTC);
    match kind {
        DrillKind::Postgres => format!("'{}'::timestamptz", utc.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")),
        _ => format!("'{}'", utc.strftime("%Y-%m-%d %H:%M:%S%.6f")),
    }
}

pub(super) fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "t" | "true" | "1")
}

/// The checks after a successful restore: the engine's own, row counts, assertions.
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
    let when = time_literal(drill.kind, snapshot.time);
    let assertions: Vec<(String, String)> = drill
        .assertions
        .iter()
        .map(|a| (a.name.clone(), a.sql.replace("{snapshot_time}", &when)))
        .collect();
    match place {
        Place::Postgres(c) => {
            checks.pass(
                "engine",
                "psql loaded every stream with ON_ERROR_STOP: no error",
            );
            let counts = {
                let (c, t) = (c.clone(), tables.clone());
                blocking(move || {
                    let exprs: Vec<String> = t
                        .iter()
                        .map(|t| {
                            format!(
                                "(SELECT count(*) FROM ONLY {}.{})",
                                postgres::ident(&t.schema),
                                postgres::ident(&t.name)
                            )
                        })
                        .collect();
                    count_rows(&exprs, |sql| c.query_one(sql))
                })
                .await
            };
            compare_rows(checks, &tables, counts);
            for (name, sql) in assertions {
                let c = c.clone();
                let got = blocking(move || c.query_one(&sql)).await;
                assertion(checks, &name, got);
            }
        }
        Place::Mysql(Ok(c), _) => {
            let names: Vec<String> = tables.iter().map(|t| mysql::ident(&t.name)).collect();
            if names.is_empty() {
                checks.pass("engine", "no tables to check");
            } else {
                let c2 = c.clone();
                let list = names.join(", ");
                let rows = blocking(move || c2.query_in(&format!("CHECK TABLE {list}"))).await;
                match rows {
                    Err(e) => checks.fail("engine", "restore", format!("CHECK TABLE failed: {e}")),
                    Ok(rows) => {
                        let bad: Vec<&String> = rows
                            .iter()
                            .filter(|r| {
                                let f: Vec<&str> = r.split('\t').collect();
                                f.len() >= 4
                                    && (f[2].eq_ignore_ascii_case("error")
                                        || (f[2].eq_ignore_ascii_case("status")
                                            && !f[3].eq_ignore_ascii_case("ok")))
                            })
                            .collect();
                        if bad.is_empty() {
                            checks.pass(
                                "engine",
                                format!("CHECK TABLE: all {} table(s) OK", names.len()),
                            );
                        } else {
                            checks.fail(
                                "engine",
                                "restore",
                                format!(
                                    "CHECK TABLE: {}",
                                    bad.iter()
                                        .map(|s| s.replace('\t', " "))
                                        .collect::<Vec<_>>()
                                        .join("; ")
                                ),
                            );
                        }
                    }
                }
            }
            let counts = {
                let (c, names) = (c.clone(), names.clone());
                blocking(move || {
                    let exprs: Vec<String> = names
                        .iter()
                        .map(|t| format!("(SELECT COUNT(*) FROM {t})"))
                        .collect();
                    count_rows(&exprs, |sql| c.query_in(sql).map(|r| r.join("\n")))
                })
                .await
            };
            compare_rows(checks, &tables, counts);
            for (name, sql) in assertions {
                let c = c.clone();
                let got = blocking(move || c.query_in(&sql).map(|r| r.join("\n"))).await;
                assertion(checks, &name, got);
            }
        }
        Place::Mysql(Err(_), _) => {}
        Place::File(p) => match drill.kind {
            DrillKind::Sqlite => {
                checks.pass("engine", "PRAGMA integrity_check: ok");
                let (p2, t) = (p.clone(), tables.clone());
                let counts = blocking(move || {
                    let c = rusqlite::Connection::open_with_flags(
                        &p2,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )
                    .map_err(|e| Error::TargetFailed(format!("{}: {e}", p2.display())))?;
                    t.iter()
                        .map(|t| {
                            c.query_row(
                                &format!(
                                    "SELECT count(*) FROM \"{}\"",
                                    t.name.replace('"', "\"\"")
                                ),
                                [],
                                |r| r.get::<_, i64>(0),
                            )
                            .map(|n| n.max(0) as u64)
                            .map_err(|e| {
                                Error::TargetFailed(format!("count rows of {}: {e}", t.name))
                            })
                        })
                        .collect::<Result<Vec<u64>>>()
                })
                .await;
                compare_rows(checks, &tables, counts);
                for (name, sql) in assertions {
                    let p2 = p.clone();
                    let got = blocking(move || {
                        let c = rusqlite::Connection::open_with_flags(
                            &p2,
                            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                        )
                        .map_err(|e| Error::TargetFailed(e.to_string()))?;
                        c.query_row(&sql, [], |r| {
                            Ok(match r.get_ref(0)? {
                                rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                                rusqlite::types::ValueRef::Real(f) => f.to_string(),
                                rusqlite::types::ValueRef::Text(t) => {
                                    String::from_utf8_lossy(t).into_owned()
                                }
                                rusqlite::types::ValueRef::Null => "NULL".into(),
                                rusqlite::types::ValueRef::Blob(_) => "(blob)".into(),
                            })
                        })
                        .map_err(|e| Error::TargetFailed(e.to_string()))
                    })
                    .await;
                    assertion(checks, &name, got);
                }
            }
            DrillKind::Directory => {
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
            _ => {}
        },
    }
}

/// Counts rows with one query per 100 tables: the subqueries' counts joined by commas
/// (`concat_ws` means the same to PostgreSQL and MySQL).
pub(super) fn count_rows(
    exprs: &[String],
    query: impl Fn(&str) -> Result<String>,
) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    // PostgreSQL takes at most 100 arguments to a function.
    for part in exprs.chunks(90) {
        let got = query(&format!("SELECT concat_ws(',', {})", part.join(", ")))?;
        for n in got.trim().split(',') {
            out.push(
                n.trim()
                    .parse()
                    .map_err(|_| Error::TargetFailed(format!("row count {n:?} is not a number")))?,
            );
        }
    }
    Ok(out)
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
