//! In-memory [`SchedulerState`]: one mutex over plain maps. Every method
//! takes the lock once, performs no I/O and no `.await` while holding it,
//! and returns the messages to deliver as [`Effects`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kiln_digest::BlobKey;
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::{ExecuteResponse, ExecutedActionMetadata};
use kiln_proto::worker::{Assign, Cancel, Heartbeat, Progress, SchedulerCommand, scheduler_command};
use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::Code;

use crate::config::SchedulerConfig;
use crate::error::{SchedulerError, SchedulerResult};
use crate::operations::{epoch_ms, error_response, to_proto_duration, to_timestamp};
use crate::platform::{Requirements, WorkerCaps, unsatisfiable_reason};
use crate::queue::{JobId, QueueEntry, QueuePos, ReadyQueue};
use crate::state::{
    ConnId, Effects, LeaseInfo, NewJob, OperationView, OperationWatch, SchedulerState, StateStats, Submitted,
    WorkerRegistration,
};

/// How often (in ticks) unwatched operations are looked for.
const UNWATCHED_SCAN_EVERY: u32 = 10;

pub struct MemoryState {
    config: Arc<SchedulerConfig>,
    inner: Mutex<Inner>,
}

impl MemoryState {
    pub fn new(config: Arc<SchedulerConfig>) -> Self {
        MemoryState {
            inner: Mutex::new(Inner {
                jobs: HashMap::new(),
                dedup: HashMap::new(),
                ops: HashMap::new(),
                leases: HashMap::new(),
                workers: HashMap::new(),
                queue: ReadyQueue::new(config.aging_interval),
                completed: VecDeque::new(),
                next_job: 1,
                ticks: 0,
            }),
            config,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DedupKey {
    instance: String,
    /// The key carries the digest function.
    action: BlobKey,
}

struct Job {
    new: Arc<NewJob>,
    class: Arc<Requirements>,
    invocation: Arc<str>,
    /// Operations attached (several when identical actions were merged).
    ops: Vec<String>,
    queued_at: SystemTime,
    attempts: u32,
    lost_on: Vec<String>,
    state: JobState,
    dedup: Option<DedupKey>,
}

enum JobState {
    Queued(QueuePos),
    Assigned(Lease),
}

struct Lease {
    id: String,
    worker: String,
    assigned_at: SystemTime,
    deadline: SystemTime,
    started: bool,
    /// Consecutive heartbeats that did not list this lease.
    missed: u32,
}

struct Op {
    tx: watch::Sender<Arc<OperationView>>,
    /// The action, while the operation is not done.
    job: Option<JobId>,
    last_touched: SystemTime,
    unwatched_since: Option<SystemTime>,
}

struct Worker {
    name: String,
    caps: WorkerCaps,
    slots: u32,
    /// The live stream, if connected.
    conn: Option<ConnId>,
    draining: bool,
    leases: HashSet<String>,
    reserved: HashMap<String, u64>,
    last_seen: SystemTime,
}

impl Worker {
    fn assignable(&self) -> bool {
        self.conn.is_some() && !self.draining && (self.leases.len() as u64) < u64::from(self.slots)
    }
}

struct Inner {
    jobs: HashMap<JobId, Job>,
    dedup: HashMap<DedupKey, JobId>,
    ops: HashMap<String, Op>,
    /// Lease id → job.
    leases: HashMap<String, JobId>,
    workers: HashMap<String, Worker>,
    queue: ReadyQueue,
    /// Completed operations in completion order, for retention.
    completed: VecDeque<(SystemTime, String)>,
    next_job: JobId,
    ticks: u32,
}

fn cancel_cmd(lease: &str, reason: impl Into<String>) -> SchedulerCommand {
    SchedulerCommand {
        command: Some(scheduler_command::Command::Cancel(Cancel {
            lease_id: lease.to_string(),
            reason: reason.into(),
        })),
    }
}

fn new_lease_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Inner {
    // ---- operations ----

    fn new_op(&mut self, new: &NewJob, job_id: JobId, stage: Stage, now: SystemTime) -> (String, OperationWatch) {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let view = OperationView {
            name: name.clone(),
            stage,
            action_digest: new.action_key.to_digest(),
            digest_function: new.digest_function,
            partial_metadata: None,
            response: None,
        };
        let (tx, rx) = watch::channel(Arc::new(view));
        self.ops.insert(
            name.clone(),
            Op {
                tx,
                job: Some(job_id),
                last_touched: now,
                unwatched_since: None,
            },
        );
        (name, rx)
    }

    fn update_op(&mut self, name: &str, f: impl FnOnce(&mut OperationView)) {
        if let Some(op) = self.ops.get(name) {
            op.tx.send_modify(|v| {
                let mut next = (**v).clone();
                f(&mut next);
                *v = Arc::new(next);
            });
        }
    }

    fn set_job_stage(&mut self, job_id: JobId, stage: Stage, partial: Option<ExecutedActionMetadata>) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        for name in job.ops.clone() {
            let partial = partial.clone();
            self.update_op(&name, |v| {
                v.stage = stage;
                if partial.is_some() {
                    v.partial_metadata = partial;
                }
            });
        }
    }

    fn complete_op(&mut self, name: &str, response: ExecuteResponse, now: SystemTime) {
        let Some(op) = self.ops.get_mut(name) else {
            return;
        };
        if op.job.take().is_none() {
            return; // already done
        }
        self.update_op(name, |v| {
            v.stage = Stage::Completed;
            v.response = Some(response);
        });
        self.completed.push_back((now, name.to_string()));
    }

    // ---- jobs ----

    /// Frees what the job's lease holds (worker slot, reserved capacity,
    /// fair-share count). Leaves `job.state` as it was.
    fn release_lease(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        if let JobState::Assigned(lease) = &job.state {
            self.leases.remove(&lease.id);
            if let Some(w) = self.workers.get_mut(&lease.worker) {
                w.leases.remove(&lease.id);
                for (k, v) in &job.class.minimum {
                    if let Some(r) = w.reserved.get_mut(k) {
                        *r = r.saturating_sub(*v);
                    }
                }
            }
            self.queue.release(&job.invocation);
        }
    }

    /// Removes the job and completes all its operations with `response`.
    fn complete_job(&mut self, job_id: JobId, response: ExecuteResponse, now: SystemTime) {
        self.release_lease(job_id);
        let Some(job) = self.jobs.remove(&job_id) else {
            return;
        };
        if let JobState::Queued(pos) = &job.state {
            self.queue.remove(pos);
        }
        if let Some(key) = &job.dedup
            && self.dedup.get(key) == Some(&job_id)
        {
            self.dedup.remove(key);
        }
        for name in &job.ops {
            self.complete_op(name, response.clone(), now);
        }
    }

    /// Puts an assigned job back in the queue. `lost_on` names the worker
    /// that was lost running it (a failed attempt); `None` for a hand-back
    /// or an undeliverable assignment (the attempt does not count).
    fn requeue(&mut self, job_id: JobId, lost_on: Option<String>, config: &SchedulerConfig, now: SystemTime) {
        self.release_lease(job_id);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        match lost_on {
            Some(worker) => job.lost_on.push(worker),
            None => job.attempts = job.attempts.saturating_sub(1),
        }
        if job.attempts >= config.max_attempts {
            let msg = format!(
                "action {} was assigned {} time(s) and every worker running it was lost ({}); giving up",
                job.new.action_key,
                job.attempts,
                job.lost_on.join(", ")
            );
            tracing::warn!(%msg, "action failed after retries");
            self.complete_job(job_id, error_response(Code::Unavailable, msg), now);
            return;
        }
        let entry = QueueEntry {
            job: job_id,
            priority: job.new.priority,
            enqueued_ms: epoch_ms(job.queued_at),
        };
        let pos = self.queue.push(job.class.clone(), job.invocation.clone(), entry);
        job.state = JobState::Queued(pos);
        self.set_job_stage(job_id, Stage::Queued, None);
    }

    /// Cancels a whole job: removes it from the queue or stops it on its
    /// worker, and completes its operations with `response`.
    fn cancel_job(&mut self, job_id: JobId, response: ExecuteResponse, reason: &str, effects: &mut Effects, now: SystemTime) {
        if let Some(Job {
            state: JobState::Assigned(lease),
            ..
        }) = self.jobs.get(&job_id)
        {
            effects.commands.push((lease.worker.clone(), cancel_cmd(&lease.id, reason)));
        }
        self.complete_job(job_id, response, now);
    }

    /// Detaches one operation from its job (cancelling the job when it was
    /// the last one) and completes it with `response`.
    fn cancel_op(&mut self, name: &str, response: ExecuteResponse, reason: &str, effects: &mut Effects, now: SystemTime) {
        let Some(job_id) = self.ops.get(name).and_then(|o| o.job) else {
            return;
        };
        let last = match self.jobs.get_mut(&job_id) {
            Some(job) => {
                job.ops.retain(|n| n != name);
                job.ops.is_empty()
            }
            None => false,
        };
        self.complete_op(name, response.clone(), now);
        if last {
            self.cancel_job(job_id, response, reason, effects, now);
        }
    }

    // ---- matching ----

    /// Assigns queued actions to workers with free slots until nothing more
    /// fits. Workers with the most free slots go first.
    fn dispatch(&mut self, config: &SchedulerConfig, effects: &mut Effects, now: SystemTime) {
        if self.queue.is_empty() {
            return;
        }
        let mut candidates: Vec<(usize, String)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.assignable())
            .map(|(id, w)| (w.slots as usize - w.leases.len().min(w.slots as usize), id.clone()))
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let now_ms = epoch_ms(now);
        for (_, worker_id) in candidates {
            loop {
                if self.queue.is_empty() {
                    return;
                }
                let Some(w) = self.workers.get(&worker_id) else {
                    break;
                };
                if !w.assignable() {
                    break;
                }
                let picked = self.queue.pick(now_ms, |req| w.caps.fits_now(req, &w.reserved));
                let Some((entry, _, _)) = picked else {
                    break;
                };
                self.assign(entry.job, &worker_id, config, effects, now);
            }
        }
    }

    fn assign(&mut self, job_id: JobId, worker_id: &str, config: &SchedulerConfig, effects: &mut Effects, now: SystemTime) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let lease_id = new_lease_id();
        job.attempts += 1;
        let deadline = now + job.new.timeout + config.lease_grace;
        job.state = JobState::Assigned(Lease {
            id: lease_id.clone(),
            worker: worker_id.to_string(),
            assigned_at: now,
            deadline,
            started: false,
            missed: 0,
        });
        let new = &job.new;
        let assign = Assign {
            lease_id: lease_id.clone(),
            instance_name: new.instance_name.clone(),
            digest_function: new.digest_function.to_proto() as i32,
            action_digest: Some(new.action_key.to_digest()),
            action: Some(new.action.clone()),
            command: Some(new.command.clone()),
            timeout: Some(to_proto_duration(new.timeout)),
            queued_at: Some(to_timestamp(job.queued_at)),
            platform: Some(new.platform.clone()),
            attempt: job.attempts,
            operation_name: job.ops.first().cloned().unwrap_or_default(),
        };
        let minimum = job.class.minimum.clone();
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.leases.insert(lease_id.clone());
            for (k, v) in minimum {
                *w.reserved.entry(k).or_default() += v;
            }
        }
        self.leases.insert(lease_id, job_id);
        effects.commands.push((
            worker_id.to_string(),
            SchedulerCommand {
                command: Some(scheduler_command::Command::Assign(Box::new(assign))),
            },
        ));
        self.set_job_stage(job_id, Stage::Executing, None);
    }

    /// The job of `lease` if it is assigned to `worker`.
    fn lease_job(&self, worker: &str, lease: &str) -> Option<JobId> {
        let job_id = *self.leases.get(lease)?;
        match &self.jobs.get(&job_id)?.state {
            JobState::Assigned(l) if l.worker == worker => Some(job_id),
            _ => None,
        }
    }

    /// Whether events on `conn` from `worker` are current; refreshes its
    /// liveness when they are.
    fn touch_worker(&mut self, worker: &str, conn: ConnId, now: SystemTime) -> bool {
        match self.workers.get_mut(worker) {
            Some(w) if w.conn == Some(conn) => {
                w.last_seen = now;
                true
            }
            _ => false,
        }
    }

    /// Removes a worker; re-queues its leases (counted as failed attempts
    /// when `lost`).
    fn remove_worker(&mut self, worker_id: &str, lost: bool, config: &SchedulerConfig, now: SystemTime) {
        let Some(w) = self.workers.get(worker_id) else {
            return;
        };
        let leases: Vec<String> = w.leases.iter().cloned().collect();
        let name = w.name.clone();
        for lease in leases {
            if let Some(job_id) = self.leases.get(&lease).copied() {
                let lost_on = lost.then(|| name.clone());
                self.requeue(job_id, lost_on, config, now);
            }
        }
        self.workers.remove(worker_id);
    }
}

fn fill_metadata(response: &mut ExecuteResponse, worker_name: &str, queued_at: SystemTime) {
    response.cached_result = false;
    let result = response.result.get_or_insert_with(Default::default);
    let md = result.execution_metadata.get_or_insert_with(Default::default);
    if md.worker.is_empty() {
        md.worker = worker_name.to_string();
    }
    if md.queued_timestamp.is_none() {
        md.queued_timestamp = Some(to_timestamp(queued_at));
    }
}

#[async_trait]
impl SchedulerState for MemoryState {
    async fn submit(&self, new: NewJob, now: SystemTime) -> SchedulerResult<Submitted> {
        let config = &self.config;
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let dedup = new.cacheable.then(|| DedupKey {
            instance: new.instance_name.clone(),
            action: new.action_key.clone(),
        });
        if let Some(key) = &dedup
            && let Some(&job_id) = inner.dedup.get(key)
            && let Some(job) = inner.jobs.get(&job_id)
        {
            let stage = match job.state {
                JobState::Queued(_) => Stage::Queued,
                JobState::Assigned(_) => Stage::Executing,
            };
            let shared = job.new.clone();
            let (name, rx) = inner.new_op(&shared, job_id, stage, now);
            if let Some(job) = inner.jobs.get_mut(&job_id) {
                job.ops.push(name);
            }
            return Ok(Submitted {
                watch: rx,
                joined: true,
                effects,
            });
        }
        if !inner.workers.is_empty()
            && let Some(reason) = unsatisfiable_reason(&new.requirements, inner.workers.values().map(|w| &w.caps))
        {
            return Err(SchedulerError::FailedPrecondition(reason));
        }
        let job_id = inner.next_job;
        inner.next_job += 1;
        let class = Arc::new(new.requirements.clone());
        let invocation: Arc<str> = Arc::from(new.invocation_id.as_str());
        let entry = QueueEntry {
            job: job_id,
            priority: new.priority,
            enqueued_ms: epoch_ms(now),
        };
        let pos = inner.queue.push(class.clone(), invocation.clone(), entry);
        let mut job = Job {
            new: Arc::new(new),
            class,
            invocation,
            ops: Vec::new(),
            queued_at: now,
            attempts: 0,
            lost_on: Vec::new(),
            state: JobState::Queued(pos),
            dedup: dedup.clone(),
        };
        let shared = job.new.clone();
        let (name, rx) = inner.new_op(&shared, job_id, Stage::Queued, now);
        job.ops.push(name);
        inner.jobs.insert(job_id, job);
        if let Some(key) = dedup {
            inner.dedup.insert(key, job_id);
        }
        inner.dispatch(config, &mut effects, now);
        Ok(Submitted {
            watch: rx,
            joined: false,
            effects,
        })
    }

    async fn watch(&self, name: &str, now: SystemTime) -> Option<OperationWatch> {
        let mut g = self.inner.lock();
        let op = g.ops.get_mut(name)?;
        op.last_touched = now;
        op.unwatched_since = None;
        Some(op.tx.subscribe())
    }

    async fn get(&self, name: &str, now: SystemTime) -> Option<Arc<OperationView>> {
        let mut g = self.inner.lock();
        let op = g.ops.get_mut(name)?;
        op.last_touched = now;
        op.unwatched_since = None;
        Some(op.tx.borrow().clone())
    }

    async fn list(&self, page_size: usize, page_token: &str) -> (Vec<Arc<OperationView>>, String) {
        let g = self.inner.lock();
        let mut names: Vec<&String> = g.ops.keys().filter(|n| n.as_str() > page_token).collect();
        names.sort();
        let page_size = page_size.max(1);
        let more = names.len() > page_size;
        names.truncate(page_size);
        let next = if more {
            names.last().map(|n| n.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let views = names
            .into_iter()
            .filter_map(|n| g.ops.get(n).map(|o| o.tx.borrow().clone()))
            .collect();
        (views, next)
    }

    async fn cancel(&self, name: &str, reason: &str, now: SystemTime) -> SchedulerResult<Effects> {
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        if !g.ops.contains_key(name) {
            return Err(SchedulerError::NotFound(format!("operation {name:?} not found")));
        }
        g.cancel_op(name, error_response(Code::Cancelled, reason), reason, &mut effects, now);
        g.dispatch(&self.config, &mut effects, now);
        Ok(effects)
    }

    async fn delete(&self, name: &str, now: SystemTime) -> SchedulerResult<Effects> {
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        if !g.ops.contains_key(name) {
            return Err(SchedulerError::NotFound(format!("operation {name:?} not found")));
        }
        let reason = "operation deleted";
        g.cancel_op(name, error_response(Code::Cancelled, reason), reason, &mut effects, now);
        g.ops.remove(name);
        g.dispatch(&self.config, &mut effects, now);
        Ok(effects)
    }

    async fn register_worker(&self, reg: WorkerRegistration, conn: ConnId, now: SystemTime) -> Effects {
        let config = &self.config;
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let reported: HashSet<&String> = reg.running_leases.iter().collect();
        // Leases the worker reports but that are no longer its own.
        for lease in &reg.running_leases {
            if inner.lease_job(&reg.worker_id, lease).is_none() {
                effects
                    .commands
                    .push((reg.worker_id.clone(), cancel_cmd(lease, "lease no longer assigned to this worker")));
            }
        }
        // Leases assigned to it that it does not know: never received or
        // lost in a restart. Re-queue them.
        let forgotten: Vec<(JobId, bool)> = inner
            .workers
            .get(&reg.worker_id)
            .map(|w| {
                w.leases
                    .iter()
                    .filter(|l| !reported.contains(l))
                    .filter_map(|l| {
                        let job_id = *inner.leases.get(l)?;
                        let started = matches!(
                            &inner.jobs.get(&job_id)?.state,
                            JobState::Assigned(lease) if lease.started
                        );
                        Some((job_id, started))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let worker_name = reg.name.clone();
        for (job_id, started) in forgotten {
            inner.requeue(job_id, started.then(|| worker_name.clone()), config, now);
        }
        match inner.workers.get_mut(&reg.worker_id) {
            Some(w) => {
                w.name = reg.name;
                w.caps = reg.caps;
                w.slots = reg.slots;
                w.conn = Some(conn);
                w.draining = false;
                w.last_seen = now;
            }
            None => {
                inner.workers.insert(
                    reg.worker_id.clone(),
                    Worker {
                        name: reg.name,
                        caps: reg.caps,
                        slots: reg.slots,
                        conn: Some(conn),
                        draining: false,
                        leases: HashSet::new(),
                        reserved: HashMap::new(),
                        last_seen: now,
                    },
                );
            }
        }
        // Leases it kept are now known to be running.
        for lease in &reg.running_leases {
            if let Some(job_id) = inner.lease_job(&reg.worker_id, lease)
                && let Some(Job {
                    state: JobState::Assigned(l),
                    ..
                }) = inner.jobs.get_mut(&job_id)
            {
                l.started = true;
                l.missed = 0;
            }
        }
        inner.dispatch(config, &mut effects, now);
        effects
    }

    async fn heartbeat(&self, worker: &str, conn: ConnId, hb: &Heartbeat, now: SystemTime) -> Effects {
        let config = &self.config;
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if !inner.touch_worker(worker, conn, now) {
            if !inner.workers.contains_key(worker) {
                effects.close.push(worker.to_string());
            }
            return effects;
        }
        let running: HashSet<&String> = hb.running_leases.iter().collect();
        let mut lost = Vec::new();
        if let Some(w) = inner.workers.get(worker) {
            for lease in &w.leases {
                let Some(job_id) = inner.leases.get(lease).copied() else {
                    continue;
                };
                let Some(Job {
                    state: JobState::Assigned(l),
                    ..
                }) = inner.jobs.get_mut(&job_id)
                else {
                    continue;
                };
                if running.contains(lease) {
                    l.missed = 0;
                } else if l.assigned_at + config.heartbeat_interval < now {
                    l.missed += 1;
                    if l.missed >= 2 {
                        lost.push((job_id, w.name.clone()));
                    }
                }
            }
        }
        for (job_id, name) in lost {
            tracing::warn!(worker = %name, "worker stopped reporting a lease; re-queuing it");
            inner.requeue(job_id, Some(name), config, now);
        }
        inner.dispatch(config, &mut effects, now);
        effects
    }

    async fn lease_started(&self, worker: &str, conn: ConnId, lease: &str, now: SystemTime) -> Effects {
        let mut g = self.inner.lock();
        if g.touch_worker(worker, conn, now)
            && let Some(job_id) = g.lease_job(worker, lease)
            && let Some(Job {
                state: JobState::Assigned(l),
                ..
            }) = g.jobs.get_mut(&job_id)
        {
            l.started = true;
        }
        Effects::default()
    }

    async fn lease_progress(&self, worker: &str, conn: ConnId, progress: &Progress, now: SystemTime) -> Effects {
        let mut g = self.inner.lock();
        if g.touch_worker(worker, conn, now)
            && let Some(job_id) = g.lease_job(worker, &progress.lease_id)
        {
            g.set_job_stage(job_id, Stage::Executing, progress.partial_execution_metadata.clone());
        }
        Effects::default()
    }

    async fn lease_info(&self, worker: &str, lease: &str) -> Option<LeaseInfo> {
        let g = self.inner.lock();
        let job = g.jobs.get(&g.lease_job(worker, lease)?)?;
        Some(LeaseInfo {
            instance_name: job.new.instance_name.clone(),
            action_key: job.new.action_key.clone(),
            cacheable: job.new.cacheable,
        })
    }

    async fn lease_finished(
        &self,
        worker: &str,
        conn: ConnId,
        lease: &str,
        mut response: ExecuteResponse,
        now: SystemTime,
    ) -> Effects {
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        // A result is accepted even from a stale stream of the same worker:
        // the lease is what matters.
        if let Some(w) = inner.workers.get_mut(worker)
            && w.conn == Some(conn)
        {
            w.last_seen = now;
        }
        let Some(job_id) = inner.lease_job(worker, lease) else {
            return effects;
        };
        let worker_name = inner.workers.get(worker).map(|w| w.name.clone()).unwrap_or_default();
        let queued_at = inner.jobs.get(&job_id).map(|j| j.queued_at).unwrap_or(now);
        fill_metadata(&mut response, &worker_name, queued_at);
        inner.complete_job(job_id, response, now);
        inner.dispatch(&self.config, &mut effects, now);
        effects
    }

    async fn lease_handed_back(&self, worker: &str, conn: ConnId, lease: &str, now: SystemTime) -> Effects {
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        g.touch_worker(worker, conn, now);
        if let Some(job_id) = g.lease_job(worker, lease) {
            g.requeue(job_id, None, &self.config, now);
            g.dispatch(&self.config, &mut effects, now);
        }
        effects
    }

    async fn worker_draining(&self, worker: &str, conn: ConnId, now: SystemTime) -> Effects {
        let mut g = self.inner.lock();
        if g.touch_worker(worker, conn, now)
            && let Some(w) = g.workers.get_mut(worker)
        {
            w.draining = true;
        }
        Effects::default()
    }

    async fn worker_disconnected(&self, worker: &str, conn: ConnId, now: SystemTime) -> Effects {
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        let Some(w) = g.workers.get_mut(worker) else {
            return effects;
        };
        if w.conn != Some(conn) {
            return effects;
        }
        w.conn = None;
        if w.draining {
            g.remove_worker(worker, false, &self.config, now);
            g.dispatch(&self.config, &mut effects, now);
        }
        effects
    }

    async fn assign_undeliverable(&self, worker: &str, lease: &str, now: SystemTime) -> Effects {
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        if let Some(w) = g.workers.get_mut(worker) {
            w.conn = None;
        }
        if let Some(job_id) = g.lease_job(worker, lease) {
            g.requeue(job_id, None, &self.config, now);
            g.dispatch(&self.config, &mut effects, now);
        }
        effects
    }

    async fn tick(&self, now: SystemTime) -> Effects {
        let config = &self.config;
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        inner.ticks = inner.ticks.wrapping_add(1);

        // Lost workers.
        let lost: Vec<String> = inner
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen + config.heartbeat_timeout < now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            tracing::warn!(worker = %id, timeout = ?config.heartbeat_timeout, "worker lost: no message within the heartbeat timeout");
            inner.remove_worker(&id, true, config, now);
            effects.close.push(id);
        }

        // Lease deadlines.
        let expired: Vec<(JobId, String, String, Duration)> = inner
            .leases
            .values()
            .filter_map(|job_id| {
                let job = inner.jobs.get(job_id)?;
                match &job.state {
                    JobState::Assigned(l) if l.deadline < now => {
                        Some((*job_id, l.worker.clone(), l.id.clone(), job.new.timeout))
                    }
                    _ => None,
                }
            })
            .collect();
        for (job_id, worker, lease, timeout) in expired {
            let msg = format!(
                "action exceeded its timeout of {} (the worker reported no result within the grace period)",
                humantime::format_duration(timeout)
            );
            effects.commands.push((worker, cancel_cmd(&lease, "lease deadline exceeded")));
            inner.complete_job(job_id, error_response(Code::DeadlineExceeded, msg), now);
        }

        // Operations nobody follows.
        if inner.ticks % UNWATCHED_SCAN_EVERY == 0 {
            let mut abandoned = Vec::new();
            for (name, op) in inner.ops.iter_mut() {
                if op.job.is_none() {
                    continue;
                }
                if op.tx.receiver_count() > 0 {
                    op.unwatched_since = None;
                    continue;
                }
                let since = *op.unwatched_since.get_or_insert(now);
                let since = since.max(op.last_touched);
                if since + config.unwatched_grace < now {
                    abandoned.push(name.clone());
                }
            }
            for name in abandoned {
                tracing::info!(operation = %name, "cancelling an operation nobody waits on");
                let reason = "operation cancelled: nobody waited on it";
                inner.cancel_op(&name, error_response(Code::Cancelled, reason), reason, &mut effects, now);
            }
        }

        // Queued actions no registered worker can run.
        for class in inner.queue.classes() {
            let reason = if inner.workers.is_empty() {
                Some(format!("no worker is registered to run an action requiring {class}"))
            } else {
                unsatisfiable_reason(&class, inner.workers.values().map(|w| &w.caps))
            };
            match reason {
                None => inner.queue.set_unsatisfiable_since(&class, None),
                Some(reason) => match inner.queue.unsatisfiable_since(&class) {
                    None => inner.queue.set_unsatisfiable_since(&class, Some(now)),
                    Some(since) if since + config.no_worker_wait < now => {
                        let msg = format!(
                            "{reason}; waited {}",
                            humantime::format_duration(config.no_worker_wait)
                        );
                        // Drained entries are out of the queue already:
                        // complete_job's queue removal is then a no-op.
                        for entry in inner.queue.drain_class(&class) {
                            inner.complete_job(entry.job, error_response(Code::FailedPrecondition, msg.clone()), now);
                        }
                    }
                    Some(_) => {}
                },
            }
        }

        // Retention of completed operations.
        while let Some((at, name)) = inner.completed.front() {
            let too_many = inner.completed.len() > config.max_completed_operations;
            if !too_many && *at + config.completed_retention >= now {
                break;
            }
            let name = name.clone();
            inner.completed.pop_front();
            if inner.ops.get(&name).is_some_and(|o| o.job.is_none()) {
                inner.ops.remove(&name);
            }
        }

        inner.dispatch(config, &mut effects, now);
        effects
    }

    async fn stats(&self) -> StateStats {
        let g = self.inner.lock();
        StateStats {
            queued: g.queue.len(),
            executing: g.leases.len(),
            operations: g.ops.len(),
            workers: g.workers.len(),
            connected_workers: g.workers.values().filter(|w| w.conn.is_some()).count(),
        }
    }
}
