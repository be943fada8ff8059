//! kluisd and its configuration, end to end: the real daemon binary on configurations written
//! to a temporary directory, each with its own state directory and local repository.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const KLUISD: &str = env!("CARGO_BIN_EXE_kluisd");

/// A state directory and a configuration file whose `{jobs}` are appended to a local
/// repository section.
struct Setup {
    dir: TempDir,
    config: PathBuf,
    /// Where `/metrics` is served.
    port: u16,
}

impl Setup {
    fn new(daemon: &str, jobs: &str) -> Setup {
        let dir = TempDir::new().unwrap();
        let state = dir.path().join("state");
        let config = dir.path().join("kluisd.toml");
        let port = free_port();
        fs::write(
            &config,
            format!(
                "[daemon]\nstate_dir = \"{}\"\ntime_zone = \"UTC\"\n{daemon}\n\
                 [http]\nlisten = \"127.0.0.1:{port}\"\n\
                 [repositories.local]\nurl = \"{{state_dir}}/repository\"\n\
                 key_file = \"{{state_dir}}/repository.key\"\ninit = true\n\n{jobs}",
                state.display()
            ),
        )
        .unwrap();
        Setup { dir, config, port }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn kluisd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KLUISD);
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// `kluis` on the job's repository.
    fn kluis(&self, args: &[&str]) -> Output {
        Command::new(KLUIS)
            .args(args)
            .env("KLUIS_REPOSITORY", self.state().join("repository"))
            .env("KLUIS_KEY_FILE", self.state().join("repository.key"))
            .env("KLUIS_STATE_DIR", self.state())
            .output()
            .unwrap()
    }

    fn snapshots(&self) -> Vec<serde_json::Value> {
        let out = self.kluis(&["snapshots", "--json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().clone()
    }

    fn wait_for_snapshots(&self, n: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.snapshots().len() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }
}

/// `GET path` on the daemon's HTTP endpoint: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// A metric's value on a `/metrics` page, by its name and labels as printed.
fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// `promtool check metrics` finds nothing to say about a `/metrics` page.
fn promtool_check_metrics(page: &str) {
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is not installed: tests/run-all.sh installs it (Debian: prometheus)");
    {
        use std::io::Write;
        lint.stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
    }
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {}{}",
        text(&lint.stdout),
        text(&lint.stderr)
    );
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Waits for the daemon to exit; returns its exit code and log.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut log = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut log)
                .unwrap();
            return (status.code(), log);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "kluisd did not stop within {limit:?}: {}",
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn data_dir(setup: &Setup) -> PathBuf {
    let d = setup.dir.path().join("data");
    sample_tree(&d, 1);
    d
}

#[test]
fn once_runs_every_job_and_reports_failures() {
    let setup = Setup::new("", "");
    let data = data_dir(&setup);
    let jobs = format!(
        "[jobs.files]\nrepository = \"local\"\npaths = [\"{}\"]\nschedule = \"daily at 02:30\"\n\
         [jobs.generated]\nrepository = \"local\"\ncommand = \"seq 1 100000\"\n\
         schedule = \"every 1h\"\ntags = [\"nightly\"]\n",
        data.display()
    );
    rewrite(&setup, &jobs);
    let out = setup.kluisd(&["--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let snaps = setup.snapshots();
    let mut names: Vec<&str> = snaps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["files", "generated"]);
    let generated = snaps.iter().find(|s| s["name"] == "generated").unwrap();
    assert_eq!(generated["tags"][0], "nightly");
    // The key file was made 0600 with the repository.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(setup.state().join("repository.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let restored = setup.dir.path().join("restored");
    let out = setup.kluis(&[
        "restore",
        "latest",
        "--name",
        "files",
        "--target",
        restored.to_str().unwrap(),
    ]);
    assert_success(&out, &["restore"]);
    assert_same_tree(&data, &restored.join("data"));

    // A failing job fails --once, and commits nothing.
    let failing = "[jobs.broken]\nrepository = \"local\"\ncommand = \"echo partial; exit 3\"\n\
                   schedule = \"every 1h\"\n";
    let setup2 = Setup::new("", failing);
    let out = setup2.kluisd(&["--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("exit code 3"),
        "{}",
        text(&out.stderr)
    );
    assert!(setup2.snapshots().is_empty());
}

/// Replaces the jobs of a setup's configuration.
fn rewrite(setup: &Setup, jobs: &str) -> PathBuf {
    let text = fs::read_to_string(&setup.config).unwrap();
    fs::write(&setup.config, format!("{text}{jobs}")).unwrap();
    setup.config.clone()
}

#[test]
fn runs_on_schedule_and_stops_cleanly() {
    let setup = Setup::new("", "");
    let data = data_dir(&setup);
    rewrite(
        &setup,
        &format!(
            "[jobs.files]\nrepository = \"local\"\npaths = [\"{}\"]\nschedule = \"every 2s\"\n",
            data.display()
        ),
    );
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    // A first run at start-up (the job never ran), then one every two seconds.
    let ok = setup.wait_for_snapshots(3, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let (status, health) = http_get(setup.port, "/healthz");
    assert!(status.contains("200"), "{status}");
    assert_eq!(health, "ok\n");
    let (status, page) = http_get(setup.port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let runs = metric(
        &page,
        "kluis_job_runs_total{job=\"files\",result=\"success\"}",
    );
    assert!(runs.is_some_and(|r| r >= 3.0), "{page}");
    assert_eq!(
        metric(
            &page,
            "kluis_job_runs_total{job=\"files\",result=\"failure\"}"
        ),
        Some(0.0)
    );
    assert!(
        metric(&page, "kluis_repository_snapshots{repository=\"local\"}").is_some_and(|n| n >= 3.0)
    );
    assert!(metric(&page, "kluis_job_last_read_bytes{job=\"files\"}").is_some_and(|b| b > 0.0));
    assert!(metric(&page, "kluis_job_next_run_timestamp_seconds{job=\"files\"}").is_some());
    assert_eq!(
        metric(&page, "kluis_build_info{version=\"0.1.0\"}"),
        Some(1.0)
    );
    assert!(!page.contains("snapshot_id"), "unbounded labels: {page}");
    // The page passes Prometheus's own linter.
    promtool_check_metrics(&page);
    assert!(http_get(setup.port, "/nope").0.contains("404"));
    // `kluis status` asks the daemon while it runs...
    let status = |setup: &Setup| {
        let out = Command::new(KLUIS)
            .args(["status", "--json", "--config"])
            .arg(&setup.config)
            .output()
            .unwrap();
        assert_success(&out, &["status"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let live = status(&setup);
    assert_eq!(live["source"], "daemon", "{live}");
    assert_eq!(live["jobs"][0]["name"], "files");
    assert_eq!(live["jobs"][0]["last_result"], "success", "{live}");
    assert!(live["jobs"][0]["next_run"].is_string(), "{live}");
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert!(ok, "fewer than 3 snapshots in 30 s: {log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stopped") || log.contains("stopping"), "{log}");
    setup.kluis(&["check"]);
    // ...and reads the repositories when it is gone.
    let offline = status(&setup);
    assert_eq!(offline["source"], "repositories", "{offline}");
    let newest = setup
        .snapshots()
        .into_iter()
        .max_by_key(|s| {
            s["time"]
                .as_str()
                .unwrap()
                .parse::<jiff::Timestamp>()
                .unwrap()
        })
        .unwrap();
    assert_eq!(
        offline["jobs"][0]["last_snapshot"], newest["id"],
        "{offline}"
    );
    assert!(offline["repositories"][0]["snapshots"].as_u64().unwrap() >= 3);
}

#[test]
fn sigterm_during_a_backup_commits_nothing() {
    // A source that never ends: the run must be cut short by the shutdown grace period.
    let jobs = "[jobs.endless]\nrepository = \"local\"\n\
                command = \"while :; do head -c 65536 /dev/urandom; sleep 0.05; done\"\n\
                schedule = \"every 1h\"\n";
    let setup = Setup::new("shutdown_grace = \"1s\"", jobs);
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert_eq!(
        code,
        Some(1),
        "a cut-short run must show in the exit code: {log}"
    );
    assert!(log.contains("cut short"), "{log}");
    assert!(
        setup.snapshots().is_empty(),
        "a partial snapshot is visible"
    );
    let out = setup.kluis(&["check"]);
    assert_success(&out, &["check after SIGTERM"]);
}

#[test]
fn a_missed_run_is_caught_up_within_the_window() {
    let now = jiff::Timestamp::now();
    let due = now - jiff::SignedDuration::from_mins(30);
    let hhmm = due
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .strftime("%H:%M")
        .to_string();
    let data_job = |dir: &Path| {
        format!(
            "[jobs.files]\nrepository = \"local\"\npaths = [\"{}\"]\nschedule = \"daily at {hhmm}\"\n",
            dir.display()
        )
    };
    for (window, caught_up) in [("2h", true), ("10m", false)] {
        let setup = Setup::new(&format!("catch_up = \"{window}\""), "");
        let data = data_dir(&setup);
        rewrite(&setup, &data_job(&data));
        // The last success: yesterday, before the run that was due 30 minutes ago.
        let yesterday = (now - jiff::SignedDuration::from_hours(25)).to_string();
        let out = Command::new(KLUIS)
            .args(["backup", "--job", "files", "--time", &yesterday, "--config"])
            .arg(&setup.config)
            .output()
            .unwrap();
        assert_success(&out, &["backup --job"]);
        assert_eq!(setup.snapshots().len(), 1);
        let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
        let ran = setup.wait_for_snapshots(2, Duration::from_secs(if caught_up { 20 } else { 4 }));
        signal(&child, "-TERM");
        let (code, log) = finish(child, Duration::from_secs(30));
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(ran, caught_up, "catch_up {window}: {log}");
    }
}

#[test]
fn a_run_past_its_timeout_is_cancelled_even_when_its_tool_is_silent() {
    // A dump that waits (for a lock, say) and prints nothing.
    let jobs = "[jobs.stuck]\nrepository = \"local\"\ncommand = \"sleep 120; echo late\"\n\
                schedule = \"every 1h\"\ntimeout = \"2s\"\n";
    let setup = Setup::new("", jobs);
    let started = Instant::now();
    let out = setup.kluisd(&["--once"]).output().unwrap();
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(started.elapsed() < Duration::from_secs(30), "{log}");
    assert!(log.contains("cancelled after its timeout"), "{log}");
    assert!(setup.snapshots().is_empty());
    // `kluis backup --job` runs the job as the daemon does: under its timeout.
    let started = Instant::now();
    let out = Command::new(KLUIS)
        .args(["backup", "--job", "stuck", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{err}");
    assert!(
        err.contains("job stuck: cancelled after its timeout of 2s"),
        "{err}"
    );
    assert!(setup.snapshots().is_empty());
}

#[test]
fn every_file_in_config_checks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(KLUIS)
                .args(["config", "check"])
                .arg(&p)
                .output()
                .unwrap();
            assert_success(&out, &["config check", p.to_str().unwrap()]);
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "config/ holds the embedded default and an example"
    );
    let out = Command::new(KLUIS)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_success(&out, &["config check (embedded)"]);

    let bad = TempDir::new().unwrap();
    let p = bad.path().join("bad.toml");
    fs::write(
        &p,
        "[repositories.r]\nurl = \"/x\"\nkey_file = \"/k\"\n[jobs.a]\nrepository = \"r\"\n\
         paths = [\"/etc\"]\nschedule = \"daily at 24:00\"\n",
    )
    .unwrap();
    let out = Command::new(KLUIS)
        .args(["config", "check"])
        .arg(&p)
        .output()
        .unwrap();
    let err = assert_code(&out, EXIT_USAGE, "a bad schedule");
    assert!(err.contains("bad.toml:7: jobs.a.schedule"), "{err}");
    // kluisd refuses it too, before doing anything.
    let out = Command::new(KLUISD)
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn a_changed_file_or_sighup_reloads_and_a_bad_file_keeps_the_old_configuration() {
    let setup = Setup::new("", "");
    let data = data_dir(&setup);
    let files = format!(
        "[jobs.files]\nrepository = \"local\"\npaths = [\"{}\"]\nschedule = \"every 1h\"\n",
        data.display()
    );
    let base = fs::read_to_string(&setup.config).unwrap();
    fs::write(&setup.config, format!("{base}{files}")).unwrap();
    // systemd's notification socket, as Type=notify sets it.
    let sock_path = setup.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let child = setup
        .kluisd(&[])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let mut heard = String::new();
    while !heard.contains("READY=1") {
        let n = sock.recv(&mut buf).expect("kluisd never said READY=1");
        heard.push_str(&String::from_utf8_lossy(&buf[..n]));
        heard.push('\n');
    }
    assert!(setup.wait_for_snapshots(1, Duration::from_secs(20)));

    // A new job, written to the watched file: it never ran, so it runs once reloaded.
    let more =
        "[jobs.more]\nrepository = \"local\"\ncommand = \"seq 1 1000\"\nschedule = \"every 1h\"\n";
    fs::write(&setup.config, format!("{base}{files}{more}")).unwrap();
    let ran = setup.wait_for_snapshots(2, Duration::from_secs(20));
    if !ran {
        signal(&child, "-TERM");
        panic!(
            "the new job did not run after the file changed: {}",
            finish(child, Duration::from_secs(30)).1
        );
    }
    assert!(setup.snapshots().iter().any(|s| s["name"] == "more"));

    // A broken file: logged and counted, the daemon goes on with what it had.
    fs::write(
        &setup.config,
        format!("{base}{files}[jobs.broken]\nschedule = 3\n"),
    )
    .unwrap();
    let failures = |page: &str| metric(page, "kluis_config_reload_failures_total").unwrap_or(0.0);
    let poll_until = |done: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        loop {
            let page = http_get(setup.port, "/metrics").1;
            if done(&page) || start.elapsed() > Duration::from_secs(20) {
                return page;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let page = poll_until(&|p| failures(p) >= 1.0);
    assert!(failures(&page) >= 1.0, "{page}");
    assert_eq!(
        metric(&page, "kluis_config_last_reload_successful"),
        Some(0.0),
        "{page}"
    );
    // SIGHUP reads it again, with the same result.
    let before = failures(&page);
    signal(&child, "-HUP");
    let page = poll_until(&|p| failures(p) > before);
    assert!(failures(&page) > before, "SIGHUP did not reload: {page}");
    assert_eq!(http_get(setup.port, "/healthz").1, "ok\n");
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("reload failed, still running the previous configuration"),
        "{log}"
    );
    assert!(
        log.contains("kluisd.toml:"),
        "the error names the file: {log}"
    );
}

#[test]
fn the_systemd_unit_is_hardened_and_valid() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/kluisd.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze is not installed");
    let report = text(&out.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for kluisd.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score: {report}{}", text(&out.stderr)));
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{report}");
    // `verify` wants the binary to exist: check a copy that points at the one just built.
    let dir = TempDir::new().unwrap();
    let copy = dir.path().join("kluisd.service");
    fs::write(
        &copy,
        fs::read_to_string(&unit)
            .unwrap()
            .replace("/usr/local/bin/kluisd", KLUISD),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus");
    for args in [
        ["check", "rules", "kluis-alerts.yml"],
        ["test", "rules", "kluis-alerts.test.yml"],
        ["test", "rules", "kluis-alerts-monthly.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool is not installed: tests/run-all.sh installs it (Debian: prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn a_job_never_overlaps_itself() {
    // Due every second, but each run takes about two: runs that come due meanwhile are skipped.
    let jobs = "[jobs.slow]\nrepository = \"local\"\ncommand = \"sleep 2; seq 1 1000\"\n\
                schedule = \"every 1s\"\n";
    let setup = Setup::new("max_concurrent_jobs = 4", jobs);
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    let ok = setup.wait_for_snapshots(3, Duration::from_secs(30));
    let (_, page) = http_get(setup.port, "/metrics");
    signal(&child, "-TERM");
    let (_, log) = finish(child, Duration::from_secs(30));
    assert!(ok, "{log}");
    let skipped = metric(&page, "kluis_job_skipped_runs_total{job=\"slow\"}").unwrap_or(0.0);
    assert!(skipped >= 1.0, "no run was skipped: {page}");
    let mut runs: Vec<(jiff::Timestamp, jiff::Timestamp)> = setup
        .snapshots()
        .iter()
        .map(|s| {
            (
                s["started"].as_str().unwrap().parse().unwrap(),
                s["finished"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    runs.sort();
    for pair in runs.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "two runs overlapped: {pair:?}\n{log}"
        );
    }
}

#[test]
fn the_embedded_default_backs_up_within_seconds_and_counts_it() {
    // config/kluis.toml as shipped, with a schedule of seconds, its own state directory and a
    // free port: the README's main command, sped up.
    let shipped =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kluis.toml"))
            .unwrap();
    assert!(shipped.contains("schedule = \"every 1m\""), "{shipped}");
    assert!(shipped.contains("listen = \"127.0.0.1:9911\""), "{shipped}");
    let dir = TempDir::new().unwrap();
    let port = free_port();
    let config = dir.path().join("kluis.toml");
    fs::write(
        &config,
        shipped
            .replace("schedule = \"every 1m\"", "schedule = \"every 3s\"")
            .replace("127.0.0.1:9911", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let state = dir.path().join("state");
    let child = Command::new(KLUISD)
        .arg("--config")
        .arg(&config)
        .env("STATE_DIRECTORY", &state)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let setup = Setup {
        config: config.clone(),
        port,
        dir,
    };
    let ok = setup.wait_for_snapshots(2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    let (_, page) = http_get(port, "/metrics");
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert!(ok, "no snapshots from the embedded default: {log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("job etc: snapshot"), "{log}");
    let runs = metric(
        &page,
        "kluis_job_runs_total{job=\"etc\",result=\"success\"}",
    );
    assert!(runs.is_some_and(|r| r >= 1.0), "{page}");
    promtool_check_metrics(&page);
}

#[test]
fn a_run_dropped_from_the_configuration_is_still_stopped_at_shutdown() {
    let endless = "[jobs.endless]\nrepository = \"local\"\n\
                   command = \"while :; do head -c 65536 /dev/urandom; sleep 0.05; done\"\n\
                   schedule = \"every 1h\"\n";
    let setup = Setup::new("shutdown_grace = \"1s\"", endless);
    let with_job = fs::read_to_string(&setup.config).unwrap();
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // The running job disappears from the file; its run goes on, and shutdown must still
    // reach it. Added back, it must not start a second run beside the first.
    fs::write(&setup.config, with_job.replace(endless, "")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    fs::write(&setup.config, &with_job).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (_, page) = http_get(setup.port, "/metrics");
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(
        log.matches("job endless: backup starting").count(),
        1,
        "{log}"
    );
    assert_eq!(
        metric(&page, "kluis_job_running{job=\"endless\"}"),
        Some(1.0),
        "{page}"
    );
    assert!(setup.snapshots().is_empty());
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `kluis config check | head -1`: the reader goes away early.
    let mut child = Command::new(KLUIS)
        .args(["config", "check", "--runs", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}

#[test]
fn scheduled_maintenance_forgets_by_retention_prunes_and_counts_it() {
    let setup = Setup::new(
        "",
        "retention = { keep_last = 2 }\n\
         prune = { schedule = \"every 2s\", grace = \"3s\" }\n\n\
         [jobs.noise]\nrepository = \"local\"\n\
         command = \"head -c 300000 /dev/urandom\"\n\
         schedule = \"every 1s\"\ntimeout = \"2s\"\n",
    );
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until a sweep has deleted packs (marked by one run, swept 3 s later).
    let start = Instant::now();
    let page = loop {
        std::thread::sleep(Duration::from_millis(500));
        let (_, page) = http_get(setup.port, "/metrics");
        let deleted = metric(
            &page,
            "kluis_prune_packs_deleted_total{repository=\"local\"}",
        );
        if deleted.is_some_and(|d| d > 0.0) || start.elapsed() > Duration::from_secs(40) {
            break page;
        }
    };
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert!(code.is_some(), "{log}");
    assert!(
        metric(
            &page,
            "kluis_prune_packs_deleted_total{repository=\"local\"}"
        )
        .is_some_and(|d| d > 0.0),
        "no pack deleted: {page}\n{log}"
    );
    assert!(
        metric(
            &page,
            "kluis_prune_reclaimed_bytes_total{repository=\"local\"}"
        )
        .is_some_and(|d| d > 200_000.0),
        "{page}"
    );
    assert!(
        metric(
            &page,
            "kluis_forget_removed_snapshots_total{repository=\"local\"}"
        )
        .is_some_and(|d| d >= 1.0),
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "kluis_prune_runs_total{repository=\"local\",result=\"failure\"}"
        ),
        Some(0.0),
        "{page}\n{log}"
    );
    assert!(
        metric(
            &page,
            "kluis_prune_last_success_timestamp_seconds{repository=\"local\"}"
        )
        .is_some()
    );
    promtool_check_metrics(&page);
    assert!(
        log.contains("maintenance (forget, then prune) every 2s"),
        "{log}"
    );
    // What is left checks clean and restores.
    let out = setup.kluis(&["check", "--read-data"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = setup.snapshots();
    assert!(list.len() <= 3, "retention kept {} snapshots", list.len());
    for s in list {
        let out = setup.kluis(&["restore", s["id"].as_str().unwrap(), "--stdout"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(out.stdout.len(), 300_000);
    }
}

#[test]
fn a_prune_grace_shorter_than_a_writing_job_is_refused() {
    let setup = Setup::new(
        "",
        "prune = { schedule = \"daily at 05:00\", grace = \"1h\" }\n\n\
         [jobs.big]\nrepository = \"local\"\ncommand = \"true\"\n\
         schedule = \"daily at 02:00\"\ntimeout = \"2h\"\n",
    );
    let out = Command::new(KLUIS)
        .args(["config", "check"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("repositories.local.prune.grace (1h) must be longer")
            && err.contains("jobs.big.timeout is 2h"),
        "{err}"
    );
}

#[test]
fn copy_rules_copy_to_a_foreign_bucket_on_schedule_and_count_it() {
    let garage = Garage::start();
    let foreign = format!(
        "s3://{}/foreign?endpoint={}&region=garage",
        garage.bucket, garage.endpoint
    );
    let setup = Setup::new(
        "",
        &format!(
            "[repositories.foreign]\nurl = \"{foreign}\"\n\
             key_file = \"{{state_dir}}/foreign.key\"\ninit = true\n\n\
             [jobs.db]\nrepository = \"local\"\n\
             command = \"head -c 200000 /dev/urandom\"\n\
             schedule = \"every 1s\"\ntimeout = \"10s\"\n\n\
             [copies.monthly]\nfrom = \"local\"\nto = \"foreign\"\n\
             schedule = \"every 2s\"\nnames = [\"db\"]\ntimeout = \"30s\"\n"
        ),
    );
    let child = setup
        .kluisd(&[])
        .env("AWS_ACCESS_KEY_ID", &garage.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &garage.secret_key)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let series = "kluis_copy_snapshots_total{copy=\"monthly\"}";
    let start = Instant::now();
    let page = loop {
        std::thread::sleep(Duration::from_millis(500));
        let (_, page) = http_get(setup.port, "/metrics");
        if metric(&page, series).is_some_and(|n| n >= 2.0)
            || start.elapsed() > Duration::from_secs(40)
        {
            break page;
        }
    };
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert!(code.is_some(), "{log}");
    assert!(
        metric(&page, series).is_some_and(|n| n >= 2.0),
        "{page}\n{log}"
    );
    assert!(
        metric(&page, "kluis_copy_uploaded_bytes_total{copy=\"monthly\"}")
            .is_some_and(|b| b >= 400_000.0),
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "kluis_copy_runs_total{copy=\"monthly\",result=\"failure\"}"
        ),
        Some(0.0),
        "{page}\n{log}"
    );
    assert!(
        metric(
            &page,
            "kluis_copy_last_success_timestamp_seconds{copy=\"monthly\"}"
        )
        .is_some()
    );
    assert_eq!(
        metric(
            &page,
            "kluis_copy_info{copy=\"monthly\",from=\"local\",to=\"foreign\"}"
        ),
        Some(1.0)
    );
    let info = format!(
        "kluis_repository_info{{endpoint=\"{}\",region=\"garage\",repository=\"foreign\",store=\"s3\"}}",
        garage.endpoint
    );
    assert_eq!(metric(&page, &info), Some(1.0), "{page}");
    promtool_check_metrics(&page);
    // The start-up log says where each repository's data lands.
    assert!(
        log.contains(&format!(
            "repository foreign: s3 store {}, region garage",
            garage.endpoint
        )),
        "{log}"
    );
    assert!(log.contains("copy monthly: local -> foreign"), "{log}");
    // Invariant 8: the bucket's secret reaches neither the log nor the metrics.
    for (what, text) in [("log", &log), ("metrics", &page)] {
        assert!(
            !text.contains(&garage.secret_key),
            "the S3 secret is in the {what}"
        );
    }

    // The copies are in the bucket, under the foreign key only, and restore to what the local
    // repository holds.
    let foreign_kluis = |args: &[&str]| {
        Command::new(KLUIS)
            .args(args)
            .env("KLUIS_REPOSITORY", &foreign)
            .env("KLUIS_KEY_FILE", setup.state().join("foreign.key"))
            .env("AWS_ACCESS_KEY_ID", &garage.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &garage.secret_key)
            .output()
            .unwrap()
    };
    let out = foreign_kluis(&["snapshots", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let copies: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(copies.len() >= 2);
    let local = setup.snapshots();
    for c in &copies {
        let origin = c["origin"]["snapshot"].as_str().unwrap();
        let original = local
            .iter()
            .find(|s| s["id"] == origin)
            .expect("the original is in the local repository");
        assert_eq!(c["streams"], original["streams"]);
        assert_eq!(c["time"], original["time"]);
        let out = foreign_kluis(&["restore", c["id"].as_str().unwrap(), "--stdout"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(out.stdout.len(), 200_000);
    }
    let out = foreign_kluis(&["check", "--read-data"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(
        fs::read(setup.state().join("foreign.key")).unwrap(),
        fs::read(setup.state().join("repository.key")).unwrap()
    );
}

#[test]
fn copy_rules_are_checked() {
    let check = |rules: &str| {
        let setup = Setup::new("", rules);
        let out = Command::new(KLUIS)
            .args(["config", "check"])
            .arg(&setup.config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{rules} was accepted");
        text(&out.stderr)
    };
    let err =
        check("[copies.x]\nfrom = \"local\"\nto = \"nowhere\"\nschedule = \"daily at 04:00\"\n");
    assert!(
        err.contains("copies.x.to: no [repositories.nowhere] section"),
        "{err}"
    );
    let err =
        check("[copies.x]\nfrom = \"local\"\nto = \"local\"\nschedule = \"daily at 04:00\"\n");
    assert!(
        err.contains("copies to the repository it copies from"),
        "{err}"
    );
    let err = check(
        "[copies.x]\nfrom = \"local\"\nto = \"local\"\nschedule = \"daily at 04:00\"\nselect = \"some\"\n",
    );
    assert!(err.contains("select") && err.contains("latest"), "{err}");
    // A prune grace must outlast the copies writing to the repository, too.
    let err = check(
        "prune = { schedule = \"daily at 05:00\", grace = \"1h\" }\n\n\
         [repositories.other]\nurl = \"{state_dir}/other\"\nkey_file = \"{state_dir}/k\"\ninit = true\n\n\
         [copies.back]\nfrom = \"other\"\nto = \"local\"\nschedule = \"daily at 04:00\"\ntimeout = \"3h\"\n",
    );
    assert!(err.contains("copies.back.timeout is 3h"), "{err}");
}

#[test]
fn drills_run_at_start_up_and_on_schedule_with_metrics() {
    let setup = Setup::new("max_concurrent_jobs = 2\n", "");
    let db = setup.dir.path().join("app.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
            .unwrap();
    }
    let data = setup.dir.path().join("data");
    sample_tree(&data, 9);
    let config = fs::read_to_string(&setup.config).unwrap()
        + &format!(
            "[jobs.files]\nrepository = \"local\"\npaths = [\"{}\"]\nschedule = \"daily at 02:00\"\n\n\
             [jobs.app]\nrepository = \"local\"\ndatabase = \"sqlite://{}\"\nschedule = \"daily at 02:00\"\n\n\
             [drills.files]\nschedule = \"every 3s\"\nbudget = \"1m\"\n\n\
             [drills.app]\nschedule = \"daily at 06:00\"\n\
             [[drills.app.assert]]\nname = \"three rows\"\nsql = \"SELECT count(*) = 3 FROM t\"\n",
            data.display(),
            db.display()
        );
    fs::write(&setup.config, config).unwrap();
    // What a drill killed with the daemon left behind, and a file that is not a drill's.
    let scratch = setup.state().join("drills");
    fs::create_dir_all(scratch.join("kluis_drill_files_20200101000000/tree")).unwrap();
    fs::write(scratch.join("kluis_drill_filesystem_notes"), b"not mine").unwrap();
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    let ok = "kluis_drill_runs_total{job=\"files\",repository=\"local\",result=\"success\"}";
    let start = Instant::now();
    let page = loop {
        std::thread::sleep(Duration::from_millis(500));
        let (_, page) = http_get(setup.port, "/metrics");
        let app_done = metric(
            &page,
            "kluis_drill_last_result{job=\"app\",repository=\"local\"}",
        )
        .is_some();
        if (metric(&page, ok).is_some_and(|n| n >= 2.0) && app_done)
            || start.elapsed() > Duration::from_secs(60)
        {
            break page;
        }
    };
    // `/status` (what `kluis status` shows) has each drill's last result.
    let (_, body) = http_get(setup.port, "/status");
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert!(code.is_some(), "{log}");
    let live: serde_json::Value = serde_json::from_str(&body).unwrap();
    let drill = |status: &serde_json::Value, name: &str| {
        status["drills"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no drill {name} in {status}"))
    };
    assert_eq!(drill(&live, "files")["last_result"], "passed", "{live}");
    assert!(drill(&live, "files")["next_run"].is_string());
    assert_eq!(
        drill(&live, "app")["last_result"],
        "FAILED (assertion)",
        "{live}"
    );
    // Without the daemon, `kluis status` works it out from the drill reports.
    let out = Command::new(KLUIS)
        .args(["status", "--json", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let offline: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(offline["source"], "repositories");
    assert_eq!(
        drill(&offline, "files")["last_result"],
        "passed",
        "{offline}"
    );
    assert_eq!(drill(&offline, "app")["last_result"], "FAILED (assertion)");
    assert!(drill(&offline, "app")["last_success"].is_null());
    // The directory drill passed at start-up and again on its schedule.
    assert!(metric(&page, ok).is_some_and(|n| n >= 2.0), "{page}\n{log}");
    assert_eq!(
        metric(
            &page,
            "kluis_drill_last_result{job=\"files\",repository=\"local\"}"
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &page,
            "kluis_drill_last_duration_seconds{job=\"files\",repository=\"local\"}"
        )
        .is_some_and(|s| s > 0.0 && s < 60.0),
        "{page}"
    );
    assert!(
        metric(
            &page,
            "kluis_drill_last_success_timestamp_seconds{job=\"files\",repository=\"local\"}"
        )
        .is_some()
    );
    // The SQLite drill ran once, at start-up, and failed its assertion.
    assert_eq!(
        metric(
            &page,
            "kluis_drill_last_result{job=\"app\",repository=\"local\"}"
        ),
        Some(0.0),
        "{page}\n{log}"
    );
    assert_eq!(
        metric(
            &page,
            "kluis_drill_failures_total{job=\"app\",reason=\"assertion\",repository=\"local\"}"
        ),
        Some(1.0),
        "{page}"
    );
    promtool_check_metrics(&page);
    assert!(log.contains("drill app: snapshot"), "{log}");
    assert!(log.contains("FAILED assert: three rows: returned"), "{log}");
    // What the killed drill left behind was dropped at start-up.
    assert!(
        log.contains("dropped 1 left behind by an earlier drill: kluis_drill_files_20200101000000"),
        "{log}"
    );

    // A restart reads the drill history back from the repository.
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, page) = http_get(setup.port, "/metrics");
    signal(&child, "-TERM");
    let (_, log) = finish(child, Duration::from_secs(30));
    assert!(
        metric(
            &page,
            "kluis_drill_last_success_timestamp_seconds{job=\"files\",repository=\"local\"}"
        )
        .is_some(),
        "{page}\n{log}"
    );
    // Nothing of the drills is left.
    let left: Vec<String> = fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["kluis_drill_filesystem_notes".to_string()]);
}

#[test]
fn once_runs_jobs_then_copies_drills_and_maintenance() {
    let setup = Setup::new(
        "",
        "prune = { schedule = \"daily at 05:00\", grace = \"1d\" }\n\n\
         [repositories.second]\nurl = \"{state_dir}/second\"\nkey_file = \"{state_dir}/second.key\"\ninit = true\n\n\
         [jobs.cmd]\nrepository = \"local\"\ncommand = \"seq 1 20000\"\nschedule = \"daily at 02:00\"\ntimeout = \"1h\"\n\n\
         [copies.offsite]\nfrom = \"local\"\nto = \"second\"\nschedule = \"daily at 04:00\"\n\n\
         [drills.cmd]\nrepository = \"second\"\nschedule = \"daily at 06:00\"\n",
    );
    let out = setup.kluisd(&["--once"]).output().unwrap();
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the log:\n{log}"))
    };
    // In order: the job, the copy of its snapshot, the drill of the copy, the prune.
    assert!(at("job cmd: snapshot") < at("copy offsite: 1 snapshot(s) copied"));
    assert!(at("copy offsite: 1 snapshot(s) copied") < at("drill cmd: snapshot"));
    assert!(at("(newest) passed") < at("repository local: forgot 0 snapshot(s)"));
}

#[test]
fn scheduled_erasure_destroys_the_keys_of_months_past_erase_after_and_keeps_every_slot() {
    let setup = Setup::new(
        "",
        "erase_after = \"30d\"\n\
         prune = { schedule = \"every 2s\", grace = \"3s\" }\n\n\
         [jobs.db]\nrepository = \"local\"\ncommand = \"seq 1 5000\"\n\
         schedule = \"daily at 02:00\"\ntimeout = \"2s\"\n",
    );
    let out = setup.kluisd(&["--once"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let now = jiff::Timestamp::now();
    let days = |d: i64| now - jiff::SignedDuration::from_hours(24 * d);
    for (i, d) in [100, 70, 35, 1].into_iter().enumerate() {
        let t = days(d).to_string();
        let input = dump_like(70 + i as u64, 50_000);
        let mut child = Command::new(KLUIS)
            .args(["backup", "--stdin", "--name", "old", "--time", &t])
            .env("KLUIS_REPOSITORY", setup.state().join("repository"))
            .env("KLUIS_KEY_FILE", setup.state().join("repository.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &input).unwrap();
        assert!(child.wait().unwrap().success());
    }
    // A second holder's slot: a scheduled erasure must not lock it out.
    let other = setup.state().join("other.key");
    assert!(
        setup
            .kluis(&["key", "generate", other.to_str().unwrap()])
            .status
            .success()
    );
    let out = setup.kluis(&["key", "add", "--new-key-file", other.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let slots = |s: &Setup| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&s.kluis(&["key", "list", "--json"]).stdout).unwrap();
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let before_slots = slots(&setup);
    assert_eq!(before_slots.len(), 2);

    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let page = loop {
        std::thread::sleep(Duration::from_millis(500));
        let (_, page) = http_get(setup.port, "/metrics");
        let erased = metric(&page, "kluis_erase_snapshots_total{repository=\"local\"}");
        if erased.is_some_and(|d| d > 0.0) || start.elapsed() > Duration::from_secs(40) {
            break page;
        }
    };
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert!(code.is_some(), "{log}");
    assert_eq!(
        metric(&page, "kluis_erase_snapshots_total{repository=\"local\"}"),
        Some(3.0),
        "{page}\n{log}"
    );
    assert!(
        metric(
            &page,
            "kluis_erase_epochs_destroyed_total{repository=\"local\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{page}"
    );
    let before = metric(
        &page,
        "kluis_erase_before_timestamp_seconds{repository=\"local\"}",
    )
    .expect("the erasure's date");
    let cutoff = days(30).as_second() as f64;
    assert!((before - cutoff).abs() < 120.0, "{before} vs {cutoff}");
    promtool_check_metrics(&page);
    assert!(log.contains("repository local: erasure "), "{log}");

    // Nothing older than 30 days is left, and no month that ended before then has a key or
    // an object; the rest restores, and both secrets still open the repository.
    let list = setup.snapshots();
    for s in &list {
        let t: jiff::Timestamp = s["time"].as_str().unwrap().parse().unwrap();
        assert!(t >= days(30), "{s} survived");
    }
    assert!(
        list.iter().any(|s| s["name"] == "old"),
        "the 1-day-old one stays"
    );
    let repo = setup.state().join("repository");
    for d in [100, 70] {
        let month = kluis::object::Epoch::of(days(d)).to_string();
        for prefix in ["epochs", "data", "index", "snapshots"] {
            let dir = repo.join(prefix).join(&month);
            let mut left = Vec::new();
            if dir.exists() {
                walk(&dir, &mut |p| left.push(p.display().to_string()));
            }
            assert!(left.is_empty(), "{} holds {left:?}", dir.display());
        }
    }
    for s in &list {
        let out = setup.kluis(&["restore", s["id"].as_str().unwrap(), "--stdout"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert_eq!(slots(&setup), before_slots, "every slot kept");
    let out = Command::new(KLUIS)
        .args(["snapshots"])
        .env("KLUIS_REPOSITORY", &repo)
        .env("KLUIS_KEY_FILE", &other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The record says what went, by whom, and that the secrets were kept.
    let out = setup.kluis(&["erase", "--list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &records.as_array().unwrap()[0];
    assert_eq!(first["secrets_changed"], false);
    assert_eq!(first["generation_before"], first["generation_after"]);
    let out = setup.kluis(&["audit", "--kind", "erase", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = setup.kluis(&["check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_reload_is_an_audit_record_and_the_trail_is_verified_and_counted() {
    let setup = Setup::new(
        "",
        "[jobs.cmd]\nrepository = \"local\"\ncommand = \"seq 1 1000\"\nschedule = \"every 1s\"\n",
    );
    let child = setup.kluisd(&[]).stderr(Stdio::piped()).spawn().unwrap();
    assert!(setup.wait_for_snapshots(1, Duration::from_secs(20)));
    let poll_until = |done: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        loop {
            let page = http_get(setup.port, "/metrics").1;
            if done(&page) || start.elapsed() > Duration::from_secs(30) {
                return page;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let reloads = |page: &str| {
        metric(
            page,
            "kluis_audit_records_total{kind=\"config-reload\",repository=\"local\"}",
        )
        .unwrap_or(0.0)
    };
    let problems = |page: &str| metric(page, "kluis_audit_chain_problems{repository=\"local\"}");
    let page = poll_until(&|p| problems(p).is_some());
    assert_eq!(problems(&page), Some(0.0), "{page}");
    assert_eq!(reloads(&page), 0.0, "{page}");

    // A reload is recorded in the repository it names, and counted once the trail is
    // verified again (after the next run).
    signal(&child, "-HUP");
    let page = poll_until(&|p| reloads(p) >= 1.0);
    assert_eq!(reloads(&page), 1.0, "{page}");
    promtool_check_metrics(&page);
    let out = setup.kluis(&["audit", "--kind", "config-reload", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let trail: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let record = trail["records"]
        .as_array()
        .and_then(|a| a.first())
        .unwrap_or_else(|| panic!("{trail}"));
    assert_eq!(record["kind"], "config-reload", "{record}");
    assert!(
        record["user"].is_string() && record["host"].is_string(),
        "{record}"
    );
    assert_eq!(record["result"], "ok", "{record}");

    // The record removed: the daemon, which wrote it, reports the trail broken.
    let audit = setup.state().join("repository/audit");
    for e in fs::read_dir(&audit).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    let page = poll_until(&|p| problems(p).is_some_and(|n| n > 0.0));
    signal(&child, "-TERM");
    let (code, log) = finish(child, Duration::from_secs(30));
    assert!(
        problems(&page).is_some_and(|n| n >= 1.0),
        "a removed record was not noticed: {page}\n{log}"
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("audit: {"), "the journal line: {log}");
}
