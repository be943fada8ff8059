//! SQLite: a consistent copy of a live database file, made with SQLite's online backup API.
//!
//! The copy is taken in one read transaction (one `sqlite3_backup_step(-1)`), so it is a
//! snapshot of a single moment even while other processes write; in WAL mode writers are not
//! held up at all. It lands in a private temporary file (mode 0600; the directory is the
//! caller's choice, `$TMPDIR` by default), is checked (`PRAGMA quick_check`) and its tables'
//! rows counted, then stored as one stream: the database file itself, which is SQLite's own
//! portable format. Pages that did not change deduplicate.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{NamedStream, StreamSet};
use crate::error::{Error, Result};
use crate::snapshot::{DatabaseRecord, Source as SourceRecord, TableRecord};

/// How long to wait for a writer's lock before the copy gives up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// The database file a `sqlite:///path` URL names.
pub fn parse_url(url: &str) -> Result<PathBuf> {
    let bad = |why: &str| Error::invalid(format!("database URL {url}: {why}"));
    let rest = url
        .strip_prefix("sqlite://")
        .ok_or_else(|| bad("expected sqlite:///path/to/file"))?;
    let path = super::percent_decode(rest.split('?').next().unwrap_or(""))
        .ok_or_else(|| bad("not valid percent-encoding"))?;
    if path.is_empty() {
        return Err(bad("names no file (sqlite:///path/to/file)"));
    }
    Ok(PathBuf::from(path))
}

/// A SQLite database as a [`StreamSet`]: one stream, the copied file, named after it.
pub struct SqliteSource {
    path: PathBuf,
    temp_dir: Option<PathBuf>,
    /// A private directory (mode 0700) holding the copy and the journal files SQLite makes
    /// beside it, so nobody else can plant one there; removed whole.
    copy: Option<tempfile::TempDir>,
    record: Option<DatabaseRecord>,
    started: bool,
}

impl SqliteSource {
    /// `temp_dir` holds the copy while it is backed up (default: `$TMPDIR`).
    pub fn new(path: PathBuf, temp_dir: Option<PathBuf>) -> SqliteSource {
        SqliteSource {
            path,
            temp_dir,
            copy: None,
            record: None,
            started: false,
        }
    }

    /// The stream's name: the database file's name.
    fn stream_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "database.sqlite".into())
    }

    fn copy(&mut self) -> Result<File> {
        let shown = self.path.display().to_string();
        let fail = |what: &str, e: rusqlite::Error| {
            Error::SourceFailed(format!("SQLite database {shown}: {what}: {e}"))
        };
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(Error::SourceFailed(format!(
                    "SQLite database {shown} is not a file"
                )));
            }
            Err(e) => {
                return Err(Error::SourceFailed(format!("SQLite database {shown}: {e}")));
            }
        }
        let source = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| fail("cannot open", e))?;
        source
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| fail("cannot set a busy timeout", e))?;
        let dir = self.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let private = tempfile::Builder::new()
            .prefix(".kluis-sqlite-")
            .tempdir_in(&dir)
            .map_err(|e| {
                Error::SourceFailed(format!(
                    "cannot create a temporary copy of {shown} in {}: {e}",
                    dir.display()
                ))
            })?;
        let copy_path = private.path().join("copy.db");
        // On failure `private` is dropped here, and the copy and its journal files with it.
        self.record = Some(self.copy_into(&source, &copy_path, &shown)?);
        let file = File::open(&copy_path).map_err(|e| Error::io(&copy_path, e))?;
        self.copy = Some(private);
        Ok(file)
    }

    /// Copies `source` into the empty file `copy_path`, checks the copy and describes it.
    fn copy_into(
        &self,
        source: &Connection,
        copy_path: &Path,
        shown: &str,
    ) -> Result<DatabaseRecord> {
        let copy_fail = |e: rusqlite::Error| {
            Error::SourceFailed(format!(
                "copying SQLite database {shown} to {}: {e}",
                copy_path.display()
            ))
        };
        {
            let mut dest = Connection::open(copy_path).map_err(copy_fail)?;
            let backup = rusqlite::backup::Backup::new(source, &mut dest).map_err(copy_fail)?;
            let started = std::time::Instant::now();
            loop {
                use rusqlite::backup::StepResult;
                match backup.step(-1).map_err(copy_fail)? {
                    StepResult::Done => break,
                    StepResult::More => {}
                    StepResult::Busy | StepResult::Locked => {
                        if started.elapsed() > BUSY_TIMEOUT {
                            return Err(Error::SourceFailed(format!(
                                "SQLite database {shown} stayed locked for {}s; no copy made",
                                BUSY_TIMEOUT.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    _ => {}
                }
            }
        }
        describe(copy_path, shown)
    }
}

/// Checks the copy and records its tables and row counts.
fn describe(copy: &Path, shown: &str) -> Result<DatabaseRecord> {
    let fail = |e: rusqlite::Error| {
        Error::SourceFailed(format!("SQLite database {shown}: reading its copy: {e}"))
    };
    // Read-write: the copy is private, and a connection that may write removes a WAL-mode
    // database's -wal and -shm files when it closes.
    let c = Connection::open(copy).map_err(fail)?;
    let check: Vec<String> = query_strings(&c, "PRAGMA quick_check").map_err(fail)?;
    if check != ["ok"] {
        return Err(Error::SourceFailed(format!(
            "SQLite database {shown} is damaged (PRAGMA quick_check: {})",
            check.join("; ")
        )));
    }
    describe_tables(&c, shown).map_err(fail)
}

fn query_strings(c: &Connection, sql: &str) -> rusqlite::Result<Vec<String>> {
    c.prepare(sql)?.query_map([], |r| r.get(0))?.collect()
}

fn describe_tables(c: &Connection, shown: &str) -> rusqlite::Result<DatabaseRecord> {
    let names = query_strings(
        c,
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' \
         ESCAPE '\\' AND sql NOT LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name",
    )?;
    let mut tables = Vec::new();
    for name in names {
        let rows: i64 = c.query_row(
            &format!("SELECT count(*) FROM \"{}\"", name.replace('"', "\"\"")),
            [],
            |r| r.get(0),
        )?;
        tables.push(TableRecord {
            schema: "main".into(),
            name,
            rows: rows.max(0) as u64,
            key: None,
        });
    }
    let encoding: String = c.query_row("PRAGMA encoding", [], |r| r.get(0))?;
    Ok(DatabaseRecord {
        server: format!("sqlite://{shown}"),
        database: shown.to_string(),
        server_version: format!("SQLite {}", rusqlite::version()),
        encoding,
        collation: None,
        tables,
    })
}

impl StreamSet for SqliteSource {
    fn next_stream(&mut self) -> Result<Option<NamedStream>> {
        if self.started {
            return Ok(None);
        }
        self.started = true;
        let file = self.copy()?;
        Ok(Some(NamedStream {
            name: self.stream_name(),
            reader: Box::new(file),
        }))
    }

    fn finish(&mut self) -> Result<SourceRecord> {
        // The copy is read: remove it now rather than when the source is dropped.
        self.copy = None;
        let record = self
            .record
            .take()
            .ok_or_else(|| Error::SourceFailed("the SQLite source was never opened".into()))?;
        Ok(SourceRecord::Sqlite(record))
    }
}

/// Where a restore writes the file before it is checked and renamed into place.
pub fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".kluis-partial");
    target.with_file_name(name)
}

/// Refuses a target that holds data unless `force`; removes a stale partial file.
pub fn prepare_target(target: &Path, force: bool) -> Result<()> {
    if target.as_os_str().is_empty() || target.file_name().is_none() {
        return Err(Error::invalid(format!(
            "{} is not a file name",
            target.display()
        )));
    }
    match std::fs::metadata(target) {
        Ok(m) if m.is_dir() => {
            return Err(Error::invalid(format!(
                "{} is a directory, not a database file",
                target.display()
            )));
        }
        Ok(m) if m.len() > 0 && !force => {
            return Err(Error::invalid(format!(
                "{} exists and is not empty; restore to a new file, or pass --force to replace it",
                target.display()
            )));
        }
        _ => {}
    }
    // A partial file of an interrupted restore, and journal files SQLite could replay into
    // the next one.
    let partial = partial_path(target);
    remove_sidecars(&partial)?;
    match std::fs::remove_file(&partial) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&partial, e)),
    }
}

/// Checks a restored file (`PRAGMA integrity_check`) and moves it into place. Without `force`
/// it never replaces a file that appeared meanwhile. With `force` the old database's journal
/// files are moved aside first (SQLite would replay them over the new file) and put back if
/// the new file cannot be moved into place.
pub fn commit_target(partial: &Path, target: &Path, force: bool) -> Result<()> {
    let shown = partial.display().to_string();
    let check = Connection::open(partial)
        .and_then(|c| query_strings(&c, "PRAGMA integrity_check"))
        .map_err(|e| Error::TargetFailed(format!("restored SQLite database {shown}: {e}")))?;
    if check != ["ok"] {
        return Err(Error::TargetFailed(format!(
            "restored SQLite database {shown} fails PRAGMA integrity_check: {}",
            check.join("; ")
        )));
    }
    remove_sidecars(partial)?;
    if force {
        let aside = move_sidecars_aside(target)?;
        if let Err(e) = std::fs::rename(partial, target) {
            for (from, to) in &aside {
                let _ = std::fs::rename(to, from);
            }
            return Err(Error::io(target, e));
        }
        for (_, to) in aside {
            std::fs::remove_file(&to).map_err(|e| Error::io(&to, e))?;
        }
    } else {
        std::fs::hard_link(partial, target).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::invalid(format!(
                    "{} appeared during the restore; pass --force to replace it",
                    target.display()
                ))
            } else {
                Error::io(target, e)
            }
        })?;
        std::fs::remove_file(partial).map_err(|e| Error::io(partial, e))?;
    }
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn sidecars(db: &Path) -> [PathBuf; 3] {
    ["-wal", "-shm", "-journal"].map(|suffix| {
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        db.with_file_name(name)
    })
}

/// Renames a database's journal files to `<name>.kluis-old`; returns (original, aside) pairs.
fn move_sidecars_aside(db: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut moved = Vec::new();
    for p in sidecars(db) {
        let mut aside = p.clone().into_os_string();
        aside.push(".kluis-old");
        let aside = PathBuf::from(aside);
        match std::fs::rename(&p, &aside) {
            Ok(()) => moved.push((p, aside)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                for (from, to) in &moved {
                    let _ = std::fs::rename(to, from);
                }
                return Err(Error::io(&p, e));
            }
        }
    }
    Ok(moved)
}

/// Removes a database file's `-wal`, `-shm` and `-journal` files, if any.
fn remove_sidecars(db: &Path) -> Result<()> {
    for p in sidecars(db) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Ok(())
}

/// A restored SQLite file, for a restore drill.
pub struct SqliteFile(pub PathBuf);

impl SqliteFile {
    fn open(&self) -> Result<Connection> {
        Connection::open_with_flags(&self.0, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| Error::TargetFailed(format!("{}: {e}", self.0.display())))
    }
}

impl crate::source::database::Inspect for SqliteFile {
    fn verdict(&self, _tables: &[TableRecord]) -> std::result::Result<String, String> {
        // The restore ran `PRAGMA integrity_check` before it kept the file.
        Ok("PRAGMA integrity_check: ok".into())
    }

    fn count_rows(&self, tables: &[TableRecord]) -> Result<Vec<u64>> {
        let c = self.open()?;
        tables
            .iter()
            .map(|t| {
                c.query_row(
                    &format!("SELECT count(*) FROM \"{}\"", t.name.replace('"', "\"\"")),
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n.max(0) as u64)
                .map_err(|e| Error::TargetFailed(format!("count rows of {}: {e}", t.name)))
            })
            .collect()
    }

    fn value(&self, sql: &str) -> Result<String> {
        use rusqlite::types::ValueRef;
        self.open()?
            .query_row(sql, [], |r| {
                Ok(match r.get_ref(0)? {
                    ValueRef::Integer(i) => i.to_string(),
                    ValueRef::Real(f) => f.to_string(),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    ValueRef::Null => "NULL".into(),
                    ValueRef::Blob(_) => "(blob)".into(),
                })
            })
            .map_err(|e| Error::TargetFailed(e.to_string()))
    }

    fn time_literal(&self, t: jiff::Timestamp) -> String {
        let utc = t.to_zoned_datetime(jiff::tz::TimeZone::UTC);
        format!("'{}'", utc.strftime("%Y-%m-%d %H:%M:%S%.6f"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("sqlite:///srv/app%20x.db").unwrap(),
            PathBuf::from("/srv/app x.db")
        );
        assert_eq!(
            parse_url("sqlite://rel.db").unwrap(),
            PathBuf::from("rel.db")
        );
        assert!(parse_url("sqlite://").is_err());
        assert!(parse_url("postgres:///x").is_err());
    }

    #[test]
    fn copies_counts_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
             INSERT INTO t(v) VALUES (x'00ff'), (NULL), ('');
             CREATE TABLE \"we\"\"ird\"(x);",
        )
        .unwrap();
        let mut src = SqliteSource::new(db.clone(), Some(dir.path().to_path_buf()));
        let mut stream = src.next_stream().unwrap().unwrap();
        assert_eq!(stream.name, "app.db");
        let mut bytes = Vec::new();
        stream.reader.read_to_end(&mut bytes).unwrap();
        assert!(src.next_stream().unwrap().is_none());
        let SourceRecord::Sqlite(rec) = src.finish().unwrap() else {
            panic!("not a SQLite record")
        };
        let rows: Vec<(String, u64)> = rec
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.rows))
            .collect();
        assert_eq!(rows, vec![("t".to_string(), 3), ("we\"ird".to_string(), 0)]);
        // The temporary copy is gone once the source finished.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".kluis-sqlite-")
            })
            .collect();
        assert!(left.is_empty(), "{left:?}");

        let target = dir.path().join("restored.db");
        prepare_target(&target, false).unwrap();
        std::fs::write(partial_path(&target), &bytes).unwrap();
        commit_target(&partial_path(&target), &target, false).unwrap();
        let r = Connection::open(&target).unwrap();
        let n: i64 = r
            .query_row("SELECT count(*) FROM t", [], |x| x.get(0))
            .unwrap();
        assert_eq!(n, 3);
        assert!(prepare_target(&target, false).is_err());
        prepare_target(&target, true).unwrap();

        // A damaged file is refused before it replaces anything.
        let mut bad = bytes.clone();
        for b in &mut bad[4096..8192] {
            *b = 0x55;
        }
        std::fs::write(partial_path(&target), &bad).unwrap();
        assert!(commit_target(&partial_path(&target), &target, true).is_err());
    }
}
