//! The HTTP listener: `/healthz`, `/stats`, `/metrics` and the web
//! dashboard (`/`, `/assets/...`, `/api/...`, see the kiln-dashboard crate).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use kiln_cache::Instances;
use kiln_store::Store;
use tokio::net::TcpListener;

use crate::ServerError;
use crate::metrics::MetricsRegistry;

#[derive(Clone)]
struct HttpState {
    instances: Arc<Instances>,
    stores: Arc<BTreeMap<String, Arc<dyn Store>>>,
    metrics: Arc<MetricsRegistry>,
}

pub async fn serve(
    listener: TcpListener,
    instances: Arc<Instances>,
    stores: BTreeMap<String, Arc<dyn Store>>,
    server_metrics: Arc<crate::metrics::ServerMetrics>,
    dashboard: Option<Router>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let stores = Arc::new(stores);
    let metrics = Arc::new(MetricsRegistry::new(server_metrics, &instances, stores.clone()));
    let state = HttpState {
        instances,
        stores,
        metrics,
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics_text))
        .with_state(state)
        .merge(dashboard.unwrap_or_default());
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

/// 200 with the instance names when the server is up.
async fn healthz(State(state): State<HttpState>) -> (StatusCode, String) {
    let mut names: Vec<_> = state.instances.iter().map(|i| format!("{:?}", i.name)).collect();
    names.sort();
    (StatusCode::OK, format!("ok\ninstances: {}\n", names.join(", ")))
}

/// Every named store's own accounting, as JSON.
async fn stats(State(state): State<HttpState>) -> impl IntoResponse {
    let stores: serde_json::Map<String, serde_json::Value> = state
        .stores
        .iter()
        .map(|(name, store)| {
            let s = store.stats();
            let v = serde_json::json!({
                "describe": store.describe(),
                "bytes": s.bytes,
                "items": s.items,
                "capacity": s.capacity,
                "evictions": s.evictions,
                "oldest_age_secs": s.oldest_age_secs,
            });
            (name.clone(), v)
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "stores": stores }).to_string(),
    )
}

/// Prometheus metrics in the OpenMetrics text format.
async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    if !state.metrics.enabled() {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics are disabled ([server] metrics = false)\n".to_string(),
        );
    }
    match state.metrics.encode().await {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            text,
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "cannot encode metrics\n".to_string(),
            )
        }
    }
}

/// Restricts `router` to requests whose `Host` names the loopback address
/// it is served on, when `addr` is a loopback address: a web page from
/// elsewhere that rebinds its own DNS name to 127.0.0.1 (DNS rebinding)
/// cannot read the dashboard through the user's browser. Other addresses
/// are served as they are (they are reachable by name anyway).
pub fn loopback_only(router: Router, addr: std::net::SocketAddr) -> Router {
    if !addr.ip().is_loopback() {
        return router;
    }
    let port = addr.port();
    let allowed: Arc<Vec<String>> = Arc::new(
        ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .flat_map(|h| [format!("{h}:{port}"), h.to_string()])
            .chain(std::iter::once(addr.to_string()))
            .collect(),
    );
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let allowed = allowed.clone();
            async move {
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_ascii_lowercase);
                match host {
                    Some(h) if allowed.contains(&h) => next.run(req).await,
                    _ => (
                        StatusCode::FORBIDDEN,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!(
                            "the dashboard answers only requests for http://127.0.0.1:{port}/ or \
                             http://localhost:{port}/ (the Host header named another host)\n"
                        ),
                    )
                        .into_response(),
                }
            }
        },
    ))
}
