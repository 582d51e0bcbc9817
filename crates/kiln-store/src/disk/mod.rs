//! A persistent blob store on the local file system, bounded by payload
//! bytes with least-recently-used eviction.
//!
//! # On disk
//!
//! One file per blob: `<root>/blobs/<function>/<xx>/<hash>-<size>` for
//! identity payloads, with a `.zst` suffix for zstd payloads (see
//! [`layout`]). A payload is written to `<root>/tmp/`, then renamed into
//! place, so a reader (or a restart after `kill -9`) sees either the whole
//! old payload, the whole new one, or none, never a partial file. With
//! [`DiskConfig::sync_writes`] the file and its directory are fsynced
//! before the commit returns, for durability across power loss.
//!
//! # In memory
//!
//! An index (key → encoding, length, LRU position; see [`index`]) under
//! one mutex. Decisions are made under it; file I/O happens outside it on
//! the blocking pool. Space is reserved before a file is renamed in and
//! released after a file is unlinked, so the bytes under `blobs/` never
//! exceed the capacity, and equal the store's count whenever no write is in
//! flight.
//!
//! # Startup
//!
//! [`DiskStore::open`] only creates directories and moves the previous
//! run's `tmp/` aside; a background task rebuilds the index from the file
//! names (see [`scan`]). Until it finishes, reads look at the file system
//! for keys not yet indexed, and writes wait (the total is not known yet).
//!
//! # LRU across restarts
//!
//! The scan seeds the LRU order from file mtimes; a read of a blob whose
//! file is older than [`MTIME_REFRESH_SECS`] bumps its mtime in the
//! background, so that order survives a restart at that granularity.

mod commit;
mod fsio;
mod index;
mod janitor;
mod layout;
mod scan;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use kiln_digest::BlobKey;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use self::commit::Source;
use self::index::{Index, NodeState};
use self::janitor::Janitor;
use self::layout::Layout;
use crate::{
    Blob, BlobRead, BlobWriter, ChunkStream, Encoding, Store, StoreError, StoreResult, StoreStats, task,
};

/// A read bumps a blob file's mtime when it is older than this.
pub const MTIME_REFRESH_SECS: u32 = 3600;
/// Chunk size of streamed reads.
const READ_CHUNK: u64 = 1 << 20;

/// Configuration of a [`DiskStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Directory owned by the store (created if missing).
    pub root: PathBuf,
    /// Upper bound of the payload bytes stored; 0 = unbounded.
    pub capacity_bytes: u64,
    /// fsync each payload and its directory before a write is acknowledged.
    pub sync_writes: bool,
}

/// Progress of the startup scan.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Scanning,
    Ready,
    Failed(String),
}

/// State shared by the store, its writers and its background tasks.
struct Inner {
    config: DiskConfig,
    layout: Layout,
    index: Mutex<Index>,
    /// Woken whenever space is released or a key's owner finishes.
    changed: Notify,
    phase: watch::Sender<Phase>,
    janitor: Janitor,
}

/// A persistent, LRU-bounded blob store in a directory. See the module docs.
pub struct DiskStore {
    inner: Arc<Inner>,
    /// Exclusive lock on `<root>/LOCK` held for the store's lifetime, so two
    /// processes never share a root (the OS releases it even on `kill -9`).
    _lock: std::fs::File,
}

/// Takes the root's exclusive lock, creating the root if needed.
fn lock_root(root: &Path) -> StoreResult<std::fs::File> {
    std::fs::create_dir_all(root)
        .map_err(|e| StoreError::io(format!("cannot create disk store root {}", root.display()), e))?;
    let path = root.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(format!("cannot open {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another process (lock {} is held)",
            root.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::io(format!("cannot lock {}", path.display()), e))
        }
    }
}

/// Unix time in seconds, as kept in the index.
fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32)
        .unwrap_or(0)
}

fn other(encoding: Encoding) -> Encoding {
    match encoding {
        Encoding::Identity => Encoding::Zstd,
        Encoding::Zstd => Encoding::Identity,
    }
}

/// Where a key's payload may be.
enum Located {
    /// Not stored.
    Absent,
    /// In the index: try `encoding` first (the other one too, in case a
    /// replacement in another encoding is finishing).
    Indexed {
        encoding: Encoding,
        generation: u64,
        state: NodeState,
    },
    /// The startup scan has not reached it yet: look at the file system.
    Unindexed,
}

/// An opened payload, positioned for streaming.
struct OpenRead {
    encoding: Encoding,
    len: u64,
    start: u64,
    first: Bytes,
    file: Option<std::fs::File>,
}

impl DiskStore {
    /// Opens (or creates) the store at `config.root`. Returns at once: the
    /// index is rebuilt by a background task (see
    /// [`DiskStore::wait_until_indexed`]). Must be called inside a tokio
    /// runtime.
    pub async fn open(config: DiskConfig) -> StoreResult<Arc<DiskStore>> {
        let layout = Layout::new(config.root.clone());
        let root = config.root.clone();
        let lock = task::blocking("disk-lock", move || lock_root(&root)).await??;
        task::blocking("disk-open", {
            let layout = layout.clone();
            move || prepare(&layout)
        })
        .await?
        .map_err(|e| {
            StoreError::io(
                format!("cannot prepare disk store at {}", config.root.display()),
                e,
            )
        })?;
        let janitor = Janitor::start();
        janitor.remove_stale_tmp(layout.root().to_path_buf());
        let inner = Arc::new(Inner {
            config,
            layout,
            index: Mutex::new(Index::default()),
            changed: Notify::new(),
            phase: watch::Sender::new(Phase::Scanning),
            janitor,
        });
        task::spawn("disk-scan", scan::run(Arc::downgrade(&inner)));
        Ok(Arc::new(DiskStore { inner, _lock: lock }))
    }

    /// Waits until the startup scan has finished (true), or `timeout` has
    /// passed or the scan failed (false).
    pub async fn wait_until_indexed(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.phase.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|p| *p != Phase::Scanning)).await,
            Ok(Ok(p)) if *p == Phase::Ready
        )
    }

    /// Waits until background housekeeping queued so far (deleting
    /// abandoned temp files and the previous run's temp directory, mtime
    /// refreshes) has run. For tests and orderly shutdown.
    pub async fn quiesce(&self) {
        self.inner.janitor.barrier().await;
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        self.inner.layout.root()
    }
}

/// Creates the directories and moves a previous run's temp files aside
/// (they are deleted in the background).
fn prepare(layout: &Layout) -> io::Result<()> {
    std::fs::create_dir_all(layout.blobs())?;
    let has_stale = match std::fs::read_dir(layout.tmp()) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if has_stale {
        std::fs::rename(layout.tmp(), layout.new_stale_tmp_path())?;
    }
    match std::fs::create_dir(layout.tmp()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl Inner {
    /// Finds where `key` is, counting a use if it is indexed.
    fn locate(&self, key: &BlobKey) -> Located {
        let (found, indexed) = {
            let mut index = self.index.lock();
            let found = index.lookup(key, now_secs(), MTIME_REFRESH_SECS);
            (found, index.is_indexed())
        };
        match found {
            Some(f) => {
                if f.bump_mtime {
                    self.janitor.touch(self.layout.blob_path(key, f.encoding));
                }
                Located::Indexed {
                    encoding: f.encoding,
                    generation: f.generation,
                    state: f.state,
                }
            }
            None if indexed => Located::Absent,
            None => Located::Unindexed,
        }
    }

    fn candidates(&self, key: &BlobKey, located: &Located) -> Vec<(Encoding, PathBuf)> {
        let order = match located {
            Located::Absent => return Vec::new(),
            Located::Indexed { encoding, .. } => [*encoding, other(*encoding)],
            Located::Unindexed => [Encoding::Identity, Encoding::Zstd],
        };
        order
            .into_iter()
            .map(|e| (e, self.layout.blob_path(key, e)))
            .collect()
    }

    /// Bookkeeping after a file-system lookup of `key`.
    fn after_open(&self, key: &BlobKey, located: &Located, found: bool) {
        match located {
            Located::Indexed {
                generation,
                state: NodeState::Idle,
                ..
            } if !found => {
                let forgot = self.index.lock().forget_missing(key, *generation);
                if forgot {
                    tracing::warn!(%key, "blob file vanished from the disk store; forgotten");
                    self.changed.notify_waiters();
                }
            }
            Located::Unindexed if found => self.index.lock().note_unindexed_use(key),
            _ => {}
        }
    }
}

/// Streams `remaining` bytes of `file` in chunks read on the blocking pool.
fn file_stream(key: BlobKey, file: std::fs::File, remaining: u64) -> ChunkStream {
    futures::stream::try_unfold((Some(file), remaining), move |(file, remaining)| {
        let key = key.clone();
        async move {
            let Some(mut file) = file.filter(|_| remaining > 0) else {
                return Ok(None);
            };
            let n = remaining.min(READ_CHUNK);
            let (file, chunk) = task::blocking("disk-read", move || {
                let r = fsio::read_chunk(&mut file, n as usize);
                (file, r)
            })
            .await?;
            let chunk = chunk.map_err(|e| StoreError::io(format!("cannot read {key} from disk"), e))?;
            Ok(Some((chunk, (Some(file), remaining - n))))
        }
    })
    .boxed()
}

#[async_trait]
impl Store for DiskStore {
    fn describe(&self) -> String {
        let cap = self.inner.config.capacity_bytes;
        let cap = if cap == 0 {
            "unbounded".to_string()
        } else {
            human_bytes(cap)
        };
        format!("disk({}, {cap})", self.inner.layout.root().display())
    }

    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        let inner = &self.inner;
        let now = now_secs();
        let mut out = vec![false; keys.len()];
        let mut unindexed = Vec::new();
        let mut bumps = Vec::new();
        {
            let mut index = inner.index.lock();
            let indexed = index.is_indexed();
            for (i, key) in keys.iter().enumerate() {
                match index.lookup(key, now, MTIME_REFRESH_SECS) {
                    Some(f) => {
                        out[i] = f.state != NodeState::Deleting;
                        if f.bump_mtime {
                            bumps.push((i, f.encoding));
                        }
                    }
                    None if !indexed => unindexed.push(i),
                    None => {}
                }
            }
        }
        for (i, encoding) in bumps {
            inner.janitor.touch(inner.layout.blob_path(&keys[i], encoding));
        }
        if unindexed.is_empty() {
            return Ok(out);
        }
        let probes: Vec<Vec<PathBuf>> = unindexed
            .iter()
            .map(|&i| {
                [Encoding::Identity, Encoding::Zstd]
                    .into_iter()
                    .map(|e| inner.layout.blob_path(&keys[i], e))
                    .collect()
            })
            .collect();
        let found = task::blocking("disk-has", move || {
            probes
                .iter()
                .map(|p| fsio::exists_any(p))
                .collect::<io::Result<Vec<bool>>>()
        })
        .await?
        .map_err(|e| StoreError::io("cannot look up blobs on disk", e))?;
        let mut index = inner.index.lock();
        for (&i, hit) in unindexed.iter().zip(found) {
            if hit {
                out[i] = true;
                index.note_unindexed_use(&keys[i]);
            }
        }
        Ok(out)
    }

    async fn get(&self, key: &BlobKey) -> StoreResult<Option<Blob>> {
        let inner = &self.inner;
        let located = inner.locate(key);
        let candidates = inner.candidates(key, &located);
        if candidates.is_empty() {
            return Ok(None);
        }
        let read = task::blocking("disk-get", move || -> io::Result<Option<(Encoding, Bytes)>> {
            match fsio::open_first(&candidates)? {
                Some(o) => Ok(Some((o.encoding, fsio::read_all(o.file, o.len)?))),
                None => Ok(None),
            }
        })
        .await?
        .map_err(|e| StoreError::io(format!("cannot read {key} from disk"), e))?;
        inner.after_open(key, &located, read.is_some());
        let Some((encoding, data)) = read else {
            return Ok(None);
        };
        Ok(Some(Blob { encoding, data }))
    }

    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>> {
        let inner = &self.inner;
        let located = inner.locate(key);
        let candidates = inner.candidates(key, &located);
        if candidates.is_empty() {
            return Ok(None);
        }
        let opened = task::blocking("disk-open-read", move || -> io::Result<Option<OpenRead>> {
            let Some(o) = fsio::open_first(&candidates)? else {
                return Ok(None);
            };
            let mut file = o.file;
            let start = match o.encoding {
                Encoding::Identity => offset.min(o.len),
                Encoding::Zstd => 0,
            };
            fsio::seek_to(&mut file, start)?;
            // The first chunk comes with the open: one blocking call for a
            // small blob.
            let n = (o.len - start).min(READ_CHUNK);
            let first = fsio::read_chunk(&mut file, n as usize)?;
            let rest = o.len - start - n;
            Ok(Some(OpenRead {
                encoding: o.encoding,
                len: o.len,
                start,
                first,
                file: (rest > 0).then_some(file),
            }))
        })
        .await?
        .map_err(|e| StoreError::io(format!("cannot read {key} from disk"), e))?;
        inner.after_open(key, &located, opened.is_some());
        let Some(o) = opened else {
            return Ok(None);
        };
        let rest = o.len - o.start - o.first.len() as u64;
        let head: ChunkStream = if o.first.is_empty() {
            futures::stream::empty().boxed()
        } else {
            futures::stream::once(futures::future::ready(Ok(o.first))).boxed()
        };
        let stream = match o.file {
            Some(file) => head.chain(file_stream(key.clone(), file, rest)).boxed(),
            None => head,
        };
        Ok(Some(BlobRead {
            encoding: o.encoding,
            start: o.start,
            stored_len: o.len,
            stream,
        }))
    }

    async fn put(&self, key: &BlobKey, blob: Blob) -> StoreResult<()> {
        let len = blob.data.len() as u64;
        self.inner
            .install(key, blob.encoding, Source::Bytes(blob.data), len)
            .await
    }

    async fn begin_write(&self, key: &BlobKey, encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        let w = writer::DiskWriter::create(Arc::clone(&self.inner), key.clone(), encoding).await?;
        Ok(Box::new(w))
    }

    fn stats(&self) -> StoreStats {
        let c = self.inner.index.lock().counters();
        StoreStats {
            bytes: c.used,
            items: c.items,
            capacity: self.inner.config.capacity_bytes,
            evictions: c.evictions,
            oldest_age_secs: c
                .oldest_use
                .map(|t| u64::from(now_secs().saturating_sub(t)))
                .unwrap_or(0),
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
