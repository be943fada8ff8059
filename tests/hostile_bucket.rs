//! Someone who can write to the bucket but holds no key (issue 18, defect 6) can delete
//! things, which kluis must notice, but must not be able to stop kluis or make it hang or run
//! out of memory with objects it plants.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// Runs `cmd`, killing it if it takes longer than `limit` (a hang is the failure).
fn within(mut cmd: Command, limit: Duration, what: &str) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} still running after {limit:?}");
        }
    }
}

fn epoch_dir(repo: &Repo, prefix: &str) -> std::path::PathBuf {
    fs::read_dir(repo.root().join(prefix))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

/// One junk object under `epochs/` (named like a key, the smallest id) stopped every backup of
/// that month. Now it is skipped and reported.
#[test]
fn junk_among_the_epoch_keys_does_not_stop_backups() {
    let repo = Repo::init_file(&[]);
    let a = dump_like(1, 200_000);
    let a_id = repo.backup_stdin("a", &a);
    // Named like a key of the key generation in use (`<id>.<generation>`).
    let dir = epoch_dir(&repo, "epochs");
    let key = fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let generation = key.to_str().unwrap().split_once('.').unwrap().1.to_string();
    let junk = dir.join(format!("00000000000000000000000000000000.{generation}"));
    fs::write(&junk, b"planted").unwrap();
    let b = dump_like(2, 200_000);
    let out = repo.run_stdin(&["backup", "--stdin", "--name", "b", "--json"], &b);
    assert_success(&out, &["backup", "with junk under epochs/"]);
    let err = text(&out.stderr);
    assert!(err.contains("00000000000000000000000000000000"), "{err}");
    let b_id = snapshot_id(&out.stdout);
    assert!(repo.restore_stdout(&a_id) == a);
    assert!(repo.restore_stdout(&b_id) == b);
}

/// A key slot planted with enormous Argon2 parameters made unlocking hang, and one with
/// parameters Argon2 refuses stopped the slots after it from being tried.
#[test]
fn planted_key_slots_neither_hang_nor_block_unlocking() {
    let repo = Repo::init_file(&[]);
    let id = repo.backup_stdin("db", &dump_like(3, 50_000));
    let pw = repo.path().join("pw");
    fs::write(&pw, "correct horse battery staple\n").unwrap();
    fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    repo.ok(&["key", "add", "--new-password-file", pw.to_str().unwrap()]);

    // Copy the passphrase slot's metadata into slots with the smallest ids (listed first),
    // with hostile parameters and a valid checksum: no key needed to write them.
    let slot_path = repo
        .objects()
        .into_iter()
        .filter(|(n, _)| n.starts_with("keys/"))
        .map(|(_, p)| p)
        .find(|p| {
            let b = fs::read(p).unwrap();
            String::from_utf8_lossy(&b).contains("\"passphrase\"")
        })
        .expect("a passphrase slot");
    let bytes = fs::read(&slot_path).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&bytes[24..bytes.len() - 32]).unwrap();
    for (n, (memory, iterations, parallelism)) in [
        (65536u64, 4_000_000_000u64, 1u64), // hours of work
        (65536, 3, 0),                      // refused by Argon2
        (4 << 20, 10, 1),                   // 4 GiB, ten passes
    ]
    .into_iter()
    .enumerate()
    {
        let slot_id = format!("{:032x}", n);
        let mut j = json.clone();
        j["id"] = slot_id.clone().into();
        j["kdf"] = serde_json::json!({
            "memory_kib": memory, "iterations": iterations, "parallelism": parallelism
        });
        let mut planted = bytes[..24].to_vec();
        hex::decode_to_slice(&slot_id, &mut planted[8..24]).unwrap();
        planted.extend_from_slice(&serde_json::to_vec(&j).unwrap());
        let sum = sha256(&planted);
        planted.extend_from_slice(&sum);
        fs::write(repo.root().join("keys").join(&slot_id), planted).unwrap();
    }
    let mut cmd = repo.command(&["restore", &id, "--stdout", "--quiet"]);
    cmd.env_remove("KLUIS_KEY_FILE")
        .env("KLUIS_PASSWORD_FILE", &pw);
    let out = within(cmd, Duration::from_secs(60), "unlocking past planted slots");
    assert_success(&out, &["restore with a passphrase past planted slots"]);
    // The key file still opens it, and `key list` names the bad slots.
    let out = repo.run(&["key", "list"]);
    assert_success(&out, &["key", "list"]);
}

/// Whole-object reads had no size cap: a planted huge object exhausted memory. A sparse
/// 32 GiB file costs no disk; reading it would fill memory.
#[test]
fn a_planted_huge_object_is_refused_unread() {
    let repo = Repo::init_file(&[]);
    let data = dump_like(4, 100_000);
    let id = repo.backup_stdin("db", &data);
    let mut planted = Vec::new();
    for prefix in ["snapshots", "index"] {
        let path = epoch_dir(&repo, prefix).join("ffffffffffffffffffffffffffffffff");
        let f = fs::File::create(&path).unwrap();
        f.set_len(32 << 30).unwrap();
        planted.push(path);
    }
    let out = within(
        repo.command(&["snapshots"]),
        Duration::from_secs(60),
        "listing past a huge manifest",
    );
    let listed = text(&out.stdout);
    assert!(listed.contains(&id[..8]), "{listed}");
    let err = text(&out.stderr);
    assert!(
        err.contains("ffffffffffffffffffffffffffffffff") && err.contains("the format allows"),
        "{err}"
    );
    // A restore and a backup of the same month read the index: the huge segment is skipped.
    let out = within(
        repo.command(&["restore", &id, "--stdout", "--quiet"]),
        Duration::from_secs(60),
        "a restore past a huge index segment",
    );
    assert!(out.stdout == data, "{}", text(&out.stderr));
    let out = repo.run_stdin(&["backup", "--stdin", "--name", "db2"], &data);
    assert_success(&out, &["backup past a huge index segment"]);
    for p in planted {
        assert!(Path::new(&p).exists());
    }
}

fn manifest_of(repo: &Repo, id: &str) -> std::path::PathBuf {
    repo.objects()
        .into_iter()
        .find(|(n, _)| n.starts_with("snapshots/") && n.ends_with(id))
        .unwrap_or_else(|| panic!("no manifest of {id}"))
        .1
}

fn check(repo: &Repo) -> (i32, String) {
    let out = repo.run(&["check"]);
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// Deleting a snapshot manifest went unnoticed. Each snapshot names the one this host wrote
/// before it: a gap in the chain is found by `check` on any host.
#[test]
fn a_deleted_snapshot_is_noticed() {
    let repo = Repo::init_file(&[]);
    let _a = repo.backup_stdin("db", &dump_like(10, 20_000));
    let b = repo.backup_stdin("db", &dump_like(11, 20_000));
    let _c = repo.backup_stdin("db", &dump_like(12, 20_000));
    assert_eq!(check(&repo).0, 0);
    fs::remove_file(manifest_of(&repo, &b)).unwrap();
    let (code, out) = check(&repo);
    assert_eq!(code, EXIT_CORRUPT, "{out}");
    assert!(
        out.contains(&b) && out.contains("gone without a forget record"),
        "{out}"
    );
    // Another host (no state of its own) sees the gap in the chain too.
    let elsewhere = repo
        .command(&["check"])
        .env("KLUIS_STATE_DIR", repo.path().join("other-host"))
        .output()
        .unwrap();
    assert_code(&elsewhere, EXIT_CORRUPT, "check on another host");
    // Once looked into, it can be accepted: a forget record names it, for every host.
    let out = repo.run(&["check", "--acknowledge"]);
    assert_success(&out, &["check", "--acknowledge"]);
    assert!(
        text(&out.stdout).contains("acknowledged"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(check(&repo).0, 0);
}

/// The newest records deleted, or the whole bucket put back to an older state: no chain shows
/// it, but the host that saw them does.
#[test]
fn a_rollback_of_the_bucket_is_noticed_by_the_host_that_saw_it() {
    let repo = Repo::init_file(&[]);
    repo.backup_stdin("db", &dump_like(13, 20_000));
    let before = repo.path().join("before");
    copy_dir(&repo.root(), &before);
    let b = repo.backup_stdin("db", &dump_like(14, 20_000));
    assert_eq!(check(&repo).0, 0);
    fs::remove_dir_all(repo.root()).unwrap();
    copy_dir(&before, &repo.root());
    let (code, out) = check(&repo);
    assert_eq!(code, EXIT_CORRUPT, "{out}");
    assert!(
        out.contains(&b) && out.contains("this host saw it"),
        "{out}"
    );
    // It keeps saying so until someone accepts it.
    assert_eq!(check(&repo).0, EXIT_CORRUPT);
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A forgotten manifest put back (its ciphertext kept from before) went unnoticed, and once its
/// data was swept it would stop every prune. A forget record now names it: check reports the
/// replay, prune ignores it and deletes it.
#[test]
fn a_replayed_forgotten_snapshot_is_noticed_and_pruned() {
    let repo = Repo::init_file(&[]);
    let a = repo.backup_stdin("a", &random_bytes(15, 300_000));
    let b = repo.backup_stdin("b", &random_bytes(16, 300_000));
    let a_path = manifest_of(&repo, &a);
    let kept = fs::read(&a_path).unwrap();
    repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);
    let prune = |repo: &Repo| -> serde_json::Value {
        let out = repo.ok(&["prune", "--grace", "0s", "--unsafe-short-grace", "--json"]);
        serde_json::from_slice(&out).unwrap()
    };
    prune(&repo);
    let swept = prune(&repo);
    assert!(swept["packs_deleted"].as_u64().unwrap() > 0, "{swept}");
    assert_eq!(check(&repo).0, 0);

    fs::write(&a_path, kept).unwrap();
    let (code, out) = check(&repo);
    assert_eq!(code, EXIT_CORRUPT, "{out}");
    assert!(out.contains(&a) && out.contains("present again"), "{out}");
    let report = prune(&repo);
    assert_eq!(report["forgotten_deleted"], 1, "{report}");
    assert!(!a_path.exists());
    assert_eq!(check(&repo).0, 0);
    assert!(repo.restore_stdout(&b) == random_bytes(16, 300_000));
}

/// `init = true` re-created a repository whose config vanished (and with it every key slot),
/// silently, over the old data. Now the host refuses.
#[test]
fn init_never_recreates_a_repository_whose_config_vanished() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("kluisd.toml");
    fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\n\
             [repositories.local]\nurl = \"{{state_dir}}/repository\"\n\
             key_file = \"{{state_dir}}/repository.key\"\ninit = true\n\n\
             [jobs.hello]\nrepository = \"local\"\ncommand = \"echo hello\"\n\
             schedule = \"every 1h\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let job = || {
        Command::new(KLUIS)
            .args(["backup", "--job", "hello", "--config"])
            .arg(&config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap()
    };
    assert_success(&job(), &["backup", "--job", "hello"]);
    let repository = dir.path().join("state/repository");
    // The config and the key slots deleted: the data is still there.
    fs::remove_file(repository.join("config")).unwrap();
    fs::remove_dir_all(repository.join("keys")).unwrap();
    let out = job();
    let err = assert_code(
        &out,
        EXIT_USAGE,
        "a job over a repository whose config is gone",
    );
    assert!(err.contains("config is gone"), "{err}");
    // Everything deleted: this host still knows a repository was there.
    for e in fs::read_dir(&repository).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
    let out = job();
    let err = assert_code(&out, EXIT_USAGE, "a job over an emptied repository");
    assert!(err.contains("this host used repository"), "{err}");
}
