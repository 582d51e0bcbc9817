//! Stores payloads zstd-compressed at rest.
//!
//! * `put` of an identity payload compresses it (one zstd frame; on the
//!   blocking pool above [`BLOCKING_THRESHOLD`]) and stores it as
//!   [`Encoding::Zstd`]; a zstd payload is stored untouched.
//! * `begin_write(Identity)` compresses the stream incrementally into an
//!   inner zstd writer; `begin_write(Zstd)` passes through.
//! * Payloads under [`MIN_COMPRESS`] bytes are stored as identity: framing
//!   would cost more than it saves. Readers handle both encodings.
//! * Reads return whatever the inner store holds (mostly zstd), so serving
//!   a compressed read costs no CPU; `codec` converts for identity readers.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use kiln_digest::BlobKey;
use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};

use crate::{Blob, BlobRead, BlobWriter, Encoding, Store, StoreError, StoreResult, StoreStats, codec, task};

/// Identity payloads shorter than this are stored uncompressed.
pub const MIN_COMPRESS: u64 = 64;
/// Payloads (or written chunks) larger than this are compressed on the
/// blocking pool rather than on an async worker thread.
pub const BLOCKING_THRESHOLD: usize = 64 * 1024;
/// Output buffer size of the incremental encoder.
const OUT_BUF: usize = 128 * 1024;

/// Compresses identity payloads on their way into `inner`.
pub struct CompressedStore {
    inner: Arc<dyn Store>,
    level: i32,
}

impl CompressedStore {
    /// `level` is a zstd level (see [`codec::DEFAULT_ZSTD_LEVEL`]).
    pub fn new(inner: Arc<dyn Store>, level: i32) -> Self {
        CompressedStore { inner, level }
    }
}

#[async_trait]
impl Store for CompressedStore {
    fn describe(&self) -> String {
        format!("zstd(level {}, {})", self.level, self.inner.describe())
    }

    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        self.inner.has_many(keys).await
    }

    async fn get(&self, key: &BlobKey) -> StoreResult<Option<Blob>> {
        self.inner.get(key).await
    }

    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>> {
        self.inner.read(key, offset).await
    }

    async fn put(&self, key: &BlobKey, blob: Blob) -> StoreResult<()> {
        if blob.encoding == Encoding::Zstd || (blob.data.len() as u64) < MIN_COMPRESS {
            return self.inner.put(key, blob).await;
        }
        let level = self.level;
        let data = blob.data;
        let compressed = if data.len() > BLOCKING_THRESHOLD {
            task::blocking("zstd-compress", move || codec::compress(&data, level)).await??
        } else {
            codec::compress(&data, level)?
        };
        self.inner
            .put(
                key,
                Blob {
                    encoding: Encoding::Zstd,
                    data: compressed,
                },
            )
            .await
    }

    async fn begin_write(&self, key: &BlobKey, encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        if encoding == Encoding::Zstd || key.size() < MIN_COMPRESS {
            return self.inner.begin_write(key, encoding).await;
        }
        let encoder = Encoder::new(self.level)
            .map_err(|e| StoreError::Internal(format!("cannot create zstd encoder for {key}: {e}")))?;
        let inner = self.inner.begin_write(key, Encoding::Zstd).await?;
        Ok(Box::new(CompressingWriter {
            key: key.clone(),
            encoder: Some(encoder),
            inner,
        }))
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

/// Compresses identity chunks into one zstd frame written to `inner`.
struct CompressingWriter {
    key: BlobKey,
    /// `None` only while a large chunk is being compressed on the blocking
    /// pool, or after that task failed.
    encoder: Option<Encoder<'static>>,
    inner: Box<dyn BlobWriter>,
}

impl CompressingWriter {
    fn zstd_error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Internal(format!("zstd compression of {} failed: {e}", self.key))
    }

    /// Runs `step` on the encoder, off the async threads when `large`.
    async fn run(
        &mut self,
        large: bool,
        step: impl FnOnce(&mut Encoder<'static>) -> std::io::Result<Bytes> + Send + 'static,
    ) -> StoreResult<Bytes> {
        let Some(mut encoder) = self.encoder.take() else {
            return Err(self.zstd_error("encoder lost by an earlier failure"));
        };
        let (encoder, out) = if large {
            task::blocking("zstd-compress-stream", move || {
                let out = step(&mut encoder);
                (encoder, out)
            })
            .await?
        } else {
            let out = step(&mut encoder);
            (encoder, out)
        };
        self.encoder = Some(encoder);
        out.map_err(|e| self.zstd_error(e))
    }
}

/// Feeds `chunk` through the encoder, returning what it produced so far.
fn compress_chunk(encoder: &mut Encoder<'static>, chunk: &[u8]) -> std::io::Result<Bytes> {
    let mut input = InBuffer::around(chunk);
    let mut out = BytesMut::new();
    let mut buf = vec![0u8; OUT_BUF];
    while input.pos() < chunk.len() {
        let mut output = OutBuffer::around(&mut buf[..]);
        encoder.run(&mut input, &mut output)?;
        let n = output.pos();
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out.freeze())
}

/// Ends the frame, returning the remaining compressed bytes.
fn finish_frame(encoder: &mut Encoder<'static>) -> std::io::Result<Bytes> {
    let mut out = BytesMut::new();
    let mut buf = vec![0u8; OUT_BUF];
    loop {
        let mut output = OutBuffer::around(&mut buf[..]);
        let remaining = encoder.finish(&mut output, true)?;
        let n = output.pos();
        out.extend_from_slice(&buf[..n]);
        if remaining == 0 {
            return Ok(out.freeze());
        }
    }
}

#[async_trait]
impl BlobWriter for CompressingWriter {
    async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let large = chunk.len() > BLOCKING_THRESHOLD;
        let out = self.run(large, move |enc| compress_chunk(enc, &chunk)).await?;
        if out.is_empty() {
            return Ok(());
        }
        self.inner.write(out).await
    }

    async fn commit(mut self: Box<Self>) -> StoreResult<()> {
        let tail = self.run(false, finish_frame).await?;
        if !tail.is_empty() {
            self.inner.write(tail).await?;
        }
        self.inner.commit().await
    }
}
