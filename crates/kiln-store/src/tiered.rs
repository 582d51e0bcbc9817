//! A fast tier (typically memory) in front of a slow, durable one
//! (typically disk).
//!
//! * Reads try the fast tier first; on a miss they read the slow tier and
//!   fill the fast one: `get` puts the blob into the fast tier, `read` tees
//!   the stream into a fast-tier writer that is committed only once the whole
//!   payload went through without error. A streamed read at a non-zero
//!   identity offset is served from the slow tier without filling (the
//!   stream does not carry the whole payload).
//! * Writes go to both tiers. The slow tier is the durable one: its errors
//!   fail the write; fast-tier errors are logged and otherwise ignored.
//! * A failing fast tier never fails a request: the slow tier answers.
//! * `stats()` reports the slow tier (the durable contents); the fast tier
//!   has its own stats if it is wired to metrics separately.
//! * What the fast tier serves (reads, existence checks) is reported to the
//!   slow tier in the background ([`crate::touch_behind`]), so a blob in
//!   use stays recent in the durable tier too.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use kiln_digest::BlobKey;

use crate::touch_behind::{self, TouchQueue};
use crate::{Blob, BlobRead, BlobWriter, ChunkStream, Encoding, Store, StoreError, StoreResult, StoreStats};

/// A fast store caching a slow one.
pub struct TieredStore {
    fast: Arc<dyn Store>,
    slow: Arc<dyn Store>,
    /// Keys the fast tier served, for the slow tier's recency.
    touched: Option<Arc<TouchQueue>>,
}

impl TieredStore {
    /// Reports fast-tier hits to the slow tier every second.
    pub fn new(fast: Arc<dyn Store>, slow: Arc<dyn Store>) -> Self {
        Self::with_touch_interval(fast, slow, Some(touch_behind::DEFAULT_INTERVAL))
    }

    /// `touch_interval`: how often fast-tier hits are reported to the slow
    /// tier (`None`: never; also never outside a tokio runtime, where the
    /// reporting task cannot run).
    pub fn with_touch_interval(
        fast: Arc<dyn Store>,
        slow: Arc<dyn Store>,
        touch_interval: Option<std::time::Duration>,
    ) -> Self {
        let touched = touch_interval.and_then(|interval| TouchQueue::start(slow.clone(), interval));
        TieredStore { fast, slow, touched }
    }

    fn touched<'a>(&self, keys: impl IntoIterator<Item = &'a BlobKey>) {
        if let Some(q) = &self.touched {
            q.record(keys);
        }
    }
}

/// Logs a fast-tier failure: expected refusals (blob too large for the
/// fast tier, tier full) at debug, anything else as a warning.
fn log_fast_error(what: &str, key: &BlobKey, e: &StoreError) {
    match e {
        StoreError::TooLarge { .. } | StoreError::Full(_) => {
            tracing::debug!(%key, error = %e, "fast tier skipped {what}")
        }
        _ => tracing::warn!(%key, error = %e, "fast tier {what} failed"),
    }
}

#[async_trait]
impl Store for TieredStore {
    fn describe(&self) -> String {
        format!(
            "tiered(fast: {}, slow: {})",
            self.fast.describe(),
            self.slow.describe()
        )
    }

    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        let mut found = match self.fast.has_many(keys).await {
            Ok(found) if found.len() == keys.len() => found,
            Ok(found) => {
                tracing::warn!(
                    asked = keys.len(),
                    answered = found.len(),
                    "fast tier has_many answered a different number of keys"
                );
                vec![false; keys.len()]
            }
            Err(e) => {
                tracing::warn!(error = %e, "fast tier has_many failed");
                vec![false; keys.len()]
            }
        };
        self.touched(keys.iter().zip(&found).filter(|(_, f)| **f).map(|(k, _)| k));
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| !found[i]).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        let ask: Vec<BlobKey> = missing.iter().map(|&i| keys[i].clone()).collect();
        let slow = self.slow.has_many(&ask).await?;
        if slow.len() != ask.len() {
            return Err(StoreError::Internal(format!(
                "slow tier has_many answered {} of {} keys",
                slow.len(),
                ask.len()
            )));
        }
        for (i, present) in missing.into_iter().zip(slow) {
            found[i] = present;
        }
        Ok(found)
    }

    async fn get(&self, key: &BlobKey) -> StoreResult<Option<Blob>> {
        match self.fast.get(key).await {
            Ok(Some(blob)) => {
                self.touched([key]);
                return Ok(Some(blob));
            }
            Ok(None) => {}
            Err(e) => log_fast_error("get", key, &e),
        }
        let Some(blob) = self.slow.get(key).await? else {
            return Ok(None);
        };
        if let Err(e) = self.fast.put(key, blob.clone()).await {
            log_fast_error("fill", key, &e);
        }
        Ok(Some(blob))
    }

    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>> {
        match self.fast.read(key, offset).await {
            Ok(Some(read)) => {
                self.touched([key]);
                return Ok(Some(read));
            }
            Ok(None) => {}
            Err(e) => log_fast_error("read", key, &e),
        }
        let Some(read) = self.slow.read(key, offset).await? else {
            return Ok(None);
        };
        if read.start != 0 {
            return Ok(Some(read));
        }
        let writer = match self.fast.begin_write(key, read.encoding).await {
            Ok(w) => w,
            Err(e) => {
                log_fast_error("fill", key, &e);
                return Ok(Some(read));
            }
        };
        let BlobRead {
            encoding,
            start,
            stored_len,
            stream,
        } = read;
        Ok(Some(BlobRead {
            encoding,
            start,
            stored_len,
            stream: tee(stream, writer, key.clone(), stored_len),
        }))
    }

    async fn put(&self, key: &BlobKey, blob: Blob) -> StoreResult<()> {
        let (slow, fast) = futures::join!(self.slow.put(key, blob.clone()), self.fast.put(key, blob));
        if let Err(e) = fast {
            log_fast_error("put", key, &e);
        }
        slow
    }

    async fn begin_write(&self, key: &BlobKey, encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        let slow = self.slow.begin_write(key, encoding).await?;
        let fast = match self.fast.begin_write(key, encoding).await {
            Ok(w) => Some(w),
            Err(e) => {
                log_fast_error("write", key, &e);
                None
            }
        };
        Ok(Box::new(TieredWriter {
            key: key.clone(),
            slow,
            fast,
        }))
    }

    fn stats(&self) -> StoreStats {
        self.slow.stats()
    }
}

/// State of a read that fills the fast tier as it streams.
struct Tee {
    input: ChunkStream,
    writer: Option<Box<dyn BlobWriter>>,
    key: BlobKey,
    expected: u64,
    seen: u64,
    done: bool,
}

impl Tee {
    /// Commits the fast-tier copy if exactly the whole payload went through.
    async fn finish(&mut self) {
        let Some(writer) = self.writer.take() else { return };
        if self.seen != self.expected {
            tracing::warn!(
                key = %self.key,
                seen = self.seen,
                expected = self.expected,
                "slow tier stream length differs from its stored length; not filling the fast tier"
            );
            return;
        }
        if let Err(e) = writer.commit().await {
            log_fast_error("fill", &self.key, &e);
        }
    }
}

/// Passes `input` through while copying it into `writer` (chunks are
/// reference-counted, not copied). The copy is committed when the whole
/// payload (`expected` bytes) went through without error, and dropped
/// (discarded) otherwise, including when the reader stops early.
fn tee(input: ChunkStream, writer: Box<dyn BlobWriter>, key: BlobKey, expected: u64) -> ChunkStream {
    let state = Tee {
        input,
        writer: Some(writer),
        key,
        expected,
        seen: 0,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        match st.input.next().await {
            None => {
                st.done = true;
                st.finish().await;
                None
            }
            Some(Err(e)) => {
                st.done = true;
                st.writer = None;
                Some((Err(e), st))
            }
            Some(Ok(chunk)) => {
                st.seen += chunk.len() as u64;
                if let Some(w) = st.writer.as_mut() {
                    if let Err(e) = w.write(chunk.clone()).await {
                        log_fast_error("fill", &st.key, &e);
                        st.writer = None;
                    } else if st.seen == st.expected {
                        // The whole payload is in: commit now rather than
                        // relying on the reader polling past the last chunk.
                        st.finish().await;
                    }
                }
                Some((Ok(chunk), st))
            }
        }
    })
    .boxed()
}

/// Writes to both tiers; the slow tier decides success.
struct TieredWriter {
    key: BlobKey,
    slow: Box<dyn BlobWriter>,
    fast: Option<Box<dyn BlobWriter>>,
}

#[async_trait]
impl BlobWriter for TieredWriter {
    async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        if let Some(fast) = self.fast.as_mut()
            && let Err(e) = fast.write(chunk.clone()).await
        {
            log_fast_error("write", &self.key, &e);
            self.fast = None;
        }
        self.slow.write(chunk).await
    }

    async fn commit(self: Box<Self>) -> StoreResult<()> {
        let TieredWriter { key, slow, fast } = *self;
        slow.commit().await?;
        if let Some(fast) = fast
            && let Err(e) = fast.commit().await
        {
            log_fast_error("write", &key, &e);
        }
        Ok(())
    }
}
