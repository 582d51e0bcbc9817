//! ByteStream service over real gRPC: reads, resumable writes, compressed
//! blobs, resource names and error codes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest, WriteResponse};
use kiln_store::memory::MemoryStore;
use kiln_store::{Blob, BlobRead, BlobWriter, Encoding, Store, StoreError, StoreResult, StoreStats};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

const MIB: usize = 1 << 20;
/// Upper bound on every call, so a hang fails the test instead of stalling it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn client(server: &common::TestServer) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(server.channel.clone()).max_decoding_message_size(64 * MIB)
}

/// Deterministic, mildly compressible content.
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|i| {
            if i % 4 == 0 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
            }
            if i % 64 < 32 {
                b'a' + (i % 7) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

fn sha256(data: &[u8]) -> BlobKey {
    BlobKey::of(DigestFunction::Sha256, data)
}

fn upload_name(instance: &str, key: &BlobKey) -> String {
    let uuid = uuid::Uuid::new_v4();
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    let func = if key.function().named_in_resource() {
        format!("{}/", key.function().name())
    } else {
        String::new()
    };
    format!(
        "{prefix}uploads/{uuid}/blobs/{func}{}/{}",
        key.hash_hex(),
        key.size()
    )
}

fn zstd_upload_name(instance: &str, key: &BlobKey) -> String {
    upload_name(instance, key).replacen("/blobs/", "/compressed-blobs/zstd/", 1)
}

fn read_name(instance: &str, key: &BlobKey) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    let func = if key.function().named_in_resource() {
        format!("{}/", key.function().name())
    } else {
        String::new()
    };
    format!("{prefix}blobs/{func}{}/{}", key.hash_hex(), key.size())
}

fn zstd_read_name(instance: &str, key: &BlobKey) -> String {
    read_name(instance, key).replacen("blobs/", "compressed-blobs/zstd/", 1)
}

/// Write requests for `data` (offsets starting at `start`), `chunk` bytes
/// each, the resource name on the first only.
fn requests(name: &str, data: &[u8], chunk: usize, start: u64, finish: bool) -> Vec<WriteRequest> {
    let mut out = Vec::new();
    let mut offset = start;
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(chunk).collect()
    };
    let n = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        out.push(WriteRequest {
            resource_name: if i == 0 { name.to_string() } else { String::new() },
            write_offset: offset as i64,
            finish_write: finish && i + 1 == n,
            data: piece.to_vec(),
        });
        offset += piece.len() as u64;
    }
    out
}

async fn send(
    client: &mut ByteStreamClient<Channel>,
    reqs: Vec<WriteRequest>,
) -> Result<WriteResponse, Status> {
    let call = client.write(tokio_stream::iter(reqs));
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map(|r| r.into_inner()),
        Err(_) => panic!("Write did not finish within {CALL_TIMEOUT:?}"),
    }
}

async fn write_blob(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    data: &[u8],
    chunk: usize,
) -> Result<WriteResponse, Status> {
    send(client, requests(name, data, chunk, 0, true)).await
}

/// Reads a resource; returns the bytes and the size of the largest message.
async fn read_msgs(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<(Vec<u8>, usize), Status> {
    let fut = async {
        let req = ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        };
        let mut stream = client.read(req).await?.into_inner();
        let mut out = Vec::new();
        let mut largest = 0;
        while let Some(msg) = stream.message().await? {
            largest = largest.max(msg.data.len());
            out.extend_from_slice(&msg.data);
        }
        Ok((out, largest))
    };
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => panic!("Read did not finish within {CALL_TIMEOUT:?}"),
    }
}

async fn read(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, Status> {
    read_msgs(client, name, offset, limit).await.map(|(d, _)| d)
}

async fn query(client: &mut ByteStreamClient<Channel>, name: &str) -> Result<(i64, bool), Status> {
    let r = client
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.to_string(),
        })
        .await?
        .into_inner();
    Ok((r.committed_size, r.complete))
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            s
        }
    }
}

#[tokio::test]
async fn write_then_read_round_trip() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    for (i, len) in [0usize, 1, 1000, 64 * 1024 + 7, 5 * MIB + 3]
        .into_iter()
        .enumerate()
    {
        let data = content(len, i as u32);
        let key = sha256(&data);
        let resp = write_blob(&mut c, &upload_name("", &key), &data, MIB)
            .await
            .unwrap();
        assert_eq!(resp.committed_size, len as i64, "committed_size for {len} bytes");
        let (got, largest) = read_msgs(&mut c, &read_name("", &key), 0, 0).await.unwrap();
        assert_eq!(got.len(), len);
        assert!(got == data, "content of {len} bytes differs");
        assert!(
            largest <= kiln_cache::bytestream::READ_CHUNK_SIZE,
            "message of {largest} bytes"
        );
        assert!(largest < 4 * MIB);
    }
}

#[tokio::test]
async fn read_with_offset_and_limit() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(3 * MIB + 11, 7);
    let key = sha256(&data);
    write_blob(&mut c, &upload_name("main", &key), &data, 256 * 1024)
        .await
        .unwrap();
    let name = read_name("main", &key);
    let len = data.len();
    let cases: [(usize, usize); 8] = [
        (0, 0),
        (1, 0),
        (100, 50),
        (MIB - 1, 2 * MIB + 5),
        (len - 1, 0),
        (len, 0),
        (len - 10, 1000),
        (5, 1),
    ];
    for (offset, limit) in cases {
        let got = read(&mut c, &name, offset as i64, limit as i64).await.unwrap();
        let end = if limit == 0 {
            len
        } else {
            (offset + limit).min(len)
        };
        assert!(
            got == data[offset..end],
            "offset {offset} limit {limit}: {} bytes",
            got.len()
        );
    }
    let r = read(&mut c, &name, len as i64 + 1, 0).await;
    assert_code(r, Code::OutOfRange, "offset past the end");
    // The spec: a negative read_offset is OUT_OF_RANGE, a negative read_limit an error.
    assert_code(
        read(&mut c, &name, -1, 0).await,
        Code::OutOfRange,
        "negative offset",
    );
    assert_code(
        read(&mut c, &name, 0, -1).await,
        Code::InvalidArgument,
        "negative limit",
    );
}

#[tokio::test]
async fn missing_blob_is_not_found_and_empty_blob_always_exists() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let key = sha256(b"never uploaded");
    let s = assert_code(
        read(&mut c, &read_name("", &key), 0, 0).await,
        Code::NotFound,
        "missing",
    );
    assert!(s.message().contains(&key.hash_hex()), "{}", s.message());
    // Even when there is nothing to send (offset at the end).
    let r = read(&mut c, &read_name("", &key), key.size() as i64, 0).await;
    assert_code(r, Code::NotFound, "missing, offset at the end");
    let empty = BlobKey::empty(DigestFunction::Sha256);
    assert_eq!(read(&mut c, &read_name("", &empty), 0, 0).await.unwrap(), b"");
    let z = read(&mut c, &zstd_read_name("", &empty), 0, 0).await.unwrap();
    assert_eq!(zstd::bulk::decompress(&z, 16).unwrap(), b"");
    let b3 = BlobKey::empty(DigestFunction::Blake3);
    assert_eq!(read(&mut c, &read_name("main", &b3), 0, 0).await.unwrap(), b"");
}

#[tokio::test]
async fn malformed_resource_names_are_invalid_argument() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let key = sha256(b"x");
    let (h, n) = (key.hash_hex(), key.size());
    let reads = [
        String::new(),
        format!("blobs/{h}"),
        format!("blobs/{h}/"),
        format!("blobs/{h}/abc"),
        format!("blobs/{h}/-1"),
        format!("blobs/{h}/1/extra"),
        format!("blobs/{}/1", &h[..10]),
        format!("blobs/{}/1", h.to_uppercase()),
        format!("blobs/zzzz{}/1", &h[4..]),
        format!("blobs/sha1/{h}/1"),
        format!("blobs/vso/{h}/1"),
        format!("compressed-blobs/{h}/{n}"),
        format!("compressed-blobs/identity/{h}/{n}"),
        format!("compressed-blobs/brotli/{h}/{n}"),
        format!("compressed-blobs/snappy/{h}/{n}"),
        format!("nosuchinstance/blobs/{h}/{n}"),
        format!("main/x/blobs/{h}/{n}"),
        format!("/blobs/{h}/{n}"),
        format!("uploads/{}/blobs/{h}/{n}", uuid::Uuid::new_v4()),
        format!("{h}/{n}"),
    ];
    for name in &reads {
        let s = assert_code(read(&mut c, name, 0, 0).await, Code::InvalidArgument, name);
        assert!(!s.message().is_empty());
    }
    let u = uuid::Uuid::new_v4();
    let writes = [
        format!("blobs/{h}/{n}"),
        format!("uploads/{u}/blobs/{h}"),
        format!("uploads/{u}/blobs/{h}/-1"),
        format!("uploads/{u}/blobs/{h}/x1"),
        format!("uploads/{u}/{h}/{n}"),
        format!("uploads/blobs/{h}/{n}"),
        format!("uploads/{u}/compressed-blobs/identity/{h}/{n}"),
        format!("uploads/{u}/compressed-blobs/deflate/{h}/{n}"),
        format!("nosuchinstance/uploads/{u}/blobs/{h}/{n}"),
        format!("uploads/{u}/blobs/blake2/{h}/{n}"),
    ];
    for name in &writes {
        let r = write_blob(&mut c, name, b"x", 1024).await;
        assert_code(r, Code::InvalidArgument, name);
        let r = query(&mut c, name).await;
        assert_code(r, Code::InvalidArgument, name);
    }
    // The messages name the problem.
    let s = read(&mut c, &format!("compressed-blobs/identity/{h}/{n}"), 0, 0)
        .await
        .unwrap_err();
    assert!(s.message().contains("identity"), "{}", s.message());
    let s = read(&mut c, &format!("nosuchinstance/blobs/{h}/{n}"), 0, 0)
        .await
        .unwrap_err();
    assert!(s.message().contains("nosuchinstance"), "{}", s.message());
}

#[tokio::test]
async fn wrong_digest_is_rejected_and_nothing_is_stored() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(3 * MIB, 3);
    let claimed = sha256(b"something else entirely");
    let claimed = BlobKey::from_raw(DigestFunction::Sha256, &claimed.hash_raw(), data.len() as u64).unwrap();
    let name = upload_name("", &claimed);
    let s = assert_code(
        write_blob(&mut c, &name, &data, MIB).await,
        Code::InvalidArgument,
        "wrong hash",
    );
    assert!(s.message().contains("hash"), "{}", s.message());
    assert_code(
        read(&mut c, &read_name("", &claimed), 0, 0).await,
        Code::NotFound,
        "after bad write",
    );
    assert_code(
        query(&mut c, &name).await,
        Code::NotFound,
        "status after a rejected write",
    );
    let cas = server.instances.get("").unwrap().cas.clone();
    assert_eq!(
        cas.has_many(std::slice::from_ref(&claimed)).await.unwrap(),
        vec![false]
    );

    // More data than the declared size is refused before it is stored.
    let right = sha256(&data);
    let short = BlobKey::from_raw(DigestFunction::Sha256, &right.hash_raw(), 100).unwrap();
    let r = write_blob(&mut c, &upload_name("", &short), &data, MIB).await;
    let s = assert_code(r, Code::InvalidArgument, "too much data");
    assert!(s.message().contains("size"), "{}", s.message());
    // Fewer bytes than the size, then finish_write.
    let r = write_blob(&mut c, &upload_name("", &right), &data[..1000], MIB).await;
    assert_code(r, Code::InvalidArgument, "too little data");
    assert_code(
        read(&mut c, &read_name("", &right), 0, 0).await,
        Code::NotFound,
        "nothing stored",
    );
    assert_eq!(server.instances.get("").unwrap().cas.stats().items, 0);
}

#[tokio::test]
async fn interrupted_write_resumes_from_committed_size() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(8 * MIB + 5, 11);
    let key = sha256(&data);
    let name = upload_name("main", &key);
    let first = 3 * MIB;

    // A stream that ends without finish_write leaves a resumable upload.
    let resp = send(&mut c, requests(&name, &data[..first], MIB, 0, false))
        .await
        .unwrap();
    assert_eq!(resp.committed_size, first as i64);
    assert_eq!(query(&mut c, &name).await.unwrap(), (first as i64, false));
    assert_code(
        read(&mut c, &read_name("main", &key), 0, 0).await,
        Code::NotFound,
        "not yet visible",
    );

    // A wrong resume offset is refused and leaves the upload intact.
    let r = send(&mut c, requests(&name, &data[MIB..], MIB, MIB as u64, true)).await;
    assert_code(r, Code::InvalidArgument, "resume at the wrong offset");
    assert_eq!(query(&mut c, &name).await.unwrap(), (first as i64, false));

    // A later message with a wrong offset is refused too.
    let mut reqs = requests(&name, &data[first..], MIB, first as u64, true);
    reqs[1].write_offset += 1;
    assert_code(
        send(&mut c, reqs).await,
        Code::InvalidArgument,
        "bad later offset",
    );
    // That discarded the upload; it starts over from 0.
    assert_code(query(&mut c, &name).await, Code::NotFound, "discarded");
    let resp = send(&mut c, requests(&name, &data[..first], MIB, 0, false))
        .await
        .unwrap();
    assert_eq!(resp.committed_size, first as i64);

    // Resume at committed_size and finish.
    let (committed, _) = query(&mut c, &name).await.unwrap();
    let reqs = requests(&name, &data[committed as usize..], MIB, committed as u64, true);
    let resp = send(&mut c, reqs).await.unwrap();
    assert_eq!(resp.committed_size, data.len() as i64);
    assert_eq!(query(&mut c, &name).await.unwrap(), (data.len() as i64, true));
    assert!(read(&mut c, &read_name("main", &key), 0, 0).await.unwrap() == data);

    // Restarting at offset 0 discards a partial upload.
    let data2 = content(2 * MIB, 12);
    let key2 = sha256(&data2);
    let name2 = upload_name("main", &key2);
    send(&mut c, requests(&name2, &data2[..MIB], MIB / 2, 0, false))
        .await
        .unwrap();
    let resp = write_blob(&mut c, &name2, &data2, MIB / 2).await.unwrap();
    assert_eq!(resp.committed_size, data2.len() as i64);
    assert!(read(&mut c, &read_name("main", &key2), 0, 0).await.unwrap() == data2);
}

/// Opens a Write whose request stream stays open until the returned sender
/// is dropped, sending `first` right away.
async fn open_write(
    c: &ByteStreamClient<Channel>,
    first: WriteRequest,
) -> (
    mpsc::Sender<WriteRequest>,
    tokio::task::JoinHandle<Result<WriteResponse, Status>>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut c = c.clone();
    let call = tokio::spawn(async move { c.write(ReceiverStream::new(rx)).await.map(|r| r.into_inner()) });
    (tx, call)
}

#[tokio::test]
async fn existing_blob_finishes_early() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(4 * MIB, 21);
    let key = sha256(&data);
    write_blob(&mut c, &upload_name("", &key), &data, MIB)
        .await
        .unwrap();

    // Identity: committed_size = size after the first message, while the
    // client still holds the stream open with data left to send.
    let first = requests(&upload_name("", &key), &data, MIB, 0, false).remove(0);
    let (tx, call) = open_write(&c, first).await;
    let resp = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.committed_size, data.len() as i64);
    drop(tx);

    // Compressed: -1.
    let z = zstd::bulk::compress(&data, 3).unwrap();
    let first = requests(&zstd_upload_name("", &key), &z, 1024, 0, false).remove(0);
    let (tx, call) = open_write(&c, first).await;
    let resp = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.committed_size, -1);
    drop(tx);

    // The empty blob always exists.
    let empty = BlobKey::empty(DigestFunction::Sha256);
    assert_eq!(
        write_blob(&mut c, &upload_name("", &empty), b"", 1)
            .await
            .unwrap()
            .committed_size,
        0
    );
    let resp = write_blob(&mut c, &zstd_upload_name("", &empty), b"", 1)
        .await
        .unwrap();
    assert_eq!(resp.committed_size, -1);

    // QueryWriteStatus of a never-used upload name of an existing blob: complete.
    assert_eq!(
        query(&mut c, &upload_name("", &key)).await.unwrap(),
        (data.len() as i64, true)
    );
}

#[tokio::test]
async fn concurrent_stream_on_same_upload_is_aborted() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(2 * MIB, 31);
    let key = sha256(&data);
    let name = upload_name("", &key);
    let first = requests(&name, &data[..MIB], MIB, 0, false).remove(0);
    let (tx, call) = open_write(&c, first).await;
    // Wait (bounded) until the server has taken the first message.
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        match query(&mut c, &name).await {
            Ok((n, false)) if n == MIB as i64 => break,
            _ if Instant::now() > deadline => panic!("first stream never registered"),
            _ => tokio::task::yield_now().await,
        }
    }
    let r = write_blob(&mut c, &name, &data, MIB).await;
    assert_code(r, Code::Aborted, "second concurrent stream");
    // The first stream is unaffected: it closes without finishing and resumes.
    drop(tx);
    let resp = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.committed_size, MIB as i64);
    let resp = send(&mut c, requests(&name, &data[MIB..], MIB, MIB as u64, true))
        .await
        .unwrap();
    assert_eq!(resp.committed_size, data.len() as i64);
}

#[tokio::test]
async fn zstd_write_and_reads_round_trip() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(3 * MIB + 77, 41);
    let key = sha256(&data);
    let z = zstd::bulk::compress(&data, 3).unwrap();
    assert!(z.len() < data.len());
    let resp = write_blob(&mut c, &zstd_upload_name("main", &key), &z, 64 * 1024)
        .await
        .unwrap();
    // committed_size counts the compressed bytes sent (what Bazel expects).
    assert_eq!(resp.committed_size, z.len() as i64);

    // Stored as the client's zstd bytes, untouched.
    let stored = server
        .instances
        .get("main")
        .unwrap()
        .cas
        .get(&key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.encoding, Encoding::Zstd);
    assert!(stored.data == z);

    assert!(read(&mut c, &read_name("main", &key), 0, 0).await.unwrap() == data);
    assert!(read(&mut c, &read_name("main", &key), 12345, 100).await.unwrap() == data[12345..12445]);
    // A compressed read from offset 0 passes the stored frames through.
    let got = read(&mut c, &zstd_read_name("main", &key), 0, 0).await.unwrap();
    assert!(got == z);
    let got = read(&mut c, &zstd_read_name("main", &key), 1000, 0)
        .await
        .unwrap();
    assert!(zstd::stream::decode_all(&got[..]).unwrap() == data[1000..]);

    // Compressed read of an identity-stored blob.
    let plain = content(MIB + 1, 42);
    let pkey = sha256(&plain);
    write_blob(&mut c, &upload_name("main", &pkey), &plain, MIB)
        .await
        .unwrap();
    let got = read(&mut c, &zstd_read_name("main", &pkey), 0, 0).await.unwrap();
    assert!(zstd::stream::decode_all(&got[..]).unwrap() == plain);

    // read_limit must be 0 for compressed reads.
    let r = read(&mut c, &zstd_read_name("main", &key), 0, 10).await;
    assert_code(r, Code::InvalidArgument, "compressed read with read_limit");
}

#[tokio::test]
async fn bad_zstd_uploads_are_rejected() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(MIB, 51);
    let key = sha256(&data);
    // Valid zstd of different content.
    let other = zstd::bulk::compress(&content(MIB, 52), 3).unwrap();
    let r = write_blob(&mut c, &zstd_upload_name("", &key), &other, 4096).await;
    assert_code(r, Code::InvalidArgument, "zstd of other content");
    // Not zstd at all.
    let r = write_blob(&mut c, &zstd_upload_name("", &key), &data, 4096).await;
    assert_code(r, Code::InvalidArgument, "not zstd");
    // Truncated frame.
    let z = zstd::bulk::compress(&data, 3).unwrap();
    let r = write_blob(&mut c, &zstd_upload_name("", &key), &z[..z.len() - 3], 4096).await;
    assert_code(r, Code::InvalidArgument, "truncated zstd");
    // A compressed upload cannot be resumed: it reports 0 and restarts.
    let name = zstd_upload_name("", &key);
    let resp = send(&mut c, requests(&name, &z[..z.len() / 2], 4096, 0, false))
        .await
        .unwrap();
    assert_eq!(resp.committed_size, 0);
    assert_eq!(query(&mut c, &name).await.unwrap(), (0, false));
    let half = (z.len() / 2) as u64;
    let r = send(&mut c, requests(&name, &z[z.len() / 2..], 4096, half, true)).await;
    assert_code(r, Code::InvalidArgument, "resume of a compressed upload");
    assert_code(
        read(&mut c, &read_name("", &key), 0, 0).await,
        Code::NotFound,
        "nothing stored",
    );
    let resp = write_blob(&mut c, &name, &z, 4096).await.unwrap();
    assert_eq!(resp.committed_size, z.len() as i64);
    assert!(read(&mut c, &read_name("", &key), 0, 0).await.unwrap() == data);
}

#[tokio::test]
async fn blake3_resource_names_carry_the_function() {
    let server = common::start_memory().await;
    let mut c = client(&server);
    let data = content(2 * MIB + 1, 61);
    let key = BlobKey::of(DigestFunction::Blake3, &data);
    let name = upload_name("main", &key);
    assert!(name.contains("/blobs/blake3/"), "{name}");
    let resp = write_blob(&mut c, &name, &data, MIB).await.unwrap();
    assert_eq!(resp.committed_size, data.len() as i64);
    assert!(read(&mut c, &read_name("main", &key), 0, 0).await.unwrap() == data);
    // Without the segment the same hash means SHA-256: a different blob.
    let as_sha = format!("main/blobs/{}/{}", key.hash_hex(), key.size());
    assert_code(
        read(&mut c, &as_sha, 0, 0).await,
        Code::NotFound,
        "blake3 hash read as sha256",
    );
    // An explicit segment for an inferable function is accepted.
    let skey = sha256(&data);
    write_blob(&mut c, &upload_name("main", &skey), &data, MIB)
        .await
        .unwrap();
    let explicit = format!("main/blobs/sha256/{}/{}", skey.hash_hex(), skey.size());
    assert!(read(&mut c, &explicit, 0, 0).await.unwrap() == data);
    // BLAKE3 with a hash that is not BLAKE3 of the data is rejected.
    let wrong = BlobKey::from_raw(DigestFunction::Blake3, &skey.hash_raw(), skey.size()).unwrap();
    let r = write_blob(&mut c, &upload_name("main", &wrong), &data, MIB).await;
    assert_code(r, Code::InvalidArgument, "blake3 mismatch");
    // Compressed BLAKE3 round trip.
    let zkey = BlobKey::of(DigestFunction::Blake3, &data[1..]);
    let z1 = zstd::bulk::compress(&data[1..], 1).unwrap();
    assert_eq!(
        write_blob(&mut c, &zstd_upload_name("main", &zkey), &z1, MIB)
            .await
            .unwrap()
            .committed_size,
        z1.len() as i64
    );
    let got = read(&mut c, &zstd_read_name("main", &zkey), 0, 0).await.unwrap();
    assert!(zstd::stream::decode_all(&got[..]).unwrap() == data[1..]);
}

#[tokio::test]
async fn instance_names_with_slashes_and_empty() {
    let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(64 << 20));
    let other: Arc<dyn Store> = Arc::new(MemoryStore::new(64 << 20));
    let ac: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
    let instances = Instances::new(
        [
            Instance::new("", cas.clone(), ac.clone()),
            Instance::new("team/a/b", other, ac),
        ],
        CacheLimits::default(),
    );
    let server = common::start(instances).await;
    let mut c = client(&server);
    let data = content(100_000, 71);
    let key = sha256(&data);
    write_blob(&mut c, &upload_name("team/a/b", &key), &data, 30_000)
        .await
        .unwrap();
    assert!(read(&mut c, &read_name("team/a/b", &key), 0, 0).await.unwrap() == data);
    // Separate stores: not visible through the empty instance.
    assert_code(
        read(&mut c, &read_name("", &key), 0, 0).await,
        Code::NotFound,
        "other instance",
    );
    write_blob(&mut c, &upload_name("", &key), &data, 30_000)
        .await
        .unwrap();
    assert!(read(&mut c, &read_name("", &key), 0, 0).await.unwrap() == data);
    assert_eq!(cas.stats().items, 1);
    // A prefix of the instance name is not an instance.
    let r = read(&mut c, &read_name("team/a", &key), 0, 0).await;
    assert_code(r, Code::InvalidArgument, "prefix of an instance");
    let r = write_blob(&mut c, &upload_name("team/a/b/c", &key), &data, 30_000).await;
    assert_code(r, Code::InvalidArgument, "extension of an instance");
}

#[tokio::test]
async fn blobs_over_the_size_limit_are_refused() {
    let limits = CacheLimits {
        max_cas_blob_size_bytes: 1000,
        ..CacheLimits::default()
    };
    let server = common::start(common::memory_instances(limits)).await;
    let mut c = client(&server);
    let data = content(1001, 81);
    let key = sha256(&data);
    // Refused on the first message, before the rest of the data.
    let first = requests(&upload_name("", &key), &data, 10, 0, false).remove(0);
    let (tx, call) = open_write(&c, first).await;
    let r = tokio::time::timeout(CALL_TIMEOUT, call).await.unwrap().unwrap();
    let s = assert_code(r, Code::InvalidArgument, "over max_cas_blob_size_bytes");
    assert!(s.message().contains("max_cas_blob_size_bytes"), "{}", s.message());
    drop(tx);
    let ok = content(1000, 82);
    write_blob(&mut c, &upload_name("", &sha256(&ok)), &ok, 100)
        .await
        .unwrap();
}

/// A store whose reads fail after the first chunk.
struct FailingStore;

#[tonic::async_trait]
impl Store for FailingStore {
    fn describe(&self) -> String {
        "failing".into()
    }
    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        Ok(vec![false; keys.len()])
    }
    async fn get(&self, _key: &BlobKey) -> StoreResult<Option<Blob>> {
        Err(StoreError::Internal("injected get failure".into()))
    }
    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>> {
        let chunks: Vec<StoreResult<Bytes>> = vec![
            Ok(Bytes::from(vec![1u8; 1000])),
            Err(StoreError::Io {
                context: "reading test blob".into(),
                source: std::io::Error::other("injected"),
            }),
        ];
        Ok(Some(BlobRead {
            encoding: Encoding::Identity,
            start: offset,
            stored_len: key.size(),
            stream: futures::stream::iter(chunks).boxed(),
        }))
    }
    async fn put(&self, _key: &BlobKey, _blob: Blob) -> StoreResult<()> {
        Err(StoreError::Full("injected".into()))
    }
    async fn begin_write(&self, _key: &BlobKey, _encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        Err(StoreError::Unavailable("injected".into()))
    }
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

#[tokio::test]
async fn store_fault_mid_read_is_internal() {
    let cas: Arc<dyn Store> = Arc::new(FailingStore);
    let ac: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
    let server = common::start(Instances::new(
        [Instance::new("", cas, ac)],
        CacheLimits::default(),
    ))
    .await;
    let mut c = client(&server);
    let key = sha256(&content(5000, 91));
    let req = ReadRequest {
        resource_name: read_name("", &key),
        read_offset: 0,
        read_limit: 0,
    };
    let mut stream = c.read(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.data.len(), 1000);
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{}", err.message());
    assert!(err.message().contains("injected"), "{}", err.message());
    // A write that cannot start reports the store's status.
    let r = write_blob(&mut c, &upload_name("", &sha256(b"new")), b"new", 10).await;
    assert_code(r, Code::Unavailable, "begin_write failure");
}

/// The server half of the throughput test: its own runtime with
/// recognisable thread names, so its CPU time can be told from the client's.
struct BenchServer {
    runtime: Option<tokio::runtime::Runtime>,
    channel: Channel,
}

const SERVER_THREAD: &str = "kiln-bench-srv";

impl BenchServer {
    /// `windows`: large HTTP/2 flow-control windows on both ends (the
    /// defaults are 1 MiB server-side).
    async fn start(windows: bool) -> BenchServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(SERVER_THREAD)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let mut routes = tonic::service::RoutesBuilder::default();
        {
            let _enter = runtime.enter();
            let instances = if std::env::var("KILN_BENCH_NULL_STORE").is_ok() {
                let null: Arc<dyn Store> = Arc::new(NullStore);
                Instances::new([Instance::new("", null.clone(), null)], CacheLimits::default())
            } else {
                common::memory_instances(CacheLimits::default())
            };
            let instances = Arc::new(instances);
            kiln_cache::add_routes(&mut routes, instances);
        }
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            // `Server::tcp_nodelay` does not apply to `serve_with_incoming`:
            // the incoming stream must set it. Without it, Nagle delays the
            // server's small WINDOW_UPDATE frames and writes crawl.
            let nodelay = std::env::var("KILN_BENCH_NAGLE").is_err();
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(nodelay));
            let mut builder = tonic::transport::Server::builder();
            if windows {
                builder = builder
                    .initial_stream_window_size(16 << 20)
                    .initial_connection_window_size(32 << 20);
            }
            builder
                .add_routes(routes.routes())
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true);
        if windows {
            endpoint = endpoint
                .initial_stream_window_size(16 << 20)
                .initial_connection_window_size(32 << 20);
        }
        let channel = endpoint.connect().await.unwrap();
        BenchServer {
            runtime: Some(runtime),
            channel,
        }
    }

    fn client(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(64 * MIB)
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A store that keeps nothing: isolates the service's and transport's cost
/// from a real store's (throughput test, writes only).
struct NullStore;

struct NullWriter;

#[tonic::async_trait]
impl BlobWriter for NullWriter {
    async fn write(&mut self, _chunk: Bytes) -> StoreResult<()> {
        Ok(())
    }
    async fn commit(self: Box<Self>) -> StoreResult<()> {
        Ok(())
    }
}

#[tonic::async_trait]
impl Store for NullStore {
    fn describe(&self) -> String {
        "null".into()
    }
    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        Ok(vec![false; keys.len()])
    }
    async fn get(&self, _key: &BlobKey) -> StoreResult<Option<Blob>> {
        Ok(None)
    }
    async fn read(&self, _key: &BlobKey, _offset: u64) -> StoreResult<Option<BlobRead>> {
        Ok(None)
    }
    async fn put(&self, _key: &BlobKey, _blob: Blob) -> StoreResult<()> {
        Ok(())
    }
    async fn begin_write(&self, _key: &BlobKey, _encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        Ok(Box::new(NullWriter))
    }
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

/// Throughput of one large write stream and of parallel reads, with the
/// server's CPU time measured apart from the client's. Run with
/// `cargo test --release -p kiln-cache --test bytestream throughput -- --ignored --nocapture`
/// Knobs: `KILN_BENCH_WINDOWS=1` (16/32 MiB HTTP/2 windows),
/// `KILN_BENCH_CHUNK=bytes` (write message size, default 1 MiB),
/// `KILN_BENCH_NULL_STORE=1` (a store that keeps nothing),
/// `KILN_BENCH_WRITE_ONLY=1`, `KILN_BENCH_NAGLE=1` (no TCP_NODELAY on the
/// server's sockets, to see what that costs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let windows = std::env::var("KILN_BENCH_WINDOWS").is_ok();
    let server = BenchServer::start(windows).await;
    let mut c = server.client();
    let len = 256 * MIB;
    let data = content(len, 101);
    let key = sha256(&data);
    let name = upload_name("", &key);
    // The request messages are built before the clock starts.
    let chunk = std::env::var("KILN_BENCH_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MIB);
    let reqs = requests(&name, &data, chunk, 0, true);
    let gb = len as f64 / 1e9;
    let before = CpuSample::now();
    let t = Instant::now();
    let resp = send(&mut c, reqs).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cpu = CpuSample::now().since(&before);
    assert_eq!(resp.committed_size, len as i64);
    println!(
        "write 1 x 256 MiB in {chunk}-byte messages (windows: {windows}): {:.2} GB/s; \
         server {:.2} CPU-s/GB, whole process {:.2}",
        gb / secs,
        cpu.server / gb,
        cpu.process / gb
    );

    if std::env::var("KILN_BENCH_WRITE_ONLY").is_ok() {
        return;
    }
    let conc = 4;
    let before = CpuSample::now();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let mut c = server.client();
        let name = read_name("", &key);
        tasks.push(tokio::spawn(async move {
            let req = ReadRequest {
                resource_name: name,
                read_offset: 0,
                read_limit: 0,
            };
            let mut stream = c.read(req).await.unwrap().into_inner();
            let mut n = 0usize;
            while let Some(m) = stream.message().await.unwrap() {
                n += m.data.len();
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = CpuSample::now().since(&before);
    assert_eq!(total, conc * len);
    let gb = total as f64 / 1e9;
    println!(
        "read {conc} x 256 MiB (windows: {windows}): {:.2} GB/s; server {:.2} CPU-s/GB, whole process {:.2}",
        gb / secs,
        cpu.server / gb,
        cpu.process / gb
    );
}

/// CPU seconds (user + system) of the whole process and of the server's threads.
struct CpuSample {
    process: f64,
    server: f64,
}

impl CpuSample {
    fn now() -> CpuSample {
        let mut server = 0.0;
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for task in dir.flatten() {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                if stat.contains(&format!("({SERVER_THREAD})")) {
                    server += stat_cpu(&stat);
                }
            }
        }
        let process = stat_cpu(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default());
        CpuSample { process, server }
    }

    fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            process: self.process - earlier.process,
            server: self.server - earlier.server,
        }
    }
}

/// utime + stime of a /proc stat line, in seconds (100 ticks per second).
fn stat_cpu(stat: &str) -> f64 {
    let after = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of the line (utime, stime) are 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}
