//! The JSON API under `/api` (documented in docs/dashboard.md).

mod action;
mod actions;
mod blobs;
mod cas;
mod live;
mod overview;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;

use crate::digest_path::instance_segment;
use crate::state::{AppState, Shared};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/instances", get(instances))
        .route("/overview", get(overview::overview))
        .route("/queue", get(live::queue))
        .route("/workers", get(live::workers))
        .route("/actions", get(actions::recent))
        .route("/action", get(action::by_operation))
        .route(
            "/action/{instance}/{function}/{hash}/{size}",
            get(action::by_digest),
        )
        .route("/cas/{instance}/{function}/{hash}/{size}", get(cas::download))
        .route("/cas/{instance}/{function}/{hash}/{size}/info", get(cas::info))
        .route(
            "/cas/{instance}/{function}/{hash}/{size}/directory",
            get(cas::directory),
        )
        .route("/cas/{instance}/{function}/{hash}/{size}/tree", get(cas::tree))
        .route("/events", get(crate::sse::events))
        .fallback(not_found)
}

async fn not_found() -> crate::DashboardError {
    crate::DashboardError::NotFound("no such API endpoint; see docs/dashboard.md".into())
}

#[derive(Serialize)]
struct InstanceJson {
    name: String,
    /// The URL segment naming it (`_` for "").
    segment: String,
    digest_functions: Vec<&'static str>,
}

#[derive(Serialize)]
struct InstancesJson {
    instances: Vec<InstanceJson>,
    execution: bool,
}

/// The served instances and their digest functions.
async fn instances(State(state): State<Shared>) -> Json<InstancesJson> {
    let s: &AppState = &state;
    let mut list: Vec<InstanceJson> = s
        .instances
        .iter()
        .map(|i| InstanceJson {
            name: i.name.clone(),
            segment: instance_segment(&i.name).to_string(),
            digest_functions: i.digest_functions.iter().map(|f| f.name()).collect(),
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Json(InstancesJson {
        instances: list,
        execution: s.scheduler.is_some(),
    })
}
