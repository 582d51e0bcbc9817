//! Protocol types for Kiln.
//!
//! The REAPI v2 (remote_execution.proto, semver.proto), google.bytestream,
//! google.longrunning and google.rpc.Status messages and tonic stubs come from
//! the `bazel-remote-apis` crate, which generates them from the upstream
//! `.proto` files (spec v2.11+: `max_cas_blob_size_bytes`, `split_blob_support`,
//! `output_paths`, ...). The google.rpc error-detail messages that crate lacks
//! (`PreconditionFailure`, `BadRequest`) are declared in [`rpc_details`] with
//! their upstream field numbers.
//!
//! [`fast`] declares zero-copy (`bytes::Bytes`) versions of the hot CAS and
//! ByteStream messages, with tonic servers and clients for the same
//! services, wire-compatible with the upstream ones.

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
pub use bazel_remote_apis::build::bazel::semver;
pub use bazel_remote_apis::google::bytestream;
pub use bazel_remote_apis::google::longrunning;
pub use bazel_remote_apis::google::protobuf;
pub use bazel_remote_apis::google::rpc;

pub mod fast;
pub mod request_info;
pub mod rpc_details;
pub mod status;
pub mod time;
pub mod worker;
