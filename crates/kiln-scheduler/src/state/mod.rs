//! All scheduler state — operations, the ready queue, the worker registry
//! and leases — behind one trait, [`SchedulerState`].
//!
//! Each method is one atomic transition (a transaction in a shared store).
//! Methods never perform network I/O towards workers or clients: what must
//! be sent is returned as [`Effects`], which the caller delivers after the
//! call returns. Operation updates reach clients through
//! [`OperationWatch`]es. The in-memory implementation is [`memory`]; a
//! shared implementation (Redis) can implement the same trait so that
//! several schedulers serve one fleet.

pub mod memory;
pub mod snapshot;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::{Action, Command, Digest, ExecuteResponse, ExecutedActionMetadata, Platform};
use kiln_proto::request_info::RequestInfo;
use kiln_proto::worker::{Heartbeat, LocalCacheCounters, Progress, SchedulerCommand};
use tokio::sync::watch;

use crate::error::SchedulerResult;
use crate::platform::{Requirements, WorkerCaps};

pub type WorkerId = String;
/// Identifies one `Connect` stream of a worker; events from a stream that
/// was replaced by a newer one are ignored.
pub type ConnId = u64;

/// A validated action, ready to queue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub instance_name: String,
    pub digest_function: DigestFunction,
    pub action_key: BlobKey,
    pub action: Action,
    pub command: Command,
    /// Effective platform (Action's, else Command's).
    pub platform: Platform,
    pub requirements: Requirements,
    /// ExecutionPolicy.priority (lower runs sooner).
    pub priority: i32,
    /// The Execute call's RequestMetadata (for the completion record; its
    /// `tool_invocation_id`, "" when absent, is the fair-share invocation).
    pub request: RequestInfo,
    /// Effective timeout.
    pub timeout: Duration,
    /// !Action.do_not_cache: identical in-flight actions are merged and the
    /// result may be written to the Action Cache.
    pub cacheable: bool,
}

/// What clients see of an operation.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationView {
    pub name: String,
    /// The instance the action was submitted to.
    pub instance_name: String,
    pub stage: Stage,
    pub action_digest: Digest,
    pub digest_function: DigestFunction,
    pub partial_metadata: Option<ExecutedActionMetadata>,
    /// Set exactly when the stage is COMPLETED.
    pub response: Option<ExecuteResponse>,
}

impl OperationView {
    pub fn done(&self) -> bool {
        self.stage == Stage::Completed
    }
}

/// Follows one operation; the value is replaced at every change.
pub type OperationWatch = watch::Receiver<Arc<OperationView>>;

/// Result of [`SchedulerState::submit`].
pub struct Submitted {
    pub watch: OperationWatch,
    /// Whether an identical in-flight action was joined.
    pub joined: bool,
    pub effects: Effects,
}

/// A worker's `Register`, validated.
#[derive(Debug, Clone)]
pub struct WorkerRegistration {
    pub worker_id: WorkerId,
    /// As the worker sent it; may be empty, in which case the state names
    /// the worker by its id (a stored worker name is never empty).
    pub name: String,
    pub caps: WorkerCaps,
    pub slots: u32,
    pub running_leases: Vec<String>,
}

/// What the scheduler needs to know about a lease before accepting its
/// result (to write the Action Cache).
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The job the lease runs (instance, action key, cacheability, and what
    /// the completion record reports).
    pub job: Arc<NewJob>,
    /// The first operation of the job.
    pub operation: String,
    /// The worker's display name (never empty: its id when it sent none).
    pub worker_name: String,
    pub queued_at: SystemTime,
}

/// A command for the worker stream `conn` of `worker`. It is delivered only
/// if that stream is still the worker's current one; an undeliverable
/// `Assign` is reported back through [`SchedulerState::assign_undeliverable`].
#[derive(Debug)]
pub struct Outgoing {
    pub worker: WorkerId,
    pub conn: ConnId,
    pub command: SchedulerCommand,
}

/// Messages to deliver once a state transition is done.
#[derive(Debug, Default)]
pub struct Effects {
    pub commands: Vec<Outgoing>,
    /// Worker streams to close (the worker was declared lost or removed).
    pub close: Vec<(WorkerId, ConnId)>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.close.is_empty()
    }

    pub fn extend(&mut self, other: Effects) {
        self.commands.extend(other.commands);
        self.close.extend(other.close);
    }
}

/// Counters for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateStats {
    pub queued: usize,
    pub executing: usize,
    /// Operations known (running and retained completed ones).
    pub operations: usize,
    pub workers: usize,
    pub connected_workers: usize,
    /// Queued actions per platform (the requirements' display form, e.g.
    /// "OSFamily=linux"), sorted by platform.
    pub queued_by_platform: Vec<(String, usize)>,
    /// Slots of the connected workers.
    pub slots: u64,
    /// Leases the connected workers hold.
    pub busy_slots: u64,
    /// Each connected worker's last reported local cache counters, by
    /// worker name (workers that reported none are absent).
    pub worker_local_cache: Vec<(String, LocalCacheCounters)>,
}

/// Fills what the scheduler knows into a worker's execution metadata: the
/// worker's name and the queued time, unless the worker set them.
pub(crate) fn fill_execution_metadata(
    md: &mut ExecutedActionMetadata,
    worker_name: &str,
    queued_at: SystemTime,
) {
    if md.worker.is_empty() {
        md.worker = worker_name.to_string();
    }
    if md.queued_timestamp.is_none() {
        md.queued_timestamp = Some(crate::operations::to_timestamp(queued_at));
    }
}

#[async_trait]
pub trait SchedulerState: Send + Sync + 'static {
    // ---- operations ----

    /// Creates an operation for `job`, joining an identical in-flight
    /// cacheable action when there is one, else queuing it. Fails with
    /// FAILED_PRECONDITION when workers are registered and none could ever
    /// run it.
    async fn submit(&self, job: NewJob, now: SystemTime) -> SchedulerResult<Submitted>;

    /// Follows an operation (counts as a watcher while the receiver lives).
    async fn watch(&self, name: &str, now: SystemTime) -> Option<OperationWatch>;

    /// Current view of an operation; counts as a sign of interest.
    async fn get(&self, name: &str, now: SystemTime) -> Option<Arc<OperationView>>;

    /// Operations sorted by name, after `page_token` (a name), at most `page_size`.
    async fn list(&self, page_size: usize, page_token: &str) -> (Vec<Arc<OperationView>>, String);

    /// Cancels an operation: completes it with CANCELLED and stops its
    /// action when no other operation shares it. NOT_FOUND if unknown.
    async fn cancel(&self, name: &str, reason: &str, now: SystemTime) -> SchedulerResult<Effects>;

    /// Cancels (if running) and forgets an operation. NOT_FOUND if unknown.
    async fn delete(&self, name: &str, now: SystemTime) -> SchedulerResult<Effects>;

    // ---- workers ----

    /// A worker (re)connected on stream `conn`. Returns `Cancel`s for leases
    /// it reported that are no longer its own, and new assignments.
    async fn register_worker(&self, reg: WorkerRegistration, conn: ConnId, now: SystemTime) -> Effects;

    async fn heartbeat(&self, worker: &str, conn: ConnId, hb: &Heartbeat, now: SystemTime) -> Effects;

    async fn lease_started(&self, worker: &str, conn: ConnId, lease: &str, now: SystemTime) -> Effects;

    async fn lease_progress(
        &self,
        worker: &str,
        conn: ConnId,
        progress: &Progress,
        now: SystemTime,
    ) -> Effects;

    /// The lease if it is currently assigned to `worker`.
    async fn lease_info(&self, worker: &str, lease: &str) -> Option<LeaseInfo>;

    /// Completes every operation of the lease's action with `response`.
    async fn lease_finished(
        &self,
        worker: &str,
        conn: ConnId,
        lease: &str,
        response: ExecuteResponse,
        now: SystemTime,
    ) -> Effects;

    /// Re-queues a lease the worker gave back (not a failed attempt).
    async fn lease_handed_back(&self, worker: &str, conn: ConnId, lease: &str, now: SystemTime) -> Effects;

    async fn worker_draining(&self, worker: &str, conn: ConnId, now: SystemTime) -> Effects;

    /// Stream `conn` ended. A draining worker is removed (its leases
    /// re-queued); another keeps its leases until it reconnects or is lost.
    async fn worker_disconnected(&self, worker: &str, conn: ConnId, now: SystemTime) -> Effects;

    /// An `Assign` for stream `conn` could not be delivered (stream gone or
    /// replaced): re-queue it (not a failed attempt).
    async fn assign_undeliverable(&self, worker: &str, conn: ConnId, lease: &str, now: SystemTime)
    -> Effects;

    // ---- time ----

    /// Enforces every deadline: lost workers, lease deadlines, unwatched
    /// operations, actions no worker can run, retention of completed
    /// operations.
    async fn tick(&self, now: SystemTime) -> Effects;

    async fn stats(&self) -> StateStats;

    /// A bounded read-only copy of the queued and executing actions and the
    /// workers, for the dashboard (see [`snapshot`]).
    async fn snapshot(&self, now: SystemTime) -> snapshot::StateSnapshot;
}
