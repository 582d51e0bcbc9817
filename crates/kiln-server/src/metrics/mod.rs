//! Prometheus metrics served at `GET /metrics` (every metric, its labels
//! and meaning: docs/metrics.md).
//!
//! * gRPC calls, counted by the tower layer of [`grpc_calls`], which also
//!   wraps each call in a tracing span.
//! * Cache activity ([`cache`]) and stores ([`stores`]), read at scrape time.
//! * Scheduler state ([`scheduler`]) and finished actions ([`actions`]),
//!   when remote execution is enabled.
//!
//! The gRPC and HTTP listeners of one server share one [`ServerMetrics`].
//! With `[server] metrics = false` nothing is counted per call (the layer
//! only opens spans) and `/metrics` answers 404.

mod actions;
mod cache;
pub mod grpc_calls;
mod scheduler;
mod stores;

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use kiln_cache::Instances;
use kiln_scheduler::Scheduler;
use kiln_store::Store;
use parking_lot::Mutex;
use prometheus_client::registry::{Registry, Unit};

pub use grpc_calls::GrpcLayer;

/// The Content-Type of the text exposition produced by [`MetricsRegistry::encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything one server's listeners share.
#[derive(Debug)]
pub struct ServerMetrics {
    enabled: bool,
    grpc: grpc_calls::GrpcMetrics,
    actions: Arc<actions::ActionMetrics>,
    scheduler: Mutex<Option<Weak<Scheduler>>>,
}

impl ServerMetrics {
    /// Metrics that are collected and served only when `enabled`.
    pub fn with_enabled(enabled: bool) -> Self {
        ServerMetrics {
            enabled,
            grpc: grpc_calls::GrpcMetrics::new(),
            actions: Arc::new(actions::ActionMetrics::new()),
            scheduler: Mutex::new(None),
        }
    }

    /// Whether metrics are collected and served.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Remembers the scheduler whose state `/metrics` reports and, when
    /// enabled, observes its finished actions. Call before the HTTP
    /// listener builds its [`MetricsRegistry`].
    pub fn set_scheduler(&self, scheduler: &Arc<Scheduler>) {
        *self.scheduler.lock() = Some(Arc::downgrade(scheduler));
        if self.enabled {
            scheduler.add_observer(self.actions.clone());
        }
    }

    fn scheduler(&self) -> Option<Arc<Scheduler>> {
        self.scheduler.lock().as_ref().and_then(Weak::upgrade)
    }

    /// The tower layer every gRPC call passes through: counting (when
    /// enabled) and the per-call tracing span.
    pub fn grpc_layer(self: &Arc<Self>) -> GrpcLayer {
        GrpcLayer::new(self.enabled.then(|| self.clone()))
    }
}

/// The registry `/metrics` encodes, built once by the HTTP listener.
#[derive(Debug)]
pub struct MetricsRegistry {
    registry: Registry,
    server: Arc<ServerMetrics>,
    scheduler: Arc<scheduler::SchedulerCollector>,
}

impl MetricsRegistry {
    pub fn new(
        server: Arc<ServerMetrics>,
        instances: &Instances,
        stores: Arc<BTreeMap<String, Arc<dyn Store>>>,
    ) -> Self {
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
        if server.scheduler().is_some() {
            server.actions.register(&mut registry);
        }
        registry.register_collector(Box::new(cache::CacheCollector {
            counters: instances.counters().clone(),
        }));
        registry.register_collector(Box::new(stores::StoreCollector { stores }));
        let scheduler = Arc::new(scheduler::SchedulerCollector::default());
        registry.register_collector(Box::new(scheduler.clone()));
        MetricsRegistry {
            registry,
            server,
            scheduler,
        }
    }

    /// Whether `/metrics` is served.
    pub fn enabled(&self) -> bool {
        self.server.enabled
    }

    /// Refreshes the scrape-time values and encodes everything as text.
    pub async fn encode(&self) -> Result<String, std::fmt::Error> {
        let snapshot = match self.server.scheduler() {
            Some(s) => Some(s.stats().await),
            None => None,
        };
        *self.scheduler.last.lock() = snapshot;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
