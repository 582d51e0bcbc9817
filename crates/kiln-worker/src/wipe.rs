//! Emptying a directory an action wrote into, whatever the action made of
//! it: any depth (a tree thousands of directories deep must not overflow
//! a stack or run out of descriptors), directories without permissions,
//! symlinks (never followed), millions of entries.
//!
//! Everything is done relative to open directory descriptors, so no path
//! grows with the depth and no symlink is followed. At most
//! [`MAX_OPEN_LEVELS`] directories are open at once: a directory found
//! deeper than that is moved up to the top (renamed into the directory
//! being emptied) and emptied in a later pass. A directory that cannot be
//! entered or changed gets its permissions reset through its own
//! descriptor (never by path), so a concurrent rename cannot redirect it.
//!
//! Call it only when no process of the action is left (the sandbox waits
//! for the action's PID namespace to end first).

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Directories open at once while emptying.
pub const MAX_OPEN_LEVELS: usize = 32;
/// Most entries removed by one call (a bound on the loop, far above what a
/// build action leaves).
const MAX_OPERATIONS: u64 = 1 << 32;

/// Why emptying failed: the entry and the error.
#[derive(Debug)]
pub struct WipeError {
    pub what: String,
    pub errno: Errno,
}

impl std::fmt::Display for WipeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.errno)
    }
}

impl std::error::Error for WipeError {}

fn err(what: impl Into<String>) -> impl FnOnce(Errno) -> WipeError {
    let what = what.into();
    move |errno| WipeError { what, errno }
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_RDONLY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// One open directory being emptied.
struct Level {
    fd: OwnedFd,
    /// Its name in the level below (None for the top).
    name: Option<CString>,
    /// Entries left to remove: (name, is a directory).
    entries: Vec<(CString, bool)>,
}

/// The entries of an open directory (not `.` and `..`).
fn list(fd: &OwnedFd) -> Result<Vec<(CString, bool)>, WipeError> {
    let dup = fd.try_clone().map_err(|e| WipeError {
        what: format!("dup: {e}"),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let mut dir = Dir::from_fd(dup).map_err(err("fdopendir"))?;
    let mut out = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(err("readdir"))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            Some(Type::Directory) => true,
            Some(_) => false,
            None => is_directory(fd, name)?,
        };
        out.push((name.to_owned(), is_dir));
    }
    Ok(out)
}

fn is_directory(parent: &OwnedFd, name: &CStr) -> Result<bool, WipeError> {
    let st = fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(err("fstatat"))?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
}

/// Opens directory `name` of `parent` without following a symlink; one
/// it may not read gets owner permissions through an `O_PATH` descriptor
/// of that very directory.
fn open_child(parent: &OwnedFd, name: &CStr) -> Result<OwnedFd, WipeError> {
    match openat(parent.as_fd(), name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::EACCES) => {
            let path = openat(
                parent.as_fd(),
                name,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(err(format!("opening {name:?}")))?;
            // chmod through the descriptor's /proc link reaches exactly the
            // directory opened above.
            let link = format!("/proc/self/fd/{}", path.as_raw_fd());
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                link.as_str(),
                Mode::S_IRWXU,
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(err(format!("making {name:?} readable")))?;
            openat(parent.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(err(format!("opening {name:?}")))
        }
        Err(e) => Err(err(format!("opening {name:?}"))(e)),
    }
}

/// Removes entry `name` of the open directory `dir`, making `dir`
/// writable first if that is what stands in the way.
fn unlink(dir: &OwnedFd, name: &CStr, flag: UnlinkatFlags) -> Result<(), WipeError> {
    match unlinkat(dir.as_fd(), name, flag) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EACCES) | Err(Errno::EPERM) => {
            fchmod(dir.as_fd(), Mode::S_IRWXU).map_err(err("making a directory writable"))?;
            match unlinkat(dir.as_fd(), name, flag) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(err(format!("removing {name:?}"))(e)),
            }
        }
        Err(e) => Err(err(format!("removing {name:?}"))(e)),
    }
}

/// Removes everything inside `dir` (not `dir` itself).
pub fn empty_dir(dir: &Path) -> Result<(), WipeError> {
    let top =
        nix::fcntl::open(dir, DIR_FLAGS, Mode::empty()).map_err(err(format!("opening {}", dir.display())))?;
    let mut operations = 0u64;
    let mut moved = 0u64;
    loop {
        let entries = list(&top)?;
        if entries.is_empty() {
            return Ok(());
        }
        let top_again = top.try_clone().map_err(|e| WipeError {
            what: format!("dup: {e}"),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
        let mut stack = vec![Level {
            fd: top_again,
            name: None,
            entries,
        }];
        loop {
            let depth = stack.len();
            let Some(level) = stack.last_mut() else { break };
            operations += 1;
            if operations > MAX_OPERATIONS {
                return Err(WipeError {
                    what: format!("{} holds too many entries to empty", dir.display()),
                    errno: Errno::E2BIG,
                });
            }
            let Some((name, is_dir)) = level.entries.pop() else {
                let Some(done) = stack.pop() else { break };
                if let (Some(name), Some(parent)) = (done.name, stack.last()) {
                    drop(done.fd);
                    unlink(&parent.fd, &name, UnlinkatFlags::RemoveDir)?;
                }
                continue;
            };
            if !is_dir {
                unlink(&level.fd, &name, UnlinkatFlags::NoRemoveDir)?;
                continue;
            }
            if depth >= MAX_OPEN_LEVELS {
                // Too deep to keep open: move it to the top, for a later
                // pass.
                moved += 1;
                let new_name = format!(".kiln-wipe-{moved}");
                renameat(level.fd.as_fd(), name.as_c_str(), top.as_fd(), new_name.as_str())
                    .map_err(err(format!("moving {name:?} up")))?;
                continue;
            }
            let fd = match open_child(&level.fd, &name) {
                Ok(fd) => fd,
                Err(e) if e.errno == Errno::ENOENT => continue,
                Err(e) => return Err(e),
            };
            let entries = list(&fd)?;
            stack.push(Level {
                fd,
                name: Some(name),
                entries,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn empties_deep_locked_trees_without_following_symlinks() {
        let base = tempfile::tempdir().unwrap();
        let outside = base.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let d = base.path().join("d");
        std::fs::create_dir(&d).unwrap();
        // 3000 levels: deeper than any path, and than MAX_OPEN_LEVELS.
        let mut fd = nix::fcntl::open(&d, DIR_FLAGS, Mode::empty()).unwrap();
        for i in 0..3000 {
            nix::sys::stat::mkdirat(fd.as_fd(), "n", Mode::S_IRWXU).unwrap();
            let next = openat(fd.as_fd(), "n", DIR_FLAGS, Mode::empty()).unwrap();
            if i % 500 == 0 {
                std::fs::write(format!("/proc/self/fd/{}/f", next.as_raw_fd()), b"1").unwrap();
            }
            fd = next;
        }
        drop(fd);
        // Locked directories and a symlink to a directory outside.
        std::fs::create_dir_all(d.join("locked/inner")).unwrap();
        std::fs::write(d.join("locked/inner/f"), b"2").unwrap();
        std::fs::set_permissions(d.join("locked/inner"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(d.join("locked"), std::fs::Permissions::from_mode(0o500)).unwrap();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        std::fs::write(d.join("top"), b"3").unwrap();
        empty_dir(&d).unwrap();
        assert!(d.is_dir());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        assert!(empty_dir(Path::new("/nonexistent/kiln-wipe")).is_err());
    }
}
