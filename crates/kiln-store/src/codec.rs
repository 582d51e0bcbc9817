//! Converting payloads between encodings: used by readers that need a
//! specific encoding regardless of how a store holds the blob.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kiln_digest::BlobKey;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::{Blob, BlobRead, ChunkStream, Encoding, Store, StoreError, StoreResult};

/// zstd level used when Kiln compresses on its own behalf (fast, ~ level 1).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Output chunk size of streaming conversions.
const OUT_CHUNK: usize = 256 * 1024;

fn corrupt(key: Option<&BlobKey>, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.map(|k| k.to_string()).unwrap_or_default(),
        detail: format!("zstd: {e}"),
    }
}

/// Compresses a whole buffer into one zstd frame.
pub fn compress(data: &[u8], level: i32) -> StoreResult<Bytes> {
    zstd::bulk::compress(data, level)
        .map(Bytes::from)
        .map_err(|e| StoreError::Internal(format!("zstd compression failed: {e}")))
}

/// Decompresses a whole zstd payload whose uncompressed size is `size`.
pub fn decompress(data: &[u8], size: u64) -> StoreResult<Bytes> {
    let out = zstd::bulk::decompress(data, size as usize).map_err(|e| corrupt(None, e))?;
    if out.len() as u64 != size {
        return Err(corrupt(
            None,
            format!("decoded {} bytes, expected {size}", out.len()),
        ));
    }
    Ok(Bytes::from(out))
}

/// Turns a stored payload into the blob's plain bytes.
pub fn to_identity(key: &BlobKey, blob: Blob) -> StoreResult<Bytes> {
    match blob.encoding {
        Encoding::Identity => Ok(blob.data),
        Encoding::Zstd => decompress(&blob.data, key.size()).map_err(|e| match e {
            StoreError::Corrupt { detail, .. } => StoreError::Corrupt {
                key: key.to_string(),
                detail,
            },
            other => other,
        }),
    }
}

/// Reads a whole blob as plain bytes (`None` if absent).
pub async fn get_identity(store: &dyn Store, key: &BlobKey) -> StoreResult<Option<Bytes>> {
    match store.get(key).await? {
        Some(blob) => to_identity(key, blob).map(Some),
        None => Ok(None),
    }
}

/// Streams plain bytes starting at `offset` of the uncompressed blob.
pub fn identity_stream(read: BlobRead, offset: u64) -> ChunkStream {
    let skip = offset.saturating_sub(read.start);
    let decoded = match read.encoding {
        Encoding::Identity => read.stream,
        Encoding::Zstd => decode_stream(read.stream),
    };
    if skip == 0 {
        return decoded;
    }
    let mut remaining = skip;
    decoded
        .filter_map(move |chunk| {
            let out = match chunk {
                Err(e) => Some(Err(e)),
                Ok(c) if remaining >= c.len() as u64 => {
                    remaining -= c.len() as u64;
                    None
                }
                Ok(c) => {
                    let c = c.slice(remaining as usize..);
                    remaining = 0;
                    Some(Ok(c))
                }
            };
            futures::future::ready(out)
        })
        .boxed()
}

/// Streams the blob as zstd frames starting at uncompressed `offset`. A
/// zstd payload read from its start is passed through untouched (no CPU).
pub fn zstd_stream(read: BlobRead, offset: u64, level: i32) -> ChunkStream {
    if read.encoding == Encoding::Zstd && offset == 0 {
        return read.stream;
    }
    encode_stream(identity_stream(read, offset), level)
}

/// Decodes a stream of zstd bytes into plain bytes.
pub fn decode_stream(input: ChunkStream) -> ChunkStream {
    let state = (input, Decoder::new().ok(), false);
    futures::stream::unfold(state, |(mut input, mut dec, done)| async move {
        if done {
            return None;
        }
        let Some(decoder) = dec.as_mut() else {
            return Some((Err(corrupt(None, "cannot create decoder")), (input, None, true)));
        };
        match input.next().await {
            None => None,
            Some(Err(e)) => Some((Err(e), (input, dec, true))),
            Some(Ok(chunk)) => match run_op(decoder, &chunk) {
                Ok(out) => Some((Ok(out), (input, dec, false))),
                Err(e) => Some((Err(e), (input, dec, true))),
            },
        }
    })
    .filter(|r| futures::future::ready(!matches!(r, Ok(b) if b.is_empty())))
    .boxed()
}

/// Encodes a stream of plain bytes into zstd (one frame for the stream).
pub fn encode_stream(input: ChunkStream, level: i32) -> ChunkStream {
    let state = (input, Encoder::new(level).ok(), false);
    futures::stream::unfold(state, |(mut input, mut enc, done)| async move {
        if done {
            return None;
        }
        let Some(encoder) = enc.as_mut() else {
            return Some((
                Err(StoreError::Internal("cannot create zstd encoder".into())),
                (input, None, true),
            ));
        };
        match input.next().await {
            None => {
                let r = finish_encoder(encoder);
                Some((r, (input, enc, true)))
            }
            Some(Err(e)) => Some((Err(e), (input, enc, true))),
            Some(Ok(chunk)) => match run_op(encoder, &chunk) {
                Ok(out) => Some((Ok(out), (input, enc, false))),
                Err(e) => Some((Err(e), (input, enc, true))),
            },
        }
    })
    .filter(|r| futures::future::ready(!matches!(r, Ok(b) if b.is_empty())))
    .boxed()
}

fn run_op<O: Operation>(op: &mut O, chunk: &[u8]) -> StoreResult<Bytes> {
    let mut input = InBuffer::around(chunk);
    let mut out = BytesMut::new();
    let mut buf = vec![0u8; OUT_CHUNK];
    loop {
        let mut output = OutBuffer::around(&mut buf[..]);
        op.run(&mut input, &mut output).map_err(|e| corrupt(None, e))?;
        let n = output.pos();
        out.extend_from_slice(&buf[..n]);
        if input.pos() == chunk.len() && n < buf.len() {
            break;
        }
    }
    Ok(out.freeze())
}

fn finish_encoder(enc: &mut Encoder<'static>) -> StoreResult<Bytes> {
    let mut out = BytesMut::new();
    let mut buf = vec![0u8; OUT_CHUNK];
    loop {
        let mut output = OutBuffer::around(&mut buf[..]);
        let remaining = enc
            .finish(&mut output, true)
            .map_err(|e| StoreError::Internal(format!("zstd: {e}")))?;
        let n = output.pos();
        out.extend_from_slice(&buf[..n]);
        if remaining == 0 {
            break;
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn chunks(data: &[u8], n: usize) -> ChunkStream {
        let v: Vec<StoreResult<Bytes>> = data.chunks(n).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures::stream::iter(v).boxed()
    }

    async fn collect(s: ChunkStream) -> Vec<u8> {
        s.try_collect::<Vec<Bytes>>().await.unwrap().concat()
    }

    #[tokio::test]
    async fn stream_round_trip_with_offsets() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 13) as u8).collect();
        let z = collect(encode_stream(chunks(&data, 10_000), 3)).await;
        assert!(z.len() < data.len() / 10);
        assert_eq!(decompress(&z, data.len() as u64).unwrap(), data);
        for offset in [0u64, 1, 9_999, 10_000, 599_999, 600_000] {
            let read = BlobRead {
                encoding: Encoding::Zstd,
                start: 0,
                stored_len: z.len() as u64,
                stream: chunks(&z, 777),
            };
            assert_eq!(
                collect(identity_stream(read, offset)).await,
                &data[offset as usize..]
            );
        }
    }

    #[tokio::test]
    async fn corrupt_zstd_is_an_error() {
        let read = BlobRead {
            encoding: Encoding::Zstd,
            start: 0,
            stored_len: 5,
            stream: chunks(b"nope!", 5),
        };
        assert!(
            identity_stream(read, 0)
                .try_collect::<Vec<Bytes>>()
                .await
                .is_err()
        );
    }
}
