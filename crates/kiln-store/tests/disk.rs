//! The disk store against real files in temp directories.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_digest::DigestFunction;
use kiln_store::disk::{DiskConfig, DiskStore};
use kiln_store::{Blob, BlobKey, BlobRead, ChunkStream, Encoding, Store, StoreError, codec};

const INDEX_WAIT: Duration = Duration::from_secs(60);

/// Deterministic pseudo-random bytes (incompressible, distinct per seed).
fn data(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn key_of(d: &[u8]) -> BlobKey {
    BlobKey::of(DigestFunction::Sha256, d)
}

fn config(root: &Path, capacity: u64) -> DiskConfig {
    DiskConfig {
        root: root.to_path_buf(),
        capacity_bytes: capacity,
        sync_writes: false,
    }
}

async fn open_ready(root: &Path, capacity: u64) -> Arc<DiskStore> {
    let store = DiskStore::open(config(root, capacity)).await.unwrap();
    assert!(store.wait_until_indexed(INDEX_WAIT).await, "scan did not finish");
    store
}

/// Every regular file under `dir`, recursively, with its length.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), e.metadata().unwrap().len()));
            }
        }
    }
    out
}

fn blob_files(root: &Path) -> Vec<(PathBuf, u64)> {
    files_under(&root.join("blobs"))
}

fn disk_bytes(root: &Path) -> u64 {
    blob_files(root).iter().map(|(_, l)| l).sum()
}

/// Asserts that the store's accounting equals what is on disk.
fn assert_consistent(store: &DiskStore, root: &Path) {
    let files = blob_files(root);
    let stats = store.stats();
    let bytes: u64 = files.iter().map(|(_, l)| l).sum();
    assert_eq!(stats.bytes, bytes, "accounted bytes vs bytes on disk ({files:?})");
    assert_eq!(
        stats.items,
        files.len() as u64,
        "accounted items vs files on disk"
    );
    if stats.capacity > 0 {
        assert!(stats.bytes <= stats.capacity);
    }
}

async fn concat(stream: ChunkStream) -> Vec<u8> {
    stream
        .try_fold(Vec::new(), |mut v, c| {
            v.extend_from_slice(&c);
            futures::future::ready(Ok(v))
        })
        .await
        .unwrap()
}

async fn collect(read: BlobRead) -> Vec<u8> {
    concat(read.stream).await
}

async fn get_identity(store: &DiskStore, key: &BlobKey) -> Option<Bytes> {
    codec::get_identity(store, key).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_identity_and_zstd_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_ready(dir.path(), 64 << 20).await;
    assert!(store.describe().starts_with("disk("));

    // Identity, larger than a read chunk so the stream has several chunks.
    let big = data(1, 3 * (1 << 20) + 12_345);
    let big_key = key_of(&big);
    store.put(&big_key, Blob::identity(big.clone())).await.unwrap();
    assert_eq!(
        store.get(&big_key).await.unwrap(),
        Some(Blob::identity(big.clone()))
    );
    let len = big.len() as u64;
    for offset in [0, 1, 1 << 20, (1 << 20) + 7, len - 1, len, len + 100] {
        let read = store.read(&big_key, offset).await.unwrap().unwrap();
        assert_eq!(read.encoding, Encoding::Identity);
        assert_eq!(read.start, offset.min(len));
        assert_eq!(read.stored_len, len);
        let got = collect(read).await;
        assert_eq!(got, &big[offset.min(len) as usize..], "offset {offset}");
    }

    // Zstd: always streamed whole; the codec skips to the offset.
    let plain = Bytes::from(vec![7u8; 500_000]);
    let z_key = key_of(&plain);
    let z = codec::compress(&plain, codec::DEFAULT_ZSTD_LEVEL).unwrap();
    store
        .put(
            &z_key,
            Blob {
                encoding: Encoding::Zstd,
                data: z.clone(),
            },
        )
        .await
        .unwrap();
    let read = store.read(&z_key, 1000).await.unwrap().unwrap();
    assert_eq!(
        (read.encoding, read.start, read.stored_len),
        (Encoding::Zstd, 0, z.len() as u64)
    );
    let decoded: Vec<u8> = concat(codec::identity_stream(read, 1000)).await;
    assert_eq!(decoded, &plain[1000..]);
    assert_eq!(get_identity(&store, &z_key).await.unwrap(), plain);
    assert!(store.get(&z_key).await.unwrap().unwrap().data == z);

    // Empty blob.
    let empty_key = BlobKey::empty(DigestFunction::Sha256);
    store.put(&empty_key, Blob::identity(Bytes::new())).await.unwrap();
    assert_eq!(
        collect(store.read(&empty_key, 0).await.unwrap().unwrap()).await,
        b""
    );

    let missing = key_of(b"never stored");
    assert_eq!(store.get(&missing).await.unwrap(), None);
    assert!(store.read(&missing, 0).await.unwrap().is_none());
    let has = store
        .has_many(&[big_key.clone(), missing.clone(), z_key.clone(), empty_key.clone()])
        .await
        .unwrap();
    assert_eq!(has, vec![true, false, true, true]);
    assert_eq!(store.stats().items, 3);
    assert_consistent(&store, dir.path());

    // Replacing (the Action Cache's use): same key, new payload.
    let ac_key = key_of(b"some action");
    store.put(&ac_key, Blob::identity(data(2, 1000))).await.unwrap();
    let before = store.stats().bytes;
    store.put(&ac_key, Blob::identity(data(3, 250))).await.unwrap();
    assert_eq!(store.get(&ac_key).await.unwrap().unwrap().data, data(3, 250));
    assert_eq!(store.stats().bytes, before - 750);
    assert_consistent(&store, dir.path());
    // ... in another encoding: exactly one file remains.
    let z = codec::compress(&data(4, 3000), 1).unwrap();
    store
        .put(
            &ac_key,
            Blob {
                encoding: Encoding::Zstd,
                data: z.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.get(&ac_key).await.unwrap(),
        Some(Blob {
            encoding: Encoding::Zstd,
            data: z
        })
    );
    let hash = ac_key.hash_hex();
    let files: Vec<_> = blob_files(dir.path())
        .into_iter()
        .filter(|(p, _)| p.file_name().unwrap().to_str().unwrap().starts_with(&hash))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].0.to_str().unwrap().ends_with(".zst"));
    store.put(&ac_key, Blob::identity(data(5, 10))).await.unwrap();
    assert_eq!(
        store.get(&ac_key).await.unwrap(),
        Some(Blob::identity(data(5, 10)))
    );
    assert_eq!(store.stats().items, 4);
    assert_consistent(&store, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_writer_round_trip_and_replace() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_ready(dir.path(), 0).await;
    let payload = data(10, 9 * (1 << 20) + 3);
    let key = key_of(&payload);
    let mut w = store.begin_write(&key, Encoding::Identity).await.unwrap();
    // Nothing is visible before commit.
    for chunk in payload.chunks(64 * 1024) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert!(!store.has_many(std::slice::from_ref(&key)).await.unwrap()[0]);
    assert_eq!(store.stats().items, 0);
    w.commit().await.unwrap();
    assert_eq!(store.get(&key).await.unwrap().unwrap().data, payload);
    assert_eq!(
        collect(store.read(&key, 5_000_000).await.unwrap().unwrap()).await,
        &payload[5_000_000..]
    );

    // Replace by a streamed zstd payload.
    let z = codec::compress(&payload, 1).unwrap();
    let mut w = store.begin_write(&key, Encoding::Zstd).await.unwrap();
    for chunk in z.chunks(10_000) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    w.commit().await.unwrap();
    assert_eq!(get_identity(&store, &key).await.unwrap(), payload);
    assert_eq!(store.stats().bytes, z.len() as u64);
    assert_consistent(&store, dir.path());
    store.quiesce().await;
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_blobs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_ready(dir.path(), 1000).await;
    let big = data(1, 1001);
    let err = store
        .put(&key_of(&big), Blob::identity(big.clone()))
        .await
        .unwrap_err();
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
    let mut w = store
        .begin_write(&key_of(&big), Encoding::Identity)
        .await
        .unwrap();
    w.write(big.slice(..600)).await.unwrap();
    let err = w.write(big.slice(600..)).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    drop(w);
    // Exactly the capacity fits.
    let fits = data(2, 1000);
    store.put(&key_of(&fits), Blob::identity(fits)).await.unwrap();
    store.quiesce().await;
    assert_consistent(&store, dir.path());
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_blob() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    {
        let store = open_ready(dir.path(), 0).await;
        for i in 0..400u64 {
            let d = data(i, 100 + (i as usize * 37) % 5000);
            let key = key_of(&d);
            let blob = if i % 3 == 0 {
                Blob {
                    encoding: Encoding::Zstd,
                    data: codec::compress(&d, 1).unwrap(),
                }
            } else {
                Blob::identity(d.clone())
            };
            store.put(&key, blob).await.unwrap();
            keys.push((key, d));
        }
        assert_consistent(&store, dir.path());
    }
    let store = DiskStore::open(config(dir.path(), 0)).await.unwrap();
    // Readable at once, whether or not the scan has finished.
    for (key, d) in keys.iter().rev().take(50) {
        assert_eq!(get_identity(&store, key).await.as_ref(), Some(d));
    }
    let all: Vec<BlobKey> = keys.iter().map(|(k, _)| k.clone()).collect();
    assert!(store.has_many(&all).await.unwrap().iter().all(|&b| b));
    assert!(store.wait_until_indexed(INDEX_WAIT).await);
    assert_eq!(store.stats().items, 400);
    assert_consistent(&store, dir.path());
    for (key, d) in &keys {
        assert_eq!(get_identity(&store, key).await.as_ref(), Some(d));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_capacity_at_restart_trims_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_ready(dir.path(), 0).await;
        for i in 0..20u64 {
            let d = data(i, 10_000);
            store.put(&key_of(&d), Blob::identity(d)).await.unwrap();
        }
    }
    let store = open_ready(dir.path(), 55_000).await;
    let stats = store.stats();
    assert_eq!((stats.items, stats.evictions), (5, 15));
    assert_consistent(&store, dir.path());
}

/// Sets a blob file's mtime, whatever its encoding.
fn set_mtime(root: &Path, key: &BlobKey, t: SystemTime) {
    let hash = key.hash_hex();
    for (p, _) in blob_files(root) {
        if p.file_name().unwrap().to_str().unwrap().starts_with(&hash) {
            std::fs::File::open(&p).unwrap().set_modified(t).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_order_is_seeded_from_mtimes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Bytes> = (0..10).map(|i| data(100 + i, 1000)).collect();
    {
        let store = open_ready(dir.path(), 10_000).await;
        for b in &blobs {
            store.put(&key_of(b), Blob::identity(b.clone())).await.unwrap();
        }
    }
    // Blob i was last used i hours ago: 9 is the oldest.
    let now = SystemTime::now();
    for (i, b) in blobs.iter().enumerate() {
        set_mtime(
            dir.path(),
            &key_of(b),
            now - Duration::from_secs(3600 * i as u64 + 60),
        );
    }
    let store = open_ready(dir.path(), 10_000).await;
    assert!(store.stats().oldest_age_secs >= 9 * 3600);
    // Reading blob 9 makes 8 the oldest; its file's mtime is refreshed.
    store.get(&key_of(&blobs[9])).await.unwrap().unwrap();
    let extra = data(200, 1500);
    store
        .put(&key_of(&extra), Blob::identity(extra.clone()))
        .await
        .unwrap();
    let present = store
        .has_many(&blobs.iter().map(|b| key_of(b)).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        present,
        vec![true, true, true, true, true, true, true, false, false, true]
    );
    assert_eq!(store.stats().evictions, 2);
    assert_consistent(&store, dir.path());
    store.quiesce().await;
    let hash = key_of(&blobs[9]).hash_hex();
    let (path, _) = blob_files(dir.path())
        .into_iter()
        .find(|(p, _)| p.file_name().unwrap().to_str().unwrap().starts_with(&hash))
        .unwrap();
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    assert!(
        mtime > now - Duration::from_secs(600),
        "read did not refresh the mtime"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_capacity_and_hot_blobs() {
    const CAP: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = open_ready(dir.path(), CAP).await;
    let hot: Vec<Bytes> = (0..4).map(|i| data(1000 + i, 20_000)).collect();
    for b in &hot {
        store.put(&key_of(b), Blob::identity(b.clone())).await.unwrap();
    }
    let hot_keys: Vec<BlobKey> = hot.iter().map(|b| key_of(b)).collect();
    let mut cold = Vec::new();
    let mut written = 0u64;
    let mut i = 0u64;
    while written < 3 * CAP {
        let d = data(i, 10_000 + (i as usize * 7919) % 50_000);
        i += 1;
        written += d.len() as u64;
        let key = key_of(&d);
        store.put(&key, Blob::identity(d)).await.unwrap();
        cold.push(key);
        assert!(store.stats().bytes <= CAP);
        assert!(disk_bytes(dir.path()) <= CAP);
        // Keep the hot set in use: reads and existence checks count.
        if i.is_multiple_of(2) {
            for k in &hot_keys[..2] {
                assert!(store.get(k).await.unwrap().is_some());
            }
            let r = store.read(&hot_keys[2], 0).await.unwrap().unwrap();
            assert_eq!(collect(r).await.len(), 20_000);
            assert!(store.has_many(&hot_keys[3..]).await.unwrap()[0]);
        }
    }
    let stats = store.stats();
    assert!(stats.evictions > 0);
    assert!(
        store.has_many(&hot_keys).await.unwrap().iter().all(|&b| b),
        "hot blobs evicted"
    );
    let present = store.has_many(&cold).await.unwrap();
    let evicted: Vec<&BlobKey> = cold
        .iter()
        .zip(&present)
        .filter(|(_, p)| !**p)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(evicted.len() as u64, stats.evictions);
    let on_disk: HashSet<String> = blob_files(dir.path())
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    for k in &evicted {
        assert!(!on_disk.contains(&format!("{}-{}", k.hash_hex(), k.size())));
        assert!(store.get(k).await.unwrap().is_none());
    }
    assert_consistent(&store, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_read_survives_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_ready(dir.path(), 4 << 20).await;
    let big = data(7, 3 << 20);
    let key = key_of(&big);
    store.put(&key, Blob::identity(big.clone())).await.unwrap();
    let mut read = store.read(&key, 0).await.unwrap().unwrap();
    let first = read.stream.try_next().await.unwrap().unwrap();
    // Push it out.
    let other = data(8, 3 << 20);
    store.put(&key_of(&other), Blob::identity(other)).await.unwrap();
    assert!(!store.has_many(std::slice::from_ref(&key)).await.unwrap()[0]);
    let mut got = first.to_vec();
    got.extend(collect(read).await);
    assert_eq!(got, big);
    assert_consistent(&store, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_reads_and_evictions_keep_accounting_exact() {
    const CAP: u64 = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let store = open_ready(dir.path(), CAP).await;
    // 40 keys, each written by several tasks with different payloads and
    // encodings (Action Cache style), while others read them.
    let keys: Vec<BlobKey> = (0..40u64).map(|i| key_of(&i.to_le_bytes())).collect();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let store = Arc::clone(&store);
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..60u64 {
                let k = &keys[((t * 7 + round * 13) % keys.len() as u64) as usize];
                let payload = data(
                    t * 1000 + round,
                    1000 + ((t * 7919 + round * 104_729) % 20_000) as usize,
                );
                match (t + round) % 5 {
                    0 => {
                        let z = codec::compress(&payload, 1).unwrap();
                        store
                            .put(
                                k,
                                Blob {
                                    encoding: Encoding::Zstd,
                                    data: z,
                                },
                            )
                            .await
                            .unwrap();
                    }
                    1 => {
                        let mut w = store.begin_write(k, Encoding::Identity).await.unwrap();
                        for c in payload.chunks(3000) {
                            w.write(Bytes::copy_from_slice(c)).await.unwrap();
                        }
                        if round.is_multiple_of(4) {
                            drop(w); // abandoned
                        } else {
                            w.commit().await.unwrap();
                        }
                    }
                    2 => {
                        if let Some(r) = store.read(k, 10).await.unwrap() {
                            let _ = concat(r.stream).await;
                        }
                    }
                    3 => {
                        store.has_many(&keys[..10]).await.unwrap();
                        let _ = store.get(k).await.unwrap();
                    }
                    _ => store.put(k, Blob::identity(payload)).await.unwrap(),
                }
                assert!(store.stats().bytes <= CAP);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    store.quiesce().await;
    println!("{:?}", store.stats());
    assert!(store.stats().evictions > 0);
    assert_consistent(&store, dir.path());
    assert!(files_under(&dir.path().join("tmp")).is_empty());
    // Every indexed key is readable and every file is indexed.
    let present = store.has_many(&keys).await.unwrap();
    let count = present.iter().filter(|&&p| p).count() as u64;
    assert_eq!(count, store.stats().items);
    for (k, p) in keys.iter().zip(present) {
        assert_eq!(store.get(k).await.unwrap().is_some(), p);
    }
    // And a restart agrees.
    let before = store.stats();
    drop(store);
    let store = open_ready(dir.path(), CAP).await;
    assert_eq!(
        (store.stats().bytes, store.stats().items),
        (before.bytes, before.items)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_writer_and_stale_temp_files_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_ready(dir.path(), 0).await;
        let d = data(1, 5 << 20);
        let key = key_of(&d);
        let mut w = store.begin_write(&key, Encoding::Identity).await.unwrap();
        w.write(d.clone()).await.unwrap();
        w.write(d.slice(..10)).await.unwrap();
        assert_eq!(files_under(&dir.path().join("tmp")).len(), 1);
        drop(w);
        store.quiesce().await;
        assert!(files_under(&dir.path().join("tmp")).is_empty());
        assert_eq!(store.get(&key).await.unwrap(), None);
        assert!(blob_files(dir.path()).is_empty());
        assert_eq!(store.stats().bytes, 0);
    }
    // A crashed process leaves temp files behind.
    std::fs::write(dir.path().join("tmp").join("partial-1"), data(2, 1234)).unwrap();
    std::fs::write(dir.path().join("tmp").join("partial-2"), b"x").unwrap();
    let store = DiskStore::open(config(dir.path(), 0)).await.unwrap();
    assert!(
        files_under(&dir.path().join("tmp")).is_empty(),
        "stale files still in tmp/"
    );
    store.quiesce().await;
    assert!(store.wait_until_indexed(INDEX_WAIT).await);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut sorted = leftovers.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["LOCK", "blobs", "tmp"]);
    assert_consistent(&store, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leftovers_are_reconciled_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let kept = data(1, 4000);
    let kept_key = key_of(&kept);
    let dup = data(2, 5000);
    let dup_key = key_of(&dup);
    {
        let store = open_ready(root, 0).await;
        store.put(&kept_key, Blob::identity(kept.clone())).await.unwrap();
        store.put(&dup_key, Blob::identity(dup.clone())).await.unwrap();
    }
    let fanout = |k: &BlobKey| root.join("blobs/sha256").join(&k.hash_hex()[..2]);
    // A crash after a rename, before the index was updated: a complete
    // file nobody counted yet.
    let orphan = data(3, 6000);
    let orphan_key = key_of(&orphan);
    std::fs::create_dir_all(fanout(&orphan_key)).unwrap();
    std::fs::write(
        fanout(&orphan_key).join(format!("{}-6000", orphan_key.hash_hex())),
        &orphan,
    )
    .unwrap();
    // A crash between renaming a new encoding in and unlinking the old one:
    // the newer file (zstd) must win.
    let z = codec::compress(&dup, 1).unwrap();
    let zpath = fanout(&dup_key).join(format!("{}-5000.zst", dup_key.hash_hex()));
    std::fs::write(&zpath, &z).unwrap();
    set_mtime(root, &dup_key, SystemTime::now() - Duration::from_secs(7200));
    std::fs::File::open(&zpath)
        .unwrap()
        .set_modified(SystemTime::now())
        .unwrap();
    // Files the store would not have written.
    std::fs::write(fanout(&kept_key).join("garbage"), b"junk").unwrap();
    std::fs::write(root.join("blobs/sha256/stray"), b"junk").unwrap();
    // Partial temp files.
    std::fs::write(root.join("tmp/abc-1"), &orphan[..10]).unwrap();

    let store = DiskStore::open(config(root, 0)).await.unwrap();
    assert!(store.wait_until_indexed(INDEX_WAIT).await);
    store.quiesce().await;
    assert_eq!(get_identity(&store, &kept_key).await.unwrap(), kept);
    assert_eq!(get_identity(&store, &orphan_key).await.unwrap(), orphan);
    assert_eq!(
        store.get(&dup_key).await.unwrap(),
        Some(Blob {
            encoding: Encoding::Zstd,
            data: z
        })
    );
    assert_eq!(store.stats().items, 3);
    assert_consistent(&store, root);
    assert!(files_under(&root.join("tmp")).is_empty());
    let names: HashSet<String> = blob_files(root)
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert!(!names.contains("garbage") && !names.contains("stray"));
}

/// Checks every blob file under `root` against its key (CAS content).
async fn verify_all(store: &DiskStore, root: &Path) -> usize {
    let mut checked = 0;
    for (path, _) in blob_files(root) {
        let name = path.file_name().unwrap().to_str().unwrap();
        let stem = name.strip_suffix(".zst").unwrap_or(name);
        let (hash, size) = stem.split_once('-').unwrap();
        let key = BlobKey::from_hex(DigestFunction::Sha256, hash, size.parse().unwrap()).unwrap();
        let plain = get_identity(store, &key).await.expect("indexed blob readable");
        key.verify(&plain).unwrap_or_else(|e| panic!("{name}: {e}"));
        checked += 1;
    }
    checked
}

/// The child half of `kill_9_during_writes_leaves_only_whole_blobs`: writes
/// blobs until it is killed (bounded in count and time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn kill9_child_writer() {
    let Some(root) = std::env::var_os("KILN_KILL9_ROOT") else {
        return;
    };
    let store = open_ready(Path::new(&root), 8 << 20).await;
    let started = Instant::now();
    for i in 0..100_000u64 {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let d = data(i, 1000 + (i as usize * 7919) % (2 << 20));
        let key = key_of(&d);
        match i % 3 {
            0 => store.put(&key, Blob::identity(d)).await.unwrap(),
            1 => {
                let z = codec::compress(&d, 1).unwrap();
                store
                    .put(
                        &key,
                        Blob {
                            encoding: Encoding::Zstd,
                            data: z,
                        },
                    )
                    .await
                    .unwrap();
            }
            _ => {
                let mut w = store.begin_write(&key, Encoding::Identity).await.unwrap();
                for c in d.chunks(100_000) {
                    w.write(Bytes::copy_from_slice(c)).await.unwrap();
                }
                w.commit().await.unwrap();
            }
        }
        println!("committed {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_leaves_only_whole_blobs() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    for round in 0..3 {
        let root2 = root.clone();
        tokio::task::spawn_blocking(move || {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "kill9_child_writer",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("KILN_KILL9_ROOT", &root2)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
            let want = 20 + round * 7;
            let mut seen = 0;
            for line in stdout.lines() {
                if line.unwrap().starts_with("committed ") {
                    seen += 1;
                    if seen == want {
                        break;
                    }
                }
            }
            assert_eq!(seen, want, "child stopped early");
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        })
        .await
        .unwrap();
        let store = DiskStore::open(config(&root, 8 << 20)).await.unwrap();
        assert!(store.wait_until_indexed(INDEX_WAIT).await);
        store.quiesce().await;
        assert!(verify_all(&store, &root).await > 0);
        assert_consistent(&store, &root);
        assert!(files_under(&root.join("tmp")).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_behind_the_store_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_ready(dir.path(), 0).await;
    let d = data(1, 1000);
    let key = key_of(&d);
    store.put(&key, Blob::identity(d)).await.unwrap();
    for (p, _) in blob_files(dir.path()) {
        std::fs::remove_file(p).unwrap();
    }
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert_eq!(store.stats().items, 0);
    assert_consistent(&store, dir.path());
}

/// Creates 1,000,000 small blob files and measures open-to-first-read and
/// the full scan. Run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn scan_one_million() {
    const N: u64 = 1_000_000;
    // KILN_SCAN_ROOT: a directory kept between runs (created on the first);
    // otherwise a temp dir under KILN_SCAN_DIR or /var/tmp.
    let kept = std::env::var_os("KILN_SCAN_ROOT").map(PathBuf::from);
    let dir = match &kept {
        Some(_) => None,
        None => Some(
            tempfile::tempdir_in(std::env::var("KILN_SCAN_DIR").unwrap_or_else(|_| "/var/tmp".into()))
                .unwrap(),
        ),
    };
    let root = kept
        .clone()
        .unwrap_or_else(|| dir.as_ref().unwrap().path().to_path_buf());
    let created = Instant::now();
    let reuse = kept.is_some() && root.join("blobs/sha256/ff").is_dir();
    let probe_key = tokio::task::spawn_blocking({
        let root = root.clone();
        move || {
            let mut probe = None;
            if reuse {
                let d = (N / 2).to_le_bytes();
                return (key_of(&d), d);
            }
            for b in 0..=255u8 {
                std::fs::create_dir_all(root.join("blobs/sha256").join(format!("{b:02x}"))).unwrap();
            }
            for i in 0..N {
                let d = i.to_le_bytes();
                let key = key_of(&d);
                let hash = key.hash_hex();
                let fan = root.join("blobs/sha256").join(&hash[..2]);
                std::fs::write(fan.join(format!("{hash}-8")), d).unwrap();
                if i == N / 2 {
                    probe = Some((key, d));
                }
            }
            probe.unwrap()
        }
    })
    .await
    .unwrap();
    println!("created {N} files in {:?}", created.elapsed());

    let t0 = Instant::now();
    let store = DiskStore::open(config(&root, 0)).await.unwrap();
    let opened = t0.elapsed();
    let got = store.get(&probe_key.0).await.unwrap().unwrap();
    let first_read = t0.elapsed();
    assert_eq!(&got.data[..], &probe_key.1);
    let absent = key_of(b"not among them");
    assert_eq!(
        store
            .has_many(&[probe_key.0.clone(), absent.clone()])
            .await
            .unwrap(),
        vec![true, false]
    );
    // A write waits for the scan (the total is not known before).
    store
        .put(&absent, Blob::identity(Bytes::from_static(b"not among them")))
        .await
        .unwrap();
    let first_write = t0.elapsed();
    assert!(store.wait_until_indexed(Duration::from_secs(600)).await);
    let indexed = t0.elapsed();
    assert_eq!(store.stats().items, N + 1);
    assert_eq!(store.stats().bytes, 8 * N + 14);
    println!(
        "open: {opened:?}, open to first read: {first_read:?}, open to first write: {first_write:?}, \
         open to indexed: {indexed:?}"
    );
    store.quiesce().await;
    std::fs::remove_file(
        root.join("blobs/sha256")
            .join(&absent.hash_hex()[..2])
            .join(format!("{}-14", absent.hash_hex())),
    )
    .unwrap();
    // A second open of the same files.
    drop(store);
    let t0 = Instant::now();
    let store = DiskStore::open(config(&root, 0)).await.unwrap();
    assert!(store.wait_until_indexed(Duration::from_secs(600)).await);
    println!("second open to indexed: {:?}", t0.elapsed());
    drop(store);
    let removed = Instant::now();
    tokio::task::spawn_blocking(move || drop(dir)).await.unwrap();
    println!("cleanup {:?}", removed.elapsed());
}

/// Writes `payload` with plain std calls (the disk's speed), in seconds.
async fn baseline_write(path: PathBuf, payload: Bytes, sync: bool) -> Duration {
    let t = Instant::now();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&payload).unwrap();
        if sync {
            f.sync_data().unwrap();
        }
    })
    .await
    .unwrap();
    t.elapsed()
}

/// Streams 256 MiB blobs through writers (in 64 KiB chunks, as ByteStream
/// delivers them) and reads one back, next to a plain `std::fs::write`
/// baseline. With `sync_writes` the figures are the disk's; without, the
/// page cache's. Run with `--release --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn stream_256mib_throughput() {
    const LEN: usize = 256 << 20;
    const CHUNK: usize = 64 * 1024;
    let base = std::env::var("KILN_SCAN_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let mib_s = |el: Duration| 256.0 / el.as_secs_f64();
    for sync in [true, false] {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let store = DiskStore::open(DiskConfig {
            root: dir.path().join("store"),
            capacity_bytes: 0,
            sync_writes: sync,
        })
        .await
        .unwrap();
        assert!(store.wait_until_indexed(INDEX_WAIT).await);
        // Alternate the store and the baseline, so neither alone pays for
        // the other's write-back.
        for round in 0..2u64 {
            let payload = data(round * 2 + sync as u64, LEN);
            let el = baseline_write(dir.path().join(format!("direct-{round}")), payload.clone(), sync).await;
            println!(
                "sync={sync}: std write of 256 MiB:      {el:?} ({:.0} MiB/s)",
                mib_s(el)
            );
            let key = key_of(&payload);
            let t = Instant::now();
            let mut w = store.begin_write(&key, Encoding::Identity).await.unwrap();
            for off in (0..LEN).step_by(CHUNK) {
                w.write(payload.slice(off..(off + CHUNK).min(LEN))).await.unwrap();
            }
            w.commit().await.unwrap();
            let el = t.elapsed();
            println!(
                "sync={sync}: DiskStore streamed write: {el:?} ({:.0} MiB/s)",
                mib_s(el)
            );

            let t = Instant::now();
            let read = store.read(&key, 0).await.unwrap().unwrap();
            let n = read
                .stream
                .try_fold(0usize, |n, c| futures::future::ready(Ok(n + c.len())))
                .await
                .unwrap();
            let el = t.elapsed();
            assert_eq!(n, LEN);
            println!(
                "sync={sync}: DiskStore streamed read:  {el:?} ({:.0} MiB/s)",
                mib_s(el)
            );
        }
        drop(store);
        tokio::task::spawn_blocking(move || drop(dir)).await.unwrap();
    }
}

#[tokio::test]
async fn a_root_in_use_by_another_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = || kiln_store::disk::DiskConfig {
        root: dir.path().join("store"),
        capacity_bytes: 1 << 20,
        sync_writes: false,
    };
    let first = kiln_store::disk::DiskStore::open(config()).await.unwrap();
    match kiln_store::disk::DiskStore::open(config()).await {
        Err(kiln_store::StoreError::Unavailable(msg)) => assert!(msg.contains("in use"), "{msg}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("two stores opened the same root"),
    }
    drop(first);
    // Released on drop: the root can be opened again.
    let again = kiln_store::disk::DiskStore::open(config()).await;
    assert!(again.is_ok());
}
