//! Local files and directories as CAS content: hashing a file, and the
//! Merkle tree of a directory (Directory messages with entries sorted by
//! name, executables flagged, symlinks as SymlinkNodes).
//!
//! These functions do blocking file I/O: call them through
//! `kiln_store::task::blocking`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_digest::{BlobKey, DigestFunction, Hasher};
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use prost::Message;

use crate::error::{ClientError, ClientResult};

/// Where the content of a blob to upload comes from.
#[derive(Debug, Clone)]
pub enum BlobSource {
    Bytes(Bytes),
    File(PathBuf),
}

/// A directory hashed into Directory messages.
#[derive(Debug, Clone)]
pub struct LocalTree {
    /// Digest of the root Directory message.
    pub root: BlobKey,
    /// Every Directory message, encoded, by digest (the root included).
    pub directories: Vec<(BlobKey, Bytes)>,
    /// Every file, by digest (one path per distinct content).
    pub files: Vec<(BlobKey, PathBuf)>,
    /// Counts of the tree, duplicates included.
    pub file_count: u64,
    pub dir_count: u64,
    pub symlink_count: u64,
    pub file_bytes: u64,
}

impl LocalTree {
    /// Every blob of the tree with its source.
    pub fn blobs(&self) -> Vec<(BlobKey, BlobSource)> {
        let mut out: Vec<(BlobKey, BlobSource)> = self
            .directories
            .iter()
            .map(|(k, b)| (k.clone(), BlobSource::Bytes(b.clone())))
            .collect();
        out.extend(
            self.files
                .iter()
                .map(|(k, p)| (k.clone(), BlobSource::File(p.clone()))),
        );
        out
    }
}

/// Hashes a file's content under `function`.
pub fn hash_file(path: &Path, function: DigestFunction) -> ClientResult<BlobKey> {
    let mut file = fs::File::open(path).map_err(ClientError::io(format!("opening {}", path.display())))?;
    let size = file
        .metadata()
        .map_err(ClientError::io(format!(
            "reading the metadata of {}",
            path.display()
        )))?
        .len();
    let mut hasher = Hasher::new(function, size);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(ClientError::io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total != size {
        return Err(ClientError::Usage(format!(
            "{} changed size while it was being read",
            path.display()
        )));
    }
    BlobKey::from_raw(function, &hasher.finish(), size)
        .map_err(|e| ClientError::Internal(format!("hashing {}: {e}", path.display())))
}

/// Whether a file mode counts as executable (any execute bit).
pub fn is_executable_mode(mode: u32) -> bool {
    mode & 0o111 != 0
}

/// Builds the Merkle tree of the directory `root` (following `root`
/// itself if it is a symlink, but no symlink inside it).
pub fn build_tree(root: &Path, function: DigestFunction) -> ClientResult<LocalTree> {
    let meta = fs::metadata(root).map_err(ClientError::io(format!("reading {}", root.display())))?;
    if !meta.is_dir() {
        return Err(ClientError::Usage(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut b = Builder {
        function,
        directories: Vec::new(),
        files: std::collections::HashMap::new(),
        file_count: 0,
        dir_count: 0,
        symlink_count: 0,
        file_bytes: 0,
    };
    let root_key = b.directory(root, 0)?;
    let mut directories = b.directories;
    directories.sort_by(|a, b| a.0.cmp(&b.0));
    directories.dedup_by(|a, b| a.0 == b.0);
    let mut files: Vec<(BlobKey, PathBuf)> = b.files.into_iter().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(LocalTree {
        root: root_key,
        directories,
        files,
        file_count: b.file_count,
        dir_count: b.dir_count,
        symlink_count: b.symlink_count,
        file_bytes: b.file_bytes,
    })
}

/// Deepest directory nesting accepted.
const MAX_DEPTH: usize = 4096;

struct Builder {
    function: DigestFunction,
    directories: Vec<(BlobKey, Bytes)>,
    files: std::collections::HashMap<BlobKey, PathBuf>,
    file_count: u64,
    dir_count: u64,
    symlink_count: u64,
    file_bytes: u64,
}

impl Builder {
    fn directory(&mut self, path: &Path, depth: usize) -> ClientResult<BlobKey> {
        if depth > MAX_DEPTH {
            return Err(ClientError::Usage(format!(
                "{} is nested more than {MAX_DEPTH} directories deep",
                path.display()
            )));
        }
        self.dir_count += 1;
        let mut entries = Vec::new();
        for entry in fs::read_dir(path).map_err(ClientError::io(format!("listing {}", path.display())))? {
            let entry = entry.map_err(ClientError::io(format!("listing {}", path.display())))?;
            let name = entry.file_name().into_string().map_err(|n| {
                ClientError::Usage(format!(
                    "{}: the name {n:?} is not UTF-8, which REAPI cannot represent",
                    path.display()
                ))
            })?;
            entries.push((name, entry.path()));
        }
        // Rust's String order is byte order, which is code point order.
        entries.sort();
        let mut dir = Directory::default();
        for (name, p) in entries {
            let meta =
                fs::symlink_metadata(&p).map_err(ClientError::io(format!("reading {}", p.display())))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = fs::read_link(&p)
                    .map_err(ClientError::io(format!("reading the symlink {}", p.display())))?;
                let target = target.into_os_string().into_string().map_err(|t| {
                    ClientError::Usage(format!("{}: the symlink target {t:?} is not UTF-8", p.display()))
                })?;
                self.symlink_count += 1;
                dir.symlinks.push(SymlinkNode {
                    name,
                    target,
                    node_properties: None,
                });
            } else if ft.is_dir() {
                let key = self.directory(&p, depth + 1)?;
                dir.directories.push(DirectoryNode {
                    name,
                    digest: Some(key.to_digest()),
                });
            } else if ft.is_file() {
                let key = hash_file(&p, self.function)?;
                self.file_count += 1;
                self.file_bytes += key.size();
                dir.files.push(FileNode {
                    name,
                    digest: Some(key.to_digest()),
                    is_executable: is_executable_mode(meta.permissions().mode()),
                    node_properties: None,
                });
                self.files.entry(key).or_insert(p);
            } else {
                return Err(ClientError::Usage(format!(
                    "{} is neither a file, a directory nor a symlink (REAPI cannot store it)",
                    p.display()
                )));
            }
        }
        let encoded = Bytes::from(dir.encode_to_vec());
        let key = BlobKey::of(self.function, &encoded);
        self.directories.push((key.clone(), encoded));
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_is_sorted_and_flags_executables_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join("b.txt"), b"bee").unwrap();
        fs::write(root.join("a.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("a.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/c"), b"bee").unwrap();
        std::os::unix::fs::symlink("b.txt", root.join("link")).unwrap();
        let f = DigestFunction::Sha256;
        let tree = build_tree(root, f).unwrap();
        assert_eq!((tree.file_count, tree.dir_count, tree.symlink_count), (3, 2, 1));
        // Identical content is uploaded once.
        assert_eq!(tree.files.len(), 2);
        let (_, root_bytes) = tree.directories.iter().find(|(k, _)| *k == tree.root).unwrap();
        let dir = Directory::decode(root_bytes.clone()).unwrap();
        let names: Vec<_> = dir
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.is_executable))
            .collect();
        assert_eq!(names, [("a.sh", true), ("b.txt", false)]);
        assert_eq!(dir.directories[0].name, "sub");
        assert_eq!(dir.symlinks[0].name, "link");
        assert_eq!(dir.symlinks[0].target, "b.txt");
        // Hashing again gives the same root.
        assert_eq!(build_tree(root, f).unwrap().root, tree.root);
    }
}
