//! Running an action's command, sandboxed on Linux.
//!
//! * Each worker slot has its own input root (`work_dir/s<N>/root`) and its
//!   own **zygote** ([`zygote`]): a long-lived, single-threaded helper
//!   process (`kiln-sandbox zygote`, or the `kiln` binary's helper
//!   sub-command) that sets the slot's sandbox up once and then runs the
//!   slot's actions one at a time. An action is taken by [`Sandbox::acquire`]
//!   (a [`SlotLease`]), materialised into the lease's root, run with
//!   [`SlotLease::run`], and its root is emptied when the lease is
//!   released.
//! * Namespaces: user and mount (and network, for actions without network)
//!   per slot, created by the zygote; PID, IPC and UTS fresh per action
//!   (the action's init is cloned straight into them). The action runs as
//!   an unprivileged user with no capabilities and `no_new_privs`; killing
//!   its PID 1 kills its whole tree.
//! * File system: everything read-only except the slot's input root and
//!   private tmpfs's on /tmp, /var/tmp and /dev/shm (emptied after every
//!   action); the worker's work and cache directories are covered by empty
//!   tmpfs's (other slots and the cache are invisible). /proc and /sys
//!   stay the host's (read-only to an unprivileged user; processes outside
//!   the PID namespace cannot be signalled).
//! * Network: off unless the platform says `network = on`/`true`; each slot
//!   has its own empty network namespace with loopback up, so parallel
//!   actions never share a loopback. Network actions use a second zygote of
//!   the slot, started when first needed, without a network namespace.
//! * stdout and stderr are anonymous memory files (`memfd`) handed to the
//!   zygote over its control socket: no file is created for them, and the
//!   action has no path to them.
//! * A worker running as root runs actions as `sandbox.uid/gid` (default
//!   65534) so that they cannot touch root-owned files such as the local
//!   cache; a non-root worker runs them as itself, without capabilities.
//! * Timeout or cancel: the zygote forwards SIGTERM to the action's init,
//!   which sends SIGTERM to every process of the action and SIGKILL after
//!   `kill_grace`; when the command exits, every remaining process is
//!   killed. A zygote that does not report in time is killed (its actions
//!   die with it: parent-death signal) and replaced. The worker exiting
//!   closes the control sockets, which kills every action.
//! * Unsandboxed mode (`sandbox.enabled = false`, UNSAFE): the same zygotes
//!   without namespaces; init is a child subreaper and kills the command's
//!   process group and every orphan it inherits.
//!
//! Cost: see docs/worker.md and docs/benchmarks.md ("Execution").

pub mod helper;
mod init;
mod mounts;
mod netlink;
pub mod protocol;
mod spawn;
mod zygote;
mod zygote_process;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::memfd::{MFdFlags, memfd_create};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::error::{WorkerError, WorkerResult};
use crate::materialize::Owner;

pub use helper::helper_main;
use zygote_process::{RunError, ZygoteProcess};

/// One command to run in a slot.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Absolute working directory (inside the lease's root).
    pub cwd: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Whether the action may use the network.
    pub network: bool,
    pub timeout: Duration,
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited,
    TimedOut,
    Cancelled,
}

/// Resource usage and exit of one action, measured by its init.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    pub exit_code: i32,
    pub signal: i32,
    pub user_cpu_us: i64,
    pub system_cpu_us: i64,
    pub max_rss_kb: i64,
}

#[derive(Debug)]
pub struct RunOutcome {
    pub ending: Ending,
    /// The command's exit code (128 + signal if killed by one).
    pub exit_code: i32,
    pub report: Report,
    pub sandboxed: bool,
    pub network: bool,
    /// What the command wrote to stdout and stderr (memory files; read
    /// them from offset 0).
    pub stdout: File,
    pub stderr: File,
}

/// One slot: its input root and its zygotes (without and with network).
struct Slot {
    root: PathBuf,
    zygotes: Mutex<[Option<ZygoteProcess>; 2]>,
}

/// The sandbox shared by all slots of a worker.
pub struct Sandbox {
    enabled: bool,
    helper: Vec<String>,
    /// Identity actions run as when the worker is root.
    uid: u32,
    gid: u32,
    running_as_root: bool,
    hide: Vec<PathBuf>,
    tmpfs: Vec<PathBuf>,
    hostname: String,
    grace: Duration,
    slots: Vec<Slot>,
    free: Mutex<Vec<usize>>,
    permits: Arc<Semaphore>,
}

/// Finds the helper: `configured`, else `kiln-sandbox` next to the running
/// executable, else on PATH.
pub fn find_helper(configured: &[String]) -> WorkerResult<Vec<String>> {
    if !configured.is_empty() {
        return Ok(configured.to_vec());
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        for candidate in [dir.join("kiln-sandbox"), dir.join("../kiln-sandbox")] {
            if candidate.is_file() {
                return Ok(vec![candidate.to_string_lossy().into_owned()]);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("kiln-sandbox");
            if c.is_file() {
                return Ok(vec![c.to_string_lossy().into_owned()]);
            }
        }
    }
    Err(WorkerError::Sandbox(
        "the sandbox helper `kiln-sandbox` was not found next to this executable or on PATH; \
         set worker.sandbox.helper"
            .into(),
    ))
}

fn unavailable(e: &str) -> WorkerError {
    WorkerError::Sandbox(format!(
        "cannot create sandbox namespaces ({e}). Unprivileged user namespaces may be disabled \
         (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or an AppArmor \
         restriction). To run actions WITHOUT a sandbox (UNSAFE: full access to this machine and \
         network), set worker.sandbox.enabled = false"
    ))
}

impl Sandbox {
    /// Prepares the sandbox: one input root and one zygote per slot under
    /// `work_dir` (which must exist and be empty), then a probe action.
    /// Fails with a clear message when namespaces are unavailable (e.g.
    /// unprivileged user namespaces disabled), naming the UNSAFE switch
    /// `sandbox.enabled = false`.
    pub async fn start(config: &WorkerConfig, slots: u32, work_dir: &Path) -> WorkerResult<Arc<Sandbox>> {
        let helper = find_helper(&config.sandbox.helper)?;
        let running_as_root = nix::unistd::geteuid().is_root();
        let n = slots.max(1) as usize;
        let roots: Vec<PathBuf> = (0..n)
            .map(|i| work_dir.join(format!("s{i}")).join("root"))
            .collect();
        let sandbox = Arc::new(Sandbox {
            enabled: config.sandbox.enabled,
            helper,
            uid: config.sandbox.uid,
            gid: config.sandbox.gid,
            running_as_root,
            hide: vec![config.work_dir.clone(), config.cache_dir.clone()],
            tmpfs: config.sandbox.tmpfs.clone(),
            hostname: config.sandbox.hostname.clone(),
            grace: config.sandbox.kill_grace,
            slots: roots
                .into_iter()
                .map(|root| Slot {
                    root,
                    zygotes: Mutex::new([None, None]),
                })
                .collect(),
            free: Mutex::new((0..n).rev().collect()),
            permits: Arc::new(Semaphore::new(n)),
        });
        {
            let roots: Vec<PathBuf> = sandbox.slots.iter().map(|s| s.root.clone()).collect();
            let owner = sandbox.owner();
            kiln_store::task::blocking("sandbox-slot-dirs", move || -> WorkerResult<()> {
                for root in &roots {
                    std::fs::create_dir_all(root)
                        .map_err(WorkerError::io(format!("creating {}", root.display())))?;
                    reset_root(root, owner)?;
                }
                Ok(())
            })
            .await??;
        }
        for i in 0..n {
            let z = sandbox.start_zygote(i, false).await.map_err(|e| {
                if sandbox.enabled {
                    unavailable(&e)
                } else {
                    WorkerError::Sandbox(format!("starting the sandbox helper: {e}"))
                }
            })?;
            sandbox.slots[i].zygotes.lock()[0] = Some(z);
        }
        sandbox.probe().await?;
        Ok(sandbox)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Who should own an action's directories: the sandbox user when a
    /// root worker runs sandboxed actions, else the worker itself (None).
    pub fn owner(&self) -> Option<Owner> {
        (self.enabled && self.running_as_root).then_some(Owner {
            uid: self.uid,
            gid: self.gid,
        })
    }

    /// Whether an action runs as the same user that owns the local cache
    /// (so it could chmod a hardlinked input): then inputs are checked
    /// after each run.
    pub fn shares_cache_owner(&self) -> bool {
        self.owner().is_none()
    }

    /// Pids of the live zygotes (for tests and diagnostics).
    pub fn zygote_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for s in &self.slots {
            for z in s.zygotes.lock().iter().flatten() {
                out.extend(z.pid());
            }
        }
        out
    }

    fn zygote_args(&self, slot: usize, network: bool) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("--uid", self.uid.to_string());
        push("--gid", self.gid.to_string());
        push("--root", self.slots[slot].root.to_string_lossy().into_owned());
        if self.enabled {
            for h in &self.hide {
                push("--hide", h.to_string_lossy().into_owned());
            }
            for t in &self.tmpfs {
                push("--tmpfs", t.to_string_lossy().into_owned());
            }
            push("--hostname", self.hostname.clone());
            if network {
                a.push("--network".into());
            }
        } else {
            a.push("--no-namespaces".into());
        }
        a
    }

    async fn start_zygote(&self, slot: usize, network: bool) -> Result<ZygoteProcess, String> {
        ZygoteProcess::start(&self.helper, &self.zygote_args(slot, network)).await
    }

    /// Takes a free slot, waiting for one when all are busy (the scheduler
    /// never assigns more actions than slots, so normally none waits).
    pub async fn acquire(self: &Arc<Self>) -> WorkerResult<SlotLease> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| WorkerError::Internal("the sandbox is shut down".into()))?;
        let index = self
            .free
            .lock()
            .pop()
            .ok_or_else(|| WorkerError::Internal("no free sandbox slot despite a permit".into()))?;
        Ok(SlotLease {
            sandbox: self.clone(),
            index,
            permit: Some(permit),
        })
    }

    /// Runs a trivial command through the whole path, so that a sandbox
    /// that cannot work fails at start rather than on the first action.
    async fn probe(self: &Arc<Self>) -> WorkerResult<()> {
        let lease = self.acquire().await?;
        let spec = RunSpec {
            cwd: lease.root().to_path_buf(),
            argv: vec!["/bin/sh".into(), "-c".into(), "exit 7".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            network: false,
            timeout: Duration::from_secs(30),
        };
        let out = lease.run(&spec, &CancellationToken::new()).await;
        lease.release().await?;
        match out {
            Ok(o) if o.exit_code == 7 => Ok(()),
            Ok(o) => Err(WorkerError::Sandbox(format!(
                "the sandbox probe `sh -c 'exit 7'` exited with {} instead of 7",
                o.exit_code
            ))),
            Err(e) => Err(WorkerError::Sandbox(format!(
                "the sandbox probe failed: {e}. To run actions WITHOUT a sandbox (UNSAFE), set \
                 worker.sandbox.enabled = false"
            ))),
        }
    }
}

/// Exclusive use of one slot: its input root (empty when the lease is
/// taken) and its zygotes. Release it with [`SlotLease::release`]; a lease
/// dropped without that is cleaned up by a background task.
pub struct SlotLease {
    sandbox: Arc<Sandbox>,
    index: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl SlotLease {
    /// The directory to materialise the action's input root into.
    pub fn root(&self) -> &Path {
        &self.sandbox.slots[self.index].root
    }

    /// Runs one command to completion, timeout or cancellation.
    pub async fn run(&self, spec: &RunSpec, cancel: &CancellationToken) -> WorkerResult<RunOutcome> {
        if spec.argv.is_empty() {
            return Err(WorkerError::invalid("the command has no arguments"));
        }
        let sandbox = &self.sandbox;
        // Unsandboxed, every action has the network: one zygote serves all.
        let kind = usize::from(spec.network && sandbox.enabled);
        let slot = &sandbox.slots[self.index];
        let existing = slot.zygotes.lock()[kind].take();
        let mut zygote = match existing.map(|mut z| (z.usable(), z)) {
            Some((true, z)) => z,
            other => {
                if other.is_some() {
                    tracing::warn!(slot = self.index, "a sandbox zygote died; starting a new one");
                }
                drop(other);
                sandbox
                    .start_zygote(self.index, kind == 1)
                    .await
                    .map_err(|e| WorkerError::Sandbox(format!("starting the sandbox: {e}")))?
            }
        };
        let stdout = memory_file("kiln-stdout")?;
        let stderr = memory_file("kiln-stderr")?;
        let req = protocol::RunRequest {
            argv: spec.argv.clone(),
            env_names: spec.env.iter().map(|(k, _)| k.clone()).collect(),
            env_values: spec.env.iter().map(|(_, v)| v.clone()).collect(),
            cwd: spec.cwd.to_string_lossy().into_owned(),
            grace_ms: sandbox.grace.as_millis() as u64,
        };
        let r = zygote
            .run(&req, &stdout, &stderr, spec.timeout, cancel, sandbox.grace)
            .await;
        match r {
            Ok((ending, f)) => {
                slot.zygotes.lock()[kind] = Some(zygote);
                Ok(RunOutcome {
                    ending,
                    exit_code: f.exit_code,
                    report: Report {
                        exit_code: f.exit_code,
                        signal: f.signal,
                        user_cpu_us: f.user_cpu_us,
                        system_cpu_us: f.system_cpu_us,
                        max_rss_kb: f.max_rss_kb,
                    },
                    sandboxed: sandbox.enabled,
                    network: spec.network || !sandbox.enabled,
                    stdout: File::from(stdout),
                    stderr: File::from(stderr),
                })
            }
            Err(RunError::Action(msg)) => {
                slot.zygotes.lock()[kind] = Some(zygote);
                Err(WorkerError::Sandbox(format!(
                    "the sandbox could not run the command: {msg}"
                )))
            }
            Err(RunError::Zygote(msg)) => {
                // Dropping it kills it; its action dies with it.
                drop(zygote);
                tracing::warn!(slot = self.index, error = %msg, "sandbox zygote failed; it will be replaced");
                Err(WorkerError::Sandbox(msg))
            }
        }
    }

    /// Empties the input root and gives the slot back.
    pub async fn release(mut self) -> WorkerResult<()> {
        let root = self.root().to_path_buf();
        let owner = self.sandbox.owner();
        let r = kiln_store::task::blocking("sandbox-slot-reset", move || reset_root(&root, owner)).await;
        self.give_back();
        r?
    }

    fn give_back(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.sandbox.free.lock().push(self.index);
            drop(permit);
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        // Not released (an error or a cancelled task): empty the root in
        // the background before anyone else gets the slot.
        let sandbox = self.sandbox.clone();
        let index = self.index;
        let root = self.root().to_path_buf();
        let owner = sandbox.owner();
        let finish = move || {
            if let Err(e) = reset_root(&root, owner) {
                tracing::error!(slot = index, error = %e, "emptying a sandbox slot failed; the slot stays out of use");
                return;
            }
            sandbox.free.lock().push(index);
            drop(permit);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => {
                kiln_store::task::spawn("sandbox-slot-reset", async move {
                    if let Err(e) = kiln_store::task::blocking("sandbox-slot-reset", finish).await {
                        tracing::error!(error = %e, "sandbox slot reset task failed");
                    }
                });
            }
            Err(_) => finish(),
        }
    }
}

/// An anonymous memory file (close-on-exec).
fn memory_file(name: &str) -> WorkerResult<OwnedFd> {
    memfd_create(name, MFdFlags::MFD_CLOEXEC)
        .map_err(|e| WorkerError::Sandbox(format!("memfd_create for the action's {name}: {e}")))
}

/// Empties a slot's input root (without following symlinks) and restores
/// its mode and owner, whatever the last action did to it.
fn reset_root(root: &Path, owner: Option<Owner>) -> WorkerResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).map_err(WorkerError::io(
        format!("resetting the mode of {}", root.display()),
    ))?;
    let entries = std::fs::read_dir(root).map_err(WorkerError::io(format!("listing {}", root.display())))?;
    for entry in entries {
        let entry = entry.map_err(WorkerError::io(format!("listing {}", root.display())))?;
        let path = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            crate::materialize::remove_tree(&path)?;
        } else {
            std::fs::remove_file(&path).map_err(WorkerError::io(format!("removing {}", path.display())))?;
        }
    }
    if let Some(o) = owner {
        std::os::unix::fs::lchown(root, Some(o.uid), Some(o.gid))
            .map_err(WorkerError::io("handing the input root to the sandbox user"))?;
    }
    Ok(())
}
