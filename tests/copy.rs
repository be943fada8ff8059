//! `kluis copy`: snapshots re-encrypted under the destination's own keys, only missing data
//! uploaded, verified on the way; an interrupted or killed copy leaves no snapshot behind and
//! the next one completes.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `kluis copy` from `src` to `dst`, with the destination's own key.
fn copy_cmd(src: &Repo, dst: &Repo, args: &[&str]) -> Command {
    let mut all = vec!["copy", "--to", dst.url.as_str()];
    all.extend_from_slice(args);
    let mut cmd = src.command(&all);
    cmd.env("KLUIS_TO_KEY_FILE", &dst.key_file).envs(&dst.env);
    cmd
}

fn copy(src: &Repo, dst: &Repo, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = copy_cmd(src, dst, &all).output().unwrap();
    assert_success(&out, &all);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn uploaded(report: &serde_json::Value) -> u64 {
    report["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stored_bytes"].as_u64().unwrap())
        .sum()
}

/// Snapshot id -> (name, time, SHA-256 of its first stream) of every snapshot listed.
fn listed(repo: &Repo) -> BTreeMap<String, (String, String, String)> {
    let v: serde_json::Value = serde_json::from_slice(&repo.ok(&["snapshots", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["time"].as_str().unwrap().to_string(),
                    s["streams"][0]["sha256"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

fn small_packs(repo: Repo) -> Repo {
    repo.ok(&[
        "init",
        "--pack-size",
        "262144",
        "--chunk-sizes",
        "16384,65536,262144",
    ]);
    repo
}

/// A tree and two streams copied round trip: same content, metadata, times and digests, under
/// keys of its own; copying again uploads nothing; a new snapshot sharing most data uploads
/// only what is new.
fn round_trip(src: &Repo, dst: &Repo) {
    let tree = src.path().join("tree");
    sample_tree(&tree, 5);
    let marker = b"KLUIS-COPY-PLAINTEXT-MARKER-4711";
    let mut db = dump_like(6, 3 << 20);
    db.extend_from_slice(marker);
    let tree_id = src.backup_paths(&["--host", "web1"], &[&tree]);
    let db_id = src.backup_stdin("db", &db);

    let first = copy(src, dst, &["--latest"]);
    assert_eq!(first["copied"].as_array().unwrap().len(), 2, "{first}");
    let before = listed(src);
    let after = listed(dst);
    assert_eq!(after.len(), 2);
    // Same names, times and digests; new ids.
    let mut a: Vec<_> = before.values().cloned().collect();
    let mut b: Vec<_> = after.values().cloned().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert!(!after.contains_key(&tree_id) && !after.contains_key(&db_id));
    let v: serde_json::Value = serde_json::from_slice(&dst.ok(&["snapshots", "--json"])).unwrap();
    for s in v.as_array().unwrap() {
        let origin = &s["origin"]["snapshot"];
        assert!(
            origin == tree_id.as_str() || origin == db_id.as_str(),
            "{s}"
        );
        if s["name"] == "tree" {
            assert_eq!(s["host"], "web1");
        }
    }

    assert_eq!(
        dst.ok(&["restore", "latest", "--name", "db", "--stdout"]),
        db
    );
    let out = dst.path().join("restored");
    dst.ok(&[
        "restore",
        "latest",
        "--name",
        "tree",
        "--target",
        out.to_str().unwrap(),
    ]);
    assert_same_tree(&tree, &out.join("tree"));
    dst.ok(&["check", "--read-data"]);

    // Separate keys: the source's key does not open the copy, nor the other way round.
    let mut wrong = dst.command(&["snapshots"]);
    wrong.env("KLUIS_KEY_FILE", &src.key_file);
    assert_code(&wrong.output().unwrap(), 12, "source key on the copy");

    // Again: nothing to do.
    let again = copy(src, dst, &["--latest"]);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["already_copied"].as_array().unwrap().len(), 2);

    // A new night: most of the dump is unchanged; only the change travels.
    let mut next = db.clone();
    next.extend_from_slice(&random_bytes(7, 200_000));
    src.backup_stdin("db", &next);
    let third = copy(src, dst, &["--latest", "--name", "db"]);
    let full = uploaded(&first);
    let delta = uploaded(&third);
    assert!(
        delta > 0 && delta * 5 < full,
        "the second night uploaded {delta} bytes of {full}"
    );
    assert_eq!(
        dst.ok(&["restore", "latest", "--name", "db", "--stdout"]),
        next
    );
}

#[test]
fn copy_between_file_repositories_round_trips_under_separate_keys() {
    let src = Repo::init_file(&[]);
    let dst = Repo::init_file(&[]);
    round_trip(&src, &dst);
    // Nothing in the copy is plaintext.
    let marker = b"KLUIS-COPY-PLAINTEXT-MARKER-4711";
    for (name, path) in dst.objects() {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "{name} holds plaintext"
        );
    }
}

#[test]
fn copy_to_a_garage_bucket_round_trips() {
    let garage = Garage::start();
    let src = Repo::init_file(&[]);
    let dst = garage.repo("foreign");
    dst.ok(&["init"]);
    round_trip(&src, &dst);
}

#[test]
fn copy_selection_errors_and_dry_run() {
    let src = Repo::init_file(&[]);
    let dst = Repo::init_file(&[]);
    let a = src.backup_stdin("a", b"first");
    src.backup_stdin("a", b"second");
    let b = src.backup_stdin("b", b"other");

    // A dry run copies nothing.
    let dry = copy(&src, &dst, &["--dry-run"]);
    assert_eq!(dry["would_copy"].as_array().unwrap().len(), 3, "{dry}");
    assert!(listed(&dst).is_empty());

    // One snapshot by id prefix.
    let one = copy(&src, &dst, &[&a[..8]]);
    assert_eq!(one["copied"][0]["source"], a.as_str());
    assert_eq!(dst.restore_stdout("latest"), b"first");

    // By name: the newest of it only.
    copy(&src, &dst, &["--latest", "--name", "b"]);
    let names: Vec<String> = listed(&dst).values().map(|v| v.0.clone()).collect();
    assert_eq!(names.iter().filter(|n| *n == "b").count(), 1);

    // Everything left: only the one not copied yet.
    let rest = copy(&src, &dst, &[]);
    assert_eq!(rest["copied"].as_array().unwrap().len(), 1, "{rest}");
    assert_eq!(rest["already_copied"].as_array().unwrap().len(), 2);
    assert!(
        rest["already_copied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == b.as_str())
    );

    // The same repository, a missing destination password, a wrong one.
    let out = copy_cmd(&src, &src, &[]).output().unwrap();
    let err = assert_code(&out, 2, "copy to itself");
    assert!(err.contains("same repository"), "{err}");
    let out = src.command(&["copy", "--to", &dst.url]).output().unwrap();
    let err = assert_code(&out, 2, "no destination password");
    assert!(err.contains("no password for the destination"), "{err}");
    let mut wrong = copy_cmd(&src, &dst, &[]);
    wrong.env("KLUIS_TO_KEY_FILE", &src.key_file);
    assert_code(&wrong.output().unwrap(), 12, "wrong destination key");
    let out = copy_cmd(&src, &dst, &["nosuchid"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn a_corrupt_source_fails_the_copy_and_commits_nothing() {
    let src = Repo::init_file(&[]);
    let dst = Repo::init_file(&[]);
    let data = random_bytes(8, 2 << 20);
    src.backup_stdin("db", &data);
    // Damage the source's data pack in the middle of a blob.
    let (name, path) = src
        .objects()
        .into_iter()
        .find(|(n, p)| n.starts_with("data/") && std::fs::metadata(p).unwrap().len() > 1 << 20)
        .expect("a data pack");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1 << 20] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let out = copy_cmd(&src, &dst, &[]).output().unwrap();
    let err = assert_code(&out, 13, "copy of a corrupt snapshot");
    let pack = name.rsplit('/').next().unwrap();
    assert!(err.contains(&pack[..16]), "the error names {pack}: {err}");
    assert!(listed(&dst).is_empty());
    dst.ok(&["check"]);
}

/// Starts a copy and SIGKILLs it after `delay`; returns whether it exited 0 before.
fn copy_killed_after(src: &Repo, dst: &Repo, args: &[&str], delay: Duration) -> bool {
    let mut child = copy_cmd(src, dst, args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + delay;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().unwrap().success();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn an_interrupted_copy_leaves_no_snapshot_and_resumes() {
    let src = small_packs(Repo::file());
    let dst = small_packs(Repo::file());
    let data = random_bytes(9, 48 << 20);
    src.backup_stdin("big", &data);
    // Kill the copy once it has written an index segment (a checkpoint) but before it commits.
    let mut child = copy_cmd(&src, &dst, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let segments = || {
        dst.objects()
            .iter()
            .filter(|(n, _)| n.starts_with("index/"))
            .count()
    };
    let started = Instant::now();
    while segments() == 0 && started.elapsed() < Duration::from_secs(60) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before its first checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(segments() > 0);
    assert!(listed(&dst).is_empty(), "a killed copy left a snapshot");
    dst.ok(&["check"]);

    let stored_before = dst.stored_bytes();
    let resumed = copy(&src, &dst, &[]);
    let total = dst.stored_bytes();
    let second = uploaded(&resumed);
    assert!(
        stored_before > 0 && second < total - stored_before / 2,
        "the resumed copy uploaded {second} bytes; {stored_before} were there before"
    );
    assert_eq!(dst.restore_stdout("latest"), data);
    dst.ok(&["check", "--read-data"]);
}

/// Kills that must land before the copy completes.
const KILLS: u32 = 50;
const MAX_RUNS: u64 = 150;

#[test]
fn sigkill_copy_at_random_points_loses_nothing_committed() {
    let src = small_packs(Repo::file());
    let dst = small_packs(Repo::file());
    let shared = dump_like(77, 1 << 20);
    let input = |i: u64| {
        let mut v = shared.clone();
        v.extend_from_slice(&dump_like(500 + i, 1 << 20));
        v.extend_from_slice(&random_bytes(600 + i, 3 << 20));
        v
    };
    let packs = || {
        dst.objects()
            .iter()
            .filter(|(n, _)| n.starts_with("data/"))
            .count()
    };
    // sha256 -> source name of what the destination must hold.
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    src.backup_stdin("run-0", &input(0));
    let started = Instant::now();
    copy(&src, &dst, &[]);
    let full = started.elapsed();
    expected.insert("run-0".into(), sha256(&input(0)));

    let delays = random_bytes(4343, MAX_RUNS as usize * 4);
    let (mut killed, mut completed, mut runs, mut midway) = (0, 0, 0, 0);
    for i in 1..=MAX_RUNS {
        if killed >= KILLS {
            break;
        }
        runs = i;
        let name = format!("run-{i}");
        src.backup_stdin(&name, &input(i));
        let frac = u32::from_le_bytes(delays[(i as usize - 1) * 4..][..4].try_into().unwrap());
        let delay = full.mul_f64(1.2 * f64::from(frac) / f64::from(u32::MAX));
        let packs_before = packs();
        let ok = copy_killed_after(&src, &dst, &["--latest", "--name", &name], delay);
        if ok {
            completed += 1;
        } else {
            killed += 1;
        }
        let held = listed(&dst);
        if held.values().any(|(n, _, _)| *n == name) {
            expected.insert(name.clone(), sha256(&input(i)));
        } else {
            assert!(
                !ok,
                "{name}: the copy exited 0 but the snapshot is not there"
            );
            if packs() > packs_before {
                midway += 1;
            }
        }
        let out = dst.run(&["check"]);
        assert_success(&out, &["check after kill", &name]);
        assert_eq!(held.len(), expected.len(), "after {name}: {held:?}");
        for (id, (sname, _, sha)) in &held {
            assert_eq!(
                Some(sha),
                expected.get(sname),
                "{sname} records a wrong digest"
            );
            assert_eq!(
                &sha256(&dst.restore_stdout(id)),
                sha,
                "{sname} ({id}) restores different bytes"
            );
        }
    }
    eprintln!(
        "{killed} copies killed ({midway} after uploading some packs), {completed} completed (full copy {full:?})"
    );
    assert!(
        killed >= KILLS,
        "only {killed} of {runs} kills landed before completion"
    );
    assert!(
        midway >= KILLS / 4,
        "only {midway} kills landed while the copy uploaded"
    );
    // The next copy brings over everything the killed ones did not.
    let rest = copy(&src, &dst, &[]);
    assert_eq!(listed(&dst).len(), listed(&src).len(), "{rest}");
    assert_success(&dst.run(&["check", "--read-data"]), &["check --read-data"]);
}

#[test]
fn an_interrupted_copy_stops_promptly_and_commits_nothing() {
    let src = small_packs(Repo::file());
    let dst = small_packs(Repo::file());
    src.backup_stdin("big", &random_bytes(10, 64 << 20));
    let mut child = copy_cmd(&src, &dst, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt it mid-way, while the source walk waits for the pipeline.
    let started = Instant::now();
    while !dst.objects().iter().any(|(n, _)| n.starts_with("index/")) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended too soon"
        );
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stopping.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the copy did not stop within 20 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    assert!(listed(&dst).is_empty());
    dst.ok(&["check"]);
}
