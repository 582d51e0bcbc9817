//! Process-wide cache activity counters: Action Cache hits and misses, CAS
//! blobs found and missing, bytes and blobs read and written. The services
//! count into one [`CacheCounters`] per [`crate::Instances`]; `/metrics`
//! exports it and the dashboard samples it for its charts. Relaxed atomics:
//! one uncontended add per event.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters (monotonic since start).
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// GetActionResult (and Execute's cache lookup) found a complete entry.
    pub ac_hits: AtomicU64,
    /// GetActionResult found no entry, or one whose outputs are gone.
    pub ac_misses: AtomicU64,
    /// UpdateActionResult calls that stored a result.
    pub ac_updates: AtomicU64,
    /// Blobs a client asked about or for that were present
    /// (FindMissingBlobs present digests, blobs served by reads).
    pub cas_hits: AtomicU64,
    /// Blobs a client asked about or for that were absent
    /// (FindMissingBlobs missing digests, NOT_FOUND reads).
    pub cas_misses: AtomicU64,
    /// Payload bytes served by BatchReadBlobs and ByteStream Read.
    pub cas_bytes_read: AtomicU64,
    /// Payload bytes stored by BatchUpdateBlobs and ByteStream Write.
    pub cas_bytes_written: AtomicU64,
    /// Blobs served by BatchReadBlobs and ByteStream Read.
    pub cas_blobs_read: AtomicU64,
    /// Blobs stored by BatchUpdateBlobs and ByteStream Write.
    pub cas_blobs_written: AtomicU64,
}

/// A plain copy of [`CacheCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCountersSnapshot {
    pub ac_hits: u64,
    pub ac_misses: u64,
    pub ac_updates: u64,
    pub cas_hits: u64,
    pub cas_misses: u64,
    pub cas_bytes_read: u64,
    pub cas_bytes_written: u64,
    pub cas_blobs_read: u64,
    pub cas_blobs_written: u64,
}

impl CacheCounters {
    /// Adds `n` to one counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CacheCountersSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheCountersSnapshot {
            ac_hits: l(&self.ac_hits),
            ac_misses: l(&self.ac_misses),
            ac_updates: l(&self.ac_updates),
            cas_hits: l(&self.cas_hits),
            cas_misses: l(&self.cas_misses),
            cas_bytes_read: l(&self.cas_bytes_read),
            cas_bytes_written: l(&self.cas_bytes_written),
            cas_blobs_read: l(&self.cas_blobs_read),
            cas_blobs_written: l(&self.cas_blobs_written),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_what_was_added() {
        let c = CacheCounters::default();
        CacheCounters::add(&c.ac_hits, 3);
        CacheCounters::add(&c.cas_bytes_written, 4096);
        let s = c.snapshot();
        assert_eq!(s.ac_hits, 3);
        assert_eq!(s.cas_bytes_written, 4096);
        assert_eq!(s.ac_misses, 0);
    }
}
