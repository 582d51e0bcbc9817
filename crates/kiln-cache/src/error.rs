//! The cache services' error type and its one mapping to `tonic::Status`.

use kiln_digest::DigestError;
use kiln_store::StoreError;
use thiserror::Error;
use tonic::{Code, Status};

pub type CacheResult<T> = Result<T, CacheError>;

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid digest: {0}")]
    Digest(#[from] DigestError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{context}: {source}")]
    Store {
        context: String,
        #[source]
        source: StoreError,
    },
}

impl CacheError {
    /// Wraps a store fault with what the service was doing.
    pub fn store(context: impl Into<String>) -> impl FnOnce(StoreError) -> CacheError {
        let context = context.into();
        move |source| CacheError::Store { context, source }
    }

    pub fn code(&self) -> Code {
        match self {
            CacheError::InvalidArgument(_) | CacheError::Digest(_) => Code::InvalidArgument,
            CacheError::NotFound(_) => Code::NotFound,
            CacheError::PermissionDenied(_) => Code::PermissionDenied,
            CacheError::OutOfRange(_) => Code::OutOfRange,
            CacheError::FailedPrecondition(_) => Code::FailedPrecondition,
            CacheError::Aborted(_) => Code::Aborted,
            CacheError::Store { source, .. } => match source {
                StoreError::TooLarge { .. } => Code::InvalidArgument,
                StoreError::Full(_) => Code::ResourceExhausted,
                StoreError::Unavailable(_) => Code::Unavailable,
                StoreError::Io { .. } | StoreError::Corrupt { .. } | StoreError::Internal(_) => {
                    Code::Internal
                }
            },
        }
    }

    /// The `google.rpc.Status` form, for per-item statuses in batch responses.
    pub fn to_rpc_status(&self) -> kiln_proto::rpc::Status {
        kiln_proto::rpc::Status {
            code: self.code() as i32,
            message: self.to_string(),
            details: Vec::new(),
        }
    }
}

impl From<CacheError> for Status {
    fn from(e: CacheError) -> Status {
        if e.code() == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(e.code(), e.to_string())
    }
}

/// A `google.rpc.Status` with code OK.
pub fn ok_status() -> kiln_proto::rpc::Status {
    kiln_proto::rpc::Status::default()
}
