//! Test harness: a real tonic server on 127.0.0.1:0 with the cache and
//! scheduler services over memory stores, REAPI clients, and a fake worker
//! that speaks the worker protocol over a real stream.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::longrunning::Operation;
use kiln_proto::longrunning::operation;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    Action, ActionResult, Command, Digest, Directory, ExecuteOperationMetadata, ExecuteRequest,
    ExecuteResponse, ExecutionPolicy, FileNode, Platform, RequestMetadata, platform,
};
use kiln_proto::worker::worker_api_client::WorkerApiClient;
use kiln_proto::worker::{
    Assign, Finished, Heartbeat, Register, SchedulerCommand, Started, WorkerUpdate, scheduler_command,
    worker_update,
};
use kiln_scheduler::{Scheduler, SchedulerConfig};
use kiln_store::memory::MemoryStore;
use kiln_store::{Blob, Store};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

pub const WAIT: Duration = Duration::from_secs(10);

/// A config with short timings for tests.
pub fn fast_config() -> SchedulerConfig {
    SchedulerConfig {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(800),
        tick_interval: Duration::from_millis(20),
        no_worker_wait: Duration::from_secs(5),
        unwatched_grace: Duration::from_secs(30),
        lease_grace: Duration::from_millis(300),
        aging_interval: Duration::from_secs(3600),
        ..SchedulerConfig::default()
    }
}

pub struct Harness {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub instances: Arc<Instances>,
    pub scheduler: Arc<Scheduler>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start(config: SchedulerConfig) -> Harness {
    let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(64 << 20));
    let ac: Arc<dyn Store> = Arc::new(MemoryStore::new(16 << 20));
    let instances = Arc::new(Instances::new(
        [Instance::new("", cas, ac)],
        CacheLimits::default(),
    ));
    let scheduler = Scheduler::new(config, instances.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut routes = tonic::service::RoutesBuilder::default();
    kiln_cache::add_routes(&mut routes, instances.clone());
    scheduler.add_routes(&mut routes);
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let channel = connect(addr).await;
    Harness {
        addr,
        channel,
        instances,
        scheduler,
        shutdown: Some(tx),
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// What a test action looks like.
#[derive(Clone, Default)]
pub struct Spec {
    /// Makes the action unique.
    pub tag: String,
    pub platform: Vec<(&'static str, String)>,
    /// Put the platform on the Command only (Buck2 style).
    pub platform_on_command: bool,
    pub timeout: Option<Duration>,
    pub do_not_cache: bool,
    /// Input files (name, content) under the root.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Spec {
    pub fn new(tag: &str) -> Self {
        Spec {
            tag: tag.to_string(),
            ..Default::default()
        }
    }
}

/// The blobs of an action, built but not necessarily uploaded.
pub struct Built {
    pub action: Digest,
    pub command: Digest,
    pub root: Digest,
    pub files: Vec<Digest>,
    pub blobs: Vec<(Digest, Bytes)>,
}

pub fn digest(data: &[u8]) -> Digest {
    BlobKey::of(DigestFunction::Sha256, data).to_digest()
}

pub fn build(spec: &Spec) -> Built {
    let mut blobs = Vec::new();
    let platform = Platform {
        properties: spec
            .platform
            .iter()
            .map(|(k, v)| platform::Property {
                name: k.to_string(),
                value: v.clone(),
            })
            .collect(),
    };
    #[allow(deprecated)]
    let command = Command {
        arguments: vec!["/bin/echo".into(), spec.tag.clone()],
        output_paths: vec!["out".into()],
        platform: spec.platform_on_command.then(|| platform.clone()),
        ..Default::default()
    };
    let command_bytes = Bytes::from(command.encode_to_vec());
    let command_digest = digest(&command_bytes);
    blobs.push((command_digest.clone(), command_bytes));
    let mut files = Vec::new();
    let mut dir = Directory::default();
    for (name, content) in &spec.files {
        let d = digest(content);
        files.push(d.clone());
        blobs.push((d.clone(), Bytes::from(content.clone())));
        dir.files.push(FileNode {
            name: name.clone(),
            digest: Some(d),
            is_executable: false,
            node_properties: None,
        });
    }
    let root_bytes = Bytes::from(dir.encode_to_vec());
    let root = digest(&root_bytes);
    blobs.push((root.clone(), root_bytes));
    let action = Action {
        command_digest: Some(command_digest.clone()),
        input_root_digest: Some(root.clone()),
        timeout: spec.timeout.map(|t| kiln_proto::protobuf::Duration {
            seconds: t.as_secs() as i64,
            nanos: t.subsec_nanos() as i32,
        }),
        do_not_cache: spec.do_not_cache,
        platform: (!spec.platform_on_command && !spec.platform.is_empty()).then_some(platform),
        ..Default::default()
    };
    let action_bytes = Bytes::from(action.encode_to_vec());
    let action_digest = digest(&action_bytes);
    blobs.push((action_digest.clone(), action_bytes));
    Built {
        action: action_digest,
        command: command_digest,
        root,
        files,
        blobs,
    }
}

impl Harness {
    pub fn instance(&self) -> &Arc<Instance> {
        self.instances.get("").unwrap()
    }

    pub async fn put(&self, d: &Digest, data: Bytes) {
        let key = BlobKey::from_digest(DigestFunction::Sha256, d).unwrap();
        self.instance().cas.put(&key, Blob::identity(data)).await.unwrap();
    }

    /// Builds and uploads every blob of an action; returns its digest.
    pub async fn upload(&self, spec: &Spec) -> Digest {
        let built = build(spec);
        for (d, data) in &built.blobs {
            self.put(d, data.clone()).await;
        }
        built.action
    }

    pub async fn ac_get(&self, action: &Digest) -> Option<ActionResult> {
        let key = BlobKey::from_digest(DigestFunction::Sha256, action).unwrap();
        let data = kiln_store::codec::get_identity(self.instance().ac.as_ref(), &key)
            .await
            .unwrap()?;
        Some(ActionResult::decode(data).unwrap())
    }

    pub async fn ac_put(&self, action: &Digest, result: &ActionResult) {
        let key = BlobKey::from_digest(DigestFunction::Sha256, action).unwrap();
        self.instance()
            .ac
            .put(&key, Blob::identity(Bytes::from(result.encode_to_vec())))
            .await
            .unwrap();
    }

    pub fn exec_client(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel.clone())
    }

    pub fn ops_client(&self) -> OperationsClient<Channel> {
        OperationsClient::new(self.channel.clone())
    }

    /// Calls Execute; returns the stream or the error status.
    pub async fn execute_with(
        &self,
        action: &Digest,
        skip_cache_lookup: bool,
        priority: i32,
        invocation: &str,
    ) -> Result<Streaming<Operation>, tonic::Status> {
        let mut req = tonic::Request::new(ExecuteRequest {
            instance_name: String::new(),
            skip_cache_lookup,
            action_digest: Some(action.clone()),
            execution_policy: Some(ExecutionPolicy { priority }),
            ..Default::default()
        });
        if !invocation.is_empty() {
            let md = RequestMetadata {
                tool_invocation_id: invocation.to_string(),
                ..Default::default()
            };
            req.metadata_mut().insert_bin(
                "build.bazel.remote.execution.v2.requestmetadata-bin",
                tonic::metadata::MetadataValue::from_bytes(&md.encode_to_vec()),
            );
        }
        self.exec_client().execute(req).await.map(|r| r.into_inner())
    }

    pub async fn execute(&self, action: &Digest) -> Streaming<Operation> {
        self.execute_with(action, false, 0, "").await.unwrap()
    }
}

pub fn stage(op: &Operation) -> i32 {
    let md = op.metadata.as_ref().expect("operation metadata");
    ExecuteOperationMetadata::decode(md.value.as_slice())
        .unwrap()
        .stage
}

pub fn response(op: &Operation) -> ExecuteResponse {
    match &op.result {
        Some(operation::Result::Response(any)) => {
            assert_eq!(
                any.type_url,
                "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
            );
            ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        other => panic!("operation {} has no response: {other:?}", op.name),
    }
}

/// The next operation message (within [`WAIT`]).
pub async fn next_op(stream: &mut Streaming<Operation>) -> Operation {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("timed out waiting for an operation update")
        .expect("stream error")
        .expect("stream ended before the operation was done")
}

/// Reads until the operation is done; checks `done` only at COMPLETED.
pub async fn wait_done(stream: &mut Streaming<Operation>) -> (Operation, ExecuteResponse) {
    for _ in 0..1000 {
        let op = next_op(stream).await;
        let completed = stage(&op) == 4;
        assert_eq!(op.done, completed, "done must be set exactly at COMPLETED");
        if op.done {
            let r = response(&op);
            return (op, r);
        }
    }
    panic!("operation never completed");
}

/// A worker that speaks the protocol, driven by the test.
pub struct FakeWorker {
    pub id: String,
    tx: mpsc::UnboundedSender<WorkerUpdate>,
    rx: Streaming<SchedulerCommand>,
    running: Arc<Mutex<HashSet<String>>>,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
    pub heartbeat_interval: Duration,
}

fn upd(u: worker_update::Update) -> WorkerUpdate {
    WorkerUpdate { update: Some(u) }
}

impl FakeWorker {
    pub async fn connect(h: &Harness, id: &str, properties: &[(&str, &str)], slots: u32) -> FakeWorker {
        Self::connect_with(h, id, properties, slots, Vec::new()).await
    }

    pub async fn connect_with(
        h: &Harness,
        id: &str,
        properties: &[(&str, &str)],
        slots: u32,
        running_leases: Vec<String>,
    ) -> FakeWorker {
        let (tx, rx_updates) = mpsc::unbounded_channel();
        tx.send(upd(worker_update::Update::Register(Register {
            worker_id: id.to_string(),
            name: format!("fake-{id}"),
            properties: properties
                .iter()
                .map(|(k, v)| platform::Property {
                    name: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            slots,
            running_leases: running_leases.clone(),
            protocol_version: kiln_proto::worker::PROTOCOL_VERSION,
        })))
        .unwrap();
        let mut client = WorkerApiClient::new(connect(h.addr).await);
        let mut rx = client
            .session(UnboundedReceiverStream::new(rx_updates))
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(WAIT, rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Some(scheduler_command::Command::Registered(reg)) = first.command else {
            panic!("expected Registered first, got {first:?}");
        };
        assert_eq!(reg.worker_id, id);
        let hb = reg.heartbeat_interval.unwrap();
        let heartbeat_interval = Duration::new(hb.seconds as u64, hb.nanos as u32);
        let running = Arc::new(Mutex::new(running_leases.into_iter().collect::<HashSet<_>>()));
        let mut w = FakeWorker {
            id: id.to_string(),
            tx,
            rx,
            running,
            heartbeats: None,
            heartbeat_interval,
        };
        w.start_heartbeats();
        w
    }

    pub fn start_heartbeats(&mut self) {
        let tx = self.tx.clone();
        let running = self.running.clone();
        let every = self.heartbeat_interval;
        self.heartbeats = Some(tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            loop {
                interval.tick().await;
                let leases: Vec<String> = running.lock().iter().cloned().collect();
                let hb = Heartbeat {
                    running_leases: leases,
                    load: 0.0,
                    free_slots: 0,
                    local_cache: None,
                };
                if tx.send(upd(worker_update::Update::Heartbeat(hb))).is_err() {
                    break;
                }
            }
        }));
    }

    /// Goes silent (the stream stays open).
    pub fn stop_heartbeats(&mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
    }

    /// The next command, or `None` if none arrives within `within` or the
    /// stream ended.
    pub async fn next_command(&mut self, within: Duration) -> Option<scheduler_command::Command> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(c))) => c.command,
            _ => None,
        }
    }

    /// Whether the scheduler closed the stream within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
            }
        }
    }

    /// The next Assign (sends Started for it).
    pub async fn next_assign(&mut self) -> Assign {
        match self.next_command(WAIT).await {
            Some(scheduler_command::Command::Assign(a)) => {
                self.running.lock().insert(a.lease_id.clone());
                self.send(worker_update::Update::Started(Started {
                    lease_id: a.lease_id.clone(),
                }));
                *a
            }
            other => panic!("worker {}: expected Assign, got {other:?}", self.id),
        }
    }

    pub fn send(&self, u: worker_update::Update) {
        self.tx.send(upd(u)).unwrap();
    }

    pub fn finish_with(&self, lease: &str, response: ExecuteResponse) {
        self.running.lock().remove(lease);
        self.send(worker_update::Update::Finished(Box::new(Finished {
            lease_id: lease.to_string(),
            response: Some(response),
        })));
    }

    /// Finishes a lease with an OK status and `exit_code`; stdout in the CAS.
    pub async fn finish(&self, h: &Harness, lease: &str, exit_code: i32, stdout: &str) {
        let d = digest(stdout.as_bytes());
        h.put(&d, Bytes::from(stdout.to_string())).await;
        self.finish_with(
            lease,
            ExecuteResponse {
                result: Some(ActionResult {
                    exit_code,
                    stdout_digest: Some(d),
                    ..Default::default()
                }),
                status: Some(kiln_proto::rpc::Status::default()),
                ..Default::default()
            },
        );
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop_heartbeats();
    }
}
