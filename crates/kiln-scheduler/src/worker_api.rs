//! Server side of Kiln's worker protocol (`kiln.worker.v1.WorkerApi`,
//! docs/worker-protocol.md): one bidirectional stream per worker.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use kiln_proto::reapi::ExecuteResponse;
use kiln_proto::worker::worker_api_server::WorkerApi;
use kiln_proto::worker::{
    Finished, PROTOCOL_VERSION, Register, Registered, SchedulerCommand, WorkerUpdate, scheduler_command,
    worker_update,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ac;
use crate::observe::ActionRecord;
use crate::operations::to_proto_duration;
use crate::platform::WorkerCaps;
use crate::scheduler::{Conn, Scheduler};
use crate::state::{ConnId, LeaseInfo, WorkerRegistration, fill_execution_metadata};

/// How long a new stream may take to send `Register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

pub type CommandStream = Pin<Box<dyn Stream<Item = Result<SchedulerCommand, Status>> + Send + 'static>>;

pub struct WorkerApiService {
    scheduler: Arc<Scheduler>,
}

impl WorkerApiService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        WorkerApiService { scheduler }
    }
}

fn validate(reg: &Register) -> Result<(), Status> {
    if reg.worker_id.is_empty() {
        return Err(Status::invalid_argument("Register.worker_id must not be empty"));
    }
    if reg.slots == 0 {
        return Err(Status::invalid_argument("Register.slots must be at least 1"));
    }
    if reg.protocol_version != 0 && reg.protocol_version != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "worker protocol version {} is not supported; this scheduler speaks version {PROTOCOL_VERSION}",
            reg.protocol_version
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl WorkerApi for WorkerApiService {
    type ConnectStream = CommandStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerUpdate>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        open_session(self.scheduler.clone(), request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Inbound half of a worker session: the worker's messages, from a gRPC
/// stream or, for a worker in the same process, from a channel.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<WorkerUpdate, Status>> + Send + 'static>>;

/// Serves one worker session over any transport: waits for `Register`,
/// registers the worker and returns the stream of commands for it; the
/// worker's later messages are handled by a background task until
/// `inbound` ends. The gRPC service and in-process workers both use this.
pub async fn open_session(
    s: Arc<Scheduler>,
    inbound: impl Stream<Item = Result<WorkerUpdate, Status>> + Send + 'static,
) -> Result<CommandStream, Status> {
    let mut inbound: UpdateStream = Box::pin(inbound);
    {
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register message received in time"))?
            .transpose()?;
        let reg = match first {
            Some(WorkerUpdate {
                update: Some(worker_update::Update::Register(r)),
            }) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a worker stream must be Register",
                ));
            }
        };
        validate(&reg)?;
        let worker_id = reg.worker_id.clone();
        let conn_id = s.next_conn_id();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(());
        let registered = SchedulerCommand {
            command: Some(scheduler_command::Command::Registered(Registered {
                worker_id: worker_id.clone(),
                heartbeat_interval: Some(to_proto_duration(s.config.heartbeat_interval)),
                heartbeat_timeout: Some(to_proto_duration(s.config.heartbeat_timeout)),
            })),
        };
        // The receiver is alive: this cannot fail.
        let _ = tx.send(registered);
        let replaced = s.conns.lock().insert(
            worker_id.clone(),
            Conn {
                id: conn_id,
                tx,
                _stop: stop_tx,
            },
        );
        drop(replaced);
        tracing::info!(worker = %worker_id, name = %reg.name, slots = reg.slots, running = reg.running_leases.len(), "worker registered");
        let registration = WorkerRegistration {
            caps: WorkerCaps::from_properties(&reg.properties, &s.config, &reg.worker_id),
            worker_id: reg.worker_id,
            name: reg.name,
            slots: reg.slots,
            running_leases: reg.running_leases,
        };
        let effects = s
            .state
            .register_worker(registration, conn_id, SystemTime::now())
            .await;
        s.deliver(effects).await;

        let scheduler = s.clone();
        kiln_store::task::spawn("worker-session", async move {
            read_loop(scheduler, worker_id, conn_id, inbound, stop_rx).await;
        });
        let out = UnboundedReceiverStream::new(rx).map(Ok);
        Ok(Box::pin(out))
    }
}

/// Handles a worker's messages until its stream ends or the scheduler
/// drops the connection (lost, replaced by a newer stream).
async fn read_loop(
    s: Arc<Scheduler>,
    worker: String,
    conn: ConnId,
    mut inbound: UpdateStream,
    mut stop: watch::Receiver<()>,
) {
    loop {
        let msg = tokio::select! {
            m = inbound.next() => m,
            _ = stop.changed() => break,
        };
        let update = match msg {
            Some(Ok(WorkerUpdate { update: Some(u) })) => u,
            Some(Ok(WorkerUpdate { update: None })) => continue,
            None => break,
            Some(Err(status)) => {
                tracing::debug!(%worker, %status, "worker stream ended with an error");
                break;
            }
        };
        handle(&s, &worker, conn, update).await;
    }
    {
        let mut conns = s.conns.lock();
        if conns.get(&worker).is_some_and(|c| c.id == conn) {
            conns.remove(&worker);
        }
    }
    tracing::info!(%worker, "worker stream closed");
    let effects = s
        .state
        .worker_disconnected(&worker, conn, SystemTime::now())
        .await;
    s.deliver(effects).await;
}

async fn handle(s: &Arc<Scheduler>, worker: &str, conn: ConnId, update: worker_update::Update) {
    use worker_update::Update;
    let now = SystemTime::now();
    let effects = match update {
        Update::Register(_) => {
            tracing::warn!(%worker, "Register received twice on one stream; ignored");
            return;
        }
        Update::Heartbeat(hb) => s.state.heartbeat(worker, conn, &hb, now).await,
        Update::Started(st) => s.state.lease_started(worker, conn, &st.lease_id, now).await,
        Update::Progress(p) => s.state.lease_progress(worker, conn, &p, now).await,
        Update::Finished(f) => finished(s, worker, conn, *f).await,
        Update::Draining(_) => {
            tracing::info!(%worker, "worker draining");
            s.state.worker_draining(worker, conn, now).await
        }
        Update::HandBack(h) => {
            tracing::info!(%worker, lease = %h.lease_id, reason = %h.reason, "lease handed back");
            s.state.lease_handed_back(worker, conn, &h.lease_id, now).await
        }
    };
    s.deliver(effects).await;
}

/// Writes a successful cacheable result to the Action Cache, then completes
/// the lease's operations (the AC entry exists before clients hear of it).
async fn finished(s: &Arc<Scheduler>, worker: &str, conn: ConnId, f: Finished) -> crate::state::Effects {
    let mut response = f.response.unwrap_or_default();
    if response.result.is_none() && response.status.as_ref().is_none_or(|s| s.code == 0) {
        tracing::warn!(%worker, lease = %f.lease_id, "Finished without a result or an error status");
        response.status = Some(kiln_proto::rpc::Status {
            code: tonic::Code::Internal as i32,
            message: format!("worker {worker} reported no result for the action"),
            details: Vec::new(),
        });
    }
    let info = s.state.lease_info(worker, &f.lease_id).await;
    if let Some(info) = &info
        && info.job.cacheable
        && ac::cacheable_response(&response)
        && let Some(result) = &response.result
    {
        match s.instances.get(&info.job.instance_name) {
            Ok(instance) => {
                if let Err(e) = ac::write(instance, &info.job.action_key, result).await {
                    tracing::warn!(action = %info.job.action_key, error = %e, "could not cache an action result");
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease of an unknown instance"),
        }
    }
    // Built before the response moves into the state, reported once the
    // operations are complete.
    let record = info
        .zip(s.observers.listeners())
        .map(|(info, listeners)| (completion_record(&info, &response), listeners));
    let effects = s
        .state
        .lease_finished(worker, conn, &f.lease_id, response, SystemTime::now())
        .await;
    if let Some((record, listeners)) = record {
        listeners.report(&record);
    }
    effects
}

/// The observation record of a result a worker reported.
fn completion_record(info: &LeaseInfo, response: &ExecuteResponse) -> ActionRecord {
    let result = response.result.as_ref();
    let metadata = result.map(|r| {
        let mut md = r.execution_metadata.clone().unwrap_or_default();
        fill_execution_metadata(&mut md, &info.worker_name, info.queued_at);
        md
    });
    ActionRecord {
        operation: info.operation.clone(),
        instance_name: info.job.instance_name.clone(),
        digest_function: info.job.digest_function,
        action_digest: info.job.action_key.to_digest(),
        cached: false,
        status_code: response.status.as_ref().map(|s| s.code).unwrap_or(0),
        exit_code: result.map(|r| r.exit_code),
        worker: info.worker_name.clone(),
        metadata,
        request: info.job.request.clone(),
        platform: info.job.platform.clone(),
        completed_at: SystemTime::now(),
    }
}
