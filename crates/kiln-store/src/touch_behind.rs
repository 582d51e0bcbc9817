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
//! Best effort and bounded: at most [`MAX_PENDING`] keys wait between two
//! rounds (beyond that, keys are dropped until the next round; a key in
//! real use comes back soon). Recording a key is one short lock and a copy
//! of the key; no I/O happens on the request path.

use std::sync::{Arc, Weak};
use std::time::Duration;

use kiln_digest::BlobKey;
use parking_lot::Mutex;

use crate::Store;

/// Keys kept between two rounds.
pub const MAX_PENDING: usize = 1 << 16;
/// Keys per `has_many` call of a round.
const BATCH: usize = 4096;
/// Default time between rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Keys waiting to be reported to the slow tier.
#[derive(Default)]
pub struct TouchQueue {
    pending: Mutex<Vec<BlobKey>>,
}

impl TouchQueue {
    /// Records that these keys were served (dropped when the queue is full).
    pub fn record<'a>(&self, keys: impl IntoIterator<Item = &'a BlobKey>) {
        let mut pending = self.pending.lock();
        for k in keys {
            if pending.len() >= MAX_PENDING {
                return;
            }
            pending.push(k.clone());
        }
    }

    fn take(&self) -> Vec<BlobKey> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Starts the task reporting recorded keys to `slow` every `interval`;
    /// it stops once the queue is dropped. Needs a tokio runtime; without
    /// one nothing is started (and nothing is reported).
    pub fn start(queue: &Arc<TouchQueue>, slow: Arc<dyn Store>, interval: Duration) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let weak: Weak<TouchQueue> = Arc::downgrade(queue);
        crate::task::spawn("tiered-touch-behind", async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(queue) = weak.upgrade() else { break };
                let mut keys = queue.take();
                drop(queue);
                if keys.is_empty() {
                    continue;
                }
                keys.sort_unstable();
                keys.dedup();
                for chunk in keys.chunks(BATCH) {
                    if let Err(e) = slow.has_many(chunk).await {
                        tracing::warn!(error = %e, keys = chunk.len(), "refreshing the slow tier's recency failed");
                        break;
                    }
                }
            }
        });
    }
}
