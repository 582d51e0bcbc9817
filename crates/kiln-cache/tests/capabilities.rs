//! Capabilities over real gRPC: what each instance honestly advertises.

mod common;

use std::sync::Arc;

use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_digest::DigestFunction;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::compressor::Value as Compressor;
use kiln_proto::reapi::symlink_absolute_path_strategy::Value as SymlinkStrategy;
use kiln_proto::reapi::{GetCapabilitiesRequest, ServerCapabilities};
use kiln_store::Store;
use kiln_store::memory::MemoryStore;
use tonic::Code;

async fn caps(server: &common::TestServer, instance: &str) -> Result<ServerCapabilities, tonic::Status> {
    CapabilitiesClient::new(server.channel.clone())
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: instance.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn advertises_the_cache_honestly() {
    let server = common::start_memory().await;
    for name in ["", "main"] {
        let c = caps(&server, name).await.unwrap();
        let cache = c.cache_capabilities.unwrap();
        let all: Vec<i32> = DigestFunction::ALL.iter().map(|f| f.to_proto() as i32).collect();
        assert_eq!(cache.digest_functions, all);
        assert_eq!(
            cache.digest_functions[0],
            DigestFunction::Sha256.to_proto() as i32
        );
        assert!(cache.action_cache_update_capabilities.unwrap().update_enabled);
        let defaults = CacheLimits::default();
        assert_eq!(
            cache.max_batch_total_size_bytes,
            defaults.max_batch_total_size_bytes as i64
        );
        assert_eq!(cache.max_cas_blob_size_bytes, 0, "unlimited");
        assert_eq!(cache.supported_compressors, vec![Compressor::Zstd as i32]);
        assert_eq!(
            cache.supported_batch_update_compressors,
            vec![Compressor::Zstd as i32]
        );
        assert_eq!(
            cache.symlink_absolute_path_strategy,
            SymlinkStrategy::Allowed as i32
        );
        assert!(!cache.split_blob_support && !cache.splice_blob_support);
        assert!(c.execution_capabilities.is_none(), "no remote execution");
        let v = |s: Option<kiln_proto::semver::SemVer>| s.map(|s| (s.major, s.minor, s.patch));
        assert_eq!(v(c.deprecated_api_version), Some((2, 0, 0)));
        assert_eq!(v(c.low_api_version), Some((2, 0, 0)));
        assert_eq!(v(c.high_api_version), Some((2, 3, 0)));
    }
}

#[tokio::test]
async fn read_only_instances_disable_updates() {
    let server = common::start_memory().await;
    let cache = caps(&server, "ro").await.unwrap().cache_capabilities.unwrap();
    assert!(!cache.action_cache_update_capabilities.unwrap().update_enabled);
}

#[tokio::test]
async fn unknown_instances_are_invalid_arguments() {
    let server = common::start_memory().await;
    assert_eq!(
        caps(&server, "nope").await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn limits_and_digest_functions_come_from_the_configuration() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
    let mut inst = Instance::new("x", store.clone(), store);
    inst.digest_functions = vec![DigestFunction::Sha256, DigestFunction::Blake3];
    let limits = CacheLimits {
        max_batch_total_size_bytes: 1234,
        max_cas_blob_size_bytes: 5678,
        max_inline_bytes: 10,
    };
    let server = common::start(Instances::new([inst], limits)).await;
    let cache = caps(&server, "x").await.unwrap().cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![
            DigestFunction::Sha256.to_proto() as i32,
            DigestFunction::Blake3.to_proto() as i32
        ]
    );
    assert_eq!(cache.max_batch_total_size_bytes, 1234);
    assert_eq!(cache.max_cas_blob_size_bytes, 5678);
}
