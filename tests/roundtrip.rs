//! Round trips through the real `kluis` binary: streams and directory trees, on `file://` and
//! on a real Garage S3 server; plus the CLI's promises about secrets, names and exit codes.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::*;

fn stream_input() -> Vec<u8> {
    let mut input = dump_like(1, 5 << 20);
    input.extend_from_slice(&random_bytes(2, 3 << 20));
    input.extend_from_slice(&dump_like(3, 1 << 20));
    input
}

/// Stream and tree round trips, then `check --read-data`, against any repository.
fn round_trips(repo: &Repo) {
    let input = stream_input();
    let id = repo.backup_stdin("db", &input);
    assert!(
        repo.restore_stdout(&id) == input,
        "stream restored by id differs"
    );
    assert!(
        repo.restore_stdout(&id[..8]) == input,
        "stream restored by prefix differs"
    );

    let empty = repo.backup_stdin("empty", b"");
    assert!(repo.restore_stdout(&empty).is_empty());

    let src = repo.path().join("src");
    sample_tree(&src, 7);
    let tree = repo.backup_paths(&[], &[&src.join("etc"), &src.join("var")]);
    let target = repo.path().join("restored");
    repo.ok(&[
        "restore",
        &tree,
        "--target",
        target.to_str().unwrap(),
        "--quiet",
    ]);
    assert_same_tree(&src, &target);

    // `latest --name` picks the newest snapshot of that name.
    let again = dump_like(9, 300_000);
    repo.backup_stdin("db", &again);
    let out = repo.ok(&["restore", "latest", "--name", "db", "--stdout", "--quiet"]);
    assert!(out == again, "latest --name db restored the wrong snapshot");

    let check = text(&repo.ok(&["check", "--read-data"]));
    assert!(check.contains("no problems found"), "{check}");
}

#[test]
fn round_trips_on_a_local_directory() {
    let repo = Repo::init_file(&[]);
    round_trips(&repo);
}

#[test]
fn round_trips_on_garage_s3() {
    let garage = Garage::start();
    let repo = garage.repo("prod/db1");
    repo.ok(&["init"]);
    round_trips(&repo);
    // A second repository under another prefix of the same bucket is independent.
    let other = garage.repo("prod/db2");
    let out = other.run(&["snapshots"]);
    assert_code(
        &out,
        EXIT_NO_REPOSITORY,
        "snapshots of an uninitialised prefix",
    );
}

/// A TCP proxy in front of `upstream`: its first `fail` connections get their first request
/// answered with HTTP 503 and are closed; later ones are passed through. Returns its address
/// and the count of connections it failed.
fn flaky_proxy(
    upstream: std::net::SocketAddr,
    fail: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::Ordering::SeqCst;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = failed.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut client) = conn else { continue };
            if count.load(SeqCst) < fail {
                count.fetch_add(1, SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = client.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
                      Connection: close\r\n\r\n",
                );
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (addr, failed)
}

#[test]
fn a_pack_of_thousands_of_small_blobs_restores() {
    // 3,000 small files: one pack whose table of contents (126 KB) is longer than the 64 KiB
    // restore reads from a pack's end at first to check it.
    let repo = Repo::init_file(&[]);
    let src = repo.path().join("many");
    fs::create_dir(&src).unwrap();
    for i in 0..3000 {
        fs::write(src.join(format!("f{i}")), format!("small file {i}\n")).unwrap();
    }
    let id = repo.backup_paths(&[], &[&src]);
    let packs: Vec<_> = repo
        .objects()
        .into_iter()
        .filter(|(n, _)| n.starts_with("data/"))
        .map(|(_, p)| fs::metadata(p).unwrap().len())
        .collect();
    assert!(packs.iter().any(|&len| len > 126_000), "{packs:?}");
    let dir = repo.path().join("restored");
    repo.ok(&["restore", &id, "--target", dir.to_str().unwrap(), "--quiet"]);
    assert_same_tree(&src, &dir.join("many"));
}

#[test]
fn a_listing_error_is_an_error_never_an_empty_list() {
    let repo = Repo::init_file(&[]);
    let data = dump_like(9, 1 << 20);
    let id = repo.backup_stdin("db", &data);
    // A directory the store cannot walk (a symlink loop): its listing fails.
    for prefix in ["snapshots", "index", "keys"] {
        let dir = fs::read_dir(repo.root().join(prefix))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir())
            .unwrap_or_else(|| repo.root().join(prefix));
        let bad = dir.join("loop");
        std::os::unix::fs::symlink("..", &bad).unwrap();
        for args in [
            &["snapshots"][..],
            &["restore", "latest", "--stdout", "--quiet"],
            &["check"],
        ] {
            // Listing snapshots needs no index.
            if prefix == "index" && args[0] == "snapshots" {
                continue;
            }
            let out = repo.run(args);
            assert!(!out.status.success(), "{prefix}: {args:?} succeeded");
            let err = text(&out.stderr);
            assert!(
                err.contains(&format!("list of {prefix}/")),
                "{args:?}: {err}"
            );
            assert!(
                out.stdout.is_empty(),
                "{args:?} printed {:?}",
                text(&out.stdout)
            );
        }
        fs::remove_file(&bad).unwrap();
    }
    assert_eq!(repo.restore_stdout(&id), data);
}

#[test]
fn transient_s3_errors_are_retried() {
    let garage = Garage::start();
    let upstream = garage
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (proxy, failed) = flaky_proxy(upstream, 4);
    let repo = garage.repo_through("flaky", &format!("http://{proxy}"));
    repo.ok(&["init"]);
    let data = dump_like(8, 3 << 20);
    let id = repo.backup_stdin("db", &data);
    assert_eq!(repo.restore_stdout(&id), data);
    repo.ok(&["check", "--read-data"]);
    // Every failure was met, and retried past.
    assert_eq!(failed.load(std::sync::atomic::Ordering::SeqCst), 4);
}

#[test]
fn snapshots_lists_what_was_backed_up() {
    let repo = Repo::init_file(&[]);
    let input = dump_like(4, 1 << 20);
    let out = repo.run_stdin(
        &[
            "backup",
            "--stdin",
            "--name",
            "billing",
            "--host",
            "db-7",
            "--time",
            "2024-01-15T12:00:00Z",
            "--tag",
            "nightly",
            "--json",
        ],
        &input,
    );
    assert_success(&out, &["backup"]);
    let id = snapshot_id(&out.stdout);
    let list: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["snapshots", "--json"])).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let s = &list[0];
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["name"], "billing");
    assert_eq!(s["host"], "db-7");
    assert_eq!(s["tags"][0], "nightly");
    assert_eq!(s["summary"]["logical_bytes"], input.len() as u64);
    let sha = s["streams"][0]["sha256"].as_str().unwrap();
    assert_eq!(
        sha,
        hex(ring::digest::digest(&ring::digest::SHA256, &input).as_ref())
    );
    // The snapshot time decides the epoch, and the epoch is part of every object's name.
    let names: Vec<String> = repo.objects().into_iter().map(|(n, _)| n).collect();
    for prefix in ["data/", "index/", "snapshots/"] {
        let of_kind: Vec<_> = names.iter().filter(|n| n.starts_with(prefix)).collect();
        assert!(!of_kind.is_empty(), "no {prefix} objects");
        assert!(
            of_kind
                .iter()
                .all(|n| n.starts_with(&format!("{prefix}2024-01/"))),
            "{prefix} objects outside epoch 2024-01: {of_kind:?}"
        );
    }
    let table = text(&repo.ok(&["snapshots"]));
    assert!(
        table.contains(&id[..8]) && table.contains("billing"),
        "{table}"
    );
    // Without --quiet a backup says what it saved; with it, a successful one says nothing
    // (cron mails any output).
    let out = repo.run_stdin(&["backup", "--stdin", "--name", "said"], b"x");
    assert_success(&out, &["backup"]);
    assert!(
        text(&out.stdout).starts_with("snapshot "),
        "{}",
        text(&out.stdout)
    );
    let out = repo.run_stdin(&["backup", "--stdin", "--name", "quiet", "--quiet"], b"y");
    assert_success(&out, &["backup --quiet"]);
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}

#[test]
fn nothing_in_the_repository_is_plaintext() {
    let repo = Repo::init_file(&[]);
    let marker = b"KLUIS-PLAINTEXT-MARKER-7f3a9c";
    let mut input = Vec::new();
    for i in 0..20_000 {
        input.extend_from_slice(format!("row {i} ").as_bytes());
        input.extend_from_slice(marker);
        input.push(b'\n');
    }
    repo.backup_stdin("KLUIS-PLAINTEXT-MARKER-7f3a9c", &input);
    let src = repo.path().join("KLUIS-PLAINTEXT-MARKER-7f3a9c-dir");
    fs::create_dir(&src).unwrap();
    fs::write(
        src.join("KLUIS-PLAINTEXT-MARKER-7f3a9c.txt"),
        &input[..5000],
    )
    .unwrap();
    repo.backup_paths(&["--host", "KLUIS-PLAINTEXT-MARKER-7f3a9c"], &[&src]);
    let objects = repo.objects();
    assert!(objects.len() >= 6, "too few objects: {objects:?}");
    for (name, path) in objects {
        assert!(!name.contains("MARKER"), "object name leaks: {name}");
        let bytes = fs::read(path).unwrap();
        let leaks = bytes.windows(marker.len()).any(|w| w == marker);
        assert!(!leaks, "{name} contains the plaintext marker");
        // Short fragments of the marker also must not appear (e.g. split by compression).
        let frag = b"PLAINTEXT-MA";
        assert!(
            !bytes.windows(frag.len()).any(|w| w == frag),
            "{name} contains a fragment"
        );
    }
}

#[test]
fn wrong_password_and_missing_repository_have_their_own_exit_codes() {
    let repo = Repo::init_file(&[]);
    repo.backup_stdin("db", b"some data");

    // Another key file opens nothing.
    let other = repo.path().join("other-key");
    repo.ok(&["key", "generate", other.to_str().unwrap()]);
    let out = repo
        .command(&["snapshots"])
        .env("KLUIS_KEY_FILE", &other)
        .output()
        .unwrap();
    let err = assert_code(&out, EXIT_WRONG_PASSWORD, "snapshots with another key file");
    assert!(err.contains("wrong password or key file"), "{err}");

    // A wrong passphrase, through each way of passing one.
    let out = repo
        .command(&["restore", "latest", "--stdout"])
        .env_remove("KLUIS_KEY_FILE")
        .env("KLUIS_PASSWORD", "not the password")
        .output()
        .unwrap();
    assert_code(&out, EXIT_WRONG_PASSWORD, "restore with KLUIS_PASSWORD");
    assert!(
        out.stdout.is_empty(),
        "restore wrote data with a wrong password"
    );

    let missing = repo.path().join("nothing-here");
    let out = repo
        .command(&["snapshots"])
        .env("KLUIS_REPOSITORY", &missing)
        .output()
        .unwrap();
    let err = assert_code(
        &out,
        EXIT_NO_REPOSITORY,
        "snapshots of a missing repository",
    );
    assert!(err.contains("no kluis repository"), "{err}");

    let out = repo.run(&["restore", "ffffffff", "--stdout"]);
    let err = assert_code(&out, 1, "restore of an unknown snapshot");
    assert!(err.contains("ffffffff"), "{err}");
}

#[test]
fn secret_files_readable_by_others_are_refused() {
    let repo = Repo::init_file(&[]);
    fs::set_permissions(&repo.key_file, fs::Permissions::from_mode(0o644)).unwrap();
    let out = repo.run(&["snapshots"]);
    let err = assert_code(&out, 2, "snapshots with a world-readable key file");
    assert!(err.contains("chmod 600") && err.contains("key"), "{err}");

    let pw = repo.path().join("pw");
    fs::write(&pw, "correct horse battery staple\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o640)).unwrap();
    let out = repo
        .command(&["snapshots"])
        .env_remove("KLUIS_KEY_FILE")
        .env("KLUIS_PASSWORD_FILE", &pw)
        .output()
        .unwrap();
    assert_code(&out, 2, "snapshots with a group-readable password file");
}

/// Issue 18, defect 7: a private file of another user is refused too (whoever owns it can
/// replace the secret).
#[test]
fn secret_files_of_another_user_are_refused() {
    if !unsafe_free_is_root() {
        eprintln!("skipped: needs root to give a file to another user");
        return;
    }
    let repo = Repo::init_file(&[]);
    std::os::unix::fs::chown(&repo.key_file, Some(65534), None).unwrap();
    let out = repo.run(&["snapshots"]);
    let err = assert_code(&out, 2, "snapshots with another user's key file");
    assert!(err.contains("belongs to uid 65534"), "{err}");
}

/// Issue 18, defect 7: a local repository's key slots and objects were created with the
/// umask (0644, open to offline guessing by every local user).
#[test]
fn a_local_repository_is_private_to_its_user() {
    use std::os::unix::fs::MetadataExt;
    let repo = Repo::init_file(&[]);
    repo.backup_stdin("db", &dump_like(12, 300_000));
    let root = repo.root();
    assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
    let mut seen = 0;
    walk(&root, &mut |p| {
        let mode = fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        seen += 1;
    });
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                assert_eq!(
                    fs::metadata(&p).unwrap().mode() & 0o777,
                    0o700,
                    "{}",
                    p.display()
                );
                dirs.push(p);
            }
        }
    }
    assert!(seen >= 5, "only {seen} objects");
}

/// Issue 18, defect 7: the repository's password, the systemd credentials directory and the
/// S3 keys were inherited by every child (`--command`, pg_dump, psql, mariadb).
#[test]
fn children_never_see_the_repository_secrets() {
    let repo = Repo::init_file(&[]);
    let creds = repo.path().join("credentials");
    fs::create_dir(&creds).unwrap();
    let out = repo
        .command(&["backup", "--command", "env", "--name", "env", "--json"])
        .env("KLUIS_PASSWORD", "hunter2-repository")
        .env("AWS_SECRET_ACCESS_KEY", "s3-secret-key")
        .env("AWS_ACCESS_KEY_ID", "s3-key-id")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("SOME_SETTING", "kept")
        .output()
        .unwrap();
    assert_success(&out, &["backup", "--command", "env"]);
    let env = text(&repo.restore_stdout(&snapshot_id(&out.stdout)));
    assert!(env.contains("SOME_SETTING=kept"), "{env}");
    for secret in [
        "hunter2-repository",
        "s3-secret-key",
        "s3-key-id",
        "CREDENTIALS_DIRECTORY",
        "KLUIS_",
        "AWS_",
    ] {
        assert!(!env.contains(secret), "the child saw {secret}: {env}");
    }
}

#[test]
fn the_secret_can_come_from_a_systemd_credential() {
    let repo = Repo::init_file(&[]);
    let data = dump_like(6, 50_000);
    let id = repo.backup_stdin("db", &data);
    // As systemd's LoadCredential= leaves it: a directory holding the key file.
    let creds = repo.path().join("credentials");
    fs::create_dir(&creds).unwrap();
    fs::copy(&repo.key_file, creds.join("kluis-key-file")).unwrap();
    fs::set_permissions(
        creds.join("kluis-key-file"),
        fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let out = repo
        .command(&["restore", &id, "--stdout", "--quiet"])
        .env_remove("KLUIS_KEY_FILE")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert_success(&out, &["restore with a systemd credential"]);
    assert!(out.stdout == data);
    // Without it, and without any other secret, kluis says what it needs.
    let out = repo
        .command(&["snapshots"])
        .env_remove("KLUIS_KEY_FILE")
        .output()
        .unwrap();
    let err = assert_code(&out, 2, "no secret at all");
    assert!(
        err.contains("KLUIS_KEY_FILE") || err.contains("key"),
        "{err}"
    );
    // A passphrase slot opened by the credential `kluis-password`.
    let pw = repo.path().join("pw");
    fs::write(&pw, "a passphrase from systemd\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    repo.ok(&["key", "add", "--new-password-file", pw.to_str().unwrap()]);
    let creds = repo.path().join("password-credential");
    fs::create_dir(&creds).unwrap();
    let by_password = |content: &str| {
        fs::write(creds.join("kluis-password"), content).unwrap();
        fs::set_permissions(
            creds.join("kluis-password"),
            fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        repo.command(&["restore", &id, "--stdout", "--quiet"])
            .env_remove("KLUIS_KEY_FILE")
            .env("CREDENTIALS_DIRECTORY", &creds)
            .output()
            .unwrap()
    };
    let out = by_password("a passphrase from systemd\n");
    assert_success(&out, &["restore with kluis-password"]);
    assert!(out.stdout == data);
    fs::set_permissions(
        creds.join("kluis-password"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = by_password("not it\n");
    assert_code(&out, 12, "a wrong password credential");
}

#[test]
fn key_slots_can_be_added_used_and_removed() {
    let repo = Repo::init_file(&[]);
    let data = dump_like(5, 100_000);
    repo.backup_stdin("db", &data);
    let pw = repo.path().join("pw");
    fs::write(&pw, "correct horse battery staple\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    let out = repo.ok(&[
        "key",
        "add",
        "--new-password-file",
        pw.to_str().unwrap(),
        "--label",
        "on-call",
    ]);
    let _ = out;
    let with_password = |args: &[&str]| {
        repo.command(args)
            .env_remove("KLUIS_KEY_FILE")
            .env("KLUIS_PASSWORD_FILE", &pw)
            .output()
            .unwrap()
    };
    let out = with_password(&["restore", "latest", "--stdout", "--quiet"]);
    assert_success(&out, &["restore with the new password"]);
    assert!(out.stdout == data);

    let slots: serde_json::Value =
        serde_json::from_slice(&repo.ok(&["key", "list", "--json"])).unwrap();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 2, "{slots:?}");
    let added = slots
        .iter()
        .find(|s| s["label"] == "on-call")
        .unwrap_or_else(|| panic!("no on-call slot in {slots:?}"));
    let id = added["id"].as_str().unwrap().to_string();
    repo.ok(&["key", "remove", &id[..8]]);
    let out = with_password(&["snapshots"]);
    assert_code(&out, EXIT_WRONG_PASSWORD, "password of a removed slot");
    // The key file still opens the repository.
    repo.ok(&["snapshots"]);
}

#[test]
fn a_newer_repository_format_is_refused_with_a_clear_message() {
    let repo = Repo::init_file(&[]);
    let config = repo.root().join("config");
    let mut bytes = fs::read(&config).unwrap();
    assert_eq!(&bytes[..6], b"kluis\0", "config header magic");
    bytes[6] = 99; // the format version byte, see docs/FORMAT.md
    fs::write(&config, bytes).unwrap();
    let out = repo.run(&["snapshots"]);
    let err = assert_code(&out, 1, "snapshots of a newer-format repository");
    assert!(
        err.contains("newer than this kluis supports") && err.contains("config"),
        "{err}"
    );
}

#[test]
fn unreadable_files_are_reported_and_the_rest_is_committed() {
    let repo = Repo::init_file(&[]);
    let src = repo.path().join("src");
    fs::create_dir_all(src.join("locked-dir")).unwrap();
    fs::write(src.join("readable.txt"), b"fine").unwrap();
    fs::write(src.join("locked.txt"), b"secret").unwrap();
    fs::write(src.join("locked-dir/inner.txt"), b"inner").unwrap();
    fs::set_permissions(src.join("locked.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o000)).unwrap();

    // Root reads everything, so as root the backup runs as `nobody`, which owns the repository
    // and the key file but cannot read the locked entries.
    let is_root = unsafe_free_is_root();
    let mut cmd = if is_root {
        let nobody = "65534";
        let status = std::process::Command::new("chown")
            .args(["-R", &format!("{nobody}:{nobody}")])
            .arg(repo.path())
            .status()
            .unwrap();
        assert!(status.success());
        fs::set_permissions(repo.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid",
            nobody,
            "--regid",
            nobody,
            "--clear-groups",
            KLUIS,
        ]);
        c
    } else {
        std::process::Command::new(KLUIS)
    };
    let out = cmd
        .args(["backup", "--json", src.to_str().unwrap()])
        .env("KLUIS_REPOSITORY", &repo.url)
        .env("KLUIS_KEY_FILE", &repo.key_file)
        .env("HOME", repo.path())
        .output()
        .unwrap();
    let err = assert_code(&out, EXIT_INCOMPLETE, "backup with unreadable files");
    assert!(
        err.contains("locked.txt") && err.contains("locked-dir"),
        "{err}"
    );
    let id = snapshot_id(&out.stdout);
    if is_root {
        // Root does not use a secret file another user owns (that user has the secret).
        std::os::unix::fs::chown(&repo.key_file, Some(0), Some(0)).unwrap();
    }
    let target = repo.path().join("restored");
    repo.ok(&[
        "restore",
        &id,
        "--target",
        target.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(fs::read(target.join("src/readable.txt")).unwrap(), b"fine");
    assert!(!target.join("src/locked.txt").exists());
    // Put modes back so the temporary directory can be removed.
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o755)).unwrap();
}

/// Whether this process runs as root, from /proc (no libc, no unsafe).
fn unsafe_free_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
