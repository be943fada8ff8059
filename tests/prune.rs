//! Prune: two phases (mark, then sweep after the grace period), repacking, the writer's side
//! of the protocol, refusal on unreadable metadata, and SIGKILL at random points.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

fn prune(repo: &Repo, grace: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["prune", "--grace", grace, "--unsafe-short-grace", "--json"];
    args.extend_from_slice(extra);
    json(&repo.ok(&args))
}

fn count(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// Small chunks and packs: many objects, so prune has something to choose between.
fn small_repo() -> Repo {
    Repo::init_file(&SMALL_PACKS)
}

fn data_bytes(repo: &Repo) -> u64 {
    repo.objects()
        .iter()
        .filter(|(n, _)| n.starts_with("data/"))
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn wait_past(grace: Duration, since: Instant) {
    let left = (grace + Duration::from_millis(200)).saturating_sub(since.elapsed());
    std::thread::sleep(left);
}

#[test]
fn forgotten_data_is_marked_first_and_deleted_only_after_the_grace_period() {
    let repo = small_repo();
    let a = random_bytes(1, 2 << 20);
    let b = random_bytes(2, 2 << 20);
    let mut c = a[..1 << 20].to_vec();
    c.extend_from_slice(&random_bytes(3, 1 << 20));
    repo.backup_stdin("a", &a);
    let b_id = repo.backup_stdin("b", &b);
    let c_id = repo.backup_stdin("c", &c);
    repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);
    let packs = |repo: &Repo| -> Vec<String> {
        repo.objects()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with("data/"))
            .collect()
    };
    let original = packs(&repo);

    let grace = Duration::from_secs(3);
    let marked_at = Instant::now();
    let first = prune(&repo, "3s", &[]);
    assert_eq!(count(&first, "packs_deleted"), 0, "{first}");
    assert!(count(&first, "packs_marked") > 0, "{first}");
    // Within the grace period a second prune deletes nothing either.
    let again = prune(&repo, "3s", &[]);
    assert_eq!(count(&again, "packs_deleted"), 0, "{again}");
    assert_eq!(count(&again, "marks_pending"), 1, "{again}");
    let now = packs(&repo);
    let gone: Vec<_> = original.iter().filter(|p| !now.contains(p)).collect();
    assert!(gone.is_empty(), "deleted inside the grace period: {gone:?}");

    wait_past(grace, marked_at);
    let before = data_bytes(&repo);
    let sweep = prune(&repo, "3s", &[]);
    assert!(count(&sweep, "packs_deleted") > 0, "{sweep}");
    let after = data_bytes(&repo);
    assert_eq!(before - after, count(&sweep, "bytes_reclaimed"), "{sweep}");
    // a's second half was its own: about 1 MiB went.
    assert!(
        before - after > 800 << 10,
        "reclaimed only {}",
        before - after
    );
    assert!(
        after < 4500 << 10,
        "{after} bytes of packs left for 4 MiB of snapshots"
    );
    assert!(repo.restore_stdout(&b_id) == b);
    assert!(repo.restore_stdout(&c_id) == c);
    repo.ok(&["check", "--read-data"]);

    // The superseded index segments go one grace period later.
    let retired_at = Instant::now();
    wait_past(grace, retired_at);
    let last = prune(&repo, "3s", &[]);
    assert!(count(&last, "segments_deleted") > 0, "{last}");
    repo.ok(&["check", "--read-data"]);
    assert!(repo.restore_stdout(&c_id) == c);
}

#[test]
fn a_backup_never_deduplicates_against_marked_data() {
    let repo = small_repo();
    let a = random_bytes(10, 1 << 20);
    repo.backup_stdin("a", &a);
    repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);
    let marked_at = Instant::now();
    prune(&repo, "2s", &[]);
    // The same bytes again: the marked packs are invisible, so everything is stored anew.
    let out = repo.run_stdin(&["backup", "--stdin", "--name", "a", "--json"], &a);
    assert_success(&out, &["backup after mark"]);
    let v = json(&out.stdout);
    assert!(
        v["summary"]["new_bytes"].as_u64().unwrap() >= a.len() as u64,
        "{v}"
    );
    let id = v["id"].as_str().unwrap().to_string();
    wait_past(Duration::from_secs(2), marked_at);
    let sweep = prune(&repo, "2s", &[]);
    assert!(count(&sweep, "packs_deleted") > 0, "{sweep}");
    assert!(repo.restore_stdout(&id) == a);
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn half_empty_packs_are_repacked_and_the_copies_verified() {
    let repo = Repo::init_file(&[
        "--pack-size",
        "1048576",
        "--chunk-sizes",
        "4096,16384,65536",
    ]);
    let dir = repo.path().join("src");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep"), random_bytes(20, 300 << 10)).unwrap();
    std::fs::write(dir.join("drop"), random_bytes(21, 300 << 10)).unwrap();
    repo.backup_paths(&["--name", "tree"], &[&dir]);
    std::fs::remove_file(dir.join("drop")).unwrap();
    let kept = repo.backup_paths(&["--name", "tree"], &[&dir]);
    repo.ok(&["forget", "--name", "tree", "--keep-last", "1"]);

    let marked_at = Instant::now();
    let first = prune(&repo, "2s", &["--repack-threshold", "20"]);
    assert!(count(&first, "packs_repacked") >= 1, "{first}");
    assert!(count(&first, "bytes_repacked") > 250 << 10, "{first}");
    repo.ok(&["check", "--read-data"]);
    wait_past(Duration::from_secs(2), marked_at);
    let sweep = prune(&repo, "2s", &["--repack-threshold", "20"]);
    assert!(count(&sweep, "packs_deleted") >= 1, "{sweep}");
    assert_eq!(count(&sweep, "packs_kept"), 0, "{sweep}");
    // What is left is about the one file the kept snapshot needs.
    let left = data_bytes(&repo);
    assert!(left < 450 << 10, "{left} bytes of packs left");
    let target = repo.path().join("restored");
    repo.ok(&[
        "restore",
        &kept,
        "--target",
        target.to_str().unwrap(),
        "--quiet",
    ]);
    assert_same_tree(&dir, &target.join("src"));
    repo.ok(&["check", "--read-data"]);
}

/// A pack of one small blob that a snapshot needs has nothing to repack: its header and table
/// of contents used to count as unused bytes, so every prune repacked such a pack into a new
/// one just like it (seen after killed backups, whose leftovers a repack leaves as small
/// packs), forever.
#[test]
fn small_packs_that_are_all_used_are_not_repacked() {
    let repo = Repo::init_file(&[]);
    for i in 0..3 {
        repo.backup_stdin(&format!("s{i}"), &random_bytes(60 + i, 150));
    }
    for _ in 0..2 {
        let p = prune(&repo, "0s", &["--repack-threshold", "20"]);
        assert_eq!(count(&p, "packs_repacked"), 0, "{p}");
        assert_eq!(count(&p, "packs_marked"), 0, "{p}");
    }
}

#[test]
fn the_sweep_keeps_marked_packs_a_snapshot_committed_since_needs() {
    // A backup that started before the mark may reuse marked packs and commit inside the
    // grace period. Simulated exactly: a's manifest is taken away before the mark (as if not
    // committed yet; not forgotten, which a forget record would say) and written again after.
    let repo = small_repo();
    let a = random_bytes(30, 1 << 20);
    repo.backup_stdin("a", &a);
    let manifest = repo
        .objects()
        .into_iter()
        .find(|(n, _)| n.starts_with("snapshots/"))
        .unwrap();
    let saved = std::fs::read(&manifest.1).unwrap();
    std::fs::remove_file(&manifest.1).unwrap();
    let marked_at = Instant::now();
    let first = prune(&repo, "2s", &[]);
    assert!(count(&first, "packs_marked") > 0, "{first}");
    // "Commit" it again (the same manifest bytes under the same name: they authenticate).
    std::fs::write(&manifest.1, &saved).unwrap();
    wait_past(Duration::from_secs(2), marked_at);
    let sweep = prune(&repo, "2s", &[]);
    assert_eq!(count(&sweep, "packs_deleted"), 0, "{sweep}");
    assert!(count(&sweep, "packs_kept") > 0, "{sweep}");
    assert!(repo.restore_stdout("latest") == a);
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn a_writer_that_raced_a_mark_refuses_to_commit_once_the_sweep_is_near() {
    use kluis::keys::Secret;
    use kluis::repository::Repository;
    use kluis::store::Store;

    let repo = small_repo();
    let a = random_bytes(40, 1 << 20);
    repo.backup_stdin("a", &a);
    repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(&repo.url, false).unwrap();
        let secret = Secret::from_key_file(&repo.key_file).unwrap();
        let lib = Repository::open(store, &secret).await.unwrap();
        // The writer starts (reads the marks: none yet) and reuses a's packs.
        let writer = kluis::prune::WriterView::read(&lib).await.unwrap();
        let marked_at = Instant::now();
        prune(&repo, "4s", &[]);
        let marked = kluis::prune::WriterView::read(&lib).await.unwrap();
        let reused = marked.condemned().clone();
        assert!(!reused.is_empty());
        // The month's key is younger than the grace period: no mark names it.
        assert!(marked.condemned_keys().is_empty());
        let key = (
            kluis::object::Epoch::of(jiff::Timestamp::now()),
            kluis::id::ObjectId::random(),
        );
        // Inside the grace period (minus the 1 s clock margin) it may still commit: the
        // sweep will see its snapshot.
        writer.check_commit(&lib, &reused, key).await.unwrap();
        // Packs no mark names are no reason to refuse.
        writer
            .check_commit(&lib, &Default::default(), key)
            .await
            .unwrap();
        wait_past(Duration::from_secs(3), marked_at);
        let e = writer.check_commit(&lib, &reused, key).await.unwrap_err();
        assert!(matches!(e, kluis::Error::Conflict(_)), "{e}");
        assert!(e.to_string().contains("nothing was committed"), "{e}");
        // A writer that saw the mark has nothing to fear from it.
        marked.check_commit(&lib, &reused, key).await.unwrap();
    });
}

#[test]
fn the_key_of_a_month_that_holds_nothing_any_more_is_marked_then_swept() {
    let repo = small_repo();
    let old = random_bytes(45, 300 << 10);
    let kept = random_bytes(46, 300 << 10);
    let run = |args: &[&str], input: &[u8]| {
        let out = repo.run_stdin(args, input);
        assert_success(&out, args);
        snapshot_id(&out.stdout)
    };
    run(
        &[
            "backup",
            "--stdin",
            "--name",
            "old",
            "--time",
            "2026-01-15T00:00:00Z",
            "--json",
        ],
        &old,
    );
    let kept_id = repo.backup_stdin("kept", &kept);
    repo.ok(&["forget", "--name", "old", "--max-age", "0s"]);
    let january = |repo: &Repo| -> Vec<String> {
        repo.objects()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.contains("/2026-01/"))
            .collect()
    };
    let keys = |repo: &Repo| {
        january(repo)
            .iter()
            .filter(|n| n.starts_with("epochs/"))
            .count()
    };
    assert_eq!(keys(&repo), 1);
    // Packs, then the segments superseded by the sweep, then the empty segment that
    // superseded them, then the key: each one grace period after it was marked.
    let mut marked_key = false;
    let mut runs = 0;
    while keys(&repo) > 0 {
        runs += 1;
        assert!(
            runs <= 6,
            "the key is still there after 6 prunes: {:?}",
            january(&repo)
        );
        let started = Instant::now();
        let p = prune(&repo, "1s", &[]);
        if count(&p, "keys_deleted") > 0 {
            assert!(
                marked_key,
                "a key was deleted before any run marked it: {p}"
            );
        }
        marked_key |= count(&p, "keys_marked") > 0;
        wait_past(Duration::from_secs(1), started);
    }
    assert!(runs >= 2, "marked and deleted in one run");
    eprintln!("the key of an emptied month went with prune run {runs}");
    assert_eq!(
        january(&repo),
        Vec::<String>::new(),
        "January holds nothing"
    );
    repo.ok(&["check", "--read-data"]);
    assert!(repo.restore_stdout(&kept_id) == kept);
    // The month can be written again: a new key.
    let again = run(
        &[
            "backup",
            "--stdin",
            "--name",
            "old",
            "--time",
            "2026-01-16T00:00:00Z",
            "--json",
        ],
        &old,
    );
    assert_eq!(keys(&repo), 1);
    assert!(repo.restore_stdout(&again) == old);
    // A month that holds data keeps its key.
    let p = prune(&repo, "1s", &[]);
    assert_eq!(count(&p, "keys_marked"), 0, "{p}");
}

#[test]
fn a_writer_that_holds_a_condemned_epoch_key_refuses_to_commit_once_the_sweep_is_near() {
    use kluis::keys::Secret;
    use kluis::object::Epoch;
    use kluis::repository::Repository;
    use kluis::store::Store;

    let repo = small_repo();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(&repo.url, false).unwrap();
        let secret = Secret::from_key_file(&repo.key_file).unwrap();
        let lib = Repository::open(store, &secret).await.unwrap();
        let epoch = Epoch::parse("2025-06").unwrap();
        // A writer made the month's key and then nothing else (it failed, say); another
        // starts before a prune condemns the key.
        let (made, _) = lib.write_key(epoch, &Default::default()).await.unwrap();
        std::thread::sleep(Duration::from_millis(4200));
        let writer = kluis::prune::WriterView::read(&lib).await.unwrap();
        let marked_at = Instant::now();
        let p = prune(&repo, "4s", &[]);
        assert_eq!(count(&p, "keys_marked"), 1, "{p}");
        let marked = kluis::prune::WriterView::read(&lib).await.unwrap();
        assert!(marked.condemned_keys().contains(&(epoch, made.id)));
        let none = Default::default();
        writer
            .check_commit(&lib, &none, (epoch, made.id))
            .await
            .unwrap();
        wait_past(Duration::from_secs(3), marked_at);
        let e = writer
            .check_commit(&lib, &none, (epoch, made.id))
            .await
            .unwrap_err();
        assert!(matches!(e, kluis::Error::Conflict(_)), "{e}");
        assert!(
            e.to_string()
                .contains("the epoch key this snapshot is sealed under"),
            "{e}"
        );
        // A writer that saw the mark makes another key instead of using the condemned one.
        let (other, _) = lib.write_key(epoch, marked.condemned_keys()).await.unwrap();
        assert_ne!(other.id, made.id);
        marked
            .check_commit(&lib, &none, (epoch, other.id))
            .await
            .unwrap();
    });
    // The sweep then deletes the condemned key only: the month holds a key in use... and
    // nothing else, so that one is marked in turn.
    let started = Instant::now();
    wait_past(Duration::from_secs(4), started);
    let p = prune(&repo, "4s", &[]);
    assert_eq!(count(&p, "keys_deleted"), 1, "{p}");
    let left = repo
        .objects()
        .into_iter()
        .filter(|(n, _)| n.starts_with("epochs/2025-06/"))
        .count();
    assert_eq!(left, 1);
}

#[test]
fn prune_stops_on_an_unreadable_snapshot_or_index_segment_and_deletes_nothing() {
    for what in ["snapshots/", "index/"] {
        let repo = small_repo();
        repo.backup_stdin("a", &random_bytes(50, 256 << 10));
        repo.backup_stdin("b", &random_bytes(51, 256 << 10));
        repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);
        prune(&repo, "0s", &[]);
        let (_, victim) = repo
            .objects()
            .into_iter()
            .find(|(n, _)| n.starts_with(what))
            .unwrap();
        let mut bytes = std::fs::read(&victim).unwrap();
        let n = bytes.len() - 20;
        bytes[n] ^= 1;
        std::fs::write(&victim, bytes).unwrap();
        let before = repo.objects();
        let out = repo.run(&["prune", "--grace", "0s", "--unsafe-short-grace"]);
        let err = assert_code(&out, 13, "prune over damage");
        assert!(err.contains("prune stopped"), "{err}");
        assert!(err.contains(what.trim_end_matches('/')), "{err}");
        let after = repo.objects();
        let gone: Vec<_> = before.iter().filter(|o| !after.contains(o)).collect();
        assert!(gone.is_empty(), "{what}: prune deleted {gone:?}");
    }
}

#[test]
fn a_listing_error_stops_prune_and_deletes_nothing() {
    // restic #4612: a listing error read as "no files" let prune delete data. A symbolic link
    // to itself makes the store's listing of that directory fail.
    for dir in ["snapshots", "index", "data"] {
        let repo = small_repo();
        repo.backup_stdin("a", &random_bytes(80, 256 << 10));
        let b = random_bytes(81, 256 << 10);
        let b_id = repo.backup_stdin("b", &b);
        repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);
        let marked = prune(&repo, "0s", &[]);
        assert!(count(&marked, "packs_marked") > 0, "{marked}");
        let epoch_dir = std::fs::read_dir(repo.root().join(dir))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let link = epoch_dir.join("loop");
        std::os::unix::fs::symlink("loop", &link).unwrap();
        let before = repo.objects();
        let out = repo.run(&["prune", "--grace", "0s", "--unsafe-short-grace"]);
        assert!(
            !out.status.success(),
            "{dir}: prune succeeded over a listing error"
        );
        let err = text(&out.stderr);
        assert!(err.contains(&format!("list of {dir}/")), "{dir}: {err}");
        assert_eq!(
            repo.objects(),
            before,
            "{dir}: prune changed the repository"
        );
        std::fs::remove_file(&link).unwrap();
        let swept = prune(&repo, "0s", &[]);
        assert!(count(&swept, "packs_deleted") > 0, "{dir}: {swept}");
        assert!(repo.restore_stdout(&b_id) == b);
    }
}

#[test]
fn objects_are_never_rewritten_in_place() {
    // Invariant 3: every object keeps the bytes it was created with until it is deleted;
    // backups, forget, repack and sweeps only add and delete objects.
    let repo = Repo::init_file(&[
        "--pack-size",
        "1048576",
        "--chunk-sizes",
        "4096,16384,65536",
    ]);
    let contents = |repo: &Repo| -> BTreeMap<String, String> {
        repo.objects()
            .into_iter()
            .map(|(n, p)| (n, sha256(&std::fs::read(p).unwrap())))
            .collect()
    };
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut record = |repo: &Repo, step: &str| {
        for (name, sha) in contents(repo) {
            if let Some(old) = seen.insert(name.clone(), sha.clone()) {
                assert_eq!(old, sha, "{name} was rewritten by {step}");
            }
        }
    };
    let dir = repo.path().join("src");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..4u64 {
        std::fs::write(dir.join(format!("f{i}")), random_bytes(90 + i, 200 << 10)).unwrap();
    }
    repo.backup_paths(&["--name", "tree"], &[&dir]);
    record(&repo, "the first backup");
    std::fs::remove_file(dir.join("f0")).unwrap();
    std::fs::write(dir.join("f4"), random_bytes(95, 200 << 10)).unwrap();
    repo.backup_paths(&["--name", "tree"], &[&dir]);
    record(&repo, "the second backup");
    repo.ok(&["forget", "--name", "tree", "--keep-last", "1"]);
    record(&repo, "forget");
    let first = prune(&repo, "0s", &["--repack-threshold", "10"]);
    record(&repo, "a prune that marks and repacks");
    let second = prune(&repo, "0s", &["--repack-threshold", "10"]);
    record(&repo, "a prune that sweeps");
    assert!(count(&first, "packs_repacked") > 0, "{first}");
    assert!(count(&second, "packs_deleted") > 0, "{second}");
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn forget_with_prune_on_an_empty_and_a_one_snapshot_repository() {
    let repo = small_repo();
    let v = json(&repo.ok(&["forget", "--keep-last", "1", "--prune", "--json"]));
    assert_eq!(v["forget"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(count(&v["prune"], "packs_marked"), 0, "{v}");
    let a = random_bytes(60, 300 << 10);
    let id = repo.backup_stdin("a", &a);
    let v = json(&repo.ok(&[
        "forget",
        "--keep-last",
        "1",
        "--prune",
        "--grace",
        "0s",
        "--unsafe-short-grace",
        "--json",
    ]));
    assert_eq!(v["forget"][0]["keep"], true, "{v}");
    assert_eq!(count(&v["prune"], "packs_marked"), 0, "{v}");
    assert!(repo.restore_stdout(&id) == a);
}

/// Name -> SHA-256 of every snapshot listed.
fn listed(repo: &Repo) -> BTreeMap<String, String> {
    let v = json(&repo.ok(&["snapshots", "--json"]));
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["streams"][0]["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Kills that must land before prune completes.
const KILLS: u32 = 50;

#[test]
fn sigkill_prune_at_random_points_loses_nothing_committed() {
    let repo = small_repo();
    let shared = dump_like(70, 512 << 10);
    let input = |i: u64| {
        let mut v = shared.clone();
        v.extend_from_slice(&random_bytes(7000 + i, 256 << 10));
        v
    };
    let mut expected: BTreeMap<String, String> = BTreeMap::new(); // id -> sha256
    for i in 0..3 {
        let data = input(i);
        expected.insert(repo.backup_stdin("db", &data), sha256(&data));
    }
    // A prune's length, to spread the kills over it.
    repo.ok(&["forget", "--keep-last", "2"]);
    let started = Instant::now();
    prune(&repo, "0s", &[]);
    let full = started.elapsed();
    let delays = random_bytes(4343, 400 * 4);
    let (mut killed, mut completed, mut deleted) = (0u32, 0u32, 0u64);
    let mut i = 3;
    while killed < KILLS {
        assert!(i < 400, "only {killed} kills landed in {i} runs");
        let data = input(i);
        expected.insert(repo.backup_stdin("db", &data), sha256(&data));
        repo.ok(&["forget", "--keep-last", "2"]);
        let frac = u32::from_le_bytes(delays[i as usize * 4..][..4].try_into().unwrap());
        let delay = full.mul_f64(1.2 * f64::from(frac) / f64::from(u32::MAX));
        let mut child = repo
            .command(&[
                "prune",
                "--grace",
                "0s",
                "--unsafe-short-grace",
                "--repack-threshold",
                "10",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            completed += 1;
            deleted += count(&json(&out.stdout), "packs_deleted");
        } else {
            // Its lease stays behind; the next prune, on the same host, sees that its
            // process is gone and takes over.
            killed += 1;
        }
        let out = repo.run(&["check"]);
        assert_success(&out, &["check after prune kill", &i.to_string()]);
        let now = listed(&repo);
        assert_eq!(now.len(), 2, "run {i}: {now:?}");
        for (id, sha) in &now {
            assert_eq!(Some(sha), expected.get(id), "run {i}: {id}");
            assert_eq!(&sha256(&repo.restore_stdout(id)), sha, "run {i}: {id}");
        }
        i += 1;
    }
    eprintln!("{killed} prunes killed, {completed} completed, {deleted} packs deleted");
    // The repository keeps working: two full prunes (the second sweeps what the first marked)
    // and a backup, then everything verifies.
    for _ in 0..2 {
        deleted += count(&prune(&repo, "0s", &[]), "packs_deleted");
    }
    let data = input(999);
    let id = repo.backup_stdin("db", &data);
    assert!(repo.restore_stdout(&id) == data);
    repo.ok(&["check", "--read-data"]);
    assert!(deleted > 0, "no prune ever deleted anything");
}

#[test]
fn three_hosts_back_up_to_one_garage_repository_while_prune_runs_again_and_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    const ROUNDS: u64 = 12;
    let garage = Garage::start();
    let repo = garage.repo("many-hosts");
    repo.init_small();
    let repo = Arc::new(repo);
    let committed: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let conflicts = Arc::new(Mutex::new(0u32));
    let done = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..3u64)
        .map(|h| {
            let (repo, committed, conflicts) = (repo.clone(), committed.clone(), conflicts.clone());
            std::thread::spawn(move || {
                let base = dump_like(100 + h, 512 << 10);
                for round in 0..ROUNDS {
                    let mut data = base.clone();
                    data.extend_from_slice(&random_bytes(1000 * h + round, 192 << 10));
                    let host = format!("host-{h}");
                    let args = [
                        "backup", "--stdin", "--name", "db", "--host", &host, "--json",
                    ];
                    let out = repo.run_stdin(&args, &data);
                    if out.status.success() {
                        let id = snapshot_id(&out.stdout);
                        committed.lock().unwrap().insert(id, sha256(&data));
                    } else {
                        // The only acceptable failure: it raced a sweep and committed nothing.
                        let err = assert_code(&out, 1, "a writer racing prune");
                        assert!(err.contains("nothing was committed"), "{err}");
                        *conflicts.lock().unwrap() += 1;
                    }
                }
            })
        })
        .collect();
    let pruner = {
        let (repo, done) = (repo.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut runs, mut deleted) = (0u32, 0u64);
            while !done.load(Ordering::Relaxed) {
                let args = [
                    "forget",
                    "--keep-last",
                    "2",
                    "--prune",
                    "--grace",
                    "2s",
                    "--unsafe-short-grace",
                    "--json",
                ];
                let v = json(&repo.ok(&args));
                deleted += count(&v["prune"], "packs_deleted");
                runs += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            (runs, deleted)
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    // Two more rounds after the writers stop, so the last marks are swept too.
    std::thread::sleep(Duration::from_millis(2500));
    done.store(true, Ordering::Relaxed);
    let (runs, mut deleted) = pruner.join().unwrap();
    let v = json(&repo.ok(&["prune", "--grace", "2s", "--unsafe-short-grace", "--json"]));
    deleted += count(&v, "packs_deleted");
    let conflicts = *conflicts.lock().unwrap();
    eprintln!("{runs} prunes, {deleted} packs deleted, {conflicts} backups refused");
    assert!(runs >= 3, "prune ran only {runs} times");
    assert!(deleted > 0, "the prunes deleted nothing");

    repo.ok(&["check", "--read-data"]);
    let committed = committed.lock().unwrap();
    let now = listed(&repo);
    assert_eq!(now.len(), 6, "two snapshots per host: {now:?}");
    for (id, sha) in &now {
        assert_eq!(Some(sha), committed.get(id), "{id} was never committed");
        assert_eq!(&sha256(&repo.restore_stdout(id)), sha, "{id}");
    }
}

/// Issue 18, defect 1: a prune marked and swept the packs a running backup had uploaded (some
/// unindexed, some in its checkpoint segments) and the backup still committed a snapshot
/// that could not be restored. Now the backup refuses to commit.
#[test]
fn a_backup_whose_own_packs_a_prune_swept_meanwhile_commits_nothing() {
    use std::io::Write;

    let repo = small_repo();
    let mut child = repo.spawn(&["backup", "--stdin", "--name", "slow", "--json"]);
    let mut stdin = child.stdin.take().unwrap();
    // The reader fills 4 MiB before it chunks: 6 MiB make it store about 64 packs of
    // 64 KiB (four checkpoint segments) and wait for more.
    stdin.write_all(&random_bytes(90, 6 << 20)).unwrap();
    stdin.flush().unwrap();
    let packs = |repo: &Repo| {
        let objects = repo.objects();
        let count = |p: &str| objects.iter().filter(|(n, _)| n.starts_with(p)).count();
        (count("data/"), count("index/"))
    };
    let waited = Instant::now();
    while packs(&repo).1 < 2 || packs(&repo).0 < 40 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the backup did not upload: {:?}",
            packs(&repo)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The backup is paused mid-stream; two prunes with a short grace mark, then sweep.
    let marked_at = Instant::now();
    let first = prune(&repo, "1s", &[]);
    assert!(count(&first, "packs_marked") >= 40, "{first}");
    wait_past(Duration::from_secs(1), marked_at);
    let second = prune(&repo, "1s", &[]);
    assert!(count(&second, "packs_deleted") >= 40, "{second}");

    stdin.write_all(&random_bytes(91, 256 << 10)).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = assert_code(&out, 1, "a backup whose packs were swept");
    assert!(err.contains("nothing was committed"), "{err}");
    assert!(err.contains("condemned data this snapshot needs"), "{err}");
    let listed = json(&repo.ok(&["snapshots", "--json"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn a_short_grace_from_the_command_line_is_refused_unless_asked_for() {
    let repo = small_repo();
    repo.backup_stdin("a", &random_bytes(92, 64 << 10));
    for args in [
        &["prune", "--grace", "1s"][..],
        &["prune", "--grace", "0s"],
        &["prune", "--grace", "59m"],
        &["forget", "--keep-last", "1", "--prune", "--grace", "10m"],
    ] {
        let out = repo.run(args);
        let err = assert_code(&out, 2, "a short grace");
        assert!(err.contains("is shorter than 1h"), "{args:?}: {err}");
        assert!(err.contains("--unsafe-short-grace"), "{args:?}: {err}");
    }
    // forget --prune refused before it forgot anything.
    let listed = json(&repo.ok(&["snapshots", "--json"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    repo.ok(&["prune", "--grace", "1h"]);
    repo.ok(&["prune", "--grace", "1s", "--unsafe-short-grace"]);
}

fn skewed_prune(repo: &Repo, offset: &str, grace: &str) -> serde_json::Value {
    let args = ["prune", "--grace", grace, "--unsafe-short-grace", "--json"];
    let out = repo.skewed(offset, &args).output().unwrap();
    assert_success(&out, &args);
    json(&out.stdout)
}

/// Issue 18, defect 2: prune's times come from the store, so hosts whose clocks are hours
/// apart agree on when a mark is due. Before, a marking host 2 h behind made marks that were
/// due at once, and a host 2 h ahead swept everything early.
#[test]
fn prune_hosts_with_clocks_hours_apart_agree_on_when_a_mark_is_due() {
    let repo = small_repo();
    let a = random_bytes(93, 1 << 20);
    let b = random_bytes(94, 1 << 20);
    repo.backup_stdin("a", &a);
    let b_id = repo.backup_stdin("b", &b);
    repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);

    // A 1 h grace, marked by a host 2 h behind: no host sweeps it now, whatever its clock.
    let marked = skewed_prune(&repo, "-2h", "1h");
    assert!(count(&marked, "packs_marked") > 0, "{marked}");
    for offset in ["+0", "+2h", "-2h"] {
        let v = skewed_prune(&repo, offset, "1h");
        assert_eq!(count(&v, "packs_deleted"), 0, "{offset}: {v}");
        assert_eq!(count(&v, "marks_pending"), 1, "{offset}: {v}");
    }

    // A short grace marked by a host 2 h ahead is due after that grace on every host: a host
    // 2 h behind sweeps it then (not 4 h later), and not before.
    let repo = small_repo();
    repo.backup_stdin("a", &a);
    let b_id2 = repo.backup_stdin("b", &b);
    repo.ok(&["forget", "--name", "a", "--max-age", "0s"]);
    let marked_at = Instant::now();
    let marked = skewed_prune(&repo, "+2h", "3s");
    assert!(count(&marked, "packs_marked") > 0, "{marked}");
    let early = skewed_prune(&repo, "-2h", "3s");
    assert_eq!(count(&early, "packs_deleted"), 0, "{early}");
    wait_past(Duration::from_secs(5), marked_at);
    let swept = skewed_prune(&repo, "-2h", "3s");
    assert!(count(&swept, "packs_deleted") > 0, "{swept}");
    assert!(repo.restore_stdout(&b_id2) == b);
    repo.ok(&["check", "--read-data"]);
    let _ = b_id;
}

/// Issue 18, defect 2: a writer whose clock is 2 h behind thought a mark's grace period had
/// 2 h to run and committed past it. It reads the store's clock now.
#[test]
fn a_writer_with_a_clock_hours_behind_refuses_to_commit_past_a_due_mark() {
    use std::io::Write;

    let repo = small_repo();
    let mut child = repo
        .skewed("-2h", &["backup", "--stdin", "--name", "slow", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&random_bytes(95, 6 << 20)).unwrap();
    stdin.flush().unwrap();
    let waited = Instant::now();
    while repo
        .objects()
        .iter()
        .filter(|(n, _)| n.starts_with("data/"))
        .count()
        < 8
    {
        assert!(waited.elapsed() < Duration::from_secs(60), "no upload");
        std::thread::sleep(Duration::from_millis(50));
    }
    let marked_at = Instant::now();
    let marked = prune(&repo, "3s", &[]);
    assert!(count(&marked, "packs_marked") >= 8, "{marked}");
    // Past the mark's due time, before any sweep.
    wait_past(Duration::from_secs(4), marked_at);
    stdin.write_all(&random_bytes(96, 64 << 10)).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = assert_code(&out, 1, "a writer 2 h behind, past a due mark");
    assert!(err.contains("by the store's clock"), "{err}");
    assert!(err.contains("nothing was committed"), "{err}");
}

/// The reliability suite's concurrency test (issue 18): three hosts whose clocks are an hour
/// apart back up to one Garage repository, one of them from a stream slower than the grace
/// period; prune (on a host with a skewed clock too) runs again and again with a 2 s grace,
/// and copies to a second repository run meanwhile. After every round `check --read-data`
/// passes on both and every snapshot listed restores to what was committed. A backup may
/// fail only by refusing to commit. `KLUIS_ROUNDS` (default 3) for longer runs.
#[test]
fn skewed_hosts_slow_streams_prune_and_copies_round_after_round() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let rounds: u64 = std::env::var("KLUIS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let garage = Garage::start();
    let repo = Arc::new(garage.repo("skewed"));
    repo.init_small();
    let foreign = garage.repo("skewed-copy");
    foreign.ok(&["init"]);
    let foreign_url = foreign.url.clone();
    let foreign_key = foreign.key_file.clone();
    let committed: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let (mut refused, mut prunes, mut swept, mut copies) = (0u32, 0u32, 0u64, 0u32);
    for round in 0..rounds {
        let done = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = [("-1h", false), ("+0", false), ("+1h", true)]
            .into_iter()
            .enumerate()
            .map(|(h, (offset, slow))| {
                let (repo, committed) = (repo.clone(), committed.clone());
                std::thread::spawn(move || {
                    let mut data = dump_like(200 + h as u64, 256 << 10);
                    data.extend_from_slice(&random_bytes(300 * round + h as u64, 4 << 20));
                    let host = format!("host-{h}");
                    let mut child = repo
                        .skewed(
                            offset,
                            &[
                                "backup", "--stdin", "--name", "db", "--host", &host, "--json",
                            ],
                        )
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap();
                    let mut stdin = child.stdin.take().unwrap();
                    let half = data.len() / 2;
                    let _ = stdin.write_all(&data[..half]);
                    if slow {
                        // Longer than the grace period: its own packs get marked meanwhile.
                        std::thread::sleep(Duration::from_secs(3));
                    }
                    let _ = stdin.write_all(&data[half..]);
                    drop(stdin);
                    let out = child.wait_with_output().unwrap();
                    if out.status.success() {
                        let id = snapshot_id(&out.stdout);
                        committed.lock().unwrap().insert(id, sha256(&data));
                        true
                    } else {
                        let err = assert_code(&out, 1, "a writer racing prune");
                        assert!(err.contains("nothing was committed"), "{err}");
                        false
                    }
                })
            })
            .collect();
        let pruner = {
            let (repo, done) = (repo.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut runs, mut deleted) = (0u32, 0u64);
                let offsets = ["+1h", "-1h", "+0"];
                while !done.load(Ordering::Relaxed) {
                    let args = [
                        "forget",
                        "--keep-last",
                        "2",
                        "--prune",
                        "--grace",
                        "2s",
                        "--unsafe-short-grace",
                        "--json",
                    ];
                    let out = repo
                        .skewed(offsets[runs as usize % 3], &args)
                        .output()
                        .unwrap();
                    if out.status.success() {
                        let v = json(&out.stdout);
                        deleted += count(&v["prune"], "packs_deleted");
                        runs += 1;
                    } else {
                        // Another prune holding the repository is the only excuse.
                        let err = text(&out.stderr);
                        assert!(err.contains("another prune"), "{err}");
                    }
                    std::thread::sleep(Duration::from_millis(400));
                }
                (runs, deleted)
            })
        };
        let copier = {
            let (repo, done) = (repo.clone(), done.clone());
            let (url, key) = (foreign_url.clone(), foreign_key.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    let out = repo
                        .command(&["copy", "--latest", "--to", &url, "--quiet"])
                        .env("KLUIS_TO_KEY_FILE", &key)
                        .output()
                        .unwrap();
                    // A source snapshot forgotten or swept while it was being copied fails the
                    // copy of it, and commits nothing; anything else is a failure.
                    if !out.status.success() {
                        let err = text(&out.stderr);
                        assert!(
                            err.contains("nothing was committed")
                                || err.contains("missing")
                                || err.contains("not found"),
                            "{err}"
                        );
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
                n
            })
        };
        for w in writers {
            if !w.join().unwrap() {
                refused += 1;
            }
        }
        done.store(true, Ordering::Relaxed);
        let (runs, deleted) = pruner.join().unwrap();
        copies += copier.join().unwrap();
        prunes += runs;
        swept += deleted;

        repo.ok(&["check", "--read-data"]);
        let committed = committed.lock().unwrap();
        for (id, sha) in listed(&repo) {
            assert_eq!(
                Some(&sha),
                committed.get(&id),
                "round {round}: {id} was never committed"
            );
            assert_eq!(
                &sha256(&repo.restore_stdout(&id)),
                &sha,
                "round {round}: {id}"
            );
        }
        foreign.ok(&["check", "--read-data"]);
        for (id, sha) in listed(&foreign) {
            assert!(
                committed.values().any(|s| s == &sha),
                "round {round}: copy {id} matches no committed snapshot"
            );
            assert_eq!(&sha256(&foreign.restore_stdout(&id)), &sha, "copy {id}");
        }
    }
    eprintln!(
        "{rounds} rounds: {} committed, {refused} refused to commit, {prunes} prunes deleting \
         {swept} packs, {copies} copy runs",
        committed.lock().unwrap().len()
    );
    assert!(prunes >= rounds as u32, "prune ran only {prunes} times");
}
