//! Building `google.longrunning.Operation`s and the protobuf time types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::longrunning::{Operation, operation};
use kiln_proto::protobuf;
use kiln_proto::reapi::{ExecuteOperationMetadata, ExecuteResponse};
use kiln_proto::rpc_details::to_any;
use tonic::Code;

use crate::state::OperationView;

pub const EXECUTE_RESPONSE_TYPE_URL: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";
pub const EXECUTE_METADATA_TYPE_URL: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";

/// The Operation clients see for `view`: metadata always, `done` and the
/// Any-packed ExecuteResponse exactly when COMPLETED. The `error` field is
/// never used (errors travel in `ExecuteResponse.status`, per the spec).
pub fn to_operation(view: &OperationView) -> Operation {
    let metadata = ExecuteOperationMetadata {
        stage: view.stage as i32,
        action_digest: Some(view.action_digest.clone()),
        stdout_stream_name: String::new(),
        stderr_stream_name: String::new(),
        partial_execution_metadata: view.partial_metadata.clone(),
        digest_function: view.digest_function.to_proto() as i32,
    };
    let result = view
        .response
        .as_ref()
        .map(|r| operation::Result::Response(to_any(EXECUTE_RESPONSE_TYPE_URL, r)));
    Operation {
        name: view.name.clone(),
        metadata: Some(to_any(EXECUTE_METADATA_TYPE_URL, &metadata)),
        done: view.done(),
        result,
    }
}

/// An ExecuteResponse carrying only an error status.
pub fn error_response(code: Code, message: impl Into<String>) -> ExecuteResponse {
    ExecuteResponse {
        status: Some(kiln_proto::rpc::Status {
            code: code as i32,
            message: message.into(),
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

pub fn to_timestamp(t: SystemTime) -> protobuf::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    protobuf::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn to_proto_duration(d: Duration) -> protobuf::Duration {
    protobuf::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf Duration as a std one; `None` when unset, negative or invalid.
pub fn from_proto_duration(d: Option<&protobuf::Duration>) -> Option<Duration> {
    let d = d?;
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_digest::DigestFunction;
    use kiln_proto::reapi::Digest;
    use kiln_proto::reapi::execution_stage::Value as Stage;
    use prost::Message;

    #[test]
    fn done_exactly_when_completed() {
        let mut view = OperationView {
            name: "operations/x".into(),
            instance_name: String::new(),
            stage: Stage::Queued,
            action_digest: Digest::default(),
            digest_function: DigestFunction::Sha256,
            partial_metadata: None,
            response: None,
        };
        let op = to_operation(&view);
        assert!(!op.done && op.result.is_none());
        let md = op.metadata.unwrap();
        assert_eq!(md.type_url, EXECUTE_METADATA_TYPE_URL);
        assert_eq!(
            ExecuteOperationMetadata::decode(md.value.as_slice())
                .unwrap()
                .stage,
            Stage::Queued as i32
        );
        view.stage = Stage::Completed;
        view.response = Some(ExecuteResponse {
            cached_result: true,
            ..Default::default()
        });
        let op = to_operation(&view);
        assert!(op.done);
        let Some(operation::Result::Response(any)) = op.result else {
            panic!("no response")
        };
        assert_eq!(any.type_url, EXECUTE_RESPONSE_TYPE_URL);
        assert!(
            ExecuteResponse::decode(any.value.as_slice())
                .unwrap()
                .cached_result
        );
    }

    #[test]
    fn durations() {
        let d = Duration::from_millis(1500);
        assert_eq!(from_proto_duration(Some(&to_proto_duration(d))), Some(d));
        let neg = protobuf::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(from_proto_duration(Some(&neg)), None);
    }
}
