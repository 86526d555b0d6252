//! OpenTelemetry export (`[tracing]`) against a fake OTLP/HTTP collector: the real binary (the
//! tracing subscriber is process-wide, so each test runs its own clerkgate process), a request
//! with a client `traceparent`, then SIGTERM, whose drain ends with the flush.
//!
//! The collector decodes each `POST /v1/traces` as an `ExportTraceServiceRequest` and keeps the
//! raw bodies too, so a test can assert that no secret appears anywhere in what was exported.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message as _;
use tokio::net::TcpListener;

use crate::support::process::{Served, TempFile, command};
use crate::support::{FakeClerk, Upstream, client, eventually};

const WAIT: Duration = Duration::from_secs(20);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One POST the collector received.
struct Export {
    path: String,
    content_type: String,
    body: Bytes,
}

/// A fake OTLP/HTTP collector on `127.0.0.1:0`.
struct Collector {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<Export>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let exports = Arc::new(Mutex::new(Vec::new()));
        let log = exports.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            async move {
                                let path = req.uri().path().to_owned();
                                let content_type = req
                                    .headers()
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                log.lock().unwrap().push(Export {
                                    path,
                                    content_type,
                                    body,
                                });
                                // An empty ExportTraceServiceResponse: full success.
                                let resp = Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::new()))
                                    .expect("response");
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, exports }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received, decoded, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let exports = self.exports.lock().unwrap();
        let mut spans = Vec::new();
        for export in exports.iter() {
            let req = ExportTraceServiceRequest::decode(export.body.clone())
                .expect("an ExportTraceServiceRequest");
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| value(a.value.as_ref()?.value.as_ref()?))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        spans.push((service.clone(), span));
                    }
                }
            }
        }
        spans
    }

    /// Every exported byte, for the never-a-secret checks.
    fn raw(&self) -> Vec<u8> {
        let exports = self.exports.lock().unwrap();
        exports.iter().flat_map(|e| e.body.to_vec()).collect()
    }
}

fn value(v: &AnyValue) -> Option<String> {
    match v {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| value(a.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The session id inside a token (to tell the fake Clerk its status).
fn sid_of(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON claims");
    claims["sid"].as_str().expect("a sid").to_owned()
}

/// The running binary, ready.
struct Gate(Served);

impl std::ops::Deref for Gate {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.0
    }
}

impl Gate {
    /// `clerkgate serve` with this configuration and extra environment, up and ready.
    async fn start(toml: &str, env: &[(&str, &str)]) -> Gate {
        let gate = Gate(Served::start(toml, env));
        let ready = eventually(WAIT, async || gate.readyz().await == Some(200)).await;
        assert!(ready, "ready; log:\n{}", gate.log());
        gate
    }

    /// SIGTERM, then waits for the exit (the drain, then the flush).
    async fn stop(mut self) -> Duration {
        let started = Instant::now();
        self.0.sigterm();
        let exit = self.0.exited(WAIT).await;
        let exit = exit.unwrap_or_else(|| panic!("no exit; log:\n{}", self.log()));
        assert!(exit.success(), "{exit}; log:\n{}", self.log());
        started.elapsed()
    }
}

fn toml(clerk: &FakeClerk, upstream: &Upstream, tracing: &str, extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:0"
[clerk]
secret_key = "{secret}"
publishable_key = "{pk}"
api_url = "{api}"
[local_api]
enabled = false
[shutdown]
delay_seconds = 0
drain_timeout_seconds = 5
[log]
format = "json"
level = "info"
[tracing]
{tracing}
{extra}
"#,
        upstream = upstream.url(),
        secret = clerk.secret_key,
        pk = clerk.publishable_key(),
        api = clerk.url,
    )
}

#[tokio::test]
async fn a_request_is_one_trace_from_the_clients_traceparent_to_the_upstream() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let collector = Collector::start().await;
    let tracing = format!(
        "otlp_endpoint = \"{}\"\nservice_name = \"gate-under-test\"\n",
        collector.url()
    );
    let gate = Gate::start(
        &toml(&clerk, &upstream, &tracing, "[sessions]\ncheck = \"api\"\n"),
        &[],
    )
    .await;
    // A key published after start-up: the token's unknown kid makes this verification fetch
    // the JWKS, inside the request's trace. The session check asks the Backend API.
    clerk.rotate();
    let token = clerk.session_token("user_traced");
    let sid = sid_of(&token);
    clerk.set_session(&sid, "active");
    let resp = client()
        .get(format!(
            "http://{}/orders/7?api_key=query-secret",
            gate.proxy
        ))
        .bearer_auth(&token)
        .header("cookie", "theme=cookie-secret")
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "log:\n{}", gate.log());
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let sent_upstream = upstream.last().headers;
    let log = gate.log();
    gate.stop().await;

    let spans = collector.spans();
    let exports = collector.exports.lock().unwrap();
    assert!(!exports.is_empty(), "nothing exported; log:\n{log}");
    for export in exports.iter() {
        assert_eq!(
            export.path, "/v1/traces",
            "the base URL got the traces path"
        );
        assert_eq!(export.content_type, "application/x-protobuf");
    }
    drop(exports);
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == TRACE_ID)
        .map(|(_, s)| s)
        .collect();
    let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();
    let one = |name: &str| -> &Span {
        let found: Vec<&&Span> = ours.iter().filter(|s| s.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "one {name} in the client's trace: {names:?}"
        );
        found[0]
    };
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "gate-under-test")
    );

    let request = one("clerkgate.request");
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(
        hex(&request.parent_span_id),
        CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert_eq!(attr(request, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attr(request, "url.path").as_deref(), Some("/orders/7"));
    assert_eq!(
        attr(request, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(request, "clerkgate.outcome").as_deref(),
        Some("forwarded")
    );
    assert_eq!(attr(request, "clerkgate.request_id"), Some(request_id));
    assert_eq!(attr(request, "clerkgate.reason"), None);

    let verify = one("clerkgate.verify");
    assert_eq!(verify.parent_span_id, request.span_id);
    let jwks = one("clerkgate.jwks_fetch");
    assert_eq!(
        jwks.parent_span_id, verify.span_id,
        "the refetch ran inside the verification"
    );
    assert_eq!(jwks.kind, SpanKind::Client as i32);
    let api = one("clerkgate.backend_api");
    assert_eq!(api.parent_span_id, request.span_id);
    assert_eq!(
        attr(api, "clerkgate.endpoint").as_deref(),
        Some("sessions_get")
    );
    assert_eq!(
        attr(api, "http.response.status_code").as_deref(),
        Some("200")
    );
    let up = one("clerkgate.upstream");
    assert_eq!(up.parent_span_id, request.span_id);
    assert_eq!(up.kind, SpanKind::Client as i32);
    assert_eq!(
        attr(up, "http.response.status_code").as_deref(),
        Some("200")
    );

    // The backend's spans hang below the upstream call.
    assert_eq!(
        sent_upstream["traceparent"].to_str().unwrap(),
        format!("00-{TRACE_ID}-{}-01", hex(&up.span_id))
    );
    // The start-up key fetch is a trace of its own.
    assert!(
        spans
            .iter()
            .any(|(_, s)| s.name == "clerkgate.jwks_fetch" && s.parent_span_id.is_empty()),
        "{names:?}"
    );

    let raw = collector.raw();
    for secret in [
        token.as_str(),
        "query-secret",
        "api_key",
        "cookie-secret",
        "user_traced",
        sid.as_str(),
        clerk.secret_key.as_str(),
    ] {
        assert!(!contains(&raw, secret), "{secret} was exported");
    }
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_requests_nothing() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    // Accepts connections and never answers: every export hangs until `timeout_ms`.
    let blackhole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = blackhole.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let hold = held.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = blackhole.accept().await {
            hold.lock().unwrap().push(stream);
        }
    });
    let timeout = Duration::from_secs(4);
    let tracing = format!(
        "otlp_endpoint = \"http://{addr}\"\ntimeout_ms = {}\n",
        timeout.as_millis()
    );
    // Batches every 20 ms, so exports are hanging all through the requests below.
    let gate = Gate::start(
        &toml(&clerk, &upstream, &tracing, ""),
        &[("OTEL_BSP_SCHEDULE_DELAY", "20")],
    )
    .await;
    let token = clerk.session_token("user_1");
    let http = client();
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let sent = Instant::now();
        let resp = http
            .get(format!("http://{}/orders/{i}", gate.proxy))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        slowest = slowest.max(sent.elapsed());
        if i == 0 {
            // Let the first batch reach the collector and hang there.
            let _ = eventually(WAIT, async || !held.lock().unwrap().is_empty()).await;
        }
    }
    assert!(
        !held.lock().unwrap().is_empty(),
        "an export reached the collector"
    );
    // A request that waited for an export would take the export's timeout: none comes close.
    assert!(
        slowest < timeout / 2,
        "slowest request {slowest:?} with a hanging collector; log:\n{}",
        gate.log()
    );
    // The flush at exit is bounded by timeout_ms, not by the collector.
    let exit = gate.stop().await;
    assert!(
        exit < timeout + Duration::from_secs(5),
        "exit took {exit:?}"
    );
}

#[tokio::test]
async fn bad_tracing_settings_exit_64_naming_the_key() {
    for (setting, key) in [
        ("sample_ratio = 1.5", "tracing.sample_ratio"),
        (
            "otlp_endpoint = \"collector:4318\"",
            "tracing.otlp_endpoint",
        ),
    ] {
        let config = TempFile::with(
            "clerkgate.toml",
            &format!(
                "[clerk]\nsecret_key = \"sk_test_x\"\npublishable_key = \"pk_test_ZmFrZS1pbnN0YW5jZS5jbGVyay5hY2NvdW50cy5kZXYk\"\n[tracing]\n{setting}\n"
            ),
        );
        let out = command(&["--config", config.path(), "check-config"], &[])
            .output()
            .expect("run clerkgate");
        assert_eq!(out.status.code(), Some(64), "{setting}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{setting}: {stderr}");
    }
}
