//! Cache activity counters, read at scrape time from the
//! [`CacheCounters`] every service of the server's instances counts into:
//!
//! * `kiln_ac_lookups_total{result="hit"|"miss"}`: GetActionResult calls
//!   and Execute cache checks that found a complete result, or did not;
//! * `kiln_ac_updates_total`: UpdateActionResult calls that stored a result;
//! * `kiln_cas_lookups_total{result="found"|"missing"}`: blobs asked about
//!   (FindMissingBlobs) or for (BatchReadBlobs, ByteStream Read);
//! * `kiln_cas_blobs_total{direction="read"|"written"}` and
//!   `kiln_cas_bytes_total{direction}`: blobs and payload bytes served to
//!   clients, and newly stored from uploads.

use std::sync::Arc;

use kiln_cache::CacheCounters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

#[derive(Debug)]
pub(crate) struct CacheCollector {
    pub counters: Arc<CacheCounters>,
}

/// One counter family: name, help, and its samples by label.
type Family<'a> = (&'a str, &'a str, &'a str, [(&'a str, u64); 2]);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.counters.snapshot();
        let families: [Family<'_>; 4] = [
            (
                "kiln_ac_lookups",
                "Action Cache lookups (GetActionResult and Execute's cache check), by whether a complete result was found.",
                "result",
                [("hit", s.ac_hits), ("miss", s.ac_misses)],
            ),
            (
                "kiln_cas_lookups",
                "CAS blobs asked about (FindMissingBlobs) or for (BatchReadBlobs, ByteStream Read), by whether present.",
                "result",
                [("found", s.cas_hits), ("missing", s.cas_misses)],
            ),
            (
                "kiln_cas_blobs",
                "CAS blobs served to clients (read) and newly stored from uploads (written).",
                "direction",
                [("read", s.cas_blobs_read), ("written", s.cas_blobs_written)],
            ),
            (
                "kiln_cas_bytes",
                "CAS payload bytes sent to clients (read) and newly stored from uploads (written), as transferred (compressed when compressed).",
                "direction",
                [("read", s.cas_bytes_read), ("written", s.cas_bytes_written)],
            ),
        ];
        for (name, help, key, samples) in families {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (value, n) in samples {
                ConstCounter::new(n).encode(metric.encode_family(&[(key, value)])?)?;
            }
        }
        let updates = ConstCounter::new(s.ac_updates);
        let metric = encoder.encode_descriptor(
            "kiln_ac_updates",
            "UpdateActionResult calls that stored a result.",
            None,
            MetricType::Counter,
        )?;
        updates.encode(metric)?;
        Ok(())
    }
}
