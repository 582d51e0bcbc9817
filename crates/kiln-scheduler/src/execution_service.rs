//! The REAPI Execution service: Execute and WaitExecution.
//!
//! * Execute: unknown instance, missing or malformed digest → INVALID_ARGUMENT.
//!   Unless `skip_cache_lookup`, the Action Cache is read first: a hit (with
//!   all its outputs in the CAS) is one completed operation with
//!   `cached_result: true`, answered at once and not retained. Otherwise the
//!   Action, Command and whole input tree are checked (missing →
//!   FAILED_PRECONDITION with a PreconditionFailure listing each blob), the
//!   action is queued or joins an identical in-flight one, and the stream
//!   follows the operation (QUEUED, EXECUTING, COMPLETED) until done. The
//!   cache check happens before the operation exists, so CACHE_CHECK is
//!   never observed.
//! * WaitExecution: follows an existing operation; NOT_FOUND if unknown
//!   (the client then calls Execute again).
//! * A stream re-sends the current state every [`KEEPALIVE`] so that idle
//!   long actions do not look dead to proxies.
//! * Errors found while running travel in `ExecuteResponse.status`; the
//!   Operation's `error` field is never set.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::execution_server::Execution;
use kiln_proto::reapi::{ExecuteRequest, WaitExecutionRequest};
use kiln_proto::request_info::RequestInfo;
use tonic::{Request, Response, Status};

use crate::ac::InlineRequest;
use crate::operations::to_operation;
use crate::scheduler::{ExecStart, Scheduler, inline_request};
use crate::state::OperationWatch;

/// Binary header carrying a `RequestMetadata`.
pub use kiln_proto::request_info::REQUEST_METADATA_HEADER;

/// Re-send period of the current state on an otherwise idle stream.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send + 'static>>;

pub struct ExecutionService {
    scheduler: Arc<Scheduler>,
}

impl ExecutionService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        ExecutionService { scheduler }
    }
}

/// Streams an operation from its watch until it is done.
pub(crate) fn follow(
    scheduler: Arc<Scheduler>,
    instance_name: String,
    watch: OperationWatch,
    inline: InlineRequest,
) -> OperationStream {
    struct St {
        scheduler: Arc<Scheduler>,
        instance_name: String,
        watch: OperationWatch,
        inline: InlineRequest,
        first: bool,
        finished: bool,
    }
    let st = St {
        scheduler,
        instance_name,
        watch,
        inline,
        first: true,
        finished: false,
    };
    Box::pin(futures::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        if !st.first {
            match tokio::time::timeout(KEEPALIVE, st.watch.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => {
                    st.finished = true;
                    return Some((Err(Status::not_found("the operation was deleted")), st));
                }
            }
        }
        st.first = false;
        let view = st.watch.borrow_and_update().clone();
        if view.done() {
            st.finished = true;
            if !st.inline.is_empty() {
                let mut view = (*view).clone();
                st.scheduler
                    .inline_into(&st.instance_name, &mut view, &st.inline)
                    .await;
                return Some((Ok(to_operation(&view)), st));
            }
        }
        Some((Ok(to_operation(&view)), st))
    }))
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        // Parsed once: fair share uses its invocation id, the completion
        // record all of it. Absent or undecodable → empty.
        let info = RequestInfo::from_metadata(request.metadata()).unwrap_or_default();
        let req = request.into_inner();
        match self.scheduler.execute(&req, info).await? {
            ExecStart::Cached(op) => Ok(Response::new(Box::pin(futures::stream::once(
                async move { Ok(*op) },
            )))),
            ExecStart::Watch(watch) => Ok(Response::new(follow(
                self.scheduler.clone(),
                req.instance_name.clone(),
                watch,
                inline_request(&req),
            ))),
        }
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let name = request.into_inner().name;
        let Some(watch) = self
            .scheduler
            .state
            .watch(&name, std::time::SystemTime::now())
            .await
        else {
            return Err(Status::not_found(format!("operation {name:?} not found")));
        };
        Ok(Response::new(follow(
            self.scheduler.clone(),
            String::new(),
            watch,
            InlineRequest::default(),
        )))
    }
}
