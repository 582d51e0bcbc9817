//! The Capabilities service: what each instance's cache honestly supports.
//!
//! * `digest_functions`: the instance's enabled functions.
//! * `action_cache_update_capabilities.update_enabled`: `!ac_read_only`.
//! * Batch and blob size limits from [`crate::CacheLimits`] (0 = unlimited).
//! * Compressors: ZSTD for ByteStream `compressed-blobs` and batch uploads.
//! * Absolute symlink targets: ALLOWED (the cache stores results as given).
//! * No cache priorities (ResultsCachePolicy is ignored), no execution, no
//!   blob splitting or splicing.
//! * API versions: deprecated 2.0, low 2.0, high 2.3 — the cache serves the
//!   v2.0 fields and everything the cache side of v2.1–v2.3 added (output
//!   paths/symlinks pass through, compressed blobs, digest_function in
//!   requests and resource names, BLAKE3). Later minors mostly add optional
//!   capability-gated features (blob split/splice) that are not advertised.

use std::sync::Arc;

use kiln_proto::reapi::capabilities_server::Capabilities;
use kiln_proto::reapi::compressor::Value as Compressor;
use kiln_proto::reapi::symlink_absolute_path_strategy::Value as SymlinkStrategy;
use kiln_proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, GetCapabilitiesRequest, ServerCapabilities,
};
use kiln_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::{CacheResult, Instances};

/// Lowest and highest REAPI versions served.
pub const LOW_API_VERSION: (i32, i32) = (2, 0);
pub const HIGH_API_VERSION: (i32, i32) = (2, 3);

pub struct CapabilitiesService {
    instances: Arc<Instances>,
}

impl CapabilitiesService {
    pub fn new(instances: Arc<Instances>) -> Self {
        CapabilitiesService { instances }
    }

    fn capabilities(&self, instance_name: &str) -> CacheResult<ServerCapabilities> {
        let instance = self.instances.get(instance_name)?;
        let limits = self.instances.limits();
        let cache = CacheCapabilities {
            digest_functions: instance
                .digest_functions
                .iter()
                .map(|f| f.to_proto() as i32)
                .collect(),
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled: !instance.ac_read_only,
            }),
            cache_priority_capabilities: None,
            max_batch_total_size_bytes: clamp_i64(limits.max_batch_total_size_bytes),
            symlink_absolute_path_strategy: SymlinkStrategy::Allowed as i32,
            supported_compressors: vec![Compressor::Zstd as i32],
            supported_batch_update_compressors: vec![Compressor::Zstd as i32],
            max_cas_blob_size_bytes: clamp_i64(limits.max_cas_blob_size_bytes),
            split_blob_support: false,
            splice_blob_support: false,
            fast_cdc_2020_params: None,
            rep_max_cdc_params: None,
        };
        Ok(ServerCapabilities {
            cache_capabilities: Some(cache),
            execution_capabilities: self.instances.execution_capabilities(instance_name),
            deprecated_api_version: Some(semver(LOW_API_VERSION)),
            low_api_version: Some(semver(LOW_API_VERSION)),
            high_api_version: Some(semver(HIGH_API_VERSION)),
        })
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn semver((major, minor): (i32, i32)) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        Ok(Response::new(
            self.capabilities(&request.get_ref().instance_name)?,
        ))
    }
}
