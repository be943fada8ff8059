//! One database URL to one source: which engine it names, its streams. Shared by `kluis
//! backup URL` and the daemon's jobs. And what every engine provides for restore drills
//! ([`Inspect`], [`ScratchServer`]).

use std::path::PathBuf;

use zeroize::Zeroizing;

use super::StreamSet;
use super::mysql::{MyConn, MysqlSource};
use super::postgres::{self, PgConn, PostgresSource};
use super::sqlite::{self, SqliteSource};
use crate::error::{Error, Result};
use crate::snapshot::TableRecord;

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

/// What a restore drill asks of a database it restored into; each engine implements it in its
/// own module (`postgres/inspect.rs`, `mysql/inspect.rs`, `sqlite.rs`), so the drill itself
/// knows no engine's SQL.
pub trait Inspect: Send + Sync {
    /// The engine's own verdict on what was loaded: what it checked when sound, its words when
    /// not.
    fn verdict(&self, tables: &[TableRecord]) -> std::result::Result<String, String>;
    /// Each table's rows, in the order given.
    fn count_rows(&self, tables: &[TableRecord]) -> Result<Vec<u64>>;
    /// The first column of the first row `sql` returns, as text.
    fn value(&self, sql: &str) -> Result<String>;
    /// A timestamp as a literal of this engine's SQL (microseconds, UTC: what every engine
    /// keeps).
    fn time_literal(&self, t: jiff::Timestamp) -> String;
}

/// How an engine takes a restored dump; each engine implements it beside its dump
/// (`postgres/load.rs`, `mysql.rs`). The restore drives it: it makes the target ready, then
/// pipes each stream through the client, which stops at the first error.
pub trait Load: Clone + Send + Sync + 'static {
    /// The client's name, in errors.
    const CLIENT: &'static str;
    /// The target, for messages (without secrets).
    fn shown(&self) -> String;
    /// Creates the target database for `record`; an existing one must be empty, unless
    /// `force` (which drops and recreates it).
    fn prepare(&self, record: &crate::snapshot::DatabaseRecord, force: bool) -> Result<()>;
    /// The client that reads one stream on its standard input and loads it.
    fn loader(&self) -> Result<std::process::Command>;
}

/// A server where drills create their scratch databases; each engine implements it.
pub trait ScratchServer: Send + Sync {
    /// The databases whose names begin with `prefix`.
    fn databases_named(&self, prefix: &str) -> Result<Vec<String>>;
    /// Drops a database, if it exists, however many sessions it has.
    fn drop_database(&self, name: &str) -> Result<()>;
}

/// Counts rows with one query per 90 tables: the subqueries' counts joined by commas
/// (`concat_ws` means the same to PostgreSQL and MySQL; PostgreSQL takes at most 100
/// arguments to a function).
pub(crate) fn count_by_subqueries(
    subqueries: &[String],
    query: impl Fn(&str) -> Result<String>,
) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for part in subqueries.chunks(90) {
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
