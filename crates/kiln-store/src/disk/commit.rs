//! Making a payload visible: wait for the startup scan, reserve space
//! (evicting least-recently-used blobs), take ownership of the key, rename
//! the temp file into place, and record the result in the index.
//!
//! The whole sequence runs in its own task, so a caller that goes away
//! mid-commit (a cancelled request) cannot leave a key owned or space
//! reserved forever. Index decisions are made under the mutex; unlink and
//! rename happen outside it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kiln_digest::BlobKey;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::index::{Claim, Reserve, Victim};
use super::{Inner, Phase, fsio, now_secs};
use crate::{Encoding, StoreError, StoreResult, task};

/// How long a write waits for the startup scan.
const SCAN_WAIT: Duration = Duration::from_secs(120);
/// How long a commit waits for space held by other in-flight operations.
const SPACE_WAIT: Duration = Duration::from_secs(60);
/// How long a commit waits for another operation on the same key.
const KEY_WAIT: Duration = Duration::from_secs(60);

/// Where the payload of a commit comes from.
pub(super) enum Source {
    /// A complete temp file (from a streaming writer).
    TmpFile(PathBuf),
    /// Bytes to write to a fresh temp file first (a whole-blob put).
    Bytes(Bytes),
}

impl Inner {
    /// Waits (bounded) until the startup scan is done: before that the
    /// store's total is unknown, so nothing can be reserved.
    pub(super) async fn wait_writable(&self) -> StoreResult<()> {
        if *self.phase.borrow() == Phase::Ready {
            return Ok(());
        }
        let mut rx = self.phase.subscribe();
        let phase = match tokio::time::timeout(SCAN_WAIT, rx.wait_for(|p| *p != Phase::Scanning)).await {
            Ok(Ok(phase)) => phase.clone(),
            Ok(Err(_)) => return Err(StoreError::Unavailable("disk store is shutting down".into())),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "disk store at {} is still indexing after {} s",
                    self.layout.root().display(),
                    SCAN_WAIT.as_secs()
                )));
            }
        };
        match phase {
            Phase::Ready => Ok(()),
            Phase::Failed(e) => Err(StoreError::Unavailable(format!("disk store scan failed: {e}"))),
            Phase::Scanning => Err(StoreError::Internal("scan phase went back to scanning".into())),
        }
    }

    /// Commits `len` bytes from `source` as the payload of `key`. Runs in
    /// a task of its own; the temp file is gone afterwards either way.
    pub(super) async fn install(
        self: &Arc<Self>,
        key: &BlobKey,
        encoding: Encoding,
        source: Source,
        len: u64,
    ) -> StoreResult<()> {
        let cap = self.config.capacity_bytes;
        let early = if cap != 0 && len > cap {
            Err(StoreError::TooLarge {
                size: len,
                limit: cap,
            })
        } else {
            self.wait_writable().await
        };
        if let Err(e) = early {
            if let Source::TmpFile(tmp) = source {
                self.janitor.remove_file(tmp);
            }
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        let this = Arc::clone(self);
        let key = key.clone();
        task::spawn("disk-commit", async move {
            let result = this.install_owned(key, encoding, source, len).await;
            let _ = tx.send(result);
        });
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Internal(
                "disk commit task ended without a result".into(),
            ))
        })
    }

    async fn install_owned(
        &self,
        key: BlobKey,
        encoding: Encoding,
        source: Source,
        len: u64,
    ) -> StoreResult<()> {
        let tmp = match &source {
            Source::TmpFile(p) => p.clone(),
            Source::Bytes(_) => self.layout.new_tmp_path(),
        };
        if let Err(e) = self.reserve(len).await {
            self.discard(source);
            return Err(e);
        }
        let (slot, old) = match self.claim(&key).await {
            Ok(owned) => owned,
            Err(e) => {
                self.index.lock().release(len);
                self.changed.notify_waiters();
                self.discard(source);
                return Err(e);
            }
        };
        let dst = self.layout.blob_path(&key, encoding);
        let old_path = match old {
            Some((old_enc, _)) if old_enc != encoding => Some(self.layout.blob_path(&key, old_enc)),
            _ => None,
        };
        let sync = self.config.sync_writes;
        let data = match source {
            Source::Bytes(data) => Some(data),
            Source::TmpFile(_) => None,
        };
        // (old payload still on disk, outcome)
        let outcome = task::blocking("disk-install", move || -> (bool, io::Result<()>) {
            if let Some(data) = data
                && let Err(e) = fsio::write_tmp(&tmp, &data, sync)
            {
                return (true, Err(e));
            }
            // A key has one file: drop the other encoding's first.
            if let Some(old_path) = &old_path
                && let Err(e) = fsio::remove_if_exists(old_path)
            {
                let _ = fsio::remove_if_exists(&tmp);
                return (true, Err(e));
            }
            let r = fsio::install(&tmp, &dst, sync);
            if r.is_err() {
                let _ = fsio::remove_if_exists(&tmp);
            }
            (old_path.is_none(), r)
        })
        .await;
        let result = match outcome {
            Ok((_, Ok(()))) => {
                self.index
                    .lock()
                    .finish_commit(slot, old, encoding, len, now_secs());
                Ok(())
            }
            Ok((old_on_disk, Err(e))) => {
                self.index.lock().abort_commit(slot, old, old_on_disk, len);
                Err(StoreError::io(
                    format!("cannot store {key} in {}", self.layout.root().display()),
                    e,
                ))
            }
            Err(e) => {
                // The blocking task died; assume nothing changed on disk. A
                // missing file is noticed and forgotten on its next read.
                self.index.lock().abort_commit(slot, old, true, len);
                Err(e)
            }
        };
        self.changed.notify_waiters();
        result
    }

    fn discard(&self, source: Source) {
        if let Source::TmpFile(tmp) = source {
            self.janitor.remove_file(tmp);
        }
    }

    /// Counts `len` more bytes, evicting least-recently-used blobs first.
    /// `reserve(0)` trims the store down to its capacity.
    pub(super) async fn reserve(&self, len: u64) -> StoreResult<()> {
        let cap = self.config.capacity_bytes;
        let deadline = Instant::now() + SPACE_WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcome = self.index.lock().try_reserve(len, cap);
            match outcome {
                Reserve::Done => return Ok(()),
                Reserve::Evict(victims) => self.evict(victims).await?,
                Reserve::Wait => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(StoreError::Full(format!(
                            "{len} bytes could not be reserved in {} within {} s: the space is held by writes in flight",
                            self.layout.root().display(),
                            SPACE_WAIT.as_secs()
                        )));
                    }
                }
            }
        }
    }

    /// Unlinks the victims' files and settles the index.
    async fn evict(&self, victims: Vec<Victim>) -> StoreResult<()> {
        let paths: Vec<PathBuf> = victims
            .iter()
            .map(|v| self.layout.blob_path(&v.key, v.encoding))
            .collect();
        let results = task::blocking("disk-evict", move || {
            paths
                .iter()
                .map(|p| fsio::remove_if_exists(p).map(|_| ()))
                .collect::<Vec<io::Result<()>>>()
        })
        .await;
        let mut first_error = None;
        {
            let mut index = self.index.lock();
            for (i, victim) in victims.iter().enumerate() {
                let unlinked = match &results {
                    Ok(r) => match &r[i] {
                        Ok(()) => true,
                        Err(e) => {
                            if first_error.is_none() {
                                first_error = Some(StoreError::io(
                                    format!("cannot evict {}", victim.key),
                                    clone_io(e),
                                ));
                            }
                            false
                        }
                    },
                    Err(_) => false,
                };
                index.finish_delete(victim, unlinked);
            }
        }
        self.changed.notify_waiters();
        tracing::debug!(count = victims.len(), "evicted blobs from disk");
        results?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes ownership of `key`, waiting (bounded) while another operation
    /// holds it. Returns the slot and the payload currently on disk.
    async fn claim(&self, key: &BlobKey) -> StoreResult<(u32, Option<(Encoding, u64)>)> {
        let deadline = Instant::now() + KEY_WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcome = self.index.lock().claim(key);
            match outcome {
                Claim::Owned { slot, old } => return Ok((slot, old)),
                Claim::Busy => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(StoreError::Unavailable(format!(
                            "{key} is being changed by another operation for over {} s",
                            KEY_WAIT.as_secs()
                        )));
                    }
                }
            }
        }
    }
}

fn clone_io(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}
