//! Key management (issue 20): changing a slot's secret, rotating the key generation on a local
//! directory and on Garage, and SIGKILL during a rotation at random points (the old or the
//! new generation opens the repository, never neither).

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::time::Instant;

use common::databases::{password_file, snapshot_ids};
use common::*;

/// Backs up one small stream per month, from `first` on; returns (id, content) of each.
fn monthly(repo: &Repo, months: u32) -> Vec<(String, Vec<u8>)> {
    (0..months)
        .map(|i| {
            let data = dump_like(u64::from(i) + 10, 20_000);
            let (y, m) = (2025 + i / 12, i % 12 + 1);
            let time = format!("{y}-{m:02}-10T12:00:00Z");
            let out = repo.run_stdin(
                &[
                    "backup", "--stdin", "--name", "db", "--time", &time, "--json",
                ],
                &data,
            );
            assert_success(&out, &["backup", &time]);
            (snapshot_id(&out.stdout), data)
        })
        .collect()
}

/// The epoch key objects' names (file:// only).
fn epoch_key_objects(repo: &Repo) -> Vec<String> {
    let mut names = Vec::new();
    for month in fs::read_dir(repo.root().join("epochs")).unwrap() {
        for key in fs::read_dir(month.unwrap().path()).unwrap() {
            let name = key.unwrap().file_name().to_string_lossy().into_owned();
            // object_store's staging file of a put that was killed (`NAME#N`): not an object.
            if !name.contains('#') {
                names.push(name);
            }
        }
    }
    names.sort();
    names
}

fn key_list(repo: &Repo) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["key", "list", "--json"])).unwrap();
    v.as_array().unwrap().clone()
}

fn check_json(repo: &Repo) -> serde_json::Value {
    serde_json::from_slice(&repo.ok(&["check", "--json"])).unwrap()
}

/// Rotates with the key file in use and a kept password; the dropped password, the kept one
/// and the data, checked on any store.
fn rotates(repo: &Repo) {
    let made = monthly(repo, 3);
    let kept = password_file(repo, "kept secret");
    let dropped = password_file(repo, "dropped secret");
    repo.ok(&["key", "add", "--new-password-file", kept.to_str().unwrap()]);
    repo.ok(&[
        "key",
        "add",
        "--new-password-file",
        dropped.to_str().unwrap(),
        "--label",
        "leaver",
    ]);
    let before = key_list(repo);
    assert_eq!(before.len(), 3);
    let old_generation = before[0]["generation"].as_str().unwrap().to_string();
    assert!(before.iter().all(|s| s["generation"] == *old_generation));
    assert!(before.iter().all(|s| s["user"].is_string()), "{before:?}");

    let out = repo.ok(&[
        "key",
        "rotate",
        "--keep-password-file",
        kept.to_str().unwrap(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["previous"], *old_generation);
    assert_eq!(report["epoch_keys"], 3, "{report}");
    assert_eq!(report["slots"].as_array().unwrap().len(), 2);
    assert_eq!(report["removed_slots"].as_array().unwrap().len(), 3);
    assert_eq!(report["deleted_objects"], 3);
    let generation = report["generation"].as_str().unwrap();
    assert_ne!(generation, old_generation);

    let after = key_list(repo);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().all(|s| s["generation"] == *generation));
    // Every snapshot restores with the key file, and with the kept password.
    for (id, data) in &made {
        let out = repo.run(&["restore", id, "--stdout", "--quiet"]);
        assert_success(&out, &["restore after rotate", id]);
        assert!(out.stdout == *data, "{id}");
    }
    let out = repo.run_with_password(&kept, &["restore", &made[0].0, "--stdout", "--quiet"]);
    assert_success(&out, &["restore with the kept password"]);
    assert!(out.stdout == made[0].1);
    let out = repo.run_with_password(&dropped, &["snapshots"]);
    assert_code(&out, EXIT_WRONG_PASSWORD, "the dropped password");
    let check = check_json(repo);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    assert_eq!(check["old_generation_keys"].as_array().unwrap().len(), 0);
    // New data goes under the new generation.
    let out = repo.run_stdin(
        &["backup", "--stdin", "--name", "db", "--json"],
        &dump_like(99, 10_000),
    );
    assert_success(&out, &["backup after rotate"]);
    // The kept password's holder changes it: the new one opens, the old one no longer.
    let changed = password_file(repo, "changed secret");
    let out = repo.run_with_password(
        &kept,
        &[
            "key",
            "passwd",
            "--new-password-file",
            changed.to_str().unwrap(),
        ],
    );
    assert_success(&out, &["key passwd"]);
    let out = repo.run_with_password(&changed, &["restore", &made[1].0, "--stdout", "--quiet"]);
    assert_success(&out, &["restore with the changed password"]);
    assert!(out.stdout == made[1].1);
    let out = repo.run_with_password(&kept, &["snapshots"]);
    assert_code(&out, EXIT_WRONG_PASSWORD, "the password before passwd");
    assert_eq!(key_list(repo).len(), 2);
}

#[test]
fn rotate_wraps_every_epoch_key_again_and_removes_the_old_generation() {
    let repo = Repo::init_file(&[]);
    rotates(&repo);
    let names = epoch_key_objects(&repo);
    let generation = key_list(&repo)[0]["generation"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(&format!(".{generation}"))),
        "{names:?}"
    );
}

#[test]
fn rotate_on_garage_s3() {
    let garage = Garage::start();
    let repo = garage.repo("keys/rotate");
    repo.ok(&["init"]);
    rotates(&repo);
}

#[test]
fn passwd_replaces_the_slot_in_use_and_keeps_its_label() {
    let repo = Repo::init_file(&[]);
    let data = dump_like(7, 30_000);
    let id = repo.backup_stdin("db", &data);
    let old = password_file(&repo, "old secret");
    let new = password_file(&repo, "new secret");
    repo.ok(&[
        "key",
        "add",
        "--new-password-file",
        old.to_str().unwrap(),
        "--label",
        "on-call",
    ]);
    let out = repo.run_with_password(
        &old,
        &[
            "key",
            "passwd",
            "--new-password-file",
            new.to_str().unwrap(),
        ],
    );
    assert_success(&out, &["key passwd"]);
    assert_code(
        &repo.run_with_password(&old, &["snapshots"]),
        EXIT_WRONG_PASSWORD,
        "the old secret after passwd",
    );
    let out = repo.run_with_password(&new, &["restore", &id, "--stdout", "--quiet"]);
    assert_success(&out, &["restore with the new secret"]);
    assert!(out.stdout == data);
    let slots = key_list(&repo);
    assert_eq!(slots.len(), 2);
    assert!(slots.iter().any(|s| s["label"] == "on-call"), "{slots:?}");
    // The key file's slot is untouched.
    repo.ok(&["snapshots"]);
}

/// SIGKILL at random points of a rotation: after each, the key file still opens the
/// repository (the old generation or the new one), every snapshot is listed, the repository
/// checks clean and restores; a rotation run again completes and leaves no old generation.
#[test]
fn a_rotation_killed_at_any_point_leaves_a_repository_the_key_opens() {
    const KILLS: usize = 20;
    let repo = Repo::init_file(&[]);
    let made = monthly(&repo, 24);
    // The time of one whole rotation, the fastest of three.
    let full = (0..3)
        .map(|_| {
            let started = Instant::now();
            repo.ok(&["key", "rotate"]);
            started.elapsed()
        })
        .min()
        .unwrap();
    kill_at_random(
        KILLS,
        full,
        20,
        || repo.command(&["key", "rotate"]),
        || {},
        |i, delay| {
            let listed = snapshot_ids(&repo);
            assert_eq!(listed.len(), made.len(), "after kill {i} at {delay:?}");
            let check = repo.run(&["check"]);
            assert_success(&check, &["check after a killed rotate"]);
            for (id, data) in [&made[0], &made[made.len() - 1]] {
                let out = repo.run(&["restore", id, "--stdout", "--quiet"]);
                assert_success(&out, &["restore after a killed rotate", id]);
                assert!(out.stdout == *data, "{id} after kill {i}");
            }
        },
    );
    repo.ok(&["key", "rotate"]);
    let check = check_json(&repo);
    assert_eq!(check["old_generation_keys"].as_array().unwrap().len(), 0);
    let names = epoch_key_objects(&repo);
    assert_eq!(names.len(), 24, "{names:?}");
    assert_eq!(key_list(&repo).len(), 1);
}

/// A rotation stopped right after each of its writes in turn (debug builds abort at the N-th
/// write with `KLUIS_TEST_CRASH_AFTER_WRITES=N`), each time from the same repository: the key
/// file and the kept password open it after every stop, the dropped password only while the
/// old generation's slots remain, and every snapshot restores; run again, it completes.
#[test]
fn a_rotation_stopped_after_each_write_leaves_a_repository_both_secrets_open() {
    let repo = Repo::init_file(&[]);
    let made = monthly(&repo, 4);
    let kept = password_file(&repo, "kept secret");
    repo.ok(&["key", "add", "--new-password-file", kept.to_str().unwrap()]);
    let pristine = repo.path().join("pristine");
    copy_tree(&repo.root(), &pristine);
    let mut stops = 0;
    for n in 1..200 {
        copy_tree(&pristine, &repo.root());
        let out = repo
            .command(&[
                "key",
                "rotate",
                "--keep-password-file",
                kept.to_str().unwrap(),
            ])
            .env("KLUIS_TEST_CRASH_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        let finished = out.status.success();
        if !finished {
            assert_eq!(out.status.signal(), Some(6), "{}", text(&out.stderr));
            stops += 1;
        }
        for (secret, name) in [(None, "the key file"), (Some(&kept), "the kept password")] {
            let mut cmd = repo.command(&["restore", &made[1].0, "--stdout", "--quiet"]);
            if let Some(pw) = secret {
                cmd.env_remove("KLUIS_KEY_FILE")
                    .env("KLUIS_PASSWORD_FILE", pw);
            }
            let out = cmd.output().unwrap();
            assert_success(&out, &["restore with", name, "after write", &n.to_string()]);
            assert!(out.stdout == made[1].1);
        }
        assert_eq!(snapshot_ids(&repo).len(), made.len(), "after write {n}");
        assert_success(
            &repo.run(&["check"]),
            &["check after write", &n.to_string()],
        );
        // Run again, it completes and leaves one generation.
        repo.ok(&[
            "key",
            "rotate",
            "--keep-password-file",
            kept.to_str().unwrap(),
        ]);
        let check = check_json(&repo);
        assert_eq!(check["old_generation_keys"].as_array().unwrap().len(), 0);
        for (id, data) in &made {
            let out = repo.run(&["restore", id, "--stdout", "--quiet"]);
            assert_success(&out, &["restore after the second rotate", id]);
            assert!(out.stdout == *data);
        }
        if finished {
            break;
        }
    }
    // A lease, 4 epoch keys, 2 slots, 3 slot deletions, 4 key deletions, the lease's release.
    assert!(stops >= 14, "stopped after {stops} write(s) only");
}
