//! Matching and ordering over real gRPC with fake workers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_scheduler::{PropertyRule, SchedulerConfig};
use tonic::Code;

fn config_with_cores() -> SchedulerConfig {
    let mut c = fast_config();
    c.property_rules.insert("cores".into(), PropertyRule::Minimum);
    c.property_rules.insert("pool".into(), PropertyRule::Ignore);
    c
}

#[tokio::test]
async fn unsatisfiable_platform_fails_fast_naming_the_property() {
    let h = start(config_with_cores()).await;
    let _w = FakeWorker::connect(&h, "w1", &[("OSFamily", "linux"), ("cores", "4")], 1).await;
    let t = Instant::now();
    let spec = Spec {
        platform: vec![("OSFamily", "windows".into())],
        ..Spec::new("win")
    };
    let err = h
        .execute_with(&h.upload(&spec).await, false, 0, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("OSFamily=windows"), "{}", err.message());
    // Buck2 style: the platform only on the Command.
    let spec = Spec {
        platform: vec![("cores", "16".into())],
        platform_on_command: true,
        ..Spec::new("big")
    };
    let err = h
        .execute_with(&h.upload(&spec).await, false, 0, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cores=16"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(2), "must fail promptly");
    // Ignored properties do not matter; satisfiable ones run.
    let spec = Spec {
        platform: vec![("OSFamily", "linux".into()), ("pool", "anything".into())],
        ..Spec::new("fine")
    };
    assert!(h.execute_with(&h.upload(&spec).await, false, 0, "").await.is_ok());
    // A malformed capacity is INVALID_ARGUMENT.
    let spec = Spec {
        platform: vec![("cores", "lots".into())],
        ..Spec::new("bad")
    };
    let err = h
        .execute_with(&h.upload(&spec).await, false, 0, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn without_workers_waits_a_bounded_time() {
    let config = SchedulerConfig {
        no_worker_wait: Duration::from_millis(300),
        ..fast_config()
    };
    let h = start(config).await;
    // Nobody registers: fails after the wait, in the operation.
    let t = Instant::now();
    let mut s = h.execute(&h.upload(&Spec::new("lonely")).await).await;
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.status.unwrap().code, Code::FailedPrecondition as i32);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(5));
    // A worker that arrives during the wait gets the action (a longer wait,
    // so that a slow machine does not turn this into the case above).
    let h = start(SchedulerConfig {
        no_worker_wait: Duration::from_secs(20),
        ..fast_config()
    })
    .await;
    let action = h.upload(&Spec::new("patient")).await;
    let mut s = h.execute(&action).await;
    let mut w = FakeWorker::connect(&h, "late", &[], 1).await;
    let a = w.next_assign().await;
    w.finish(&h, &a.lease_id, 0, "").await;
    let (_, r) = wait_done(&mut s).await;
    assert_eq!(r.status.unwrap_or_default().code, 0);
}

#[tokio::test]
async fn minimum_capacity_is_reserved_and_released() {
    let h = start(config_with_cores()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[("cores", "4")], 4).await;
    let x = h
        .upload(&Spec {
            platform: vec![("cores", "3".into())],
            ..Spec::new("x")
        })
        .await;
    let y = h
        .upload(&Spec {
            platform: vec![("cores", "2".into())],
            ..Spec::new("y")
        })
        .await;
    let z = h
        .upload(&Spec {
            platform: vec![("cores", "1".into())],
            ..Spec::new("z")
        })
        .await;
    let mut sx = h.execute(&x).await;
    let ax = w.next_assign().await;
    assert_eq!(ax.action_digest.as_ref(), Some(&x));
    let _sy = h.execute(&y).await;
    // 3 of 4 cores reserved: y (2) must wait although slots are free...
    assert!(w.next_command(Duration::from_millis(300)).await.is_none());
    // ...but z (1) fits.
    let _sz = h.execute(&z).await;
    let az = w.next_assign().await;
    assert_eq!(az.action_digest.as_ref(), Some(&z));
    w.finish(&h, &ax.lease_id, 0, "").await;
    wait_done(&mut sx).await;
    // x released its 3 cores: y runs now.
    let ay = w.next_assign().await;
    assert_eq!(ay.action_digest.as_ref(), Some(&y));
}

#[tokio::test]
async fn priority_order_with_one_slot() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let blocker = h.upload(&Spec::new("blocker")).await;
    let _sb = h.execute(&blocker).await;
    let ab = w.next_assign().await;
    let mut streams = Vec::new();
    let mut by_priority = Vec::new();
    for (tag, priority) in [("p5", 5), ("p0", 0), ("pm3", -3), ("p1", 1)] {
        let d = h.upload(&Spec::new(tag)).await;
        streams.push(h.execute_with(&d, false, priority, "inv").await.unwrap());
        by_priority.push((priority, d));
    }
    by_priority.sort_by_key(|(p, _)| *p);
    w.finish(&h, &ab.lease_id, 0, "").await;
    for (p, want) in by_priority {
        let a = w.next_assign().await;
        assert_eq!(
            a.action_digest.as_ref(),
            Some(&want),
            "priority {p} expected next"
        );
        w.finish(&h, &a.lease_id, 0, "").await;
    }
}

#[tokio::test]
async fn fair_share_between_invocations() {
    let h = start(fast_config()).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 1).await;
    let blocker = h.upload(&Spec::new("blocker")).await;
    let _sb = h.execute(&blocker).await;
    let ab = w.next_assign().await;
    let mut streams = Vec::new();
    let mut big = Vec::new();
    for i in 0..6 {
        let d = h.upload(&Spec::new(&format!("big-{i}"))).await;
        streams.push(h.execute_with(&d, false, 0, "big-build").await.unwrap());
        big.push(d);
    }
    let mut small = Vec::new();
    for i in 0..2 {
        let d = h.upload(&Spec::new(&format!("small-{i}"))).await;
        streams.push(h.execute_with(&d, false, 0, "small-build").await.unwrap());
        small.push(d);
    }
    w.finish(&h, &ab.lease_id, 0, "").await;
    let mut order = Vec::new();
    for _ in 0..8 {
        let a = w.next_assign().await;
        order.push(a.action_digest.clone().unwrap());
        w.finish(&h, &a.lease_id, 0, "").await;
    }
    let pos = |d| order.iter().position(|x| x == d).unwrap();
    // The small build does not wait behind the big one's backlog.
    assert!(pos(&small[0]) <= 2 && pos(&small[1]) <= 4, "order: {order:?}");
    // Each build's own actions stay in FIFO order.
    let big_positions: Vec<usize> = big.iter().map(pos).collect();
    assert!(big_positions.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn timeout_is_capped_by_the_configured_maximum() {
    let config = SchedulerConfig {
        max_action_timeout: Duration::from_secs(60),
        default_action_timeout: Duration::from_secs(20),
        ..fast_config()
    };
    let h = start(config).await;
    let mut w = FakeWorker::connect(&h, "w1", &[], 3).await;
    for (tag, requested, want) in [("long", Some(600), 60), ("short", Some(5), 5), ("none", None, 20)] {
        let spec = Spec {
            timeout: requested.map(Duration::from_secs),
            ..Spec::new(tag)
        };
        let _s = h.execute(&h.upload(&spec).await).await;
        let a = w.next_assign().await;
        assert_eq!(a.timeout.unwrap().seconds, want, "{tag}");
    }
}
