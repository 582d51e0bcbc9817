//! The client's error type and its mapping to exit codes (see the crate
//! documentation for the table scripts rely on).

use tonic::Code;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: a defined negative answer (not found, some blobs missing).
pub const EXIT_NOT_FOUND: u8 = 1;
/// Exit code: bad usage or input, or a local file problem.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the server is unreachable, an RPC failed, or the server
/// returned invalid data.
pub const EXIT_SERVER: u8 = 3;
/// Exit code (`exec`): the server could not run the action to completion
/// (no execution support, timeout, no worker, invalid action, ...).
pub const EXIT_EXECUTION: u8 = 4;

/// Everything a client command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad arguments or input (an unparsable digest, an unusable path).
    #[error("{0}")]
    Usage(String),
    /// A local file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The thing asked for does not exist on the server.
    #[error("{0}")]
    NotFound(String),
    /// No connection could be made.
    #[error("cannot reach the server at {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    /// An RPC failed.
    #[error("{context}: {}: {}", code_name(.status.code()), .status.message())]
    Rpc { context: String, status: tonic::Status },
    /// The server answered with data that does not match what was asked
    /// (a digest mismatch, an undecodable message).
    #[error("{0}")]
    BadResponse(String),
    /// Remote execution did not produce a result of the command.
    #[error("{0}")]
    Execution(String),
    /// A bug or an unexpected condition in the client itself.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ClientResult<T> = Result<T, ClientError>;

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotFound(_) => EXIT_NOT_FOUND,
            ClientError::Usage(_) | ClientError::Io { .. } | ClientError::Internal(_) => EXIT_USAGE,
            ClientError::Unreachable { .. } | ClientError::Rpc { .. } | ClientError::BadResponse(_) => {
                EXIT_SERVER
            }
            ClientError::Execution(_) => EXIT_EXECUTION,
        }
    }

    /// A closure mapping an I/O error to [`ClientError::Io`] with `context`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClientError {
        let context = context.into();
        move |source| ClientError::Io { context, source }
    }

    /// A closure mapping a status to [`ClientError::Rpc`] with `context`.
    pub fn rpc(context: impl Into<String>) -> impl FnOnce(tonic::Status) -> ClientError {
        let context = context.into();
        move |status| ClientError::Rpc { context, status }
    }

    /// Like [`Self::rpc`], but NOT_FOUND becomes [`ClientError::NotFound`]
    /// with `not_found` as its message.
    pub fn rpc_or_not_found(
        context: impl Into<String>,
        not_found: impl Into<String>,
    ) -> impl FnOnce(tonic::Status) -> ClientError {
        let context = context.into();
        let not_found = not_found.into();
        move |status| {
            if status.code() == Code::NotFound {
                ClientError::NotFound(not_found)
            } else {
                ClientError::Rpc { context, status }
            }
        }
    }
}

pub use kiln_proto::rpc_details::code_name;

/// The messages of an error and its sources joined with ": ", without
/// repeating a message its source already contains.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if !msg.is_empty() && !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = e.source();
    }
    parts.join(": ")
}
