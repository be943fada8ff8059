//! Crash safety: SIGKILL `kluis backup` at many points; after each kill the repository checks
//! clean, every committed snapshot restores bit-exact, and the next backup succeeds.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Kills that must land before the backup completes.
const KILLS: u32 = 50;
/// Runs at most (some backups finish before their kill).
const MAX_RUNS: u64 = 150;

/// Input of run `i`: a shared part (deduplicated across runs) and a part of its own.
fn input(shared: &[u8], i: u64) -> Vec<u8> {
    let mut v = shared.to_vec();
    v.extend_from_slice(&dump_like(1000 + i, 1 << 20));
    v.extend_from_slice(&random_bytes(2000 + i, 1 << 20));
    v
}

/// Name -> SHA-256 of every snapshot `kluis snapshots --json` lists.
fn listed(repo: &Repo) -> BTreeMap<String, (String, String)> {
    let out = repo.ok(&["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let id = s["id"].as_str().unwrap().to_string();
            let name = s["name"].as_str().unwrap().to_string();
            let sha = s["streams"][0]["sha256"].as_str().unwrap().to_string();
            (id, (name, sha))
        })
        .collect()
}

#[test]
fn sigkill_at_random_points_loses_nothing_committed() {
    // Small packs and chunks: many objects per backup, so kills land between them.
    let repo = Repo::init_file(&[
        "--pack-size",
        "65536",
        "--chunk-sizes",
        "16384,65536,262144",
    ]);
    let shared = dump_like(999, 1 << 20);
    let mut expected: BTreeMap<String, String> = BTreeMap::new(); // name -> sha256
    // The kill points are spread over a whole backup's time: the fastest of three (the first
    // is slow on a cold, busy machine, and then most kills would land after the commit).
    let mut full = Duration::MAX;
    for warm in 0..3u64 {
        let data = input(&shared, 10_000 + warm);
        let name = format!("warm-{warm}");
        let started = Instant::now();
        repo.backup_stdin(&name, &data);
        full = full.min(started.elapsed());
        expected.insert(name, sha256(&data));
    }

    let delays = random_bytes(4242, MAX_RUNS as usize * 4);
    let (mut killed, mut completed) = (0, 0);
    let mut runs = 0;
    for i in 1..=MAX_RUNS {
        if killed >= KILLS {
            break;
        }
        runs = i;
        let name = format!("run-{i}");
        let data = input(&shared, i);
        let frac = u32::from_le_bytes(delays[(i as usize - 1) * 4..][..4].try_into().unwrap());
        // Uniform over 0..1.2x a full backup's duration: from startup to after the commit.
        let delay = full.mul_f64(1.2 * f64::from(frac) / f64::from(u32::MAX));
        let mut child = repo
            .command(&["backup", "--stdin", "--name", &name, "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        writer.join().unwrap();
        if status.success() {
            completed += 1;
        } else {
            killed += 1;
        }
        // A killed backup may still have committed (killed right after the manifest landed).
        let snapshots = listed(&repo);
        let names: Vec<&String> = snapshots.values().map(|(n, _)| n).collect();
        if names.contains(&&name) {
            expected.insert(name.clone(), sha256(&input(&shared, i)));
        } else {
            assert!(!status.success(), "{name} exited 0 but is not listed");
        }

        let out = repo.run(&["check"]);
        assert_success(&out, &["check after kill", &name]);
        // Every committed snapshot restores bit-exact, and nothing else is listed.
        assert_eq!(
            snapshots.len(),
            expected.len(),
            "after {name}: {snapshots:?}"
        );
        for (id, (sname, sha)) in &snapshots {
            assert_eq!(
                Some(sha),
                expected.get(sname),
                "{sname} records a wrong digest"
            );
            // Every snapshot every tenth run (and at the end); this run's every time.
            if i % 10 != 0 && sname != &name {
                continue;
            }
            let restored = repo.restore_stdout(id);
            assert_eq!(
                &sha256(&restored),
                sha,
                "{sname} ({id}) restores different bytes"
            );
        }
    }
    eprintln!("{killed} backups killed, {completed} completed (full backup {full:?})");
    assert!(
        killed >= KILLS,
        "only {killed} of {runs} kills landed before completion"
    );
    // What the killed backups left (packs no index lists, half-written staging files) is
    // garbage that prune collects: marked by one run, deleted by the next after the grace.
    let leftovers = |repo: &Repo| -> Vec<String> {
        repo.objects()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.contains('#'))
            .collect()
    };
    let staging = leftovers(&repo).len();
    let prune = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["prune", "--grace", "0s", "--unsafe-short-grace", "--json"];
        all.extend_from_slice(args);
        serde_json::from_slice(&repo.ok(&all)).unwrap()
    };
    let mark = prune(&[]);
    let sweep = prune(&[]);
    eprintln!("{staging} staging files left by the kills; prune: {mark} then {sweep}");
    let marked = mark["packs_marked"].as_u64().unwrap();
    assert!(
        marked + mark["staging_deleted"].as_u64().unwrap() > 0,
        "{KILLS} killed backups left nothing to collect: {mark}"
    );
    assert_eq!(sweep["packs_deleted"].as_u64().unwrap(), marked, "{sweep}");
    assert!(leftovers(&repo).is_empty(), "{:?}", leftovers(&repo));
    let again = prune(&["--dry-run"]);
    assert_eq!(again["packs_marked"].as_u64().unwrap(), 0, "{again}");
    for (id, (sname, sha)) in listed(&repo) {
        assert_eq!(
            &sha256(&repo.restore_stdout(&id)),
            &sha,
            "{sname} after prune"
        );
    }

    // The next backup succeeds and the whole repository reads back clean.
    let last = input(&shared, MAX_RUNS + 1);
    let id = repo.backup_stdin("after", &last);
    assert!(repo.restore_stdout(&id) == last);
    let out = repo.run(&["check", "--read-data"]);
    assert_success(&out, &["check --read-data at the end"]);
    assert!(Duration::ZERO < full);
}

#[test]
fn an_interrupted_backup_exits_130_and_commits_nothing() {
    let repo = Repo::init_file(&[]);
    let first = dump_like(77, 8 << 20);
    let mut child = repo
        .command(&["backup", "--stdin", "--name", "big"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // 8 MiB, then an input that stays open and silent, like a stalled dump.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&first).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    // It stopped by itself, not by the exit kluis forces 10 s after a signal.
    assert!(!err.contains("did not stop"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "SIGINT took {:?} to stop the backup",
        started.elapsed()
    );
    assert!(listed(&repo).is_empty(), "an interrupted backup committed");
    repo.ok(&["check"]);
}

#[test]
fn an_interrupted_command_blocked_on_its_output_exits_within_seconds() {
    // A restore to standard output that nobody reads: its writer is stuck in `write`, where
    // cancellation cannot reach it. kluis exits anyway, 10 s after the signal.
    let repo = Repo::init_file(&[]);
    let data = random_bytes(78, 16 << 20);
    let id = repo.backup_stdin("db", &data);
    let mut child = repo
        .command(&["restore", &id, "--stdout", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap(); // held open, never read
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    drop(stdout);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("did not stop within 10 s"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "exited {:?} after the signal",
        started.elapsed()
    );
}

#[test]
fn an_interrupted_backup_of_a_fast_input_stops_by_itself() {
    // Input arrives faster than it is compressed, in small chunks (a command's output is cut
    // like a database's): the queue to the one compression worker is full when the signal
    // lands, the reader holds a part-filled batch, and the worker stops taking from the queue.
    let repo = Repo::init_file(&[]);
    let file = repo.path().join("big.sql");
    // Rows of random numbers: slow to compress, unlike repetitive text.
    let mut rows = String::with_capacity(200 << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0u64;
    while rows.len() < 192 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        rows.push_str(&format!(
            "{i}\t{x}\tcustomer-{}\t{}\n",
            x % 1_000_000_007,
            x >> 11
        ));
        i += 1;
    }
    std::fs::write(&file, rows).unwrap();
    let cat = format!("cat {}", file.display());
    let child = repo
        .command(&[
            "backup",
            "--command",
            &cat,
            "--name",
            "fast",
            "--threads",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let started = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("did not stop"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "SIGINT took {:?} to stop the backup",
        started.elapsed()
    );
    assert!(listed(&repo).is_empty(), "an interrupted backup committed");
    repo.ok(&["check"]);
}
