//! Spawning background tasks with a name, so that a failure is logged with
//! what failed. Use this instead of a bare `tokio::spawn`.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tracing::Instrument;

/// Spawns `fut` as a task called `name`. The future reports its own errors;
/// a panic is caught and logged with the task's name.
pub fn spawn<F>(name: &'static str, fut: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let span = tracing::info_span!("task", name);
    tokio::spawn(
        async move {
            if let Err(panic) = AssertUnwindSafe(fut).catch_unwind().await {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(task = name, panic = %msg, "background task panicked");
            }
        }
        .instrument(span),
    )
}

/// Runs blocking work (file I/O) on tokio's blocking pool under a name;
/// a panic comes back as an error instead of unwinding into the caller.
pub async fn blocking<T, F>(name: &'static str, f: F) -> Result<T, crate::StoreError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::StoreError::Internal(format!("blocking task {name} failed: {e}")))
}
