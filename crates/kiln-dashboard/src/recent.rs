//! The last finished actions, kept by an [`ActionObserver`] the dashboard
//! registers with the scheduler: a bounded ring (no unbounded growth) and
//! running totals. Each record gets a sequence number; a watch channel
//! carries the latest one so live pages learn of new actions at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_scheduler::{ActionObserver, ActionRecord};
use parking_lot::Mutex;
use tokio::sync::watch;

/// Finished actions kept for the Actions page.
pub const RECENT_ACTIONS: usize = 1000;

/// One kept record.
pub struct Recent {
    pub seq: u64,
    pub record: ActionRecord,
}

/// Totals since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionCounts {
    /// Ran on a worker (whatever the outcome).
    pub executed: u64,
    /// Answered from the Action Cache at Execute.
    pub cached: u64,
    /// Ran and failed: non-zero exit code or an error status.
    pub failed: u64,
}

pub struct RecentActions {
    ring: Mutex<VecDeque<Arc<Recent>>>,
    capacity: usize,
    executed: AtomicU64,
    cached: AtomicU64,
    failed: AtomicU64,
    /// The sequence number of the latest record (0 = none yet).
    latest: watch::Sender<u64>,
}

impl RecentActions {
    pub fn new(capacity: usize) -> Self {
        RecentActions {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(64))),
            capacity: capacity.max(1),
            executed: AtomicU64::new(0),
            cached: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            latest: watch::channel(0).0,
        }
    }

    /// The newest records first, at most `limit`, keeping those `keep`
    /// accepts.
    pub fn newest(&self, limit: usize, keep: impl Fn(&Recent) -> bool) -> Vec<Arc<Recent>> {
        let ring = self.ring.lock();
        ring.iter()
            .rev()
            .filter(|r| keep(r))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The newest record matching `find`.
    pub fn find(&self, find: impl Fn(&Recent) -> bool) -> Option<Arc<Recent>> {
        let ring = self.ring.lock();
        ring.iter().rev().find(|r| find(r)).cloned()
    }

    pub fn len(&self) -> usize {
        self.ring.lock().len()
    }

    pub fn counts(&self) -> ActionCounts {
        ActionCounts {
            executed: self.executed.load(Ordering::Relaxed),
            cached: self.cached.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Follows the latest sequence number.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    pub fn latest_seq(&self) -> u64 {
        *self.latest.borrow()
    }
}

impl ActionObserver for RecentActions {
    fn action_completed(&self, record: &ActionRecord) {
        if record.cached {
            self.cached.fetch_add(1, Ordering::Relaxed);
        } else {
            self.executed.fetch_add(1, Ordering::Relaxed);
            if record.failed() {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Numbered and published under the ring's lock, so `latest` only
        // moves forward and always names a record in the ring.
        let mut ring = self.ring.lock();
        let seq = self.latest_seq() + 1;
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(Arc::new(Recent {
            seq,
            record: record.clone(),
        }));
        self.latest.send_replace(seq);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::SystemTime;

    pub(crate) fn record(op: &str, cached: bool, exit: i32) -> ActionRecord {
        ActionRecord {
            operation: op.into(),
            instance_name: String::new(),
            digest_function: kiln_digest::DigestFunction::Sha256,
            action_digest: Default::default(),
            cached,
            status_code: 0,
            exit_code: Some(exit),
            worker: String::new(),
            metadata: None,
            request: Default::default(),
            platform: Default::default(),
            completed_at: SystemTime::now(),
        }
    }

    #[test]
    fn ring_is_bounded_newest_first_and_counts() {
        let r = RecentActions::new(3);
        let rx = r.subscribe();
        for i in 0..5 {
            r.action_completed(&record(&format!("op{i}"), i == 4, if i == 2 { 1 } else { 0 }));
        }
        assert_eq!(r.len(), 3);
        let ops: Vec<String> = r
            .newest(10, |_| true)
            .iter()
            .map(|x| x.record.operation.clone())
            .collect();
        assert_eq!(ops, ["op4", "op3", "op2"]);
        assert_eq!(
            r.counts(),
            ActionCounts {
                executed: 4,
                cached: 1,
                failed: 1
            }
        );
        assert_eq!(*rx.borrow(), 5);
        assert_eq!(r.find(|x| x.record.operation == "op3").map(|x| x.seq), Some(4));
        assert!(r.find(|x| x.record.operation == "op0").is_none());
    }

    #[test]
    fn concurrent_completions_number_in_ring_order() {
        let r = Arc::new(RecentActions::new(1000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        r.action_completed(&record(&format!("t{t}-{i}"), false, 0));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.latest_seq(), 800, "latest never moves backwards");
        let seqs: Vec<u64> = r.newest(usize::MAX, |_| true).iter().map(|x| x.seq).collect();
        assert_eq!(seqs, (1..=800).rev().collect::<Vec<u64>>());
    }
}
