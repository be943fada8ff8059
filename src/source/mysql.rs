//! MySQL and MariaDB: a database as one standard dump (`mariadb-dump`, or `mysqldump`).
//!
//! The dump runs in one consistent InnoDB snapshot (`--single-transaction`), with routines,
//! triggers and events, rows in primary-key order (`--order-by-primary`, so unchanged rows stay
//! where they were from one night to the next and their chunks deduplicate) and binary columns
//! as hex. MariaDB writes one row per line, which keeps a changed row's damage to one small
//! chunk. While the dump streams through, kluis counts each table's rows for the snapshot.
//!
//! Credentials reach the tools through a 0600 option file (`--defaults-extra-file`) in a
//! private temporary directory, never through their arguments or environment.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

mod inspect;
mod rows;

use rows::RowCounter;
pub use rows::TableSections;

use super::url::DbUrl;
use super::{ChildOutput, NamedStream, StderrPolicy, StreamSet, find_program};
use crate::error::{Error, Result};
use crate::progress::Cancel;
use crate::snapshot::{DatabaseRecord, Source as SourceRecord, TableRecord};

/// mariadb-dump's last line with `--skip-dump-date`: output without it was cut short.
const DUMP_END: &[u8] = b"-- Dump completed\n";

/// The name of the one stream a MySQL snapshot holds.
pub const STREAM: &str = "dump.sql";

/// How to reach a MySQL or MariaDB database.
#[derive(Clone)]
pub struct MyConn {
    /// `[client]` option file with host, port, socket, user and password (mode 0600); removed
    /// when the last clone is dropped.
    options: Arc<tempfile::TempDir>,
    bin_dir: Option<PathBuf>,
    /// The URL without secrets, for messages and the snapshot record.
    pub display: String,
    pub database: String,
}

impl std::fmt::Debug for MyConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MyConn({})", self.display)
    }
}

impl MyConn {
    /// Parses `mysql://[user@][host][:port]/database[?socket=PATH]` (or `mariadb://`). A
    /// password in the URL is refused (it would show in the process list); pass it separately.
    pub fn parse(url: &str, password: Option<Zeroizing<String>>) -> Result<MyConn> {
        let u = DbUrl::parse(url, &["mysql", "mariadb"])?;
        let mut lines: Vec<(String, String)> = Vec::new();
        let parts = [
            ("host", u.host.clone()),
            ("port", u.port.map(|p| p.to_string())),
            ("user", u.user.clone()),
        ];
        for (key, value) in parts {
            if let Some(v) = value {
                lines.push((key.into(), v));
            }
        }
        for (k, v) in &u.query {
            // Only options that both the dump tool and the client read from `[client]`.
            if !["socket", "ssl-ca", "ssl-cert", "ssl-key"].contains(&k.as_str()) {
                return Err(u.error(format!(
                    "unknown parameter {k:?} (known: socket, ssl-ca, ssl-cert, ssl-key)"
                )));
            }
            lines.retain(|(n, _)| n != k);
            lines.push((k.clone(), v.clone()));
        }
        let database = match &u.database {
            Some(d) if !d.contains('/') => d.clone(),
            _ => return Err(u.error("names no database (mysql://host/DATABASE)")),
        };
        if password.as_ref().is_some_and(|p| p.len() > 2000) {
            return Err(u.error(
                "the database password is longer than 2000 bytes, more than the MySQL tools \
                 read from an option file",
            ));
        }
        let options =
            write_options(&lines, password.as_deref().map(String::as_str)).map_err(|e| {
                Error::SourceFailed(format!(
                    "cannot write the temporary MySQL option file (in {}): {e}",
                    std::env::temp_dir().display()
                ))
            })?;
        Ok(MyConn {
            options: Arc::new(options),
            bin_dir: None,
            display: u.shown,
            database,
        })
    }

    /// Looks for the client tools in `dir` instead of on `PATH`.
    pub fn with_bin_dir(mut self, dir: Option<PathBuf>) -> MyConn {
        self.bin_dir = dir;
        self
    }

    fn options_file(&self) -> PathBuf {
        self.options.path().join("client.cnf")
    }

    /// A client tool (`mariadb-dump`/`mysqldump`, `mariadb`/`mysql`) reading the connection
    /// from the option file, which must be its first argument.
    fn command(&self, names: &[&str]) -> Result<Command> {
        let mut last = None;
        for name in names {
            match find_program(name, self.bin_dir.as_deref()) {
                Ok(path) => {
                    let mut c = super::child_command(path);
                    c.arg(format!(
                        "--defaults-extra-file={}",
                        self.options_file().display()
                    ));
                    c.stdin(Stdio::null());
                    return Ok(c);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::invalid("no client tool named")))
    }

    /// The `mariadb` (or `mysql`) client in batch mode, stopping at the first error.
    pub fn client(&self) -> Result<Command> {
        let mut c = self.command(&["mariadb", "mysql"])?;
        c.args(["--batch", "--default-character-set=utf8mb4"]);
        Ok(c)
    }

    /// Runs one query (on no database: the database may not exist) and returns its rows,
    /// tab-separated, without column names.
    pub fn query(&self, sql: &str) -> Result<Vec<String>> {
        self.run(None, sql, Error::SourceFailed)
    }

    /// Runs one statement in this connection's database (a restore target) and returns its
    /// rows, tab-separated, without column names.
    pub fn query_in(&self, sql: &str) -> Result<Vec<String>> {
        self.run(Some(&self.database), sql, Error::TargetFailed)
    }

    /// Runs `sql`; a client that fails is reported with `fail`.
    fn run(
        &self,
        database: Option<&str>,
        sql: &str,
        fail: fn(String) -> Error,
    ) -> Result<Vec<String>> {
        let mut c = self.client()?;
        if let Some(db) = database {
            c.arg(format!("--database={db}"));
        }
        let out = c
            .args(["--skip-column-names", "-e", sql])
            .output()
            .map_err(|e| fail(format!("cannot start the mariadb client: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "mariadb client on {}: {}",
                self.display,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect())
    }
}

/// Writes a `[client]` option file, mode 0600 in a directory of mode 0700. Values are quoted
/// with the option-file escapes, so any password works.
fn write_options(
    lines: &[(String, String)],
    password: Option<&str>,
) -> io::Result<tempfile::TempDir> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::Builder::new().prefix("kluis-mysql-").tempdir()?;
    // Written straight into one zeroized buffer: no stray copies of the password.
    let quote_into = |out: &mut String, v: &str| {
        out.push('"');
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c => out.push(c),
            }
        }
        out.push_str("\"\n");
    };
    let room = lines
        .iter()
        .map(|(k, v)| k.len() + 2 * v.len() + 4)
        .sum::<usize>()
        + password.map_or(0, |p| 2 * p.len() + 16)
        + 16;
    let mut text = Zeroizing::new(String::with_capacity(room));
    text.push_str("[client]\n");
    for (k, v) in lines {
        text.push_str(k);
        text.push('=');
        quote_into(&mut text, v);
    }
    if let Some(p) = password {
        text.push_str("password=");
        quote_into(&mut text, p);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.path().join("client.cnf"))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(dir)
}

/// What the server says about the database before the dump.
struct Info {
    version: String,
    charset: String,
    collation: String,
}

pub(crate) fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

pub(crate) fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

fn info(conn: &MyConn) -> Result<Info> {
    let rows = conn.query(&format!(
        "SELECT VERSION(), DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME \
         FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {}",
        sql_literal(&conn.database)
    ))?;
    let row = rows.first().ok_or_else(|| {
        Error::SourceFailed(format!(
            "database {:?} does not exist on {}",
            conn.database, conn.display
        ))
    })?;
    let f: Vec<&str> = row.split('\t').collect();
    match f.as_slice() {
        [v, cs, coll] => Ok(Info {
            version: v.to_string(),
            charset: cs.to_string(),
            collation: coll.to_string(),
        }),
        _ => Err(Error::SourceFailed(format!(
            "unexpected answer from {}: {row:?}",
            conn.display
        ))),
    }
}

/// A MySQL or MariaDB database as a [`StreamSet`]: one stream, [`STREAM`].
pub struct MysqlSource {
    conn: MyConn,
    info: Option<Info>,
    tables: Arc<Mutex<RowCounter>>,
    warnings: Option<super::Warnings>,
    cancel: Cancel,
    started: bool,
}

impl MysqlSource {
    pub fn new(conn: MyConn) -> MysqlSource {
        MysqlSource {
            conn,
            info: None,
            tables: Arc::default(),
            warnings: None,
            cancel: Cancel::new(),
            started: false,
        }
    }
}

impl StreamSet for MysqlSource {
    fn next_stream(&mut self) -> Result<Option<NamedStream>> {
        if self.started {
            return Ok(None);
        }
        self.started = true;
        self.info = Some(info(&self.conn)?);
        let mut c = self.conn.command(&["mariadb-dump", "mysqldump"])?;
        c.args([
            "--single-transaction",
            "--quick",
            "--routines",
            "--triggers",
            "--events",
            "--order-by-primary",
            "--hex-blob",
            "--skip-dump-date",
            "--no-tablespaces",
            "--default-character-set=utf8mb4",
            "--max-allowed-packet=1G",
        ])
        .arg(&self.conn.database);
        let what = format!("mariadb-dump of {}", self.conn.display);
        let out = ChildOutput::spawn(what, &mut c, StderrPolicy::DatabaseTool)?
            .with_trailer(DUMP_END)
            .cancel_on(self.cancel.clone());
        self.warnings = Some(out.warnings());
        Ok(Some(NamedStream {
            name: STREAM.into(),
            reader: Box::new(Counting {
                inner: out,
                counter: self.tables.clone(),
            }),
        }))
    }

    /// Warnings the dump tool printed (stderr lines that were not errors).
    fn attach_cancel(&mut self, cancel: Cancel) {
        self.cancel = cancel;
    }

    fn warnings(&self) -> Vec<String> {
        super::collect_warnings(&self.warnings)
    }

    fn finish(&mut self) -> Result<SourceRecord> {
        let info = self
            .info
            .as_ref()
            .ok_or_else(|| Error::SourceFailed("the MySQL source was never opened".into()))?;
        let counter = self.tables.lock().expect("not poisoned");
        let tables = counter
            .tables
            .iter()
            .map(|t| TableRecord {
                schema: self.conn.database.clone(),
                name: t.name.clone(),
                rows: t.rows,
                key: t.key.clone(),
            })
            .collect();
        Ok(SourceRecord::Mysql(DatabaseRecord {
            server: self.conn.display.clone(),
            database: self.conn.database.clone(),
            server_version: info.version.clone(),
            encoding: info.charset.clone(),
            collation: Some(info.collation.clone()),
            tables,
        }))
    }
}

/// Passes the dump through while counting its tables and rows.
struct Counting<R> {
    inner: R,
    counter: Arc<Mutex<RowCounter>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.lock().expect("not poisoned").feed(&buf[..n]);
        Ok(n)
    }
}

/// Makes the restore target ready: creates the database (in the snapshot's character set and
/// collation), or accepts an existing empty one; a database that holds tables, views,
/// routines or events is refused unless `force`, which drops and recreates it.
pub fn prepare_target(
    target: &MyConn,
    charset: &str,
    collation: Option<&str>,
    force: bool,
) -> Result<()> {
    let q = |sql: &str| target.query(sql).map_err(Error::on_target);
    let db = &target.database;
    let lit = sql_literal(db);
    let exists = !q(&format!(
        "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {lit}"
    ))?
    .is_empty();
    if exists {
        let counts = q(&format!(
            "SELECT (SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = {lit}) \
             + (SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {lit}) \
             + (SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = {lit})"
        ))?;
        let objects: u64 = counts
            .first()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX);
        if objects == 0 {
            return Ok(());
        }
        if !force {
            return Err(Error::invalid(format!(
                "database {db:?} on {} is not empty ({objects} tables, views, routines or \
                 events); restore into a new database, or pass --force to drop and recreate it",
                target.display
            )));
        }
        q(&format!("DROP DATABASE {}", ident(db)))?;
    }
    let charset_ok =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let mut create = format!("CREATE DATABASE {}", ident(db));
    if charset_ok(charset) {
        create.push_str(&format!(" CHARACTER SET {charset}"));
        if let Some(c) = collation.filter(|c| charset_ok(c)) {
            create.push_str(&format!(" COLLATE {c}"));
        }
    }
    q(&create)?;
    Ok(())
}

/// The client reading a dump on its standard input into the target database; it stops at the
/// first error and names the line.
pub fn loader(target: &MyConn) -> Result<Command> {
    let mut c = target.client()?;
    c.arg(format!("--database={}", target.database))
        .arg("--max-allowed-packet=1G")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(c)
}

impl crate::source::database::Load for MyConn {
    const CLIENT: &'static str = "mariadb";

    fn shown(&self) -> String {
        self.display.clone()
    }

    fn prepare(&self, record: &DatabaseRecord, force: bool) -> Result<()> {
        prepare_target(self, &record.encoding, record.collation.as_deref(), force)
    }

    fn loader(&self) -> Result<Command> {
        loader(self)
    }
}

/// The options file a connection uses (for tests of its mode).
pub fn options_path(conn: &MyConn) -> &Path {
    conn.options.path()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_option_files() {
        let c = MyConn::parse(
            "mysql://app%40x@db.example:3307/shop?socket=/run/mysqld/mysqld.sock",
            Some(Zeroizing::new("p\"w\\d".into())),
        )
        .unwrap();
        assert_eq!(c.database, "shop");
        let text = std::fs::read_to_string(c.options_file()).unwrap();
        assert!(text.starts_with("[client]\n"), "{text}");
        assert!(text.contains("host=\"db.example\""), "{text}");
        assert!(text.contains("port=\"3307\""), "{text}");
        assert!(text.contains("user=\"app@x\""), "{text}");
        assert!(text.contains("password=\"p\\\"w\\\\d\""), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.options_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = MyConn::parse("mysql://u:secret@h/db", None).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(MyConn::parse("mysql://h/", None).is_err());
        assert!(MyConn::parse("mysql://h/db?bogus=1", None).is_err());
        let dir = options_path(&c).to_path_buf();
        drop(c);
        assert!(!dir.exists(), "the option file outlived its connection");
    }
}
