//! The google.longrunning Operations service over execution operations.
//!
//! * GetOperation: the current state (counts as interest, so a client that
//!   polls keeps its operation alive); NOT_FOUND if unknown.
//! * WaitOperation: blocks until done or `timeout` (bounded by
//!   `max_wait_operation`), then returns the current state.
//! * ListOperations: operations by name, paged (`page_size` default 100, at
//!   most 1000; `page_token` is the last name of the previous page). The
//!   filter is not supported: a non-empty filter is INVALID_ARGUMENT.
//! * CancelOperation: completes the operation with CANCELLED and, when no
//!   other client shares the action, removes it from the queue or sends
//!   `Cancel` to the worker running it.
//! * DeleteOperation: cancels if running, then forgets the operation.
//!   Cache-hit operations are never retained, so they are NOT_FOUND here.

use std::sync::Arc;
use std::time::SystemTime;

use kiln_proto::longrunning::operations_server::Operations;
use kiln_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use kiln_proto::protobuf::Empty;
use tonic::{Request, Response, Status};

use crate::operations::{from_proto_duration, to_operation};
use crate::scheduler::Scheduler;

const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

pub struct OperationsService {
    scheduler: Arc<Scheduler>,
}

impl OperationsService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        OperationsService { scheduler }
    }
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("operation {name:?} not found"))
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let req = request.into_inner();
        if !req.filter.is_empty() {
            return Err(Status::invalid_argument(
                "ListOperations filters are not supported",
            ));
        }
        let page_size = match req.page_size {
            n if n <= 0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let (views, next) = self.scheduler.state.list(page_size, &req.page_token).await;
        Ok(Response::new(ListOperationsResponse {
            operations: views.iter().map(|v| to_operation(v)).collect(),
            next_page_token: next,
            unreachable: Vec::new(),
        }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let name = request.into_inner().name;
        match self.scheduler.state.get(&name, SystemTime::now()).await {
            Some(view) => Ok(Response::new(to_operation(&view))),
            None => Err(not_found(&name)),
        }
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = request.into_inner().name;
        let effects = self.scheduler.state.delete(&name, SystemTime::now()).await?;
        self.scheduler.deliver(effects).await;
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = request.into_inner().name;
        let effects = self
            .scheduler
            .state
            .cancel(&name, "operation cancelled by the client", SystemTime::now())
            .await?;
        self.scheduler.deliver(effects).await;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let max = self.scheduler.config.max_wait_operation;
        let wait = from_proto_duration(req.timeout.as_ref())
            .filter(|d| !d.is_zero())
            .map_or(max, |d| d.min(max));
        let Some(mut watch) = self.scheduler.state.watch(&req.name, SystemTime::now()).await else {
            return Err(not_found(&req.name));
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let view = watch.borrow_and_update().clone();
            if view.done() {
                return Ok(Response::new(to_operation(&view)));
            }
            match tokio::time::timeout_at(deadline, watch.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(not_found(&req.name)),
                Err(_) => return Ok(Response::new(to_operation(&view))),
            }
        }
    }
}
