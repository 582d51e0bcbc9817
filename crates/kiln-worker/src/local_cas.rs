//! A local disk cache of CAS blobs, from which inputs are hardlinked.
//!
//! * One read-only file per (blob, executable bit):
//!   `{dir}/{function}/{xx}/{hash}-{size}` (mode 0444) and the same name
//!   with `-x` (mode 0555). Executables get their own file so that a
//!   hardlinked binary is never shared with a writable or differently-moded
//!   copy; read-only files make in-place writes through a hardlink fail
//!   with EACCES for an action without `CAP_DAC_OVERRIDE` (the sandbox
//!   drops it).
//! * Bounded by bytes, least recently used first. A blob pinned by a
//!   running action is never evicted: it leaves the LRU list while pinned,
//!   so the cache may exceed its capacity while a large action runs.
//! * Missing blobs are fetched concurrently: small ones with
//!   BatchReadBlobs (batches sized by the server's limit), large ones with
//!   ByteStream Read streamed to disk; every blob is verified. Concurrent
//!   actions needing the same blob fetch it once.
//! * Files are written under `tmp/` and renamed into place, so a crash
//!   never leaves a partial blob visible. A cache closed cleanly (marker
//!   file `CLEAN`) is re-indexed at start; otherwise it is wiped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_store::task;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::cas::{BatchBlob, InstanceCas};
use crate::error::{WorkerError, WorkerResult};

const CLEAN_MARKER: &str = "CLEAN";

/// A blob in the cache: its content key and whether the file is executable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub key: BlobKey,
    pub executable: bool,
}

impl CacheKey {
    pub fn new(key: BlobKey, executable: bool) -> Self {
        CacheKey { key, executable }
    }

    fn mode(&self) -> u32 {
        if self.executable { 0o555 } else { 0o444 }
    }
}

struct Entry {
    size: u64,
    pins: u32,
    /// Position in `State::lru` while unpinned.
    tick: u64,
    /// Modification time recorded at insertion, to notice in-place writes.
    mtime_ns: i64,
}

#[derive(Default)]
struct State {
    entries: HashMap<CacheKey, Entry>,
    /// Unpinned entries, oldest first.
    lru: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: u64,
    /// Blobs being fetched or deleted: wait for the sender to finish.
    busy: HashMap<CacheKey, watch::Receiver<bool>>,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn pin(&mut self, k: &CacheKey) -> bool {
        let Some(e) = self.entries.get_mut(k) else {
            return false;
        };
        if e.pins == 0 {
            self.lru.remove(&e.tick);
        }
        e.pins += 1;
        true
    }

    fn unpin(&mut self, k: &CacheKey) {
        let tick = self.tick();
        if let Some(e) = self.entries.get_mut(k)
            && e.pins > 0
        {
            e.pins -= 1;
            if e.pins == 0 {
                e.tick = tick;
                self.lru.insert(tick, k.clone());
            }
        }
    }

    /// Removes unpinned entries until under `capacity`; returns them.
    fn evict(&mut self, capacity: u64) -> Vec<CacheKey> {
        let mut victims = Vec::new();
        while self.bytes > capacity {
            let Some((_, k)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&k) {
                self.bytes -= e.size;
            }
            victims.push(k);
        }
        victims
    }
}

/// Cache statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCasStats {
    pub blobs: usize,
    pub bytes: u64,
    pub pinned: usize,
    pub capacity: u64,
}

/// How often the cache had what actions needed (monotonic since open).
/// Each distinct blob an [`LocalCas::ensure`] call wants counts once: as a
/// hit when it was in the cache (or being fetched by another action), as a
/// miss when this call fetched it from the CAS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalCasCounts {
    pub hits: u64,
    pub misses: u64,
    pub hit_bytes: u64,
    pub miss_bytes: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    hit_bytes: AtomicU64,
    miss_bytes: AtomicU64,
}

impl Counters {
    fn add(&self, hit: bool, blobs: u64, bytes: u64) {
        let (n, b) = if hit {
            (&self.hits, &self.hit_bytes)
        } else {
            (&self.misses, &self.miss_bytes)
        };
        n.fetch_add(blobs, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The cache. Share it with `Arc`.
pub struct LocalCas {
    dir: PathBuf,
    tmp: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    tmp_counter: AtomicU64,
    counters: Counters,
}

/// Blobs pinned for one action; unpinned when dropped.
pub struct Pins {
    cache: Arc<LocalCas>,
    keys: Vec<CacheKey>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut st = self.cache.state.lock();
        for k in &self.keys {
            st.unpin(k);
        }
    }
}

impl Pins {
    /// Path of a pinned blob's file.
    pub fn path(&self, k: &CacheKey) -> PathBuf {
        self.cache.path_of(k)
    }

    pub fn keys(&self) -> &[CacheKey] {
        &self.keys
    }

    /// Checks that no pinned file was modified in place (mode, size or
    /// mtime changed, e.g. by an action running as the cache's owner that
    /// made an input writable). Modified files are dropped from the cache
    /// so no later action gets them; returns how many were dropped.
    pub async fn drop_modified(&self) -> WorkerResult<usize> {
        let expected: Vec<(CacheKey, PathBuf, u64, i64)> = {
            let st = self.cache.state.lock();
            self.keys
                .iter()
                .filter_map(|k| {
                    st.entries
                        .get(k)
                        .map(|e| (k.clone(), self.cache.path_of(k), e.size, e.mtime_ns))
                })
                .collect()
        };
        let bad = task::blocking("local-cas-verify", move || {
            expected
                .into_iter()
                .filter(|(k, path, size, mtime)| match std::fs::symlink_metadata(path) {
                    Ok(m) => {
                        m.len() != *size
                            || m.mode() & 0o7777 != k.mode()
                            || m.mtime() * 1_000_000_000 + m.mtime_nsec() != *mtime
                    }
                    Err(_) => true,
                })
                .map(|(k, path, _, _)| (k, path))
                .collect::<Vec<_>>()
        })
        .await?;
        if bad.is_empty() {
            return Ok(0);
        }
        let n = bad.len();
        {
            let mut st = self.cache.state.lock();
            for (k, _) in &bad {
                if let Some(e) = st.entries.remove(k) {
                    st.bytes -= e.size;
                    if e.pins == 0 {
                        st.lru.remove(&e.tick);
                    }
                }
            }
        }
        tracing::warn!(
            count = n,
            "inputs were modified in place by an action; dropped from the local cache"
        );
        task::blocking("local-cas-drop", move || {
            for (_, path) in bad {
                let _ = std::fs::remove_file(path);
            }
        })
        .await?;
        Ok(n)
    }
}

/// A fetch in flight: what it got and which blobs the CAS lacks.
type FetchJob<'a> = futures::future::BoxFuture<'a, WorkerResult<(Fetched, Vec<BlobKey>)>>;

/// What one fetch job produces.
enum Fetched {
    /// Blobs read into memory, with the variants each is wanted in.
    Batch(Vec<(BlobKey, Bytes)>),
    /// A large blob streamed into a temporary file.
    File(BlobKey, PathBuf),
}

/// Removes a `busy` entry and wakes its waiters when dropped (also when
/// the fetch fails or is cancelled: waiters then retry themselves).
struct BusyGuard {
    cache: Arc<LocalCas>,
    key: CacheKey,
    tx: watch::Sender<bool>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.cache.state.lock().busy.remove(&self.key);
        let _ = self.tx.send(true);
    }
}

impl LocalCas {
    /// Opens (creating) the cache in `dir`. A cache that was closed cleanly
    /// is re-indexed (files with a wrong size or mode are deleted);
    /// otherwise its content is wiped.
    pub async fn open(dir: impl Into<PathBuf>, capacity: u64) -> WorkerResult<Arc<LocalCas>> {
        let dir = dir.into();
        let tmp = dir.join("tmp");
        let scan_dir = dir.clone();
        let (entries, bytes) = task::blocking("local-cas-open", move || scan(&scan_dir)).await??;
        let cache = Arc::new(LocalCas {
            dir,
            tmp,
            capacity,
            state: Mutex::new(State::default()),
            tmp_counter: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let victims = {
            let mut st = cache.state.lock();
            for (k, size, mtime_ns) in entries {
                let tick = st.tick();
                st.lru.insert(tick, k.clone());
                st.entries.insert(
                    k,
                    Entry {
                        size,
                        pins: 0,
                        tick,
                        mtime_ns,
                    },
                );
            }
            st.bytes = bytes;
            st.evict(capacity)
        };
        cache.delete_victims(victims).await;
        Ok(cache)
    }

    /// Flushes the cache's file system and marks the cache clean so that
    /// the next [`LocalCas::open`] keeps its content.
    pub async fn close(&self) -> WorkerResult<()> {
        let dir = self.dir.clone();
        task::blocking("local-cas-close", move || -> WorkerResult<()> {
            let d = std::fs::File::open(&dir).map_err(WorkerError::io("opening the cache directory"))?;
            nix::unistd::syncfs(&d)
                .map_err(|e| WorkerError::Internal(format!("syncfs of the local cache: {e}")))?;
            std::fs::write(dir.join(CLEAN_MARKER), b"")
                .map_err(WorkerError::io("writing the cache's clean marker"))?;
            Ok(())
        })
        .await?
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> LocalCasStats {
        let st = self.state.lock();
        LocalCasStats {
            blobs: st.entries.len(),
            bytes: st.bytes,
            pinned: st.entries.values().filter(|e| e.pins > 0).count(),
            capacity: self.capacity,
        }
    }

    /// Hits and misses so far.
    pub fn counts(&self) -> LocalCasCounts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        LocalCasCounts {
            hits: l(&c.hits),
            misses: l(&c.misses),
            hit_bytes: l(&c.hit_bytes),
            miss_bytes: l(&c.miss_bytes),
        }
    }

    /// Whether the blob is cached (pinned or not).
    pub fn contains(&self, k: &CacheKey) -> bool {
        self.state.lock().entries.contains_key(k)
    }

    /// The file of a cached blob.
    pub fn path_of(&self, k: &CacheKey) -> PathBuf {
        blob_path(&self.dir, k)
    }

    fn next_tmp(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}-{n}", std::process::id()))
    }

    /// Makes every blob in `wanted` present and pinned, fetching what is
    /// missing from `cas`. Blobs absent from the CAS are reported together
    /// as [`WorkerError::MissingBlobs`].
    pub async fn ensure(
        self: &Arc<Self>,
        cas: &InstanceCas,
        wanted: Vec<CacheKey>,
        concurrency: usize,
    ) -> WorkerResult<Pins> {
        let mut pins = Pins {
            cache: self.clone(),
            keys: Vec::with_capacity(wanted.len()),
        };
        let mut todo: Vec<CacheKey> = {
            let mut seen = HashSet::new();
            wanted.into_iter().filter(|k| seen.insert(k.clone())).collect()
        };
        // Each round pins what is present, fetches what nobody fetches and
        // waits for the rest; a waiter whose fetcher failed fetches itself
        // in the next round. Bounded: a blob stays busy only while a fetch
        // or deletion of it runs.
        for _round in 0..64 {
            if todo.is_empty() {
                return Ok(pins);
            }
            let mut mine = Vec::new();
            let mut waits = Vec::new();
            let mut later = Vec::new();
            let (mut hits, mut hit_bytes, mut miss_bytes) = (0u64, 0u64, 0u64);
            {
                let mut st = self.state.lock();
                for k in todo.drain(..) {
                    if st.pin(&k) {
                        hits += 1;
                        hit_bytes += k.key.size();
                        pins.keys.push(k);
                    } else if let Some(rx) = st.busy.get(&k) {
                        waits.push(rx.clone());
                        later.push(k);
                    } else {
                        let (tx, rx) = watch::channel(false);
                        st.busy.insert(k.clone(), rx);
                        miss_bytes += k.key.size();
                        mine.push(BusyGuard {
                            cache: self.clone(),
                            key: k,
                            tx,
                        });
                    }
                }
            }
            self.counters.add(true, hits, hit_bytes);
            self.counters.add(false, mine.len() as u64, miss_bytes);
            if !mine.is_empty() {
                // Fetched blobs are inserted already pinned for us, so that
                // fetching the rest cannot evict them.
                let (pinned, fetched) = self.fetch(cas, &mine, concurrency).await;
                pins.keys.extend(pinned);
                fetched?;
                drop(mine);
            }
            for mut rx in waits {
                // Err: the fetcher went away (failed or cancelled): retry.
                let _ = rx.wait_for(|done| *done).await;
            }
            todo = later;
        }
        Err(WorkerError::Internal(
            "local cache: blobs stayed busy for too long".into(),
        ))
    }

    /// Fetches the blobs of `guards` and inserts them, pinned, into the
    /// index. Returns the pinned keys also on failure (the caller unpins).
    async fn fetch(
        self: &Arc<Self>,
        cas: &InstanceCas,
        guards: &[BusyGuard],
        concurrency: usize,
    ) -> (Vec<CacheKey>, WorkerResult<()>) {
        let mut pinned = Vec::with_capacity(guards.len());
        let r = self.fetch_into(cas, guards, concurrency, &mut pinned).await;
        (pinned, r)
    }

    async fn fetch_into(
        self: &Arc<Self>,
        cas: &InstanceCas,
        guards: &[BusyGuard],
        concurrency: usize,
        pinned: &mut Vec<CacheKey>,
    ) -> WorkerResult<()> {
        // Variants wanted per content key.
        let mut variants: HashMap<BlobKey, (bool, bool)> = HashMap::new();
        for g in guards {
            let v = variants.entry(g.key.key.clone()).or_default();
            if g.key.executable {
                v.1 = true;
            } else {
                v.0 = true;
            }
        }
        let (small, large): (Vec<BlobKey>, Vec<BlobKey>) =
            variants.keys().cloned().partition(|k| cas.fits_batch(k.size()));
        let mut jobs: Vec<FetchJob<'_>> = Vec::new();
        for batch in cas.batches(small.iter()) {
            jobs.push(Box::pin(async move {
                let mut found = Vec::new();
                let mut missing = Vec::new();
                let without_empty: Vec<BlobKey> =
                    batch.iter().filter(|k| !k.is_empty_blob()).cloned().collect();
                for k in batch.iter().filter(|k| k.is_empty_blob()) {
                    found.push((k.clone(), Bytes::new()));
                }
                if !without_empty.is_empty() {
                    for (k, b) in cas.batch_read(&without_empty).await? {
                        match b {
                            BatchBlob::Found(data) => found.push((k, data)),
                            BatchBlob::Missing => missing.push(k),
                        }
                    }
                }
                Ok((Fetched::Batch(found), missing))
            }));
        }
        for k in large {
            let this = self.clone();
            jobs.push(Box::pin(async move {
                let tmp = this.next_tmp();
                let mut file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(WorkerError::io(format!("creating {}", tmp.display())))?;
                match cas.read_to_file(&k, &mut file).await {
                    Ok(()) => Ok((Fetched::File(k, tmp), Vec::new())),
                    Err(WorkerError::MissingBlobs(m)) => {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        Ok((Fetched::Batch(Vec::new()), m))
                    }
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        Err(e)
                    }
                }
            }));
        }
        let mut results = futures::stream::iter(jobs).buffer_unordered(concurrency.max(1));
        let mut missing = Vec::new();
        let mut first_err = None;
        while let Some(r) = results.next().await {
            match r {
                Ok((fetched, m)) => {
                    missing.extend(m);
                    match self.store(fetched, &variants).await {
                        Ok(keys) => pinned.extend(keys),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if !missing.is_empty() {
            missing.sort();
            return Err(WorkerError::MissingBlobs(missing));
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes fetched content to its final files and indexes them pinned.
    async fn store(
        self: &Arc<Self>,
        fetched: Fetched,
        variants: &HashMap<BlobKey, (bool, bool)>,
    ) -> WorkerResult<Vec<CacheKey>> {
        let mut files: Vec<(CacheKey, Source)> = Vec::new();
        match fetched {
            Fetched::Batch(blobs) => {
                for (k, data) in blobs {
                    let (plain, exec) = variants.get(&k).copied().unwrap_or((true, false));
                    if plain {
                        files.push((CacheKey::new(k.clone(), false), Source::Bytes(data.clone())));
                    }
                    if exec {
                        files.push((CacheKey::new(k, true), Source::Bytes(data)));
                    }
                }
            }
            Fetched::File(k, tmp) => {
                let (plain, exec) = variants.get(&k).copied().unwrap_or((true, false));
                match (plain, exec) {
                    (true, true) => {
                        files.push((CacheKey::new(k.clone(), true), Source::CopyOf(tmp.clone())));
                        files.push((CacheKey::new(k, false), Source::File(tmp)));
                    }
                    (false, true) => files.push((CacheKey::new(k, true), Source::File(tmp))),
                    _ => files.push((CacheKey::new(k, false), Source::File(tmp))),
                }
            }
        }
        let this = self.clone();
        let written = task::blocking("local-cas-store", move || {
            let mut out = Vec::with_capacity(files.len());
            for (k, src) in files {
                let tmp = this.next_tmp();
                let mtime = write_blob_file(&this.tmp, &tmp, &this.path_of(&k), &src, k.mode())?;
                out.push((k, mtime));
            }
            Ok::<_, WorkerError>(out)
        })
        .await??;
        let mut keys = Vec::with_capacity(written.len());
        let victims = {
            let mut st = self.state.lock();
            for (k, mtime_ns) in written {
                let size = k.key.size();
                if let Some(old) = st.entries.get_mut(&k) {
                    // Same content renamed over an existing entry.
                    old.mtime_ns = mtime_ns;
                    st.pin(&k);
                } else {
                    st.entries.insert(
                        k.clone(),
                        Entry {
                            size,
                            pins: 1,
                            tick: 0,
                            mtime_ns,
                        },
                    );
                    st.bytes += size;
                }
                keys.push(k);
            }
            st.evict(self.capacity)
        };
        self.delete_victims(victims).await;
        Ok(keys)
    }

    /// Deletes evicted files. Each victim is marked busy until its file is
    /// gone, so that a concurrent fetch of the same blob cannot have its new
    /// file deleted.
    async fn delete_victims(self: &Arc<Self>, victims: Vec<CacheKey>) {
        if victims.is_empty() {
            return;
        }
        let mut guards = Vec::with_capacity(victims.len());
        {
            let mut st = self.state.lock();
            for k in victims {
                if st.busy.contains_key(&k) {
                    // Someone is fetching it anew: let them overwrite it.
                    continue;
                }
                let (tx, rx) = watch::channel(false);
                st.busy.insert(k.clone(), rx);
                guards.push(BusyGuard {
                    cache: self.clone(),
                    key: k,
                    tx,
                });
            }
        }
        let paths: Vec<PathBuf> = guards.iter().map(|g| self.path_of(&g.key)).collect();
        let r = task::blocking("local-cas-evict", move || {
            for p in paths {
                if let Err(e) = std::fs::remove_file(&p)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %p.display(), error = %e, "evicting from the local cache failed");
                }
            }
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "evicting from the local cache failed");
        }
        drop(guards);
    }
}

enum Source {
    Bytes(Bytes),
    /// A verified temporary file, renamed into place.
    File(PathBuf),
    /// A verified temporary file, copied (it is renamed for another variant).
    CopyOf(PathBuf),
}

/// Writes one cache file: content to `tmp`, mode set, renamed to `dest`.
/// Returns the file's mtime in nanoseconds.
fn write_blob_file(tmp_dir: &Path, tmp: &Path, dest: &Path, src: &Source, mode: u32) -> WorkerResult<i64> {
    let staged: &Path = match src {
        Source::Bytes(data) => {
            std::fs::create_dir_all(tmp_dir)
                .map_err(WorkerError::io("creating the cache's tmp directory"))?;
            std::fs::write(tmp, data).map_err(WorkerError::io(format!("writing {}", tmp.display())))?;
            tmp
        }
        Source::File(path) => path,
        Source::CopyOf(path) => {
            std::fs::copy(path, tmp).map_err(WorkerError::io(format!("copying {}", path.display())))?;
            tmp
        }
    };
    std::fs::set_permissions(staged, std::fs::Permissions::from_mode(mode)).map_err(WorkerError::io(
        format!("setting the mode of {}", staged.display()),
    ))?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(WorkerError::io(format!("creating {}", parent.display())))?;
    }
    std::fs::rename(staged, dest).map_err(WorkerError::io(format!("renaming into {}", dest.display())))?;
    let m =
        std::fs::symlink_metadata(dest).map_err(WorkerError::io(format!("stat of {}", dest.display())))?;
    Ok(m.mtime() * 1_000_000_000 + m.mtime_nsec())
}

fn blob_path(dir: &Path, k: &CacheKey) -> PathBuf {
    let hash = k.key.hash_hex();
    let suffix = if k.executable { "-x" } else { "" };
    dir.join(k.key.function().name())
        .join(&hash[..2])
        .join(format!("{hash}-{}{suffix}", k.key.size()))
}

/// Parses a cache file name back into its key.
fn parse_name(function: DigestFunction, name: &str) -> Option<CacheKey> {
    let (rest, executable) = match name.strip_suffix("-x") {
        Some(r) => (r, true),
        None => (name, false),
    };
    let (hash, size) = rest.split_once('-')?;
    let size: i64 = size.parse().ok()?;
    let key = BlobKey::from_hex(function, hash, size).ok()?;
    Some(CacheKey { key, executable })
}

type Scanned = (Vec<(CacheKey, u64, i64)>, u64);

/// Re-indexes a cleanly closed cache, or wipes an unclean one.
fn scan(dir: &Path) -> WorkerResult<Scanned> {
    std::fs::create_dir_all(dir).map_err(WorkerError::io(format!("creating {}", dir.display())))?;
    let tmp = dir.join("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(WorkerError::io(format!("clearing {}", tmp.display())))?;
    }
    std::fs::create_dir_all(&tmp).map_err(WorkerError::io(format!("creating {}", tmp.display())))?;
    let marker = dir.join(CLEAN_MARKER);
    let clean = marker.exists();
    if clean {
        std::fs::remove_file(&marker).map_err(WorkerError::io("removing the cache's clean marker"))?;
    }
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for function in DigestFunction::ALL {
        let fdir = dir.join(function.name());
        if !fdir.exists() {
            continue;
        }
        if !clean {
            tracing::info!(dir = %fdir.display(), "local cache was not closed cleanly; wiping it");
            std::fs::remove_dir_all(&fdir).map_err(WorkerError::io(format!("wiping {}", fdir.display())))?;
            continue;
        }
        for sub in std::fs::read_dir(&fdir).map_err(WorkerError::io(format!("reading {}", fdir.display())))? {
            let sub = sub.map_err(WorkerError::io(format!("reading {}", fdir.display())))?;
            for f in std::fs::read_dir(sub.path()).map_err(WorkerError::io("reading the local cache"))? {
                let f = f.map_err(WorkerError::io("reading the local cache"))?;
                let path = f.path();
                let parsed = f.file_name().to_str().and_then(|n| parse_name(function, n));
                let meta = std::fs::symlink_metadata(&path).ok();
                match (parsed, meta) {
                    (Some(k), Some(m))
                        if m.is_file() && m.len() == k.key.size() && m.mode() & 0o7777 == k.mode() =>
                    {
                        bytes += m.len();
                        out.push((k, m.len(), m.mtime() * 1_000_000_000 + m.mtime_nsec()));
                    }
                    _ => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
    }
    Ok((out, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let k = BlobKey::of(DigestFunction::Sha256, b"hello");
        for exec in [false, true] {
            let ck = CacheKey::new(k.clone(), exec);
            let p = blob_path(Path::new("/c"), &ck);
            let name = p.file_name().unwrap().to_str().unwrap();
            assert_eq!(parse_name(DigestFunction::Sha256, name), Some(ck));
        }
        assert_eq!(parse_name(DigestFunction::Sha256, "junk"), None);
    }

    #[test]
    fn eviction_skips_pinned() {
        let mut st = State::default();
        let keys: Vec<CacheKey> = (0..4u8)
            .map(|i| CacheKey::new(BlobKey::of(DigestFunction::Sha256, &[i; 10]), false))
            .collect();
        for k in &keys {
            let tick = st.tick();
            st.lru.insert(tick, k.clone());
            st.entries.insert(
                k.clone(),
                Entry {
                    size: 10,
                    pins: 0,
                    tick,
                    mtime_ns: 0,
                },
            );
            st.bytes += 10;
        }
        assert!(st.pin(&keys[0]));
        let victims = st.evict(15);
        assert!(!victims.contains(&keys[0]));
        assert_eq!(victims.len(), 3);
        assert_eq!(st.bytes, 10);
        // Everything left is pinned: nothing more can go.
        assert!(st.evict(0).is_empty());
        st.unpin(&keys[0]);
        assert_eq!(st.evict(0), vec![keys[0].clone()]);
    }
}
