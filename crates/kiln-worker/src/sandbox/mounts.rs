//! The file system a slot's actions see, set up once per zygote in its
//! private mount namespace: the whole tree private (nothing propagates to
//! the host) and read-only; private tmpfs's on `/tmp`, `/var/tmp`,
//! `/dev/shm` (emptied by the zygote after every action); the worker's
//! work and cache directories covered by empty read-only tmpfs's; the
//! slot's input root bound back at its own path, writable. So an action
//! can write only its input root and its private tmpfs's.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use super::errno;

/// A private tmpfs of the slot, emptied between actions.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub path: PathBuf,
    /// The directory's size while empty (tmpfs counts entries in a
    /// directory's size), so an empty one needs no listing.
    pub empty_size: u64,
}

/// Sets the mounts up; returns the tmpfs directories that were mounted
/// (to be emptied between actions).
pub fn setup(
    root: &Path,
    hide: &[PathBuf],
    tmpfs: &[PathBuf],
    tmpfs_size: Option<u64>,
) -> Result<Vec<Scratch>, String> {
    use std::os::unix::fs::MetadataExt;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(errno("making / private"))?;
    // Opened in the new mount namespace (a bind source must belong to it),
    // before anything covers it.
    let root_handle = std::fs::File::open(root).map_err(|e| format!("opening {}: {e}", root.display()))?;
    let root_flags = nix::sys::statvfs::fstatvfs(&root_handle)
        .map(|s| ms_flags_of(s.flags()))
        .map_err(errno("statvfs of the input root"))?;
    make_read_only()?;
    let mut scratch: Vec<Scratch> = Vec::new();
    let mut hidden: Vec<PathBuf> = Vec::new();
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let scratch_options = match tmpfs_size {
        Some(size) => format!("mode=1777,size={size}"),
        None => "mode=1777".to_string(),
    };
    for t in tmpfs {
        if !t.is_dir() {
            continue;
        }
        mount(
            Some("tmpfs"),
            t.as_path(),
            Some("tmpfs"),
            flags,
            Some(scratch_options.as_str()),
        )
        .map_err(|e| format!("mounting a tmpfs on {}: {e}", t.display()))?;
        let empty_size = std::fs::symlink_metadata(t)
            .map_err(|e| format!("stat of the new tmpfs on {}: {e}", t.display()))?
            .size();
        scratch.push(Scratch {
            path: t.clone(),
            empty_size,
        });
    }
    // Outer directories first: one inside a directory already covered
    // (the work directory inside the data directory, say) needs no cover
    // of its own.
    let mut hide: Vec<&PathBuf> = hide.iter().collect();
    hide.sort_by_key(|h| h.components().count());
    for h in hide {
        let covered =
            scratch.iter().any(|c| h.starts_with(&c.path)) || hidden.iter().any(|c| h.starts_with(c));
        if covered || !h.is_dir() {
            continue;
        }
        mount(
            Some("tmpfs"),
            h.as_path(),
            Some("tmpfs"),
            flags,
            Some("mode=0755"),
        )
        .map_err(|e| format!("hiding {}: {e}", h.display()))?;
        hidden.push(h.clone());
    }
    if scratch
        .iter()
        .map(|c| &c.path)
        .chain(&hidden)
        .any(|c| root.starts_with(c))
    {
        std::fs::create_dir_all(root)
            .map_err(|e| format!("creating {} in the sandbox: {e}", root.display()))?;
    }
    let source = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&root_handle));
    mount(
        Some(source.as_str()),
        root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| format!("binding {} into the sandbox: {e}", root.display()))?;
    // The bind copied the read-only flag: make this one mount writable.
    mount(
        none,
        root,
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | root_flags,
        none,
    )
    .map_err(|e| format!("making {} writable: {e}", root.display()))?;
    // The tmpfs's hiding the worker's directories only hold the way to the
    // input root: read-only, so nothing an action writes there outlives it.
    for h in &hidden {
        mount(
            none,
            h.as_path(),
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
            none,
        )
        .map_err(|e| format!("making the cover of {} read-only: {e}", h.display()))?;
    }
    Ok(scratch)
}

/// Per-mount flags to keep when remounting (locked in a user namespace:
/// dropping one would fail).
fn ms_flags_of(f: nix::sys::statvfs::FsFlags) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let mut m = MsFlags::empty();
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(st) {
            m |= ms;
        }
    }
    m
}

/// Remounts every mount but /proc and /sys read-only (keeping its other
/// flags). `/` must succeed; a mount that cannot be reached or changed is
/// left as it is.
fn make_read_only() -> Result<(), String> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("reading mountinfo: {e}"))?;
    let none: Option<&str> = None;
    for line in info.lines() {
        let Some(point) = line.split(' ').nth(4).map(unescape_mount_path) else {
            continue;
        };
        // procfs and sysfs guard their files themselves (root-owned,
        // capability checks), and the helper still writes its own
        // /proc/self/uid_map after this.
        let pseudo = |p: &str| point == p || point.starts_with(&format!("{p}/"));
        if pseudo("/proc") || pseudo("/sys") {
            continue;
        }
        let flags = match nix::sys::statvfs::statvfs(point.as_str()) {
            Ok(s) => ms_flags_of(s.flags()),
            Err(_) if point != "/" => continue,
            Err(e) => return Err(format!("statvfs of /: {e}")),
        };
        let r = mount(
            none,
            point.as_str(),
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
            none,
        );
        if let Err(e) = r
            && point == "/"
        {
            return Err(format!("making / read-only: {e}"));
        }
    }
    Ok(())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes everything inside the private tmpfs `dir` (not `dir` itself)
/// without following symlinks or crossing into another file system, at
/// any depth ([`crate::wipe::empty_dir_keeping`]); the directories leading
/// to `keep` (the slot's input root, when it lies under this tmpfs) stay,
/// and `keep` itself is not entered. `empty_size`: the directory's size
/// when it is empty (then there is nothing to list).
pub fn empty_dir(dir: &Path, empty_size: Option<u64>, keep: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("stat of {}: {e}", dir.display())),
    };
    if Some(meta.size()) == empty_size {
        return Ok(());
    }
    crate::wipe::empty_dir_keeping(dir, keep).map_err(|e| format!("emptying {}: {e}", dir.display()))
}

/// Makes a private tmpfs as it was before the action: empty (but for the
/// way to `root`), its mode 1777, no extended attributes; the directories
/// on the way to `root` mode 0755 without extended attributes. (In a
/// non-root worker the action owns these directories and could change
/// them; a change that cannot be undone fails, and the zygote is then
/// replaced, with fresh tmpfs's.)
pub fn reset_scratch(scratch: &Scratch, root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    empty_dir(&scratch.path, Some(scratch.empty_size), root)?;
    let mut dirs = vec![(scratch.path.clone(), 0o1777)];
    if let Ok(rest) = root.strip_prefix(&scratch.path) {
        let mut p = scratch.path.clone();
        let parts: Vec<_> = rest.components().collect();
        // Every directory strictly between the tmpfs and the root.
        for c in parts.iter().take(parts.len().saturating_sub(1)) {
            p.push(c);
            dirs.push((p.clone(), 0o755));
        }
    }
    let me = nix::unistd::geteuid().as_raw();
    for (dir, mode) in dirs {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("stat of {}: {e}", dir.display()))?;
        // Only what the action could have changed: what its user (ours)
        // owns. (A root worker's zygote mounted these as root.)
        if meta.uid() != me {
            continue;
        }
        if meta.permissions().mode() & 0o7777 != mode {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("resetting the mode of {}: {e}", dir.display()))?;
        }
        crate::wipe::remove_owner_xattrs(&dir).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
    }

    #[test]
    fn empty_dir_removes_contents_but_not_the_dir_the_root_or_symlink_targets() {
        let base = tempfile::tempdir().unwrap();
        let outside = base.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let d = base.path().join("d");
        std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
        std::fs::write(d.join("sub/deeper/f"), b"1").unwrap();
        std::fs::write(d.join("top"), b"2").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        let keep = d.join("a/b/root");
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(keep.join("output"), b"3").unwrap();
        std::fs::write(d.join("a/junk"), b"4").unwrap();
        // Trees deeper than the directories kept open at once (see
        // crate::wipe), at the top and on the way to the root, and a
        // locked directory on the way.
        deep_tree(&d, 300);
        deep_tree(&d.join("a/b"), 300);
        std::fs::create_dir_all(d.join("a/locked/inner")).unwrap();
        std::fs::set_permissions(d.join("a/locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
        empty_dir(&d, None, &keep).unwrap();
        assert!(d.is_dir());
        assert_eq!(names(&d), vec!["a"]);
        assert_eq!(names(&d.join("a")), vec!["b"]);
        assert_eq!(names(&d.join("a/b")), vec!["root"]);
        assert_eq!(std::fs::read(keep.join("output")).unwrap(), b"3");
        assert!(outside.join("keep").exists());
        // The way named by a file: the file goes.
        std::fs::write(d.join("f"), b"5").unwrap();
        empty_dir(&d, None, &d.join("f/root")).unwrap();
        assert!(names(&d).is_empty());
        // A missing directory is fine.
        empty_dir(&base.path().join("missing"), None, &keep).unwrap();
    }

    /// What an action that owns the tmpfs (a non-root worker's) changed on
    /// it and on the way to the root is undone.
    #[test]
    fn reset_scratch_restores_modes_and_removes_attributes() {
        let base = tempfile::tempdir().unwrap();
        let t = base.path().join("t");
        std::fs::create_dir(&t).unwrap();
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let root = t.join("w/s0/root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("output"), b"1").unwrap();
        std::fs::write(t.join("left"), b"2").unwrap();
        let scratch = Scratch {
            path: t.clone(),
            // Not a tmpfs: a directory's size says nothing of its entries.
            empty_size: u64::MAX,
        };
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(t.join("w"), std::fs::Permissions::from_mode(0o700)).unwrap();
        // User attributes where the file system has them (ext4, tmpfs).
        let attrs = xattr::set(&t, "user.kiln", b"x").is_ok();
        if attrs {
            xattr::set(t.join("w/s0"), "user.kiln", b"y").unwrap();
        }
        reset_scratch(&scratch, &root).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&t), 0o1777);
        assert_eq!(mode(&t.join("w")), 0o755);
        assert_eq!(mode(&t.join("w/s0")), 0o755);
        for p in [t.clone(), t.join("w"), t.join("w/s0")] {
            let user: Vec<_> = xattr::list(&p)
                .unwrap()
                .filter(|n| n.to_string_lossy().starts_with("user."))
                .collect();
            assert!(user.is_empty(), "{}: {user:?}", p.display());
        }
        assert_eq!(names(&t), vec!["w"]);
        assert_eq!(std::fs::read(root.join("output")).unwrap(), b"1");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        out.sort();
        out
    }

    /// `depth` nested directories `n` in `dir`, a file every 100 levels
    /// (through descriptors, as a path could grow too long).
    fn deep_tree(dir: &Path, depth: usize) {
        use nix::fcntl::{OFlag, open, openat};
        use nix::sys::stat::{Mode, mkdirat};
        use std::os::fd::{AsFd, AsRawFd};
        let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let mut fd = open(dir, flags, Mode::empty()).unwrap();
        for i in 0..depth {
            mkdirat(fd.as_fd(), "n", Mode::S_IRWXU).unwrap();
            let next = openat(fd.as_fd(), "n", flags, Mode::empty()).unwrap();
            if i % 100 == 0 {
                std::fs::write(format!("/proc/self/fd/{}/f", next.as_raw_fd()), b"1").unwrap();
            }
            fd = next;
        }
    }
}
