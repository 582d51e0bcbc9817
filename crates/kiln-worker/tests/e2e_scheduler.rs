//! The worker against the real scheduler (kiln-scheduler) and the real
//! cache services on one gRPC port: a client's Execute runs in the
//! sandbox on this worker and the result comes back through the
//! operation stream and the Action Cache.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_proto::longrunning::operation;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{ExecuteRequest, ExecuteResponse, GetActionResultRequest, action_cache_client};
use kiln_scheduler::{Scheduler, SchedulerConfig};
use kiln_store::Store;
use kiln_store::memory::MemoryStore;
use prost::Message;
use tokio::sync::oneshot;

struct Server {
    channel: tonic::transport::Channel,
    _shutdown: oneshot::Sender<()>,
}

async fn start_server() -> Server {
    let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(64 << 20));
    let ac: Arc<dyn Store> = Arc::new(MemoryStore::new(16 << 20));
    let instances = Arc::new(Instances::new(
        [Instance::new("", cas, ac)],
        CacheLimits::default(),
    ));
    let config = SchedulerConfig {
        heartbeat_interval: Duration::from_millis(200),
        ..SchedulerConfig::default()
    };
    let scheduler = Scheduler::new(config, instances.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut routes = tonic::service::RoutesBuilder::default();
    kiln_cache::add_routes(&mut routes, instances);
    scheduler.add_routes(&mut routes);
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_lazy();
    Server {
        channel,
        _shutdown: tx,
    }
}

#[tokio::test]
async fn execute_through_the_scheduler_runs_on_this_worker() {
    let server = start_server().await;
    // The helpers of `common` talk to a `Cas`; reuse the server's channel.
    let cas = Cas::from_channel(server.channel.clone());
    let tmp = tempfile::tempdir().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(kiln_worker::run_worker(
        config(tmp.path()),
        server.channel.clone(),
        server.channel.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    let root = TreeSpec::default().file("in", b"world\n").upload(&cas).await;
    let mut cmd = sh("printf 'hello ' > out; cat in >> out");
    cmd.output_paths = vec!["out".into()];
    let j = job(&cas, cmd, root, Duration::from_secs(60)).await;
    let mut stream = ExecutionClient::new(server.channel.clone())
        .execute(ExecuteRequest {
            action_digest: Some(j.action_digest.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let resp = loop {
        let op = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("operation stalled")
            .unwrap()
            .expect("stream ended early");
        if op.done {
            match op.result {
                Some(operation::Result::Response(any)) => {
                    break ExecuteResponse::decode(any.value.as_slice()).unwrap();
                }
                other => panic!("no response: {other:?}"),
            }
        }
    };
    assert_eq!(code(&resp), 0, "{:?}", resp.status);
    let result = resp.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        read_blob(&cas, &outputs_by_path(&resp)["out"]).await,
        b"hello world\n"
    );
    assert_eq!(result.execution_metadata.as_ref().unwrap().worker, "test-worker");
    // Cached by the scheduler.
    let cached = action_cache_client::ActionCacheClient::new(server.channel.clone())
        .get_action_result(GetActionResultRequest {
            action_digest: Some(j.action_digest),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.exit_code, 0);

    let _ = stop.send(());
    let r = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
}
