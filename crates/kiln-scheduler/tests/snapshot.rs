//! The read-only state snapshot: queued and executing actions with their
//! worker, and workers with slots, load and properties.

mod common;

use common::*;
use kiln_proto::reapi::ExecutedActionMetadata;
use kiln_proto::worker::{Heartbeat, Phase, Progress, worker_update};
use std::time::Duration;

#[tokio::test]
async fn snapshot_shows_queue_executing_and_workers() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[("OSFamily", "linux"), ("cores", "8")], 1).await;
    let running = h.upload(&Spec::new("running")).await;
    let waiting = h.upload(&Spec::new("waiting")).await;
    let mut s1 = h.execute_with(&running, false, 0, "inv-a").await.unwrap();
    next_op(&mut s1).await;
    let a = w.next_assign().await;
    let mut s2 = h.execute_with(&waiting, false, 5, "inv-b").await.unwrap();
    next_op(&mut s2).await;
    let md = ExecutedActionMetadata {
        input_fetch_start_timestamp: Some(kiln_proto::protobuf::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..Default::default()
    };
    w.send(worker_update::Update::Progress(Box::new(Progress {
        lease_id: a.lease_id.clone(),
        phase: Phase::Fetching as i32,
        partial_execution_metadata: Some(md.clone()),
    })));
    // The fake's own heartbeats report load 0: pause them for this check.
    w.stop_heartbeats();
    w.send(worker_update::Update::Heartbeat(Heartbeat {
        running_leases: vec![a.lease_id.clone()],
        load: 0.75,
        free_slots: 0,
        local_cache: None,
    }));

    // Messages are handled asynchronously: poll (bounded) until both landed.
    let mut snap = h.scheduler.snapshot().await;
    for _ in 0..200 {
        let progressed = snap.executing.first().is_some_and(|e| e.progress.is_some());
        let loaded = snap.workers.first().is_some_and(|w| w.load > 0.7);
        if progressed && loaded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        snap = h.scheduler.snapshot().await;
    }

    w.start_heartbeats();
    assert_eq!(snap.executing_total, 1);
    let e = &snap.executing[0];
    assert_eq!(e.action.action_digest, running);
    assert_eq!(e.worker_id, "w1");
    assert_eq!(e.worker_name, "fake-w1");
    assert_eq!(e.lease_id, a.lease_id);
    assert_eq!(e.action.invocation_id, "inv-a");
    assert_eq!(e.action.attempts, 1);
    assert_eq!(e.action.operations.len(), 1);
    assert_eq!(e.progress.as_ref(), Some(&md));

    assert_eq!(snap.queued_total, 1);
    assert_eq!(snap.queued_by_platform.len(), 1, "{:?}", snap.queued_by_platform);
    assert_eq!(snap.queued_by_platform[0].1, 1);
    let q = &snap.queued[0];
    assert_eq!(q.action.action_digest, waiting);
    assert_eq!(q.action.priority, 5);
    assert_eq!(q.action.invocation_id, "inv-b");
    assert_eq!(q.action.attempts, 0);

    assert_eq!(snap.workers.len(), 1);
    let wk = &snap.workers[0];
    assert_eq!((wk.id.as_str(), wk.name.as_str()), ("w1", "fake-w1"));
    assert_eq!((wk.slots, wk.busy), (1, 1));
    assert!(wk.connected && !wk.draining);
    assert!((wk.load - 0.75).abs() < 1e-9, "load {}", wk.load);
    assert!(
        wk.properties.contains(&("OSFamily".into(), "linux".into())),
        "{:?}",
        wk.properties
    );

    // Finishing moves the queued action onto the worker.
    w.finish(&h, &a.lease_id, 0, "").await;
    wait_done(&mut s1).await;
    let b = w.next_assign().await;
    let snap = h.scheduler.snapshot().await;
    assert_eq!((snap.queued_total, snap.executing_total), (0, 1));
    assert_eq!(snap.executing[0].lease_id, b.lease_id);
    assert_eq!(snap.executing[0].action.action_digest, waiting);
}
