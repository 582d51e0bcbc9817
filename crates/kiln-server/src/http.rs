//! The HTTP listener: `/healthz` (later also metrics and the dashboard).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use kiln_cache::Instances;
use tokio::net::TcpListener;

use crate::ServerError;

pub async fn serve(
    listener: TcpListener,
    instances: Arc<Instances>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let app = Router::new().route("/healthz", get(healthz)).with_state(instances);
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on an HTTP connection");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServerError::Io {
            context: "HTTP server".into(),
            source,
        })
}

/// 200 with one line per instance when the server is up.
async fn healthz(State(instances): State<Arc<Instances>>) -> (StatusCode, String) {
    let mut names: Vec<_> = instances.iter().map(|i| format!("{:?}", i.name)).collect();
    names.sort();
    (StatusCode::OK, format!("ok\ninstances: {}\n", names.join(", ")))
}
