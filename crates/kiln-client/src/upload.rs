//! Uploading blobs: FindMissingBlobs first, then BatchUpdateBlobs for the
//! small missing blobs (batched under the server's limit) and ByteStream
//! Write for the large ones, [`CONCURRENCY`] requests at a time.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kiln_digest::{BlobKey, DigestFunction};

use crate::error::{ClientError, ClientResult};
use crate::format::digest_str;
use crate::progress;
use crate::remote::{CONCURRENCY, Remote};
use crate::tree::{BlobSource, LocalTree, build_tree, hash_file};

/// What an upload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Distinct blobs considered.
    pub blobs: u64,
    /// Blobs the server lacked and that were uploaded.
    pub uploaded: u64,
    /// Bytes of the uploaded blobs.
    pub uploaded_bytes: u64,
}

/// Uploads every blob the server does not have yet.
pub async fn upload_blobs(
    remote: &Remote,
    blobs: Vec<(BlobKey, BlobSource)>,
    show_progress: bool,
) -> ClientResult<UploadStats> {
    let mut unique: HashMap<BlobKey, BlobSource> = HashMap::with_capacity(blobs.len());
    for (k, s) in blobs {
        unique.entry(k).or_insert(s);
    }
    let keys: Vec<BlobKey> = unique.keys().cloned().collect();
    let missing = remote.find_missing(&keys).await?;
    let stats = UploadStats {
        blobs: keys.len() as u64,
        uploaded: missing.len() as u64,
        uploaded_bytes: missing.iter().map(BlobKey::size).sum(),
    };
    if missing.is_empty() {
        return Ok(stats);
    }
    let bar = progress::bytes_bar(show_progress, stats.uploaded_bytes, "uploading");
    let mut small = Vec::new();
    let mut large = Vec::new();
    for key in missing {
        let Some(source) = unique.remove(&key) else {
            continue;
        };
        if remote.fits_batch(key.size()).await? {
            small.push((key, source));
        } else {
            large.push((key, source));
        }
    }
    let mut jobs: Vec<BoxFuture<'_, ClientResult<()>>> = Vec::new();
    for batch in remote.batches(small).await? {
        let bar = bar.clone();
        jobs.push(
            async move {
                let size: u64 = batch.iter().map(|(k, _)| k.size()).sum();
                let mut loaded = Vec::with_capacity(batch.len());
                for (key, source) in batch {
                    let data = load(&key, source).await?;
                    loaded.push((key, data));
                }
                remote.batch_update(loaded).await?;
                bar.inc(size);
                Ok(())
            }
            .boxed(),
        );
    }
    for (key, source) in large {
        let bar = bar.clone();
        jobs.push(
            async move {
                match source {
                    BlobSource::Bytes(b) => remote.write_bytes(&key, b, &bar).await,
                    BlobSource::File(p) => remote.write_file(&key, &p, &bar).await,
                }
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
    Ok(stats)
}

/// The content of a small blob, checked against its digest.
async fn load(key: &BlobKey, source: BlobSource) -> ClientResult<Bytes> {
    match source {
        BlobSource::Bytes(b) => Ok(b),
        BlobSource::File(p) => {
            let data = tokio::fs::read(&p)
                .await
                .map_err(ClientError::io(format!("reading {}", p.display())))?;
            key.verify(&data).map_err(|_| {
                ClientError::Usage(format!("{} changed while it was being uploaded", p.display()))
            })?;
            Ok(Bytes::from(data))
        }
    }
}

/// Hashes and uploads one file; returns its digest.
pub async fn put_file(
    remote: &Remote,
    path: &Path,
    show_progress: bool,
) -> ClientResult<(BlobKey, UploadStats)> {
    let function = remote.function();
    let p = path.to_path_buf();
    let key = kiln_store::task::blocking("hash-file", move || hash_file(&p, function))
        .await
        .map_err(|e| ClientError::Internal(e.to_string()))??;
    let stats = upload_blobs(
        remote,
        vec![(key.clone(), BlobSource::File(path.to_path_buf()))],
        show_progress,
    )
    .await?;
    Ok((key, stats))
}

/// Hashes a directory into its Merkle tree (on the blocking pool).
pub async fn hash_tree(path: &Path, function: DigestFunction) -> ClientResult<LocalTree> {
    let p = path.to_path_buf();
    kiln_store::task::blocking("hash-tree", move || build_tree(&p, function))
        .await
        .map_err(|e| ClientError::Internal(e.to_string()))?
}

/// Hashes and uploads a whole directory tree; returns the root Directory
/// digest and the tree.
pub async fn put_tree(
    remote: &Remote,
    path: &Path,
    show_progress: bool,
) -> ClientResult<(LocalTree, UploadStats)> {
    let tree = hash_tree(path, remote.function()).await?;
    let stats = upload_blobs(remote, tree.blobs(), show_progress).await?;
    Ok((tree, stats))
}

/// Uploads in-memory messages (Command, Action) and returns their keys.
pub async fn put_messages(remote: &Remote, messages: Vec<Bytes>) -> ClientResult<Vec<BlobKey>> {
    let mut keys = Vec::with_capacity(messages.len());
    let mut blobs = Vec::with_capacity(messages.len());
    for m in messages {
        let key = BlobKey::of(remote.function(), &m);
        keys.push(key.clone());
        blobs.push((key, BlobSource::Bytes(m)));
    }
    upload_blobs(remote, blobs, false).await.map_err(|e| match e {
        ClientError::Rpc { context, status } => ClientError::Rpc {
            context: format!(
                "uploading {} ({context})",
                keys.iter().map(digest_str).collect::<Vec<_>>().join(", ")
            ),
            status,
        },
        other => other,
    })?;
    Ok(keys)
}
