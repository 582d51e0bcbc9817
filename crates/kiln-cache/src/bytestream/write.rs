//! ByteStream.Write: streams an upload into a store writer, hashing as the
//! data arrives, and commits only once the digest verifies.
//!
//! Identity uploads are resumable: a stream that ends without
//! `finish_write` parks its writer and hasher in the upload table, and the
//! next stream continues at `committed_size`. Compressed (zstd) uploads are
//! stored exactly as the client sent them (no recompression) while a
//! streaming decoder feeds the hasher; they cannot be resumed (the spec's
//! offsets mix compressed and uncompressed units), so an interrupted one
//! reports `committed_size` 0 and starts over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_digest::{BlobKey, Hasher};
use kiln_proto::bytestream::WriteResponse;
use kiln_proto::fast::WriteRequest;
use kiln_store::{BlobWriter, Encoding};
use tonic::{Status, Streaming};

use super::digest::{Digester, Pipeline, too_much};
use super::resource::{self, Compressor};
use super::uploads::{ActiveUpload, PartialUpload, Uploads};
use crate::{CacheCounters, CacheError, CacheResult, Instance, Instances};

/// How often a long upload re-checks whether its blob appeared meanwhile
/// (another client finished the same upload), to return early.
const EXISTENCE_RECHECK: Duration = Duration::from_secs(1);

/// Handles one Write stream.
pub async fn write(
    instances: &Instances,
    uploads: &Arc<Uploads>,
    mut stream: Streaming<WriteRequest>,
) -> Result<WriteResponse, Status> {
    let Some(first) = stream.message().await? else {
        return Err(CacheError::InvalidArgument("Write stream ended before its first request".into()).into());
    };
    let name = first.resource_name.clone();
    let res = resource::parse_write(&name)?;
    let instance = instances.get(res.instance)?.clone();
    instance.check_function(res.key.function())?;
    let key = res.key;
    let compressor = res.compressor;

    let max = instances.limits().max_cas_blob_size_bytes;
    if max > 0 && key.size() > max {
        return Err(CacheError::InvalidArgument(format!(
            "blob {key} is larger than this server's max_cas_blob_size_bytes ({max})"
        ))
        .into());
    }
    if first.write_offset < 0 {
        return Err(
            CacheError::InvalidArgument(format!("write_offset {} is negative", first.write_offset)).into(),
        );
    }
    // Spec: an upload of a blob that already exists ends at once, with
    // committed_size = size (identity) or -1 (compressed).
    let early = WriteResponse {
        committed_size: match compressor {
            Compressor::Identity => key.size() as i64,
            Compressor::Zstd => -1,
        },
    };
    if exists(&instance, &key).await? {
        uploads.forget(&name);
        return Ok(early);
    }

    let (partial, active) = uploads.begin(&name)?;
    let mut upload = match Upload::start(&instance, &key, compressor, partial, first.write_offset).await {
        Ok(u) => u,
        Err(Restart::Refused(partial, e)) => {
            active.pause(partial);
            return Err(e.into());
        }
        Err(Restart::Failed(e)) => return Err(e.into()),
    };
    active.set_progress(upload.committed);

    let mut msg = first;
    let mut last_check = Instant::now();
    loop {
        if !msg.resource_name.is_empty() && msg.resource_name != name {
            return Err(CacheError::InvalidArgument(format!(
                "resource_name changed within a Write stream: {:?} after {name:?}",
                msg.resource_name
            ))
            .into());
        }
        if msg.write_offset != upload.committed as i64 {
            return Err(CacheError::InvalidArgument(format!(
                "write_offset {} does not match the {} bytes committed so far",
                msg.write_offset, upload.committed
            ))
            .into());
        }
        if !msg.data.is_empty() {
            let data = std::mem::take(&mut msg.data);
            upload.ingest(&key, data).await?;
            if compressor == Compressor::Identity {
                // Compressed uploads cannot resume, so they report 0 throughout.
                active.set_progress(upload.committed);
            }
        }
        if msg.finish_write {
            return upload
                .finish(&key, active, instance.counters())
                .await
                .map_err(Status::from);
        }
        if last_check.elapsed() >= EXISTENCE_RECHECK {
            last_check = Instant::now();
            if exists(&instance, &key).await? {
                // Dropping the upload and the claim discards the partial data.
                return Ok(early);
            }
        }
        match stream.message().await {
            Ok(Some(next)) => msg = next,
            Ok(None) => {
                // Closed without finish_write: keep what we have for a resume.
                let (committed, partial) = upload.into_partial().await;
                active.pause(partial);
                return Ok(WriteResponse {
                    committed_size: committed as i64,
                });
            }
            Err(status) => {
                let (_, partial) = upload.into_partial().await;
                active.pause(partial);
                return Err(status);
            }
        }
    }
}

/// Whether `key` is already stored (the empty blob always is).
async fn exists(instance: &Instance, key: &BlobKey) -> CacheResult<bool> {
    if key.is_empty_blob() {
        return Ok(true);
    }
    let found = instance
        .cas
        .has_many(std::slice::from_ref(key))
        .await
        .map_err(CacheError::store(format!("checking whether {key} exists")))?;
    Ok(found.first().copied().unwrap_or(false))
}

/// Why an upload could not start.
enum Restart {
    /// The offset does not fit the parked upload, which stays resumable.
    Refused(Option<Box<PartialUpload>>, CacheError),
    Failed(CacheError),
}

/// An upload in progress on this stream.
struct Upload {
    writer: Box<dyn BlobWriter>,
    digest: Pipeline,
    /// Bytes received in the client's units: plain bytes for identity
    /// uploads, compressed bytes for zstd uploads.
    committed: u64,
    compressor: Compressor,
}

impl Upload {
    async fn start(
        instance: &Instance,
        key: &BlobKey,
        compressor: Compressor,
        partial: Option<Box<PartialUpload>>,
        offset: i64,
    ) -> Result<Upload, Restart> {
        if let Some(p) = partial {
            if offset == p.committed as i64 {
                let p = *p;
                let digester = Digester::identity(key.clone(), p.hasher, p.committed);
                return Ok(Upload {
                    writer: p.writer,
                    digest: Pipeline::new(digester),
                    committed: p.committed,
                    compressor,
                });
            }
            if offset != 0 {
                let e = CacheError::InvalidArgument(format!(
                    "write_offset {offset} does not match committed_size {} of the interrupted upload; \
                     resume there or restart at 0",
                    p.committed
                ));
                return Err(Restart::Refused(Some(p), e));
            }
            // offset 0: start over; the partial is dropped here.
        } else if offset != 0 {
            let e = CacheError::InvalidArgument(match compressor {
                Compressor::Identity => {
                    format!("write_offset {offset} given but no upload of this resource is in progress")
                }
                Compressor::Zstd => {
                    format!("write_offset {offset}: compressed uploads cannot be resumed; restart at 0")
                }
            });
            return Err(Restart::Failed(e));
        }
        let (encoding, digester) = match compressor {
            Compressor::Identity => (
                Encoding::Identity,
                Digester::identity(key.clone(), Hasher::new(key.function(), key.size()), 0),
            ),
            Compressor::Zstd => (
                Encoding::Zstd,
                Digester::zstd(key.clone()).map_err(Restart::Failed)?,
            ),
        };
        let writer = instance
            .cas
            .begin_write(key, encoding)
            .await
            .map_err(|e| Restart::Failed(CacheError::store(format!("starting the write of {key}"))(e)))?;
        Ok(Upload {
            writer,
            digest: Pipeline::new(digester),
            committed: 0,
            compressor,
        })
    }

    /// Queues `data` for hashing (decoding it first for zstd uploads) and
    /// hands the same buffer to the store writer. Plain data beyond the
    /// declared size is refused before it is stored.
    async fn ingest(&mut self, key: &BlobKey, data: Bytes) -> CacheResult<()> {
        let len = data.len() as u64;
        if self.compressor == Compressor::Identity && self.committed + len > key.size() {
            return Err(too_much(key, self.committed + len));
        }
        self.digest.push(data.clone()).await?;
        self.writer
            .write(data)
            .await
            .map_err(CacheError::store(format!("writing {key}")))?;
        self.committed += len;
        Ok(())
    }

    /// Verifies the digest and commits; only then is the blob visible.
    async fn finish(
        self,
        key: &BlobKey,
        active: ActiveUpload,
        counters: &CacheCounters,
    ) -> CacheResult<WriteResponse> {
        self.digest.finish().await?.verify()?;
        self.writer
            .commit()
            .await
            .map_err(CacheError::store(format!("committing {key}")))?;
        let committed_size = self.committed as i64;
        active.complete(committed_size);
        counters.cas_written(1, self.committed);
        Ok(WriteResponse { committed_size })
    }

    /// What to park when the stream ends early: identity uploads keep their
    /// writer and hasher; compressed ones are dropped and report 0.
    async fn into_partial(self) -> (u64, Option<Box<PartialUpload>>) {
        if self.compressor == Compressor::Zstd {
            return (0, None);
        }
        match self.digest.finish().await {
            Ok(digester) => {
                let (hasher, plain) = digester.into_hasher();
                let partial = PartialUpload {
                    writer: self.writer,
                    hasher,
                    committed: plain,
                };
                (plain, Some(Box::new(partial)))
            }
            // The data could not be digested: nothing worth resuming.
            Err(_) => (0, None),
        }
    }
}
