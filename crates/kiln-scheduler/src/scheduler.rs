//! The scheduler: validates and submits actions, holds the live worker
//! streams, delivers [`Effects`] and runs the deadline reaper.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use kiln_cache::{Instance, Instances};
use kiln_digest::BlobKey;
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::priority_capabilities::PriorityRange;
use kiln_proto::reapi::{ExecuteRequest, ExecuteResponse, ExecutionCapabilities, PriorityCapabilities};
use kiln_proto::request_info::RequestInfo;
use kiln_proto::worker::{SchedulerCommand, scheduler_command};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::ac::{self, InlineRequest};
use crate::config::SchedulerConfig;
use crate::error::{SchedulerError, SchedulerResult};
use crate::inputs::{self, DirCache};
use crate::observe::{ActionObserver, ActionRecord, Observers};
use crate::operations::{from_proto_duration, to_operation};
use crate::platform::{Requirements, effective_platform};
use crate::state::memory::MemoryState;
use crate::state::{ConnId, Effects, NewJob, OperationView, OperationWatch, SchedulerState, StateStats};

/// Directories kept decoded per generation of the directory cache.
const DIR_CACHE_ENTRIES: usize = 1 << 16;

/// One live worker stream: dropping it ends the stream (the command
/// channel closes and the reader is told to stop).
pub(crate) struct Conn {
    pub id: ConnId,
    pub tx: mpsc::UnboundedSender<SchedulerCommand>,
    pub _stop: watch::Sender<()>,
}

/// How an Execute starts.
pub(crate) enum ExecStart {
    /// Served from the Action Cache: a completed operation, not retained.
    Cached(Box<Operation>),
    /// Queued, executing, or joined an identical in-flight action.
    Watch(OperationWatch),
}

pub struct Scheduler {
    pub(crate) config: Arc<SchedulerConfig>,
    pub(crate) instances: Arc<Instances>,
    pub(crate) state: Arc<dyn SchedulerState>,
    pub(crate) conns: Mutex<HashMap<String, Conn>>,
    dirs: DirCache,
    next_conn: AtomicU64,
    pub(crate) observers: Observers,
}

impl Scheduler {
    /// A scheduler with in-memory state over `instances`' stores. Must be
    /// called inside a tokio runtime: it spawns the deadline reaper, which
    /// stops when the scheduler is dropped.
    pub fn new(config: SchedulerConfig, instances: Arc<Instances>) -> SchedulerResult<Arc<Scheduler>> {
        let config = Arc::new(config);
        let state = Arc::new(MemoryState::new(config.clone()));
        Self::with_state(config, instances, state)
    }

    /// A scheduler over any [`SchedulerState`] implementation.
    pub fn with_state(
        config: Arc<SchedulerConfig>,
        instances: Arc<Instances>,
        state: Arc<dyn SchedulerState>,
    ) -> SchedulerResult<Arc<Scheduler>> {
        config
            .validate()
            .map_err(|e| SchedulerError::InvalidArgument(format!("scheduler configuration: {e}")))?;
        // Connection ids must not repeat across restarts of a shared state.
        let seed = uuid::Uuid::new_v4().as_u64_pair().0 & 0xffff_ffff_0000_0000;
        let scheduler = Arc::new(Scheduler {
            config,
            instances,
            state,
            conns: Mutex::new(HashMap::new()),
            dirs: DirCache::new(DIR_CACHE_ENTRIES),
            next_conn: AtomicU64::new(seed),
            observers: Observers::default(),
        });
        let weak = Arc::downgrade(&scheduler);
        let period = scheduler.config.tick_interval;
        kiln_store::task::spawn("scheduler-reaper", async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(s) = weak.upgrade() else { break };
                let effects = s.state.tick(SystemTime::now()).await;
                s.deliver(effects).await;
            }
        });
        Ok(scheduler)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn instances(&self) -> &Arc<Instances> {
        &self.instances
    }

    /// The `execution_capabilities` to advertise for `instance_name`
    /// (`None` for an unknown instance): execution enabled, the instance's
    /// digest functions, SHA-256 as the legacy single function, and the
    /// full priority range.
    pub fn execution_capabilities(&self, instance_name: &str) -> Option<ExecutionCapabilities> {
        let instance = self.instances.get(instance_name).ok()?;
        let functions: Vec<i32> = instance
            .digest_functions
            .iter()
            .map(|f| f.to_proto() as i32)
            .collect();
        Some(ExecutionCapabilities {
            digest_function: instance
                .digest_functions
                .first()
                .map(|f| f.to_proto() as i32)
                .unwrap_or_default(),
            exec_enabled: true,
            execution_priority_capabilities: Some(PriorityCapabilities {
                priorities: vec![PriorityRange {
                    min_priority: i32::MIN,
                    max_priority: i32::MAX,
                }],
            }),
            supported_node_properties: Vec::new(),
            digest_functions: functions,
        })
    }

    /// Registers an observer of finished actions and Execute cache hits
    /// (see [`crate::observe`]).
    pub fn add_observer(&self, observer: Arc<dyn ActionObserver>) {
        self.observers.add(observer);
    }

    /// A bounded copy of the live queue, executing actions and workers.
    pub async fn snapshot(&self) -> crate::state::snapshot::StateSnapshot {
        self.state.snapshot(SystemTime::now()).await
    }

    /// The current view of an operation, running or retained after it
    /// completed (read-only; for the dashboard).
    pub async fn operation(&self, name: &str) -> Option<Arc<OperationView>> {
        self.state.get(name, SystemTime::now()).await
    }

    /// Queue, executing and worker counts.
    pub async fn stats(&self) -> StateStats {
        self.state.stats().await
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Delivers commands to worker streams and closes streams. An `Assign`
    /// that cannot be delivered is re-queued (which may yield more effects).
    pub(crate) async fn deliver(&self, effects: Effects) {
        let mut pending = effects;
        // Each round re-queues undeliverable leases onto connected workers
        // only, so this converges; the bound is a safety net.
        for _ in 0..64 {
            if pending.is_empty() {
                return;
            }
            let mut next = Effects::default();
            for out in std::mem::take(&mut pending.commands) {
                let tx = self
                    .conns
                    .lock()
                    .get(&out.worker)
                    .filter(|c| c.id == out.conn)
                    .map(|c| c.tx.clone());
                let lease = match &out.command.command {
                    Some(scheduler_command::Command::Assign(a)) => Some(a.lease_id.clone()),
                    _ => None,
                };
                let sent = tx.is_some_and(|tx| tx.send(out.command).is_ok());
                if !sent && let Some(lease) = lease {
                    tracing::debug!(worker = %out.worker, %lease, "assignment undeliverable; re-queuing");
                    let now = SystemTime::now();
                    next.extend(
                        self.state
                            .assign_undeliverable(&out.worker, out.conn, &lease, now)
                            .await,
                    );
                }
            }
            for (worker, conn) in std::mem::take(&mut pending.close) {
                let removed = {
                    let mut conns = self.conns.lock();
                    match conns.get(&worker) {
                        Some(c) if c.id == conn => conns.remove(&worker),
                        _ => None,
                    }
                };
                drop(removed);
            }
            pending = next;
        }
        if !pending.is_empty() {
            tracing::error!("effects still pending after 64 delivery rounds; dropped");
        }
    }

    /// Starts an Execute: cache lookup, validation, submission.
    pub(crate) async fn execute(
        &self,
        req: &ExecuteRequest,
        request: RequestInfo,
    ) -> SchedulerResult<ExecStart> {
        let instance = self.instances.get(&req.instance_name)?.clone();
        let digest = req
            .action_digest
            .as_ref()
            .ok_or_else(|| SchedulerError::InvalidArgument("action_digest is required".into()))?;
        let f = instance.digest_function(req.digest_function, &digest.hash)?;
        let key = BlobKey::from_digest(f, digest)?;
        let inline = inline_request(req);

        if !req.skip_cache_lookup
            && let Some(mut result) = ac::lookup(&instance, &key).await?
        {
            if !inline.is_empty() {
                ac::inline(
                    &instance,
                    f,
                    &mut result,
                    &inline,
                    self.instances.limits().max_inline_bytes,
                )
                .await;
            }
            let view = OperationView {
                name: format!("operations/{}", uuid::Uuid::new_v4()),
                instance_name: req.instance_name.clone(),
                stage: Stage::Completed,
                action_digest: key.to_digest(),
                digest_function: f,
                partial_metadata: None,
                response: Some(ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    status: Some(kiln_proto::rpc::Status::default()),
                    ..Default::default()
                }),
            };
            self.observers.notify(|| {
                let result = view.response.as_ref().and_then(|r| r.result.as_ref());
                ActionRecord {
                    operation: view.name.clone(),
                    instance_name: req.instance_name.clone(),
                    digest_function: f,
                    action_digest: view.action_digest.clone(),
                    cached: true,
                    status_code: 0,
                    exit_code: result.map(|r| r.exit_code),
                    worker: String::new(),
                    metadata: result.and_then(|r| r.execution_metadata.clone()),
                    request,
                    platform: Default::default(),
                    completed_at: SystemTime::now(),
                }
            });
            return Ok(ExecStart::Cached(Box::new(to_operation(&view))));
        }

        let limit = self.config.max_metadata_blob_bytes;
        let action = inputs::load_action(&instance, &key, limit).await?;
        let command = inputs::load_inputs(&instance, f, &action, limit, &self.dirs).await?;
        let platform = effective_platform(&action, &command);
        let requirements = Requirements::from_platform(&platform, &self.config)?;
        let requested = match &action.timeout {
            None => None,
            Some(t) => Some(from_proto_duration(Some(t)).ok_or_else(|| {
                SchedulerError::InvalidArgument(format!("action timeout {t:?} is not a valid duration"))
            })?),
        };
        let timeout = self.config.effective_timeout(requested);
        let cacheable = !action.do_not_cache;
        let job = NewJob {
            instance_name: req.instance_name.clone(),
            digest_function: f,
            action_key: key,
            action,
            command,
            platform,
            requirements,
            priority: req.execution_policy.as_ref().map(|p| p.priority).unwrap_or(0),
            request,
            timeout,
            cacheable,
        };
        let submitted = self.state.submit(job, SystemTime::now()).await?;
        self.deliver(submitted.effects).await;
        Ok(ExecStart::Watch(submitted.watch))
    }

    /// Inlines what the request asked for into a completed operation's result.
    pub(crate) async fn inline_into(
        &self,
        instance_name: &str,
        view: &mut OperationView,
        req: &InlineRequest,
    ) {
        if req.is_empty() {
            return;
        }
        let Ok(instance) = self.instances.get(instance_name) else {
            return;
        };
        let instance: &Instance = instance;
        if let Some(result) = view.response.as_mut().and_then(|r| r.result.as_mut()) {
            ac::inline(
                instance,
                view.digest_function,
                result,
                req,
                self.instances.limits().max_inline_bytes,
            )
            .await;
        }
    }
}

pub(crate) fn inline_request(req: &ExecuteRequest) -> InlineRequest {
    InlineRequest {
        stdout: req.inline_stdout,
        stderr: req.inline_stderr,
        output_files: req.inline_output_files.clone(),
    }
}
