//! The worker's connection loop against a scripted scheduler speaking the
//! real kiln.worker.v1 protocol over gRPC.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kiln_proto::protobuf::Duration as ProtoDuration;
use kiln_proto::worker::worker_api_server::{WorkerApi, WorkerApiServer};
use kiln_proto::worker::{
    Assign, Cancel, Registered, SchedulerCommand, WorkerUpdate, scheduler_command, worker_update::Update,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type Out = mpsc::UnboundedSender<Result<SchedulerCommand, Status>>;

#[derive(Debug)]
enum Event {
    Update(usize, WorkerUpdate),
    Closed,
}

/// A scheduler whose every move the test makes (except answering
/// `Register` with `Registered`).
#[derive(Clone)]
struct Fake {
    events: mpsc::UnboundedSender<Event>,
    current: Arc<Mutex<Option<(usize, Out)>>>,
    sessions: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl WorkerApi for Fake {
    type ConnectStream = UnboundedReceiverStream<Result<SchedulerCommand, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerUpdate>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let n = self.sessions.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        *self.current.lock() = Some((n, tx.clone()));
        let mut inbound = request.into_inner();
        let events = self.events.clone();
        let current = self.current.clone();
        tokio::spawn(async move {
            while let Ok(Some(u)) = inbound.message().await {
                if let Some(Update::Register(r)) = &u.update {
                    let _ = tx.send(Ok(SchedulerCommand {
                        command: Some(scheduler_command::Command::Registered(Registered {
                            worker_id: r.worker_id.clone(),
                            heartbeat_interval: Some(ProtoDuration {
                                seconds: 0,
                                nanos: 100_000_000,
                            }),
                            heartbeat_timeout: Some(ProtoDuration { seconds: 5, nanos: 0 }),
                        })),
                    }));
                }
                let _ = events.send(Event::Update(n, u));
            }
            let _ = events.send(Event::Closed);
            // The worker closed its side: close ours.
            let mut cur = current.lock();
            if cur.as_ref().is_some_and(|(m, _)| *m == n) {
                *cur = None;
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

impl Fake {
    fn send(&self, c: scheduler_command::Command) {
        let cur = self.current.lock();
        let (_, tx) = cur.as_ref().expect("no open session");
        tx.send(Ok(SchedulerCommand { command: Some(c) })).unwrap();
    }

    /// Breaks the current stream (as a scheduler restart would).
    fn kick(&self) {
        if let Some((_, tx)) = self.current.lock().take() {
            let _ = tx.send(Err(Status::unavailable("scheduler restarting")));
        }
    }
}

struct Harness {
    fake: Fake,
    events: mpsc::UnboundedReceiver<Event>,
    cas: Cas,
    _tmp: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    worker: tokio::task::JoinHandle<kiln_worker::WorkerResult<()>>,
}

async fn start(drain_timeout: Duration) -> Harness {
    let cas = start_default_cas().await;
    let (events_tx, events) = mpsc::unbounded_channel();
    let fake = Fake {
        events: events_tx,
        current: Arc::new(Mutex::new(None)),
        sessions: Arc::new(AtomicUsize::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = WorkerApiServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let scheduler = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.reconnect_min = Duration::from_millis(50);
    cfg.reconnect_max = Duration::from_millis(200);
    cfg.drain_timeout = drain_timeout;
    let (tx, rx) = oneshot::channel::<()>();
    let worker = tokio::spawn(kiln_worker::run_worker(
        cfg,
        scheduler,
        cas.channel.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    Harness {
        fake,
        events,
        cas,
        _tmp: tmp,
        shutdown: Some(tx),
        worker,
    }
}

impl Harness {
    /// The next update matching `pred` (others are skipped), within 20 s.
    async fn expect(&mut self, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(e)) if pred(&e) => return e,
                Ok(Some(_)) => {}
                Ok(None) => panic!("events ended while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    async fn assign(&self, lease: &str, script: &str, outputs: &[&str]) {
        let mut cmd = sh(script);
        cmd.output_paths = outputs.iter().map(|s| s.to_string()).collect();
        let root = TreeSpec::default().upload(&self.cas).await;
        let j = job(&self.cas, cmd, root, Duration::from_secs(60)).await;
        self.fake
            .send(scheduler_command::Command::Assign(Box::new(Assign {
                lease_id: lease.into(),
                instance_name: String::new(),
                digest_function: F.to_proto() as i32,
                action_digest: Some(j.action_digest),
                action: Some(j.action),
                command: Some(j.command),
                timeout: Some(ProtoDuration {
                    seconds: 60,
                    nanos: 0,
                }),
                queued_at: Some(kiln_worker::metadata::now()),
                platform: None,
                attempt: 1,
                operation_name: format!("op-{lease}"),
            })));
    }
}

fn is_register(e: &Event) -> bool {
    matches!(
        e,
        Event::Update(
            _,
            WorkerUpdate {
                update: Some(Update::Register(_))
            }
        )
    )
}

fn register_of(e: Event) -> kiln_proto::worker::Register {
    match e {
        Event::Update(
            _,
            WorkerUpdate {
                update: Some(Update::Register(r)),
            },
        ) => r,
        other => panic!("not a Register: {other:?}"),
    }
}

fn finished_for(lease: &str) -> impl FnMut(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Update(_, WorkerUpdate { update: Some(Update::Finished(f)) }) if f.lease_id == lease)
}

fn finished_response(e: Event) -> kiln_proto::reapi::ExecuteResponse {
    match e {
        Event::Update(
            _,
            WorkerUpdate {
                update: Some(Update::Finished(f)),
            },
        ) => f.response.unwrap(),
        other => panic!("not Finished: {other:?}"),
    }
}

#[tokio::test]
async fn registers_runs_a_lease_and_heartbeats() {
    let mut h = start(Duration::from_secs(5)).await;
    let reg = register_of(h.expect("Register", is_register).await);
    assert!(!reg.worker_id.is_empty());
    assert_eq!(reg.name, "test-worker");
    assert_eq!(reg.slots, 2);
    assert_eq!(reg.protocol_version, kiln_proto::worker::PROTOCOL_VERSION);
    assert!(reg.running_leases.is_empty());
    assert!(
        reg.properties
            .iter()
            .any(|p| p.name == "OSFamily" && p.value == "Linux")
    );
    assert!(
        reg.properties
            .iter()
            .any(|p| p.name == "network" && p.value == "on")
    );

    h.assign("lease-1", "echo hello > out", &["out"]).await;
    h.expect("Started", |e| {
        matches!(e, Event::Update(_, WorkerUpdate { update: Some(Update::Started(s)) }) if s.lease_id == "lease-1")
    })
    .await;
    let progress = h
        .expect("Progress(EXECUTING)", |e| {
            matches!(e, Event::Update(_, WorkerUpdate { update: Some(Update::Progress(p)) })
                if p.lease_id == "lease-1" && p.phase == kiln_proto::worker::Phase::Executing as i32)
        })
        .await;
    if let Event::Update(
        _,
        WorkerUpdate {
            update: Some(Update::Progress(p)),
        },
    ) = progress
    {
        let md = p.partial_execution_metadata.unwrap();
        assert!(md.input_fetch_completed_timestamp.is_some() && md.execution_start_timestamp.is_some());
    }
    let resp = finished_response(h.expect("Finished", finished_for("lease-1")).await);
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let result = resp.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        read_blob(&h.cas, result.output_files[0].digest.as_ref().unwrap()).await,
        b"hello\n"
    );
    let md = result.execution_metadata.as_ref().unwrap();
    assert!(md.queued_timestamp.is_some() && md.worker_completed_timestamp.is_some());

    // Heartbeats flow with the load and free slots.
    let hb = h
        .expect("Heartbeat", |e| {
            matches!(e, Event::Update(_, WorkerUpdate { update: Some(Update::Heartbeat(hb)) }) if hb.running_leases.is_empty())
        })
        .await;
    if let Event::Update(
        _,
        WorkerUpdate {
            update: Some(Update::Heartbeat(hb)),
        },
    ) = hb
    {
        assert_eq!(hb.free_slots, 2);
        assert!(hb.load >= 0.0);
    }
}

#[tokio::test]
async fn reconnects_with_the_same_identity_and_reports_running_leases() {
    let mut h = start(Duration::from_secs(5)).await;
    let first = register_of(h.expect("Register", is_register).await);
    h.assign("long", "sleep 1; echo done > out", &["out"]).await;
    h.expect("Started", |e| {
        matches!(
            e,
            Event::Update(
                _,
                WorkerUpdate {
                    update: Some(Update::Started(_))
                }
            )
        )
    })
    .await;
    h.fake.kick();
    let second = register_of(h.expect("Register again", is_register).await);
    assert_eq!(second.worker_id, first.worker_id);
    assert_eq!(second.running_leases, vec!["long".to_string()]);
    // The result arrives on the new stream; the lease ran once.
    let e = h.expect("Finished", finished_for("long")).await;
    assert!(
        matches!(e, Event::Update(1, _)),
        "Finished on the wrong stream: {e:?}"
    );
    let resp = finished_response(e);
    assert_eq!(resp.result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn cancel_stops_a_lease_without_a_result() {
    let mut h = start(Duration::from_secs(5)).await;
    h.expect("Register", is_register).await;
    let tok = format!("{}.{}", 4000 + std::process::id() % 1000, std::process::id());
    h.assign("doomed", &format!("sleep {tok}"), &[]).await;
    let start = Instant::now();
    while processes_with(&tok).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.fake.send(scheduler_command::Command::Cancel(Cancel {
        lease_id: "doomed".into(),
        reason: "client cancelled".into(),
    }));
    // The lease leaves the heartbeats; no Finished is sent for it.
    let mut saw_finished = false;
    h.expect("a heartbeat without the lease", |e| match e {
        Event::Update(
            _,
            WorkerUpdate {
                update: Some(Update::Finished(f)),
            },
        ) if f.lease_id == "doomed" => {
            saw_finished = true;
            false
        }
        Event::Update(
            _,
            WorkerUpdate {
                update: Some(Update::Heartbeat(hb)),
            },
        ) => hb.running_leases.is_empty(),
        _ => false,
    })
    .await;
    assert!(!saw_finished);
    assert!(processes_with(&tok).is_empty(), "the cancelled action still runs");
}

#[tokio::test]
async fn drain_finishes_short_leases_hands_back_long_ones_and_leaves() {
    let mut h = start(Duration::from_secs(2)).await;
    h.expect("Register", is_register).await;
    h.assign("short", "sleep 0.3; echo ok > out", &["out"]).await;
    h.assign("long", "sleep 600", &[]).await;
    for _ in 0..2 {
        h.expect("Started", |e| {
            matches!(
                e,
                Event::Update(
                    _,
                    WorkerUpdate {
                        update: Some(Update::Started(_))
                    }
                )
            )
        })
        .await;
    }
    let _ = h.shutdown.take().unwrap().send(());
    h.expect("Draining", |e| {
        matches!(
            e,
            Event::Update(
                _,
                WorkerUpdate {
                    update: Some(Update::Draining(_))
                }
            )
        )
    })
    .await;
    // New work is refused while draining.
    h.assign("late", "true", &[]).await;
    let mut finished_short = false;
    let mut handed_back = Vec::new();
    h.expect("the stream to close", |e| match e {
        Event::Update(
            _,
            WorkerUpdate {
                update: Some(Update::Finished(f)),
            },
        ) => {
            if f.lease_id == "short" {
                finished_short = true;
            }
            false
        }
        Event::Update(
            _,
            WorkerUpdate {
                update: Some(Update::HandBack(b)),
            },
        ) => {
            handed_back.push(b.lease_id.clone());
            false
        }
        Event::Closed => true,
        _ => false,
    })
    .await;
    assert!(finished_short);
    handed_back.sort();
    assert_eq!(handed_back, vec!["late".to_string(), "long".to_string()]);
    let r = tokio::time::timeout(Duration::from_secs(20), h.worker)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test]
async fn worker_refuses_to_start_without_a_usable_sandbox_helper() {
    let cas = start_default_cas().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.sandbox.helper = vec!["/bin/false".into()];
    let err = match kiln_worker::Executor::new(cfg, cas.channel.clone()).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started with a broken sandbox"),
    };
    assert!(err.contains("sandbox.enabled = false"), "{err}");
}
