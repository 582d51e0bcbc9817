//! `google.rpc` error details (google/rpc/error_details.proto) that clients
//! such as Bazel decode from `grpc-status-details-bin`, and the canonical
//! names of `google.rpc.Code`.

use prost::Message;

/// The canonical upper-case name of a gRPC code (`NOT_FOUND`, ...), as
/// google/rpc/code.proto spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `google.rpc.PreconditionFailure`: what preconditions failed.
#[derive(Clone, PartialEq, Message)]
pub struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<precondition_failure::Violation>,
}

pub mod precondition_failure {
    /// One failed precondition, e.g. type `MISSING`, subject `blobs/{hash}/{size}`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Violation {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(string, tag = "2")]
        pub subject: String,
        #[prost(string, tag = "3")]
        pub description: String,
    }
}

/// `google.rpc.BadRequest`: which request fields were invalid.
#[derive(Clone, PartialEq, Message)]
pub struct BadRequest {
    #[prost(message, repeated, tag = "1")]
    pub field_violations: Vec<bad_request::FieldViolation>,
}

pub mod bad_request {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FieldViolation {
        #[prost(string, tag = "1")]
        pub field: String,
        #[prost(string, tag = "2")]
        pub description: String,
    }
}

pub const PRECONDITION_FAILURE_TYPE_URL: &str = "type.googleapis.com/google.rpc.PreconditionFailure";
pub const BAD_REQUEST_TYPE_URL: &str = "type.googleapis.com/google.rpc.BadRequest";

/// Packs a message into a `google.protobuf.Any` with the given type URL.
pub fn to_any<M: Message>(type_url: &str, msg: &M) -> crate::protobuf::Any {
    crate::protobuf::Any {
        type_url: type_url.to_string(),
        value: msg.encode_to_vec(),
    }
}
