//! Generates tonic clients and servers without `.proto` files:
//!
//! - Kiln's worker protocol (`kiln.worker.v1.WorkerApi`, messages in
//!   `src/worker.rs`);
//! - Kiln's status service (`kiln.status.v1.Status`, messages in
//!   `src/status.rs`);
//! - `google.bytestream.ByteStream` and
//!   `build.bazel.remote.execution.v2.ContentAddressableStorage` over the
//!   zero-copy messages of `src/fast.rs` (same service and method names, same
//!   wire format as the upstream definitions; cold methods reuse the
//!   `bazel-remote-apis` messages).

use tonic_build::manual::{Method, Service};

const CODEC: &str = "tonic_prost::ProstCodec";

/// A method of `kind`: "unary", "client" (client streaming), "server"
/// (server streaming) or "bidi".
fn method(name: &str, route: &str, input: &str, output: &str, kind: &str) -> Method {
    let mut b = Method::builder()
        .name(name)
        .route_name(route)
        .input_type(input)
        .output_type(output)
        .codec_path(CODEC);
    if kind == "client" || kind == "bidi" {
        b = b.client_streaming();
    }
    if kind == "server" || kind == "bidi" {
        b = b.server_streaming();
    }
    b.build()
}

fn worker() -> Service {
    let connect = Method::builder()
        .name("session")
        .route_name("Connect")
        .input_type("crate::worker::WorkerUpdate")
        .output_type("crate::worker::SchedulerCommand")
        .codec_path(CODEC)
        .client_streaming()
        .server_streaming()
        .comment("One stream per worker: the worker sends `Register` first, then updates;")
        .comment("the scheduler answers `Registered`, then sends commands.")
        .build();
    Service::builder()
        .name("WorkerApi")
        .package("kiln.worker.v1")
        .comment("Kiln's scheduler <-> worker protocol (docs/worker-protocol.md).")
        .method(connect)
        .build()
}

fn status() -> Service {
    Service::builder()
        .name("Status")
        .package("kiln.status.v1")
        .comment("Kiln's live status: workers, queue and running actions (`kiln status`).")
        .method(method(
            "get_status",
            "GetStatus",
            "crate::status::GetStatusRequest",
            "crate::status::StatusResponse",
            "unary",
        ))
        .build()
}

fn bytestream() -> Service {
    let up = "crate::bytestream";
    let fast = "crate::fast";
    Service::builder()
        .name("ByteStream")
        .package("google.bytestream")
        .comment("google.bytestream.ByteStream over zero-copy `bytes::Bytes` payloads.")
        .method(method(
            "read",
            "Read",
            &format!("{up}::ReadRequest"),
            &format!("{fast}::ReadResponse"),
            "server",
        ))
        .method(method(
            "write",
            "Write",
            &format!("{fast}::WriteRequest"),
            &format!("{up}::WriteResponse"),
            "client",
        ))
        .method(method(
            "query_write_status",
            "QueryWriteStatus",
            &format!("{up}::QueryWriteStatusRequest"),
            &format!("{up}::QueryWriteStatusResponse"),
            "unary",
        ))
        .build()
}

fn cas() -> Service {
    let up = "crate::reapi";
    let fast = "crate::fast";
    let m = |name: &str, route: &str, input: String, output: String, kind: &str| {
        method(name, route, &input, &output, kind)
    };
    Service::builder()
        .name("ContentAddressableStorage")
        .package("build.bazel.remote.execution.v2")
        .comment("REAPI v2 ContentAddressableStorage; the batch methods use zero-copy messages.")
        .method(m(
            "find_missing_blobs",
            "FindMissingBlobs",
            format!("{fast}::FindMissingBlobsRequest"),
            format!("{fast}::FindMissingBlobsResponse"),
            "unary",
        ))
        .method(m(
            "batch_update_blobs",
            "BatchUpdateBlobs",
            format!("{fast}::BatchUpdateBlobsRequest"),
            format!("{fast}::BatchUpdateBlobsResponse"),
            "unary",
        ))
        .method(m(
            "batch_read_blobs",
            "BatchReadBlobs",
            format!("{fast}::BatchReadBlobsRequest"),
            format!("{fast}::BatchReadBlobsResponse"),
            "unary",
        ))
        .method(m(
            "get_tree",
            "GetTree",
            format!("{up}::GetTreeRequest"),
            format!("{up}::GetTreeResponse"),
            "server",
        ))
        .method(m(
            "split_blob",
            "SplitBlob",
            format!("{up}::SplitBlobRequest"),
            format!("{up}::SplitBlobResponse"),
            "unary",
        ))
        .method(m(
            "get_chunk_mapping",
            "GetChunkMapping",
            format!("{up}::GetChunkMappingRequest"),
            format!("{up}::GetChunkMappingResponse"),
            "server",
        ))
        .method(m(
            "splice_blob",
            "SpliceBlob",
            format!("{up}::SpliceBlobRequest"),
            format!("{up}::SpliceBlobResponse"),
            "unary",
        ))
        .method(m(
            "register_chunk_mapping",
            "RegisterChunkMapping",
            format!("{up}::RegisterChunkMappingRequest"),
            format!("{up}::RegisterChunkMappingResponse"),
            "client",
        ))
        .build()
}

fn main() {
    tonic_build::manual::Builder::new().compile(&[worker(), status(), bytestream(), cas()]);
    println!("cargo:rerun-if-changed=build.rs");
}
