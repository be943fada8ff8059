//! SQLite sources and restores: fidelity, a consistent copy while a writer is busy, and
//! failures (a missing or damaged database, a full disk) that must never become snapshots.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::databases::{assert_no_plaintext, snapshot_count};
use common::*;
use rusqlite::Connection;

const HARD_CASES: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE people(
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, note TEXT, nick TEXT, data TEXT,
  amount NUMERIC, ratio REAL, seen TEXT, big TEXT,
  full_name TEXT GENERATED ALWAYS AS (name || '/' || coalesce(nick, '-')) VIRTUAL,
  name_len INT GENERATED ALWAYS AS (length(name)) STORED);
INSERT INTO people(name, note, nick, data, amount, ratio, seen) VALUES
  ('Zoë 😀 Ünïcode ✓', NULL, '', json('{"a": [1, 2, {"b": null}], "emoji": "🎉"}'),
   12345678901234567890.0123456789, 0.1, '2026-03-29T01:30:00.123456+01:00'),
  ('tab	and
newline', '', NULL, 'null', -0.0000000001, -1e308, NULL),
  ('empty strings', '', '', '""', 0, NULL, '');
INSERT INTO people(name, big) VALUES ('large', printf('%.*c', 3000000, 'x'));
CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB, empty BLOB);
WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < 255)
  INSERT INTO blobs SELECT 1, (SELECT group_concat(char(n), '') FROM g), NULL;
UPDATE blobs SET b = CAST(b AS BLOB);
INSERT INTO blobs VALUES (2, x'', x'00');
CREATE TABLE invoices(
  id INTEGER PRIMARY KEY, person INT NOT NULL REFERENCES people(id) ON DELETE CASCADE,
  total NUMERIC CHECK (total >= 0), UNIQUE (person, id));
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 20000)
  INSERT INTO invoices SELECT n, 1 + n % 3, n * 1.5 FROM g;
CREATE INDEX invoices_total ON invoices(total);
CREATE TABLE "we""ird tab"(id INTEGER PRIMARY KEY, "Value" TEXT) WITHOUT ROWID;
INSERT INTO "we""ird tab" VALUES (1, 'x'), (2, '\N is not null');
CREATE VIEW totals AS SELECT person, sum(total) AS total FROM invoices GROUP BY person;
CREATE TRIGGER clamp BEFORE INSERT ON invoices
  BEGIN SELECT RAISE(ABORT, 'too big') WHERE NEW.total > 1000000; END;
UPDATE sqlite_sequence SET seq = 90000 WHERE name = 'people';
"#;

/// Schema and every table's rows, in a stable order, with blobs as hex.
fn fingerprint(path: &Path) -> String {
    let c = Connection::open(path).unwrap();
    let mut out = String::new();
    let mut stmt = c
        .prepare("SELECT type, name, sql FROM sqlite_schema ORDER BY type, name")
        .unwrap();
    let schema: Vec<(String, String, Option<String>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (kind, name, sql) in &schema {
        out.push_str(&format!(
            "{kind} {name}: {}\n",
            sql.as_deref().unwrap_or("")
        ));
        if kind != "table" {
            continue;
        }
        let q = format!("SELECT * FROM \"{}\" ORDER BY 1", name.replace('"', "\"\""));
        let mut rows = c.prepare(&q).unwrap();
        let n = rows.column_count();
        let mut r = rows.query([]).unwrap();
        while let Some(row) = r.next().unwrap() {
            for i in 0..n {
                use rusqlite::types::ValueRef;
                let v = match row.get_ref(i).unwrap() {
                    ValueRef::Null => "NULL".to_string(),
                    ValueRef::Integer(x) => format!("i{x}"),
                    ValueRef::Real(x) => format!("r{x:e}"),
                    ValueRef::Text(t) => format!("t{}", String::from_utf8_lossy(t)),
                    ValueRef::Blob(b) => format!("b{}", hex(b)),
                };
                out.push_str(&v);
                out.push('|');
            }
            out.push('\n');
        }
    }
    out
}

fn sqlite_url(p: &Path) -> String {
    format!("sqlite://{}", p.display())
}

#[test]
fn sqlite_round_trip_is_faithful() {
    let repo = Repo::init_file(&[]);
    let db = repo.path().join("app.db");
    Connection::open(&db)
        .unwrap()
        .execute_batch(HARD_CASES)
        .unwrap();
    let want = fingerprint(&db);
    assert!(
        want.contains("b000102"),
        "the blob of every byte is missing: {want:.300}"
    );

    let out = repo.run(&["backup", "--json", &sqlite_url(&db)]);
    assert_success(&out, &["backup", "sqlite://"]);
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["name"], "app");
    assert_eq!(snap["source"]["kind"], "sqlite");
    let tables = snap["source"]["tables"].as_array().unwrap();
    let rows = |name: &str| {
        tables.iter().find(|t| t["name"] == name).unwrap()["rows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(rows("invoices"), 20000);
    assert_eq!(rows("people"), 4);
    assert_eq!(rows("we\"ird tab"), 2);
    assert!(
        snap["source"]["server_version"]
            .as_str()
            .unwrap()
            .starts_with("SQLite 3."),
        "{snap}"
    );

    let target = repo.path().join("restored.db");
    repo.ok(&["restore", "latest", "--to", &sqlite_url(&target)]);
    assert_eq!(
        fingerprint(&target),
        want,
        "data differs after restore --to"
    );

    // The database file itself on standard output.
    let out = repo.run(&["restore", "latest", "--stdout"]);
    assert_success(&out, &["restore", "--stdout"]);
    let piped = repo.path().join("piped.db");
    fs::write(&piped, &out.stdout).unwrap();
    assert_eq!(fingerprint(&piped), want, "data differs via --stdout");

    // The database file in a directory.
    let dir = repo.path().join("as-file");
    repo.ok(&["restore", "latest", "--target", dir.to_str().unwrap()]);
    let files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(fingerprint(&files[0]), want, "data differs via --target");

    // An existing database is not replaced without --force.
    let out = repo.run(&["restore", "latest", "--to", &sqlite_url(&target)]);
    let err = assert_code(&out, EXIT_USAGE, "restore over an existing database");
    assert!(err.contains("--force"), "{err}");
    Connection::open(&target)
        .unwrap()
        .execute_batch("DELETE FROM invoices")
        .unwrap();
    repo.ok(&["restore", "latest", "--to", &sqlite_url(&target), "--force"]);
    assert_eq!(fingerprint(&target), want, "data differs after --force");

    assert_no_plaintext(&repo, b"empty strings");
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn sqlite_copy_is_consistent_under_concurrent_writes() {
    let repo = Repo::init_file(&[]);
    let db = repo.path().join("bank.db");
    Connection::open(&db)
        .unwrap()
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE checking(id INTEGER PRIMARY KEY, balance INT NOT NULL);
             CREATE TABLE savings(id INTEGER PRIMARY KEY, balance INT NOT NULL, pad TEXT);
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2000)
               INSERT INTO checking SELECT n, 1000 FROM g;
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2000)
               INSERT INTO savings SELECT n, 1000, printf('%.*c', 2000, 'p') FROM g;",
        )
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let c = Connection::open(&db).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
            let mut moved = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (a, b) = (1 + (moved * 7919) % 2000, 1 + (moved * 104_729) % 2000);
                c.execute_batch(&format!(
                    "BEGIN IMMEDIATE; UPDATE checking SET balance = balance - 3 WHERE id = {a};
                     UPDATE savings SET balance = balance + 3 WHERE id = {b}; COMMIT;"
                ))
                .unwrap();
                moved += 1;
            }
            moved
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..3 {
        repo.ok(&["backup", &sqlite_url(&db)]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let moved = writer.join().unwrap();
    assert!(
        moved > 100,
        "the writer barely ran ({moved}): test proves nothing"
    );
    let out = repo.ok(&["snapshots", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
    for (i, s) in list.as_array().unwrap().iter().enumerate() {
        let id = s["id"].as_str().unwrap();
        let target = repo.path().join(format!("restored{i}.db"));
        repo.ok(&["restore", id, "--to", &sqlite_url(&target)]);
        let total: i64 = Connection::open(&target)
            .unwrap()
            .query_row(
                "SELECT (SELECT sum(balance) FROM checking) + (SELECT sum(balance) FROM savings)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(total, 4_000_000, "snapshot {id} is not consistent");
    }
}

/// A 1 MiB tmpfs, unmounted on drop (the tests run as root, as CI does).
#[test]
fn sqlite_failures_never_become_snapshots() {
    let repo = Repo::init_file(&[]);

    // No such file.
    let missing = repo.path().join("missing.db");
    let out = repo.run(&["backup", &sqlite_url(&missing)]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "missing database");
    assert!(err.contains("missing.db"), "{err}");

    // Not a database.
    let garbage = repo.path().join("garbage.db");
    fs::write(&garbage, random_bytes(7, 64 << 10)).unwrap();
    let out = repo.run(&["backup", &sqlite_url(&garbage)]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "not a database");
    assert!(
        err.contains("garbage.db") && err.contains("not a database"),
        "{err}"
    );

    // The temporary copy's disk is full.
    let db = repo.path().join("big.db");
    Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 3000)
               INSERT INTO t SELECT n, randomblob(1000) FROM g;",
        )
        .unwrap();
    let tiny = TinyDisk::mount();
    let out = repo
        .command(&["backup", &sqlite_url(&db)])
        .env("TMPDIR", tiny.0.path())
        .output()
        .unwrap();
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "disk full");
    assert!(err.contains("full"), "{err}");
    let left: Vec<_> = fs::read_dir(tiny.0.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "the partial copy was left behind: {left:?}"
    );

    assert_eq!(snapshot_count(&repo), 0, "a failed copy became a snapshot");
    repo.ok(&["check"]);
    repo.ok(&["backup", &sqlite_url(&db)]);
    assert_eq!(snapshot_count(&repo), 1);
}

#[test]
fn full_repository_disk_commits_nothing() {
    let tiny = TinyDisk::mount();
    let repo_dir = tiny.0.path().join("repo");
    let key = tempfile::TempDir::new().unwrap();
    let key_file = key.path().join("key");
    let run = |args: &[&str], stdin: Option<Vec<u8>>| {
        let mut c = Command::new(KLUIS);
        c.args(args)
            .env("KLUIS_REPOSITORY", &repo_dir)
            .env("KLUIS_KEY_FILE", &key_file);
        match stdin {
            None => c.output().unwrap(),
            Some(data) => {
                use std::io::Write;
                let mut child = c
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut si = child.stdin.take().unwrap();
                let feeder = std::thread::spawn(move || {
                    let _ = si.write_all(&data);
                });
                let out = child.wait_with_output().unwrap();
                feeder.join().unwrap();
                out
            }
        }
    };
    assert_success(
        &run(&["key", "generate", key_file.to_str().unwrap()], None),
        &["key"],
    );
    assert_success(&run(&["init"], None), &["init"]);
    let small = random_bytes(1, 100 << 10);
    assert_success(
        &run(
            &["backup", "--stdin", "--name", "small"],
            Some(small.clone()),
        ),
        &["backup small"],
    );
    // Incompressible and bigger than the disk.
    let out = run(
        &["backup", "--stdin", "--name", "big"],
        Some(random_bytes(2, 3 << 20)),
    );
    let err = assert_code(&out, 1, "repository disk full");
    assert!(err.contains("No space left"), "{err}");
    let list = run(&["snapshots", "--json"], None);
    assert_success(&list, &["snapshots"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "only the small snapshot exists"
    );
    assert_success(&run(&["check", "--read-data"], None), &["check"]);
    let out = run(&["restore", "latest", "--stdout"], None);
    assert_success(&out, &["restore"]);
    assert_eq!(out.stdout, small);
}
