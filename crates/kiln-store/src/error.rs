use std::io;

use thiserror::Error;

pub type StoreResult<T> = Result<T, StoreError>;

/// A storage fault. Absence is not an error (`Ok(None)` / `false`).
/// At the gRPC boundary: `TooLarge` → INVALID_ARGUMENT, `Full` →
/// RESOURCE_EXHAUSTED, `Unavailable` → UNAVAILABLE, the rest → INTERNAL.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("stored payload of {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("blob of {size} bytes exceeds the store's limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("store is full: {0}")]
    Full(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl StoreError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}
