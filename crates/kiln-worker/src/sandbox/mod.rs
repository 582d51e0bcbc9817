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
mod keyrings;
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
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The running executable, as a helper program: exec'ing it starts the
/// same binary image even if its file was since replaced.
pub const SELF_EXE: &str = "/proc/self/exe";

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
    /// Terminated for writing more than `sandbox.max_stdio_bytes` to
    /// stdout or stderr.
    OutputLimit,
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

impl From<&protocol::Finished> for Report {
    fn from(f: &protocol::Finished) -> Report {
        Report {
            exit_code: f.exit_code,
            signal: f.signal,
            user_cpu_us: f.user_cpu_us,
            system_cpu_us: f.system_cpu_us,
            max_rss_kb: f.max_rss_kb,
        }
    }
}

#[derive(Debug)]
pub struct RunOutcome {
    pub ending: Ending,
    /// The command's exit code (128 + signal if killed by one) and its
    /// resource usage.
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
    tmpfs_size_bytes: Option<u64>,
    slots: Vec<Slot>,
    free: Mutex<Vec<usize>>,
    permits: Arc<Semaphore>,
    /// Slots taken out of service (their input root could not be emptied
    /// or their zygote not started) and being recovered in the background.
    out_of_service: AtomicUsize,
    /// Why the last slot went out of service.
    last_problem: Mutex<String>,
    /// Largest stdout (and stderr) of an action.
    max_stdio_bytes: u64,
}

/// How long an action waits for a free slot before failing UNAVAILABLE
/// (the scheduler assigns no more actions than slots, so only slots out
/// of service make one wait).
const SLOT_WAIT: Duration = Duration::from_secs(300);
/// Back-off between attempts to bring a slot back into service.
const RECOVERY_MIN: Duration = Duration::from_secs(1);
const RECOVERY_MAX: Duration = Duration::from_secs(60);

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
            hide: [config.work_dir.clone(), config.cache_dir.clone()]
                .into_iter()
                .chain(config.sandbox.hide.iter().cloned())
                .collect(),
            tmpfs: config.sandbox.tmpfs.clone(),
            hostname: config.sandbox.hostname.clone(),
            grace: config.sandbox.kill_grace,
            tmpfs_size_bytes: config.sandbox.tmpfs_size_bytes,
            slots: roots
                .into_iter()
                .map(|root| Slot {
                    root,
                    zygotes: Mutex::new([None, None]),
                })
                .collect(),
            free: Mutex::new((0..n).rev().collect()),
            permits: Arc::new(Semaphore::new(n)),
            out_of_service: AtomicUsize::new(0),
            last_problem: Mutex::new(String::new()),
            max_stdio_bytes: config.sandbox.max_stdio_bytes,
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
            sandbox.install_zygote(i).await.map_err(|e| {
                if sandbox.enabled {
                    unavailable(&e)
                } else {
                    WorkerError::Sandbox(format!("starting the sandbox helper: {e}"))
                }
            })?;
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

    /// Slots out of service (being recovered in the background).
    pub fn out_of_service(&self) -> usize {
        self.out_of_service.load(Ordering::SeqCst)
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
            if let Some(size) = self.tmpfs_size_bytes {
                push("--tmpfs-size", size.to_string());
            }
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

    /// Starts the slot's zygote without network and puts it in the slot.
    async fn install_zygote(&self, slot: usize) -> Result<(), String> {
        let z = self.start_zygote(slot, false).await?;
        self.slots[slot].zygotes.lock()[0] = Some(z);
        Ok(())
    }

    /// Empties the slot's input root and restores its mode, owner and
    /// attributes ([`reset_root`]), on a blocking thread.
    async fn reset_slot_root(&self, slot: usize) -> WorkerResult<()> {
        let root = self.slots[slot].root.clone();
        let owner = self.owner();
        kiln_store::task::blocking("sandbox-slot-reset", move || reset_root(&root, owner)).await?
    }

    /// Takes a free slot, waiting for one when all are busy (the scheduler
    /// never assigns more actions than slots, so normally none waits).
    /// Fails UNAVAILABLE at once when every slot is out of service, and
    /// after [`SLOT_WAIT`] otherwise; `cancel` ends the wait.
    pub async fn acquire(self: &Arc<Self>, cancel: &CancellationToken) -> WorkerResult<SlotLease> {
        if self.out_of_service.load(Ordering::SeqCst) >= self.slots.len() {
            return Err(WorkerError::Unavailable(format!(
                "every sandbox slot of this worker is out of service: {}",
                self.last_problem.lock()
            )));
        }
        let permit = tokio::select! {
            p = self.permits.clone().acquire_owned() => {
                p.map_err(|_| WorkerError::Internal("the sandbox is shut down".into()))?
            }
            _ = cancel.cancelled() => {
                return Err(WorkerError::Cancelled("cancelled while waiting for a sandbox slot".into()));
            }
            _ = tokio::time::sleep(SLOT_WAIT) => {
                return Err(WorkerError::Unavailable(format!(
                    "no sandbox slot became free within {SLOT_WAIT:?} ({} of {} out of service: {})",
                    self.out_of_service.load(Ordering::SeqCst),
                    self.slots.len(),
                    self.last_problem.lock()
                )));
            }
        };
        let index = self
            .free
            .lock()
            .pop()
            .ok_or_else(|| WorkerError::Internal("no free sandbox slot despite a permit".into()))?;
        Ok(SlotLease {
            sandbox: self.clone(),
            index,
            permit: Some(permit),
            broken: Mutex::new(None),
        })
    }

    /// Takes a slot out of service: a named task tries to empty its input
    /// root and start its zygote, with back-off, and gives the slot back
    /// once both work (or stops when the sandbox is gone).
    fn quarantine(self: &Arc<Self>, index: usize, permit: OwnedSemaphorePermit, why: String) {
        tracing::error!(slot = index, reason = %why, "sandbox slot out of service; recovering it in the background");
        *self.last_problem.lock() = why;
        self.out_of_service.fetch_add(1, Ordering::SeqCst);
        // Whatever zygote the slot had is suspect: stop it.
        let stale = std::mem::take(&mut *self.slots[index].zygotes.lock());
        drop(stale);
        let weak = Arc::downgrade(self);
        kiln_store::task::spawn("sandbox-slot-recovery", async move {
            let mut backoff = RECOVERY_MIN;
            loop {
                tokio::time::sleep(backoff).await;
                let Some(sandbox) = weak.upgrade() else { return };
                match sandbox.recover(index).await {
                    Ok(()) => {
                        tracing::info!(slot = index, "sandbox slot back in service");
                        sandbox.out_of_service.fetch_sub(1, Ordering::SeqCst);
                        sandbox.free.lock().push(index);
                        drop(permit);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(slot = index, error = %e, retry_in = ?backoff, "sandbox slot still out of service");
                        *sandbox.last_problem.lock() = e.to_string();
                    }
                }
                backoff = (backoff * 2).min(RECOVERY_MAX);
            }
        });
    }

    async fn recover(&self, index: usize) -> WorkerResult<()> {
        self.reset_slot_root(index).await?;
        self.install_zygote(index)
            .await
            .map_err(|e| WorkerError::Sandbox(format!("starting the sandbox: {e}")))
    }

    /// Runs a trivial command through the whole path, so that a sandbox
    /// that cannot work fails at start rather than on the first action.
    async fn probe(self: &Arc<Self>) -> WorkerResult<()> {
        let lease = self.acquire(&CancellationToken::new()).await?;
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
            Ok(o) if o.report.exit_code == 7 => Ok(()),
            Ok(o) => Err(WorkerError::Sandbox(format!(
                "the sandbox probe `sh -c 'exit 7'` exited with {} instead of 7",
                o.report.exit_code
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
    /// Why the slot's zygote could not be started, if it could not:
    /// recover before reuse.
    broken: Mutex<Option<String>>,
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
                match sandbox.start_zygote(self.index, kind == 1).await {
                    Ok(z) => z,
                    Err(e) => {
                        let msg = format!("starting the sandbox: {e}");
                        *self.broken.lock() = Some(msg.clone());
                        return Err(WorkerError::Sandbox(msg));
                    }
                }
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
            .run(
                &req,
                &stdout,
                &stderr,
                zygote_process::Limits {
                    timeout: spec.timeout,
                    grace: sandbox.grace,
                    max_stdio_bytes: sandbox.max_stdio_bytes,
                },
                cancel,
            )
            .await;
        match r {
            Ok((ending, f)) => {
                slot.zygotes.lock()[kind] = Some(zygote);
                Ok(RunOutcome {
                    ending,
                    report: Report::from(&f),
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
                // Its action dies with it (parent-death signal, lifeline).
                zygote.kill().await;
                tracing::warn!(slot = self.index, error = %msg, "sandbox zygote failed; it will be replaced");
                Err(WorkerError::Sandbox(msg))
            }
        }
    }

    /// Empties the input root and gives the slot back; a slot whose root
    /// cannot be emptied (or whose zygote would not start) goes out of
    /// service until it is recovered, so no action ever gets a dirty root.
    pub async fn release(mut self) -> WorkerResult<()> {
        let r = self.sandbox.reset_slot_root(self.index).await;
        let Some(permit) = self.permit.take() else {
            return r;
        };
        let broken = self.broken.lock().take();
        match (&r, broken) {
            (Ok(()), None) => {
                self.sandbox.free.lock().push(self.index);
                drop(permit);
            }
            (Ok(()), Some(why)) => self.sandbox.quarantine(self.index, permit, why),
            (Err(e), _) => {
                self.sandbox
                    .quarantine(self.index, permit, format!("emptying the input root: {e}"))
            }
        }
        r
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
        match tokio::runtime::Handle::try_current() {
            Ok(_) => sandbox.quarantine(index, permit, "a lease ended without a release".into()),
            Err(_) => {
                // No runtime (shutdown): nothing will use the slot again.
                drop(permit);
            }
        }
    }
}

/// Maps a system call's error to a message saying what failed (the
/// sandbox helper's errors are strings).
pub(super) fn errno(what: &str) -> impl FnOnce(nix::errno::Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// An anonymous memory file (close-on-exec).
fn memory_file(name: &str) -> WorkerResult<OwnedFd> {
    memfd_create(name, MFdFlags::MFD_CLOEXEC)
        .map_err(|e| WorkerError::Sandbox(format!("memfd_create for the action's {name}: {e}")))
}

/// Empties a slot's input root (any depth, without following symlinks)
/// and restores its mode, owner and extended attributes (ACLs included),
/// whatever the last action did to it.
fn reset_root(root: &Path, owner: Option<Owner>) -> WorkerResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).map_err(WorkerError::io(
        format!("resetting the mode of {}", root.display()),
    ))?;
    crate::wipe::empty_dir(root)
        .map_err(|e| WorkerError::Sandbox(format!("emptying {}: {e}", root.display())))?;
    // What an unprivileged action can set: user attributes and ACLs.
    crate::wipe::remove_owner_xattrs(root).map_err(|e| WorkerError::Io {
        context: e.what,
        source: e.source,
    })?;
    if let Some(o) = owner {
        std::os::unix::fs::lchown(root, Some(o.uid), Some(o.gid))
            .map_err(WorkerError::io("handing the input root to the sandbox user"))?;
    }
    Ok(())
}
