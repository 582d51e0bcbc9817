//! Keeping a slow tier's recency in step with use it does not see.
//!
//! A tiered store answers most reads and existence checks from its fast
//! tier, so the slow (durable) tier never hears of them: its LRU order
//! would follow only writes and fast-tier misses, and a blob in constant
//! use could be evicted from the durable tier while the fast tier serves
//! it — and then vanish when the fast tier evicts it too. The tiered store
//! therefore records the keys its fast tier served in a [`TouchQueue`];
//! a named background task hands them to the slow tier's `has_many` (which
//! refreshes recency, as every store's does) every interval, deduplicated.
//!
//! Best effort and bounded: at most [`MAX_PENDING`] distinct keys wait
//! between two rounds (beyond that, new keys are dropped until the next
//! round; a key in real use comes back soon). A key served again while it
//! waits takes no further room, so a few hot keys cannot crowd out the
//! rest. Recording a key is one short lock and, for a key not yet waiting,
//! a copy of it; no I/O happens on the request path.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use kiln_digest::BlobKey;
use parking_lot::Mutex;

use crate::Store;

/// Distinct keys kept between two rounds.
pub const MAX_PENDING: usize = 1 << 16;
/// Keys per `has_many` call of a round.
const BATCH: usize = 4096;
/// Default time between rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Keys waiting to be reported to the slow tier.
#[derive(Default)]
pub struct TouchQueue {
    pending: Mutex<HashSet<BlobKey>>,
}

impl TouchQueue {
    /// Records that these keys were served. A key already waiting takes no
    /// further room; a new key is dropped when [`MAX_PENDING`] keys wait.
    pub fn record<'a>(&self, keys: impl IntoIterator<Item = &'a BlobKey>) {
        let mut pending = self.pending.lock();
        for k in keys {
            if pending.len() >= MAX_PENDING {
                return;
            }
            if !pending.contains(k) {
                pending.insert(k.clone());
            }
        }
    }

    fn take(&self) -> Vec<BlobKey> {
        std::mem::take(&mut *self.pending.lock()).into_iter().collect()
    }

    /// Starts a queue whose keys a task reports to `slow` every `interval`;
    /// the task stops once the queue is dropped. Needs a tokio runtime:
    /// without one nothing is started and `None` is returned, so that no
    /// caller collects keys nobody will report.
    pub fn start(slow: Arc<dyn Store>, interval: Duration) -> Option<Arc<TouchQueue>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return None;
        }
        let queue = Arc::new(TouchQueue::default());
        let weak: Weak<TouchQueue> = Arc::downgrade(&queue);
        crate::task::spawn("tiered-touch-behind", async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(queue) = weak.upgrade() else { break };
                let keys = queue.take();
                drop(queue);
                for chunk in keys.chunks(BATCH) {
                    if let Err(e) = slow.has_many(chunk).await {
                        tracing::warn!(error = %e, keys = chunk.len(), "refreshing the slow tier's recency failed");
                        break;
                    }
                }
            }
        });
        Some(queue)
    }
}

#[cfg(test)]
mod tests {
    use kiln_digest::DigestFunction;

    use super::*;

    fn key(i: u64) -> BlobKey {
        BlobKey::of(DigestFunction::Sha256, &i.to_le_bytes())
    }

    #[test]
    fn a_hot_key_does_not_crowd_out_others() {
        let queue = TouchQueue::default();
        let hot = key(0);
        for _ in 0..100_000 {
            queue.record([&hot]);
        }
        queue.record([&key(1)]);
        let mut taken = queue.take();
        taken.sort_unstable();
        let mut want = vec![key(0), key(1)];
        want.sort_unstable();
        assert_eq!(taken, want);
        assert!(queue.take().is_empty(), "a round takes every waiting key");
    }

    #[test]
    fn new_keys_are_dropped_once_full() {
        let queue = TouchQueue::default();
        let keys: Vec<BlobKey> = (0..MAX_PENDING as u64 + 10).map(key).collect();
        queue.record(&keys);
        let taken = queue.take();
        assert_eq!(taken.len(), MAX_PENDING);
        assert!(!taken.contains(&keys[MAX_PENDING]));
    }

    #[test]
    fn no_queue_without_a_runtime() {
        let slow: Arc<dyn Store> = Arc::new(crate::memory::MemoryStore::new(1 << 20));
        assert!(TouchQueue::start(slow, DEFAULT_INTERVAL).is_none());
    }
}
