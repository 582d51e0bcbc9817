//! The google.bytestream ByteStream service over the CAS of each instance.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kiln_proto::bytestream::byte_stream_server::ByteStream;
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::Instances;

/// ByteStream Read/Write/QueryWriteStatus for CAS blobs.
pub struct ByteStreamService {
    instances: Arc<Instances>,
}

impl ByteStreamService {
    pub fn new(instances: Arc<Instances>) -> Self {
        ByteStreamService { instances }
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, _request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let _ = &self.instances;
        Err(Status::unimplemented("ByteStream.Read is being written"))
    }

    async fn write(
        &self,
        _request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        Err(Status::unimplemented("ByteStream.Write is being written"))
    }

    async fn query_write_status(
        &self,
        _request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("ByteStream.QueryWriteStatus is being written"))
    }
}
