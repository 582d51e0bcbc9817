//! ActionCache service (being written).

use std::sync::Arc;

use kiln_proto::reapi::action_cache_server::ActionCache;
use kiln_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use tonic::{Request, Response, Status};

use crate::Instances;

pub struct ActionCacheService {
    instances: Arc<Instances>,
}

impl ActionCacheService {
    pub fn new(instances: Arc<Instances>) -> Self {
        ActionCacheService { instances }
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(&self, _request: Request<GetActionResultRequest>) -> Result<Response<ActionResult>, Status> {
        let _ = &self.instances;
        Err(Status::unimplemented("being written"))
    }
    async fn update_action_result(
        &self,
        _request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        Err(Status::unimplemented("being written"))
    }
}
