//! The state every handler shares.

use std::sync::Arc;
use std::time::SystemTime;

use kiln_cache::Instances;
use kiln_scheduler::Scheduler;
use tokio::sync::watch;

use crate::DashboardContext;
use crate::history::{HISTORY_POINTS, History, SAMPLE_INTERVAL, Sources, spawn_sampler};
use crate::recent::{RECENT_ACTIONS, RecentActions};
use crate::sse::{Feed, spawn_feed};

pub struct AppState {
    pub instances: Arc<Instances>,
    pub scheduler: Option<Arc<Scheduler>>,
    pub sources: Arc<Sources>,
    pub history: Arc<History>,
    pub recent: Arc<RecentActions>,
    /// The `state` events of `/api/events`.
    pub events: Feed,
    pub shutdown: watch::Receiver<bool>,
    pub started_at: SystemTime,
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// Registers the recent-actions observer and starts the sampler and the
    /// live event feed.
    pub fn start(ctx: DashboardContext) -> Shared {
        let recent = Arc::new(RecentActions::new(RECENT_ACTIONS));
        if let Some(s) = &ctx.scheduler {
            s.add_observer(recent.clone());
        }
        let sources = Arc::new(Sources {
            instances: ctx.instances.clone(),
            stores: ctx.stores.into_iter().collect(),
            recent: recent.clone(),
        });
        let history = Arc::new(History::new(HISTORY_POINTS, SAMPLE_INTERVAL));
        spawn_sampler(&history, sources.clone(), ctx.shutdown.clone());
        let (events, _) = spawn_feed(
            ctx.scheduler.clone(),
            &recent,
            history.clone(),
            ctx.shutdown.clone(),
        );
        Arc::new(AppState {
            instances: ctx.instances,
            scheduler: ctx.scheduler,
            sources,
            history,
            recent,
            events,
            shutdown: ctx.shutdown,
            started_at: SystemTime::now(),
        })
    }
}
