//! The init of one action: the process the zygote clones for it (PID 1 of
//! the action's fresh PID namespace when sandboxed). It runs the command
//! with the action's stdout/stderr, supervises every process of the
//! action, and writes one [`Finished`] record to the zygote.
//!
//! * SIGTERM (forwarded by the zygote on timeout or cancel) sends SIGTERM to
//!   every process of the action, then SIGKILL after the grace period.
//! * When the command exits, every process it left behind is killed: from
//!   PID 1, `kill(-1)` reaches the whole namespace, and when PID 1 exits the
//!   kernel tears the namespace down. Unsandboxed, init is a child
//!   subreaper and kills the command's process group and every orphan it
//!   inherits.
//! * SIGCHLD and SIGTERM are blocked (inherited from the zygote, so no
//!   signal is lost between the clone and the first poll) and read from a
//!   signalfd. A blocked signal is queued even for the init of a PID
//!   namespace, which would otherwise drop an unhandled SIGTERM. The
//!   command starts with an empty signal mask and default dispositions
//!   ([`super::spawn`]).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use prost::Message;

use super::errno;
use super::protocol::{Finished, RunRequest};

/// What init needs, prepared by the zygote before the clone.
pub struct InitSpec<'a> {
    pub request: &'a RunRequest,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    /// Write end of the pipe the record goes to. It is also init's
    /// lifeline: when the zygote (the only holder of the read end) dies,
    /// polling it reports an error and init kills the action.
    pub report: &'a OwnedFd,
    /// The zygote's read end of that pipe, which the clone inherited: init
    /// closes its copy first thing, so that only the zygote holds one.
    pub report_reader: std::cell::Cell<Option<OwnedFd>>,
    /// Whether this process is PID 1 of a fresh PID namespace.
    pub pidns: bool,
    /// Host name to set (fresh UTS namespace only).
    pub hostname: Option<&'a str>,
}

/// The signals init (and the zygote) keep blocked and read from a signalfd.
pub fn supervised_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Runs the action and reports; returns the process's exit code.
pub fn init_main(spec: &InitSpec<'_>) -> i32 {
    // This is the clone's own copy of the cell: the zygote keeps its end.
    drop(spec.report_reader.take());
    let record = match run(spec) {
        Ok(r) => r,
        Err(setup_error) => Finished {
            exit_code: super::helper::SETUP_FAILED,
            setup_error,
            ..Default::default()
        },
    };
    let mut out = std::fs::File::from(match spec.report.try_clone() {
        Ok(fd) => fd,
        Err(_) => return super::helper::SETUP_FAILED,
    });
    // Under PIPE_BUF bytes: one atomic write.
    let _ = out.write_all(&record.encode_to_vec());
    0
}

fn run(spec: &InitSpec<'_>) -> Result<Finished, String> {
    if spec.pidns {
        // The zygote dying takes the action down with it.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(errno("prctl(PR_SET_PDEATHSIG)"))?;
        if let Some(h) = spec.hostname {
            nix::unistd::sethostname(h).map_err(errno("sethostname"))?;
        }
    } else {
        // Orphans of the action are re-parented to us, so we can reap them,
        // count their resource usage and kill them.
        nix::sys::prctl::set_child_subreaper(true).map_err(errno("prctl(PR_SET_CHILD_SUBREAPER)"))?;
    }
    let signals = SignalFd::with_flags(
        &supervised_signals(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )
    .map_err(errno("signalfd"))?;
    let req = spec.request;
    if req.argv.is_empty() {
        return Err("no command given".into());
    }
    std::env::set_current_dir(&req.cwd)
        .map_err(|e| format!("entering the working directory {}: {e}", req.cwd))?;
    // Nothing the action runs can gain privileges (setuid binaries, file
    // capabilities).
    nix::sys::prctl::set_no_new_privs().map_err(errno("prctl(PR_SET_NO_NEW_PRIVS)"))?;

    let env: Vec<(&str, &str)> = req.env().collect();
    let main_pid = match super::spawn::spawn(&req.argv, &env, spec.stdout, spec.stderr, !spec.pidns) {
        Ok(pid) => pid,
        Err(f) => {
            // Like a shell: 127 for a command not found, 126 otherwise.
            let dup = spec
                .stderr
                .try_clone()
                .map_err(|e| format!("dup of stderr: {e}"))?;
            let _ = writeln!(std::fs::File::from(dup), "kiln: {}", f.message);
            return Ok(usage_record(f.code, 0));
        }
    };

    let kill_all = |sig: Signal| {
        if spec.pidns {
            // From PID 1: every other process of the namespace.
            let _ = kill(Pid::from_raw(-1), sig);
        } else {
            let _ = killpg(main_pid, sig);
            for pid in direct_children() {
                let _ = kill(pid, sig);
            }
        }
    };

    let grace = Duration::from_millis(req.grace_ms);
    let mut term_deadline: Option<Instant> = None;
    let mut killed = false;
    let mut main_status: Option<(i32, i32)> = None;
    loop {
        reap(main_pid, &mut main_status, false);
        if main_status.is_some() {
            break;
        }
        if let Some(d) = term_deadline
            && !killed
            && Instant::now() >= d
        {
            killed = true;
            kill_all(Signal::SIGKILL);
        }
        let timeout = match term_deadline {
            Some(d) if !killed => Some(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
            _ => None,
        };
        match wait_signal(&signals, spec.report, timeout) {
            Wake::Terminate if term_deadline.is_none() => {
                term_deadline = Some(Instant::now() + grace);
                kill_all(Signal::SIGTERM);
            }
            Wake::Orphaned => {
                // Nobody will read our report or enforce a deadline.
                kill_all(Signal::SIGKILL);
                return Err("the zygote went away while the action ran".into());
            }
            _ => {}
        }
    }
    // The command is done: nothing it started may outlive it.
    kill_all(Signal::SIGKILL);
    if spec.pidns {
        reap(main_pid, &mut main_status, true);
    } else {
        // Escaped processes (new process group) are re-parented to us as
        // their parents die: kill and reap until none is left, bounded.
        for _ in 0..200 {
            reap(main_pid, &mut main_status, false);
            let children = direct_children();
            if children.is_empty() {
                break;
            }
            for pid in children {
                let _ = kill(pid, Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (code, signal) = main_status.unwrap_or((super::helper::SETUP_FAILED, 0));
    Ok(usage_record(code, signal))
}

/// Why [`wait_signal`] returned.
enum Wake {
    /// SIGTERM or SIGINT arrived.
    Terminate,
    /// The zygote is gone (the report pipe has no reader).
    Orphaned,
    /// A child changed state, or the timeout passed.
    Other,
}

/// Waits for a signal, for the zygote to go away, or for `timeout`;
/// drains the signalfd.
fn wait_signal(signals: &SignalFd, lifeline: &OwnedFd, timeout: Option<Duration>) -> Wake {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let t = match timeout {
        None => PollTimeout::NONE,
        Some(d) => PollTimeout::try_from(d.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX),
    };
    // A pipe's write end reports POLLERR once no reader is left.
    let mut fds = [
        PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        PollFd::new(lifeline.as_fd(), PollFlags::empty()),
    ];
    let _ = poll(&mut fds, t);
    let orphaned = fds[1]
        .revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP));
    let mut term = false;
    while let Ok(Some(info)) = signals.read_signal() {
        let s = info.ssi_signo as i32;
        if s == Signal::SIGTERM as i32 || s == Signal::SIGINT as i32 {
            term = true;
        }
    }
    if orphaned {
        Wake::Orphaned
    } else if term {
        Wake::Terminate
    } else {
        Wake::Other
    }
}

/// Reaps children; records the main command's (exit code, signal).
/// `block`: wait until no child is left.
fn reap(main_pid: Pid, main_status: &mut Option<(i32, i32)>, block: bool) {
    let flags = if block { None } else { Some(WaitPidFlag::WNOHANG) };
    loop {
        match waitpid(Pid::from_raw(-1), flags) {
            Ok(WaitStatus::Exited(pid, code)) => {
                if pid == main_pid {
                    *main_status = Some((code, 0));
                }
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                if pid == main_pid {
                    *main_status = Some((128 + sig as i32, sig as i32));
                }
            }
            Ok(WaitStatus::StillAlive) => return,
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Our direct children, from /proc (empty when unavailable).
fn direct_children() -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    out
}

/// The record for an ended command, with the resource usage of every
/// process reaped.
fn usage_record(code: i32, signal: i32) -> Finished {
    let (utime, stime, maxrss) = match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let us = |t: nix::sys::time::TimeVal| t.tv_sec() * 1_000_000 + t.tv_usec();
            (us(u.user_time()), us(u.system_time()), u.max_rss())
        }
        Err(_) => (0, 0, 0),
    };
    Finished {
        exit_code: code,
        signal,
        user_cpu_us: utime,
        system_cpu_us: stime,
        max_rss_kb: maxrss,
        setup_error: String::new(),
    }
}
