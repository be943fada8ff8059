//! Tampering: flip one byte of each object of each type; `check --read-data` and `restore` must
//! fail with the corrupt-data exit code and name the object, never return wrong data, never
//! panic. A restore that does not read the damaged object succeeds with the right data.

mod common;

use std::fs;
use std::process::Command;

use common::*;

/// Object kind of a repository-relative name.
fn kind(name: &str) -> &str {
    name.split('/').next().unwrap()
}

#[test]
fn flipping_any_byte_of_any_object_is_detected_and_named() {
    // Small packs so the repository has several of each kind.
    let base = Repo::init_file(&[
        "--pack-size",
        "262144",
        "--chunk-sizes",
        "16384,65536,262144",
    ]);
    let stream = dump_like(11, 1 << 20);
    let stream_id = base.backup_stdin("db", &stream);
    let src = base.path().join("src");
    sample_tree(&src, 12);
    let tree_id = base.backup_paths(&[], &[&src]);

    let objects = base.objects();
    for k in ["config", "keys", "epochs", "data", "index", "snapshots"] {
        assert!(
            objects.iter().any(|(n, _)| kind(n) == k),
            "no {k} object in {objects:?}"
        );
    }

    let mut cases = 0;
    for (name, path) in &objects {
        let len = fs::metadata(path).unwrap().len() as usize;
        // A byte in the header (past magic and version), one in the middle, and the last.
        for pos in [10, len / 2, len - 1] {
            cases += 1;
            let what = format!("{name} byte {pos} of {len}");
            let work = tempfile::TempDir::new().unwrap();
            let copy = work.path().join("repo");
            let st = Command::new("cp")
                .arg("-a")
                .arg(base.root())
                .arg(&copy)
                .status()
                .unwrap();
            assert!(st.success());
            let target = copy.join(name);
            let mut bytes = fs::read(&target).unwrap();
            bytes[pos] ^= 0x01;
            fs::write(&target, bytes).unwrap();
            let run = |args: &[&str]| {
                base.command(args)
                    .env("KLUIS_REPOSITORY", &copy)
                    .output()
                    .unwrap()
            };

            let out = run(&["check", "--read-data"]);
            let err = assert_code(&out, EXIT_CORRUPT, &format!("check --read-data, {what}"));
            let all = format!("{}{err}", text(&out.stdout));
            assert!(
                all.contains(name.as_str()),
                "check --read-data does not name {what}:\n{all}"
            );
            // Damage inside a pack's blobs also names the snapshot that needs them.
            if kind(name) == "data" && pos == len / 2 {
                let named = [&stream_id, &tree_id]
                    .iter()
                    .any(|id| all.contains(&format!("affects snapshot {}", &id[..8])));
                assert!(named, "check --read-data names no snapshot, {what}:\n{all}");
            }

            // Without --read-data, check still reads every object except pack contents.
            if kind(name) != "data" {
                let out = run(&["check"]);
                let err = assert_code(&out, EXIT_CORRUPT, &format!("check, {what}"));
                let all = format!("{}{err}", text(&out.stdout));
                assert!(
                    all.contains(name.as_str()),
                    "check does not name {what}:\n{all}"
                );
            }

            // Restores either fail naming the object, or return exactly the original data.
            let mut failures = 0;
            let out = run(&["restore", &stream_id, "--stdout", "--quiet"]);
            if out.status.success() {
                assert!(out.stdout == stream, "restore returned wrong data, {what}");
            } else {
                let err = assert_code(&out, EXIT_CORRUPT, &format!("restore stream, {what}"));
                assert!(
                    err.contains(name.as_str()),
                    "restore does not name {what}: {err}"
                );
                failures += 1;
            }
            let dir = work.path().join("restored");
            let out = run(&[
                "restore",
                &tree_id,
                "--target",
                dir.to_str().unwrap(),
                "--quiet",
            ]);
            if out.status.success() {
                assert_same_tree(&src, &dir.join("src"));
            } else {
                let err = assert_code(&out, EXIT_CORRUPT, &format!("restore tree, {what}"));
                assert!(
                    err.contains(name.as_str()),
                    "restore does not name {what}: {err}"
                );
                failures += 1;
            }
            // Damage to the config or a key stops both restores; damage to a snapshot, an index
            // segment or any part of a pack (its header, a blob, its table of contents) stops
            // at least the restore that reads from it.
            if matches!(kind(name), "config" | "keys" | "epochs") {
                assert_eq!(failures, 2, "a restore ignored damage to {what}");
            } else {
                assert!(failures >= 1, "no restore noticed damage to {what}");
            }
        }
    }
    assert!(cases >= 30, "only {cases} cases");
}

#[test]
fn truncated_and_missing_objects_are_named() {
    let base = Repo::init_file(&[
        "--pack-size",
        "262144",
        "--chunk-sizes",
        "16384,65536,262144",
    ]);
    let stream = dump_like(21, 1 << 20);
    let id = base.backup_stdin("db", &stream);
    let objects = base.objects();
    let pack = &objects.iter().find(|(n, _)| kind(n) == "data").unwrap().0;
    let index = &objects.iter().find(|(n, _)| kind(n) == "index").unwrap().0;
    for (name, how) in [(pack, "truncate"), (pack, "remove"), (index, "truncate")] {
        let work = tempfile::TempDir::new().unwrap();
        let copy = work.path().join("repo");
        let st = Command::new("cp")
            .arg("-a")
            .arg(base.root())
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success());
        let target = copy.join(name);
        if how == "remove" {
            fs::remove_file(&target).unwrap();
        } else {
            let bytes = fs::read(&target).unwrap();
            fs::write(&target, &bytes[..bytes.len() / 3]).unwrap();
        }
        let run = |args: &[&str]| {
            base.command(args)
                .env("KLUIS_REPOSITORY", &copy)
                .output()
                .unwrap()
        };
        let what = format!("{how} {name}");
        let out = run(&["check"]);
        let err = assert_code(&out, EXIT_CORRUPT, &format!("check after {what}"));
        let all = format!("{}{err}", text(&out.stdout));
        assert!(
            all.contains(name.as_str()),
            "check does not name {what}:\n{all}"
        );
        let out = run(&["restore", &id, "--stdout", "--quiet"]);
        let err = assert_code(&out, EXIT_CORRUPT, &format!("restore after {what}"));
        assert!(
            err.contains(name.as_str()),
            "restore does not name {what}: {err}"
        );
    }
}
