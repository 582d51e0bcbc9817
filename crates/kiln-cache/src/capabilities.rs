//! Capabilities service (being written).

use std::sync::Arc;

use kiln_proto::reapi::capabilities_server::Capabilities;
use kiln_proto::reapi::{GetCapabilitiesRequest, ServerCapabilities};
use tonic::{Request, Response, Status};

use crate::Instances;

pub struct CapabilitiesService {
    instances: Arc<Instances>,
}

impl CapabilitiesService {
    pub fn new(instances: Arc<Instances>) -> Self {
        CapabilitiesService { instances }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(&self, _request: Request<GetCapabilitiesRequest>) -> Result<Response<ServerCapabilities>, Status> {
        let _ = &self.instances;
        Err(Status::unimplemented("being written"))
    }
}
