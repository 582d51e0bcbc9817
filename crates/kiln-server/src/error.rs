use thiserror::Error;

use crate::config::ConfigError;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening store {name:?}: {source}")]
    Store {
        name: String,
        #[source]
        source: kiln_store::StoreError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("{context}: {detail}")]
    Telemetry { context: String, detail: String },
}
