//! Sources that produce streams: database dumps and commands.
//!
//! A source yields one or more named streams, in restore order, each usually the standard
//! output of a child process (`pg_dump`, `psql`, `mariadb-dump`, any command). A stream whose
//! producer fails fails the whole backup, so a failed dump never becomes a snapshot: a non-zero
//! exit, a kill by a signal, an error line on its standard error, or output that stops before the
//! tool's own end marker. The error quotes the tool's message.

pub mod command;
pub mod database;
pub mod mysql;
pub mod postgres;
pub mod sqlite;
pub mod url;

use std::io::{self, Read};
use std::process::{Child, ChildStderr, ChildStdout, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::progress::Cancel;
use crate::snapshot::Source as SourceRecord;

mod child;

pub use child::*;

/// Chunk sizes (min, average, max) for database dumps: much smaller than for files, because a
/// day's changes to a database are scattered single rows, and every changed chunk is stored
/// again. Measured on the shared workload (4 nights, scale 1; stored after night 1, then
/// added per night): 64 KiB average 19.3 MiB then 1.7 MiB; 32 KiB 19.5 / 1.27; 16 KiB
/// 20.1 / 1.03; 8 KiB 21.0 / 0.97 (small chunks compress worse).
pub const DUMP_CHUNK_SIZES: (u32, u32, u32) = (4 << 10, 16 << 10, 64 << 10);

/// One stream of a source.
pub struct NamedStream {
    /// The file name it gets in the snapshot (no '/', unique); names sort in restore order.
    pub name: String,
    pub reader: Box<dyn Read + Send>,
}

/// A source of streams, read one after the other by the backup.
pub trait StreamSet: Send {
    /// The next stream, or `None` after the last. Streams may come in any order (a source
    /// that reads several at once does best giving the largest first); the snapshot lists
    /// them sorted by name, and names must not repeat.
    fn next_stream(&mut self) -> Result<Option<NamedStream>>;

    /// Called once every stream has been read to its end: what the snapshot records about
    /// the source, or the error that fails the backup.
    fn finish(&mut self) -> Result<SourceRecord>;

    /// The backup's cancellation flag, set before the first stream: a source whose tools may
    /// go quiet for long hands it to their outputs ([`ChildOutput::cancel_on`]).
    fn attach_cancel(&mut self, _cancel: Cancel) {}

    /// How many streams the backup may read at once (each on its own thread, so the tools
    /// behind them run side by side). Streams still end up in the snapshot in name order.
    fn parallel_streams(&self) -> usize {
        1
    }

    /// What the source's tools printed on standard error without failing, once it finished.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Chunk sizes (min, average, max) for these streams; they must stay the same from one
    /// backup to the next for deduplication to work.
    fn chunk_sizes(&self) -> (u32, u32, u32) {
        DUMP_CHUNK_SIZES
    }
}

/// Where a tool's warnings land once it ends (see [`ChildOutput::warnings`]).
pub type Warnings = Arc<std::sync::Mutex<Vec<String>>>;

/// Every warning collected in `from`, in order.
pub(crate) fn collect_warnings<'a>(from: impl IntoIterator<Item = &'a Warnings>) -> Vec<String> {
    from.into_iter()
        .flat_map(|w| w.lock().expect("not poisoned").clone())
        .collect()
}

/// The error a stream's reader returns when its producer failed; the backup reports its text.
#[derive(Debug)]
pub struct SourceError(pub String);

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceError {}

/// A stream's reader gave up because the backup was cancelled.
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// Whether a read gave up because the backup was cancelled.
pub fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
}

/// Turns a stream's read error into the backup's error.
pub fn read_error(stream: &str, e: io::Error) -> Error {
    if is_cancelled(&e) {
        return Error::Interrupted;
    }
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<SourceError>())
    {
        Some(SourceError(msg)) => Error::SourceFailed(msg.clone()),
        None => Error::SourceFailed(format!("reading {stream} failed: {e}")),
    }
}

fn source_error(msg: String) -> io::Error {
    io::Error::other(SourceError(msg))
}

/// A readable file descriptor (standard input, a pipe) read so that a cancelled backup stops
/// even while nothing arrives: the read waits for data in short polls and gives up once
/// `cancel` is set. A blocking read of a silent pipe would hold the backup, and the command
/// that waits for it, until the writer closed it.
pub struct FdInput<R> {
    inner: R,
    cancel: Cancel,
}

impl<R: Read + std::os::fd::AsFd> FdInput<R> {
    pub fn new(inner: R, cancel: Cancel) -> FdInput<R> {
        FdInput { inner, cancel }
    }
}

impl<R: Read + std::os::fd::AsFd> Read for FdInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::event::{PollFd, PollFlags, poll};
        let tick = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        loop {
            if self.cancel.is_cancelled() {
                return Err(io::Error::other(Cancelled));
            }
            let ready = {
                let fd = self.inner.as_fd();
                let mut fds = [PollFd::new(&fd, PollFlags::IN)];
                poll(&mut fds, Some(&tick))
            };
            match ready {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                // Regular files are always ready; errors show on the read itself.
                _ => return self.inner.read(buf),
            }
        }
    }
}

/// Bytes before and after a reader: a header and trailer a source writes around a tool's output.
pub struct Framed<R> {
    head: io::Cursor<Vec<u8>>,
    body: R,
    tail: io::Cursor<Vec<u8>>,
    body_done: bool,
}

impl<R: Read> Framed<R> {
    pub fn new(head: Vec<u8>, body: R, tail: Vec<u8>) -> Self {
        Framed {
            head: io::Cursor::new(head),
            body,
            tail: io::Cursor::new(tail),
            body_done: false,
        }
    }
}

impl<R: Read> Read for Framed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.head.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        if !self.body_done {
            let n = self.body.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            self.body_done = true;
        }
        self.tail.read(buf)
    }
}

/// Decodes `%XX` escapes of a URL part.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests;
