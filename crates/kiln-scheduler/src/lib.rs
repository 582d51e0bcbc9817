//! Kiln's remote execution scheduler.
//!
//! * [`execution_service`]: REAPI Execute / WaitExecution.
//! * [`operations_service`]: google.longrunning Operations.
//! * [`status_service`]: `kiln.status.v1.Status` (workers, queue, running
//!   actions) for `kiln status`.
//! * [`worker_api`]: the server side of the worker protocol
//!   (docs/worker-protocol.md).
//! * [`state`]: all scheduler state behind one trait, with an in-memory
//!   implementation; [`queue`] (priority, aging, fair share, keyed by
//!   platform) and [`platform`] (matching rules) are its building blocks.
//! * [`ac`] and [`inputs`]: direct reads and writes of the instance's AC
//!   and CAS stores.
//!
//! Wiring: [`Scheduler::new`] then [`Scheduler::add_routes`]; merge
//! [`Scheduler::execution_capabilities`] into Capabilities.

pub mod ac;
pub mod config;
mod error;
pub mod execution_service;
pub mod inputs;
pub mod observe;
pub mod operations;
pub mod operations_service;
pub mod platform;
pub mod queue;
mod scheduler;
pub mod state;
pub mod status_service;
pub mod worker_api;

use std::sync::Arc;

pub use config::{PropertyRule, SchedulerConfig};
pub use error::{SchedulerError, SchedulerResult, missing_subject};
pub use observe::{ActionObserver, ActionOutcome, ActionRecord};
pub use scheduler::Scheduler;

use kiln_proto::longrunning::operations_server::OperationsServer;
use kiln_proto::reapi::execution_server::ExecutionServer;
use kiln_proto::status::status_server::StatusServer;
use kiln_proto::worker::worker_api_server::WorkerApiServer;

/// Largest message of the worker protocol and of Execute responses.
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;

impl Scheduler {
    /// Adds the Execution, Operations, WorkerApi and Status services.
    pub fn add_routes(self: &Arc<Self>, builder: &mut tonic::service::RoutesBuilder) {
        builder
            .add_service(
                ExecutionServer::new(execution_service::ExecutionService::new(self.clone()))
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            )
            .add_service(
                OperationsServer::new(operations_service::OperationsService::new(self.clone()))
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            )
            .add_service(StatusServer::new(status_service::StatusService::new(
                self.clone(),
            )))
            .add_service(
                WorkerApiServer::new(worker_api::WorkerApiService::new(self.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            );
    }
}
