//! Execute / WaitExecution / Operations over real gRPC with a fake worker.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::longrunning::{CancelOperationRequest, GetOperationRequest, ListOperationsRequest};
use kiln_proto::reapi::{ActionResult, WaitExecutionRequest};
use kiln_proto::rpc_details::PreconditionFailure;
use kiln_proto::worker::scheduler_command;
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn executes_on_worker_and_caches_success() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 2).await;
    let action = h.upload(&Spec::new("ok")).await;
    let mut s = h.execute(&action).await;
    let first = next_op(&mut s).await;
    assert!(!first.done);
    let a = w.next_assign().await;
    assert_eq!(a.action_digest.as_ref(), Some(&action));
    assert!(
        a.action.is_some() && a.command.is_some(),
        "Assign carries Action and Command"
    );
    assert_eq!(a.attempt, 1);
    assert!(a.queued_at.is_some());
    w.finish(&h, &a.lease_id, 0, "hello").await;
    let (_, r) = wait_done(&mut s).await;
    assert!(!r.cached_result);
    assert_eq!(r.status.unwrap_or_default().code, 0);
    let result = r.result.unwrap();
    assert_eq!(result.execution_metadata.unwrap().worker, "fake-w1");
    // Written to the AC, and a second Execute is a cache hit.
    assert!(h.ac_get(&action).await.is_some());
    let mut s = h.execute(&action).await;
    let op = next_op(&mut s).await;
    assert!(op.done);
    assert!(response(&op).cached_result);
    assert!(
        w.next_command(Duration::from_millis(200)).await.is_none(),
        "no second Assign"
    );
}

#[tokio::test]
async fn cache_hit_returns_cached_result_at_once() {
    let h = start(fast_config()).await;
    let action = h.upload(&Spec::new("cached")).await;
    let stdout = digest(b"out");
    h.put(&stdout, bytes::Bytes::from_static(b"out")).await;
    h.ac_put(
        &action,
        &ActionResult {
            exit_code: 0,
            stdout_digest: Some(stdout),
            ..Default::default()
        },
    )
    .await;
    // No worker at all: a hit needs none.
    let mut s = h.execute(&action).await;
    let op = next_op(&mut s).await;
    assert!(op.done);
    let r = response(&op);
    assert!(r.cached_result);
    assert_eq!(r.result.unwrap().exit_code, 0);
    assert!(
        s.message().await.unwrap().is_none(),
        "stream ends after COMPLETED"
    );
}

#[tokio::test]
async fn cache_hit_with_missing_outputs_is_a_miss() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("evicted")).await;
    h.ac_put(
        &action,
        &ActionResult {
            stdout_digest: Some(digest(b"gone from the CAS")),
            ..Default::default()
        },
    )
    .await;
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    w.finish(&h, &a.lease_id, 0, "again").await;
    let (_, r) = wait_done(&mut s).await;
    assert!(!r.cached_result);
}

#[tokio::test]
async fn identical_concurrent_executes_run_once() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 4).await;
    let action = h.upload(&Spec::new("dedup")).await;
    let mut s1 = h.execute(&action).await;
    let a = w.next_assign().await;
    let mut s2 = h.execute(&action).await;
    let mut s3 = h.execute(&action).await;
    let op2 = next_op(&mut s2).await;
    assert_eq!(stage(&op2), 3, "joined operation reports EXECUTING");
    assert!(
        w.next_command(Duration::from_millis(200)).await.is_none(),
        "only one Assign"
    );
    w.finish(&h, &a.lease_id, 0, "once").await;
    let mut names = std::collections::HashSet::new();
    for s in [&mut s1, &mut s2, &mut s3] {
        let (op, r) = wait_done(s).await;
        assert!(!r.cached_result);
        assert_eq!(r.result.unwrap().exit_code, 0);
        names.insert(op.name);
    }
    assert_eq!(names.len(), 3, "each caller has its own operation");
}

#[tokio::test]
async fn non_zero_exit_is_not_cached() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("fails")).await;
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    w.finish(&h, &a.lease_id, 3, "boom").await;
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.result.unwrap().exit_code, 3);
    assert!(h.ac_get(&action).await.is_none());
    // Executing again runs it again.
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    w.finish(&h, &a.lease_id, 0, "ok now").await;
    wait_done(&mut s).await;
    assert!(h.ac_get(&action).await.is_some());
}

#[tokio::test]
async fn error_status_is_not_cached() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("internal")).await;
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    w.finish_with(
        &a.lease_id,
        kiln_proto::reapi::ExecuteResponse {
            result: Some(ActionResult::default()),
            status: Some(kiln_proto::rpc::Status {
                code: Code::Internal as i32,
                message: "sandbox failed".into(),
                details: vec![],
            }),
            ..Default::default()
        },
    );
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.status.unwrap().code, Code::Internal as i32);
    assert!(h.ac_get(&action).await.is_none());
}

#[tokio::test]
async fn do_not_cache_is_neither_cached_nor_merged() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 2).await;
    let spec = Spec {
        do_not_cache: true,
        ..Spec::new("volatile")
    };
    let action = h.upload(&spec).await;
    let mut s1 = h.execute(&action).await;
    let a1 = w.next_assign().await;
    let mut s2 = h.execute(&action).await;
    let a2 = w.next_assign().await;
    assert_ne!(a1.lease_id, a2.lease_id, "do_not_cache actions are not merged");
    w.finish(&h, &a1.lease_id, 0, "1").await;
    w.finish(&h, &a2.lease_id, 0, "2").await;
    wait_done(&mut s1).await;
    wait_done(&mut s2).await;
    assert!(h.ac_get(&action).await.is_none());
}

#[tokio::test]
async fn skip_cache_lookup_runs_and_refreshes_the_cache() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("skip")).await;
    h.ac_put(
        &action,
        &ActionResult {
            exit_code: 0,
            ..Default::default()
        },
    )
    .await;
    let mut s = h.execute_with(&action, true, 0, "").await.unwrap();
    let a = w.next_assign().await;
    w.finish(&h, &a.lease_id, 0, "fresh").await;
    let (_, r) = wait_done(&mut s).await;
    assert!(!r.cached_result);
    let cached = h.ac_get(&action).await.unwrap();
    assert_eq!(cached.stdout_digest, Some(digest(b"fresh")));
}

fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    let rpc = kiln_proto::rpc::Status::decode(status.details()).expect("status details");
    assert_eq!(rpc.code, Code::FailedPrecondition as i32);
    let mut out = Vec::new();
    for any in rpc.details {
        assert_eq!(any.type_url, "type.googleapis.com/google.rpc.PreconditionFailure");
        let pf = PreconditionFailure::decode(any.value.as_slice()).unwrap();
        out.extend(pf.violations.into_iter().map(|v| (v.r#type, v.subject)));
    }
    out
}

fn subject(d: &kiln_proto::reapi::Digest) -> String {
    format!("blobs/{}/{}", d.hash, d.size_bytes)
}

#[tokio::test]
async fn missing_inputs_fail_with_precondition_failure() {
    let h = start(fast_config()).await;
    let _w = FakeWorker::connect(&h, "w1", &[], 1).await;
    // Action itself missing.
    let spec = Spec::new("absent");
    let built = build(&spec);
    let err = h.execute_with(&built.action, false, 0, "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        violations(&err),
        vec![("MISSING".to_string(), subject(&built.action))]
    );

    // Action present; command and two input files missing.
    let spec = Spec {
        files: vec![
            ("a.txt".into(), b"aaa".to_vec()),
            ("b.txt".into(), b"bbb".to_vec()),
        ],
        ..Spec::new("partial")
    };
    let built = build(&spec);
    for (d, data) in &built.blobs {
        if *d == built.action || *d == built.root {
            h.put(d, data.clone()).await;
        }
    }
    let err = h.execute_with(&built.action, false, 0, "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut got = violations(&err);
    got.sort();
    let mut want: Vec<(String, String)> = [&built.command, &built.files[0], &built.files[1]]
        .into_iter()
        .map(|d| ("MISSING".to_string(), subject(d)))
        .collect();
    want.sort();
    assert_eq!(got, want);

    // Input root missing (a non-empty one: the empty Directory is the
    // empty blob, which is always present).
    let spec = Spec {
        files: vec![("c.txt".into(), b"ccc".to_vec())],
        ..Spec::new("noroot")
    };
    let built = build(&spec);
    for (d, data) in &built.blobs {
        if *d != built.root {
            h.put(d, data.clone()).await;
        }
    }
    let err = h.execute_with(&built.action, false, 0, "").await.unwrap_err();
    assert_eq!(
        violations(&err),
        vec![("MISSING".to_string(), subject(&built.root))]
    );
}

#[tokio::test]
async fn worker_reported_missing_input_reaches_execute_response() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("vanished")).await;
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    let failure = kiln_scheduler::SchedulerError::missing(
        "input vanished",
        &[kiln_digest::BlobKey::of(
            kiln_digest::DigestFunction::Sha256,
            b"x",
        )],
    );
    w.finish_with(
        &a.lease_id,
        kiln_proto::reapi::ExecuteResponse {
            status: Some(failure.to_rpc_status()),
            ..Default::default()
        },
    );
    let (_, r) = wait_done(&mut s).await;
    let status = r.status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    let pf = PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
    assert_eq!(pf.violations[0].r#type, "MISSING");
    assert_eq!(pf.violations[0].subject, subject(&digest(b"x")));
    assert!(h.ac_get(&action).await.is_none());
}

#[tokio::test]
async fn cancel_operation_stops_the_action_on_its_worker() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("cancel me")).await;
    let mut s = h.execute(&action).await;
    let first = next_op(&mut s).await;
    let a = w.next_assign().await;
    h.ops_client()
        .cancel_operation(CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap();
    match w.next_command(WAIT).await {
        Some(scheduler_command::Command::Cancel(c)) => assert_eq!(c.lease_id, a.lease_id),
        other => panic!("expected Cancel, got {other:?}"),
    }
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.status.unwrap().code, Code::Cancelled as i32);
    // The slot is free again: the next action is assigned to the same worker.
    let other = h.upload(&Spec::new("next")).await;
    let _s = h.execute(&other).await;
    assert_eq!(w.next_assign().await.action_digest, Some(other));
    // Unknown operation.
    let err = h
        .ops_client()
        .cancel_operation(CancelOperationRequest { name: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn wait_execution_after_client_disconnect() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("reconnect")).await;
    let name = {
        let mut s = h.execute(&action).await;
        next_op(&mut s).await.name
        // The stream is dropped here: the client went away.
    };
    let a = w.next_assign().await;
    let mut client = h.exec_client();
    let mut s = client
        .wait_execution(WaitExecutionRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    let op = next_op(&mut s).await;
    assert_eq!(op.name, name);
    assert!(!op.done);
    w.finish(&h, &a.lease_id, 0, "still here").await;
    let (op, r) = wait_done(&mut s).await;
    assert_eq!(op.name, name);
    assert_eq!(r.result.unwrap().exit_code, 0);
    // GetOperation and ListOperations see it too.
    let got = h
        .ops_client()
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done);
    let list = h
        .ops_client()
        .list_operations(ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.operations.iter().any(|o| o.name == name));
    let err = client
        .wait_execution(WaitExecutionRequest {
            name: "unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn unwatched_operation_is_cancelled_after_grace() {
    let config = kiln_scheduler::SchedulerConfig {
        unwatched_grace: Duration::from_millis(300),
        ..fast_config()
    };
    let h = start(config).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("abandoned")).await;
    {
        let mut s = h.execute(&action).await;
        next_op(&mut s).await;
    }
    let a = w.next_assign().await;
    match w.next_command(WAIT).await {
        Some(scheduler_command::Command::Cancel(c)) => assert_eq!(c.lease_id, a.lease_id),
        other => panic!("expected Cancel of the abandoned action, got {other:?}"),
    }
}

#[tokio::test]
async fn wait_operation_and_delete_operation() {
    use kiln_proto::longrunning::{DeleteOperationRequest, WaitOperationRequest};
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 2).await;
    // WaitOperation returns the current state at its timeout, then the
    // completed operation once done.
    let action = h.upload(&Spec::new("waited")).await;
    let mut s = h.execute(&action).await;
    let name = next_op(&mut s).await.name;
    let a = w.next_assign().await;
    let wait = move |timeout_ms: i32| WaitOperationRequest {
        name: name.clone(),
        timeout: Some(kiln_proto::protobuf::Duration {
            seconds: 0,
            nanos: timeout_ms * 1_000_000,
        }),
    };
    let op = h
        .ops_client()
        .wait_operation(wait(100))
        .await
        .unwrap()
        .into_inner();
    assert!(!op.done);
    let mut ops = h.ops_client();
    let waiter = tokio::spawn(async move { ops.wait_operation(wait(900)).await });
    w.finish(&h, &a.lease_id, 0, "").await;
    let op = waiter.await.unwrap().unwrap().into_inner();
    assert!(op.done);
    assert_eq!(response(&op).status.unwrap_or_default().code, 0);

    // DeleteOperation of a running action stops it and forgets the name.
    let action = h.upload(&Spec::new("deleted")).await;
    let mut s = h.execute(&action).await;
    let name = next_op(&mut s).await.name;
    let a = w.next_assign().await;
    h.ops_client()
        .delete_operation(DeleteOperationRequest { name: name.clone() })
        .await
        .unwrap();
    match w.next_command(WAIT).await {
        Some(scheduler_command::Command::Cancel(c)) => assert_eq!(c.lease_id, a.lease_id),
        other => panic!("expected Cancel, got {other:?}"),
    }
    let err = h
        .ops_client()
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
