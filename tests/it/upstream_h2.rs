//! HTTP/2 upstreams (`proxy.upstream_protocol`): an h2c upstream built on hyper's HTTP/2 server
//! records what it received; streams are multiplexed over at most two connections; bodies stream
//! and trailers pass both ways; https upstreams negotiate h2 by ALPN; gRPC calls (framed by hand
//! here: 5-byte length prefix, `application/grpc`, `grpc-status` trailer) pass through, and the
//! ones clerkgate refuses get a trailers-only `grpc-status`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::channel::{Channel, Sender};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use crate::support::sidecar::{base_toml, config};
use crate::support::{FakeClerk, Sidecar, client};

type Body = BoxBody<Bytes, Infallible>;

/// What the h2c upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    version: Version,
    authority: Option<String>,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

#[derive(Default)]
struct State {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    /// `/stream` sends its second chunk only once this is notified.
    release: Notify,
    /// `/upload` reports each request chunk as it arrives.
    chunks: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    /// Closes every open connection.
    kill: Notify,
    /// Closes every open connection gracefully (GOAWAY, then in-flight streams finish).
    graceful: Notify,
}

/// An h2c upstream on hyper's HTTP/2 server.
struct H2Upstream {
    url: String,
    state: Arc<State>,
}

impl H2Upstream {
    async fn start() -> H2Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                let s2 = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        () = s2.kill.notified() => return,
                        () = s2.graceful.notified() => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
        });
        H2Upstream { url, state }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

fn trailers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

/// A gRPC message frame: uncompressed flag, 4-byte big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// The payloads of a run of gRPC frames.
fn grpc_messages(mut body: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        assert_eq!(body[0], 0, "uncompressed");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body.advance(5);
        out.push(body.split_to(len));
    }
    assert!(body.is_empty(), "no partial frame");
    out
}

async fn handle(s: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let mut data = BytesMut::new();
    let mut req_trailers = None;
    let chunks = s.chunks.lock().unwrap().clone();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(d) => {
                if let Some(tx) = &chunks {
                    let _ = tx.send(d.clone());
                }
                data.extend_from_slice(&d);
            }
            Err(frame) => req_trailers = frame.into_trailers().ok(),
        }
    }
    let body = data.freeze();
    s.seen.lock().unwrap().push(Seen {
        version: parts.version,
        authority: parts.uri.authority().map(|a| a.to_string()),
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
        trailers: req_trailers.clone(),
    });
    let resp = match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(Full::new(Bytes::from("slow")).boxed())
        }
        "/stream" => {
            let (mut tx, rx) = Channel::<Bytes, Infallible>::new(4);
            let s = s.clone();
            tokio::spawn(async move {
                tx.send_data(Bytes::from("one")).await.unwrap();
                s.release.notified().await;
                tx.send_data(Bytes::from("two")).await.unwrap();
                tx.send_trailers(trailers(&[("x-done", "yes")]))
                    .await
                    .unwrap();
            });
            Response::new(rx.boxed())
        }
        p if p.starts_with("/echo.Echo/") => {
            // A gRPC service: each request message comes back reversed, server-streaming
            // (`Many`) three times.
            let times = if p.ends_with("/Many") { 3 } else { 1 };
            let (mut tx, rx) = Channel::<Bytes, Infallible>::new(8);
            tokio::spawn(async move {
                for message in grpc_messages(body) {
                    let reversed: Vec<u8> = message.iter().rev().copied().collect();
                    for _ in 0..times {
                        tx.send_data(grpc_frame(&reversed)).await.unwrap();
                    }
                }
                tx.send_trailers(trailers(&[("grpc-status", "0"), ("grpc-message", "")]))
                    .await
                    .unwrap();
            });
            let mut resp = Response::new(rx.boxed());
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            resp
        }
        _ => {
            // Echo the body; report the request trailer back in a response trailer.
            let seen = req_trailers
                .as_ref()
                .and_then(|t| t.get("x-req-trailer"))
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let (mut tx, rx) = Channel::<Bytes, Infallible>::new(4);
            tokio::spawn(async move {
                tx.send_data(body).await.unwrap();
                tx.send_trailers(trailers(&[("grpc-status", "0"), ("x-seen-trailer", &seen)]))
                    .await
                    .unwrap();
            });
            Response::new(rx.boxed())
        }
    };
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

async fn gate(clerk: &FakeClerk, upstream: &str, extra: &str) -> Sidecar {
    let gate = Sidecar::start_config(config(&base_toml(clerk, upstream), extra).unwrap()).await;
    assert!(gate.wait_ready(Duration::from_secs(10)).await);
    gate
}

/// An HTTP/2 (prior knowledge) client connection to clerkgate.
async fn h2_client(gate: &Sidecar) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(gate.proxy).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Reads a response body to its end: the data and the trailers.
async fn read_all(body: Incoming) -> (Bytes, Option<HeaderMap>) {
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (collected.to_bytes(), trailers)
}

#[tokio::test]
async fn h2c_upstream_gets_verified_identity_over_at_most_two_multiplexed_connections() {
    let upstream = H2Upstream::start().await;
    let clerk = FakeClerk::start().await;
    let gate = gate(
        &clerk,
        &upstream.url,
        "[proxy]\nupstream_protocol = \"h2c\"\n",
    )
    .await;
    let token = clerk.session_token("user_h2");
    let http = client();
    let calls = (0..16).map(|_| {
        http.get(gate.url("/slow"))
            .bearer_auth(&token)
            .header("x-user-id", "user_attacker")
            .header("x-clerk-auth-status", "signed-in")
            .send()
    });
    for resp in futures_util::future::join_all(calls).await {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "slow");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 16);
    for s in &seen {
        assert_eq!(s.version, Version::HTTP_2);
        assert_eq!(s.headers.get_all("x-user-id").iter().count(), 1);
        assert_eq!(s.headers["x-user-id"], "user_h2");
        assert!(s.headers.get("x-clerk-auth-status").is_none());
        assert!(s.headers.get("authorization").is_none(), "token removed");
        // The client's Host became :authority, with no Host header next to it.
        assert_eq!(
            s.authority.as_deref(),
            Some(gate.proxy.to_string().as_str())
        );
        assert!(s.headers.get("host").is_none());
    }
    let connections = upstream.state.connections.load(Ordering::SeqCst);
    let max_in_flight = upstream.state.max_in_flight.load(Ordering::SeqCst);
    assert!(connections <= 2, "{connections} upstream connections");
    // 16 requests of 300 ms each over at most two connections overlapped: streams, not a queue.
    assert!(
        max_in_flight >= 4,
        "at most {max_in_flight} requests in flight"
    );
}

#[tokio::test]
async fn connection_specific_headers_are_removed_and_te_trailers_kept() {
    let upstream = H2Upstream::start().await;
    let clerk = FakeClerk::start().await;
    let gate = gate(
        &clerk,
        &upstream.url,
        "[proxy]\nupstream_protocol = \"h2c\"\n",
    )
    .await;
    let token = clerk.session_token("user_hop");
    let mut tcp = TcpStream::connect(gate.proxy).await.unwrap();
    let head = format!(
        "POST /plain HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer {token}\r\n\
         Connection: x-secret-hop, keep-alive\r\nX-Secret-Hop: v\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\nX_User_Id: user_attacker\r\n\
         Content-Length: 2\r\n\r\nhi"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\r\n0\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let s = &upstream.seen()[0];
    assert_eq!(s.version, Version::HTTP_2);
    assert_eq!(s.path, "/plain");
    assert_eq!(s.body, "hi");
    assert_eq!(s.authority.as_deref(), Some("app.example"));
    for name in [
        "connection",
        "x-secret-hop",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
        "x_user_id",
        "authorization",
    ] {
        assert!(s.headers.get(name).is_none(), "{name} reached the upstream");
    }
    assert_eq!(s.headers["te"], "trailers");
    assert_eq!(s.headers["x-user-id"], "user_hop");
}

#[tokio::test]
async fn request_and_response_stream_with_trailers_both_ways() {
    let upstream = H2Upstream::start().await;
    let clerk = FakeClerk::start().await;
    let gate = gate(
        &clerk,
        &upstream.url,
        "[proxy]\nupstream_protocol = \"h2c\"\n",
    )
    .await;
    let token = clerk.session_token("user_stream");
    let mut h2 = h2_client(&gate).await;

    // Request streaming: the upstream has the first chunk before the client sends the second.
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel();
    *upstream.state.chunks.lock().unwrap() = Some(chunks_tx);
    let (mut tx, rx): (Sender<Bytes, Infallible>, _) = Channel::new(4);
    let req = Request::post(format!("http://{}/upload", gate.proxy))
        .header("authorization", format!("Bearer {token}"))
        .header("te", "trailers")
        .body(rx.boxed())
        .unwrap();
    let pending = tokio::spawn(h2.send_request(req));
    tx.send_data(Bytes::from("first ")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), chunks.recv())
        .await
        .expect("the first chunk reached the upstream before the body ended")
        .unwrap();
    assert_eq!(got, "first ");
    tx.send_data(Bytes::from("second")).await.unwrap();
    tx.send_trailers(trailers(&[("x-req-trailer", "t1")]))
        .await
        .unwrap();
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let (body, resp_trailers) = read_all(resp.into_body()).await;
    assert_eq!(body, "first second");
    let resp_trailers = resp_trailers.expect("response trailers");
    assert_eq!(resp_trailers["grpc-status"], "0");
    assert_eq!(resp_trailers["x-seen-trailer"], "t1");
    let seen = upstream.seen();
    assert_eq!(seen[0].trailers.as_ref().unwrap()["x-req-trailer"], "t1");
    assert_eq!(seen[0].headers["x-user-id"], "user_stream");
    *upstream.state.chunks.lock().unwrap() = None;

    // Response streaming: the first chunk arrives while the upstream still holds the second.
    let req = Request::get(format!("http://{}/stream", gate.proxy))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first chunk came before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "one");
    upstream.state.release.notify_one();
    let (rest, rest_trailers) = read_all(body).await;
    assert_eq!(rest, "two");
    assert_eq!(rest_trailers.unwrap()["x-done"], "yes");
}

async fn grpc_call(
    h2: &mut hyper::client::conn::http2::SendRequest<Body>,
    gate: &Sidecar,
    method: &str,
    token: Option<&str>,
    message: &[u8],
) -> (Response<()>, Vec<Bytes>, Option<HeaderMap>) {
    let mut req = Request::post(format!("http://{}/echo.Echo/{method}", gate.proxy))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(Full::new(grpc_frame(message)).boxed()).unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let (data, trailers) = read_all(body).await;
    (
        Response::from_parts(parts, ()),
        grpc_messages(data),
        trailers,
    )
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_pass_and_refusals_carry_grpc_status() {
    let upstream = H2Upstream::start().await;
    let clerk = FakeClerk::start().await;
    let gate = gate(
        &clerk,
        &upstream.url,
        "[proxy]\nupstream_protocol = \"h2c\"\n",
    )
    .await;
    let token = clerk.session_token("user_grpc");
    let mut h2 = h2_client(&gate).await;

    let (resp, messages, trailers) = grpc_call(&mut h2, &gate, "Unary", Some(&token), b"abc").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(messages, vec![Bytes::from("cba")]);
    assert_eq!(trailers.unwrap()["grpc-status"], "0");

    let (_, messages, trailers) = grpc_call(&mut h2, &gate, "Many", Some(&token), b"xyz").await;
    assert_eq!(messages, vec![Bytes::from("zyx"); 3]);
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.headers["x-user-id"], "user_grpc");
        assert_eq!(s.headers["te"], "trailers");
        assert!(s.headers.get("authorization").is_none());
    }

    // No token: a trailers-only UNAUTHENTICATED, and nothing reaches the upstream.
    let (resp, messages, trailers) = grpc_call(&mut h2, &gate, "Unary", None, b"abc").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(resp.headers()["grpc-status"], "16");
    assert_eq!(resp.headers()["grpc-message"], "session-token-missing");
    assert!(messages.is_empty());
    assert!(
        trailers.is_none(),
        "trailers-only: the status is in the head"
    );
    // A forged token likewise.
    let (resp, _, _) = grpc_call(&mut h2, &gate, "Unary", Some("e30.e30.e30"), b"abc").await;
    assert_eq!(resp.headers()["grpc-status"], "16");
    assert_eq!(upstream.seen().len(), 2);

    // The same refusal of a plain request stays an HTTP 401.
    let resp = client()
        .get(gate.url("/echo.Echo/Unary"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn grpc_call_to_an_unreachable_upstream_is_unavailable() {
    // A port with nothing listening, held (bound, not listening) so no other test takes it.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    let clerk = FakeClerk::start().await;
    let gate = gate(&clerk, &url, "[proxy]\nupstream_protocol = \"h2c\"\n").await;
    let token = clerk.session_token("user_down");
    let mut h2 = h2_client(&gate).await;
    let (resp, _, _) = grpc_call(&mut h2, &gate, "Unary", Some(&token), b"abc").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()["grpc-message"], "upstream-unavailable");
}

#[tokio::test]
async fn a_restarted_upstream_connection_is_redialled() {
    let upstream = H2Upstream::start().await;
    let clerk = FakeClerk::start().await;
    let gate = gate(
        &clerk,
        &upstream.url,
        "[proxy]\nupstream_protocol = \"h2c\"\n",
    )
    .await;
    let token = clerk.session_token("user_redial");
    let http = client();
    for _ in 0..4 {
        let resp = http
            .get(gate.url("/plain"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let before = upstream.state.connections.load(Ordering::SeqCst);
    assert!(before <= 2);
    // The upstream drops every connection (a restart): the next requests dial anew.
    upstream.state.kill.notify_waiters();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..4 {
        let resp = http
            .get(gate.url("/plain"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let after = upstream.state.connections.load(Ordering::SeqCst);
    assert!(
        after > before && after <= before + 2,
        "{before} then {after}"
    );
    assert_eq!(upstream.seen().len(), 8);

    // A graceful close (GOAWAY, as a rolling restart sends) likewise.
    upstream.state.graceful.notify_waiters();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..4 {
        let resp = http
            .get(gate.url("/plain"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let last = upstream.state.connections.load(Ordering::SeqCst);
    assert!(last > after && last <= after + 2, "{after} then {last}");
    assert_eq!(upstream.seen().len(), 12);
}

/// A TLS upstream (clerkgate's own server: ALPN h2 and http/1.1, or `alpn` given) that answers
/// with the HTTP version it was spoken to in.
async fn tls_upstream(alpn: Option<Vec<Vec<u8>>>) -> (String, String) {
    use clerkgate::server::{ConnInfo, Handler, Limits, serve, tls_acceptor};
    struct Version;
    impl Handler for Version {
        type Body = Full<Bytes>;
        async fn handle(&self, req: Request<Incoming>, _: ConnInfo) -> Response<Full<Bytes>> {
            Response::new(Full::new(Bytes::from(format!("{:?}", req.version()))))
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "clerkgate-h2-alpn-{}-{}",
        std::process::id(),
        alpn.is_some()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.join("upstream.crt");
    let key_path = dir.join("upstream.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let acceptor = match alpn {
        None => tls_acceptor(cert_path.to_str().unwrap(), key_path.to_str().unwrap()).unwrap(),
        Some(alpn) => {
            let mut config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.cert.der().clone()],
                    rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
                        .unwrap(),
                )
                .unwrap();
            config.alpn_protocols = alpn;
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve(
        listener,
        Some(acceptor),
        Limits::default(),
        Arc::new(Version),
        std::future::pending::<()>(),
    ));
    (
        format!("https://localhost:{port}"),
        cert_path.to_str().unwrap().to_owned(),
    )
}

async fn version_through(
    clerk: &FakeClerk,
    upstream: &str,
    ca: &str,
    protocol: &str,
) -> (u16, String) {
    let gate = gate(
        clerk,
        upstream,
        &format!("[proxy]\nupstream_ca_path = \"{ca}\"\nupstream_protocol = \"{protocol}\"\n"),
    )
    .await;
    let resp = client()
        .get(gate.url("/v"))
        .bearer_auth(clerk.session_token("user_alpn"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn https_upstreams_speak_h2_when_alpn_agrees() {
    clerkgate::install_crypto_provider();
    let clerk = FakeClerk::start().await;
    let (both, ca) = tls_upstream(None).await;
    assert_eq!(
        version_through(&clerk, &both, &ca, "h2").await,
        (200, "HTTP/2.0".into())
    );
    assert_eq!(
        version_through(&clerk, &both, &ca, "auto").await,
        (200, "HTTP/2.0".into())
    );
    assert_eq!(
        version_through(&clerk, &both, &ca, "http1").await,
        (200, "HTTP/1.1".into())
    );

    // An upstream that only speaks HTTP/1.1: auto settles on it, h2 refuses with a 502.
    let (http1_only, ca) = tls_upstream(Some(vec![b"http/1.1".to_vec()])).await;
    for _ in 0..2 {
        assert_eq!(
            version_through(&clerk, &http1_only, &ca, "auto").await,
            (200, "HTTP/1.1".into())
        );
    }
    let (status, body) = version_through(&clerk, &http1_only, &ca, "h2").await;
    assert_eq!(status, 502);
    assert!(body.contains("upstream-unavailable"), "{body}");
}

#[tokio::test]
async fn a_protocol_that_does_not_fit_the_upstream_scheme_names_the_key() {
    let clerk = FakeClerk::start().await;
    for (upstream, protocol) in [("https://app:443", "h2c"), ("http://app:3000", "h2")] {
        let err = config(
            &base_toml(&clerk, upstream),
            &format!("[proxy]\nupstream_protocol = \"{protocol}\"\n"),
        )
        .expect_err("refused");
        assert_eq!(err.key, "proxy.upstream_protocol");
    }
    let err = config(
        &base_toml(&clerk, "http://app:3000"),
        "[proxy]\nupstream_protocol = \"h3\"\n",
    )
    .expect_err("refused");
    assert!(err.key.contains("upstream_protocol"), "{}", err.key);
    for protocol in ["http1", "h2c", "auto"] {
        assert!(
            config(
                &base_toml(&clerk, "http://app:3000"),
                &format!("[proxy]\nupstream_protocol = \"{protocol}\"\n"),
            )
            .is_ok()
        );
    }
}

#[tokio::test]
async fn bodies_larger_than_the_flow_control_windows_pass_both_ways() {
    let upstream = H2Upstream::start().await;
    let clerk = FakeClerk::start().await;
    let gate = gate(
        &clerk,
        &upstream.url,
        "[proxy]\nupstream_protocol = \"h2c\"\n",
    )
    .await;
    let token = clerk.session_token("user_big");
    // 4 MiB: 64 times HTTP/2's initial 64 KiB stream window, so it passes only if both hops
    // keep opening their windows as the other side reads.
    let big: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut h2 = h2_client(&gate).await;
    let req = Request::post(format!("http://{}/big", gate.proxy))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(big.clone())).boxed())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (body, _) = read_all(resp.into_body()).await;
    assert_eq!(body.len(), big.len());
    assert!(body == big, "the body came back intact");
    assert_eq!(upstream.seen()[0].body.len(), big.len());
}

#[tokio::test]
async fn a_client_body_that_breaks_its_framing_is_a_400_not_an_upstream_error() {
    let upstream = H2Upstream::start().await;
    let clerk = FakeClerk::start().await;
    let gate = gate(
        &clerk,
        &upstream.url,
        "[proxy]\nupstream_protocol = \"h2c\"\n",
    )
    .await;
    let token = clerk.session_token("user_chunks");
    let mut tcp = TcpStream::connect(gate.proxy).await.unwrap();
    let head = format!(
        "POST /plain HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad-request-body"), "{answer}");
    // Not counted against the upstream, and the upstream never took the cut-off body for a
    // whole one.
    let metrics = gate.metrics_text().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("clerkgate_upstream_errors_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        upstream.seen().is_empty(),
        "a truncated body was delivered as complete"
    );
}
