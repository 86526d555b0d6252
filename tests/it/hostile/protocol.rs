//! Protocol: HTTP/1.1 request smuggling over raw TCP, HTTP/2 header blocks that are malformed
//! (upper-case names, connection-specific fields) written as raw h2c frames, a client that
//! never reads its response, `proxy.max_connections`, and thousands of idle keep-alive
//! connections.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::kit::ROUTES;
use crate::support::WAIT;
use crate::support::env::Env;
use crate::support::raw::read_response;

/// The request every smuggling case tries to slip past clerkgate: no token, admin-only path.
const SMUGGLED: &str = "GET /admin/smuggled HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

/// (case, bytes, statuses the client must get, paths the upstream must receive)
type Smuggle = (&'static str, String, Vec<u16>, Vec<&'static str>);

fn smuggling_cases() -> Vec<Smuggle> {
    let post = "POST /public/a HTTP/1.1\r\nHost: a\r\n";
    let s = SMUGGLED;
    let hidden = format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len());
    vec![
        // CL.TE and TE.CL: chunked wins and the connection is closed after the response, so
        // nothing after the body is ever read as a request.
        (
            "Content-Length then Transfer-Encoding",
            format!("{post}Content-Length: 80\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}"),
            vec![200],
            vec!["/public/a"],
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!("{post}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{s}"),
            vec![200],
            vec!["/public/a"],
        ),
        (
            "two different Content-Lengths",
            format!("{post}Content-Length: 5\r\nContent-Length: 60\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "a Content-Length list",
            format!("{post}Content-Length: 5, 60\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "Content-Length with a plus sign",
            format!("{post}Content-Length: +5\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "negative Content-Length",
            format!("{post}Content-Length: -5\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "Content-Length beyond u64",
            format!("{post}Content-Length: 99999999999999999999999\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!("{post}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{s}"),
            vec![400],
            vec![],
        ),
        (
            "Transfer-Encoding: identity",
            format!("{post}Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "Transfer-Encoding: xchunked",
            format!("{post}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{s}"),
            vec![400],
            vec![],
        ),
        (
            "Transfer-Encoding with a space before the colon",
            format!("{post}Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "Transfer-Encoding folded onto a continuation line",
            format!("{post}Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\nhello{s}"),
            vec![400],
            vec![],
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!(
                "POST /public/a HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}"
            ),
            vec![400],
            vec![],
        ),
        (
            "invalid chunk size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{s}"),
            vec![],
            vec![],
        ),
        (
            "chunk size in 0x notation",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n{s}"),
            vec![],
            vec![],
        ),
        (
            "chunk size beyond u64",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nhello\r\n0\r\n\r\n{s}"
            ),
            vec![],
            vec![],
        ),
        (
            "chunk size with a leading space",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n{s}"),
            vec![],
            vec![],
        ),
        (
            "chunk data longer than its size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n{s}"),
            vec![],
            vec![],
        ),
        // Framing clerkgate and the upstream agree on: a second request after a complete body
        // is a request of its own, which clerkgate authenticates (401) and never forwards.
        (
            "pipelined after Content-Length: 0",
            format!("{post}Content-Length: 0\r\n\r\n{s}"),
            vec![200, 401],
            vec!["/public/a"],
        ),
        (
            "pipelined after two equal Content-Lengths",
            format!("{post}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello{s}"),
            vec![200, 401],
            vec!["/public/a"],
        ),
        (
            "pipelined after Transfer-Encoding: CHUNKED",
            format!("{post}Transfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n{s}"),
            vec![200, 401],
            vec!["/public/a"],
        ),
        (
            "a request inside a chunk is body data",
            format!("{post}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{hidden}"),
            vec![200],
            vec!["/public/a"],
        ),
        (
            "a request inside a Content-Length body is body data",
            format!(
                "{post}Content-Length: {}\r\nConnection: close\r\n\r\n{s}",
                s.len()
            ),
            vec![200],
            vec!["/public/a"],
        ),
    ]
}

/// Waits until the upstream has recorded nothing new for 300 ms: a request whose body broke
/// off is recorded only once the upstream gives up reading it.
async fn settle(env: &Env) {
    let mut last = env.upstream.count();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = env.upstream.count();
        if now == last {
            return;
        }
        last = now;
    }
}

#[tokio::test]
async fn smuggled_requests_never_reach_the_upstream_as_requests() {
    let env = Env::start(ROUTES).await;
    for (case, bytes, statuses, paths) in smuggling_cases() {
        let before = env.upstream.count();
        let replies = env.send(bytes.as_bytes()).await;
        if statuses.is_empty() {
            settle(&env).await;
        }
        let got: Vec<u16> = replies.iter().map(|r| r.status).collect();
        let received: Vec<String> = env.upstream.recorder.all()[before..]
            .iter()
            .map(|r| r.uri.path().to_owned())
            .collect();
        assert!(
            !received.iter().any(|p| p.contains("smuggled")),
            "{case}: the smuggled request reached the upstream: {received:?}"
        );
        if statuses.is_empty() {
            // Broken chunked framing: the head may already have been forwarded (the body is
            // streamed), but the client never gets a 2xx and nothing else is forwarded. The
            // answer is the client's 400, not an upstream 502.
            assert!(
                got.iter().all(|s| *s == 400) && got.len() <= 1,
                "{case}: {got:?}"
            );
            assert!(
                received.iter().all(|p| p == "/public/a"),
                "{case}: {received:?}"
            );
            assert!(received.len() <= 1, "{case}: {received:?}");
        } else {
            assert_eq!(got, statuses, "{case}");
            assert_eq!(received, paths, "{case}");
        }
        for seen in &env.upstream.recorder.all()[before..] {
            assert!(
                !(seen.headers.contains_key("content-length")
                    && seen.headers.contains_key("transfer-encoding")),
                "{case}: both framings forwarded: {:?}",
                seen.headers
            );
        }
    }
    // The body-data cases delivered the smuggled text as the body, whole.
    let last = env.upstream.last();
    assert_eq!(last.body.as_ref(), SMUGGLED.as_bytes());
    env.stop().await;
}

/// Writes one HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string length (RFC 7541 section 5.1, 7-bit prefix, no Huffman).
fn hpack_len(out: &mut Vec<u8>, len: usize) {
    if len < 127 {
        out.push(len as u8);
        return;
    }
    out.push(0x7f);
    let mut rest = len - 127;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK literal header field without indexing and with a new name (RFC 7541 section
/// 6.2.2), no Huffman coding: names keep the exact bytes given, upper case included.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00];
    hpack_len(&mut out, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_len(&mut out, value.len());
    out.extend_from_slice(value.as_bytes());
    out
}

/// What came back for stream 1 of an h2c prior-knowledge exchange.
#[derive(Debug, PartialEq, Eq)]
enum H2Outcome {
    Response,
    StreamReset(u32),
    GoAway(u32),
    Closed,
}

/// Sends one GET with `extra` header fields (raw HPACK literals) on stream 1 and reports how
/// clerkgate answered that stream.
async fn h2_get(env: &Env, path: &str, extra: &[(&str, &str)]) -> H2Outcome {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http (static table)
    block.push(0x04); // :path, literal without indexing, indexed name 4
    block.push(path.len() as u8);
    block.extend_from_slice(path.as_bytes());
    block.push(0x01); // :authority, indexed name 1
    block.push(11);
    block.extend_from_slice(b"app.example");
    for (name, value) in extra {
        block.extend_from_slice(&literal(name, value));
    }
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(frame(0x1, 0x5, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    let run = async {
        let mut stream = TcpStream::connect(env.gate.proxy).await.expect("connect");
        stream.write_all(&bytes).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while buf.len() >= 9 {
                let len =
                    (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, id) = (
                    buf[3],
                    u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                );
                let payload: Vec<u8> = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                let code = |at: usize| {
                    u32::from_be_bytes([
                        payload[at],
                        payload[at + 1],
                        payload[at + 2],
                        payload[at + 3],
                    ])
                };
                match (kind, id) {
                    (0x1, 1) => return H2Outcome::Response,
                    (0x3, 1) => return H2Outcome::StreamReset(code(0)),
                    (0x7, _) => return H2Outcome::GoAway(code(4)),
                    _ => {}
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return H2Outcome::Closed,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, run)
        .await
        .expect("h2 exchange ended in time")
}

/// (case, path, extra header fields)
type H2Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

#[tokio::test]
async fn http2_header_blocks_with_upper_case_or_connection_fields_are_refused() {
    let env = Env::start(ROUTES).await;
    let bearer = format!("Bearer {}", env.clerk.session_token("user_1"));
    const PROTOCOL_ERROR: u32 = 1;
    let cases: Vec<H2Case> = vec![
        (
            "upper-case X-User-Id",
            "/public/h2",
            vec![("X-User-Id", "user_evil")],
        ),
        (
            "mixed-case x-User-id",
            "/public/h2",
            vec![("x-User-id", "user_evil")],
        ),
        (
            "upper-case Authorization",
            "/orders",
            vec![("Authorization", &bearer)],
        ),
        (
            "upper-case ordinary header",
            "/public/h2",
            vec![("X-Request-Id", "1")],
        ),
        (
            "connection field",
            "/public/h2",
            vec![("connection", "keep-alive")],
        ),
        (
            "transfer-encoding field",
            "/public/h2",
            vec![("transfer-encoding", "chunked")],
        ),
        ("te other than trailers", "/public/h2", vec![("te", "gzip")]),
        (
            "upgrade field",
            "/public/h2",
            vec![("upgrade", "websocket")],
        ),
    ];
    for (case, path, extra) in cases {
        let outcome = h2_get(&env, path, &extra).await;
        // An upper-case name fails HPACK decoding, a connection error (RFC 9113 §8.2.1: the
        // decoder's state can no longer be trusted), so the whole connection goes; a
        // connection-specific field is a malformed request on a well-decoded block, a stream
        // error (§8.2.2). Both in the h2 crate's own, fixed, reading.
        let expected = if case.starts_with("upper-case") || case.starts_with("mixed-case") {
            H2Outcome::GoAway(PROTOCOL_ERROR)
        } else {
            H2Outcome::StreamReset(PROTOCOL_ERROR)
        };
        assert_eq!(outcome, expected, "{case}");
        assert_eq!(env.upstream.count(), 0, "{case}");
    }
    // Control: the same exchange in lower case is served, and a lower-case spoofed identity
    // header is stripped.
    let outcome = h2_get(
        &env,
        "/public/h2",
        &[("x-request-id", "1"), ("x-user-id", "user_evil")],
    )
    .await;
    assert_eq!(outcome, H2Outcome::Response);
    assert_eq!(env.upstream.count(), 1);
    let seen = env.upstream.last();
    assert_eq!(seen.headers["x-request-id"], "1");
    assert!(
        seen.headers.get("x-user-id").is_none(),
        "{:?}",
        seen.headers
    );
    env.stop().await;
}

const KEEP_ALIVE_GET: &[u8] = b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n";

/// Opens `n` connections that each complete one request (401, no token) and stay open.
async fn idle_connections(env: &Env, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    let mut batch = tokio::task::JoinSet::new();
    for i in 0..n {
        let addr = env.gate.proxy;
        batch.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(KEEP_ALIVE_GET).await.expect("write");
            let reply = read_response(&mut s).await.expect("a response");
            assert_eq!(reply.status, 401);
            s
        });
        if batch.len() >= 100 || i + 1 == n {
            while let Some(s) = batch.join_next().await {
                held.push(s.expect("connection task"));
            }
        }
    }
    held
}

/// Sends one request on a fresh connection; `None` if no response came within `within`.
async fn answered_within(env: &Env, within: Duration) -> Option<u16> {
    let mut s = TcpStream::connect(env.gate.proxy).await.expect("connect");
    s.write_all(KEEP_ALIVE_GET).await.expect("write");
    tokio::time::timeout(within, read_response(&mut s))
        .await
        .ok()
        .flatten()
        .map(|r| r.status)
}

#[tokio::test]
async fn max_connections_holds_extra_connections_until_a_slot_frees() {
    let env =
        Env::start("[proxy]\nmax_connections = 200\nheader_read_timeout_seconds = 30\n").await;
    let held = idle_connections(&env, 200).await;

    // Connection 201 is accepted by the kernel but not served while 200 idle ones are held.
    let mut waiting = TcpStream::connect(env.gate.proxy).await.expect("connect");
    waiting.write_all(KEEP_ALIVE_GET).await.expect("write");
    let early =
        tokio::time::timeout(Duration::from_millis(1500), read_response(&mut waiting)).await;
    assert!(
        early.is_err(),
        "connection 201 was served while 200 were held: {early:?}"
    );
    let mut also_waiting = TcpStream::connect(env.gate.proxy).await.expect("connect");
    also_waiting.write_all(KEEP_ALIVE_GET).await.expect("write");

    // Once the held connections close, the queued ones are served, and new ones too.
    drop(held);
    let late = tokio::time::timeout(WAIT, read_response(&mut waiting)).await;
    assert_eq!(late.ok().flatten().map(|r| r.status), Some(401));
    let late = tokio::time::timeout(WAIT, read_response(&mut also_waiting)).await;
    assert_eq!(late.ok().flatten().map(|r| r.status), Some(401));
    assert_eq!(answered_within(&env, WAIT).await, Some(401));
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

/// 5000, not 10 000: client and server share this process, so each connection costs two file
/// descriptors of the 20 000 soft limit, and other tests run alongside.
const IDLE: usize = 5000;

/// What they cost in memory is measured on the binary alone by `soak/connections.py`: this
/// process's RSS also counts every test running alongside.
#[tokio::test]
async fn thousands_of_idle_keep_alive_connections_do_not_stop_the_proxy_serving() {
    let env = Env::start("[proxy]\nheader_read_timeout_seconds = 60\n").await;
    let held = idle_connections(&env, IDLE).await;
    // Still serving while they are held, and after they are gone.
    assert_eq!(answered_within(&env, WAIT).await, Some(401));
    drop(held);
    assert_eq!(answered_within(&env, WAIT).await, Some(401));
    env.stop().await;
}

/// That the responses are not buffered (back-pressure: clerkgate's RSS stays far below the
/// 640 MiB asked for) is measured on the binary alone by `soak/connections.py`.
#[tokio::test]
async fn clients_that_never_read_do_not_stall_the_proxy() {
    let env = Env::start("[[routes]]\npath = \"/big/**\"\nauth = \"public\"\n").await;
    // Ten clients ask for 64 MiB each and never read a byte.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(env.gate.proxy).await.expect("connect");
        s.write_all(b"GET /big/67108864 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        stalled.push(s);
    }
    assert!(
        env.upstream.recorder.wait_for_count(10, WAIT).await,
        "the big requests reached the upstream"
    );
    // Other clients are still served promptly, several times over.
    for _ in 0..5 {
        let reply = env.raw_get("/big/10", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.body, b"abcdefghij");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stalled);
    env.stop().await;
}
