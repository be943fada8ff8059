//! `kluis forget` on a real repository: the policy's decisions, the dry run, max-age, and that
//! what is kept still restores.

mod common;

use common::*;

fn names_and_times(repo: &Repo) -> Vec<(String, String)> {
    let out = repo.ok(&["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let mut list: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["time"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    list.sort();
    list
}

#[test]
fn forget_keeps_what_the_policy_says_and_the_rest_restores() {
    let repo = Repo::init_file(&[]);
    // Five nights of one database, two runs on the last day, and one night of another.
    let nights = [
        "2026-11-20T02:30:00Z",
        "2026-11-21T02:30:00Z",
        "2026-11-22T02:30:00Z",
        "2026-11-23T02:30:00Z",
        "2026-11-24T02:30:00Z",
        "2026-11-24T14:00:00Z",
    ];
    for (i, t) in nights.iter().enumerate() {
        let out = repo.run_stdin(
            &["backup", "--stdin", "--name", "billing", "--time", t],
            dump_like(i as u64, 300_000).as_slice(),
        );
        assert_success(&out, &["backup", t]);
    }
    let out = repo.run_stdin(
        &[
            "backup",
            "--stdin",
            "--name",
            "shop",
            "--time",
            "2026-11-20T03:00:00Z",
        ],
        b"shop dump\n",
    );
    assert_success(&out, &["backup shop"]);

    // A dry run decides and lists, and removes nothing.
    let out = repo.run(&[
        "forget",
        "--keep-daily",
        "2",
        "--time-zone",
        "UTC",
        "--dry-run",
        "--json",
    ]);
    assert_success(&out, &["forget --dry-run"]);
    let decisions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decisions.as_array().unwrap().len(), 7);
    assert_eq!(names_and_times(&repo).len(), 7);
    let billing: Vec<(bool, String)> = decisions
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["name"] == "billing")
        .map(|d| {
            (
                d["keep"].as_bool().unwrap(),
                d["reasons"][0].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        billing,
        [
            (true, "daily 1".to_string()),
            (false, "no rule keeps it".to_string()),
            (true, "daily 2".to_string()),
            (false, "no rule keeps it".to_string()),
            (false, "no rule keeps it".to_string()),
            (false, "no rule keeps it".to_string()),
        ]
    );

    // For real: billing keeps the newest of its last two days; shop (its own group) its one.
    let out = repo.run(&["forget", "--keep-daily", "2", "--time-zone", "UTC"]);
    assert_success(&out, &["forget"]);
    assert!(
        text(&out.stdout).contains("removed 4 of 7"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        names_and_times(&repo),
        [
            ("billing".into(), "2026-11-23T02:30:00Z".into()),
            ("billing".into(), "2026-11-24T14:00:00Z".into()),
            ("shop".into(), "2026-11-20T03:00:00Z".into()),
        ]
    );
    // What is kept restores bit-exact, and the repository checks (the forgotten snapshots'
    // data waits for prune).
    assert_eq!(
        repo.restore_stdout("latest"),
        dump_like(5, 300_000),
        "the newest billing snapshot"
    );
    repo.ok(&["check", "--read-data"]);

    // max-age wins over any keep rule: everything is older than an hour now.
    let out = repo.run(&["forget", "--keep-last", "10", "--max-age", "1h"]);
    assert_success(&out, &["forget --max-age"]);
    assert!(names_and_times(&repo).is_empty());
    // A policy that says nothing is refused, not read as "remove everything".
    let out = repo.run(&["forget"]);
    let err = assert_code(&out, EXIT_USAGE, "empty policy");
    assert!(err.contains("keep rule"), "{err}");
}

#[test]
fn forget_applies_a_repositorys_configured_policy() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("kluisd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\ntime_zone = \"UTC\"\n\
             [repositories.local]\nurl = \"{{state_dir}}/repository\"\n\
             key_file = \"{{state_dir}}/repository.key\"\ninit = true\n\
             retention = {{ keep_last = 2 }}\n\
             [jobs.gen]\nrepository = \"local\"\ncommand = \"echo x\"\nschedule = \"every 1h\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    for t in [
        "2026-11-20T00:00:00Z",
        "2026-11-21T00:00:00Z",
        "2026-11-22T00:00:00Z",
    ] {
        let out = std::process::Command::new(KLUIS)
            .args(["backup", "--job", "gen", "--time", t, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_success(&out, &["backup --job", t]);
    }
    let out = std::process::Command::new(KLUIS)
        .args(["forget", "--repository", "local", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_success(&out, &["forget --repository"]);
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kept: Vec<bool> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["keep"].as_bool().unwrap())
        .collect();
    assert_eq!(kept, [true, true, false]);
    // Keep options beside a configured policy are refused.
    let out = std::process::Command::new(KLUIS)
        .args([
            "forget",
            "--repository",
            "local",
            "--keep-last",
            "9",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_USAGE));
    // A policy that says nothing is refused when the file is checked.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[repositories.r]\nurl = \"/x\"\nkey_file = \"/k\"\nretention = { keep_last = 0 }\n",
    )
    .unwrap();
    let out = std::process::Command::new(KLUIS)
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = assert_code(&out, EXIT_USAGE, "empty retention");
    assert!(err.contains("repositories.r.retention"), "{err}");
}

#[test]
fn the_retention_report_gives_each_snapshot_the_date_it_becomes_unrecoverable() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("kluisd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\ntime_zone = \"UTC\"\n\
             [repositories.offsite]\nurl = \"{{state_dir}}/repo\"\n\
             key_file = \"{{state_dir}}/repo.key\"\ninit = true\n\
             retention = {{ keep_daily = 7, max_age = \"10d\" }}\n\
             prune = {{ schedule = \"daily at 05:00\", grace = \"24h\" }}\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let kluis = |args: &[&str], input: &[u8]| {
        let mut cmd = std::process::Command::new(KLUIS);
        cmd.args(args)
            .env("KLUIS_REPOSITORY", dir.path().join("state/repo"))
            .env("KLUIS_KEY_FILE", dir.path().join("state/repo.key"));
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_success(&out, args);
        out.stdout
    };
    let report = || -> serde_json::Value {
        let args = ["retention", "report", "--config", config.to_str().unwrap()];
        let mut args = args.to_vec();
        args.extend(["--repository", "offsite", "--json"]);
        serde_json::from_slice(&kluis(&args, b"")).unwrap()
    };
    // The repository is created by the first report; it is empty.
    assert_eq!(report().as_array().unwrap().len(), 0);
    let now = jiff::Timestamp::now();
    let hours = |h: i64| (now - jiff::SignedDuration::from_hours(h)).to_string();
    // 20 days old (past max-age), and 2 days old (kept by keep_daily, expires in 8 days).
    for t in [hours(20 * 24), hours(2 * 24)] {
        kluis(
            &["backup", "--stdin", "--name", "db", "--time", &t],
            b"rows",
        );
    }
    let v = report();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    let ts = |r: &serde_json::Value, f: &str| -> jiff::Timestamp {
        r[f].as_str().unwrap().parse().unwrap()
    };
    let (young, old) = (&rows[0], &rows[1]);
    assert_eq!(old["keep"], false, "{v}");
    assert_eq!(young["keep"], true, "{v}");
    // Kept: expires at its time + 10 days; forgotten by the next 05:00 run after that, whose
    // data goes at the first 05:00 run more than 24 h later.
    let expires = ts(young, "expires");
    assert_eq!(
        expires,
        ts(young, "time") + jiff::SignedDuration::from_hours(240)
    );
    let gone = ts(young, "unrecoverable_by");
    let span = gone.duration_since(expires);
    assert!(
        span > jiff::SignedDuration::from_hours(24) && span <= jiff::SignedDuration::from_hours(72),
        "{v}"
    );
    assert_eq!(
        gone.to_zoned_datetime(jiff::tz::TimeZone::UTC).hour(),
        5,
        "{v}"
    );
    // Past max-age: removed at the next run, unrecoverable within three days from now.
    let gone = ts(old, "unrecoverable_by");
    assert!(
        gone > now && gone.duration_since(now) <= jiff::SignedDuration::from_hours(72),
        "{v}"
    );
}

#[test]
fn erase_after_and_max_age_agree_and_the_report_gives_the_day_keys_are_destroyed() {
    let dir = tempfile::TempDir::new().unwrap();
    let check = |body: &str| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, body).unwrap();
        std::process::Command::new(KLUIS)
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let repo = "[repositories.r]\nurl = \"/x\"\nkey_file = \"/k\"\n";
    // An erasure that destroyed what the policy keeps would make the policy a lie.
    let out = check(&format!(
        "{repo}retention = {{ keep_daily = 7, max_age = \"60d\" }}\nerase_after = \"30d\"\n\
         prune = {{ schedule = \"daily at 05:00\" }}\n"
    ));
    let err = assert_code(&out, EXIT_USAGE, "erase_after below max_age");
    assert!(
        err.contains("repositories.r.erase_after (30d) is shorter than retention.max_age (60d)"),
        "{err}"
    );
    // It is enforced by the scheduled maintenance, so it needs one.
    let out = check(&format!("{repo}erase_after = \"30d\"\n"));
    let err = assert_code(&out, EXIT_USAGE, "erase_after without a schedule");
    assert!(err.contains("prune = { schedule"), "{err}");
    let out = check(&format!(
        "{repo}erase_after = \"0s\"\nprune = {{ schedule = \"daily at 05:00\" }}\n"
    ));
    assert_code(&out, EXIT_USAGE, "erase_after of 0");

    // The report: with erase_after, each snapshot's month is destroyed by the first run at or
    // after the month's end plus erase_after, and it is unrecoverable no later than that.
    let config = dir.path().join("kluisd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\ntime_zone = \"UTC\"\n\
             [repositories.offsite]\nurl = \"{{state_dir}}/repo\"\n\
             key_file = \"{{state_dir}}/repo.key\"\ninit = true\n\
             erase_after = \"40d\"\n\
             prune = {{ schedule = \"daily at 05:00\", grace = \"24h\" }}\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let kluis = |args: &[&str]| {
        let out = std::process::Command::new(KLUIS)
            .args(args)
            .env("KLUIS_REPOSITORY", dir.path().join("state/repo"))
            .env("KLUIS_KEY_FILE", dir.path().join("state/repo.key"))
            .output()
            .unwrap();
        assert_success(&out, args);
        out.stdout
    };
    let report = || -> serde_json::Value {
        let c = config.to_str().unwrap();
        serde_json::from_slice(&kluis(&[
            "retention",
            "report",
            "--config",
            c,
            "--repository",
            "offsite",
            "--json",
        ]))
        .unwrap()
    };
    assert_eq!(report().as_array().unwrap().len(), 0);
    let time = "2026-03-10T12:00:00Z";
    kluis(&[
        "backup",
        "--command",
        "echo rows",
        "--name",
        "db",
        "--time",
        time,
    ]);
    let v = report();
    let row = &v.as_array().unwrap()[0];
    let ts = |f: &str| -> jiff::Timestamp { row[f].as_str().unwrap().parse().unwrap() };
    assert_eq!(row["keep"], true, "{v}");
    // Expires 40 days after its time; its month (March) ends 2026-04-01, plus 40 days.
    assert_eq!(
        ts("expires"),
        ts("time") + jiff::SignedDuration::from_hours(40 * 24)
    );
    let destroyed = ts("key_destroyed_by");
    let due: jiff::Timestamp = "2026-05-11T00:00:00Z".parse().unwrap();
    let now = jiff::Timestamp::now();
    let earliest = due.max(now);
    assert!(
        destroyed >= earliest
            && destroyed.duration_since(earliest) <= jiff::SignedDuration::from_hours(24),
        "{v}"
    );
    assert_eq!(
        destroyed.to_zoned_datetime(jiff::tz::TimeZone::UTC).hour(),
        5,
        "{v}"
    );
    assert!(ts("unrecoverable_by") <= destroyed, "{v}");
    // The text form names the column.
    let c = config.to_str().unwrap();
    let out = kluis(&[
        "retention",
        "report",
        "--config",
        c,
        "--repository",
        "offsite",
    ]);
    let t = String::from_utf8(out).unwrap();
    assert!(
        t.contains("KEY DESTROYED BY") && t.contains("erase after 40d"),
        "{t}"
    );
}
