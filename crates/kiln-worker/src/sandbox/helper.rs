//! The sandbox helper: the program (`kiln-sandbox`, or the `kiln` binary's
//! helper sub-command calling [`helper_main`]) that sets up namespaces and
//! supervises an action's processes. It is a separate, single-threaded
//! process because `unshare(CLONE_NEWUSER)` and `setns` into a user
//! namespace require a single-threaded caller, which the worker is not.
//! Everything here uses safe wrappers (nix, signal-hook, std): no `unsafe`.
//!
//! Modes (arguments are internal to Kiln and may change between versions):
//!
//! * `hold --uid U --gid G`: creates a user namespace and an empty network
//!   namespace (loopback up), prints `ready`, then waits for its standard
//!   input to close. Actions without network join these namespaces instead
//!   of creating a network namespace each (that costs milliseconds and
//!   kernel work on teardown).
//! * `run ...  -- ARGV`: stage 1. Joins a holder's namespaces (`--join PID`)
//!   or creates a user namespace (network on), then new mount, PID, IPC and
//!   UTS namespaces; mounts private tmpfs's (`--tmpfs`), hides the worker's
//!   directories (`--hide`) except the action's own (`--dir`); starts stage 2
//!   as PID 1 of the new PID namespace; forwards SIGTERM to it; kills it
//!   when its standard input closes (the worker went away).
//! * `init ... -- ARGV`: stage 2 (or, unsandboxed, the only stage). Runs
//!   ARGV with the action's stdout/stderr files, forwards SIGTERM to every
//!   process of the action, SIGKILLs them all after the grace period and
//!   once the command exits, reaps everything, and prints one report line:
//!   `kiln-sandbox-report exit=N signal=S utime_us=U stime_us=S maxrss_kb=M`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

/// First word of the report line.
pub const REPORT_PREFIX: &str = "kiln-sandbox-report";
/// Exit code of the helper when it could not set the sandbox up.
pub const SETUP_FAILED: i32 = 125;

/// Entry point: `args` are the arguments after the program (and after any
/// sub-command prefix), starting with the mode. Returns the exit code.
pub fn helper_main(args: Vec<OsString>) -> i32 {
    let args: Vec<String> = match args.into_iter().map(|a| a.into_string()).collect() {
        Ok(a) => a,
        Err(_) => return fail("arguments must be UTF-8"),
    };
    let Some((mode, rest)) = args.split_first() else {
        return fail("usage: kiln-sandbox hold|run|init ...");
    };
    let parsed = match Args::parse(rest) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let r = match mode.as_str() {
        "hold" => hold(&parsed),
        "run" => run(&parsed),
        "init" => init(&parsed),
        other => Err(format!("unknown mode {other:?}")),
    };
    match r {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> i32 {
    let _ = writeln!(std::io::stderr(), "kiln-sandbox: {msg}");
    SETUP_FAILED
}

#[derive(Default, Debug)]
struct Args {
    uid: Option<u32>,
    gid: Option<u32>,
    join: Option<u32>,
    dir: Option<PathBuf>,
    hide: Vec<PathBuf>,
    tmpfs: Vec<PathBuf>,
    hostname: Option<String>,
    cwd: Option<PathBuf>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
    grace_ms: u64,
    pidns: bool,
    reexec: Vec<String>,
    /// The command's environment (passed as arguments, never as the
    /// helper's own environment: `LD_PRELOAD` and friends from an action
    /// must not reach the helper, which may start as root).
    env: Vec<(String, String)>,
    argv: Vec<String>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let mut a = Args {
            grace_ms: 2000,
            ..Args::default()
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--" {
                a.argv = it.cloned().collect();
                break;
            }
            if flag == "--pidns" {
                a.pidns = true;
                continue;
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?.clone();
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("{flag}: {v:?} is not a number"))
            };
            match flag.as_str() {
                "--uid" => a.uid = Some(num(&value)?),
                "--gid" => a.gid = Some(num(&value)?),
                "--join" => a.join = Some(num(&value)?),
                "--dir" => a.dir = Some(value.into()),
                "--hide" => a.hide.push(value.into()),
                "--tmpfs" => a.tmpfs.push(value.into()),
                "--hostname" => a.hostname = Some(value),
                "--cwd" => a.cwd = Some(value.into()),
                "--stdout" => a.stdout = Some(value.into()),
                "--stderr" => a.stderr = Some(value.into()),
                "--grace-ms" => {
                    a.grace_ms = value
                        .parse()
                        .map_err(|_| format!("--grace-ms: {value:?} is not a number"))?
                }
                "--reexec" => a.reexec.push(value),
                "--env" => {
                    let (k, v) = value
                        .split_once('=')
                        .ok_or_else(|| format!("--env {value:?} is not NAME=VALUE"))?;
                    a.env.push((k.to_string(), v.to_string()));
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(a)
    }
}

fn errno(what: &str) -> impl FnOnce(Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Root drops to the sandbox user before anything else, so that every
/// namespace is owned by that user and nothing the action does can act
/// as root on the host's files.
fn drop_privileges(a: &Args) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let (Some(uid), Some(gid)) = (a.uid, a.gid) else {
        return Err("running as root needs --uid and --gid".into());
    };
    if uid == 0 || gid == 0 {
        return Err("refusing to run actions as root (uid/gid 0)".into());
    }
    nix::unistd::setgroups(&[]).map_err(errno("setgroups"))?;
    let g = Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(errno("setresgid"))?;
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(errno("setresuid"))?;
    // A uid change makes the process non-dumpable, which hands its /proc
    // files to root: we could no longer write our own uid_map, and stage 1
    // could not open a holder's namespaces.
    nix::sys::prctl::set_dumpable(true).map_err(errno("prctl(PR_SET_DUMPABLE)"))?;
    Ok(())
}

/// Creates a user namespace mapping our own (unprivileged) ids to
/// themselves: the action is not root inside, so it gets no capabilities
/// when it execs.
fn new_user_namespace(extra: CloneFlags) -> Result<(), String> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    unshare(CloneFlags::CLONE_NEWUSER | extra).map_err(errno("unshare(user namespace)"))?;
    std::fs::write("/proc/self/setgroups", "deny").map_err(|e| format!("writing setgroups: {e}"))?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))
        .map_err(|e| format!("writing uid_map: {e}"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
        .map_err(|e| format!("writing gid_map: {e}"))?;
    Ok(())
}

fn hold(a: &Args) -> Result<i32, String> {
    drop_privileges(a)?;
    new_user_namespace(CloneFlags::CLONE_NEWNET)?;
    super::netlink::loopback_up()?;
    let mut out = std::io::stdout();
    writeln!(out, "ready").map_err(|e| format!("writing to stdout: {e}"))?;
    out.flush().map_err(|e| format!("writing to stdout: {e}"))?;
    // Hold the namespaces until the worker closes our stdin (or dies).
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut sink) {
            Ok(0) => return Ok(0),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(0),
        }
    }
}

/// Signal flags plus a wake-up socket, so a poll loop notices signals.
struct Signals {
    term: Arc<AtomicBool>,
    wake: UnixStream,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        let (rx, tx) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        rx.set_nonblocking(true).map_err(|e| format!("socketpair: {e}"))?;
        tx.set_nonblocking(true).map_err(|e| format!("socketpair: {e}"))?;
        let term = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, term.clone()).map_err(|e| format!("signal handler: {e}"))?;
        }
        for sig in [
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGCHLD,
        ] {
            let tx = tx.try_clone().map_err(|e| format!("socketpair: {e}"))?;
            signal_hook::low_level::pipe::register(sig, tx).map_err(|e| format!("signal handler: {e}"))?;
        }
        Ok(Signals { term, wake: rx })
    }

    /// Waits for a signal, for `extra` to become readable, or until
    /// `timeout` (None: forever). Returns whether `extra` is readable.
    fn wait(&mut self, extra: Option<std::os::fd::BorrowedFd<'_>>, timeout: Option<Duration>) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = extra {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        let _ = poll(&mut fds, t);
        let extra_ready = fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR));
        let mut buf = [0u8; 64];
        while matches!(self.wake.read(&mut buf), Ok(n) if n > 0) {}
        extra_ready
    }

    fn terminated(&self) -> bool {
        self.term.load(Ordering::SeqCst)
    }
}

fn run(a: &Args) -> Result<i32, String> {
    let dir = a.dir.as_ref().ok_or("run needs --dir")?;
    // Open the holder's namespaces with the worker's privileges.
    let joined = match a.join {
        Some(pid) => {
            let user = std::fs::File::open(format!("/proc/{pid}/ns/user"))
                .map_err(|e| format!("opening the user namespace of holder {pid}: {e}"))?;
            let net = std::fs::File::open(format!("/proc/{pid}/ns/net"))
                .map_err(|e| format!("opening the network namespace of holder {pid}: {e}"))?;
            Some((user, net))
        }
        None => None,
    };
    let rest = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    let enter = |extra: CloneFlags| -> Result<(), String> {
        match &joined {
            Some((user, net)) => {
                setns(user.as_fd(), CloneFlags::CLONE_NEWUSER).map_err(errno("setns(user namespace)"))?;
                setns(net.as_fd(), CloneFlags::CLONE_NEWNET).map_err(errno("setns(network namespace)"))?;
                unshare(rest | extra).map_err(errno("unshare(mount, pid, ipc, uts namespaces)"))
            }
            None => new_user_namespace(rest | extra),
        }
    };
    if nix::unistd::geteuid().is_root() {
        // Root sets the mounts up with its own privileges (the paths to
        // the work directory may not be searchable by the sandbox user),
        // then becomes the sandbox user and enters the other namespaces.
        unshare(CloneFlags::CLONE_NEWNS).map_err(errno("unshare(mount namespace)"))?;
        setup_mounts(a, dir)?;
        drop_privileges(a)?;
        enter(CloneFlags::empty())?;
    } else {
        enter(CloneFlags::CLONE_NEWNS)?;
        setup_mounts(a, dir)?;
    }
    drop(joined);
    if let Some(h) = &a.hostname {
        nix::unistd::sethostname(h).map_err(errno("sethostname"))?;
    }

    let mut signals = Signals::install()?;
    let exe = std::env::current_exe().map_err(|e| format!("finding the helper executable: {e}"))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(exe);
    cmd.args(&a.reexec);
    cmd.arg("init").arg("--pidns");
    for (flag, v) in [
        ("--cwd", &a.cwd),
        ("--stdout", &a.stdout),
        ("--stderr", &a.stderr),
    ] {
        if let Some(v) = v {
            cmd.arg(flag).arg(v);
        }
    }
    cmd.arg("--grace-ms").arg(a.grace_ms.to_string());
    for (k, v) in &a.env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    cmd.arg("--").args(&a.argv);
    cmd.env_clear();
    cmd.stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the sandbox init: {e}"))?;
    let init_pid = Pid::from_raw(child.id() as i32);

    // The worker closing our stdin (it exited or gave up) kills everything:
    // SIGKILL to PID 1 of the namespace takes every process in it down.
    // (No helper thread: after unshare(CLONE_NEWPID) threads cannot be
    // created, so stdin is polled with the signals.)
    let stdin = std::io::stdin();
    let mut stdin_open = true;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("waiting for the sandbox init: {e}"))?
        {
            return Ok(exit_code_of(status));
        }
        // The kernel drops a signal sent to the init of a PID namespace
        // that has no handler for it, and init may not have installed its
        // handler yet (a cancel right after the start): keep forwarding
        // SIGTERM until init exits. Init acts on the first one it sees.
        let terminated = signals.terminated();
        if terminated {
            let _ = kill(init_pid, Signal::SIGTERM);
        }
        let watch = stdin_open.then(|| stdin.as_fd());
        if signals.wait(watch, terminated.then_some(TERM_RESEND)) {
            let mut buf = [0u8; 64];
            match stdin.lock().read(&mut buf) {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => {
                    stdin_open = false;
                    let _ = kill(init_pid, Signal::SIGKILL);
                }
            }
        }
    }
}

/// How often stage 1 re-sends SIGTERM to init until init exits.
const TERM_RESEND: Duration = Duration::from_millis(25);

fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => SETUP_FAILED,
    }
}

/// Private mounts: the whole tree becomes private (nothing propagates to
/// the host) and read-only; `--tmpfs` directories get an empty, writable
/// tmpfs; `--hide` directories (the worker's work and cache directories)
/// are covered by an empty tmpfs; the action's own directory is bound back
/// at its path, writable. So an action can write only its directory and
/// its private tmpfs's.
fn setup_mounts(a: &Args, dir: &Path) -> Result<(), String> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(errno("making / private"))?;
    // Opened in the new mount namespace (a bind source must belong to it),
    // before anything covers it.
    let dir_handle = std::fs::File::open(dir).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let dir_flags = nix::sys::statvfs::fstatvfs(&dir_handle)
        .map(|s| ms_flags_of(s.flags()))
        .map_err(errno("statvfs of the action directory"))?;
    make_read_only()?;
    let mut covered: Vec<&Path> = Vec::new();
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for t in &a.tmpfs {
        if !t.is_dir() {
            continue;
        }
        mount(
            Some("tmpfs"),
            t.as_path(),
            Some("tmpfs"),
            flags,
            Some("mode=1777"),
        )
        .map_err(|e| format!("mounting a tmpfs on {}: {e}", t.display()))?;
        covered.push(t);
    }
    for h in &a.hide {
        if covered.iter().any(|c| h.starts_with(c)) || !h.is_dir() {
            continue;
        }
        mount(
            Some("tmpfs"),
            h.as_path(),
            Some("tmpfs"),
            flags,
            Some("mode=0755"),
        )
        .map_err(|e| format!("hiding {}: {e}", h.display()))?;
        covered.push(h);
    }
    if covered.iter().any(|c| dir.starts_with(c)) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating {} in the sandbox: {e}", dir.display()))?;
    }
    let source = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir_handle));
    mount(
        Some(source.as_str()),
        dir,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| format!("binding {} into the sandbox: {e}", dir.display()))?;
    // The bind copied the read-only flag: make this one mount writable.
    mount(
        none,
        dir,
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | dir_flags,
        none,
    )
    .map_err(|e| format!("making {} writable: {e}", dir.display()))?;
    Ok(())
}

/// Per-mount flags to keep when remounting (locked in a user namespace:
/// dropping one would fail).
fn ms_flags_of(f: nix::sys::statvfs::FsFlags) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let mut m = MsFlags::empty();
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(st) {
            m |= ms;
        }
    }
    m
}

/// Remounts every mount but /proc and /sys read-only (keeping its other
/// flags). `/` must succeed; a mount that cannot be reached or changed is
/// left as it is.
fn make_read_only() -> Result<(), String> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("reading mountinfo: {e}"))?;
    let none: Option<&str> = None;
    for line in info.lines() {
        let Some(point) = line.split(' ').nth(4).map(unescape_mount_path) else {
            continue;
        };
        // procfs and sysfs guard their files themselves (root-owned,
        // capability checks), and the helper still writes its own
        // /proc/self/uid_map after this.
        let pseudo = |p: &str| point == p || point.starts_with(&format!("{p}/"));
        if pseudo("/proc") || pseudo("/sys") {
            continue;
        }
        let flags = match nix::sys::statvfs::statvfs(point.as_str()) {
            Ok(s) => ms_flags_of(s.flags()),
            Err(_) if point != "/" => continue,
            Err(e) => return Err(format!("statvfs of /: {e}")),
        };
        let r = mount(
            none,
            point.as_str(),
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
            none,
        );
        if let Err(e) = r
            && point == "/"
        {
            return Err(format!("making / read-only: {e}"));
        }
    }
    Ok(())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Stage 2: runs the command and supervises every process of the action.
fn init(a: &Args) -> Result<i32, String> {
    if a.pidns {
        // Our parent (stage 1) dying takes the namespace down with us.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(errno("prctl(PR_SET_PDEATHSIG)"))?;
    } else {
        // Orphans of the action are re-parented to us, so we can reap them
        // and count their resource usage.
        nix::sys::prctl::set_child_subreaper(true).map_err(errno("prctl(PR_SET_CHILD_SUBREAPER)"))?;
    }
    let mut signals = Signals::install()?;
    let (Some(cwd), Some(out), Some(err)) = (&a.cwd, &a.stdout, &a.stderr) else {
        return Err("init needs --cwd, --stdout and --stderr".into());
    };
    let Some((program, args)) = a.argv.split_first() else {
        return Err("no command given".into());
    };
    let open = |p: &PathBuf| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .map_err(|e| format!("opening {}: {e}", p.display()))
    };
    let stdout = open(out)?;
    let stderr = open(err)?;
    std::env::set_current_dir(cwd)
        .map_err(|e| format!("entering the working directory {}: {e}", cwd.display()))?;
    // Nothing the action runs can gain privileges (setuid binaries, file
    // capabilities).
    nix::sys::prctl::set_no_new_privs().map_err(errno("prctl(PR_SET_NO_NEW_PRIVS)"))?;

    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    cmd.env_clear();
    cmd.envs(a.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if !a.pidns {
        cmd.process_group(0);
    }
    let mut stderr_for_errors = stderr.try_clone().map_err(|e| format!("dup of stderr: {e}"))?;
    cmd.stdout(stdout).stderr(stderr);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // Like a shell: 127 for a command not found, 126 otherwise.
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let _ = writeln!(stderr_for_errors, "kiln: cannot execute {program:?}: {e}");
            report(code, 0);
            return Ok(code);
        }
    };
    drop(stderr_for_errors);
    let main_pid = Pid::from_raw(child.id() as i32);
    // Reaped below with waitpid(-1): the std handle is not used again.
    drop(child);

    let kill_all = |sig: Signal| {
        if a.pidns {
            // From PID 1: every other process of the namespace.
            let _ = kill(Pid::from_raw(-1), sig);
        } else {
            let _ = killpg(main_pid, sig);
            for pid in direct_children() {
                let _ = kill(pid, sig);
            }
        }
    };

    let grace = Duration::from_millis(a.grace_ms);
    let mut term_deadline: Option<Instant> = None;
    let mut killed = false;
    let mut main_status: Option<(i32, i32)> = None;
    loop {
        if signals.terminated() && term_deadline.is_none() {
            term_deadline = Some(Instant::now() + grace);
            kill_all(Signal::SIGTERM);
        }
        if let Some(d) = term_deadline
            && !killed
            && Instant::now() >= d
        {
            killed = true;
            kill_all(Signal::SIGKILL);
        }
        reap(main_pid, &mut main_status, false);
        if main_status.is_some() {
            break;
        }
        let timeout = match term_deadline {
            Some(d) if !killed => Some(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
            _ => None,
        };
        signals.wait(None, timeout);
    }
    // The command is done: nothing it started may outlive it.
    kill_all(Signal::SIGKILL);
    if a.pidns {
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
    let (code, signal) = main_status.unwrap_or((SETUP_FAILED, 0));
    report(code, signal);
    Ok(code)
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

/// Prints the report line with the resource usage of every reaped process.
fn report(code: i32, signal: i32) {
    let (utime, stime, maxrss) = match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let us = |t: nix::sys::time::TimeVal| t.tv_sec() * 1_000_000 + t.tv_usec();
            (us(u.user_time()), us(u.system_time()), u.max_rss())
        }
        Err(_) => (0, 0, 0),
    };
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "{REPORT_PREFIX} exit={code} signal={signal} utime_us={utime} stime_us={stime} maxrss_kb={maxrss}"
    );
    let _ = out.flush();
}

/// A parsed report line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    pub exit_code: i32,
    pub signal: i32,
    pub user_cpu_us: i64,
    pub system_cpu_us: i64,
    pub max_rss_kb: i64,
}

/// Finds and parses the report line in the helper's standard output.
pub fn parse_report(stdout: &str) -> Option<Report> {
    let line = stdout.lines().rev().find(|l| l.starts_with(REPORT_PREFIX))?;
    let mut r = Report::default();
    for field in line.split_whitespace().skip(1) {
        let (k, v) = field.split_once('=')?;
        let v: i64 = v.parse().ok()?;
        match k {
            "exit" => r.exit_code = v as i32,
            "signal" => r.signal = v as i32,
            "utime_us" => r.user_cpu_us = v,
            "stime_us" => r.system_cpu_us = v,
            "maxrss_kb" => r.max_rss_kb = v,
            _ => {}
        }
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trip() {
        let r = parse_report(
            "noise\nkiln-sandbox-report exit=3 signal=0 utime_us=10 stime_us=20 maxrss_kb=1024\n",
        )
        .unwrap();
        assert_eq!(
            r,
            Report {
                exit_code: 3,
                signal: 0,
                user_cpu_us: 10,
                system_cpu_us: 20,
                max_rss_kb: 1024
            }
        );
        assert!(parse_report("nothing").is_none());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
    }

    #[test]
    fn args_parse() {
        let a = Args::parse(
            &["--uid", "5", "--pidns", "--tmpfs", "/tmp", "--", "sh", "-c", "x"].map(String::from),
        )
        .unwrap();
        assert_eq!(a.uid, Some(5));
        assert!(a.pidns);
        assert_eq!(a.argv, vec!["sh", "-c", "x"]);
        assert!(Args::parse(&["--uid".to_string()]).is_err());
        assert!(Args::parse(&["--bogus".to_string(), "1".to_string()]).is_err());
    }
}
