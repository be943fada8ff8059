//! Test harness shared by the integration tests: runs the real `kluis` binary against a
//! repository in a temporary directory, and starts a real Garage S3 server on loopback when a
//! test needs one. Everything lives under one `TempDir` per test, so tests run in parallel.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod databases;
pub mod faults;
pub mod mariadb;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use tempfile::TempDir;

pub const KLUIS: &str = env!("CARGO_BIN_EXE_kluis");

/// Exit codes, as documented in the README (duplicated here on purpose: they are API).
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INCOMPLETE: i32 = 3;
pub const EXIT_SOURCE_FAILED: i32 = 4;
pub const EXIT_TARGET_FAILED: i32 = 5;
pub const EXIT_NO_REPOSITORY: i32 = 10;
pub const EXIT_WRONG_PASSWORD: i32 = 12;
pub const EXIT_CORRUPT: i32 = 13;

/// Deterministic pseudo-random bytes: `len` bytes from `seed` (BLAKE3 in XOF mode).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().fill(&mut out);
    out
}

/// Compressible, text-like bytes that still differ per seed, like a database dump.
pub fn dump_like(seed: u64, len: usize) -> Vec<u8> {
    let noise = random_bytes(seed, len / 8 + 64);
    let mut out = Vec::with_capacity(len + 128);
    let mut i = 0usize;
    while out.len() < len {
        let n = u32::from_le_bytes(
            noise[(i * 4) % (noise.len() - 4)..][..4]
                .try_into()
                .unwrap(),
        );
        writeln!(
            out,
            "INSERT INTO orders VALUES ({i}, 'customer-{}', {}.{:02}, 'status-{}');",
            n % 100_000,
            n % 10_000,
            n % 100,
            n % 7
        )
        .unwrap();
        i += 1;
    }
    out.truncate(len);
    out
}

/// A free TCP port on loopback (there is a small race until the user binds it; fine in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A kluis repository in a temporary directory, opened with a key file.
pub struct Repo {
    pub dir: TempDir,
    pub url: String,
    pub key_file: PathBuf,
    pub env: BTreeMap<String, String>,
}

impl Repo {
    /// A `file://` repository, not yet initialised.
    pub fn file() -> Repo {
        let dir = TempDir::new().unwrap();
        let url = dir.path().join("repo").display().to_string();
        Repo::at(dir, url, BTreeMap::new())
    }

    /// A repository at `url` with extra environment (e.g. S3 credentials).
    pub fn at(dir: TempDir, url: String, env: BTreeMap<String, String>) -> Repo {
        let key_file = dir.path().join("key");
        let repo = Repo {
            dir,
            url,
            key_file,
            env,
        };
        repo.ok(&["key", "generate", repo.key_file.to_str().unwrap()]);
        repo
    }

    /// A `file://` repository, initialised with the given extra `init` arguments.
    pub fn init_file(init_args: &[&str]) -> Repo {
        let repo = Repo::file();
        let mut args = vec!["init"];
        args.extend_from_slice(init_args);
        repo.ok(&args);
        repo
    }

    /// `kluis init` with [`SMALL_PACKS`].
    pub fn init_small(&self) {
        let mut args = vec!["init"];
        args.extend(SMALL_PACKS);
        self.ok(&args);
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The repository directory (file:// repositories only).
    pub fn root(&self) -> PathBuf {
        PathBuf::from(&self.url)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(KLUIS);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KLUIS_REPOSITORY", &self.url)
            .env("KLUIS_KEY_FILE", &self.key_file)
            // This "host's" state (its ledger of the repository), per test.
            .env("KLUIS_STATE_DIR", self.dir.path().join("state"))
            .envs(&self.env)
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `kluis args`, opening the repository with the password in `password_file` instead of
    /// the key file.
    pub fn run_with_password(&self, password_file: &Path, args: &[&str]) -> Output {
        self.command(args)
            .env_remove("KLUIS_KEY_FILE")
            .env("KLUIS_PASSWORD_FILE", password_file)
            .output()
            .unwrap()
    }

    /// `kluis args` on a host whose wall clock is off by `offset` (`"-2h"`, `"+7h"`), through
    /// Debian's `faketime` (libfaketime). Monotonic clocks are left alone; files the process
    /// writes get their times from the kernel, as they would on a real host with a wrong clock.
    pub fn skewed(&self, offset: &str, args: &[&str]) -> Command {
        let plain = self.command(args);
        let mut cmd = Command::new("faketime");
        cmd.arg("-f")
            .arg(offset)
            .arg(KLUIS)
            .args(args)
            .env_clear()
            .envs(plain.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `kluis args` with standard input, output and error piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs `kluis args` with `input` on standard input.
    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self.spawn(args);
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }

    /// Runs and asserts success; returns standard output.
    pub fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert_success(&out, args);
        out.stdout
    }

    pub fn backup_stdin(&self, name: &str, input: &[u8]) -> String {
        let out = self.run_stdin(&["backup", "--stdin", "--name", name, "--json"], input);
        assert_success(&out, &["backup", "--stdin"]);
        snapshot_id(&out.stdout)
    }

    pub fn backup_paths(&self, extra: &[&str], paths: &[&Path]) -> String {
        let mut args: Vec<&str> = vec!["backup", "--json"];
        args.extend_from_slice(extra);
        args.extend(paths.iter().map(|p| p.to_str().unwrap()));
        let out = self.run(&args);
        assert_success(&out, &args);
        snapshot_id(&out.stdout)
    }

    pub fn restore_stdout(&self, snapshot: &str) -> Vec<u8> {
        self.ok(&["restore", snapshot, "--stdout", "--quiet"])
    }

    /// Every object file of a file:// repository, by name relative to its root.
    pub fn objects(&self) -> Vec<(String, PathBuf)> {
        let root = self.root();
        let mut out = Vec::new();
        walk(&root, &mut |p| {
            let name = p.strip_prefix(&root).unwrap().display().to_string();
            out.push((name, p.to_path_buf()));
        });
        out.sort();
        out
    }

    /// Bytes stored in a file:// repository.
    pub fn stored_bytes(&self) -> u64 {
        self.objects()
            .iter()
            .map(|(_, p)| fs::metadata(p).unwrap().len())
            .sum()
    }
}

pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "kluis {args:?} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Asserts the exit code and returns standard error.
pub fn assert_code(out: &Output, code: i32, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit code {code}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what}: panic: {stderr}");
    stderr
}

/// The snapshot id from `backup --json` output.
pub fn snapshot_id(stdout: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("backup --json output does not parse: {e}: {}", text(stdout)));
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

/// A Garage S3 server running in a temporary directory on loopback ports, with one bucket and
/// one access key: a cluster of one node. Killed on drop.
pub struct Garage {
    cluster: cluster::Cluster,
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

/// The Garage binary: `$GARAGE`, else `garage` on PATH, else `~/.cargo/bin/garage`.
pub fn garage_binary() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("garage");
        if p.is_file() {
            return p;
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".cargo/bin/garage");
    assert!(
        p.is_file(),
        "Garage not found: install it with `cargo install garage --locked` (tests/run-all.sh does)"
    );
    p
}

impl Garage {
    pub fn start() -> Garage {
        let cluster = cluster::Cluster::start(1);
        Garage {
            endpoint: format!("http://127.0.0.1:{}", cluster.nodes[0].s3),
            bucket: cluster.bucket.clone(),
            access_key: cluster.access_key.clone(),
            secret_key: cluster.secret_key.clone(),
            cluster,
        }
    }

    /// A repository URL in this server's bucket, and the environment that reaches it.
    pub fn repo(&self, prefix: &str) -> Repo {
        self.repo_through(prefix, &self.endpoint)
    }

    /// [`Garage::repo`], reached through `endpoint` (a proxy in front of this server).
    pub fn repo_through(&self, prefix: &str, endpoint: &str) -> Repo {
        Repo::at(
            TempDir::new().unwrap(),
            self.url_through(prefix, endpoint, ""),
            self.credentials(),
        )
    }

    /// The URL of a repository in this server's bucket, reached through `endpoint`, with
    /// more URL options (`&timeout=2s`).
    pub fn url_through(&self, prefix: &str, endpoint: &str, options: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint={endpoint}&region=garage&path-style=true{options}",
            self.bucket
        )
    }

    /// The environment that reaches this server.
    pub fn credentials(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("AWS_ACCESS_KEY_ID".to_string(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), self.secret_key.clone()),
        ])
    }

    /// The S3 API's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.endpoint.trim_start_matches("http://").parse().unwrap()
    }
}

/// SHA-256 of `b`, in hex (as snapshots record their streams).
pub fn sha256(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

/// `init` arguments for small packs and chunks: many packs from little data.
pub const SMALL_PACKS: [&str; 4] = ["--pack-size", "65536", "--chunk-sizes", "4096,16384,65536"];

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A small directory tree with the things a backup must keep: nested directories, an empty
/// file, a large file, modes, mtimes, symlinks (also dangling), and a non-UTF-8 name.
pub fn sample_tree(root: &Path, seed: u64) {
    use std::os::unix::ffi::OsStrExt;
    fs::create_dir_all(root.join("etc/app")).unwrap();
    fs::create_dir_all(root.join("var/lib/db/empty-dir")).unwrap();
    fs::write(
        root.join("etc/app/config.toml"),
        b"listen = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    fs::write(root.join("etc/app/empty"), b"").unwrap();
    fs::write(root.join("var/lib/db/big.bin"), random_bytes(seed, 3 << 20)).unwrap();
    fs::write(root.join("var/lib/db/dump.sql"), dump_like(seed, 2 << 20)).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9-latin1.txt");
    fs::write(root.join("etc").join(odd), b"non-utf8 name").unwrap();
    std::os::unix::fs::symlink("app/config.toml", root.join("etc/current")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("etc/dangling")).unwrap();
    let script = root.join("etc/app/run.sh");
    fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o750)).unwrap();
    let secret = root.join("etc/app/secret");
    fs::write(&secret, b"s3cr3t").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("etc/app/config.toml"), t).unwrap();
}

/// Asserts two trees are equal: names, types, contents, modes, mtimes of files and symlink
/// targets.
pub fn assert_same_tree(a: &Path, b: &Path) {
    use std::os::unix::fs::MetadataExt;
    let list = |root: &Path| {
        let mut v = Vec::new();
        fn rec(root: &Path, dir: &Path, v: &mut Vec<PathBuf>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                v.push(p.strip_prefix(root).unwrap().to_path_buf());
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    rec(root, &p, v);
                }
            }
        }
        rec(root, root, &mut v);
        v.sort();
        v
    };
    let (la, lb) = (list(a), list(b));
    assert_eq!(la, lb, "restored tree lists different entries");
    for rel in la {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}: type", rel.display());
        if ma.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&pa).unwrap(),
                fs::read_link(&pb).unwrap(),
                "{}",
                rel.display()
            );
            continue;
        }
        assert_eq!(
            ma.mode() & 0o7777,
            mb.mode() & 0o7777,
            "{}: mode",
            rel.display()
        );
        // Files' and directories' (set after their entries are restored).
        assert_eq!(ma.mtime(), mb.mtime(), "{}: mtime", rel.display());
        assert_eq!(
            ma.mtime_nsec(),
            mb.mtime_nsec(),
            "{}: mtime ns",
            rel.display()
        );
        if ma.is_file() {
            assert!(
                fs::read(&pa).unwrap() == fs::read(&pb).unwrap(),
                "{}: content",
                rel.display()
            );
        }
    }
}

/// Feeds `script` to a database client on its standard input; returns what it printed; panics
/// with its error output if it fails.
pub fn run_script(client: &mut Command, script: &str, what: &str) -> String {
    let mut child = client
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}\nscript: {}",
        text(&out.stderr),
        &script[..script.len().min(2000)]
    );
    text(&out.stdout)
}

/// A PostgreSQL server in a temporary directory on a loopback port, run as the `postgres` user
/// when the tests run as root (PostgreSQL refuses root). Local socket connections are trusted
/// (the harness's own); TCP connections need the password `password()`. Stopped on drop.
pub struct Postgres {
    pub dir: TempDir,
    pub port: u16,
    pub bin: PathBuf,
}

/// The newest PostgreSQL server binaries (Debian: /usr/lib/postgresql/N/bin).
pub fn postgres_bin() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: tests/run-all.sh installs it")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop().expect("no /usr/lib/postgresql/N/bin/initdb").1
}

fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Whether the tests run as root (PostgreSQL must then run as `postgres`).
fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false)
}

impl Postgres {
    pub const PASSWORD: &'static str = "pg-test-password";

    pub fn start() -> Postgres {
        Postgres::start_with("")
    }

    /// A server whose postgresql.conf ends with `settings` (lines `name = value`).
    pub fn start_with(settings: &str) -> Postgres {
        let dir = TempDir::new().unwrap();
        let bin = postgres_bin();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to postgres failed");
        }
        let data = dir.path().join("data");
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--locale=C.UTF-8"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", text(&out.stderr));
        if !settings.is_empty() {
            let conf = data.join("postgresql.conf");
            let mut text = fs::read_to_string(&conf).unwrap();
            text.push_str(&format!("\n{settings}\n"));
            fs::write(&conf, text).unwrap();
        }
        let pg = Postgres {
            port: free_port(),
            dir,
            bin,
        };
        pg.pg_ctl_start();
        pg.sql(
            "postgres",
            &format!("ALTER ROLE postgres PASSWORD '{}'", Self::PASSWORD),
        );
        pg
    }

    fn pg_ctl_start(&self) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
                self.port,
                self.dir.path().display()
            ))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            text(&out.stderr),
            fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// A directory for a data directory someone else makes (`DIR/data`): the server's user
    /// owns it, so [`Postgres::start_on`] can start a server on it.
    pub fn new_home() -> TempDir {
        let dir = TempDir::new().unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to postgres failed");
        }
        dir
    }

    /// A server on the data directory `home/data` (restored there, say).
    pub fn start_on(home: TempDir) -> Postgres {
        let pg = Postgres {
            port: free_port(),
            dir: home,
            bin: postgres_bin(),
        };
        pg.pg_ctl_start();
        pg
    }

    /// SIGKILL of the server and every process it started (a crash, a power cut).
    pub fn kill9(&self) {
        let pid_file = fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let pid = pid_file.lines().next().unwrap().trim().to_string();
        let _ = Command::new("pkill").args(["-KILL", "-P", &pid]).status();
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `program` run as the user the server runs as.
    pub fn as_server_user(program: &Path) -> Command {
        as_postgres(program)
    }

    /// Stops the server (fast shutdown); `start_again` brings it back.
    pub fn stop(&self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// `postgres://postgres@127.0.0.1:PORT/db` (the password goes in a file, never the URL).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// psql over the trusted local socket, as the superuser.
    pub fn psql(&self) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
        ])
        .arg("-h")
        .arg(self.dir.path())
        .arg("-p")
        .arg(self.port.to_string());
        c
    }

    /// Runs SQL (a script, from stdin) in `db`; returns its output; panics on error.
    pub fn sql(&self, db: &str, script: &str) -> String {
        run_script(
            self.psql().args(["-d", db]),
            script,
            &format!("psql -d {db}"),
        )
    }

    /// A logical fingerprint of a database: every table's row count and ordered checksum,
    /// every sequence's state, every large object.
    pub fn fingerprint(&self, db: &str) -> String {
        self.sql(
            db,
            r#"
SELECT format('SELECT %L, count(*), md5(coalesce(string_agg(t::text, E''\n'' ORDER BY t::text), '''')) FROM %I.%I t;',
              n.nspname || '.' || c.relname, n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
ORDER BY 1 \gexec
SELECT format('SELECT %L, last_value, is_called FROM %I.%I;', n.nspname || '.' || c.relname, n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' ORDER BY 1 \gexec
SELECT 'large object', oid, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY oid;
"#,
        )
    }

    /// `pg_dump --schema-only` without its per-run random `\restrict` key lines.
    pub fn schema(&self, db: &str) -> String {
        let out = Command::new(self.bin.join("pg_dump"))
            .args(["-s", "-U", "postgres", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), db])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_dump -s: {}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A 1 MiB tmpfs mounted for a test (needs root): a disk that fills up.
pub struct TinyDisk(pub tempfile::TempDir);

impl TinyDisk {
    pub fn mount() -> TinyDisk {
        let dir = tempfile::TempDir::new().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs (the tests need root)");
        TinyDisk(dir)
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Replaces `to` with a copy of the directory `from` (`cp -a`).
pub fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

/// Runs `command` (stdout dropped) and kills it with SIGKILL at a random point within 1.1
/// times `full` (how long a whole run takes), until `kills` kills have landed mid-run (at most
/// ten tries per kill); before each run `before()`, after each `after(i, delay)`. A run that
/// finishes before its kill must succeed. Returns how many finished.
pub fn kill_at_random(
    kills: usize,
    full: std::time::Duration,
    seed: u64,
    mut command: impl FnMut() -> Command,
    mut before: impl FnMut(),
    mut after: impl FnMut(usize, std::time::Duration),
) -> usize {
    use std::os::unix::process::ExitStatusExt;
    let bytes = random_bytes(seed, kills * 40);
    let (mut landed, mut finished) = (0, 0);
    for i in 0..kills * 10 {
        if landed == kills {
            break;
        }
        before();
        let frac = u32::from_le_bytes(bytes[i * 4..][..4].try_into().unwrap());
        let delay = full.mul_f64(1.1 * f64::from(frac) / f64::from(u32::MAX));
        let mut child = command()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        if out.status.signal() == Some(9) {
            landed += 1;
        } else {
            assert_success(&out, &["a run that finished before its kill"]);
            finished += 1;
        }
        after(i, delay);
    }
    assert_eq!(
        landed, kills,
        "kills that landed mid-run ({finished} finished first; a run took {full:?})"
    );
    finished
}
