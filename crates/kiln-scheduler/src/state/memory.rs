//! In-memory [`SchedulerState`]: one mutex over plain maps. Every method
//! takes the lock once, performs no I/O and no `.await` while holding it,
//! and returns the messages to deliver as [`Effects`].

mod model;
mod snapshot;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kiln_proto::reapi::ExecuteResponse;
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::worker::{Heartbeat, Progress};
use parking_lot::Mutex;
use tonic::Code;

use crate::config::SchedulerConfig;
use crate::error::{SchedulerError, SchedulerResult};
use crate::operations::{epoch_ms, error_response};
use crate::platform::unsatisfiable_reason;
use crate::queue::{JobId, QueueEntry, ReadyQueue};
use crate::state::snapshot::StateSnapshot;
use crate::state::{
    ConnId, Effects, LeaseInfo, NewJob, OperationView, OperationWatch, Outgoing, SchedulerState, StateStats,
    Submitted, WorkerRegistration,
};
use model::{DedupKey, Inner, Job, JobState, Worker, cancel_cmd, fill_metadata};

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
            && let Some(reason) =
                unsatisfiable_reason(&new.requirements, inner.workers.values().map(|w| &w.caps))
        {
            return Err(SchedulerError::FailedPrecondition(reason));
        }
        let job_id = inner.next_job;
        inner.next_job += 1;
        let class = Arc::new(new.requirements.clone());
        let invocation: Arc<str> = Arc::from(new.request.tool_invocation_id.as_str());
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
        g.cancel_op(
            name,
            error_response(Code::Cancelled, reason),
            reason,
            &mut effects,
            now,
        );
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
        g.cancel_op(
            name,
            error_response(Code::Cancelled, reason),
            reason,
            &mut effects,
            now,
        );
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
                effects.commands.push(Outgoing {
                    worker: reg.worker_id.clone(),
                    conn,
                    command: cancel_cmd(lease, "lease no longer assigned to this worker"),
                });
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
        // The display name every consumer sees: never empty.
        let worker_name = if reg.name.is_empty() {
            reg.worker_id.clone()
        } else {
            reg.name
        };
        for (job_id, started) in forgotten {
            inner.requeue(job_id, started.then(|| worker_name.clone()), config, now);
        }
        match inner.workers.get_mut(&reg.worker_id) {
            Some(w) => {
                w.name = worker_name;
                w.caps = reg.caps;
                w.slots = reg.slots;
                w.conn = Some(conn);
                w.draining = false;
                w.paused = false;
                w.last_seen = now;
            }
            None => {
                inner.workers.insert(
                    reg.worker_id.clone(),
                    Worker {
                        name: worker_name,
                        caps: reg.caps,
                        slots: reg.slots,
                        conn: Some(conn),
                        draining: false,
                        paused: false,
                        leases: HashSet::new(),
                        reserved: HashMap::new(),
                        last_seen: now,
                        load: 0.0,
                        local_cache: None,
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
                effects.close.push((worker.to_string(), conn));
            }
            return effects;
        }
        if let Some(w) = inner.workers.get_mut(worker) {
            w.load = hb.load;
            if hb.local_cache.is_some() {
                w.local_cache = hb.local_cache;
            }
            if hb.free_slots > 0 {
                w.paused = false;
            }
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

    async fn lease_progress(
        &self,
        worker: &str,
        conn: ConnId,
        progress: &Progress,
        now: SystemTime,
    ) -> Effects {
        let mut g = self.inner.lock();
        if g.touch_worker(worker, conn, now)
            && let Some(job_id) = g.lease_job(worker, &progress.lease_id)
        {
            g.set_job_stage(
                job_id,
                Stage::Executing,
                progress.partial_execution_metadata.clone(),
            );
        }
        Effects::default()
    }

    async fn lease_info(&self, worker: &str, lease: &str) -> Option<LeaseInfo> {
        let g = self.inner.lock();
        let job = g.jobs.get(&g.lease_job(worker, lease)?)?;
        Some(LeaseInfo {
            job: job.new.clone(),
            operation: job.ops.first().cloned().unwrap_or_default(),
            worker_name: g.workers.get(worker).map(|w| w.name.clone()).unwrap_or_default(),
            queued_at: job.queued_at,
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
        if let Some(w) = inner.workers.get_mut(worker) {
            w.paused = false;
            if w.conn == Some(conn) {
                w.last_seen = now;
            }
        }
        let Some(job_id) = inner.lease_job(worker, lease) else {
            return effects;
        };
        let worker_name = inner
            .workers
            .get(worker)
            .map(|w| w.name.clone())
            .unwrap_or_default();
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
            if let Some(w) = g.workers.get_mut(worker)
                && !w.draining
            {
                w.paused = true;
            }
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

    async fn assign_undeliverable(
        &self,
        worker: &str,
        conn: ConnId,
        lease: &str,
        now: SystemTime,
    ) -> Effects {
        let mut effects = Effects::default();
        let mut g = self.inner.lock();
        if let Some(w) = g.workers.get_mut(worker)
            && w.conn == Some(conn)
        {
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
            if let Some(conn) = inner.workers.get(&id).and_then(|w| w.conn) {
                effects.close.push((id.clone(), conn));
            }
            inner.remove_worker(&id, true, config, now);
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
            inner.send(
                &mut effects,
                &worker,
                cancel_cmd(&lease, "lease deadline exceeded"),
            );
            inner.complete_job(job_id, error_response(Code::DeadlineExceeded, msg), now);
        }

        // Operations nobody follows.
        if inner.ticks.is_multiple_of(UNWATCHED_SCAN_EVERY) {
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
                inner.cancel_op(
                    &name,
                    error_response(Code::Cancelled, reason),
                    reason,
                    &mut effects,
                    now,
                );
            }
        }

        // Queued actions no registered worker can run.
        for class in inner.queue.classes() {
            let reason = if inner.workers.is_empty() {
                Some(format!(
                    "no worker is registered to run an action requiring {class}"
                ))
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
                            inner.complete_job(
                                entry.job,
                                error_response(Code::FailedPrecondition, msg.clone()),
                                now,
                            );
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

    async fn snapshot(&self, now: SystemTime) -> StateSnapshot {
        self.inner.lock().snapshot(now)
    }

    async fn stats(&self) -> StateStats {
        let g = self.inner.lock();
        let connected = || g.workers.values().filter(|w| w.conn.is_some());
        StateStats {
            queued: g.queue.len(),
            executing: g.leases.len(),
            operations: g.ops.len(),
            workers: g.workers.len(),
            connected_workers: g.workers.values().filter(|w| w.conn.is_some()).count(),
            queued_by_platform: g.queue.class_lens(),
            slots: connected().map(|w| u64::from(w.slots)).sum(),
            busy_slots: connected().map(|w| w.leases.len() as u64).sum(),
            worker_local_cache: connected()
                .filter_map(|w| Some((w.name.clone(), w.local_cache?)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::WorkerCaps;

    fn registration(id: &str, name: &str) -> WorkerRegistration {
        WorkerRegistration {
            worker_id: id.into(),
            name: name.into(),
            caps: WorkerCaps::default(),
            slots: 1,
            running_leases: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_worker_without_a_name_is_named_by_its_id() {
        let state = MemoryState::new(Arc::new(SchedulerConfig::default()));
        let now = SystemTime::now();
        state.register_worker(registration("w-1", ""), 1, now).await;
        state.register_worker(registration("w-2", "named"), 2, now).await;
        let names: Vec<(String, String)> = state
            .snapshot(now)
            .await
            .workers
            .into_iter()
            .map(|w| (w.id, w.name))
            .collect();
        assert_eq!(
            names,
            [("w-2".into(), "named".into()), ("w-1".into(), "w-1".into())]
        );
        // A re-registration without a name keeps the fallback too.
        state.register_worker(registration("w-2", ""), 3, now).await;
        let snap = state.snapshot(now).await;
        assert!(snap.workers.iter().all(|w| w.name == w.id), "{:?}", snap.workers);
    }
}
