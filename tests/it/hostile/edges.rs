//! The edges an outside review found open (issue 12): protocol upgrades that would become
//! unauthenticated tunnels, headers that make an upstream re-route or re-attribute a request,
//! path segments upstreams read differently, a pooled connection lent while still busy,
//! concurrent deliveries of one webhook, and the token size limit. Every test asserts on what
//! the upstream actually received.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::WAIT;
use crate::support::env::{Env, assert_refused, shared_clerk};
use crate::support::raw::{find, read_head, status_of};
use crate::support::{Sidecar, client};

/// Public, optional and required routes: the three places a tunnel could start from.
const ROUTES: &str = r#"
[[routes]]
path = "/public/**"
auth = "public"
[[routes]]
path = "/optional/**"
auth = "optional"
[[routes]]
path = "/admin/**"
org_role = "admin"
"#;

/// One request as an upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    version: http::Version,
    path: String,
    headers: http::HeaderMap,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn record(log: &Log, req: &Request<Incoming>) {
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Seen {
            version: req.version(),
            path: req.uri().path().to_owned(),
            headers: req.headers().clone(),
        });
}

/// An upstream that really does what Hypercorn does: it answers `Upgrade: h2c` with `101` and
/// then speaks HTTP/2 on the same connection, serving every request that arrives that way.
struct H2cUpstream {
    addr: std::net::SocketAddr,
    log: Log,
    task: tokio::task::JoinHandle<()>,
}

impl H2cUpstream {
    async fn start() -> H2cUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log: Log = Arc::default();
        let shared = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, std::convert::Infallible>(h1_or_upgrade(req, log)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        H2cUpstream { addr, log, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for H2cUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn h1_or_upgrade(mut req: Request<Incoming>, log: Log) -> Response<Full<Bytes>> {
    record(&log, &req);
    let wants_h2c = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"));
    if !wants_h2c {
        return Response::new(Full::new(Bytes::from_static(b"plain http/1.1")));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let log = log.clone();
            async move {
                record(&log, &req);
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"served over the h2c tunnel",
                ))))
            }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(upgraded, service)
            .await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "h2c")
        .body(Full::new(Bytes::new()))
        .expect("101 response")
}

/// Tries to speak HTTP/2 on a connection clerkgate already answered: what an attacker does
/// after a `101`. Returns the status of a request for `/admin/secret` claiming to be
/// `user_evil`, if any HTTP/2 exchange got through.
async fn try_h2_through(stream: TcpStream) -> Option<u16> {
    let attempt = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("http://app.example/admin/secret")
            .header("x-user-id", "user_evil")
            .header("x-org-role", "org:admin")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

fn h2c_request(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n{auth}\r\n"
    )
}

#[tokio::test]
async fn an_h2c_upgrade_never_becomes_a_tunnel_on_any_route_with_or_without_a_token() {
    let clerk = shared_clerk();
    let upstream = H2cUpstream::start().await;
    let gate = gate_for(&upstream.url(), ROUTES).await;
    let member = clerk.mint(json!({
        "sub": "user_1", "sid": "sess_1", "iss": clerk.issuer(),
        "iat": crate::support::now(), "exp": crate::support::now() + 300,
        "o": {"id": "org_1", "rol": "admin", "slg": "acme"}, "v": 2,
    }));
    let cases: [(&str, Option<&str>, u16); 6] = [
        ("/public/x", None, 200),
        ("/public/x", Some(&member), 200),
        ("/optional/x", None, 200),
        ("/optional/x", Some(&member), 200),
        ("/admin/x", None, 401),
        ("/admin/x", Some(&member), 200),
    ];
    for (path, token, want) in cases {
        let case = format!("{path} with token: {}", token.is_some());
        let before = upstream.seen().len();
        let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
        stream
            .write_all(h2c_request(path, token).as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut stream).await.expect("a response head");
        assert_eq!(status_of(&head), want, "{case}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("upgrade: h2c"),
            "{case}: {head}"
        );
        // The response has a body on the HTTP/1.1 connection; whatever the attacker sends now
        // is HTTP/1.1 to clerkgate, never HTTP/2 to the upstream.
        assert_eq!(try_h2_through(stream).await, None, "{case}");
        let seen = upstream.seen();
        let new = &seen[before..];
        assert_eq!(new.len(), usize::from(want == 200), "{case}: {new:?}");
        for s in new {
            assert_eq!(s.version, http::Version::HTTP_11, "{case}");
            assert_eq!(s.path, path, "{case}");
            for name in ["upgrade", "http2-settings", "connection"] {
                assert!(
                    s.headers.get(name).is_none(),
                    "{case}: {name} reached the upstream"
                );
            }
        }
    }
    assert!(
        upstream
            .seen()
            .iter()
            .all(|s| s.version == http::Version::HTTP_11 && s.path != "/admin/secret"),
        "nothing ever reached the upstream over HTTP/2"
    );
    gate.stop().await;
}

/// An upstream that answers `101` to every request (whatever it asked for) and records every
/// byte that arrives on the connection after it.
struct AlwaysSwitches {
    addr: std::net::SocketAddr,
    after: Arc<Mutex<Vec<u8>>>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AlwaysSwitches {
    async fn start(upgrade: &'static str) -> AlwaysSwitches {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let after: Arc<Mutex<Vec<u8>>> = Arc::default();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let (after2, heads2) = (after.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (after, heads) = (after2.clone(), heads2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while find(&buf, b"\r\n\r\n").is_none() {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = find(&buf, b"\r\n\r\n").unwrap() + 4;
                    heads
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(String::from_utf8_lossy(&buf[..end]).into_owned());
                    after
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(&buf[end..]);
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => after
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        AlwaysSwitches {
            addr,
            after,
            heads,
            task,
        }
    }

    fn after(&self) -> Vec<u8> {
        self.after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn heads(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for AlwaysSwitches {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// clerkgate in front of an upstream that is not the echo server, ready to serve.
async fn gate_for(upstream_url: &str, extra: &str) -> Sidecar {
    let base = crate::support::sidecar::base_toml(&shared_clerk(), upstream_url);
    let gate =
        Sidecar::start_config(crate::support::sidecar::config(&base, extra).expect("config")).await;
    assert!(gate.wait_ready(WAIT).await, "clerkgate became ready");
    gate
}

#[tokio::test]
async fn a_101_the_client_did_not_ask_for_is_502_and_never_tunnelled() {
    let upstream = AlwaysSwitches::start("h2c").await;
    let gate = gate_for(&format!("http://{}", upstream.addr), ROUTES).await;
    for request in [
        // A plain request, and an h2c upgrade that clerkgate stripped.
        "GET /public/x HTTP/1.1\r\nHost: app.example\r\n\r\n".to_owned(),
        h2c_request("/public/x", None),
    ] {
        let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await.expect("a response head");
        assert_eq!(status_of(&head), 502, "{head}");
        // The attacker's next bytes stay on clerkgate's side.
        let _ = stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nsecret tunnel bytes")
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut replies = crate::support::raw::send_raw(
        gate.proxy,
        b"GET /public/y HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_refused(&replies.remove(0), 502, "upstream-protocol-error", "101");
    assert!(
        upstream.after().is_empty(),
        "bytes reached the upstream through a tunnel: {:?}",
        String::from_utf8_lossy(&upstream.after())
    );
    assert!(
        upstream
            .heads()
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("upgrade")),
        "{:?}",
        upstream.heads()
    );
    gate.stop().await;
}

#[tokio::test]
async fn a_websocket_handshake_answered_with_another_protocol_is_502() {
    let upstream = AlwaysSwitches::start("h2c").await;
    let gate = gate_for(&format!("http://{}", upstream.addr), ROUTES).await;
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    stream
        .write_all(
            b"GET /public/ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a response head");
    assert_eq!(status_of(&head), 502, "{head}");
    let _ = stream.write_all(b"tunnel bytes").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.heads().len(), 1);
    assert!(
        upstream.heads()[0]
            .to_ascii_lowercase()
            .contains("upgrade: websocket")
    );
    assert!(upstream.after().is_empty(), "no tunnel after a bad 101");
    gate.stop().await;
}

#[tokio::test]
async fn only_a_get_websocket_upgrade_is_forwarded_as_one() {
    let env = Env::start(ROUTES).await;
    let ws = [
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    for upgrade in [
        "websocket, h2c",
        "h2c, websocket",
        "TLS/1.2",
        "websocket/13",
        "foo",
    ] {
        let mut headers = ws.to_vec();
        headers.push(("Upgrade", upgrade));
        let reply = env.raw_get("/public/ws", &headers).await;
        assert_eq!(reply.status, 200, "{upgrade}: {}", reply.text());
        let seen = env.upstream.last();
        assert!(seen.headers.get("upgrade").is_none(), "{upgrade}");
        assert!(seen.headers.get("connection").is_none(), "{upgrade}");
    }
    // A websocket handshake with another method is a plain request.
    let replies = env
        .send(
            b"POST /public/ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nContent-Length: 0\r\n\r\n\
              GET /public/next HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(replies.len(), 2, "the connection stayed HTTP/1.1");
    assert_eq!(replies[0].status, 200);
    let recorded = env.upstream.recorder.all();
    let post = recorded
        .iter()
        .find(|r| r.method == http::Method::POST)
        .expect("the POST was forwarded");
    assert!(post.headers.get("upgrade").is_none());
    env.stop().await;
}

#[tokio::test]
async fn connect_is_405_and_reaches_nothing() {
    let env = Env::start(ROUTES).await;
    let mut replies = env
        .send(b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\nConnection: close\r\n\r\n")
        .await;
    assert!(!replies.is_empty());
    let reply = replies.remove(0);
    assert_refused(&reply, 405, "method-not-allowed", "CONNECT");
    assert!(reply.header("allow").is_some());
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn path_and_method_override_headers_never_reach_the_upstream() {
    let env = Env::start(ROUTES).await;
    let overrides = [
        ("X-Original-URL", "/admin/secret"),
        ("X_Original_URL", "/admin/secret"),
        ("X-Rewrite-URL", "/admin/secret"),
        ("x_rewrite_url", "/admin/secret"),
        ("X-Forwarded-Uri", "/admin/secret"),
        ("X-Original-URI", "/admin/secret"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Forwarded-Path", "/admin/secret"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-Original-Method", "DELETE"),
    ];
    let reply = env.raw_get("/public/x", &overrides).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    for (name, _) in overrides {
        let folded = crate::support::env::fold(name);
        assert!(
            seen.headers
                .keys()
                .all(|k| crate::support::env::fold(k.as_str()) != folded),
            "{name} reached the upstream"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn the_override_list_is_configurable() {
    let env = Env::start(&format!(
        "{ROUTES}\n[headers]\nstrip_request = [\"x-tenant-override\"]\n"
    ))
    .await;
    let reply = env
        .raw_get(
            "/public/x",
            &[("X-Tenant-Override", "t2"), ("X-Original-URL", "/app")],
        )
        .await;
    assert_eq!(reply.status, 200);
    let seen = env.upstream.last();
    assert!(seen.headers.get("x-tenant-override").is_none());
    assert_eq!(
        seen.headers["x-original-url"], "/app",
        "kept once the operator lists other names"
    );
    env.stop().await;
}

#[tokio::test]
async fn client_ip_headers_are_replaced_or_removed_unless_trusted() {
    let sent = [
        ("X-Real-IP", "203.0.113.1"),
        ("X_Real_IP", "203.0.113.2"),
        ("True-Client-IP", "203.0.113.3"),
        ("X-Client-IP", "203.0.113.4"),
        ("CF-Connecting-IP", "203.0.113.5"),
        ("X-Cluster-Client-IP", "203.0.113.6"),
        ("Fastly-Client-IP", "203.0.113.7"),
        ("Forwarded", "for=203.0.113.8;proto=https"),
        ("X_Forwarded_For", "203.0.113.9"),
        ("X-Forwarded-For", "203.0.113.10"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Ssl", "on"),
        ("X-Forwarded-Proto", "https"),
    ];
    let env = Env::start(ROUTES).await;
    let reply = env.raw_get("/public/x", &sent).await;
    assert_eq!(reply.status, 200);
    let seen = env.upstream.last();
    let mut names: Vec<String> = seen
        .headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| {
            sent.iter()
                .any(|(s, _)| crate::support::env::fold(s) == crate::support::env::fold(k))
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["x-forwarded-for", "x-forwarded-proto", "x-real-ip"],
        "only clerkgate's own"
    );
    assert_eq!(seen.headers["x-real-ip"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    env.stop().await;

    let env = Env::start(&format!(
        "{ROUTES}\n[proxy]\ntrust_forwarded_headers = true\n"
    ))
    .await;
    let reply = env
        .raw_get(
            "/public/x",
            &[
                ("X-Real-IP", "203.0.113.1"),
                ("Forwarded", "for=203.0.113.8;proto=https"),
                ("X-Forwarded-For", "203.0.113.10"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let seen = env.upstream.last();
    assert_eq!(seen.headers["x-real-ip"], "203.0.113.1");
    assert_eq!(
        seen.headers["forwarded"],
        "for=203.0.113.8;proto=https, for=127.0.0.1"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.10, 127.0.0.1");
    env.stop().await;
}

#[tokio::test]
async fn http2_authority_and_host_that_disagree_are_400() {
    let env = Env::start(ROUTES).await;
    let stream = TcpStream::connect(env.gate.proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut send = async |host: Option<&str>| {
        let mut req = Request::builder().uri("http://app.example/public/x");
        if let Some(host) = host {
            req = req.header("host", host);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .expect("an answer");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = send(Some("admin.example")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("host-authority-mismatch"), "{body}");
    assert_eq!(env.upstream.count(), 0);
    let (status, _) = send(Some("APP.example")).await;
    assert_eq!(status, 200, "hosts compare case-insensitively");
    let (status, _) = send(None).await;
    assert_eq!(status, 200);
    assert_eq!(env.upstream.last().headers["host"], "app.example");
    assert_eq!(env.upstream.count(), 2);
    env.stop().await;
}

#[tokio::test]
async fn segments_ending_in_a_dot_or_a_space_are_400_through_the_proxy_and_forward_auth() {
    let env = Env::start(ROUTES).await;
    for target in [
        "/admin./secret",
        "/admin%2e/secret",
        "/admin%20/secret",
        "/admin.%20/secret",
        "/admin.;x/secret",
        "/public/../admin./secret",
        "/admin/secret.",
    ] {
        let reply = env.raw_get(target, &[]).await;
        assert_refused(&reply, 400, "path-ambiguous-segment", target);
        let reply = env
            .raw_get("/_clerkgate/auth", &[("X-Original-URI", target)])
            .await;
        assert_refused(&reply, 400, "path-ambiguous-segment", target);
    }
    assert_eq!(env.upstream.count(), 0);
    // Dots and spaces inside names are data.
    let reply = env.raw_get("/public/v1.2/a%20b.txt", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(env.upstream.last().uri.path(), "/public/v1.2/a%20b.txt");
    env.stop().await;
}

/// An upstream that answers `404` as soon as it has a request head, never reading a body, and
/// keeps the connection open; it counts connections.
struct AnswersEarly {
    addr: std::net::SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl AnswersEarly {
    async fn start() -> AnswersEarly {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        // Every complete head gets an answer; body bytes are left unread.
                        while let Some(end) = find(&buf, b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        AnswersEarly {
            addr,
            connections,
            task,
        }
    }
}

impl Drop for AnswersEarly {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_connection_still_sending_a_body_is_never_lent_to_another_request() {
    let upstream = AnswersEarly::start().await;
    let gate = gate_for(
        &format!("http://{}", upstream.addr),
        "[[routes]]\npath = \"/**\"\nauth = \"public\"\n[proxy]\nupstream_timeout_seconds = 20\n",
    )
    .await;
    // A client that starts an upload and then withholds the rest of its body.
    let mut uploader = TcpStream::connect(gate.proxy).await.unwrap();
    uploader
        .write_all(b"POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: 1000000\r\n\r\nfirst bytes")
        .await
        .unwrap();
    let head = read_head(&mut uploader).await.expect("a response head");
    assert_eq!(status_of(&head), 404, "the upstream answered early: {head}");

    // Unrelated requests are served at once, not after upstream_timeout_seconds.
    let http = client();
    for i in 0..3 {
        let started = Instant::now();
        let resp = http
            .get(gate.url(&format!("/other/{i}")))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("served, not stuck behind the upload");
        assert_eq!(resp.status(), 404);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {i} waited {:?}",
            started.elapsed()
        );
    }
    assert!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "the busy connection was not reused"
    );
    // A body that did complete leaves its connection reusable.
    let before = upstream
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        let resp = http
            .post(gate.url("/small"))
            .body("done")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
    assert!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            <= before + 1,
        "completed exchanges reuse their connection"
    );
    drop(uploader);
    gate.stop().await;
}

fn revoke_body(sid: &str) -> String {
    format!(
        r#"{{"data":{{"id":"{sid}","status":"revoked","user_id":"user_1"}},"instance_id":"ins_fake","object":"event","timestamp":1716883200,"type":"session.revoked"}}"#
    )
}

/// Ten overlapping copies of one signed delivery: one acts, nine answer `duplicate`.
async fn ten_copies(forward: bool) -> (Env, Vec<String>) {
    let clerk = shared_clerk();
    let forward_path = if forward {
        "forward_path = \"/internal/clerk-webhook\"\n"
    } else {
        ""
    };
    let env = Env::start(&format!(
        "[webhooks]\nsecret = \"{}\"\n{forward_path}",
        clerk.webhook_secret()
    ))
    .await;
    let body = revoke_body("sess_concurrent");
    let ts = crate::support::now() as i64;
    let sig = clerk.sign_webhook("msg_concurrent", ts, body.as_bytes());
    let posts = (0..10).map(|_| {
        let req = env
            .http
            .post(env.gate.url("/webhooks/clerk"))
            .header("svix-id", "msg_concurrent")
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", sig.clone())
            .body(body.clone());
        async move {
            let resp = req.send().await.expect("answer");
            assert_eq!(resp.status(), 200);
            let v: serde_json::Value = resp.json().await.unwrap();
            v["status"].as_str().unwrap_or_default().to_owned()
        }
    });
    let statuses = futures_util::future::join_all(posts).await;
    (env, statuses)
}

#[tokio::test]
async fn concurrent_copies_of_one_webhook_are_forwarded_once() {
    let (env, statuses) = ten_copies(true).await;
    assert_eq!(
        statuses.iter().filter(|s| *s == "processed").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "duplicate").count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(env.upstream.count(), 1, "forwarded exactly once");
    env.stop().await;
}

#[tokio::test]
async fn concurrent_copies_of_one_webhook_are_applied_once_without_forwarding() {
    use clerkgate::telemetry::{WebhookEventType, WebhookResult};
    let (env, statuses) = ten_copies(false).await;
    assert_eq!(
        statuses.iter().filter(|s| *s == "processed").count(),
        1,
        "{statuses:?}"
    );
    let m = &env.gate.metrics.webhook_events;
    assert_eq!(
        m.get(WebhookEventType::SessionRevoked, WebhookResult::Processed),
        1
    );
    assert_eq!(
        m.get(WebhookEventType::SessionRevoked, WebhookResult::Duplicate),
        9
    );
    env.stop().await;
}

#[tokio::test]
async fn a_failed_forward_releases_the_claim_for_the_retry() {
    let clerk = shared_clerk();
    // The forward target is an upstream that is down at first.
    // Bound but never listening (held for the test): refused, and no other server can take it.
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let gate = gate_for(
        &format!("http://{dead_addr}"),
        &format!(
            "[webhooks]\nsecret = \"{}\"\nforward_path = \"/hook\"\n",
            clerk.webhook_secret()
        ),
    )
    .await;
    let body = revoke_body("sess_retry");
    let ts = crate::support::now() as i64;
    let sig = clerk.sign_webhook("msg_retry", ts, body.as_bytes());
    let post = || {
        client()
            .post(gate.url("/webhooks/clerk"))
            .header("svix-id", "msg_retry")
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", sig.clone())
            .body(body.clone())
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(first.status(), 502, "the forward failed: Svix must retry");
    let second = post().await.unwrap();
    assert_eq!(
        second.status(),
        502,
        "the retry got the claim again (not a stuck 409 or a false duplicate)"
    );
    gate.stop().await;
}

#[tokio::test]
async fn tokens_up_to_max_token_bytes_verify_and_longer_ones_are_token_too_large() {
    let clerk = shared_clerk();
    let env = Env::start("[proxy]\nmax_header_bytes = 262144\n").await;
    let big = |pad: usize| {
        clerk.mint(json!({
            "sub": "user_big", "sid": "sess_big", "iss": clerk.issuer(),
            "iat": crate::support::now(), "exp": crate::support::now() + 300,
            "public_metadata": {"notes": "x".repeat(pad)},
        }))
    };
    // Past the old hard-coded 16 KiB, which Clerk's SDK accepts.
    let token = big(20 * 1024);
    assert!(token.len() > 16 * 1024);
    let reply = env.get("/orders", Some(&token), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.last().headers["x-user-id"], "user_big");
    // Past the 64 KiB default.
    let token = big(70 * 1024);
    let reply = env.get("/orders", Some(&token), &[]).await;
    assert_refused(&reply, 401, "token-too-large", "70 KiB token");
    assert_eq!(env.upstream.count(), 1);
    env.stop().await;

    let env = Env::start("[auth]\nmax_token_bytes = 2048\n").await;
    let reply = env.get("/orders", Some(&big(4096)), &[]).await;
    assert_refused(&reply, 401, "token-too-large", "configured limit");
    let reply = env
        .get("/orders", Some(&clerk.session_token("user_small")), &[])
        .await;
    assert_eq!(reply.status, 200);
    env.stop().await;
}

#[test]
fn max_token_bytes_above_max_header_bytes_is_a_config_error() {
    let base = crate::support::sidecar::base_toml(&shared_clerk(), "http://127.0.0.1:1");
    for extra in [
        "[auth]\nmax_token_bytes = 100000\n",
        "[auth]\nmax_token_bytes = 100\n",
    ] {
        let err = crate::support::sidecar::config(&base, extra).unwrap_err();
        assert_eq!(err.key, "auth.max_token_bytes", "{extra}");
    }
    let ok = crate::support::sidecar::config(
        &base,
        "[auth]\nmax_token_bytes = 100000\n[proxy]\nmax_header_bytes = 131072\n",
    );
    assert!(ok.is_ok(), "{ok:?}");
}
