//! Restore drills against real servers: passing drills for PostgreSQL, MariaDB, SQLite, a
//! directory and a stream; drills that must fail (tampered data, a false assertion, an
//! unreachable scratch server, a budget exceeded), each with its reason and its scratch
//! database dropped; leftovers of a crashed drill dropped before the next one.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::databases::password_file;
use common::mariadb::Mariadb;
use common::*;

/// A configuration file with one local repository and the given jobs and drills.
struct Site {
    repo: Repo,
    config: PathBuf,
}

impl Site {
    fn new(sections: &str) -> Site {
        let repo = Repo::init_file(&[]);
        let config = repo.path().join("kluisd.toml");
        fs::write(
            &config,
            format!(
                "[daemon]\nstate_dir = \"{}\"\ntime_zone = \"UTC\"\n\n\
                 [repositories.main]\nurl = \"{}\"\nkey_file = \"{}\"\n\n{sections}",
                repo.path().join("state").display(),
                repo.url,
                repo.key_file.display()
            ),
        )
        .unwrap();
        Site { repo, config }
    }

    fn kluis(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", self.config.to_str().unwrap()]);
        Command::new(KLUIS).args(&all).output().unwrap()
    }

    fn backup(&self, job: &str) {
        let out = self.kluis(&["backup", "--job", job]);
        assert_success(&out, &["backup --job", job]);
    }

    /// `kluis drill run NAME --json`: the exit code and the reports.
    fn drill(&self, name: &str) -> (i32, Vec<serde_json::Value>) {
        let out = self.kluis(&["drill", "run", name, "--json"]);
        let code = out.status.code().unwrap();
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        let reports: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("drill output does not parse ({e}): {err}"));
        (code, reports.as_array().unwrap().clone())
    }

    fn history(&self) -> Vec<serde_json::Value> {
        let out = self.kluis(&["drill", "history", "--json"]);
        assert_success(&out, &["drill history"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

/// `kluis config check` of a site with these sections: its exit code and standard error.
fn config_check(sections: &str) -> (Option<i32>, String) {
    let site = Site::new(sections);
    let out = Command::new(KLUIS)
        .args(["config", "check", site.config.to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.code(), text(&out.stderr))
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

fn assert_passed(report: &serde_json::Value, checks: &[&str]) {
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["cleaned_up"], true, "{report:#}");
    for c in checks {
        assert_eq!(check(report, c)["ok"], true, "{c}: {report:#}");
    }
}

fn assert_failed(code: i32, reports: &[serde_json::Value], reason: &str, check_name: &str) {
    assert_eq!(code, 6, "a failed drill exits 6: {reports:#?}");
    let r = &reports[0];
    assert_eq!(r["passed"], false, "{r:#}");
    assert_eq!(r["reason"], reason, "{r:#}");
    assert_eq!(check(r, check_name)["ok"], false, "{r:#}");
    assert!(
        !check(r, check_name)["detail"].as_str().unwrap().is_empty(),
        "{r:#}"
    );
}

/// Flips a bit in the middle of the repository's largest data pack.
fn damage_largest_pack(repo: &Repo) {
    let (_, pack) = repo
        .objects()
        .into_iter()
        .filter(|(n, _)| n.starts_with("data/"))
        .max_by_key(|(_, p)| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&pack, bytes).unwrap();
}

fn pg_drill_databases(pg: &Postgres) -> String {
    pg.sql(
        "postgres",
        "SELECT datname FROM pg_database WHERE datname LIKE 'kluis\\_drill%'",
    )
}

const SHOP: &str = "
CREATE TABLE customers(id serial PRIMARY KEY, name text NOT NULL, created timestamptz NOT NULL DEFAULT now());
INSERT INTO customers(name) SELECT 'customer ' || n FROM generate_series(1, 500) n;
CREATE SCHEMA billing;
CREATE TABLE billing.orders(id bigserial PRIMARY KEY, customer int REFERENCES customers(id),
  total numeric(12,2), at timestamptz NOT NULL DEFAULT now());
INSERT INTO billing.orders(customer, total) SELECT 1 + n % 500, n * 1.25 FROM generate_series(1, 3000) n;
CREATE INDEX orders_at ON billing.orders(at);
";

fn pg_site(pg: &Postgres, drill_extra: &str) -> Site {
    let site = Site::new("");
    let pw = password_file(&site.repo, Postgres::PASSWORD);
    let scratch = format!("postgres://postgres@127.0.0.1:{}/", pg.port);
    let text = fs::read_to_string(&site.config).unwrap()
        + &format!(
            "[jobs.shop]\nrepository = \"main\"\ndatabase = \"{}\"\ndb_password_file = \"{}\"\n\
             schedule = \"daily at 02:00\"\n\n\
             [drills.shop]\nschedule = \"daily at 06:00\"\nscratch = \"{scratch}\"\n\
             scratch_password_file = \"{}\"\n{drill_extra}\n",
            pg.url("shop"),
            pw.display(),
            pw.display()
        );
    fs::write(&site.config, text).unwrap();
    site
}

#[test]
fn postgres_drill_passes_checks_and_drops_its_database() {
    let pg = Postgres::start();
    pg.sql("postgres", "CREATE DATABASE shop");
    pg.sql("shop", SHOP);
    let site = pg_site(
        &pg,
        "older = true\nbudget = \"10m\"\n\
         [[drills.shop.assert]]\nname = \"orders up to the snapshot\"\n\
         sql = \"SELECT max(at) <= {snapshot_time} AND max(at) > {snapshot_time} - interval '26 hours' FROM billing.orders\"\n\
         [[drills.shop.assert]]\nname = \"every order has a customer\"\n\
         sql = \"SELECT count(*) = 0 FROM billing.orders o LEFT JOIN customers c ON c.id = o.customer WHERE c.id IS NULL\"\n",
    );
    site.backup("shop");
    pg.sql("shop", "INSERT INTO customers(name) VALUES ('late')");
    site.backup("shop");
    // A drill database a crashed drill left behind, and one that is not a drill's.
    pg.sql(
        "postgres",
        "CREATE DATABASE kluis_drill_shop_20200101000000",
    );
    pg.sql("postgres", "CREATE DATABASE kluis_drill_shopping");

    let (code, reports) = site.drill("shop");
    assert_eq!(code, 0, "{reports:#?}");
    assert_eq!(reports.len(), 2, "the newest and a random older one");
    assert_eq!(reports[0]["pick"], "newest");
    assert_eq!(reports[1]["pick"], "older");
    for r in &reports {
        assert_passed(
            r,
            &[
                "hash",
                "engine",
                "rows",
                "assert: orders up to the snapshot",
                "assert: every order has a customer",
                "budget",
            ],
        );
        assert!(r["target"].as_str().unwrap().contains("kluis_drill_shop_"));
    }
    assert!(
        check(&reports[0], "rows")["detail"]
            .as_str()
            .unwrap()
            .contains("3501 rows"),
        "{:#}",
        reports[0]
    );
    assert!(
        reports[0]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("kluis_drill_shop_20200101000000")
    );
    // Only databases with the job's prefix were touched.
    assert_eq!(pg_drill_databases(&pg).trim(), "kluis_drill_shopping");
    // The reports are in the repository, encrypted.
    let history = site.history();
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|r| r["passed"] == true));
    for (name, path) in site.repo.objects() {
        if name.starts_with("drills/") {
            let bytes = fs::read(path).unwrap();
            assert!(!bytes.windows(8).any(|w| w == b"billing."), "{name}");
        }
    }
}

#[test]
fn failing_postgres_drills_say_why_and_drop_their_database() {
    let pg = Postgres::start();
    pg.sql("postgres", "CREATE DATABASE shop");
    pg.sql("shop", SHOP);
    let cases = [
        (
            "false assertion",
            "[[drills.shop.assert]]\nname = \"impossible\"\nsql = \"SELECT count(*) > 1000000 FROM customers\"\n",
            "assertion",
            "assert: impossible",
        ),
        (
            "broken assertion",
            "[[drills.shop.assert]]\nname = \"typo\"\nsql = \"SELEC 1\"\n",
            "assertion",
            "assert: typo",
        ),
        ("budget exceeded", "budget = \"1ms\"\n", "budget", "budget"),
    ];
    for (what, extra, reason, check_name) in cases {
        let site = pg_site(&pg, extra);
        site.backup("shop");
        let (code, reports) = site.drill("shop");
        assert_failed(code, &reports, reason, check_name);
        assert_eq!(reports[0]["cleaned_up"], true, "{what}");
        // The other checks still ran and passed.
        assert_eq!(check(&reports[0], "rows")["ok"], true, "{what}");
        assert_eq!(
            pg_drill_databases(&pg).trim(),
            "",
            "{what}: database left behind"
        );
        let history = site.history();
        assert_eq!(history[0]["passed"], false, "{what}");
    }

    // Tampered data: the restore stops at the damaged blob, names it, and the half-restored
    // database is dropped.
    let site = pg_site(&pg, "");
    site.backup("shop");
    damage_largest_pack(&site.repo);
    let (code, reports) = site.drill("shop");
    assert_failed(code, &reports, "corrupt", "hash");
    assert!(
        check(&reports[0], "hash")["detail"]
            .as_str()
            .unwrap()
            .contains("corrupt"),
        "{:#}",
        reports[0]
    );
    assert_eq!(pg_drill_databases(&pg).trim(), "");

    // An unreachable scratch server.
    let site = Site::new("");
    let pw = password_file(&site.repo, Postgres::PASSWORD);
    let text = fs::read_to_string(&site.config).unwrap()
        + &format!(
            "[jobs.shop]\nrepository = \"main\"\ndatabase = \"{}\"\ndb_password_file = \"{}\"\n\
             schedule = \"daily at 02:00\"\n\n\
             [drills.shop]\nschedule = \"daily at 06:00\"\n\
             scratch = \"postgres://postgres@127.0.0.1:{}/?connect_timeout=3\"\n\
             scratch_password_file = \"{}\"\n",
            pg.url("shop"),
            pw.display(),
            free_port(),
            pw.display()
        );
    fs::write(&site.config, text).unwrap();
    site.backup("shop");
    let (code, reports) = site.drill("shop");
    assert_failed(code, &reports, "scratch", "scratch");
}

#[test]
fn mariadb_drill_passes_with_check_table_and_row_counts() {
    let db = Mariadb::start();
    db.sql(
        "",
        "CREATE DATABASE shop;
         USE shop;
         CREATE TABLE customers(id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL);
         INSERT INTO customers(name) SELECT CONCAT('c', seq) FROM seq_1_to_700;
         CREATE TABLE orders(id INT AUTO_INCREMENT PRIMARY KEY, customer INT, at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
           FOREIGN KEY (customer) REFERENCES customers(id));
         INSERT INTO orders(customer) SELECT 1 + seq % 700 FROM seq_1_to_2500;",
    );
    let site = Site::new("");
    let pw = password_file(&site.repo, Mariadb::PASSWORD);
    let text = fs::read_to_string(&site.config).unwrap()
        + &format!(
            "[jobs.shop]\nrepository = \"main\"\ndatabase = \"{}\"\ndb_password_file = \"{}\"\n\
             schedule = \"daily at 02:00\"\n\n\
             [drills.shop]\nschedule = \"daily at 06:00\"\n\
             scratch = \"mysql://{}@127.0.0.1:{}/\"\nscratch_password_file = \"{}\"\nbudget = \"10m\"\n\
             [[drills.shop.assert]]\nname = \"recent orders\"\n\
             sql = \"SELECT MAX(at) > {{snapshot_time}} - INTERVAL 26 HOUR FROM orders\"\n",
            db.url("shop"),
            pw.display(),
            Mariadb::USER,
            db.port,
            pw.display()
        );
    fs::write(&site.config, text).unwrap();
    site.backup("shop");
    let (code, reports) = site.drill("shop");
    assert_eq!(code, 0, "{reports:#?}");
    assert_passed(
        &reports[0],
        &["hash", "engine", "rows", "assert: recent orders", "budget"],
    );
    assert!(
        check(&reports[0], "engine")["detail"]
            .as_str()
            .unwrap()
            .contains("CHECK TABLE: all 2 table(s) OK")
    );
    assert!(
        check(&reports[0], "rows")["detail"]
            .as_str()
            .unwrap()
            .contains("3200 rows")
    );
    let left = db.sql("", "SHOW DATABASES LIKE 'kluis\\_drill%'");
    assert_eq!(left.trim(), "", "drill database left behind");
}

#[test]
fn sqlite_directory_and_stream_drills_pass_and_clean_up() {
    let site = Site::new("");
    let dir = site.repo.path();
    let db = dir.join("app.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 1234)
           INSERT INTO t(v) SELECT 'row ' || n FROM g;
         CREATE TABLE empty(x);",
    )
    .unwrap();
    drop(c);
    let tree = dir.join("tree");
    sample_tree(&tree, 3);
    let text = fs::read_to_string(&site.config).unwrap()
        + &format!(
            "[jobs.app]\nrepository = \"main\"\ndatabase = \"sqlite://{}\"\nschedule = \"daily at 02:00\"\n\n\
             [jobs.files]\nrepository = \"main\"\npaths = [\"{}\"]\nschedule = \"daily at 02:00\"\n\n\
             [jobs.cmd]\nrepository = \"main\"\ncommand = \"seq 1 50000\"\nschedule = \"daily at 02:00\"\n\n\
             [drills.app]\nschedule = \"daily at 06:00\"\n\
             [[drills.app.assert]]\nname = \"rows\"\nsql = \"SELECT count(*) = 1234 FROM t\"\n\
             [[drills.app.assert]]\nname = \"false\"\nsql = \"SELECT 0\"\n\n\
             [drills.files]\nschedule = \"daily at 06:00\"\n\n\
             [drills.cmd]\nschedule = \"daily at 06:00\"\n",
            db.display(),
            tree.display()
        );
    fs::write(&site.config, text).unwrap();
    for job in ["app", "files", "cmd"] {
        site.backup(job);
    }
    // A SQLite assertion that is false fails the drill; the others pass.
    let (code, reports) = site.drill("app");
    assert_failed(code, &reports, "assertion", "assert: false");
    for c in ["hash", "engine", "rows", "assert: rows"] {
        assert_eq!(check(&reports[0], c)["ok"], true, "{c}: {:#}", reports[0]);
    }
    let (code, reports) = site.drill("files");
    assert_eq!(code, 0, "{reports:#?}");
    assert_passed(&reports[0], &["hash", "files"]);
    let (code, reports) = site.drill("cmd");
    assert_eq!(code, 0, "{reports:#?}");
    assert_passed(&reports[0], &["hash"]);
    // Nothing is left in the scratch directory.
    let scratch = dir.join("state/drills");
    let left: Vec<_> = fs::read_dir(&scratch).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    // A directory drill of a damaged snapshot fails as corrupt and leaves nothing behind.
    damage_largest_pack(&site.repo);
    let (code, reports) = site.drill("files");
    assert_failed(code, &reports, "corrupt", "hash");
    assert!(fs::read_dir(&scratch).unwrap().next().is_none());
    assert_eq!(site.history().len(), 4);
}

#[test]
fn a_drill_proves_the_copy_in_the_second_repository() {
    let site = Site::new("");
    let foreign = Repo::init_file(&[]);
    let dir = site.repo.path();
    let db = dir.join("app.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, at TEXT NOT NULL DEFAULT (datetime('now')));
         WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 777)
           INSERT INTO t(id) SELECT n FROM g;",
    )
    .unwrap();
    drop(c);
    let config = fs::read_to_string(&site.config).unwrap()
        + &format!(
            "[repositories.foreign]\nurl = \"{}\"\nkey_file = \"{}\"\n\n\
             [jobs.app]\nrepository = \"main\"\ndatabase = \"sqlite://{}\"\nschedule = \"daily at 02:00\"\n\n\
             [drills.app-foreign]\njob = \"app\"\nrepository = \"foreign\"\nschedule = \"monthly on 2 at 06:00\"\n\
             [[drills.app-foreign.assert]]\nname = \"rows up to the snapshot\"\n\
             sql = \"SELECT max(at) <= {{snapshot_time}} FROM t\"\n",
            foreign.url,
            foreign.key_file.display(),
            db.display()
        );
    fs::write(&site.config, config).unwrap();
    site.backup("app");
    // No copy yet: the drill has nothing to restore, and says so.
    let out = site.kluis(&["drill", "run", "app-foreign"]);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("no snapshot matches"), "{err}");
    let out = site.kluis(&["copy", "--from", "main", "--to", "foreign", "--latest"]);
    assert_success(&out, &["copy --config"]);
    let (code, reports) = site.drill("app-foreign");
    assert_eq!(code, 0, "{reports:#?}");
    assert_passed(
        &reports[0],
        &["hash", "engine", "rows", "assert: rows up to the snapshot"],
    );
    assert_eq!(reports[0]["repository"], "foreign");
    // Its report is in the foreign repository, under the foreign key.
    let out = Command::new(KLUIS)
        .args([
            "drill",
            "history",
            "--repository",
            "foreign",
            "--json",
            "--config",
        ])
        .arg(&site.config)
        .output()
        .unwrap();
    assert_success(&out, &["drill history --repository foreign"]);
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 1);
    assert!(
        foreign
            .objects()
            .iter()
            .any(|(n, _)| n.starts_with("drills/"))
    );
    assert!(
        !site
            .repo
            .objects()
            .iter()
            .any(|(n, _)| n.starts_with("drills/"))
    );
}

#[test]
fn drill_configuration_is_checked() {
    let bad = |sections: &str| {
        let (code, err) = config_check(sections);
        assert_ne!(code, Some(0), "{sections} was accepted");
        err
    };
    let job = "[jobs.db]\nrepository = \"main\"\ndatabase = \"postgres://u@h/db\"\nschedule = \"daily at 02:00\"\n";
    let err = bad(&format!(
        "{job}[drills.db]\nschedule = \"daily at 06:00\"\n"
    ));
    assert!(err.contains("give scratch"), "{err}");
    let err = bad(&format!(
        "{job}[drills.db]\nschedule = \"daily at 06:00\"\nscratch = \"mysql://u@h/\"\n"
    ));
    assert!(err.contains("not a server of the job's engine"), "{err}");
    let err = bad("[drills.nojob]\nschedule = \"daily at 06:00\"\n");
    assert!(err.contains("no [jobs.nojob] section"), "{err}");
    let files =
        "[jobs.f]\nrepository = \"main\"\npaths = [\"/etc\"]\nschedule = \"daily at 02:00\"\n";
    let err = bad(&format!(
        "{files}[drills.f]\nschedule = \"daily at 06:00\"\n[[drills.f.assert]]\nname = \"x\"\nsql = \"SELECT 1\"\n"
    ));
    assert!(err.contains("assertions are SQL"), "{err}");
    let err = bad(&format!(
        "{files}[drills.f]\nschedule = \"daily at 06:00\"\nbudget = \"soon\"\n"
    ));
    assert!(err.contains("budget \"soon\" is not a duration"), "{err}");
    // Two drills whose scratch targets would share names.
    let err = bad(&format!(
        "{files}[drills.f]\nschedule = \"daily at 06:00\"\n\
         [drills.F]\njob = \"f\"\nschedule = \"daily at 07:00\"\n"
    ));
    assert!(
        err.contains("would be named like those of drills."),
        "{err}"
    );
}

/// A `postgres_globals` job backs up a server's roles (what per-database jobs do not carry),
/// as a `postgres-globals` snapshot that `restore --roles` finds; it cannot be drilled, and
/// its URL must be PostgreSQL's.
#[test]
fn postgres_globals_job_backs_up_the_roles() {
    let pg = Postgres::start();
    pg.sql(
        "postgres",
        "CREATE ROLE kluis_globals_probe LOGIN PASSWORD 'probe-pw'",
    );
    let site = Site::new("");
    let pw = password_file(&site.repo, Postgres::PASSWORD);
    let job = format!(
        "[jobs.roles]\nrepository = \"main\"\npostgres_globals = \"postgres://postgres@127.0.0.1:{}/\"\n\
         db_password_file = \"{}\"\nschedule = \"daily at 01:00\"\n",
        pg.port,
        pw.display()
    );
    let text_before = fs::read_to_string(&site.config).unwrap();
    fs::write(&site.config, format!("{text_before}{job}")).unwrap();
    site.backup("roles");
    let list: serde_json::Value =
        serde_json::from_slice(&site.repo.ok(&["snapshots", "--json"])).unwrap();
    let snaps = list.as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["name"], "roles");
    assert_eq!(snaps[0]["source"]["kind"], "postgres-globals");
    let sql = text(
        &site
            .repo
            .ok(&["restore", "latest", "--name", "roles", "--stdout"]),
    );
    assert!(sql.contains("CREATE ROLE kluis_globals_probe"), "{sql}");

    let bad = |sections: &str| {
        let site = Site::new(sections);
        let out = Command::new(KLUIS)
            .args(["config", "check", site.config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{sections} was accepted");
        text(&out.stderr)
    };
    let err = bad(&format!(
        "{job}[drills.roles]\nschedule = \"daily at 06:00\"\nscratch = \"postgres://u@h/\"\n"
    ));
    assert!(err.contains("backs up a server's roles"), "{err}");
    let err = bad(
        "[jobs.roles]\nrepository = \"main\"\npostgres_globals = \"mysql://root@h/\"\n\
         schedule = \"daily at 01:00\"\n",
    );
    assert!(
        err.contains("jobs.roles.postgres_globals") && err.contains("not a postgres:// URL"),
        "{err}"
    );
    let err = bad(
        "[jobs.roles]\nrepository = \"main\"\npostgres_globals = \"postgres://u@h/\"\n\
         database = \"postgres://u@h/db\"\nschedule = \"daily at 01:00\"\n",
    );
    assert!(err.contains("exactly one of"), "{err}");
}

/// Issue 18, defect 6: deleting a failed drill's report went unnoticed. Reports join the
/// host's chain, and the host remembers them: `check` names the missing one.
#[test]
fn a_deleted_failed_drill_report_is_noticed() {
    let site = Site::new("");
    let db = site.repo.path().join("app.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    let config = fs::read_to_string(&site.config).unwrap()
        + &format!(
            "[jobs.app]\nrepository = \"main\"\ndatabase = \"sqlite://{}\"\nschedule = \"daily at 02:00\"\n\n\
             [drills.app]\nschedule = \"daily at 06:00\"\n\
             [[drills.app.assert]]\nname = \"false\"\nsql = \"SELECT 0\"\n",
            db.display()
        );
    fs::write(&site.config, config).unwrap();
    site.backup("app");
    let (code, reports) = site.drill("app");
    assert_failed(code, &reports, "assertion", "assert: false");
    let id = reports[0]["id"].as_str().unwrap().to_string();
    // The host's state directory is the one Repo's commands use (state/ beside the repo).
    site.repo.ok(&["check"]);
    site.repo.backup_stdin("later", b"a later snapshot");
    fs::remove_file(site.repo.root().join("drills").join(&id)).unwrap();
    let out = site.repo.run(&["check"]);
    let err = text(&out.stdout);
    assert_eq!(out.status.code(), Some(EXIT_CORRUPT), "{err}");
    assert!(err.contains(&format!("drills/{id}")), "{err}");
}

/// A job of a whole server: the snapshots `<job>.<database>` of one run share their time and
/// set record; the drill restores the roles into the scratch server first (the tables there
/// belong to a role only the source server has), then drills each database with the
/// assertions meant for it. A run with a database missing keeps what it took but makes no
/// complete set, which a drill does not pick.
#[test]
fn a_whole_server_job_makes_one_set_and_its_drill_restores_roles_first() {
    let pg = Postgres::start();
    pg.sql(
        "postgres",
        "CREATE ROLE app LOGIN PASSWORD 'app-secret'; CREATE DATABASE shop; CREATE DATABASE crm;",
    );
    pg.sql("shop", SHOP);
    pg.sql(
        "shop",
        "ALTER SCHEMA billing OWNER TO app; ALTER TABLE customers OWNER TO app; \
         ALTER TABLE billing.orders OWNER TO app;",
    );
    pg.sql(
        "crm",
        "CREATE TABLE leads(id int PRIMARY KEY, who text); \
         INSERT INTO leads SELECT n, 'lead ' || n FROM generate_series(1, 250) n; \
         GRANT SELECT ON leads TO app;",
    );
    let scratch = Postgres::start();
    let site = Site::new("");
    let pw = password_file(&site.repo, Postgres::PASSWORD);
    let server = pg.url("");
    let job = |name: &str, which: &str| {
        format!(
            "[jobs.{name}]\nrepository = \"main\"\ndatabase = \"{server}\"\n{which}\n\
             db_password_file = \"{}\"\nschedule = \"daily at 02:00\"\n\n",
            pw.display()
        )
    };
    let sections = fs::read_to_string(&site.config).unwrap()
        + &job("db1", "databases = [\"shop\", \"crm\"]\nglobals = true")
        + &job("every", "all_databases = true")
        + &job("broken", "databases = [\"shop\", \"gone\"]\nglobals = true")
        + &format!(
            "[drills.db1]\nschedule = \"daily at 06:00\"\nscratch = \"{}\"\n\
             scratch_password_file = \"{}\"\n\
             [[drills.db1.assert]]\nname = \"customers\"\ndatabase = \"shop\"\n\
             sql = \"SELECT count(*) = 500 FROM customers\"\n\
             [[drills.db1.assert]]\nname = \"orders belong to app\"\ndatabase = \"shop\"\n\
             sql = \"SELECT tableowner = 'app' FROM pg_tables WHERE tablename = 'orders'\"\n\n\
             [drills.broken]\nschedule = \"daily at 06:00\"\nscratch = \"{}\"\n\
             scratch_password_file = \"{}\"\n",
            scratch.url(""),
            pw.display(),
            scratch.url(""),
            pw.display()
        );
    fs::write(&site.config, sections).unwrap();

    site.backup("db1");
    let out = site.repo.run(&["snapshots", "--json"]);
    assert_success(&out, &["snapshots"]);
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let members = ["db1.postgres-globals", "db1.shop", "db1.crm"];
    let set: Vec<&serde_json::Value> = members
        .iter()
        .map(|m| {
            all.iter()
                .find(|s| s["name"] == *m)
                .unwrap_or_else(|| panic!("no snapshot {m} in {all:#?}"))
        })
        .collect();
    for s in &set {
        assert_eq!(s["time"], set[0]["time"], "one time for the set: {set:#?}");
        assert_eq!(s["set"]["name"], "db1");
        assert_eq!(s["set"]["members"], serde_json::json!(members));
    }
    assert_eq!(set[0]["source"]["kind"], "postgres-globals");

    // The scratch server has no role `app` until the drill restores the roles.
    let role = "SELECT count(*) FROM pg_roles WHERE rolname = 'app'";
    assert_eq!(scratch.sql("postgres", role).trim(), "0");
    let (code, reports) = site.drill("db1");
    assert_eq!(code, 0, "{reports:#?}");
    assert_eq!(reports.len(), 2, "one report per database: {reports:#?}");
    let shop = reports
        .iter()
        .find(|r| r["snapshot_name"] == "db1.shop")
        .unwrap();
    let crm = reports
        .iter()
        .find(|r| r["snapshot_name"] == "db1.crm")
        .unwrap();
    assert_passed(
        shop,
        &[
            "globals",
            "hash",
            "engine",
            "rows",
            "assert: customers",
            "assert: orders belong to app",
        ],
    );
    assert_eq!(shop["checks"][0]["name"], "globals", "roles come first");
    assert_passed(crm, &["globals", "hash", "engine", "rows"]);
    assert!(
        !crm["checks"].to_string().contains("customers"),
        "the shop's assertions are not run in crm: {crm:#}"
    );
    assert_eq!(scratch.sql("postgres", role).trim(), "1");
    assert_eq!(pg_drill_databases(&scratch), "", "every target dropped");

    // Every database that accepts connections, listed at the run.
    site.backup("every");
    let out = site.repo.run(&["snapshots", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut every: Vec<&str> = all
        .iter()
        .filter(|s| s["set"]["name"] == "every")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    every.sort();
    assert_eq!(every, ["every.crm", "every.postgres", "every.shop"]);

    // A database missing: the others are committed, the run fails naming it, and the
    // incomplete set is not the job's success: its drill finds nothing to drill.
    let out = site.kluis(&["backup", "--job", "broken"]);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("broken.gone"), "{err}");
    let out = site.repo.run(&["snapshots", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for kept in ["broken.postgres-globals", "broken.shop"] {
        assert!(all.iter().any(|s| s["name"] == kept), "{kept}: {all:#?}");
    }
    let out = site.kluis(&["drill", "run", "broken"]);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("complete set"), "{err}");

    // The daemon runs the same sets: each member logged, the incomplete one a failure.
    let out = Command::new(env!("CARGO_BIN_EXE_kluisd"))
        .args(["--config", site.config.to_str().unwrap(), "--once"])
        .output()
        .unwrap();
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    for line in [
        "of db1.postgres-globals saved",
        "of db1.crm saved",
        "of every.postgres saved",
        "job broken: broken.gone: backup failed",
        "job broken: the set is incomplete: 1 of 3",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }
}

/// What a whole-server job may be given is checked when the file loads.
#[test]
fn whole_server_job_options_are_checked() {
    let bad = |sections: &str| {
        let (code, err) = config_check(sections);
        assert_eq!(code, Some(2), "{sections} was accepted");
        err
    };
    let cases = [
        ("paths = [\"/etc\"]\nglobals = true", "go with database"),
        (
            "database = \"mysql://root@127.0.0.1/shop\"\ndatabases = [\"a\"]",
            "go with database",
        ),
        (
            "database = \"postgres://u@127.0.0.1/\"\ndatabases = [\"a\"]\nall_databases = true",
            "not both",
        ),
        (
            "database = \"postgres://u@127.0.0.1/shop\"\ndatabases = [\"a\"]",
            "names the server only",
        ),
        (
            "database = \"postgres://u@127.0.0.1/\"\ndatabases = [\"a\", \"a\"]",
            "twice",
        ),
        (
            "database = \"postgres://u@127.0.0.1/\"\ndatabases = [\"postgres-globals\"]\nglobals = true",
            "share its snapshot name",
        ),
    ];
    for (source, want) in cases {
        let err = bad(&format!(
            "[jobs.j]\nrepository = \"main\"\n{source}\nschedule = \"daily at 02:00\"\n"
        ));
        assert!(
            err.contains(want) && err.contains("jobs.j"),
            "{source}: {err}"
        );
    }
    // A drill of a job of roles only has no database to restore; an assertion for a
    // database the job does not back up is refused.
    let err = bad(
        "[jobs.j]\nrepository = \"main\"\ndatabase = \"postgres://u@127.0.0.1/\"\nglobals = true\n\
         schedule = \"daily at 02:00\"\n[drills.j]\nschedule = \"daily at 02:00\"\nscratch = \"postgres://u@127.0.0.1/\"\n",
    );
    assert!(err.contains("roles only"), "{err}");
    let err = bad(
        "[jobs.j]\nrepository = \"main\"\ndatabase = \"postgres://u@127.0.0.1/\"\n\
         databases = [\"shop\"]\nschedule = \"daily at 02:00\"\n[drills.j]\nschedule = \"daily at 02:00\"\n\
         scratch = \"postgres://u@127.0.0.1/\"\n[[drills.j.assert]]\nname = \"x\"\n\
         database = \"crm\"\nsql = \"SELECT true\"\n",
    );
    assert!(err.contains("does not back up"), "{err}");
}
