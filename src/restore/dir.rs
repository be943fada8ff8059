//! Restoring a tree into a directory, safely beside local users who can write into it.
//!
//! A restore often runs as root, into a place other users can reach. So:
//! - **Handles, not paths.** The target is walked by directory handles: every entry is created
//!   or opened relative to its parent's handle with `O_NOFOLLOW`, and owner, mode and times
//!   are set on the open file (`fchown`, `fchmod`, `futimens`) or, for a symbolic link, on
//!   the link itself. A directory swapped for a symlink mid-restore makes the restore fail; it
//!   never redirects a write or a `chmod` outside the target.
//! - **Private until done.** Every directory is created `0700` and every file `0600`; a
//!   directory gets its recorded mode only after everything inside it is restored, a file only
//!   after its content verified. A restore that fails leaves them private.
//! - **Ownership checked.** A pre-existing target owned by another user is refused, and so is
//!   a directory the restore meant to create or reuse that turns out to belong to someone else
//!   (another user raced it in).
//! - **Temporary names that fit and never collide.** A file is written as `.kluis-<random>.tmp`
//!   (27 bytes, whatever the final name's length), created exclusively, and renamed over its
//!   final name once verified.
//! - **setuid and setgid bits** are restored only when asked ([`super::RestoreOptions::keep_setid`]).

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::{RestoreReport, Restorer};
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::tree::{Node, NodeType};

/// Mode bits a restore applies without being asked: permissions and the sticky bit.
const SAFE_MODE_BITS: u32 = 0o1777;
const SETID_BITS: u32 = 0o6000;

/// An open directory of the target, with its path for messages only.
struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn io(path: &Path, e: Errno) -> Error {
    Error::io(path, std::io::Error::from(e))
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

impl Dir {
    /// Opens (or creates, `0700`) the restore's target directory. Returns the directory and
    /// whether it was created.
    fn target(path: &Path, overwrite: bool) -> Result<(Dir, bool)> {
        let created = match std::fs::symlink_metadata(path) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::invalid(format!(
                    "{} exists and is not a directory",
                    path.display()
                )));
            }
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                match rfs::mkdirat(rfs::CWD, path, Mode::from_bits_truncate(0o700)) {
                    Ok(()) => true,
                    Err(e) => return Err(io(path, e)),
                }
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let fd = rfs::openat(rfs::CWD, path, dir_flags(), Mode::empty()).map_err(|e| {
            if e == Errno::LOOP || e == Errno::NOTDIR {
                Error::invalid(format!("{} is not a directory", path.display()))
            } else {
                io(path, e)
            }
        })?;
        let stat = rfs::fstat(&fd).map_err(|e| io(path, e))?;
        if stat.st_uid != euid() {
            return Err(Error::invalid(format!(
                "{} belongs to uid {}, not to the user restoring (uid {}): another user could \
                 redirect what is restored into it; restore into a new directory",
                path.display(),
                stat.st_uid,
                euid()
            )));
        }
        let dir = Dir {
            fd,
            path: path.to_path_buf(),
        };
        if !created {
            if !overwrite && !dir.names()?.is_empty() {
                return Err(Error::invalid(format!(
                    "{} is not empty; restore into an empty directory, or pass --overwrite",
                    path.display()
                )));
            }
            dir.remove_leftovers()?;
        }
        Ok((dir, created))
    }

    /// The names in this directory.
    fn names(&self) -> Result<Vec<Vec<u8>>> {
        let fd = rfs::openat(&self.fd, ".", dir_flags(), Mode::empty())
            .map_err(|e| io(&self.path, e))?;
        let mut names = Vec::new();
        for entry in rfs::Dir::read_from(&fd).map_err(|e| io(&self.path, e))? {
            let entry = entry.map_err(|e| io(&self.path, e))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        Ok(names)
    }

    /// Deletes the temporary files of an earlier restore that was killed here.
    fn remove_leftovers(&self) -> Result<()> {
        for name in self.names()? {
            if is_temporary(&name) && self.entry(&name)? != Some(rfs::FileType::Directory) {
                self.remove(&name);
            }
        }
        Ok(())
    }

    fn child(&self, name: &[u8]) -> PathBuf {
        self.path.join(OsStr::from_bytes(name))
    }

    /// The type of the entry `name`, not following a symlink; `None` when there is none.
    fn entry(&self, name: &[u8]) -> Result<Option<rfs::FileType>> {
        match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(rfs::FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io(&self.child(name), e)),
        }
    }

    /// Creates the subdirectory `name` (`0700`), or with `overwrite` reuses an existing one
    /// owned by the restoring user or by `owner` (tightened to `0700` until it is done).
    fn subdir(&self, name: &[u8], overwrite: bool, owner: u32) -> Result<Dir> {
        let path = self.child(name);
        let created = match rfs::mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) if overwrite => false,
            Err(Errno::EXIST) => {
                return Err(Error::invalid(format!("{} already exists", path.display())));
            }
            Err(e) => return Err(io(&path, e)),
        };
        let fd = rfs::openat(&self.fd, name, dir_flags(), Mode::empty()).map_err(|e| {
            if e == Errno::LOOP || e == Errno::NOTDIR {
                Error::invalid(format!(
                    "{} exists and is not a directory (a symbolic link or a file): not \
                     following it",
                    path.display()
                ))
            } else {
                io(&path, e)
            }
        })?;
        let stat = rfs::fstat(&fd).map_err(|e| io(&path, e))?;
        let mine = stat.st_uid == euid();
        if !(mine || (!created && stat.st_uid == owner)) {
            return Err(Error::invalid(format!(
                "{} belongs to uid {}: another user replaced or owns it; not restoring into it",
                path.display(),
                stat.st_uid
            )));
        }
        let dir = Dir { fd, path };
        if !created {
            rfs::fchmod(&dir.fd, Mode::from_bits_truncate(0o700)).map_err(|e| io(&dir.path, e))?;
            dir.remove_leftovers()?;
        }
        Ok(dir)
    }

    /// Creates a new private (`0600`) temporary file here; returns it and its name.
    fn temp_file(&self) -> Result<(std::fs::File, Vec<u8>)> {
        loop {
            let name = temporary_name();
            let flags =
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rfs::openat(&self.fd, &name, flags, Mode::from_bits_truncate(0o600)) {
                Ok(fd) => return Ok((std::fs::File::from(fd), name.into_bytes())),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(io(&self.child(name.as_bytes()), e)),
            }
        }
    }

    fn remove(&self, name: &[u8]) {
        let _ = rfs::unlinkat(&self.fd, name, AtFlags::empty());
    }

    /// Renames `tmp` over `name` (replacing a file or symlink there, never a directory).
    fn rename_into(&self, tmp: &[u8], name: &[u8], overwrite: bool) -> Result<()> {
        let path = self.child(name);
        match self.entry(name)? {
            None => {}
            Some(rfs::FileType::Directory) => {
                self.remove(tmp);
                return Err(Error::invalid(format!(
                    "{} exists and is a directory",
                    path.display()
                )));
            }
            Some(_) if !overwrite => {
                self.remove(tmp);
                return Err(Error::invalid(format!("{} already exists", path.display())));
            }
            Some(_) => {}
        }
        rfs::renameat(&self.fd, tmp, &self.fd, name).map_err(|e| {
            self.remove(tmp);
            io(&path, e)
        })
    }
}

/// `.kluis-<16 random hex digits>.tmp`: 27 bytes.
fn temporary_name() -> String {
    format!(
        ".kluis-{}.tmp",
        &crate::id::ObjectId::random().to_hex()[..16]
    )
}

fn is_temporary(name: &[u8]) -> bool {
    name.len() == 27
        && name.starts_with(b".kluis-")
        && name.ends_with(b".tmp")
        && name[7..23]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn times(node: &Node) -> Timestamps {
    let t = Timespec {
        tv_sec: node.mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: node.mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

impl Restorer<'_> {
    /// Restores the snapshot's tree under `target`.
    pub async fn to_directory(mut self, target: &Path) -> Result<RestoreReport> {
        let (dir, _) = Dir::target(target, self.opts.overwrite)?;
        let root = self.snapshot.tree;
        self.restore_tree(root, dir).await?;
        if self.setid_dropped > 0 {
            self.report.warnings.push(format!(
                "{} file(s) or directories had setuid or setgid bits, restored without them \
                 (pass --keep-setid to restore them)",
                self.setid_dropped
            ));
        }
        Ok(self.report)
    }

    fn restore_tree(&mut self, id: BlobId, dir: Dir) -> futures::future::BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let tree = self.tree(&id).await?;
            for node in &tree.nodes {
                if self.opts.cancel.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                let name = &node.name.0[..];
                match node.node_type {
                    NodeType::Dir => {
                        let sub = dir.subdir(name, self.opts.overwrite, node.uid)?;
                        let subtree = node.subtree.expect("checked by Tree::decode");
                        let (fd, path) = (sub.fd.try_clone(), sub.path.clone());
                        self.restore_tree(subtree, sub).await?;
                        self.report.dirs += 1;
                        let fd = fd.map_err(|e| Error::io(&path, e))?;
                        self.apply(node, fd.as_fd(), &path);
                    }
                    NodeType::File => {
                        let (file, tmp) = dir.temp_file()?;
                        let meta = file.try_clone();
                        let written = self.write_content(node, Box::new(file)).await;
                        let meta = match (written, meta) {
                            (Ok(_), Ok(meta)) => meta,
                            (Err(e), _) => {
                                dir.remove(&tmp);
                                return Err(e);
                            }
                            (Ok(_), Err(e)) => {
                                dir.remove(&tmp);
                                return Err(Error::io(dir.child(&tmp), e));
                            }
                        };
                        dir.rename_into(&tmp, name, self.opts.overwrite)?;
                        self.report.files += 1;
                        self.report.bytes += node.size.unwrap_or(0);
                        self.apply(node, meta.as_fd(), &dir.child(name));
                    }
                    NodeType::Symlink => {
                        let target = &node.target.as_ref().expect("checked").0[..];
                        self.restore_symlink(&dir, node, name, target)?;
                    }
                }
            }
            Ok(())
        })
    }

    fn restore_symlink(
        &mut self,
        dir: &Dir,
        node: &Node,
        name: &[u8],
        target: &[u8],
    ) -> Result<()> {
        let path = dir.child(name);
        let tmp = loop {
            let tmp = temporary_name();
            match rfs::symlinkat(target, &dir.fd, &tmp) {
                Ok(()) => break tmp.into_bytes(),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(io(&path, e)),
            }
        };
        dir.rename_into(&tmp, name, self.opts.overwrite)?;
        self.report.symlinks += 1;
        let owner = rfs::chownat(
            &dir.fd,
            name,
            Some(rustix::process::Uid::from_raw(node.uid)),
            Some(rustix::process::Gid::from_raw(node.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        );
        self.owner_result(owner, &path);
        if let Err(e) = rfs::utimensat(&dir.fd, name, &times(node), AtFlags::SYMLINK_NOFOLLOW) {
            self.report
                .warnings
                .push(format!("{}: cannot set mtime: {e}", path.display()));
        }
        Ok(())
    }

    fn owner_result(&mut self, result: rustix::io::Result<()>, path: &Path) {
        // Without root, files keep the restorer's ownership: not worth a warning each.
        if let Err(e) = result {
            if e != Errno::PERM {
                self.report
                    .warnings
                    .push(format!("{}: cannot set owner: {e}", path.display()));
            }
        }
    }

    /// Owner, then mode (a change of owner clears setuid bits), then times, on the open file.
    fn apply(&mut self, node: &Node, fd: std::os::fd::BorrowedFd<'_>, path: &Path) {
        let owner = rfs::fchown(
            fd,
            Some(rustix::process::Uid::from_raw(node.uid)),
            Some(rustix::process::Gid::from_raw(node.gid)),
        );
        self.owner_result(owner, path);
        let mut mode = node.mode & (SAFE_MODE_BITS | SETID_BITS);
        if mode & SETID_BITS != 0 && !self.opts.keep_setid {
            mode &= SAFE_MODE_BITS;
            self.setid_dropped += 1;
        }
        if let Err(e) = rfs::fchmod(fd, Mode::from_bits_truncate(mode)) {
            self.report
                .warnings
                .push(format!("{}: cannot set mode: {e}", path.display()));
        }
        if let Err(e) = rfs::futimens(fd, &times(node)) {
            self.report
                .warnings
                .push(format!("{}: cannot set mtime: {e}", path.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_short_and_distinct() {
        let dir = tempfile::TempDir::new().unwrap();
        let (d, _) = Dir::target(dir.path(), false).unwrap();
        let (_, a) = d.temp_file().unwrap();
        let (_, b) = d.temp_file().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 27, "{}", String::from_utf8_lossy(&a));
        assert!(is_temporary(&a) && is_temporary(&b));
        assert!(!is_temporary(b".kluis-0123456789abcdeg.tmp"));
        assert!(!is_temporary(b".foo.kluis-partial"));
    }

    #[test]
    fn a_target_owned_by_someone_else_is_refused() {
        if euid() != 0 {
            return; // only root can make a directory owned by someone else
        }
        let dir = tempfile::TempDir::new().unwrap();
        let target = dir.path().join("theirs");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
        let e = Dir::target(&target, true).err().unwrap();
        assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
    }

    #[test]
    fn a_symlink_in_place_of_a_directory_is_not_followed() {
        let dir = tempfile::TempDir::new().unwrap();
        let outside = tempfile::TempDir::new().unwrap();
        let (d, _) = Dir::target(&dir.path().join("t"), false).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("t").join("etc")).unwrap();
        let e = d.subdir(b"etc", true, 0).err().unwrap();
        assert!(e.to_string().contains("not following it"), "{e}");
        let e = d.subdir(b"etc", false, 0).err().unwrap();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}
