//! One error type for the benchmark driver: a message with context.

use std::fmt;

#[derive(Debug, Clone)]
pub struct BenchError {
    msg: String,
}

pub type Result<T> = std::result::Result<T, BenchError>;

impl BenchError {
    pub fn new(msg: impl Into<String>) -> Self {
        BenchError { msg: msg.into() }
    }

    /// Prefixes the message with what was being done.
    pub fn context(self, what: impl fmt::Display) -> Self {
        BenchError {
            msg: format!("{what}: {}", self.msg),
        }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for BenchError {}

impl From<tonic::Status> for BenchError {
    fn from(s: tonic::Status) -> Self {
        BenchError::new(format!("rpc failed: {:?}: {}", s.code(), s.message()))
    }
}

impl From<tonic::transport::Error> for BenchError {
    fn from(e: tonic::transport::Error) -> Self {
        // The transport error's Display is terse; include its source chain.
        let mut msg = format!("transport: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        BenchError::new(msg)
    }
}

impl From<std::io::Error> for BenchError {
    fn from(e: std::io::Error) -> Self {
        BenchError::new(format!("io: {e}"))
    }
}

/// `.ctx("doing X")` on any result whose error converts to [`BenchError`].
pub trait Context<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<BenchError>> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }
}
