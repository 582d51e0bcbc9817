//! The data of the in-memory state and its transitions. Every function
//! here runs under the state's lock and performs no I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use kiln_digest::BlobKey;
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::{ExecuteResponse, ExecutedActionMetadata};
use kiln_proto::worker::{Assign, Cancel, SchedulerCommand, scheduler_command};
use tokio::sync::watch;
use tonic::Code;

use crate::config::SchedulerConfig;
use crate::operations::{epoch_ms, error_response, to_proto_duration, to_timestamp};
use crate::platform::{Requirements, WorkerCaps};
use crate::queue::{JobId, QueueEntry, QueuePos, ReadyQueue};
use crate::state::{
    ConnId, Effects, NewJob, OperationView, OperationWatch, Outgoing, fill_execution_metadata,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct DedupKey {
    pub(super) instance: String,
    /// The key carries the digest function.
    pub(super) action: BlobKey,
}

pub(super) struct Job {
    pub(super) new: Arc<NewJob>,
    pub(super) class: Arc<Requirements>,
    pub(super) invocation: Arc<str>,
    /// Operations attached (several when identical actions were merged).
    pub(super) ops: Vec<String>,
    pub(super) queued_at: SystemTime,
    pub(super) attempts: u32,
    pub(super) lost_on: Vec<String>,
    pub(super) state: JobState,
    pub(super) dedup: Option<DedupKey>,
}

pub(super) enum JobState {
    Queued(QueuePos),
    Assigned(Lease),
}

pub(super) struct Lease {
    pub(super) id: String,
    pub(super) worker: String,
    pub(super) assigned_at: SystemTime,
    pub(super) deadline: SystemTime,
    pub(super) started: bool,
    /// Consecutive heartbeats that did not list this lease.
    pub(super) missed: u32,
}

pub(super) struct Op {
    pub(super) tx: watch::Sender<Arc<OperationView>>,
    /// The action, while the operation is not done.
    pub(super) job: Option<JobId>,
    pub(super) last_touched: SystemTime,
    pub(super) unwatched_since: Option<SystemTime>,
}

pub(super) struct Worker {
    pub(super) name: String,
    pub(super) caps: WorkerCaps,
    pub(super) slots: u32,
    /// The live stream, if connected.
    pub(super) conn: Option<ConnId>,
    pub(super) draining: bool,
    /// Handed a lease back without draining (it is fuller than the
    /// scheduler thinks): nothing is assigned until a heartbeat reports a
    /// free slot or a lease finishes.
    pub(super) paused: bool,
    pub(super) leases: HashSet<String>,
    pub(super) reserved: HashMap<String, u64>,
    pub(super) last_seen: SystemTime,
    /// Load from its last heartbeat (informational).
    pub(super) load: f64,
    /// Local cache counters from its last heartbeat (for metrics).
    pub(super) local_cache: Option<kiln_proto::worker::LocalCacheCounters>,
}

impl Worker {
    pub(super) fn assignable(&self) -> bool {
        self.conn.is_some()
            && !self.draining
            && !self.paused
            && (self.leases.len() as u64) < u64::from(self.slots)
    }
}

pub(super) struct Inner {
    pub(super) jobs: HashMap<JobId, Job>,
    pub(super) dedup: HashMap<DedupKey, JobId>,
    pub(super) ops: HashMap<String, Op>,
    /// Lease id → job.
    pub(super) leases: HashMap<String, JobId>,
    pub(super) workers: HashMap<String, Worker>,
    pub(super) queue: ReadyQueue,
    /// Completed operations in completion order, for retention.
    pub(super) completed: VecDeque<(SystemTime, String)>,
    pub(super) next_job: JobId,
    pub(super) ticks: u32,
}

pub(super) fn cancel_cmd(lease: &str, reason: impl Into<String>) -> SchedulerCommand {
    SchedulerCommand {
        command: Some(scheduler_command::Command::Cancel(Cancel {
            lease_id: lease.to_string(),
            reason: reason.into(),
        })),
    }
}

pub(super) fn new_lease_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Inner {
    // ---- operations ----

    pub(super) fn new_op(
        &mut self,
        new: &NewJob,
        job_id: JobId,
        stage: Stage,
        now: SystemTime,
    ) -> (String, OperationWatch) {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let view = OperationView {
            name: name.clone(),
            instance_name: new.instance_name.clone(),
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

    pub(super) fn update_op(&mut self, name: &str, f: impl FnOnce(&mut OperationView)) {
        if let Some(op) = self.ops.get(name) {
            op.tx.send_modify(|v| {
                let mut next = (**v).clone();
                f(&mut next);
                *v = Arc::new(next);
            });
        }
    }

    pub(super) fn set_job_stage(
        &mut self,
        job_id: JobId,
        stage: Stage,
        partial: Option<ExecutedActionMetadata>,
    ) {
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

    pub(super) fn complete_op(&mut self, name: &str, response: ExecuteResponse, now: SystemTime) {
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
    pub(super) fn release_lease(&mut self, job_id: JobId) {
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
    pub(super) fn complete_job(&mut self, job_id: JobId, response: ExecuteResponse, now: SystemTime) {
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
    pub(super) fn requeue(
        &mut self,
        job_id: JobId,
        lost_on: Option<String>,
        config: &SchedulerConfig,
        now: SystemTime,
    ) {
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
    pub(super) fn cancel_job(
        &mut self,
        job_id: JobId,
        response: ExecuteResponse,
        reason: &str,
        effects: &mut Effects,
        now: SystemTime,
    ) {
        if let Some(Job {
            state: JobState::Assigned(lease),
            ..
        }) = self.jobs.get(&job_id)
        {
            let (worker, lease) = (lease.worker.clone(), lease.id.clone());
            self.send(effects, &worker, cancel_cmd(&lease, reason));
        }
        self.complete_job(job_id, response, now);
    }

    /// Detaches one operation from its job (cancelling the job when it was
    /// the last one) and completes it with `response`.
    pub(super) fn cancel_op(
        &mut self,
        name: &str,
        response: ExecuteResponse,
        reason: &str,
        effects: &mut Effects,
        now: SystemTime,
    ) {
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
    pub(super) fn dispatch(&mut self, config: &SchedulerConfig, effects: &mut Effects, now: SystemTime) {
        if self.queue.is_empty() {
            return;
        }
        let mut candidates: Vec<(usize, String)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.assignable())
            .map(|(id, w)| {
                (
                    w.slots as usize - w.leases.len().min(w.slots as usize),
                    id.clone(),
                )
            })
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

    pub(super) fn assign(
        &mut self,
        job_id: JobId,
        worker_id: &str,
        config: &SchedulerConfig,
        effects: &mut Effects,
        now: SystemTime,
    ) {
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
        self.send(
            effects,
            worker_id,
            SchedulerCommand {
                command: Some(scheduler_command::Command::Assign(Box::new(assign))),
            },
        );
        self.set_job_stage(job_id, Stage::Executing, None);
    }

    /// Queues `command` for the current stream of `worker`, if connected.
    pub(super) fn send(&self, effects: &mut Effects, worker: &str, command: SchedulerCommand) {
        if let Some(conn) = self.workers.get(worker).and_then(|w| w.conn) {
            effects.commands.push(Outgoing {
                worker: worker.to_string(),
                conn,
                command,
            });
        }
    }

    /// The job of `lease` if it is assigned to `worker`.
    pub(super) fn lease_job(&self, worker: &str, lease: &str) -> Option<JobId> {
        let job_id = *self.leases.get(lease)?;
        match &self.jobs.get(&job_id)?.state {
            JobState::Assigned(l) if l.worker == worker => Some(job_id),
            _ => None,
        }
    }

    /// Whether events on `conn` from `worker` are current; refreshes its
    /// liveness when they are.
    pub(super) fn touch_worker(&mut self, worker: &str, conn: ConnId, now: SystemTime) -> bool {
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
    pub(super) fn remove_worker(
        &mut self,
        worker_id: &str,
        lost: bool,
        config: &SchedulerConfig,
        now: SystemTime,
    ) {
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

pub(super) fn fill_metadata(response: &mut ExecuteResponse, worker_name: &str, queued_at: SystemTime) {
    response.cached_result = false;
    let result = response.result.get_or_insert_with(Default::default);
    let md = result.execution_metadata.get_or_insert_with(Default::default);
    fill_execution_metadata(md, worker_name, queued_at);
}
