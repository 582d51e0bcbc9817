//! The table of resumable uploads, keyed by upload resource name.
//!
//! An entry is either being written by exactly one stream (`Active`, whose
//! progress QueryWriteStatus reads from an atomic), parked after a stream
//! ended without `finish_write` (`Paused`, holding the store writer and the
//! hasher so that a later stream resumes at `committed_size`), or finished
//! (`Complete`). Paused and complete entries expire after an idle timeout;
//! expired writers are dropped (discarding their data) outside the lock.

use std::collections::{HashMap, hash_map};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kiln_digest::Hasher;
use kiln_store::BlobWriter;
use parking_lot::Mutex;

use crate::{CacheError, CacheResult};

/// Default time a paused or completed upload is remembered.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// An identity upload interrupted before `finish_write`.
pub struct PartialUpload {
    pub writer: Box<dyn BlobWriter>,
    pub hasher: Hasher,
    /// Bytes written, hashed and handed to `writer`.
    pub committed: u64,
}

enum Entry {
    Active(Arc<AtomicU64>),
    /// `partial` is `None` for uploads that cannot be resumed (compressed
    /// ones): QueryWriteStatus reports 0 and the client starts over.
    Paused {
        partial: Option<Box<PartialUpload>>,
        at: Instant,
    },
    Complete {
        committed_size: i64,
        at: Instant,
    },
}

/// Status of an upload as QueryWriteStatus reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadStatus {
    pub committed_size: i64,
    pub complete: bool,
}

pub struct Uploads {
    table: Mutex<HashMap<String, Entry>>,
    idle_timeout: Duration,
    last_sweep: Mutex<Instant>,
}

impl Uploads {
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Uploads {
            table: Mutex::new(HashMap::new()),
            idle_timeout,
            last_sweep: Mutex::new(Instant::now()),
        })
    }

    /// Starts the background task that expires idle entries, if a tokio
    /// runtime is running. The task ends once the table is dropped.
    pub fn start_expiry(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = (self.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        kiln_store::task::spawn("bytestream-upload-expiry", async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(uploads) = weak.upgrade() else { return };
                uploads.sweep(Instant::now());
            }
        });
    }

    /// Claims `name` for a new stream. Returns the parked partial upload if
    /// there is one (the caller decides whether to resume or discard it).
    /// Another stream writing the same name → ABORTED.
    pub fn begin(self: &Arc<Self>, name: &str) -> CacheResult<(Option<Box<PartialUpload>>, ActiveUpload)> {
        self.maybe_sweep();
        let progress = Arc::new(AtomicU64::new(0));
        let previous = {
            let mut table = self.table.lock();
            match table.entry(name.to_string()) {
                hash_map::Entry::Occupied(e) if matches!(e.get(), Entry::Active(_)) => {
                    return Err(CacheError::Aborted(format!(
                        "another stream is already writing {name:?}; retry after it ends"
                    )));
                }
                hash_map::Entry::Occupied(mut e) => Some(e.insert(Entry::Active(progress.clone()))),
                hash_map::Entry::Vacant(v) => {
                    v.insert(Entry::Active(progress.clone()));
                    None
                }
            }
        };
        let partial = match previous {
            Some(Entry::Paused { partial, .. }) => partial,
            _ => None,
        };
        if let Some(p) = &partial {
            progress.store(p.committed, Ordering::Relaxed);
        }
        let active = ActiveUpload {
            uploads: self.clone(),
            name: name.to_string(),
            progress,
            settled: false,
        };
        Ok((partial, active))
    }

    /// What QueryWriteStatus reports for `name`, if the table knows it.
    pub fn status(&self, name: &str) -> Option<UploadStatus> {
        self.maybe_sweep();
        let table = self.table.lock();
        match table.get(name)? {
            Entry::Active(p) => Some(UploadStatus {
                committed_size: p.load(Ordering::Relaxed) as i64,
                complete: false,
            }),
            Entry::Paused { partial, .. } => Some(UploadStatus {
                committed_size: partial.as_ref().map_or(0, |p| p.committed as i64),
                complete: false,
            }),
            Entry::Complete { committed_size, .. } => Some(UploadStatus {
                committed_size: *committed_size,
                complete: true,
            }),
        }
    }

    /// Forgets a paused or complete entry (the blob turned out to exist).
    /// An active entry is left to its stream.
    pub fn forget(&self, name: &str) {
        let removed = {
            let mut table = self.table.lock();
            match table.get(name) {
                Some(Entry::Active(_)) | None => None,
                Some(_) => table.remove(name),
            }
        };
        drop(removed);
    }

    /// Number of entries (all states).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().len()
    }

    fn maybe_sweep(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_sweep.lock();
            if now.duration_since(*last) < self.idle_timeout / 4 {
                return;
            }
            *last = now;
        }
        self.sweep(now);
    }

    /// Removes paused and complete entries idle for longer than the timeout.
    /// Writers are dropped after the lock is released.
    pub fn sweep(&self, now: Instant) {
        let timeout = self.idle_timeout;
        let expired: Vec<Entry> = {
            let mut table = self.table.lock();
            let names: Vec<String> = table
                .iter()
                .filter(|(_, e)| match e {
                    Entry::Active(_) => false,
                    Entry::Paused { at, .. } | Entry::Complete { at, .. } => {
                        now.duration_since(*at) >= timeout
                    }
                })
                .map(|(k, _)| k.clone())
                .collect();
            names.iter().filter_map(|n| table.remove(n)).collect()
        };
        if !expired.is_empty() {
            tracing::debug!(count = expired.len(), "expired idle ByteStream uploads");
        }
        drop(expired);
    }

    fn settle(&self, name: &str, progress: &Arc<AtomicU64>, next: Option<Entry>) {
        let replaced = {
            let mut table = self.table.lock();
            match table.get(name) {
                Some(Entry::Active(p)) if Arc::ptr_eq(p, progress) => match next {
                    Some(e) => table.insert(name.to_string(), e),
                    None => table.remove(name),
                },
                // Not ours any more: drop what we were asked to store.
                _ => next,
            }
        };
        drop(replaced);
    }
}

/// One stream's claim on an upload name. Dropping it without settling
/// forgets the upload (its data is discarded with the writer).
pub struct ActiveUpload {
    uploads: Arc<Uploads>,
    name: String,
    progress: Arc<AtomicU64>,
    settled: bool,
}

impl ActiveUpload {
    /// Publishes how many bytes have been committed so far.
    pub fn set_progress(&self, committed: u64) {
        self.progress.store(committed, Ordering::Relaxed);
    }

    /// Parks the upload for a later stream to resume.
    pub fn pause(mut self, partial: Option<Box<PartialUpload>>) {
        self.settled = true;
        let entry = Entry::Paused {
            partial,
            at: Instant::now(),
        };
        self.uploads.settle(&self.name, &self.progress, Some(entry));
    }

    /// Records that the upload finished and its blob is committed.
    pub fn complete(mut self, committed_size: i64) {
        self.settled = true;
        let entry = Entry::Complete {
            committed_size,
            at: Instant::now(),
        };
        self.uploads.settle(&self.name, &self.progress, Some(entry));
    }
}

impl Drop for ActiveUpload {
    fn drop(&mut self) {
        if !self.settled {
            self.uploads.settle(&self.name, &self.progress, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_digest::DigestFunction;

    struct NullWriter;

    #[tonic::async_trait]
    impl BlobWriter for NullWriter {
        async fn write(&mut self, _chunk: bytes::Bytes) -> kiln_store::StoreResult<()> {
            Ok(())
        }
        async fn commit(self: Box<Self>) -> kiln_store::StoreResult<()> {
            Ok(())
        }
    }

    fn partial(committed: u64) -> Box<PartialUpload> {
        Box::new(PartialUpload {
            writer: Box::new(NullWriter),
            hasher: Hasher::new(DigestFunction::Sha256, 0),
            committed,
        })
    }

    #[test]
    fn lifecycle() {
        let u = Uploads::new(Duration::from_secs(60));
        assert_eq!(u.status("a"), None);
        let (p, active) = u.begin("a").unwrap();
        assert!(p.is_none());
        active.set_progress(10);
        assert_eq!(
            u.status("a"),
            Some(UploadStatus {
                committed_size: 10,
                complete: false
            })
        );
        // A second stream on the same name is refused and leaves the first alone.
        let err = u.begin("a").err().unwrap();
        assert_eq!(err.code(), tonic::Code::Aborted);
        active.pause(Some(partial(10)));
        let (p, active) = u.begin("a").unwrap();
        assert_eq!(p.map(|p| p.committed), Some(10));
        assert_eq!(u.status("a").unwrap().committed_size, 10);
        active.complete(42);
        assert_eq!(
            u.status("a"),
            Some(UploadStatus {
                committed_size: 42,
                complete: true
            })
        );
    }

    #[test]
    fn dropping_an_active_upload_forgets_it() {
        let u = Uploads::new(Duration::from_secs(60));
        let (_, active) = u.begin("a").unwrap();
        drop(active);
        assert_eq!(u.status("a"), None);
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn idle_entries_expire() {
        let u = Uploads::new(Duration::from_secs(60));
        let (_, a) = u.begin("a").unwrap();
        a.pause(Some(partial(3)));
        let (_, b) = u.begin("b").unwrap();
        b.complete(1);
        let (_, c) = u.begin("c").unwrap();
        u.sweep(Instant::now());
        assert_eq!(u.len(), 3);
        u.sweep(Instant::now() + Duration::from_secs(61));
        // Only the active one survives.
        assert_eq!(u.len(), 1);
        assert!(u.status("c").is_some());
        drop(c);
    }
}
