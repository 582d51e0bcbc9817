//! The gRPC call the current code runs for, kept as a task-local while
//! the call's handler and its response body are polled, so that a log line
//! emitted anywhere inside a call shows the call's method and the
//! client's RequestMetadata (tool invocation id, action mnemonic, target
//! id) at every log level — without the cost of a span per call.
//!
//! Setting it costs one reference-count increment per poll: the header is
//! kept as the client sent it and decoded when the call's first log line
//! is written ([`crate::telemetry`]'s formatters call [`current`]), once
//! per call. Code on other tasks (background work a call started) does not
//! see it.

use std::sync::{Arc, OnceLock};

use http::uri::Uri;
use kiln_proto::request_info::{REQUEST_METADATA_HEADER, RequestInfo};

tokio::task_local! {
    static CALL: Arc<CallContext>;
}

/// One gRPC call, as received.
#[derive(Debug)]
pub struct CallContext {
    uri: Uri,
    request_metadata: Option<http::HeaderValue>,
    /// `request_metadata` decoded, on first use.
    request_info: OnceLock<Option<RequestInfo>>,
}

impl CallContext {
    /// From the request's URI and headers (cheap: both are shared
    /// buffers).
    pub fn new(uri: &Uri, headers: &http::HeaderMap) -> CallContext {
        CallContext {
            uri: uri.clone(),
            request_metadata: headers.get(REQUEST_METADATA_HEADER).cloned(),
            request_info: OnceLock::new(),
        }
    }

    /// `Service/Method` (package dropped).
    pub fn method(&self) -> &str {
        crate::metrics::grpc_calls::short_method(self.uri.path())
    }

    /// The client's RequestMetadata, decoded on first use (`None` when
    /// absent or malformed).
    pub fn request_info(&self) -> Option<&RequestInfo> {
        self.request_info
            .get_or_init(|| {
                self.request_metadata
                    .as_ref()
                    .and_then(RequestInfo::from_bin_header)
            })
            .as_ref()
    }

    /// The fields a log line shows: `method` plus the non-empty
    /// RequestMetadata fields, in a fixed order.
    pub fn log_fields(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("method", self.method().to_string())];
        if let Some(info) = self.request_info() {
            for (name, value) in [
                ("tool_invocation_id", &info.tool_invocation_id),
                ("correlated_invocations_id", &info.correlated_invocations_id),
                ("action_mnemonic", &info.action_mnemonic),
                ("target_id", &info.target_id),
            ] {
                if !value.is_empty() {
                    out.push((name, value.clone()));
                }
            }
        }
        out
    }
}

/// Runs `f` (one poll of a call's future or body) with `ctx` as the
/// current call.
pub fn scope<R>(ctx: &Arc<CallContext>, f: impl FnOnce() -> R) -> R {
    CALL.sync_scope(ctx.clone(), f)
}

/// The call the current code runs for, if any.
pub fn current() -> Option<Arc<CallContext>> {
    CALL.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use prost::Message;

    #[test]
    fn fields_come_from_the_header_only_inside_the_scope() {
        let md = kiln_proto::reapi::RequestMetadata {
            tool_invocation_id: "inv".into(),
            action_mnemonic: "CppCompile".into(),
            target_id: "//a:b".into(),
            ..Default::default()
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(
            REQUEST_METADATA_HEADER,
            http::HeaderValue::from_str(
                &base64::engine::general_purpose::STANDARD_NO_PAD.encode(md.encode_to_vec()),
            )
            .unwrap(),
        );
        let uri: Uri = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult"
            .parse()
            .unwrap();
        let ctx = Arc::new(CallContext::new(&uri, &headers));
        assert!(current().is_none());
        let fields = scope(&ctx, || current().map(|c| c.log_fields())).unwrap();
        assert_eq!(
            fields,
            vec![
                ("method", "ActionCache/GetActionResult".to_string()),
                ("tool_invocation_id", "inv".to_string()),
                ("action_mnemonic", "CppCompile".to_string()),
                ("target_id", "//a:b".to_string()),
            ]
        );
        assert!(current().is_none());
        // Decoded once per call.
        let first = ctx.request_info().unwrap();
        assert_eq!(first.tool_invocation_id, "inv");
        assert!(std::ptr::eq(first, ctx.request_info().unwrap()));
        let bare = CallContext::new(&uri, &http::HeaderMap::new());
        assert_eq!(bare.log_fields().len(), 1);
    }
}
