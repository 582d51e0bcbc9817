//! gRPC plumbing shared by the scenarios: channels (TCP_NODELAY, several
//! connections), typed clients, capabilities, resource names, blob
//! generation and untimed set-up uploads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln_digest::{BlobKey, DigestFunction, Hasher};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::batch_update_blobs_request;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{BatchUpdateBlobsRequest, Digest, GetCapabilitiesRequest, ServerCapabilities};
use prost::Message as _;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tonic::transport::{Channel, Endpoint};

use crate::error::{BenchError, Context as _, Result};

/// The digest function every scenario uses (what Bazel uses by default).
pub const FUNCTION: DigestFunction = DigestFunction::Sha256;

/// Largest message the clients will encode or decode.
const MAX_MESSAGE: usize = 512 * 1024 * 1024;

/// Connection settings shared by every channel.
#[derive(Debug, Clone)]
pub struct ConnSpec {
    pub url: String,
    pub instance: String,
    /// HTTP/2 initial stream flow-control window the client advertises.
    pub stream_window: u32,
    /// HTTP/2 initial connection flow-control window the client advertises.
    pub conn_window: u32,
    /// Concurrent workers sharing one channel (one TCP connection).
    pub workers_per_conn: usize,
}

impl ConnSpec {
    /// An endpoint with TCP_NODELAY on every socket.
    pub fn endpoint(&self) -> Result<Endpoint> {
        Ok(Endpoint::from_shared(self.url.clone())
            .ctx(format!("endpoint {:?}", self.url))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.conn_window))
    }

    /// One channel (one TCP connection), connected eagerly.
    pub async fn connect(&self) -> Result<Channel> {
        self.endpoint()?
            .connect()
            .await
            .ctx(format!("connecting to {}", self.url))
    }

    /// Enough channels for `concurrency` workers at
    /// `workers_per_conn` workers per channel (at least one).
    pub async fn channels(&self, concurrency: usize) -> Result<Pool> {
        let n = channels_for(concurrency, self.workers_per_conn);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.connect().await?);
        }
        Ok(Pool {
            channels: Arc::new(out),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// `{instance}/` or nothing for the default instance.
    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    /// ByteStream upload resource name for a blob.
    pub fn upload_resource(&self, digest: &Digest) -> String {
        format!(
            "{}uploads/{}/blobs/{}/{}",
            self.prefix(),
            uuid::Uuid::new_v4(),
            digest.hash,
            digest.size_bytes
        )
    }

    /// ByteStream read resource name for a blob.
    pub fn read_resource(&self, digest: &Digest) -> String {
        format!("{}blobs/{}/{}", self.prefix(), digest.hash, digest.size_bytes)
    }
}

/// Number of channels for `concurrency` workers.
pub fn channels_for(concurrency: usize, workers_per_conn: usize) -> usize {
    concurrency.div_ceil(workers_per_conn.max(1)).max(1)
}

/// A set of channels handed out round-robin.
#[derive(Clone)]
pub struct Pool {
    channels: Arc<Vec<Channel>>,
    next: Arc<AtomicUsize>,
}

impl Pool {
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// The next channel, round-robin (clone is cheap: channels are handles).
    pub fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel())
    }
}

/// Fetches the server's capabilities for the instance.
pub async fn capabilities(pool: &Pool, instance: &str) -> Result<ServerCapabilities> {
    let resp = pool
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: instance.to_string(),
        })
        .await
        .ctx("GetCapabilities")?;
    Ok(resp.into_inner())
}

/// The server's advertised `max_batch_total_size_bytes` (0 = no limit).
pub fn max_batch_bytes(caps: &ServerCapabilities) -> u64 {
    caps.cache_capabilities
        .as_ref()
        .map(|c| c.max_batch_total_size_bytes.max(0) as u64)
        .unwrap_or(0)
}

/// A blob with its digest.
#[derive(Clone)]
pub struct Blob {
    pub digest: Digest,
    pub data: Vec<u8>,
}

/// `count` blobs of `size` bytes of random content, each unique (its index
/// and the run's `seed` are written at the front when there is room), hashed
/// with SHA-256. Generation is spread over two threads.
pub fn random_blobs(count: usize, size: usize, seed: u64) -> Vec<Blob> {
    let threads = 2usize;
    let per = count.div_ceil(threads).max(1);
    let mut parts: Vec<Vec<Blob>> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = t * per;
                let end = ((t + 1) * per).min(count);
                s.spawn(move || {
                    (start..end)
                        .map(|i| random_blob(size, seed, i as u64))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            // A generation thread cannot panic short of allocation failure.
            if let Ok(v) = h.join() {
                parts.push(v);
            }
        }
    });
    parts.into_iter().flatten().collect()
}

/// One blob: random bytes, with `seed` and `index` stamped at the front so
/// blobs of one run never collide (and runs differ by seed).
pub fn random_blob(size: usize, seed: u64, index: u64) -> Blob {
    let mut rng = SmallRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut data = vec![0u8; size];
    rng.fill_bytes(&mut data);
    let stamp = [seed.to_le_bytes(), index.to_le_bytes()].concat();
    let n = stamp.len().min(size);
    data[..n].copy_from_slice(&stamp[..n]);
    let digest = BlobKey::of(FUNCTION, &data).to_digest();
    Blob { digest, data }
}

/// Bytes one entry adds to an encoded BatchUpdateBlobsRequest.
fn entry_len(r: &batch_update_blobs_request::Request) -> usize {
    let n = r.encoded_len();
    1 + prost::encoding::encoded_len_varint(n as u64) + n
}

/// How many blobs of `blob_size` fit in one batch call under the server's
/// limit (`max_total` = 0: no limit), never more than `cap`, at least 1.
/// The whole encoded request is counted, not only the payload, so a server
/// that checks either way accepts it.
pub fn blobs_per_batch(max_total: u64, blob_size: usize, cap: usize) -> usize {
    if max_total == 0 {
        return cap.max(1);
    }
    let sample = batch_update_blobs_request::Request {
        digest: Some(Digest {
            hash: "0".repeat(FUNCTION.hex_len()),
            size_bytes: blob_size as i64,
        }),
        data: vec![0u8; blob_size],
        compressor: 0,
    };
    // Room for instance name and digest_function fields.
    let overhead = 256usize;
    let fit = (max_total as usize).saturating_sub(overhead) / entry_len(&sample);
    fit.clamp(1, cap.max(1))
}

/// Packs blobs into BatchUpdateBlobs requests of at most `per_call` blobs.
pub fn pack_batches(instance: &str, blobs: Vec<Blob>, per_call: usize) -> Vec<BatchUpdateBlobsRequest> {
    let per_call = per_call.max(1);
    let mut out = Vec::with_capacity(blobs.len().div_ceil(per_call));
    let mut cur: Vec<batch_update_blobs_request::Request> = Vec::with_capacity(per_call);
    for b in blobs {
        cur.push(batch_update_blobs_request::Request {
            digest: Some(b.digest),
            data: b.data,
            compressor: 0,
        });
        if cur.len() == per_call {
            out.push(batch_request(instance, std::mem::take(&mut cur)));
            cur.reserve(per_call);
        }
    }
    if !cur.is_empty() {
        out.push(batch_request(instance, cur));
    }
    out
}

fn batch_request(
    instance: &str,
    requests: Vec<batch_update_blobs_request::Request>,
) -> BatchUpdateBlobsRequest {
    BatchUpdateBlobsRequest {
        instance_name: instance.to_string(),
        requests,
        digest_function: FUNCTION.to_proto() as i32,
    }
}

/// Sends one BatchUpdateBlobs call and checks every per-blob status.
/// Returns the number of blobs stored.
pub async fn batch_update(
    cas: &mut ContentAddressableStorageClient<Channel>,
    req: BatchUpdateBlobsRequest,
) -> Result<u64> {
    let sent = req.requests.len();
    let resp = cas
        .batch_update_blobs(req)
        .await
        .ctx("BatchUpdateBlobs")?
        .into_inner();
    if resp.responses.len() != sent {
        return Err(BenchError::new(format!(
            "BatchUpdateBlobs: sent {sent} blobs, got {} responses",
            resp.responses.len()
        )));
    }
    for r in &resp.responses {
        if let Some(st) = &r.status
            && st.code != 0
        {
            return Err(BenchError::new(format!(
                "BatchUpdateBlobs: blob {:?} failed with code {}: {}",
                r.digest.as_ref().map(|d| d.hash.as_str()).unwrap_or("?"),
                st.code,
                st.message
            )));
        }
    }
    Ok(sent as u64)
}

/// Untimed set-up upload: sends all requests with `concurrency` calls in
/// flight. Fails on the first error.
pub async fn upload_all(pool: &Pool, reqs: Vec<BatchUpdateBlobsRequest>, concurrency: usize) -> Result<u64> {
    use futures::StreamExt as _;
    let results: Vec<Result<u64>> = futures::stream::iter(reqs)
        .map(|req| {
            let mut cas = pool.cas();
            async move { batch_update(&mut cas, req).await }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total)
}

/// Untimed bulk upload of `count` generated blobs of `size` bytes (indices
/// `0..count` under `seed`), generated batch by batch so the client never
/// holds them all. Returns the number stored and every `sample_every`-th
/// digest (for a later presence check).
pub async fn upload_generated(
    pool: &Pool,
    instance: &str,
    count: u64,
    size: usize,
    seed: u64,
    per_call: usize,
    concurrency: usize,
) -> Result<(u64, Vec<Digest>)> {
    use futures::StreamExt as _;
    let per_call = per_call.max(1) as u64;
    let calls = count.div_ceil(per_call);
    let sample_every = (count / 1000).max(1);
    let mut stream = futures::stream::iter(0..calls)
        .map(|c| {
            let mut cas = pool.cas();
            let instance = instance.to_string();
            async move {
                let start = c * per_call;
                let end = (start + per_call).min(count);
                let blobs: Vec<Blob> = (start..end).map(|i| random_blob(size, seed, i)).collect();
                let sample: Vec<Digest> = (start..end)
                    .zip(&blobs)
                    .filter(|(i, _)| i % sample_every == 0)
                    .map(|(_, b)| b.digest.clone())
                    .collect();
                let mut reqs = pack_batches(&instance, blobs, per_call as usize);
                let mut stored = 0;
                for req in reqs.drain(..) {
                    stored += batch_update(&mut cas, req).await?;
                }
                Ok::<_, BenchError>((stored, sample))
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut stored = 0;
    let mut samples = Vec::new();
    while let Some(r) = stream.next().await {
        let (n, s) = r?;
        stored += n;
        samples.extend(s);
    }
    Ok((stored, samples))
}

/// How many of `digests` the server reports missing.
pub async fn count_missing(pool: &Pool, instance: &str, digests: &[Digest]) -> Result<usize> {
    let mut missing = 0;
    for chunk in digests.chunks(1000) {
        let resp = pool
            .cas()
            .find_missing_blobs(kiln_proto::reapi::FindMissingBlobsRequest {
                instance_name: instance.to_string(),
                blob_digests: chunk.to_vec(),
                digest_function: FUNCTION.to_proto() as i32,
            })
            .await
            .ctx("FindMissingBlobs")?;
        missing += resp.into_inner().missing_blob_digests.len();
    }
    Ok(missing)
}

/// Splits a blob into ByteStream WriteRequests of `chunk` bytes; only the
/// first names the resource (as Bazel does); the last sets finish_write.
pub fn write_requests(resource: String, data: &[u8], chunk: usize) -> Vec<WriteRequest> {
    let chunk = chunk.max(1);
    let mut out = Vec::with_capacity(data.len().div_ceil(chunk).max(1));
    let mut offset = 0usize;
    let mut resource = Some(resource);
    loop {
        let end = (offset + chunk).min(data.len());
        out.push(WriteRequest {
            resource_name: resource.take().unwrap_or_default(),
            write_offset: offset as i64,
            finish_write: end == data.len(),
            data: data[offset..end].to_vec(),
        });
        offset = end;
        if offset >= data.len() {
            break;
        }
    }
    out
}

/// Streams prepared WriteRequests; checks committed_size.
pub async fn bytestream_write(
    bs: &mut ByteStreamClient<Channel>,
    reqs: Vec<WriteRequest>,
    expected_size: u64,
) -> Result<u64> {
    let resp = bs
        .write(futures::stream::iter(reqs))
        .await
        .ctx("ByteStream.Write")?
        .into_inner();
    if resp.committed_size != expected_size as i64 {
        return Err(BenchError::new(format!(
            "ByteStream.Write: committed_size {} for a {expected_size}-byte blob",
            resp.committed_size
        )));
    }
    Ok(expected_size)
}

/// Reads a whole blob; with `verify`, hashes it on the fly and checks it.
/// Returns the number of bytes read.
pub async fn bytestream_read(
    bs: &mut ByteStreamClient<Channel>,
    resource: String,
    digest: &Digest,
    verify: bool,
) -> Result<u64> {
    let mut stream = bs
        .read(ReadRequest {
            resource_name: resource,
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .ctx("ByteStream.Read")?
        .into_inner();
    let size = digest.size_bytes.max(0) as u64;
    let mut hasher = verify.then(|| Hasher::new(FUNCTION, size));
    let mut n = 0u64;
    while let Some(msg) = stream.message().await.ctx("ByteStream.Read stream")? {
        n += msg.data.len() as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&msg.data);
        }
    }
    if let Some(h) = hasher {
        let key = BlobKey::from_digest(FUNCTION, digest)
            .map_err(|e| BenchError::new(format!("bad digest {digest:?}: {e}")))?;
        h.verify(&key, n)
            .map_err(|e| BenchError::new(format!("ByteStream.Read returned wrong content: {e}")))?;
    } else if n != size {
        return Err(BenchError::new(format!(
            "ByteStream.Read returned {n} bytes of {size}"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_count() {
        assert_eq!(channels_for(32, 4), 8);
        assert_eq!(channels_for(1, 4), 1);
        assert_eq!(channels_for(0, 4), 1);
        assert_eq!(channels_for(5, 4), 2);
        assert_eq!(channels_for(4, 0), 4);
    }

    #[test]
    fn batch_fits_limit() {
        // 4 MiB limit, 4 KiB blobs: each entry costs 4096 + ~80 bytes.
        let n = blobs_per_batch(4 * 1024 * 1024, 4096, 10_000);
        assert!((990..1010).contains(&n), "{n}");
        let blobs = random_blobs(n, 4096, 7);
        let reqs = pack_batches("inst", blobs, n);
        assert_eq!(reqs.len(), 1);
        assert!(reqs[0].encoded_len() <= 4 * 1024 * 1024);
        assert_eq!(blobs_per_batch(4 * 1024 * 1024, 4096, 256), 256);
        assert_eq!(blobs_per_batch(0, 4096, 256), 256);
        assert_eq!(blobs_per_batch(100, 4096, 256), 1);
    }

    #[test]
    fn blobs_unique_and_hashed() {
        let blobs = random_blobs(101, 64, 1);
        assert_eq!(blobs.len(), 101);
        let mut hashes: Vec<_> = blobs.iter().map(|b| b.digest.hash.clone()).collect();
        hashes.sort();
        hashes.dedup();
        assert_eq!(hashes.len(), 101);
        for b in &blobs {
            assert_eq!(b.data.len(), 64);
            assert_eq!(BlobKey::of(FUNCTION, &b.data).to_digest(), b.digest);
        }
        // Deterministic per (seed, index); different seeds differ.
        assert_eq!(random_blob(64, 1, 5).digest, blobs[5].digest);
        assert_ne!(random_blob(64, 2, 5).digest, blobs[5].digest);
        let packed = pack_batches("", blobs, 25);
        assert_eq!(
            packed.iter().map(|r| r.requests.len()).collect::<Vec<_>>(),
            vec![25, 25, 25, 25, 1]
        );
    }

    #[test]
    fn write_chunks() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let reqs = write_requests("r".into(), &data, 300);
        assert_eq!(reqs.len(), 4);
        assert_eq!(reqs[0].resource_name, "r");
        assert!(reqs[1..].iter().all(|r| r.resource_name.is_empty()));
        assert_eq!(
            reqs.iter().map(|r| r.write_offset).collect::<Vec<_>>(),
            vec![0, 300, 600, 900]
        );
        assert!(reqs[3].finish_write && !reqs[2].finish_write);
        let joined: Vec<u8> = reqs.iter().flat_map(|r| r.data.clone()).collect();
        assert_eq!(joined, data);
        let empty = write_requests("e".into(), &[], 300);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].finish_write);
    }

    #[test]
    fn resource_names() {
        let d = Digest {
            hash: "ab".repeat(32),
            size_bytes: 7,
        };
        let spec = ConnSpec {
            url: "http://127.0.0.1:1".into(),
            instance: String::new(),
            stream_window: 1 << 20,
            conn_window: 1 << 20,
            workers_per_conn: 4,
        };
        assert_eq!(spec.read_resource(&d), format!("blobs/{}/7", d.hash));
        assert!(spec.upload_resource(&d).starts_with("uploads/"));
        let spec = ConnSpec {
            instance: "main".into(),
            ..spec
        };
        assert_eq!(spec.read_resource(&d), format!("main/blobs/{}/7", d.hash));
        assert!(spec.upload_resource(&d).starts_with("main/uploads/"));
        assert!(
            spec.upload_resource(&d)
                .ends_with(&format!("/blobs/{}/7", d.hash))
        );
    }
}
