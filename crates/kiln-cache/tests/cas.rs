//! ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs and
//! BatchReadBlobs over real gRPC.

mod common;

use kiln_cache::CacheLimits;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::batch_update_blobs_request::Request as UpdateReq;
use kiln_proto::reapi::compressor::Value as Compressor;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest};
use tonic::Code;
use tonic::transport::Channel;

const SHA256: DigestFunction = DigestFunction::Sha256;

fn client(server: &common::TestServer) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(server.channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn digest(data: &[u8]) -> Digest {
    BlobKey::of(SHA256, data).to_digest()
}

fn upload(d: Digest, data: &[u8]) -> UpdateReq {
    UpdateReq {
        digest: Some(d),
        data: data.to_vec(),
        compressor: 0,
    }
}

async fn put_blobs(cas: &mut ContentAddressableStorageClient<Channel>, instance: &str, blobs: &[&[u8]]) {
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: blobs.iter().map(|b| upload(digest(b), b)).collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for r in resp.responses {
        assert_eq!(r.status.unwrap().code, 0);
    }
}

async fn missing(
    cas: &mut ContentAddressableStorageClient<Channel>,
    instance: &str,
    function: i32,
    digests: Vec<Digest>,
) -> Result<Vec<Digest>, tonic::Status> {
    cas.find_missing_blobs(FindMissingBlobsRequest {
        instance_name: instance.into(),
        blob_digests: digests,
        digest_function: function,
    })
    .await
    .map(|r| r.into_inner().missing_blob_digests)
}

/// A compressible blob of `n` bytes seeded by `seed`.
fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i / 64) as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn find_missing_reports_present_missing_and_empty() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    put_blobs(&mut cas, "main", &[b"present"]).await;
    let empty = digest(b"");
    let got = missing(
        &mut cas,
        "main",
        0,
        vec![digest(b"present"), digest(b"absent"), empty],
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        vec![digest(b"absent")],
        "only the absent blob; the empty blob always exists"
    );
    // Instances "" and "main" share stores in the harness.
    let got = missing(&mut cas, "", 0, vec![digest(b"present")]).await.unwrap();
    assert!(got.is_empty());
    // An empty request is fine.
    assert!(missing(&mut cas, "main", 0, vec![]).await.unwrap().is_empty());
}

#[tokio::test]
async fn find_missing_rejects_bad_digests_and_unknown_instances() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    let bad_hash = Digest {
        hash: "xyz".repeat(20),
        size_bytes: 3,
    };
    let err = missing(&mut cas, "main", 0, vec![digest(b"a"), bad_hash])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let negative = Digest {
        hash: digest(b"a").hash,
        size_bytes: -1,
    };
    let err = missing(&mut cas, "main", 0, vec![negative]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Uppercase hex is not the canonical form.
    let upper = Digest {
        hash: digest(b"a").hash.to_uppercase(),
        size_bytes: 1,
    };
    let err = missing(&mut cas, "main", 0, vec![upper]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = missing(&mut cas, "nope", 0, vec![digest(b"a")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("nope"), "{}", err.message());
}

#[tokio::test]
async fn blake3_and_sha256_with_the_same_hex_are_distinct() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    let data = b"hashed with blake3";
    let blake = BlobKey::of(DigestFunction::Blake3, data).to_digest();
    let blake_fn = DigestFunction::Blake3.to_proto() as i32;
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![upload(blake.clone(), data)],
            digest_function: blake_fn,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    // Uploading as SHA-256 (inferred from the 64-char hash) fails verification.
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![upload(blake.clone(), data)],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.responses[0].status.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );

    assert!(
        missing(&mut cas, "main", blake_fn, vec![blake.clone()])
            .await
            .unwrap()
            .is_empty()
    );
    let sha_fn = SHA256.to_proto() as i32;
    assert_eq!(
        missing(&mut cas, "main", sha_fn, vec![blake.clone()])
            .await
            .unwrap(),
        vec![blake.clone()]
    );
    assert_eq!(
        missing(&mut cas, "main", 0, vec![blake.clone()]).await.unwrap(),
        vec![blake]
    );
}

#[tokio::test]
async fn batch_update_gives_each_blob_its_own_status() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    let good = b"good blob".as_slice();
    let wrong_hash = Digest {
        hash: digest(b"something else").hash,
        size_bytes: 9,
    };
    let wrong_size = Digest {
        hash: digest(b"sized blob").hash,
        size_bytes: 3,
    };
    let malformed = Digest {
        hash: "12".into(),
        size_bytes: 2,
    };
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![
                upload(digest(good), good),
                upload(wrong_hash.clone(), b"bad blob!"),
                upload(wrong_size.clone(), b"sized blob"),
                upload(malformed, b"xx"),
                upload(digest(b""), b""),
                upload(digest(good), good),
            ],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let inv = Code::InvalidArgument as i32;
    assert_eq!(codes, vec![0, inv, inv, inv, 0, 0]);
    assert_eq!(
        resp.responses[1].digest.as_ref(),
        Some(&wrong_hash),
        "responses echo digests"
    );
    let got = missing(
        &mut cas,
        "main",
        0,
        vec![
            digest(good),
            wrong_hash.clone(),
            wrong_size.clone(),
            digest(b"bad blob!"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        vec![wrong_hash, wrong_size, digest(b"bad blob!")],
        "bad blobs are not stored"
    );

    // Re-uploading a present blob succeeds (the write is skipped).
    put_blobs(&mut cas, "main", &[good]).await;
}

#[tokio::test]
async fn batch_update_over_the_limit_is_rejected_whole() {
    let limits = CacheLimits {
        max_batch_total_size_bytes: 1000,
        ..CacheLimits::default()
    };
    let server = common::start(common::memory_instances(limits)).await;
    let mut cas = client(&server);
    let a = blob(600, 1);
    let b = blob(600, 2);
    let err = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![upload(digest(&a), &a), upload(digest(&b), &b)],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        missing(&mut cas, "main", 0, vec![digest(&a)])
            .await
            .unwrap()
            .len(),
        1
    );
    // Under the limit: fine.
    put_blobs(&mut cas, "main", &[&a]).await;
}

#[tokio::test]
async fn batch_update_enforces_the_max_blob_size_per_blob() {
    let limits = CacheLimits {
        max_cas_blob_size_bytes: 100,
        ..CacheLimits::default()
    };
    let server = common::start(common::memory_instances(limits)).await;
    let mut cas = client(&server);
    let small = blob(50, 1);
    let big = blob(150, 2);
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![upload(digest(&small), &small), upload(digest(&big), &big)],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(codes, vec![0, Code::InvalidArgument as i32]);
}

#[tokio::test]
async fn batch_update_zstd_round_trip() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    let data = blob(10_000, 7);
    let z = zstd::bulk::compress(&data, 3).unwrap();
    assert!(z.len() < data.len());
    let lying = blob(10_000, 8);
    let deflate = b"deflated?".as_slice();
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![
                UpdateReq {
                    digest: Some(digest(&data)),
                    data: z.clone(),
                    compressor: Compressor::Zstd as i32,
                },
                // Decompresses fine but to other content.
                UpdateReq {
                    digest: Some(digest(&lying)),
                    data: z.clone(),
                    compressor: Compressor::Zstd as i32,
                },
                // Not zstd at all.
                UpdateReq {
                    digest: Some(digest(b"garbage")),
                    data: b"garbage".to_vec(),
                    compressor: Compressor::Zstd as i32,
                },
                UpdateReq {
                    digest: Some(digest(deflate)),
                    data: deflate.to_vec(),
                    compressor: Compressor::Deflate as i32,
                },
            ],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let inv = Code::InvalidArgument as i32;
    assert_eq!(codes, vec![0, inv, inv, inv]);

    // Identity read decodes; a zstd read passes the uploaded frame through.
    let read = |compressors: Vec<i32>| BatchReadBlobsRequest {
        instance_name: "main".into(),
        digests: vec![digest(&data)],
        acceptable_compressors: compressors,
        digest_function: 0,
    };
    let r = cas.batch_read_blobs(read(vec![])).await.unwrap().into_inner();
    assert_eq!(r.responses[0].status.as_ref().unwrap().code, 0);
    assert_eq!(r.responses[0].compressor, Compressor::Identity as i32);
    assert_eq!(r.responses[0].data, data);
    let r = cas
        .batch_read_blobs(read(vec![Compressor::Zstd as i32]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.responses[0].compressor, Compressor::Zstd as i32);
    assert_eq!(
        r.responses[0].data, z,
        "stored zstd payload passed through untouched"
    );
    assert_eq!(
        zstd::bulk::decompress(&r.responses[0].data, data.len()).unwrap(),
        data
    );
}

#[tokio::test]
async fn batch_read_found_missing_and_empty() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    put_blobs(&mut cas, "main", &[b"one", b"two"]).await;
    let bad = Digest {
        hash: "00".into(),
        size_bytes: 1,
    };
    let resp = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests: vec![
                digest(b"one"),
                digest(b"absent"),
                digest(b""),
                digest(b"two"),
                bad,
            ],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        vec![0, Code::NotFound as i32, 0, 0, Code::InvalidArgument as i32]
    );
    assert_eq!(resp.responses[0].data, b"one");
    assert_eq!(resp.responses[0].digest, Some(digest(b"one")));
    assert!(resp.responses[2].data.is_empty());
    assert_eq!(resp.responses[3].data, b"two");

    let err = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "nope".into(),
            digests: vec![digest(b"one")],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn batch_read_zstd_when_acceptable() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    let data = blob(5000, 3);
    put_blobs(&mut cas, "main", &[&data]).await;
    let resp = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests: vec![digest(&data)],
            acceptable_compressors: vec![Compressor::Zstd as i32],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let r = &resp.responses[0];
    assert_eq!(r.status.as_ref().unwrap().code, 0);
    assert_eq!(r.compressor, Compressor::Zstd as i32);
    assert!(r.data.len() < data.len());
    assert_eq!(zstd::bulk::decompress(&r.data, data.len()).unwrap(), data);
}

#[tokio::test]
async fn batch_read_over_the_limit_is_rejected() {
    let limits = CacheLimits {
        max_batch_total_size_bytes: 1000,
        ..CacheLimits::default()
    };
    let server = common::start(common::memory_instances(limits)).await;
    let mut cas = client(&server);
    let a = blob(600, 1);
    put_blobs(&mut cas, "main", &[&a]).await;
    let err = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests: vec![digest(&a), digest(&a)],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Batches big enough to be hashed and compressed on the blocking pool keep
/// every status aligned with its request.
#[tokio::test]
async fn large_batches_are_verified_in_parallel_and_stay_ordered() {
    let server = common::start_memory().await;
    let mut cas = client(&server);
    let blobs: Vec<Vec<u8>> = (0..6u8).map(|i| blob(512 * 1024, i)).collect();
    let mut requests: Vec<UpdateReq> = blobs.iter().map(|b| upload(digest(b), b)).collect();
    requests[3].data[1000] ^= 1; // corrupt one in the middle
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests,
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let inv = Code::InvalidArgument as i32;
    assert_eq!(codes, vec![0, 0, 0, inv, 0, 0]);

    let resp = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests: blobs.iter().map(|b| digest(b)).collect(),
            acceptable_compressors: vec![Compressor::Zstd as i32],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for (i, (r, b)) in resp.responses.iter().zip(&blobs).enumerate() {
        if i == 3 {
            assert_eq!(r.status.as_ref().unwrap().code, Code::NotFound as i32);
            continue;
        }
        assert_eq!(r.status.as_ref().unwrap().code, 0, "blob {i}");
        assert_eq!(r.compressor, Compressor::Zstd as i32);
        assert_eq!(&zstd::bulk::decompress(&r.data, b.len()).unwrap(), b, "blob {i}");
    }
}
