//! `/api/events`: a Server-Sent Events stream of small `state` events
//! (latest action sequence number, samples taken, queue and worker counts)
//! sent every second and as soon as an action finishes. Pages refetch what
//! they show when a value they depend on changes. Every stream ends when
//! the server shuts down, so graceful shutdown never waits on an open tab.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::sync::watch;

use crate::json;
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

struct Follow {
    state: Shared,
    actions: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    ticks: tokio::time::Interval,
}

impl Follow {
    /// Waits for the next reason to send; `None` at shutdown.
    async fn next(&mut self) -> Option<()> {
        let action_finished = tokio::select! {
            biased;
            _ = self.shutdown.wait_for(|stop| *stop) => return None,
            changed = self.actions.changed() => {
                changed.ok()?;
                true
            }
            _ = self.ticks.tick() => false,
        };
        if action_finished {
            tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|stop| *stop) => return None,
                _ = tokio::time::sleep(DEBOUNCE) => {}
            }
        }
        Some(())
    }

    async fn event(&mut self) -> Event {
        let (queued, executing, workers) = match &self.state.scheduler {
            Some(s) => {
                let st = s.stats().await;
                (st.queued, st.executing, st.connected_workers)
            }
            None => (0, 0, 0),
        };
        let body = StateEvent {
            now: json::ms(std::time::SystemTime::now()),
            seq: *self.actions.borrow_and_update(),
            sampled_at: self.state.history.latest_at().map(json::ms),
            queued,
            executing,
            workers,
        };
        let data = serde_json::to_string(&body).unwrap_or_else(|_| "{}".into());
        Event::default().event("state").data(data)
    }
}

pub async fn events(State(state): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let follow = Follow {
        actions: state.recent.subscribe(),
        shutdown: state.shutdown.clone(),
        state,
        ticks,
    };
    // The first tick fires at once: a new page gets the state immediately.
    let stream = futures::stream::unfold(follow, |mut f| async move {
        f.next().await?;
        let event = f.event().await;
        Some((Ok(event), f))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
