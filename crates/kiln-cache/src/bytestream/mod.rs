//! The google.bytestream ByteStream service over the CAS of each instance:
//! Read (plain and zstd `compressed-blobs`), resumable Write with streaming
//! digest verification, and QueryWriteStatus.
//!
//! Served over the zero-copy messages of [`kiln_proto::fast`]: uploaded
//! data reaches the store as views of tonic's receive buffer, and read data
//! goes out as views of the stored payload.

mod digest;
mod read;
pub mod resource;
mod uploads;
mod write;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kiln_proto::bytestream::{QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, WriteResponse};
use kiln_proto::fast::bytestream::byte_stream_server::ByteStream;
use kiln_proto::fast::{ReadResponse, WriteRequest};
use tonic::{Request, Response, Status, Streaming};

pub use read::READ_CHUNK_SIZE;
pub use uploads::DEFAULT_IDLE_TIMEOUT;

use crate::{CacheError, Instances};
use uploads::Uploads;

/// ByteStream Read/Write/QueryWriteStatus for CAS blobs.
pub struct ByteStreamService {
    instances: Arc<Instances>,
    uploads: Arc<Uploads>,
}

impl ByteStreamService {
    /// A service whose interrupted uploads stay resumable for
    /// [`DEFAULT_IDLE_TIMEOUT`].
    pub fn new(instances: Arc<Instances>) -> Self {
        Self::with_idle_timeout(instances, DEFAULT_IDLE_TIMEOUT)
    }

    /// A service that forgets paused and finished uploads after
    /// `idle_timeout` without activity.
    pub fn with_idle_timeout(instances: Arc<Instances>, idle_timeout: Duration) -> Self {
        let uploads = Uploads::new(idle_timeout);
        uploads.start_expiry();
        ByteStreamService { instances, uploads }
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let body = read::open(&self.instances, request.get_ref()).await?;
        Ok(Response::new(Box::pin(body)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        write::write(&self.instances, &self.uploads, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let name = &request.get_ref().resource_name;
        let res = resource::parse_write(name)?;
        let instance = self.instances.get(res.instance)?;
        instance.check_function(res.key.function())?;
        if let Some(s) = self.uploads.status(name) {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: s.committed_size,
                complete: s.complete,
            }));
        }
        // Unknown upload: complete if the blob is there anyway (uploaded
        // under another name, or this one expired from the table).
        let key = &res.key;
        let present = key.is_empty_blob()
            || instance
                .cas
                .has_many(std::slice::from_ref(key))
                .await
                .map_err(CacheError::store(format!("checking whether {key} exists")))?
                .first()
                .copied()
                .unwrap_or(false);
        if present {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: key.size() as i64,
                complete: true,
            }));
        }
        Err(CacheError::NotFound(format!("no upload of {name:?} is in progress")).into())
    }
}
