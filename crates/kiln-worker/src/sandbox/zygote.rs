//! The zygote: one long-lived, single-threaded sandbox process per worker
//! slot (`kiln-sandbox zygote ...`). It sets the slot's sandbox up once —
//! user namespace, mount namespace with the read-only host, private
//! tmpfs's and the slot's input root, and (unless the slot's actions may
//! use the network) an empty network namespace with loopback up — then
//! runs the slot's actions one at a time, each in a process cloned
//! straight into fresh PID, IPC and UTS namespaces ([`super::init`]).
//!
//! Why: starting a helper executable per action and creating user and
//! mount namespaces per action cost milliseconds of exec, dynamic
//! linking, mount-table copies and RCU-delayed tear-down (measured:
//! docs/benchmarks.md). Here an action costs one clone, one fork+exec of
//! the command, and the tear-down of its PID/IPC/UTS namespaces.
//!
//! Isolation between consecutive actions of a slot: the action runs as an
//! unprivileged user without capabilities (`no_new_privs`), so it cannot
//! change the shared mount table; its processes die with its PID
//! namespace; its SysV IPC objects with its IPC namespace; the zygote
//! empties the private tmpfs's after every action and the worker empties
//! the input root. Concurrent actions of different slots share nothing
//! writable.
//!
//! Protocol with the worker: [`super::protocol`], over the zygote's
//! standard input (a Unix stream socket). The zygote answers `Ready` once
//! set up (or `Failed`), then for each `Run` exactly one `Finished` or
//! `Failed`; `Terminate` forwards SIGTERM to the running action's init;
//! end of stream (the worker went away) kills the action and exits.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use prost::Message;

use super::init::{InitSpec, init_main, supervised_signals};
use super::mounts::Scratch;
use super::protocol::{self, Finished, Frame, Kind, RunRequest};

/// Stack of the cloned init. It is only touched as far as init uses it
/// (pages are mapped lazily and copied on write), so it is generous.
const CLONE_STACK: usize = 8 << 20;

/// How the zygote isolates its slot.
#[derive(Debug, Clone)]
pub struct ZygoteOptions {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The slot's input root, bound writable into the sandbox.
    pub root: PathBuf,
    pub hide: Vec<PathBuf>,
    pub tmpfs: Vec<PathBuf>,
    pub hostname: Option<String>,
    /// Leave the network namespace alone (the platform asked for network).
    pub network: bool,
    /// Use namespaces at all (false: UNSAFE unsandboxed mode).
    pub namespaces: bool,
    /// Size limit of each private tmpfs, in bytes.
    pub tmpfs_size: Option<u64>,
}

struct Running {
    pid: Pid,
    report: std::fs::File,
}

/// The zygote's main: returns its exit code.
pub fn zygote_main(o: &ZygoteOptions) -> Result<i32, String> {
    ensure_single_threaded()?;
    close_on_exec_inherited()?;
    // Block the supervised signals first, so the clones inherit the mask
    // and a SIGTERM sent before init polls is queued, not lost.
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&supervised_signals()), None)
        .map_err(|e| format!("sigprocmask: {e}"))?;
    // The control socket is our stdin: keep a close-on-exec duplicate and
    // point fd 0 at /dev/null, so nothing started later inherits it.
    let sock = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("duplicating the control socket: {e}"))?;
    let devnull = std::fs::File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;
    nix::unistd::dup2_stdin(&devnull).map_err(|e| format!("dup2 of /dev/null: {e}"))?;
    let mut sock = UnixStream::from(sock);

    let scratch = match setup(o) {
        Ok(s) => s,
        Err(e) => {
            let _ = protocol::write_frame(&mut sock, Kind::Failed, e.as_bytes());
            return Ok(super::helper::SETUP_FAILED);
        }
    };
    if protocol::write_frame(&mut sock, Kind::Ready, &[]).is_err() {
        return Ok(0); // the worker went away
    }
    serve(&mut sock, o, &scratch)
}

/// Marks every descriptor above 2 that the worker let us inherit
/// close-on-exec, so none reaches an action's command (a descriptor the
/// worker's own parent passed down, say, could point anywhere on the
/// host). Call first, while nothing else is open.
fn close_on_exec_inherited() -> Result<(), String> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::BorrowedFd;
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").map_err(|e| format!("listing /proc/self/fd: {e}"))? {
        let entry = entry.map_err(|e| format!("listing /proc/self/fd: {e}"))?;
        if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            && fd > 2
        {
            fds.push(fd);
        }
    }
    // The listing's own descriptor is closed now; setting the flag on its
    // number fails (EBADF) or hits a descriptor that is open again: both
    // are fine.
    for fd in fds {
        // SAFETY: the process is single-threaded (checked just before), so
        // no other code can close or reuse `fd` while it is borrowed for
        // this one call; a number that is no longer open makes fcntl fail
        // with EBADF, which is ignored.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    Ok(())
}

/// Threads other than ours would make the clone below unsound (a copy of
/// a lock another thread holds): refuse to run instead.
fn ensure_single_threaded() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    match threads {
        Some(1) => Ok(()),
        Some(n) => Err(format!("the zygote must be single-threaded, it has {n} threads")),
        None => Err("cannot tell how many threads the zygote has".into()),
    }
}

/// Namespaces and mounts; returns the private tmpfs's to empty after each
/// action.
fn setup(o: &ZygoteOptions) -> Result<Vec<Scratch>, String> {
    if !o.namespaces {
        std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
        return Ok(Vec::new());
    }
    let net = if o.network {
        CloneFlags::empty()
    } else {
        CloneFlags::CLONE_NEWNET
    };
    let scratch = if nix::unistd::geteuid().is_root() {
        // Root sets the mounts up with its own privileges (the path to the
        // work directory may not be searchable by the sandbox user), then
        // becomes the sandbox user and creates the user namespace, so the
        // mount namespace stays owned by the host's user namespace and no
        // action can change it.
        nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(mount namespace): {e}"))?;
        let scratch = super::mounts::setup(&o.root, &o.hide, &o.tmpfs, o.tmpfs_size)?;
        super::helper::drop_privileges(o.uid, o.gid)?;
        super::helper::new_user_namespace(net)?;
        scratch
    } else {
        super::helper::new_user_namespace(CloneFlags::CLONE_NEWNS | net)?;
        super::mounts::setup(&o.root, &o.hide, &o.tmpfs, o.tmpfs_size)?
    };
    if !o.network {
        super::netlink::loopback_up()?;
    }
    super::keyrings::join_new_session()?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(scratch)
}

fn serve(sock: &mut UnixStream, o: &ZygoteOptions, scratch: &[Scratch]) -> Result<i32, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let signals = SignalFd::with_flags(
        &supervised_signals(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )
    .map_err(|e| format!("signalfd: {e}"))?;
    let mut stack = vec![0u8; CLONE_STACK];
    let mut running: Option<Running> = None;
    loop {
        let (sock_ready, sig_ready) = {
            let mut fds = [
                PollFd::new(sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready = |f: &PollFd| {
                f.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                })
            };
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            let mut stop = false;
            while let Ok(Some(info)) = signals.read_signal() {
                let s = info.ssi_signo as i32;
                stop |= s == Signal::SIGTERM as i32 || s == Signal::SIGINT as i32;
            }
            if stop {
                kill_and_reap(running.take());
                return Ok(0);
            }
            if let Some(r) = running.take() {
                match waitpid(r.pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => running = Some(r),
                    Ok(status) => {
                        let (kind, body, unclean) = finish(r, status, scratch, o);
                        if protocol::write_frame(sock, kind, &body).is_err() {
                            return Ok(0); // the worker went away
                        }
                        if let Some(e) = unclean {
                            // The slot is not clean: it must not run
                            // another action. The worker starts a new
                            // zygote (with fresh tmpfs's) when this one
                            // has exited.
                            return Err(e);
                        }
                    }
                    Err(e) => {
                        let msg = format!("waiting for the action's init: {e}");
                        if protocol::write_frame(sock, Kind::Failed, msg.as_bytes()).is_err() {
                            return Ok(0); // the worker went away
                        }
                    }
                }
            }
        }
        if sock_ready {
            let frame = match protocol::read_frame(sock) {
                Ok(Some(f)) => f,
                // The worker went away: nothing of this slot may outlive it.
                Ok(None) | Err(_) => {
                    kill_and_reap(running.take());
                    return Ok(0);
                }
            };
            match frame.kind {
                Kind::Run => {
                    let refusal = if running.is_some() {
                        Some("the slot is already running an action".to_string())
                    } else {
                        match start(frame, o, &mut stack) {
                            Ok(r) => {
                                running = Some(r);
                                None
                            }
                            Err(e) => Some(e),
                        }
                    };
                    if let Some(msg) = refusal
                        && protocol::write_frame(sock, Kind::Failed, msg.as_bytes()).is_err()
                    {
                        kill_and_reap(running.take());
                        return Ok(0); // the worker went away
                    }
                }
                Kind::Terminate => {
                    if let Some(r) = &running {
                        let _ = kill(r.pid, Signal::SIGTERM);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Clones the action's init.
fn start(frame: Frame, o: &ZygoteOptions, stack: &mut [u8]) -> Result<Running, String> {
    let request =
        RunRequest::decode(frame.body.as_slice()).map_err(|e| format!("undecodable run request: {e}"))?;
    let [stdout, stderr]: [OwnedFd; 2] = frame
        .fds
        .try_into()
        .map_err(|_| "a run request must carry the stdout and stderr descriptors".to_string())?;
    let (report_rx, report_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let spec = InitSpec {
        request: &request,
        stdout: &stdout,
        stderr: &stderr,
        report: &report_tx,
        report_reader: std::cell::Cell::new(Some(report_rx)),
        pidns: o.namespaces,
        hostname: o.hostname.as_deref().filter(|_| o.namespaces),
    };
    let flags = if o.namespaces {
        CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS
    } else {
        CloneFlags::empty()
    };
    // SAFETY: `clone` without CLONE_VM creates a child process with a
    // copy of this address space, like fork(2), running the callback on
    // `stack` (in the child's own copy of that buffer). This is sound
    // because (1) the process is single-threaded (checked at start by
    // `ensure_single_threaded`, and the zygote never starts a thread), so
    // no lock or allocator state in the copy can be held by a thread that
    // does not exist in the child; (2) the callback only borrows data that
    // lives in this frame, which the child has its own copy of; (3) the
    // callback never returns into the zygote's code: its return value
    // becomes the child's exit status; (4) `stack` is a live, exclusively
    // borrowed buffer of CLONE_STACK bytes, far beyond what init uses
    // (no recursion; std's process spawning and formatting only).
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| init_main(&spec) as isize),
            stack,
            flags,
            Some(Signal::SIGCHLD as i32),
        )
    }
    .map_err(|e| format!("clone of the action's init: {e}"))?;
    let report_rx = spec
        .report_reader
        .take()
        .ok_or("the report pipe's read end went missing")?;
    drop(spec);
    drop(report_tx);
    Ok(Running {
        pid,
        report: std::fs::File::from(report_rx),
    })
}

/// The answer for an action whose init ended with `status`; empties the
/// private tmpfs's and, when the slot has namespaces (and so keyrings of
/// its own, see [`setup`]), clears its keyrings for the next action (the
/// third value says why that failed, if it did).
fn finish(
    mut r: Running,
    status: WaitStatus,
    scratch: &[Scratch],
    o: &ZygoteOptions,
) -> (Kind, Vec<u8>, Option<String>) {
    let mut buf = Vec::new();
    let _ = r.report.read_to_end(&mut buf);
    let mut cleanup_error = None;
    for dir in scratch {
        if let Err(e) = super::mounts::reset_scratch(dir, &o.root) {
            cleanup_error.get_or_insert(format!("emptying the private tmpfs's failed: {e}"));
        }
    }
    // Without namespaces the zygote shares the worker's session keyring
    // (it joined none of its own): that is not the slot's to clear.
    if o.namespaces
        && let Err(e) = super::keyrings::clear()
    {
        cleanup_error.get_or_insert(format!("clearing the slot's keyrings failed: {e}"));
    }
    let record = match Finished::decode(buf.as_slice()) {
        Ok(f) if !buf.is_empty() => f,
        _ => {
            return (
                Kind::Failed,
                format!("the action's init ended without a report ({status:?})").into_bytes(),
                cleanup_error,
            );
        }
    };
    if !record.setup_error.is_empty() {
        return (Kind::Failed, record.setup_error.into_bytes(), cleanup_error);
    }
    (Kind::Finished, record.encode_to_vec(), cleanup_error)
}

/// Kills a running action (its whole PID namespace) and reaps its init.
fn kill_and_reap(running: Option<Running>) {
    if let Some(r) = running {
        let _ = kill(r.pid, Signal::SIGKILL);
        let _ = waitpid(r.pid, None);
    }
}
