//! The HTTP listener: `/healthz` and `/stats` (later also metrics and the
//! dashboard).

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

#[derive(Clone)]
struct HttpState {
    instances: Arc<Instances>,
    stores: Arc<BTreeMap<String, Arc<dyn Store>>>,
}

pub async fn serve(
    listener: TcpListener,
    instances: Arc<Instances>,
    stores: BTreeMap<String, Arc<dyn Store>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let state = HttpState {
        instances,
        stores: Arc::new(stores),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .with_state(state);
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
