//! The names of the files PostgreSQL archives, and what they say: a segment
//! (`TTTTTTTTLLLLLLLLSSSSSSSS`: timeline, log, segment, in upper-case hex), a timeline history
//! file (`TTTTTTTT.history`), a backup history file (`<segment>.<offset>.backup`) or a partial
//! segment (`<segment>.partial`).

use std::path::Path;

use crate::error::{Error, Result};

/// The largest WAL file accepted: PostgreSQL's largest segment size.
pub const MAX_SIZE: u64 = 1 << 30;

/// What kind of WAL file a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalKind {
    Segment { timeline: u32, number: u64 },
    History { timeline: u32 },
    Backup,
    Partial,
}

/// A WAL file's name, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalFile {
    name: String,
    kind: WalKind,
}

fn hex_upper(s: &str, len: usize) -> Option<u64> {
    (s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
    .then(|| u64::from_str_radix(s, 16).ok())
    .flatten()
}

/// A segment name's timeline and number (log × 2^32 / segment size + seg, as PostgreSQL
/// counts them, for any segment size: log and seg as they are).
fn segment(s: &str) -> Option<(u32, u64)> {
    if s.len() != 24 {
        return None;
    }
    let timeline = hex_upper(&s[..8], 8)? as u32;
    let log = hex_upper(&s[8..16], 8)?;
    let seg = hex_upper(&s[16..24], 8)?;
    Some((timeline, (log << 32) | seg))
}

impl WalFile {
    pub fn parse(name: &str) -> Result<WalFile> {
        let kind = if let Some((timeline, number)) = segment(name) {
            WalKind::Segment { timeline, number }
        } else if let Some(t) = name.strip_suffix(".history").and_then(|t| hex_upper(t, 8)) {
            WalKind::History { timeline: t as u32 }
        } else if name
            .strip_suffix(".partial")
            .is_some_and(|s| segment(s).is_some())
        {
            WalKind::Partial
        } else if name.strip_suffix(".backup").is_some_and(|s| {
            s.split_once('.')
                .is_some_and(|(seg, off)| segment(seg).is_some() && hex_upper(off, 8).is_some())
        }) {
            WalKind::Backup
        } else {
            return Err(Error::invalid(format!(
                "{name:?} is not a WAL file name (a segment such as 000000010000000000000001, \
                 a timeline history file 00000002.history, a backup history file or a \
                 .partial segment)"
            )));
        };
        Ok(WalFile {
            name: name.to_string(),
            kind,
        })
    }

    /// The WAL file at `path`, by its file name (`%p` in `archive_command`).
    pub fn of_path(path: &Path) -> Result<WalFile> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid(format!("{}: not a WAL file's path", path.display())))?;
        WalFile::parse(name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> WalKind {
        self.kind
    }

    /// Refuses a file of a size PostgreSQL never archives under this name: a segment is a
    /// power of two from 1 MiB to 1 GiB (a short one was cut off), other files are small.
    pub fn check_size(&self, size: u64) -> Result<()> {
        let ok = match self.kind {
            WalKind::Segment { .. } => {
                size.is_power_of_two() && ((1 << 20)..=MAX_SIZE).contains(&size)
            }
            WalKind::Partial => size <= MAX_SIZE,
            WalKind::History { .. } | WalKind::Backup => size <= 16 << 20,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{}: {size} bytes is not the size of such a WAL file (a segment is a power of \
                 two from 1 MiB to 1 GiB); not archived",
                self.name
            )))
        }
    }

    /// The system identifier a segment's first page records (its long page header), if it is
    /// a segment that starts with one.
    pub fn system_identifier(&self, raw: &[u8]) -> Option<u64> {
        const XLP_LONG_HEADER: u16 = 0x0002;
        if !matches!(self.kind, WalKind::Segment { .. } | WalKind::Partial) || raw.len() < 32 {
            return None;
        }
        let info = u16::from_le_bytes([raw[2], raw[3]]);
        if info & XLP_LONG_HEADER == 0 {
            return None;
        }
        Some(u64::from_le_bytes(raw[24..32].try_into().ok()?))
    }
}

/// Checks a cluster's name in the archive: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with
/// a dot.
pub fn parse_cluster(cluster: &str) -> Result<()> {
    let ok = !cluster.is_empty()
        && cluster.len() <= 64
        && !cluster.starts_with('.')
        && cluster
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "cluster name {cluster:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting \
             with '.'"
        )))
    }
}
