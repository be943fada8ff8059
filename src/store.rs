//! Where objects live: a local directory, an S3-compatible bucket, or memory (unit tests).
//!
//! Contract: `put` returns only once the object is durable (local: written to a staging file,
//! fsynced, renamed, directory fsynced; S3: acknowledged by the server). Objects are never
//! overwritten: every writer creates a fresh random name. `list` returns every object under a
//! prefix or fails: an error is never an empty listing (restic #4612 lost data that way).
//! Transient S3 errors are retried with exponential backoff by `object_store`.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use crate::error::{Error, Result};

/// The largest single `write` into a local file (a pack, a restored file): 512 KiB.
///
/// Why: on this project's machines (virtual machines whose freed memory goes back to the host),
/// a write of 2 MiB or more into a new file sometimes spent ten times as long in the kernel as
/// the same bytes written 1 MiB or less at a time: 0.9 s of system time against 0.1 s for a
/// 368 MB file. Smaller writes cost nothing measurable elsewhere.
pub const WRITE_PIECE: usize = 512 << 10;

/// Tries of a delete before its error is returned.
const DELETE_ATTEMPTS: u32 = 5;
/// Tries of a whole listing (see [`Store::list`]).
const LIST_ATTEMPTS: u32 = 5;

/// An object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    /// The time the store gave the object when it was written (S3 `Last-Modified`, a local
    /// file's mtime): the one clock all hosts share (see [`crate::clock`]).
    pub modified: jiff::Timestamp,
}

/// Debug builds (the test suite) only: with `KLUIS_TEST_CRASH_AFTER_WRITES=N`, the process
/// aborts right after its N-th completed write or delete to any store: stopped as a SIGKILL
/// would stop it (nothing cleaned up), so a test can cut a multi-object operation (a key
/// rotation, an erasure) after every one of its steps in turn, not only where a timed kill
/// happens to land.
#[cfg(debug_assertions)]
fn crash_point() {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static DONE: AtomicU64 = AtomicU64::new(0);
    let limit = LIMIT.get_or_init(|| {
        std::env::var("KLUIS_TEST_CRASH_AFTER_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(limit) = limit {
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 >= *limit {
            std::process::abort();
        }
    }
}

#[cfg(not(debug_assertions))]
fn crash_point() {}

/// A repository's storage location.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
    local_root: Option<PathBuf>,
    placement: Placement,
}

/// Where a store's data lives, for operators: which service and region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `file`, `s3` or `memory`.
    pub kind: &'static str,
    /// The S3 endpoint (none: AWS's default for the region); for `file`, the directory.
    pub endpoint: String,
    /// The S3 region; empty for `file` and `memory`.
    pub region: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location)
    }
}

impl Store {
    /// Opens a store by URL: `file:///dir` or a plain path, `s3://bucket[/prefix][?options]`,
    /// or `memory://`. With `create`, a missing local directory is created.
    ///
    /// S3 options (query string or environment): `endpoint` (`AWS_ENDPOINT_URL`), `region`
    /// (`AWS_REGION`, `AWS_DEFAULT_REGION`), `path-style` (default true; `false` for
    /// virtual-hosted requests). Credentials come from the standard `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` variables.
    pub fn open(url: &str, create: bool) -> Result<Store> {
        if url == "memory://" || url == "memory:" {
            return Ok(Store {
                inner: Arc::new(InMemory::new()),
                location: "memory://".into(),
                local_root: None,
                placement: Placement {
                    kind: "memory",
                    endpoint: String::new(),
                    region: String::new(),
                },
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            return open_s3(url, rest);
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(Error::invalid(format!(
                "unsupported repository URL {url:?}: use a path, file:///path or s3://bucket/prefix"
            )));
        }
        let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        if path.as_os_str().is_empty() {
            return Err(Error::invalid("empty repository path"));
        }
        if create {
            std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        let root = match std::fs::canonicalize(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::RepositoryNotFound {
                    location: path.display().to_string(),
                });
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let fs = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| store_error("open", &root.display().to_string(), e))?
            .with_fsync(true);
        Ok(Store {
            inner: Arc::new(fs),
            location: root.display().to_string(),
            placement: Placement {
                kind: "file",
                endpoint: root.display().to_string(),
                region: String::new(),
            },
            local_root: Some(root),
        })
    }

    /// Packs a backup uploads at once unless told otherwise. A local write takes a few
    /// milliseconds, so one upload beside the pack being filled keeps up with compression, and
    /// each upload more holds another pack (16 MiB) in memory; over a network a second upload
    /// hides each request's latency.
    pub fn default_uploads(&self) -> usize {
        if self.local_root.is_some() { 1 } else { 2 }
    }

    /// Where this store is, for messages: a path, or a bucket URL without credentials.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Which service and region hold the data.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The directory of a local store.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local_root.as_deref()
    }

    fn path(name: &str) -> ObjectPath {
        ObjectPath::from(name)
    }

    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<()> {
        let payload = if self.local_root.is_some() {
            (0..bytes.len())
                .step_by(WRITE_PIECE)
                .map(|at| bytes.slice(at..bytes.len().min(at + WRITE_PIECE)))
                .collect()
        } else {
            PutPayload::from(bytes)
        };
        self.inner
            .put(&Self::path(name), payload)
            .await
            .map(|_| crash_point())
            .map_err(|e| store_error("write", name, e))
    }

    /// Reads a whole object of at most `limit` bytes, the most the format allows for it. A
    /// larger one is refused before its body is read (damage, or an object planted to exhaust
    /// memory), and the body is read no further than the limit whatever the store claims.
    pub async fn get_bounded(&self, name: &str, limit: u64) -> Result<Bytes> {
        let result = self
            .inner
            .get(&Self::path(name))
            .await
            .map_err(|e| store_error("read", name, e))?;
        let too_big = |size: u64| {
            Error::corrupt(
                name,
                format!(
                    "{size} bytes, more than the {limit} bytes the format allows for this object"
                ),
            )
        };
        if result.meta.size > limit {
            return Err(too_big(result.meta.size));
        }
        let mut body = result.into_stream();
        let mut bytes = Vec::with_capacity(usize::try_from(limit.min(1 << 20)).unwrap_or(0));
        while let Some(piece) = body
            .try_next()
            .await
            .map_err(|e| store_error("read", name, e))?
        {
            if (bytes.len() + piece.len()) as u64 > limit {
                return Err(too_big((bytes.len() + piece.len()) as u64));
            }
            bytes.extend_from_slice(&piece);
        }
        Ok(Bytes::from(bytes))
    }

    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let bytes = match self.inner.get_range(&Self::path(name), range.clone()).await {
            Ok(bytes) => bytes,
            Err(e) => {
                // A range past the object's end (object_store's own refusal, or S3's 416): the
                // object is shorter than its reader was told, which is damage, not an outage.
                if let Ok(meta) = self.inner.head(&Self::path(name)).await {
                    if meta.size < range.end {
                        return Err(Error::corrupt(
                            name,
                            format!(
                                "short read: wanted bytes {}..{}, the object has {} bytes",
                                range.start, range.end, meta.size
                            ),
                        ));
                    }
                }
                return Err(store_error("read", name, e));
            }
        };
        if bytes.len() as u64 != want {
            return Err(Error::corrupt(
                name,
                format!("short read: wanted {want} bytes, got {}", bytes.len()),
            ));
        }
        Ok(bytes)
    }

    /// Like [`Store::get_range`], into `buf` (cleared first), so callers can reuse buffers. A
    /// local store reads the file directly, without an intermediate allocation.
    pub async fn get_range_into(
        &self,
        name: &str,
        range: Range<u64>,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let Some(root) = &self.local_root else {
            buf.clear();
            buf.extend_from_slice(&self.get_range(name, range).await?);
            return Ok(buf);
        };
        let path = root.join(name);
        let object = name.to_string();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::MissingObject {
                    object: object.clone(),
                },
                _ => Error::io(&path, e),
            })?;
            // `buf`'s bytes are overwritten: zero only what it lacks (see BufferPool).
            let want = (range.end - range.start) as usize;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            buf.truncate(want);
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => Error::corrupt(
                        &object,
                        format!("short read: wanted bytes {}..{}", range.start, range.end),
                    ),
                    _ => Error::io(&path, e),
                })?;
            Ok(buf)
        })
        .await
        .map_err(|e| Error::invalid(format!("local read crashed: {e}")))?
    }

    /// Staging files that writers killed mid-write left in a local store (object_store writes
    /// `NAME#N`, then renames it to `NAME`), last modified before `before`; none elsewhere (an
    /// S3 upload is all or nothing). Listing never sees them. A directory that cannot be read
    /// is an error, never an empty answer.
    pub fn stale_staging(&self, before: std::time::SystemTime) -> Result<Vec<(String, u64)>> {
        let Some(root) = &self.local_root else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let entry = entry.map_err(|e| Error::io(&dir, e))?;
                let path = entry.path();
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Renamed into place or deleted since the directory was read.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(&path, e)),
                };
                if meta.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let is_staging = entry.file_name().to_str().is_some_and(|n| {
                    n.rsplit_once('#').is_some_and(|(_, suffix)| {
                        !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit())
                    })
                });
                let old = meta.modified().is_ok_and(|t| t < before);
                if meta.is_file() && is_staging && old {
                    let name = path.strip_prefix(root).unwrap_or(&path);
                    found.push((name.display().to_string(), meta.len()));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Deletes a staging file [`Store::stale_staging`] found.
    pub fn remove_staging(&self, name: &str) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let path = root.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Deletes `name` (gone already is fine). object_store sends an S3 delete as a POST it does
    /// not retry after a timeout; deleting is idempotent, so this retries a few times itself
    /// (a stalled request failed a prune's release of its lease, seen in the fault tests).
    pub async fn delete(&self, name: &str) -> Result<()> {
        let mut wait = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.inner.delete(&Self::path(name)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    crash_point();
                    return Ok(());
                }
                Err(_) if attempt < DELETE_ATTEMPTS => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(store_error("delete", name, e)),
            }
        }
    }

    /// The time the store gave `name` when it was written.
    pub async fn modified(&self, name: &str) -> Result<jiff::Timestamp> {
        self.inner
            .head(&Self::path(name))
            .await
            .map(|m| store_time(&m))
            .map_err(|e| store_error("stat", name, e))
    }

    pub async fn exists(&self, name: &str) -> Result<bool> {
        match self.inner.head(&Self::path(name)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error("stat", name, e)),
        }
    }
}

/// object_store's chrono time as a jiff timestamp (out of range: the nearest end).
fn store_time(m: &object_store::ObjectMeta) -> jiff::Timestamp {
    let t = m.last_modified;
    jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).unwrap_or(
        if t.timestamp() < 0 {
            jiff::Timestamp::MIN
        } else {
            jiff::Timestamp::MAX
        },
    )
}

fn store_error(operation: &'static str, object: &str, source: object_store::Error) -> Error {
    match source {
        object_store::Error::NotFound { .. } => Error::MissingObject {
            object: object.to_string(),
        },
        source => Error::Store {
            operation,
            object: object.to_string(),
            source: Box::new(source),
        },
    }
}

fn open_s3(url: &str, rest: &str) -> Result<Store> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() {
        return Err(Error::invalid(format!(
            "{url:?}: no bucket name (s3://bucket/prefix)"
        )));
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut endpoint = std::env::var("AWS_ENDPOINT_URL")
        .ok()
        .filter(|s| !s.is_empty());
    let mut region = None;
    let mut path_style = true;
    let mut timeout = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "endpoint" => endpoint = Some(v.to_string()),
            "region" => region = Some(v.to_string()),
            "timeout" => {
                timeout = Some(humantime::parse_duration(v).map_err(|e| {
                    Error::invalid(format!("{url:?}: timeout {v:?}: {e} (e.g. 30s)"))
                })?)
            }
            "path-style" => {
                path_style = match v {
                    "true" | "" => true,
                    "false" => false,
                    _ => {
                        return Err(Error::invalid(format!(
                            "{url:?}: path-style must be true or false"
                        )));
                    }
                }
            }
            _ => {
                return Err(Error::invalid(format!(
                    "{url:?}: unknown option {k:?} (known: endpoint, region, path-style, timeout)"
                )));
            }
        }
    }
    let region = region
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "us-east-1".into());
    builder = builder
        .with_region(&region)
        .with_virtual_hosted_style_request(!path_style)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
        });
    if let Some(t) = timeout {
        builder = builder.with_client_options(
            object_store::ClientOptions::new()
                .with_timeout(t)
                .with_connect_timeout(t.min(Duration::from_secs(5))),
        );
    }
    if let Some(ep) = &endpoint {
        builder = builder
            .with_endpoint(ep)
            .with_allow_http(ep.starts_with("http://"));
    }
    let s3 = builder
        .build()
        .map_err(|e| Error::invalid(format!("{url:?}: {e}")))?;
    let prefix = prefix.trim_matches('/');
    let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix))
    };
    let location = match &endpoint {
        Some(ep) => format!("s3://{bucket}/{prefix} (endpoint {ep}, region {region})"),
        None => format!("s3://{bucket}/{prefix} (region {region})"),
    };
    Ok(Store {
        inner,
        location,
        local_root: None,
        placement: Placement {
            kind: "s3",
            endpoint: endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com")),
            region,
        },
    })
}

mod list;

#[cfg(test)]
mod tests;
