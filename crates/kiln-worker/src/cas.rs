//! The worker's CAS client: FindMissingBlobs, BatchReadBlobs and ByteStream
//! Read for inputs, BatchUpdateBlobs and ByteStream Write for outputs, with
//! batches sized by the server's advertised `max_batch_total_size_bytes`.
//! Every blob read is verified against its digest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use kiln_digest::{BlobKey, DigestFunction, Hasher};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{BatchReadBlobsRequest, FindMissingBlobsRequest, GetCapabilitiesRequest};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::error::{WorkerError, WorkerResult};

/// Batch limit assumed when the server advertises none (0) or cannot say.
pub const DEFAULT_MAX_BATCH: u64 = 4 << 20;
/// Bytes per ByteStream Write chunk.
const WRITE_CHUNK: usize = 1 << 20;
/// Per-blob allowance for the digest and framing inside a batch.
const PER_BLOB_OVERHEAD: u64 = 160;
/// FindMissingBlobs digests per request.
const FIND_MISSING_CHUNK: usize = 10_000;

/// A CAS reachable over one channel, shared by all actions. Remembers each
/// instance's batch limit.
#[derive(Clone)]
pub struct CasClient {
    channel: Channel,
    max_batch: Arc<Mutex<HashMap<String, u64>>>,
}

impl CasClient {
    pub fn new(channel: Channel) -> Self {
        CasClient {
            channel,
            max_batch: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A view of one instance and digest function. The instance's batch
    /// limit is asked from Capabilities once and remembered.
    pub async fn instance(&self, instance: &str, function: DigestFunction) -> InstanceCas {
        let known = self.max_batch.lock().get(instance).copied();
        let max_batch = match known {
            Some(m) => m,
            None => {
                let m = self.ask_max_batch(instance).await;
                self.max_batch.lock().insert(instance.to_string(), m);
                m
            }
        };
        InstanceCas {
            channel: self.channel.clone(),
            instance: instance.to_string(),
            function,
            max_batch,
        }
    }

    async fn ask_max_batch(&self, instance: &str) -> u64 {
        let mut client = CapabilitiesClient::new(self.channel.clone());
        match client
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: instance.to_string(),
            })
            .await
        {
            Ok(caps) => caps
                .into_inner()
                .cache_capabilities
                .map(|c| c.max_batch_total_size_bytes)
                .filter(|&m| m > 0)
                .map(|m| m as u64)
                .unwrap_or(DEFAULT_MAX_BATCH),
            Err(status) => {
                tracing::warn!(%status, instance, "GetCapabilities failed; assuming a 4 MiB batch limit");
                DEFAULT_MAX_BATCH
            }
        }
    }
}

/// The CAS of one instance, for one digest function.
#[derive(Clone)]
pub struct InstanceCas {
    channel: Channel,
    instance: String,
    function: DigestFunction,
    max_batch: u64,
}

/// Outcome of reading one blob in a batch.
pub enum BatchBlob {
    Found(Bytes),
    Missing,
}

impl InstanceCas {
    pub fn function(&self) -> DigestFunction {
        self.function
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Largest total of blob bytes in one batch call.
    pub fn max_batch(&self) -> u64 {
        self.max_batch
    }

    /// Whether `size` is small enough to travel in a batch.
    pub fn fits_batch(&self, size: u64) -> bool {
        size + PER_BLOB_OVERHEAD <= self.max_batch
    }

    fn message_limit(&self) -> usize {
        (self.max_batch as usize + (1 << 20)).max(16 << 20)
    }

    fn cas_client(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_limit())
            .max_encoding_message_size(self.message_limit())
    }

    fn bytestream_client(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_limit())
            .max_encoding_message_size(self.message_limit())
    }

    fn proto_function(&self) -> i32 {
        self.function.to_proto() as i32
    }

    fn blob_path(&self, key: &BlobKey) -> String {
        let function = if self.function.named_in_resource() {
            format!("{}/", self.function.name())
        } else {
            String::new()
        };
        format!("blobs/{function}{}/{}", key.hash_hex(), key.size())
    }

    fn read_resource(&self, key: &BlobKey) -> String {
        if self.instance.is_empty() {
            self.blob_path(key)
        } else {
            format!("{}/{}", self.instance, self.blob_path(key))
        }
    }

    fn write_resource(&self, key: &BlobKey) -> String {
        let upload = format!("uploads/{}/{}", uuid::Uuid::new_v4(), self.blob_path(key));
        if self.instance.is_empty() {
            upload
        } else {
            format!("{}/{upload}", self.instance)
        }
    }

    /// Splits `keys` into groups whose sizes fit one batch.
    pub fn batches<'a>(&self, keys: impl IntoIterator<Item = &'a BlobKey>) -> Vec<Vec<BlobKey>> {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut cur_size = 0u64;
        for k in keys {
            let cost = k.size() + PER_BLOB_OVERHEAD;
            if !cur.is_empty() && cur_size + cost > self.max_batch {
                out.push(std::mem::take(&mut cur));
                cur_size = 0;
            }
            cur.push(k.clone());
            cur_size += cost;
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The subset of `keys` the CAS does not have.
    pub async fn find_missing(&self, keys: &[BlobKey]) -> WorkerResult<Vec<BlobKey>> {
        let mut missing = Vec::new();
        for chunk in keys.chunks(FIND_MISSING_CHUNK) {
            let by_digest: HashMap<(String, i64), &BlobKey> = chunk
                .iter()
                .map(|k| ((k.hash_hex(), k.size() as i64), k))
                .collect();
            let resp = self
                .cas_client()
                .find_missing_blobs(FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.iter().map(BlobKey::to_digest).collect(),
                    digest_function: self.proto_function(),
                })
                .await
                .map_err(WorkerError::cas("FindMissingBlobs"))?
                .into_inner();
            for d in resp.missing_blob_digests {
                if let Some(k) = by_digest.get(&(d.hash, d.size_bytes)) {
                    missing.push((*k).clone());
                }
            }
        }
        Ok(missing)
    }

    /// Reads one batch (the caller sized it with [`Self::batches`]).
    /// Every returned blob has been verified.
    pub async fn batch_read(&self, keys: &[BlobKey]) -> WorkerResult<Vec<(BlobKey, BatchBlob)>> {
        let resp = self
            .cas_client()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: keys.iter().map(BlobKey::to_digest).collect(),
                acceptable_compressors: Vec::new(),
                digest_function: self.proto_function(),
            })
            .await
            .map_err(WorkerError::cas("BatchReadBlobs"))?
            .into_inner();
        let mut wanted: HashMap<(String, i64), BlobKey> = keys
            .iter()
            .map(|k| ((k.hash_hex(), k.size() as i64), k.clone()))
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for r in resp.responses {
            let Some(d) = r.digest else { continue };
            let Some(key) = wanted.remove(&(d.hash, d.size_bytes)) else {
                continue;
            };
            let code = r.status.as_ref().map(|s| s.code).unwrap_or(0);
            if code == Code::NotFound as i32 {
                out.push((key, BatchBlob::Missing));
                continue;
            }
            if code != Code::Ok as i32 {
                let msg = r.status.map(|s| s.message).unwrap_or_default();
                return Err(WorkerError::Cas {
                    context: format!("BatchReadBlobs of {key}"),
                    status: tonic::Status::new(Code::from_i32(code), msg),
                });
            }
            if r.compressor != 0 {
                return Err(WorkerError::Internal(format!(
                    "BatchReadBlobs returned {key} compressed although no compressor was accepted"
                )));
            }
            key.verify(&r.data)
                .map_err(|e| WorkerError::Internal(format!("CAS returned corrupt content for {key}: {e}")))?;
            out.push((key, BatchBlob::Found(Bytes::from(r.data))));
        }
        if let Some(key) = wanted.into_keys().next() {
            return Err(WorkerError::Internal(format!(
                "BatchReadBlobs answered without {}",
                key.1
            )));
        }
        Ok(out)
    }

    /// Reads one blob into memory (batch or ByteStream by size).
    pub async fn read_blob(&self, key: &BlobKey) -> WorkerResult<Bytes> {
        if key.is_empty_blob() {
            return Ok(Bytes::new());
        }
        if self.fits_batch(key.size()) {
            let mut got = self.batch_read(std::slice::from_ref(key)).await?;
            return match got.pop() {
                Some((_, BatchBlob::Found(b))) => Ok(b),
                _ => Err(WorkerError::MissingBlobs(vec![key.clone()])),
            };
        }
        let mut buf = Vec::with_capacity(key.size().min(64 << 20) as usize);
        let mut hasher = Hasher::new(key.function(), key.size());
        let mut stream = self.open_read(key).await?;
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|s| read_error(key, s))?;
            hasher.update(&msg.data);
            buf.extend_from_slice(&msg.data);
            if buf.len() as u64 > key.size() {
                break;
            }
        }
        hasher
            .verify(key, buf.len() as u64)
            .map_err(|e| WorkerError::Internal(format!("CAS returned corrupt content for {key}: {e}")))?;
        Ok(Bytes::from(buf))
    }

    async fn open_read(
        &self,
        key: &BlobKey,
    ) -> WorkerResult<tonic::Streaming<kiln_proto::bytestream::ReadResponse>> {
        self.bytestream_client()
            .read(ReadRequest {
                resource_name: self.read_resource(key),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| read_error(key, s))
    }

    /// Streams a (large) blob into `file` with ByteStream Read, verifying
    /// it as it arrives. The file is left at the blob's length on success.
    pub async fn read_to_file(&self, key: &BlobKey, file: &mut tokio::fs::File) -> WorkerResult<()> {
        let mut hasher = Hasher::new(key.function(), key.size());
        let mut written = 0u64;
        let mut stream = self.open_read(key).await?;
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|s| read_error(key, s))?;
            written += msg.data.len() as u64;
            if written > key.size() {
                break;
            }
            hasher.update(&msg.data);
            file.write_all(&msg.data)
                .await
                .map_err(WorkerError::io(format!("writing {key} to the local cache")))?;
        }
        hasher
            .verify(key, written)
            .map_err(|e| WorkerError::Internal(format!("CAS returned corrupt content for {key}: {e}")))?;
        file.flush()
            .await
            .map_err(WorkerError::io(format!("writing {key} to the local cache")))?;
        Ok(())
    }

    /// Uploads small blobs with one BatchUpdateBlobs per batch.
    pub async fn batch_update(&self, blobs: Vec<(BlobKey, Bytes)>) -> WorkerResult<()> {
        let mut groups: Vec<Vec<(BlobKey, Bytes)>> = Vec::new();
        let mut cur = Vec::new();
        let mut cur_size = 0u64;
        for (k, data) in blobs {
            let cost = k.size() + PER_BLOB_OVERHEAD;
            if !cur.is_empty() && cur_size + cost > self.max_batch {
                groups.push(std::mem::take(&mut cur));
                cur_size = 0;
            }
            cur_size += cost;
            cur.push((k, data));
        }
        if !cur.is_empty() {
            groups.push(cur);
        }
        for group in groups {
            let resp = self
                .cas_client()
                .batch_update_blobs(kiln_digest::batch::batch_update_request(
                    &self.instance,
                    self.proto_function(),
                    &group,
                ))
                .await
                .map_err(WorkerError::cas("BatchUpdateBlobs"))?
                .into_inner();
            if let Some((what, s)) = kiln_digest::batch::first_failed_update(resp) {
                return Err(WorkerError::Cas {
                    context: format!("BatchUpdateBlobs of {what}"),
                    status: tonic::Status::new(Code::from_i32(s.code), s.message),
                });
            }
        }
        Ok(())
    }

    /// Uploads an in-memory blob with ByteStream Write.
    pub async fn write_bytes(&self, key: &BlobKey, data: Bytes) -> WorkerResult<()> {
        let resource = self.write_resource(key);
        let total = data.len();
        let mut chunks = Vec::new();
        let mut offset = 0usize;
        loop {
            let end = (offset + WRITE_CHUNK).min(total);
            chunks.push(WriteRequest {
                resource_name: if offset == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: offset as i64,
                finish_write: end == total,
                data: data.slice(offset..end).to_vec(),
            });
            offset = end;
            if offset >= total {
                break;
            }
        }
        self.send_write(key, futures::stream::iter(chunks)).await
    }

    /// Uploads a file with ByteStream Write, streaming it from disk. The
    /// file must still hash to `key` (it is read again, not trusted).
    pub async fn write_file(&self, key: &BlobKey, path: &Path) -> WorkerResult<()> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(WorkerError::io(format!("opening output {}", path.display())))?;
        self.write_open_file(key, file).await
    }

    /// Streams an open file, from its current offset, as blob `key`.
    pub async fn write_open_file(&self, key: &BlobKey, file: tokio::fs::File) -> WorkerResult<()> {
        let resource = self.write_resource(key);
        let size = key.size();
        let state = (file, 0u64, resource, false);
        let stream = futures::stream::unfold(state, move |(mut file, offset, resource, done)| async move {
            if done {
                return None;
            }
            let mut buf = vec![0u8; WRITE_CHUNK.min((size - offset.min(size)) as usize).max(1)];
            let n = match read_full(&mut file, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "reading an output for upload failed");
                    0
                }
            };
            buf.truncate(n);
            let next = offset + n as u64;
            let finish = next >= size || n == 0;
            let req = WriteRequest {
                resource_name: if offset == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: offset as i64,
                finish_write: finish,
                data: buf,
            };
            Some((req, (file, next, resource, finish)))
        });
        self.send_write(key, stream).await
    }

    async fn send_write(
        &self,
        key: &BlobKey,
        stream: impl futures::Stream<Item = WriteRequest> + Send + 'static,
    ) -> WorkerResult<()> {
        let resp = self
            .bytestream_client()
            .write(stream)
            .await
            .map_err(WorkerError::cas(format!("ByteStream Write of {key}")))?
            .into_inner();
        if resp.committed_size != key.size() as i64 && resp.committed_size != -1 {
            return Err(WorkerError::Internal(format!(
                "ByteStream Write of {key} committed {} bytes",
                resp.committed_size
            )));
        }
        Ok(())
    }
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

fn read_error(key: &BlobKey, status: tonic::Status) -> WorkerError {
    if status.code() == Code::NotFound {
        WorkerError::MissingBlobs(vec![key.clone()])
    } else {
        WorkerError::Cas {
            context: format!("ByteStream Read of {key}"),
            status,
        }
    }
}
