//! Downloading: a blob to a file or stdout, and a Directory tree (from
//! GetTree, a Tree message, or Directory blobs read one level at a time)
//! into a local directory with executable bits and symlinks restored.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::{Directory, GetTreeRequest, Tree};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tonic::Code;

use crate::console::Console;
use crate::error::{ClientError, ClientResult};
use crate::format::{digest_str, server_digest};
use crate::progress;
use crate::remote::{CONCURRENCY, Remote};

/// Most nodes (files, directories, symlinks) one download materialises:
/// a Directory DAG can expand exponentially.
pub const MAX_NODES: usize = 2_000_000;

/// Streams a blob to the console's stdout, verifying it; a corrupt blob
/// is reported after its bytes were written.
pub async fn blob_to_stdout(remote: &Remote, key: &BlobKey, console: &mut Console) -> ClientResult<()> {
    if key.is_empty_blob() {
        return Ok(());
    }
    let mut reader = remote.open_read(key).await?;
    while let Some(chunk) = reader.next_chunk().await? {
        console.out_bytes(&chunk).await?;
    }
    Ok(())
}

/// Downloads a blob into `path` (replacing it): written to a temporary
/// file next to it and renamed once verified.
pub async fn blob_to_file(
    remote: &Remote,
    key: &BlobKey,
    path: &Path,
    show_progress: bool,
) -> ClientResult<()> {
    let tmp = temp_sibling(path);
    let result = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(ClientError::io(format!("creating {}", tmp.display())))?;
        if !key.is_empty_blob() {
            let bar = progress::bytes_bar(show_progress, key.size(), "downloading");
            let mut reader = remote.open_read(key).await?;
            while let Some(chunk) = reader.next_chunk().await? {
                file.write_all(&chunk)
                    .await
                    .map_err(ClientError::io(format!("writing {}", tmp.display())))?;
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
        }
        file.flush()
            .await
            .map_err(ClientError::io(format!("writing {}", tmp.display())))?;
        drop(file);
        tokio::fs::rename(&tmp, path)
            .await
            .map_err(ClientError::io(format!(
                "renaming {} to {}",
                tmp.display(),
                path.display()
            )))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "blob".into());
    path.with_file_name(format!(".{name}.kiln-{}.tmp", uuid::Uuid::new_v4()))
}

/// Decodes a Directory message, naming `key` on failure.
fn decode_directory(key: &BlobKey, data: Bytes) -> ClientResult<Directory> {
    Directory::decode(data).map_err(|e| {
        ClientError::Usage(format!(
            "blob {} is not a Directory message: {e}",
            digest_str(key)
        ))
    })
}

/// Every Directory reachable from `root`, by digest: GetTree first, then
/// any Directory it did not return (or all of them, when the server has
/// no GetTree) read as blobs, one level at a time.
pub async fn fetch_directories(remote: &Remote, root: &BlobKey) -> ClientResult<HashMap<BlobKey, Directory>> {
    let function = remote.function();
    let mut dirs = HashMap::new();
    let not_found = format!("directory {} not found", digest_str(root));
    match remote
        .cas_client()
        .get_tree(GetTreeRequest {
            instance_name: remote.instance().to_string(),
            root_digest: Some(root.to_digest()),
            page_size: 0,
            page_token: String::new(),
            digest_function: function.to_proto() as i32,
        })
        .await
    {
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(page)) => {
                        for d in page.directories {
                            let key = BlobKey::of(function, &d.encode_to_vec());
                            dirs.insert(key, d);
                        }
                    }
                    Ok(None) => break,
                    Err(s) if s.code() == Code::NotFound && dirs.is_empty() => {
                        return Err(ClientError::NotFound(not_found));
                    }
                    // A broken stream: whatever is missing is read below.
                    Err(s) if s.code() == Code::NotFound => break,
                    Err(s) => return Err(ClientError::rpc(format!("GetTree of {}", digest_str(root)))(s)),
                }
            }
        }
        Err(s) if s.code() == Code::Unimplemented => {}
        Err(s) => {
            return Err(ClientError::rpc_or_not_found(
                format!("GetTree of {}", digest_str(root)),
                not_found,
            )(s));
        }
    }
    complete_directories(remote, root, &mut dirs).await?;
    Ok(dirs)
}

/// Reads every Directory reachable from `root` that `dirs` lacks.
pub async fn complete_directories(
    remote: &Remote,
    root: &BlobKey,
    dirs: &mut HashMap<BlobKey, Directory>,
) -> ClientResult<()> {
    let function = remote.function();
    let mut level = vec![root.clone()];
    let mut seen = std::collections::HashSet::new();
    while !level.is_empty() {
        if seen.len() > MAX_NODES {
            return Err(ClientError::Usage(format!(
                "the tree {} has more than {MAX_NODES} directories",
                digest_str(root)
            )));
        }
        let absent: Vec<BlobKey> = level.iter().filter(|k| !dirs.contains_key(*k)).cloned().collect();
        if !absent.is_empty() {
            let fetched = read_many(remote, absent.clone()).await?;
            for key in absent {
                let Some(data) = fetched.get(&key) else {
                    return Err(ClientError::NotFound(format!(
                        "directory {} not found",
                        digest_str(&key)
                    )));
                };
                dirs.insert(key.clone(), decode_directory(&key, data.clone())?);
            }
        }
        let mut next = Vec::new();
        for key in &level {
            if let Some(d) = dirs.get(key) {
                for child in &d.directories {
                    let k = server_digest(child.digest.as_ref(), function, "a directory entry")?;
                    if seen.insert(k.clone()) {
                        next.push(k);
                    }
                }
            }
        }
        level = next;
    }
    Ok(())
}

/// Blobs read by one request.
type Blobs = Vec<(BlobKey, Bytes)>;

/// Reads many blobs (small ones in batches, large ones with ByteStream,
/// several requests at once). Missing blobs are absent from the result.
pub async fn read_many(remote: &Remote, keys: Vec<BlobKey>) -> ClientResult<HashMap<BlobKey, Bytes>> {
    let mut small = Vec::new();
    let mut jobs: Vec<BoxFuture<'_, ClientResult<Blobs>>> = Vec::new();
    for k in keys {
        if remote.fits_batch(k.size()).await? {
            small.push((k, ()));
        } else {
            jobs.push(
                async move {
                    match remote.read_blob(&k).await {
                        Ok(b) => Ok(vec![(k, b)]),
                        Err(ClientError::NotFound(_)) => Ok(Vec::new()),
                        Err(e) => Err(e),
                    }
                }
                .boxed(),
            );
        }
    }
    for batch in remote.batches(small).await? {
        jobs.push(
            async move {
                let keys: Vec<BlobKey> = batch.into_iter().map(|(k, _)| k).collect();
                Ok(remote.batch_read(&keys).await?.into_iter().collect())
            }
            .boxed(),
        );
    }
    let mut out = HashMap::new();
    let mut results = futures::stream::iter(jobs).buffer_unordered(CONCURRENCY);
    while let Some(r) = results.next().await {
        out.extend(r?);
    }
    Ok(out)
}

/// The Directory messages of a Tree (root and children), by digest.
pub fn tree_directories(
    tree: Tree,
    function: DigestFunction,
) -> ClientResult<(Directory, HashMap<BlobKey, Directory>)> {
    let root = tree
        .root
        .ok_or_else(|| ClientError::BadResponse("the server sent a Tree without a root".into()))?;
    let children = tree
        .children
        .into_iter()
        .map(|d| (BlobKey::of(function, &d.encode_to_vec()), d))
        .collect();
    Ok((root, children))
}

/// One file to write.
#[derive(Debug, Clone)]
pub struct PlannedFile {
    pub path: PathBuf,
    pub key: BlobKey,
    pub executable: bool,
}

/// Everything a tree expands to, with paths relative to its root, parents
/// before children.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub dirs: Vec<PathBuf>,
    pub files: Vec<PlannedFile>,
    pub symlinks: Vec<(PathBuf, String)>,
}

/// Checks that a name from the server is one path component.
pub fn check_name(name: &str) -> ClientResult<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(ClientError::BadResponse(format!(
            "the server sent the invalid file name {name:?}"
        )));
    }
    Ok(())
}

/// Expands `root` (whose sub-directories are in `dirs`) into a [`Plan`].
pub fn plan_tree(
    root: &Directory,
    dirs: &HashMap<BlobKey, Directory>,
    function: DigestFunction,
) -> ClientResult<Plan> {
    let mut plan = Plan::default();
    let mut stack: Vec<(&Directory, PathBuf)> = vec![(root, PathBuf::new())];
    let mut nodes = 0usize;
    while let Some((dir, rel)) = stack.pop() {
        nodes += dir.files.len() + dir.directories.len() + dir.symlinks.len();
        if nodes > MAX_NODES {
            return Err(ClientError::Usage(format!(
                "the tree has more than {MAX_NODES} entries"
            )));
        }
        for f in &dir.files {
            check_name(&f.name)?;
            plan.files.push(PlannedFile {
                path: rel.join(&f.name),
                key: server_digest(f.digest.as_ref(), function, "a file entry")?,
                executable: f.is_executable,
            });
        }
        for s in &dir.symlinks {
            check_name(&s.name)?;
            plan.symlinks.push((rel.join(&s.name), s.target.clone()));
        }
        for d in &dir.directories {
            check_name(&d.name)?;
            let key = server_digest(d.digest.as_ref(), function, "a directory entry")?;
            let child = dirs.get(&key).ok_or_else(|| {
                ClientError::BadResponse(format!("directory {} is missing from the tree", digest_str(&key)))
            })?;
            let path = rel.join(&d.name);
            plan.dirs.push(path.clone());
            stack.push((child, path));
        }
    }
    Ok(plan)
}

/// Mode of a restored file.
pub fn file_mode(executable: bool) -> u32 {
    if executable { 0o755 } else { 0o644 }
}

/// Writes a [`Plan`] under `dest` (which must exist): directories, then
/// files (each distinct blob downloaded once), then symlinks.
pub async fn materialize(remote: &Remote, plan: &Plan, dest: &Path, show_progress: bool) -> ClientResult<()> {
    for d in &plan.dirs {
        let p = dest.join(d);
        tokio::fs::create_dir(&p)
            .await
            .map_err(ClientError::io(format!("creating {}", p.display())))?;
    }
    let mut by_key: HashMap<BlobKey, Vec<(PathBuf, bool)>> = HashMap::new();
    for f in &plan.files {
        by_key
            .entry(f.key.clone())
            .or_default()
            .push((dest.join(&f.path), f.executable));
    }
    let total: u64 = by_key.keys().map(BlobKey::size).sum();
    let bar = progress::bytes_bar(show_progress, total, "downloading");
    let mut small = Vec::new();
    let mut jobs: Vec<BoxFuture<'_, ClientResult<()>>> = Vec::new();
    for (key, targets) in by_key {
        if remote.fits_batch(key.size()).await? {
            small.push((key, targets));
            continue;
        }
        let bar = bar.clone();
        jobs.push(
            async move {
                let (first, rest) = targets
                    .split_first()
                    .ok_or_else(|| ClientError::Internal("no target".into()))?;
                blob_to_file(remote, &key, &first.0, false).await?;
                set_mode(&first.0, first.1).await?;
                for (path, exec) in rest {
                    tokio::fs::copy(&first.0, path)
                        .await
                        .map_err(ClientError::io(format!(
                            "copying {} to {}",
                            first.0.display(),
                            path.display()
                        )))?;
                    set_mode(path, *exec).await?;
                }
                bar.inc(key.size());
                Ok(())
            }
            .boxed(),
        );
    }
    for batch in remote.batches(small).await? {
        let bar = bar.clone();
        jobs.push(
            async move {
                let keys: Vec<BlobKey> = batch.iter().map(|(k, _)| k.clone()).collect();
                let mut got = if keys.iter().all(BlobKey::is_empty_blob) {
                    HashMap::new()
                } else {
                    remote.batch_read(&keys).await?
                };
                for (key, targets) in batch {
                    let data = if key.is_empty_blob() {
                        Bytes::new()
                    } else {
                        got.remove(&key).ok_or_else(|| {
                            ClientError::NotFound(format!("blob {} not found", digest_str(&key)))
                        })?
                    };
                    for (path, exec) in &targets {
                        write_file(path, &data, *exec).await?;
                    }
                    bar.inc(key.size());
                }
                Ok(())
            }
            .boxed(),
        );
    }
    let mut results = futures::stream::iter(jobs).buffer_unordered(CONCURRENCY);
    while let Some(r) = results.next().await {
        if let Err(e) = r {
            bar.abandon();
            return Err(e);
        }
    }
    bar.finish_and_clear();
    for (path, target) in &plan.symlinks {
        let p = dest.join(path);
        tokio::fs::symlink(target, &p)
            .await
            .map_err(ClientError::io(format!("creating the symlink {}", p.display())))?;
    }
    Ok(())
}

/// Writes `data` to `path` with the mode for `executable`.
pub async fn write_file(path: &Path, data: &[u8], executable: bool) -> ClientResult<()> {
    tokio::fs::write(path, data)
        .await
        .map_err(ClientError::io(format!("writing {}", path.display())))?;
    set_mode(path, executable).await
}

/// Sets the mode of a restored file (0755 or 0644).
pub async fn set_mode(path: &Path, executable: bool) -> ClientResult<()> {
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(file_mode(executable)))
        .await
        .map_err(ClientError::io(format!("setting the mode of {}", path.display())))
}

/// Removes whatever is at `path` (a file, a symlink or a whole directory);
/// nothing there is fine.
pub async fn clear_path(path: &Path) -> ClientResult<()> {
    match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(path)
            .await
            .map_err(ClientError::io(format!("removing {}", path.display()))),
        Ok(_) => tokio::fs::remove_file(path)
            .await
            .map_err(ClientError::io(format!("removing {}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ClientError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// A relative path from the server or the user, checked to stay inside
/// its base: no absolute path, no `..`, `.` components dropped.
pub fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(safe_relative("a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(safe_relative("./a//b/"), Some(PathBuf::from("a/b")));
        assert_eq!(safe_relative("../a"), None);
        assert_eq!(safe_relative("a/../../b"), None);
        assert_eq!(safe_relative("/etc/passwd"), None);
        assert_eq!(safe_relative(""), Some(PathBuf::new()));
    }

    #[test]
    fn names_are_single_components() {
        assert!(check_name("ok.txt").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
