//! systemd's notification protocol (`sd_notify`): READY, STATUS, RELOADING, STOPPING and
//! watchdog pings, sent as datagrams to `$NOTIFY_SOCKET` when systemd set it (`Type=notify`).
//! Without systemd every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            // Never blocks: a notification systemd is slow to read is dropped, the daemon
            // goes on.
            let socket = UnixDatagram::unbound().ok()?;
            socket.set_nonblocking(true).ok()?;
            Some((socket, addr))
        });
        Notifier { socket }
    }

    /// Sends `state` (`READY=1`, `STATUS=...`); failures are ignored, as systemd's own
    /// library does.
    pub fn send(&self, state: &str) {
        if let Some((socket, addr)) = &self.socket {
            let _ = socket.send_to_addr(state.as_bytes(), addr);
        }
    }

    /// How often to ping the watchdog: half the interval systemd set (`WatchdogSec=`).
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
    }
}
