//! MemoryStore: round trips, replacement, the byte bound under concurrency,
//! CLOCK eviction keeping recently read blobs, streaming writes and reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_digest::DigestFunction;
use kiln_store::memory::MemoryStore;
use kiln_store::{Blob, BlobKey, Encoding, Store, StoreError};

async fn concat(stream: kiln_store::ChunkStream) -> Vec<u8> {
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    chunks.concat()
}

fn key_of(data: &[u8]) -> BlobKey {
    BlobKey::of(DigestFunction::Sha256, data)
}

/// Distinct content of `len` bytes derived from `seed`.
fn content(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    Bytes::from(v)
}

async fn read_all(store: &dyn Store, key: &BlobKey, offset: u64) -> Option<(u64, Vec<u8>)> {
    let read = store.read(key, offset).await.unwrap()?;
    let start = read.start;
    let data = concat(read.stream).await;
    Some((start, data))
}

#[tokio::test]
async fn round_trip() {
    let store = MemoryStore::new(1 << 20);
    let data = content(1, 1000);
    let key = key_of(&data);
    let absent = key_of(b"absent");
    assert_eq!(
        store.has_many(&[key.clone(), absent.clone()]).await.unwrap(),
        vec![false, false]
    );
    assert!(store.get(&key).await.unwrap().is_none());
    assert!(store.read(&key, 0).await.unwrap().is_none());

    store.put(&key, Blob::identity(data.clone())).await.unwrap();
    assert_eq!(
        store.has_many(&[key.clone(), absent.clone()]).await.unwrap(),
        vec![true, false]
    );
    let blob = store.get(&key).await.unwrap().unwrap();
    assert_eq!(blob, Blob::identity(data.clone()));
    // `get` hands out the stored buffer, not a copy.
    assert_eq!(blob.data.as_ptr(), data.as_ptr());
    let (start, streamed) = read_all(&store, &key, 0).await.unwrap();
    assert_eq!((start, streamed.as_slice()), (0, &data[..]));

    // The empty blob is a blob like any other.
    let empty = BlobKey::empty(DigestFunction::Sha256);
    store.put(&empty, Blob::identity(Bytes::new())).await.unwrap();
    assert_eq!(store.get(&empty).await.unwrap().unwrap().data.len(), 0);
    assert_eq!(read_all(&store, &empty, 0).await.unwrap().1, Vec::<u8>::new());

    let stats = store.stats();
    assert_eq!(
        (stats.bytes, stats.items, stats.capacity, stats.evictions),
        (1000, 2, 1 << 20, 0)
    );
    assert!(store.describe().contains("1 MiB"), "{}", store.describe());
}

#[tokio::test]
async fn put_replaces() {
    let store = MemoryStore::new(1 << 20);
    let key = key_of(b"some key");
    store.put(&key, Blob::identity(content(1, 500))).await.unwrap();
    let zstd = Blob {
        encoding: Encoding::Zstd,
        data: content(2, 120),
    };
    store.put(&key, zstd.clone()).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap().unwrap(), zstd);
    let stats = store.stats();
    assert_eq!((stats.bytes, stats.items), (120, 1));
    let read = store.read(&key, 50).await.unwrap().unwrap();
    // Zstd payloads are streamed whole.
    assert_eq!(
        (read.encoding, read.start, read.stored_len),
        (Encoding::Zstd, 0, 120)
    );
}

#[tokio::test]
async fn too_large_is_rejected() {
    let store = MemoryStore::new(1000);
    let data = content(3, 1001);
    let key = key_of(&data);
    let err = store.put(&key, Blob::identity(data.clone())).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                size: 1001,
                limit: 1000
            }
        ),
        "{err}"
    );
    assert!(matches!(
        store.begin_write(&key, Encoding::Identity).await.err(),
        Some(StoreError::TooLarge { .. })
    ));
    // A zstd write of unknown compressed size fails once it crosses the limit.
    let mut w = store.begin_write(&key, Encoding::Zstd).await.unwrap();
    w.write(data.slice(..600)).await.unwrap();
    assert!(matches!(
        w.write(data.slice(600..)).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert_eq!(store.stats().bytes, 0);
    // Exactly the capacity fits.
    let fits = content(4, 1000);
    store.put(&key_of(&fits), Blob::identity(fits)).await.unwrap();
    assert_eq!(store.stats().bytes, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn byte_bound_holds_under_concurrent_inserts() {
    const CAPACITY: u64 = 256 * 1024;
    const TASKS: u64 = 32;
    const PER_TASK: u64 = 300;
    let store = Arc::new(MemoryStore::new(CAPACITY));
    let done = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicU64::new(0));

    let monitor = {
        let (store, done, max_seen) = (store.clone(), done.clone(), max_seen.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::Acquire) && Instant::now() < deadline {
                max_seen.fetch_max(store.stats().bytes, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            for i in 0..PER_TASK {
                let seed = t * 1_000_000 + i;
                let data = content(seed, 512 + (seed as usize * 7919) % 8192);
                let key = key_of(&data);
                store.put(&key, Blob::identity(data)).await.unwrap();
                // Readers race with writers and evictions.
                let _ = store.get(&key).await.unwrap();
                keys.push(key);
            }
            keys
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        keys.extend(t.await.unwrap());
    }
    done.store(true, Ordering::Release);
    monitor.await.unwrap();

    let stats = store.stats();
    assert!(
        max_seen.load(Ordering::Relaxed) <= CAPACITY,
        "bytes exceeded the capacity"
    );
    assert!(stats.bytes <= CAPACITY);
    assert!(stats.evictions > 0, "the test must exercise eviction");
    // The accounting is exact: it equals the sum of what is still held.
    let mut held = 0;
    let mut items = 0;
    for key in &keys {
        if let Some(blob) = store.get(key).await.unwrap() {
            held += blob.data.len() as u64;
            items += 1;
        }
    }
    assert_eq!(stats.bytes, held);
    assert_eq!(stats.items, items);
    assert_eq!(stats.items + stats.evictions, TASKS * PER_TASK);
    // Eviction leaves the store nearly full, not emptied.
    assert!(stats.bytes > CAPACITY / 2, "{stats:?}");
}

#[tokio::test]
async fn recently_read_blobs_survive_eviction() {
    const BLOB: usize = 100;
    const FILL: u64 = 10_000;
    let store = MemoryStore::new(FILL * BLOB as u64);
    let mut keys = Vec::new();
    for i in 0..FILL {
        let data = content(i, BLOB);
        let key = key_of(&data);
        store.put(&key, Blob::identity(data)).await.unwrap();
        keys.push(key);
    }
    assert_eq!(store.stats().evictions, 0);
    let hot: Vec<BlobKey> = keys.iter().step_by(10).cloned().collect();
    // Twice the capacity of new blobs, in batches; the hot set is read
    // between batches, as a working set would be.
    for batch in 0..200u64 {
        for k in &hot {
            assert!(
                store.get(k).await.unwrap().is_some(),
                "hot blob evicted before batch {batch}"
            );
        }
        for i in 0..100 {
            let data = content(1_000_000 + batch * 100 + i, BLOB);
            store.put(&key_of(&data), Blob::identity(data)).await.unwrap();
        }
    }
    let present = store.has_many(&hot).await.unwrap();
    assert!(present.iter().all(|&p| p), "a recently read blob was evicted");
    let cold: Vec<BlobKey> = keys.iter().filter(|k| !hot.contains(k)).cloned().collect();
    let cold_present = store
        .has_many(&cold)
        .await
        .unwrap()
        .iter()
        .filter(|&&p| p)
        .count();
    assert_eq!(cold_present, 0, "cold blobs should have been evicted first");
    let stats = store.stats();
    assert_eq!(stats.evictions, 20_000);
    assert_eq!(stats.bytes, FILL * BLOB as u64);
}

#[tokio::test]
async fn streaming_write_commit_and_drop() {
    let store = MemoryStore::new(10 << 20);
    let data = content(7, 3 << 20);
    let key = key_of(&data);

    // Dropped without commit: nothing visible, nothing accounted.
    let mut w = store.begin_write(&key, Encoding::Identity).await.unwrap();
    w.write(data.slice(..1000)).await.unwrap();
    drop(w);
    assert!(store.get(&key).await.unwrap().is_none());
    assert_eq!(store.stats().bytes, 0);

    // Not visible until commit.
    let mut w = store.begin_write(&key, Encoding::Identity).await.unwrap();
    for chunk in data.chunks(100_000) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        assert!(!store.has_many(std::slice::from_ref(&key)).await.unwrap()[0]);
    }
    w.write(Bytes::new()).await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(store.get(&key).await.unwrap().unwrap().data, data);
    assert_eq!(store.stats().bytes, data.len() as u64);

    // A single-chunk write stores the caller's buffer as is.
    let small = content(8, 5000);
    let small_key = key_of(&small);
    let mut w = store.begin_write(&small_key, Encoding::Identity).await.unwrap();
    w.write(small.clone()).await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(
        store.get(&small_key).await.unwrap().unwrap().data.as_ptr(),
        small.as_ptr()
    );

    // An empty write commits the empty blob.
    let empty = BlobKey::empty(DigestFunction::Sha256);
    store
        .begin_write(&empty, Encoding::Identity)
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert!(store.has_many(&[empty]).await.unwrap()[0]);
}

#[tokio::test]
async fn read_with_offsets() {
    let store = MemoryStore::new(10 << 20);
    let data = content(9, 200_000);
    let key = key_of(&data);
    store.put(&key, Blob::identity(data.clone())).await.unwrap();
    for offset in [0u64, 1, 65_535, 65_536, 65_537, 199_999, 200_000] {
        let read = store.read(&key, offset).await.unwrap().unwrap();
        assert_eq!(
            (read.encoding, read.start, read.stored_len),
            (Encoding::Identity, offset, 200_000)
        );
        let chunks: Vec<Bytes> = read.stream.try_collect().await.unwrap();
        assert!(chunks.iter().all(|c| c.len() <= 64 * 1024 && !c.is_empty()));
        let got: Vec<u8> = chunks.concat();
        assert_eq!(got, &data[offset as usize..], "offset {offset}");
    }
    // Past the end: clamped to the length, empty stream.
    let (start, rest) = read_all(&store, &key, 1_000_000).await.unwrap();
    assert_eq!((start, rest.len()), (200_000, 0));
}

/// Prints the memory overhead per stored 4 KiB blob beyond its payload.
/// Run with `cargo test -p kiln-store --release --test memory -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn rss_per_blob() {
    const COUNT: u64 = 1_000_000;
    const SIZE: usize = 4096;
    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }
    let store = MemoryStore::new(16 << 30);
    let before = rss_bytes();
    let t0 = Instant::now();
    let mut in_put = Duration::ZERO;
    for i in 0..COUNT {
        // Non-zero fill, so that every payload page is really touched.
        let data = Bytes::from(vec![(i % 251) as u8 + 1; SIZE]);
        let hash = BlobKey::of(DigestFunction::Sha256, &i.to_le_bytes()).hash_raw();
        let key = BlobKey::from_raw(DigestFunction::Sha256, &hash, SIZE as u64).unwrap();
        let t = Instant::now();
        store.put(&key, Blob::identity(data)).await.unwrap();
        in_put += t.elapsed();
    }
    let elapsed = t0.elapsed();
    let after = rss_bytes();
    let payload = COUNT * SIZE as u64;
    assert_eq!(store.stats().bytes, payload);
    let overhead = (after - before).saturating_sub(payload) as f64 / COUNT as f64;
    println!(
        "rss_per_blob: {COUNT} blobs of {SIZE} B: RSS +{} MiB, payload {} MiB, overhead {overhead:.1} B/blob, {:.0} ns/blob in total, {:.0} ns/put",
        (after - before) >> 20,
        payload >> 20,
        elapsed.as_nanos() as f64 / COUNT as f64,
        in_put.as_nanos() as f64 / COUNT as f64
    );
}
