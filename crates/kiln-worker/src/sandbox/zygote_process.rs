//! The worker's side of one zygote ([`super::zygote`]): starting the
//! process, sending it an action, waiting for the result within the
//! action's timeout, asking it to terminate the action on timeout or
//! cancel.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::Ending;
use super::protocol::{self, Finished, HEADER_LEN, Kind, RunRequest};

/// How long a new zygote may take to set its sandbox up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time after the grace period a zygote gets to report a terminated
/// action before it is killed.
const REPORT_SLACK: Duration = Duration::from_secs(5);

/// What bounds one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The action's timeout.
    pub timeout: Duration,
    /// After SIGTERM, how long before SIGKILL.
    pub grace: Duration,
    /// Largest stdout (and stderr) before the action is terminated.
    pub max_stdio_bytes: u64,
}

/// How often the size of stdout/stderr is checked while an action runs.
const STDIO_CHECK: Duration = Duration::from_millis(250);

/// Why a run produced no result.
#[derive(Debug)]
pub enum RunError {
    /// The zygote could not start the action (a bad working directory, a
    /// failed clone...); the zygote itself is fine.
    Action(String),
    /// The zygote died, broke the protocol or did not answer: it must be
    /// replaced.
    Zygote(String),
}

pub struct ZygoteProcess {
    child: Child,
    sock: tokio::net::UnixStream,
    buf: BytesMut,
    /// A run was sent and its answer not read (a caller gave up midway):
    /// the zygote is in an unknown state and must not be reused.
    in_flight: bool,
}

impl ZygoteProcess {
    /// Starts `helper zygote ARGS` and waits until it is set up.
    pub async fn start(helper: &[String], args: &[String]) -> Result<ZygoteProcess, String> {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        let program = helper.first().ok_or("no sandbox helper configured")?;
        let mut cmd = Command::new(program);
        if program == super::SELF_EXE
            && let Ok(exe) = std::env::current_exe()
        {
            // What `ps` shows: the binary's name, not /proc/self/exe.
            cmd.arg0(exe);
        }
        cmd.args(&helper[1..])
            .arg("zygote")
            .args(args)
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| format!("starting {program:?}: {e}"))?;
        let sock = std::os::unix::net::UnixStream::from(ours);
        sock.set_nonblocking(true)
            .map_err(|e| format!("control socket: {e}"))?;
        let sock = tokio::net::UnixStream::from_std(sock).map_err(|e| format!("control socket: {e}"))?;
        let mut z = ZygoteProcess {
            child,
            sock,
            buf: BytesMut::with_capacity(256),
            in_flight: false,
        };
        match tokio::time::timeout(START_TIMEOUT, z.read_frame()).await {
            Ok(Ok(Some((Kind::Ready, _)))) => Ok(z),
            Ok(Ok(Some((Kind::Failed, msg)))) => Err(String::from_utf8_lossy(&msg).into_owned()),
            Ok(Ok(Some((k, _)))) => Err(format!("the zygote answered {k:?} instead of Ready")),
            Ok(Ok(None)) => Err(match z.child.wait().await {
                Ok(s) => format!("the zygote exited ({s}) before it was ready"),
                Err(e) => format!("the zygote exited before it was ready: {e}"),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("the zygote was not ready within {START_TIMEOUT:?}")),
        }
    }

    /// Whether the process is still there and in a known state.
    pub fn usable(&mut self) -> bool {
        !self.in_flight && matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the zygote and waits (bounded) for it to be gone.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(pid = ?self.child.id(), "a killed zygote did not exit within 5 s");
        }
    }

    /// Reads one frame; cancel-safe (bytes read stay in `buf`). `None` at
    /// end of stream.
    async fn read_frame(&mut self) -> Result<Option<(Kind, Vec<u8>)>, String> {
        loop {
            if self.buf.len() >= HEADER_LEN {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&self.buf[..HEADER_LEN]);
                let (kind, len) = protocol::parse_header(&h)?;
                if self.buf.len() >= HEADER_LEN + len {
                    self.buf.advance(HEADER_LEN);
                    let body = self.buf.split_to(len).to_vec();
                    return Ok(Some((kind, body)));
                }
            }
            let n = self
                .sock
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| format!("reading from the zygote: {e}"))?;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    async fn send_run(&mut self, req: &RunRequest, stdout: &OwnedFd, stderr: &OwnedFd) -> Result<(), String> {
        let frame = protocol::encode(Kind::Run, &req.encode_to_vec());
        let fds = [stdout.as_raw_fd(), stderr.as_raw_fd()];
        let sent = loop {
            self.sock
                .writable()
                .await
                .map_err(|e| format!("writing to the zygote: {e}"))?;
            match self.sock.try_io(Interest::WRITABLE, || {
                protocol::send_with_fds(&self.sock, &frame, &fds)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("writing to the zygote: {e}")),
            }
        };
        self.sock
            .write_all(&frame[sent..])
            .await
            .map_err(|e| format!("writing to the zygote: {e}"))
    }

    /// Runs one action: its command line in `req`, its stdout/stderr
    /// descriptors. On timeout or cancel the zygote is asked to terminate
    /// the action (SIGTERM, SIGKILL after `grace`) and its report is still
    /// awaited, so the slot is clean when this returns Ok.
    pub async fn run(
        &mut self,
        req: &RunRequest,
        stdout: &OwnedFd,
        stderr: &OwnedFd,
        limits: Limits,
        cancel: &CancellationToken,
    ) -> Result<(Ending, Finished), RunError> {
        self.in_flight = true;
        self.send_run(req, stdout, stderr)
            .await
            .map_err(RunError::Zygote)?;
        let grace = limits.grace;
        let too_much_output = async {
            let size = |fd: &OwnedFd| nix::sys::stat::fstat(fd).map(|s| s.st_size as u64).unwrap_or(0);
            // No check at once: a short action costs nothing here.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + STDIO_CHECK, STDIO_CHECK);
            loop {
                tick.tick().await;
                if size(stdout).max(size(stderr)) > limits.max_stdio_bytes {
                    return;
                }
            }
        };
        let ending = tokio::select! {
            r = self.read_frame() => return self.answer(r, Ending::Exited),
            _ = tokio::time::sleep(limits.timeout) => Ending::TimedOut,
            _ = cancel.cancelled() => Ending::Cancelled,
            _ = too_much_output => Ending::OutputLimit,
        };
        self.sock
            .write_all(&protocol::encode(Kind::Terminate, &[]))
            .await
            .map_err(|e| RunError::Zygote(format!("asking the zygote to terminate the action: {e}")))?;
        match tokio::time::timeout(grace + REPORT_SLACK, self.read_frame()).await {
            Ok(r) => self.answer(r, ending),
            Err(_) => Err(RunError::Zygote(format!(
                "the zygote did not report within {:?} of terminating the action",
                grace + REPORT_SLACK
            ))),
        }
    }

    fn answer(
        &mut self,
        frame: Result<Option<(Kind, Vec<u8>)>, String>,
        ending: Ending,
    ) -> Result<(Ending, Finished), RunError> {
        match frame {
            Ok(Some((Kind::Finished, body))) => {
                self.in_flight = false;
                Finished::decode(body.as_slice())
                    .map(|f| (ending, f))
                    .map_err(|e| RunError::Zygote(format!("undecodable report from the zygote: {e}")))
            }
            Ok(Some((Kind::Failed, msg))) => {
                self.in_flight = false;
                Err(RunError::Action(String::from_utf8_lossy(&msg).into_owned()))
            }
            Ok(Some((k, _))) => Err(RunError::Zygote(format!("unexpected {k:?} from the zygote"))),
            Ok(None) => Err(RunError::Zygote(
                "the zygote exited while running the action".into(),
            )),
            Err(e) => Err(RunError::Zygote(e)),
        }
    }
}
