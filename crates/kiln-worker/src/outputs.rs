//! Collecting an action's outputs after it ran: files, directories (as
//! Tree messages) and symlinks, never following a symlink out of the
//! action's directory.
//!
//! * Each output path is walked component by component with `lstat`; if
//!   the action replaced a parent directory with a symlink or a file, the
//!   output counts as not produced (following it could read host files).
//! * A symlink output is reported as a symlink with its target, never as
//!   the content it points to (a symlink to /etc/passwd stays a symlink).
//! * Inside output directories, entries are read with `lstat` semantics
//!   too: symlinks become SymlinkNodes; sockets, FIFOs and devices are
//!   skipped.
//! * A Tree lists the root and every distinct child Directory once, parents
//!   before children (breadth first), so `is_topologically_sorted` holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_digest::{BlobKey, DigestFunction, Hasher};
use kiln_proto::reapi::command::OutputDirectoryFormat;
use kiln_proto::reapi::{
    ActionResult, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile, OutputSymlink,
    SymlinkNode, Tree,
};
use prost::Message;

use crate::error::{WorkerError, WorkerResult};
use crate::materialize::{OutputKind, OutputLayout};
use crate::paths::RelPath;
use crate::tree::MAX_DEPTH;

/// Files up to this size are read into memory when hashed.
const IN_MEMORY_MAX: u64 = 64 << 10;

/// A blob to make sure the CAS has.
#[derive(Debug, Clone)]
pub enum Upload {
    Bytes(BlobKey, Bytes),
    File(BlobKey, PathBuf),
    /// An open file (stdout/stderr memory files), read from offset 0.
    Open(BlobKey, std::sync::Arc<std::fs::File>),
}

impl Upload {
    pub fn key(&self) -> &BlobKey {
        match self {
            Upload::Bytes(k, _) | Upload::File(k, _) | Upload::Open(k, _) => k,
        }
    }
}

/// The output part of an ActionResult plus what to upload for it.
#[derive(Debug, Default)]
pub struct Collected {
    pub result: ActionResult,
    pub uploads: Vec<Upload>,
}

/// Hashes a file (opened without following symlinks). Small files are kept
/// in memory.
pub fn hash_file(function: DigestFunction, path: &Path) -> WorkerResult<(BlobKey, Upload, bool)> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(WorkerError::io(format!("opening output {}", path.display())))?;
    let meta = f
        .metadata()
        .map_err(WorkerError::io(format!("stat of output {}", path.display())))?;
    let executable = meta.mode() & 0o100 != 0;
    let (key, data) = hash_open(
        function,
        &mut f,
        meta.len(),
        &format!("output {}", path.display()),
    )?;
    let upload = match data {
        Some(data) => Upload::Bytes(key.clone(), data),
        None => Upload::File(key.clone(), path.to_path_buf()),
    };
    Ok((key, upload, executable))
}

/// Hashes an open file from its start (stdout/stderr). `None` when it is
/// empty. Small files are kept in memory; a large one is uploaded from
/// the handle.
pub fn hash_open_file(
    function: DigestFunction,
    mut f: std::fs::File,
    what: &str,
) -> WorkerResult<Option<(BlobKey, Upload)>> {
    use std::io::{Seek, SeekFrom};
    let size = f
        .metadata()
        .map_err(WorkerError::io(format!("stat of the action's {what}")))?
        .len();
    if size == 0 {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(0))
        .map_err(WorkerError::io(format!("rewinding the action's {what}")))?;
    let (key, data) = hash_open(function, &mut f, size, &format!("the action's {what}"))?;
    if let Some(data) = data {
        return Ok(Some((key.clone(), Upload::Bytes(key, data))));
    }
    f.seek(SeekFrom::Start(0))
        .map_err(WorkerError::io(format!("rewinding the action's {what}")))?;
    Ok(Some((key.clone(), Upload::Open(key, std::sync::Arc::new(f)))))
}

/// Hashes `f` from its current offset to its end; `size` is its expected
/// length (a different length is an error) and `what` names it in errors.
/// A file of at most [`IN_MEMORY_MAX`] bytes is read into memory and its
/// content returned with the key.
fn hash_open(
    function: DigestFunction,
    f: &mut std::fs::File,
    size: u64,
    what: &str,
) -> WorkerResult<(BlobKey, Option<Bytes>)> {
    if size <= IN_MEMORY_MAX {
        let mut data = Vec::with_capacity(size as usize);
        f.read_to_end(&mut data)
            .map_err(WorkerError::io(format!("reading {what}")))?;
        return Ok((BlobKey::of(function, &data), Some(Bytes::from(data))));
    }
    let mut hasher = Hasher::new(function, size);
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(WorkerError::io(format!("reading {what}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total != size {
        return Err(WorkerError::Internal(format!(
            "{what} changed size while being hashed"
        )));
    }
    Ok((BlobKey::from_raw(function, &hasher.finish(), total)?, None))
}

/// What an output path turned out to be.
enum Found {
    Missing,
    File,
    Dir,
    Symlink(String),
    Other,
}

/// Looks `rel` up under `root` without following any symlink.
fn find(root: &Path, rel: &RelPath) -> WorkerResult<Found> {
    let mut p = root.to_path_buf();
    let n = rel.components().len();
    for (i, c) in rel.components().iter().enumerate() {
        p.push(c);
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Missing),
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTDIR as i32) => {
                return Ok(Found::Missing);
            }
            Err(e) => return Err(WorkerError::io(format!("stat of output {}", p.display()))(e)),
        };
        let last = i + 1 == n;
        let ft = meta.file_type();
        if !last {
            if !ft.is_dir() {
                tracing::warn!(path = %p.display(), "a parent of an output is not a directory; output ignored");
                return Ok(Found::Missing);
            }
            continue;
        }
        if ft.is_symlink() {
            let target = std::fs::read_link(&p)
                .map_err(WorkerError::io(format!("reading symlink {}", p.display())))?;
            let target = target.into_os_string().into_string().map_err(|_| {
                WorkerError::FailedPrecondition(format!("symlink {} has a non-UTF-8 target", p.display()))
            })?;
            return Ok(Found::Symlink(target));
        }
        if ft.is_file() {
            return Ok(Found::File);
        }
        if ft.is_dir() {
            return Ok(Found::Dir);
        }
        return Ok(Found::Other);
    }
    // The root itself (an output directory "").
    Ok(Found::Dir)
}

/// Builds the Tree of `dir`: (root, children in BFS order, all Directory
/// messages by key, file uploads).
struct TreeBuilder {
    function: DigestFunction,
    dirs: HashMap<BlobKey, Directory>,
    uploads: Vec<Upload>,
}

impl TreeBuilder {
    fn dir(&mut self, path: &Path, depth: usize) -> WorkerResult<(Directory, BlobKey)> {
        if depth > MAX_DEPTH {
            return Err(WorkerError::FailedPrecondition(format!(
                "output directory {} is deeper than {MAX_DEPTH} levels",
                path.display()
            )));
        }
        let mut entries: Vec<(String, std::fs::FileType, PathBuf)> = Vec::new();
        for e in
            std::fs::read_dir(path).map_err(WorkerError::io(format!("reading output {}", path.display())))?
        {
            let e = e.map_err(WorkerError::io(format!("reading output {}", path.display())))?;
            let name = e.file_name().into_string().map_err(|n| {
                WorkerError::FailedPrecondition(format!(
                    "output {} contains the non-UTF-8 name {n:?}",
                    path.display()
                ))
            })?;
            let ft = e
                .file_type()
                .map_err(WorkerError::io(format!("stat of {}", e.path().display())))?;
            entries.push((name, ft, e.path()));
        }
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut d = Directory::default();
        for (name, ft, p) in entries {
            if ft.is_symlink() {
                let target = std::fs::read_link(&p)
                    .map_err(WorkerError::io(format!("reading symlink {}", p.display())))?;
                let target = target.into_os_string().into_string().map_err(|_| {
                    WorkerError::FailedPrecondition(format!("symlink {} has a non-UTF-8 target", p.display()))
                })?;
                d.symlinks.push(SymlinkNode {
                    name,
                    target,
                    node_properties: None,
                });
            } else if ft.is_file() {
                let (key, upload, executable) = hash_file(self.function, &p)?;
                self.uploads.push(upload);
                d.files.push(FileNode {
                    name,
                    digest: Some(key.to_digest()),
                    is_executable: executable,
                    node_properties: None,
                });
            } else if ft.is_dir() {
                let (_, key) = self.dir(&p, depth + 1)?;
                d.directories.push(DirectoryNode {
                    name,
                    digest: Some(key.to_digest()),
                });
            } else {
                tracing::debug!(path = %p.display(), "skipping a socket, FIFO or device in an output directory");
            }
        }
        let key = BlobKey::of(self.function, &d.encode_to_vec());
        self.dirs.entry(key.clone()).or_insert_with(|| d.clone());
        Ok((d, key))
    }

    /// Children of `root`, each distinct Directory once, parents first.
    fn children(&self, root: &Directory) -> WorkerResult<Vec<Directory>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut queue: VecDeque<&Directory> = VecDeque::from([root]);
        while let Some(d) = queue.pop_front() {
            for sub in &d.directories {
                let k = BlobKey::from_opt_digest(self.function, sub.digest.as_ref())?;
                if seen.insert(k.clone()) {
                    let child = self
                        .dirs
                        .get(&k)
                        .ok_or_else(|| WorkerError::Internal(format!("tree builder lost directory {k}")))?;
                    out.push(child.clone());
                    queue.push_back(child);
                }
            }
        }
        Ok(out)
    }
}

/// Collects every declared output under `exec_root` (blocking I/O).
pub fn collect(
    exec_root: &Path,
    layout: &OutputLayout,
    function: DigestFunction,
    format: OutputDirectoryFormat,
) -> WorkerResult<Collected> {
    let mut c = Collected::default();
    let with_directories = matches!(
        format,
        OutputDirectoryFormat::DirectoryOnly | OutputDirectoryFormat::TreeAndDirectory
    );
    for o in &layout.outputs {
        let disk = o.path.on_disk(exec_root);
        match find(exec_root, &o.path)? {
            Found::Missing => {}
            Found::Other => {
                tracing::warn!(output = %o.declared, "output is neither a file, a directory nor a symlink; ignored");
            }
            Found::Symlink(target) => {
                let s = OutputSymlink {
                    path: o.declared.clone(),
                    target,
                    node_properties: None,
                };
                #[allow(deprecated)]
                match o.kind {
                    OutputKind::Path => c.result.output_symlinks.push(s),
                    OutputKind::File => c.result.output_file_symlinks.push(s),
                    OutputKind::Directory => c.result.output_directory_symlinks.push(s),
                }
            }
            Found::File => {
                if o.kind == OutputKind::Directory {
                    return Err(WorkerError::FailedPrecondition(format!(
                        "output directory {:?} is a file",
                        o.declared
                    )));
                }
                let (key, upload, executable) = hash_file(function, &disk)?;
                c.uploads.push(upload);
                c.result.output_files.push(OutputFile {
                    path: o.declared.clone(),
                    digest: Some(key.to_digest()),
                    is_executable: executable,
                    contents: Vec::new(),
                    node_properties: None,
                });
            }
            Found::Dir => {
                if o.kind == OutputKind::File {
                    return Err(WorkerError::FailedPrecondition(format!(
                        "output file {:?} is a directory",
                        o.declared
                    )));
                }
                let mut b = TreeBuilder {
                    function,
                    dirs: HashMap::new(),
                    uploads: Vec::new(),
                };
                let (root, root_key) = b.dir(&disk, 0)?;
                let children = b.children(&root)?;
                if with_directories {
                    for d in std::iter::once(&root).chain(children.iter()) {
                        let bytes = d.encode_to_vec();
                        let k = BlobKey::of(function, &bytes);
                        c.uploads.push(Upload::Bytes(k, Bytes::from(bytes)));
                    }
                }
                let tree = Tree {
                    root: Some(root),
                    children,
                };
                let tree_bytes = tree.encode_to_vec();
                let tree_key = BlobKey::of(function, &tree_bytes);
                c.uploads.append(&mut b.uploads);
                c.uploads
                    .push(Upload::Bytes(tree_key.clone(), Bytes::from(tree_bytes)));
                c.result.output_directories.push(OutputDirectory {
                    path: o.declared.clone(),
                    tree_digest: Some(tree_key.to_digest()),
                    is_topologically_sorted: true,
                    root_directory_digest: with_directories.then(|| root_key.to_digest()),
                });
            }
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Small files are hashed in memory, large ones streamed; a path and
    /// an open handle of the same content get the same key.
    #[test]
    fn files_and_open_handles_hash_alike_small_and_large() {
        let f = DigestFunction::Sha256;
        let dir = tempfile::tempdir().unwrap();
        for size in [
            1usize,
            IN_MEMORY_MAX as usize,
            IN_MEMORY_MAX as usize + 1,
            3 << 20,
        ] {
            let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let expected = BlobKey::of(f, &content);
            let path = dir.path().join(format!("f{size}"));
            std::fs::write(&path, &content).unwrap();
            let small = size as u64 <= IN_MEMORY_MAX;

            let (key, upload, executable) = hash_file(f, &path).unwrap();
            assert_eq!(key, expected, "{size} bytes by path");
            assert!(!executable);
            match upload {
                Upload::Bytes(k, data) => {
                    assert!(small, "{size} bytes kept in memory");
                    assert_eq!((k, data.as_ref()), (expected.clone(), content.as_slice()));
                }
                Upload::File(k, p) => {
                    assert!(!small, "{size} bytes not kept in memory");
                    assert_eq!((k, p), (expected.clone(), path.clone()));
                }
                Upload::Open(..) => panic!("a path hashed as an open file"),
            }

            // An open handle positioned at its end (as after the action
            // wrote it) is hashed from its start and left rewound.
            let mut handle = tempfile::tempfile().unwrap();
            handle.write_all(&content).unwrap();
            let (key, upload) = hash_open_file(f, handle, "stdout").unwrap().unwrap();
            assert_eq!(key, expected, "{size} bytes by handle");
            match upload {
                Upload::Bytes(k, data) => {
                    assert!(small, "{size} bytes kept in memory");
                    assert_eq!((k, data.as_ref()), (expected.clone(), content.as_slice()));
                }
                Upload::Open(k, file) => {
                    assert!(!small, "{size} bytes not kept in memory");
                    assert_eq!(k, expected);
                    let mut again = Vec::new();
                    (&*file).read_to_end(&mut again).unwrap();
                    assert_eq!(again, content, "the handle was not rewound");
                }
                Upload::File(..) => panic!("an open file hashed as a path"),
            }
        }
        let empty = tempfile::tempfile().unwrap();
        assert!(hash_open_file(f, empty, "stderr").unwrap().is_none());
    }
}
