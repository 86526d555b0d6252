//! The echo upstream: answers every request with a JSON description of what it received.
//!
//! `clerkgate dev` puts it behind the proxy so a developer can see exactly which headers the
//! proxy forwarded (identity headers set, client-sent ones stripped). The integration tests use
//! the same server as their upstream and assert on the [`Recorder`], i.e. on what actually
//! crossed the wire, rather than on what the proxy intended to send.
//!
//! A few paths change the behaviour so error and streaming paths of the proxy can be driven:
//! `/status/<code>`, `/slow/<ms>`, `/big/<n>`, and any request carrying `Upgrade`, which is
//! switched to a raw byte echo (not a WebSocket implementation: it does not compute
//! `Sec-WebSocket-Accept` or parse frames, it only proves the proxy tunnels upgraded bytes).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Request bodies are read into memory for recording; beyond this the request is answered 413.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// `/big/<n>` streams in chunks of this size, so the proxy sees a body that arrives in pieces.
const BIG_CHUNK_BYTES: usize = 16 * 1024;
/// `/slow/<ms>` is capped so a typo cannot park a connection for days.
const MAX_SLOW_MS: u64 = 60_000;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Keeps the last `capacity` requests and lets tests await the next one.
///
/// Cloning shares the same log: hand one clone to [`serve`] and keep another to assert on.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

struct RecorderInner {
    capacity: usize,
    recent: Mutex<VecDeque<Recorded>>,
    /// Total ever recorded. A watch rather than a Notify so a waiter that subscribes after the
    /// request arrived still sees it (no lost wake-ups).
    total: watch::Sender<usize>,
}

impl Recorder {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(RecorderInner {
                capacity,
                recent: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
                total: watch::Sender::new(0),
            }),
        }
    }

    /// The retained requests, oldest first.
    pub fn all(&self) -> Vec<Recorded> {
        self.recent().iter().cloned().collect()
    }

    /// Total number of requests ever recorded (not capped by `capacity`).
    pub fn count(&self) -> usize {
        *self.inner.total.borrow()
    }

    pub fn last(&self) -> Option<Recorded> {
        self.recent().back().cloned()
    }

    /// Waits until at least `n` requests were recorded in total; `false` if `timeout` passed
    /// first.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.inner.total.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail with a closed channel here.
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|total| *total >= n)).await,
            Ok(Ok(_))
        )
    }

    fn record(&self, request: Recorded) {
        let mut recent = self.recent();
        if self.inner.capacity > 0 {
            if recent.len() == self.inner.capacity {
                recent.pop_front();
            }
            recent.push_back(request);
        }
        // Bumped while holding the lock so a woken waiter always finds the request in `all()`.
        self.inner.total.send_modify(|total| *total += 1);
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Recorded>> {
        // A panic while holding this lock cannot leave the deque inconsistent, so keep serving.
        self.inner
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("capacity", &self.inner.capacity)
            .field("count", &self.count())
            .finish()
    }
}

type EchoBody = BoxBody<Bytes, Infallible>;

/// Serves the echo upstream on `listener` until `shutdown` resolves.
///
/// Speaks HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on the same port. When `shutdown`
/// resolves it stops accepting and asks every open connection to close gracefully; tunnels
/// that were already upgraded keep echoing until their peer closes them.
pub async fn serve(
    listener: TcpListener,
    recorder: Recorder,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Per-connection errors (e.g. the peer reset before accept) must not stop
                    // the server; back off briefly in case it is fd exhaustion.
                    tracing::debug!(%error, "echo upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let recorder = recorder.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let service = service_fn(move |request| handle(request, recorder.clone()));
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop_rx.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(error = %error, "echo upstream: connection ended with an error");
            }
        });
    }
    // Dropping the sender wakes every connection task's `changed()`.
    drop(stop_tx);
}

async fn handle(
    mut request: Request<Incoming>,
    recorder: Recorder,
) -> Result<Response<EchoBody>, Infallible> {
    // Must be taken before the request is split up; only HTTP/1.1 has this extension.
    let upgrade = if request.headers().contains_key(UPGRADE) {
        Some(hyper::upgrade::on(&mut request))
    } else {
        None
    };
    let (parts, body) = request.into_parts();
    let (body, body_status) = read_body(body).await;
    let recorded = Recorded {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body,
    };
    recorder.record(recorded.clone());

    if let Some(status) = body_status {
        return Ok(json_response(
            status,
            &json!({"error": status.canonical_reason()}),
        ));
    }

    if let Some(on_upgrade) = upgrade {
        return Ok(switch_protocols(&recorded, on_upgrade));
    }

    let path = recorded.uri.path();
    if let Some(code) = path.strip_prefix("/status/") {
        return Ok(match code.parse::<u16>().ok().and_then(final_status) {
            Some(status) => echo_response(status, &recorded),
            None => json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "status must be 200..=599"}),
            ),
        });
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        let Ok(ms) = ms.parse::<u64>() else {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "delay must be a number of milliseconds"}),
            ));
        };
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_SLOW_MS))).await;
        return Ok(echo_response(StatusCode::OK, &recorded));
    }
    if let Some(n) = path.strip_prefix("/big/") {
        let Ok(n) = n.parse::<u64>() else {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "size must be a number of bytes"}),
            ));
        };
        let mut response = Response::new(BigBody { sent: 0, len: n }.boxed());
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        return Ok(response);
    }
    Ok(echo_response(StatusCode::OK, &recorded))
}

/// Reads the whole body, keeping at most [`MAX_BODY_BYTES`]. Returns what was read and, if the
/// body was too large or broke off, the status to answer with (the request is still recorded:
/// the upstream did see it).
async fn read_body(mut body: Incoming) -> (Bytes, Option<StatusCode>) {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > MAX_BODY_BYTES {
                        let room = MAX_BODY_BYTES - buf.len();
                        buf.extend_from_slice(&data[..room]);
                        return (buf.freeze(), Some(StatusCode::PAYLOAD_TOO_LARGE));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "echo upstream: request body broke off");
                return (buf.freeze(), Some(StatusCode::BAD_REQUEST));
            }
        }
    }
    (buf.freeze(), None)
}

/// A status usable as a final response: 1xx are interim and would confuse hyper and clients.
fn final_status(code: u16) -> Option<StatusCode> {
    if (200..=599).contains(&code) {
        StatusCode::from_u16(code).ok()
    } else {
        None
    }
}

/// `101 Switching Protocols` echoing the requested protocol, then a raw byte echo on the
/// upgraded connection until the client closes its side.
fn switch_protocols(
    recorded: &Recorded,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<EchoBody> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    if let Some(protocol) = recorded.headers.get(UPGRADE) {
        response.headers_mut().insert(UPGRADE, protocol.clone());
    }
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    tokio::spawn(async move {
        // Resolves once hyper has written the 101 and handed over the socket.
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "echo upstream: upgrade failed");
                return;
            }
        };
        let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
        if let Err(error) = tokio::io::copy(&mut reader, &mut writer).await {
            tracing::debug!(%error, "echo upstream: upgraded echo ended with an error");
        }
        // Half-close our side so the client sees EOF after the last echoed byte.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut writer).await;
    });
    response
}

/// The JSON description of `recorded`: method, path, query (null when absent), headers
/// (lowercase name to string, or array of strings when repeated; non-UTF-8 rendered lossily)
/// and the body length.
fn echo_response(status: StatusCode, recorded: &Recorded) -> Response<EchoBody> {
    let mut headers = Map::new();
    for name in recorded.headers.keys() {
        let mut values: Vec<Value> = recorded
            .headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.swap_remove(0)
        } else {
            Value::Array(values)
        };
        headers.insert(name.as_str().to_owned(), value);
    }
    let description = json!({
        "method": recorded.method.as_str(),
        "path": recorded.uri.path(),
        "query": recorded.uri.query(),
        "headers": headers,
        "body_bytes": recorded.body.len(),
    });
    json_response(status, &description)
}

fn json_response(status: StatusCode, value: &Value) -> Response<EchoBody> {
    // 204 and 304 must not carry a body (RFC 9110 §15.3.5, §15.4.5).
    let body = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Bytes::new()
    } else {
        Bytes::from(value.to_string())
    };
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `/big/<n>`: `len` bytes of a repeating `a..z` pattern (so truncation or reordering shows),
/// produced lazily in [`BIG_CHUNK_BYTES`] chunks so large sizes cost no memory.
struct BigBody {
    sent: u64,
    len: u64,
}

impl Body for BigBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let remaining = self.len - self.sent;
        if remaining == 0 {
            return Poll::Ready(None);
        }
        // Lossless: the value is at most BIG_CHUNK_BYTES.
        let chunk_len = remaining.min(BIG_CHUNK_BYTES as u64) as usize;
        let start = self.sent;
        let chunk: Vec<u8> = (0..chunk_len as u64)
            .map(|i| b'a' + ((start + i) % 26) as u8)
            .collect();
        self.sent += chunk_len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(path: &str) -> Recorded {
        Recorded {
            method: Method::GET,
            uri: path.parse().unwrap(),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn recorder_keeps_the_last_capacity_requests_and_counts_all() {
        let recorder = Recorder::new(2);
        for path in ["/a", "/b", "/c"] {
            recorder.record(recorded(path));
        }
        assert_eq!(recorder.count(), 3);
        let paths: Vec<_> = recorder
            .all()
            .iter()
            .map(|r| r.uri.path().to_owned())
            .collect();
        assert_eq!(paths, ["/b", "/c"]);
        assert_eq!(recorder.last().unwrap().uri.path(), "/c");
        assert!(recorder.wait_for_count(3, Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_count_times_out_when_nothing_arrives() {
        let recorder = Recorder::new(1);
        assert!(!recorder.wait_for_count(1, Duration::from_secs(5)).await);
        assert!(recorder.last().is_none());
    }

    #[tokio::test]
    async fn wait_for_count_wakes_on_a_later_request() {
        let recorder = Recorder::new(1);
        let waiter = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.wait_for_count(1, Duration::from_secs(5)).await })
        };
        recorder.record(recorded("/x"));
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn echo_json_groups_repeated_headers_and_renders_non_utf8_lossily() {
        let mut r = recorded("/p?q=1");
        r.headers.append("x-one", HeaderValue::from_static("1"));
        r.headers.append("x-many", HeaderValue::from_static("a"));
        r.headers.append("x-many", HeaderValue::from_static("b"));
        r.headers
            .append("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let response = echo_response(StatusCode::OK, &r);
        let body = futures_body(response);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["path"], "/p");
        assert_eq!(v["query"], "q=1");
        assert_eq!(v["headers"]["x-one"], "1");
        assert_eq!(v["headers"]["x-many"], json!(["a", "b"]));
        assert_eq!(v["headers"]["x-bin"], "caf\u{fffd}");
        assert_eq!(v["body_bytes"], 0);
    }

    #[test]
    fn big_body_yields_exactly_n_bytes_in_16k_chunks() {
        let mut body = BigBody {
            sent: 0,
            len: 40_000,
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
            let data = frame.into_data().unwrap();
            sizes.push(data.len());
            all.extend_from_slice(&data);
        }
        assert_eq!(sizes, [16_384, 16_384, 7_232]);
        assert!(body.is_end_stream());
        assert_eq!(&all[..3], b"abc");
        assert_eq!(all[26], b'a');
    }

    fn futures_body(response: Response<EchoBody>) -> Bytes {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut body = response.into_body();
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap(),
            _ => panic!("a Full body is ready at once"),
        }
    }
}
