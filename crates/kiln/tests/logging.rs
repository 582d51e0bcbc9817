//! Tracing on the real binary: a log line emitted inside a gRPC call shows
//! the call and its RequestMetadata, with or without the per-call span;
//! every gRPC call can run in a span carrying the
//! client's RequestMetadata, so a log line emitted inside a call (here
//! GetTree's debug line about a missing directory, emitted while its
//! response streams) shows them; and with an OTLP endpoint configured the
//! call's span is exported, with the same attributes, to a real OTLP/HTTP
//! receiver (an HTTP server decoding `POST /v1/traces` with the
//! `opentelemetry-proto` messages).

mod common;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{KilnProcess, MEMORY_CONFIG, digest_of, upload_blobs};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    Directory, DirectoryNode, GetActionResultRequest, GetTreeRequest, RequestMetadata, ToolDetails,
};
use kiln_proto::request_info::REQUEST_METADATA_HEADER;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// What a Bazel build would send, with ids unique to this test run.
fn metadata(tag: &str) -> RequestMetadata {
    RequestMetadata {
        tool_details: Some(ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "8.0.0".into(),
        }),
        action_id: format!("action-{tag}"),
        tool_invocation_id: format!("invocation-{tag}"),
        correlated_invocations_id: format!("build-{tag}"),
        action_mnemonic: "CppCompile".into(),
        target_id: format!("//pkg:{tag}"),
        configuration_id: "k8-fastbuild".into(),
    }
}

fn with_metadata<T>(message: T, md: &RequestMetadata) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        tonic::metadata::MetadataValue::from_bytes(&md.encode_to_vec()),
    );
    req
}

/// The debug line (target kiln_cache) GetTree writes when it skips a
/// missing directory.
const MISSING_DIRECTORY: &str = "directory missing";

/// Runs kiln with `log_args`, makes a GetTree call with RequestMetadata
/// whose streamed response logs (at debug, target kiln_cache) that it
/// skips a missing directory, and returns that log line and the metadata.
async fn missing_directory_log_line(log_args: &[&str]) -> (String, RequestMetadata) {
    missing_directory_log_line_with(log_args, &[], |_| {}).await
}

async fn missing_directory_log_line_with(
    log_args: &[&str],
    env: &[(&str, &str)],
    tweak: impl FnOnce(&mut RequestMetadata),
) -> (String, RequestMetadata) {
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::with_config_and(dir.path(), MEMORY_CONFIG, log_args, env, true);
    let md = get_tree_over_a_missing_directory(&kiln, tweak).await;
    let stderr = kiln.stderr.as_ref().expect("stderr is captured");
    match common::wait_for_line(stderr, MISSING_DIRECTORY, Duration::from_secs(20)) {
        Ok(line) => (line, md),
        Err(seen) => panic!(
            "no log line about the missing directory; stderr was:\n{}",
            seen.join("\n")
        ),
    }
}

/// Uploads a root directory whose child is missing and reads it with
/// GetTree (RequestMetadata from [`metadata`], changed by `tweak`), to the
/// end of the stream; GetTree logs at debug, from inside the streamed
/// response, that it skips the child. Returns the metadata sent.
async fn get_tree_over_a_missing_directory(
    kiln: &KilnProcess,
    tweak: impl FnOnce(&mut RequestMetadata),
) -> RequestMetadata {
    let mut cas = ContentAddressableStorageClient::new(kiln.channel().await);
    let mut absent = Directory::default().encode_to_vec();
    absent.extend_from_slice(b"not uploaded");
    let root = Directory {
        directories: vec![DirectoryNode {
            name: "gone".into(),
            digest: Some(digest_of(&absent)),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    upload_blobs(&mut cas, &[&root]).await;
    let tag = uuid::Uuid::new_v4().to_string();
    let mut md = metadata(&tag);
    tweak(&mut md);
    read_tree(&mut cas, with_metadata(tree_of(&root), &md)).await;
    md
}

fn tree_of(root: &[u8]) -> GetTreeRequest {
    GetTreeRequest {
        root_digest: Some(digest_of(root)),
        ..Default::default()
    }
}

/// Reads a GetTree answer to its end (bounded).
async fn read_tree(
    cas: &mut ContentAddressableStorageClient<tonic::transport::Channel>,
    request: impl tonic::IntoRequest<GetTreeRequest>,
) {
    let mut tree = cas.get_tree(request).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while tree.message().await.unwrap().is_some() {}
    })
    .await
    .expect("GetTree answered within 30 s");
}

/// The call's method and RequestMetadata fields in `obj` (a JSON log
/// line's span, or its `request` object).
fn assert_call_fields(obj: &serde_json::Value, md: &RequestMetadata, line: &str) {
    assert_eq!(obj["method"], "ContentAddressableStorage/GetTree", "{line}");
    assert_eq!(
        obj["tool_invocation_id"],
        md.tool_invocation_id.as_str(),
        "{line}"
    );
    assert_eq!(
        obj["correlated_invocations_id"],
        md.correlated_invocations_id.as_str(),
        "{line}"
    );
    assert_eq!(obj["action_mnemonic"], "CppCompile", "{line}");
    assert_eq!(obj["target_id"], md.target_id.as_str(), "{line}");
}

#[tokio::test]
async fn log_lines_inside_a_call_carry_its_request_metadata() {
    // With the per-call span enabled, the line carries it with its fields.
    let (line, md) = missing_directory_log_line(&[
        "--log-format",
        "json",
        "--log-level",
        "info,kiln_cache=debug,kiln::grpc=debug",
    ])
    .await;
    let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(json["level"], "DEBUG", "{line}");
    let span = &json["span"];
    assert_eq!(span["name"], "grpc", "{line}");
    assert_call_fields(span, &md, &line);
    assert!(json.get("request").is_none(), "shown once, in the span: {line}");
}

/// Without the per-call span (the default), a line inside a call still
/// shows the call and its RequestMetadata, in JSON and in human format.
#[tokio::test]
async fn request_metadata_is_in_log_lines_without_the_per_call_span() {
    let (line, md) =
        missing_directory_log_line(&["--log-format", "json", "--log-level", "info,kiln_cache=debug"]).await;
    let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(json.get("span").is_none(), "no span was enabled: {line}");
    assert_call_fields(&json["request"], &md, &line);

    // A client cannot forge log lines or terminal codes through its fields.
    let (line, md) = missing_directory_log_line_with(&["--log-level", "info,kiln_cache=debug"], &[], |md| {
        md.action_mnemonic = "Cpp\n2026-01-01T00:00:00Z ERROR forged\u{1b}[31m".into();
    })
    .await;
    for want in [
        "method=ContentAddressableStorage/GetTree".to_string(),
        format!("tool_invocation_id={}", md.tool_invocation_id),
        "action_mnemonic=Cpp\\n2026-01-01T00:00:00Z ERROR forged\\u{1b}[31m".to_string(),
        format!("target_id={}", md.target_id),
    ] {
        assert!(line.contains(&want), "{want:?} not in {line}");
    }
    assert!(!line.contains('\u{1b}'), "raw escape in {line:?}");
    assert!(line.contains(" request{"), "{line}");
}

/// The level comes from `KILN_LOG` when no flag is given, and
/// `--log-level` wins over it: the same debug line appears with the
/// variable alone and is absent when the flag says `info`.
#[tokio::test]
async fn the_log_level_comes_from_kiln_log_and_the_flag_wins() {
    let env = [("KILN_LOG", "info,kiln_cache=debug")];
    let (line, _) = missing_directory_log_line_with(&[], &env, |_| {}).await;
    assert!(line.contains("DEBUG"), "{line}");

    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::with_config_and(dir.path(), MEMORY_CONFIG, &["--log-level", "info"], &env, true);
    get_tree_over_a_missing_directory(&kiln, |_| {}).await;
    // Then a call that logs a warning: the server writes its lines in
    // order, so whatever the first call logged comes before it.
    let mut cas = ContentAddressableStorageClient::new(kiln.channel().await);
    let root = Directory {
        directories: vec![DirectoryNode {
            name: "no-digest".into(),
            digest: None,
        }],
        ..Default::default()
    }
    .encode_to_vec();
    upload_blobs(&mut cas, &[&root]).await;
    read_tree(&mut cas, tree_of(&root)).await;
    let stderr = kiln.stderr.as_ref().expect("stderr is captured");
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines
        .last()
        .is_some_and(|l: &String| l.contains("skipping child without a digest"))
    {
        match stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => lines.push(l),
            Err(_) => panic!(
                "no warning about the child without a digest; stderr was:\n{}",
                lines.join("\n")
            ),
        }
    }
    assert!(
        !lines.iter().any(|l| l.contains(MISSING_DIRECTORY)),
        "--log-level info did not win over KILN_LOG:\n{}",
        lines.join("\n")
    );
    // The control: info lines do pass the flag's filter.
    assert!(
        lines.iter().any(|l| l.contains("kiln serving")),
        "no info line:\n{}",
        lines.join("\n")
    );
}

/// The string attributes of a span.
fn attributes(span: &opentelemetry_proto::tonic::trace::v1::Span) -> Vec<(String, String)> {
    span.attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

async fn receive_traces(
    State(tx): State<tokio::sync::mpsc::UnboundedSender<ExportTraceServiceRequest>>,
    body: Bytes,
) -> (axum::http::StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(body) {
        Ok(req) => {
            let _ = tx.send(req);
            (
                axum::http::StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
    }
}

#[tokio::test]
async fn spans_are_exported_over_otlp_with_request_metadata() {
    // A minimal OTLP/HTTP receiver.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive_traces))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let config = format!("[server]\notlp_endpoint = \"http://{receiver}\"\n{MEMORY_CONFIG}");
    let kiln = KilnProcess::with_config_and(
        dir.path(),
        &config,
        &[],
        // Export every 100 ms; never through a proxy.
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("NO_PROXY", "127.0.0.1"),
            ("no_proxy", "127.0.0.1"),
        ],
        false,
    );
    let tag = uuid::Uuid::new_v4().to_string();
    let md = metadata(&tag);
    let err = ActionCacheClient::new(kiln.channel().await)
        .get_action_result(with_metadata(
            GetActionResultRequest {
                action_digest: Some(digest_of(tag.as_bytes())),
                ..Default::default()
            },
            &md,
        ))
        .await
        .expect_err("an unknown action");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let deadline = Instant::now() + Duration::from_secs(30);
    let found = 'wait: loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(req)) = tokio::time::timeout(left, rx.recv()).await else {
            panic!("no exported span of the call within 30 s");
        };
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| {
                    r.attributes
                        .iter()
                        .any(|kv| kv.key == "service.name" && format!("{:?}", kv.value).contains("kiln"))
                })
                .unwrap_or(false);
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    let attrs = attributes(span);
                    if attrs.contains(&("tool_invocation_id".into(), md.tool_invocation_id.clone())) {
                        break 'wait (service, span.name.clone(), attrs);
                    }
                }
            }
        }
    };
    let (service, name, attrs) = found;
    assert!(service, "the resource names the service kiln");
    assert_eq!(name, "grpc");
    let want = [
        ("method", "ActionCache/GetActionResult"),
        ("correlated_invocations_id", md.correlated_invocations_id.as_str()),
        ("action_mnemonic", "CppCompile"),
        ("target_id", md.target_id.as_str()),
    ];
    for (k, v) in want {
        assert!(
            attrs.contains(&(k.to_string(), v.to_string())),
            "{k}={v} missing from {attrs:?}"
        );
    }
    drop(kiln);
    server.abort();
}
