//! `/api/events`: a Server-Sent Events stream of small `state` events
//! (latest action sequence number, samples taken, queue and worker counts)
//! sent every second and as soon as an action finishes. One named task
//! ([`spawn_feed`]) builds each event once for every open stream. Pages
//! refetch what they show when a value they depend on changes. Every stream
//! ends when the server shuts down, so graceful shutdown never waits on an
//! open tab.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use kiln_scheduler::Scheduler;
use serde::Serialize;
use tokio::sync::watch;

use crate::history::History;
use crate::json;
use crate::recent::RecentActions;
use crate::state::Shared;

/// Period of `state` events when nothing happens.
pub const TICK: Duration = Duration::from_secs(1);
/// Coalesces bursts of finished actions into one event.
const DEBOUNCE: Duration = Duration::from_millis(150);

#[derive(Serialize)]
struct StateEvent {
    now: i64,
    /// Sequence number of the latest finished action.
    seq: u64,
    /// Time of the latest overview sample (changes every sample interval).
    sampled_at: Option<i64>,
    queued: usize,
    executing: usize,
    workers: usize,
}

/// The data of the latest `state` event (`None` until the first is built).
pub type Feed = watch::Receiver<Option<Arc<str>>>;

/// Builds the `state` event every [`TICK`] and soon after an action
/// finishes, in a named task that stops at shutdown (or when its sender is
/// dropped) or once nothing follows the feed any more.
pub fn spawn_feed(
    scheduler: Option<Arc<Scheduler>>,
    recent: &RecentActions,
    history: Arc<History>,
    mut shutdown: watch::Receiver<bool>,
) -> (Feed, tokio::task::JoinHandle<()>) {
    let (tx, feed) = watch::channel(None);
    let mut actions = recent.subscribe();
    let task = kiln_store::task::spawn("dashboard-events", async move {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The first tick fires at once: the feed has a value right away.
            let action_finished = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = tx.closed() => break,
                changed = actions.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    true
                }
                _ = ticks.tick() => false,
            };
            if action_finished {
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                }
            }
            let (queued, executing, workers) = match &scheduler {
                Some(s) => {
                    let st = s.stats().await;
                    (st.queued, st.executing, st.connected_workers)
                }
                None => (0, 0, 0),
            };
            let event = StateEvent {
                now: json::ms(SystemTime::now()),
                seq: *actions.borrow_and_update(),
                sampled_at: history.latest_at().map(json::ms),
                queued,
                executing,
                workers,
            };
            let data = serde_json::to_string(&event).unwrap_or_else(|_| "{}".into());
            tx.send_replace(Some(data.into()));
        }
        tracing::debug!("dashboard event feed stopped");
    });
    (feed, task)
}

pub async fn events(State(state): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut feed = state.events.clone();
    // A new page gets the latest state at once.
    feed.mark_changed();
    let shutdown = state.shutdown.clone();
    let stream = futures::stream::unfold((feed, shutdown), |(mut feed, mut shutdown)| async move {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return None,
                changed = feed.changed() => changed.ok()?,
            }
            let data = feed.borrow_and_update().clone();
            if let Some(data) = data {
                let event = Event::default().event("state").data(&*data);
                return Some((Ok(event), (feed, shutdown)));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::SAMPLE_INTERVAL;
    use crate::recent::tests::record;
    use kiln_scheduler::ActionObserver;

    fn seq_of(feed: &Feed) -> Option<u64> {
        let data = feed.borrow().clone()?;
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        v["seq"].as_u64()
    }

    #[tokio::test]
    async fn feed_follows_finished_actions_and_stops_at_shutdown() {
        let recent = Arc::new(RecentActions::new(10));
        let history = Arc::new(History::new(10, SAMPLE_INTERVAL));
        let (stop, shutdown) = watch::channel(false);
        let (mut feed, task) = spawn_feed(None, &recent, history, shutdown);
        let limit = Duration::from_secs(5);
        tokio::time::timeout(limit, feed.wait_for(Option::is_some))
            .await
            .expect("a first event at once")
            .unwrap();
        assert_eq!(seq_of(&feed), Some(0));
        recent.action_completed(&record("operations/x", true, 0));
        tokio::time::timeout(limit, async {
            while seq_of(&feed) != Some(1) {
                feed.changed().await.unwrap();
            }
        })
        .await
        .expect("the finished action is announced");
        stop.send_replace(true);
        tokio::time::timeout(limit, task)
            .await
            .expect("the feed stops at shutdown")
            .unwrap();
        assert!(feed.changed().await.is_err(), "followers see the end");
    }
}
