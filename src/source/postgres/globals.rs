//! A PostgreSQL server's globals: roles (with their password hashes), role memberships and
//! settings, and tablespaces, from `pg_dumpall --globals-only`. Database snapshots do not carry
//! them; a restore onto a new server needs them first (`kluis restore --roles`).
//!
//! Reading password hashes needs a superuser. Restoring is tolerant the way PostgreSQL's own
//! documentation asks for: a role that already exists is reported, not fatal; any other error
//! fails the restore.

use std::process::Stdio;

use super::PgConn;
use crate::error::{Error, Result};
use crate::snapshot::{GlobalsRecord, Source as SourceRecord};
use crate::source::{ChildOutput, NamedStream, StderrPolicy, StreamSet};

/// pg_dumpall's last line: output without it was cut short.
const END: &[u8] = b"-- PostgreSQL database cluster dump complete\n--\n";

/// The name of the one stream a globals snapshot holds.
pub const STREAM: &str = "globals.sql";

/// `pg_dumpall --globals-only` as a [`StreamSet`].
pub struct GlobalsSource {
    conn: PgConn,
    version: Option<String>,
    started: bool,
}

impl GlobalsSource {
    pub fn new(conn: PgConn) -> GlobalsSource {
        GlobalsSource {
            conn,
            version: None,
            started: false,
        }
    }
}

impl StreamSet for GlobalsSource {
    fn next_stream(&mut self) -> Result<Option<NamedStream>> {
        if self.started {
            return Ok(None);
        }
        self.started = true;
        self.version = Some(self.conn.query_one("SHOW server_version")?);
        let mut c = self.conn.command("pg_dumpall")?;
        c.args(["--globals-only", "--database", &self.conn.database]);
        let what = format!("pg_dumpall --globals-only of {}", self.conn.display);
        let out = ChildOutput::spawn(what, &mut c, StderrPolicy::DatabaseTool)?.with_trailer(END);
        Ok(Some(NamedStream {
            name: STREAM.into(),
            reader: Box::new(out),
        }))
    }

    fn finish(&mut self) -> Result<SourceRecord> {
        let version = self.version.clone().ok_or_else(|| {
            Error::SourceFailed("the PostgreSQL globals source was never opened".into())
        })?;
        Ok(SourceRecord::PostgresGlobals(GlobalsRecord {
            server: self.conn.display.clone(),
            server_version: version,
        }))
    }
}

/// A `psql` that applies a globals dump to the server's maintenance database, going on past
/// errors (a role that exists already); the caller sorts the errors.
pub fn loader(target: &PgConn) -> Result<std::process::Command> {
    let mut c = target.command("psql")?;
    c.args(["-X", "-q", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(c)
}

/// The error lines a globals restore may meet without failing: the role, or the tablespace,
/// exists already.
pub fn tolerated(line: &str) -> bool {
    line.contains("already exists")
}
