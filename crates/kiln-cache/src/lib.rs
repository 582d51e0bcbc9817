//! The REAPI cache services: ContentAddressableStorage, ByteStream,
//! ActionCache and Capabilities, over the stores of each instance.

pub mod action_cache;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod counters;
mod error;
pub mod get_tree;
mod instances;
pub mod wire;

pub use counters::{CacheCounters, CacheCountersSnapshot};
pub use error::{CacheError, CacheResult};
pub use instances::{CacheLimits, ExecutionCapabilitiesFn, Instance, Instances};

use std::sync::Arc;

use kiln_proto::fast::bytestream::byte_stream_server::ByteStreamServer;
use kiln_proto::fast::cas::content_addressable_storage_server::ContentAddressableStorageServer;
use kiln_proto::reapi::action_cache_server::ActionCacheServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;

/// Largest gRPC message Kiln accepts or sends: the batch limit plus room for
/// framing, and at least 16 MiB.
pub fn max_message_size(limits: &CacheLimits) -> usize {
    (limits.max_batch_total_size_bytes as usize + (1 << 20)).max(16 << 20)
}

/// Adds the four cache services for `instances` to a tonic route set. The
/// CAS and ByteStream servers are the zero-copy ones of
/// [`kiln_proto::fast`] (same services and wire format as upstream).
pub fn add_routes(builder: &mut tonic::service::RoutesBuilder, instances: Arc<Instances>) {
    let max = max_message_size(instances.limits());
    builder
        .add_service(
            ContentAddressableStorageServer::new(cas::CasService::new(instances.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ByteStreamServer::new(bytestream::ByteStreamService::new(instances.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ActionCacheServer::new(action_cache::ActionCacheService::new(instances.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(CapabilitiesServer::new(capabilities::CapabilitiesService::new(
            instances,
        )));
}
