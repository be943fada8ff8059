//! PostgreSQL: a database as a standard plain-SQL dump that deduplicates night after night.
//!
//! All streams come from one consistent snapshot: a `psql` session opens a repeatable-read
//! transaction and exports its snapshot (`pg_export_snapshot()`), and every tool below joins it
//! (`pg_dump --snapshot`, `SET TRANSACTION SNAPSHOT`) while that session stays open. Streams,
//! in restore order:
//!
//! 1. `1-pre-data.sql`: `pg_dump --section=pre-data` (types, tables, functions, ...);
//! 2. `2-data-NNNNNN-<table>.sql`, one per table: `COPY ... FROM stdin;` blocks whose rows come
//!    from `COPY (SELECT ... ORDER BY <primary key>) TO STDOUT`. pg_dump writes rows in heap
//!    order, which updates and vacuum reshuffle every night; primary-key order keeps unchanged
//!    rows where they were, so unchanged chunks deduplicate;
//! 3. `3-data-other.sql`: `pg_dump --section=data` without those tables: sequence values and
//!    large objects;
//! 4. `4-post-data.sql`: `pg_dump --section=post-data` (indexes, constraints, triggers, ...).
//!
//! Concatenated, they are a plain SQL dump that `psql` restores. Passwords reach the tools
//! through their environment (`PGPASSWORD`), never their arguments.
//!
//! Roles and tablespaces belong to the server, not to a database: [`globals`] backs them up.

pub mod base;
pub mod globals;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::url::DbUrl;
pub use super::url::redact;
use super::{ChildOutput, Framed, NamedStream, StderrPolicy, StreamSet, find_program};
use crate::error::{Error, Result};
use crate::progress::Cancel;
use crate::snapshot::{DatabaseRecord, Source as SourceRecord, TableRecord};

mod inspect;
mod load;

pub use load::*;

mod conn;

pub use conn::*;

/// pg_dump's last line: output without it was cut short.
const PG_DUMP_END: &[u8] = b"-- PostgreSQL database dump complete\n--\n";

/// A table as the snapshot-holding session described it.
#[derive(Debug, Clone, Deserialize)]
struct Table {
    schema: String,
    name: String,
    /// `schema.name`, quoted where needed (as pg_dump writes it).
    qualified: String,
    /// A pattern that matches exactly this table, for `--exclude-table-data`.
    pattern: String,
    /// Columns COPY carries (generated columns excluded), quoted, comma-separated.
    columns: Option<String>,
    /// The primary key's columns, quoted, in key order.
    key: Option<String>,
    /// The table's size on disk (with TOAST), to read the largest tables first.
    #[serde(default)]
    bytes: i64,
}

#[derive(Deserialize)]
struct Info {
    snapshot: String,
    version: String,
    encoding: String,
}

/// The `psql` session that holds the exported snapshot until every stream has started.
struct Exporter {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    sent: u64,
}

impl Exporter {
    fn start(conn: &PgConn) -> Result<Exporter> {
        let mut child = conn
            .psql()?
            .args(["-A", "-t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::SourceFailed(format!("cannot start psql: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let stderr = child.stderr.take().map(super::collect_stderr);
        let mut e = Exporter {
            child,
            stdin,
            stdout,
            stderr,
            sent: 0,
        };
        // The session idles in its transaction while the dumps run: no timeouts may end it.
        e.exec(
            "SET statement_timeout = 0; SET lock_timeout = 0; \
             SET idle_in_transaction_session_timeout = 0; \
             BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;",
        )?;
        Ok(e)
    }

    /// Sends SQL and waits until psql has run it; returns the lines it printed.
    fn exec(&mut self, sql: &str) -> Result<Vec<String>> {
        self.sent += 1;
        let marker = format!("kluis-done-{}", self.sent);
        let script = format!("{sql}\n\\echo {marker}\n");
        if self.stdin.write_all(script.as_bytes()).is_err() || self.stdin.flush().is_err() {
            return Err(self.failure());
        }
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return Err(self.failure()),
                Ok(_) => {}
            }
            let line = line.trim_end_matches('\n');
            if line == marker {
                return Ok(lines);
            }
            lines.push(line.to_string());
        }
    }

    /// The session ended early: its error message.
    fn failure(&mut self) -> Error {
        let _ = self.child.kill();
        let status = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&stderr);
        let msg = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ");
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        Error::SourceFailed(if msg.is_empty() {
            format!("psql (snapshot session) ended unexpectedly ({status})")
        } else {
            format!("psql (snapshot session): {msg}")
        })
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self, sql: &str) -> Result<T> {
        let lines = self.exec(sql)?;
        let line = lines.iter().find(|l| !l.is_empty()).ok_or_else(|| {
            Error::SourceFailed("psql (snapshot session) returned no result".into())
        })?;
        serde_json::from_str(line).map_err(|e| {
            Error::SourceFailed(format!(
                "psql (snapshot session) returned unexpected output: {e}"
            ))
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.stdin.write_all(b"ROLLBACK;\n\\q\n");
        let _ = self.stdin.flush();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const INFO_SQL: &str = "SELECT jsonb_build_object('snapshot', pg_export_snapshot(), \
     'version', current_setting('server_version'), \
     'encoding', current_setting('server_encoding'));";

/// Every ordinary table with data a plain pg_dump would carry: not system, temporary or
/// extension-owned tables.
const TABLES_SQL: &str = r#"SELECT coalesce(jsonb_agg(jsonb_build_object(
    'schema', n.nspname, 'name', c.relname,
    'qualified', quote_ident(n.nspname) || '.' || quote_ident(c.relname),
    'pattern', '"' || replace(n.nspname, '"', '""') || '"."' || replace(c.relname, '"', '""') || '"',
    'columns', (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
                FROM pg_attribute a
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attgenerated = ''),
    'key', (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord)
            FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = c.oid AND i.indisprimary),
    'bytes', pg_table_size(c.oid)
  ) ORDER BY n.nspname, c.relname), '[]'::jsonb)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e');"#;

/// One stream of a [`PostgresSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    PreData,
    /// The data of `tables[i]`.
    Table(usize),
    OtherData,
    PostData,
}

/// The order streams are read in: the schema first (pg_dump writes it quickly), then the
/// tables largest first, so that two streams at once keep both slots busy to the end (in
/// name order, a large table named last would be read alone), then the other data and the
/// post-data schema. The snapshot lists the streams by name whatever the order.
fn plan(tables: &[Table]) -> Vec<Step> {
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tables[i].bytes));
    let mut plan = vec![Step::PreData];
    plan.extend(order.into_iter().map(Step::Table));
    plan.extend([Step::OtherData, Step::PostData]);
    plan
}

/// A PostgreSQL database as a [`StreamSet`].
pub struct PostgresSource {
    conn: PgConn,
    exporter: Option<Exporter>,
    info: Option<Info>,
    tables: Vec<Table>,
    rows: Vec<Arc<AtomicU64>>,
    /// The streams not started yet, the next last: see [`PostgresSource::open`].
    plan: Vec<Step>,
    opened: bool,
    warnings: Vec<super::Warnings>,
    cancel: Cancel,
}

impl PostgresSource {
    pub fn new(conn: PgConn) -> PostgresSource {
        PostgresSource {
            conn,
            exporter: None,
            info: None,
            tables: Vec::new(),
            rows: Vec::new(),
            plan: Vec::new(),
            opened: false,
            warnings: Vec::new(),
            cancel: Cancel::new(),
        }
    }

    /// Opens the snapshot session and lists the tables (done by the first `next_stream`).
    fn open(&mut self) -> Result<()> {
        let mut ex = Exporter::start(&self.conn)?;
        let info: Info = ex.json(INFO_SQL)?;
        let tables: Vec<Table> = ex.json(TABLES_SQL)?;
        self.rows = tables.iter().map(|_| Arc::default()).collect();
        self.plan = plan(&tables);
        self.plan.reverse();
        self.opened = true;
        self.tables = tables;
        self.info = Some(info);
        self.exporter = Some(ex);
        Ok(())
    }

    fn snapshot_id(&self) -> &str {
        &self.info.as_ref().expect("opened").snapshot
    }

    fn pg_dump(&mut self, what: &str, args: &[String]) -> Result<Box<dyn std::io::Read + Send>> {
        let mut c = self.conn.command("pg_dump")?;
        c.arg(format!("--snapshot={}", self.snapshot_id()))
            .args(args);
        let what = format!("pg_dump ({what}) of {}", self.conn.display);
        let out = ChildOutput::spawn(what, &mut c, StderrPolicy::DatabaseTool)?
            .with_trailer(PG_DUMP_END)
            .cancel_on(self.cancel.clone());
        self.warnings.push(out.warnings());
        Ok(Box::new(out))
    }

    fn table_stream(&mut self, i: usize) -> Result<Box<dyn std::io::Read + Send>> {
        let t = &self.tables[i];
        let encoding = &self.info.as_ref().expect("opened").encoding;
        let columns = t.columns.clone().unwrap_or_default();
        let order = match &t.key {
            Some(k) => format!(" ORDER BY {k}"),
            None => String::new(),
        };
        let copy = format!(
            "COPY (SELECT {columns} FROM ONLY {}{order}) TO STDOUT",
            t.qualified
        );
        let mut c = self.conn.psql_copy_out()?;
        c.env("PGCLIENTENCODING", encoding)
            .args(["-c", "SET row_security = off"])
            .args(["-c", "SET statement_timeout = 0"])
            .args(["-c", "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"])
            .args([
                "-c".to_string(),
                format!("SET TRANSACTION SNAPSHOT '{}'", self.snapshot_id()),
            ])
            .args(["-c", &copy]);
        let what = format!(
            "psql (COPY of table {}) on {}",
            t.qualified, self.conn.display
        );
        let out = ChildOutput::spawn(what, &mut c, StderrPolicy::DatabaseTool)?
            .count_lines(self.rows[i].clone())
            .cancel_on(self.cancel.clone());
        self.warnings.push(out.warnings());
        let ordered = match &t.key {
            Some(k) => format!("ordered by primary key ({k})"),
            None => "no primary key: in the server's order".into(),
        };
        let column_list = if columns.is_empty() {
            String::new()
        } else {
            format!(" ({columns})")
        };
        let head = format!(
            "--\n-- kluis: data for table {}, {ordered}\n--\n\n\
             SET client_encoding = '{encoding}';\n\
             SET standard_conforming_strings = on;\n\
             COPY {}{column_list} FROM stdin;\n",
            t.qualified, t.qualified
        );
        Ok(Box::new(Framed::new(
            head.into_bytes(),
            out,
            b"\\.\n\n".to_vec(),
        )))
    }
}

/// A table's stream name: its position, then a readable (not necessarily exact) name.
fn data_stream_name(i: usize, t: &Table) -> String {
    let clean: String = format!("{}.{}", t.schema, t.name)
        .chars()
        .map(|c| {
            if c == '/' || c == '\0' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .take(100)
        .collect();
    format!("2-data-{:06}-{clean}.sql", i + 1)
}

impl StreamSet for PostgresSource {
    fn next_stream(&mut self) -> Result<Option<NamedStream>> {
        if !self.opened {
            self.open()?;
        }
        let Some(step) = self.plan.pop() else {
            return Ok(None);
        };
        let (name, reader) = match step {
            Step::PreData => (
                "1-pre-data.sql".to_string(),
                self.pg_dump("pre-data", &["--section=pre-data".into()])?,
            ),
            Step::Table(i) => (data_stream_name(i, &self.tables[i]), self.table_stream(i)?),
            Step::OtherData => {
                let mut args = vec!["--section=data".to_string(), "--blobs".to_string()];
                for t in &self.tables {
                    args.push(format!("--exclude-table-data={}", t.pattern));
                }
                (
                    "3-data-other.sql".to_string(),
                    self.pg_dump("sequences and large objects", &args)?,
                )
            }
            Step::PostData => (
                "4-post-data.sql".to_string(),
                self.pg_dump("post-data", &["--section=post-data".into()])?,
            ),
        };
        Ok(Some(NamedStream { name, reader }))
    }

    fn attach_cancel(&mut self, cancel: Cancel) {
        self.cancel = cancel;
    }

    /// Two tables at once: ordering by primary key costs the server more than pg_dump's
    /// plain scan, and two backends side by side (in the same exported snapshot) pay for it.
    fn parallel_streams(&self) -> usize {
        2
    }

    /// Warnings the tools printed (stderr lines that were not errors).
    fn warnings(&self) -> Vec<String> {
        super::collect_warnings(&self.warnings)
    }

    fn finish(&mut self) -> Result<SourceRecord> {
        let info = self
            .info
            .as_ref()
            .ok_or_else(|| Error::SourceFailed("the PostgreSQL source was never opened".into()))?;
        // Every tool joined the snapshot and finished: the session may end now.
        self.exporter = None;
        let tables = self
            .tables
            .iter()
            .zip(&self.rows)
            .map(|(t, rows)| TableRecord {
                schema: t.schema.clone(),
                name: t.name.clone(),
                rows: rows.load(Ordering::Relaxed),
                key: t.key.clone(),
            })
            .collect();
        Ok(SourceRecord::Postgres(DatabaseRecord {
            server: self.conn.display.clone(),
            database: self.conn.database.clone(),
            server_version: info.version.clone(),
            encoding: info.encoding.clone(),
            collation: None,
            tables,
        }))
    }
}

#[cfg(test)]
mod tests;
