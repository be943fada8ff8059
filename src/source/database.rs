//! One database URL to one source: which engine it names, its password, its streams. Shared by
//! `kluis backup URL` and the daemon's jobs.

use std::path::PathBuf;

use zeroize::Zeroizing;

use super::StreamSet;
use super::mysql::{MyConn, MysqlSource};
use super::postgres::{self, PgConn, PostgresSource};
use super::sqlite::{self, SqliteSource};
use crate::error::{Error, Result};

/// The database engines a URL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Mysql,
    Sqlite,
}

/// The engine a URL's scheme names, if any.
pub fn engine_of(url: &str) -> Option<Engine> {
    match url.split_once("://")?.0 {
        "postgres" | "postgresql" => Some(Engine::Postgres),
        "mysql" | "mariadb" => Some(Engine::Mysql),
        "sqlite" => Some(Engine::Sqlite),
        _ => None,
    }
}

/// Where a source may look for tools and put temporary copies.
#[derive(Debug, Clone, Default)]
pub struct Places {
    /// The PostgreSQL client tools (default: `PATH`, then the newest Debian install).
    pub pg_bin_dir: Option<PathBuf>,
    /// The SQLite copy (default: `$TMPDIR`).
    pub temp_dir: Option<PathBuf>,
}

/// The source for `url` and the snapshot name it suggests (the database's name).
pub fn open(
    url: &str,
    password: Option<Zeroizing<String>>,
    places: &Places,
) -> Result<(Option<String>, Box<dyn StreamSet>)> {
    match engine_of(url) {
        Some(Engine::Postgres) => {
            let conn = PgConn::parse(url, password)?
                .with_bin_dir(postgres::tools_dir(places.pg_bin_dir.as_deref()));
            Ok((
                Some(conn.database.clone()),
                Box::new(PostgresSource::new(conn)),
            ))
        }
        Some(Engine::Mysql) => {
            let conn = MyConn::parse(url, password)?;
            Ok((
                Some(conn.database.clone()),
                Box::new(MysqlSource::new(conn)),
            ))
        }
        Some(Engine::Sqlite) => {
            let path = sqlite::parse_url(url)?;
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            Ok((
                name,
                Box::new(SqliteSource::new(path, places.temp_dir.clone())),
            ))
        }
        None => Err(Error::invalid(format!(
            "database {}: expected postgres://, mysql:// or sqlite://",
            postgres::redact(url)
        ))),
    }
}
