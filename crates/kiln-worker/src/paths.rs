//! Validation of every name and path an action gives us, done before
//! anything touches the disk. A path that passes is a list of plain
//! components that stays inside the input root.

use crate::error::{WorkerError, WorkerResult};

/// A relative path inside the input root, as validated components (none
/// empty, `.`, `..`, or containing `/` or NUL). Empty = the root itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath(Vec<String>);

impl RelPath {
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    pub fn components(&self) -> &[String] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent path (the root's parent is the root).
    pub fn parent(&self) -> RelPath {
        let mut c = self.0.clone();
        c.pop();
        RelPath(c)
    }

    pub fn join(&self, other: &RelPath) -> RelPath {
        let mut c = self.0.clone();
        c.extend(other.0.iter().cloned());
        RelPath(c)
    }

    pub fn child(&self, name: &str) -> RelPath {
        let mut c = self.0.clone();
        c.push(name.to_string());
        RelPath(c)
    }

    /// `a/b/c` form ("" for the root).
    pub fn as_slash_path(&self) -> String {
        self.0.join("/")
    }

    /// The path on disk under `base`.
    pub fn on_disk(&self, base: &std::path::Path) -> std::path::PathBuf {
        let mut p = base.to_path_buf();
        for c in &self.0 {
            p.push(c);
        }
        p
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0.len() >= other.0.len() && self.0[..other.0.len()] == other.0[..]
    }
}

/// Checks one Directory entry name: non-empty, not `.` or `..`, no `/`,
/// no NUL.
pub fn check_name(name: &str, what: &str) -> WorkerResult<()> {
    if name.is_empty() {
        return Err(WorkerError::invalid(format!("{what} has an empty name")));
    }
    if name == "." || name == ".." {
        return Err(WorkerError::invalid(format!("{what} is named {name:?}")));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(WorkerError::invalid(format!(
            "{what} name {name:?} contains '/' or NUL"
        )));
    }
    Ok(())
}

/// Parses a relative path given by the client (working directory or an
/// output path) and resolves it against `base`: empty and `.` components
/// are skipped, `..` goes up one level. Absolute paths and paths that leave
/// the input root are INVALID_ARGUMENT.
pub fn resolve(base: &RelPath, path: &str, what: &str) -> WorkerResult<RelPath> {
    if path.starts_with('/') {
        return Err(WorkerError::invalid(format!(
            "{what} {path:?} is absolute; it must be relative to the input root"
        )));
    }
    if path.contains('\0') {
        return Err(WorkerError::invalid(format!("{what} {path:?} contains NUL")));
    }
    let mut out = base.0.clone();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(WorkerError::invalid(format!(
                        "{what} {path:?} leaves the input root"
                    )));
                }
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(RelPath(out))
}

/// Checks a symlink target: absolute targets only when allowed; relative
/// ones may use `..` (the spec allows it anywhere) but must be non-empty
/// and free of NUL.
pub fn check_symlink_target(target: &str, allow_absolute: bool, what: &str) -> WorkerResult<()> {
    if target.is_empty() {
        return Err(WorkerError::invalid(format!("{what} has an empty target")));
    }
    if target.contains('\0') {
        return Err(WorkerError::invalid(format!("{what} target contains NUL")));
    }
    if target.starts_with('/') && !allow_absolute {
        return Err(WorkerError::invalid(format!(
            "{what} has the absolute target {target:?}, which this server disallows"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("a.txt", "f").is_ok());
        for bad in ["", ".", "..", "a/b", "/", "a\0"] {
            assert!(check_name(bad, "f").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolution_stays_inside() {
        let root = RelPath::root();
        let wd = resolve(&root, "a/b", "wd").unwrap();
        assert_eq!(resolve(&wd, "../c", "o").unwrap().as_slash_path(), "a/c");
        assert_eq!(resolve(&wd, "./x//y", "o").unwrap().as_slash_path(), "a/b/x/y");
        assert_eq!(resolve(&wd, "../..", "o").unwrap(), RelPath::root());
        assert!(resolve(&wd, "../../..", "o").is_err());
        assert!(resolve(&root, "..", "o").is_err());
        assert!(resolve(&root, "/etc/passwd", "o").is_err());
        assert!(resolve(&root, "a/../../b", "o").is_err());
    }

    #[test]
    fn symlink_targets() {
        assert!(check_symlink_target("../x", false, "s").is_ok());
        assert!(check_symlink_target("/etc", true, "s").is_ok());
        assert!(check_symlink_target("/etc", false, "s").is_err());
        assert!(check_symlink_target("", true, "s").is_err());
    }
}
