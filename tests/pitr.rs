//! PostgreSQL point-in-time recovery (issue 21), with a real server the test starts: its
//! `archive_command` is `kluis wal push`, and what it archived comes back bit for bit.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// A repository the server's own user writes WAL into, and a root-owned copy of its key for
/// the test's own commands (a secret file must belong to the user reading it).
struct Archive {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    /// The server user's key file and state directory.
    server_key: PathBuf,
    server_state: PathBuf,
    /// The test's copy of the key.
    key: PathBuf,
    state: PathBuf,
}

impl Archive {
    fn new() -> Archive {
        let top = tempfile::TempDir::new().unwrap();
        // The server's user must reach its directory below it.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(top.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let dir = top.path().join("server");
        fs::create_dir(&dir).unwrap();
        chown_to_server(&dir);
        let (key, state) = (top.path().join("root.key"), top.path().join("root-state"));
        let out = Command::new(KLUIS)
            .args(["key", "generate"])
            .arg(&key)
            .output()
            .unwrap();
        assert_success(&out, &["key generate"]);
        let server_key = dir.join("key");
        fs::copy(&key, &server_key).unwrap();
        let server_state = dir.join("state");
        chown_to_server(&server_key);
        let archive = Archive {
            _dir: top,
            repo: dir.join("repo"),
            server_key,
            server_state,
            key,
            state,
        };
        // Made by the server's user, so that its archive_command can write to it.
        let out = archive.as_server(&["init"]);
        assert_success(&out, &["kluis init as the server's user"]);
        archive
    }

    /// `kluis` as the server's user, as its archive_command runs it.
    fn as_server(&self, args: &[&str]) -> Output {
        Postgres::as_server_user(Path::new(KLUIS))
            .args(args)
            .env("KLUIS_REPOSITORY", &self.repo)
            .env("KLUIS_KEY_FILE", &self.server_key)
            .env("KLUIS_STATE_DIR", &self.server_state)
            .output()
            .unwrap()
    }

    /// `kluis` as the test (root).
    fn kluis(&self, args: &[&str]) -> Output {
        Command::new(KLUIS)
            .args(args)
            .env("KLUIS_REPOSITORY", &self.repo)
            .env("KLUIS_KEY_FILE", &self.key)
            .env("KLUIS_STATE_DIR", &self.state)
            .output()
            .unwrap()
    }

    /// `kluis wal fetch` of `file` of cluster `main` to `dest` (it must succeed); its bytes.
    fn fetch(&self, file: &str, dest: &Path) -> Vec<u8> {
        let dest_s = dest.to_str().unwrap();
        let out = self.kluis(&["wal", "fetch", "--cluster", "main", file, dest_s]);
        assert_success(&out, &["wal fetch", file]);
        fs::read(dest).unwrap()
    }

    /// The postgresql.conf lines that archive into it.
    fn settings(&self, cluster: &str) -> String {
        format!(
            "wal_level = replica\narchive_mode = on\nwal_keep_size = '1GB'\n\
             archive_command = 'KLUIS_REPOSITORY={} KLUIS_KEY_FILE={} KLUIS_STATE_DIR={} {} \
             --quiet wal push --cluster {cluster} %p'\n",
            self.repo.display(),
            self.server_key.display(),
            self.server_state.display(),
            KLUIS
        )
    }
}

/// Starts a server that archives into a new repository.
fn archiving_server(cluster: &str) -> (Postgres, Archive) {
    let archive = Archive::new();
    let pg = Postgres::start_with(&archive.settings(cluster));
    (pg, archive)
}

/// Gives `path` to the user the server runs as (tests run as root).
fn chown_to_server(path: &Path) {
    let ok = Command::new("chown")
        .arg("postgres")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown postgres {}", path.display());
}

/// Waits until the server has archived `file` (pg_stat_archiver), and failed nothing.
fn wait_archived(pg: &Postgres, file: &str) {
    let start = Instant::now();
    loop {
        let row = pg.sql(
            "postgres",
            "SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') \
             FROM pg_stat_archiver",
        );
        let cols: Vec<&str> = row.trim().split('|').collect();
        assert_eq!(
            cols[1],
            "0",
            "archive_command failed: {row}\n{}",
            server_log(pg)
        );
        if cols[0] >= file {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{file} not archived: {row}\n{}",
            server_log(pg)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn server_log(pg: &Postgres) -> String {
    fs::read_to_string(pg.dir.path().join("log")).unwrap_or_default()
}

/// Switches to a new segment; returns the name of the one it closed.
fn switch_wal(pg: &Postgres) -> String {
    pg.sql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .trim()
        .to_string()
}

#[test]
fn archive_command_pushes_every_segment_and_fetch_gives_each_back_bit_for_bit() {
    let (pg, archive) = archiving_server("main");
    pg.sql(
        "postgres",
        "CREATE TABLE t (id bigint PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200000) g;",
    );
    let mut closed = Vec::new();
    for _ in 0..3 {
        pg.sql("postgres", "UPDATE t SET v = v || 'x' WHERE id % 7 = 0");
        closed.push(switch_wal(&pg));
    }
    wait_archived(&pg, closed.last().unwrap());

    let out = archive.kluis(&["wal", "list", "--cluster", "main", "--json"]);
    assert_success(&out, &["wal list"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["file"].as_str().unwrap().to_string())
        .collect();
    for c in &closed {
        assert!(files.contains(c), "{c} not listed: {files:?}");
    }
    // Every archived segment still in pg_wal comes back identical, and it was stored
    // compressed.
    let wal_dir = pg.data().join("pg_wal");
    let dest = pg.dir.path().join("fetched");
    let (mut compared, mut raw, mut stored) = (0, 0u64, 0u64);
    for a in listed.as_array().unwrap() {
        let file = a["file"].as_str().unwrap();
        let Ok(original) = fs::read(wal_dir.join(file)) else {
            continue;
        };
        assert!(archive.fetch(file, &dest) == original, "{file} differs");
        compared += 1;
        raw += original.len() as u64;
        stored += a["size"].as_u64().unwrap();
    }
    assert!(compared >= 3, "compared {compared} segments");
    assert!(stored < raw / 2, "{stored} bytes stored for {raw}");
    // Pushed again (PostgreSQL retrying after a crash): accepted as archived.
    let again = wal_dir.join(&closed[0]);
    let out = archive.as_server(&["wal", "push", "--cluster", "main", again.to_str().unwrap()]);
    assert_success(&out, &["wal push again"]);
    assert!(
        text(&out.stderr).contains("archived already"),
        "{}",
        text(&out.stderr)
    );
    // A file the archive does not hold: exit 1, the end of the WAL to a recovery.
    let out = archive.kluis(&[
        "wal",
        "fetch",
        "--cluster",
        "main",
        "0000000100000099000000FF",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not in the archive"),
        "{}",
        text(&out.stderr)
    );
    // Another cluster's name sees none of it.
    let out = archive.kluis(&["wal", "list", "--cluster", "other", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");
    // The archive checks clean, and the WAL is sealed: no segment's text shows in it.
    let out = archive.kluis(&["check"]);
    assert_success(&out, &["check with WAL"]);
}

/// A password file for the server's superuser, the server user's (base backups run as that
/// user, as its archive_command does: a `file://` repository is private to one user).
fn password(archive: &Archive) -> PathBuf {
    let p = archive.server_state.with_file_name("pg-password");
    fs::write(&p, Postgres::PASSWORD).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    chown_to_server(&p);
    p
}

/// A base backup of cluster `main`, as the server's user; the snapshot.
fn base_backup(pg: &Postgres, archive: &Archive) -> serde_json::Value {
    let pw = password(archive);
    let out = archive.as_server(&[
        "backup",
        "--base-backup",
        "main",
        &pg.url("postgres"),
        "--db-password-file",
        pw.to_str().unwrap(),
        "--json",
    ]);
    assert_success(&out, &["backup --base-backup"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Restores the newest base backup `main.base` with `extra` arguments into a new data
/// directory, and starts a server on it; waits until it has recovered and promoted itself.
fn recover(archive: &Archive, extra: &[&str]) -> Postgres {
    let home = Postgres::new_home();
    let data = home.path().join("data");
    let mut args = vec!["restore"];
    args.extend_from_slice(extra);
    args.extend(["--name", "main.base", "--target", data.to_str().unwrap()]);
    let out = archive.kluis(&args);
    assert_success(&out, &args);
    let restored = Postgres::start_on(home);
    let start = Instant::now();
    while restored
        .sql("postgres", "SELECT pg_is_in_recovery()")
        .trim()
        != "f"
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still in recovery: {}",
            server_log(&restored)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    restored
}

#[test]
fn a_restore_to_a_time_between_two_transactions_holds_the_first_and_not_the_second() {
    let (pg, archive) = archiving_server("main");
    pg.sql("postgres", "CREATE TABLE t (id int PRIMARY KEY, note text)");
    let base = base_backup(&pg, &archive);
    assert_eq!(base["source"]["kind"], "postgres-base", "{base}");
    assert_eq!(base["name"], "main.base");
    pg.sql("postgres", "INSERT INTO t VALUES (1, 'first')");
    std::thread::sleep(Duration::from_millis(1200));
    let between = pg.sql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(1200));
    pg.sql("postgres", "INSERT INTO t VALUES (2, 'second')");
    let lsn = pg.sql("postgres", "SELECT pg_current_wal_insert_lsn()");
    pg.sql("postgres", "SELECT pg_create_restore_point('before-third')");
    pg.sql("postgres", "INSERT INTO t VALUES (3, 'third')");
    wait_archived(&pg, &switch_wal(&pg));

    let restored = recover(&archive, &["--at", between.trim()]);
    assert_eq!(
        restored
            .sql(
                "postgres",
                "SELECT string_agg(note, ',' ORDER BY id) FROM t"
            )
            .trim(),
        "first",
        "{}",
        server_log(&restored)
    );
    drop(restored);
    // To a named restore point, and to a WAL location: the first two.
    for target in [
        ["latest", "--until-restore-point", "before-third"],
        ["latest", "--until-lsn", lsn.trim()],
    ] {
        let restored = recover(&archive, &target);
        let notes = restored.sql(
            "postgres",
            "SELECT string_agg(note, ',' ORDER BY id) FROM t",
        );
        assert_eq!(
            notes.trim(),
            "first,second",
            "{target:?}: {}",
            server_log(&restored)
        );
    }
    // To the end of the archive: all three.
    let latest = recover(&archive, &["latest"]);
    let notes = latest.sql(
        "postgres",
        "SELECT string_agg(note, ',' ORDER BY id) FROM t",
    );
    assert_eq!(notes.trim(), "first,second,third");
    // A time before the base backup ended has no base backup to start from.
    let out = archive.kluis(&[
        "restore",
        "--at",
        "2020-01-01T00:00:00Z",
        "--name",
        "main.base",
        "--target",
        "/tmp/never",
    ]);
    assert!(!out.status.success());
}

#[test]
fn after_a_sigkill_of_the_primary_latest_holds_every_row_committed_more_than_60_s_before() {
    // The floor: a writer commits a row every 100 ms, archive_timeout is 60 s.
    let archive = Archive::new();
    let pg = Postgres::start_with(&format!(
        "{}archive_timeout = '60s'\n",
        archive.settings("main")
    ));
    pg.sql(
        "postgres",
        "CREATE TABLE beat (id int PRIMARY KEY, at timestamptz NOT NULL)",
    );
    base_backup(&pg, &archive);
    // One psql session, fed a row every 100 ms; each row's commit time is its `at`.
    let mut writer = pg
        .psql()
        .args(["-d", "postgres"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut input = writer.stdin.take().unwrap();
    let started = Instant::now();
    let mut id = 0;
    while started.elapsed() < Duration::from_secs(75) {
        id += 1;
        let row = format!("INSERT INTO beat VALUES ({id}, clock_timestamp());\n");
        if std::io::Write::write_all(&mut input, row.as_bytes()).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed_at = jiff::Timestamp::now();
    pg.kill9();
    drop(input);
    let _ = writer.wait();

    let restored = recover(&archive, &["latest"]);
    let row = restored.sql(
        "postgres",
        "SELECT count(*), max(id), \
         to_char(max(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM beat",
    );
    let cols: Vec<&str> = row.trim().split('|').collect();
    let (count, newest): (u64, jiff::Timestamp) =
        (cols[0].parse().unwrap(), cols[2].parse().unwrap());
    let lost = killed_at.duration_since(newest);
    eprintln!(
        "RPO measured: {count} of {id} rows sent were restored; the newest was committed {:.1} s \
         before the SIGKILL",
        lost.as_secs_f64()
    );
    // No gap: rows 1..=max are all there.
    assert_eq!(cols[0], cols[1], "rows missing in the middle: {row}");
    // Every row committed more than 60 s (and the archiver's push, < 1 s) before the kill.
    assert!(
        lost < jiff::SignedDuration::from_secs(61),
        "the newest restored row was committed {lost:?} before the kill"
    );
}

#[test]
fn a_restore_follows_a_new_timeline_after_a_failover() {
    let (pg, archive) = archiving_server("main");
    pg.sql("postgres", "CREATE TABLE t (id int PRIMARY KEY, note text)");
    base_backup(&pg, &archive);
    pg.sql("postgres", "INSERT INTO t VALUES (1, 'before')");
    wait_archived(&pg, &switch_wal(&pg));
    drop(pg);
    // The old primary is gone; a server recovered from the archive takes over (a new
    // timeline) and archives under the same cluster name.
    let primary = recover(&archive, &["latest", "--keep-archiving"]);
    assert_eq!(
        primary
            .sql(
                "postgres",
                "SELECT timeline_id FROM pg_control_checkpoint()"
            )
            .trim(),
        "2"
    );
    primary.sql("postgres", "INSERT INTO t VALUES (2, 'after the failover')");
    wait_archived(&primary, &switch_wal(&primary));
    // From the same base backup, latest follows timeline 2 (its history file is archived).
    let restored = recover(&archive, &["latest"]);
    assert_eq!(
        restored
            .sql(
                "postgres",
                "SELECT string_agg(note, ',' ORDER BY id) FROM t"
            )
            .trim(),
        "before,after the failover",
        "{}",
        server_log(&restored)
    );
    let out = archive.kluis(&["wal", "list", "--cluster", "main", "--json"]);
    assert!(text(&out.stdout).contains("00000002.history"));
}

#[test]
fn wal_push_killed_at_random_points_loses_no_segment_and_reports_none_it_did_not_store() {
    let archive = Archive::new();
    // Each file's first push is killed with SIGKILL at a random point in its first 100 ms;
    // PostgreSQL then retries it (and the second push runs to its end).
    let dir = archive.server_state.with_file_name("flaky");
    fs::create_dir_all(dir.join("tried")).unwrap();
    let script = dir.join("push.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             tried={tried}/$(basename \"$1\")\n\
             KLUIS_REPOSITORY={repo} KLUIS_KEY_FILE={key} KLUIS_STATE_DIR={state} \
             {kluis} --quiet wal push --cluster main \"$1\" &\n\
             p=$!\n\
             if [ ! -e \"$tried\" ]; then\n\
               touch \"$tried\"\n\
               sleep 0.$(od -An -N2 -tu2 /dev/urandom | awk '{{printf \"%03d\", $1 % 100}}')\n\
               if kill -9 $p 2>/dev/null; then wait $p; exit 1; fi\n\
             fi\n\
             wait $p\n",
            tried = dir.join("tried").display(),
            repo = archive.repo.display(),
            key = archive.server_key.display(),
            state = archive.server_state.display(),
            kluis = KLUIS,
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    for p in [&dir, &dir.join("tried"), &script] {
        chown_to_server(p);
    }
    let pg = Postgres::start_with(&format!(
        "wal_level = replica\narchive_mode = on\nwal_keep_size = '1GB'\n\
         archive_command = '{} %p'\n",
        script.display()
    ));
    pg.sql("postgres", "CREATE TABLE t (id bigint PRIMARY KEY, v text)");
    let mut closed = Vec::new();
    for round in 0..8 {
        pg.sql(
            "postgres",
            &format!(
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g",
                round * 20_000 + 1,
                (round + 1) * 20_000
            ),
        );
        closed.push(switch_wal(&pg));
    }
    // Every file is archived in the end, though first pushes failed.
    let last = closed.last().unwrap().clone();
    let start = Instant::now();
    loop {
        let row = pg.sql(
            "postgres",
            "SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver",
        );
        let cols: Vec<&str> = row.trim().split('|').collect();
        if cols[0] >= last.as_str() {
            eprintln!("archived through {}; {} push(es) killed", cols[0], cols[1]);
            let killed: u32 = cols[1].parse().unwrap();
            assert!(killed >= 2, "only {killed} kill(s) landed mid-push");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{last} not archived: {row}\n{}",
            server_log(&pg)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // No segment is missing, and each archived one is the server's, bit for bit.
    let wal_dir = pg.data().join("pg_wal");
    let dest = archive._dir.path().join("fetched");
    let mut segments: Vec<String> = fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() <= last.as_str())
        .collect();
    segments.sort();
    assert!(segments.len() >= 8, "{segments:?}");
    for file in &segments {
        assert!(
            archive.fetch(file, &dest) == fs::read(wal_dir.join(file)).unwrap(),
            "{file}"
        );
    }
    assert_success(&archive.kluis(&["check"]), &["check after killed pushes"]);
}

#[test]
fn check_finds_a_missing_wal_segment_before_any_restore_needs_it() {
    let (pg, archive) = archiving_server("main");
    pg.sql("postgres", "CREATE TABLE t (id int PRIMARY KEY)");
    base_backup(&pg, &archive);
    let mut closed = Vec::new();
    for i in 0..4 {
        pg.sql("postgres", &format!("INSERT INTO t VALUES ({i})"));
        closed.push(switch_wal(&pg));
    }
    wait_archived(&pg, closed.last().unwrap());
    let out = archive.kluis(&["check", "--read-data", "--json"]);
    assert_success(&out, &["check of a whole archive"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["wal"]["files"].as_u64().unwrap() >= 5, "{report}");
    // A segment in the middle goes (a bucket lifecycle rule, a slip of the hand).
    let gone = &closed[1];
    let mut removed = false;
    let mut stack = vec![archive.repo.join("wal")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() == gone.as_str() {
                fs::remove_file(&p).unwrap();
                removed = true;
            }
        }
    }
    assert!(removed);
    let out = archive.kluis(&["check"]);
    let err = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(13), "{err}");
    assert!(
        err.contains(&format!("segment {gone} is missing")) && err.contains("cluster main"),
        "{err}"
    );
}
