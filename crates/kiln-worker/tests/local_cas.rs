//! The local CAS cache against a real CAS over gRPC.

mod common;

use common::*;
use kiln_cache::CacheLimits;
use kiln_digest::BlobKey;
use kiln_worker::WorkerError;
use kiln_worker::cas::CasClient;
use kiln_worker::local_cas::{CacheKey, LocalCas};

fn blob(i: u8, size: usize) -> Vec<u8> {
    (0..size)
        .map(|j| i.wrapping_mul(31).wrapping_add(j as u8))
        .collect()
}

fn key(data: &[u8], exec: bool) -> CacheKey {
    CacheKey::new(BlobKey::of(F, data), exec)
}

#[tokio::test]
async fn eviction_never_removes_pinned_blobs() {
    let cas = start_default_cas().await;
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| blob(i, 600)).collect();
    upload(&cas, &blobs).await;
    let tmp = tempfile::tempdir().unwrap();
    let local = LocalCas::open(tmp.path().join("c"), 1000).await.unwrap();
    let view = CasClient::new(cas.channel.clone()).instance("", F).await;
    let k: Vec<CacheKey> = blobs.iter().map(|b| key(b, false)).collect();

    let pin_a = local.ensure(&view, vec![k[0].clone()], 4).await.unwrap();
    // B does not fit next to A, but A is pinned: both stay (over capacity).
    let pin_b = local.ensure(&view, vec![k[1].clone()], 4).await.unwrap();
    assert!(local.contains(&k[0]) && local.contains(&k[1]));
    assert_eq!(local.stats().bytes, 1200);
    drop(pin_b);
    // C evicts the unpinned B, never the pinned A.
    let pin_c = local.ensure(&view, vec![k[2].clone()], 4).await.unwrap();
    assert!(local.contains(&k[0]), "a pinned blob was evicted");
    assert!(std::fs::read(pin_a.path(&k[0])).unwrap() == blobs[0]);
    assert!(!local.contains(&k[1]));
    assert!(!local.path_of(&k[1]).exists());
    drop(pin_a);
    drop(pin_c);
    // With nothing pinned, D evicts the least recently used first (A),
    // then C: only one 600-byte blob fits in 1000 bytes.
    let _pin_d = local.ensure(&view, vec![k[3].clone()], 4).await.unwrap();
    assert!(!local.contains(&k[0]) && !local.contains(&k[2]));
    assert!(local.contains(&k[3]));
    assert_eq!(local.stats().bytes, 600);
}

#[tokio::test]
async fn large_blobs_come_by_bytestream_small_ones_in_batches_all_verified() {
    // A 64 KiB batch limit: the 200 KiB blob must come through ByteStream.
    let cas = start_cas(CacheLimits {
        max_batch_total_size_bytes: 64 << 10,
        ..CacheLimits::default()
    })
    .await;
    let big = blob(7, 200 << 10);
    let smalls: Vec<Vec<u8>> = (0..50).map(|i| blob(i, 3000)).collect();
    let view = CasClient::new(cas.channel.clone()).instance("", F).await;
    view.write_bytes(&BlobKey::of(F, &big), big.clone().into())
        .await
        .unwrap();
    upload(&cas, &smalls[..15]).await;
    upload(&cas, &smalls[15..30]).await;
    upload(&cas, &smalls[30..]).await;
    let tmp = tempfile::tempdir().unwrap();
    let local = LocalCas::open(tmp.path().join("c"), 1 << 30).await.unwrap();
    assert_eq!(view.max_batch(), 64 << 10);
    let mut wanted = vec![key(&big, false), key(&big, true)];
    wanted.extend(smalls.iter().map(|b| key(b, false)));
    let pins = local.ensure(&view, wanted.clone(), 8).await.unwrap();
    for k in &wanted {
        let p = pins.path(k);
        let meta = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o777,
            if k.executable { 0o555 } else { 0o444 }
        );
        k.key.verify(&std::fs::read(&p).unwrap()).unwrap();
    }
    // The executable and plain variants are distinct files.
    assert_ne!(pins.path(&wanted[0]), pins.path(&wanted[1]));
}

#[tokio::test]
async fn missing_blobs_are_reported_together() {
    let cas = start_default_cas().await;
    let present = blob(1, 100);
    upload(&cas, std::slice::from_ref(&present)).await;
    let tmp = tempfile::tempdir().unwrap();
    let local = LocalCas::open(tmp.path().join("c"), 1 << 20).await.unwrap();
    let view = CasClient::new(cas.channel.clone()).instance("", F).await;
    let wanted = vec![
        key(&present, false),
        key(&blob(2, 100), false),
        key(&blob(3, 100), false),
    ];
    match local.ensure(&view, wanted, 4).await {
        Err(WorkerError::MissingBlobs(m)) => assert_eq!(m.len(), 2),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("missing blobs not reported"),
    }
    // The failed call pinned nothing.
    assert_eq!(local.stats().pinned, 0);
}

#[tokio::test]
async fn concurrent_actions_share_one_fetch_and_cache_survives_a_clean_restart() {
    let cas = start_default_cas().await;
    let blobs: Vec<Vec<u8>> = (0..20).map(|i| blob(i, 1000)).collect();
    upload(&cas, &blobs).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let local = LocalCas::open(&dir, 1 << 20).await.unwrap();
    let view = CasClient::new(cas.channel.clone()).instance("", F).await;
    let wanted: Vec<CacheKey> = blobs.iter().map(|b| key(b, false)).collect();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let local = local.clone();
        let view = view.clone();
        let wanted = wanted.clone();
        tasks.push(tokio::spawn(async move {
            local.ensure(&view, wanted, 4).await.map(|p| p.keys().len())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 20);
    }
    let stats = local.stats();
    assert_eq!(stats.blobs, 20);
    assert_eq!(stats.pinned, 0);
    local.close().await.unwrap();
    drop(local);
    let again = LocalCas::open(&dir, 1 << 20).await.unwrap();
    assert_eq!(again.stats().blobs, 20, "a cleanly closed cache is kept");
    drop(again);
    // Not closed cleanly this time: wiped.
    let third = LocalCas::open(&dir, 1 << 20).await.unwrap();
    assert_eq!(third.stats().blobs, 0);
}
