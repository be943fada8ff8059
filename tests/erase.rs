//! `kluis erase` (issue 20): whole months before the date erased by destroying their keys, the
//! month the date falls in by deletion; a copy of the repository made before the erasure
//! decrypts nothing of the erased months with any current secret; on Garage; stopped after
//! every write; and in every repository a configuration names.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::databases::{kluisd_once, snapshot_ids};
use common::*;

const TIMES: [&str; 5] = [
    "2026-09-05T10:00:00Z",
    "2026-10-05T10:00:00Z",
    "2026-10-20T10:00:00Z",
    "2026-11-03T10:00:00Z",
    "2026-11-20T10:00:00Z",
];
const BEFORE: &str = "2026-11-15T00:00:00Z";

/// One snapshot at each of [`TIMES`]: (id, content).
fn snapshots(repo: &Repo) -> Vec<(String, Vec<u8>)> {
    TIMES
        .iter()
        .enumerate()
        .map(|(i, time)| {
            let data = dump_like(i as u64 + 40, 30_000);
            let out = repo.run_stdin(
                &[
                    "backup", "--stdin", "--name", "db", "--time", time, "--json",
                ],
                &data,
            );
            assert_success(&out, &["backup", time]);
            (snapshot_id(&out.stdout), data)
        })
        .collect()
}

fn new_key(repo: &Repo, name: &str) -> PathBuf {
    let path = repo.path().join(name);
    repo.ok(&["key", "generate", path.to_str().unwrap()]);
    path
}

fn with_key(repo: &Repo, key: &Path, args: &[&str]) -> std::process::Output {
    repo.command(args)
        .env("KLUIS_KEY_FILE", key)
        .output()
        .unwrap()
}

/// Files under `dir` (none if it does not exist), staging files of killed puts aside.
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.unwrap())
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                files_under(&e.path())
            } else {
                usize::from(!e.file_name().to_string_lossy().contains('#'))
            }
        })
        .sum()
}

/// The repository and this host's state as they are now, and what puts them back.
fn pristine(repo: &Repo) -> impl Fn() + '_ {
    let pristine = repo.path().join("pristine");
    let state = repo.path().join("state");
    let pristine_state = repo.path().join("pristine-state");
    copy_tree(&repo.root(), &pristine);
    fs::create_dir_all(&state).unwrap();
    copy_tree(&state, &pristine_state);
    move || {
        copy_tree(&pristine, &repo.root());
        copy_tree(&pristine_state, &state);
    }
}

/// `kluis erase --before BEFORE --new-key-file NEW`.
fn erase_to(new: &Path) -> [&str; 5] {
    [
        "erase",
        "--before",
        BEFORE,
        "--new-key-file",
        new.to_str().unwrap(),
    ]
}

/// After an erasure (`erase`, to the new key `new`) was stopped: the old key or the new one
/// restores the snapshot after the date (`kept`); run again with it, the erasure finishes:
/// only `kept` is listed, the repository checks clean, and October's data and keys are gone.
fn finishes(repo: &Repo, new: &Path, erase: &[&str], kept: &(String, Vec<u8>), when: &str) {
    let (kept_id, kept) = kept;
    let opened: Vec<&Path> = [repo.key_file.as_path(), new]
        .into_iter()
        .filter(|k| {
            let out = with_key(repo, k, &["restore", kept_id, "--stdout", "--quiet"]);
            out.status.success() && out.stdout == *kept
        })
        .collect();
    assert!(!opened.is_empty(), "no key restores {when}");
    let again = with_key(repo, opened[opened.len() - 1], erase);
    assert_success(&again, &["erase again", when]);
    let listed = with_key(repo, new, &["snapshots", "--json"]);
    assert_success(&listed, &["snapshots after the erasure finished", when]);
    let ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&listed.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![kept_id.clone()], "{when}");
    assert_success(&with_key(repo, new, &["check"]), &["check", when]);
    for dir in ["data/2026-10", "epochs/2026-10"] {
        assert_eq!(files_under(&repo.root().join(dir)), 0, "{dir} {when}");
    }
}

fn report(stdout: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(stdout).unwrap();
    v.as_array().unwrap()[0].clone()
}

#[test]
fn erase_destroys_whole_months_deletes_the_rest_and_a_copy_made_before_opens_nothing_of_it() {
    let repo = Repo::init_file(&[]);
    let made = snapshots(&repo);
    let aside = repo.path().join("aside");
    copy_tree(&repo.root(), &aside);

    // A dry run says what would go and changes nothing.
    let out = repo.ok(&["erase", "--before", BEFORE, "--dry-run", "--json"]);
    let dry = report(&out);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["record"]["snapshots"].as_array().unwrap().len(), 4);
    assert_eq!(snapshot_ids(&repo).len(), 5);

    // Without a new secret, or --keep-secret, it refuses.
    let out = repo.run(&["erase", "--before", BEFORE]);
    assert_code(&out, EXIT_USAGE, "erase without a new secret");
    assert!(text(&out.stderr).contains("--new-key-file"));

    let new = new_key(&repo, "new-key");
    let out = repo.ok(&[
        "erase",
        "--before",
        BEFORE,
        "--new-key-file",
        new.to_str().unwrap(),
        "--json",
    ]);
    let done = report(&out);
    let record = &done["record"];
    let destroyed: Vec<&str> = record["destroyed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["epoch"].as_str().unwrap())
        .collect();
    assert_eq!(destroyed, ["2026-09", "2026-10"]);
    assert_eq!(record["deleted_only"], serde_json::json!(["2026-11"]));
    assert_eq!(record["snapshots"].as_array().unwrap().len(), 4);
    assert_eq!(record["secrets_changed"], true);
    assert!(record["by"].as_str().unwrap().contains('@'), "{record}");
    let statement = done["statement"].as_array().unwrap();
    assert!(
        statement[0]
            .as_str()
            .unwrap()
            .starts_with("Cryptographically erased"),
        "{statement:?}"
    );
    assert!(
        statement
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("Deleted only"))
    );

    // What is left: the snapshot after the date, with the new key only.
    let (kept_id, kept) = &made[4];
    let out = with_key(&repo, &new, &["restore", kept_id, "--stdout", "--quiet"]);
    assert_success(&out, &["restore the snapshot after the date"]);
    assert!(out.stdout == *kept);
    let listed = with_key(&repo, &new, &["snapshots", "--json"]);
    assert_success(&listed, &["snapshots after erase"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&listed.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_success(&with_key(&repo, &new, &["check"]), &["check after erase"]);
    assert_code(
        &repo.run(&["snapshots"]),
        EXIT_WRONG_PASSWORD,
        "the retired key on the repository",
    );
    // The record, for an auditor.
    let out = with_key(&repo, &new, &["erase", "--list"]);
    assert_success(&out, &["erase --list"]);
    let listing = text(&out.stdout);
    assert!(
        listing.contains("keys destroyed: 2026-09, 2026-10") && listing.contains("1 erasure(s)"),
        "{listing}"
    );

    // The copy made before: every current secret is tried against it.
    let copy = Repo::at(
        tempfile::TempDir::new().unwrap(),
        aside.display().to_string(),
        Default::default(),
    );
    assert_code(
        &with_key(&copy, &new, &["snapshots"]),
        EXIT_WRONG_PASSWORD,
        "the new key on the copy made before the erasure",
    );
    // The copy's objects of the erased months put back into the repository (a provider
    // restoring old object versions): nothing of them decrypts, and the error says why.
    for prefix in ["snapshots", "index", "epochs"] {
        copy_tree(
            &aside.join(prefix).join("2026-10"),
            &repo.root().join(prefix).join("2026-10"),
        );
    }
    for entry in fs::read_dir(aside.join("data")).unwrap() {
        let entry = entry.unwrap();
        copy_tree(
            &entry.path(),
            &repo.root().join("data").join(entry.file_name()),
        );
    }
    let (erased_id, _) = &made[1];
    let out = with_key(&repo, &new, &["restore", erased_id, "--stdout", "--quiet"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(
        err.contains("the key of epoch 2026-10 was destroyed by erasure")
            && err.contains("cannot be recovered"),
        "{err}"
    );
}

#[test]
fn erase_on_garage_s3_keeping_the_secret_says_its_limit() {
    let garage = Garage::start();
    let repo = garage.repo("erase/keep");
    repo.ok(&["init"]);
    let made = snapshots(&repo);
    let out = repo.ok(&["erase", "--before", BEFORE, "--keep-secret", "--json"]);
    let done = report(&out);
    assert_eq!(done["record"]["secrets_changed"], false);
    let statement = done["statement"].to_string();
    assert!(
        statement.contains("Limit: the secrets were not changed"),
        "{statement}"
    );
    assert_eq!(snapshot_ids(&repo), vec![made[4].0.clone()]);
    let out = repo.run(&["restore", &made[4].0, "--stdout", "--quiet"]);
    assert_success(&out, &["restore after erase on S3"]);
    assert!(out.stdout == made[4].1);
    repo.ok(&["check"]);
    // The audit trail on S3: the restore just made, the erasure, and its prune.
    let trail: serde_json::Value = serde_json::from_slice(&repo.ok(&["audit", "--json"])).unwrap();
    let kinds: Vec<&str> = trail["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["prune", "erase", "restore"], "{trail}");
    assert!(trail["problems"].as_array().unwrap().is_empty(), "{trail}");
    // A wrong key is refused by erase and by rotate, before anything changes.
    let wrong = new_key(&repo, "wrong-key");
    for args in [
        &["erase", "--before", BEFORE, "--keep-secret"][..],
        &["key", "rotate"][..],
    ] {
        assert_code(
            &with_key(&repo, &wrong, args),
            EXIT_WRONG_PASSWORD,
            "a wrong key",
        );
    }
    assert_eq!(snapshot_ids(&repo), vec![made[4].0.clone()]);
}

/// An erasure stopped right after each of its writes in turn, each time from the same
/// repository: the old key or the new one opens it, the snapshot after the date restores
/// with it, and the same erasure run again finishes the job.
#[test]
fn an_erasure_stopped_after_each_write_is_finished_by_the_next() {
    let repo = Repo::init_file(&[]);
    let made = snapshots(&repo);
    let new = new_key(&repo, "new-key");
    let reset = pristine(&repo);
    let erase = erase_to(&new);
    let mut stops = 0;
    for n in 1..300 {
        reset();
        let out = repo
            .command(&erase)
            .env("KLUIS_TEST_CRASH_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        let finished = out.status.success();
        if !finished {
            assert_eq!(out.status.signal(), Some(6), "{}", text(&out.stderr));
            stops += 1;
        }
        finishes(&repo, &new, &erase, &made[4], &format!("after write {n}"));
        if finished {
            break;
        }
    }
    assert!(stops >= 15, "stopped after {stops} write(s) only");
}

#[test]
fn erase_with_a_configuration_erases_in_every_repository_it_names() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut config = String::from("[daemon]\nstate_dir = \"STATE\"\n\n");
    let mut repos = Vec::new();
    for name in ["local", "foreign"] {
        let key = dir.path().join(format!("{name}.key"));
        let url = dir.path().join(name);
        config.push_str(&format!(
            "[repositories.{name}]\nurl = \"{}\"\nkey_file = \"{}\"\ninit = true\n\n",
            url.display(),
            key.display()
        ));
        repos.push((name, url, key));
    }
    let config = config.replace("STATE", &dir.path().join("state").display().to_string());
    let config_path = dir.path().join("kluisd.toml");
    fs::write(&config_path, config).unwrap();
    let mut kept = Vec::new();
    for (_, url, key) in &repos {
        let repo = Repo::at(
            tempfile::TempDir::new().unwrap(),
            url.display().to_string(),
            Default::default(),
        );
        let out = repo
            .command(&["key", "generate", key.to_str().unwrap()])
            .output()
            .unwrap();
        assert_success(&out, &["key generate"]);
        assert_success(&with_key(&repo, key, &["init"]), &["init"]);
        let repo = Repo {
            key_file: key.clone(),
            ..repo
        };
        let made = snapshots(&repo);
        kept.push((repo, made[4].clone()));
    }
    let out = Command::new(KLUIS)
        .args(["erase", "--before", BEFORE, "--json", "--config"])
        .arg(&config_path)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    assert_success(&out, &["erase --config"]);
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 2, "{reports}");
    for (repo, (id, data)) in &kept {
        assert_eq!(snapshot_ids(repo), vec![id.clone()]);
        let out = repo.run(&["restore", id, "--stdout", "--quiet"]);
        assert_success(&out, &["restore after erase --config"]);
        assert!(out.stdout == *data);
    }
}

#[test]
fn a_backup_into_a_month_an_erasure_destroyed_while_it_ran_commits_nothing() {
    use kluis::keys::Secret;
    use kluis::object::Epoch;
    use kluis::repository::Repository;
    use kluis::store::Store;

    let repo = Repo::init_file(&[]);
    snapshots(&repo);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let open = || async {
        let store = Store::open(&repo.url, false).unwrap();
        let secret = Secret::from_key_file(&repo.key_file).unwrap();
        Repository::open(store, &secret).await.unwrap()
    };
    rt.block_on(async {
        let lib = open().await;
        let october = Epoch::parse("2026-10").unwrap();
        let november = Epoch::parse("2026-11").unwrap();
        // A backup with --time in October has started (read prune's marks and the
        // erasures) when an erasure of everything before November runs.
        let writer = kluis::prune::WriterView::read(&lib).await.unwrap();
        writer
            .check_not_erased(&lib, (october, kluis::id::ObjectId::random()))
            .await
            .unwrap();
        repo.ok(&["erase", "--before", BEFORE, "--keep-secret", "--json"]);
        let lib = open().await;
        let e = writer
            .check_not_erased(&lib, (october, kluis::id::ObjectId::random()))
            .await
            .unwrap_err();
        assert!(matches!(e, kluis::Error::Conflict(_)), "{e}");
        assert!(
            e.to_string().contains("destroys the keys of 2026-10"),
            "{e}"
        );
        assert!(e.to_string().contains("nothing was committed"), "{e}");
        // November keeps its key: a backup into it may commit.
        writer
            .check_not_erased(&lib, (november, kluis::id::ObjectId::random()))
            .await
            .unwrap();
        // So does a writer that started after the erasure (it writes under a new key).
        let after = kluis::prune::WriterView::read(&lib).await.unwrap();
        after
            .check_not_erased(&lib, (october, kluis::id::ObjectId::random()))
            .await
            .unwrap();
    });
}

#[test]
fn an_erasure_killed_at_random_points_leaves_a_repository_a_key_opens_and_is_finished_by_the_next()
{
    const KILLS: usize = 20;
    let repo = Repo::init_file(&[]);
    let made = snapshots(&repo);
    let new = new_key(&repo, "new-key");
    let reset = pristine(&repo);
    let erase = erase_to(&new);
    // The time of one whole erasure, the fastest of three.
    let full = (0..3)
        .map(|_| {
            reset();
            let started = std::time::Instant::now();
            repo.ok(&erase);
            started.elapsed()
        })
        .min()
        .unwrap();
    kill_at_random(
        KILLS,
        full,
        21,
        || repo.command(&erase),
        reset,
        |i, delay| {
            let when = format!("after kill {i} at {delay:?}");
            finishes(&repo, &new, &erase, &made[4], &when);
        },
    );
}

#[test]
fn kluisd_enforces_erase_after_on_garage_s3() {
    let garage = Garage::start();
    let repo = garage.repo("erase/scheduled");
    repo.ok(&["init"]);
    let made = snapshots(&repo);
    let now = jiff::Timestamp::now();
    let recent = dump_like(60, 30_000);
    let out = repo.run_stdin(&["backup", "--stdin", "--name", "db", "--json"], &recent);
    assert_success(&out, &["a backup of today"]);
    let today = snapshot_id(&out.stdout);
    let state = repo.path().join("kluisd-state");
    let config = repo.path().join("kluisd.toml");
    // Everything before the start of this month is older than erase_after.
    let month_start = kluis::object::Epoch::of(now).start();
    let after_days = now.duration_since(month_start).as_secs() / 86400 + 1;
    fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\ntime_zone = \"UTC\"\n\
             [repositories.offsite]\nurl = \"{}\"\nkey_file = \"{}\"\n\
             erase_after = \"{after_days}d\"\n\
             prune = {{ schedule = \"daily at 05:00\", grace = \"1h\" }}\n",
            state.display(),
            repo.url,
            repo.key_file.display()
        ),
    )
    .unwrap();
    let log = kluisd_once(&config, garage.credentials());
    assert!(log.contains("repository offsite: erasure "), "{log}");
    // Every snapshot of the fixed months (2026-09 to 2026-11) is gone, today's stays, and
    // the erased months' keys with them; the key file still opens the repository.
    let left = snapshot_ids(&repo);
    assert_eq!(left, vec![today.clone()], "{log}");
    for (id, _) in &made {
        assert_code(
            &repo.run(&["restore", id, "--stdout"]),
            1,
            "an erased snapshot",
        );
    }
    let out = repo.run(&["restore", &today, "--stdout", "--quiet"]);
    assert_success(&out, &["today's snapshot after the scheduled erasure"]);
    assert!(out.stdout == recent);
    let records: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["erase", "--list", "--json"])).unwrap();
    let r = &records.as_array().unwrap()[0];
    let destroyed: Vec<&str> = r["destroyed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["epoch"].as_str().unwrap())
        .collect();
    assert!(
        destroyed.contains(&"2026-09") && destroyed.contains(&"2026-10"),
        "{r}"
    );
    assert_eq!(r["secrets_changed"], false);
    repo.ok(&["check"]);
    // Run again: nothing more to erase, and nothing written for it.
    kluisd_once(&config, garage.credentials());
    let again: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["erase", "--list", "--json"])).unwrap();
    assert_eq!(again.as_array().unwrap().len(), 1, "{again}");
}
