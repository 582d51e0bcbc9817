use thiserror::Error;

/// Why a digest or digest function was rejected. Every variant maps to
/// `INVALID_ARGUMENT` at the gRPC boundary.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    #[error("digest is missing")]
    Missing,
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    #[error("digest hash {hash:?} is not {expected} lowercase hex characters for {function}")]
    BadHash {
        hash: String,
        function: &'static str,
        expected: usize,
    },
    #[error("cannot infer a digest function from a {0}-character hash; set digest_function")]
    CannotInfer(usize),
    #[error("digest function {0} is not supported by this server")]
    Unsupported(String),
    #[error("content hashes to {actual} but the digest says {expected}")]
    Mismatch { expected: String, actual: String },
    #[error("content is {actual} bytes but the digest says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
}
