//! The scheduler's error type and its one mapping to `tonic::Status` and
//! `google.rpc.Status`.

use bytes::Bytes;
use kiln_cache::CacheError;
use kiln_digest::{BlobKey, DigestError};
use kiln_proto::rpc_details::{
    PRECONDITION_FAILURE_TYPE_URL, PreconditionFailure, precondition_failure, to_any,
};
use kiln_store::StoreError;
use prost::Message;
use thiserror::Error;
use tonic::{Code, Status};

pub type SchedulerResult<T> = Result<T, SchedulerError>;

#[derive(Debug, Error)]
pub enum SchedulerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid digest: {0}")]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    NotFound(String),
    /// Blobs the action needs are not in the CAS. Each subject is
    /// `blobs/{hash}/{size}` (with the function name first for BLAKE3/GITSHA1).
    #[error("{context}: {} blob(s) missing from the CAS: {}", subjects.len(), subjects.join(", "))]
    MissingBlobs { context: String, subjects: Vec<String> },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{context}: {source}")]
    Store {
        context: String,
        #[source]
        source: StoreError,
    },
    #[error("{0}")]
    Internal(String),
}

impl SchedulerError {
    /// Wraps a store fault with what the scheduler was doing.
    pub fn store(context: impl Into<String>) -> impl FnOnce(StoreError) -> SchedulerError {
        let context = context.into();
        move |source| SchedulerError::Store { context, source }
    }

    /// A MISSING violation list for `keys`.
    pub fn missing(context: impl Into<String>, keys: &[BlobKey]) -> SchedulerError {
        SchedulerError::MissingBlobs {
            context: context.into(),
            subjects: keys.iter().map(missing_subject).collect(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            SchedulerError::InvalidArgument(_) | SchedulerError::Digest(_) => Code::InvalidArgument,
            SchedulerError::Cache(e) => e.code(),
            SchedulerError::NotFound(_) => Code::NotFound,
            SchedulerError::MissingBlobs { .. } | SchedulerError::FailedPrecondition(_) => {
                Code::FailedPrecondition
            }
            SchedulerError::Unavailable(_) => Code::Unavailable,
            SchedulerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            SchedulerError::Cancelled(_) => Code::Cancelled,
            SchedulerError::Store { source, .. } => match source {
                StoreError::TooLarge { .. } => Code::InvalidArgument,
                StoreError::Full(_) => Code::ResourceExhausted,
                StoreError::Unavailable(_) => Code::Unavailable,
                StoreError::Io { .. } | StoreError::Corrupt { .. } | StoreError::Internal(_) => {
                    Code::Internal
                }
            },
            SchedulerError::Internal(_) => Code::Internal,
        }
    }

    /// The `google.rpc.Status` form, with a `PreconditionFailure` detail
    /// for missing blobs. Used in `ExecuteResponse.status` and as the
    /// `grpc-status-details-bin` of gRPC errors.
    pub fn to_rpc_status(&self) -> kiln_proto::rpc::Status {
        let details = match self {
            SchedulerError::MissingBlobs { subjects, .. } => {
                let failure = PreconditionFailure {
                    violations: subjects
                        .iter()
                        .map(|s| precondition_failure::Violation {
                            r#type: "MISSING".into(),
                            subject: s.clone(),
                            description: String::new(),
                        })
                        .collect(),
                };
                vec![to_any(PRECONDITION_FAILURE_TYPE_URL, &failure)]
            }
            _ => Vec::new(),
        };
        kiln_proto::rpc::Status {
            code: self.code() as i32,
            message: self.to_string(),
            details,
        }
    }
}

/// `blobs/{hash}/{size}`, or `blobs/{function}/{hash}/{size}` for functions
/// that cannot be inferred from the hash length (BLAKE3, GITSHA1).
pub fn missing_subject(key: &BlobKey) -> String {
    let f = key.function();
    if f.named_in_resource() {
        format!("blobs/{}/{}/{}", f.name(), key.hash_hex(), key.size())
    } else {
        format!("blobs/{}/{}", key.hash_hex(), key.size())
    }
}

impl From<SchedulerError> for Status {
    fn from(e: SchedulerError) -> Status {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        let rpc = e.to_rpc_status();
        if rpc.details.is_empty() {
            Status::new(code, rpc.message)
        } else {
            let bytes = Bytes::from(rpc.encode_to_vec());
            Status::with_details(code, rpc.message, bytes)
        }
    }
}
