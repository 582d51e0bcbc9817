//! The link between an in-process worker and the scheduler of the same
//! server: the worker's session streams go straight to the scheduler's
//! session handler (no protobuf encoding, no loopback TCP, no HTTP/2).

use std::sync::Arc;

use futures::StreamExt;
use kiln_proto::worker::WorkerUpdate;
use kiln_scheduler::Scheduler;
use kiln_worker::link::{CommandStream, SchedulerLink};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

pub struct InProcessScheduler {
    scheduler: Arc<Scheduler>,
}

impl InProcessScheduler {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        InProcessScheduler { scheduler }
    }
}

#[tonic::async_trait]
impl SchedulerLink for InProcessScheduler {
    async fn open(&self, outbound: ReceiverStream<WorkerUpdate>) -> Result<CommandStream, Status> {
        // The scheduler's side of the session is not part of the worker's
        // work: its own root span, not a child of the worker's.
        let span = tracing::info_span!(parent: None, "scheduler-session");
        kiln_scheduler::worker_api::open_session(self.scheduler.clone(), outbound.map(Ok))
            .instrument(span)
            .await
    }
}
