//! A connection to a REAPI server and the CAS primitives every command
//! uses: FindMissingBlobs, BatchUpdateBlobs/BatchReadBlobs sized by the
//! server's advertised batch limit, and ByteStream Write/Read for large
//! blobs. Everything read is verified against its digest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use indicatif::ProgressBar;
use kiln_digest::{BlobKey, DigestFunction, Hasher};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, ReadResponse, WriteRequest};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    BatchReadBlobsRequest, FindMissingBlobsRequest, GetCapabilitiesRequest, ServerCapabilities,
};
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::ClientOptions;
use crate::error::{ClientError, ClientResult, code_name, error_chain};
use crate::format::digest_str;

/// How long connecting to the server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Batch limit used when the server advertises none (0) or cannot say.
pub const DEFAULT_MAX_BATCH: u64 = 4 << 20;
/// Upper bound of the batch size used, whatever the server allows, to
/// bound the client's memory.
pub const MAX_BATCH_CAP: u64 = 16 << 20;
/// Allowance per blob for its digest and framing inside a batch message.
const PER_BLOB_OVERHEAD: u64 = 256;
/// Bytes per ByteStream Write message.
const WRITE_CHUNK: usize = 1 << 20;
/// Digests per FindMissingBlobs request.
const FIND_MISSING_CHUNK: usize = 10_000;
/// Largest message the client decodes.
const MAX_DECODE: usize = 64 << 20;
/// RPCs in flight at once for uploads and downloads.
pub const CONCURRENCY: usize = 8;

/// Turns `grpc://HOST:PORT`, `http://HOST:PORT` or `HOST:PORT` into the
/// `http://` URL tonic connects to.
pub fn endpoint_url(endpoint: &str) -> ClientResult<String> {
    let e = endpoint.trim();
    let rest = if let Some(r) = e.strip_prefix("grpc://") {
        r
    } else if let Some(r) = e.strip_prefix("http://") {
        r
    } else if e.starts_with("grpcs://") || e.starts_with("https://") {
        return Err(ClientError::Usage(format!(
            "endpoint {endpoint:?}: TLS (grpcs://, https://) is not supported by this client"
        )));
    } else if let Some((scheme, _)) = e.split_once("://") {
        return Err(ClientError::Usage(format!(
            "endpoint {endpoint:?}: unsupported scheme {scheme:?} (use grpc://HOST:PORT, http://HOST:PORT or HOST:PORT)"
        )));
    } else {
        e
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(ClientError::Usage(format!(
            "endpoint {endpoint:?}: expected grpc://HOST:PORT, http://HOST:PORT or HOST:PORT"
        )));
    }
    Ok(format!("http://{rest}"))
}

/// A connected server, one instance name and one digest function.
pub struct Remote {
    endpoint: String,
    channel: Channel,
    instance: String,
    function: DigestFunction,
    caps: OnceCell<ServerCapabilities>,
}

impl Remote {
    /// Connects (within [`CONNECT_TIMEOUT`]) and asks GetCapabilities; an
    /// unreachable server is [`ClientError::Unreachable`] naming the
    /// endpoint.
    pub async fn connect(opts: &ClientOptions) -> ClientResult<Remote> {
        let url = endpoint_url(&opts.endpoint)?;
        let ep = Endpoint::from_shared(url)
            .map_err(|e| ClientError::Usage(format!("endpoint {:?}: {e}", opts.endpoint)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20);
        let unreachable = |detail: String| ClientError::Unreachable {
            endpoint: opts.endpoint.clone(),
            detail,
        };
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), ep.connect()).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unreachable(connect_detail(&e))),
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let remote = Remote {
            endpoint: opts.endpoint.clone(),
            channel,
            instance: opts.instance.clone(),
            function: opts.digest_function,
            caps: OnceCell::new(),
        };
        // Asked up front: it checks the instance name, so that a wrong one
        // is reported as such and not as a missing blob.
        remote.capabilities().await?;
        Ok(remote)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn function(&self) -> DigestFunction {
        self.function
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn proto_function(&self) -> i32 {
        self.function.to_proto() as i32
    }

    /// GetCapabilities for the instance, asked once. A server without the
    /// Capabilities service (UNIMPLEMENTED) yields empty capabilities.
    pub async fn capabilities(&self) -> ClientResult<&ServerCapabilities> {
        self.caps
            .get_or_try_init(|| async {
                let mut client =
                    CapabilitiesClient::new(self.channel.clone()).max_decoding_message_size(MAX_DECODE);
                match client
                    .get_capabilities(GetCapabilitiesRequest {
                        instance_name: self.instance.clone(),
                    })
                    .await
                {
                    Ok(r) => Ok(r.into_inner()),
                    Err(s) if s.code() == Code::Unimplemented => Ok(ServerCapabilities::default()),
                    Err(s) => Err(ClientError::Rpc {
                        context: format!("GetCapabilities of instance {:?}", self.instance),
                        status: s,
                    }),
                }
            })
            .await
    }

    /// Kiln's live status (workers, queue, running actions); `None` when
    /// the server does not serve `kiln.status.v1.Status` (not Kiln, or
    /// Kiln without a scheduler).
    pub async fn kiln_status(&self) -> ClientResult<Option<kiln_proto::status::StatusResponse>> {
        let mut client = kiln_proto::status::status_client::StatusClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_DECODE);
        match client
            .get_status(kiln_proto::status::GetStatusRequest { max_executing: 20 })
            .await
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == Code::Unimplemented => Ok(None),
            Err(s) => Err(ClientError::Rpc {
                context: "GetStatus".into(),
                status: s,
            }),
        }
    }

    /// The batch limit in use: the advertised one (0 = [`DEFAULT_MAX_BATCH`]),
    /// at most [`MAX_BATCH_CAP`].
    pub async fn max_batch(&self) -> ClientResult<u64> {
        let caps = self.capabilities().await?;
        let advertised = caps
            .cache_capabilities
            .as_ref()
            .map(|c| c.max_batch_total_size_bytes)
            .unwrap_or(0);
        Ok(if advertised <= 0 {
            DEFAULT_MAX_BATCH
        } else {
            (advertised as u64).min(MAX_BATCH_CAP)
        })
    }

    /// Whether a blob of `size` bytes travels in a batch call.
    pub async fn fits_batch(&self, size: u64) -> ClientResult<bool> {
        Ok(size + PER_BLOB_OVERHEAD <= self.max_batch().await?)
    }

    pub(crate) fn cas_client(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone()).max_decoding_message_size(MAX_DECODE)
    }

    fn bytestream_client(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(MAX_DECODE)
    }

    pub(crate) fn ac_client(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone()).max_decoding_message_size(MAX_DECODE)
    }

    pub(crate) fn execution_client(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel.clone()).max_decoding_message_size(MAX_DECODE)
    }

    fn blob_path(&self, key: &BlobKey) -> String {
        let function = if key.function().named_in_resource() {
            format!("{}/", key.function().name())
        } else {
            String::new()
        };
        format!("blobs/{function}{}/{}", key.hash_hex(), key.size())
    }

    fn with_instance(&self, path: String) -> String {
        if self.instance.is_empty() {
            path
        } else {
            format!("{}/{path}", self.instance)
        }
    }

    /// Splits keys (with their sizes) into groups that fit one batch.
    pub async fn batches<T>(&self, items: Vec<(BlobKey, T)>) -> ClientResult<Vec<Vec<(BlobKey, T)>>> {
        let max = self.max_batch().await?;
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut cur_size = 0u64;
        for (k, v) in items {
            let cost = k.size() + PER_BLOB_OVERHEAD;
            if !cur.is_empty() && cur_size + cost > max {
                out.push(std::mem::take(&mut cur));
                cur_size = 0;
            }
            cur_size += cost;
            cur.push((k, v));
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        Ok(out)
    }

    /// The subset of `keys` the CAS does not have (each at most once).
    pub async fn find_missing(&self, keys: &[BlobKey]) -> ClientResult<Vec<BlobKey>> {
        let mut unique: Vec<BlobKey> = keys.to_vec();
        unique.sort();
        unique.dedup();
        let mut missing = Vec::new();
        for chunk in unique.chunks(FIND_MISSING_CHUNK) {
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
                .map_err(ClientError::rpc("FindMissingBlobs"))?
                .into_inner();
            for d in resp.missing_blob_digests {
                match by_digest.get(&(d.hash.clone(), d.size_bytes)) {
                    Some(k) => missing.push((*k).clone()),
                    None => {
                        return Err(ClientError::BadResponse(format!(
                            "FindMissingBlobs reported {}/{} missing, which was not asked about",
                            d.hash, d.size_bytes
                        )));
                    }
                }
            }
        }
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    /// Uploads one batch with BatchUpdateBlobs (the caller sized it).
    pub async fn batch_update(&self, blobs: Vec<(BlobKey, Bytes)>) -> ClientResult<()> {
        if blobs.is_empty() {
            return Ok(());
        }
        let resp = self
            .cas_client()
            .batch_update_blobs(kiln_digest::batch::batch_update_request(
                &self.instance,
                self.proto_function(),
                &blobs,
            ))
            .await
            .map_err(ClientError::rpc("BatchUpdateBlobs"))?
            .into_inner();
        if let Some((what, s)) = kiln_digest::batch::first_failed_update(resp) {
            return Err(ClientError::Rpc {
                context: format!("BatchUpdateBlobs of {what}"),
                status: tonic::Status::new(Code::from_i32(s.code), s.message),
            });
        }
        Ok(())
    }

    /// Reads one batch (the caller sized it). Returns the found blobs,
    /// verified; absent keys were NOT_FOUND.
    pub async fn batch_read(&self, keys: &[BlobKey]) -> ClientResult<HashMap<BlobKey, Bytes>> {
        let mut out = HashMap::with_capacity(keys.len());
        if keys.is_empty() {
            return Ok(out);
        }
        let resp = self
            .cas_client()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: keys.iter().map(BlobKey::to_digest).collect(),
                acceptable_compressors: Vec::new(),
                digest_function: self.proto_function(),
            })
            .await
            .map_err(ClientError::rpc("BatchReadBlobs"))?
            .into_inner();
        let wanted: HashMap<(String, i64), &BlobKey> = keys
            .iter()
            .map(|k| ((k.hash_hex(), k.size() as i64), k))
            .collect();
        for r in resp.responses {
            let Some(d) = r.digest else { continue };
            let Some(key) = wanted.get(&(d.hash, d.size_bytes)) else {
                continue;
            };
            let code = r.status.as_ref().map(|s| s.code).unwrap_or(0);
            if code == Code::NotFound as i32 {
                continue;
            }
            if code != 0 {
                let msg = r.status.map(|s| s.message).unwrap_or_default();
                return Err(ClientError::Rpc {
                    context: format!("BatchReadBlobs of {}", digest_str(key)),
                    status: tonic::Status::new(Code::from_i32(code), msg),
                });
            }
            if r.compressor != 0 {
                return Err(ClientError::BadResponse(format!(
                    "BatchReadBlobs returned {} compressed although no compressor was accepted",
                    digest_str(key)
                )));
            }
            key.verify(&r.data).map_err(|e| {
                ClientError::BadResponse(format!(
                    "the server returned corrupt content for {}: {e}",
                    digest_str(key)
                ))
            })?;
            out.insert((*key).clone(), Bytes::from(r.data));
        }
        Ok(out)
    }

    /// Reads a whole blob into memory (a batch for small ones, ByteStream
    /// for large ones). A missing blob is [`ClientError::NotFound`].
    pub async fn read_blob(&self, key: &BlobKey) -> ClientResult<Bytes> {
        if key.is_empty_blob() {
            return Ok(Bytes::new());
        }
        if self.fits_batch(key.size()).await? {
            let mut got = self.batch_read(std::slice::from_ref(key)).await?;
            return got
                .remove(key)
                .ok_or_else(|| ClientError::NotFound(format!("blob {} not found", digest_str(key))));
        }
        let mut reader = self.open_read(key).await?;
        let mut buf = Vec::with_capacity(key.size().min(64 << 20) as usize);
        while let Some(chunk) = reader.next_chunk().await? {
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    }

    /// Starts a ByteStream Read of `key`.
    pub async fn open_read(&self, key: &BlobKey) -> ClientResult<BlobReader> {
        let stream = self
            .bytestream_client()
            .read(ReadRequest {
                resource_name: self.with_instance(self.blob_path(key)),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .map_err(|s| read_error(key, s))?
            .into_inner();
        Ok(BlobReader {
            key: key.clone(),
            stream,
            hasher: Some(Hasher::new(key.function(), key.size())),
            received: 0,
        })
    }

    /// Uploads an in-memory blob with ByteStream Write.
    pub async fn write_bytes(&self, key: &BlobKey, data: Bytes, progress: &ProgressBar) -> ClientResult<()> {
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
        let pb = progress.clone();
        let stream = futures::StreamExt::map(futures::stream::iter(chunks), move |c| {
            pb.inc(c.data.len() as u64);
            c
        });
        self.send_write(key, stream, None).await
    }

    /// Uploads a file with ByteStream Write, streaming it from disk and
    /// checking that it still hashes to `key`.
    pub async fn write_file(&self, key: &BlobKey, path: &Path, progress: &ProgressBar) -> ClientResult<()> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(ClientError::io(format!("opening {}", path.display())))?;
        let resource = self.write_resource(key);
        let failure: Arc<Mutex<Option<ClientError>>> = Arc::new(Mutex::new(None));
        let state = WriteState {
            file,
            offset: 0,
            resource,
            done: false,
            hasher: Some(Hasher::new(key.function(), key.size())),
            key: key.clone(),
            path: path.to_path_buf(),
            failure: failure.clone(),
            progress: progress.clone(),
        };
        let stream = futures::stream::unfold(state, next_write_request);
        self.send_write(key, stream, Some(failure)).await
    }

    fn write_resource(&self, key: &BlobKey) -> String {
        self.with_instance(format!(
            "uploads/{}/{}",
            uuid::Uuid::new_v4(),
            self.blob_path(key)
        ))
    }

    async fn send_write(
        &self,
        key: &BlobKey,
        stream: impl futures::Stream<Item = WriteRequest> + Send + 'static,
        failure: Option<Arc<Mutex<Option<ClientError>>>>,
    ) -> ClientResult<()> {
        let result = self.bytestream_client().write(stream).await;
        if let Some(e) = failure.and_then(|f| f.lock().take()) {
            return Err(e);
        }
        let resp = result
            .map_err(ClientError::rpc(format!(
                "ByteStream Write of {}",
                digest_str(key)
            )))?
            .into_inner();
        if resp.committed_size != key.size() as i64 && resp.committed_size != -1 {
            return Err(ClientError::BadResponse(format!(
                "ByteStream Write of {} committed {} bytes",
                digest_str(key),
                resp.committed_size
            )));
        }
        Ok(())
    }
}

struct WriteState {
    file: tokio::fs::File,
    offset: u64,
    resource: String,
    done: bool,
    hasher: Option<Hasher>,
    key: BlobKey,
    path: std::path::PathBuf,
    failure: Arc<Mutex<Option<ClientError>>>,
    progress: ProgressBar,
}

/// One step of a file upload: the next chunk, or the end. A read error or
/// a file that no longer matches its digest ends the stream early (the
/// server then sees an unfinished write) and is recorded in `failure`.
async fn next_write_request(mut st: WriteState) -> Option<(WriteRequest, WriteState)> {
    if st.done {
        return None;
    }
    let size = st.key.size();
    let want = WRITE_CHUNK.min(size.saturating_sub(st.offset) as usize);
    let mut buf = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        match st.file.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => {
                *st.failure.lock() = Some(ClientError::Io {
                    context: format!("reading {}", st.path.display()),
                    source: e,
                });
                return None;
            }
        }
    }
    buf.truncate(filled);
    let next = st.offset + filled as u64;
    let changed = || {
        ClientError::Usage(format!(
            "{} changed while it was being uploaded",
            st.path.display()
        ))
    };
    if let Some(h) = st.hasher.as_mut() {
        h.update(&buf);
    }
    let finish = next >= size;
    if finish {
        // One more byte means the file grew.
        let mut probe = [0u8; 1];
        let grew = matches!(st.file.read(&mut probe).await, Ok(n) if n > 0);
        let matches = st.hasher.take().is_some_and(|h| h.verify(&st.key, next).is_ok());
        if grew || !matches {
            *st.failure.lock() = Some(changed());
            return None;
        }
    } else if filled < want {
        *st.failure.lock() = Some(changed());
        return None;
    }
    st.progress.inc(filled as u64);
    let req = WriteRequest {
        resource_name: if st.offset == 0 {
            st.resource.clone()
        } else {
            String::new()
        },
        write_offset: st.offset as i64,
        finish_write: finish,
        data: buf,
    };
    st.offset = next;
    st.done = finish;
    Some((req, st))
}

/// A ByteStream Read in progress; chunks are hashed as they arrive and
/// the end is only reported once the content matched the digest.
pub struct BlobReader {
    key: BlobKey,
    stream: tonic::Streaming<ReadResponse>,
    hasher: Option<Hasher>,
    received: u64,
}

impl BlobReader {
    /// The next chunk, or `None` at the verified end.
    pub async fn next_chunk(&mut self) -> ClientResult<Option<Vec<u8>>> {
        loop {
            match self.stream.message().await {
                Ok(Some(msg)) => {
                    if msg.data.is_empty() {
                        continue;
                    }
                    self.received += msg.data.len() as u64;
                    if self.received > self.key.size() {
                        return Err(ClientError::BadResponse(format!(
                            "ByteStream Read of {} returned more than {} bytes",
                            digest_str(&self.key),
                            self.key.size()
                        )));
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&msg.data);
                    }
                    return Ok(Some(msg.data));
                }
                Ok(None) => {
                    let Some(h) = self.hasher.take() else {
                        return Ok(None);
                    };
                    h.verify(&self.key, self.received).map_err(|e| {
                        ClientError::BadResponse(format!(
                            "the server returned corrupt content for {}: {e}",
                            digest_str(&self.key)
                        ))
                    })?;
                    return Ok(None);
                }
                Err(s) => return Err(read_error(&self.key, s)),
            }
        }
    }
}

fn read_error(key: &BlobKey, status: tonic::Status) -> ClientError {
    if status.code() == Code::NotFound {
        ClientError::NotFound(format!("blob {} not found", digest_str(key)))
    } else {
        ClientError::Rpc {
            context: format!("ByteStream Read of {}", digest_str(key)),
            status,
        }
    }
}

/// A short description of why a connection failed.
fn connect_detail(e: &tonic::transport::Error) -> String {
    let chain = error_chain(e);
    let chain = chain
        .strip_prefix("transport error: ")
        .unwrap_or(&chain)
        .to_string();
    if chain.is_empty() {
        "connection failed".into()
    } else {
        chain
    }
}

/// The message of a failed status, for one-line reports.
pub fn status_line(status: &tonic::Status) -> String {
    format!("{}: {}", code_name(status.code()), status.message())
}
