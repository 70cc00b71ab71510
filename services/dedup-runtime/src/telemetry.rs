//! Logging and tracing setup: structured JSON log lines by default (human-readable text on
//! request), level from `RUST_LOG`, and OpenTelemetry traces exported over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set — and not even built otherwise.

use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

/// Where OTLP traces go; tracing is on when it (or the traces-only variant) is set.
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The OpenTelemetry SDK's own variables every binary reads from the environment (they are
/// not flags).
pub const SDK_VARIABLES: [&str; 4] = [
    OTLP_ENDPOINT,
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
];

/// Logging settings shared by every binary. Tracing follows the standard OpenTelemetry
/// variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_SDK_DISABLED`).
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format. The level is set with RUST_LOG (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

/// Keeps the trace exporter alive; dropping it flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("could not flush the last trace spans: {e}");
        }
    }
}

/// Whether the environment asks for OTLP trace export.
pub fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set(OTLP_ENDPOINT) || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber. Call once, first thing in `main`, inside the runtime.
pub fn init(args: &LogArgs, service: &'static str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = if otlp_requested() {
        Some(otlp_provider(service)?)
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(log_layer(args.log_format))
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    if provider.is_some() {
        tracing::info!(service, "Exporting traces over OTLP.");
    }
    Ok(Telemetry { provider })
}

fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_target(true);
    match format {
        // Span fields (trace_id among them) ride along on every line.
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Text => layer.compact().boxed(),
    }
}

fn otlp_provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| {
            anyhow::anyhow!("cannot build the OTLP exporter from OTEL_EXPORTER_OTLP_ENDPOINT: {e}")
        })?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service);
    }
    // The batch processor runs as a task on the process's tokio runtime: the hyper-based
    // exporter needs a tokio reactor for its timeouts, which the SDK's default processor (a
    // plain thread) does not have — it panics on its first export and every span is lost.
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}
