//! The reliability suite's SIGKILL matrix (issue 18), beside backup (tests/crash.rs) and prune
//! (tests/prune.rs): `copy`, `forget` and `restore` killed at 50 random points each. After
//! every kill the repositories check clean, every snapshot listed restores bit-exact, and the
//! command run again completes. Also: a full disk under the state directory and under a
//! restore target.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KILLS: u32 = 50;

/// Id -> (name, SHA-256 of the first stream) of every snapshot listed.
fn listed(repo: &Repo) -> BTreeMap<String, (String, String)> {
    let v: serde_json::Value = serde_json::from_slice(&repo.ok(&["snapshots", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["streams"][0]["sha256"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// Kill points: fractions of `full`, uniform over 0..1.1 (from start to a little past the
/// end). At most `3 * KILLS` of them: callers stop once `KILLS` kills landed mid-way.
fn delays(seed: u64, full: Duration) -> impl Iterator<Item = Duration> {
    // Ten draws per kill wanted: on a machine slower one minute than the next, many points
    // can fall after the end of a run (which then finished by itself, and is checked too).
    let bytes = random_bytes(seed, KILLS as usize * 40);
    (0..KILLS as usize * 10).map(move |i| {
        let frac = u32::from_le_bytes(bytes[i * 4..][..4].try_into().unwrap());
        full.mul_f64(1.1 * f64::from(frac) / f64::from(u32::MAX))
    })
}

/// Runs `cmd`, SIGKILLs it after `delay`; whether it had finished first. A run that ended
/// by itself must have succeeded.
fn kill_after(mut cmd: Command, delay: Duration) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    if out.status.signal() == Some(9) {
        return false;
    }
    assert!(
        out.status.success(),
        "failed on its own: {}",
        text(&out.stderr)
    );
    true
}

fn timed(mut cmd: Command) -> Duration {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    assert_success(&out, &["timed run"]);
    started.elapsed()
}

fn every_listed_restores(repo: &Repo, expected: &BTreeMap<String, String>, when: &str) {
    for (id, (name, sha)) in listed(repo) {
        assert_eq!(
            Some(&sha),
            expected.get(&name),
            "{when}: {name} ({id}) is unknown"
        );
        assert_eq!(
            &sha256(&repo.restore_stdout(&id)),
            &sha,
            "{when}: {name} ({id}) restores other bytes"
        );
    }
}

fn small(repo: Repo) -> Repo {
    repo.init_small();
    repo
}

#[test]
fn sigkill_copy_at_50_points() {
    let src = small(Repo::file());
    let mut expected = BTreeMap::new();
    for i in 0..4u64 {
        let data = random_bytes(500 + i, 512 << 10);
        expected.insert(format!("s{i}"), sha256(&data));
        src.backup_stdin(&format!("s{i}"), &data);
    }
    let copy = |dst: &Repo| {
        let mut c = src.command(&["copy", "--to", &dst.url, "--quiet"]);
        c.env("KLUIS_TO_KEY_FILE", &dst.key_file);
        c
    };
    // The fastest of three: one slow first run must not put most kill points past the end.
    let full = (0..3)
        .map(|_| timed(copy(&small(Repo::file()))))
        .min()
        .unwrap();
    let (mut killed, mut finished) = (0, 0);
    for (n, delay) in delays(7, full).enumerate() {
        if killed == KILLS {
            break;
        }
        // Each kill into a new destination; then the copy run again completes it.
        let dst = small(Repo::file());
        if kill_after(copy(&dst), delay) {
            finished += 1;
        } else {
            killed += 1;
        }
        dst.ok(&["check"]);
        every_listed_restores(&dst, &expected, &format!("copy kill {n}"));
        let out = copy(&dst).output().unwrap();
        assert_success(&out, &["copy after a kill"]);
        assert_eq!(listed(&dst).len(), expected.len());
        every_listed_restores(&dst, &expected, &format!("copy after kill {n}"));
        dst.ok(&["check", "--read-data"]);
    }
    eprintln!("copy: {killed} killed, {finished} finished (a whole copy {full:?})");
    assert_eq!(killed, KILLS, "only {killed} kills landed mid-copy");
}

#[test]
fn sigkill_forget_at_50_points() {
    let repo = small(Repo::file());
    let mut expected = BTreeMap::new();
    let mut n = 0u64;
    fn add(repo: &Repo, expected: &mut BTreeMap<String, String>, n: &mut u64, k: u64) {
        for _ in 0..k {
            let data = random_bytes(600 + *n, 64 << 10);
            expected.insert(sha256(&data), sha256(&data));
            repo.backup_stdin("db", &data);
            *n += 1;
        }
    }
    add(&repo, &mut expected, &mut n, 12);
    let forget = |repo: &Repo| repo.command(&["forget", "--keep-last", "4", "--quiet"]);
    let full = timed(forget(&repo));
    let (mut killed, mut finished) = (0, 0);
    for (k, delay) in delays(8, full).enumerate() {
        if killed == KILLS {
            break;
        }
        add(&repo, &mut expected, &mut n, 3);
        if kill_after(forget(&repo), delay) {
            finished += 1;
        } else {
            killed += 1;
        }
        for (id, (_, sha)) in listed(&repo) {
            assert!(expected.contains_key(&sha), "kill {k}: {id} is unknown");
            assert_eq!(&sha256(&repo.restore_stdout(&id)), &sha, "kill {k}: {id}");
        }
        // Forget again finishes what the killed one began; then nothing is amiss.
        repo.ok(&["forget", "--keep-last", "4"]);
        let out = repo.run(&["check"]);
        assert_success(&out, &["check after a killed forget"]);
        assert_eq!(listed(&repo).len(), 4);
    }
    eprintln!("forget: {killed} killed, {finished} finished (a whole forget {full:?})");
    assert_eq!(killed, KILLS, "only {killed} kills landed mid-forget");
}

#[test]
fn sigkill_restore_at_50_points() {
    let repo = Repo::init_file(&[]);
    let src = repo.path().join("src");
    sample_tree(&src, 77);
    let id = repo.backup_paths(&[], &[&src]);
    let target = repo.path().join("target");
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore", id.as_str(), "--target", target.to_str().unwrap()];
        args.extend_from_slice(extra);
        repo.command(&args)
    };
    let full = timed(restore(&[]));
    fs::remove_dir_all(&target).unwrap();
    let (mut killed, mut finished) = (0, 0);
    for delay in delays(9, full) {
        if killed == KILLS {
            break;
        }
        if kill_after(restore(&["--overwrite"]), delay) {
            finished += 1;
        } else {
            killed += 1;
        }
        // Over whatever the killed one left, a restore completes and the tree is whole.
        let out = restore(&["--overwrite", "--quiet"]).output().unwrap();
        assert_success(&out, &["restore over a killed restore"]);
        assert_same_tree(&src, &target.join("src"));
        fs::remove_dir_all(&target).unwrap();
    }
    eprintln!("restore: {killed} killed, {finished} finished (a whole restore {full:?})");
    assert_eq!(killed, KILLS, "only {killed} kills landed mid-restore");
}

/// Fills a 1 MiB tmpfs, leaving nothing free.
fn fill(disk: &TinyDisk) {
    let mut f = fs::File::create(disk.0.path().join("filler")).unwrap();
    let block = vec![0u8; 64 << 10];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
}

#[test]
fn a_full_restore_target_fails_cleanly_and_names_the_place() {
    let repo = Repo::init_file(&[]);
    let data = random_bytes(700, 3 << 20);
    let src = repo.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), &data).unwrap();
    let id = repo.backup_paths(&[], &[&src]);
    let disk = TinyDisk::mount();
    let target = disk.0.path().join("restore");
    let out = repo.run(&["restore", &id, "--target", target.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("No space left") && err.contains(target.to_str().unwrap()),
        "{err}"
    );
    // Its temporary file is gone: the disk is free again.
    let left: Vec<_> = fs::read_dir(target.join("src")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let bigger = repo.path().join("restore");
    repo.ok(&["restore", &id, "--target", bigger.to_str().unwrap()]);
    assert_eq!(fs::read(bigger.join("src/big")).unwrap(), data);
}

#[test]
fn a_full_state_directory_never_fails_a_backup_and_check_names_it() {
    let repo = Repo::init_file(&[]);
    let disk = TinyDisk::mount();
    let state = disk.0.path().join("state");
    fs::create_dir(&state).unwrap();
    fill(&disk);
    let data = dump_like(701, 200_000);
    let mut cmd = repo.command(&["backup", "--stdin", "--name", "db", "--json"]);
    cmd.env("KLUIS_STATE_DIR", &state);
    let out = {
        use std::io::Write;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&data).unwrap();
        child.wait_with_output().unwrap()
    };
    assert_success(&out, &["backup with a full state directory"]);
    let err = text(&out.stderr);
    assert!(err.contains("No space left"), "{err}");
    assert!(repo.restore_stdout(&snapshot_id(&out.stdout)) == data);
    let mut check = repo.command(&["check"]);
    check.env("KLUIS_STATE_DIR", &state);
    let out = check.output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("No space left") && err.contains(state.to_str().unwrap()),
        "{err}"
    );
}
