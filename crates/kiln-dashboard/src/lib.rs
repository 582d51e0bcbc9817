//! Kiln's web dashboard, served by `kiln` itself on the HTTP port.
//!
//! A single-page app (plain HTML, CSS and ES modules under `assets/`,
//! embedded in the binary: it works offline) over a JSON API:
//!
//! * [`api`]: `/api/...` endpoints (overview time series, live queue and
//!   workers, recent actions, one action's details, the CAS browser);
//! * [`sse`]: `/api/events`, a Server-Sent Events stream telling open pages
//!   when something changed (one background task builds each event for
//!   every stream; streams end when the server shuts down);
//! * [`history`]: the background sampler behind the overview charts (every
//!   10 s, one hour kept);
//! * [`recent`]: the [`kiln_scheduler::ActionObserver`] keeping the last
//!   finished actions;
//! * [`assets`]: the embedded front-end.
//!
//! Wiring: build a [`DashboardContext`] and merge [`router`] into the HTTP
//! server's router. See docs/dashboard.md.

mod api;
mod assets;
mod digest_path;
mod error;
mod history;
mod json;
mod recent;
mod sse;
mod state;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use kiln_cache::Instances;
use kiln_scheduler::Scheduler;
use kiln_store::Store;
use tokio::sync::watch;

pub use error::DashboardError;
pub use history::{HISTORY_POINTS, SAMPLE_INTERVAL};
pub use recent::RECENT_ACTIONS;

/// What the dashboard reads.
pub struct DashboardContext {
    pub instances: Arc<Instances>,
    /// The scheduler, when this server runs remote execution.
    pub scheduler: Option<Arc<Scheduler>>,
    /// The configured stores by name (usage charts).
    pub stores: BTreeMap<String, Arc<dyn Store>>,
    /// Becomes `true` when the server shuts down: live streams end and the
    /// sampler stops. A dropped sender counts as shutdown too.
    pub shutdown: watch::Receiver<bool>,
}

impl DashboardContext {
    pub fn new(
        instances: Arc<Instances>,
        scheduler: Option<Arc<Scheduler>>,
        stores: BTreeMap<String, Arc<dyn Store>>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        DashboardContext {
            instances,
            scheduler,
            stores,
            shutdown,
        }
    }
}

/// The dashboard's routes: `/` (the app), `/assets/...` and `/api/...`.
/// Registers its action observer with the scheduler and starts the history
/// sampler and the live event feed (named tasks that stop at shutdown), so
/// it must be called inside a tokio runtime, once per server.
pub fn router(ctx: DashboardContext) -> Router {
    let state = state::AppState::start(ctx);
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{*file}", get(assets::asset))
        .nest("/api", api::routes())
        .with_state(state)
}
