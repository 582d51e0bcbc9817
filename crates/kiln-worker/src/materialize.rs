//! Building an action's input root on disk from a validated [`InputPlan`]:
//! directories are created, files hardlinked from the local cache,
//! symlinks created as given; then the parents of the outputs.
//!
//! Why hardlinks are safe here: cache files are read-only (0444, or 0555
//! for executables, which have their own cache file), and the sandboxed
//! action runs without `CAP_DAC_OVERRIDE`, so opening an input for writing
//! fails with EACCES; tools that "modify" an input by writing a new file
//! and renaming it over the old name only replace the link in the action's
//! own directory. An action running as the cache's owner (a worker that is
//! not root) could still `chmod` an input and write through it: the worker
//! then notices the changed mode/mtime after the action and drops the blob
//! from the cache ([`crate::local_cas::Pins::drop_modified`]). A worker
//! running as root runs actions as a different user, which cannot change
//! the files at all. When a hardlink is impossible (EXDEV: cache on another
//! file system, EMLINK: too many links) the file is copied instead.
//!
//! Nothing here follows a symlink: paths are built from validated
//! components under a fresh directory, and output parents that would pass
//! through an input file or symlink are rejected before anything is
//! created.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::{WorkerError, WorkerResult};
use crate::local_cas::CacheKey;
use crate::paths::RelPath;
use crate::tree::{InputPlan, InputTree, NodeKind};

/// Who owns the directories of an input root, when it is not the worker
/// (a root worker hands them to the sandbox user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Outputs an action declared, resolved against its working directory.
#[derive(Debug, Clone, Default)]
pub struct OutputLayout {
    /// The working directory.
    pub working_dir: RelPath,
    /// Each output: (as the client wrote it, resolved path, kind asked).
    pub outputs: Vec<DeclaredOutput>,
}

/// Which list an output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `output_paths` (v2.1+): file, directory or symlink.
    Path,
    /// Legacy `output_files`.
    File,
    /// Legacy `output_directories`.
    Directory,
}

#[derive(Debug, Clone)]
pub struct DeclaredOutput {
    /// The path as declared (relative to the working directory); reported
    /// back verbatim in the ActionResult.
    pub declared: String,
    pub path: RelPath,
    pub kind: OutputKind,
}

/// Directories to create for the working directory and the outputs'
/// parents, checked against the input tree first: a parent that is an
/// input file or symlink is INVALID_ARGUMENT (creating through a symlink
/// could write outside the input root).
pub fn output_parents(tree: &InputTree, layout: &OutputLayout) -> WorkerResult<Vec<RelPath>> {
    let mut wanted: Vec<(RelPath, String)> = Vec::new();
    if !layout.working_dir.is_root() {
        wanted.push((
            layout.working_dir.clone(),
            format!("working directory {:?}", layout.working_dir.as_slash_path()),
        ));
    }
    for o in &layout.outputs {
        if o.path.is_root() {
            continue;
        }
        wanted.push((o.path.parent(), format!("output {:?}", o.declared)));
    }
    let mut create = Vec::new();
    for (dir, what) in wanted {
        let (kind, at) = tree.kind_of(&dir)?;
        match kind {
            NodeKind::Directory => {}
            NodeKind::Absent => create.push(dir),
            NodeKind::File | NodeKind::Symlink => {
                return Err(WorkerError::invalid(format!(
                    "{what} needs the directory {:?}, which is an input {}",
                    at.as_slash_path(),
                    if kind == NodeKind::File { "file" } else { "symlink" }
                )));
            }
        }
    }
    create.sort();
    create.dedup();
    Ok(create)
}

/// Creates the input root under `exec_root` (which must exist and be
/// empty): directories, hardlinks from `cache_path(key)`, symlinks; then
/// `extra_dirs` (output parents). Directories are handed to `owner`.
pub fn materialize(
    exec_root: &Path,
    plan: &InputPlan,
    cache_path: impl Fn(&CacheKey) -> PathBuf,
    extra_dirs: &[RelPath],
    owner: Option<Owner>,
) -> WorkerResult<()> {
    for d in &plan.directories {
        let p = d.on_disk(exec_root);
        std::fs::create_dir(&p).map_err(WorkerError::io(format!(
            "creating input directory {}",
            p.display()
        )))?;
    }
    for (path, key) in &plan.files {
        let dest = path.on_disk(exec_root);
        let src = cache_path(key);
        link_or_copy(&src, &dest, key)?;
    }
    for (path, target) in &plan.symlinks {
        let dest = path.on_disk(exec_root);
        std::os::unix::fs::symlink(target, &dest).map_err(WorkerError::io(format!(
            "creating input symlink {}",
            dest.display()
        )))?;
    }
    for d in extra_dirs {
        create_dirs_no_follow(exec_root, d)?;
    }
    if let Some(o) = owner {
        chown_dir(exec_root, o)?;
        for d in plan.directories.iter().chain(extra_dirs.iter()) {
            let mut p = exec_root.to_path_buf();
            for c in d.components() {
                p.push(c);
                chown_dir(&p, o)?;
            }
        }
    }
    Ok(())
}

fn chown_dir(p: &Path, o: Owner) -> WorkerResult<()> {
    std::os::unix::fs::lchown(p, Some(o.uid), Some(o.gid)).map_err(WorkerError::io(format!(
        "handing {} to the sandbox user",
        p.display()
    )))
}

/// Creates `rel` under `root` component by component, refusing to pass
/// through anything that is not a real directory.
pub fn create_dirs_no_follow(root: &Path, rel: &RelPath) -> WorkerResult<()> {
    let mut p = root.to_path_buf();
    for c in rel.components() {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(WorkerError::invalid(format!(
                    "{} is not a directory",
                    p.strip_prefix(root).unwrap_or(&p).display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&p).map_err(WorkerError::io(format!("creating {}", p.display())))?;
            }
            Err(e) => return Err(WorkerError::io(format!("stat of {}", p.display()))(e)),
        }
    }
    Ok(())
}

fn link_or_copy(src: &Path, dest: &Path, key: &CacheKey) -> WorkerResult<()> {
    match std::fs::hard_link(src, dest) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(Errno::EXDEV as i32)
                || e.raw_os_error() == Some(Errno::EMLINK as i32) =>
        {
            std::fs::copy(src, dest).map_err(WorkerError::io(format!("copying input {}", dest.display())))?;
            let mode = if key.executable { 0o555 } else { 0o444 };
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
                .map_err(WorkerError::io(format!("setting the mode of {}", dest.display())))
        }
        Err(e) => Err(WorkerError::io(format!(
            "linking input {} from the local cache",
            dest.display()
        ))(e)),
    }
}
