//! `GET /metrics` on the real binary, over real gRPC:
//!
//! * a known cache workload moves the per-method gRPC counters and the
//!   cache counters (AC hits/misses/updates, CAS found/missing, blobs and
//!   bytes read and written) by exactly its calls, and the store gauges
//!   match what was stored;
//! * a known execution workload (an in-process sandboxed worker) moves the
//!   Execute cache counters, the action outcome counters, the queue-wait,
//!   execution and worker-phase histograms and the worker's local cache
//!   counters by exactly its actions, and a queued action shows in the
//!   per-platform queue depth;
//! * a remote `kiln worker` process reports its local cache counters over
//!   the wire protocol (heartbeats) just the same;
//! * `[server] metrics = false` turns `/metrics` off.

mod common;

use std::time::{Duration, Instant};

use common::{KilnProcess, MEMORY_CONFIG, WorkerProcess, digest_of, upload_blobs};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{CancelOperationRequest, Operation, operation};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::command::EnvironmentVariable;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::platform::Property;
use kiln_proto::reapi::{
    Action, ActionResult, BatchReadBlobsRequest, Command, Digest, Directory, ExecuteOperationMetadata,
    ExecuteRequest, ExecuteResponse, FileNode, FindMissingBlobsRequest, GetActionResultRequest, Platform,
    UpdateActionResultRequest,
};
use prost::Message;
use tonic::transport::Channel;

const F: DigestFunction = DigestFunction::Sha256;

const CAS: &str = "build.bazel.remote.execution.v2.ContentAddressableStorage";
const AC: &str = "build.bazel.remote.execution.v2.ActionCache";
const EXEC: &str = "build.bazel.remote.execution.v2.Execution";

/// The value of the sample `series` (name plus labels exactly as encoded).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The value of `series`, failing the test when it is absent.
fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn metrics(kiln: &KilnProcess) -> String {
    let (status, text) = kiln.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    text
}

async fn find_missing(cas: &mut ContentAddressableStorageClient<Channel>, digests: Vec<Digest>) -> usize {
    cas.find_missing_blobs(FindMissingBlobsRequest {
        blob_digests: digests,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .missing_blob_digests
    .len()
}

#[tokio::test]
async fn metrics_count_a_known_cache_workload() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::with_config(dir.path(), MEMORY_CONFIG);
    let channel = kiln.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut ac = ActionCacheClient::new(channel.clone());
    let mut bs = ByteStreamClient::new(channel);

    let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + 37 * usize::from(i)]).collect();
    let sizes: Vec<usize> = blobs.iter().map(Vec::len).collect();
    let total: usize = sizes.iter().sum();
    let digests: Vec<Digest> = blobs.iter().map(|b| digest_of(b)).collect();
    let unknown: Vec<Digest> = (0..2u8).map(|i| digest_of(&[b'u', i])).collect();

    // 15 blobs asked about, all missing.
    for _ in 0..3 {
        assert_eq!(find_missing(&mut cas, digests.clone()).await, 5);
    }
    // 5 blobs stored; uploading one again stores nothing.
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    upload_blobs(&mut cas, &refs[..2]).await;
    upload_blobs(&mut cas, &refs[2..]).await;
    upload_blobs(&mut cas, &refs[..1]).await;
    // 5 found, 2 missing.
    let mut asked = digests.clone();
    asked.extend(unknown.clone());
    assert_eq!(find_missing(&mut cas, asked).await, 2);
    // BatchRead: 2 served, 1 missing.
    let read = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![digests[0].clone(), digests[1].clone(), unknown[0].clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = read
        .responses
        .iter()
        .map(|r| r.status.as_ref().map_or(0, |s| s.code))
        .collect();
    assert_eq!(codes, [0, 0, tonic::Code::NotFound as i32]);

    // ByteStream: one new blob written, read back, and one missing read.
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let big_key = BlobKey::of(F, &big);
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        big_key.hash_hex(),
        big.len()
    );
    let write = WriteRequest {
        resource_name: name,
        write_offset: 0,
        finish_write: true,
        data: big.clone(),
    };
    let written = bs
        .write(futures::stream::iter([write]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.committed_size, big.len() as i64);
    let mut stream = bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", big_key.hash_hex(), big.len()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(got, big);
    let absent = BlobKey::of(F, b"never uploaded");
    let err = match bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", absent.hash_hex(), absent.size()),
            ..Default::default()
        })
        .await
    {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.expect_err("a missing blob"),
    };
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Action Cache: one miss, one update, four hits.
    let miss = ac
        .get_action_result(GetActionResultRequest {
            action_digest: Some(digest_of(b"no such action")),
            ..Default::default()
        })
        .await
        .expect_err("an unknown action is a miss");
    assert_eq!(miss.code(), tonic::Code::NotFound);
    let action = digest_of(b"a known action");
    ac.update_action_result(UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(ActionResult {
            stdout_digest: Some(digests[2].clone()),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    for _ in 0..4 {
        ac.get_action_result(GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    let (head, text) = kiln.http_get_with_head("/metrics", "localhost");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let v = |series: &str| value(&text, series);

    // Per-method gRPC counters.
    assert_eq!(
        v(&format!(
            "kiln_grpc_requests_total{{method=\"{CAS}/FindMissingBlobs\"}}"
        )),
        4.0
    );
    assert_eq!(
        v(&format!(
            "kiln_grpc_requests_total{{method=\"{CAS}/BatchUpdateBlobs\"}}"
        )),
        3.0
    );
    assert_eq!(
        v(&format!(
            "kiln_grpc_requests_total{{method=\"{AC}/GetActionResult\"}}"
        )),
        5.0
    );
    assert_eq!(
        v(&format!(
            "kiln_grpc_errors_total{{method=\"{AC}/GetActionResult\",code=\"NotFound\"}}"
        )),
        1.0
    );
    assert_eq!(
        v("kiln_grpc_errors_total{method=\"google.bytestream.ByteStream/Read\",code=\"NotFound\"}"),
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
        4.0
    );

    // Cache counters.
    assert_eq!(v("kiln_ac_lookups_total{result=\"hit\"}"), 4.0);
    assert_eq!(v("kiln_ac_lookups_total{result=\"miss\"}"), 1.0);
    assert_eq!(v("kiln_ac_updates_total"), 1.0);
    // FindMissing 5 + BatchRead 2 + ByteStream 1 found; 15 + 2 + 1 + 1 missing.
    assert_eq!(v("kiln_cas_lookups_total{result=\"found\"}"), 8.0);
    assert_eq!(v("kiln_cas_lookups_total{result=\"missing\"}"), 19.0);
    assert_eq!(v("kiln_cas_blobs_total{direction=\"read\"}"), 3.0);
    assert_eq!(
        v("kiln_cas_bytes_total{direction=\"read\"}"),
        (sizes[0] + sizes[1] + big.len()) as f64
    );
    assert_eq!(v("kiln_cas_blobs_total{direction=\"written\"}"), 6.0);
    assert_eq!(
        v("kiln_cas_bytes_total{direction=\"written\"}"),
        (total + big.len()) as f64
    );

    // Store gauges.
    assert_eq!(v("kiln_store_items{store=\"cas\"}"), 6.0);
    assert_eq!(v("kiln_store_bytes{store=\"cas\"}"), (total + big.len()) as f64);
    assert_eq!(
        v("kiln_store_capacity_bytes{store=\"cas\"}"),
        (64u64 << 20) as f64
    );
    assert_eq!(v("kiln_store_evictions_total{store=\"cas\"}"), 0.0);
    assert_eq!(v("kiln_store_items{store=\"ac\"}"), 1.0);
    // Every blob was stored since the test started.
    let oldest = v("kiln_store_oldest_age_seconds{store=\"cas\"}");
    assert!(
        (0.0..=started.elapsed().as_secs_f64() + 1.0).contains(&oldest),
        "oldest blob age {oldest}"
    );
    // No scheduler configured: no scheduler or action metrics.
    assert!(!text.contains("kiln_scheduler_"), "{text}");
    assert!(!text.contains("kiln_action"), "{text}");

    // A second scrape sees the same counters: scraping moves nothing.
    let again = metrics(&kiln);
    for series in [
        format!("kiln_grpc_requests_total{{method=\"{CAS}/FindMissingBlobs\"}}"),
        "kiln_cas_lookups_total{result=\"missing\"}".to_string(),
        "kiln_ac_lookups_total{result=\"hit\"}".to_string(),
    ] {
        assert_eq!(sample(&again, &series), sample(&text, &series), "{series}");
    }
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::with_config(dir.path(), &format!("[server]\nmetrics = false\n{MEMORY_CONFIG}"));
    let mut cas = ContentAddressableStorageClient::new(kiln.channel().await);
    assert_eq!(find_missing(&mut cas, vec![digest_of(b"x")]).await, 1);
    let (status, body) = kiln.http_get("/metrics");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("metrics = false"), "{body}");
    // The rest of the HTTP port still works.
    assert_eq!(kiln.http_get("/healthz").0, 200);
}

// ---------------------------------------------------------------------------
// Execution.

const WORKER: &str = "metrics-worker";

/// A scheduler, one in-process sandboxed worker with one slot, heartbeats
/// every 200 ms (so the worker's local cache counters arrive quickly).
fn exec_config() -> String {
    format!(
        r#"{MEMORY_CONFIG}
[scheduler]
heartbeat_interval = "200ms"
heartbeat_timeout = "10s"
max_action_timeout = "1m"

[[workers]]
name = "{WORKER}"
slots = 1
"#
    )
}

fn linux() -> Platform {
    Platform {
        properties: vec![Property {
            name: "OSFamily".into(),
            value: "Linux".into(),
        }],
    }
}

/// Uploads a Command running `script` (made unique by `nonce`) over the
/// input root `root`, and its Action; returns the action digest.
async fn action(
    cas: &mut ContentAddressableStorageClient<Channel>,
    script: &str,
    nonce: &str,
    root: &Digest,
) -> Digest {
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![EnvironmentVariable {
            name: "KILN_TEST_NONCE".into(),
            value: nonce.into(),
        }],
        output_paths: vec!["out".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let action = Action {
        command_digest: Some(digest_of(&command)),
        input_root_digest: Some(root.clone()),
        platform: Some(linux()),
        ..Default::default()
    }
    .encode_to_vec();
    upload_blobs(cas, &[&command, &action]).await;
    digest_of(&action)
}

fn stage(op: &Operation) -> Stage {
    let md = op
        .metadata
        .as_ref()
        .map(|a| ExecuteOperationMetadata::decode(a.value.as_slice()).unwrap())
        .unwrap_or_default();
    Stage::try_from(md.stage).unwrap_or(Stage::Unknown)
}

fn response_of(op: &Operation) -> ExecuteResponse {
    match &op.result {
        Some(operation::Result::Response(any)) => ExecuteResponse::decode(any.value.as_slice()).unwrap(),
        other => panic!("done operation without a response: {other:?}"),
    }
}

async fn start_execute(exec: &mut ExecutionClient<Channel>, action: &Digest) -> tonic::Streaming<Operation> {
    exec.execute(ExecuteRequest {
        action_digest: Some(action.clone()),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Follows an Execute stream until an operation satisfies `until` (each
/// message within 60 s, at most 1000 messages).
async fn follow(stream: &mut tonic::Streaming<Operation>, until: impl Fn(&Operation) -> bool) -> Operation {
    for _ in 0..1000 {
        let op = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("the operation stream stalled for 60 s")
            .unwrap()
            .expect("the stream ended early");
        if until(&op) {
            return op;
        }
    }
    panic!("too many operation updates");
}

/// Executes `action` to the end; returns the response.
async fn execute(exec: &mut ExecutionClient<Channel>, action: &Digest) -> ExecuteResponse {
    let mut stream = start_execute(exec, action).await;
    let done = follow(&mut stream, |op| op.done).await;
    response_of(&done)
}

/// Scrapes until `ready` holds for the text (at most 20 s).
async fn scrape_until(kiln: &KilnProcess, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics(kiln);
        if ready(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "metrics never got there:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_count_a_known_execution_workload() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::with_config(dir.path(), &exec_config());
    let channel = kiln.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut exec = ExecutionClient::new(channel.clone());

    // The worker registers (and heartbeats) on its own.
    scrape_until(&kiln, |t| {
        sample(t, "kiln_scheduler_connected_workers") == Some(1.0)
    })
    .await;

    // One input file shared by every action.
    let input: Vec<u8> = (0..1234u32).map(|i| (i % 97) as u8 + b' ').collect();
    let root = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(digest_of(&input)),
            is_executable: false,
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    upload_blobs(&mut cas, &[&input, &root]).await;
    let root = digest_of(&root);
    let nonce = uuid::Uuid::new_v4().to_string();
    let mut actions = Vec::new();
    for i in 0..3 {
        actions.push(action(&mut cas, "cat in.txt > out", &format!("{nonce}-{i}"), &root).await);
    }

    // A runs (AC miss), A again is a cache hit, B and C run: one after the
    // other, so that A fetches the input and B and C find it cached.
    let first = execute(&mut exec, &actions[0]).await;
    assert!(!first.cached_result);
    assert_eq!(first.result.as_ref().map(|r| r.exit_code), Some(0), "{first:?}");
    let again = execute(&mut exec, &actions[0]).await;
    assert!(again.cached_result);
    for a in &actions[1..] {
        let r = execute(&mut exec, a).await;
        assert!(!r.cached_result);
        assert_eq!(r.result.as_ref().map(|r| r.exit_code), Some(0), "{r:?}");
    }

    // Completions are observed just after clients hear of them, and the
    // worker's counters arrive with its next heartbeat: wait for both.
    let cache_series = |name: &str| format!("kiln_worker_local_cache_{name}_total{{worker=\"{WORKER}\"}}");
    let text = scrape_until(&kiln, |t| {
        let blobs = sample(t, &cache_series("misses")).unwrap_or(0.0)
            + sample(t, &cache_series("hits")).unwrap_or(0.0);
        blobs >= 3.0 && sample(t, "kiln_actions_total{outcome=\"success\"}") >= Some(3.0)
    })
    .await;
    let v = |series: &str| value(&text, series);
    assert_eq!(
        v(&format!("kiln_grpc_requests_total{{method=\"{EXEC}/Execute\"}}")),
        4.0
    );
    assert_eq!(v("kiln_ac_lookups_total{result=\"hit\"}"), 1.0);
    assert_eq!(v("kiln_ac_lookups_total{result=\"miss\"}"), 3.0);
    assert_eq!(v("kiln_actions_total{outcome=\"cached\"}"), 1.0);
    assert_eq!(v("kiln_actions_total{outcome=\"success\"}"), 3.0);
    assert_eq!(v("kiln_action_queue_wait_seconds_count"), 3.0);
    assert_eq!(v("kiln_action_execution_seconds_count"), 3.0);
    for phase in ["fetch", "execute", "upload"] {
        assert_eq!(
            v(&format!(
                "kiln_worker_phase_seconds_count{{worker=\"{WORKER}\",phase=\"{phase}\"}}"
            )),
            3.0,
            "{phase}"
        );
    }
    // The input was fetched once, then found in the worker's local cache.
    assert_eq!(v(&cache_series("misses")), 1.0);
    assert_eq!(v(&cache_series("miss_bytes")), input.len() as f64);
    assert_eq!(v(&cache_series("hits")), 2.0);
    assert_eq!(v(&cache_series("hit_bytes")), 2.0 * input.len() as f64);
    assert_eq!(v("kiln_scheduler_slots"), 1.0);
    assert_eq!(v("kiln_scheduler_busy_slots"), 0.0);
    assert_eq!(v("kiln_scheduler_queued"), 0.0);

    // Queue: a long action takes the only slot; the next one waits.
    let sleeper = action(&mut cas, "sleep 59.4242", &format!("{nonce}-sleep"), &root).await;
    let waiting = action(&mut cas, "cat in.txt > out", &format!("{nonce}-wait"), &root).await;
    let mut sleeping = start_execute(&mut exec, &sleeper).await;
    let running = follow(&mut sleeping, |op| stage(op) == Stage::Executing || op.done).await;
    assert!(!running.done, "{running:?}");
    let mut queued = start_execute(&mut exec, &waiting).await;
    let q = follow(&mut queued, |op| stage(op) == Stage::Queued || op.done).await;
    assert!(!q.done, "{q:?}");
    let text = scrape_until(&kiln, |t| sample(t, "kiln_scheduler_queued") == Some(1.0)).await;
    assert_eq!(
        value(&text, "kiln_scheduler_queue_depth{platform=\"OSFamily=Linux\"}"),
        1.0
    );
    assert_eq!(value(&text, "kiln_scheduler_executing"), 1.0);
    assert_eq!(value(&text, "kiln_scheduler_busy_slots"), 1.0);

    // Cancel both so that no sleep outlives the test.
    let mut ops = OperationsClient::new(channel);
    for op in [&q, &running] {
        ops.cancel_operation(CancelOperationRequest {
            name: op.name.clone(),
        })
        .await
        .unwrap();
    }
    for stream in [&mut queued, &mut sleeping] {
        let done = follow(stream, |op| op.done).await;
        let status = response_of(&done).status.map_or(0, |s| s.code);
        assert_eq!(status, tonic::Code::Cancelled as i32, "{done:?}");
    }
    let text = scrape_until(&kiln, |t| sample(t, "kiln_scheduler_busy_slots") == Some(0.0)).await;
    assert_eq!(
        sample(&text, "kiln_scheduler_queue_depth{platform=\"OSFamily=Linux\"}"),
        None,
        "an empty queue has no depth sample"
    );
}

#[tokio::test]
async fn remote_workers_report_their_local_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{MEMORY_CONFIG}
[scheduler]
heartbeat_interval = "200ms"
heartbeat_timeout = "10s"
max_action_timeout = "1m"
"#
    );
    let kiln = KilnProcess::with_config(dir.path(), &config);
    let name = "remote-metrics-worker";
    let _worker = WorkerProcess::start(kiln.grpc, dir.path(), name, 1, "");
    let channel = kiln.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut exec = ExecutionClient::new(channel);

    let input = b"an input of a remote action".to_vec();
    let root = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(digest_of(&input)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    upload_blobs(&mut cas, &[&input, &root]).await;
    let root = digest_of(&root);
    let nonce = uuid::Uuid::new_v4().to_string();
    for i in 0..2 {
        let a = action(&mut cas, "cat in.txt > out", &format!("{nonce}-{i}"), &root).await;
        let r = execute(&mut exec, &a).await;
        assert_eq!(r.result.as_ref().map(|r| r.exit_code), Some(0), "{r:?}");
    }
    let series = |what: &str| format!("kiln_worker_local_cache_{what}_total{{worker=\"{name}\"}}");
    let text = scrape_until(&kiln, |t| sample(t, &series("hits")) == Some(1.0)).await;
    assert_eq!(value(&text, &series("misses")), 1.0);
    assert_eq!(value(&text, &series("miss_bytes")), input.len() as f64);
    assert_eq!(value(&text, &series("hit_bytes")), input.len() as f64);
    assert_eq!(
        value(
            &text,
            &format!("kiln_worker_phase_seconds_count{{worker=\"{name}\",phase=\"fetch\"}}")
        ),
        2.0
    );
}
