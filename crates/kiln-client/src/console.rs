//! Where a command's output goes: the process's stdout/stderr, or memory
//! (for tests and embedding).

use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::{ClientError, ClientResult};

type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// A command's stdout and stderr, and whether progress bars may be drawn
/// (on the process's real stderr).
pub struct Console {
    out: Sink,
    err: Sink,
    progress: bool,
}

impl Console {
    /// The process's stdout and stderr; progress bars when stderr is a
    /// terminal.
    pub fn stdio() -> Console {
        Console {
            out: Box::new(tokio::io::stdout()),
            err: Box::new(tokio::io::stderr()),
            progress: std::io::stderr().is_terminal(),
        }
    }

    /// A console writing into memory, and the handle to read what was
    /// written. Never draws progress bars.
    pub fn capture() -> (Console, Captured) {
        let captured = Captured::default();
        let console = Console {
            out: Box::new(SharedBuf(captured.out.clone())),
            err: Box::new(SharedBuf(captured.err.clone())),
            progress: false,
        };
        (console, captured)
    }

    /// Whether progress bars may be drawn.
    pub fn progress_enabled(&self) -> bool {
        self.progress
    }

    /// Writes raw bytes to stdout.
    pub async fn out_bytes(&mut self, data: &[u8]) -> ClientResult<()> {
        self.out
            .write_all(data)
            .await
            .map_err(ClientError::io("writing to stdout"))
    }

    /// Writes raw bytes to stderr.
    pub async fn err_bytes(&mut self, data: &[u8]) -> ClientResult<()> {
        self.err
            .write_all(data)
            .await
            .map_err(ClientError::io("writing to stderr"))
    }

    /// Writes `text` and a newline to stdout.
    pub async fn line(&mut self, text: &str) -> ClientResult<()> {
        let mut s = String::with_capacity(text.len() + 1);
        s.push_str(text);
        s.push('\n');
        self.out_bytes(s.as_bytes()).await
    }

    /// Writes `text` and a newline to stderr.
    pub async fn eline(&mut self, text: &str) -> ClientResult<()> {
        let mut s = String::with_capacity(text.len() + 1);
        s.push_str(text);
        s.push('\n');
        self.err_bytes(s.as_bytes()).await
    }

    /// Flushes both streams (errors are ignored: there is nowhere left to
    /// report them).
    pub async fn flush(&mut self) {
        let _ = self.out.flush().await;
        let _ = self.err.flush().await;
    }
}

/// What a [`Console::capture`] console received.
#[derive(Clone, Default)]
pub struct Captured {
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

impl Captured {
    /// Everything written to stdout so far.
    pub fn stdout(&self) -> Vec<u8> {
        self.out.lock().clone()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> Vec<u8> {
        self.err.lock().clone()
    }

    /// stdout as (lossy) text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout()).into_owned()
    }

    /// stderr as (lossy) text.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr()).into_owned()
    }
}

struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl AsyncWrite for SharedBuf {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.0.lock().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
