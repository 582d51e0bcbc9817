//! The ContentAddressableStorage service: FindMissingBlobs,
//! BatchUpdateBlobs, BatchReadBlobs and GetTree (in [`crate::get_tree`]).
//!
//! All digests of one request use one digest function: the request's
//! `digest_function`, or when unset the one inferred from the first
//! digest's hash length (the spec's legacy rule). A digest that does not fit
//! that function is malformed.
//!
//! Batch semantics:
//! * The batch limit (`max_batch_total_size_bytes`) applies to the sum of the
//!   digests' `size_bytes` (uncompressed sizes, what clients count); a request
//!   over it fails as a whole with INVALID_ARGUMENT.
//! * Everything else is per blob: malformed digest, unsupported compressor,
//!   blob over `max_cas_blob_size_bytes`, content not matching the digest
//!   (INVALID_ARGUMENT), absent blob (NOT_FOUND), store faults.
//! * CPU work (hashing, zstd) over more than [`INLINE_CPU_BYTES`] runs on the
//!   blocking pool, split into one group per core.
//!
//! FindMissingBlobs, BatchUpdateBlobs and BatchReadBlobs use the zero-copy
//! messages of [`kiln_proto::fast`]: hashes and payloads are views of the
//! request buffer, parsed without allocating ([`crate::wire`]), and answers
//! echo the request's own digests.

use std::collections::HashSet;
use std::collections::hash_map::{Entry, HashMap};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::fast::cas::content_addressable_storage_server::ContentAddressableStorage;
use kiln_proto::fast::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, Digest,
    FindMissingBlobsRequest, FindMissingBlobsResponse, batch_read_blobs_response,
    batch_update_blobs_response,
};
use kiln_proto::reapi::compressor::Value as Compressor;
use kiln_proto::reapi::{
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
    RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse,
    SplitBlobRequest, SplitBlobResponse,
};
use kiln_store::{Blob, Encoding, codec};
use tonic::{Request, Response, Status};

use crate::error::ok_status;
use crate::wire::{check_utf8, parse_key, request_function};
use crate::{CacheError, CacheLimits, CacheResult, Instances};

/// Below this many bytes of CPU work (hashing, zstd) a batch is processed on
/// the request's task; above it, on the blocking pool in parallel.
pub(crate) const INLINE_CPU_BYTES: u64 = 256 * 1024;
/// Concurrent store operations per batch request.
pub(crate) const STORE_CONCURRENCY: usize = 64;

pub struct CasService {
    instances: Arc<Instances>,
}

impl CasService {
    pub fn new(instances: Arc<Instances>) -> Self {
        CasService { instances }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The sum of the (non-negative) sizes of `digests`, checked against the
/// batch limit.
fn check_batch_total(limits: &CacheLimits, sizes: impl Iterator<Item = i64>, what: &str) -> CacheResult<()> {
    let total: u64 = sizes.map(|s| s.max(0) as u64).fold(0u64, u64::saturating_add);
    let limit = limits.max_batch_total_size_bytes;
    if limit > 0 && total > limit {
        return Err(CacheError::InvalidArgument(format!(
            "{what} of {total} bytes exceeds the batch limit of {limit} bytes; use ByteStream"
        )));
    }
    Ok(())
}

fn available_cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Applies `f` to every item, preserving order. Small workloads (by total
/// `weight`) run inline; larger ones are split into contiguous groups of
/// similar weight, one per core, each on the blocking pool.
pub(crate) async fn cpu_map<T, R>(items: Vec<(u64, T)>, f: fn(T) -> R) -> CacheResult<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let total: u64 = items.iter().map(|(w, _)| *w).sum();
    if total < INLINE_CPU_BYTES || (items.len() <= 1 && total < 4 * INLINE_CPU_BYTES) {
        return Ok(items.into_iter().map(|(_, t)| f(t)).collect());
    }
    let groups = (total.div_ceil(INLINE_CPU_BYTES) as usize).clamp(1, available_cores());
    let target = total.div_ceil(groups as u64);
    let mut batches: Vec<Vec<T>> = Vec::with_capacity(groups);
    let mut current = Vec::new();
    let mut weight = 0u64;
    for (w, t) in items {
        current.push(t);
        weight += w;
        if weight >= target && batches.len() + 1 < groups {
            batches.push(std::mem::take(&mut current));
            weight = 0;
        }
    }
    if !current.is_empty() {
        batches.push(current);
    }
    let tasks = batches.into_iter().map(|batch| {
        kiln_store::task::blocking("cas-cpu", move || batch.into_iter().map(f).collect::<Vec<R>>())
    });
    let mut out = Vec::new();
    for part in futures::future::join_all(tasks).await {
        out.extend(part.map_err(CacheError::store("processing a batch"))?);
    }
    Ok(out)
}

/// One blob of a BatchUpdateBlobs request awaiting verification.
struct UpdateItem {
    key: BlobKey,
    data: Bytes,
    zstd: bool,
}

/// Verifies an uploaded blob and returns the payload to store: zstd uploads
/// are kept compressed (they were decoded once, to verify them).
fn verify_upload(item: UpdateItem) -> CacheResult<Blob> {
    if item.zstd {
        let plain = codec::decompress(&item.data, item.key.size()).map_err(|e| {
            CacheError::InvalidArgument(format!(
                "zstd data of {} does not decode to {} bytes: {e}",
                item.key,
                item.key.size()
            ))
        })?;
        item.key.verify(&plain)?;
        Ok(Blob {
            encoding: Encoding::Zstd,
            data: item.data,
        })
    } else {
        item.key.verify(&item.data)?;
        Ok(Blob::identity(item.data))
    }
}

/// A stored payload on its way to a BatchReadBlobs response.
struct ReadItem {
    key: BlobKey,
    blob: Blob,
    want_zstd: bool,
}

/// Converts a stored payload to the encoding the client gets.
fn convert_read(item: ReadItem) -> CacheResult<(Compressor, Bytes)> {
    let ReadItem { key, blob, want_zstd } = item;
    match (blob.encoding, want_zstd) {
        (Encoding::Zstd, true) => Ok((Compressor::Zstd, blob.data)),
        (Encoding::Identity, false) => {
            check_identity_len(&key, &blob.data)?;
            Ok((Compressor::Identity, blob.data))
        }
        (Encoding::Identity, true) => {
            check_identity_len(&key, &blob.data)?;
            let z = codec::compress(&blob.data, codec::DEFAULT_ZSTD_LEVEL)
                .map_err(CacheError::store(format!("compressing {key}")))?;
            Ok((Compressor::Zstd, z))
        }
        (Encoding::Zstd, false) => {
            let plain =
                codec::to_identity(&key, blob).map_err(CacheError::store(format!("reading {key}")))?;
            Ok((Compressor::Identity, plain))
        }
    }
}

fn check_identity_len(key: &BlobKey, data: &Bytes) -> CacheResult<()> {
    if data.len() as u64 == key.size() {
        return Ok(());
    }
    Err(CacheError::Store {
        context: format!("reading {key}"),
        source: kiln_store::StoreError::Corrupt {
            key: key.to_string(),
            detail: format!("stored payload is {} bytes", data.len()),
        },
    })
}

impl CasService {
    async fn find_missing(&self, req: FindMissingBlobsRequest) -> CacheResult<FindMissingBlobsResponse> {
        let instance = self.instances.get(&req.instance_name)?;
        let Some(first) = req.blob_digests.first() else {
            return Ok(FindMissingBlobsResponse::default());
        };
        let function = request_function(instance, req.digest_function, &first.hash)?;
        let mut keys = Vec::with_capacity(req.blob_digests.len());
        let mut queried = Vec::with_capacity(req.blob_digests.len());
        for (i, d) in req.blob_digests.iter().enumerate() {
            let key = parse_key(function, d)?;
            if key.size() != 0 || !key.is_empty_blob() {
                keys.push(key);
                queried.push(i);
            }
        }
        let asked = req.blob_digests.len() as u64;
        if keys.is_empty() {
            instance.counters().cas_lookups(asked, 0);
            return Ok(FindMissingBlobsResponse::default());
        }
        let present = instance
            .cas
            .has_many(&keys)
            .await
            .map_err(CacheError::store("checking blob existence"))?;
        let mut blob_digests = req.blob_digests;
        let missing: Vec<Digest> = queried
            .into_iter()
            .zip(present)
            .filter(|(_, here)| !here)
            .map(|(i, _)| std::mem::take(&mut blob_digests[i]))
            .collect();
        let n_missing = missing.len() as u64;
        instance.counters().cas_lookups(asked - n_missing, n_missing);
        Ok(FindMissingBlobsResponse {
            missing_blob_digests: missing,
        })
    }

    async fn batch_update(&self, req: BatchUpdateBlobsRequest) -> CacheResult<BatchUpdateBlobsResponse> {
        let instance = self.instances.get(&req.instance_name)?.clone();
        let Some(first) = req.requests.first() else {
            return Ok(BatchUpdateBlobsResponse::default());
        };
        let first_hash = first.digest.as_ref().map(|d| &d.hash[..]).unwrap_or(b"");
        let function = request_function(&instance, req.digest_function, first_hash)?;
        let limits = self.instances.limits();
        check_batch_total(
            limits,
            req.requests
                .iter()
                .map(|r| r.digest.as_ref().map_or(0, |d| d.size_bytes)),
            "BatchUpdateBlobs request",
        )?;

        let n = req.requests.len();
        let mut digests: Vec<Digest> = Vec::with_capacity(n);
        let mut statuses: Vec<Option<kiln_proto::rpc::Status>> = vec![None; n];
        let mut items: Vec<(u64, (usize, UpdateItem))> = Vec::with_capacity(n);
        let mut payload_bytes = 0u64;
        for (i, r) in req.requests.into_iter().enumerate() {
            let digest = r.digest.unwrap_or_default();
            match admit_upload(function, limits, &digest, r.compressor) {
                Ok((key, zstd)) => {
                    let weight = r.data.len() as u64 + if zstd { key.size() } else { 0 };
                    payload_bytes += r.data.len() as u64;
                    items.push((
                        weight,
                        (
                            i,
                            UpdateItem {
                                key,
                                data: r.data,
                                zstd,
                            },
                        ),
                    ));
                }
                Err(e) => {
                    // The digest is echoed in the answer: it must be a valid string.
                    check_utf8(&digest)?;
                    statuses[i] = Some(e.to_rpc_status())
                }
            }
            digests.push(digest);
        }

        // Existence (to skip writes) and verification run concurrently.
        let keys: Vec<BlobKey> = items
            .iter()
            .map(|(_, (_, it))| it.key.clone())
            .filter(|k| !k.is_empty_blob())
            .collect();
        let existence = async {
            if keys.is_empty() {
                return HashSet::new();
            }
            match instance.cas.has_many(&keys).await {
                Ok(present) => keys
                    .iter()
                    .zip(present)
                    .filter(|(_, p)| *p)
                    .map(|(k, _)| k.clone())
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "has_many failed before a batch upload; writing every blob");
                    HashSet::new()
                }
            }
        };
        let verify = cpu_map(items, |(i, item): (usize, UpdateItem)| {
            let key = item.key.clone();
            (i, key, verify_upload(item))
        });
        let (present, verified) = futures::join!(existence, verify);
        let verified = verified?;

        // One write per distinct key; duplicates in the batch share its outcome.
        let mut writes: Vec<(BlobKey, Blob)> = Vec::new();
        let mut waiting: HashMap<BlobKey, Vec<usize>> = HashMap::new();
        for (i, key, result) in verified {
            match result {
                Err(e) => statuses[i] = Some(e.to_rpc_status()),
                Ok(_) if key.is_empty_blob() || present.contains(&key) => statuses[i] = Some(ok_status()),
                Ok(blob) => match waiting.entry(key) {
                    Entry::Occupied(mut e) => e.get_mut().push(i),
                    Entry::Vacant(e) => {
                        writes.push((e.key().clone(), blob));
                        e.insert(vec![i]);
                    }
                },
            }
        }
        // The payloads are views of the request buffer. Blobs that share it
        // with others get their own exactly sized copies (made back to back,
        // before anything else allocates), so that a stored blob never keeps
        // the whole request alive after its neighbours are evicted.
        for (_, blob) in writes.iter_mut() {
            if (blob.data.len() as u64) * 2 < payload_bytes {
                blob.data = Bytes::copy_from_slice(&blob.data);
            }
        }
        let cas = instance.cas.clone();
        let mut results = futures::stream::iter(writes)
            .map(|(key, blob)| {
                let cas = cas.clone();
                async move {
                    let len = blob.data.len() as u64;
                    let r = cas.put(&key, blob).await;
                    (key, r, len)
                }
            })
            .buffer_unordered(STORE_CONCURRENCY);
        let (mut stored_blobs, mut stored_bytes) = (0u64, 0u64);
        while let Some((key, r, len)) = results.next().await {
            let status = match r {
                Ok(()) => {
                    stored_blobs += 1;
                    stored_bytes += len;
                    ok_status()
                }
                Err(e) => CacheError::store(format!("storing {key}"))(e).to_rpc_status(),
            };
            for i in waiting.remove(&key).unwrap_or_default() {
                statuses[i] = Some(status.clone());
            }
        }
        instance.counters().cas_written(stored_blobs, stored_bytes);

        let responses = digests
            .into_iter()
            .zip(statuses)
            .map(|(digest, status)| batch_update_blobs_response::Response {
                digest: Some(digest),
                status: Some(status.unwrap_or_else(ok_status)),
            })
            .collect();
        Ok(BatchUpdateBlobsResponse { responses })
    }

    async fn batch_read(&self, req: BatchReadBlobsRequest) -> CacheResult<BatchReadBlobsResponse> {
        let instance = self.instances.get(&req.instance_name)?.clone();
        let Some(first) = req.digests.first() else {
            return Ok(BatchReadBlobsResponse::default());
        };
        let function = request_function(&instance, req.digest_function, &first.hash)?;
        check_batch_total(
            self.instances.limits(),
            req.digests.iter().map(|d| d.size_bytes),
            "BatchReadBlobs request",
        )?;
        let want_zstd = req.acceptable_compressors.contains(&(Compressor::Zstd as i32));

        let n = req.digests.len();
        let mut responses: Vec<batch_read_blobs_response::Response> = Vec::with_capacity(n);
        let mut fetches: Vec<(usize, BlobKey)> = Vec::new();
        let mut empty_blobs = 0u64;
        for (i, digest) in req.digests.into_iter().enumerate() {
            let mut resp = batch_read_blobs_response::Response::default();
            match parse_key(function, &digest) {
                Err(e) => {
                    check_utf8(&digest)?;
                    resp.status = Some(CacheError::from(e).to_rpc_status())
                }
                Ok(key) if key.is_empty_blob() => {
                    empty_blobs += 1;
                    resp.status = Some(ok_status())
                }
                Ok(key) => fetches.push((i, key)),
            }
            resp.digest = Some(digest);
            responses.push(resp);
        }

        let cas = instance.cas.clone();
        let mut fetched = futures::stream::iter(fetches)
            .map(|(i, key)| {
                let cas = cas.clone();
                async move {
                    let r = cas.get(&key).await;
                    (i, key, r)
                }
            })
            .buffer_unordered(STORE_CONCURRENCY);
        let mut convert: Vec<(u64, (usize, ReadItem))> = Vec::new();
        let mut not_found = 0u64;
        while let Some((i, key, r)) = fetched.next().await {
            match r {
                Ok(Some(blob)) => {
                    let needs_work = (blob.encoding == Encoding::Zstd) != want_zstd;
                    let weight = if needs_work { key.size() } else { 0 };
                    convert.push((weight, (i, ReadItem { key, blob, want_zstd })));
                }
                Ok(None) => {
                    not_found += 1;
                    responses[i].status =
                        Some(CacheError::NotFound(format!("blob {key} not found")).to_rpc_status())
                }
                Err(e) => {
                    responses[i].status = Some(CacheError::store(format!("reading {key}"))(e).to_rpc_status())
                }
            }
        }
        drop(fetched);
        let converted = cpu_map(convert, |(i, item): (usize, ReadItem)| (i, convert_read(item))).await?;
        let (mut served_blobs, mut served_bytes) = (empty_blobs, 0u64);
        for (i, r) in converted {
            let resp = &mut responses[i];
            match r {
                Ok((compressor, data)) => {
                    served_blobs += 1;
                    served_bytes += data.len() as u64;
                    resp.compressor = compressor as i32;
                    resp.data = data;
                    resp.status = Some(ok_status());
                }
                Err(e) => resp.status = Some(e.to_rpc_status()),
            }
        }
        let counters = instance.counters();
        counters.cas_lookups(served_blobs, not_found);
        counters.cas_read(served_blobs, served_bytes);
        Ok(BatchReadBlobsResponse { responses })
    }
}

/// Checks one upload's digest, size limit and compressor.
fn admit_upload(
    function: DigestFunction,
    limits: &CacheLimits,
    digest: &Digest,
    compressor: i32,
) -> CacheResult<(BlobKey, bool)> {
    let key = parse_key(function, digest)?;
    let max = limits.max_cas_blob_size_bytes;
    if max > 0 && key.size() > max {
        return Err(CacheError::InvalidArgument(format!(
            "blob {key} exceeds the maximum blob size of {max} bytes"
        )));
    }
    let zstd = match Compressor::try_from(compressor) {
        Ok(Compressor::Identity) => false,
        Ok(Compressor::Zstd) => true,
        Ok(other) => {
            return Err(CacheError::InvalidArgument(format!(
                "compressor {} is not supported for batch uploads (only ZSTD)",
                other.as_str_name()
            )));
        }
        Err(_) => {
            return Err(CacheError::InvalidArgument(format!(
                "unknown compressor value {compressor}"
            )));
        }
    };
    Ok((key, zstd))
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        Ok(Response::new(self.find_missing(request.into_inner()).await?))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        Ok(Response::new(self.batch_update(request.into_inner()).await?))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        Ok(Response::new(self.batch_read(request.into_inner()).await?))
    }

    type GetTreeStream = BoxStream<GetTreeResponse>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let stream = crate::get_tree::get_tree(&self.instances, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn split_blob(
        &self,
        _request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob is not supported (split_blob_support is false)",
        ))
    }

    type GetChunkMappingStream = BoxStream<GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented(
            "GetChunkMapping is not supported (split_blob_support is false)",
        ))
    }

    async fn splice_blob(
        &self,
        _request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob is not supported (splice_blob_support is false)",
        ))
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented(
            "RegisterChunkMapping is not supported (splice_blob_support is false)",
        ))
    }
}
