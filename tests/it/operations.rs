//! Running clerkgate: the admin listener, the token cache, upstream failures, streaming,
//! hop-by-hop and forwarding headers, HTTP/2, upgrades, TLS, the drain sequence and the limits
//! that protect the listener (slowloris, oversized heads).
//!
//! Where the exact bytes on the wire matter (hop-by-hop headers, upgrades, slow or huge heads)
//! the test speaks HTTP/1.1 over a raw `TcpStream`, so no client library normalises them away.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clerkgate::telemetry::{AuthFailure, JwksFetchResult, Label, Outcome, UpstreamErrorKind};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::support::eventually;
use crate::support::raw::{read_head, status_of};
use crate::support::sidecar::{base_toml, config};
use crate::support::{FakeClerk, Sidecar, Upstream, client};

/// Upper bound for every wait in this file; generous because CI machines stall.
const WAIT: Duration = Duration::from_secs(10);

/// The reason code of one of clerkgate's own refusals.
async fn reason(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("a JSON refusal body");
    body["reason"].as_str().unwrap_or_default().to_owned()
}

/// A port on 127.0.0.1 with nothing listening.
/// A port that refuses connections for as long as the returned socket lives: bound, never
/// listening, so no other test's server can take it (a bound-then-dropped port could be handed
/// to the next server that asks for a free one).
fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

#[tokio::test]
async fn admin_listener_serves_health_and_every_metric_family() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let resp = client()
        .get(gate.url("/hello"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let livez = client().get(gate.admin_url("/livez")).send().await.unwrap();
    assert_eq!(livez.status(), 200);
    assert_eq!(gate.readyz().await, 200);
    let resp = client()
        .get(gate.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();

    let mut expected: Vec<String> = Vec::new();
    for o in Outcome::ALL {
        expected.push(format!(
            "clerkgate_requests_total{{outcome=\"{}\"}}",
            o.as_label()
        ));
    }
    for r in AuthFailure::ALL {
        expected.push(format!(
            "clerkgate_auth_failures_total{{reason=\"{}\"}}",
            r.as_label()
        ));
    }
    for k in UpstreamErrorKind::ALL {
        expected.push(format!(
            "clerkgate_upstream_errors_total{{kind=\"{}\"}}",
            k.as_label()
        ));
    }
    for r in JwksFetchResult::ALL {
        expected.push(format!(
            "clerkgate_jwks_fetches_total{{result=\"{}\"}}",
            r.as_label()
        ));
    }
    expected.extend(
        [
            "clerkgate_requests_total{outcome=\"forwarded\"} 1",
            "clerkgate_request_duration_seconds_bucket{le=",
            "clerkgate_request_duration_seconds_count 1",
            "clerkgate_jwks_fetches_total{result=\"ok\"} 1",
            "clerkgate_jwks_keys 1",
            "clerkgate_jwks_age_seconds ",
            "clerkgate_token_cache_hits_total 0",
            "clerkgate_token_cache_misses_total 1",
            "clerkgate_token_cache_evictions_total 0",
            "clerkgate_spoofed_headers_total 0",
            "clerkgate_build_info{version=\"",
        ]
        .map(str::to_owned),
    );
    for line in expected {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    gate.stop().await;
}

#[tokio::test]
async fn proxy_port_does_not_serve_admin_endpoints() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    for path in ["/metrics", "/readyz", "/livez"] {
        let resp = client().get(gate.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path} is an ordinary protected path");
        assert_eq!(reason(resp).await, "session-token-missing");
    }
    assert_eq!(upstream.count(), 0);

    // With a token it is the upstream's /metrics, not clerkgate's.
    let resp = client()
        .get(gate.url("/metrics"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.text().await.unwrap().contains("clerkgate_"));
    assert_eq!(upstream.last().uri.path(), "/metrics");
    gate.stop().await;
}

#[tokio::test]
async fn same_token_twice_is_one_cache_miss_then_one_hit() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let token = clerk.session_token("user_1");
    for _ in 0..2 {
        let resp = client()
            .get(gate.url("/c"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(upstream.last().headers["x-user-id"], "user_1");
    }
    assert_eq!(gate.metrics.token_cache_misses.get(), 1);
    assert_eq!(gate.metrics.token_cache_hits.get(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn a_full_token_cache_evicts_and_counts_it() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[auth]\ntoken_cache_capacity = 2\n").await;
    let tokens: Vec<String> = (1..=3)
        .map(|n| clerk.session_token(&format!("user_{n}")))
        .collect();
    // Three distinct tokens into two slots, then the first again: it was evicted (never hit,
    // so the clock took it first) and costs a second verification, which evicts another.
    for (i, token) in tokens.iter().chain([&tokens[0]]).enumerate() {
        let resp = client()
            .get(gate.url("/c"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
    }
    assert_eq!(upstream.last().headers["x-user-id"], "user_1");
    assert_eq!(gate.metrics.token_cache_misses.get(), 4);
    assert_eq!(gate.metrics.token_cache_hits.get(), 0);
    assert_eq!(gate.metrics.token_cache_evictions.get(), 2);
    assert!(
        gate.metrics_text()
            .await
            .contains("clerkgate_token_cache_evictions_total 2")
    );
    gate.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_upstream_unavailable() {
    let clerk = FakeClerk::start().await;
    let (_held, port) = closed_port();
    let dead = format!("http://127.0.0.1:{port}");
    let gate = Sidecar::start_config(config(&base_toml(&clerk, &dead), "").unwrap()).await;
    assert!(gate.wait_ready(WAIT).await);

    let resp = client()
        .get(gate.url("/x"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(reason(resp).await, "upstream-unavailable");
    assert_eq!(
        gate.metrics.upstream_errors.get(UpstreamErrorKind::Connect),
        1
    );
    assert_eq!(gate.metrics.requests.get(Outcome::UpstreamError), 1);
    // An upstream outage is not a clerkgate outage.
    assert_eq!(gate.readyz().await, 200);
    gate.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504_upstream_timeout_and_the_proxy_stays_healthy() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[proxy]\nupstream_timeout_seconds = 1\n").await;
    let token = clerk.session_token("user_1");
    let resp = client()
        .get(gate.url("/slow/3000"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(reason(resp).await, "upstream-timeout");
    assert_eq!(
        gate.metrics.upstream_errors.get(UpstreamErrorKind::Timeout),
        1
    );

    let resp = client()
        .get(gate.url("/after"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().uri.path(), "/after");
    gate.stop().await;
}

#[tokio::test]
async fn upstream_error_status_is_passed_through_unchanged() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let resp = client()
        .get(gate.url("/status/503"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_none());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["path"], "/status/503", "the upstream's own body");
    for kind in UpstreamErrorKind::ALL {
        assert_eq!(gate.metrics.upstream_errors.get(*kind), 0);
    }
    assert_eq!(gate.metrics.requests.get(Outcome::Forwarded), 1);
    gate.stop().await;
}

/// An upstream that reads request bodies chunk by chunk, publishing the running byte count,
/// and answers `{"bytes": n, "pattern_ok": bool}` (the body must repeat `a..z`).
struct CountingUpstream {
    url: String,
    received: watch::Receiver<u64>,
    _stop: oneshot::Sender<()>,
}

async fn counting_upstream() -> CountingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (count_tx, received) = watch::channel(0u64);
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = &mut stopped => return,
                accepted = listener.accept() => accepted.unwrap().0,
            };
            let count_tx = count_tx.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let count_tx = count_tx.clone();
                    async move {
                        let mut body = req.into_body();
                        let (mut n, mut pattern_ok) = (0u64, true);
                        while let Some(frame) = body.frame().await {
                            let Ok(data) = frame.map(|f| f.into_data()) else {
                                break;
                            };
                            let Ok(data) = data else { continue };
                            for (i, b) in data.iter().enumerate() {
                                pattern_ok &= *b == b'a' + ((n + i as u64) % 26) as u8;
                            }
                            n += data.len() as u64;
                            count_tx.send_replace(n);
                        }
                        let json = serde_json::json!({"bytes": n, "pattern_ok": pattern_ok});
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(json.to_string())),
                        ))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    CountingUpstream {
        url,
        received,
        _stop: stop,
    }
}

/// `n` bytes of the repeating `a..z` pattern the counting upstream checks.
fn pattern(start: usize, n: usize) -> Vec<u8> {
    (start..start + n).map(|i| b'a' + (i % 26) as u8).collect()
}

#[tokio::test]
async fn request_body_of_5_mb_reaches_the_upstream_intact() {
    let clerk = FakeClerk::start().await;
    let counting = counting_upstream().await;
    let gate = Sidecar::start_config(config(&base_toml(&clerk, &counting.url), "").unwrap()).await;
    assert!(gate.wait_ready(WAIT).await);
    let resp = client()
        .post(gate.url("/upload"))
        .bearer_auth(clerk.session_token("user_1"))
        .body(pattern(0, 5_000_000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen: Value = resp.json().await.unwrap();
    assert_eq!(seen["bytes"], 5_000_000);
    assert_eq!(seen["pattern_ok"], true);
    gate.stop().await;
}

#[tokio::test]
async fn request_body_is_forwarded_before_the_client_has_finished_sending() {
    let clerk = FakeClerk::start().await;
    let counting = counting_upstream().await;
    let gate = Sidecar::start_config(config(&base_toml(&clerk, &counting.url), "").unwrap()).await;
    assert!(gate.wait_ready(WAIT).await);

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    let request = tokio::spawn(
        client()
            .post(gate.url("/upload"))
            .bearer_auth(clerk.session_token("user_1"))
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    const CHUNK: usize = 64 * 1024;
    tx.send(Bytes::from(pattern(0, CHUNK))).await.unwrap();
    // A buffering proxy would wait for the rest, which is only sent after this wait.
    let mut received = counting.received.clone();
    // The `Ref` that `wait_for` returns holds the watch's read lock: drop it at once, or the
    // upstream's next `send_replace` blocks the runtime thread.
    let first = tokio::time::timeout(WAIT, received.wait_for(|n| *n >= CHUNK as u64))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(first, "the first chunk reached the upstream on its own");
    tx.send(Bytes::from(pattern(CHUNK, CHUNK))).await.unwrap();
    drop(tx);

    let resp = request.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let seen: Value = resp.json().await.unwrap();
    assert_eq!(seen["bytes"], 2 * CHUNK);
    assert_eq!(seen["pattern_ok"], true);
    gate.stop().await;
}

#[tokio::test]
async fn response_of_5_mb_streams_back_complete() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let resp = client()
        .get(gate.url("/big/5000000"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), 5_000_000);
    assert!(body == pattern(0, 5_000_000), "no byte lost or reordered");
    gate.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_the_client_connection_and_forwarding_headers_are_set() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let request = format!(
        "GET /hop HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer {}\r\n\
         Connection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\nX-Kept: yes\r\n\r\n",
        clerk.session_token("user_1")
    );
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await.expect("a response");
    assert_eq!(status_of(&head), 200, "{head}");

    let seen = upstream.last().headers;
    for name in ["x-hop", "keep-alive", "te", "proxy-authorization"] {
        assert!(seen.get(name).is_none(), "{name} reached the upstream");
    }
    for value in seen.get_all("connection") {
        assert!(!value.to_str().unwrap().contains("x-hop"));
    }
    assert_eq!(seen["x-kept"], "yes", "end-to-end headers survive");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "app.example");
    gate.stop().await;
}

async fn forwarded_headers_seen(trust: bool) -> http::HeaderMap {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let extra = format!("[proxy]\ntrust_forwarded_headers = {trust}\n");
    let gate = Sidecar::start(&clerk, &upstream, &extra).await;
    let resp = client()
        .get(gate.url("/xff"))
        .bearer_auth(clerk.session_token("user_1"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    gate.stop().await;
    upstream.last().headers
}

#[tokio::test]
async fn client_sent_x_forwarded_for_is_replaced_by_default() {
    let seen = forwarded_headers_seen(false).await;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen.get("forwarded").is_none());
}

#[tokio::test]
async fn client_sent_x_forwarded_for_is_appended_to_when_trusted() {
    let seen = forwarded_headers_seen(true).await;
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn http2_client_is_served_and_upstream_gets_http1_with_identity() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = h2
        .get(gate.url("/h2"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.uri.path(), "/h2");
    assert_eq!(seen.headers["x-user-id"], "user_1");
    assert!(seen.headers.get("authorization").is_none());

    let resp = h2.get(gate.url("/h2")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "HTTP/2 gets the same checks");
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

fn upgrade_request(token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
    )
}

#[tokio::test]
async fn upgrade_with_a_valid_token_tunnels_bytes_both_ways() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    let token = clerk.session_token("user_1");
    stream
        .write_all(upgrade_request(Some(&token)).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a response");
    assert_eq!(status_of(&head), 101, "{head}");
    let seen = upstream.last().headers;
    assert_eq!(seen["x-user-id"], "user_1");
    assert_eq!(seen["upgrade"], "websocket");
    assert!(seen.get("authorization").is_none());

    let message = b"hello through the tunnel";
    stream.write_all(message).await.unwrap();
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echoed, message);
    gate.stop().await;
}

#[tokio::test]
async fn upgrade_without_a_token_is_401_and_never_tunnelled() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    stream
        .write_all(upgrade_request(None).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a response");
    assert_eq!(status_of(&head), 401, "{head}");
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

/// A directory under the system temp dir that is removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn tls_listener_serves_https_and_tells_the_upstream() {
    clerkgate::install_crypto_provider();
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = TempDir::new("clerkgate-tls");
    let cert_path = dir.0.join("cert.pem");
    let key_path = dir.0.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let extra = format!(
        "[proxy]\ntls_cert_path = '{}'\ntls_key_path = '{}'\n",
        cert_path.display(),
        key_path.display()
    );
    let gate = Sidecar::start(&clerk, &upstream, &extra).await;

    let https = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap()])
        .resolve("localhost", gate.proxy)
        .timeout(WAIT)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/secure", gate.proxy.port());
    let resp = https
        .get(&url)
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-user-id"], "user_1");

    // Plain HTTP on the TLS port is not served.
    let plain = client().get(gate.url("/secure")).send().await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_after_a_not_ready_delay() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[shutdown]\ndelay_seconds = 1\n").await;
    let token = clerk.session_token("user_1");
    let in_flight = tokio::spawn(
        client()
            .get(gate.url("/slow/1500"))
            .bearer_auth(&token)
            .send(),
    );
    assert!(upstream.recorder.wait_for_count(1, WAIT).await);

    let (proxy, admin) = (gate.proxy, gate.admin);
    let readyz = gate.admin_url("/readyz");
    let hello = gate.url("/hello");
    let stopping = tokio::spawn(gate.stop());

    assert!(
        eventually(WAIT, async || {
            client()
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        })
        .await,
        "readiness drops as soon as the drain starts"
    );
    // Load balancers notice the 503 during the delay; traffic still arriving is served.
    let resp = client()
        .get(&hello)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request finished");
    assert_eq!(resp.status(), 200);
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stopped in time")
        .unwrap();
    for addr in [proxy, admin] {
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{addr} refuses new connections after shutdown"
        );
    }
}

/// Sends `bytes` and then nothing; `true` if the server closes the connection within `within`.
async fn closed_after_sending(addr: SocketAddr, bytes: &[u8], within: Duration) -> bool {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let drained = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // A 408 may precede the close.
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(within, drained).await.is_ok()
}

const SLOW_HEADS: &str = "[proxy]\nheader_read_timeout_seconds = 1\n";

#[tokio::test]
async fn partial_request_head_is_cut_off_by_the_header_read_timeout() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, SLOW_HEADS).await;
    let partial = b"GET /slowloris HTTP/1.1\r\nHost: app.example\r\nX-Slow: 1\r\n";
    assert!(
        closed_after_sending(gate.proxy, partial, Duration::from_secs(3)).await,
        "the connection is closed within ~3 s"
    );
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn connection_that_sends_too_little_to_pick_a_protocol_is_cut_off() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, SLOW_HEADS).await;
    for bytes in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        assert!(
            closed_after_sending(gate.proxy, bytes, Duration::from_secs(3)).await,
            "{:?}: closed within ~3 s",
            String::from_utf8_lossy(bytes)
        );
    }
    gate.stop().await;
}

#[tokio::test]
async fn oversized_request_head_is_refused_before_reaching_the_upstream() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    // A valid token, so only the head's size can stop it.
    let request = format!(
        "GET /big-head HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer {}\r\nX-Big: {}\r\n\r\n",
        clerk.session_token("user_1"),
        "a".repeat(100 * 1024)
    );
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    // The server may close while the head is still being written.
    let _ = stream.write_all(request.as_bytes()).await;
    if let Some(head) = read_head(&mut stream).await {
        assert_eq!(status_of(&head), 431, "{head}");
    }
    assert_eq!(upstream.count(), 0);

    // The same over HTTP/2 (header list size limit).
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = h2
        .get(gate.url("/big-head"))
        .bearer_auth(clerk.session_token("user_1"))
        .header("x-big", "a".repeat(100 * 1024))
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 431);
    }
    assert_eq!(upstream.count(), 0);

    // The listener is still fine.
    let resp = client()
        .get(gate.url("/after"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    gate.stop().await;
}

#[tokio::test]
async fn every_request_gets_an_id_sent_upstream_and_back_and_traceparent_passes() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[proxy]\ntrust_request_id = false\n").await;
    let http = client();
    let token = clerk.session_token("user_1");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let resp = http
            .get(gate.url("/orders"))
            .bearer_auth(&token)
            .header("x-request-id", "client-chosen")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let seen = upstream.last().headers;
        assert_eq!(
            seen["x-request-id"],
            id.as_str(),
            "the upstream got the same id"
        );
        assert_ne!(id, "client-chosen", "replaced when not trusted");
        assert_eq!(
            seen["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct ids");
    // Refusals carry one too.
    let resp = http.get(gate.url("/orders")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("x-request-id"));
    gate.stop().await;

    // Trusted (the default): a sane client id is kept, a wild one replaced, none generated.
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    for (sent, kept) in [
        ("lb-7f3a", true),
        ("with spaces ok", true),
        (&*"x".repeat(300), false),
    ] {
        let resp = http
            .get(gate.url("/orders"))
            .bearer_auth(&token)
            .header("x-request-id", sent)
            .send()
            .await
            .unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id == sent, kept, "{sent}");
        assert_eq!(upstream.last().headers["x-request-id"], id.as_str());
    }
    let resp = http
        .get(gate.url("/orders"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers().contains_key("x-request-id"),
        "generated when absent"
    );
    assert_eq!(
        upstream.last().headers["x-request-id"],
        resp.headers()["x-request-id"]
    );
    gate.stop().await;
}
