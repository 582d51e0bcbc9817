//! `/api/queue` and `/api/workers`: the scheduler's live state.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use kiln_scheduler::state::snapshot::{ActionSnapshot, StateSnapshot};
use serde::Serialize;

use crate::digest_path::instance_segment;
use crate::json::{self, DigestJson, MetadataJson, Property};
use crate::state::Shared;

fn elapsed_ms(now: SystemTime, since: SystemTime) -> i64 {
    now.duration_since(since)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Serialize)]
pub struct ActionJson {
    operations: Vec<String>,
    instance: String,
    digest: DigestJson,
    mnemonic: String,
    target_id: String,
    invocation_id: String,
    priority: i32,
    platform: Vec<Property>,
    queued_at: i64,
    attempts: u32,
}

impl ActionJson {
    fn of(a: &ActionSnapshot) -> Self {
        ActionJson {
            operations: a.operations.clone(),
            instance: instance_segment(&a.instance_name).to_string(),
            digest: DigestJson::new(a.digest_function, &a.action_digest),
            mnemonic: a.mnemonic.clone(),
            target_id: a.target_id.clone(),
            invocation_id: a.invocation_id.clone(),
            priority: a.priority,
            platform: json::platform(Some(&a.platform)),
            queued_at: json::ms(a.queued_at),
            attempts: a.attempts,
        }
    }
}

#[derive(Serialize)]
pub struct QueuedJson {
    #[serde(flatten)]
    action: ActionJson,
    waiting_ms: i64,
}

#[derive(Serialize)]
pub struct ExecutingJson {
    #[serde(flatten)]
    action: ActionJson,
    worker: String,
    worker_id: String,
    lease_id: String,
    assigned_at: i64,
    running_ms: i64,
    /// "assigned", "started", "fetching", "executing" or "uploading".
    phase: &'static str,
    progress: Option<MetadataJson>,
}

#[derive(Serialize)]
pub struct QueueJson {
    execution: bool,
    now: i64,
    queued_total: usize,
    queued: Vec<QueuedJson>,
    executing_total: usize,
    executing: Vec<ExecutingJson>,
}

async fn snapshot(state: &Shared) -> Option<StateSnapshot> {
    match &state.scheduler {
        Some(s) => Some(s.snapshot().await),
        None => None,
    }
}

/// Queued and executing actions, with the worker running each.
pub async fn queue(State(state): State<Shared>) -> Json<QueueJson> {
    let Some(snap) = snapshot(&state).await else {
        return Json(QueueJson {
            execution: false,
            now: json::ms(SystemTime::now()),
            queued_total: 0,
            queued: Vec::new(),
            executing_total: 0,
            executing: Vec::new(),
        });
    };
    let now = snap.taken_at;
    Json(QueueJson {
        execution: true,
        now: json::ms(now),
        queued_total: snap.queued_total,
        queued: snap
            .queued
            .iter()
            .map(|q| QueuedJson {
                action: ActionJson::of(&q.action),
                waiting_ms: elapsed_ms(now, q.action.queued_at),
            })
            .collect(),
        executing_total: snap.executing_total,
        executing: snap
            .executing
            .iter()
            .map(|e| ExecutingJson {
                action: ActionJson::of(&e.action),
                worker: e.worker_name.clone(),
                worker_id: e.worker_id.clone(),
                lease_id: e.lease_id.clone(),
                assigned_at: json::ms(e.assigned_at),
                running_ms: elapsed_ms(now, e.assigned_at),
                phase: json::phase(e.started, e.progress.as_ref()),
                progress: e.progress.as_ref().map(MetadataJson::of),
            })
            .collect(),
    })
}

#[derive(Serialize)]
pub struct RunningRef {
    operation: String,
    instance: String,
    digest: DigestJson,
    mnemonic: String,
    phase: &'static str,
    running_ms: i64,
}

#[derive(Serialize)]
pub struct WorkerJson {
    id: String,
    name: String,
    slots: u32,
    busy: u32,
    load: f64,
    properties: Vec<Property>,
    connected: bool,
    draining: bool,
    last_seen: i64,
    last_seen_ago_ms: i64,
    running: Vec<RunningRef>,
}

#[derive(Serialize)]
pub struct WorkersJson {
    execution: bool,
    now: i64,
    slots: u64,
    busy: u64,
    queued_total: usize,
    workers: Vec<WorkerJson>,
}

/// Workers with their slots, load, properties and what they run.
pub async fn workers(State(state): State<Shared>) -> Json<WorkersJson> {
    let Some(snap) = snapshot(&state).await else {
        return Json(WorkersJson {
            execution: false,
            now: json::ms(SystemTime::now()),
            slots: 0,
            busy: 0,
            queued_total: 0,
            workers: Vec::new(),
        });
    };
    let now = snap.taken_at;
    let workers: Vec<WorkerJson> = snap
        .workers
        .iter()
        .map(|w| WorkerJson {
            id: w.id.clone(),
            name: w.name.clone(),
            slots: w.slots,
            busy: w.busy,
            load: w.load,
            properties: json::properties(w.properties.iter().map(|(name, value)| (name, value))),
            connected: w.connected,
            draining: w.draining,
            last_seen: json::ms(w.last_seen),
            last_seen_ago_ms: elapsed_ms(now, w.last_seen),
            running: snap
                .executing
                .iter()
                .filter(|e| e.worker_id == w.id)
                .map(|e| RunningRef {
                    operation: e.action.operations.first().cloned().unwrap_or_default(),
                    instance: instance_segment(&e.action.instance_name).to_string(),
                    digest: DigestJson::new(e.action.digest_function, &e.action.action_digest),
                    mnemonic: e.action.mnemonic.clone(),
                    phase: json::phase(e.started, e.progress.as_ref()),
                    running_ms: elapsed_ms(now, e.assigned_at),
                })
                .collect(),
        })
        .collect();
    Json(WorkersJson {
        execution: true,
        now: json::ms(now),
        slots: workers.iter().map(|w| u64::from(w.slots)).sum(),
        busy: workers.iter().map(|w| u64::from(w.busy)).sum(),
        queued_total: snap.queued_total,
        workers,
    })
}
