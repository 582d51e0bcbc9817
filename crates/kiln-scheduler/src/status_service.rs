//! `kiln.status.v1.Status` (crates/kiln-proto/src/status.rs): the live
//! workers, queue and running actions, for `kiln status`. Read-only; built
//! from one snapshot of the state, bounded in size.

use std::sync::Arc;
use std::time::SystemTime;

use kiln_proto::status::status_server::Status as StatusApi;
use kiln_proto::status::{GetStatusRequest, PlatformQueue, RunningAction, StatusResponse, WorkerStatus};
use tonic::{Request, Response, Status};

use crate::scheduler::Scheduler;

/// Running actions listed when the request does not say.
const DEFAULT_MAX_RUNNING: u32 = 50;
/// Most running actions one answer lists.
const MAX_RUNNING: u32 = 1000;

pub struct StatusService {
    scheduler: Arc<Scheduler>,
}

impl StatusService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        StatusService { scheduler }
    }
}

fn seconds_since(now: SystemTime, then: SystemTime) -> f64 {
    now.duration_since(then).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[tonic::async_trait]
impl StatusApi for StatusService {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let max = match request.into_inner().max_executing {
            0 => DEFAULT_MAX_RUNNING,
            n => n.min(MAX_RUNNING),
        } as usize;
        // One snapshot: the workers, queues and counts of one moment.
        let snap = self.scheduler.snapshot().await;
        let now = snap.taken_at;
        let workers = snap
            .workers
            .iter()
            .map(|w| WorkerStatus {
                id: w.id.clone(),
                name: w.name.clone(),
                slots: w.slots,
                busy: w.busy,
                load: w.load,
                properties: w.properties.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                connected: w.connected,
                draining: w.draining,
                last_seen_seconds: seconds_since(now, w.last_seen),
            })
            .collect();
        let mut queues: Vec<PlatformQueue> = snap
            .queued_by_platform
            .iter()
            .map(|(platform, n)| PlatformQueue {
                platform: platform.clone(),
                queued: *n as u64,
            })
            .collect();
        queues.sort_by(|a, b| b.queued.cmp(&a.queued).then_with(|| a.platform.cmp(&b.platform)));
        // The snapshot lists the oldest assignment first.
        let running = snap
            .executing
            .iter()
            .take(max)
            .map(|e| RunningAction {
                action_digest: Some(e.action.action_digest.clone()),
                instance_name: e.action.instance_name.clone(),
                worker_name: e.worker_name.clone(),
                running_seconds: seconds_since(now, e.assigned_at),
                mnemonic: e.action.mnemonic.clone(),
                target_id: e.action.target_id.clone(),
            })
            .collect();
        Ok(Response::new(StatusResponse {
            workers,
            queued: snap.queued_total as u64,
            executing: snap.executing_total as u64,
            queues,
            running,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}
