//! PostgreSQL sources and restores against a real server the harness starts: fidelity of the
//! hard cases, consistency under concurrent writes, and failures that must never become
//! snapshots.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::databases::*;
use common::*;

/// Everything a plain dump must carry faithfully.
const HARD_CASES: &str = r#"
CREATE SCHEMA billing;
CREATE SCHEMA "Mixed Case";
CREATE TABLE public.people(
  id serial PRIMARY KEY, name text NOT NULL, note text, nick text, born date, data jsonb,
  amount numeric(30,10), seen timestamptz, big text,
  full_name text GENERATED ALWAYS AS (name || '/' || coalesce(nick, '-')) STORED);
INSERT INTO people(name, note, nick, born, data, amount, seen) VALUES
  ('Zoë 😀 Ünïcode ✓', NULL, '', '2000-02-29', '{"a": [1, 2, {"b": null}], "emoji": "🎉"}',
   12345678901234567890.0123456789, '2026-03-29 01:30:00.123456+01'),
  (E'tab\tand\nnewline and back\\slash', '', NULL, NULL, 'null', -0.0000000001, 'infinity'),
  ('empty strings', '', '', '-infinity', '""', 0, '1970-01-01 00:00:00+00');
INSERT INTO people(name, big) SELECT 'large', repeat('abcdefghij', 300000);
CREATE TABLE billing.blobs(id int PRIMARY KEY, b bytea, nothing bytea);
INSERT INTO billing.blobs
  SELECT 1, decode(string_agg(lpad(to_hex(g), 2, '0'), '' ORDER BY g), 'hex'), NULL
  FROM generate_series(0, 255) g;
INSERT INTO billing.blobs VALUES (2, '', '\x00');
CREATE TABLE billing.invoices(
  id bigserial PRIMARY KEY, person int NOT NULL REFERENCES public.people(id) ON DELETE CASCADE,
  total numeric CHECK (total >= 0), issued timestamptz DEFAULT now(), UNIQUE (person, id));
INSERT INTO billing.invoices(person, total, issued)
  SELECT 1 + g % 3, g * 1.5, '2026-01-01'::timestamptz + g * interval '1 hour'
  FROM generate_series(1, 20000) g;
CREATE INDEX invoices_total ON billing.invoices(total);
SELECT setval('billing.invoices_id_seq', 90000);
CREATE TABLE public.nokey(a int, b text);
INSERT INTO public.nokey VALUES (1, 'one'), (2, NULL), (1, 'one');
CREATE TABLE "Mixed Case"."we""ird tab"(id int PRIMARY KEY, "Value" text);
INSERT INTO "Mixed Case"."we""ird tab" VALUES (1, 'x'), (2, E'\\N is not null');
CREATE TABLE public.composite(a int, b text, v int, PRIMARY KEY (b, a));
INSERT INTO public.composite SELECT g % 10, 'k' || (g / 10), g FROM generate_series(1, 500) g;
CREATE VIEW billing.totals AS SELECT person, sum(total) AS total FROM billing.invoices GROUP BY person;
CREATE MATERIALIZED VIEW billing.counts AS SELECT count(*) AS n FROM billing.invoices;
CREATE FUNCTION billing.clamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.total > 1000000 THEN NEW.total := 1000000; END IF; RETURN NEW; END $$;
CREATE TRIGGER clamp BEFORE INSERT OR UPDATE ON billing.invoices
  FOR EACH ROW EXECUTE FUNCTION billing.clamp();
CREATE PROCEDURE billing.noop(x int) LANGUAGE sql AS $$ SELECT x $$;
CREATE SEQUENCE public.counter START 5;
SELECT nextval('public.counter'), nextval('public.counter');
SELECT lo_from_bytea(0, '\xdeadbeef00ff'::bytea);
COMMENT ON TABLE public.people IS 'people, with 😀';
"#;

fn setup() -> (Postgres, Repo, PathBuf) {
    let pg = Postgres::start();
    let repo = Repo::init_file(&[]);
    let pw = password_file(&repo, Postgres::PASSWORD);
    (pg, repo, pw)
}

/// A directory of stand-ins for the PostgreSQL client tools that record their arguments in
/// `args.log` and whether they were given a password in their environment, then run the real
/// tool.
fn recording_tools(dir: &std::path::Path, real: &std::path::Path) -> PathBuf {
    let bin = dir.join("recording-bin");
    fs::create_dir_all(&bin).unwrap();
    let log = dir.join("args.log");
    for tool in ["psql", "pg_dump", "pg_dumpall"] {
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"{tool} $*\" >> '{log}'\n\
             [ -n \"$PGPASSWORD\" ] && echo \"{tool} has a password\" >> '{log}'\n\
             exec '{real}/{tool}' \"$@\"\n",
            log = log.display(),
            real = real.display(),
        );
        let path = bin.join(tool);
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

#[test]
fn database_passwords_never_reach_a_tools_arguments_or_the_output() {
    // Invariant 8: the password goes to the tools through their environment only.
    let (pg, repo, pw) = setup();
    pg.sql("postgres", "CREATE DATABASE shop");
    pg.sql(
        "shop",
        "CREATE TABLE t(id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'x');",
    );
    let bin = recording_tools(repo.path(), &pg.bin);
    let with_tools = |args: &[&str]| {
        let mut all = vec!["--pg-bin-dir", bin.to_str().unwrap()];
        all.extend_from_slice(args);
        run_with_pw(&repo, &pw, &all)
    };
    let server = pg.url("shop").replace("/shop", "/");
    let mut outputs = vec![
        with_tools(&["backup", &pg.url("shop")]),
        with_tools(&["backup", "--globals", &server]),
        with_tools(&[
            "restore",
            "latest",
            "--name",
            "shop",
            "--to",
            &pg.url("copy"),
        ]),
        with_tools(&["backup", &pg.url("nosuchdb")]),
    ];
    let failed = outputs.pop().unwrap();
    assert_code(
        &failed,
        EXIT_SOURCE_FAILED,
        "a database that does not exist",
    );
    for out in &outputs {
        assert_success(out, &["with recording tools"]);
    }
    let log = fs::read_to_string(repo.path().join("args.log")).unwrap();
    for tool in ["psql", "pg_dump", "pg_dumpall"] {
        assert!(
            log.contains(&format!("{tool} has a password")),
            "{tool} did not run with a password: {log}"
        );
    }
    assert!(
        !log.contains(Postgres::PASSWORD),
        "a tool was given the password: {log}"
    );
    for out in outputs.iter().chain([&failed]) {
        for stream in [&out.stdout, &out.stderr] {
            assert!(
                !text(stream).contains(Postgres::PASSWORD),
                "{}",
                text(stream)
            );
        }
    }

    // Under systemd, the password is the credential `kluis-db-password` (LoadCredential=).
    let creds = repo.path().join("credentials");
    fs::create_dir(&creds).unwrap();
    fs::copy(&pw, creds.join("kluis-db-password")).unwrap();
    let by_credential = |dir: &std::path::Path| {
        repo.command(&["backup", "--name", "by-credential", &pg.url("shop")])
            .env("CREDENTIALS_DIRECTORY", dir)
            .output()
            .unwrap()
    };
    assert_success(&by_credential(&creds), &["backup with kluis-db-password"]);
    // A wrong one is the server's refusal, quoted; no snapshot.
    fs::write(creds.join("kluis-db-password"), "wrong\n").unwrap();
    let out = by_credential(&creds);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "a wrong credential");
    assert!(err.contains("password authentication failed"), "{err}");
    let listed = text(&repo.ok(&["snapshots", "--json"]));
    assert_eq!(listed.matches("by-credential").count(), 1, "{listed}");
}

#[test]
fn postgres_round_trip_is_faithful() {
    let (pg, repo, pw) = setup();
    pg.sql("postgres", "CREATE DATABASE shop");
    pg.sql("shop", HARD_CASES);
    let out = run_with_pw(&repo, &pw, &["backup", "--json", &pg.url("shop")]);
    assert_success(&out, &["backup", "postgres://"]);
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["name"], "shop");
    assert_eq!(snap["source"]["kind"], "postgres");
    assert!(
        snap["source"]["server_version"]
            .as_str()
            .unwrap()
            .starts_with(char::is_numeric)
    );
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
    assert_eq!(rows("we\"ird tab"), 2);
    assert_eq!(rows("nokey"), 3);

    let want_schema = pg.schema("shop");
    let want_data = pg.fingerprint("shop");
    assert!(want_data.contains("large object"), "{want_data}");

    // Into a new database, created by the restore.
    let out = run_with_pw(&repo, &pw, &["restore", "latest", "--to", &pg.url("copy")]);
    assert_success(&out, &["restore", "--to"]);
    // The last line counts the tables and gives the time it took.
    let last = text(&out.stderr);
    let want = format!("{} tables, ", tables.len());
    assert!(
        last.contains(&want) && last.contains("verified, in "),
        "{last}"
    );
    assert_eq!(
        pg.schema("copy"),
        want_schema,
        "schema differs after restore --to"
    );
    assert_eq!(
        pg.fingerprint("copy"),
        want_data,
        "data differs after restore --to"
    );

    // As a plain SQL dump, loaded by psql.
    let out = repo.run(&["restore", "latest", "--stdout"]);
    assert_success(&out, &["restore", "--stdout"]);
    pg.sql("postgres", "CREATE DATABASE viapsql");
    pg.sql("viapsql", &text(&out.stdout));
    assert_eq!(
        pg.schema("viapsql"),
        want_schema,
        "schema differs via --stdout"
    );
    assert_eq!(
        pg.fingerprint("viapsql"),
        want_data,
        "data differs via --stdout"
    );

    // As files: the snapshot's streams, which concatenated in name order are that same dump.
    let dir = repo.path().join("as-files");
    repo.ok(&["restore", "latest", "--target", dir.to_str().unwrap()]);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(names.len() > 3, "{names:?}");
    let joined: Vec<u8> = names
        .iter()
        .flat_map(|n| fs::read(dir.join(n)).unwrap())
        .collect();
    assert!(joined == out.stdout, "--target files differ from --stdout");

    // A non-empty target is refused unless --force, which replaces it.
    let out = run_with_pw(&repo, &pw, &["restore", "latest", "--to", &pg.url("copy")]);
    let err = assert_code(&out, EXIT_USAGE, "restore into a non-empty database");
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    pg.sql("copy", "DELETE FROM billing.invoices WHERE id < 100");
    let out = run_with_pw(
        &repo,
        &pw,
        &[
            "restore",
            "latest",
            "--to",
            &pg.url("copy"),
            "--force",
            "--jobs",
            "3",
        ],
    );
    assert_success(&out, &["restore", "--force"]);
    assert_eq!(
        pg.fingerprint("copy"),
        want_data,
        "data differs after --force"
    );

    // "Not empty" means anything a user made: a database with only a type, a schema or a
    // large object is refused too; a new, empty one is taken as it is.
    for (db, made) in [
        ("only_type", "CREATE TYPE mood AS ENUM ('ok')"),
        ("only_schema", "CREATE SCHEMA later"),
        ("only_lo", "SELECT lo_from_bytea(0, 'x')"),
    ] {
        pg.sql("postgres", &format!("CREATE DATABASE {db}"));
        pg.sql(db, made);
        let out = run_with_pw(&repo, &pw, &["restore", "latest", "--to", &pg.url(db)]);
        let err = assert_code(&out, EXIT_USAGE, made);
        assert!(err.contains("not empty"), "{made}: {err}");
    }
    pg.sql("postgres", "CREATE DATABASE fresh");
    let out = run_with_pw(&repo, &pw, &["restore", "latest", "--to", &pg.url("fresh")]);
    assert_success(&out, &["restore into an empty database"]);
    assert_eq!(pg.fingerprint("fresh"), want_data, "data differs in fresh");

    // Nothing readable in the repository.
    assert_no_plaintext(&repo, b"empty string");
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn postgres_snapshot_is_consistent_under_concurrent_writes() {
    let (pg, repo, pw) = setup();
    pg.sql("postgres", "CREATE DATABASE bank");
    // Money moves between two tables; the total across both never changes. Without one
    // snapshot shared by every table's dump, the restored total would be off.
    pg.sql(
        "bank",
        "CREATE TABLE checking(id int PRIMARY KEY, balance bigint NOT NULL);
         CREATE TABLE savings(id int PRIMARY KEY, balance bigint NOT NULL, pad text);
         INSERT INTO checking SELECT g, 1000 FROM generate_series(1, 2000) g;
         INSERT INTO savings SELECT g, 1000, repeat('p', 2000) FROM generate_series(1, 2000) g;",
    );
    let writer = Writer::start(pg.psql().args(["-d", "bank"]), transfers("BEGIN", 60_000));
    let mut backups = 0;
    for _ in 0..3 {
        let out = run_with_pw(&repo, &pw, &["backup", &pg.url("bank")]);
        assert_success(&out, &["backup", "bank"]);
        backups += 1;
    }
    writer.stop();
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), backups);
    for (i, id) in ids.iter().enumerate() {
        let db = format!("restored{i}");
        let out = run_with_pw(&repo, &pw, &["restore", id, "--to", &pg.url(&db)]);
        assert_success(&out, &["restore", id]);
        let total = pg.sql(&db, BANK_TOTAL_SQL);
        assert_eq!(total.trim(), BANK_TOTAL, "snapshot {id} is not consistent");
    }
}

#[test]
fn postgres_failures_never_become_snapshots() {
    let (pg, repo, pw) = setup();
    pg.sql("postgres", "CREATE DATABASE app");
    pg.sql(
        "app",
        "CREATE TABLE open_data(id int PRIMARY KEY, v text);
         CREATE TABLE secrets(id int PRIMARY KEY, v text);
         INSERT INTO open_data SELECT g, md5(g::text) FROM generate_series(1, 50000) g;
         INSERT INTO secrets VALUES (1, 'x');
         CREATE ROLE limited LOGIN PASSWORD 'limited-pw';
         GRANT SELECT ON open_data TO limited;",
    );

    // Wrong password.
    let wrong = password_file(&repo, "not-the-password");
    let out = run_with_pw(&repo, &wrong, &["backup", &pg.url("app")]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "wrong database password");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        !err.contains("not-the-password"),
        "the password leaked: {err}"
    );

    // Missing table permissions.
    let limited = password_file(&repo, "limited-pw");
    let url = format!("postgres://limited@127.0.0.1:{}/app", pg.port);
    let out = run_with_pw(&repo, &limited, &["backup", &url]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "missing permissions");
    assert!(err.contains("permission denied"), "{err}");

    // A database that does not exist.
    let out = run_with_pw(&repo, &pw, &["backup", &pg.url("nosuchdb")]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "missing database");
    assert!(err.contains("nosuchdb"), "{err}");

    // A password in the URL is refused before anything runs.
    let with_pw = format!("postgres://postgres:hunter2@127.0.0.1:{}/app", pg.port);
    let out = repo.run(&["backup", &with_pw]);
    let err = assert_code(&out, EXIT_USAGE, "password in URL");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");

    // pg_dump killed mid-way, and pg_dump output cut short: through wrappers around the real one.
    let real = pg.bin.join("pg_dump");
    for (label, body) in [
        (
            "killed",
            format!("\"{}\" \"$@\" | head -c 300; kill -9 $$", real.display()),
        ),
        (
            "truncated",
            format!("\"{}\" \"$@\" | head -c 300", real.display()),
        ),
    ] {
        let dir = repo.path().join(format!("bin-{label}"));
        fs::create_dir_all(&dir).unwrap();
        for tool in ["psql", "pg_dumpall"] {
            std::os::unix::fs::symlink(pg.bin.join(tool), dir.join(tool)).unwrap();
        }
        let script = dir.join("pg_dump");
        fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let out = run_with_pw(
            &repo,
            &pw,
            &[
                "--pg-bin-dir",
                dir.to_str().unwrap(),
                "backup",
                &pg.url("app"),
            ],
        );
        let err = assert_code(&out, EXIT_SOURCE_FAILED, label);
        let want = if label == "killed" {
            "signal 9"
        } else {
            "truncated"
        };
        assert!(err.contains(want), "{label}: {err}");
    }

    // The connection is lost in the middle of the dump: a session holds a lock the backup
    // waits for, and every backend of the database is terminated while it waits.
    let mut holder = pg
        .psql()
        .args([
            "-d",
            "app",
            "-c",
            "BEGIN; LOCK TABLE secrets IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60);",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |sql: &str, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pg.sql("postgres", sql).trim() == "0" {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait_for(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE d.datname = 'app' AND l.mode = 'AccessExclusiveLock' AND l.granted",
        "the lock was never taken",
    );
    let backup = command_with_pw(&repo, &pw, &["backup", &pg.url("app")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND wait_event_type = 'Lock'",
        "the backup never waited for the lock",
    );
    pg.sql(
        "postgres",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = 'app' AND pid <> pg_backend_pid()",
    );
    let out = backup.wait_with_output().unwrap();
    let _ = holder.wait();
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "connection lost");
    // Whichever session noticed first: the one that was waiting, or one that then could not
    // import the snapshot of the session that was terminated.
    assert!(
        err.contains("terminating connection")
            || err.contains("server closed the connection")
            || err.contains("snapshot ended: its connection was lost"),
        "{err}"
    );

    // The server goes down.
    pg.stop();
    let out = run_with_pw(&repo, &pw, &["backup", &pg.url("app")]);
    let err = assert_code(&out, EXIT_SOURCE_FAILED, "server down");
    assert!(err.contains("127.0.0.1"), "{err}");

    assert_eq!(snapshot_count(&repo), 0, "a failed dump became a snapshot");
    // Nothing committed, and the repository is fine.
    repo.ok(&["check"]);
    pg.start_again();
    let out = run_with_pw(&repo, &pw, &["backup", &pg.url("app")]);
    assert_success(&out, &["backup", "after the failures"]);
    assert_eq!(snapshot_count(&repo), 1);
}

#[test]
fn command_source_checks_its_exit_and_stderr() {
    let repo = Repo::init_file(&[]);
    let out = repo.run(&[
        "backup",
        "--name",
        "gen",
        "--command",
        "seq 1 200000; echo 'progress: done' >&2",
    ]);
    assert_success(&out, &["backup", "--command"]);
    let want: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(repo.restore_stdout("latest"), want.as_bytes());
    for (cmd, needle) in [
        ("seq 1 1000; exit 3", "exit code 3"),
        ("seq 1 1000; echo 'ERROR: disk on fire' >&2", "disk on fire"),
        ("seq 1 100000; kill -9 $$", "signal 9"),
        ("no-such-program-kluis", "exit code 127"),
    ] {
        let out = repo.run(&["backup", "--name", "gen", "--command", cmd]);
        let err = assert_code(&out, EXIT_SOURCE_FAILED, cmd);
        assert!(err.contains(needle), "{cmd}: {err}");
        assert!(err.contains("no snapshot"), "{cmd}: {err}");
    }
    assert_eq!(snapshot_count(&repo), 1);
}

#[test]
fn postgres_server_backup_restores_roles_onto_a_new_server() {
    let (pg, repo, pw) = setup();
    pg.sql(
        "postgres",
        "CREATE ROLE app_owner LOGIN PASSWORD 'owner-pw';
         CREATE DATABASE one OWNER app_owner;
         CREATE DATABASE two;",
    );
    pg.sql(
        "one",
        "CREATE TABLE t(id int PRIMARY KEY); ALTER TABLE t OWNER TO app_owner;
         INSERT INTO t VALUES (1), (2);",
    );
    pg.sql(
        "two",
        "CREATE TABLE u(v text); INSERT INTO u VALUES ('two');",
    );
    let server = format!("postgres://postgres@127.0.0.1:{}/", pg.port);
    let out = run_with_pw(
        &repo,
        &pw,
        &["backup", "--json", "--all-databases", "--globals", &server],
    );
    assert_success(&out, &["backup", "--all-databases", "--globals"]);
    let saved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = saved
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["postgres-globals", "one", "postgres", "two"]);
    assert_eq!(saved[0]["source"]["kind"], "postgres-globals");
    // A list of databases: each its own snapshot, in the order given.
    let out = run_with_pw(
        &repo,
        &pw,
        &[
            "backup",
            "--json",
            "--database",
            "two",
            "--database",
            "one",
            &server,
        ],
    );
    assert_success(&out, &["backup --database two --database one"]);
    let saved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<(&str, &str)> = saved
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["source"]["database"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(listed, [("two", "two"), ("one", "one")]);

    // A new server has no role app_owner: the restore stops and names it.
    let other = Postgres::start();
    let out = run_with_pw(
        &repo,
        &pw,
        &[
            "restore",
            "latest",
            "--name",
            "one",
            "--to",
            &other.url("one"),
        ],
    );
    let err = assert_code(&out, EXIT_TARGET_FAILED, "restore without the roles");
    assert!(err.contains("app_owner"), "{err}");
    // With --roles, the roles come first, from the globals snapshot of the same run.
    let out = run_with_pw(
        &repo,
        &pw,
        &[
            "restore",
            "latest",
            "--name",
            "one",
            "--to",
            &other.url("one"),
            "--roles",
            "--force",
        ],
    );
    assert_success(&out, &["restore", "--roles"]);
    assert_eq!(other.sql("one", "SELECT count(*) FROM t").trim(), "2");
    assert_eq!(
        other
            .sql(
                "one",
                "SELECT tableowner FROM pg_tables WHERE tablename = 't'"
            )
            .trim(),
        "app_owner"
    );
    // The role's password came along: it can log in over TCP.
    let owner_pw = password_file(&repo, "owner-pw");
    let url = format!("postgres://app_owner@127.0.0.1:{}/one", other.port);
    let out = run_with_pw(&repo, &owner_pw, &["backup", "--name", "owner-check", &url]);
    assert_success(&out, &["backup as the restored role"]);
    // Restoring the roles again leaves the existing ones as they are (their password and
    // attributes changed on this server since), with a warning naming each.
    other.sql(
        "postgres",
        "ALTER ROLE app_owner CREATEDB PASSWORD 'changed-pw'; ALTER ROLE postgres PASSWORD 'new-su-pw'",
    );
    let roles_now = "SELECT string_agg(rolname || rolcreatedb || rolpassword, ',' ORDER BY rolname) \
                     FROM pg_authid WHERE rolname IN ('app_owner', 'postgres')";
    let before = other.sql("postgres", roles_now);
    assert!(before.contains("app_ownert"), "{before}");
    // The superuser's new password must still work after the roles are restored.
    let su_pw = password_file(&repo, "new-su-pw");
    let out = run_with_pw(
        &repo,
        &su_pw,
        &[
            "restore",
            "latest",
            "--name",
            "postgres-globals",
            "--to",
            &format!("postgres://postgres@127.0.0.1:{}/", other.port),
        ],
    );
    let err = assert_code(&out, 0, "restore the roles again");
    assert!(
        err.contains("role app_owner exists") && err.contains("role postgres exists"),
        "{err}"
    );
    assert!(err.contains("left as it is"), "{err}");
    assert_eq!(other.sql("postgres", roles_now), before);
    // The other databases are there too.
    let out = run_with_pw(
        &repo,
        &su_pw,
        &[
            "restore",
            "latest",
            "--name",
            "two",
            "--to",
            &other.url("two"),
        ],
    );
    assert_success(&out, &["restore two"]);
    assert_eq!(other.sql("two", "SELECT v FROM u").trim(), "two");
}

/// A snapshot of `content` named `db`, taken at `time`.
fn backup_at(repo: &Repo, time: &str, content: &str) {
    let out = repo.run_stdin(
        &["backup", "--stdin", "--name", "db", "--time", time],
        content.as_bytes(),
    );
    assert_success(&out, &["backup", time]);
}

/// What `restore --at WHEN` of `db` gives.
fn restore_at(repo: &Repo, when: &str) -> String {
    let out = repo.run(&["restore", "--at", when, "--name", "db", "--stdout"]);
    assert_success(&out, &["restore --at", when]);
    text(&out.stdout)
}

#[test]
fn restore_at_picks_the_snapshot_of_that_moment() {
    let repo = Repo::init_file(&[]);
    backup_at(&repo, "2026-11-01T02:30:00Z", "monday\n");
    backup_at(&repo, "2026-11-02T02:30:00Z", "tuesday\n");
    backup_at(&repo, "2026-11-03T02:30:00Z", "wednesday\n");
    assert_eq!(restore_at(&repo, "2026-11-02T12:00:00Z"), "tuesday\n");
    assert_eq!(restore_at(&repo, "2026-11-02T02:30:00Z"), "tuesday\n");
    assert_eq!(restore_at(&repo, "2026-11-02T02:29:59Z"), "monday\n");
    // An age: an hour ago is after all three.
    assert_eq!(restore_at(&repo, "1h"), "wednesday\n");
    let out = repo.run(&["restore", "--at", "2026-10-01T00:00:00Z", "--stdout"]);
    let err = assert_code(&out, 1, "nothing that old");
    assert!(err.contains("at or before"), "{err}");

    // Ages count back from now: snapshots three days, one day and one hour old.
    let repo = Repo::init_file(&[]);
    let now = jiff::Timestamp::now();
    for (hours, content) in [(72, "three days\n"), (24, "yesterday\n"), (1, "an hour\n")] {
        let time = (now - jiff::SignedDuration::from_hours(hours)).to_string();
        backup_at(&repo, &time, content);
    }
    assert_eq!(restore_at(&repo, "36h"), "three days\n");
    assert_eq!(restore_at(&repo, "12h"), "yesterday\n");
    assert_eq!(restore_at(&repo, "30m"), "an hour\n");
    let out = repo.run(&["restore", "--at", "4days", "--name", "db", "--stdout"]);
    assert_code(&out, 1, "nothing four days old");
}
