//! The proxy's upstream client: one upstream, HTTP/1.1 keep-alive connections kept in a LIFO
//! pool, each driven by its own `hyper::client::conn::http1` connection task.
//!
//! It is the crate's one upstream HTTP client: the proxy streams clients' requests through it
//! and the webhook forwarder sends verified events through it ([`Outgoing`] is either body).
//!
//! Why not hyper-util's pooled client: per request it
//! races a pool checkout against a lazily built connect future, keys the pool by scheme and
//! authority, and spawns a task that waits for the connection to become idle again before
//! returning it. Here the connection goes back to the pool when the response body ends (see
//! [`Lease`]), and a checkout is a pop under an uncontended lock.
//!
//! Like hyper-util's client, a request that a reused connection refused before sending any of
//! it (the upstream closed an idle keep-alive connection at that moment) is retried once on a
//! fresh connection; nothing that may have reached the upstream is ever sent twice.
//!
//! A connection is lent to exactly one exchange and comes back only when both halves are over:
//! the response body ended *and* the request body was read to its end. An upstream may answer
//! before reading the body (a 404, a 413) while the client still trickles or withholds it; that
//! connection is still busy writing, and lending it to the next request would make that
//! request wait behind a stranger's upload until it times out. Such a connection is retired.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an upstream exchange failed.
#[derive(Debug)]
pub(crate) enum PoolError {
    /// No connection: refused, unreachable, timed out, or the TLS or HTTP handshake failed.
    Connect(BoxError),
    /// The exchange on an established connection failed.
    Send(hyper::Error),
    /// The client's request body failed (bad framing, a short body, the client went away)
    /// while it was being sent over HTTP/2.
    ClientBody(hyper::Error),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(e) => write!(f, "connect: {e}"),
            PoolError::Send(e) => write!(f, "send: {e}"),
            PoolError::ClientBody(e) => write!(f, "request body: {e}"),
        }
    }
}

impl PoolError {
    /// Errors in this error's source chain, itself first.
    pub(crate) fn chain(&self) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
        let first: &(dyn std::error::Error + 'static) = match self {
            PoolError::Connect(e) => e.as_ref(),
            PoolError::Send(e) | PoolError::ClientBody(e) => e,
        };
        std::iter::successors(Some(first), |err| err.source())
    }
}

/// A request body on its way upstream: a client's, streamed as it arrives, or one clerkgate
/// holds whole (a verified webhook event).
pub(crate) enum Outgoing {
    /// The client's body, read as the upstream takes it.
    Streamed(Incoming),
    /// A body in memory, sent as one frame (`None` once sent).
    Whole(Option<Bytes>),
}

impl From<Incoming> for Outgoing {
    fn from(body: Incoming) -> Self {
        Self::Streamed(body)
    }
}

impl From<Bytes> for Outgoing {
    fn from(body: Bytes) -> Self {
        Self::Whole(Some(body))
    }
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Streamed(body) => Pin::new(body).poll_frame(cx),
            Self::Whole(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Streamed(body) => body.is_end_stream(),
            Self::Whole(body) => body.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Streamed(body) => body.size_hint(),
            Self::Whole(body) => SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A request body on its way upstream, noting when it has been read to its end.
/// A request without a body (most of them) needs no note and allocates nothing.
pub(super) struct RequestBody {
    inner: Outgoing,
    done: Option<Arc<AtomicBool>>,
}

impl RequestBody {
    fn new(inner: Outgoing) -> (Self, Option<Arc<AtomicBool>>) {
        let done = (!inner.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        (
            Self {
                inner,
                done: done.clone(),
            },
            done,
        )
    }

    fn mark_done(&self) {
        if let Some(done) = &self.done {
            done.store(true, Ordering::Release);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.mark_done(),
            // hyper stops polling once `is_end_stream` says so after a frame.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.mark_done(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.mark_done();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type Sender = http1::SendRequest<RequestBody>;

/// Idle lists kept (per-core runtimes beyond this share lists, which stays correct).
const IDLE_LISTS: usize = 16;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Keep-alive connections to the one configured upstream.
pub(super) struct UpstreamPool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    /// The upstream's authority for requests that arrive without `Host` (HTTP/2 clients with
    /// `preserve_host = false`), without a default port, as hyper-util's client sent it.
    host: HeaderValue,
    /// Idle connections, one list per per-core runtime ([`crate::runtime::worker`]): a
    /// connection's task runs on the runtime that dialled it, so it is lent only to requests on
    /// that runtime. In the multi-thread mode every request uses the first list.
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// Idle connections kept per list.
    max_idle: usize,
    idle_timeout: Duration,
}

/// A connection lent to one exchange. Releasing it after the response body ended returns the
/// connection to the pool if the request body has ended too; dropping it (a body cut short, an
/// upgrade) retires it.
pub struct Lease {
    pool: Weak<UpstreamPool>,
    sender: Option<Sender>,
    /// Set once the request body was read to its end; `None` for a request without a body.
    request_done: Option<Arc<AtomicBool>>,
}

impl Lease {
    /// The lease of no connection (an HTTP/2 stream, which shares its connection): releasing
    /// or dropping it does nothing.
    pub fn none() -> Self {
        Self {
            pool: Weak::new(),
            sender: None,
            request_done: None,
        }
    }

    /// The response body ended: the connection may serve another request, unless the request
    /// body is still being written on it (then it is closed instead).
    pub fn release(mut self) {
        let request_done = self
            .request_done
            .as_ref()
            .is_none_or(|d| d.load(Ordering::Acquire));
        if !request_done {
            tracing::debug!("upstream answered before the request body ended: connection retired");
            return;
        }
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.put(sender);
        }
    }
}

impl UpstreamPool {
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Result<Arc<Self>, http::Error> {
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let default_port = match scheme.as_str() {
            "https" => 443,
            _ => 80,
        };
        let host = match authority.port_u16() {
            Some(p) if p == default_port => HeaderValue::from_str(authority.host()),
            _ => HeaderValue::from_str(authority.as_str()),
        }
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let pool = Arc::new(Self {
            connector,
            target,
            host,
            idle: (0..IDLE_LISTS).map(|_| Mutex::new(Vec::new())).collect(),
            max_idle,
            idle_timeout,
        });
        // Close connections idle past the timeout even when no request comes to find them.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            let every = (idle_timeout / 2).max(Duration::from_millis(100));
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match weak.upgrade() {
                        Some(pool) => pool.reap(),
                        None => break,
                    }
                }
            });
        }
        Ok(pool)
    }

    /// This runtime's idle list.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        Self::locked(&self.idle[crate::runtime::worker() % IDLE_LISTS])
    }

    fn locked(list: &Mutex<Vec<Idle>>) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Nothing panics while holding it; a poisoned pool is still a list of connections.
        list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn reap(&self) {
        let timeout = self.idle_timeout;
        for list in &self.idle {
            Self::locked(list).retain(|c| !c.sender.is_closed() && c.since.elapsed() < timeout);
        }
    }

    /// The most recently used live connection, if any.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.lock();
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Sender, PoolError> {
        let io = self
            .connector
            .clone()
            .call(self.target.clone())
            .await
            .map_err(PoolError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (absolute URI of the upstream) and returns the response head with the lease
    /// of its connection.
    pub(super) async fn request(
        self: &Arc<Self>,
        req: Request<Outgoing>,
    ) -> Result<(Response<Incoming>, Lease), PoolError> {
        let (parts, body) = req.into_parts();
        let (body, request_done) = RequestBody::new(body);
        let mut req = Request::from_parts(parts, body);
        // The upstream gets origin form; the connection already names scheme and authority.
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = None;
        parts.authority = None;
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
        if !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, self.host.clone());
        }
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: the dial's TLS state would make every request's future (moved by
                // value on each request) a kilobyte larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue; // closed while idle: try the next one, or a fresh connection
                }
                return Err(PoolError::Connect(
                    "upstream closed the new connection".into(),
                ));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        pool: Arc::downgrade(self),
                        sender: Some(sender),
                        request_done,
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Not a byte of it was sent: safe to try again, but only when the
                    // connection was a reused one (a fresh one failing says the upstream is
                    // in trouble).
                    Some(back) if reused => req = back,
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }
}
