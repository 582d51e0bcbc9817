//! Remote execution end to end with real processes: a `kiln serve` process
//! with a `[scheduler]` and no in-process workers, and one or two
//! `kiln worker` processes (sandbox on), driven over real gRPC with the
//! REAPI clients. Each test has its own server, workers, temporary
//! directories and ports, so the tests run in parallel.
//!
//! Observing "ran once" / "ran again": the actions print a fresh random
//! UUID read from `/proc/sys/kernel/random/uuid` (the sandbox shows the
//! host's /proc read-only), so two executions never print the same thing.
//! Observing "the process is gone": the actions run `sleep` with a unique
//! argument such as `1000.123456789`, which the test looks for in the host's
//! process table (processes of the sandbox's PID namespace are visible
//! there).

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{KilnProcess, WorkerProcess, digest_of, processes_with};
use kiln_digest::DigestFunction;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{CancelOperationRequest, GetOperationRequest, Operation, operation};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::command::EnvironmentVariable;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::platform::Property;
use kiln_proto::reapi::{
    Action, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Command, Digest, Directory,
    ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, FileNode, FindMissingBlobsRequest,
    GetActionResultRequest, Platform, WaitExecutionRequest, batch_update_blobs_request,
};
use prost::Message;
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

const F: DigestFunction = DigestFunction::Sha256;

/// Bound of every test body.
const TEST_LIMIT: Duration = Duration::from_secs(50);

// ---------------------------------------------------------------------------
// google.rpc.PreconditionFailure, decoded independently of the server's code.

#[derive(Clone, PartialEq, Message)]
struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    violations: Vec<Violation>,
}

#[derive(Clone, PartialEq, Message)]
struct Violation {
    #[prost(string, tag = "1")]
    r#type: String,
    #[prost(string, tag = "2")]
    subject: String,
    #[prost(string, tag = "3")]
    description: String,
}

const PRECONDITION_FAILURE_URL: &str = "type.googleapis.com/google.rpc.PreconditionFailure";

// ---------------------------------------------------------------------------
// The rig: one server process and its worker processes.

/// Fields drop in order: workers first, the server next, the directory last.
struct Rig {
    workers: Vec<WorkerProcess>,
    channel: Channel,
    server: KilnProcess,
    dir: TempDir,
}

impl Rig {
    /// A server with a scheduler (heartbeats every 500 ms, a worker silent
    /// for 2 s is lost, `no_worker_wait` as given) and the named workers
    /// (2 slots each), all registered.
    async fn start(workers: &[&str], no_worker_wait: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"
[stores.cas.memory]
capacity = "256 MiB"

[stores.ac.memory]
capacity = "16 MiB"

[[instances]]
cas = "cas"
ac = "ac"

[scheduler]
heartbeat_interval = "500ms"
heartbeat_timeout = "2s"
no_worker_wait = "{no_worker_wait}"
lease_grace = "5s"
max_action_timeout = "1m"
"#
        );
        let server = KilnProcess::with_config(dir.path(), &config);
        let channel = server.channel().await;
        let mut rig = Rig {
            workers: Vec::new(),
            channel,
            server,
            dir,
        };
        for name in workers {
            rig.start_worker(name);
        }
        rig
    }

    fn start_worker(&mut self, name: &str) {
        let w = WorkerProcess::start(self.server.grpc, self.dir.path(), name, 2, "");
        self.workers.push(w);
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
    }

    fn exec(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel.clone())
    }

    fn ops(&self) -> OperationsClient<Channel> {
        OperationsClient::new(self.channel.clone())
    }

    async fn upload(&self, blobs: &[Vec<u8>]) -> Vec<Digest> {
        let requests: Vec<_> = blobs
            .iter()
            .map(|b| batch_update_blobs_request::Request {
                digest: Some(digest_of(b)),
                data: b.clone(),
                compressor: 0,
            })
            .collect();
        let digests = requests.iter().map(|r| r.digest.clone().unwrap()).collect();
        let resp = self
            .cas()
            .batch_update_blobs(BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests,
                digest_function: F.to_proto() as i32,
            })
            .await
            .unwrap()
            .into_inner();
        for r in resp.responses {
            assert_eq!(r.status.map(|s| s.code).unwrap_or(0), 0, "upload failed");
        }
        digests
    }

    async fn read_blob(&self, d: &Digest) -> Vec<u8> {
        let resp = self
            .cas()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: String::new(),
                digests: vec![d.clone()],
                acceptable_compressors: vec![],
                digest_function: F.to_proto() as i32,
            })
            .await
            .unwrap()
            .into_inner();
        let r = resp.responses.into_iter().next().unwrap();
        assert_eq!(r.status.map(|s| s.code).unwrap_or(0), 0, "blob {d:?} missing");
        r.data
    }

    /// Which of `digests` the CAS lacks.
    async fn missing(&self, digests: Vec<Digest>) -> Vec<Digest> {
        self.cas()
            .find_missing_blobs(FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: digests,
                digest_function: F.to_proto() as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests
    }

    /// Uploads `command`, an empty input root and the Action built by
    /// `tweak`; returns the action digest.
    async fn action(&self, command: &Command, tweak: impl FnOnce(&mut Action)) -> Digest {
        let root = Directory::default().encode_to_vec();
        let cmd = command.encode_to_vec();
        let digests = self.upload(&[cmd, root]).await;
        let mut action = Action {
            command_digest: Some(digests[0].clone()),
            input_root_digest: Some(digests[1].clone()),
            timeout: Some(kiln_proto::protobuf::Duration {
                seconds: 30,
                nanos: 0,
            }),
            ..Default::default()
        };
        tweak(&mut action);
        self.upload(&[action.encode_to_vec()]).await.remove(0)
    }

    async fn execute(
        &self,
        action: &Digest,
        skip_cache_lookup: bool,
    ) -> Result<tonic::Streaming<Operation>, tonic::Status> {
        self.exec()
            .execute(ExecuteRequest {
                action_digest: Some(action.clone()),
                skip_cache_lookup,
                digest_function: F.to_proto() as i32,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Execute and follow the stream to the end.
    async fn run(&self, action: &Digest, skip_cache_lookup: bool) -> Result<Outcome, tonic::Status> {
        let stream = self.execute(action, skip_cache_lookup).await?;
        finish(stream).await
    }

    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult, tonic::Status> {
        ActionCacheClient::new(self.channel.clone())
            .get_action_result(GetActionResultRequest {
                action_digest: Some(action.clone()),
                digest_function: F.to_proto() as i32,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// The action's stdout, from the CAS (or inlined).
    async fn stdout(&self, resp: &ExecuteResponse) -> String {
        let r = resp.result.as_ref().expect("no ActionResult");
        let bytes = match &r.stdout_digest {
            Some(d) => self.read_blob(d).await,
            None => r.stdout_raw.clone(),
        };
        String::from_utf8(bytes).unwrap()
    }
}

/// What one Execute stream delivered.
struct Outcome {
    /// Every operation message, in order.
    ops: Vec<Operation>,
    response: ExecuteResponse,
}

impl Outcome {
    fn name(&self) -> &str {
        &self.ops.last().unwrap().name
    }

    fn code(&self) -> Code {
        code_of(&self.response)
    }

    fn result(&self) -> &ActionResult {
        self.response.result.as_ref().expect("no ActionResult")
    }

    fn exit_code(&self) -> i32 {
        self.result().exit_code
    }

    fn worker(&self) -> String {
        self.result()
            .execution_metadata
            .as_ref()
            .map(|m| m.worker.clone())
            .unwrap_or_default()
    }

    fn worker_start(&self) -> (i64, i32) {
        let t = self
            .result()
            .execution_metadata
            .as_ref()
            .and_then(|m| m.worker_start_timestamp)
            .expect("worker_start_timestamp");
        (t.seconds, t.nanos)
    }
}

fn code_of(resp: &ExecuteResponse) -> Code {
    Code::from_i32(resp.status.as_ref().map(|s| s.code).unwrap_or(0))
}

fn stage(op: &Operation) -> Stage {
    let md = op.metadata.as_ref().expect("operation without metadata");
    let md = ExecuteOperationMetadata::decode(md.value.as_slice()).unwrap();
    Stage::try_from(md.stage).unwrap()
}

fn response_of(op: &Operation) -> ExecuteResponse {
    assert!(op.done, "operation not done");
    match &op.result {
        Some(operation::Result::Response(any)) => ExecuteResponse::decode(any.value.as_slice()).unwrap(),
        other => panic!("done operation without a response: {other:?}"),
    }
}

/// Next message of an Execute stream (at most 30 s); `None` at its end.
async fn next(stream: &mut tonic::Streaming<Operation>) -> Result<Option<Operation>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the operation stream stalled for 30 s")
}

/// Follows a stream until its done operation. Checks the stream's
/// invariants: `done` exactly at COMPLETED, the response only then, and
/// nothing after it.
async fn finish(mut stream: tonic::Streaming<Operation>) -> Result<Outcome, tonic::Status> {
    let mut ops = Vec::new();
    for _ in 0..1000 {
        let Some(op) = next(&mut stream).await? else {
            panic!("the stream ended before the operation was done: {ops:?}");
        };
        assert_eq!(op.done, stage(&op) == Stage::Completed, "{op:?}");
        let done = op.done;
        if !done {
            assert!(op.result.is_none(), "result before done: {op:?}");
        }
        ops.push(op);
        if done {
            let response = response_of(ops.last().unwrap());
            assert!(next(&mut stream).await?.is_none(), "messages after done");
            return Ok(Outcome { ops, response });
        }
    }
    panic!("more than 1000 operation messages");
}

/// Reads the stream until the operation is EXECUTING; returns its name.
async fn until_executing(stream: &mut tonic::Streaming<Operation>) -> String {
    for _ in 0..1000 {
        let op = next(stream)
            .await
            .expect("stream error")
            .expect("stream ended before EXECUTING");
        assert!(!op.done, "completed before we saw it executing: {op:?}");
        if stage(&op) == Stage::Executing {
            return op.name;
        }
    }
    panic!("never EXECUTING");
}

fn env_path() -> Vec<EnvironmentVariable> {
    vec![EnvironmentVariable {
        name: "PATH".into(),
        value: "/usr/local/bin:/usr/bin:/bin".into(),
    }]
}

/// `/bin/sh -c SCRIPT` with PATH set.
fn sh(script: &str) -> Command {
    Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: env_path(),
        ..Default::default()
    }
}

/// Prints a random UUID: different at every execution.
const PRINT_UUID: &str = "cat /proc/sys/kernel/random/uuid";

/// A `sleep` argument no other process on the machine has.
fn marker() -> String {
    format!("1000.{:09}", rand::random::<u32>() % 1_000_000_000)
}

/// Waits (at most `limit`) until `cond` holds, polling every 20 ms.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn props(pairs: &[(&str, &str)]) -> Platform {
    Platform {
        properties: pairs
            .iter()
            .map(|(n, v)| Property {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test exceeded its time limit");
}

// ---------------------------------------------------------------------------

/// Four concurrent Executes of one cacheable action: it runs once, every
/// caller gets that one execution's result (same random output, same
/// worker start time), none of them as a cache hit. A later Execute with
/// skip_cache_lookup runs it again (so the output would differ if the
/// action had run more than once).
#[tokio::test]
async fn concurrent_identical_executes_run_once() {
    bounded(async {
        let rig = Rig::start(&["dedup-a"], "10s").await;
        let action = rig.action(&sh(&format!("sleep 1; {PRINT_UUID}")), |_| {}).await;
        let runs = (0..4).map(|_| rig.run(&action, false));
        let outcomes: Vec<Outcome> = futures::future::join_all(runs)
            .await
            .into_iter()
            .map(|r| r.expect("Execute failed"))
            .collect();
        let mut names = Vec::new();
        let mut outputs = Vec::new();
        let mut starts = Vec::new();
        for o in &outcomes {
            assert_eq!(o.code(), Code::Ok, "{:?}", o.response.status);
            assert_eq!(o.exit_code(), 0);
            assert!(
                !o.response.cached_result,
                "a caller got a cache hit: the calls did not overlap"
            );
            assert_eq!(o.worker(), "dedup-a");
            names.push(o.name().to_string());
            outputs.push(rig.stdout(&o.response).await);
            starts.push(o.worker_start());
        }
        assert!(outputs[0].trim().len() == 36, "not a uuid: {:?}", outputs[0]);
        assert!(
            outputs.iter().all(|o| *o == outputs[0]),
            "ran more than once: {outputs:?}"
        );
        assert!(
            starts.iter().all(|s| *s == starts[0]),
            "ran more than once: {starts:?}"
        );
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 4, "every caller has its own operation");

        let again = rig.run(&action, true).await.unwrap();
        assert_eq!(again.code(), Code::Ok);
        assert!(!again.response.cached_result);
        assert_ne!(rig.stdout(&again.response).await, outputs[0]);
        assert_ne!(again.worker_start(), starts[0]);
    })
    .await;
}

/// A non-zero exit is returned but not written to the Action Cache, so a
/// second Execute (cache lookup allowed) runs the action again.
#[tokio::test]
async fn non_zero_exit_is_not_cached() {
    bounded(async {
        let rig = Rig::start(&["nonzero-a"], "10s").await;
        let action = rig.action(&sh(&format!("{PRINT_UUID}; exit 3")), |_| {}).await;
        let first = rig.run(&action, false).await.unwrap();
        assert_eq!(first.code(), Code::Ok, "{:?}", first.response.status);
        assert_eq!(first.exit_code(), 3);
        let out1 = rig.stdout(&first.response).await;

        let err = rig.get_action_result(&action).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");

        let second = rig.run(&action, false).await.unwrap();
        assert!(!second.response.cached_result);
        assert_eq!(second.exit_code(), 3);
        let out2 = rig.stdout(&second.response).await;
        assert_ne!(out1, out2, "the second Execute did not run the action");
        assert_eq!(
            rig.get_action_result(&action).await.unwrap_err().code(),
            Code::NotFound
        );
    })
    .await;
}

/// do_not_cache: never written to the AC, never served from it, and
/// identical concurrent Executes are not merged. skip_cache_lookup: a
/// cached action runs again, and its new result replaces the cached one.
#[tokio::test]
async fn do_not_cache_and_skip_cache_lookup() {
    bounded(async {
        let rig = Rig::start(&["nocache-a"], "10s").await;

        // do_not_cache.
        let uncached = rig
            .action(&sh(&format!("sleep 0.5; {PRINT_UUID}")), |a| {
                a.do_not_cache = true
            })
            .await;
        let (a, b) = tokio::join!(rig.run(&uncached, false), rig.run(&uncached, false));
        let (a, b) = (a.unwrap(), b.unwrap());
        for o in [&a, &b] {
            assert_eq!(o.code(), Code::Ok, "{:?}", o.response.status);
            assert_eq!(o.exit_code(), 0);
            assert!(!o.response.cached_result);
        }
        let (out_a, out_b) = (rig.stdout(&a.response).await, rig.stdout(&b.response).await);
        assert_ne!(out_a, out_b, "do_not_cache actions were merged");
        assert_eq!(
            rig.get_action_result(&uncached).await.unwrap_err().code(),
            Code::NotFound,
            "a do_not_cache result was written to the Action Cache"
        );
        let c = rig.run(&uncached, false).await.unwrap();
        assert!(!c.response.cached_result);
        let out_c = rig.stdout(&c.response).await;
        assert!(out_c != out_a && out_c != out_b);

        // skip_cache_lookup.
        let cached = rig.action(&sh(PRINT_UUID), |_| {}).await;
        let first = rig.run(&cached, false).await.unwrap();
        assert_eq!(first.exit_code(), 0);
        assert!(!first.response.cached_result);
        let out1 = rig.stdout(&first.response).await;
        let in_ac = rig.get_action_result(&cached).await.unwrap();
        assert_eq!(in_ac.stdout_digest, first.result().stdout_digest);

        let hit = rig.run(&cached, false).await.unwrap();
        assert!(hit.response.cached_result, "expected an AC hit");
        assert_eq!(hit.ops.len(), 1, "a cache hit is one completed operation");
        assert_eq!(rig.stdout(&hit.response).await, out1);

        let skipped = rig.run(&cached, true).await.unwrap();
        assert!(!skipped.response.cached_result);
        let out2 = rig.stdout(&skipped.response).await;
        assert_ne!(out2, out1, "skip_cache_lookup did not run the action");
        let in_ac = rig.get_action_result(&cached).await.unwrap();
        assert_eq!(
            in_ac.stdout_digest,
            skipped.result().stdout_digest,
            "the fresh result did not replace the cached one"
        );
    })
    .await;
}

/// Blobs listed in a google.rpc.Status's PreconditionFailure details.
fn missing_subjects(status: &kiln_proto::rpc::Status) -> Vec<String> {
    let mut out = Vec::new();
    for any in &status.details {
        if any.type_url == PRECONDITION_FAILURE_URL {
            let pf = PreconditionFailure::decode(any.value.as_slice()).unwrap();
            for v in pf.violations {
                assert_eq!(v.r#type, "MISSING", "{v:?}");
                out.push(v.subject);
            }
        }
    }
    out.sort();
    out
}

/// The FAILED_PRECONDITION of an Execute, whether it comes as the call's
/// gRPC status (with `grpc-status-details-bin`) or in the ExecuteResponse.
async fn precondition_failure(rig: &Rig, action: &Digest) -> kiln_proto::rpc::Status {
    match rig.run(action, false).await {
        Err(status) => {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert!(
                !status.details().is_empty(),
                "no grpc-status-details-bin: {status:?}"
            );
            let rpc = kiln_proto::rpc::Status::decode(status.details()).unwrap();
            assert_eq!(rpc.code, Code::FailedPrecondition as i32);
            rpc
        }
        Ok(outcome) => {
            assert_eq!(outcome.code(), Code::FailedPrecondition, "{:?}", outcome.response);
            outcome.response.status.unwrap()
        }
    }
}

fn subject(d: &Digest) -> String {
    format!("blobs/{}/{}", d.hash, d.size_bytes)
}

/// Inputs missing from the CAS: FAILED_PRECONDITION with one MISSING
/// violation per missing blob, `blobs/{hash}/{size}`; likewise for a
/// missing Action.
#[tokio::test]
async fn missing_inputs_are_failed_precondition_with_violations() {
    bounded(async {
        let rig = Rig::start(&["missing-a"], "10s").await;
        let present = b"uploaded".to_vec();
        let gone1 = b"never uploaded, one".to_vec();
        let gone2 = b"never uploaded, two".to_vec();
        let file = |name: &str, data: &[u8]| FileNode {
            name: name.into(),
            digest: Some(digest_of(data)),
            is_executable: false,
            node_properties: None,
        };
        let root = Directory {
            files: vec![file("a", &present), file("b", &gone1), file("c", &gone2)],
            ..Default::default()
        };
        let cmd = sh("cat a b c");
        let d = rig
            .upload(&[present.clone(), root.encode_to_vec(), cmd.encode_to_vec()])
            .await;
        let action = Action {
            command_digest: Some(d[2].clone()),
            input_root_digest: Some(d[1].clone()),
            ..Default::default()
        };
        let action_digest = rig.upload(&[action.encode_to_vec()]).await.remove(0);

        let status = precondition_failure(&rig, &action_digest).await;
        let mut expected = vec![subject(&digest_of(&gone1)), subject(&digest_of(&gone2))];
        expected.sort();
        assert_eq!(missing_subjects(&status), expected, "{status:?}");

        // After uploading them the same action runs.
        rig.upload(&[gone1.clone(), gone2.clone()]).await;
        let ok = rig.run(&action_digest, false).await.unwrap();
        assert_eq!(ok.code(), Code::Ok, "{:?}", ok.response.status);
        assert_eq!(ok.exit_code(), 0);
        let expected = [present, gone1, gone2].concat();
        assert_eq!(rig.stdout(&ok.response).await.as_bytes(), expected.as_slice());

        // A missing Action.
        let absent = digest_of(b"an action nobody uploaded");
        let status = precondition_failure(&rig, &absent).await;
        assert_eq!(missing_subjects(&status), vec![subject(&absent)], "{status:?}");
    })
    .await;
}

/// An action that outlives its timeout: DEADLINE_EXCEEDED, and its whole
/// process tree (the command and a daemonised grandchild) is gone.
#[tokio::test]
async fn timeout_is_deadline_exceeded_and_kills_the_process_tree() {
    bounded(async {
        let rig = Rig::start(&["timeout-a"], "10s").await;
        let (child, orphan) = (marker(), marker());
        let action = rig
            .action(&sh(&format!("(sleep {orphan} &); exec sleep {child}")), |a| {
                a.timeout = Some(kiln_proto::protobuf::Duration { seconds: 2, nanos: 0 })
            })
            .await;
        let started = Instant::now();
        let mut stream = rig.execute(&action, false).await.unwrap();
        until_executing(&mut stream).await;
        assert!(
            eventually(Duration::from_secs(10), || !processes_with(&child).is_empty()
                && !processes_with(&orphan).is_empty())
            .await,
            "the action's processes never appeared"
        );
        let outcome = finish(stream).await.unwrap();
        let took = started.elapsed();
        assert_eq!(
            outcome.code(),
            Code::DeadlineExceeded,
            "{:?}",
            outcome.response.status
        );
        assert!(took < Duration::from_secs(15), "timeout enforced late: {took:?}");
        assert!(
            eventually(Duration::from_secs(3), || processes_with(&child).is_empty()
                && processes_with(&orphan).is_empty())
            .await,
            "processes survived the timeout: {:?} {:?}",
            processes_with(&child),
            processes_with(&orphan)
        );
        // A timed-out action is not cached.
        assert_eq!(
            rig.get_action_result(&action).await.unwrap_err().code(),
            Code::NotFound
        );
    })
    .await;
}

/// CancelOperation on an executing action: the stream completes with
/// CANCELLED and the action's processes on the worker are gone.
#[tokio::test]
async fn cancel_operation_stops_the_process() {
    bounded(async {
        let rig = Rig::start(&["cancel-a"], "10s").await;
        let (child, orphan) = (marker(), marker());
        let action = rig
            .action(&sh(&format!("(sleep {orphan} &); exec sleep {child}")), |_| {})
            .await;
        let mut stream = rig.execute(&action, false).await.unwrap();
        let name = until_executing(&mut stream).await;
        assert!(
            eventually(Duration::from_secs(10), || !processes_with(&child).is_empty()
                && !processes_with(&orphan).is_empty())
            .await,
            "the action's processes never appeared"
        );
        let cancelled_at = Instant::now();
        rig.ops()
            .cancel_operation(CancelOperationRequest { name: name.clone() })
            .await
            .unwrap();
        let outcome = finish(stream).await.unwrap();
        assert_eq!(outcome.code(), Code::Cancelled, "{:?}", outcome.response.status);
        assert!(
            eventually(Duration::from_secs(5), || processes_with(&child).is_empty()
                && processes_with(&orphan).is_empty())
            .await,
            "processes survived the cancel: {:?} {:?}",
            processes_with(&child),
            processes_with(&orphan)
        );
        assert!(cancelled_at.elapsed() < Duration::from_secs(10));
        let op = rig
            .ops()
            .get_operation(GetOperationRequest { name })
            .await
            .unwrap()
            .into_inner();
        assert!(op.done);
        assert_eq!(code_of(&response_of(&op)), Code::Cancelled);
    })
    .await;
}

/// CancelOperation the instant the action's sandbox appears (while it is
/// still starting), repeatedly: every time, the processes are gone well
/// before the worker's last-resort SIGKILL of the sandbox helper
/// (kill_grace 500 ms + 5 s). Regression test: a SIGTERM reaching the
/// sandbox's init before init had installed its handler was dropped by
/// the kernel, and the action ran on for 5.5 s.
#[tokio::test]
async fn cancel_while_the_sandbox_starts_stops_the_action_promptly() {
    bounded(async {
        let rig = Rig::start(&["cancel-early-a"], "10s").await;
        for round in 0..8 {
            let m = marker();
            let action = rig.action(&sh(&format!("exec sleep {m}")), |_| {}).await;
            let mut stream = rig.execute(&action, false).await.unwrap();
            let name = until_executing(&mut stream).await;
            assert!(
                eventually(Duration::from_secs(10), || !processes_with(&m).is_empty()).await,
                "round {round}: the sandbox never appeared"
            );
            let cancelled_at = Instant::now();
            rig.ops()
                .cancel_operation(CancelOperationRequest { name })
                .await
                .unwrap();
            let outcome = finish(stream).await.unwrap();
            assert_eq!(outcome.code(), Code::Cancelled, "{:?}", outcome.response.status);
            assert!(
                eventually(Duration::from_secs(3), || processes_with(&m).is_empty()).await,
                "round {round}: the action outlived its cancel by {:?}: {:?}",
                cancelled_at.elapsed(),
                processes_with(&m)
            );
        }
    })
    .await;
}

/// Two callers share one executing action; one cancels its operation. The
/// other's operation is unaffected: the action keeps running (its process
/// is not killed) and completes for it.
#[tokio::test]
async fn cancelling_one_of_two_shared_operations_keeps_the_action_running() {
    bounded(async {
        let rig = Rig::start(&["shared-a"], "10s").await;
        let m = format!("2.{:09}", rand::random::<u32>() % 1_000_000_000);
        let action = rig.action(&sh(&format!("sleep {m}; {PRINT_UUID}")), |_| {}).await;
        let mut first = rig.execute(&action, false).await.unwrap();
        let name = until_executing(&mut first).await;
        let mut second = rig.execute(&action, false).await.unwrap();
        let other = until_executing(&mut second).await;
        assert_ne!(name, other);
        assert!(
            eventually(Duration::from_secs(10), || !processes_with(&m).is_empty()).await,
            "the action's process never appeared"
        );
        let pids = processes_with(&m);
        rig.ops()
            .cancel_operation(CancelOperationRequest { name })
            .await
            .unwrap();
        let cancelled = finish(first).await.unwrap();
        assert_eq!(
            cancelled.code(),
            Code::Cancelled,
            "{:?}",
            cancelled.response.status
        );
        // Still running for the other caller.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = processes_with(&m);
        assert!(
            pids.iter().any(|p| now.contains(p)),
            "the shared action was killed: {pids:?} -> {now:?}"
        );
        let done = finish(second).await.unwrap();
        assert_eq!(done.code(), Code::Ok, "{:?}", done.response.status);
        assert_eq!(done.exit_code(), 0);
        assert_eq!(rig.stdout(&done.response).await.trim().len(), 36);
    })
    .await;
}

/// A client whose Execute stream breaks comes back with WaitExecution on
/// the operation's name and gets the result of the same execution.
#[tokio::test]
async fn wait_execution_resumes_after_the_stream_is_dropped() {
    bounded(async {
        let rig = Rig::start(&["resume-a"], "10s").await;
        let action = rig.action(&sh(&format!("sleep 1; {PRINT_UUID}")), |_| {}).await;
        let mut stream = rig.execute(&action, false).await.unwrap();
        let name = until_executing(&mut stream).await;
        drop(stream);
        let resumed = rig
            .exec()
            .wait_execution(WaitExecutionRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        let outcome = finish(resumed).await.unwrap();
        assert_eq!(outcome.name(), name);
        assert_eq!(outcome.code(), Code::Ok, "{:?}", outcome.response.status);
        assert_eq!(outcome.exit_code(), 0);
        let out = rig.stdout(&outcome.response).await;
        // The Action Cache holds that same execution: it ran once.
        let cached = rig.get_action_result(&action).await.unwrap();
        assert_eq!(cached.stdout_digest, outcome.result().stdout_digest, "{out}");

        let unknown = rig
            .exec()
            .wait_execution(WaitExecutionRequest {
                name: "operations/no-such-operation".into(),
            })
            .await;
        let code = match unknown {
            Err(status) => status.code(),
            Ok(resp) => {
                let mut s = resp.into_inner();
                next(&mut s).await.unwrap_err().code()
            }
        };
        assert_eq!(code, Code::NotFound);
    })
    .await;
}

/// A platform property no registered worker offers fails at once (not
/// after `no_worker_wait`, here 30 s) with FAILED_PRECONDITION naming the
/// property, whether it is in Action.platform or only in Command.platform.
#[tokio::test]
async fn unsatisfiable_platform_fails_fast() {
    bounded(async {
        let rig = Rig::start(&["platform-a"], "30s").await;
        let in_action = rig
            .action(&sh("true"), |a| {
                a.platform = Some(props(&[("OSFamily", "Linux"), ("gpu-model", "quantum-9000")]))
            })
            .await;
        #[allow(deprecated)]
        let buck2_style = Command {
            platform: Some(props(&[("OSFamily", "Linux"), ("fpga-kind", "xyz")])),
            ..sh("true")
        };
        let in_command = rig.action(&buck2_style, |_| {}).await;
        for (action, property) in [(in_action, "gpu-model"), (in_command, "fpga-kind")] {
            let started = Instant::now();
            let (code, message) = match rig.run(&action, false).await {
                Err(status) => (status.code(), status.message().to_string()),
                Ok(o) => (o.code(), o.response.status.unwrap().message),
            };
            assert_eq!(code, Code::FailedPrecondition, "{message}");
            assert!(message.contains(property), "{property} not named: {message}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "took {:?}",
                started.elapsed()
            );
        }
        // Control: a platform the worker offers runs.
        let fine = rig
            .action(&sh("true"), |a| {
                a.platform = Some(props(&[("OSFamily", "Linux")]))
            })
            .await;
        let o = rig.run(&fine, false).await.unwrap();
        assert_eq!(o.code(), Code::Ok, "{:?}", o.response.status);
        assert_eq!(o.exit_code(), 0);
    })
    .await;
}

/// With no worker registered at all, an action waits `no_worker_wait`
/// (here 1 s) for one to appear, then fails with FAILED_PRECONDITION in
/// its ExecuteResponse.
#[tokio::test]
async fn no_worker_at_all_fails_after_no_worker_wait() {
    bounded(async {
        let rig = Rig::start(&[], "1s").await;
        let action = rig.action(&sh("true"), |_| {}).await;
        let started = Instant::now();
        let outcome = rig.run(&action, false).await.unwrap();
        let took = started.elapsed();
        assert_eq!(
            outcome.code(),
            Code::FailedPrecondition,
            "{:?}",
            outcome.response.status
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "failed after {took:?}"
        );
    })
    .await;
}

/// Worker A is killed with SIGKILL while running an action; its sandboxed
/// processes die with it, the scheduler declares it lost and re-runs the
/// action on worker B, and the client's one Execute stream gets B's
/// correct result.
#[tokio::test]
async fn worker_killed_mid_action_is_retried_on_another_worker() {
    bounded(async {
        let mut rig = Rig::start(&["kill9-a"], "20s").await;
        let m = format!("3.{:09}", rand::random::<u32>() % 1_000_000_000);
        let action = rig.action(&sh(&format!("sleep {m}; echo ok")), |_| {}).await;
        let mut stream = rig.execute(&action, false).await.unwrap();
        until_executing(&mut stream).await;
        assert!(
            eventually(Duration::from_secs(10), || !processes_with(&m).is_empty()).await,
            "the action never started on worker A"
        );
        let on_a = processes_with(&m);
        let killed_at = SystemTime::now();
        rig.workers[0].kill9();
        // A's sandbox dies with it (its helper sees the worker gone).
        assert!(
            eventually(Duration::from_secs(5), || {
                let now = processes_with(&m);
                on_a.iter().all(|p| !now.contains(p))
            })
            .await,
            "worker A's action survived it: {on_a:?}"
        );
        rig.start_worker("kill9-b");
        let outcome = finish(stream).await.unwrap();
        assert_eq!(outcome.code(), Code::Ok, "{:?}", outcome.response.status);
        assert_eq!(outcome.exit_code(), 0);
        assert_eq!(rig.stdout(&outcome.response).await, "ok\n");
        assert_eq!(outcome.worker(), "kill9-b");
        // B's run started after A was killed: it is a second execution,
        // not a result A delivered.
        let (secs, nanos) = outcome.worker_start();
        let started = UNIX_EPOCH + Duration::new(secs as u64, nanos as u32);
        assert!(
            started >= killed_at,
            "started {started:?}, A killed at {killed_at:?}"
        );
    })
    .await;
}

/// An address of this machine other than loopback, if it has one.
fn host_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Without `network = on` an action cannot reach a port this test listens
/// on (loopback or the host's own address), and the listener sees nothing;
/// with `network = on` the same script connects (the check can fail).
#[tokio::test]
async fn network_is_off_by_default_in_the_sandbox() {
    bounded(async {
        let rig = Rig::start(&["network-a"], "10s").await;
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let acceptor = tokio::spawn(async move {
            loop {
                if listener.accept().await.is_ok() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let mut addrs = vec!["127.0.0.1".to_string()];
        addrs.extend(host_ip().map(|ip| ip.to_string()));
        let script = format!(
            "for a in {}; do if (exec 3<>/dev/tcp/$a/{port}) 2>/dev/null; then echo connected to $a; exit 0; fi; done; echo no connection; exit 7",
            addrs.join(" ")
        );
        let bash = |platform: Option<Platform>| {
            let cmd = Command {
                arguments: vec!["/bin/bash".into(), "-c".into(), script.clone()],
                environment_variables: env_path(),
                ..Default::default()
            };
            (cmd, platform)
        };

        let (cmd, _) = bash(None);
        let offline = rig.action(&cmd, |_| {}).await;
        let o = rig.run(&offline, false).await.unwrap();
        assert_eq!(o.code(), Code::Ok, "{:?}", o.response.status);
        let out = rig.stdout(&o.response).await;
        assert_eq!(o.exit_code(), 7, "the action reached the network: {out}");
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "the listener saw a connection");

        let (cmd, platform) = bash(Some(props(&[("network", "on")])));
        let online = rig.action(&cmd, |a| a.platform = platform).await;
        let o = rig.run(&online, false).await.unwrap();
        assert_eq!(o.code(), Code::Ok, "{:?}", o.response.status);
        let out = rig.stdout(&o.response).await;
        assert_eq!(o.exit_code(), 0, "network = on could not connect: {out}");
        assert!(
            eventually(Duration::from_secs(5), || accepted.load(Ordering::SeqCst) >= 1).await,
            "the listener saw no connection with network = on"
        );
        acceptor.abort();
    })
    .await;
}

/// An output symlink pointing at /etc/passwd is reported as a symlink
/// (output_symlinks for output_paths, output_file_symlinks or
/// output_symlinks for the older output_files), never as a file, and the
/// host's /etc/passwd never reaches the CAS.
#[tokio::test]
async fn output_symlink_to_etc_passwd_is_uploaded_as_a_symlink() {
    bounded(async {
        let rig = Rig::start(&["symlink-a"], "10s").await;
        let passwd = std::fs::read("/etc/passwd").unwrap();
        let passwd_digest = digest_of(&passwd);

        let mut cmd = sh("ln -s /etc/passwd leak");
        cmd.output_paths = vec!["leak".into()];
        let action = rig.action(&cmd, |_| {}).await;
        let o = rig.run(&action, false).await.unwrap();
        assert_eq!(o.code(), Code::Ok, "{:?}", o.response.status);
        assert_eq!(o.exit_code(), 0);
        let r = o.result();
        assert!(
            r.output_files.is_empty(),
            "uploaded as a file: {:?}",
            r.output_files
        );
        assert!(r.output_directories.is_empty());
        let links: Vec<(&str, &str)> = r
            .output_symlinks
            .iter()
            .map(|s| (s.path.as_str(), s.target.as_str()))
            .collect();
        assert_eq!(links, vec![("leak", "/etc/passwd")]);

        #[allow(deprecated)]
        let legacy = {
            let mut cmd = sh("ln -s /etc/passwd leak2");
            cmd.output_files = vec!["leak2".into()];
            cmd
        };
        let action = rig.action(&legacy, |_| {}).await;
        let o = rig.run(&action, false).await.unwrap();
        assert_eq!(o.code(), Code::Ok, "{:?}", o.response.status);
        let r = o.result();
        assert!(
            r.output_files.is_empty(),
            "uploaded as a file: {:?}",
            r.output_files
        );
        #[allow(deprecated)]
        let legacy_links: Vec<(&str, &str)> = r
            .output_file_symlinks
            .iter()
            .chain(r.output_symlinks.iter())
            .map(|s| (s.path.as_str(), s.target.as_str()))
            .collect();
        assert!(
            !legacy_links.is_empty() && legacy_links.iter().all(|l| *l == ("leak2", "/etc/passwd")),
            "{legacy_links:?}"
        );

        assert_eq!(
            rig.missing(vec![passwd_digest.clone()]).await,
            vec![passwd_digest],
            "the host's /etc/passwd was uploaded to the CAS"
        );
    })
    .await;
}
