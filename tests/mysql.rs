//! MySQL/MariaDB sources and restores against a real MariaDB server the harness starts:
//! fidelity of the hard cases, consistency under concurrent writes, and failures that must
//! never become snapshots.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::databases::*;
use common::mariadb::Mariadb;
use common::*;

/// Everything a dump must carry faithfully.
const HARD_CASES: &str = r#"
CREATE TABLE people(
  id int AUTO_INCREMENT PRIMARY KEY, name varchar(200) NOT NULL, note text, nick varchar(50),
  born date, data json, amount decimal(65,30), seen timestamp(6) NULL, at datetime(6),
  big longtext, ratio double,
  full_name varchar(300) AS (concat(name, '/', coalesce(nick, '-'))) VIRTUAL,
  name_len int AS (char_length(name)) STORED,
  KEY by_nick (nick), FULLTEXT KEY ft (note)
) ENGINE=InnoDB;
INSERT INTO people(name, note, nick, born, data, amount, seen, at, ratio) VALUES
  ('Zoë 😀 Ünïcode ✓', NULL, '', '2000-02-29', '{"a": [1, 2, {"b": null}], "emoji": "🎉"}',
   12345678901234567890.012345678901234567890123456789, '2026-03-29 01:30:00.123456',
   '2026-10-25 02:30:00.5', 0.1),
  ('tab	and
newline and back\\slash and quote '' "', '', NULL, NULL, 'null', -0.000000000000000000000000000001,
   NULL, '1000-01-01 00:00:00', -1e308),
  ('empty strings', '', '', '9999-12-31', '""', 0, '1970-01-02 00:00:00', NULL, NULL);
INSERT INTO people(name, big) VALUES ('large', repeat('abcdefghij', 300000));
ALTER TABLE people AUTO_INCREMENT = 90000;
CREATE TABLE blobs(id int PRIMARY KEY, b blob, nothing varbinary(10), bits bit(12));
INSERT INTO blobs VALUES (1, unhex(concat(
  '000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F',
  '202122232425262728292A2B2C2D2E2F303132333435363738393A3B3C3D3E3F',
  '404142434445464748494A4B4C4D4E4F505152535455565758595A5B5C5D5E5F',
  '606162636465666768696A6B6C6D6E6F707172737475767778797A7B7C7D7E7F',
  '808182838485868788898A8B8C8D8E8F909192939495969798999A9B9C9D9E9F',
  'A0A1A2A3A4A5A6A7A8A9AAABACADAEAFB0B1B2B3B4B5B6B7B8B9BABBBCBDBEBF',
  'C0C1C2C3C4C5C6C7C8C9CACBCCCDCECFD0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF',
  'E0E1E2E3E4E5E6E7E8E9EAEBECEDEEEFF0F1F2F3F4F5F6F7F8F9FAFBFCFDFEFF')), NULL, b'101');
INSERT INTO blobs VALUES (2, '', 0x00, NULL);
CREATE TABLE invoices(
  id bigint AUTO_INCREMENT PRIMARY KEY, person int NOT NULL, total decimal(20,2) CHECK (total >= 0),
  issued datetime DEFAULT CURRENT_TIMESTAMP, UNIQUE KEY (person, id),
  CONSTRAINT fk_person FOREIGN KEY (person) REFERENCES people(id) ON DELETE CASCADE
) ENGINE=InnoDB;
INSERT INTO invoices(person, total, issued)
  SELECT 1 + seq % 3, seq * 1.5, '2026-01-01' + INTERVAL seq HOUR FROM seq_1_to_20000;
CREATE INDEX invoices_total ON invoices(total);
CREATE TABLE nokey(a int, b text);
INSERT INTO nokey VALUES (1, 'one'), (2, NULL), (1, 'one');
CREATE TABLE `we``ird tab`(id int PRIMARY KEY, `Value` text);
INSERT INTO `we``ird tab` VALUES (1, 'x'), (2, '\\N is not null'), (3, 'INSERT INTO `x` VALUES (1);');
CREATE TABLE composite(a int, b varchar(10), v int, PRIMARY KEY (b, a));
INSERT INTO composite SELECT seq % 10, concat('k', seq DIV 10), seq FROM seq_1_to_500;
CREATE TABLE empty_one(id int PRIMARY KEY);
CREATE VIEW totals AS SELECT person, sum(total) AS total FROM invoices GROUP BY person;
DELIMITER //
CREATE FUNCTION clamp_total(x decimal(20,2)) RETURNS decimal(20,2) DETERMINISTIC
  RETURN LEAST(x, 1000000)//
CREATE TRIGGER clamp BEFORE INSERT ON invoices FOR EACH ROW
  BEGIN SET NEW.total = clamp_total(NEW.total); END//
CREATE PROCEDURE noop(x int) BEGIN SELECT x; END//
DELIMITER ;
CREATE EVENT nightly ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 03:00:00' DO DELETE FROM nokey WHERE a > 100;
"#;

fn setup() -> (Mariadb, Repo, PathBuf) {
    let db = Mariadb::start();
    let repo = Repo::init_file(&[]);
    let pw = password_file(&repo, Mariadb::PASSWORD);
    (db, repo, pw)
}

#[test]
fn mysql_round_trip_is_faithful() {
    let (db, repo, pw) = setup();
    db.sql(
        "",
        "CREATE DATABASE shop CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
    );
    db.sql("shop", HARD_CASES);
    let out = run_with_pw(&repo, &pw, &["backup", "--json", &db.url("shop")]);
    assert_success(&out, &["backup", "mysql://"]);
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["name"], "shop");
    assert_eq!(snap["source"]["kind"], "mysql");
    assert!(
        snap["source"]["server_version"]
            .as_str()
            .unwrap()
            .contains("MariaDB"),
        "{snap}"
    );
    assert_eq!(snap["source"]["collation"], "utf8mb4_unicode_ci");
    let tables = snap["source"]["tables"].as_array().unwrap();
    let rows = |name: &str| {
        tables
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("table {name} not recorded: {tables:?}"))["rows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(rows("invoices"), 20000);
    assert_eq!(rows("people"), 4);
    assert_eq!(rows("we`ird tab"), 3);
    assert_eq!(rows("nokey"), 3);
    assert_eq!(rows("composite"), 500);
    assert_eq!(rows("empty_one"), 0);
    assert_eq!(tables.len(), 7, "views are not tables: {tables:?}");

    let want_schema = db.schema("shop");
    let want_data = db.fingerprint("shop");
    assert!(
        want_schema.contains("AUTO_INCREMENT=90000"),
        "{want_schema}"
    );

    // Into a new database, created by the restore with the source's collation.
    let out = run_with_pw(&repo, &pw, &["restore", "latest", "--to", &db.url("copy")]);
    assert_success(&out, &["restore", "--to"]);
    assert_eq!(
        db.schema("copy"),
        want_schema,
        "schema differs after restore --to"
    );
    assert_eq!(
        db.fingerprint("copy"),
        want_data,
        "data differs after restore --to"
    );
    // The fingerprint sees one empty string turned into NULL.
    db.sql(
        "copy",
        "UPDATE people SET note = NULL WHERE name = 'empty strings'",
    );
    assert_ne!(db.fingerprint("copy"), want_data, "{want_data}");
    let collation = db.sql(
        "",
        "SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'copy'",
    );
    assert_eq!(collation.trim(), "utf8mb4_unicode_ci");
    let routines = db.sql("copy", "SELECT clamp_total(5000000); SHOW EVENTS;");
    assert!(routines.starts_with("1000000.00"), "{routines}");
    assert!(routines.contains("nightly"), "{routines}");

    // As a plain SQL dump, loaded by the mariadb client.
    let out = repo.run(&["restore", "latest", "--stdout"]);
    assert_success(&out, &["restore", "--stdout"]);
    db.sql(
        "",
        "CREATE DATABASE viaclient CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
    );
    db.sql("viaclient", &text(&out.stdout));
    assert_eq!(
        db.schema("viaclient"),
        want_schema,
        "schema differs via --stdout"
    );
    assert_eq!(
        db.fingerprint("viaclient"),
        want_data,
        "data differs via --stdout"
    );

    // A non-empty target is refused unless --force, which replaces it.
    let out = run_with_pw(&repo, &pw, &["restore", "latest", "--to", &db.url("copy")]);
    let err = assert_code(&out, EXIT_USAGE, "restore into a non-empty database");
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    db.sql("copy", "DELETE FROM invoices WHERE id < 100");
    let out = run_with_pw(
        &repo,
        &pw,
        &["restore", "latest", "--to", &db.url("copy"), "--force"],
    );
    assert_success(&out, &["restore", "--force"]);
    assert_eq!(
        db.fingerprint("copy"),
        want_data,
        "data differs after --force"
    );

    // Nothing readable in the repository, and no password in it either.
    assert_no_plaintext(&repo, b"empty strings");
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn mysql_snapshot_is_consistent_under_concurrent_writes() {
    let (db, repo, pw) = setup();
    db.sql("", "CREATE DATABASE bank");
    // Money moves between two tables; the total across both never changes. Without one
    // transaction for the whole dump, the restored total would be off.
    db.sql(
        "bank",
        "CREATE TABLE checking(id int PRIMARY KEY, balance bigint NOT NULL) ENGINE=InnoDB;
         CREATE TABLE savings(id int PRIMARY KEY, balance bigint NOT NULL, pad text) ENGINE=InnoDB;
         INSERT INTO checking SELECT seq, 1000 FROM seq_1_to_2000;
         INSERT INTO savings SELECT seq, 1000, repeat('p', 2000) FROM seq_1_to_2000;",
    );
    let writer = Writer::start(
        db.client().arg("--database=bank"),
        transfers("START TRANSACTION", 60_000),
    );
    let mut backups = 0;
    for _ in 0..3 {
        let out = run_with_pw(&repo, &pw, &["backup", &db.url("bank")]);
        assert_success(&out, &["backup", "bank"]);
        backups += 1;
    }
    writer.stop();
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), backups);
    for (i, id) in ids.iter().enumerate() {
        let target = format!("restored{i}");
        let out = run_with_pw(&repo, &pw, &["restore", id, "--to", &db.url(&target)]);
        assert_success(&out, &["restore", id]);
        let total = db.sql(&target, BANK_TOTAL_SQL);
        assert_eq!(total.trim(), BANK_TOTAL, "snapshot {id} is not consistent");
    }
}

#[test]
fn mysql_failures_never_become_snapshots() {
    let (mut db, repo, pw) = setup();
    db.sql("", "CREATE DATABASE app");
    db.sql(
        "app",
        "CREATE TABLE open_data(id int PRIMARY KEY, v text);
         CREATE TABLE secrets(id int PRIMARY KEY, v text);
         INSERT INTO open_data SELECT seq, md5(seq) FROM seq_1_to_50000;
         INSERT INTO secrets VALUES (1, 'x');
         CREATE USER 'limited'@'127.0.0.1' IDENTIFIED BY 'limited-pw';
         GRANT SELECT ON app.open_data TO 'limited'@'127.0.0.1';",
    );

    // Wrong password.
    let wrong = password_file(&repo, "not-the-password");
    let out = run_with_pw(&repo, &wrong, &["backup", &db.url("app")]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "wrong database password");
    assert!(err.contains("Access denied"), "{err}");
    assert!(
        !err.contains("not-the-password"),
        "the password leaked: {err}"
    );

    // Missing table permissions.
    let limited = password_file(&repo, "limited-pw");
    let url = format!("mysql://limited@127.0.0.1:{}/app", db.port);
    let out = run_with_pw(&repo, &limited, &["backup", &url]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "missing permissions");
    assert!(err.contains("secrets") || err.contains("denied"), "{err}");

    // A database that does not exist.
    let out = run_with_pw(&repo, &pw, &["backup", &db.url("nosuchdb")]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "missing database");
    assert!(err.contains("nosuchdb"), "{err}");

    // No room for the option file that carries the credentials (a full temporary directory).
    let tiny = TinyDisk::mount();
    let filler = tiny.0.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let out = command_with_pw(&repo, &pw, &["backup", &db.url("app")])
        .env("TMPDIR", tiny.0.path())
        .output()
        .unwrap();
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "no room for the option file");
    assert!(
        err.contains("option file") && err.contains("space"),
        "{err}"
    );
    drop(tiny);

    // A password in the URL is refused before anything runs.
    let with_pw = format!("mysql://kluis:hunter2@127.0.0.1:{}/app", db.port);
    let out = repo.run(&["backup", &with_pw]);
    let err = assert_code(&out, EXIT_USAGE, "password in URL");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");

    // mariadb-dump killed mid-way, and its output cut short: wrappers around the real one,
    // first on PATH.
    let real = which("mariadb-dump");
    let client = which("mariadb");
    for (label, body) in [
        (
            "killed",
            format!("\"{}\" \"$@\" | head -c 3000; kill -9 $$", real.display()),
        ),
        (
            "truncated",
            // The rest is read and dropped, so the real tool does not fail on a closed pipe.
            format!(
                "\"{}\" \"$@\" | {{ head -c 3000; cat >/dev/null; }}",
                real.display()
            ),
        ),
    ] {
        let dir = repo.path().join(format!("bin-{label}"));
        fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&client, dir.join("mariadb")).unwrap();
        let script = dir.join("mariadb-dump");
        fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
        let out = command_with_pw(&repo, &pw, &["backup", &db.url("app")])
            .env("PATH", path)
            .output()
            .unwrap();
        let err = assert_code(&out, EXIT_SOURCE_FAILED, label);
        let want = if label == "killed" {
            "signal 9"
        } else {
            "truncated"
        };
        assert!(err.contains(want), "{label}: {err}");
    }

    // The server goes down.
    db.stop();
    let out = run_with_pw(&repo, &pw, &["backup", &db.url("app")]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "server down");
    assert!(err.contains("127.0.0.1"), "{err}");

    assert_eq!(snapshot_count(&repo), 0, "a failed dump became a snapshot");
    repo.ok(&["check"]);
    db.start_again();
    let out = run_with_pw(&repo, &pw, &["backup", &db.url("app")]);
    assert_success(&out, &["backup", "after the failures"]);
    assert_eq!(snapshot_count(&repo), 1);

    // A restore that the server refuses stops at the first error and quotes it.
    db.sql(
        "",
        "CREATE USER 'reader'@'127.0.0.1' IDENTIFIED BY 'reader-pw';
         GRANT SELECT, CREATE ON *.* TO 'reader'@'127.0.0.1';",
    );
    let reader = password_file(&repo, "reader-pw");
    let url = format!("mysql://reader@127.0.0.1:{}/target", db.port);
    let out = run_with_pw(&repo, &reader, &["restore", "latest", "--to", &url]);
    let err = assert_code(&out, EXIT_TARGET_FAILED, "restore without INSERT rights");
    assert!(err.contains("ERROR") && err.contains("at line"), "{err}");
}

fn which(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}
