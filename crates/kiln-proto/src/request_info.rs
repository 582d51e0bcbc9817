//! The `RequestMetadata` a client such as Bazel attaches to every call (the
//! `build.bazel.remote.execution.v2.requestmetadata-bin` header), decoded
//! once into plain strings for spans, logs, metrics and the dashboard.

use prost::Message;

use crate::reapi::RequestMetadata;

/// Binary gRPC metadata key carrying a serialized `RequestMetadata`.
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// What a client said about a call. Empty strings where it said nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `tool_details.tool_name`, e.g. "bazel".
    pub tool_name: String,
    /// `tool_details.tool_version`.
    pub tool_version: String,
    /// One build (Bazel's `--invocation_id`).
    pub tool_invocation_id: String,
    /// Several invocations that belong together (Bazel's `--build_request_id`).
    pub correlated_invocations_id: String,
    /// The kind of action, e.g. "CppCompile".
    pub action_mnemonic: String,
    /// The target the action belongs to, e.g. "//lib:foo".
    pub target_id: String,
    /// The build configuration of that target.
    pub configuration_id: String,
    /// The client's id for the action.
    pub action_id: String,
}

impl RequestInfo {
    /// Decodes the header from gRPC metadata; `None` when absent or
    /// undecodable (a malformed header never fails a call).
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<RequestInfo> {
        let value = metadata.get_bin(REQUEST_METADATA_HEADER)?;
        let bytes = value.to_bytes().ok()?;
        Self::decode(&bytes)
    }

    /// Decodes the header from raw HTTP headers (for tower layers that run
    /// before tonic). gRPC sends `-bin` values base64-encoded, with or
    /// without padding.
    pub fn from_http_headers(headers: &http::HeaderMap) -> Option<RequestInfo> {
        Self::from_bin_header(headers.get(REQUEST_METADATA_HEADER)?)
    }

    /// Decodes the value of a [`REQUEST_METADATA_HEADER`] HTTP header
    /// (base64, with or without padding); `None` when undecodable.
    pub fn from_bin_header(value: &http::HeaderValue) -> Option<RequestInfo> {
        use base64::Engine;
        const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let bytes = LENIENT.decode(value.as_bytes()).ok()?;
        Self::decode(&bytes)
    }

    fn decode(bytes: &[u8]) -> Option<RequestInfo> {
        let m = RequestMetadata::decode(bytes).ok()?;
        let (tool_name, tool_version) = m
            .tool_details
            .map(|t| (t.tool_name, t.tool_version))
            .unwrap_or_default();
        Some(RequestInfo {
            tool_name,
            tool_version,
            tool_invocation_id: m.tool_invocation_id,
            correlated_invocations_id: m.correlated_invocations_id,
            action_mnemonic: m.action_mnemonic,
            target_id: m.target_id,
            configuration_id: m.configuration_id,
            action_id: m.action_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reapi::ToolDetails;

    fn sample() -> RequestMetadata {
        RequestMetadata {
            tool_details: Some(ToolDetails {
                tool_name: "bazel".into(),
                tool_version: "4.2.3".into(),
            }),
            action_id: "a1".into(),
            tool_invocation_id: "inv-1".into(),
            correlated_invocations_id: "build-1".into(),
            action_mnemonic: "CppCompile".into(),
            target_id: "//lib:foo".into(),
            configuration_id: "cfg".into(),
        }
    }

    #[test]
    fn decodes_from_grpc_metadata() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert_bin(
            REQUEST_METADATA_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&sample().encode_to_vec()),
        );
        let info = RequestInfo::from_metadata(&md).unwrap();
        assert_eq!(info.tool_name, "bazel");
        assert_eq!(info.tool_version, "4.2.3");
        assert_eq!(info.tool_invocation_id, "inv-1");
        assert_eq!(info.correlated_invocations_id, "build-1");
        assert_eq!(info.action_mnemonic, "CppCompile");
        assert_eq!(info.target_id, "//lib:foo");
        assert_eq!(info.configuration_id, "cfg");
        assert_eq!(info.action_id, "a1");
        assert_ne!(info, RequestInfo::default());
    }

    #[test]
    fn decodes_from_http_headers_with_and_without_padding() {
        use base64::Engine;
        let raw = sample().encode_to_vec();
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ] {
            let mut h = http::HeaderMap::new();
            h.insert(
                REQUEST_METADATA_HEADER,
                http::HeaderValue::from_str(&engine.encode(&raw)).unwrap(),
            );
            let info = RequestInfo::from_http_headers(&h).unwrap();
            assert_eq!(info.target_id, "//lib:foo");
            let value = h.get(REQUEST_METADATA_HEADER).unwrap();
            assert_eq!(RequestInfo::from_bin_header(value), Some(info));
        }
    }

    #[test]
    fn absent_or_garbage_is_none() {
        assert!(RequestInfo::from_metadata(&tonic::metadata::MetadataMap::new()).is_none());
        let mut h = http::HeaderMap::new();
        h.insert(REQUEST_METADATA_HEADER, http::HeaderValue::from_static("!!!"));
        assert!(RequestInfo::from_http_headers(&h).is_none());
        assert!(RequestInfo::from_bin_header(&http::HeaderValue::from_static("!!!")).is_none());
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert_bin(
            REQUEST_METADATA_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&[0xff, 0xff, 0xff]),
        );
        assert!(RequestInfo::from_metadata(&md).is_none());
    }
}
