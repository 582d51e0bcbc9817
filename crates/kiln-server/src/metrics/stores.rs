//! Per-store gauges read at scrape time from [`Store::stats`]:
//! `kiln_store_{bytes,items,capacity_bytes,oldest_age_seconds}{store}` and
//! the counter `kiln_store_evictions_total{store}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_store::{Store, StoreStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Every named store, read when `/metrics` is scraped.
pub(crate) struct StoreCollector {
    pub stores: Arc<BTreeMap<String, Arc<dyn Store>>>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCollector")
            .field("stores", &self.stores.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats: Vec<([(&str, &str); 1], StoreStats)> = self
            .stores
            .iter()
            .map(|(name, store)| ([("store", name.as_str())], store.stats()))
            .collect();
        type Pick = fn(&StoreStats) -> u64;
        let gauges: [(&str, &str, Pick); 4] = [
            ("kiln_store_bytes", "Payload bytes held by the store.", |s| {
                s.bytes
            }),
            ("kiln_store_items", "Items held by the store.", |s| s.items),
            (
                "kiln_store_capacity_bytes",
                "The store's capacity in bytes (0 = unbounded).",
                |s| s.capacity,
            ),
            (
                "kiln_store_oldest_age_seconds",
                "Seconds since the least recently used item was last used.",
                |s| s.oldest_age_secs,
            ),
        ];
        for (name, help, pick) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, s) in &stats {
                ConstGauge::new(pick(s)).encode(metric.encode_family(labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "kiln_store_evictions",
            "Items the store has evicted.",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in &stats {
            ConstCounter::new(s.evictions).encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }
}
