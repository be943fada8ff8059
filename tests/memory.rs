//! Invariant 7 (design.md): memory stays bounded by configuration, not by the size of what is
//! backed up or restored.
//!
//! A pipeline's buffers are sized by the repository's pack and chunk sizes; each grows to the
//! largest chunk it has met, so a longer input may raise the peak a little until that bound.
//! With small packs and chunks the bound is tight: four times the input must not raise the
//! peak by more than a few megabytes. With the defaults, a 384 MiB dump stays under the
//! 100 MB of issue 3.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// The highest VmHWM (peak resident memory) seen while `child` runs.
fn watch_peak(child: &Child) -> std::thread::JoinHandle<u64> {
    let status = format!("/proc/{}/status", child.id());
    std::thread::spawn(move || {
        let mut peak = 0u64;
        while let Ok(text) = std::fs::read_to_string(&status) {
            let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            else {
                break; // a zombie: its memory is gone
            };
            peak = peak.max(kb << 10);
            std::thread::sleep(Duration::from_millis(2));
        }
        peak
    })
}

/// `size` bytes of a dump-like stream, every other 4 MiB piece incompressible (they fill packs
/// faster and take the most room in the workers), written piece by piece so the test itself
/// never holds it whole. Pieces differ by seed: nothing deduplicates.
fn feed(mut to: impl Write, seed: u64, size: u64) {
    let piece = 4 << 20;
    for i in 0..size / piece as u64 {
        let part = if i % 2 == 1 {
            random_bytes(seed + i, piece)
        } else {
            dump_like(seed + i, piece)
        };
        to.write_all(&part).unwrap();
    }
}

/// Peak memory of a backup of `size` bytes on standard input, and of its restore.
fn peaks(repo: &Repo, name: &str, seed: u64, size: u64) -> (u64, u64) {
    let mut backup = repo
        .command(&["backup", "--stdin", "--name", name, "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let peak = watch_peak(&backup);
    let stdin = backup.stdin.take().unwrap();
    let writer = std::thread::spawn(move || feed(stdin, seed, size));
    let out = backup.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_success(&out, &["backup", name]);
    let backup_peak = peak.join().unwrap();

    let mut restore = repo
        .command(&["restore", "latest", "--name", name, "--stdout", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let peak = watch_peak(&restore);
    let mut stdout = restore.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut restored = 0u64;
    loop {
        match stdout.read(&mut buf).unwrap() {
            0 => break,
            n => restored += n as u64,
        }
    }
    let out = restore.wait_with_output().unwrap();
    assert_success(&out, &["restore", name]);
    assert_eq!(restored, size, "{name} restored {restored} of {size} bytes");
    (backup_peak, peak.join().unwrap())
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

#[test]
fn peak_memory_is_set_by_configuration_not_by_input_size() {
    // 4 MiB packs, chunks of at most 1 MiB.
    let repo = Repo::init_file(&[
        "--pack-size",
        "4194304",
        "--chunk-sizes",
        "131072,262144,1048576",
    ]);
    let (small_backup, small_restore) = peaks(&repo, "small", 1, 128 * MIB);
    let (large_backup, large_restore) = peaks(&repo, "large", 1000, 512 * MIB);
    eprintln!(
        "peak RSS: backup {:.1} -> {:.1} MiB, restore {:.1} -> {:.1} MiB",
        mib(small_backup),
        mib(large_backup),
        mib(small_restore),
        mib(large_restore)
    );
    for (what, small, large) in [
        ("backup", small_backup, large_backup),
        ("restore", small_restore, large_restore),
    ] {
        assert!(small > 0 && large > 0, "{what}: no memory reading");
        assert!(
            large <= small + 16 * MIB,
            "{what}: peak memory grew with the input: {:.1} MiB for 128 MiB, {:.1} MiB for 512 MiB",
            mib(small),
            mib(large)
        );
    }
}
