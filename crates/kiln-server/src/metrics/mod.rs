//! Prometheus metrics served at `GET /metrics`.
//!
//! * gRPC, counted by a tower layer on the tonic server
//!   ([`GrpcMetricsLayer`]): `kiln_grpc_requests_total{method}` when a call
//!   arrives; `kiln_grpc_errors_total{method,code}` for every non-OK
//!   `grpc-status`, read from the response headers (errors returned before
//!   any message, "trailers-only") or else from the body's trailers (end of
//!   a unary or streaming response; a call the client abandons before the
//!   trailers is not counted as an error); and
//!   `kiln_grpc_request_duration_seconds{method}`, the time from the call's
//!   arrival to its response headers (for streaming calls this is not the
//!   length of the stream).
//! * Stores, computed at scrape time from [`Store::stats`]:
//!   `kiln_store_{bytes,items,capacity_bytes,oldest_age_seconds}{store}`
//!   gauges and the `kiln_store_evictions_total{store}` counter.
//! * Scheduler (when remote execution is enabled), refreshed by the
//!   `/metrics` handler before encoding: `kiln_scheduler_queued`,
//!   `kiln_scheduler_executing`, `kiln_scheduler_operations`,
//!   `kiln_scheduler_workers`, `kiln_scheduler_connected_workers`.
//!
//! The gRPC and HTTP listeners of one server share one [`ServerMetrics`],
//! found through the `Arc<Instances>` both are given ([`shared`]).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use kiln_scheduler::Scheduler;
use kiln_store::Store;
use pin_project_lite::pin_project;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The Content-Type of the text exposition produced by [`encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Distinct `method` label values kept before further ones become
/// `"other"`: a client choosing paths cannot grow the metrics unboundedly.
const MAX_METHODS: usize = 128;

/// Services whose paths are used as `method` labels as they are.
const KNOWN_SERVICES: &[&str] = &[
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.Execution",
    "google.bytestream.ByteStream",
    "google.longrunning.Operations",
    "kiln.worker.v1.WorkerApi",
    "grpc.health.v1.Health",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    method: String,
    code: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~105 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// Per-method gRPC counters; cheap to clone (the families share state).
#[derive(Clone, Debug)]
struct GrpcFamilies {
    requests: Family<MethodLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

/// Everything one server's listeners share.
#[derive(Debug)]
pub struct ServerMetrics {
    grpc: GrpcFamilies,
    methods: Mutex<HashSet<String>>,
    scheduler: Mutex<Option<Weak<Scheduler>>>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// Empty metrics for one server; its listeners share them.
    pub fn new() -> Self {
        ServerMetrics {
            grpc: GrpcFamilies {
                requests: Family::default(),
                errors: Family::default(),
                duration: Family::new_with_constructor(latency_histogram),
            },
            methods: Mutex::new(HashSet::new()),
            scheduler: Mutex::new(None),
        }
    }

    /// Remembers the scheduler whose state `/metrics` reports.
    pub fn set_scheduler(&self, scheduler: &Arc<Scheduler>) {
        let mut slot = self.scheduler.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Arc::downgrade(scheduler));
    }

    fn scheduler(&self) -> Option<Arc<Scheduler>> {
        let slot = self.scheduler.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().and_then(Weak::upgrade)
    }

    /// The `method` label for a request path such as
    /// `/build.bazel.remote.execution.v2.ActionCache/GetActionResult`.
    fn method_label(&self, path: &str) -> String {
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return "other".into();
        };
        let plausible = !method.is_empty()
            && method.len() <= 64
            && method.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !KNOWN_SERVICES.contains(&service) || !plausible {
            return "other".into();
        }
        let label = format!("{service}/{method}");
        let mut methods = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        if methods.contains(&label) {
            return label;
        }
        if methods.len() >= MAX_METHODS {
            return "other".into();
        }
        methods.insert(label.clone());
        label
    }

    /// The tower layer counting calls into these metrics.
    pub fn grpc_layer(self: &Arc<Self>) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: self.clone(),
        }
    }
}

/// Latest scheduler numbers, filled by the `/metrics` handler.
#[derive(Debug, Clone, Copy)]
struct SchedulerSnapshot {
    queued: u64,
    executing: u64,
    operations: u64,
    workers: u64,
    connected_workers: u64,
}

#[derive(Debug, Default)]
struct SchedulerCollector {
    last: Mutex<Option<SchedulerSnapshot>>,
}

impl Collector for SchedulerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = snapshot else {
            return Ok(());
        };
        let gauges: [(&str, &str, u64); 5] = [
            (
                "kiln_scheduler_queued",
                "Actions queued, waiting for a worker.",
                s.queued,
            ),
            (
                "kiln_scheduler_executing",
                "Actions assigned to a worker.",
                s.executing,
            ),
            (
                "kiln_scheduler_operations",
                "Operations known (running and retained completed ones).",
                s.operations,
            ),
            (
                "kiln_scheduler_workers",
                "Workers known to the scheduler.",
                s.workers,
            ),
            (
                "kiln_scheduler_connected_workers",
                "Workers with an open connection.",
                s.connected_workers,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: String,
}

/// Every named store's [`Store::stats`], read at scrape time.
struct StoreCollector {
    stores: Arc<BTreeMap<String, Arc<dyn Store>>>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCollector")
            .field("stores", &self.stores.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats: Vec<(StoreLabels, kiln_store::StoreStats)> = self
            .stores
            .iter()
            .map(|(name, store)| (StoreLabels { store: name.clone() }, store.stats()))
            .collect();
        type Pick = fn(&kiln_store::StoreStats) -> u64;
        let gauges: [(&str, &str, Pick); 4] = [
            ("kiln_store_bytes", "Payload bytes held by the store.", |s| {
                s.bytes
            }),
            ("kiln_store_items", "Items held by the store.", |s| s.items),
            (
                "kiln_store_capacity_bytes",
                "The store's capacity in bytes (0 = unbounded).",
                |s| s.capacity,
            ),
            (
                "kiln_store_oldest_age_seconds",
                "Seconds since the least recently used item was last used.",
                |s| s.oldest_age_secs,
            ),
        ];
        for (name, help, pick) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, s) in &stats {
                ConstGauge::new(pick(s)).encode(metric.encode_family(labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "kiln_store_evictions",
            "Items the store has evicted.",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in &stats {
            ConstCounter::new(s.evictions).encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// The registry `/metrics` encodes, built once by the HTTP listener.
#[derive(Debug)]
pub struct MetricsRegistry {
    registry: Registry,
    server: Arc<ServerMetrics>,
    scheduler: Arc<SchedulerCollector>,
}

impl MetricsRegistry {
    pub fn new(server: Arc<ServerMetrics>, stores: Arc<BTreeMap<String, Arc<dyn Store>>>) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "kiln_grpc_requests",
            "gRPC calls received, by method.",
            server.grpc.requests.clone(),
        );
        registry.register(
            "kiln_grpc_errors",
            "gRPC calls that ended with a non-OK status, by method and status code.",
            server.grpc.errors.clone(),
        );
        registry.register_with_unit(
            "kiln_grpc_request_duration",
            "Time from a gRPC call's arrival to its response headers.",
            Unit::Seconds,
            server.grpc.duration.clone(),
        );
        registry.register_collector(Box::new(StoreCollector { stores }));
        let scheduler = Arc::new(SchedulerCollector::default());
        registry.register_collector(Box::new(scheduler.clone()));
        MetricsRegistry {
            registry,
            server,
            scheduler,
        }
    }

    /// Refreshes the scrape-time values and encodes everything as text.
    pub async fn encode(&self) -> Result<String, std::fmt::Error> {
        let snapshot = match self.server.scheduler() {
            Some(s) => {
                let st = s.stats().await;
                let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
                Some(SchedulerSnapshot {
                    queued: n(st.queued),
                    executing: n(st.executing),
                    operations: n(st.operations),
                    workers: n(st.workers),
                    connected_workers: n(st.connected_workers),
                })
            }
            None => None,
        };
        *self.scheduler.last.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
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

/// One call whose status is not yet known.
struct Pending {
    families: GrpcFamilies,
    method: String,
}

impl Pending {
    fn record(self, code: tonic::Code) {
        if code != tonic::Code::Ok {
            self.families
                .errors
                .get_or_create(&ErrorLabels {
                    method: self.method,
                    code: format!("{code:?}"),
                })
                .inc();
        }
    }
}

/// A tower layer counting gRPC calls; see the module documentation.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<ServerMetrics>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<ServerMetrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = self.metrics.method_label(req.uri().path());
        let families = self.metrics.grpc.clone();
        families
            .requests
            .get_or_create(&MethodLabels {
                method: method.clone(),
            })
            .inc();
        MetricsFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            pending: Some(Pending { families, method }),
        }
    }
}

pin_project! {
    /// The response future of [`GrpcMetricsService`].
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        pending: Option<Pending>,
    }
}

impl<F, B, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<MetricsBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let pending = this.pending.take();
        if let Some(p) = &pending {
            p.families
                .duration
                .get_or_create(&MethodLabels {
                    method: p.method.clone(),
                })
                .observe(this.start.elapsed().as_secs_f64());
        }
        Poll::Ready(result.map(|response| {
            // A trailers-only response carries its status in the headers.
            let pending = match (pending, grpc_code(response.headers())) {
                (Some(p), Some(code)) => {
                    p.record(code);
                    None
                }
                (p, _) => p,
            };
            response.map(|inner| MetricsBody { inner, pending })
        }))
    }
}

pin_project! {
    /// A response body that records the `grpc-status` of its trailers.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
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
        let m = ServerMetrics::new();
        assert_eq!(
            m.method_label("/build.bazel.remote.execution.v2.ActionCache/GetActionResult"),
            "build.bazel.remote.execution.v2.ActionCache/GetActionResult"
        );
        assert_eq!(m.method_label("/evil.Service/Anything"), "other");
        assert_eq!(m.method_label("/google.bytestream.ByteStream/a b"), "other");
        assert_eq!(m.method_label("nonsense"), "other");
        for i in 0..MAX_METHODS + 10 {
            m.method_label(&format!("/google.bytestream.ByteStream/M{i}"));
        }
        assert_eq!(m.method_label("/google.bytestream.ByteStream/New"), "other");
        assert!(m.methods.lock().unwrap().len() <= MAX_METHODS);
    }

    #[test]
    fn grpc_status_is_read_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_code(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_code(&h), Some(tonic::Code::NotFound));
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
        let m = ServerMetrics::new();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        let mut body = Box::pin(MetricsBody {
            inner: TrailersBody(Some(trailers)),
            pending: Some(Pending {
                families: m.grpc.clone(),
                method: "google.bytestream.ByteStream/Read".into(),
            }),
        });
        futures::executor::block_on(async {
            while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                assert!(frame.is_ok());
            }
        });
        let labels = ErrorLabels {
            method: "google.bytestream.ByteStream/Read".into(),
            code: "Internal".into(),
        };
        assert_eq!(m.grpc.errors.get_or_create(&labels).get(), 1);
    }
}
