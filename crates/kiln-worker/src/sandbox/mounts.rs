//! The file system a slot's actions see, set up once per zygote in its
//! private mount namespace: the whole tree private (nothing propagates to
//! the host) and read-only; private tmpfs's on `/tmp`, `/var/tmp`,
//! `/dev/shm` (emptied by the zygote after every action); the worker's
//! work and cache directories covered by empty read-only tmpfs's; the
//! slot's input root bound back at its own path, writable. So an action
//! can write only its input root and its private tmpfs's.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

fn errno(what: &str) -> impl FnOnce(Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

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
/// without following symlinks or crossing into another file system; the
/// directories leading to `keep` (the slot's input root, when it lies
/// under this tmpfs) stay, and `keep` itself is not entered. `empty_size`:
/// the directory's size when it is empty (then there is nothing to list).
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
    empty_inside(dir, meta.dev(), Some(keep), 0)
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
        let names =
            xattr::list(&dir).map_err(|e| format!("listing the attributes of {}: {e}", dir.display()))?;
        // What an unprivileged owner can set: user attributes and ACLs.
        for name in names.filter(|n| {
            let n = n.to_string_lossy();
            n.starts_with("user.") || n.starts_with("system.posix_acl_")
        }) {
            xattr::remove(&dir, &name)
                .map_err(|e| format!("removing attribute {name:?} of {}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// Deepest directory nesting removed (a bound on the recursion).
const MAX_DEPTH: usize = 4096;

fn empty_inside(dir: &Path, dev: u64, keep: Option<&Path>, depth: usize) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if depth > MAX_DEPTH {
        return Err(format!("{} is nested too deeply to empty", dir.display()));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        let path = entry.path();
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| format!("stat of {}: {e}", path.display()))?;
        if !meta.is_dir() {
            std::fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
            continue;
        }
        if keep.is_some_and(|k| k == path) || meta.dev() != dev {
            // The input root (or another mount): not ours to empty.
            continue;
        }
        if keep.is_some_and(|k| k.starts_with(&path)) {
            empty_inside(&path, dev, keep, depth + 1)?;
            continue;
        }
        empty_inside(&path, dev, None, depth + 1)?;
        std::fs::remove_dir(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        empty_dir(&d, None, &keep).unwrap();
        assert!(d.is_dir());
        let mut left = Vec::new();
        for e in std::fs::read_dir(&d).unwrap() {
            left.push(e.unwrap().file_name().into_string().unwrap());
        }
        assert_eq!(left, vec!["a"]);
        assert!(!d.join("a/junk").exists());
        assert_eq!(std::fs::read(keep.join("output")).unwrap(), b"3");
        assert!(outside.join("keep").exists());
    }
}
