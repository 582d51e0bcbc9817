//! The gRPC listener: every REAPI service plus grpc.health.v1.

use std::sync::Arc;

use kiln_cache::Instances;
use kiln_scheduler::Scheduler;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::ServerError;

/// Fully-qualified names of the services Kiln serves, for health checks.
pub const SERVICE_NAMES: &[&str] = &[
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "google.bytestream.ByteStream",
];

/// Services added when remote execution is enabled.
pub const EXECUTION_SERVICE_NAMES: &[&str] = &[
    "build.bazel.remote.execution.v2.Execution",
    "google.longrunning.Operations",
    "kiln.worker.v1.WorkerApi",
    "kiln.status.v1.Status",
];

/// Serves until `shutdown` resolves. Every accepted socket gets
/// TCP_NODELAY: without it small round trips wait ~40 ms on Nagle's
/// algorithm and delayed ACKs.
pub async fn serve(
    listener: TcpListener,
    instances: Arc<Instances>,
    scheduler: Option<Arc<Scheduler>>,
    metrics: Arc<crate::metrics::ServerMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let execution = if scheduler.is_some() {
        EXECUTION_SERVICE_NAMES
    } else {
        &[]
    };
    for name in SERVICE_NAMES.iter().chain(execution).chain(std::iter::once(&"")) {
        reporter.set_service_status(*name, ServingStatus::Serving).await;
    }
    let mut routes = tonic::service::RoutesBuilder::default();
    kiln_cache::add_routes(&mut routes, instances.clone());
    if let Some(s) = &scheduler {
        s.add_routes(&mut routes);
    }
    routes.add_service(health);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        // Large flow-control windows let one ByteStream saturate loopback
        // and fast networks instead of stalling on 64 KiB windows.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .layer(metrics.grpc_layer())
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
