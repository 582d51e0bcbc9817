//! `/api/overview`: totals since start, live counts, store usage and the
//! last hour as per-interval series (the last point is "now", so a fresh
//! server already shows something).

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use std::collections::BTreeMap;

use crate::history::Sample;
use crate::json;
use crate::state::Shared;

#[derive(Serialize)]
pub struct Totals {
    ac_hits: u64,
    ac_misses: u64,
    /// Hits / (hits + misses); `null` before the first lookup.
    ac_hit_rate: Option<f64>,
    ac_updates: u64,
    cas_hits: u64,
    cas_misses: u64,
    cas_bytes_read: u64,
    cas_bytes_written: u64,
    cas_blobs_read: u64,
    cas_blobs_written: u64,
    actions_executed: u64,
    actions_cached: u64,
    actions_failed: u64,
}

#[derive(Serialize)]
pub struct Live {
    queued: usize,
    executing: usize,
    workers: usize,
    connected_workers: usize,
}

#[derive(Serialize)]
pub struct StoreJson {
    name: String,
    describe: String,
    bytes: u64,
    items: u64,
    /// 0 = unbounded.
    capacity: u64,
    evictions: u64,
    oldest_age_secs: u64,
}

/// Aligned series: `t[i]` ends the interval the other values describe.
#[derive(Serialize, Default)]
pub struct Series {
    t: Vec<i64>,
    /// Action Cache hit rate in the interval (`null`: no lookups).
    hit_rate: Vec<Option<f64>>,
    ac_hits: Vec<u64>,
    ac_misses: Vec<u64>,
    cas_read_bytes_per_sec: Vec<f64>,
    cas_written_bytes_per_sec: Vec<f64>,
    /// Actions finished per minute (executed on workers, from the cache).
    executed_per_min: Vec<f64>,
    cached_per_min: Vec<f64>,
    failed_per_min: Vec<f64>,
    /// Per store: bytes and items at each point.
    store_bytes: BTreeMap<String, Vec<u64>>,
    store_items: BTreeMap<String, Vec<u64>>,
}

#[derive(Serialize)]
pub struct OverviewJson {
    now: i64,
    started_at: i64,
    interval_secs: u64,
    /// Samples kept (the series have one more point: now).
    samples: usize,
    execution: bool,
    totals: Totals,
    live: Option<Live>,
    stores: Vec<StoreJson>,
    series: Series,
}

fn rate(a: Option<f64>) -> Option<f64> {
    a.filter(|x| x.is_finite())
}

fn series(points: &[Sample], names: &[String]) -> Series {
    let mut s = Series::default();
    for pair in points.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let secs =
            b.at.duration_since(a.at)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
                .max(0.001);
        let hits = b.cache.ac_hits.saturating_sub(a.cache.ac_hits);
        let misses = b.cache.ac_misses.saturating_sub(a.cache.ac_misses);
        let per_sec = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        s.t.push(json::ms(b.at));
        s.hit_rate.push(rate(
            (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        ));
        s.ac_hits.push(hits);
        s.ac_misses.push(misses);
        s.cas_read_bytes_per_sec
            .push(per_sec(a.cache.cas_bytes_read, b.cache.cas_bytes_read));
        s.cas_written_bytes_per_sec
            .push(per_sec(a.cache.cas_bytes_written, b.cache.cas_bytes_written));
        s.executed_per_min
            .push(per_sec(a.actions.executed, b.actions.executed) * 60.0);
        s.cached_per_min
            .push(per_sec(a.actions.cached, b.actions.cached) * 60.0);
        s.failed_per_min
            .push(per_sec(a.actions.failed, b.actions.failed) * 60.0);
    }
    for (i, name) in names.iter().enumerate() {
        let at = |p: &Sample| p.stores.get(i).cloned().unwrap_or_default();
        s.store_bytes
            .insert(name.clone(), points.iter().skip(1).map(|p| at(p).bytes).collect());
        s.store_items
            .insert(name.clone(), points.iter().skip(1).map(|p| at(p).items).collect());
    }
    s
}

pub async fn overview(State(state): State<Shared>) -> Json<OverviewJson> {
    let now = state.sources.sample();
    let mut points = state.history.samples();
    let samples = points.len();
    points.push(now.clone());
    let names: Vec<String> = state.sources.stores.iter().map(|(n, _)| n.clone()).collect();
    let c = now.cache;
    let lookups = c.ac_hits + c.ac_misses;
    let live = match &state.scheduler {
        Some(s) => {
            let st = s.stats().await;
            Some(Live {
                queued: st.queued,
                executing: st.executing,
                workers: st.workers,
                connected_workers: st.connected_workers,
            })
        }
        None => None,
    };
    Json(OverviewJson {
        now: json::ms(now.at),
        started_at: json::ms(state.started_at),
        interval_secs: state.history.interval.as_secs(),
        samples,
        execution: state.scheduler.is_some(),
        totals: Totals {
            ac_hits: c.ac_hits,
            ac_misses: c.ac_misses,
            ac_hit_rate: rate((lookups > 0).then(|| c.ac_hits as f64 / lookups as f64)),
            ac_updates: c.ac_updates,
            cas_hits: c.cas_hits,
            cas_misses: c.cas_misses,
            cas_bytes_read: c.cas_bytes_read,
            cas_bytes_written: c.cas_bytes_written,
            cas_blobs_read: c.cas_blobs_read,
            cas_blobs_written: c.cas_blobs_written,
            actions_executed: now.actions.executed,
            actions_cached: now.actions.cached,
            actions_failed: now.actions.failed,
        },
        live,
        stores: state
            .sources
            .stores
            .iter()
            .zip(&now.stores)
            .map(|((name, store), st)| StoreJson {
                name: name.clone(),
                describe: store.describe(),
                bytes: st.bytes,
                items: st.items,
                capacity: st.capacity,
                evictions: st.evictions,
                oldest_age_secs: st.oldest_age_secs,
            })
            .collect(),
        series: series(&points, &names),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_cache::CacheCountersSnapshot;
    use kiln_store::StoreStats;
    use std::time::{Duration, SystemTime};

    fn sample(secs: u64, hits: u64, misses: u64, read: u64, bytes: u64) -> Sample {
        Sample {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            cache: CacheCountersSnapshot {
                ac_hits: hits,
                ac_misses: misses,
                cas_bytes_read: read,
                ..Default::default()
            },
            actions: Default::default(),
            stores: vec![StoreStats {
                bytes,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn series_are_per_interval() {
        let pts = [
            sample(100, 0, 0, 0, 10),
            sample(110, 3, 1, 1000, 20),
            sample(120, 3, 1, 1000, 30),
        ];
        let s = series(&pts, &["cas".into()]);
        assert_eq!(s.t, [110_000, 120_000]);
        assert_eq!(s.hit_rate, [Some(0.75), None]);
        assert_eq!(s.cas_read_bytes_per_sec, [100.0, 0.0]);
        assert_eq!(s.store_bytes["cas"], [20, 30]);
        assert!(series(&pts[..1], &[]).t.is_empty());
    }
}
