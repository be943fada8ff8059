//! The audit trail (issue 20): restores, key changes, forget, prune and erasure leave
//! hash-chained records in the repository and one structured line on stderr; `kluis audit`
//! lists them and reports a record removed (from the middle, or the newest this host wrote) or
//! altered. No record holds a secret.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::*;

fn trail(repo: &Repo) -> (i32, serde_json::Value) {
    let out = repo.run(&["audit", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stderr)));
    (out.status.code().unwrap(), v)
}

fn kinds(v: &serde_json::Value) -> Vec<String> {
    v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect()
}

/// The audit records' files, oldest first (file:// only).
fn record_files(repo: &Repo) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = fs::read_dir(repo.root().join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().contains('#'))
        .collect();
    files.sort();
    files
}

#[test]
fn operations_leave_a_verified_chain_and_a_broken_one_is_reported() {
    let repo = Repo::init_file(&[]);
    let data = dump_like(3, 40_000);
    let id = repo.backup_stdin("db", &data);
    let newer = repo.backup_stdin("db", &dump_like(4, 10_000));

    // A restore: its record on stderr as one JSON line, and in the repository.
    let out = repo.run(&["restore", &id, "--stdout", "--quiet"]);
    assert_success(&out, &["restore"]);
    let err = text(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("audit: "))
        .unwrap_or_else(|| panic!("no audit line in {err}"));
    let logged: serde_json::Value = serde_json::from_str(&line["audit: ".len()..]).unwrap();
    assert_eq!(logged["kind"], "restore");
    assert_eq!(logged["subject"], id.as_str());
    assert_eq!(logged["detail"]["target"], "standard output");
    // A restore that fails is recorded with its failure.
    let target = repo.path().join("target");
    fs::create_dir_all(target.join("stdin")).unwrap();
    fs::write(target.join("stdin").join("x"), b"x").unwrap();
    let out = repo.run(&["restore", &id, "--target", target.to_str().unwrap()]);
    let failed_restore = !out.status.success();
    // Key changes: a slot added and removed.
    let pw = repo.path().join("pw");
    fs::write(&pw, "a secret that must not leak\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    repo.ok(&[
        "key",
        "add",
        "--new-password-file",
        pw.to_str().unwrap(),
        "--label",
        "temp",
    ]);
    let slots: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["key", "list", "--json"])).unwrap();
    let temp = slots
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == "temp")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    repo.ok(&["key", "remove", &temp[..8]]);
    // Forget, prune, rotate.
    repo.ok(&["forget", "--keep-last", "1"]);
    repo.ok(&["prune", "--grace", "0s", "--unsafe-short-grace"]);
    repo.ok(&["key", "rotate"]);

    let (code, v) = trail(&repo);
    assert_eq!(code, 0, "{v}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    let mut expected = vec!["restore"];
    if failed_restore {
        expected.push("restore");
    }
    expected.extend(["key-add", "key-remove", "forget", "prune", "key-rotate"]);
    assert_eq!(kinds(&v), expected, "{v}");
    let records = v["records"].as_array().unwrap();
    if failed_restore {
        assert!(
            records[1]["result"]
                .as_str()
                .unwrap()
                .starts_with("failed: ")
        );
    }
    for r in records {
        assert!(r["user"].is_string() && r["host"].is_string(), "{r}");
    }
    // The forget named what it removed: the older snapshot (keep-last 1 keeps the newer).
    let forget = records.iter().find(|r| r["kind"] == "forget").unwrap();
    assert!(
        forget["subject"].as_str().unwrap().contains(&id[..8]),
        "{forget}"
    );
    assert!(!forget["subject"].as_str().unwrap().contains(&newer[..8]));
    // No secret in any record: not the password, not the key file.
    let all = v.to_string();
    let key = fs::read_to_string(&repo.key_file).unwrap();
    let key_hex = key.trim().rsplit(':').next().unwrap();
    assert!(!all.contains("must not leak") && !all.contains(key_hex));
    // The slot in use shows its last use (the rotation, the newest record).
    let slots: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["key", "list", "--json"])).unwrap();
    let current = slots
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] == true)
        .unwrap();
    assert_eq!(
        current["last_used"],
        records.last().unwrap()["time"],
        "{slots}"
    );
    // --kind and --since filter.
    let out = repo.ok(&["audit", "--json", "--kind", "key-add"]);
    let only: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(kinds(&only), ["key-add"]);

    // A record removed from the middle: its successor says so.
    let files = record_files(&repo);
    assert_eq!(files.len(), expected.len());
    fs::remove_file(&files[0]).unwrap();
    let (code, v) = trail(&repo);
    assert_eq!(code, EXIT_CORRUPT, "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains("is gone or altered"), "{problems}");
    // This host remembers what it wrote: the missing one is named too.
    assert!(
        problems.contains("written by this host, and gone"),
        "{problems}"
    );

    // The newest removed: only this host's memory can tell, and does.
    let repo2 = Repo::init_file(&[]);
    let id2 = repo2.backup_stdin("db", &data);
    repo2.ok(&["restore", &id2, "--stdout", "--quiet"]);
    repo2.ok(&["restore", &id2, "--stdout", "--quiet"]);
    let files = record_files(&repo2);
    fs::remove_file(files.last().unwrap()).unwrap();
    let (code, v) = trail(&repo2);
    assert_eq!(code, EXIT_CORRUPT, "{v}");
    assert!(
        v["problems"]
            .to_string()
            .contains("written by this host, and gone")
    );

    // A record altered in place: it no longer opens.
    let files = record_files(&repo2);
    let mut bytes = fs::read(&files[0]).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    fs::write(&files[0], bytes).unwrap();
    let (code, v) = trail(&repo2);
    assert_eq!(code, EXIT_CORRUPT);
    assert!(
        v["problems"]
            .to_string()
            .contains(files[0].file_name().unwrap().to_str().unwrap())
    );
}
