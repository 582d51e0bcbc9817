//! Uploading outputs: one FindMissingBlobs over everything, then the
//! missing blobs with BatchUpdateBlobs (small ones, batched) or ByteStream
//! Write (large ones, streamed from disk), concurrently.

use std::collections::HashSet;

use bytes::Bytes;
use futures::StreamExt;
use kiln_digest::BlobKey;

use crate::cas::InstanceCas;
use crate::error::{WorkerError, WorkerResult};
use crate::outputs::Upload;

/// Makes sure the CAS holds every blob of `uploads`.
pub async fn upload_all(cas: &InstanceCas, uploads: Vec<Upload>, concurrency: usize) -> WorkerResult<()> {
    let mut seen = HashSet::new();
    let uploads: Vec<Upload> = uploads
        .into_iter()
        .filter(|u| !u.key().is_empty_blob() && seen.insert(u.key().clone()))
        .collect();
    if uploads.is_empty() {
        return Ok(());
    }
    let keys: Vec<BlobKey> = uploads.iter().map(|u| u.key().clone()).collect();
    let missing: HashSet<BlobKey> = cas.find_missing(&keys).await?.into_iter().collect();
    let (small, large): (Vec<Upload>, Vec<Upload>) = uploads
        .into_iter()
        .filter(|u| missing.contains(u.key()))
        .partition(|u| cas.fits_batch(u.key().size()));

    let mut jobs: Vec<futures::future::BoxFuture<'_, WorkerResult<()>>> = Vec::new();
    // Small blobs: group into batches; files are read at upload time.
    let mut group: Vec<Upload> = Vec::new();
    let mut group_size = 0u64;
    let mut groups = Vec::new();
    for u in small {
        let size = u.key().size() + 160;
        if !group.is_empty() && group_size + size > cas.max_batch() {
            groups.push(std::mem::take(&mut group));
            group_size = 0;
        }
        group_size += size;
        group.push(u);
    }
    if !group.is_empty() {
        groups.push(group);
    }
    for g in groups {
        jobs.push(Box::pin(async move {
            let mut blobs = Vec::with_capacity(g.len());
            for u in g {
                match u {
                    Upload::Bytes(k, b) => blobs.push((k, b)),
                    Upload::File(k, path) => {
                        let data = tokio::fs::read(&path)
                            .await
                            .map_err(WorkerError::io(format!("reading output {}", path.display())))?;
                        blobs.push((k, Bytes::from(data)));
                    }
                    Upload::Open(k, file) => {
                        let data = kiln_store::task::blocking("read-stdio", move || {
                            use std::io::{Read, Seek};
                            let mut data = Vec::new();
                            let mut f: &std::fs::File = &file;
                            f.seek(std::io::SeekFrom::Start(0))?;
                            f.read_to_end(&mut data).map(|_| data)
                        })
                        .await?
                        .map_err(WorkerError::io("reading the action's output"))?;
                        blobs.push((k, Bytes::from(data)));
                    }
                }
            }
            cas.batch_update(blobs).await
        }));
    }
    for u in large {
        jobs.push(Box::pin(async move {
            match u {
                Upload::Bytes(k, b) => cas.write_bytes(&k, b).await,
                Upload::File(k, path) => cas.write_file(&k, &path).await,
                Upload::Open(k, file) => {
                    let dup = std::io::Seek::seek(&mut &*file, std::io::SeekFrom::Start(0))
                        .and_then(|_| file.try_clone())
                        .map_err(WorkerError::io("reopening the action's output"))?;
                    cas.write_open_file(&k, tokio::fs::File::from_std(dup)).await
                }
            }
        }));
    }
    let mut results = futures::stream::iter(jobs).buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}
