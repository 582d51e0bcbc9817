//! How a worker reaches its scheduler: [`SchedulerLink`] opens one session
//! (the worker's updates out, the scheduler's commands in). A standalone
//! worker uses gRPC (`kiln.worker.v1.WorkerApi/Session` over a
//! [`Channel`]); a worker running inside the scheduler's process is given
//! a link that hands the streams to the scheduler directly, with no
//! encoding, sockets or HTTP/2 in between.

use std::pin::Pin;

use futures::Stream;
use kiln_proto::worker::worker_api_client::WorkerApiClient;
use kiln_proto::worker::{SchedulerCommand, WorkerUpdate};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

/// The scheduler's commands for one session.
pub type CommandStream = Pin<Box<dyn Stream<Item = Result<SchedulerCommand, Status>> + Send + 'static>>;

/// Opens worker sessions with a scheduler.
#[tonic::async_trait]
pub trait SchedulerLink: Send + Sync + 'static {
    /// Starts a session whose outgoing messages are `outbound` (the first
    /// is `Register`).
    async fn open(&self, outbound: ReceiverStream<WorkerUpdate>) -> Result<CommandStream, Status>;
}

/// Largest message on the worker stream (an Assign carries a Command).
pub const MAX_MESSAGE: usize = 64 << 20;

#[tonic::async_trait]
impl SchedulerLink for Channel {
    async fn open(&self, outbound: ReceiverStream<WorkerUpdate>) -> Result<CommandStream, Status> {
        let mut client = WorkerApiClient::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let inbound = client.session(outbound).await?.into_inner();
        Ok(Box::pin(inbound))
    }
}

#[tonic::async_trait]
impl<T: SchedulerLink + ?Sized> SchedulerLink for Box<T> {
    async fn open(&self, outbound: ReceiverStream<WorkerUpdate>) -> Result<CommandStream, Status> {
        (**self).open(outbound).await
    }
}
