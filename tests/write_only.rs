//! Write-only key slots (issue 20): a database host that can back up, under epoch keys of its
//! own that only full keys open, and can read, restore, check, forget, prune, copy or change
//! nothing; what it writes survives rotations; on file:// and Garage, from the command line
//! and from kluisd; and a rotation stopped after each of its writes keeps it working.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::databases::kluisd_once;

use common::databases::password_file;
use common::*;

const EXIT_WRITE_ONLY: i32 = 14;

/// A write-only host of `repo`: its key file and state directory.
struct Host {
    key: PathBuf,
    state: PathBuf,
}

impl Host {
    fn add(repo: &Repo, name: &str) -> Host {
        let key = repo.path().join(format!("{name}.key"));
        repo.ok(&["key", "generate", key.to_str().unwrap()]);
        let out = repo.ok(&[
            "key",
            "add",
            "--write-only",
            "--new-key-file",
            key.to_str().unwrap(),
            "--label",
            name,
        ]);
        assert!(
            text(&out).contains("added write-only key slot"),
            "{}",
            text(&out)
        );
        Host {
            key,
            state: repo.path().join(format!("{name}-state")),
        }
    }

    fn command(&self, repo: &Repo, args: &[&str]) -> Command {
        let mut c = repo.command(args);
        c.env("KLUIS_KEY_FILE", &self.key)
            .env("KLUIS_STATE_DIR", &self.state);
        c
    }

    fn run(&self, repo: &Repo, args: &[&str]) -> Output {
        self.command(repo, args).output().unwrap()
    }

    /// Backs up `input` as `name`; the report.
    fn backup(&self, repo: &Repo, name: &str, input: &[u8]) -> serde_json::Value {
        let mut child = self
            .command(repo, &["backup", "--stdin", "--name", name, "--json"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_success(&out, &["write-only backup", name]);
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn id_of(report: &serde_json::Value) -> String {
    report["id"].as_str().unwrap().to_string()
}

/// Epoch key objects of `month` with their sizes.
fn keys_of(repo: &Repo, month: &str) -> Vec<(String, u64)> {
    repo.objects()
        .into_iter()
        .filter(|(n, _)| n.starts_with(&format!("epochs/{month}/")))
        .map(|(n, p)| (n, std::fs::metadata(p).unwrap().len()))
        .collect()
}

/// A full backup in September 2026, then a write-only host.
fn september_then_a_host(repo: &Repo) -> Host {
    let out = repo.run_stdin(
        &[
            "backup",
            "--stdin",
            "--name",
            "old",
            "--time",
            "2026-09-05T10:00:00Z",
        ],
        b"september",
    );
    assert_success(&out, &["old backup"]);
    Host::add(repo, "db1")
}

fn this_month() -> String {
    kluis::object::Epoch::of(jiff::Timestamp::now()).to_string()
}

#[test]
fn a_write_only_key_backs_up_under_its_own_keys_and_can_read_nothing() {
    let repo = Repo::init_file(&SMALL_PACKS);
    let old = dump_like(1, 200_000);
    let out = repo.run_stdin(
        &[
            "backup",
            "--stdin",
            "--name",
            "old",
            "--time",
            "2026-09-05T10:00:00Z",
            "--json",
        ],
        &old,
    );
    assert_success(&out, &["full backup in September"]);
    let old_id = snapshot_id(&out.stdout);
    let full_now = repo.backup_stdin("full", &dump_like(2, 100_000));
    let host = Host::add(&repo, "db1");

    // It backs up; the second backup of the month deduplicates against the first (the key
    // is kept on the host, sealed under its writer key).
    let night1 = dump_like(3, 400_000);
    let mut night2 = night1.clone();
    night2[1000..1100].copy_from_slice(&[b'x'; 100]);
    let first = host.backup(&repo, "db", &night1);
    let second = host.backup(&repo, "db", &night2);
    let new_bytes = second["summary"]["new_bytes"].as_u64().unwrap();
    assert!(
        new_bytes < 100_000,
        "the second night stored {new_bytes} new bytes: {second}"
    );
    // Its key is its own: sealed to the key generation's public key (116 bytes), beside the
    // full hosts' key (84 bytes), which it never uses.
    let mut sizes: Vec<u64> = keys_of(&repo, &this_month())
        .iter()
        .map(|(_, s)| *s)
        .collect();
    sizes.sort();
    assert_eq!(sizes, [84, kluis::repository::SEALED_EPOCH_KEY_LEN as u64]);
    repo.backup_stdin("full", &dump_like(4, 100_000));
    assert_eq!(
        keys_of(&repo, &this_month()).len(),
        2,
        "a full backup uses its own key"
    );
    let kept: Vec<PathBuf> = {
        let mut v = Vec::new();
        walk(&host.state.join("writer-keys"), &mut |p| {
            v.push(p.to_path_buf())
        });
        v
    };
    assert_eq!(kept.len(), 1, "one month's key kept on the host: {kept:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kept[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A full key restores what the write-only host wrote.
    let out = repo.run(&["restore", &id_of(&second), "--stdout", "--quiet"]);
    assert_success(&out, &["full restore of the host's backup"]);
    assert!(out.stdout == night2);
    assert_success(&repo.run(&["check", "--read-data"]), &["check --read-data"]);

    // It lists its own snapshots of the month and nothing else.
    let out = host.run(&repo, &["snapshots", "--json"]);
    assert_success(&out, &["write-only snapshots"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut own = vec![id_of(&first), id_of(&second)];
    own.sort();
    assert_eq!(ids, own, "{listed}");

    // It can read, restore, verify, delete and change nothing; each says why.
    for snapshot in [&old_id, &full_now, &id_of(&second)] {
        let out = host.run(&repo, &["restore", snapshot, "--stdout"]);
        let err = assert_code(&out, EXIT_WRITE_ONLY, "write-only restore");
        assert!(err.contains("this key is write-only"), "{err}");
        assert!(out.stdout.is_empty());
    }
    let pw = password_file(&repo, "another");
    let other = repo.path().join("other");
    let out = repo
        .command(&["init"])
        .env("KLUIS_REPOSITORY", &other)
        .output()
        .unwrap();
    assert_success(&out, &["init the copy's destination"]);
    let refused: Vec<Vec<&str>> = vec![
        vec!["check"],
        vec!["check", "--read-data"],
        vec!["forget", "--keep-last", "1"],
        vec!["prune", "--grace", "0s", "--unsafe-short-grace"],
        vec!["key", "add", "--new-password-file", pw.to_str().unwrap()],
        vec!["key", "rotate"],
        vec!["key", "passwd", "--new-password-file", pw.to_str().unwrap()],
        vec!["erase", "--before", "2026-10-01", "--keep-secret"],
        vec!["erase", "--list"],
        vec!["audit"],
        vec![
            "copy",
            "--to",
            other.to_str().unwrap(),
            "--to-key-file",
            repo.key_file.to_str().unwrap(),
        ],
    ];
    for args in &refused {
        let out = host.run(&repo, args);
        let err = assert_code(&out, EXIT_WRITE_ONLY, &args.join(" "));
        assert!(err.contains("this key is write-only"), "{args:?}: {err}");
    }
    // It never learnt another month's or host's key: with the data of every object at hand,
    // the library refuses to open them.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = kluis::store::Store::open(&repo.url, false).unwrap();
        let secret = kluis::keys::Secret::from_key_file(&host.key).unwrap();
        let lib = kluis::repository::Repository::open(store, &secret)
            .await
            .unwrap()
            .with_state_dir(&host.state);
        assert!(lib.write_only());
        for (name, _) in repo.objects() {
            let Some((epoch, id, _)) = kluis::object::name::parse_epoch_key(&name) else {
                continue;
            };
            let opened = lib.epoch_key(epoch, id).await;
            let own = epoch.to_string() == this_month()
                && keys_of(&repo, &this_month()).iter().any(|(n, s)| {
                    n == &name && *s == kluis::repository::SEALED_EPOCH_KEY_LEN as u64
                });
            match opened {
                Ok(_) => assert!(own, "{name} opened with a write-only key"),
                Err(e) => {
                    assert!(!own, "{name}: {e}");
                    assert!(matches!(e, kluis::Error::WriteOnly(_)), "{name}: {e}");
                }
            }
        }
    });

    // The full holders see it, labelled, and can remove it: then it opens nothing.
    let keys: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["key", "list", "--json"])).unwrap();
    let slot = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "write-only")
        .unwrap_or_else(|| panic!("{keys}"));
    assert_eq!(slot["label"], "db1");
    let listing = text(&repo.ok(&["key", "list"]));
    assert!(listing.contains("write-only"), "{listing}");
    repo.ok(&["key", "remove", slot["id"].as_str().unwrap()]);
    let out = host.run(&repo, &["backup", "--stdin", "--name", "db"]);
    assert_code(&out, 12, "a removed write-only slot");
    assert!(
        !repo.objects().iter().any(|(n, _)| n.starts_with("grants/")),
        "its grants went with it"
    );
}

#[test]
fn a_write_only_host_keeps_backing_up_across_rotations_and_erasures() {
    let repo = Repo::init_file(&SMALL_PACKS);
    let host = september_then_a_host(&repo);
    let night1 = dump_like(10, 300_000);
    let first = host.backup(&repo, "db", &night1);
    // A rotation carries the host's key over (still its own) and grants it the new
    // generation: its next backup of the month still deduplicates.
    let rotated: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["key", "rotate", "--json"])).unwrap();
    assert_eq!(
        rotated["write_only_slots"].as_array().unwrap().len(),
        1,
        "{rotated}"
    );
    let second = host.backup(&repo, "db", &night1);
    assert!(
        second["summary"]["new_bytes"].as_u64().unwrap() < 50_000,
        "{second}"
    );
    let sizes: Vec<u64> = keys_of(&repo, &this_month())
        .iter()
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(
        sizes,
        [kluis::repository::SEALED_EPOCH_KEY_LEN as u64],
        "{sizes:?}"
    );
    // An erasure with a new secret keeps the write-only slot too.
    let new_key = repo.path().join("new.key");
    repo.ok(&["key", "generate", new_key.to_str().unwrap()]);
    repo.ok(&[
        "erase",
        "--before",
        "2026-10-01T00:00:00Z",
        "--new-key-file",
        new_key.to_str().unwrap(),
    ]);
    let third = host.backup(&repo, "db", &dump_like(11, 300_000));
    for (id, data) in [(id_of(&first), &night1), (id_of(&second), &night1)] {
        let out = repo
            .command(&["restore", &id, "--stdout", "--quiet"])
            .env("KLUIS_KEY_FILE", &new_key)
            .output()
            .unwrap();
        assert_success(&out, &["restore after rotation and erasure", &id]);
        assert!(out.stdout == *data);
    }
    let out = repo
        .command(&["restore", &id_of(&third), "--stdout", "--quiet"])
        .env("KLUIS_KEY_FILE", &new_key)
        .output()
        .unwrap();
    assert_success(&out, &["restore of the backup after the erasure"]);
    let out = repo
        .command(&["check", "--read-data"])
        .env("KLUIS_KEY_FILE", &new_key)
        .output()
        .unwrap();
    assert_success(&out, &["check after rotation and erasure"]);
}

#[test]
fn a_rotation_stopped_after_each_write_leaves_the_write_only_host_able_to_back_up() {
    let repo = Repo::init_file(&[]);
    let host = september_then_a_host(&repo);
    host.backup(&repo, "db", &dump_like(20, 50_000));
    let pristine = repo.path().join("pristine");
    copy_tree(&repo.root(), &pristine);
    let state = repo.path().join("pristine-state");
    copy_tree(&host.state, &state);
    // The full host's ledger too: each round starts from the same repository, and a ledger
    // that saw the last round's snapshots would report them gone.
    let ledger = repo.path().join("state");
    let full_state = repo.path().join("pristine-ledger");
    copy_tree(&ledger, &full_state);
    let mut stops = 0;
    for n in 1..100 {
        copy_tree(&pristine, &repo.root());
        copy_tree(&state, &host.state);
        copy_tree(&full_state, &ledger);
        let out = repo
            .command(&["key", "rotate"])
            .env("KLUIS_TEST_CRASH_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        let finished = out.status.success();
        if !finished {
            assert_eq!(out.status.signal(), Some(6), "{}", text(&out.stderr));
            stops += 1;
        }
        // Stopped anywhere, the host backs up, and a full key restores what it wrote.
        let data = dump_like(21 + n, 50_000);
        let made = id_of(&host.backup(&repo, "db", &data));
        let out = repo.run(&["restore", &made, "--stdout", "--quiet"]);
        assert_success(
            &out,
            &[
                "restore after a rotation stopped after write",
                &n.to_string(),
            ],
        );
        assert!(out.stdout == data);
        // Run again, the rotation completes; the host's snapshots still restore, and it
        // still backs up.
        repo.ok(&["key", "rotate"]);
        let out = repo.run(&["restore", &made, "--stdout", "--quiet"]);
        assert_success(&out, &["restore after the second rotate", &n.to_string()]);
        assert!(out.stdout == data);
        host.backup(&repo, "db", &data);
        assert_success(
            &repo.run(&["check"]),
            &["check after write", &n.to_string()],
        );
        if finished {
            break;
        }
    }
    assert!(stops >= 8, "stopped after {stops} write(s) only");
}

#[test]
fn a_write_only_host_on_garage_and_under_kluisd() {
    let garage = Garage::start();
    let repo = garage.repo("write-only");
    repo.ok(&["init"]);
    let host = Host::add(&repo, "db1");
    let data = dump_like(30, 200_000);
    let made = host.backup(&repo, "db", &data);
    let out = repo.run(&["restore", &id_of(&made), "--stdout", "--quiet"]);
    assert_success(&out, &["full restore from Garage"]);
    assert!(out.stdout == data);
    let out = host.run(&repo, &["restore", &id_of(&made), "--stdout"]);
    assert_code(&out, EXIT_WRITE_ONLY, "write-only restore on Garage");

    // kluisd on the database host, with only the write-only key.
    let dir = repo.path();
    let config = dir.join("kluisd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\n\
             [repositories.offsite]\nurl = \"{}\"\nkey_file = \"{}\"\n\n\
             [jobs.db]\nrepository = \"offsite\"\ncommand = \"seq 1 30000\"\n\
             schedule = \"daily at 02:00\"\n",
            host.state.display(),
            repo.url,
            host.key.display()
        ),
    )
    .unwrap();
    let log = kluisd_once(&config, garage.credentials());
    assert!(log.contains("job db: snapshot"), "{log}");
    let list: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["snapshots", "--json"])).unwrap();
    let job = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "db" && s["source"].to_string().contains("seq"))
        .unwrap_or_else(|| panic!("{list}"));
    let out = repo.run(&[
        "restore",
        job["id"].as_str().unwrap(),
        "--stdout",
        "--quiet",
    ]);
    assert_success(&out, &["full restore of kluisd's write-only backup"]);
    assert_eq!(text(&out.stdout).lines().count(), 30000);
}
