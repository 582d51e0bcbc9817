//! Shared harness for the cache services' integration tests: real tonic
//! servers on 127.0.0.1 ephemeral ports, real gRPC clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_store::Store;
use kiln_store::memory::MemoryStore;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub instances: Arc<Instances>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Memory stores behind instances "" and "main" (shared), plus "ro": the
/// same stores with a read-only Action Cache.
pub fn memory_instances(limits: CacheLimits) -> Instances {
    let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(256 << 20));
    let ac: Arc<dyn Store> = Arc::new(MemoryStore::new(64 << 20));
    let mut ro = Instance::new("ro", cas.clone(), ac.clone());
    ro.ac_read_only = true;
    Instances::new(
        [
            Instance::new("", cas.clone(), ac.clone()),
            Instance::new("main", cas, ac),
            ro,
        ],
        limits,
    )
}

pub async fn start(instances: Instances) -> TestServer {
    let instances = Arc::new(instances);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut routes = tonic::service::RoutesBuilder::default();
    kiln_cache::add_routes(&mut routes, instances.clone());
    let (tx, rx) = oneshot::channel::<()>();
    // serve_with_incoming ignores Server::tcp_nodelay: set it on the incoming.
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
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    TestServer {
        addr,
        channel,
        instances,
        shutdown: Some(tx),
    }
}

pub async fn start_memory() -> TestServer {
    start(memory_instances(CacheLimits::default())).await
}
