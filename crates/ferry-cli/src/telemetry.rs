//! The process's `tracing` subscriber: logs on stderr, and, once a config with
//! `[tracing] otlp_endpoint` is read, the spans (the relay's batches, their publish and
//! mark) exported over OTLP/HTTP by a batch exporter, flushed at shutdown.
//!
//! Logging starts before the config is read (so that reading it can log); the exporting
//! layer is slotted in afterwards through a reload handle. The log filter (`FERRY_LOG`)
//! applies to both: the relay's spans are at info level, idle fetches at debug.

use anyhow::Context;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::TracingSection;

type ExportLayer = OpenTelemetryLayer<Registry, SdkTracer>;

/// What [`init_logging`] installed: a slot for exporting spans.
pub struct Telemetry {
    export: reload::Handle<Option<ExportLayer>, Registry>,
}

/// By hand: the exporting layer has no `Debug`.
impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// Logs to stderr, filtered by `FERRY_LOG` (e.g. `ferry=debug`), else `default_level`.
pub fn init_logging(json: bool, default_level: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let (export, handle) = reload::Layer::new(None::<ExportLayer>);
    // Colour codes only where a person reads them, not in files or collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (!json).then(|| fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
    let json = json.then(|| fmt::layer().json().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(export)
        .with(text)
        .with(json)
        .with(filter)
        .init();
    Telemetry { export: handle }
}

impl Telemetry {
    /// Starts exporting spans as `section` says; `None` if it sets no endpoint.
    pub fn export_spans(&self, section: &TracingSection) -> anyhow::Result<Option<SpanExport>> {
        let Some(url) = section.traces_url()? else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.as_str())
            .build()
            .with_context(|| format!("cannot export spans to {url}"))?;
        let resource = Resource::builder()
            .with_service_name(section.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("ferry"));
        self.export
            .reload(Some(layer))
            .context("installing the span exporter")?;
        tracing::info!(endpoint = %url, service_name = %section.service_name, "exporting spans over OTLP");
        Ok(Some(SpanExport { provider }))
    }
}

/// Spans being exported; [`SpanExport::shutdown`] sends what is still queued.
#[derive(Debug)]
pub struct SpanExport {
    provider: SdkTracerProvider,
}

impl SpanExport {
    /// Flushes the queued spans and stops the exporter (on a thread of its own: the SDK's
    /// exporter blocks).
    pub async fn shutdown(self) {
        let provider = self.provider;
        let outcome = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match outcome {
            Ok(Ok(())) => tracing::debug!("span export flushed"),
            Ok(Err(err)) => tracing::warn!(error = %err, "flushing the span export failed"),
            Err(err) => tracing::warn!(error = %err, "flushing the span export failed"),
        }
    }
}
