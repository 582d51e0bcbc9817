//! Fetching and validating an action's input tree (its Directory messages)
//! before anything is written, and planning its materialisation.
//!
//! Checks, all answered with INVALID_ARGUMENT: entry names that are empty,
//! `.`, `..` or contain `/` or NUL; the same name twice in one directory
//! (across files, directories and symlinks); digests malformed for the
//! action's digest function; absolute symlink targets when disallowed; a
//! tree expanding to more than the configured number of nodes or deeper
//! than [`MAX_DEPTH`]. Missing Directory blobs are MissingBlobs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::Directory;
use parking_lot::Mutex;
use prost::Message;

use crate::cas::{BatchBlob, InstanceCas};
use crate::error::{WorkerError, WorkerResult};
use crate::local_cas::CacheKey;
use crate::paths::{RelPath, check_name, check_symlink_target};

/// Deepest input tree accepted.
pub const MAX_DEPTH: usize = 512;

/// A bounded in-memory cache of validated Directory messages, shared by
/// all actions (consecutive actions of a build share most of their input
/// directories).
pub struct DirectoryCache {
    inner: Mutex<DirCacheInner>,
    capacity: usize,
}

#[derive(Default)]
struct DirCacheInner {
    map: HashMap<BlobKey, Arc<Directory>>,
    order: VecDeque<BlobKey>,
    bytes: usize,
}

impl DirectoryCache {
    pub fn new(capacity_bytes: usize) -> Self {
        DirectoryCache {
            inner: Mutex::new(DirCacheInner::default()),
            capacity: capacity_bytes,
        }
    }

    fn get(&self, k: &BlobKey) -> Option<Arc<Directory>> {
        self.inner.lock().map.get(k).cloned()
    }

    fn insert(&self, k: BlobKey, d: Arc<Directory>) {
        let mut inner = self.inner.lock();
        if inner.map.contains_key(&k) {
            return;
        }
        inner.bytes += k.size() as usize;
        inner.order.push_back(k.clone());
        inner.map.insert(k, d);
        while inner.bytes > self.capacity {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if inner.map.remove(&old).is_some() {
                inner.bytes -= old.size() as usize;
            }
        }
    }
}

/// What materialising an input root creates, parents before children.
#[derive(Debug, Default)]
pub struct InputPlan {
    pub directories: Vec<RelPath>,
    pub files: Vec<(RelPath, CacheKey)>,
    pub symlinks: Vec<(RelPath, String)>,
}

impl InputPlan {
    /// Nothing to create: the input root is the empty directory.
    pub fn is_empty(&self) -> bool {
        self.directories.is_empty() && self.files.is_empty() && self.symlinks.is_empty()
    }

    /// Distinct cache blobs the plan links.
    pub fn blobs(&self) -> Vec<CacheKey> {
        let mut seen = HashSet::new();
        self.files
            .iter()
            .filter(|(_, k)| seen.insert(k.clone()))
            .map(|(_, k)| k.clone())
            .collect()
    }
}

/// A validated input tree: every Directory reachable from the root.
pub struct InputTree {
    function: DigestFunction,
    root: BlobKey,
    dirs: HashMap<BlobKey, Arc<Directory>>,
}

/// What a path inside the input tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Directory,
    File,
    Symlink,
    /// Not in the tree.
    Absent,
}

impl InputTree {
    /// Fetches (from `cache`, else the CAS, level by level in batches) and
    /// validates the tree under `root`.
    pub async fn fetch(
        cas: &InstanceCas,
        cache: &DirectoryCache,
        root: BlobKey,
        allow_absolute_symlinks: bool,
        max_nodes: u64,
    ) -> WorkerResult<InputTree> {
        let function = cas.function();
        let mut dirs: HashMap<BlobKey, Arc<Directory>> = HashMap::new();
        let mut level = vec![root.clone()];
        let mut depth = 0usize;
        while !level.is_empty() {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(WorkerError::invalid(format!(
                    "the input root is deeper than {MAX_DEPTH} directories"
                )));
            }
            let mut to_fetch = Vec::new();
            for k in &level {
                if dirs.contains_key(k) {
                    continue;
                }
                if let Some(d) = cache.get(k) {
                    dirs.insert(k.clone(), d);
                } else if k.is_empty_blob() {
                    dirs.insert(k.clone(), Arc::new(Directory::default()));
                } else {
                    to_fetch.push(k.clone());
                }
            }
            to_fetch.sort();
            to_fetch.dedup();
            let mut missing = Vec::new();
            let (small, large): (Vec<BlobKey>, Vec<BlobKey>) =
                to_fetch.into_iter().partition(|k| cas.fits_batch(k.size()));
            let mut fetched: Vec<(BlobKey, bytes::Bytes)> = Vec::new();
            for batch in cas.batches(small.iter()) {
                for (k, b) in cas.batch_read(&batch).await? {
                    match b {
                        BatchBlob::Found(data) => fetched.push((k, data)),
                        BatchBlob::Missing => missing.push(k),
                    }
                }
            }
            for k in large {
                match cas.read_blob(&k).await {
                    Ok(data) => fetched.push((k, data)),
                    Err(WorkerError::MissingBlobs(m)) => missing.extend(m),
                    Err(e) => return Err(e),
                }
            }
            if !missing.is_empty() {
                return Err(WorkerError::MissingBlobs(missing));
            }
            for (k, data) in fetched {
                let d = Directory::decode(data.as_ref()).map_err(|e| {
                    WorkerError::invalid(format!("input directory {k} is not a Directory message: {e}"))
                })?;
                validate_directory(&d, function, allow_absolute_symlinks, &k)?;
                let d = Arc::new(d);
                cache.insert(k.clone(), d.clone());
                dirs.insert(k, d);
            }
            let mut next = Vec::new();
            for k in &level {
                if let Some(d) = dirs.get(k) {
                    for sub in &d.directories {
                        // Validated above: the digest parses.
                        let sk = BlobKey::from_opt_digest(function, sub.digest.as_ref())?;
                        if !dirs.contains_key(&sk) {
                            next.push(sk);
                        }
                    }
                }
            }
            next.sort();
            next.dedup();
            level = next;
        }
        let tree = InputTree { function, root, dirs };
        let nodes = tree.count_nodes()?;
        if nodes > max_nodes {
            return Err(WorkerError::invalid(format!(
                "the input root expands to {nodes} files and directories, more than the limit of {max_nodes}"
            )));
        }
        Ok(tree)
    }

    fn dir(&self, k: &BlobKey) -> WorkerResult<&Directory> {
        self.dirs
            .get(k)
            .map(|d| d.as_ref())
            .ok_or_else(|| WorkerError::Internal(format!("directory {k} was not fetched")))
    }

    /// Number of nodes the tree expands to (a DAG may repeat subtrees).
    fn count_nodes(&self) -> WorkerResult<u64> {
        // Children before parents: repeat until every directory is known.
        let mut counts: HashMap<&BlobKey, u64> = HashMap::new();
        let mut pending: Vec<&BlobKey> = self.dirs.keys().collect();
        while !pending.is_empty() {
            let before = pending.len();
            let mut still = Vec::new();
            for k in pending {
                let d = self.dir(k)?;
                let mut total = (d.files.len() + d.symlinks.len()) as u64;
                let mut ready = true;
                for sub in &d.directories {
                    let sk = BlobKey::from_opt_digest(self.function, sub.digest.as_ref())?;
                    match self.dirs.get_key_value(&sk).and_then(|(kk, _)| counts.get(kk)) {
                        Some(c) => total = total.saturating_add(1).saturating_add(*c),
                        None => {
                            ready = false;
                            break;
                        }
                    }
                }
                if ready {
                    counts.insert(k, total);
                } else {
                    still.push(k);
                }
            }
            if still.len() == before {
                return Err(WorkerError::Internal("input tree has a cycle".into()));
            }
            pending = still;
        }
        Ok(counts.get(&self.root).copied().unwrap_or(0))
    }

    /// The flattened list of what to create.
    pub fn plan(&self) -> WorkerResult<InputPlan> {
        let mut plan = InputPlan::default();
        let mut stack = vec![(RelPath::root(), self.root.clone())];
        while let Some((path, k)) = stack.pop() {
            let d = self.dir(&k)?;
            for f in &d.files {
                let key = BlobKey::from_opt_digest(self.function, f.digest.as_ref())?;
                plan.files
                    .push((path.child(&f.name), CacheKey::new(key, f.is_executable)));
            }
            for s in &d.symlinks {
                plan.symlinks.push((path.child(&s.name), s.target.clone()));
            }
            for sub in &d.directories {
                let sk = BlobKey::from_opt_digest(self.function, sub.digest.as_ref())?;
                let p = path.child(&sub.name);
                plan.directories.push(p.clone());
                stack.push((p, sk));
            }
        }
        Ok(plan)
    }

    /// What `path` is in the tree, walking names from the root. A path
    /// below a file or symlink is reported as that file or symlink.
    pub fn kind_of(&self, path: &RelPath) -> WorkerResult<(NodeKind, RelPath)> {
        let mut cur = self.dir(&self.root)?;
        let mut walked = RelPath::root();
        for c in path.components() {
            walked = walked.child(c);
            if let Some(sub) = cur.directories.iter().find(|d| &d.name == c) {
                let sk = BlobKey::from_opt_digest(self.function, sub.digest.as_ref())?;
                cur = self.dir(&sk)?;
            } else if cur.files.iter().any(|f| &f.name == c) {
                return Ok((NodeKind::File, walked));
            } else if cur.symlinks.iter().any(|s| &s.name == c) {
                return Ok((NodeKind::Symlink, walked));
            } else {
                return Ok((NodeKind::Absent, walked));
            }
        }
        Ok((NodeKind::Directory, walked))
    }
}

/// Checks one Directory's entries.
fn validate_directory(
    d: &Directory,
    function: DigestFunction,
    allow_absolute: bool,
    key: &BlobKey,
) -> WorkerResult<()> {
    let mut names: HashSet<&str> = HashSet::new();
    let entries = d
        .files
        .iter()
        .map(|f| (f.name.as_str(), "a file"))
        .chain(d.directories.iter().map(|x| (x.name.as_str(), "a directory")))
        .chain(d.symlinks.iter().map(|x| (x.name.as_str(), "a symlink")));
    for (name, what) in entries {
        check_name(name, &format!("{what} in input directory {key}"))?;
        if !names.insert(name) {
            return Err(WorkerError::invalid(format!(
                "input directory {key} has two entries named {name:?}"
            )));
        }
    }
    for f in &d.files {
        BlobKey::from_opt_digest(function, f.digest.as_ref())
            .map_err(|e| WorkerError::invalid(format!("file {:?} in input directory {key}: {e}", f.name)))?;
    }
    for sub in &d.directories {
        BlobKey::from_opt_digest(function, sub.digest.as_ref()).map_err(|e| {
            WorkerError::invalid(format!("directory {:?} in input directory {key}: {e}", sub.name))
        })?;
    }
    for s in &d.symlinks {
        check_symlink_target(
            &s.target,
            allow_absolute,
            &format!("symlink {:?} in input directory {key}", s.name),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    fn key(data: &[u8]) -> BlobKey {
        BlobKey::of(DigestFunction::Sha256, data)
    }

    fn file(name: &str) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(key(b"x").to_digest()),
            ..Default::default()
        }
    }

    #[test]
    fn rejects_bad_entries() {
        let k = key(b"dir");
        let f = DigestFunction::Sha256;
        for name in ["..", ".", "", "a/b"] {
            let d = Directory {
                files: vec![file(name)],
                ..Default::default()
            };
            assert!(validate_directory(&d, f, true, &k).is_err(), "{name:?}");
        }
        let dup = Directory {
            files: vec![file("a")],
            directories: vec![DirectoryNode {
                name: "a".into(),
                digest: Some(key(b"").to_digest()),
            }],
            ..Default::default()
        };
        assert!(validate_directory(&dup, f, true, &k).is_err());
        let abs = Directory {
            symlinks: vec![SymlinkNode {
                name: "l".into(),
                target: "/etc/passwd".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(validate_directory(&abs, f, true, &k).is_ok());
        assert!(validate_directory(&abs, f, false, &k).is_err());
        let bad_digest = Directory {
            files: vec![FileNode {
                name: "a".into(),
                digest: None,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(validate_directory(&bad_digest, f, true, &k).is_err());
    }
}
