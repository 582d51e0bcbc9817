//! Generates the tonic client and server of Kiln's worker protocol
//! (`kiln.worker.v1.WorkerApi`, messages in `src/worker.rs`) without a
//! `.proto` file.

fn main() {
    let connect = tonic_build::manual::Method::builder()
        .name("session")
        .route_name("Connect")
        .input_type("crate::worker::WorkerUpdate")
        .output_type("crate::worker::SchedulerCommand")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .comment("One stream per worker: the worker sends `Register` first, then updates;")
        .comment("the scheduler answers `Registered`, then sends commands.")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("WorkerApi")
        .package("kiln.worker.v1")
        .comment("Kiln's scheduler <-> worker protocol (docs/worker-protocol.md).")
        .method(connect)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
