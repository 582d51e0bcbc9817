//! A read-only copy of the live scheduler state — queued and executing
//! actions, workers — for the dashboard and status commands
//! ([`super::SchedulerState::snapshot`]). Bounded: at most
//! [`SNAPSHOT_MAX_ACTIONS`] queued and as many executing actions are
//! copied; the totals say how many there are.

use std::time::SystemTime;

use kiln_digest::DigestFunction;
use kiln_proto::reapi::{Digest, ExecutedActionMetadata, Platform};

/// Most queued (and, separately, executing) actions one snapshot copies.
pub const SNAPSHOT_MAX_ACTIONS: usize = 1000;

/// What the live pages show of the scheduler at one moment.
#[derive(Debug, Clone)]
pub struct StateSnapshot {
    pub taken_at: SystemTime,
    /// Queued actions, those that run soonest first (priority, then age).
    pub queued: Vec<QueuedAction>,
    /// How many actions are queued (may exceed `queued.len()`).
    pub queued_total: usize,
    /// Queued actions per platform, as in
    /// [`super::StateStats::queued_by_platform`] (taken at the same moment
    /// as the rest of the snapshot).
    pub queued_by_platform: Vec<(String, usize)>,
    /// Executing actions, the oldest assignment first.
    pub executing: Vec<ExecutingAction>,
    /// How many actions are executing (may exceed `executing.len()`).
    pub executing_total: usize,
    /// Every registered worker, by name.
    pub workers: Vec<WorkerSnapshot>,
}

/// An action waiting for, or running on, a worker.
#[derive(Debug, Clone)]
pub struct ActionSnapshot {
    /// Operations following it (several when identical actions merged).
    pub operations: Vec<String>,
    pub instance_name: String,
    pub digest_function: DigestFunction,
    pub action_digest: Digest,
    /// Effective platform.
    pub platform: Platform,
    /// ExecutionPolicy.priority (lower runs sooner).
    pub priority: i32,
    pub invocation_id: String,
    /// RequestMetadata.action_mnemonic ("" when absent).
    pub mnemonic: String,
    /// RequestMetadata.target_id ("" when absent).
    pub target_id: String,
    /// When it was first queued (kept across re-queues).
    pub queued_at: SystemTime,
    /// Times it was assigned to a worker so far.
    pub attempts: u32,
}

#[derive(Debug, Clone)]
pub struct QueuedAction {
    pub action: ActionSnapshot,
}

#[derive(Debug, Clone)]
pub struct ExecutingAction {
    pub action: ActionSnapshot,
    pub worker_id: String,
    /// The worker's display name (its id when it sent no name).
    pub worker_name: String,
    pub lease_id: String,
    pub assigned_at: SystemTime,
    /// The worker confirmed it started the action.
    pub started: bool,
    /// The latest partial metadata the worker reported (phase timestamps),
    /// if any.
    pub progress: Option<ExecutedActionMetadata>,
}

#[derive(Debug, Clone)]
pub struct WorkerSnapshot {
    pub id: String,
    /// Display name (the id when the worker sent no name).
    pub name: String,
    pub slots: u32,
    /// Leases it holds.
    pub busy: u32,
    /// Its last reported load (1-minute load average per core; 0 before the
    /// first heartbeat).
    pub load: f64,
    /// Advertised properties as (name, value), sorted; a capacity property
    /// appears with its total.
    pub properties: Vec<(String, String)>,
    pub connected: bool,
    pub draining: bool,
    /// Last message received from it.
    pub last_seen: SystemTime,
}
