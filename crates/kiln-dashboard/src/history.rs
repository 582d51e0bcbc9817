//! The overview's time series: a named background task samples the cache
//! counters, the action totals and every store's usage every
//! [`SAMPLE_INTERVAL`] (and once at start) into a ring of
//! [`HISTORY_POINTS`] samples: one hour.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use kiln_cache::{CacheCountersSnapshot, Instances};
use kiln_store::{Store, StoreStats};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::recent::{ActionCounts, RecentActions};

/// Period of the overview sampler.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour at [`SAMPLE_INTERVAL`].
pub const HISTORY_POINTS: usize = 360;

/// Cumulative values at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: SystemTime,
    pub cache: CacheCountersSnapshot,
    pub actions: ActionCounts,
    /// Aligned with [`Sources::stores`].
    pub stores: Vec<StoreStats>,
}

/// What a sample reads.
pub struct Sources {
    pub instances: Arc<Instances>,
    pub stores: Vec<(String, Arc<dyn Store>)>,
    pub recent: Arc<RecentActions>,
}

impl Sources {
    /// Reads everything now (atomics and in-memory accounting: no I/O).
    pub fn sample(&self) -> Sample {
        Sample {
            at: SystemTime::now(),
            cache: self.instances.counters().snapshot(),
            actions: self.recent.counts(),
            stores: self.stores.iter().map(|(_, s)| s.stats()).collect(),
        }
    }
}

pub struct History {
    ring: Mutex<VecDeque<Sample>>,
    capacity: usize,
    pub interval: Duration,
}

impl History {
    pub fn new(capacity: usize, interval: Duration) -> Self {
        History {
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
            interval,
        }
    }

    pub fn push(&self, sample: Sample) {
        let mut ring = self.ring.lock();
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// Every kept sample, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.ring.lock().iter().cloned().collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ring.lock().len()
    }

    /// When the latest sample was taken.
    pub fn latest_at(&self) -> Option<SystemTime> {
        self.ring.lock().back().map(|s| s.at)
    }
}

/// Samples once now, then every `history.interval` until `shutdown`
/// becomes true (or its sender is dropped) or the history is dropped.
pub fn spawn_sampler(
    history: &Arc<History>,
    sources: Arc<Sources>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let weak: Weak<History> = Arc::downgrade(history);
    let period = history.interval;
    history.push(sources.sample());
    kiln_store::task::spawn("dashboard-sampler", async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                r = shutdown.wait_for(|stop| *stop) => {
                    if r.is_err() {
                        tracing::debug!("dashboard sampler: shutdown sender dropped; stopping");
                    }
                    break;
                }
            }
            let Some(history) = weak.upgrade() else { break };
            history.push(sources.sample());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_cache::{CacheCounters, CacheLimits, Instance};
    use kiln_store::memory::MemoryStore;

    fn sources() -> Arc<Sources> {
        let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
        let ac: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
        let instances = Arc::new(Instances::new(
            [Instance::new("", cas.clone(), ac)],
            CacheLimits::default(),
        ));
        Arc::new(Sources {
            instances,
            stores: vec![("cas".into(), cas)],
            recent: Arc::new(RecentActions::new(10)),
        })
    }

    #[test]
    fn ring_keeps_the_last_points() {
        let h = History::new(3, SAMPLE_INTERVAL);
        let s = sources();
        for i in 0..5 {
            CacheCounters::add(&s.instances.counters().ac_hits, 1);
            let mut sample = s.sample();
            sample.cache.ac_misses = i;
            h.push(sample);
        }
        let kept: Vec<u64> = h.samples().iter().map(|x| x.cache.ac_misses).collect();
        assert_eq!(kept, [2, 3, 4]);
        assert_eq!(h.samples()[2].cache.ac_hits, 5);
    }

    #[tokio::test]
    async fn sampler_samples_at_start_periodically_and_stops_at_shutdown() {
        let h = Arc::new(History::new(100, Duration::from_millis(20)));
        let (tx, rx) = watch::channel(false);
        let task = spawn_sampler(&h, sources(), rx);
        assert_eq!(h.len(), 1, "one sample at start");
        tokio::time::timeout(Duration::from_secs(5), async {
            while h.len() < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("periodic samples");
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("sampler stops at shutdown")
            .unwrap();
    }
}
