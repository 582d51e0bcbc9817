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
    /// (FindMissingBlobs digests not missing, blobs served by BatchReadBlobs
    /// and ByteStream Read).
    pub cas_hits: AtomicU64,
    /// Blobs a client asked about or for that were absent
    /// (FindMissingBlobs missing digests, NOT_FOUND reads).
    pub cas_misses: AtomicU64,
    /// Payload bytes sent by BatchReadBlobs and ByteStream Read, as sent
    /// (compressed bytes for `compressed-blobs` reads).
    pub cas_bytes_read: AtomicU64,
    /// Payload bytes of blobs newly stored by BatchUpdateBlobs and
    /// ByteStream Write, as received (compressed bytes for compressed
    /// uploads). Uploads of blobs already present store nothing.
    pub cas_bytes_written: AtomicU64,
    /// Blobs served by BatchReadBlobs and ByteStream Read (one per Read
    /// call that found its blob).
    pub cas_blobs_read: AtomicU64,
    /// Blobs newly stored by BatchUpdateBlobs and ByteStream Write.
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

    /// One Action Cache lookup (GetActionResult or Execute's): a complete
    /// entry was found (`hit`) or not.
    #[inline]
    pub fn ac_lookup(&self, hit: bool) {
        Self::add(if hit { &self.ac_hits } else { &self.ac_misses }, 1);
    }

    /// Digests asked about: `found` present, `missing` absent.
    #[inline]
    pub fn cas_lookups(&self, found: u64, missing: u64) {
        if found > 0 {
            Self::add(&self.cas_hits, found);
        }
        if missing > 0 {
            Self::add(&self.cas_misses, missing);
        }
    }

    /// `blobs` blobs of `bytes` payload bytes served to clients.
    #[inline]
    pub fn cas_read(&self, blobs: u64, bytes: u64) {
        Self::add(&self.cas_blobs_read, blobs);
        Self::add(&self.cas_bytes_read, bytes);
    }

    /// `blobs` blobs of `bytes` payload bytes stored from clients.
    #[inline]
    pub fn cas_written(&self, blobs: u64, bytes: u64) {
        Self::add(&self.cas_blobs_written, blobs);
        Self::add(&self.cas_bytes_written, bytes);
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
