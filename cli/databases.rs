//! Database URLs and the database password, shared by `backup` and `restore`.

use std::path::{Path, PathBuf};

use kluis::keys;
use kluis::source::postgres::{self, PgConn};

use crate::Global;

/// The database password: --db-password-file, or the systemd credential `kluis-db-password`.
pub fn db_password(g: &Global) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
    let path = match &g.db_password_file {
        Some(p) => Some(p.clone()),
        None => std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|d| Path::new(&d).join("kluis-db-password"))
            .filter(|p| p.exists()),
    };
    match path {
        None => Ok(None),
        Some(p) => Ok(Some(keys::read_secret_line(&p)?)),
    }
}

pub fn pg_conn(g: &Global, url: &str) -> anyhow::Result<PgConn> {
    let conn = PgConn::parse(url, db_password(g)?)?;
    Ok(conn.with_bin_dir(postgres::tools_dir(g.pg_bin_dir.as_deref())))
}

/// The database engines a URL can name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Mysql,
    Sqlite,
}

pub fn engine_of(url: &str) -> Option<Engine> {
    let scheme = url.split_once("://")?.0;
    match scheme {
        "postgres" | "postgresql" => Some(Engine::Postgres),
        "mysql" | "mariadb" => Some(Engine::Mysql),
        "sqlite" => Some(Engine::Sqlite),
        _ => None,
    }
}

/// A database URL given where paths go.
pub fn database_url(paths: &[PathBuf]) -> Option<(Engine, String)> {
    match paths {
        [p] => {
            let s = p.to_str()?;
            engine_of(s).map(|e| (e, s.to_string()))
        }
        _ => None,
    }
}
