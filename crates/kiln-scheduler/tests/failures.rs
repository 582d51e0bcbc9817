//! Lost workers, retries, lease deadlines, reconnects and drains over real
//! gRPC with fake workers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_proto::worker::{Draining, HandBack, scheduler_command, worker_update};
use kiln_scheduler::SchedulerConfig;
use tonic::Code;

#[tokio::test]
async fn silent_worker_is_lost_and_its_action_requeued() {
    let h = start(fast_config()).await;
    let mut w1 = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("survive")).await;
    let mut s = h.execute(&action).await;
    let a1 = w1.next_assign().await;
    assert_eq!(a1.attempt, 1);
    // w1 goes silent mid-action; w2 is healthy.
    w1.stop_heartbeats();
    let mut w2 = FakeWorker::connect(&h, "w2", &[], 1).await;
    let t = Instant::now();
    let a2 = w2.next_assign().await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "re-queued only after the heartbeat timeout"
    );
    assert_eq!(a2.action_digest.as_ref(), Some(&action));
    assert_eq!(a2.attempt, 2);
    assert_ne!(a2.lease_id, a1.lease_id);
    assert!(w1.closed_within(WAIT).await, "the lost worker's stream is closed");
    w2.finish(&h, &a2.lease_id, 0, "from w2").await;
    let (_, r) = wait_done(&mut s).await;
    let result = r.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout_digest, Some(digest(b"from w2")));
    assert_eq!(result.execution_metadata.unwrap().worker, "fake-w2");
}

#[tokio::test]
async fn retries_are_bounded() {
    let config = SchedulerConfig {
        max_attempts: 2,
        ..fast_config()
    };
    let h = start(config).await;
    let action = h.upload(&Spec::new("cursed")).await;
    let mut s = h.execute(&action).await;
    let mut lost = Vec::new();
    for id in ["w1", "w2"] {
        let mut w = FakeWorker::connect(&h, id, &[], 1).await;
        w.next_assign().await;
        w.stop_heartbeats();
        lost.push(w);
    }
    let (_, r) = wait_done(&mut s).await;
    let status = r.status.unwrap();
    assert_eq!(status.code, Code::Unavailable as i32);
    assert!(status.message.contains("2 time(s)"), "{}", status.message);
    assert!(
        status.message.contains("fake-w1") && status.message.contains("fake-w2"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn lease_deadline_gives_deadline_exceeded_and_cancels() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let spec = Spec {
        timeout: Some(Duration::from_millis(400)),
        ..Spec::new("slow")
    };
    let action = h.upload(&spec).await;
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    assert_eq!(a.timeout.unwrap().nanos, 400_000_000);
    // The fake worker never reports: the scheduler's lease deadline
    // (timeout + lease_grace) fires.
    let t = Instant::now();
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.status.unwrap().code, Code::DeadlineExceeded as i32);
    assert!(t.elapsed() < Duration::from_secs(5));
    match w.next_command(WAIT).await {
        Some(scheduler_command::Command::Cancel(c)) => assert_eq!(c.lease_id, a.lease_id),
        other => panic!("expected Cancel, got {other:?}"),
    }
    assert!(h.ac_get(&action).await.is_none());
}

#[tokio::test]
async fn worker_timeout_result_is_passed_through() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("timed out on worker")).await;
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    w.finish_with(
        &a.lease_id,
        kiln_proto::reapi::ExecuteResponse {
            result: Some(kiln_proto::reapi::ActionResult {
                exit_code: 0,
                ..Default::default()
            }),
            status: Some(kiln_proto::rpc::Status {
                code: Code::DeadlineExceeded as i32,
                message: "killed after 1s".into(),
                details: vec![],
            }),
            ..Default::default()
        },
    );
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.status.unwrap().code, Code::DeadlineExceeded as i32);
    assert!(
        h.ac_get(&action).await.is_none(),
        "a timed-out result is never cached"
    );
}

#[tokio::test]
async fn reconnecting_worker_keeps_its_leases() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 2).await;
    let action = h.upload(&Spec::new("long running")).await;
    let mut s = h.execute(&action).await;
    let a = w.next_assign().await;
    drop(w); // stream broken
    let mut w =
        FakeWorker::connect_with(&h, "w1", &[], 2, vec![a.lease_id.clone(), "stale-lease".into()]).await;
    // The stale lease is cancelled; the kept one is neither cancelled nor re-assigned.
    match w.next_command(WAIT).await {
        Some(scheduler_command::Command::Cancel(c)) => assert_eq!(c.lease_id, "stale-lease"),
        other => panic!("expected Cancel of the stale lease, got {other:?}"),
    }
    assert!(w.next_command(Duration::from_millis(300)).await.is_none());
    w.finish(&h, &a.lease_id, 0, "done after reconnect").await;
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(
        r.result.unwrap().stdout_digest,
        Some(digest(b"done after reconnect"))
    );
}

#[tokio::test]
async fn drain_hands_back_and_leaves() {
    let h = start(fast_config()).await;
    let mut w1 = FakeWorker::connect(&h, "w1", &[], 2).await;
    let action = h.upload(&Spec::new("handed back")).await;
    let mut s = h.execute(&action).await;
    let a = w1.next_assign().await;
    w1.send(worker_update::Update::Draining(Draining {}));
    let mut w2 = FakeWorker::connect(&h, "w2", &[], 1).await;
    // A draining worker gets nothing new (w2 is busy after this).
    let other = h.upload(&Spec::new("goes to w2")).await;
    let _so = h.execute(&other).await;
    let a_other = w2.next_assign().await;
    assert_eq!(a_other.action_digest.as_ref(), Some(&other));
    assert!(w1.next_command(Duration::from_millis(200)).await.is_none());
    w1.send(worker_update::Update::HandBack(HandBack {
        lease_id: a.lease_id.clone(),
        reason: "draining".into(),
    }));
    w2.finish(&h, &a_other.lease_id, 0, "").await;
    let again = w2.next_assign().await;
    assert_eq!(again.action_digest.as_ref(), Some(&action));
    assert_eq!(again.attempt, 1, "a hand-back is not a failed attempt");
    w2.finish(&h, &again.lease_id, 0, "").await;
    wait_done(&mut s).await;
    drop(w1);
    // The drained worker is removed once its stream closes.
    let deadline = Instant::now() + WAIT;
    while h.scheduler.stats().await.workers != 1 {
        assert!(Instant::now() < deadline, "drained worker not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn worker_whose_stream_breaks_for_good_is_lost() {
    let h = start(fast_config()).await;
    let mut w1 = FakeWorker::connect(&h, "w1", &[], 1).await;
    let action = h.upload(&Spec::new("kill -9")).await;
    let mut s = h.execute(&action).await;
    let a1 = w1.next_assign().await;
    drop(w1); // like kill -9: the stream breaks and nothing comes back
    let mut w2 = FakeWorker::connect(&h, "w2", &[], 1).await;
    let a2 = w2.next_assign().await;
    assert_eq!(a2.action_digest.as_ref(), Some(&action));
    assert_ne!(a2.lease_id, a1.lease_id);
    w2.finish(&h, &a2.lease_id, 0, "retried").await;
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.result.unwrap().stdout_digest, Some(digest(b"retried")));
    // If w1 comes back later, it is told to drop the old lease.
    let mut w1 = FakeWorker::connect_with(&h, "w1", &[], 1, vec![a1.lease_id.clone()]).await;
    match w1.next_command(WAIT).await {
        Some(scheduler_command::Command::Cancel(c)) => assert_eq!(c.lease_id, a1.lease_id),
        other => panic!("expected Cancel of the old lease, got {other:?}"),
    }
}
