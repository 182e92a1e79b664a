//! Logs, traces and metrics. Logs: `tracing` to stderr through a non-blocking writer (a
//! dedicated thread does the writes, so no task ever blocks on a slow stderr; under a flood
//! lines are dropped rather than waited for), filtered by `RUST_LOG` (default `info`), pretty
//! (coloured only when stderr is a terminal and `NO_COLOR` is unset) or JSON (fields carry
//! plain values: numbers, strings written with `Display`, never Rust's `Debug` text). Traces:
//! the same spans exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (off
//! otherwise), with W3C trace context propagation.
//! Metrics: see `metrics`.

mod collector;
pub mod grpc_layer;
pub mod histogram;
pub mod metrics;
mod process;

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

/// Flushes and stops trace export when the server ends.
#[must_use = "dropping the guard does not flush; call shutdown() before exiting"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// Flushes the log writer's queue when dropped.
    _logs: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl TelemetryGuard {
    pub fn shutdown(self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "trace export did not shut down cleanly");
        }
    }
}

/// Installs the global subscriber (logs, and traces if configured). Does nothing if one is
/// installed already (tests).
pub fn init(format: LogFormat) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // 8,192 lines of backlog (the default 128k pre-allocates 4 MB for a burst we would rather
    // drop: a log line is never worth blocking or holding memory for).
    let (writer, logs) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(8192)
        .finish(std::io::stderr());
    let fmt_layer = fmt::layer().with_writer(writer).with_ansi(colour());
    let fmt_layer = match format {
        LogFormat::Pretty => fmt_layer.boxed(),
        LogFormat::Json => fmt_layer.json().flatten_event(true).boxed(),
    };
    let (otel_layer, provider, otel_error) = match otel_provider() {
        Ok(Some(provider)) => {
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("ssegate"));
            (Some(layer), Some(provider), None)
        }
        Ok(None) => (None, None, None),
        Err(e) => (None, None, Some(e)),
    };
    let installed = tracing_subscriber::registry().with(fmt_layer.with_filter(filter)).with(otel_layer).try_init();
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "OTLP trace export is off: its exporter could not be built");
    }
    if installed.is_ok() && provider.is_some() {
        tracing::info!(endpoint = otlp_endpoint().unwrap_or_default(), "exporting traces over OTLP");
    }
    // If a subscriber was installed already, ours is unused: its writer thread can stop.
    TelemetryGuard { provider, _logs: installed.is_ok().then_some(logs) }
}

/// Whether the pretty format may colour its output: only on a terminal (a file or a pipe
/// would get the escape codes as text), and not when `NO_COLOR` is set (no-color.org).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The OTLP endpoint traces go to, if one is set: the traces-specific variable first (it wins
/// in the exporter too), then the general one.
fn otlp_endpoint() -> Option<String> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|s| !s.is_empty()))
        .map(|s| s.to_string_lossy().into_owned())
}

/// A tracer provider exporting over OTLP/gRPC, if `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
/// traces-specific variable) is set. The exporter reads the standard OTEL_* variables itself;
/// the service name defaults to `ssegate` unless `OTEL_SERVICE_NAME` says otherwise.
fn otel_provider() -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    if otlp_endpoint().is_none() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("ssegate");
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build()))
}
