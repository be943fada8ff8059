//! Helpers shared by the database tests: password files, snapshot counts, and a writer that
//! moves money between accounts while backups run.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;

use std::collections::BTreeMap;

use super::{Repo, hex, text};

/// A database password file (mode 0600) beside the repository.
pub fn password_file(repo: &Repo, content: &str) -> PathBuf {
    let p = repo
        .path()
        .join(format!("dbpw-{}", hex(content.as_bytes())));
    fs::write(&p, format!("{content}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `kluis --db-password-file PW ARGS...`, to run.
pub fn run_with_pw(repo: &Repo, pw: &Path, args: &[&str]) -> Output {
    command_with_pw(repo, pw, args).output().unwrap()
}

/// `kluis --db-password-file PW ARGS...`, to adjust before running.
pub fn command_with_pw(repo: &Repo, pw: &Path, args: &[&str]) -> Command {
    let mut all = vec!["--db-password-file", pw.to_str().unwrap()];
    all.extend_from_slice(args);
    repo.command(&all)
}

pub fn snapshot_count(repo: &Repo) -> usize {
    let out = repo.ok(&["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array().unwrap().len()
}

/// The sum a restored bank must hold: 2000 checking and 2000 savings accounts of 1000.
pub const BANK_TOTAL: &str = "4000000";

/// The query that adds up a bank (the same in PostgreSQL and MySQL).
pub const BANK_TOTAL_SQL: &str =
    "SELECT (SELECT sum(balance) FROM checking) + (SELECT sum(balance) FROM savings)";

/// `kluisd --config CONFIG --once` with `env` (S3 credentials, say); it must succeed. Its log.
pub fn kluisd_once(config: &Path, env: BTreeMap<String, String>) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kluisd"))
        .arg("--config")
        .arg(config)
        .arg("--once")
        .envs(env)
        .output()
        .unwrap();
    let log = text(&out.stderr);
    assert!(out.status.success(), "kluisd --once failed: {log}");
    log
}

/// Every snapshot's id, oldest first.
pub fn snapshot_ids(repo: &Repo) -> Vec<String> {
    let out = repo.ok(&["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// No object in the repository holds `marker` in the clear.
pub fn assert_no_plaintext(repo: &Repo, marker: &[u8]) {
    for (name, path) in repo.objects() {
        let bytes = fs::read(path).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "{name} holds plaintext"
        );
    }
}

/// `n` transfers of 3 from a checking to a savings account, each its own transaction opened
/// with `begin` (`BEGIN` or `START TRANSACTION`). The total never changes.
pub fn transfers(begin: &str, n: u64) -> String {
    let mut script = String::new();
    for i in 0..n {
        let (a, b) = (1 + (i * 7919) % 2000, 1 + (i * 104_729) % 2000);
        script.push_str(&format!(
            "{begin}; UPDATE checking SET balance = balance - 3 WHERE id = {a}; \
             UPDATE savings SET balance = balance + 3 WHERE id = {b}; COMMIT;\n"
        ));
    }
    script
}

/// A database client running a script fed from a thread.
pub struct Writer {
    child: Child,
    feeder: JoinHandle<()>,
}

impl Writer {
    pub fn start(client: &mut Command, script: String) -> Writer {
        let mut child = client
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(script.as_bytes());
        });
        // Let it get going before the first backup.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Writer { child, feeder }
    }

    /// Stops the writer; panics if it had already finished (the test would prove nothing).
    pub fn stop(mut self) {
        let still_writing = self.child.try_wait().unwrap().is_none();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.feeder.join();
        assert!(
            still_writing,
            "the writer finished before the backups did: test proves nothing"
        );
    }
}
