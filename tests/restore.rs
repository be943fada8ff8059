//! Restores into a directory that other local users can reach (issue 18, defects 3 to 5):
//! nothing is readable by others before its recorded mode is applied, temporary names fit and
//! never collide, and a directory swapped for a symbolic link is never followed.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Every entry under `root`, depth first.
fn entries(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    walk_all(root, &mut v);
    v
}

fn walk_all(dir: &Path, v: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        v.push(p.clone());
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            walk_all(&p, v);
        }
    }
}

fn restore(repo: &Repo, id: &str, target: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "restore",
        id,
        "--target",
        target.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    repo.run(&args)
}

/// A tree whose one directory (`0755` in the snapshot) holds a big file, then a small one.
fn big_tree(repo: &Repo, size: usize) -> (PathBuf, String) {
    let src = repo.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/big"), random_bytes(7, size)).unwrap();
    fs::write(src.join("d/zz"), b"last file").unwrap();
    fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("d/big"), fs::Permissions::from_mode(0o644)).unwrap();
    let id = repo.backup_paths(&[], &[&src]);
    (src, id)
}

/// Waits until a temporary file of a running restore appears under `dir`; returns it.
fn wait_for_temporary(dir: &Path, restore: &mut std::process::Child) -> PathBuf {
    let started = Instant::now();
    loop {
        if let Ok(list) = fs::read_dir(dir) {
            for e in list.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains("kluis") {
                    return e.path();
                }
            }
        }
        assert!(
            restore.try_wait().unwrap().is_none(),
            "the restore ended before a temporary file was seen"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no temporary file"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Defect 3: a file was written world-readable (0644) under its temporary name, and a
/// directory was 0755 until its whole subtree was done.
#[test]
fn a_file_is_private_while_it_is_written_and_a_killed_restore_leaves_nothing_readable() {
    let repo = Repo::init_file(&[]);
    let (src, id) = big_tree(&repo, 96 << 20);
    let target = repo.path().join("restored");
    let mut child = repo
        .command(&[
            "restore",
            &id,
            "--target",
            target.to_str().unwrap(),
            "--quiet",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp = wait_for_temporary(&target.join("src/d"), &mut child);
    let tmp_mode = fs::symlink_metadata(&tmp).map(|m| m.mode() & 0o7777);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(tmp_mode.unwrap(), 0o600, "{}", tmp.display());
    for p in entries(&target) {
        let m = fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            m.mode() & 0o077,
            0,
            "{} is open to others ({:o}) after a killed restore",
            p.display(),
            m.mode() & 0o7777
        );
    }
    // Its leftovers do not stop a restore over it, and are gone after it.
    let out = restore(&repo, &id, &target, &["--overwrite"]);
    assert_success(&out, &["restore", "--overwrite"]);
    assert_same_tree(&src, &target.join("src"));
}

#[test]
fn a_failed_restore_leaves_its_directories_private() {
    let repo = Repo::init_file(&[]);
    let (_, id) = big_tree(&repo, 1 << 20);
    // Damage every data pack: the first file of `d` fails, after `d` was created.
    for (name, path) in repo.objects() {
        if name.starts_with("data/") && fs::metadata(&path).unwrap().len() > 1 << 19 {
            let mut bytes = fs::read(&path).unwrap();
            let n = bytes.len() / 2;
            bytes[n] ^= 1;
            fs::write(&path, bytes).unwrap();
        }
    }
    let target = repo.path().join("restored");
    let out = restore(&repo, &id, &target, &[]);
    assert_code(&out, EXIT_CORRUPT, "restore of damaged data");
    assert_eq!(mode(&target.join("src/d")), 0o700);
    assert_eq!(mode(&target.join("src")), 0o700);
    let left: Vec<_> = entries(&target.join("src/d"));
    assert!(left.is_empty(), "a failed file left {left:?}");
}

/// Defect 4: a name over ~240 bytes failed (the temporary name exceeded NAME_MAX), and a
/// directory holding both `foo` and `.foo.kluis-partial` failed with EEXIST.
#[test]
fn long_names_and_names_like_temporary_files_restore() {
    let repo = Repo::init_file(&[]);
    let src = repo.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let long = "x".repeat(255);
    fs::write(src.join(&long), b"a name of 255 bytes").unwrap();
    fs::write(src.join("foo"), b"foo").unwrap();
    fs::write(src.join(".foo.kluis-partial"), b"an ordinary file").unwrap();
    fs::write(src.join(".kluis-0123456789abcdef.tmp"), b"looks like ours").unwrap();
    let id = repo.backup_paths(&[], &[&src]);
    let target = repo.path().join("restored");
    assert_success(&restore(&repo, &id, &target, &[]), &["restore"]);
    assert_same_tree(&src, &target.join("src"));
    // Again over itself: nothing collides, nothing is lost.
    assert_success(
        &restore(&repo, &id, &target, &["--overwrite"]),
        &["restore"],
    );
    assert_same_tree(&src, &target.join("src"));
}

/// Defect 5: every step re-resolved a path, so a directory swapped for a symbolic link
/// mid-restore redirected later renames, chmods and chowns into a directory the attacker
/// chose (here: one holding a file planted under the temporary file's name).
#[test]
fn a_directory_swapped_for_a_symlink_mid_restore_is_not_followed() {
    let repo = Repo::init_file(&[]);
    let (_, id) = big_tree(&repo, 96 << 20);
    let target = repo.path().join("restored");
    let outside = repo.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o711)).unwrap();
    let mut child = repo
        .command(&[
            "restore",
            &id,
            "--target",
            target.to_str().unwrap(),
            "--quiet",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let d = target.join("src/d");
    let tmp = wait_for_temporary(&d, &mut child);
    // The "attacker": the directory being restored into is moved away, a symbolic link to a
    // directory of the attacker's takes its name, and a file of theirs waits there under the
    // temporary file's name.
    fs::rename(&d, target.join("src/moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &d).unwrap();
    let planted = outside.join(tmp.file_name().unwrap());
    fs::write(&planted, b"attacker's file").unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o700)).unwrap();
    let out = child.wait_with_output().unwrap();
    let names: Vec<_> = entries(&outside);
    assert_eq!(
        names,
        vec![planted.clone()],
        "the restore changed what is outside"
    );
    assert_eq!(mode(&planted), 0o700, "the restore changed a file outside");
    assert_eq!(
        mode(&outside),
        0o711,
        "the restore changed a directory outside"
    );
    // What it restored went into the directory it created, wherever that was moved.
    assert_success(&out, &["restore"]);
    assert_eq!(fs::read(target.join("src/moved/zz")).unwrap(), b"last file");
}

/// A path ending in `/` makes the kernel follow a final symbolic link even with O_NOFOLLOW:
/// the target's last component is opened from its parent, so the link is refused.
#[test]
fn a_target_that_is_a_symlink_is_refused_with_or_without_a_trailing_slash() {
    let repo = Repo::init_file(&[]);
    let (_, id) = big_tree(&repo, 64 << 10);
    let elsewhere = repo.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let link = repo.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    for target in [
        link.display().to_string(),
        format!("{}/", link.display()),
        format!("{}/.", link.display()),
    ] {
        let out = repo.run(&["restore", &id, "--target", &target, "--overwrite"]);
        let err = assert_code(&out, EXIT_USAGE, "a symlinked target");
        assert!(
            err.contains("not following it") || err.contains("name the directory"),
            "{target}: {err}"
        );
        assert!(
            entries(&elsewhere).is_empty(),
            "{target}: wrote through the link"
        );
    }
}

/// Symbolic links get their recorded owner and time on the link itself.
#[test]
fn symlinks_keep_their_times() {
    let repo = Repo::init_file(&[]);
    let src = repo.path().join("src");
    fs::create_dir_all(&src).unwrap();
    std::os::unix::fs::symlink("somewhere", src.join("link")).unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 7);
    filetime::set_symlink_file_times(src.join("link"), t, t).unwrap();
    let id = repo.backup_paths(&[], &[&src]);
    let target = repo.path().join("restored");
    let out = repo.run(&["restore", &id, "--target", target.to_str().unwrap()]);
    assert_success(&out, &["restore"]);
    assert!(
        !text(&out.stderr).contains("cannot"),
        "{}",
        text(&out.stderr)
    );
    let m = fs::symlink_metadata(target.join("src/link")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 7));
}

#[test]
fn a_target_that_belongs_to_another_user_is_refused() {
    if rustix_euid() != 0 {
        eprintln!("skipped: needs root to give a directory to another user");
        return;
    }
    let repo = Repo::init_file(&[]);
    let (_, id) = big_tree(&repo, 64 << 10);
    let target = repo.path().join("theirs");
    fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
    let out = restore(&repo, &id, &target, &["--overwrite"]);
    let err = assert_code(&out, EXIT_USAGE, "a target of another user");
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(entries(&target).is_empty());
}

#[test]
fn setuid_and_setgid_bits_are_restored_only_when_asked() {
    let repo = Repo::init_file(&[]);
    let src = repo.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(src.join("group-tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("group-tool"), fs::Permissions::from_mode(0o2750)).unwrap();
    let id = repo.backup_paths(&[], &[&src]);

    let plain = repo.path().join("plain");
    let out = repo.run(&["restore", &id, "--target", plain.to_str().unwrap()]);
    assert_success(&out, &["restore"]);
    assert_eq!(mode(&plain.join("src/tool")), 0o755);
    assert_eq!(mode(&plain.join("src/group-tool")), 0o750);
    let err = text(&out.stderr);
    assert!(
        err.contains("2 file(s)") && err.contains("--keep-setid"),
        "{err}"
    );

    let kept = repo.path().join("kept");
    let out = restore(&repo, &id, &kept, &["--keep-setid"]);
    assert_success(&out, &["restore", "--keep-setid"]);
    assert_eq!(mode(&kept.join("src/tool")), 0o4755);
    assert_eq!(mode(&kept.join("src/group-tool")), 0o2750);
}

fn rustix_euid() -> u32 {
    fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1)
}
