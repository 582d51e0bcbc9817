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
//! [`empty_dir_keeping`] (the sandbox's private tmpfs's) also leaves
//! mount points and the way to one kept directory (the slot's input root,
//! when it lies below the tmpfs) in place.
//!
//! Call it only when no process of the action is left (the sandbox waits
//! for the action's PID namespace to end first).

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat};
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

/// A second descriptor of the same open directory.
fn dup(fd: &OwnedFd) -> Result<OwnedFd, WipeError> {
    fd.try_clone().map_err(|e| WipeError {
        what: format!("dup: {e}"),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })
}

/// The entries of an open directory (not `.` and `..`).
fn list(fd: &OwnedFd) -> Result<Vec<(CString, bool)>, WipeError> {
    let mut dir = Dir::from_fd(dup(fd)?).map_err(err("fdopendir"))?;
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
            // The parent may be readable but not searchable (an action's
            // `chmod 400 a`): it was listed, its entries cannot be reached.
            fchmod(parent.as_fd(), Mode::S_IRWXU).map_err(err("making a directory searchable"))?;
            match openat(parent.as_fd(), name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => return Ok(fd),
                Err(Errno::EACCES) => {}
                Err(e) => return Err(err(format!("opening {name:?}"))(e)),
            }
            // The directory itself is not readable.
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

/// Whether entry `name` of `parent` is on the device `dev` (a mount point
/// is not). An entry that is gone, or that cannot be looked at, counts as
/// on it: opening it settles the matter as it would have anyway.
fn on_device(parent: &OwnedFd, name: &CStr, dev: u64) -> Result<bool, WipeError> {
    match fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(st.st_dev == dev),
        Err(Errno::ENOENT) | Err(Errno::EACCES) => Ok(true),
        Err(e) => Err(err(format!("stat of {name:?}"))(e)),
    }
}

/// What emptying a directory leaves in place.
#[derive(Clone, Copy, Default)]
struct Keep<'a> {
    /// A sub-directory of the top (by name) that stays, contents and all.
    name: Option<&'a CStr>,
    /// The top's device: a directory on another one (a mount point) is
    /// neither entered nor removed (so neither is the directory holding
    /// it: emptying then fails).
    dev: Option<u64>,
}

/// Removes everything inside `dir` (not `dir` itself).
pub fn empty_dir(dir: &Path) -> Result<(), WipeError> {
    let top =
        nix::fcntl::open(dir, DIR_FLAGS, Mode::empty()).map_err(err(format!("opening {}", dir.display())))?;
    empty_open(&top, dir, Keep::default())
}

/// Removes everything inside `dir` (not `dir` itself) without crossing
/// into another file system: a mount point stays as it is (and so does
/// the directory holding it, which makes this fail). When `keep` lies
/// below `dir`, the directories on the way to it stay (emptied of
/// everything else) and `keep` itself is not entered.
pub fn empty_dir_keeping(dir: &Path, keep: &Path) -> Result<(), WipeError> {
    let mut fd =
        nix::fcntl::open(dir, DIR_FLAGS, Mode::empty()).map_err(err(format!("opening {}", dir.display())))?;
    let dev = fstat(fd.as_fd())
        .map_err(err(format!("stat of {}", dir.display())))?
        .st_dev;
    // The names on the way from `dir` to `keep` (none when it is not below).
    let mut way = Vec::new();
    if let Ok(rest) = keep.strip_prefix(dir) {
        for c in rest.components() {
            let Component::Normal(name) = c else { break };
            way.push(CString::new(name.as_bytes()).map_err(|_| WipeError {
                what: format!("{} holds a NUL byte", keep.display()),
                errno: Errno::EINVAL,
            })?);
        }
    }
    let mut shown = dir.to_path_buf();
    let mut names = way.iter().peekable();
    loop {
        let name = names.next();
        empty_open(
            &fd,
            &shown,
            Keep {
                name: name.map(CString::as_c_str),
                dev: Some(dev),
            },
        )?;
        // Done, or `keep` itself (not entered) is next.
        let Some(name) = name.filter(|_| names.peek().is_some()) else {
            return Ok(());
        };
        let next = match open_child(&fd, name) {
            Ok(next) => next,
            // Not there (or not a directory, and so removed above).
            Err(e) if e.errno == Errno::ENOENT => return Ok(()),
            Err(e) => return Err(e),
        };
        let next_dev = fstat(next.as_fd())
            .map_err(err(format!("stat of {name:?}")))?
            .st_dev;
        if next_dev != dev {
            return Ok(());
        }
        shown.push(std::ffi::OsStr::from_bytes(name.to_bytes()));
        fd = next;
    }
}

/// Empties the open directory `top` (`shown` names it in errors) but for
/// what `keep` says.
fn empty_open(top: &OwnedFd, shown: &Path, keep: Keep<'_>) -> Result<(), WipeError> {
    let mut operations = 0u64;
    let mut moved = 0u64;
    // Sub-directories of the top that stay.
    let mut kept: Vec<CString> = keep.name.map(CStr::to_owned).into_iter().collect();
    loop {
        let mut entries = list(top)?;
        entries.retain(|(name, is_dir)| !(*is_dir && kept.contains(name)));
        if entries.is_empty() {
            return Ok(());
        }
        let mut stack = vec![Level {
            fd: dup(top)?,
            name: None,
            entries,
        }];
        loop {
            let depth = stack.len();
            let Some(level) = stack.last_mut() else { break };
            operations += 1;
            if operations > MAX_OPERATIONS {
                return Err(WipeError {
                    what: format!("{} holds too many entries to empty", shown.display()),
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
            if let Some(dev) = keep.dev
                && !on_device(&level.fd, &name, dev)?
            {
                // Another file system: not ours to empty.
                if depth == 1 {
                    kept.push(name);
                }
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

/// Why removing extended attributes failed: what was being done and the
/// error.
#[derive(Debug)]
pub struct AttrError {
    pub what: String,
    pub source: std::io::Error,
}

impl std::fmt::Display for AttrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for AttrError {}

/// Removes the extended attributes of `path` (not following a symlink)
/// that an unprivileged owner can set: user attributes and ACLs.
pub fn remove_owner_xattrs(path: &Path) -> Result<(), AttrError> {
    let names = xattr::list(path).map_err(|source| AttrError {
        what: format!("listing the attributes of {}", path.display()),
        source,
    })?;
    for name in names.filter(|n| {
        let n = n.to_string_lossy();
        n.starts_with("user.") || n.starts_with("system.posix_acl_")
    }) {
        xattr::remove(path, &name).map_err(|source| AttrError {
            what: format!("removing attribute {name:?} of {}", path.display()),
            source,
        })?;
    }
    Ok(())
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

    /// What an unprivileged action can leave behind: a directory that can
    /// be listed but not searched, one that can be searched but not
    /// listed, and one with no permissions at all, each holding files.
    fn locked_tree_is_emptied(d: &Path) {
        for sub in ["listable/inner", "searchable/inner", "closed/inner"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            std::fs::write(d.join(sub).join("f"), b"x").unwrap();
        }
        for (sub, mode) in [("listable", 0o400), ("searchable", 0o100), ("closed", 0o000)] {
            std::fs::set_permissions(d.join(sub), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        empty_dir(d).unwrap();
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0);
    }

    /// Permission bits do not stop root, so as root the check runs again
    /// as nobody (this test binary under `setpriv`), on a directory nobody
    /// owns: the case of a worker that is not root.
    #[test]
    fn an_unprivileged_owner_empties_what_its_actions_locked() {
        const INNER: &str = "KILN_WIPE_TEST_DIR";
        if let Some(dir) = std::env::var_os(INNER) {
            locked_tree_is_emptied(Path::new(&dir));
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let d = base.path().join("d");
        std::fs::create_dir(&d).unwrap();
        if !nix::unistd::geteuid().is_root() {
            locked_tree_is_emptied(&d);
            return;
        }
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        let status = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "wipe::tests::an_unprivileged_owner_empties_what_its_actions_locked",
                "--exact",
                "--test-threads=1",
            ])
            .env(INNER, &d)
            .status()
            .expect("setpriv (util-linux) runs");
        assert!(status.success(), "the unprivileged run failed: {status}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        assert!(empty_dir(Path::new("/nonexistent/kiln-wipe")).is_err());
        assert!(empty_dir_keeping(Path::new("/nonexistent/kiln-wipe"), Path::new("/")).is_err());
    }

    /// The way to the kept directory stays (emptied), the kept directory
    /// is not entered, a deep tree goes; as root, in a mount namespace of
    /// this test's thread, a mount point stays untouched too (and one
    /// deeper down makes emptying fail rather than reach into it).
    #[test]
    fn keeping_the_way_to_a_directory_and_mount_points() {
        let base = tempfile::tempdir().unwrap();
        let d = base.path().join("d");
        let keep = d.join("a/b/root");
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(keep.join("output"), b"1").unwrap();
        std::fs::write(d.join("a/junk"), b"2").unwrap();
        std::fs::create_dir_all(d.join("a/other/inner")).unwrap();
        std::fs::write(d.join("top"), b"3").unwrap();
        let mut fd = nix::fcntl::open(&d.join("a/b"), DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..100 {
            nix::sys::stat::mkdirat(fd.as_fd(), "n", Mode::S_IRWXU).unwrap();
            fd = openat(fd.as_fd(), "n", DIR_FLAGS, Mode::empty()).unwrap();
        }
        drop(fd);
        let mounted = nix::unistd::geteuid().is_root() && {
            use nix::mount::{MntFlags, MsFlags, mount, umount2};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            let none: Option<&str> = None;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).unwrap();
            for m in [d.join("m"), d.join("x/m")] {
                std::fs::create_dir_all(&m).unwrap();
                mount(Some("tmpfs"), &m, Some("tmpfs"), MsFlags::empty(), none).unwrap();
                std::fs::write(m.join("f"), b"4").unwrap();
            }
            let deeper = empty_dir_keeping(&d, &keep);
            assert!(deeper.is_err(), "a directory holding a mount point was removed");
            assert_eq!(std::fs::read(d.join("x/m/f")).unwrap(), b"4");
            umount2(&d.join("x/m"), MntFlags::empty()).unwrap();
            true
        };
        empty_dir_keeping(&d, &keep).unwrap();
        let names = |p: &Path| {
            let mut n: Vec<String> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&keep), ["output"]);
        assert_eq!(names(&d.join("a/b")), ["root"]);
        assert_eq!(names(&d.join("a")), ["b"]);
        if mounted {
            assert_eq!(names(&d), ["a", "m"]);
            assert_eq!(std::fs::read(d.join("m/f")).unwrap(), b"4");
            nix::mount::umount2(&d.join("m"), nix::mount::MntFlags::empty()).unwrap();
        } else {
            assert_eq!(names(&d), ["a"]);
        }
    }
}
