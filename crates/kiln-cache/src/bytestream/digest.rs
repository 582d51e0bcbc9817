//! Verifying upload content as it arrives: hashing (after zstd decoding for
//! compressed uploads), pipelined onto the blocking pool for large uploads
//! so that hashing one batch overlaps receiving the next.

use bytes::Bytes;
use kiln_digest::{BlobKey, Hasher};
use kiln_store::StoreError;
use tokio::task::JoinHandle;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::{CacheError, CacheResult};

/// Bytes collected before a batch is handed to the blocking pool. Uploads
/// smaller than this are hashed inline, with no thread hand-off at all.
const BATCH_BYTES: usize = 1 << 20;
/// Decoder output buffer of compressed uploads; decoded bytes are only
/// hashed, never kept.
const DECODE_BUF: usize = 256 * 1024;

/// The synchronous state: hasher, count of plain bytes, zstd decoder.
pub struct Digester {
    key: BlobKey,
    hasher: Hasher,
    plain: u64,
    zstd: Option<ZstdIngest>,
}

impl Digester {
    /// For plain bytes, continuing a hasher that has seen `plain` bytes.
    pub fn identity(key: BlobKey, hasher: Hasher, plain: u64) -> Self {
        Digester {
            key,
            hasher,
            plain,
            zstd: None,
        }
    }

    /// For zstd bytes that decode to the blob.
    pub fn zstd(key: BlobKey) -> CacheResult<Self> {
        let hasher = Hasher::new(key.function(), key.size());
        Ok(Digester {
            key,
            hasher,
            plain: 0,
            zstd: Some(ZstdIngest::new()?),
        })
    }

    fn feed(&mut self, data: &[u8]) -> CacheResult<()> {
        match self.zstd.as_mut() {
            None => {
                let total = self.plain + data.len() as u64;
                if total > self.key.size() {
                    return Err(too_much(&self.key, total));
                }
                self.hasher.update(data);
                self.plain = total;
                Ok(())
            }
            Some(z) => z.feed(data, &self.key, &mut self.hasher, &mut self.plain),
        }
    }

    /// Checks the content against the key (and that the zstd stream ended
    /// on a frame boundary).
    pub fn verify(self) -> CacheResult<()> {
        if let Some(z) = &self.zstd
            && !z.frame_complete()
        {
            return Err(CacheError::InvalidArgument(format!(
                "compressed upload of {} ends in the middle of a zstd frame",
                self.key
            )));
        }
        self.hasher.verify(&self.key, self.plain)?;
        Ok(())
    }

    /// The hasher and the plain bytes it has seen (to park an upload).
    pub fn into_hasher(self) -> (Hasher, u64) {
        (self.hasher, self.plain)
    }
}

pub fn too_much(key: &BlobKey, got: u64) -> CacheError {
    CacheError::InvalidArgument(format!(
        "upload of {key} carries at least {got} bytes, more than its size {}",
        key.size()
    ))
}

type Job = JoinHandle<(Box<Digester>, CacheResult<()>)>;

enum State {
    Idle(Box<Digester>),
    Busy(Job),
    /// A batch failed; the error was (or will be) reported.
    Broken,
}

/// A [`Digester`] fed in batches, at most one batch in flight on the
/// blocking pool. Errors of a batch surface at the next `push` or at
/// `finish`; nothing is committed before `finish` succeeds.
pub struct Pipeline {
    state: State,
    batch: Vec<Bytes>,
    batch_len: usize,
}

impl Pipeline {
    pub fn new(digester: Digester) -> Self {
        Pipeline {
            state: State::Idle(Box::new(digester)),
            batch: Vec::new(),
            batch_len: 0,
        }
    }

    /// Queues `data` (a reference-counted view, no copy).
    pub async fn push(&mut self, data: Bytes) -> CacheResult<()> {
        self.batch_len += data.len();
        self.batch.push(data);
        if self.batch_len >= BATCH_BYTES {
            let mut digester = self.take().await?;
            let batch = std::mem::take(&mut self.batch);
            self.batch_len = 0;
            self.state = State::Busy(tokio::task::spawn_blocking(move || {
                let r = batch.iter().try_for_each(|b| digester.feed(b));
                (digester, r)
            }));
        }
        Ok(())
    }

    /// Waits for the batch in flight, digests the rest inline and returns
    /// the digester.
    pub async fn finish(mut self) -> CacheResult<Digester> {
        let mut digester = self.take().await?;
        for b in &self.batch {
            digester.feed(b)?;
        }
        Ok(*digester)
    }

    async fn take(&mut self) -> CacheResult<Box<Digester>> {
        match std::mem::replace(&mut self.state, State::Broken) {
            State::Idle(d) => Ok(d),
            State::Busy(job) => {
                let (d, r) = job.await.map_err(|e| {
                    CacheError::store("hashing upload data")(StoreError::Internal(format!(
                        "hashing task failed: {e}"
                    )))
                })?;
                r.map(|()| d)
            }
            State::Broken => Err(CacheError::store("hashing upload data")(StoreError::Internal(
                "the upload's digest state was lost after an earlier error".into(),
            ))),
        }
    }
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
        let decoder = Decoder::new()
            .map_err(|e| CacheError::store("creating a zstd decoder")(StoreError::Internal(e.to_string())))?;
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

    /// The pipeline gives the same digest whatever the message sizes, with
    /// and without batches going to the blocking pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipeline_matches_one_shot_hash() {
        let data: Vec<u8> = (0..5 * BATCH_BYTES + 17).map(|i| (i % 253) as u8).collect();
        for f in [DigestFunction::Sha256, DigestFunction::Blake3] {
            let key = BlobKey::of(f, &data);
            for step in [
                16 * 1024,
                BATCH_BYTES - 1,
                BATCH_BYTES,
                3 * BATCH_BYTES,
                data.len(),
            ] {
                let mut p = Pipeline::new(Digester::identity(key.clone(), Hasher::new(f, key.size()), 0));
                for piece in data.chunks(step) {
                    p.push(Bytes::copy_from_slice(piece)).await.unwrap();
                }
                p.finish().await.unwrap().verify().unwrap();
            }
            // One byte different fails.
            let mut bad = data.clone();
            bad[3 * BATCH_BYTES] ^= 1;
            let mut p = Pipeline::new(Digester::identity(key.clone(), Hasher::new(f, key.size()), 0));
            for piece in bad.chunks(BATCH_BYTES) {
                p.push(Bytes::copy_from_slice(piece)).await.unwrap();
            }
            assert!(p.finish().await.unwrap().verify().is_err());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipeline_reports_batch_errors() {
        let key = BlobKey::of(DigestFunction::Sha256, b"tiny");
        let mut p = Pipeline::new(Digester::zstd(key).unwrap());
        let garbage = Bytes::from(vec![0xAB; BATCH_BYTES]);
        // The first full batch goes to the pool; its error shows up later.
        p.push(garbage.clone()).await.unwrap();
        let later = p.push(garbage).await;
        let err = match later {
            Err(e) => e,
            Ok(()) => p.finish().await.err().unwrap(),
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
}
