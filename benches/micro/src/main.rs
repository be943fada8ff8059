//! Micro-benchmarks behind kluis's choice of AEAD implementation and default zstd level.
//!
//! Usage: kluis-micro DUMP [MB]  (DUMP: a plain SQL dump; the first MB megabytes are used,
//! default 128). Single-threaded; each figure is the best of 5 runs.

use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};

const RUNS: usize = 5;

fn best(mut f: impl FnMut()) -> Duration {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("RUNS > 0")
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Seals every piece of `data` in place, as kluis seals a blob: a fresh nonce per message,
/// associated data, a detached tag.
fn aead(data: &[u8], piece: usize) {
    let key = [7u8; 32];
    let aad = b"repository id, epoch, type and id";
    let mut buf = data.to_vec();
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("key length"),
    );
    let rc = aes_gcm::Aes256Gcm::new_from_slice(&key).expect("key length");
    let ring_seal = best(|| {
        for (i, p) in buf.chunks_mut(piece).enumerate() {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let tag = ring_key
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(n),
                    ring::aead::Aad::from(aad),
                    p,
                )
                .expect("seal");
            let _ = std::hint::black_box(tag);
        }
    });
    let rc_seal = best(|| {
        for (i, p) in buf.chunks_mut(piece).enumerate() {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let tag = rc
                .encrypt_in_place_detached(&n.into(), aad, p)
                .expect("seal");
            let _ = std::hint::black_box(tag);
        }
    });
    println!(
        "| AES-256-GCM seal, {} KiB messages | {:.0} | {:.0} | {:.1}x |",
        piece >> 10,
        mbps(data.len(), ring_seal),
        mbps(data.len(), rc_seal),
        rc_seal.as_secs_f64() / ring_seal.as_secs_f64()
    );
}

/// Compresses every piece of `data` on its own at `level`, as kluis compresses blobs; returns
/// the compressed size and the best time.
fn zstd_level(data: &[u8], piece: usize, level: i32) -> (usize, Duration) {
    let mut c = zstd::bulk::Compressor::new(level).expect("zstd");
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(piece));
    let mut size = 0;
    let t = best(|| {
        size = 0;
        for p in data.chunks(piece) {
            out.clear();
            c.compress_to_buffer(p, &mut out).expect("compress");
            size += out.len();
        }
    });
    (size, t)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: kluis-micro DUMP [MB]");
        std::process::exit(2);
    };
    let mb: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let mut data = std::fs::read(path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(1)
    });
    data.truncate(mb << 20);
    println!("input: {path}, first {:.1} MB; one thread, best of {RUNS}\n", data.len() as f64 / 1e6);

    println!("| AEAD | ring MB/s | aes-gcm crate MB/s | ring faster by |");
    println!("|---|---:|---:|---:|");
    for piece in [16 << 10, 1 << 20] {
        aead(&data, piece);
    }

    println!("\n| zstd level | pieces | compress MB/s | stored / input | stored vs level 3 |");
    println!("|---|---|---:|---:|---:|");
    for piece in [16 << 10, 1 << 20] {
        let (l3, _) = zstd_level(&data, piece, 3);
        for level in [-1, 1, 2, 3] {
            let (size, t) = zstd_level(&data, piece, level);
            println!(
                "| {level} | {} KiB | {:.0} | {:.3} | {:+.1} % |",
                piece >> 10,
                mbps(data.len(), t),
                size as f64 / data.len() as f64,
                (size as f64 / l3 as f64 - 1.0) * 100.0
            );
        }
    }
}
