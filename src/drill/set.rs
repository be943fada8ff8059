//! Drills of a whole PostgreSQL server's job: each pick is a complete set (see
//! [`crate::jobs::sets_of`]). Its roles are restored into the scratch server first (roles that
//! exist there are left as they are; the roles created stay, as later drills need them too),
//! then each database is drilled as a database job's snapshot is, with a report of its own.

use super::*;

/// The complete sets a drill tests: the one holding the snapshot asked for, or the newest and
/// (with `older`) a random older one.
pub(super) fn picks(
    drill: &Drill,
    list: &[Snapshot],
    opts: &DrillOptions,
) -> Result<Vec<(Vec<Snapshot>, &'static str)>> {
    let owned = |set: &Vec<&Snapshot>| set.iter().map(|s| (*s).clone()).collect::<Vec<_>>();
    let sets = crate::jobs::sets_of(&drill.job.snapshot_name, list);
    if let Some(spec) = &opts.snapshot {
        let members: Vec<Snapshot> = sets.iter().flatten().map(|s| (*s).clone()).collect();
        let chosen = crate::snapshot::select(&members, spec, None)?;
        let set = sets
            .iter()
            .find(|set| set.iter().any(|s| s.id == chosen.id))
            .map(owned)
            .unwrap_or_default();
        return Ok(vec![(set, "chosen")]);
    }
    let Some((newest, older)) = sets.split_last() else {
        return Err(Error::SnapshotNotFound(format!(
            "(a complete set) of job {} in repository {} to drill",
            drill.job.name, drill.repository
        )));
    };
    let mut picks = vec![(owned(newest), "newest")];
    if drill.older && !older.is_empty() {
        picks.push((owned(&older[random_below(older.len())]), "older"));
    }
    Ok(picks)
}

/// Drills one set: its roles into the scratch server, then each database; one report per
/// database, each opening with the `globals` check. `n` numbers the targets of this run.
pub(super) async fn drill_set(
    repo: &Repository,
    drill: &Drill,
    scratch: &Scratch,
    members: &[Snapshot],
    pick: &str,
    n: &mut usize,
    cancel: &Cancel,
) -> Vec<DrillReport> {
    let globals = members
        .iter()
        .find(|s| matches!(s.source, SnapshotSource::PostgresGlobals(_)));
    let roles = match (globals, scratch) {
        (Some(g), Scratch::Postgres(server)) => Some(restore_roles(repo, g, server, cancel).await),
        _ => None,
    };
    let mut reports = Vec::new();
    for member in members {
        let SnapshotSource::Postgres(record) = &member.source else {
            continue;
        };
        // Assertions naming another database are not this one's.
        let mut mine = drill.clone();
        mine.assertions
            .retain(|a| a.database.as_ref().is_none_or(|d| *d == record.database));
        let mut report = drill_one(repo, &mine, scratch, member, pick, *n, cancel).await;
        *n += 1;
        if let Some(check) = &roles {
            report.checks.insert(0, check.clone());
            if !check.ok && report.passed {
                report.passed = false;
                report.reason = Some("restore".into());
            }
        }
        reports.push(report);
    }
    reports
}

/// Restores a set's roles and tablespaces into the scratch server: the `globals` check, and
/// how many existed there already.
async fn restore_roles(
    repo: &Repository,
    globals: &Snapshot,
    server: &PgConn,
    cancel: &Cancel,
) -> Check {
    let opts = RestoreOptions {
        cancel: cancel.clone(),
        ..RestoreOptions::default()
    };
    let restored = async {
        Restorer::new(repo, globals, opts)
            .await?
            .to_postgres_globals(server)
            .await
    };
    match restored.await {
        Ok(report) => Check {
            name: "globals".into(),
            ok: true,
            detail: format!(
                "roles and tablespaces of snapshot {} restored into the scratch server \
                     first ({} bytes; {} existed there already)",
                globals.id.short(),
                report.bytes,
                report.warnings.len()
            ),
        },
        Err(e) => Check {
            name: "globals".into(),
            ok: false,
            detail: format!(
                "roles and tablespaces of snapshot {} could not be restored into the \
                     scratch server: {e}",
                globals.id.short()
            ),
        },
    }
}
