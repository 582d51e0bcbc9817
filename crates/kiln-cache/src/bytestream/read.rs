//! ByteStream.Read: streams a CAS blob, plain or zstd-compressed.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_digest::BlobKey;
use kiln_proto::bytestream::ReadRequest;
use kiln_proto::fast::ReadResponse;
use kiln_store::{ChunkStream, codec};
use tonic::Status;

use super::resource::{self, Compressor};
use crate::{CacheCounters, CacheError, CacheResult, Instances};

/// Largest `data` of one ReadResponse. Large messages keep per-message
/// overhead low; 2 MiB stays well under the 4 MiB inbound limit that gRPC
/// clients (Bazel included) apply by default.
pub const READ_CHUNK_SIZE: usize = 2 << 20;

/// Validates the request and opens the blob. Errors before the first
/// message (bad name, bad offsets, missing blob) are returned here. Counts
/// the blob as found or missing, and the bytes as they are sent.
pub async fn open(instances: &Instances, req: &ReadRequest) -> CacheResult<ReadBody> {
    let counters = instances.counters();
    let opened = open_body(instances, req).await;
    match &opened {
        Ok(_) => counters.cas_lookups(1, 0),
        Err(CacheError::NotFound(_)) => counters.cas_lookups(0, 1),
        Err(_) => {}
    }
    let mut body = opened?;
    CacheCounters::add(&counters.cas_blobs_read, 1);
    body.counters = Some(counters.clone());
    Ok(body)
}

async fn open_body(instances: &Instances, req: &ReadRequest) -> CacheResult<ReadBody> {
    let res = resource::parse_read(&req.resource_name)?;
    let instance = instances.get(res.instance)?;
    instance.check_function(res.key.function())?;
    let key = res.key;
    if req.read_offset < 0 {
        return Err(CacheError::OutOfRange(format!(
            "read_offset {} is negative",
            req.read_offset
        )));
    }
    if req.read_limit < 0 {
        return Err(CacheError::InvalidArgument(format!(
            "read_limit {} is negative",
            req.read_limit
        )));
    }
    let offset = req.read_offset as u64;
    if offset > key.size() {
        return Err(CacheError::OutOfRange(format!(
            "read_offset {offset} is past the end of {key} ({} bytes)",
            key.size()
        )));
    }
    if res.compressor == Compressor::Zstd && req.read_limit != 0 {
        return Err(CacheError::InvalidArgument(format!(
            "read_limit must be 0 for compressed-blobs reads (got {})",
            req.read_limit
        )));
    }

    let remaining = key.size() - offset;
    let expect = match (res.compressor, req.read_limit as u64) {
        (Compressor::Zstd, _) => None,
        (Compressor::Identity, 0) => Some(remaining),
        (Compressor::Identity, limit) => Some(remaining.min(limit)),
    };

    if key.is_empty_blob() {
        let inner: ChunkStream = match res.compressor {
            Compressor::Identity => futures::stream::empty().boxed(),
            Compressor::Zstd => {
                let frame = codec::compress(&[], codec::DEFAULT_ZSTD_LEVEL)
                    .map_err(CacheError::store(format!("compressing empty blob {key}")))?;
                futures::stream::iter([Ok(frame)]).boxed()
            }
        };
        return Ok(ReadBody::new(inner, expect, key));
    }
    if expect == Some(0) {
        // Nothing to send, but a missing blob is still NOT_FOUND.
        let present = instance
            .cas
            .has_many(std::slice::from_ref(&key))
            .await
            .map_err(CacheError::store(format!("checking whether {key} exists")))?;
        if present.first() != Some(&true) {
            return Err(CacheError::NotFound(format!("blob {key} not found")));
        }
        return Ok(ReadBody::new(futures::stream::empty().boxed(), expect, key));
    }

    let read = instance
        .cas
        .read(&key, offset)
        .await
        .map_err(CacheError::store(format!("reading {key}")))?
        .ok_or_else(|| CacheError::NotFound(format!("blob {key} not found")))?;
    let inner = match res.compressor {
        Compressor::Identity => codec::identity_stream(read, offset),
        Compressor::Zstd => codec::zstd_stream(read, offset, codec::DEFAULT_ZSTD_LEVEL),
    };
    Ok(ReadBody::new(inner, expect, key))
}

/// The response stream: re-chunks store output into messages of at most
/// [`READ_CHUNK_SIZE`], stops at the read limit and reports a store that
/// ends early as an error instead of a silently short blob.
pub struct ReadBody {
    inner: Option<ChunkStream>,
    pending: Bytes,
    /// Bytes still owed to the client (identity reads); `None` = until the
    /// store's stream ends (compressed reads).
    remaining: Option<u64>,
    key: BlobKey,
    /// Where the bytes sent are counted.
    counters: Option<Arc<CacheCounters>>,
}

impl ReadBody {
    fn new(inner: ChunkStream, remaining: Option<u64>, key: BlobKey) -> Self {
        ReadBody {
            inner: Some(inner),
            pending: Bytes::new(),
            remaining,
            key,
            counters: None,
        }
    }

    fn fail(&mut self, e: CacheError) -> Poll<Option<Result<ReadResponse, Status>>> {
        self.inner = None;
        self.pending = Bytes::new();
        self.remaining = Some(0);
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Stream for ReadBody {
    type Item = Result<ReadResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.remaining == Some(0) {
                this.inner = None;
                this.pending = Bytes::new();
                return Poll::Ready(None);
            }
            if !this.pending.is_empty() {
                let mut n = this.pending.len().min(READ_CHUNK_SIZE);
                if let Some(r) = this.remaining.as_mut() {
                    n = n.min(usize::try_from(*r).unwrap_or(usize::MAX));
                    *r -= n as u64;
                }
                let data = this.pending.split_to(n);
                if let Some(c) = &this.counters {
                    CacheCounters::add(&c.cas_bytes_read, n as u64);
                }
                return Poll::Ready(Some(Ok(ReadResponse { data })));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(inner.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => {
                    let ctx = format!("streaming {}", this.key);
                    return this.fail(CacheError::store(ctx)(e));
                }
                None => {
                    this.inner = None;
                    if let Some(r) = this.remaining {
                        let e = CacheError::store(format!("streaming {}", this.key))(
                            kiln_store::StoreError::Internal(format!(
                                "the store's stream ended {r} bytes short"
                            )),
                        );
                        return this.fail(e);
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}
