//! Housekeeping that must not run on a request path: deleting abandoned
//! temp files and a previous run's temp directory, and refreshing the mtime
//! of blobs that are read (so that LRU order survives a restart).
//!
//! One background task drains a queue and runs whatever has accumulated in
//! one blocking call. The task ends when the store and all its writers are
//! gone (the queue's senders are dropped).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use super::layout::STALE_TMP_PREFIX;
use crate::task;

/// Jobs run per blocking call at most.
const BATCH: usize = 1024;

#[derive(Debug)]
enum Job {
    /// Delete a temp file (a writer dropped without commit).
    RemoveFile(PathBuf),
    /// Delete every `tmp-stale-*` directory under this root.
    RemoveStaleTmp(PathBuf),
    /// Set a blob file's mtime to now.
    Touch(PathBuf),
    /// Answered once every job queued before it has run.
    Barrier(oneshot::Sender<()>),
}

/// Handle to the housekeeping task.
#[derive(Debug, Clone)]
pub(crate) struct Janitor {
    tx: mpsc::UnboundedSender<Job>,
}

impl Janitor {
    /// Starts the task (needs a tokio runtime).
    pub(crate) fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        task::spawn("disk-janitor", run(rx));
        Janitor { tx }
    }

    fn send(&self, job: Job) {
        if self.tx.send(job).is_err() {
            tracing::warn!("disk janitor has stopped; housekeeping job dropped");
        }
    }

    pub(crate) fn remove_file(&self, path: PathBuf) {
        self.send(Job::RemoveFile(path));
    }

    pub(crate) fn remove_stale_tmp(&self, root: PathBuf) {
        self.send(Job::RemoveStaleTmp(root));
    }

    pub(crate) fn touch(&self, path: PathBuf) {
        self.send(Job::Touch(path));
    }

    /// Waits until every job queued so far has run.
    pub(crate) async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Barrier(tx));
        // An error means the task is gone, so nothing is pending either.
        let _ = rx.await;
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut barriers = Vec::new();
        let mut work = Vec::new();
        for job in batch.drain(..) {
            match job {
                Job::Barrier(tx) => barriers.push(tx),
                other => work.push(other),
            }
        }
        if !work.is_empty()
            && let Err(e) = task::blocking("disk-janitor", move || work.into_iter().for_each(run_job)).await
        {
            tracing::error!(error = %e, "disk housekeeping failed");
        }
        for tx in barriers {
            let _ = tx.send(());
        }
    }
}

fn run_job(job: Job) {
    match job {
        Job::RemoveFile(path) => match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete temp file"),
        },
        Job::RemoveStaleTmp(root) => remove_stale_tmp(&root),
        Job::Touch(path) => {
            let r = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::debug!(path = %path.display(), error = %e, "cannot refresh blob mtime"),
            }
        }
        Job::Barrier(_) => {}
    }
}

fn remove_stale_tmp(root: &Path) {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(root = %root.display(), error = %e, "cannot list store root");
            return;
        }
    };
    for entry in entries.flatten() {
        let is_stale = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(STALE_TMP_PREFIX));
        if !is_stale {
            continue;
        }
        let path = entry.path();
        let started = std::time::Instant::now();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "deleted temp files of a previous run"
            ),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete stale temp directory")
            }
        }
    }
}
