//! `GET /metrics` on the real binary: a known gRPC workload moves the
//! per-method counters by exactly its calls, errors are counted with their
//! status code, and the store gauges match what was stored.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::KilnProcess;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::batch_update_blobs_request::Request as UpdateItem;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{BatchUpdateBlobsRequest, FindMissingBlobsRequest, GetActionResultRequest};

const CONFIG: &str = r#"
[stores.cas.memory]
capacity = "64 MiB"

[stores.ac.memory]
capacity = "16 MiB"

[[instances]]
name = ""
cas = "cas"
ac = "ac"
"#;

const CAS: &str = "build.bazel.remote.execution.v2.ContentAddressableStorage";
const AC: &str = "build.bazel.remote.execution.v2.ActionCache";

/// The value of the sample `series` (name plus labels exactly as encoded).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Raw GET returning the response head and body, to check headers.
fn get_with_head(kiln: &KilnProcess, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(kiln.http).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

#[tokio::test]
async fn metrics_count_a_known_workload() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::with_config(dir.path(), CONFIG);
    let channel = kiln.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut ac = ActionCacheClient::new(channel);

    let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + 37 * usize::from(i)]).collect();
    let total: usize = blobs.iter().map(Vec::len).sum();
    let keys: Vec<BlobKey> = blobs
        .iter()
        .map(|b| BlobKey::of(DigestFunction::Sha256, b))
        .collect();

    for _ in 0..3 {
        cas.find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: keys.iter().map(BlobKey::to_digest).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for chunk in [&blobs[..2], &blobs[2..]] {
        let resp = cas
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests: chunk
                    .iter()
                    .map(|b| UpdateItem {
                        digest: Some(BlobKey::of(DigestFunction::Sha256, b).to_digest()),
                        data: b.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in resp.responses {
            assert_eq!(r.status.map(|s| s.code).unwrap_or(0), 0);
        }
    }
    let miss = ac
        .get_action_result(GetActionResultRequest {
            action_digest: Some(BlobKey::of(DigestFunction::Sha256, b"no such action").to_digest()),
            ..Default::default()
        })
        .await
        .expect_err("an unknown action is a miss");
    assert_eq!(miss.code(), tonic::Code::NotFound);

    let (head, text) = get_with_head(&kiln, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    let v = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert_eq!(
        v(&format!(
            "kiln_grpc_requests_total{{method=\"{CAS}/FindMissingBlobs\"}}"
        )),
        3.0
    );
    assert_eq!(
        v(&format!(
            "kiln_grpc_requests_total{{method=\"{CAS}/BatchUpdateBlobs\"}}"
        )),
        2.0
    );
    assert_eq!(
        v(&format!(
            "kiln_grpc_requests_total{{method=\"{AC}/GetActionResult\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "kiln_grpc_errors_total{{method=\"{AC}/GetActionResult\",code=\"NotFound\"}}"
        )),
        1.0
    );
    // Successful calls are not errors.
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("kiln_grpc_errors_total") && l.contains("FindMissingBlobs")),
        "{text}"
    );
    assert_eq!(
        v(&format!(
            "kiln_grpc_request_duration_seconds_count{{method=\"{CAS}/FindMissingBlobs\"}}"
        )),
        3.0
    );
    assert_eq!(v("kiln_store_items{store=\"cas\"}"), 5.0);
    assert_eq!(v("kiln_store_bytes{store=\"cas\"}"), total as f64);
    assert_eq!(
        v("kiln_store_capacity_bytes{store=\"cas\"}"),
        (64u64 << 20) as f64
    );
    assert_eq!(v("kiln_store_evictions_total{store=\"cas\"}"), 0.0);
    assert_eq!(v("kiln_store_items{store=\"ac\"}"), 0.0);
    assert!(sample(&text, "kiln_store_oldest_age_seconds{store=\"cas\"}").is_some());
    // No scheduler configured: no scheduler metrics.
    assert!(!text.contains("kiln_scheduler_"), "{text}");

    // A second scrape sees the same counters: scraping moves nothing.
    let (_, again) = get_with_head(&kiln, "/metrics");
    assert_eq!(
        sample(
            &again,
            &format!("kiln_grpc_requests_total{{method=\"{CAS}/FindMissingBlobs\"}}")
        ),
        Some(3.0)
    );
}
