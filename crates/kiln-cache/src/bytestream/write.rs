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
use kiln_proto::bytestream::{WriteRequest, WriteResponse};
use kiln_store::{BlobWriter, Encoding};
use tonic::{Status, Streaming};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use super::resource::{self, Compressor};
use super::uploads::{ActiveUpload, PartialUpload, Uploads};
use crate::{CacheError, CacheResult, Instance, Instances};

/// How often a long upload re-checks whether its blob appeared meanwhile
/// (another client finished the same upload), to return early.
const EXISTENCE_RECHECK: Duration = Duration::from_secs(1);
/// Decoder output buffer of compressed uploads; decoded bytes are only
/// hashed, never kept.
const DECODE_BUF: usize = 256 * 1024;

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
            let data = Bytes::from(std::mem::take(&mut msg.data));
            upload.ingest(&key, data).await?;
            active.set_progress(upload.committed);
        }
        if msg.finish_write {
            return upload.finish(&key, active).await.map_err(Status::from);
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
                let (committed, partial) = upload.into_partial();
                active.pause(partial);
                return Ok(WriteResponse {
                    committed_size: committed as i64,
                });
            }
            Err(status) => {
                let (_, partial) = upload.into_partial();
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
    hasher: Hasher,
    /// Bytes received in the client's units: plain bytes for identity
    /// uploads, compressed bytes for zstd uploads.
    committed: u64,
    /// Plain bytes hashed so far.
    plain: u64,
    zstd: Option<ZstdIngest>,
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
                return Ok(Upload {
                    writer: p.writer,
                    hasher: p.hasher,
                    committed: p.committed,
                    plain: p.committed,
                    zstd: None,
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
        let (encoding, zstd) = match compressor {
            Compressor::Identity => (Encoding::Identity, None),
            Compressor::Zstd => (Encoding::Zstd, Some(ZstdIngest::new().map_err(Restart::Failed)?)),
        };
        let writer = instance
            .cas
            .begin_write(key, encoding)
            .await
            .map_err(|e| Restart::Failed(CacheError::store(format!("starting the write of {key}"))(e)))?;
        Ok(Upload {
            writer,
            hasher: Hasher::new(key.function(), key.size()),
            committed: 0,
            plain: 0,
            zstd,
        })
    }

    /// Hashes `data` (decoding it first for zstd uploads) and hands it to
    /// the store writer. Rejects data beyond the declared size before
    /// storing it.
    async fn ingest(&mut self, key: &BlobKey, data: Bytes) -> CacheResult<()> {
        let len = data.len() as u64;
        match self.zstd.as_mut() {
            None => {
                if self.plain + len > key.size() {
                    return Err(too_much(key, self.plain + len));
                }
                self.hasher.update(&data);
                self.plain += len;
            }
            Some(z) => z.feed(&data, key, &mut self.hasher, &mut self.plain)?,
        }
        self.writer
            .write(data)
            .await
            .map_err(CacheError::store(format!("writing {key}")))?;
        self.committed += len;
        Ok(())
    }

    /// Verifies the digest and commits; only then is the blob visible.
    async fn finish(self, key: &BlobKey, active: ActiveUpload) -> CacheResult<WriteResponse> {
        if let Some(z) = &self.zstd
            && !z.frame_complete()
        {
            return Err(CacheError::InvalidArgument(format!(
                "compressed upload of {key} ends in the middle of a zstd frame"
            )));
        }
        self.hasher.verify(key, self.plain)?;
        self.writer
            .commit()
            .await
            .map_err(CacheError::store(format!("committing {key}")))?;
        let committed_size = self.committed as i64;
        active.complete(committed_size);
        Ok(WriteResponse { committed_size })
    }

    /// What to park when the stream ends early: identity uploads keep their
    /// writer; compressed ones are dropped and report 0.
    fn into_partial(self) -> (u64, Option<Box<PartialUpload>>) {
        if self.zstd.is_some() {
            return (0, None);
        }
        let committed = self.committed;
        let partial = PartialUpload {
            writer: self.writer,
            hasher: self.hasher,
            committed,
        };
        (committed, Some(Box::new(partial)))
    }
}

fn too_much(key: &BlobKey, got: u64) -> CacheError {
    CacheError::InvalidArgument(format!(
        "upload of {key} carries at least {got} bytes, more than its size {}",
        key.size()
    ))
}

/// Incremental zstd decoding of an upload, for hashing only.
struct ZstdIngest {
    decoder: Decoder<'static>,
    out: Box<[u8]>,
    /// The decoder's last hint; 0 once a frame is complete and flushed.
    hint: usize,
}

impl ZstdIngest {
    fn new() -> CacheResult<Self> {
        let decoder = Decoder::new().map_err(|e| {
            CacheError::store("creating a zstd decoder")(kiln_store::StoreError::Internal(e.to_string()))
        })?;
        Ok(ZstdIngest {
            decoder,
            out: vec![0u8; DECODE_BUF].into_boxed_slice(),
            hint: 1,
        })
    }

    fn feed(&mut self, data: &[u8], key: &BlobKey, hasher: &mut Hasher, plain: &mut u64) -> CacheResult<()> {
        let mut input = InBuffer::around(data);
        loop {
            let mut output = OutBuffer::around(&mut self.out[..]);
            let consumed = input.pos();
            let hint = self.decoder.run(&mut input, &mut output).map_err(|e| {
                CacheError::InvalidArgument(format!("compressed upload of {key} is not valid zstd: {e}"))
            })?;
            // 0 = a frame just completed. A call that neither consumed nor
            // produced anything (flushing after an exactly full buffer, once
            // the frame is done) reports what the *next* frame needs, not
            // the state of the one just finished: keep the old hint then.
            if hint == 0 || input.pos() > consumed || output.pos() > 0 {
                self.hint = hint;
            }
            let n = output.pos();
            if n > 0 {
                if *plain + n as u64 > key.size() {
                    return Err(too_much(key, *plain + n as u64));
                }
                hasher.update(&self.out[..n]);
                *plain += n as u64;
            }
            if input.pos() == data.len() && n < self.out.len() {
                return Ok(());
            }
        }
    }

    fn frame_complete(&self) -> bool {
        self.hint == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_digest::DigestFunction;

    /// Feeds `z` in `step`-byte pieces; returns (frame complete, plain bytes, hash ok).
    fn ingest(z: &[u8], step: usize, plain: &[u8]) -> CacheResult<(bool, u64, bool)> {
        let key = BlobKey::of(DigestFunction::Sha256, plain);
        let mut ing = ZstdIngest::new()?;
        let mut hasher = Hasher::new(key.function(), key.size());
        let mut n = 0u64;
        for piece in z.chunks(step.max(1)) {
            ing.feed(piece, &key, &mut hasher, &mut n)?;
        }
        Ok((ing.frame_complete(), n, hasher.verify(&key, n).is_ok()))
    }

    #[test]
    fn zstd_ingest_tracks_frames_across_chunkings() {
        // Sizes around multiples of the decode buffer exercise the flush edge.
        for len in [
            1usize,
            1000,
            DECODE_BUF - 1,
            DECODE_BUF,
            DECODE_BUF + 1,
            4 * DECODE_BUF,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (i / 997) as u8).collect();
            let z = zstd::bulk::compress(&plain, 1).unwrap();
            for step in [1usize, 7, 4096, z.len()] {
                let (done, n, ok) = ingest(&z, step, &plain).unwrap();
                assert!(done && ok && n == len as u64, "len {len} step {step}");
            }
            // Truncated: hashed bytes may be short and the frame is open.
            let (done, _, _) = ingest(&z[..z.len() - 1], 4096, &plain).unwrap();
            assert!(!done, "truncated len {len}");
        }
    }

    #[test]
    fn zstd_ingest_accepts_concatenated_frames() {
        let a = vec![b'a'; DECODE_BUF];
        let b = vec![b'b'; 1234];
        let mut z = zstd::bulk::compress(&a, 3).unwrap();
        z.extend_from_slice(&zstd::bulk::compress(&b, 3).unwrap());
        let plain = [a, b].concat();
        let (done, n, ok) = ingest(&z, 100, &plain).unwrap();
        assert!(done && ok && n == plain.len() as u64);
    }

    #[test]
    fn zstd_ingest_rejects_garbage_and_excess() {
        assert_eq!(
            ingest(b"definitely not zstd", 5, b"x").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        // Decodes to more than the declared size.
        let big = vec![7u8; 10_000];
        let z = zstd::bulk::compress(&big, 1).unwrap();
        let err = ingest(&z, 1000, &big[..100]).unwrap_err();
        assert!(err.to_string().contains("more than its size"), "{err}");
    }
}
