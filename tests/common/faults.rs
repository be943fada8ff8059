//! A fault-injecting HTTP proxy in front of an S3 server (Garage), for the reliability suite.
//!
//! Every request gets its own connection to the server (the proxy rewrites `Connection:` to
//! `close`), so a fault hits exactly one request. At the configured rate a request meets one
//! of these, chosen at random:
//! - `503`: answered "503 Service Unavailable" without reaching the server;
//! - `reset`: forwarded (the server does the work) but the answer never comes back: the
//!   connection is closed, as a network cut after the server acted would;
//! - `stall`: never answered; the connection stays open for [`STALL`] (the client times out);
//! - `slow`: the answer comes back at about 128 KiB/s;
//! - `truncated`: the answer is cut off part-way and the connection closed;
//! - `upload-cut`: the request is cut off part-way on its way to the server.
//!
//! Faults are drawn from a seeded generator, by connection number: the same seed gives the
//! same faults to the same connections, though which request opens which connection depends
//! on timing.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

/// How long a stalled request is held open.
pub const STALL: Duration = Duration::from_secs(4);

pub const KINDS: [&str; 6] = ["503", "reset", "stall", "slow", "truncated", "upload-cut"];

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicUsize,
    pub faults: [AtomicUsize; 6],
}

impl Stats {
    pub fn faults(&self) -> usize {
        self.faults.iter().map(|f| f.load(SeqCst)).sum()
    }

    pub fn report(&self) -> String {
        let by_kind: Vec<String> = KINDS
            .iter()
            .zip(&self.faults)
            .map(|(k, n)| format!("{k} {}", n.load(SeqCst)))
            .collect();
        format!(
            "{} requests, {} faults ({})",
            self.requests.load(SeqCst),
            self.faults(),
            by_kind.join(", ")
        )
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    /// Faults per million requests.
    rate: Arc<AtomicU64>,
}

impl FaultProxy {
    /// A proxy to `upstream` failing `rate` (0..=1) of requests, drawn from `seed`.
    pub fn start(upstream: SocketAddr, rate: f64, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let ppm = Arc::new(AtomicU64::new((rate * 1e6) as u64));
        let (s, r) = (stats.clone(), ppm.clone());
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(client) = conn else { continue };
                let roll = splitmix(seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let fault = if roll % 1_000_000 < r.load(SeqCst) {
                    Some((roll >> 20) as usize % KINDS.len())
                } else {
                    None
                };
                let stats = s.clone();
                std::thread::spawn(move || serve(client, upstream, fault, roll >> 32, &stats));
            }
        });
        FaultProxy {
            addr,
            stats,
            rate: ppm,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_rate(&self, rate: f64) {
        self.rate.store((rate * 1e6) as u64, SeqCst);
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Reads up to the end of the request head; returns the head and whatever came after it.
fn read_head(client: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((buf, rest));
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    }
}

/// The head with `Connection: close` instead of any Connection header.
fn one_shot(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(&head[..head.len() - 4]);
    let mut out = String::new();
    for line in text.split("\r\n") {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Option<usize>,
    roll: u64,
    stats: &Stats,
) {
    let Some((head, rest)) = read_head(&mut client) else {
        return;
    };
    stats.requests.fetch_add(1, SeqCst);
    if let Some(k) = fault {
        stats.faults[k].fetch_add(1, SeqCst);
    }
    let close = |c: &TcpStream| {
        let _ = c.shutdown(Shutdown::Both);
    };
    match fault.map(|k| KINDS[k]) {
        Some("503") => {
            let _ = client.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
                  Connection: close\r\n\r\n",
            );
            close(&client);
            return;
        }
        Some("stall") => {
            std::thread::sleep(STALL);
            close(&client);
            return;
        }
        _ => {}
    }
    let Ok(mut server) = TcpStream::connect(upstream) else {
        close(&client);
        return;
    };
    if server.write_all(&one_shot(&head)).is_err() {
        close(&client);
        return;
    }
    if fault == Some(5) {
        // upload-cut: part of the body, then nothing more.
        let keep = rest.len().min(1 + (roll as usize % 4096));
        let _ = server.write_all(&rest[..keep]);
        close(&server);
        close(&client);
        return;
    }
    if server.write_all(&rest).is_err() {
        close(&client);
        return;
    }
    // The rest of the request body, client to server, on its own thread.
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let upload = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut s_out);
        let _ = s_out.shutdown(Shutdown::Write);
    });
    match fault.map(|k| KINDS[k]) {
        Some("reset") => {
            // Let the server finish the request, then drop its answer.
            let mut sink = Vec::new();
            let _ = server.read_to_end(&mut sink);
            close(&client);
        }
        Some("slow") => {
            let mut chunk = [0u8; 4096];
            loop {
                match server.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if client.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(30));
                    }
                }
            }
            close(&client);
        }
        Some("truncated") => {
            let cut = 64 + (roll as usize % 65_536);
            let mut sent = 0;
            let mut chunk = [0u8; 4096];
            while sent < cut {
                match server.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let n = n.min(cut - sent);
                        if client.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                        sent += n;
                    }
                }
            }
            close(&client);
            close(&server);
        }
        _ => {
            let _ = std::io::copy(&mut server, &mut client);
            close(&client);
        }
    }
    let _ = upload.join();
}
