//! The worker's connection to the scheduler (`kiln.worker.v1.WorkerApi`,
//! see docs/worker-protocol.md): register, heartbeat, run assigned leases,
//! report results, reconnect with back-off keeping the same identity and
//! reporting running leases, and drain gracefully on shutdown.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kiln_digest::DigestFunction;
use kiln_proto::reapi::platform::Property;
use kiln_proto::worker::{
    Assign, Draining, Finished, HandBack, Heartbeat, LocalCacheCounters, PROTOCOL_VERSION, Phase, Progress,
    Register, SchedulerCommand, Started, WorkerUpdate, scheduler_command, worker_update,
};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::link::SchedulerLink;

use crate::config::WorkerConfig;
use crate::error::{WorkerError, WorkerResult};
use crate::executor::{DEFAULT_TIMEOUT, Executor, Job};
use crate::metadata::std_duration;

pub use crate::link::MAX_MESSAGE;
/// How long to wait for `Registered` after opening the stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat interval until the scheduler says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Runs a worker until `shutdown` completes and the worker has drained:
/// prepares the executor (work directory, local cache, sandbox — failing
/// at once if the sandbox cannot work), connects to the scheduler over
/// `scheduler` (reconnecting with back-off), fetches inputs from and
/// uploads outputs to the CAS over `cas`.
///
/// On `shutdown` the worker tells the scheduler it is draining, finishes
/// its running actions (or, after `drain_timeout`, kills them and hands
/// them back), closes its stream and returns.
pub async fn run_worker(
    config: WorkerConfig,
    scheduler: impl SchedulerLink,
    cas: Channel,
    shutdown: impl Future<Output = ()>,
) -> WorkerResult<()> {
    let scheduler: Arc<dyn SchedulerLink> = Arc::new(scheduler);
    let executor = Executor::new(config.clone(), cas).await?;
    let worker_id = load_worker_id(executor.local_cas().dir()).await?;
    let worker = Worker::new(executor.clone(), worker_id);
    tracing::info!(
        worker = %worker.id,
        name = %executor.name(),
        slots = worker.slots,
        sandbox = executor.sandbox().enabled(),
        "worker started"
    );
    let drain = CancellationToken::new();
    let run = worker.clone().connection_loop(scheduler, drain.clone());
    tokio::pin!(run);
    tokio::pin!(shutdown);
    let r = tokio::select! {
        r = &mut run => r,
        _ = &mut shutdown => {
            tracing::info!(worker = %worker.id, "shutdown requested: draining");
            drain.cancel();
            run.await
        }
    };
    executor.shutdown().await;
    r
}

/// The worker's stable identity, kept next to its cache (so it survives
/// restarts and reconnects).
async fn load_worker_id(cache_dir: &Path) -> WorkerResult<String> {
    let path = cache_dir.join("worker-id");
    if let Ok(s) = tokio::fs::read_to_string(&path).await {
        let id = s.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    tokio::fs::write(&path, &id)
        .await
        .map_err(WorkerError::io(format!("writing {}", path.display())))?;
    Ok(id)
}

/// A lease being run.
struct Lease {
    cancel: CancellationToken,
    /// Set when the worker gives the lease back (drain deadline): the
    /// result is dropped and `HandBack` is sent instead.
    hand_back: Arc<AtomicBool>,
}

/// The worker's state shared between the connection and the lease tasks.
pub struct Worker {
    id: String,
    executor: Arc<Executor>,
    slots: u32,
    leases: Mutex<HashMap<String, Lease>>,
    /// Updates waiting to be sent (results survive a broken stream).
    outbox: Mutex<VecDeque<WorkerUpdate>>,
    outbox_notify: Notify,
    draining: AtomicBool,
    /// Whether the last session got as far as `Registered` (resets the
    /// reconnect back-off).
    last_session_registered: AtomicBool,
    /// When draining started.
    drain_started: Mutex<Option<tokio::time::Instant>>,
}

/// After the drain deadline, how long a worker keeps trying to deliver
/// results to an unreachable scheduler before it leaves anyway.
const UNDELIVERED_GRACE: Duration = Duration::from_secs(30);

/// How one stream ended.
enum SessionEnd {
    /// Drained and closed: the worker is done.
    Done,
    /// The stream broke or was refused: reconnect.
    Broken(String),
}

fn update(u: worker_update::Update) -> WorkerUpdate {
    WorkerUpdate { update: Some(u) }
}

impl Worker {
    pub fn new(executor: Arc<Executor>, id: String) -> Arc<Worker> {
        let slots = executor.config().effective_slots();
        Arc::new(Worker {
            id,
            executor,
            slots,
            leases: Mutex::new(HashMap::new()),
            outbox: Mutex::new(VecDeque::new()),
            outbox_notify: Notify::new(),
            draining: AtomicBool::new(false),
            last_session_registered: AtomicBool::new(false),
            drain_started: Mutex::new(None),
        })
    }

    fn push(&self, u: WorkerUpdate) {
        self.outbox.lock().push_back(u);
        self.outbox_notify.notify_one();
    }

    /// Leases running or finished but not yet reported.
    fn unreported_leases(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.leases.lock().keys().cloned().collect();
        for u in self.outbox.lock().iter() {
            if let Some(worker_update::Update::Finished(f)) = &u.update {
                ids.push(f.lease_id.clone());
            }
        }
        ids.sort();
        ids.dedup();
        ids
    }

    fn idle(&self) -> bool {
        self.leases.lock().is_empty() && self.outbox.lock().is_empty()
    }

    fn register_message(&self) -> Register {
        let config = self.executor.config();
        let mut properties: Vec<Property> = config
            .property_pairs()
            .into_iter()
            .map(|(name, value)| Property { name, value })
            .collect();
        // `network` is honoured by the worker itself: offer every value.
        if !config.properties.contains_key("network") {
            for v in ["off", "on", "false", "true"] {
                properties.push(Property {
                    name: "network".into(),
                    value: v.into(),
                });
            }
        }
        Register {
            worker_id: self.id.clone(),
            name: self.executor.name().to_string(),
            properties,
            slots: self.slots,
            running_leases: self.unreported_leases(),
            protocol_version: PROTOCOL_VERSION,
        }
    }

    async fn heartbeat(&self) -> Heartbeat {
        let load = load_average().await;
        let running: Vec<String> = self.leases.lock().keys().cloned().collect();
        let free = self.slots.saturating_sub(running.len() as u32);
        let c = self.executor.local_cas().counts();
        Heartbeat {
            local_cache: Some(LocalCacheCounters {
                hits: c.hits,
                misses: c.misses,
                hit_bytes: c.hit_bytes,
                miss_bytes: c.miss_bytes,
            }),
            running_leases: running,
            load: load / f64::from(self.slots.max(1)),
            free_slots: if self.draining.load(Ordering::SeqCst) {
                0
            } else {
                free
            },
        }
    }

    /// Connects, serves and reconnects until drained.
    async fn connection_loop(
        self: Arc<Self>,
        scheduler: Arc<dyn SchedulerLink>,
        drain: CancellationToken,
    ) -> WorkerResult<()> {
        let config = self.executor.config();
        let mut backoff = config.reconnect_min;
        loop {
            if drain.is_cancelled() {
                self.begin_drain();
                if self.idle() {
                    return Ok(());
                }
                if self.drain_expired() && self.leases.lock().is_empty() {
                    let lost = self.outbox.lock().len();
                    tracing::warn!(
                        worker = %self.id,
                        undelivered = lost,
                        "the scheduler stayed unreachable while draining; leaving without delivering every update"
                    );
                    return Ok(());
                }
            }
            match self.session(scheduler.as_ref(), &drain).await {
                SessionEnd::Done => return Ok(()),
                SessionEnd::Broken(why) => {
                    tracing::warn!(worker = %self.id, reason = %why, retry_in = ?backoff, "scheduler stream lost; reconnecting");
                }
            }
            let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 4 + 1);
            let wait = backoff + Duration::from_millis(jitter);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // While draining with nothing left to report there is no
                // reason to reconnect: stop at once.
                _ = self.wait_idle_if_draining(&drain) => return Ok(()),
            }
            backoff = (backoff * 2).min(config.reconnect_max);
            if self.last_session_registered.swap(false, Ordering::SeqCst) {
                backoff = config.reconnect_min;
            }
        }
    }

    async fn wait_idle_if_draining(self: &Arc<Self>, drain: &CancellationToken) {
        drain.cancelled().await;
        self.begin_drain();
        loop {
            let notified = self.outbox_notify.notified();
            if self.idle() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    /// Whether the drain deadline and the grace for undelivered results
    /// have both passed.
    fn drain_expired(&self) -> bool {
        let limit = self.executor.config().drain_timeout + UNDELIVERED_GRACE;
        self.drain_started.lock().is_some_and(|t| t.elapsed() > limit)
    }

    /// Marks the worker draining and arms the drain deadline (once).
    fn begin_drain(self: &Arc<Self>) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.drain_started.lock() = Some(tokio::time::Instant::now());
        let me = self.clone();
        let deadline = self.executor.config().drain_timeout;
        kiln_store::task::spawn("worker-drain-deadline", async move {
            tokio::time::sleep(deadline).await;
            let leases: Vec<(String, CancellationToken, Arc<AtomicBool>)> = me
                .leases
                .lock()
                .iter()
                .map(|(id, l)| (id.clone(), l.cancel.clone(), l.hand_back.clone()))
                .collect();
            for (id, cancel, hand_back) in leases {
                tracing::warn!(lease = %id, "drain deadline reached: killing the action and handing it back");
                hand_back.store(true, Ordering::SeqCst);
                cancel.cancel();
            }
        });
    }

    /// One stream: register, then serve until it breaks or the worker has
    /// drained.
    async fn session(
        self: &Arc<Self>,
        scheduler: &dyn SchedulerLink,
        drain: &CancellationToken,
    ) -> SessionEnd {
        let (tx, rx) = mpsc::channel::<WorkerUpdate>(256);
        let register = self.register_message();
        let reported: Vec<String> = register.running_leases.clone();
        if tx
            .send(update(worker_update::Update::Register(register)))
            .await
            .is_err()
        {
            return SessionEnd::Broken("the outgoing stream closed".into());
        }
        let mut inbound = match scheduler.open(ReceiverStream::new(rx)).await {
            Ok(r) => r,
            Err(s) => return SessionEnd::Broken(format!("Connect failed: {s}")),
        };
        let registered = match tokio::time::timeout(REGISTER_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(SchedulerCommand {
                command: Some(scheduler_command::Command::Registered(r)),
            }))) => r,
            Ok(Some(Ok(_))) => {
                return SessionEnd::Broken("the scheduler did not answer Registered first".into());
            }
            Ok(None) => {
                return SessionEnd::Broken("the scheduler closed the stream before Registered".into());
            }
            Ok(Some(Err(s))) => return SessionEnd::Broken(format!("registration failed: {s}")),
            Err(_) => return SessionEnd::Broken("no Registered within 30 s".into()),
        };
        self.last_session_registered.store(true, Ordering::SeqCst);
        tracing::info!(worker = %self.id, leases = reported.len(), "registered with the scheduler");
        let interval = registered
            .heartbeat_interval
            .as_ref()
            .map(std_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_HEARTBEAT);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tx = Some(tx);
        let mut sent_draining = false;
        let mut closing_since: Option<tokio::time::Instant> = None;
        loop {
            if drain.is_cancelled() && !sent_draining {
                self.begin_drain();
                self.push(update(worker_update::Update::Draining(Draining {})));
                sent_draining = true;
            }
            // Send what is waiting. A failed send leaves it for the next
            // stream.
            if let Some(sender) = &tx {
                loop {
                    let next = self.outbox.lock().pop_front();
                    let Some(u) = next else { break };
                    if let Err(mpsc::error::SendError(u)) = sender.send(u).await {
                        self.outbox.lock().push_front(u);
                        return SessionEnd::Broken("the outgoing stream closed".into());
                    }
                }
            }
            if sent_draining && tx.is_some() && self.idle() {
                // Everything is reported: half-close and wait for the
                // scheduler to close its side.
                tx = None;
                closing_since = Some(tokio::time::Instant::now());
            }
            let close_deadline = closing_since.map(|t| t + Duration::from_secs(10));
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(cmd)) => self.handle(cmd),
                    None if tx.is_none() => return SessionEnd::Done,
                    None => return SessionEnd::Broken("the scheduler closed the stream".into()),
                    Some(Err(s)) if tx.is_none() => {
                        tracing::debug!(status = %s, "stream ended while closing");
                        return SessionEnd::Done;
                    }
                    Some(Err(s)) => return SessionEnd::Broken(format!("stream error: {s}")),
                },
                _ = ticker.tick(), if tx.is_some() => {
                    let hb = self.heartbeat().await;
                    self.push(update(worker_update::Update::Heartbeat(hb)));
                }
                _ = self.outbox_notify.notified(), if tx.is_some() => {}
                _ = drain.cancelled(), if !sent_draining => {}
                _ = sleep_until_opt(close_deadline) => return SessionEnd::Done,
            }
        }
    }

    /// Handles one scheduler command.
    fn handle(self: &Arc<Self>, cmd: SchedulerCommand) {
        match cmd.command {
            Some(scheduler_command::Command::Assign(a)) => self.accept(*a),
            Some(scheduler_command::Command::Cancel(c)) => {
                tracing::info!(lease = %c.lease_id, reason = %c.reason, "lease cancelled by the scheduler");
                if let Some(l) = self.leases.lock().get(&c.lease_id) {
                    l.cancel.cancel();
                }
                self.outbox.lock().retain(|u| {
                    !matches!(&u.update, Some(worker_update::Update::Finished(f)) if f.lease_id == c.lease_id)
                });
            }
            Some(scheduler_command::Command::Registered(_)) => {}
            None => tracing::warn!("empty command from the scheduler"),
        }
    }

    /// Takes an assigned lease (or hands it back when it cannot).
    fn accept(self: &Arc<Self>, a: Assign) {
        let lease_id = a.lease_id.clone();
        if lease_id.is_empty() {
            tracing::warn!("Assign without a lease id ignored");
            return;
        }
        let hand_back = |reason: &str| {
            self.push(update(worker_update::Update::HandBack(HandBack {
                lease_id: lease_id.clone(),
                reason: reason.to_string(),
            })));
        };
        if self.draining.load(Ordering::SeqCst) {
            hand_back("the worker is draining");
            return;
        }
        let cancel = CancellationToken::new();
        let give_back = Arc::new(AtomicBool::new(false));
        {
            let mut leases = self.leases.lock();
            if leases.contains_key(&lease_id) {
                return;
            }
            if leases.len() >= self.slots as usize {
                drop(leases);
                hand_back("no free slot");
                return;
            }
            leases.insert(
                lease_id.clone(),
                Lease {
                    cancel: cancel.clone(),
                    hand_back: give_back.clone(),
                },
            );
        }
        self.push(update(worker_update::Update::Started(Started {
            lease_id: lease_id.clone(),
        })));
        let me = self.clone();
        kiln_store::task::spawn("worker-lease", async move {
            let progress = |phase: Phase, md: &kiln_proto::reapi::ExecutedActionMetadata| {
                me.push(update(worker_update::Update::Progress(Box::new(Progress {
                    lease_id: lease_id.clone(),
                    phase: phase as i32,
                    partial_execution_metadata: Some(md.clone()),
                }))));
            };
            let response = match job_from_assign(a) {
                Ok(job) => {
                    me.executor
                        .execute_with_progress(job, cancel.clone(), &progress)
                        .await
                }
                Err(e) => kiln_proto::reapi::ExecuteResponse {
                    status: Some(e.to_rpc_status()),
                    message: e.to_string(),
                    ..Default::default()
                },
            };
            me.leases.lock().remove(&lease_id);
            if give_back.load(Ordering::SeqCst) {
                me.push(update(worker_update::Update::HandBack(HandBack {
                    lease_id,
                    reason: "the worker is shutting down".into(),
                })));
            } else if cancel.is_cancelled() {
                // Cancelled by the scheduler: it expects nothing.
                me.outbox_notify.notify_one();
            } else {
                me.push(update(worker_update::Update::Finished(Box::new(Finished {
                    lease_id,
                    response: Some(response),
                }))));
            }
        });
    }
}

/// Builds the Job of an Assign.
fn job_from_assign(a: Assign) -> WorkerResult<Job> {
    let action_digest = a
        .action_digest
        .ok_or_else(|| WorkerError::invalid("Assign without action_digest"))?;
    let digest_function = DigestFunction::resolve(a.digest_function, &action_digest.hash)?;
    let action = a
        .action
        .ok_or_else(|| WorkerError::invalid("Assign without action"))?;
    let command = a
        .command
        .ok_or_else(|| WorkerError::invalid("Assign without command"))?;
    #[allow(deprecated)]
    let platform = a
        .platform
        .or_else(|| action.platform.clone())
        .or_else(|| command.platform.clone());
    let timeout = a
        .timeout
        .as_ref()
        .map(std_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_TIMEOUT);
    Ok(Job {
        instance_name: a.instance_name,
        digest_function,
        action_digest,
        action,
        command,
        platform,
        timeout,
        queued_at: a.queued_at,
    })
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The 1-minute load average (0 when unknown).
async fn load_average() -> f64 {
    tokio::fs::read_to_string("/proc/loadavg")
        .await
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}
