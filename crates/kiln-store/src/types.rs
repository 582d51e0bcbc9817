use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use kiln_digest::BlobKey;

use crate::StoreResult;

/// How a stored payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// The blob's bytes as hashed.
    Identity = 0,
    /// One or more concatenated zstd frames that decompress to the blob.
    Zstd = 1,
}

/// A whole payload held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub encoding: Encoding,
    pub data: Bytes,
}

impl Blob {
    pub fn identity(data: Bytes) -> Self {
        Blob {
            encoding: Encoding::Identity,
            data,
        }
    }
}

/// A stream of payload chunks.
pub type ChunkStream = BoxStream<'static, StoreResult<Bytes>>;

/// A streaming read in progress.
pub struct BlobRead {
    /// The encoding of the streamed bytes.
    pub encoding: Encoding,
    /// Offset in the *uncompressed* blob at which `stream` starts. Stores
    /// honour the requested offset for identity payloads; zstd payloads are
    /// always streamed whole (offset 0) and the reader skips after decoding.
    pub start: u64,
    /// Total length of the stored payload in `encoding` (from its start).
    pub stored_len: u64,
    pub stream: ChunkStream,
}

/// Sizes a store reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes of payload held (on disk for the disk store), as counted by
    /// the store's own accounting.
    pub bytes: u64,
    pub items: u64,
    /// Capacity in bytes; 0 = unbounded.
    pub capacity: u64,
    pub evictions: u64,
    /// Seconds since the least recently used item was last used (0 if empty).
    pub oldest_age_secs: u64,
}

/// A streaming write. Nothing is visible until [`BlobWriter::commit`];
/// dropping the writer without committing discards everything written.
#[async_trait]
pub trait BlobWriter: Send {
    async fn write(&mut self, chunk: Bytes) -> StoreResult<()>;
    /// Makes the blob visible atomically. The caller has verified it.
    async fn commit(self: Box<Self>) -> StoreResult<()>;
}

/// A blob store. All methods are safe to call concurrently.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short description for logs and metrics, e.g. `memory(1 GiB)`.
    fn describe(&self) -> String;

    /// For each key, whether it is present. The result is aligned with `keys`.
    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>>;

    /// The whole payload, in whatever encoding it is stored in.
    async fn get(&self, key: &BlobKey) -> StoreResult<Option<Blob>>;

    /// Streams the payload. For identity payloads the stream starts at
    /// `offset` (clamped to the blob length); see [`BlobRead::start`].
    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>>;

    /// Stores a whole payload, replacing any previous one for `key`.
    async fn put(&self, key: &BlobKey, blob: Blob) -> StoreResult<()>;

    /// Starts a streaming write of a payload in `encoding`.
    async fn begin_write(&self, key: &BlobKey, encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>>;

    /// Current sizes. Cheap; called by metrics and tests.
    fn stats(&self) -> StoreStats;
}
