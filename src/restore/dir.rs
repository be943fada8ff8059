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
    /// Opens (or creates, `0700`) the restore's target directory. Its parent is opened as
    /// given (the operator's path); the target itself with `O_NOFOLLOW`, so a symbolic link
    /// in its place is refused, also when the path ends in `/`. Returns the directory and
    /// whether it was created.
    fn target(path: &Path, overwrite: bool) -> Result<(Dir, bool)> {
        let Some(std::path::Component::Normal(name)) = path.components().next_back() else {
            return Err(Error::invalid(format!(
                "{}: name the directory to restore into (not `/`, `.` or `..`)",
                path.display()
            )));
        };
        let parent_path = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent = match rfs::openat(rfs::CWD, parent_path, dir_flags_following(), Mode::empty())
        {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                std::fs::create_dir_all(parent_path).map_err(|e| Error::io(parent_path, e))?;
                rfs::openat(rfs::CWD, parent_path, dir_flags_following(), Mode::empty())
                    .map_err(|e| io(parent_path, e))?
            }
            Err(e) => return Err(io(parent_path, e)),
        };
        let parent = Dir {
            fd: parent,
            path: parent_path.to_path_buf(),
        };
        let name = name.as_bytes();
        let created = match rfs::mkdirat(&parent.fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(io(path, e)),
        };
        let fd = rfs::openat(&parent.fd, name, dir_flags(), Mode::empty()).map_err(|e| {
            if e == Errno::LOOP || e == Errno::NOTDIR {
                Error::invalid(format!(
                    "{} exists and is not a directory (a symbolic link or a file): not following it",
                    path.display()
                ))
            } else {
                io(path, e)
            }
        })?;
        let owner = rfs::fstat(&fd).map_err(|e| io(path, e))?.st_uid;
        if !(owner == euid() || (created && owner == parent.owner()?)) {
            return Err(Error::invalid(format!(
                "{} belongs to uid {owner}, not to the user restoring (uid {}): another user \
                 could redirect what is restored into it; restore into a new directory",
                path.display(),
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

    fn owner(&self) -> Result<u32> {
        Ok(rfs::fstat(&self.fd).map_err(|e| io(&self.path, e))?.st_uid)
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
    /// (tightened to `0700` until it is done). A directory it created must belong to the
    /// restoring user or to this directory's owner (a file system that gives every file one
    /// owner, NFS with root squashing); anything else was raced in by another user.
    fn subdir(&self, name: &[u8], overwrite: bool) -> Result<Dir> {
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
        let dir = Dir { fd, path };
        if created {
            let owner = dir.owner()?;
            if owner != euid() && owner != self.owner()? {
                return Err(Error::invalid(format!(
                    "{} belongs to uid {owner}: another user replaced it; not restoring into it",
                    dir.path.display(),
                )));
            }
        } else {
            rfs::fchmod(&dir.fd, Mode::from_bits_truncate(0o700)).map_err(|e| io(&dir.path, e))?;
            dir.remove_leftovers()?;
        }
        Ok(dir)
    }

    /// Creates a new private (`0600`) temporary file here.
    fn temp_file(&self) -> Result<(std::fs::File, Temp<'_>)> {
        loop {
            let name = temporary_name();
            let flags =
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rfs::openat(&self.fd, &name, flags, Mode::from_bits_truncate(0o600)) {
                Ok(fd) => return Ok((std::fs::File::from(fd), self.temp(name))),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(io(&self.child(name.as_bytes()), e)),
            }
        }
    }

    /// Creates a symbolic link to `target` under a temporary name.
    fn temp_symlink(&self, target: &[u8]) -> Result<Temp<'_>> {
        loop {
            let name = temporary_name();
            match rfs::symlinkat(target, &self.fd, &name) {
                Ok(()) => return Ok(self.temp(name)),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(io(&self.child(name.as_bytes()), e)),
            }
        }
    }

    fn temp(&self, name: String) -> Temp<'_> {
        Temp {
            dir: self,
            name: name.into_bytes(),
            placed: false,
        }
    }

    fn remove(&self, name: &[u8]) {
        let _ = rfs::unlinkat(&self.fd, name, AtFlags::empty());
    }
}

/// An entry this restore created under a temporary name: removed when dropped (the restore
/// failed or was cancelled) unless it was renamed into place.
struct Temp<'d> {
    dir: &'d Dir,
    name: Vec<u8>,
    placed: bool,
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if !self.placed {
            self.dir.remove(&self.name);
        }
    }
}

impl Temp<'_> {
    fn path(&self) -> PathBuf {
        self.dir.child(&self.name)
    }

    /// Renames the entry over `name`: it replaces a file or symlink there only with
    /// `overwrite` (`RENAME_NOREPLACE` otherwise), never a directory.
    fn rename_into(mut self, name: &[u8], overwrite: bool) -> Result<()> {
        let path = self.dir.child(name);
        if self.dir.entry(name)? == Some(rfs::FileType::Directory) {
            return Err(Error::invalid(format!(
                "{} exists and is a directory",
                path.display()
            )));
        }
        let flags = if overwrite {
            rfs::RenameFlags::empty()
        } else {
            rfs::RenameFlags::NOREPLACE
        };
        match rfs::renameat_with(&self.dir.fd, &self.name, &self.dir.fd, name, flags) {
            Ok(()) => {
                self.placed = true;
                Ok(())
            }
            Err(Errno::EXIST) => Err(Error::invalid(format!("{} already exists", path.display()))),
            Err(e) => Err(io(&path, e)),
        }
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
    dir_flags_following() | OFlags::NOFOLLOW
}

fn dir_flags_following() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
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

    /// Restores the tree `id` into `dir`; hands `dir` back for its own metadata (one open
    /// descriptor per level of depth).
    fn restore_tree(
        &mut self,
        id: BlobId,
        dir: Dir,
    ) -> futures::future::BoxFuture<'_, Result<Dir>> {
        Box::pin(async move {
            let tree = self.tree(&id).await?;
            for node in &tree.nodes {
                if self.opts.cancel.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                let name = &node.name.0[..];
                match node.node_type {
                    NodeType::Dir => {
                        let sub = dir.subdir(name, self.opts.overwrite)?;
                        let subtree = node.subtree.expect("checked by Tree::decode");
                        let sub = self.restore_tree(subtree, sub).await?;
                        self.report.dirs += 1;
                        self.apply(node, sub.fd.as_fd(), &sub.path);
                    }
                    NodeType::File => {
                        let (file, tmp) = dir.temp_file()?;
                        let meta = file.try_clone().map_err(|e| Error::io(tmp.path(), e))?;
                        self.write_content(node, Box::new(file))
                            .await
                            .map_err(|e| match e {
                                // A write that failed (a full disk): say where.
                                Error::Io { source, .. } => Error::io(dir.child(name), source),
                                e => e,
                            })?;
                        tmp.rename_into(name, self.opts.overwrite)?;
                        self.report.files += 1;
                        self.report.bytes += node.size.unwrap_or(0);
                        self.apply(node, meta.as_fd(), &dir.child(name));
                    }
                    NodeType::Symlink => {
                        let target = &node.target.as_ref().expect("checked").0[..];
                        let tmp = dir.temp_symlink(target)?;
                        self.link_metadata(node, &tmp);
                        tmp.rename_into(name, self.opts.overwrite)?;
                        self.report.symlinks += 1;
                    }
                }
            }
            Ok(dir)
        })
    }

    /// Owner and times of a symbolic link this restore just made, set on the link itself
    /// through an `O_PATH` handle before it gets its name: no name lookup another user could
    /// redirect (to a hard link of some other file, say).
    fn link_metadata(&mut self, node: &Node, tmp: &Temp<'_>) {
        let path = tmp.dir.child(&node.name.0);
        let link = match rfs::openat(
            &tmp.dir.fd,
            &tmp.name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                self.report.warnings.push(format!(
                    "{}: cannot set owner and mtime: {e}",
                    path.display()
                ));
                return;
            }
        };
        let is_link = rfs::fstat(&link)
            .is_ok_and(|st| rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink);
        if !is_link {
            self.report.warnings.push(format!(
                "{}: the link was replaced before its owner was set; left as it is",
                path.display()
            ));
            return;
        }
        let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
        let owner = rfs::chownat(
            &link,
            "",
            Some(rustix::process::Uid::from_raw(node.uid)),
            Some(rustix::process::Gid::from_raw(node.gid)),
            flags,
        );
        self.owner_result(owner, &path);
        if let Err(e) = rfs::utimensat(&link, "", &times(node), flags) {
            self.report
                .warnings
                .push(format!("{}: cannot set mtime: {e}", path.display()));
        }
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
        let (a, b) = (a.name.clone(), b.name.clone());
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
        let e = d.subdir(b"etc", true).err().unwrap();
        assert!(e.to_string().contains("not following it"), "{e}");
        let e = d.subdir(b"etc", false).err().unwrap();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}
