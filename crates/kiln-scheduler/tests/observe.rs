//! The observation hook: one record per finished execution (merged actions
//! included) and per Execute cache hit, carrying the RequestMetadata.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_proto::reapi::{ExecuteRequest, RequestMetadata, ToolDetails};
use kiln_scheduler::{ActionObserver, ActionRecord};
use parking_lot::Mutex;
use prost::Message;

#[derive(Default)]
struct Recorder(Mutex<Vec<ActionRecord>>);

impl ActionObserver for Recorder {
    fn action_completed(&self, record: &ActionRecord) {
        self.0.lock().push(record.clone());
    }
}

impl Recorder {
    /// Waits (bounded) until `n` records arrived; returns them.
    async fn wait_for(&self, n: usize) -> Vec<ActionRecord> {
        for _ in 0..200 {
            if self.0.lock().len() >= n {
                return self.0.lock().clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} records, got {:?}", self.0.lock());
    }
}

fn request(action: &kiln_proto::reapi::Digest, mnemonic: &str) -> tonic::Request<ExecuteRequest> {
    let mut req = tonic::Request::new(ExecuteRequest {
        action_digest: Some(action.clone()),
        ..Default::default()
    });
    let md = RequestMetadata {
        tool_details: Some(ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "8.0.0".into(),
        }),
        tool_invocation_id: "inv-42".into(),
        action_mnemonic: mnemonic.into(),
        target_id: "//pkg:target".into(),
        ..Default::default()
    };
    req.metadata_mut().insert_bin(
        kiln_proto::request_info::REQUEST_METADATA_HEADER,
        tonic::metadata::MetadataValue::from_bytes(&md.encode_to_vec()),
    );
    req
}

#[tokio::test]
async fn records_executions_merges_and_cache_hits() {
    let h = start(fast_config()).await;
    let recorder = Arc::new(Recorder::default());
    h.scheduler.add_observer(recorder.clone());
    let mut w = FakeWorker::connect(&h, "w1", &[("OSFamily", "linux")], 2).await;

    // Two identical Executes merge into one action: one record.
    let action = h
        .upload(&Spec {
            platform: vec![("OSFamily", "linux".into())],
            ..Spec::new("observed")
        })
        .await;
    let mut s1 = h
        .exec_client()
        .execute(request(&action, "Genrule"))
        .await
        .unwrap()
        .into_inner();
    let first = next_op(&mut s1).await;
    let a = w.next_assign().await;
    let mut s2 = h
        .exec_client()
        .execute(request(&action, "Genrule"))
        .await
        .unwrap()
        .into_inner();
    next_op(&mut s2).await;
    w.finish(&h, &a.lease_id, 0, "hello").await;
    wait_done(&mut s1).await;
    wait_done(&mut s2).await;
    let records = recorder.wait_for(1).await;
    assert_eq!(records.len(), 1, "merged actions are one record: {records:?}");
    let r = &records[0];
    assert_eq!(r.operation, first.name, "the first operation names the record");
    assert_eq!(r.action_digest, action);
    assert!(!r.cached);
    assert_eq!(r.status_code, 0);
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.worker, "fake-w1");
    assert_eq!(r.request.tool_invocation_id, "inv-42");
    assert_eq!(r.request.action_mnemonic, "Genrule");
    assert_eq!(r.request.target_id, "//pkg:target");
    assert_eq!(r.request.tool_name, "bazel");
    assert_eq!(r.platform.properties.len(), 1);
    assert_eq!(r.platform.properties[0].name, "OSFamily");
    let md = r.metadata.as_ref().expect("metadata");
    assert_eq!(md.worker, "fake-w1");
    assert!(md.queued_timestamp.is_some());

    // A cache hit: one more record, cached, no worker.
    let mut s3 = h
        .exec_client()
        .execute(request(&action, "CacheHit"))
        .await
        .unwrap()
        .into_inner();
    let op = next_op(&mut s3).await;
    assert!(op.done);
    let records = recorder.wait_for(2).await;
    assert_eq!(records.len(), 2);
    let hit = &records[1];
    assert!(hit.cached);
    assert_eq!(hit.operation, op.name);
    assert_eq!(hit.worker, "");
    assert_eq!(hit.exit_code, Some(0));
    assert_eq!(hit.request.action_mnemonic, "CacheHit");
    assert_eq!(hit.action_digest, action);

    // A failing action (non-zero exit) is reported, not cached.
    let failing = h.upload(&Spec::new("fails")).await;
    let mut s4 = h
        .exec_client()
        .execute(request(&failing, "Fail"))
        .await
        .unwrap()
        .into_inner();
    let a = w.next_assign().await;
    w.finish(&h, &a.lease_id, 3, "").await;
    wait_done(&mut s4).await;
    let records = recorder.wait_for(3).await;
    assert_eq!(records[2].exit_code, Some(3));
    assert!(!records[2].cached);
    assert!(h.ac_get(&failing).await.is_none());
}
