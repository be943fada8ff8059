//! Where drills restore: the scratch server or directory (`Scratch`), one drill's target in
//! it (`Place`), and the clean-up of targets an earlier drill left behind.

use super::*;
use crate::restore::DatabaseTarget;
use crate::source::database::{Inspect, ScratchServer};
use std::sync::Arc;

/// Where a drill restores: a scratch server, or the state directory.
pub(super) enum Scratch {
    Postgres(PgConn),
    /// The server URL (without a database) and its password.
    Mysql(String, Option<zeroize::Zeroizing<String>>),
    Files(PathBuf),
}

/// `scheme://authority/db?query` from a server URL without a database.
pub(super) fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("", base));
    let authority = rest.split('/').next().unwrap_or("");
    format!("{scheme}://{authority}/{db}{query}")
}

impl Scratch {
    pub(super) fn new(config: &Loaded, drill: &Drill) -> Result<Scratch> {
        let password = || crate::secrets::scratch_password(drill.scratch_password_file.as_deref());
        let url = drill.scratch.as_deref().unwrap_or_default();
        Ok(match drill.kind {
            DrillKind::Postgres => Scratch::Postgres(
                PgConn::parse_server(url, password()?)?
                    .with_bin_dir(postgres::tools_dir(None))
                    .with_database("postgres"),
            ),
            DrillKind::Mysql => {
                // Checked now: a bad URL is a configuration error, not a failed drill.
                MyConn::parse(&with_database(url, "mysql"), None)?;
                Scratch::Mysql(url.to_string(), password()?)
            }
            _ => Scratch::Files(config.state_dir.join("drills")),
        })
    }

    pub(super) fn mysql(&self, db: &str) -> Result<MyConn> {
        match self {
            Scratch::Mysql(url, pw) => MyConn::parse(&with_database(url, db), pw.clone()),
            _ => Err(Error::invalid("not a MySQL scratch server")),
        }
    }

    /// Reaches the scratch place and drops what earlier drills of `prefix` left behind:
    /// targets named exactly as this drill names them, created before `before` (none: any
    /// time). Returns the names dropped.
    pub(super) fn clean(&self, prefix: &str, before: Option<Timestamp>) -> Result<Vec<String>> {
        let ours = |name: &str| is_leftover(name, prefix, before);
        let mut dropped = Vec::new();
        match self {
            Scratch::Postgres(server) => dropped = drop_ours(server, prefix, &ours)?,
            Scratch::Mysql(..) => dropped = drop_ours(&self.mysql("mysql")?, prefix, &ours)?,
            Scratch::Files(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                    let entry = entry.map_err(|e| Error::io(dir, e))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !ours(&name) {
                        continue;
                    }
                    let path = entry.path();
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(|e| Error::io(&path, e))?;
                    dropped.push(name);
                }
            }
        }
        Ok(dropped)
    }
}

/// Drops the databases on a scratch server that are `ours`; returns their names.
fn drop_ours(
    server: &dyn ScratchServer,
    prefix: &str,
    ours: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let mut dropped = Vec::new();
    for db in server.databases_named(prefix)? {
        if ours(&db) {
            server.drop_database(&db)?;
            dropped.push(db);
        }
    }
    Ok(dropped)
}

/// Whether `name` is a target this drill made (`<prefix><YYYYmmddHHMMSS>[_n]`), made before
/// `before` if given.
pub(super) fn is_leftover(name: &str, prefix: &str, before: Option<Timestamp>) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let (stamp, n) = rest.split_at(rest.len().min(14));
    let well_formed = stamp.len() == 14
        && stamp.bytes().all(|b| b.is_ascii_digit())
        && (n.is_empty()
            || n.strip_prefix('_')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())));
    if !well_formed {
        return false;
    }
    let Some(before) = before else { return true };
    jiff::civil::DateTime::strptime("%Y%m%d%H%M%S", stamp)
        .ok()
        .and_then(|t| t.to_zoned_datetime(jiff::tz::TimeZone::UTC).ok())
        .is_some_and(|t| t.timestamp() < before)
}

/// Drops what earlier drills of every configured drill left behind (kluisd start-up: none of
/// its drills runs yet).
pub async fn clean_leftovers(config: &Loaded) -> Vec<String> {
    let mut log = Vec::new();
    for drill in &config.drills {
        let prefix = target_prefix(&drill.name);
        let cleaned = match Scratch::new(config, drill) {
            Ok(s) => tokio::task::spawn_blocking(move || s.clean(&prefix, None))
                .await
                .unwrap_or_else(|e| Err(Error::invalid(format!("drill clean-up crashed: {e}")))),
            Err(e) => Err(e),
        };
        match cleaned {
            Ok(names) if names.is_empty() => {}
            Ok(names) => log.push(format!(
                "drill {}: dropped {} left behind by an earlier drill: {}",
                drill.name,
                names.len(),
                names.join(", ")
            )),
            Err(e) => log.push(format!(
                "drill {}: cannot clean its scratch place: {e}",
                drill.name
            )),
        }
    }
    log
}

pub(super) fn scratch_clone(s: &Scratch) -> Scratch {
    match s {
        Scratch::Postgres(c) => Scratch::Postgres(c.clone()),
        Scratch::Mysql(u, p) => Scratch::Mysql(u.clone(), p.clone()),
        Scratch::Files(d) => Scratch::Files(d.clone()),
    }
}

/// One drill's scratch target: a database (see [`DatabaseTarget`]), one whose URL cannot be
/// made (the name and why), or a file or directory.
pub(super) enum Place {
    Database(DatabaseTarget),
    Unusable(String, String),
    File(PathBuf),
}

impl Place {
    /// The restored database, asked through its engine's [`Inspect`] (none for files and
    /// streams, or a target that could not be reached).
    pub(super) fn inspect(&self) -> Option<Arc<dyn Inspect>> {
        match self {
            Place::Database(t) => Some(t.inspect()),
            _ => None,
        }
    }

    pub(super) fn new(scratch: &Scratch, kind: DrillKind, target: &str) -> Place {
        match scratch {
            Scratch::Postgres(server) => {
                Place::Database(DatabaseTarget::Postgres(server.with_database(target)))
            }
            Scratch::Mysql(..) => match scratch.mysql(target) {
                Ok(c) => Place::Database(DatabaseTarget::Mysql(c)),
                Err(e) => Place::Unusable(target.to_string(), e.to_string()),
            },
            Scratch::Files(dir) if kind == DrillKind::Sqlite => {
                Place::Database(DatabaseTarget::Sqlite(dir.join(target)))
            }
            Scratch::Files(dir) => Place::File(dir.join(target)),
        }
    }

    pub(super) fn shown(&self) -> String {
        match self {
            Place::Database(t) => t.shown(),
            Place::Unusable(name, _) => name.clone(),
            Place::File(p) => p.display().to_string(),
        }
    }

    pub(super) async fn remove(&self) -> Result<()> {
        match self {
            Place::Database(t) => {
                let t = t.clone();
                blocking(move || t.drop_database()).await
            }
            Place::Unusable(..) => Ok(()),
            Place::File(p) => {
                let p = p.clone();
                blocking(move || {
                    let removed = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                    match removed {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&p, e)),
                        _ => Ok(()),
                    }
                })
                .await
            }
        }
    }
}
