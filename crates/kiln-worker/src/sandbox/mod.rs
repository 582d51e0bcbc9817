//! Running an action's command, sandboxed on Linux.
//!
//! * The worker is multi-threaded, and `unshare(CLONE_NEWUSER)` or `setns`
//!   into a user namespace need a single-threaded caller, so namespaces are
//!   set up by a small helper process ([`helper`]): `kiln-sandbox run`
//!   (stage 1) enters or creates the namespaces, mounts, and starts
//!   `kiln-sandbox init` (stage 2) as PID 1 of a fresh PID namespace; init
//!   runs the command and supervises every process of the action. No
//!   `unsafe` code: nix/std/signal-hook wrappers only.
//! * Namespaces per action: user (the action is an unprivileged user, no
//!   capabilities after exec, `no_new_privs`), mount, PID (killing PID 1
//!   kills the whole tree; nothing escapes), IPC and UTS (host name
//!   "localhost").
//! * File system: everything is remounted read-only except the action's
//!   own directory and private tmpfs's on /tmp, /var/tmp and /dev/shm; the
//!   worker's work and cache directories are covered by empty tmpfs's
//!   (other actions and the cache are invisible), the action's directory
//!   is bound back at its usual path. /proc and /sys stay the host's
//!   (read-only to an unprivileged user; processes outside the PID
//!   namespace cannot be signalled).
//! * Network: creating a network namespace per action costs milliseconds
//!   of set-up and kernel clean-up work, so the worker keeps one long-lived
//!   holder process per slot (`kiln-sandbox hold`) owning a user namespace
//!   and an empty network namespace with only loopback up; an action
//!   without network joins one holder's namespaces (setns) and creates the
//!   others. One holder per slot means concurrent actions never share a
//!   loopback (no port clashes between parallel tests). `network = on` or
//!   `true` in the platform skips the network namespace entirely.
//! * A worker running as root runs actions as `sandbox.uid/gid` (default
//!   65534) so that they cannot touch root-owned files such as the local
//!   cache; a non-root worker runs them as itself, without capabilities.
//! * The action's environment reaches the command only (passed to the
//!   helper as arguments; the helper runs with an empty environment, so
//!   e.g. `LD_PRELOAD` from an action never affects it).
//! * Timeout or cancel: SIGTERM to stage 1, forwarded to init, which sends
//!   SIGTERM to every process of the namespace, then SIGKILL after
//!   `kill_grace`; when the command exits, every remaining process of the
//!   action is killed. If the helper does not exit shortly after, the
//!   worker SIGKILLs it and init dies with it (parent-death signal), which
//!   tears the PID namespace down. Closing stage 1's stdin (the worker
//!   died) does the same.
//! * Unsandboxed mode (`sandbox.enabled = false`, UNSAFE): `kiln-sandbox
//!   init` alone, as the worker's user, the command in its own process
//!   group; init is a child subreaper so orphans are reaped and killed too.
//!
//! Cost of a no-op action (`/bin/true`) end to end through the executor,
//! on the 2-core development VM while other builds ran: 5-7 ms with the
//! sandbox against 4.5-5 ms without it; the sandbox adds one exec of the
//! helper and ~100 µs of namespace and mount system calls.

pub mod helper;
mod netlink;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::error::{WorkerError, WorkerResult};
use crate::materialize::Owner;

pub use helper::{Report, helper_main};

/// Extra time after `kill_grace` the helper gets to exit before the worker
/// SIGKILLs it.
const HELPER_EXIT_SLACK: Duration = Duration::from_secs(5);

/// One command to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The action's directory (made visible in the sandbox).
    pub action_dir: PathBuf,
    /// Absolute working directory.
    pub cwd: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
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

#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub ending: Ending,
    /// The command's exit code (128 + signal if killed by one).
    pub exit_code: i32,
    pub report: Option<Report>,
    pub sandboxed: bool,
    pub network: bool,
}

/// A namespace holder process (see the module documentation).
struct Holder {
    child: Child,
    pid: u32,
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
    holders: Vec<Mutex<Option<Holder>>>,
    free_holders: Mutex<Vec<usize>>,
    next_shared: std::sync::atomic::AtomicUsize,
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

impl Sandbox {
    /// Prepares the sandbox: finds the helper, starts one network
    /// namespace holder per slot and runs a probe action. Fails with a
    /// clear message when namespaces are unavailable (e.g. unprivileged
    /// user namespaces disabled), naming the UNSAFE switch
    /// `sandbox.enabled = false`.
    pub async fn start(config: &WorkerConfig, slots: u32, probe_dir: &Path) -> WorkerResult<Arc<Sandbox>> {
        let helper = find_helper(&config.sandbox.helper)?;
        let running_as_root = nix::unistd::geteuid().is_root();
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
            holders: (0..slots.max(1)).map(|_| Mutex::new(None)).collect(),
            free_holders: Mutex::new((0..slots.max(1) as usize).rev().collect()),
            next_shared: std::sync::atomic::AtomicUsize::new(0),
        });
        if sandbox.enabled {
            for i in 0..sandbox.holders.len() {
                let h = sandbox.spawn_holder().await.map_err(|e| {
                    WorkerError::Sandbox(format!(
                        "cannot create sandbox namespaces ({e}). Unprivileged user namespaces may be \
                         disabled (sysctl kernel.unprivileged_userns_clone, \
                         user.max_user_namespaces, or an AppArmor restriction). To run actions \
                         WITHOUT a sandbox (UNSAFE: full access to this machine and network), \
                         set worker.sandbox.enabled = false"
                    ))
                })?;
                *sandbox.holders[i].lock() = Some(h);
            }
        }
        sandbox.probe(probe_dir).await?;
        Ok(sandbox)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
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

    fn helper_command(&self) -> Command {
        let mut cmd = Command::new(&self.helper[0]);
        cmd.args(&self.helper[1..]);
        cmd
    }

    fn identity_args(&self, cmd: &mut Command) {
        cmd.arg("--uid").arg(self.uid.to_string());
        cmd.arg("--gid").arg(self.gid.to_string());
    }

    async fn spawn_holder(&self) -> Result<Holder, String> {
        let mut cmd = self.helper_command();
        cmd.arg("hold");
        self.identity_args(&mut cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {:?}: {e}", self.helper[0]))?;
        let pid = child.id().ok_or("the holder exited at once")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        if !matches!(read, Ok(Ok(_))) || line.trim() != "ready" {
            let _ = child.start_kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), e.read_to_string(&mut err)).await;
            }
            return Err(err.trim().to_string());
        }
        Ok(Holder { child, pid })
    }

    /// Takes a holder for one action: a free one, else (more actions than
    /// slots) one shared round-robin. Restarts a holder that died.
    async fn acquire_holder(&self) -> WorkerResult<(usize, u32, bool)> {
        let (idx, exclusive) = match self.free_holders.lock().pop() {
            Some(i) => (i, true),
            None => (
                self.next_shared
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    % self.holders.len(),
                false,
            ),
        };
        let alive = {
            let mut slot = self.holders[idx].lock();
            match slot.as_mut() {
                Some(h) => match h.child.try_wait() {
                    Ok(None) => Some(h.pid),
                    _ => None,
                },
                None => None,
            }
        };
        let pid = match alive {
            Some(pid) => pid,
            None => {
                tracing::warn!(holder = idx, "network namespace holder died; restarting it");
                let h = self.spawn_holder().await.map_err(|e| {
                    if exclusive {
                        self.free_holders.lock().push(idx);
                    }
                    WorkerError::Sandbox(format!("restarting a namespace holder: {e}"))
                })?;
                let pid = h.pid;
                *self.holders[idx].lock() = Some(h);
                pid
            }
        };
        Ok((idx, pid, exclusive))
    }

    fn release_holder(&self, idx: usize, exclusive: bool) {
        if exclusive {
            self.free_holders.lock().push(idx);
        }
    }

    /// Runs a trivial command through the whole path, so that a sandbox
    /// that cannot work fails at start rather than on the first action.
    async fn probe(&self, dir: &Path) -> WorkerResult<()> {
        let action_dir = dir.join("probe");
        let _ = tokio::fs::remove_dir_all(&action_dir).await;
        tokio::fs::create_dir_all(&action_dir)
            .await
            .map_err(WorkerError::io("creating the sandbox probe directory"))?;
        if let Some(o) = self.owner() {
            let d = action_dir.clone();
            kiln_store::task::blocking("sandbox-probe-chown", move || {
                std::os::unix::fs::lchown(&d, Some(o.uid), Some(o.gid))
            })
            .await?
            .map_err(WorkerError::io("handing the probe directory to the sandbox user"))?;
        }
        let spec = RunSpec {
            action_dir: action_dir.clone(),
            cwd: action_dir.clone(),
            argv: vec!["/bin/sh".into(), "-c".into(), "exit 7".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            stdout: action_dir.join("stdout"),
            stderr: action_dir.join("stderr"),
            network: false,
            timeout: Duration::from_secs(30),
        };
        let out = self.run(&spec, &CancellationToken::new()).await;
        let _ = tokio::fs::remove_dir_all(&action_dir).await;
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

    /// Runs one command to completion, timeout or cancellation.
    pub async fn run(&self, spec: &RunSpec, cancel: &CancellationToken) -> WorkerResult<RunOutcome> {
        let holder = if self.enabled && !spec.network {
            Some(self.acquire_holder().await?)
        } else {
            None
        };
        let r = self.run_with(spec, cancel, holder.map(|h| h.1)).await;
        if let Some((idx, _, exclusive)) = holder {
            self.release_holder(idx, exclusive);
        }
        r
    }

    async fn run_with(
        &self,
        spec: &RunSpec,
        cancel: &CancellationToken,
        join: Option<u32>,
    ) -> WorkerResult<RunOutcome> {
        if spec.argv.is_empty() {
            return Err(WorkerError::invalid("the command has no arguments"));
        }
        let mut cmd = self.helper_command();
        if self.enabled {
            cmd.arg("run");
            self.identity_args(&mut cmd);
            if let Some(pid) = join {
                cmd.arg("--join").arg(pid.to_string());
            }
            cmd.arg("--dir").arg(&spec.action_dir);
            for h in &self.hide {
                cmd.arg("--hide").arg(h);
            }
            for t in &self.tmpfs {
                cmd.arg("--tmpfs").arg(t);
            }
            cmd.arg("--hostname").arg(&self.hostname);
            for extra in &self.helper[1..] {
                cmd.arg("--reexec").arg(extra);
            }
        } else {
            cmd.arg("init");
        }
        cmd.arg("--cwd").arg(&spec.cwd);
        cmd.arg("--stdout").arg(&spec.stdout);
        cmd.arg("--stderr").arg(&spec.stderr);
        cmd.arg("--grace-ms").arg(self.grace.as_millis().to_string());
        // The action's environment travels as arguments: the helper itself
        // runs with an empty environment (no LD_PRELOAD from an action).
        for (k, v) in &spec.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        cmd.arg("--").args(&spec.argv);
        cmd.env_clear();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| WorkerError::Sandbox(format!("starting the helper {:?}: {e}", self.helper[0])))?;
        // Keep stdin open: closing it tells the helper to kill everything.
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let read_out = async move {
            let mut s = String::new();
            if let Some(mut o) = stdout {
                let _ = o.read_to_string(&mut s).await;
            }
            s
        };
        let read_err = async move {
            let mut s = Vec::new();
            if let Some(e) = stderr {
                let _ = e.take(64 << 10).read_to_end(&mut s).await;
            }
            String::from_utf8_lossy(&s).into_owned()
        };
        let wait = self.supervise(&mut child, spec.timeout, cancel);
        let (ending, out, err) = tokio::join!(wait, read_out, read_err);
        drop(stdin);
        let (ending, status) = ending?;
        let report = helper::parse_report(&out);
        let Some(report) = report else {
            return Err(WorkerError::Sandbox(format!(
                "the helper exited ({status}) without running the command: {}",
                err.trim()
            )));
        };
        Ok(RunOutcome {
            ending,
            exit_code: report.exit_code,
            report: Some(report),
            sandboxed: self.enabled,
            network: spec.network || !self.enabled,
        })
    }

    /// Waits for the helper; on timeout or cancel asks it to terminate the
    /// action (SIGTERM, then SIGKILL after the grace period inside), and
    /// kills it if it does not exit in time.
    async fn supervise(
        &self,
        child: &mut Child,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> WorkerResult<(Ending, std::process::ExitStatus)> {
        let ending = tokio::select! {
            status = child.wait() => {
                let status = status.map_err(WorkerError::io("waiting for the sandbox helper"))?;
                return Ok((Ending::Exited, status));
            }
            _ = tokio::time::sleep(timeout) => Ending::TimedOut,
            _ = cancel.cancelled() => Ending::Cancelled,
        };
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(self.grace + HELPER_EXIT_SLACK, child.wait()).await {
            Ok(s) => s.map_err(WorkerError::io("waiting for the sandbox helper"))?,
            Err(_) => {
                tracing::warn!("sandbox helper ignored SIGTERM; killing it");
                let _ = child.start_kill();
                child
                    .wait()
                    .await
                    .map_err(WorkerError::io("waiting for the sandbox helper"))?
            }
        };
        Ok((ending, status))
    }
}
