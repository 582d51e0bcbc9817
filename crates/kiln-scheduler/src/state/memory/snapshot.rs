//! [`Inner::snapshot`]: copies what the live pages show, under the state's
//! lock, with no I/O and bounded output.

use std::time::SystemTime;

use kiln_proto::reapi::Platform;

use super::model::{Inner, Job, JobState, Lease};
use crate::state::snapshot::{
    ActionSnapshot, ExecutingAction, QueuedAction, SNAPSHOT_MAX_ACTIONS, StateSnapshot, WorkerSnapshot,
};

impl Inner {
    pub(super) fn snapshot(&self, now: SystemTime) -> StateSnapshot {
        // References first: only the kept entries are copied.
        let mut queued: Vec<&Job> = Vec::new();
        let mut executing: Vec<(&Job, &Lease)> = Vec::new();
        for job in self.jobs.values() {
            match &job.state {
                JobState::Queued(_) => queued.push(job),
                JobState::Assigned(lease) => executing.push((job, lease)),
            }
        }
        let (queued_total, executing_total) = (queued.len(), executing.len());
        keep_first(&mut queued, |j| (j.new.priority, j.queued_at));
        keep_first(&mut executing, |(_, l)| l.assigned_at);
        let queued = queued
            .into_iter()
            .map(|job| QueuedAction {
                action: action_snapshot(job),
            })
            .collect();
        let executing = executing
            .into_iter()
            .map(|(job, lease)| ExecutingAction {
                action: action_snapshot(job),
                worker_id: lease.worker.clone(),
                worker_name: self
                    .workers
                    .get(&lease.worker)
                    .map(|w| w.name.clone())
                    .unwrap_or_default(),
                lease_id: lease.id.clone(),
                assigned_at: lease.assigned_at,
                started: lease.started,
                progress: job
                    .ops
                    .first()
                    .and_then(|name| self.ops.get(name))
                    .and_then(|op| op.tx.borrow().partial_metadata.clone()),
            })
            .collect();
        let mut workers: Vec<WorkerSnapshot> = self
            .workers
            .iter()
            .map(|(id, w)| {
                let mut properties: Vec<(String, String)> = w
                    .caps
                    .values
                    .iter()
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
                    .chain(w.caps.capacity.iter().map(|(k, v)| (k.clone(), v.to_string())))
                    .collect();
                properties.sort();
                WorkerSnapshot {
                    id: id.clone(),
                    name: w.name.clone(),
                    slots: w.slots,
                    busy: u32::try_from(w.leases.len()).unwrap_or(u32::MAX),
                    load: w.load,
                    properties,
                    connected: w.conn.is_some(),
                    draining: w.draining,
                    last_seen: w.last_seen,
                }
            })
            .collect();
        workers.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        StateSnapshot {
            taken_at: now,
            queued,
            queued_total,
            queued_by_platform: self.queue.class_lens(),
            executing,
            executing_total,
            workers,
        }
    }
}

/// Keeps the [`SNAPSHOT_MAX_ACTIONS`] smallest items by `key`, sorted.
fn keep_first<T, K: Ord>(items: &mut Vec<T>, key: impl Fn(&T) -> K) {
    if items.len() > SNAPSHOT_MAX_ACTIONS {
        items.select_nth_unstable_by(SNAPSHOT_MAX_ACTIONS - 1, |a, b| key(a).cmp(&key(b)));
        items.truncate(SNAPSHOT_MAX_ACTIONS);
    }
    items.sort_by_key(&key);
}

fn action_snapshot(job: &Job) -> ActionSnapshot {
    let new = &job.new;
    ActionSnapshot {
        operations: job.ops.clone(),
        instance_name: new.instance_name.clone(),
        digest_function: new.digest_function,
        action_digest: new.action_key.to_digest(),
        platform: Platform {
            properties: new.platform.properties.clone(),
        },
        priority: new.priority,
        invocation_id: new.request.tool_invocation_id.clone(),
        mnemonic: new.request.action_mnemonic.clone(),
        target_id: new.request.target_id.clone(),
        queued_at: job.queued_at,
        attempts: job.attempts,
    }
}
