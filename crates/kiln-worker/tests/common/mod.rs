//! Test harness: a real CAS (kiln-cache services over memory stores) on a
//! 127.0.0.1 ephemeral port, helpers to upload inputs and read outputs
//! over real gRPC, and an executor whose sandbox helper is the
//! `kiln-sandbox` binary built with this crate.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    Action, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Command, Digest, Directory, DirectoryNode,
    ExecuteResponse, FileNode, SymlinkNode, batch_update_blobs_request, command::EnvironmentVariable,
};
use kiln_store::Store;
use kiln_store::memory::MemoryStore;
use kiln_worker::{Executor, Job, WorkerConfig};
use prost::Message;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

pub const F: DigestFunction = DigestFunction::Sha256;

pub struct Cas {
    pub addr: SocketAddr,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for Cas {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start_cas(limits: CacheLimits) -> Cas {
    let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(256 << 20));
    let ac: Arc<dyn Store> = Arc::new(MemoryStore::new(16 << 20));
    let instances = Arc::new(Instances::new([Instance::new("", cas, ac)], limits));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut routes = tonic::service::RoutesBuilder::default();
    kiln_cache::add_routes(&mut routes, instances);
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
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    Cas {
        addr,
        channel,
        shutdown: Some(tx),
    }
}

impl Cas {
    /// Wraps a channel to a server started elsewhere.
    pub fn from_channel(channel: Channel) -> Cas {
        Cas {
            addr: "127.0.0.1:0".parse().unwrap(),
            channel,
            shutdown: None,
        }
    }
}

pub async fn start_default_cas() -> Cas {
    start_cas(CacheLimits::default()).await
}

/// Path of the helper binary built with this crate.
pub fn helper() -> String {
    env!("CARGO_BIN_EXE_kiln-sandbox").to_string()
}

/// A worker configuration rooted in `base`, using the built helper.
pub fn config(base: &Path) -> WorkerConfig {
    let mut c = WorkerConfig::with_base_dir(base);
    c.name = "test-worker".into();
    c.slots = Some(2);
    c.sandbox.helper = vec![helper()];
    c.sandbox.kill_grace = Duration::from_millis(500);
    c
}

pub async fn executor(base: &Path, cas: &Cas) -> Arc<Executor> {
    executor_with(base, cas, |_| {}).await
}

/// An executor over `config(base)` changed by `tweak`.
pub async fn executor_with(base: &Path, cas: &Cas, tweak: impl FnOnce(&mut WorkerConfig)) -> Arc<Executor> {
    let mut cfg = config(base);
    tweak(&mut cfg);
    Executor::new(cfg, cas.channel.clone()).await.unwrap()
}

/// The input root of slot `i` of an executor over `config(base)`, as the
/// host sees it (an action's working directory by default).
pub fn slot_root(base: &Path, i: usize) -> PathBuf {
    base.join("work").join(format!("s{i}")).join("root")
}

/// The first component of the way from the sandbox's private /tmp to the
/// slot roots of an executor over `config(base)`, when `base` lies in
/// /tmp (the zygote keeps that way, rightly); "-" otherwise.
pub fn way_in_tmp(base: &Path) -> String {
    base.strip_prefix("/tmp")
        .ok()
        .and_then(|p| p.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_else(|| "-".into())
}

/// Polls `done` until it holds; panics, saying that `what` never
/// happened, after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn cas_client(cas: &Cas) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(cas.channel.clone())
}

pub async fn upload(cas: &Cas, blobs: &[Vec<u8>]) -> Vec<Digest> {
    let requests: Vec<_> = blobs
        .iter()
        .map(|b| batch_update_blobs_request::Request {
            digest: Some(BlobKey::of(F, b).to_digest()),
            data: b.clone(),
            compressor: 0,
        })
        .collect();
    let digests = requests.iter().map(|r| r.digest.clone().unwrap()).collect();
    let resp = cas_client(cas)
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests,
            digest_function: F.to_proto() as i32,
        })
        .await
        .unwrap()
        .into_inner();
    for r in resp.responses {
        assert_eq!(r.status.map(|s| s.code).unwrap_or(0), 0);
    }
    digests
}

pub async fn upload_msg<M: Message>(cas: &Cas, m: &M) -> Digest {
    upload(cas, &[m.encode_to_vec()]).await.remove(0)
}

pub async fn read_blob(cas: &Cas, d: &Digest) -> Vec<u8> {
    let resp = cas_client(cas)
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![d.clone()],
            acceptable_compressors: vec![],
            digest_function: F.to_proto() as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let r = resp.responses.into_iter().next().unwrap();
    assert_eq!(r.status.map(|s| s.code).unwrap_or(0), 0, "blob {d:?} missing");
    r.data
}

pub fn digest_of(data: &[u8]) -> Digest {
    BlobKey::of(F, data).to_digest()
}

/// An input tree built in memory and uploaded.
#[derive(Default, Clone)]
pub struct TreeSpec {
    pub files: Vec<(String, Vec<u8>, bool)>,
    pub symlinks: Vec<(String, String)>,
    pub dirs: Vec<(String, TreeSpec)>,
}

impl TreeSpec {
    pub fn file(mut self, name: &str, content: &[u8]) -> Self {
        self.files.push((name.into(), content.to_vec(), false));
        self
    }

    pub fn exec(mut self, name: &str, content: &[u8]) -> Self {
        self.files.push((name.into(), content.to_vec(), true));
        self
    }

    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        self.symlinks.push((name.into(), target.into()));
        self
    }

    pub fn dir(mut self, name: &str, sub: TreeSpec) -> Self {
        self.dirs.push((name.into(), sub));
        self
    }

    /// Uploads the tree's blobs and Directory messages; returns the root.
    pub async fn upload(&self, cas: &Cas) -> Digest {
        let mut blobs = Vec::new();
        let root = self.build(&mut blobs);
        blobs.push(root.encode_to_vec());
        upload(cas, &blobs).await;
        digest_of(&root.encode_to_vec())
    }

    fn build(&self, blobs: &mut Vec<Vec<u8>>) -> Directory {
        let mut d = Directory::default();
        for (name, content, exec) in &self.files {
            blobs.push(content.clone());
            d.files.push(FileNode {
                name: name.clone(),
                digest: Some(digest_of(content)),
                is_executable: *exec,
                node_properties: None,
            });
        }
        for (name, target) in &self.symlinks {
            d.symlinks.push(SymlinkNode {
                name: name.clone(),
                target: target.clone(),
                node_properties: None,
            });
        }
        for (name, sub) in &self.dirs {
            let sd = sub.build(blobs);
            let bytes = sd.encode_to_vec();
            d.directories.push(DirectoryNode {
                name: name.clone(),
                digest: Some(digest_of(&bytes)),
            });
            blobs.push(bytes);
        }
        d
    }
}

/// A shell command with PATH set.
pub fn sh(script: &str) -> Command {
    Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/local/bin:/usr/bin:/bin".into(),
        }],
        ..Default::default()
    }
}

/// Uploads `command` and an Action over `root`; returns the Job.
pub async fn job(cas: &Cas, command: Command, root: Digest, timeout: Duration) -> Job {
    let command_digest = upload_msg(cas, &command).await;
    let action = Action {
        command_digest: Some(command_digest),
        input_root_digest: Some(root),
        ..Default::default()
    };
    let action_digest = upload_msg(cas, &action).await;
    Job {
        instance_name: String::new(),
        digest_function: F,
        action_digest,
        action,
        command,
        platform: None,
        timeout,
        queued_at: None,
    }
}

pub async fn run(exec: &Executor, job: Job) -> ExecuteResponse {
    exec.execute(job, CancellationToken::new()).await
}

pub fn code(resp: &ExecuteResponse) -> i32 {
    resp.status.as_ref().map(|s| s.code).unwrap_or(0)
}

pub async fn stdout_of(cas: &Cas, resp: &ExecuteResponse) -> String {
    let r = resp.result.as_ref().unwrap();
    String::from_utf8(read_blob(cas, r.stdout_digest.as_ref().unwrap()).await).unwrap()
}

pub async fn stderr_of(cas: &Cas, resp: &ExecuteResponse) -> String {
    let r = resp.result.as_ref().unwrap();
    String::from_utf8(read_blob(cas, r.stderr_digest.as_ref().unwrap()).await).unwrap()
}

/// Processes on this machine whose command line contains `token`.
pub fn processes_with(token: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(token) {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether every slot's input root under the work directory is empty
/// (the work directory holds only `s<N>/root` directories between actions).
pub fn slots_are_clean(work: &Path) -> bool {
    list_files(work).iter().all(|p| {
        let parts: Vec<_> = p
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        match parts.as_slice() {
            [s] => s.starts_with('s'),
            [s, r] => s.starts_with('s') && r == "root",
            _ => false,
        }
    })
}

/// A `sleep` argument no other process on the machine has (so the
/// processes of one test can be found by it).
pub fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}.{nanos}", 3000 + std::process::id() % 1000)
}

/// The command line of `pid`, its arguments joined by spaces (empty once
/// the process is gone).
pub fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// The sandbox helper processes above `pid`, nearest first: the action's
/// init and then the slot's zygote (init is a clone of the zygote, so both
/// have the helper's `zygote` command line). The walk stops below this
/// test process, whose own command line may well say "zygote" (a test
/// name given as a filter).
pub fn zygotes_above(pid: u32) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let mut p = pid;
    for _ in 0..16 {
        let Some(parent) = parent_of(p) else { break };
        if parent == me || parent <= 1 {
            break;
        }
        if cmdline(parent).contains("zygote") {
            out.push(parent);
        }
        p = parent;
    }
    out
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Waits (at most 10 s) until `pid` is dead: gone, or a zombie (a child of
/// the worker stays one until the worker next looks at it).
pub async fn wait_dead(pid: u32) {
    let dead = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, after)| after.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    };
    wait_until(
        &format!("the death of process {pid}"),
        Duration::from_secs(10),
        dead,
    )
    .await;
}

/// The parent pid of `pid` as seen from here (field 4 of /proc/PID/stat).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Every file below `dir` (relative paths).
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    stack.push(p.clone());
                }
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

pub fn outputs_by_path(resp: &ExecuteResponse) -> HashMap<String, Digest> {
    resp.result
        .as_ref()
        .unwrap()
        .output_files
        .iter()
        .map(|f| (f.path.clone(), f.digest.clone().unwrap()))
        .collect()
}
