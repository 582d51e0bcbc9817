//! The store decorators: tiered (fill on read, write through), compressed
//! (zstd at rest) and the existence cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kiln_digest::DigestFunction;
use kiln_store::compressed::CompressedStore;
use kiln_store::existence_cache::ExistenceCache;
use kiln_store::memory::MemoryStore;
use kiln_store::tiered::TieredStore;
use kiln_store::{
    Blob, BlobKey, BlobRead, BlobWriter, Encoding, Store, StoreError, StoreResult, StoreStats, codec,
};
use parking_lot::Mutex;

async fn concat(stream: kiln_store::ChunkStream) -> Vec<u8> {
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    chunks.concat()
}

fn key_of(data: &[u8]) -> BlobKey {
    BlobKey::of(DigestFunction::Sha256, data)
}

/// Compressible content: text-like lines with a counter.
fn text(seed: u64, len: usize) -> Bytes {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("line {i} of blob {seed}: the quick brown fox\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A pass-through store that records which keys `has_many` was asked about.
struct Counting {
    inner: Arc<dyn Store>,
    asked: Mutex<Vec<BlobKey>>,
    calls: AtomicUsize,
}

impl Counting {
    fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            asked: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
        })
    }

    /// Keys asked since the last call.
    fn take_asked(&self) -> Vec<BlobKey> {
        std::mem::take(&mut *self.asked.lock())
    }
}

#[async_trait]
impl Store for Counting {
    fn describe(&self) -> String {
        format!("counting({})", self.inner.describe())
    }
    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.asked.lock().extend(keys.iter().cloned());
        self.inner.has_many(keys).await
    }
    async fn get(&self, key: &BlobKey) -> StoreResult<Option<Blob>> {
        self.inner.get(key).await
    }
    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>> {
        self.inner.read(key, offset).await
    }
    async fn put(&self, key: &BlobKey, blob: Blob) -> StoreResult<()> {
        self.inner.put(key, blob).await
    }
    async fn begin_write(&self, key: &BlobKey, encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        self.inner.begin_write(key, encoding).await
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

async fn present(store: &dyn Store, key: &BlobKey) -> bool {
    store.has_many(std::slice::from_ref(key)).await.unwrap()[0]
}

async fn identity_from(store: &dyn Store, key: &BlobKey, offset: u64) -> Vec<u8> {
    let read = store.read(key, offset).await.unwrap().unwrap();
    concat(codec::identity_stream(read, offset)).await
}

fn tiers(fast_capacity: u64, slow_capacity: u64) -> (Arc<MemoryStore>, Arc<MemoryStore>, TieredStore) {
    let fast = Arc::new(MemoryStore::new(fast_capacity));
    let slow = Arc::new(MemoryStore::new(slow_capacity));
    let tiered = TieredStore::new(fast.clone(), slow.clone());
    (fast, slow, tiered)
}

#[tokio::test]
async fn tiered_get_fills_fast_tier() {
    let (fast, slow, tiered) = tiers(1 << 20, 1 << 20);
    let data = text(1, 5000);
    let key = key_of(&data);
    slow.put(&key, Blob::identity(data.clone())).await.unwrap();
    assert!(!present(fast.as_ref(), &key).await);
    assert!(present(&tiered, &key).await);
    assert!(!present(fast.as_ref(), &key).await, "has_many must not fill");

    assert_eq!(tiered.get(&key).await.unwrap().unwrap().data, data);
    assert_eq!(
        fast.get(&key).await.unwrap().unwrap().data,
        data,
        "get fills the fast tier"
    );
    assert!(tiered.get(&key_of(b"nope")).await.unwrap().is_none());
    // Stats are the slow (durable) tier's.
    assert_eq!(tiered.stats(), slow.stats());
}

#[tokio::test]
async fn tiered_has_many_asks_slow_only_for_misses() {
    let fast = Arc::new(MemoryStore::new(1 << 20));
    let slow_mem = Arc::new(MemoryStore::new(1 << 20));
    let slow = Counting::new(slow_mem.clone());
    // No touch-behind rounds here: they would ask the slow tier too.
    let tiered = TieredStore::with_touch_interval(fast.clone(), slow.clone(), None);
    let (a, b, c) = (text(1, 100), text(2, 100), text(3, 100));
    let (ka, kb, kc) = (key_of(&a), key_of(&b), key_of(&c));
    fast.put(&ka, Blob::identity(a)).await.unwrap();
    slow_mem.put(&kb, Blob::identity(b)).await.unwrap();
    let found = tiered
        .has_many(&[ka.clone(), kb.clone(), kc.clone()])
        .await
        .unwrap();
    assert_eq!(found, vec![true, true, false]);
    assert_eq!(slow.take_asked(), vec![kb, kc]);
    assert_eq!(
        tiered.has_many(std::slice::from_ref(&ka)).await.unwrap(),
        vec![true]
    );
    assert_eq!(
        slow.calls.load(Ordering::Relaxed),
        1,
        "no slow call when fast has all"
    );
}

#[tokio::test]
async fn tiered_streamed_read_fills_fast_tier() {
    let (fast, slow, tiered) = tiers(4 << 20, 4 << 20);
    let data = text(2, 300_000);
    let key = key_of(&data);
    slow.put(&key, Blob::identity(data.clone())).await.unwrap();

    // A read abandoned half way does not fill.
    let mut read = tiered.read(&key, 0).await.unwrap().unwrap();
    let first = read.stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty() && first.len() < data.len());
    drop(read);
    assert!(!present(fast.as_ref(), &key).await, "partial read must not fill");

    // A read at an offset serves the right bytes (and does not fill).
    assert_eq!(identity_from(&tiered, &key, 123_456).await, &data[123_456..]);
    assert!(!present(fast.as_ref(), &key).await);

    // A complete read fills.
    let read = tiered.read(&key, 0).await.unwrap().unwrap();
    assert_eq!((read.start, read.stored_len), (0, data.len() as u64));
    let got = concat(read.stream).await;
    assert_eq!(got, data);
    assert_eq!(
        fast.get(&key).await.unwrap().unwrap().data,
        data,
        "streamed read fills the fast tier"
    );

    // Served from the fast tier from now on, even if the slow one lost it.
    let slow_only = Arc::new(MemoryStore::new(1 << 20));
    let tiered2 = TieredStore::new(fast.clone(), slow_only);
    assert_eq!(identity_from(&tiered2, &key, 10).await, &data[10..]);
}

#[tokio::test]
async fn tiered_fill_skipped_when_fast_tier_too_small() {
    let (fast, slow, tiered) = tiers(1000, 1 << 20);
    let data = text(3, 5000);
    let key = key_of(&data);
    slow.put(&key, Blob::identity(data.clone())).await.unwrap();
    assert_eq!(identity_from(&tiered, &key, 0).await, data);
    assert_eq!(tiered.get(&key).await.unwrap().unwrap().data, data);
    assert_eq!(fast.stats().items, 0);
}

#[tokio::test]
async fn tiered_writes_through() {
    let (fast, slow, tiered) = tiers(1 << 20, 1 << 20);
    let a = text(4, 2000);
    let ka = key_of(&a);
    tiered.put(&ka, Blob::identity(a.clone())).await.unwrap();
    assert_eq!(fast.get(&ka).await.unwrap().unwrap().data, a);
    assert_eq!(slow.get(&ka).await.unwrap().unwrap().data, a);

    let b = text(5, 100_000);
    let kb = key_of(&b);
    let mut w = tiered.begin_write(&kb, Encoding::Identity).await.unwrap();
    for c in b.chunks(30_000) {
        w.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    assert!(!present(&tiered, &kb).await, "nothing visible before commit");
    w.commit().await.unwrap();
    assert_eq!(fast.get(&kb).await.unwrap().unwrap().data, b);
    assert_eq!(slow.get(&kb).await.unwrap().unwrap().data, b);

    // Dropped writers leave nothing behind in either tier.
    let c = text(6, 500);
    let kc = key_of(&c);
    let mut w = tiered.begin_write(&kc, Encoding::Identity).await.unwrap();
    w.write(c.clone()).await.unwrap();
    drop(w);
    assert!(!present(fast.as_ref(), &kc).await && !present(slow.as_ref(), &kc).await);
}

#[tokio::test]
async fn tiered_slow_errors_fail_fast_errors_do_not() {
    // Fast tier too small: the write succeeds through the slow tier.
    let (fast, slow, tiered) = tiers(100, 1 << 20);
    let data = text(7, 1000);
    let key = key_of(&data);
    tiered.put(&key, Blob::identity(data.clone())).await.unwrap();
    let mut w = tiered
        .begin_write(&key_of(b"x"), Encoding::Identity)
        .await
        .unwrap();
    w.write(data.clone()).await.unwrap();
    w.commit().await.unwrap();
    assert!(present(slow.as_ref(), &key).await && !present(fast.as_ref(), &key).await);

    // Slow tier too small: the write fails even though fast could hold it.
    let (_fast, _slow, tiered) = tiers(1 << 20, 100);
    let err = tiered.put(&key, Blob::identity(data.clone())).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert!(tiered.begin_write(&key, Encoding::Identity).await.is_err());
}

#[tokio::test]
async fn compressed_stores_zstd_in_inner() {
    let inner = Arc::new(MemoryStore::new(16 << 20));
    let store = CompressedStore::new(inner.clone(), codec::DEFAULT_ZSTD_LEVEL);
    // Both sides of the blocking-pool threshold.
    for (seed, len) in [(1, 10_000), (2, 500_000)] {
        let data = text(seed, len);
        let key = key_of(&data);
        store.put(&key, Blob::identity(data.clone())).await.unwrap();
        let stored = inner.get(&key).await.unwrap().unwrap();
        assert_eq!(stored.encoding, Encoding::Zstd);
        assert!(
            stored.data.len() < data.len() / 4,
            "{} vs {}",
            stored.data.len(),
            data.len()
        );
        assert_eq!(codec::decompress(&stored.data, len as u64).unwrap(), data);
        // Identity readers get the original bytes, at any offset.
        assert_eq!(codec::get_identity(&store, &key).await.unwrap().unwrap(), data);
        for offset in [0, 1, len as u64 / 2, len as u64 - 1, len as u64] {
            assert_eq!(
                identity_from(&store, &key, offset).await,
                &data[offset as usize..]
            );
        }
    }
    // Tiny blobs stay identity.
    let tiny = Bytes::from_static(b"tiny");
    let key = key_of(&tiny);
    store.put(&key, Blob::identity(tiny.clone())).await.unwrap();
    assert_eq!(inner.get(&key).await.unwrap().unwrap(), Blob::identity(tiny));
    assert!(store.describe().starts_with("zstd(level 1"));
}

#[tokio::test]
async fn compressed_streaming_write_stores_zstd() {
    let inner = Arc::new(MemoryStore::new(16 << 20));
    let store = CompressedStore::new(inner.clone(), 3);
    let data = text(8, 700_000);
    let key = key_of(&data);
    let mut w = store.begin_write(&key, Encoding::Identity).await.unwrap();
    // Chunks on both sides of the blocking threshold.
    for c in data
        .slice(..10_000)
        .chunks(1000)
        .chain(data[10_000..].chunks(200_000))
    {
        w.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    assert!(!present(inner.as_ref(), &key).await);
    w.commit().await.unwrap();
    let stored = inner.get(&key).await.unwrap().unwrap();
    assert_eq!(stored.encoding, Encoding::Zstd);
    assert!(stored.data.len() < data.len() / 4);
    assert_eq!(codec::decompress(&stored.data, data.len() as u64).unwrap(), data);
    assert_eq!(identity_from(&store, &key, 654_321).await, &data[654_321..]);

    // A dropped compressing writer leaves nothing.
    let other = text(9, 1000);
    let okey = key_of(&other);
    let mut w = store.begin_write(&okey, Encoding::Identity).await.unwrap();
    w.write(other).await.unwrap();
    drop(w);
    assert!(!present(inner.as_ref(), &okey).await);
}

#[tokio::test]
async fn compressed_read_passes_through() {
    let inner = Arc::new(MemoryStore::new(16 << 20));
    let store = CompressedStore::new(inner.clone(), 1);
    let data = text(10, 100_000);
    let key = key_of(&data);
    // A zstd put is stored untouched (same buffer).
    let z = codec::compress(&data, 5).unwrap();
    store
        .put(
            &key,
            Blob {
                encoding: Encoding::Zstd,
                data: z.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(inner.get(&key).await.unwrap().unwrap().data.as_ptr(), z.as_ptr());
    // Reads hand out the stored zstd bytes as they are.
    let read = store.read(&key, 0).await.unwrap().unwrap();
    assert_eq!(
        (read.encoding, read.start, read.stored_len),
        (Encoding::Zstd, 0, z.len() as u64)
    );
    assert_eq!(concat(read.stream).await, z);
    let blob = store.get(&key).await.unwrap().unwrap();
    assert_eq!((blob.encoding, blob.data.as_ptr()), (Encoding::Zstd, z.as_ptr()));
    // A zstd stream write passes through too.
    let data2 = text(11, 50_000);
    let key2 = key_of(&data2);
    let z2 = codec::compress(&data2, 1).unwrap();
    let mut w = store.begin_write(&key2, Encoding::Zstd).await.unwrap();
    w.write(z2.clone()).await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(inner.get(&key2).await.unwrap().unwrap().data, z2);
}

#[tokio::test]
async fn existence_cache_answers_repeats_without_inner() {
    let mem = Arc::new(MemoryStore::new(1 << 20));
    let inner = Counting::new(mem.clone());
    let cache = ExistenceCache::new(inner.clone(), Duration::from_secs(600), 1000);
    let (a, b) = (text(1, 100), text(2, 100));
    let (ka, kb, missing) = (key_of(&a), key_of(&b), key_of(b"missing"));
    mem.put(&ka, Blob::identity(a)).await.unwrap();
    mem.put(&kb, Blob::identity(b)).await.unwrap();
    let keys = [ka.clone(), missing.clone(), kb.clone()];

    assert_eq!(cache.has_many(&keys).await.unwrap(), vec![true, false, true]);
    assert_eq!(inner.take_asked().len(), 3);
    // Present keys are answered from the cache; the negative is asked again.
    assert_eq!(cache.has_many(&keys).await.unwrap(), vec![true, false, true]);
    assert_eq!(inner.take_asked(), vec![missing.clone()]);
    assert_eq!(
        cache.has_many(&[ka.clone(), kb.clone()]).await.unwrap(),
        vec![true, true]
    );
    assert!(
        inner.take_asked().is_empty(),
        "all-cached has_many must not reach inner"
    );

    // Negatives are never cached: once the blob appears, it is seen.
    mem.put(&missing, Blob::identity(Bytes::from_static(b"missing")))
        .await
        .unwrap();
    assert_eq!(
        cache.has_many(std::slice::from_ref(&missing)).await.unwrap(),
        vec![true]
    );
    assert_eq!(inner.take_asked(), vec![missing]);

    // Writes through the cache, and reads that find the blob, record it.
    let (c, d, e) = (text(3, 100), text(4, 100), text(5, 100));
    let (kc, kd, ke) = (key_of(&c), key_of(&d), key_of(&e));
    cache.put(&kc, Blob::identity(c)).await.unwrap();
    let mut w = cache.begin_write(&kd, Encoding::Identity).await.unwrap();
    w.write(d).await.unwrap();
    w.commit().await.unwrap();
    mem.put(&ke, Blob::identity(e)).await.unwrap();
    assert!(cache.get(&ke).await.unwrap().is_some());
    assert_eq!(cache.has_many(&[kc, kd, ke]).await.unwrap(), vec![true; 3]);
    assert!(inner.take_asked().is_empty());
    assert_eq!(cache.stats(), mem.stats());
}

#[tokio::test]
async fn existence_cache_entries_expire() {
    let mem = Arc::new(MemoryStore::new(1 << 20));
    let inner = Counting::new(mem.clone());
    let ttl = Duration::from_millis(50);
    let cache = ExistenceCache::new(inner.clone(), ttl, 1000);
    let a = text(1, 100);
    let ka = key_of(&a);
    mem.put(&ka, Blob::identity(a)).await.unwrap();
    let confirmed = Instant::now();
    assert!(present(&cache, &ka).await);
    assert_eq!(inner.take_asked().len(), 1);
    if confirmed.elapsed() < ttl {
        assert!(present(&cache, &ka).await);
        // Only meaningful if the check ran within the ttl.
        if confirmed.elapsed() < ttl {
            assert!(inner.take_asked().is_empty());
        }
    }
    // The TTL is wall-clock time: there is no event to wait for.
    tokio::time::sleep(ttl + Duration::from_millis(20)).await;
    assert!(present(&cache, &ka).await);
    assert_eq!(
        inner.take_asked(),
        vec![ka.clone()],
        "expired entry must be re-checked"
    );
    // Expired and gone: the inner answer (absent) wins.
    let gone = Arc::new(MemoryStore::new(1 << 20));
    let cache = ExistenceCache::new(gone, ttl, 1000);
    assert!(!present(&cache, &ka).await);
}

#[tokio::test]
async fn existence_cache_is_bounded() {
    let mem = Arc::new(MemoryStore::new(1 << 20));
    let inner = Counting::new(mem.clone());
    let cache = ExistenceCache::new(inner.clone(), Duration::from_secs(600), 32);
    let mut keys = Vec::new();
    for i in 0..500 {
        let data = text(i, 80);
        let key = key_of(&data);
        mem.put(&key, Blob::identity(data)).await.unwrap();
        keys.push(key);
    }
    assert!(cache.has_many(&keys).await.unwrap().iter().all(|&p| p));
    inner.take_asked();
    assert!(cache.has_many(&keys).await.unwrap().iter().all(|&p| p));
    let asked = inner.take_asked().len();
    // At most 32 entries are remembered (16 shards of 2).
    assert!(asked >= 500 - 32, "asked {asked}");
    assert!(asked < 500, "some entries should be remembered");
}

/// A blob used only through the fast tier stays recent in the durable
/// tier (touch-behind): without it, newer writes evict it from the disk
/// while memory still serves it.
#[tokio::test]
async fn tiered_fast_hits_keep_the_blob_recent_in_the_slow_tier() {
    use kiln_store::disk::{DiskConfig, DiskStore};
    for touch in [Some(Duration::from_millis(10)), None] {
        let dir = tempfile::tempdir().unwrap();
        let slow = DiskStore::open(DiskConfig {
            root: dir.path().join("disk"),
            capacity_bytes: 40 * 1024,
            sync_writes: false,
        })
        .await
        .unwrap();
        let fast = Arc::new(MemoryStore::new(1 << 20));
        let tiered = TieredStore::with_touch_interval(fast.clone(), slow.clone(), touch);
        let hot = text(0, 4096);
        let hot_key = key_of(&hot);
        tiered.put(&hot_key, Blob::identity(hot.clone())).await.unwrap();
        // 30 newer 4 KiB blobs through a 40 KiB disk: without refreshes the
        // hot blob is the oldest and goes first.
        for i in 1..=30u64 {
            assert!(present(&tiered, &hot_key).await);
            assert_eq!(tiered.get(&hot_key).await.unwrap().unwrap().data, hot);
            let b = text(i, 4096);
            tiered.put(&key_of(&b), Blob::identity(b)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let on_disk = present(slow.as_ref(), &hot_key).await;
        let first = text(1, 4096);
        assert!(
            !present(slow.as_ref(), &key_of(&first)).await,
            "the disk evicted old blobs"
        );
        match touch {
            Some(_) => assert!(on_disk, "the hot blob was evicted from the durable tier"),
            None => assert!(!on_disk, "without touch-behind the hot blob is evicted (control)"),
        }
    }
}
