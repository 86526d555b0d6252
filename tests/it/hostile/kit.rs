//! Plumbing for the hostile-input tests: one environment per test (a fake Clerk, a recording
//! upstream and clerkgate between them), a raw HTTP/1.1 client that sends bytes exactly as
//! written and parses every response that comes back, a raw upstream that records the bytes
//! clerkgate puts on the wire (trailers included), and token forgery helpers.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{FakeClerk, Sidecar, Upstream, client};

/// Upper bound for every network wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// A public prefix and an admin-only prefix: the two sides every bypass attempt tries to cross.
pub const ROUTES: &str = r#"
[[routes]]
path = "/public/**"
auth = "public"
[[routes]]
path = "/admin/**"
org_role = "admin"
"#;

/// The fake Clerk most tests verify against. RSA key generation costs about a second in a debug
/// build, so tests that neither change the fake nor count its fetches share one. It runs on a
/// runtime of its own because every `#[tokio::test]` runtime ends with its test.
pub fn shared_clerk() -> Arc<FakeClerk> {
    static CLERK: OnceLock<Arc<FakeClerk>> = OnceLock::new();
    CLERK.get_or_init(start_detached).clone()
}

/// Another "instance" with the same kid (`ins_fake_1`) and issuer but its own key.
pub fn other_instance() -> Arc<FakeClerk> {
    static OTHER: OnceLock<Arc<FakeClerk>> = OnceLock::new();
    OTHER.get_or_init(start_detached).clone()
}

fn start_detached() -> Arc<FakeClerk> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake Clerk runtime")
    });
    // `block_on` must not run on a test runtime's thread.
    std::thread::scope(|s| {
        s.spawn(|| Arc::new(runtime.block_on(FakeClerk::start())))
            .join()
            .expect("fake Clerk started")
    })
}

/// What a client got back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The `reason` of a JSON refusal body, or `""`.
    pub fn reason(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A fake Clerk, a recording upstream and clerkgate between them.
pub struct Env {
    pub clerk: Arc<FakeClerk>,
    pub upstream: Upstream,
    pub gate: Sidecar,
    pub http: reqwest::Client,
}

impl Env {
    /// clerkgate with `extra` TOML against the shared fake Clerk.
    pub async fn start(extra: &str) -> Env {
        Self::with_clerk(shared_clerk(), extra).await
    }

    /// clerkgate against a fake Clerk of this test's own (for tests that count JWKS fetches).
    pub async fn start_own(extra: &str) -> Env {
        Self::with_clerk(Arc::new(FakeClerk::start().await), extra).await
    }

    pub async fn with_clerk(clerk: Arc<FakeClerk>, extra: &str) -> Env {
        let upstream = Upstream::start().await;
        let gate = Sidecar::start(&clerk, &upstream, extra).await;
        Env {
            clerk,
            upstream,
            gate,
            http: client(),
        }
    }

    /// GET through reqwest with an optional bearer token and extra headers (appended, so a
    /// repeated name becomes repeated header lines).
    pub async fn get(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.get(self.gate.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.expect("clerkgate answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("response body").to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// One GET written byte for byte (`Connection: close` added), for request targets and
    /// header spellings reqwest would normalise.
    pub async fn raw_get(&self, target: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("Connection: close\r\n\r\n");
        let mut replies = send_raw(self.gate.proxy, request.as_bytes()).await;
        assert_eq!(replies.len(), 1, "one response to {target}");
        replies.remove(0)
    }

    /// Writes `bytes` on a fresh connection and returns every response read until the server
    /// closes it (the bytes must end the exchange, e.g. with `Connection: close`).
    pub async fn send(&self, bytes: &[u8]) -> Vec<Reply> {
        send_raw(self.gate.proxy, bytes).await
    }

    pub async fn stop(self) {
        self.gate.stop().await;
    }
}

/// Writes `bytes`, half-closes nothing, and reads until EOF (bounded by [`WAIT`]); returns the
/// parsed responses. A server that resets the connection still yields what it sent before.
pub async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<Reply> {
    let raw = exchange(addr, bytes).await;
    parse_responses(&raw)
}

/// The raw bytes a server answers to `bytes`, up to EOF or a reset.
pub async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let run = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The server may answer and close before it has read everything.
        let _ = stream.write_all(bytes).await;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        out
    };
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the server ended the exchange in time")
}

/// Parses consecutive HTTP/1.1 responses (Content-Length or chunked bodies; a response
/// without either runs to the end of the bytes).
pub fn parse_responses(mut bytes: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Some(head_end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = HeaderMap::new();
        for line in lines {
            if let Some((name, value)) = line.split_once(':')
                && let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.trim().as_bytes()),
                    HeaderValue::from_str(value.trim()),
                )
            {
                headers.append(name, value);
            }
        }
        let rest = &bytes[head_end + 4..];
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let length = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
            (Vec::new(), 0)
        } else if chunked {
            dechunk(rest).unwrap_or_else(|| (rest.to_vec(), rest.len()))
        } else if let Some(len) = length {
            let len = len.min(rest.len());
            (rest[..len].to_vec(), len)
        } else {
            (rest.to_vec(), rest.len())
        };
        out.push(Reply {
            status,
            headers,
            body,
        });
        bytes = &rest[used..];
    }
    out
}

/// Decodes a chunked body; returns the data and the bytes consumed (trailers included).
fn dechunk(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut data = Vec::new();
    let mut pos = 0;
    loop {
        let line_end = pos + find(&bytes[pos..], b"\r\n")?;
        let line = std::str::from_utf8(&bytes[pos..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            loop {
                let end = pos + find(&bytes[pos..], b"\r\n")?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some((data, pos));
                }
            }
        }
        data.extend_from_slice(bytes.get(pos..pos + size)?);
        pos += size + 2;
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Asserts a refusal: status and reason code.
#[track_caller]
pub fn assert_refused(reply: &Reply, status: u16, reason: &str, case: &str) {
    assert_eq!(
        (reply.status, reply.reason().as_str()),
        (status, reason),
        "{case}: {}",
        reply.text()
    );
}

/// Lower case with `_` as `-`, the way clerkgate and many frameworks compare header names.
pub fn fold(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// The values of a header the upstream received, as text.
pub fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<non-text>"))
        .collect()
}

pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// An RSA key of the tests' own, given to clerkgate as a pinned PEM (`clerk.jwt_key`), that
/// signs arbitrary header and payload bytes: `SigningKey` signs `serde_json::Value`s, which
/// cannot hold duplicate members or number spellings such as `1e400`.
pub struct PinnedKey {
    pair: aws_lc_rs::rsa::KeyPair,
    pem: String,
}

impl PinnedKey {
    /// One per process: RSA key generation is slow in a debug build.
    pub fn get() -> &'static PinnedKey {
        static KEY: OnceLock<PinnedKey> = OnceLock::new();
        KEY.get_or_init(|| {
            use aws_lc_rs::encoding::AsDer;
            use aws_lc_rs::signature::KeyPair as _;
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA key");
            let der = pair.public_key().as_der().expect("SPKI");
            let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                pem.push('\n');
            }
            pem.push_str("-----END PUBLIC KEY-----\n");
            PinnedKey { pair, pem }
        })
    }

    /// The `[clerk]` TOML that pins this key.
    pub fn toml(&self) -> String {
        format!("[clerk]\njwt_key = \"\"\"\n{}\"\"\"\n", self.pem)
    }

    /// RS256 over `base64url(header) "." base64url(payload)`, both taken byte for byte.
    pub fn sign(&self, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", b64(header), b64(payload));
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        format!("{input}.{}", b64(sig))
    }
}

/// The payload segment, which clerkgate forwards as `X-Clerk-Claims`.
pub fn payload_segment(token: &str) -> &str {
    token.split('.').nth(1).expect("a compact JWT")
}

/// Held by the tests that measure this process's RSS, so they do not measure each other.
pub fn memory_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// `VmRSS` of this process in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// One request as the raw upstream saw it: the exact bytes clerkgate wrote.
pub type RawRequest = Vec<u8>;

/// An upstream that answers every request `200 ok` and keeps the raw bytes of each request,
/// chunked bodies and trailer sections included (the echo upstream drops trailers).
pub struct RawUpstream {
    pub addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<RawRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log: Arc<Mutex<Vec<RawRequest>>> = Arc::default();
        let shared = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_raw(stream, shared.clone()));
            }
        });
        RawUpstream { addr, log, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_raw(mut stream: TcpStream, log: Arc<Mutex<Vec<RawRequest>>>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        while let Some(len) = request_len(&buf) {
            let request: Vec<u8> = buf.drain(..len).collect();
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(request);
            let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
            if stream.write_all(ok).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The length of the first complete request in `buf`, if there is one.
fn request_len(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let mut length = 0;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim() {
                "content-length" => length = value.trim().parse().ok()?,
                "transfer-encoding" => chunked = value.contains("chunked"),
                _ => {}
            }
        }
    }
    if chunked {
        return dechunk(&buf[head_end..]).map(|(_, used)| head_end + used);
    }
    (buf.len() >= head_end + length).then_some(head_end + length)
}
