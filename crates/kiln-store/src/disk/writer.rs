//! Streaming writes: chunks go to a temp file under `tmp/`, batched into
//! large blocking writes, with one batch written in the background while
//! the next one is received. `commit` hands the complete file to
//! [`Inner::install`]; a writer dropped without commit has its temp file
//! deleted by the janitor.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use kiln_digest::BlobKey;
use tokio::sync::oneshot;

use super::commit::Source;
use super::{Inner, fsio};
use crate::{BlobWriter, Encoding, StoreError, StoreResult, task};

/// Bytes collected before they are written out in one blocking call.
const WRITE_BATCH: usize = 4 << 20;

type Written = StoreResult<(File, io::Result<()>)>;

pub(super) struct DiskWriter {
    inner: Arc<Inner>,
    key: BlobKey,
    encoding: Encoding,
    tmp: PathBuf,
    /// The temp file, unless a batch write has it.
    file: Option<File>,
    /// The batch being written in the background.
    in_flight: Option<oneshot::Receiver<Written>>,
    pending: Vec<Bytes>,
    pending_len: usize,
    written: u64,
    /// Set once the temp file has been handed over (or given up).
    finished: bool,
}

impl DiskWriter {
    /// Creates the temp file.
    pub(super) async fn create(inner: Arc<Inner>, key: BlobKey, encoding: Encoding) -> StoreResult<Self> {
        let tmp = inner.layout.new_tmp_path();
        let file = task::blocking("disk-begin-write", {
            let tmp = tmp.clone();
            move || fsio::create_tmp(&tmp)
        })
        .await?
        .map_err(|e| StoreError::io(format!("cannot create temp file {}", tmp.display()), e))?;
        Ok(DiskWriter {
            inner,
            key,
            encoding,
            tmp,
            file: Some(file),
            in_flight: None,
            pending: Vec::new(),
            pending_len: 0,
            written: 0,
            finished: false,
        })
    }

    fn io_error(&self, e: io::Error) -> StoreError {
        StoreError::io(format!("cannot write {} to {}", self.key, self.tmp.display()), e)
    }

    /// The temp file, once the batch in flight (if any) is written.
    async fn take_file(&mut self) -> StoreResult<File> {
        if let Some(file) = self.file.take() {
            return Ok(file);
        }
        let Some(rx) = self.in_flight.take() else {
            return Err(StoreError::Internal(format!(
                "writer of {} is unusable after an earlier error",
                self.key
            )));
        };
        match rx.await {
            Ok(Ok((file, Ok(())))) => Ok(file),
            Ok(Ok((_, Err(e)))) => Err(self.io_error(e)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Internal(format!(
                "write task of {} ended without a result",
                self.key
            ))),
        }
    }

    /// Starts writing the pending chunks in the background.
    async fn flush(&mut self) -> StoreResult<()> {
        let mut file = self.take_file().await?;
        let batch = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        let (tx, rx) = oneshot::channel();
        task::spawn("disk-write", async move {
            let r = task::blocking("disk-write", move || {
                let r = fsio::write_chunks(&mut file, &batch);
                (file, r)
            })
            .await;
            let _ = tx.send(r);
        });
        self.in_flight = Some(rx);
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for DiskWriter {
    async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        if self.finished {
            return Err(StoreError::Internal(format!(
                "writer of {} is already finished",
                self.key
            )));
        }
        let cap = self.inner.config.capacity_bytes;
        let total = self.written + chunk.len() as u64;
        if cap != 0 && total > cap {
            return Err(StoreError::TooLarge {
                size: total,
                limit: cap,
            });
        }
        if chunk.is_empty() {
            return Ok(());
        }
        self.written = total;
        self.pending_len += chunk.len();
        self.pending.push(chunk);
        if self.pending_len >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> StoreResult<()> {
        if self.finished {
            return Err(StoreError::Internal(format!(
                "writer of {} is already finished",
                self.key
            )));
        }
        let mut file = self.take_file().await?;
        let batch = std::mem::take(&mut self.pending);
        let sync = self.inner.config.sync_writes;
        let closed = task::blocking("disk-write", move || -> io::Result<()> {
            fsio::write_chunks(&mut file, &batch)?;
            if sync {
                file.sync_data()?;
            }
            Ok(())
        })
        .await?;
        closed.map_err(|e| self.io_error(e))?;
        // From here on `install` owns the temp file.
        self.finished = true;
        let inner = Arc::clone(&self.inner);
        inner
            .install(
                &self.key,
                self.encoding,
                Source::TmpFile(self.tmp.clone()),
                self.written,
            )
            .await
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.janitor.remove_file(std::mem::take(&mut self.tmp));
        }
    }
}
