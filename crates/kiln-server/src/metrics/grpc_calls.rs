//! The tower layer every gRPC call passes through: it counts the call
//! (`kiln_grpc_requests_total`, `kiln_grpc_errors_total`,
//! `kiln_grpc_request_duration_seconds`) and runs it inside one `tracing`
//! span carrying the method and the client's RequestMetadata.
//!
//! * Counting: the request count when the call arrives; the duration from
//!   arrival to the response headers (for streaming calls not the length of
//!   the stream); a non-OK `grpc-status` read from the response headers
//!   ("trailers-only" errors) or else from the body's trailers (a call the
//!   client abandons before the trailers is not counted as an error).
//! * The span (`grpc`, target [`SPAN_TARGET`], level [`SPAN_LEVEL`]) is
//!   entered whenever the handler's future or the response body is polled,
//!   so every log line of the call, also from a streaming body, carries
//!   `method` and, when the client sent them, `tool_invocation_id`,
//!   `correlated_invocations_id`, `action_mnemonic` and `target_id`. It
//!   closes when the response body is done. It is a DEBUG span: enabled by
//!   a log filter such as `info,kiln::grpc=debug` and always by OTLP
//!   export; when disabled it costs one cached check and the header is not
//!   decoded (an enabled span costs 7-11% of a cache-hit Execute's CPU
//!   with the fmt layer, see docs/benchmarks.md).
//! * Per method the counters are resolved once and cached by request path,
//!   so a call costs one shared-lock map lookup, no allocation.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use kiln_proto::request_info::RequestInfo;
use parking_lot::RwLock;
use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tracing::Span;

use crate::call_context::{self, CallContext};

/// Target of the per-call span (for log filters such as `kiln::grpc=off`).
pub const SPAN_TARGET: &str = "kiln::grpc";
/// Level of the per-call span.
pub const SPAN_LEVEL: tracing::Level = tracing::Level::DEBUG;

/// Distinct `method` label values kept before further ones become
/// `"other"`: a client choosing paths cannot grow the metrics unboundedly.
pub(crate) const MAX_METHODS: usize = 128;

/// Services whose paths are used as `method` labels as they are.
const KNOWN_SERVICES: &[&str] = &[
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.Execution",
    "google.bytestream.ByteStream",
    "google.longrunning.Operations",
    "kiln.worker.v1.WorkerApi",
    "kiln.status.v1.Status",
    "grpc.health.v1.Health",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub method: String,
    pub code: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~105 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// The counters of one method, resolved once.
#[derive(Debug)]
struct MethodMetrics {
    label: String,
    requests: Counter,
    duration: Histogram,
}

/// Per-method gRPC metrics.
#[derive(Debug)]
pub(crate) struct GrpcMetrics {
    pub requests: Family<MethodLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// Request path → its method's counters (known methods only).
    by_path: RwLock<HashMap<String, Arc<MethodMetrics>>>,
    other: Arc<MethodMetrics>,
}

impl GrpcMetrics {
    pub fn new() -> Self {
        let requests = Family::<MethodLabels, Counter>::default();
        let duration: Family<MethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let other = Arc::new(Self::resolve(&requests, &duration, "other".into()));
        GrpcMetrics {
            requests,
            errors: Family::default(),
            duration,
            by_path: RwLock::new(HashMap::new()),
            other,
        }
    }

    fn resolve(
        requests: &Family<MethodLabels, Counter>,
        duration: &Family<MethodLabels, Histogram, fn() -> Histogram>,
        label: String,
    ) -> MethodMetrics {
        let labels = MethodLabels { method: label };
        MethodMetrics {
            requests: requests.get_or_create(&labels).clone(),
            duration: duration.get_or_create(&labels).clone(),
            label: labels.method,
        }
    }

    /// The counters of the method at request path `path`, e.g.
    /// `/build.bazel.remote.execution.v2.ActionCache/GetActionResult`.
    fn method(&self, path: &str) -> Arc<MethodMetrics> {
        if let Some(m) = self.by_path.read().get(path) {
            return m.clone();
        }
        let Some(label) = method_label(path) else {
            return self.other.clone();
        };
        let mut by_path = self.by_path.write();
        if let Some(m) = by_path.get(path) {
            return m.clone();
        }
        if by_path.len() >= MAX_METHODS {
            return self.other.clone();
        }
        let m = Arc::new(Self::resolve(&self.requests, &self.duration, label));
        by_path.insert(path.to_string(), m.clone());
        m
    }

    /// How many distinct methods have their own label.
    #[cfg(test)]
    fn methods(&self) -> usize {
        self.by_path.read().len()
    }
}

/// The `method` label of a known service's plausible method path, else
/// `None` (counted as "other").
fn method_label(path: &str) -> Option<String> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let plausible = !method.is_empty()
        && method.len() <= 64
        && method.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (KNOWN_SERVICES.contains(&service) && plausible).then(|| format!("{service}/{method}"))
}

/// `ActionCache/GetActionResult` for
/// `/build.bazel.remote.execution.v2.ActionCache/GetActionResult` (a slice,
/// no allocation).
pub(crate) fn short_method(path: &str) -> &str {
    let path = path.strip_prefix('/').unwrap_or(path);
    match path.split_once('/') {
        Some((service, _)) => match service.rfind('.') {
            Some(dot) => &path[dot + 1..],
            None => path,
        },
        None => path,
    }
}

/// The name of a gRPC status code as in the spec (`NOT_FOUND` is
/// "NotFound", as tonic spells it).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The span of one call; disabled (and nothing decoded) when the
/// subscriber does not want it.
fn call_span(path: &str, headers: &http::HeaderMap) -> Span {
    if !tracing::span_enabled!(target: SPAN_TARGET, SPAN_LEVEL) {
        return Span::none();
    }
    let info = RequestInfo::from_http_headers(headers);
    let field = |pick: fn(&RequestInfo) -> &str| info.as_ref().map(pick).filter(|s| !s.is_empty());
    tracing::span!(
        target: SPAN_TARGET,
        SPAN_LEVEL,
        "grpc",
        method = short_method(path),
        tool_invocation_id = field(|i| &i.tool_invocation_id),
        correlated_invocations_id = field(|i| &i.correlated_invocations_id),
        action_mnemonic = field(|i| &i.action_mnemonic),
        target_id = field(|i| &i.target_id),
    )
}

/// Reads `grpc-status` from headers or trailers.
fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(v))
}

/// One counted call whose status is not yet known.
struct Pending {
    metrics: Arc<super::ServerMetrics>,
    method: Arc<MethodMetrics>,
}

impl Pending {
    fn record(self, code: tonic::Code) {
        if code != tonic::Code::Ok {
            self.metrics
                .grpc
                .errors
                .get_or_create(&ErrorLabels {
                    method: self.method.label.clone(),
                    code: code_name(code),
                })
                .inc();
        }
    }
}

/// The tower layer; see the module documentation. Without metrics it only
/// opens the spans.
#[derive(Clone)]
pub struct GrpcLayer {
    metrics: Option<Arc<super::ServerMetrics>>,
}

impl GrpcLayer {
    pub(crate) fn new(metrics: Option<Arc<super::ServerMetrics>>) -> Self {
        GrpcLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = GrpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcService<S> {
    inner: S,
    metrics: Option<Arc<super::ServerMetrics>>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let pending = self.metrics.as_ref().map(|metrics| {
            let method = metrics.grpc.method(req.uri().path());
            method.requests.inc();
            Pending {
                metrics: metrics.clone(),
                method,
            }
        });
        let span = call_span(req.uri().path(), req.headers());
        let call = Arc::new(CallContext::new(req.uri(), req.headers()));
        let inner = {
            let _entered = span.enter();
            call_context::scope(&call, || self.inner.call(req))
        };
        CallFuture {
            inner,
            start: Instant::now(),
            pending,
            span,
            call,
        }
    }
}

pin_project! {
    /// The response future of [`GrpcService`].
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        pending: Option<Pending>,
        span: Span,
        call: Arc<CallContext>,
    }
}

impl<F, B, E> Future for CallFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<CallBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.span.enter();
            let inner = this.inner;
            ready!(call_context::scope(this.call, || inner.poll(cx)))
        };
        let pending = this.pending.take();
        if let Some(p) = &pending {
            p.method.duration.observe(this.start.elapsed().as_secs_f64());
        }
        let span = std::mem::replace(this.span, Span::none());
        let call = this.call.clone();
        Poll::Ready(result.map(|response| {
            // A trailers-only response carries its status in the headers.
            let pending = match (pending, grpc_code(response.headers())) {
                (Some(p), Some(code)) => {
                    p.record(code);
                    None
                }
                (p, _) => p,
            };
            response.map(|inner| CallBody {
                inner,
                pending,
                span,
                call,
            })
        }))
    }
}

pin_project! {
    /// A response body that runs inside the call's span and records the
    /// `grpc-status` of its trailers.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
        span: Span,
        call: Arc<CallContext>,
    }
}

impl<B: Body> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = {
            let _entered = this.span.enter();
            let inner = this.inner;
            ready!(call_context::scope(this.call, || inner.poll_frame(cx)))
        };
        if let Some(Ok(f)) = &frame
            && let Some(trailers) = f.trailers_ref()
            && let Some(code) = grpc_code(trailers)
            && let Some(p) = this.pending.take()
        {
            p.record(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        let m = GrpcMetrics::new();
        let path = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";
        assert_eq!(
            m.method(path).label,
            "build.bazel.remote.execution.v2.ActionCache/GetActionResult"
        );
        assert!(Arc::ptr_eq(&m.method(path), &m.method(path)), "resolved once");
        assert_eq!(m.method("/evil.Service/Anything").label, "other");
        assert_eq!(m.method("/google.bytestream.ByteStream/a b").label, "other");
        assert_eq!(m.method("nonsense").label, "other");
        for i in 0..MAX_METHODS + 10 {
            m.method(&format!("/google.bytestream.ByteStream/M{i}"));
        }
        assert_eq!(m.method("/google.bytestream.ByteStream/New").label, "other");
        assert!(m.methods() <= MAX_METHODS);
    }

    #[test]
    fn short_method_names() {
        assert_eq!(
            short_method("/build.bazel.remote.execution.v2.ActionCache/GetActionResult"),
            "ActionCache/GetActionResult"
        );
        assert_eq!(
            short_method("/google.bytestream.ByteStream/Read"),
            "ByteStream/Read"
        );
        assert_eq!(short_method("/Plain/Call"), "Plain/Call");
        assert_eq!(short_method("junk"), "junk");
    }

    #[test]
    fn grpc_status_is_read_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_code(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_code(&h), Some(tonic::Code::NotFound));
        assert_eq!(code_name(tonic::Code::NotFound), "NotFound");
    }

    /// A body that yields one trailers frame.
    struct TrailersBody(Option<http::HeaderMap>);

    impl Body for TrailersBody {
        type Data = tonic::codegen::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(self.0.take().map(|t| Ok(Frame::trailers(t))))
        }
    }

    #[test]
    fn error_status_in_trailers_is_counted_once() {
        let metrics = Arc::new(super::super::ServerMetrics::with_enabled(true));
        let method = metrics.grpc.method("/google.bytestream.ByteStream/Read");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        let mut body = Box::pin(CallBody {
            inner: TrailersBody(Some(trailers)),
            pending: Some(Pending {
                metrics: metrics.clone(),
                method,
            }),
            span: Span::none(),
            call: Arc::new(CallContext::new(
                &"/x.Y/Z".parse().unwrap(),
                &http::HeaderMap::new(),
            )),
        });
        futures::executor::block_on(async {
            while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                assert!(frame.is_ok());
            }
        });
        let labels = ErrorLabels {
            method: "google.bytestream.ByteStream/Read".into(),
            code: "Internal",
        };
        assert_eq!(metrics.grpc.errors.get_or_create(&labels).get(), 1);
    }
}
