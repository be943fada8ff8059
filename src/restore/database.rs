//! Restores into databases: PostgreSQL (a database, or a server's roles and tablespaces),
//! MySQL/MariaDB and SQLite, each stream piped through the engine's client or written as the
//! database file, checked the same way as every restore.

use super::*;
use crate::source::database::{Engine, Inspect, Load, Places, ScratchServer, engine_of};
use crate::source::postgres;

/// Makes a restore target ready (see [`Load::prepare`]), off the async threads.
async fn prepare<T: Load>(
    target: &T,
    record: &crate::snapshot::DatabaseRecord,
    force: bool,
) -> Result<()> {
    let (target, record) = (target.clone(), record.clone());
    tokio::task::spawn_blocking(move || target.prepare(&record, force))
        .await
        .map_err(|e| Error::invalid(format!("restore crashed: {e}")))?
}

/// A database a restore loads into, as a `--to` URL names it: the engine its scheme names,
/// and the target on it. A PostgreSQL URL without a database names a whole server (where a
/// snapshot of the server's roles goes).
#[derive(Clone)]
pub enum DatabaseTarget {
    Postgres(PgConn),
    Mysql(MyConn),
    Sqlite(std::path::PathBuf),
}

impl DatabaseTarget {
    /// The target `url` names; `password` for a server, `places` for the PostgreSQL tools.
    pub fn parse(
        url: &str,
        password: Option<zeroize::Zeroizing<String>>,
        places: &Places,
    ) -> Result<DatabaseTarget> {
        Ok(match engine_of(url) {
            Some(Engine::Postgres) => DatabaseTarget::Postgres(
                PgConn::parse_server(url, password)?
                    .with_bin_dir(postgres::tools_dir(places.pg_bin_dir.as_deref())),
            ),
            Some(Engine::Mysql) => DatabaseTarget::Mysql(MyConn::parse(url, password)?),
            Some(Engine::Sqlite) => DatabaseTarget::Sqlite(sqlite::parse_url(url)?),
            None => {
                return Err(Error::invalid(format!(
                    "--to {}: expected postgres://, mysql:// or sqlite:// (for files: --target DIR)",
                    postgres::redact(url)
                )));
            }
        })
    }

    /// The target, for messages (without secrets).
    pub fn shown(&self) -> String {
        match self {
            DatabaseTarget::Postgres(c) if c.names_database => {
                format!("database {} on {}", c.database, c.display)
            }
            DatabaseTarget::Postgres(c) => c.display.clone(),
            DatabaseTarget::Mysql(c) => c.display.clone(),
            DatabaseTarget::Sqlite(p) => p.display().to_string(),
        }
    }

    /// Whether a snapshot of this kind restores into this target.
    pub fn takes(&self, source: &SnapshotSource) -> bool {
        matches!(
            (self, source),
            (
                DatabaseTarget::Postgres(_),
                SnapshotSource::Postgres(_) | SnapshotSource::PostgresGlobals(_)
            ) | (DatabaseTarget::Mysql(_), SnapshotSource::Mysql(_))
                | (DatabaseTarget::Sqlite(_), SnapshotSource::Sqlite(_))
        )
    }

    /// The restored database, asked through its engine's [`Inspect`].
    pub fn inspect(&self) -> Arc<dyn Inspect> {
        match self {
            DatabaseTarget::Postgres(c) => Arc::new(c.clone()),
            DatabaseTarget::Mysql(c) => Arc::new(c.clone()),
            DatabaseTarget::Sqlite(p) => Arc::new(sqlite::SqliteFile(p.clone())),
        }
    }

    /// Drops the database the target names, if it exists (a drill's scratch target).
    pub fn drop_database(&self) -> Result<()> {
        match self {
            DatabaseTarget::Postgres(c) if c.names_database => {
                c.with_database("postgres").drop_database(&c.database)
            }
            DatabaseTarget::Postgres(c) => Err(Error::invalid(format!(
                "{}: names no database to drop",
                c.display
            ))),
            DatabaseTarget::Mysql(c) => c.drop_database(&c.database),
            DatabaseTarget::Sqlite(p) => match fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(p, e)),
                _ => Ok(()),
            },
        }
    }
}

impl Restorer<'_> {
    /// Restores into `target` the way its engine and the snapshot's kind call for: a
    /// database snapshot into the database the target names (`force`: see [`Load::prepare`];
    /// `jobs`: tables loaded at once where the engine can), a server's roles into the server.
    /// A snapshot of another engine is refused with the `--to` that would take it.
    pub async fn to_database(
        self,
        target: &DatabaseTarget,
        force: bool,
        jobs: usize,
    ) -> Result<RestoreReport> {
        match (target, &self.snapshot.source) {
            (DatabaseTarget::Postgres(server), SnapshotSource::PostgresGlobals(_)) => {
                self.to_postgres_globals(server).await
            }
            (DatabaseTarget::Postgres(c), SnapshotSource::Postgres(_)) if !c.names_database => {
                Err(Error::invalid(format!(
                    "database URL {}: names no database (postgres://host/DATABASE)",
                    c.display
                )))
            }
            (DatabaseTarget::Postgres(c), _) => self.to_postgres(c, force, jobs).await,
            (DatabaseTarget::Mysql(c), _) => self.to_mysql(c, force).await,
            (DatabaseTarget::Sqlite(p), _) => self.to_sqlite(p, force).await,
        }
    }

    /// Restores a PostgreSQL snapshot into the database `target` names: creates it (see
    /// [`Load::prepare`]), then loads the schema, the tables (`jobs` at once), the
    /// sequences and large objects, and the indexes, constraints and triggers, each stream
    /// through `psql`, stopping at the first error.
    pub async fn to_postgres(
        mut self,
        target: &PgConn,
        force: bool,
        jobs: usize,
    ) -> Result<RestoreReport> {
        let SnapshotSource::Postgres(record) = &self.snapshot.source else {
            return Err(self.wrong_engine("PostgreSQL"));
        };
        let root = self.tree(&self.snapshot.tree).await?;
        prepare(target, record, force).await?;
        let phase = |prefix: &str| -> Vec<Node> {
            root.nodes
                .iter()
                .filter(|n| {
                    n.node_type == NodeType::File && n.name.0.starts_with(prefix.as_bytes())
                })
                .cloned()
                .collect()
        };
        let known = ["1-", "2-", "3-", "4-"];
        if let Some(n) = root
            .nodes
            .iter()
            .find(|n| !known.iter().any(|p| n.name.0.starts_with(p.as_bytes())))
        {
            return Err(Error::invalid(format!(
                "snapshot {} holds a stream this kluis does not know how to restore: {}",
                self.snapshot.id.short(),
                n.name.to_display()
            )));
        }
        self.opts.progress.total_files.store(
            phase("2-").len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        for (prefix, parallel) in [("1-", 1), ("2-", jobs.max(1)), ("3-", 1), ("4-", 1)] {
            let nodes = phase(prefix);
            let this = &self;
            // Owned nodes: a closure over `&Node` makes the future too general to be `Send`.
            let loaded: Vec<u64> = futures::stream::iter(nodes)
                .map(|node| async move { this.load_into(&node, target).await })
                .buffer_unordered(parallel)
                .try_collect()
                .await?;
            self.report.files += loaded.len() as u64;
            self.report.bytes += loaded.iter().sum::<u64>();
        }
        Ok(self.report)
    }

    /// Pipes one stream into a `psql`; the error names the stream and quotes psql.
    pub(super) async fn load_into(&self, node: &Node, target: &PgConn) -> Result<u64> {
        let bytes = self.load(node, target, |w| w).await?;
        // The progress line counts tables; the schema streams are not tables.
        if node.name.0.starts_with(b"2-") {
            Progress::add(&self.opts.progress.files, 1);
        }
        Ok(bytes)
    }

    /// Restores a snapshot of a server's globals (roles, tablespaces) into the server `target`
    /// names. Roles and tablespaces that exist already are left as they are and reported in
    /// the warnings; the first error stops the restore.
    pub async fn to_postgres_globals(mut self, target: &PgConn) -> Result<RestoreReport> {
        if !matches!(self.snapshot.source, SnapshotSource::PostgresGlobals(_)) {
            return Err(self.wrong_engine("PostgreSQL globals"));
        }
        let root = self.tree(&self.snapshot.tree).await?;
        let node = self.single_stream(&root, globals::STREAM)?;
        let existing = {
            let target = target.clone();
            tokio::task::spawn_blocking(move || globals::existing(&target))
                .await
                .map_err(|e| Error::invalid(format!("restore crashed: {e}")))?
                .map_err(Error::on_target)?
        };
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        let what = format!("restoring roles into {}", target.display);
        let filter_kept = kept.clone();
        let bytes = self
            .pipe_into(&node, globals::loader(target)?, "psql", what, move |w| {
                Box::new(globals::KeepExisting::new(w, existing, filter_kept))
            })
            .await?;
        self.report.files += 1;
        self.report.bytes += bytes;
        let kept = std::mem::take(&mut *kept.lock().unwrap_or_else(|p| p.into_inner()));
        for object in kept {
            let unchanged = if object.starts_with("role ") {
                " (not changed to the snapshot's attributes, password and settings)"
            } else {
                ""
            };
            self.report.warnings.push(format!(
                "{object} exists on {}: left as it is{unchanged}",
                target.display
            ));
        }
        Ok(self.report)
    }

    /// Loads one stream into `target` through its engine's client (see [`Load`]).
    pub(super) async fn load<T: Load>(
        &self,
        node: &Node,
        target: &T,
        wrap: impl FnOnce(Box<dyn Write + Send>) -> Box<dyn Write + Send>,
    ) -> Result<u64> {
        let what = format!(
            "restoring {} into {}",
            node.name.to_display(),
            target.shown()
        );
        self.pipe_into(node, target.loader()?, T::CLIENT, what, wrap)
            .await
    }

    /// Streams a node into a database client's standard input; fails with the client's own
    /// words if it exits non-zero or reports an error. `wrap` puts a writer between the content
    /// and the client (a filter, a progress counter).
    pub(super) async fn pipe_into(
        &self,
        node: &Node,
        mut command: std::process::Command,
        tool: &'static str,
        what: String,
        wrap: impl FnOnce(Box<dyn Write + Send>) -> Box<dyn Write + Send>,
    ) -> Result<u64> {
        let mut child = command
            .spawn()
            .map_err(|e| Error::TargetFailed(format!("{what}: cannot start {tool}: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stderr = child
            .stderr
            .take()
            .map(crate::source::collect_stderr)
            .expect("piped");
        let child = Arc::new(std::sync::Mutex::new(child));
        let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guarded = ClientInput {
            stdin: Some(stdin),
            child: child.clone(),
            complete: complete.clone(),
        };
        let input = wrap(Box::new(guarded));
        let written = self.write_content(node, input).await;
        // On success the client sees the end of its input; on failure it was killed first.
        let written = written.map(|(n, out)| {
            complete.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(out);
            n
        });
        let status = tokio::task::spawn_blocking(move || {
            let status = child.lock().expect("not poisoned").wait();
            (status, stderr.join().unwrap_or_default())
        })
        .await
        .map_err(|e| Error::invalid(format!("restore crashed: {e}")))?;
        let (status, stderr) = status;
        let status = match status {
            Ok(status) => status,
            Err(e) => {
                written?;
                return Err(Error::TargetFailed(format!("{what}: {tool}: {e}")));
            }
        };
        let client = crate::source::check_exit(tool, status, &stderr, StderrPolicy::DatabaseTool);
        match (written, client) {
            (Ok(n), Ok(_)) => Ok(n),
            (Ok(_), Err(msg)) => Err(Error::TargetFailed(format!("{what}: {msg}"))),
            // The client stopped on its own, with an exit code (not killed for the restore's
            // own failure): writing to it then fails with a broken pipe, and its words are
            // the cause to report.
            (Err(_), Err(msg)) if status.code().is_some() => {
                Err(Error::TargetFailed(format!("{what}: {msg}")))
            }
            // The restore's own failure (the client was killed for it).
            (Err(e), _) => Err(e),
        }
    }

    /// Restores a MySQL/MariaDB snapshot into the database `target` names: creates it (see
    /// [`Load::prepare`]) and loads the dump through the client, which stops at the
    /// first error and names its line.
    pub async fn to_mysql(mut self, target: &MyConn, force: bool) -> Result<RestoreReport> {
        let SnapshotSource::Mysql(record) = &self.snapshot.source else {
            return Err(self.wrong_engine("MySQL"));
        };
        let root = self.tree(&self.snapshot.tree).await?;
        let node = self.single_stream(&root, mysql::STREAM)?;
        prepare(target, record, force).await?;
        let tables = record.tables.len() as u64;
        let progress = &self.opts.progress;
        progress.total_files.store(tables, Ordering::Relaxed);
        let bytes = self
            .load(&node, target, |w| {
                Box::new(mysql::TableSections::new(w, progress.clone()))
            })
            .await?;
        // The last table is done with the dump.
        progress.files.store(tables, Ordering::Relaxed);
        self.report.files += 1;
        self.report.bytes += bytes;
        Ok(self.report)
    }

    /// Restores a SQLite snapshot to the file `target`: written beside it, checked with
    /// `PRAGMA integrity_check`, then renamed into place (see [`sqlite::commit_target`]).
    pub async fn to_sqlite(mut self, target: &Path, force: bool) -> Result<RestoreReport> {
        if !matches!(self.snapshot.source, SnapshotSource::Sqlite(_)) {
            return Err(self.wrong_engine("SQLite"));
        }
        let root = self.tree(&self.snapshot.tree).await?;
        let node = match root.nodes.as_slice() {
            [n] if n.node_type == NodeType::File => n.clone(),
            _ => {
                return Err(Error::corrupt(
                    format!("snapshot {}", self.snapshot.id.short()),
                    "a SQLite snapshot must hold exactly one file",
                ));
            }
        };
        sqlite::prepare_target(target, force)?;
        let partial = sqlite::partial_path(target);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| Error::io(&partial, e))?;
        let result = async {
            let (bytes, out) = self
                .write_content(&node, Box::new(SyncOnFlush(file)))
                .await?;
            drop(out);
            sqlite::commit_target(&partial, target, force)?;
            Ok::<u64, Error>(bytes)
        }
        .await;
        match result {
            Ok(bytes) => {
                self.report.files += 1;
                self.report.bytes += bytes;
                Ok(self.report)
            }
            Err(e) => {
                let _ = fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    pub(super) fn wrong_engine(&self, engine: &str) -> Error {
        Error::invalid(format!(
            "snapshot {} ({}) is not a {engine} snapshot: restore it with {}",
            self.snapshot.id.short(),
            self.snapshot.name,
            match self.snapshot.source {
                SnapshotSource::Postgres(_) => "--to postgres://HOST/NEWDB",
                SnapshotSource::PostgresGlobals(_) => "--to postgres://HOST/",
                SnapshotSource::Mysql(_) => "--to mysql://HOST/NEWDB",
                SnapshotSource::Sqlite(_) => "--to sqlite:///PATH",
                _ => "--stdout or --target DIR",
            }
        ))
    }

    /// The one file named `name` in a root tree.
    pub(super) fn single_stream(&self, root: &Tree, name: &str) -> Result<Node> {
        match root.nodes.as_slice() {
            [n] if n.node_type == NodeType::File && n.name.0 == name.as_bytes() => Ok(n.clone()),
            _ => Err(Error::corrupt(
                format!("snapshot {}", self.snapshot.id.short()),
                format!("a database snapshot of this kind must hold exactly one file, {name}"),
            )),
        }
    }
}

/// A database client's standard input. Dropped before the stream is complete (a fetch failed,
/// data was corrupt, the restore was interrupted), it kills the client before closing the pipe:
/// a client that sees a clean end of input would run a cut-off last statement.
struct ClientInput {
    stdin: Option<std::process::ChildStdin>,
    child: Arc<std::sync::Mutex<std::process::Child>>,
    complete: Arc<std::sync::atomic::AtomicBool>,
}

impl Write for ClientInput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stdin.as_mut().expect("open until dropped").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stdin.as_mut().expect("open until dropped").flush()
    }
}

impl Drop for ClientInput {
    fn drop(&mut self) {
        if !self.complete.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok(mut c) = self.child.lock() {
                let _ = c.kill();
            }
        }
        drop(self.stdin.take());
    }
}

/// A restored file: flushed to disk before it is checked and renamed into place.
struct SyncOnFlush(fs::File);

impl Write for SyncOnFlush {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.0.sync_all()
    }
}
