//! OpenTelemetry trace export (`[tracing]`): one server span per proxied request, with child
//! spans for token verification (cache misses only), JWKS fetches, Backend API calls and the
//! upstream call, exported in batches over OTLP/HTTP (protobuf) by a task on the runtime.
//!
//! Off by default, and then free: every span here is built only after [`enabled`] (one relaxed
//! atomic load) said yes, so the request path creates no span, allocates nothing for tracing and
//! never asks the subscriber. When on, the spans carry the target [`TARGET`]: the log layer's
//! filter excludes it (log lines keep their shape, and it costs the log layer nothing), and the
//! OpenTelemetry layer sees nothing else (no log event becomes a span event).
//!
//! Attributes come from closed sets: the method, the path without its query, status codes,
//! closed labels (outcome, reason, endpoint, error type) and the request id. Never a token, a
//! cookie, a query string, a user or session id: the Backend API span names its endpoint label,
//! not its URL, which carries ids.
//!
//! Export never blocks a request: a finished span is a `try_send` into a bounded queue (full:
//! the span is dropped and counted by the SDK); the batch task posts to the collector with
//! `timeout_ms`. [`Exporter::shutdown`] flushes after the drain, bounded by the same timeout.
//!
//! Context: a client's W3C `traceparent` (and `tracestate`) is the request span's parent; the
//! upstream receives a `traceparent` naming the upstream-call span, so the backend's spans are
//! its children (W3C Trace Context, <https://www.w3.org/TR/trace-context/>). Clerk's Backend
//! API is not sent one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;

use crate::config::error::ConfigError;
use crate::secret::Secret;

/// The target of every span exported; nothing else is.
pub(crate) const TARGET: &str = "clerkgate::otel";

/// Set once the exporter started (and never again in tests that run the library in-process
/// without one, so their request path stays span-free).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported. The one check on the request path when tracing is off.
#[inline]
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `[tracing]`: OpenTelemetry trace export.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// OTLP/HTTP collector URL; empty disables export. A base URL (`http://collector:4318`)
    /// gets `/v1/traces` appended (OTLP/HTTP spec); a URL already ending in `/v1/traces` is
    /// used as it is. `OTEL_EXPORTER_OTLP_ENDPOINT` sets it too.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans (`OTEL_SERVICE_NAME` sets it too).
    pub service_name: String,
    /// Share of new traces recorded, 0.0 to 1.0. A request with a `traceparent` follows its
    /// caller's sampled flag instead (parent-based sampling).
    pub sample_ratio: f64,
    /// Timeout of one export request to the collector, and the bound of the flush at exit.
    pub timeout_ms: u64,
    /// Extra headers on export requests (a collector's API key); values are secrets.
    pub headers: BTreeMap<String, Secret>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "clerkgate".into(),
            sample_ratio: 1.0,
            timeout_ms: 3_000,
            headers: BTreeMap::new(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.traces_url()?;
        if self.service_name.trim().is_empty() {
            return Err(ConfigError::new(
                "tracing.service_name",
                "must not be empty",
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::new(
                "tracing.sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::new("tracing.timeout_ms", "must be at least 1"));
        }
        for (name, value) in &self.headers {
            let key = format!("tracing.headers.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::new(key, "not a valid header name"));
            }
            if http::HeaderValue::from_str(value.expose()).is_err() {
                return Err(ConfigError::new(key, "not a valid header value"));
            }
        }
        Ok(())
    }

    /// The traces URL, `None` when export is off.
    pub fn traces_url(&self) -> Result<Option<reqwest::Url>, ConfigError> {
        const KEY: &str = "tracing.otlp_endpoint";
        let raw = self.otlp_endpoint.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        let mut url = reqwest::Url::parse(raw).map_err(|e| ConfigError::new(KEY, e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConfigError::new(
                KEY,
                "must be an http:// or https:// URL with a host (OTLP/HTTP, usually port 4318)",
            ));
        }
        if !url.path().ends_with("/v1/traces") {
            let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        Ok(Some(url))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// The log subscriber's extra layer: the OpenTelemetry bridge, seeing only [`TARGET`] spans.
pub(crate) type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync + 'static>;

/// The running export pipeline.
pub(crate) struct Exporter {
    provider: SdkTracerProvider,
    timeout: Duration,
}

impl Exporter {
    /// Builds the exporter and the layer to install with the log subscriber, or `None` when
    /// `otlp_endpoint` is empty. Runs inside the tokio runtime: the batch processor is a task on
    /// it.
    pub(crate) fn start(config: &Config) -> Result<Option<(Exporter, BoxedLayer)>, ConfigError> {
        let Some(url) = config.traces_url()? else {
            return Ok(None);
        };
        let timeout = config.timeout();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("clerkgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::new("tracing.otlp_endpoint", format!("HTTP client: {e}")))?;
        let headers: HashMap<String, String> = config
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_owned()))
            .collect();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url.as_str())
            .with_timeout(timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| ConfigError::new("tracing.otlp_endpoint", e.to_string()))?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("clerkgate"))
            // Attributes are the ones set below, nothing about threads or source files.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            // Contexts are read from the spans (`context()`), never from an active context.
            .with_context_activation(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.target() == TARGET
            }));
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Some((Exporter { provider, timeout }, Box::new(layer))))
    }

    /// Stops creating spans and flushes what is queued, waiting at most `timeout_ms`. Call after
    /// the drain, when the last requests' spans have ended.
    pub(crate) async fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        let provider = self.provider;
        // `shutdown` blocks until the batch task (on this runtime) has exported: off the
        // runtime's threads, or a one-worker runtime would wait on itself.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(self.timeout, flush).await {
            Ok(Ok(Ok(()))) => tracing::debug!("spans flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "span export at exit failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "span flush task failed"),
            Err(_) => tracing::warn!(
                timeout_ms = self.timeout.as_millis() as u64,
                "span flush at exit timed out; the rest is dropped"
            ),
        }
    }
}

/// The log layer's filter addition: every span of [`TARGET`] is the exporter's alone.
pub(crate) fn not_exported(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() != TARGET
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The method as OpenTelemetry's semantic conventions name it: the known ones, else `_OTHER`
/// (a client's invented method must not become an unbounded attribute).
fn method_name(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::CONNECT => "CONNECT",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::TRACE => "TRACE",
        http::Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

/// The server span of one request (only when [`enabled`]), a child of the client's
/// `traceparent` when it sent a valid one.
pub(crate) fn request_span<B>(req: &http::Request<B>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "clerkgate.request",
        otel.kind = "server",
        "http.request.method" = method_name(req.method()),
        "url.path" = req.uri().path(),
        "http.response.status_code" = Empty,
        "clerkgate.outcome" = Empty,
        "clerkgate.reason" = Empty,
        "clerkgate.request_id" = Empty,
        otel.status_code = Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

/// Closes the request span's attributes with the response (a 5xx is an error, per the HTTP
/// semantic conventions for servers).
pub(crate) fn record_response(span: &Span, status: http::StatusCode, request_id: Option<&str>) {
    span.record("http.response.status_code", status.as_u16());
    if let Some(id) = request_id {
        span.record("clerkgate.request_id", id);
    }
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
}

/// Records how the current request ended (its `clerkgate_requests_total` outcome and the
/// refusal's reason code) on the request span. A no-op when off.
pub(crate) fn record_outcome(outcome: &'static str, reason: Option<&'static str>) {
    if !enabled() {
        return;
    }
    let span = Span::current();
    span.record("clerkgate.outcome", outcome);
    if let Some(reason) = reason {
        span.record("clerkgate.reason", reason);
    }
}

/// A token verification that missed the cache (signature, claims, maybe a key refetch).
pub(crate) fn verify_span() -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "clerkgate.verify",
        otel.kind = "internal",
        "error.type" = Empty,
        otel.status_code = Empty,
    )
}

/// A JWKS fetch (start-up, background refresh, or an unknown-kid refetch inside a
/// verification).
pub(crate) fn jwks_fetch_span() -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "clerkgate.jwks_fetch",
        otel.kind = "client",
        "http.request.method" = "GET",
        "error.type" = Empty,
        otel.status_code = Empty,
    )
}

/// One Backend API attempt, named by its endpoint label (never its URL: ids are in it).
pub(crate) fn backend_api_span(endpoint: &'static str, method: &http::Method) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "clerkgate.backend_api",
        otel.kind = "client",
        "clerkgate.endpoint" = endpoint,
        "http.request.method" = method_name(method),
        "http.response.status_code" = Empty,
        "clerkgate.result" = Empty,
        "error.type" = Empty,
        otel.status_code = Empty,
    )
}

/// Records a Backend API attempt's status (when one came back) and result label.
pub(crate) fn record_backend_api(span: &Span, status: Option<u16>, result: &'static str) {
    if let Some(status) = status {
        span.record("http.response.status_code", status);
    }
    span.record("clerkgate.result", result);
}

/// The upstream call, a child of the current (request) span. Its context replaces the
/// request's `traceparent`, so the backend's spans hang below it.
pub(crate) fn upstream_span<B>(req: &mut http::Request<B>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "clerkgate.upstream",
        otel.kind = "client",
        "http.request.method" = method_name(req.method()),
        "http.response.status_code" = Empty,
        "error.type" = Empty,
        otel.status_code = Empty,
    );
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(req.headers_mut()));
    }
    span
}

/// Records the upstream's response status on its span.
pub(crate) fn record_status(span: &Span, status: http::StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
}

/// Marks a span failed with a closed error label.
pub(crate) fn record_error(span: &Span, error: &'static str) {
    span.record("error.type", error);
    span.record("otel.status_code", "error");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_endpoint(endpoint: &str) -> Config {
        Config {
            otlp_endpoint: endpoint.into(),
            ..Config::default()
        }
    }

    #[test]
    fn a_base_endpoint_gets_the_traces_path_and_a_full_one_is_kept() {
        for (given, url) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            (
                "https://otel.example/prefix",
                "https://otel.example/prefix/v1/traces",
            ),
            (
                "http://collector:4318/v1/traces",
                "http://collector:4318/v1/traces",
            ),
            (
                "https://otel.example/otlp/v1/traces",
                "https://otel.example/otlp/v1/traces",
            ),
        ] {
            let got = with_endpoint(given).traces_url().unwrap().unwrap();
            assert_eq!(got.as_str(), url, "{given}");
        }
        assert!(with_endpoint("").traces_url().unwrap().is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (config, key) in [
            (with_endpoint("collector:4318"), "tracing.otlp_endpoint"),
            (
                with_endpoint("grpc://collector:4317"),
                "tracing.otlp_endpoint",
            ),
            (with_endpoint("not a url"), "tracing.otlp_endpoint"),
            (
                Config {
                    sample_ratio: 1.5,
                    ..Config::default()
                },
                "tracing.sample_ratio",
            ),
            (
                Config {
                    sample_ratio: -0.1,
                    ..Config::default()
                },
                "tracing.sample_ratio",
            ),
            (
                Config {
                    sample_ratio: f64::NAN,
                    ..Config::default()
                },
                "tracing.sample_ratio",
            ),
            (
                Config {
                    service_name: " ".into(),
                    ..Config::default()
                },
                "tracing.service_name",
            ),
            (
                Config {
                    timeout_ms: 0,
                    ..Config::default()
                },
                "tracing.timeout_ms",
            ),
            (
                Config {
                    headers: [("bad name".to_owned(), Secret::new("x"))].into(),
                    ..Config::default()
                },
                "tracing.headers.bad name",
            ),
        ] {
            assert_eq!(config.validate().unwrap_err().key, key);
        }
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn spans_are_not_built_while_export_is_off() {
        // No exporter started in unit tests: every constructor answers `Span::none()`.
        let mut req = http::Request::new(());
        assert!(request_span(&req).is_none());
        assert!(upstream_span(&mut req).is_none());
        assert!(verify_span().is_none());
        assert!(jwks_fetch_span().is_none());
        assert!(backend_api_span("sessions_get", &http::Method::GET).is_none());
        assert!(req.headers().is_empty());
    }

    #[test]
    fn the_standard_variables_set_endpoint_and_service_name_and_headers_stay_secret() {
        let c = crate::config::Config::load(
            None,
            [
                ("CLERK_SECRET_KEY", "sk_test_x"),
                (
                    "CLERK_PUBLISHABLE_KEY",
                    "pk_test_ZmFrZS1pbnN0YW5jZS5jbGVyay5hY2NvdW50cy5kZXYk",
                ),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                ("OTEL_SERVICE_NAME", "checkout-gate"),
                ("CLERKGATE_TRACING__SAMPLE_RATIO", "0.25"),
            ],
        )
        .unwrap();
        assert_eq!(c.tracing.otlp_endpoint, "http://collector:4318");
        assert_eq!(c.tracing.service_name, "checkout-gate");
        assert_eq!(c.tracing.sample_ratio, 0.25);
        let mut bad = c.clone();
        bad.tracing.sample_ratio = 2.0;
        let err = bad.validate().unwrap_err();
        assert_eq!(err.key, "tracing.sample_ratio");
        let mut c = c;
        c.tracing
            .headers
            .insert("x-api-key".into(), Secret::new("collector-key-123456"));
        let out = c.to_redacted_toml();
        assert!(out.contains("[tracing.headers]"), "{out}");
        assert!(!out.contains("collector-key-123456"), "{out}");
    }

    #[test]
    fn invented_methods_are_other() {
        let m = http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_name(&m), "_OTHER");
        assert_eq!(method_name(&http::Method::PATCH), "PATCH");
    }
}
