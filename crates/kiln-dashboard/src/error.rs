//! The dashboard's one error type, answered as JSON `{"error": "..."}`
//! with the matching HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DashboardError {
    /// Malformed input (digest, instance, query): 400.
    #[error("{0}")]
    BadRequest(String),
    /// A blob, action or operation that does not exist: 404.
    #[error("{0}")]
    NotFound(String),
    /// Something that exists but is not what was asked for (a blob that is
    /// not a Directory, too large to decode): 422.
    #[error("{0}")]
    Unprocessable(String),
    /// A store failed: 500 (logged).
    #[error("{context}: {source}")]
    Store {
        context: String,
        #[source]
        source: kiln_store::StoreError,
    },
}

impl DashboardError {
    pub(crate) fn store(context: impl Into<String>) -> impl FnOnce(kiln_store::StoreError) -> Self {
        let context = context.into();
        move |source| DashboardError::Store { context, source }
    }

    fn status(&self) -> StatusCode {
        match self {
            DashboardError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DashboardError::NotFound(_) => StatusCode::NOT_FOUND,
            DashboardError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            DashboardError::Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "dashboard request failed");
        }
        (status, Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}

pub type DashboardResult<T> = Result<T, DashboardError>;
