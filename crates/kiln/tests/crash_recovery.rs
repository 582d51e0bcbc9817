//! `kill -9` the server while many uploads are in flight: after a restart
//! every acknowledged blob is readable and verified, nothing partial is
//! visible, and the disk store's byte accounting matches the disk.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::KilnProcess;
use futures::StreamExt;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::BatchUpdateBlobsRequest;
use kiln_proto::reapi::batch_update_blobs_request::Request as UpdateItem;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use rand::{Rng, RngCore, SeedableRng};
use tonic::transport::Channel;

const CONFIG: &str = r#"
[stores.cas.disk]
path = "cas"
capacity = "4 GiB"

[stores.ac.memory]
capacity = "64 MiB"

[[instances]]
name = ""
cas = "cas"
ac = "ac"
"#;

fn make_blobs(n: usize, seed: u64) -> Vec<Bytes> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            // A third large (ByteStream), the rest small (BatchUpdateBlobs).
            let size = if i % 3 == 0 {
                rng.random_range(256 << 10..3 << 20)
            } else {
                rng.random_range(1..16 << 10)
            };
            let mut v = vec![0u8; size];
            rng.fill_bytes(&mut v);
            Bytes::from(v)
        })
        .collect()
}

async fn upload(channel: Channel, data: Bytes) -> Result<(), tonic::Status> {
    let key = BlobKey::of(DigestFunction::Sha256, &data);
    if data.len() < 64 << 10 {
        let mut cas = ContentAddressableStorageClient::new(channel);
        let resp = cas
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests: vec![UpdateItem {
                    digest: Some(key.to_digest()),
                    data: data.to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await?
            .into_inner();
        let code = resp.responses[0].status.as_ref().map(|s| s.code).unwrap_or(0);
        return if code == 0 {
            Ok(())
        } else {
            Err(tonic::Status::internal(format!("per-blob status {code}")))
        };
    }
    let mut bs = ByteStreamClient::new(channel);
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        key.hash_hex(),
        data.len()
    );
    let chunk = 64 << 10;
    let n = data.len().div_ceil(chunk);
    let reqs: Vec<WriteRequest> = (0..n)
        .map(|i| {
            let start = i * chunk;
            let end = (start + chunk).min(data.len());
            WriteRequest {
                resource_name: if i == 0 { resource.clone() } else { String::new() },
                write_offset: start as i64,
                finish_write: i + 1 == n,
                data: data[start..end].to_vec(),
            }
        })
        .collect();
    // Pace the stream so that many uploads are mid-flight at the kill.
    let stream = futures::stream::iter(reqs).then(|r| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        r
    });
    let resp = bs.write(stream).await?.into_inner();
    if resp.committed_size == data.len() as i64 {
        Ok(())
    } else {
        Err(tonic::Status::internal(format!(
            "committed {}",
            resp.committed_size
        )))
    }
}

async fn read_back(channel: Channel, key: &BlobKey) -> Result<Option<Vec<u8>>, tonic::Status> {
    let mut bs = ByteStreamClient::new(channel);
    let resource = format!("blobs/{}/{}", key.hash_hex(), key.size());
    let mut stream = match bs
        .read(ReadRequest {
            resource_name: resource,
            read_offset: 0,
            read_limit: 0,
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
        Err(s) => return Err(s),
    };
    let mut out = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => out.extend_from_slice(&m.data),
            Ok(None) => return Ok(Some(out)),
            Err(s) if s.code() == tonic::Code::NotFound && out.is_empty() => return Ok(None),
            Err(s) => return Err(s),
        }
    }
}

/// (count, bytes) of every blob file the disk store holds, each verified
/// against the digest in its name.
fn verify_disk(root: &Path) -> (u64, u64) {
    let (mut count, mut bytes) = (0, 0);
    let mut stack = vec![root.join("blobs")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(path);
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            let data = std::fs::read(&path).unwrap();
            count += 1;
            bytes += data.len() as u64;
            if let Some((hash, size)) = name.split_once('-')
                && !name.contains('.')
            {
                let key = BlobKey::from_hex(DigestFunction::Sha256, hash, size.parse().unwrap()).unwrap();
                key.verify(&data)
                    .unwrap_or_else(|e| panic!("partial or corrupt blob visible at {path:?}: {e}"));
            }
        }
    }
    (count, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_uploads_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let server = KilnProcess::with_config(dir.path(), CONFIG);
    let channel = server.channel().await;
    let blobs = Arc::new(make_blobs(600, 7));

    let acked = Arc::new(parking_lot_free::Acked::default());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (channel, blobs, acked, next) = (channel.clone(), blobs.clone(), acked.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= blobs.len() {
                    break;
                }
                if upload(channel.clone(), blobs[i].clone()).await.is_ok() {
                    acked.push(i);
                } else {
                    // The server is gone.
                    break;
                }
            }
        }));
    }
    // Kill once a good number are acknowledged (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.len() < 120 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = next.load(std::sync::atomic::Ordering::SeqCst).min(blobs.len());
    server.kill9();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .unwrap()
            .unwrap();
    }
    let acked = acked.take();
    assert!(
        acked.len() >= 50,
        "too few uploads acknowledged before the kill: {}",
        acked.len()
    );
    assert!(
        started > acked.len(),
        "some uploads must have been in flight at the kill"
    );

    // Restart on the same data directory and check everything at once.
    let server = KilnProcess::with_config(dir.path(), CONFIG);
    let channel = server.channel().await;
    for &i in &acked {
        let key = BlobKey::of(DigestFunction::Sha256, &blobs[i]);
        let got = read_back(channel.clone(), &key).await.unwrap();
        let got = got.unwrap_or_else(|| panic!("acknowledged blob {key} lost after kill -9"));
        assert_eq!(got.len(), blobs[i].len());
        key.verify(&got).unwrap();
    }
    // Uploads that were in flight: absent or complete, never partial.
    for i in 0..started {
        if acked.contains(&i) {
            continue;
        }
        let key = BlobKey::of(DigestFunction::Sha256, &blobs[i]);
        if let Some(got) = read_back(channel.clone(), &key).await.unwrap() {
            key.verify(&got).unwrap();
        }
    }
    // Every file on disk is complete and verified, and the store's own
    // accounting (after its background index scan) equals the disk.
    let root = dir.path().join("data/cas");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (files, bytes) = verify_disk(&root);
        let (_, body) = server.http_get("/stats");
        let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
        let cas = &stats["stores"]["cas"];
        if cas["bytes"].as_u64() == Some(bytes) && cas["items"].as_u64() == Some(files) {
            assert!(files as usize >= acked.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "store accounting {cas} never matched the disk ({files} files, {bytes} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tiny thread-safe list of acknowledged indexes.
mod parking_lot_free {
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Acked(Mutex<Vec<usize>>);

    impl Acked {
        pub fn push(&self, i: usize) {
            self.0.lock().unwrap().push(i);
        }
        pub fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
        pub fn take(&self) -> Vec<usize> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
}
