//! The messages between the worker and a slot's zygote (see
//! [`super::zygote`]), over a Unix stream socket that is the zygote's
//! standard input.
//!
//! A frame is a 4-byte little-endian body length, a 1-byte kind and the
//! body (a protobuf message for `Run` and `Finished`, UTF-8 text for
//! `Failed`, empty otherwise). A `Run` frame carries the action's stdout
//! and stderr file descriptors (`SCM_RIGHTS`) with its first byte, so the
//! zygote never opens a path for them and the action never sees one.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use prost::Message;

/// Largest frame body accepted (a command line plus environment is far
/// smaller; Linux caps them at a few MiB).
pub const MAX_BODY: usize = 64 << 20;

pub const HEADER_LEN: usize = 5;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// worker → zygote: run an action (body: [`RunRequest`], 2 fds).
    Run = 1,
    /// worker → zygote: terminate the running action (SIGTERM, then
    /// SIGKILL after the grace period).
    Terminate = 2,
    /// zygote → worker: set up and waiting for work.
    Ready = 3,
    /// zygote → worker: the action ended (body: [`Finished`]).
    Finished = 4,
    /// zygote → worker: the action could not be started or the zygote
    /// could not be set up (body: a message).
    Failed = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Run,
            2 => Kind::Terminate,
            3 => Kind::Ready,
            4 => Kind::Finished,
            5 => Kind::Failed,
            _ => return None,
        })
    }
}

/// One action for the zygote.
#[derive(Clone, PartialEq, Message)]
pub struct RunRequest {
    #[prost(string, repeated, tag = "1")]
    pub argv: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub env_names: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub env_values: Vec<String>,
    /// Absolute working directory (inside the slot's input root).
    #[prost(string, tag = "4")]
    pub cwd: String,
    /// After SIGTERM, how long the action has before SIGKILL.
    #[prost(uint64, tag = "5")]
    pub grace_ms: u64,
}

/// How an action ended, measured by its init process.
#[derive(Clone, PartialEq, Message)]
pub struct Finished {
    /// Exit code of the command (128 + signal when killed by one; 127 or
    /// 126 when it could not be executed, like a shell).
    #[prost(int32, tag = "1")]
    pub exit_code: i32,
    /// The signal that killed the command, or 0.
    #[prost(int32, tag = "2")]
    pub signal: i32,
    /// CPU time of every process of the action.
    #[prost(int64, tag = "3")]
    pub user_cpu_us: i64,
    #[prost(int64, tag = "4")]
    pub system_cpu_us: i64,
    /// Largest resident set of any process of the action.
    #[prost(int64, tag = "5")]
    pub max_rss_kb: i64,
    /// Set when the sandbox could not be set up for this action (the
    /// command did not run): the zygote answers `Failed` with it.
    #[prost(string, tag = "6")]
    pub setup_error: String,
}

/// One frame as received.
#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Encodes a frame's header and body into one buffer.
pub fn encode(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(body);
    out
}

/// Parses a header: (kind, body length).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, usize), String> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let kind = Kind::from_u8(h[4]).ok_or_else(|| format!("unknown frame kind {}", h[4]))?;
    if len > MAX_BODY {
        return Err(format!("frame of {len} bytes is over the {MAX_BODY}-byte limit"));
    }
    Ok((kind, len))
}

/// Blocking write of a whole frame (zygote side).
pub fn write_frame(sock: &mut UnixStream, kind: Kind, body: &[u8]) -> std::io::Result<()> {
    sock.write_all(&encode(kind, body))
}

/// Sends `bytes` on a (blocking or non-blocking) stream socket with `fds`
/// attached to the first byte; returns how many bytes went out (at least
/// one, or an error).
pub fn send_with_fds(
    sock: &impl AsRawFd,
    bytes: &[u8],
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
}

/// Blocking read of one frame, with any descriptors passed along with it
/// (zygote side). `Ok(None)` at end of stream before a frame starts.
pub fn read_frame(sock: &mut UnixStream) -> Result<Option<Frame>, String> {
    let mut header = [0u8; HEADER_LEN];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    // The first read collects the descriptors sent with the first byte.
    let (got, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut header)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for fd in raw {
                                // SAFETY: descriptors received with
                                // SCM_RIGHTS were installed in this
                                // process's table by this very recvmsg
                                // call; nothing else refers to them, so
                                // the OwnedFd is their only owner.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                break (msg.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("reading from the worker: {e}")),
        }
    };
    if got == 0 {
        return Ok(None);
    }
    sock.read_exact(&mut header[got..])
        .map_err(|e| format!("reading a frame header: {e}"))?;
    let (kind, len) = parse_header(&header)?;
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body)
        .map_err(|e| format!("reading a frame body: {e}"))?;
    Ok(Some(Frame { kind, body, fds }))
}

impl RunRequest {
    pub fn env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env_names
            .iter()
            .map(String::as_str)
            .zip(self.env_values.iter().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_descriptors() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let req = RunRequest {
            argv: vec!["/bin/true".into()],
            env_names: vec!["A".into()],
            env_values: vec!["1=2".into()],
            cwd: "/x".into(),
            grace_ms: 7,
        };
        let file = tempfile::tempfile().unwrap();
        let frame = encode(Kind::Run, &req.encode_to_vec());
        let n = send_with_fds(&a, &frame, &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        a.write_all(&frame[n..]).unwrap();
        write_frame(&mut a, Kind::Terminate, &[]).unwrap();
        drop(a);
        let f = read_frame(&mut b).unwrap().unwrap();
        assert_eq!(f.kind, Kind::Run);
        assert_eq!(f.fds.len(), 2);
        let back = RunRequest::decode(f.body.as_slice()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.env().collect::<Vec<_>>(), vec![("A", "1=2")]);
        let t = read_frame(&mut b).unwrap().unwrap();
        assert_eq!(t.kind, Kind::Terminate);
        assert!(t.fds.is_empty());
        assert!(read_frame(&mut b).unwrap().is_none());
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(parse_header(&[0, 0, 0, 0, 99]).is_err());
        let big = ((MAX_BODY + 1) as u32).to_le_bytes();
        assert!(parse_header(&[big[0], big[1], big[2], big[3], 1]).is_err());
        assert_eq!(parse_header(&[3, 0, 0, 0, 4]).unwrap(), (Kind::Finished, 3));
    }
}
