//! Scheduler state, read by the `/metrics` handler before encoding (one
//! [`kiln_scheduler::Scheduler::stats`] call per scrape):
//!
//! * `kiln_scheduler_queued`, `kiln_scheduler_executing`,
//!   `kiln_scheduler_operations`, `kiln_scheduler_workers`,
//!   `kiln_scheduler_connected_workers`, `kiln_scheduler_slots`,
//!   `kiln_scheduler_busy_slots` gauges;
//! * `kiln_scheduler_queue_depth{platform}`: queued actions per platform
//!   (at most [`MAX_PLATFORM_LABELS`] platforms, the rest summed as
//!   "other");
//! * `kiln_worker_local_cache_{hits,misses,hit_bytes,miss_bytes}_total{worker}`:
//!   each connected worker's local CAS cache counters from its latest
//!   heartbeat (workers sharing a name are summed).

use std::collections::BTreeMap;

use kiln_proto::worker::LocalCacheCounters;
use kiln_scheduler::state::StateStats;
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Distinct `platform` label values before the rest are summed as "other".
pub const MAX_PLATFORM_LABELS: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct SchedulerCollector {
    /// The stats of the scrape being encoded; `None` without a scheduler.
    pub last: Mutex<Option<StateStats>>,
}

fn n(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Queue depth per platform label, bounded.
fn platform_depths(stats: &StateStats) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let mut other = 0u64;
    for (i, (platform, depth)) in stats.queued_by_platform.iter().enumerate() {
        if i < MAX_PLATFORM_LABELS {
            out.push((platform.clone(), n(*depth)));
        } else {
            other += n(*depth);
        }
    }
    if other > 0 {
        out.push(("other".into(), other));
    }
    out
}

/// Local cache counters per worker name (duplicate names summed).
fn worker_caches(stats: &StateStats) -> BTreeMap<&str, LocalCacheCounters> {
    let mut out: BTreeMap<&str, LocalCacheCounters> = BTreeMap::new();
    for (name, c) in &stats.worker_local_cache {
        let e = out.entry(name.as_str()).or_default();
        e.hits += c.hits;
        e.misses += c.misses;
        e.hit_bytes += c.hit_bytes;
        e.miss_bytes += c.miss_bytes;
    }
    out
}

impl Collector for SchedulerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = self.last.lock().clone() else {
            return Ok(());
        };
        let gauges: [(&str, &str, u64); 7] = [
            (
                "kiln_scheduler_queued",
                "Actions queued, waiting for a worker.",
                n(s.queued),
            ),
            (
                "kiln_scheduler_executing",
                "Actions assigned to a worker.",
                n(s.executing),
            ),
            (
                "kiln_scheduler_operations",
                "Operations known (running and retained completed ones).",
                n(s.operations),
            ),
            (
                "kiln_scheduler_workers",
                "Workers known to the scheduler.",
                n(s.workers),
            ),
            (
                "kiln_scheduler_connected_workers",
                "Workers with an open connection.",
                n(s.connected_workers),
            ),
            (
                "kiln_scheduler_slots",
                "Slots (actions at once) of the connected workers.",
                s.slots,
            ),
            (
                "kiln_scheduler_busy_slots",
                "Slots of the connected workers running an action.",
                s.busy_slots,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }

        let mut metric = encoder.encode_descriptor(
            "kiln_scheduler_queue_depth",
            "Actions queued per platform (the platform properties the scheduler matches on).",
            None,
            MetricType::Gauge,
        )?;
        for (platform, depth) in platform_depths(&s) {
            ConstGauge::new(depth).encode(metric.encode_family(&[("platform", platform.as_str())])?)?;
        }

        let caches = worker_caches(&s);
        type Pick = fn(&LocalCacheCounters) -> u64;
        let counters: [(&str, &str, Pick); 4] = [
            (
                "kiln_worker_local_cache_hits",
                "Input blobs a worker found in its local CAS cache (latest heartbeat).",
                |c| c.hits,
            ),
            (
                "kiln_worker_local_cache_misses",
                "Input blobs a worker fetched from the CAS (latest heartbeat).",
                |c| c.misses,
            ),
            (
                "kiln_worker_local_cache_hit_bytes",
                "Bytes of the input blobs a worker found in its local CAS cache.",
                |c| c.hit_bytes,
            ),
            (
                "kiln_worker_local_cache_miss_bytes",
                "Bytes of the input blobs a worker fetched from the CAS.",
                |c| c.miss_bytes,
            ),
        ];
        for (name, help, pick) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (worker, c) in &caches {
                ConstCounter::new(pick(c)).encode(metric.encode_family(&[("worker", *worker)])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_labels_are_bounded() {
        let stats = StateStats {
            queued_by_platform: (0..MAX_PLATFORM_LABELS + 3)
                .map(|i| (format!("p={i:03}"), 2))
                .collect(),
            ..Default::default()
        };
        let depths = platform_depths(&stats);
        assert_eq!(depths.len(), MAX_PLATFORM_LABELS + 1);
        assert_eq!(depths.last(), Some(&("other".to_string(), 6)));
    }

    #[test]
    fn workers_sharing_a_name_are_summed() {
        let c = |h, m| LocalCacheCounters {
            hits: h,
            misses: m,
            hit_bytes: h * 10,
            miss_bytes: m * 10,
        };
        let stats = StateStats {
            worker_local_cache: vec![
                ("a".into(), c(1, 2)),
                ("b".into(), c(5, 0)),
                ("a".into(), c(3, 4)),
            ],
            ..Default::default()
        };
        let caches = worker_caches(&stats);
        assert_eq!(caches["a"], c(4, 6));
        assert_eq!(caches["b"], c(5, 0));
    }
}
