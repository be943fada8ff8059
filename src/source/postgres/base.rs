//! A physical base backup of a PostgreSQL cluster, for point-in-time recovery (with its WAL
//! archived by `kluis wal push`, see `crate::wal`): `pg_basebackup` writes the cluster's data
//! directory as one tar stream on its standard output, which is chunked and deduplicated like
//! any stream, so a later base backup stores only what changed.
//!
//! `-X none`: the WAL the backup needs comes from the archive (pg_basebackup waits until the
//! server has archived the last segment the backup needs, so a base backup whose WAL cannot
//! be archived never completes: the job's timeout ends it); `-c fast`: a checkpoint now. The
//! stream is watched as it passes: its `backup_label` says where the backup's WAL starts, and
//! its `backup_manifest` (which pg_basebackup adds to a tar on standard output) where it ends,
//! which the snapshot records, so that a restore knows which WAL to replay.
//! A cluster with tablespaces outside its data directory cannot be written to one stream
//! (pg_basebackup refuses; the error says so).

use std::io::Read;
use std::sync::{Arc, Mutex};

use super::PgConn;
use crate::error::{Error, Result};
use crate::progress::Cancel;
use crate::snapshot::{BaseRecord, Source as SourceRecord};
use crate::source::{ChildOutput, NamedStream, StderrPolicy, StreamSet};

/// The name of the one stream a base backup holds.
pub const STREAM: &str = "base.tar";

/// Chunks of about 64 KiB: relation files change a page (8 KiB) here and there, and a data
/// directory of 100 GB stays an index of a couple of million entries.
const CHUNK_SIZES: (u32, u32, u32) = (16 << 10, 64 << 10, 256 << 10);

/// `pg_basebackup -Ft -D -` of a cluster, as a [`StreamSet`].
pub struct BaseSource {
    conn: PgConn,
    cluster: String,
    facts: Option<Facts>,
    seen: Arc<Mutex<Seen>>,
    warnings: Option<crate::source::Warnings>,
    cancel: Option<Cancel>,
    started: bool,
}

/// What the server says before the backup starts.
struct Facts {
    version: String,
    system_identifier: String,
    segment_size: u64,
}

impl BaseSource {
    /// A base backup of the cluster `conn` reaches (its database is used for the queries),
    /// whose WAL the archive keeps under `cluster`.
    pub fn new(conn: PgConn, cluster: String) -> Result<BaseSource> {
        crate::wal::parse_cluster(&cluster)?;
        Ok(BaseSource {
            conn,
            cluster,
            facts: None,
            seen: Arc::default(),
            warnings: None,
            cancel: None,
            started: false,
        })
    }
}

impl StreamSet for BaseSource {
    fn next_stream(&mut self) -> Result<Option<NamedStream>> {
        if self.started {
            return Ok(None);
        }
        self.started = true;
        let version = self.conn.query_one("SHOW server_version")?;
        let system_identifier = self
            .conn
            .query_one("SELECT system_identifier FROM pg_control_system()")?;
        let segment_size = self
            .conn
            .query_one("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")?
            .trim()
            .parse::<u64>()
            .map_err(|e| Error::SourceFailed(format!("wal_segment_size: {e}")))?;
        self.facts = Some(Facts {
            version,
            system_identifier,
            segment_size,
        });
        let mut c = self.conn.command("pg_basebackup")?;
        c.args(["-D", "-", "-F", "tar", "-X", "none", "-c", "fast"]);
        let what = format!("pg_basebackup of {}", self.conn.display);
        let mut out = ChildOutput::spawn(what, &mut c, StderrPolicy::DatabaseTool)?;
        if let Some(cancel) = &self.cancel {
            out = out.cancel_on(cancel.clone());
        }
        self.warnings = Some(out.warnings());
        Ok(Some(NamedStream {
            name: STREAM.into(),
            reader: Box::new(TarWatch::new(out, self.seen.clone())),
        }))
    }

    fn finish(&mut self) -> Result<SourceRecord> {
        let facts = self.facts.take().ok_or_else(|| {
            Error::SourceFailed("the PostgreSQL base backup source was never opened".into())
        })?;
        let seen = self.seen.lock().expect("not poisoned");
        let label = String::from_utf8_lossy(&seen.label).into_owned();
        let field = |key: &str| -> Option<String> {
            label
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        let missing = |what: &str| {
            Error::SourceFailed(format!(
                "the base backup of {} holds no backup_label saying {what}; it cannot be used \
                 for recovery",
                self.conn.display
            ))
        };
        // "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)"
        let start = field("START WAL LOCATION:").ok_or_else(|| missing("where its WAL starts"))?;
        let start_lsn = start.split_whitespace().next().unwrap_or("").to_string();
        let timeline: u32 = field("START TIMELINE:")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| missing("its timeline"))?;
        // The manifest's last WAL range: `"End-LSN": "0/2000100"`.
        let tail = String::from_utf8_lossy(&seen.manifest_tail).into_owned();
        let stop_lsn = tail
            .rfind("\"End-LSN\": \"")
            .map(|at| &tail[at + 12..])
            .and_then(|rest| rest.split('"').next())
            .map(str::to_string)
            .unwrap_or_else(|| start_lsn.clone());
        drop(seen);
        let start_wal = segment_of(timeline, parse_lsn(&start_lsn)?, facts.segment_size);
        let stop_wal = segment_of(timeline, parse_lsn(&stop_lsn)?, facts.segment_size);
        Ok(SourceRecord::PostgresBase(BaseRecord {
            server: self.conn.display.clone(),
            server_version: facts.version,
            cluster: self.cluster.clone(),
            system_identifier: facts.system_identifier,
            timeline,
            start_lsn,
            stop_lsn,
            start_wal,
            stop_wal,
            wal_segment_size: facts.segment_size,
            stopped: jiff::Timestamp::now(),
        }))
    }

    fn attach_cancel(&mut self, cancel: Cancel) {
        self.cancel = Some(cancel);
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings
            .as_ref()
            .map(|w| w.lock().expect("not poisoned").clone())
            .unwrap_or_default()
    }

    fn chunk_sizes(&self) -> (u32, u32, u32) {
        CHUNK_SIZES
    }
}

/// What the tar stream showed of the two files the snapshot's record is read from.
#[derive(Default)]
struct Seen {
    label: Vec<u8>,
    /// The last 64 KiB of `backup_manifest` (its WAL ranges are at its end).
    manifest_tail: Vec<u8>,
}

const KEPT: usize = 64 << 10;

/// Which file of interest the current tar entry is.
#[derive(Clone, Copy, PartialEq)]
enum Entry {
    Other,
    Label,
    Manifest,
}

/// Passes a tar stream through, keeping `backup_label` and the end of `backup_manifest`.
/// It reads tar headers (512-byte blocks: the name at 0..100, with a ustar prefix at
/// 345..500, the size in octal at 124..136) and skips every entry's content and padding.
struct TarWatch<R> {
    inner: R,
    seen: Arc<Mutex<Seen>>,
    header: Vec<u8>,
    /// Content bytes left of the current entry, then padding bytes.
    left: u64,
    pad: u64,
    entry: Entry,
}

impl<R> TarWatch<R> {
    fn new(inner: R, seen: Arc<Mutex<Seen>>) -> Self {
        TarWatch {
            inner,
            seen,
            header: Vec::with_capacity(512),
            left: 0,
            pad: 0,
            entry: Entry::Other,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = (self.left as usize).min(data.len());
                if self.entry != Entry::Other {
                    let mut seen = self.seen.lock().expect("not poisoned");
                    let kept = match self.entry {
                        Entry::Label => &mut seen.label,
                        _ => &mut seen.manifest_tail,
                    };
                    kept.extend_from_slice(&data[..n]);
                    if kept.len() > 2 * KEPT {
                        let cut = kept.len() - KEPT;
                        kept.drain(..cut);
                    }
                }
                self.left -= n as u64;
                data = &data[n..];
            } else if self.pad > 0 {
                let n = (self.pad as usize).min(data.len());
                self.pad -= n as u64;
                data = &data[n..];
            } else {
                let n = (512 - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.header.len() == 512 {
                    self.start_entry();
                    self.header.clear();
                }
            }
        }
    }

    fn start_entry(&mut self) {
        let h = &self.header;
        let text = |r: std::ops::Range<usize>| {
            let b = &h[r];
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        let (prefix, name) = (text(345..500), text(0..100));
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let size = u64::from_str_radix(text(124..136).trim(), 8).unwrap_or(0);
        self.left = size;
        self.pad = (512 - size % 512) % 512;
        self.entry = match path.trim_start_matches("./") {
            "backup_label" => Entry::Label,
            "backup_manifest" => Entry::Manifest,
            _ => Entry::Other,
        };
    }
}

impl<R: Read> Read for TarWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.feed(&buf[..n]);
        Ok(n)
    }
}

/// An LSN as PostgreSQL writes it, `X/Y` in hex.
pub fn parse_lsn(s: &str) -> Result<u64> {
    let bad = || Error::invalid(format!("{s:?} is not an LSN (such as 0/16B3740)"));
    let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
    let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
    let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
    Ok((u64::from(hi) << 32) | u64::from(lo))
}

/// The name of the WAL segment that holds `lsn` on `timeline`, for segments of `size` bytes.
pub fn segment_of(timeline: u32, lsn: u64, size: u64) -> String {
    let per_log = 0x1_0000_0000 / size.max(1);
    let number = lsn / size.max(1);
    format!(
        "{timeline:08X}{:08X}{:08X}",
        number / per_log,
        number % per_log
    )
}

/// The WAL segment number (as `crate::wal::WalKind::Segment` counts: log << 32 | seg) of the
/// segment holding `lsn`, for segments of `size` bytes.
pub fn segment_number(lsn: u64, size: u64) -> u64 {
    let per_log = 0x1_0000_0000 / size.max(1);
    let number = lsn / size.max(1);
    ((number / per_log) << 32) | (number % per_log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, content: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let size = format!("{:011o}\0", content.len());
        h[124..136].copy_from_slice(size.as_bytes());
        h[156] = b'0';
        let mut out = h;
        out.extend_from_slice(content);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    #[test]
    fn the_label_and_the_manifest_are_seen_in_a_tar_read_in_any_pieces() {
        let label = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                      CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n";
        let manifest = format!(
            "{{\"Files\": [{}], \"WAL-Ranges\": [\n{{ \"Timeline\": 1, \"Start-LSN\": \
             \"0/2000028\", \"End-LSN\": \"0/2000100\" }}\n] }}\n",
            "{\"Path\": \"x\"},".repeat(20_000)
        );
        let mut tar = entry("PG_VERSION", b"15\n");
        tar.extend(entry("backup_label", label));
        tar.extend(entry("base/1/1259", &vec![7u8; 70_000]));
        tar.extend(entry("backup_manifest", manifest.as_bytes()));
        tar.extend(vec![0u8; 1024]);
        for piece in [1, 7, 511, 512, 4096, 1 << 20] {
            let seen = Arc::new(Mutex::new(Seen::default()));
            let mut w = TarWatch::new(&tar[..], seen.clone());
            let mut buf = vec![0u8; piece];
            let mut back = Vec::new();
            loop {
                let n = w.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&buf[..n]);
            }
            assert!(back == tar, "passed through unchanged");
            let seen = seen.lock().unwrap();
            assert_eq!(seen.label, label, "pieces of {piece}");
            let tail = String::from_utf8_lossy(&seen.manifest_tail);
            assert!(tail.len() <= 2 * KEPT && tail.contains("\"End-LSN\": \"0/2000100\""));
        }
    }

    #[test]
    fn lsns_and_segment_names() {
        assert_eq!(parse_lsn("0/2000028").unwrap(), 0x2000028);
        assert_eq!(parse_lsn("1A/FF").unwrap(), (0x1A << 32) | 0xFF);
        assert!(parse_lsn("2000028").is_err() && parse_lsn("0/xyz").is_err());
        let mib16 = 16 << 20;
        assert_eq!(segment_of(1, 0x2000028, mib16), "000000010000000000000002");
        assert_eq!(
            segment_of(3, (0x1A << 32) | 0xFF00_0000, mib16),
            "000000030000001A000000FF"
        );
        assert_eq!(
            segment_of(1, 0x4000_0000, 1 << 30),
            "000000010000000000000001"
        );
        assert_eq!(segment_number(0x2000028, mib16), 2);
        assert_eq!(
            segment_number((0x1A << 32) | 0xFF00_0000, mib16),
            (0x1A << 32) | 0xFF
        );
    }
}
