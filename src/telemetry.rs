//! Builds the tracing subscriber, once, at startup: logs on standard error and, when an
//! OTLP endpoint is given, the spans of every call exported as OpenTelemetry traces over
//! OTLP/gRPC.
//!
//! The logs keep their filter (`RUST_LOG`, `info` by default). The traces take the
//! service's own spans down to `debug`: the call (`rpc`, continuing the W3C
//! `traceparent` a client sent), the service step (the use case, e.g. `create_user`) and
//! the database work (the storage method, e.g. `insert_user`, `db.system` postgresql).
//! Those spans record no arguments, so no SQL parameter or request field reaches a
//! collector. With no endpoint the debug spans are never built: they cost nothing.

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::config::LogFormat;

static TRACES: AtomicBool = AtomicBool::new(false);

/// Whether calls are traced (an OTLP endpoint was given): only then is a client's
/// `traceparent` read.
pub fn traces_on() -> bool {
    TRACES.load(Ordering::Relaxed)
}

/// What must outlive the process's work: the trace exporter, flushed by [`Self::shutdown`].
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans not yet exported (waits for the exporter, a few seconds at most).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "the last spans could not be exported");
        }
    }
}

/// Where traces go, and the share of calls traced that no client's `traceparent` asked
/// to be (1.0: every call).
#[derive(Debug, Clone)]
pub struct Otlp {
    /// e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    pub sample_ratio: f64,
}

/// Installs the global subscriber; `otlp` turns trace export on. `RUST_LOG` overrides the logs' default filter. Call it inside the
/// Tokio runtime (the exporter runs on it).
pub fn init(format: LogFormat, otlp: Option<&Otlp>) -> anyhow::Result<Telemetry> {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "info,sqlx=warn,h2=warn,tower=warn".to_owned());
    let ansi = std::io::stderr().is_terminal();
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_filter(EnvFilter::new(&directives)),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_filter(EnvFilter::new(&directives)),
            ),
        ),
    };
    let (everything, traces, provider) = match otlp {
        None => (None, None, None),
        Some(Otlp {
            endpoint,
            sample_ratio,
        }) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("cannot export traces to {endpoint}"))?;
            // A call the client traces is traced; of the others, this share.
            let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(*sample_ratio)));
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(sampler)
                .with_resource(
                    Resource::builder()
                        .with_service_name("krisp-ingest")
                        .build(),
                )
                .build();
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            let traces =
                tracing_opentelemetry::layer().with_tracer(provider.tracer("krisp-ingest"));
            // The traces' filter is the whole subscriber's: what the logs show, and the
            // service's own spans down to debug. (As a filter of the traces' layer
            // alone, it let the service's debug spans through but lost the calls' spans.)
            let everything = EnvFilter::new(format!("{directives},krisp_ingest=debug"));
            (Some(everything), Some(traces), Some(provider))
        }
    };
    // try_init: a second call (as in tests) keeps the first subscriber.
    if tracing_subscriber::registry()
        .with(everything)
        .with(text)
        .with(json)
        .with(traces)
        .try_init()
        .is_ok()
    {
        TRACES.store(provider.is_some(), Ordering::Relaxed);
    }
    Ok(Telemetry { provider })
}
