//! A PostgreSQL server's globals: roles (with their password hashes), role memberships and
//! settings, and tablespaces, from `pg_dumpall --globals-only`. Database snapshots do not carry
//! them; a restore onto a new server needs them first (`kluis restore --roles`).
//!
//! Reading password hashes needs a superuser. A restore creates the roles the target lacks and
//! leaves the ones it has as they are: pg_dumpall follows each `CREATE ROLE` with an `ALTER ROLE`
//! that resets the role's attributes and password, which on a live server would lock out the
//! very role the restore connects as. Those statements are dropped for existing roles, as are
//! those that would create or change an existing tablespace (each is reported); then the first
//! error stops the restore.

use std::collections::HashSet;
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

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

/// A `psql` that applies a globals dump (filtered by [`KeepExisting`]) to the server's
/// maintenance database and stops at the first error, naming its line.
pub fn loader(target: &PgConn) -> Result<std::process::Command> {
    let mut c = target.command("psql")?;
    c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(c)
}

/// The roles and tablespaces of the server `target` names, as `role NAME` and
/// `tablespace NAME`, each name as `quote_ident` writes it, which is how pg_dumpall writes them
/// (both quote exactly the names that need it).
pub fn existing(target: &PgConn) -> Result<HashSet<String>> {
    // Hex, so that no name (a newline in quotes is allowed) can split the list.
    let text = target.query_one(
        "SELECT coalesce(string_agg(encode(convert_to(k, 'UTF8'), 'hex'), ','), '') FROM \
         (SELECT 'role ' || quote_ident(rolname) AS k FROM pg_roles UNION ALL \
          SELECT 'tablespace ' || quote_ident(spcname) FROM pg_tablespace) x",
    )?;
    text.split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| Error::TargetFailed(format!("odd name list from psql: {h:?}")))
        })
        .collect()
}

/// Passes a globals dump through to `inner`, leaving out the one-line statements that would
/// create or change a role or a tablespace in `existing` (see [`existing`]): `CREATE`, `ALTER`
/// (a role's attributes, password and settings) and `COMMENT ON`. What was left as it was is
/// added to `kept` (`role NAME`, `tablespace NAME`), once each.
pub struct KeepExisting<W> {
    inner: W,
    existing: HashSet<String>,
    kept: Arc<Mutex<Vec<String>>>,
    line: Vec<u8>,
    /// Whether the next line starts a statement (the previous one ended with `;`).
    at_statement: bool,
}

impl<W: Write> KeepExisting<W> {
    pub fn new(inner: W, existing: HashSet<String>, kept: Arc<Mutex<Vec<String>>>) -> Self {
        KeepExisting {
            inner,
            existing,
            kept,
            line: Vec::new(),
            at_statement: true,
        }
    }

    /// What a one-line statement would create or change (`role NAME`, `tablespace NAME`), if
    /// it exists already.
    fn existing_object(&self, line: &str) -> Option<String> {
        const STATEMENTS: [(&str, &str); 6] = [
            ("CREATE ROLE ", "role"),
            ("ALTER ROLE ", "role"),
            ("COMMENT ON ROLE ", "role"),
            ("CREATE TABLESPACE ", "tablespace"),
            ("ALTER TABLESPACE ", "tablespace"),
            ("COMMENT ON TABLESPACE ", "tablespace"),
        ];
        let (rest, what) = STATEMENTS
            .iter()
            .find_map(|(p, what)| line.strip_prefix(p).map(|rest| (rest, what)))?;
        if !line.trim_end().ends_with(';') {
            return None;
        }
        let object = format!("{what} {}", name_token(rest)?);
        self.existing.contains(&object).then_some(object)
    }

    fn emit_line(&mut self) -> std::io::Result<()> {
        let line = std::mem::take(&mut self.line);
        let text = String::from_utf8_lossy(&line);
        let starts = self.at_statement;
        let trimmed = text.trim_end();
        if !(trimmed.is_empty() || trimmed.starts_with("--")) {
            self.at_statement = trimmed.ends_with(';');
        }
        if starts {
            if let Some(object) = self.existing_object(&text) {
                let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
                if !kept.contains(&object) {
                    kept.push(object);
                }
                return Ok(());
            }
        }
        self.inner.write_all(&line)
    }
}

/// The name at the start of `rest`: a quoted identifier (`""` inside stands for `"`),
/// or a bare one up to a space or `;`.
fn name_token(rest: &str) -> Option<&str> {
    if rest.starts_with('"') {
        let bytes = rest.as_bytes();
        let mut i = 1;
        while i < bytes.len() {
            if bytes[i] == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                return Some(&rest[..=i]);
            }
            i += 1;
        }
        None
    } else {
        let end = rest.find([' ', ';']).unwrap_or(rest.len());
        (end > 0).then(|| &rest[..end])
    }
}

impl<W: Write> Write for KeepExisting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while let Some(at) = memchr::memchr(b'\n', rest) {
            self.line.extend_from_slice(&rest[..=at]);
            self.emit_line()?;
            rest = &rest[at + 1..];
        }
        self.line.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.emit_line()?;
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "--\n-- Roles\n--\n\nCREATE ROLE app;\n\
        ALTER ROLE app WITH NOSUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:x';\n\
        CREATE ROLE \"Odd \"\"name\";\nALTER ROLE \"Odd \"\"name\" WITH LOGIN;\n\
        CREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER PASSWORD 'old';\n\
        CREATE TABLESPACE fast OWNER postgres LOCATION '/srv/fast';\n\
        CREATE TABLESPACE slow OWNER app LOCATION '/srv/slow';\n\
        COMMENT ON ROLE postgres IS 'multi\nALTER ROLE app WITH SUPERUSER;\nline';\n\
        ALTER ROLE app SET search_path TO app;\nGRANT app TO postgres GRANTED BY postgres;\n";

    fn filtered(existing: &[&str], pieces: usize) -> (String, Vec<String>) {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let mut w = KeepExisting::new(
            Vec::new(),
            existing.iter().map(|s| s.to_string()).collect(),
            kept.clone(),
        );
        // Written in pieces that cut lines anywhere.
        let size = DUMP.len().div_ceil(pieces);
        for piece in DUMP.as_bytes().chunks(size) {
            w.write_all(piece).unwrap();
        }
        w.flush().unwrap();
        let out = String::from_utf8(w.inner).unwrap();
        let kept = kept.lock().unwrap().clone();
        (out, kept)
    }

    #[test]
    fn existing_roles_are_left_as_they_are() {
        for pieces in [1, 7, DUMP.len()] {
            let existing = [
                "role postgres",
                "role \"Odd \"\"name\"",
                "tablespace fast",
                // Another kind of object of the same name is not the same.
                "tablespace app",
            ];
            let (out, kept) = filtered(&existing, pieces);
            assert_eq!(
                kept,
                ["role \"Odd \"\"name\"", "role postgres", "tablespace fast"]
            );
            assert!(!out.contains("TABLESPACE fast"), "{out}");
            assert!(out.contains("CREATE TABLESPACE slow"), "{out}");
            assert!(!out.contains("CREATE ROLE postgres"), "{out}");
            assert!(!out.contains("PASSWORD 'old'"), "{out}");
            assert!(!out.contains("\"Odd \"\"name\" WITH LOGIN"), "{out}");
            // A role the server lacks comes whole, settings too; memberships always come.
            assert!(
                out.contains("CREATE ROLE app;\nALTER ROLE app WITH NOSUPERUSER"),
                "{out}"
            );
            assert!(out.contains("ALTER ROLE app SET search_path"), "{out}");
            assert!(out.contains("GRANT app TO postgres"), "{out}");
            // A statement spread over lines is passed whole, even a line inside it that looks
            // like a statement of its own.
            assert!(
                out.contains(
                    "COMMENT ON ROLE postgres IS 'multi\nALTER ROLE app WITH SUPERUSER;\nline';"
                ),
                "{out}"
            );
        }
        let (out, kept) = filtered(&[], 3);
        assert_eq!(out, DUMP);
        assert!(kept.is_empty());
    }

    #[test]
    fn names_are_read_as_pg_dumpall_writes_them() {
        assert_eq!(name_token("app;"), Some("app"));
        assert_eq!(name_token("app WITH LOGIN;"), Some("app"));
        assert_eq!(name_token("\"a \"\" b\" WITH;"), Some("\"a \"\" b\""));
        assert_eq!(name_token("\"unterminated"), None);
        assert_eq!(name_token(";"), None);
    }
}
