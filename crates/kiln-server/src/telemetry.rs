//! Logging and trace export for the `kiln` process.
//!
//! * Logs go to stderr, human-readable by default or one JSON object per
//!   line. Both show the fields of the spans a line is emitted in, so with
//!   the per-call span enabled (`kiln::grpc=debug`, e.g. `--log-level
//!   info,kiln::grpc=debug`) a log line inside a gRPC call carries the
//!   call's method and RequestMetadata (see [`crate::metrics::grpc_calls`]).
//! * A log line emitted inside a gRPC call (by the call's handler or while
//!   its response streams) also shows the call: its `method` and the
//!   client's RequestMetadata (`tool_invocation_id`,
//!   `correlated_invocations_id`, `action_mnemonic`, `target_id`), at every
//!   level, from [`crate::call_context`] — appended as `request{...}` to a
//!   human line, as a `request` object in JSON. (When the per-call DEBUG
//!   span is enabled its fields already show them and nothing is added.)
//!   Such human lines are written without colours.
//! * The filter (tracing `EnvFilter` syntax, e.g. `info` or
//!   `warn,kiln::grpc=info`) comes from `--log-level`, else the `KILN_LOG`
//!   environment variable, else `RUST_LOG`, else `info`.
//! * Spans are exported with OpenTelemetry OTLP/HTTP (protobuf) when an
//!   endpoint is configured (`[server] otlp_endpoint`, or the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
//!   The exporter has its own filter (every span at `info` and above, and
//!   the per-call `kiln::grpc` spans), independent of the log filter. Spans are batched by the SDK's
//!   processor thread (`OTEL_BSP_*` variables apply) and flushed when the
//!   [`Telemetry`] guard is dropped. The SDK's own diagnostics (e.g. a
//!   failed export) are logged like any event (targets `opentelemetry_sdk`,
//!   `opentelemetry-otlp`).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

use crate::ServerError;
use crate::call_context;

/// Environment variables read for the log filter, in order.
pub const LOG_ENV_VARS: [&str; 2] = ["KILN_LOG", "RUST_LOG"];
/// The filter when neither the flag nor an environment variable sets one.
pub const DEFAULT_LOG_FILTER: &str = "info";
/// Standard OpenTelemetry variables that enable export without a config key.
const OTLP_ENV_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event, with span fields.
    #[default]
    Human,
    /// One JSON object per event (`timestamp`, `level`, `fields`, `target`,
    /// `span`, `spans`).
    Json,
}

/// How to set up logging and export.
#[derive(Debug, Clone, Default)]
pub struct TelemetryOptions {
    /// `--log-level`; `None` falls back to the environment, then `info`.
    pub filter: Option<String>,
    pub format: LogFormat,
    /// `[server] otlp_endpoint`: the OTLP/HTTP base URL (`/v1/traces` is
    /// appended).
    pub otlp_endpoint: Option<String>,
}

/// Keeps the trace exporter alive; dropping it flushes pending spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("kiln: flushing trace export failed: {e}");
        }
    }
}

fn telemetry_error(context: &str, detail: impl std::fmt::Display) -> ServerError {
    ServerError::Telemetry {
        context: context.into(),
        detail: detail.to_string(),
    }
}

/// The log filter text: the flag, else the first set environment variable,
/// else [`DEFAULT_LOG_FILTER`].
fn filter_text(flag: Option<&str>) -> String {
    if let Some(f) = flag {
        return f.to_string();
    }
    LOG_ENV_VARS
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string())
}

/// Whether the environment asks for OTLP export.
fn otlp_from_env() -> bool {
    OTLP_ENV_VARS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

fn build_provider(endpoint: Option<&str>) -> Result<SdkTracerProvider, ServerError> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(base) = endpoint {
        builder = builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = builder
        .build()
        .map_err(|e| telemetry_error("building the OTLP span exporter", e))?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("kiln");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Installs the global subscriber. Call once, before the async runtime
/// starts. Fails on a malformed filter or an unusable OTLP endpoint.
pub fn init(options: &TelemetryOptions) -> Result<Telemetry, ServerError> {
    let text = filter_text(options.filter.as_deref());
    let filter =
        EnvFilter::try_new(&text).map_err(|e| telemetry_error(&format!("log filter {text:?}"), e))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match options.format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .event_format(WithCall {
                inner: tracing_subscriber::fmt::format::Format::default().with_ansi(ansi),
                json: false,
            })
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .event_format(WithCall {
                inner: tracing_subscriber::fmt::format::Format::default().json(),
                json: true,
            })
            .boxed(),
    };
    let endpoint = options
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    if endpoint.is_none() && !otlp_from_env() {
        // Disabled spans and events cost one cached callsite check.
        Registry::default()
            .with(fmt.with_filter(filter))
            .try_init()
            .map_err(|e| telemetry_error("installing the log subscriber", e))?;
        return Ok(Telemetry { provider: None });
    }
    let provider = build_provider(endpoint)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("kiln"))
        .with_filter(Targets::new().with_default(tracing::Level::INFO).with_target(
            crate::metrics::grpc_calls::SPAN_TARGET,
            crate::metrics::grpc_calls::SPAN_LEVEL,
        ));
    Registry::default()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| telemetry_error("installing the log subscriber", e))?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// An event formatter adding the current gRPC call's fields (see the
/// module documentation) to what `inner` writes.
struct WithCall<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithCall<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let call = call_context::current();
        let in_call_span = || {
            ctx.event_scope().is_some_and(|mut scope| {
                scope.any(|span| {
                    span.name() == "grpc"
                        && span.metadata().target() == crate::metrics::grpc_calls::SPAN_TARGET
                })
            })
        };
        let Some(call) = call.filter(|_| !in_call_span()) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let fields = call.log_fields();
        let body = line.trim_end_matches('\n');
        if self.json
            && let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str::<serde_json::Value>(body)
        {
            let request: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                .collect();
            object.insert("request".into(), serde_json::Value::Object(request));
            return writeln!(writer, "{}", serde_json::Value::Object(object));
        }
        // Client-supplied strings: control characters escaped, so that a
        // RequestMetadata field cannot forge log lines or terminal codes.
        let shown: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("{k}={}", v.escape_debug()))
            .collect();
        writeln!(writer, "{body} request{{{}}}", shown.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_filter_is_an_error() {
        let options = TelemetryOptions {
            filter: Some("kiln=notalevel".into()),
            ..Default::default()
        };
        let e = init(&options).err().expect("a malformed filter is refused");
        assert!(e.to_string().contains("kiln=notalevel"), "{e}");
    }
}
