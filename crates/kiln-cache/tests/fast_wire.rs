//! The zero-copy wire types (`kiln_proto::fast`) against the real server:
//! the generated fast clients interoperate with upstream clients, and
//! hashes that are not UTF-8 (which the `Bytes`-typed hash field lets
//! through decoding) are refused instead of being echoed into a `string`.

mod common;

use bytes::Bytes;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::bytestream::ReadRequest;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient as UpstreamByteStream;
use kiln_proto::fast::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::fast::cas::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::fast::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest, WriteRequest,
    batch_update_blobs_request::Request as UpdateReq,
};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient as UpstreamCas;
use tonic::Code;

fn digest(data: &[u8]) -> Digest {
    let key = BlobKey::of(DigestFunction::Sha256, data);
    Digest {
        hash: Bytes::from(key.hash_hex()),
        size_bytes: key.size() as i64,
    }
}

fn not_utf8() -> Digest {
    Digest {
        hash: Bytes::from(vec![0xC3u8; 64]),
        size_bytes: 1,
    }
}

#[tokio::test]
async fn fast_clients_round_trip_with_upstream_clients() {
    let server = common::start_memory().await;
    let mut fast = ContentAddressableStorageClient::new(server.channel.clone());
    let mut upstream = UpstreamCas::new(server.channel.clone());

    let blobs: Vec<Bytes> = (0..20u8)
        .map(|i| Bytes::from(vec![i; 1000 + i as usize]))
        .collect();
    let resp = fast
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: blobs
                .iter()
                .map(|b| UpdateReq {
                    digest: Some(digest(b)),
                    data: b.clone(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses.len(), blobs.len());
    for (r, b) in resp.responses.iter().zip(&blobs) {
        assert_eq!(r.status.as_ref().unwrap().code, 0);
        assert_eq!(r.digest.as_ref().unwrap(), &digest(b));
    }

    // An upstream client reads what the fast client wrote.
    let read = upstream
        .batch_read_blobs(kiln_proto::reapi::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: blobs
                .iter()
                .map(|b| BlobKey::of(DigestFunction::Sha256, b).to_digest())
                .collect(),
            acceptable_compressors: Vec::new(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for (r, b) in read.responses.iter().zip(&blobs) {
        assert_eq!(r.status.as_ref().unwrap().code, 0);
        assert_eq!(&r.data[..], &b[..]);
    }

    // FindMissingBlobs answers with the request's own digests.
    let absent = digest(b"never stored");
    let missing = fast
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![digest(&blobs[3]), absent.clone(), digest(&blobs[7])],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests, vec![absent]);

    // ByteStream: written with `Bytes` messages, read back by upstream.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let key = BlobKey::of(DigestFunction::Sha256, &data);
    let name = format!("uploads/u1/blobs/{}/{}", key.hash_hex(), key.size());
    let all = Bytes::from(data.clone());
    let reqs: Vec<WriteRequest> = (0..all.len())
        .step_by(300_000)
        .map(|off| WriteRequest {
            resource_name: if off == 0 { name.clone() } else { String::new() },
            write_offset: off as i64,
            finish_write: off + 300_000 >= all.len(),
            data: all.slice(off..(off + 300_000).min(all.len())),
        })
        .collect();
    let mut bs = ByteStreamClient::new(server.channel.clone());
    let written = bs.write(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    assert_eq!(written.committed_size, data.len() as i64);
    let mut up_bs = UpstreamByteStream::new(server.channel.clone());
    let mut stream = up_bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", key.hash_hex(), key.size()),
            read_offset: 1_234_567,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        got.extend_from_slice(&msg.data);
    }
    assert!(got == data[1_234_567..], "read back {} bytes", got.len());
    // With a read limit.
    let mut stream = up_bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", key.hash_hex(), key.size()),
            read_offset: 10,
            read_limit: 700_001,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        got.extend_from_slice(&msg.data);
    }
    assert!(got == data[10..700_011]);
}

#[tokio::test]
async fn hashes_that_are_not_utf8_are_invalid_argument() {
    let server = common::start_memory().await;
    let mut fast = ContentAddressableStorageClient::new(server.channel.clone());
    let good = Bytes::from_static(b"fine");

    let err = fast
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![digest(&good), not_utf8()],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Per-blob answers echo the digest, so the whole request is refused
    // rather than answered with an invalid string.
    let err = fast
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![
                UpdateReq {
                    digest: Some(digest(&good)),
                    data: good.clone(),
                    compressor: 0,
                },
                UpdateReq {
                    digest: Some(not_utf8()),
                    data: Bytes::from_static(b"x"),
                    compressor: 0,
                },
            ],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    let err = fast
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![digest(&good), not_utf8()],
            acceptable_compressors: Vec::new(),
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // A malformed but valid-UTF-8 hash stays a per-blob error.
    let resp = fast
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![Digest {
                hash: Bytes::from("zz".repeat(32)),
                size_bytes: 1,
            }],
            acceptable_compressors: Vec::new(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.responses[0].status.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );
}
