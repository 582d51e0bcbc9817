//! The worker's error type and its one mapping to a `google.rpc.Status`
//! (the `status` of the `ExecuteResponse` a lease finishes with).

use kiln_digest::{BlobKey, DigestError};
use kiln_proto::rpc::Status as RpcStatus;
use kiln_proto::rpc_details::{
    PRECONDITION_FAILURE_TYPE_URL, PreconditionFailure, precondition_failure::Violation, to_any,
};
use thiserror::Error;
use tonic::Code;

pub type WorkerResult<T> = Result<T, WorkerError>;

#[derive(Debug, Error)]
pub enum WorkerError {
    /// A malformed action: bad path, bad Directory entry, bad digest.
    #[error("{0}")]
    InvalidArgument(String),
    /// Blobs the action needs are not in the CAS (the client re-uploads).
    #[error("{} blob(s) missing from the CAS, e.g. {}", .0.len(), .0.first().map(|k| k.to_string()).unwrap_or_default())]
    MissingBlobs(Vec<BlobKey>),
    /// The action ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The lease was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// An output does not match what the command asked for (e.g. an
    /// `output_files` entry that is a directory).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The CAS could not be reached or failed.
    #[error("{context}: {status}")]
    Cas { context: String, status: tonic::Status },
    /// The sandbox could not be set up or is unavailable.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// Local file system failure.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    ResourceExhausted(String),
    /// Nothing can run the action here right now (every sandbox slot is
    /// out of service); the client may retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl WorkerError {
    /// Wraps an I/O error with what the worker was doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let context = context.into();
        move |source| WorkerError::Io { context, source }
    }

    /// Wraps a CAS gRPC failure with what the worker was doing.
    pub fn cas(context: impl Into<String>) -> impl FnOnce(tonic::Status) -> WorkerError {
        let context = context.into();
        move |status| WorkerError::Cas { context, status }
    }

    pub fn invalid(msg: impl Into<String>) -> WorkerError {
        WorkerError::InvalidArgument(msg.into())
    }

    pub fn code(&self) -> Code {
        match self {
            WorkerError::InvalidArgument(_) => Code::InvalidArgument,
            WorkerError::MissingBlobs(_) | WorkerError::FailedPrecondition(_) => Code::FailedPrecondition,
            WorkerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            WorkerError::Cancelled(_) => Code::Cancelled,
            WorkerError::Cas { status, .. } => match status.code() {
                // A blob vanishing between the scheduler's check and our
                // read is reported as MissingBlobs, never as a bare NOT_FOUND.
                Code::InvalidArgument | Code::NotFound => Code::Internal,
                Code::Ok => Code::Internal,
                other => other,
            },
            WorkerError::ResourceExhausted(_) => Code::ResourceExhausted,
            WorkerError::Unavailable(_) => Code::Unavailable,
            WorkerError::Sandbox(_) | WorkerError::Io { .. } | WorkerError::Internal(_) => Code::Internal,
        }
    }

    /// The `google.rpc.Status` form. Missing blobs carry a
    /// `PreconditionFailure` with one `MISSING` violation per blob
    /// (`blobs/{hash}/{size}`), as the spec asks so that clients re-upload.
    pub fn to_rpc_status(&self) -> RpcStatus {
        let mut details = Vec::new();
        if let WorkerError::MissingBlobs(keys) = self {
            let failure = PreconditionFailure {
                violations: keys
                    .iter()
                    .map(|k| Violation {
                        r#type: "MISSING".into(),
                        subject: format!("blobs/{}/{}", k.hash_hex(), k.size()),
                        description: String::new(),
                    })
                    .collect(),
            };
            details.push(to_any(PRECONDITION_FAILURE_TYPE_URL, &failure));
        }
        RpcStatus {
            code: self.code() as i32,
            message: self.to_string(),
            details,
        }
    }
}

impl From<DigestError> for WorkerError {
    fn from(e: DigestError) -> Self {
        WorkerError::InvalidArgument(format!("invalid digest: {e}"))
    }
}

impl From<kiln_store::StoreError> for WorkerError {
    fn from(e: kiln_store::StoreError) -> Self {
        WorkerError::Internal(e.to_string())
    }
}
