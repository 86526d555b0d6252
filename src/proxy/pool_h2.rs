//! The HTTP/2 upstream client (`proxy.upstream_protocol = "h2c" | "h2" | "auto"`), and
//! [`Client`], which sends each request over HTTP/1.1 ([`super::pool`]) or HTTP/2.
//!
//! Requests are streams multiplexed over a few long-lived connections ([`CONNECTIONS`]), each
//! driven by its own `hyper::client::conn::http2` task. Requests go round-robin over the slots;
//! a slot whose connection closed (GOAWAY, reset, keep-alive ping unanswered) is redialled by
//! the next request that finds it so, one dial at a time per slot. As in the HTTP/1.1 pool, a
//! request refused before any of it was sent on a reused connection is retried once on a fresh
//! one; nothing that may have reached the upstream is sent twice.
//!
//! Bodies stream both ways, trailers included, under HTTP/2 flow control (a stream's window
//! opens as the other side reads). HTTP/2 has no `Connection` header: the caller has already
//! removed the connection-specific headers of RFC 9113 section 8.2.2, keeping only
//! `te: trailers`; `Host` becomes `:authority`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use tower_service::Service;

use super::forward::Alpn;
use super::pool::{Lease, Outgoing, PoolError, UpstreamPool};
use crate::config::error::ConfigError;

/// Upstream connections a pool multiplexes its streams over.
pub(super) const CONNECTIONS: usize = 2;

/// `proxy.upstream_protocol`: what clerkgate speaks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 keep-alive connections, one exchange at a time each.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over cleartext (`http://` upstreams).
    H2c,
    /// HTTP/2 negotiated by ALPN (`https://` upstreams); an upstream that does not agree is a 502.
    H2,
    /// HTTP/2 when an `https://` upstream agrees by ALPN, else HTTP/1.1; HTTP/1.1 for `http://`.
    Auto,
}

type Sender = http2::SendRequest<ClientBody>;

/// The client's request body on its way to an HTTP/2 upstream, noting when it failed: hyper's
/// HTTP/2 client reports a failed request body as a reset stream, which would otherwise read as
/// the upstream's fault. The error itself goes on to hyper, which resets the stream (the
/// upstream never takes a cut-off body for a whole one). A request without a body has nothing
/// to fail and allocates nothing.
pub(super) struct ClientBody {
    inner: Outgoing,
    failed: Option<Arc<AtomicBool>>,
}

impl ClientBody {
    fn new(inner: Outgoing) -> Self {
        let failed = (!inner.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        Self { inner, failed }
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Err(_))), Some(failed)) = (&polled, &self.failed) {
            failed.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why the HTTP/2 pool did not send a request.
enum H2Failure {
    /// An https upstream chose HTTP/1.1 by ALPN (`auto`): the request, untouched, goes there.
    NotH2(Box<Request<Outgoing>>),
    Pool(PoolError),
}

struct Slot {
    sender: Mutex<Option<Sender>>,
    /// Held while dialling, so that requests finding the slot empty wait for one connection
    /// instead of each dialling its own.
    dialling: tokio::sync::Mutex<()>,
}

/// HTTP/2 connections to the one configured upstream.
pub(super) struct H2Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// https: the upstream must choose `h2` by ALPN.
    alpn: bool,
    slots: [Slot; CONNECTIONS],
    next: AtomicUsize,
    builder: http2::Builder<TokioExecutor>,
}

impl H2Pool {
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
        max_header_bytes: u32,
    ) -> Result<Self, http::Error> {
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            // A dead connection (a NAT that forgot it, a host that vanished) is found by an
            // unanswered PING and redialled, instead of hanging every stream on it.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .adaptive_window(true)
            .max_header_list_size(max_header_bytes);
        Ok(Self {
            connector,
            target,
            scheme: scheme.clone(),
            authority: authority.clone(),
            alpn: scheme == &http::uri::Scheme::HTTPS,
            slots: std::array::from_fn(|_| Slot {
                sender: Mutex::new(None),
                dialling: tokio::sync::Mutex::new(()),
            }),
            next: AtomicUsize::new(0),
            builder,
        })
    }

    /// A live sender of `slot`, if it has one.
    fn live(slot: &Slot) -> Option<Sender> {
        let guard = slot.sender.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// The slot's connection, dialled when it has none. `Ok(None)`: the upstream chose
    /// HTTP/1.1 by ALPN.
    async fn sender(&self, slot: &Slot) -> Result<(Option<Sender>, bool), PoolError> {
        if let Some(sender) = Self::live(slot) {
            return Ok((Some(sender), true));
        }
        let _dialling = slot.dialling.lock().await;
        // Someone else may have dialled while this request waited.
        if let Some(sender) = Self::live(slot) {
            return Ok((Some(sender), true));
        }
        // Boxed: a rare path whose TLS and HTTP/2 handshake state would otherwise make every
        // request's future (moved by value on each request) kilobytes larger.
        let Some(sender) = Box::pin(self.dial()).await? else {
            return Ok((None, false));
        };
        *slot.sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        Ok((Some(sender), false))
    }

    async fn dial(&self) -> Result<Option<Sender>, PoolError> {
        let io = self
            .connector
            .clone()
            .call(self.target.clone())
            .await
            .map_err(PoolError::Connect)?;
        if self.alpn && !io.connected().is_negotiated_h2() {
            return Ok(None);
        }
        let (sender, conn) = self
            .builder
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(Some(sender))
    }

    /// Forgets `slot`'s connection if it has closed (a request that failed on a live
    /// connection, a reset stream, leaves it to the others; one that another request already
    /// redialled is kept).
    fn forget(slot: &Slot) {
        let mut guard = slot.sender.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_some_and(|s| s.is_closed()) {
            *guard = None;
        }
    }

    /// `req` for HTTP/2: an absolute URI with the upstream's scheme and `Host` (if any) as
    /// `:authority`.
    fn prepare(&self, req: Request<Outgoing>) -> Request<ClientBody> {
        let (mut parts, body) = req.into_parts();
        let authority = parts
            .headers
            .remove(HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| self.authority.clone());
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(authority);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| self.target.clone());
        parts.version = Version::HTTP_2;
        Request::from_parts(parts, ClientBody::new(body))
    }

    async fn request(&self, req: Request<Outgoing>) -> Result<Response<Incoming>, H2Failure> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % CONNECTIONS];
        let (sender, mut reused) = self.sender(slot).await.map_err(H2Failure::Pool)?;
        let Some(mut sender) = sender else {
            return Err(H2Failure::NotH2(Box::new(req)));
        };
        let mut req = self.prepare(req);
        let body_failed = req.body().failed.clone();
        loop {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => {
                    Self::forget(slot);
                    match e.take_message() {
                        // Not a byte of it was sent (the connection was going away): once more
                        // on a fresh connection, but only if this one was a reused one.
                        Some(back) if reused => req = back,
                        _ if body_failed.is_some_and(|f| f.load(Ordering::Acquire)) => {
                            return Err(H2Failure::Pool(PoolError::ClientBody(e.into_error())));
                        }
                        _ => return Err(H2Failure::Pool(PoolError::Send(e.into_error()))),
                    }
                }
            }
            let (next, fresh_reused) = self.sender(slot).await.map_err(H2Failure::Pool)?;
            sender = next.ok_or_else(|| {
                H2Failure::Pool(PoolError::Connect(
                    "the upstream no longer chooses h2 by ALPN".into(),
                ))
            })?;
            reused = fresh_reused;
        }
    }
}

/// `auto` against an https upstream: unknown until the first connection's ALPN says.
const UNDECIDED: u8 = 0;
const SPEAKS_H2: u8 = 1;
const SPEAKS_HTTP1: u8 = 2;

/// The upstream client for the configured protocol.
pub(super) enum Client {
    Http1(Arc<UpstreamPool>),
    H2(H2Pool),
    /// HTTP/2 if the https upstream agrees by ALPN, decided by the first connection and kept.
    Auto {
        h2: H2Pool,
        http1: Arc<UpstreamPool>,
        decided: AtomicU8,
    },
}

impl Client {
    /// Builds the client for `[proxy]`: connectors with the ALPN offers each pool needs.
    pub(super) fn new(p: &super::Config, base: &super::UpstreamBase) -> Result<Self, ConfigError> {
        let connector = |alpn| {
            super::forward::connector_for(p.connect_timeout(), p.upstream_ca_path.as_deref(), alpn)
                .map_err(|e| {
                    let key = if p.upstream_ca_path.is_some() {
                        "proxy.upstream_ca_path"
                    } else {
                        "proxy.upstream"
                    };
                    ConfigError::new(key, format!("TLS roots unavailable: {e}"))
                })
        };
        let (scheme, authority) = (&base.scheme, &base.authority);
        let https = scheme == &http::uri::Scheme::HTTPS;
        let bad_uri = |e: http::Error| ConfigError::new("proxy.upstream", e.to_string());
        let max_header_bytes = u32::try_from(p.max_header_bytes).unwrap_or(u32::MAX);
        let http1 = || -> Result<Arc<UpstreamPool>, ConfigError> {
            UpstreamPool::new(
                connector(Alpn::Http1)?,
                scheme,
                authority,
                // `pool_max_idle` is the process's: each per-core runtime keeps its own list.
                crate::runtime::per_runtime_share(p.pool_max_idle, p.runtime, p.worker_threads),
                p.pool_idle_timeout(),
            )
            .map_err(bad_uri)
        };
        let h2 = |alpn| -> Result<H2Pool, ConfigError> {
            H2Pool::new(connector(alpn)?, scheme, authority, max_header_bytes).map_err(bad_uri)
        };
        Ok(match p.upstream_protocol {
            UpstreamProtocol::Http1 => Self::Http1(http1()?),
            UpstreamProtocol::Auto if !https => Self::Http1(http1()?),
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => Self::H2(h2(Alpn::H2)?),
            UpstreamProtocol::Auto => Self::Auto {
                h2: h2(Alpn::Both)?,
                http1: http1()?,
                decided: AtomicU8::new(UNDECIDED),
            },
        })
    }

    /// Whether a WebSocket handshake can be forwarded: only over HTTP/1.1 (clerkgate does not
    /// use RFC 8441's extended CONNECT).
    pub(super) fn upgrades(&self) -> bool {
        match self {
            Self::Http1(_) => true,
            Self::H2(_) => false,
            Self::Auto { decided, .. } => decided.load(Ordering::Relaxed) == SPEAKS_HTTP1,
        }
    }

    /// Whether requests go out as HTTP/2 (which keeps `te: trailers`).
    pub(super) fn speaks_h2(&self) -> bool {
        match self {
            Self::Http1(_) => false,
            Self::H2(_) => true,
            Self::Auto { decided, .. } => decided.load(Ordering::Relaxed) != SPEAKS_HTTP1,
        }
    }

    /// Sends `req` (absolute URI of the upstream) and returns the response head with the lease
    /// of its connection (an HTTP/2 stream holds no connection: its lease is empty).
    pub(super) async fn request(
        &self,
        req: Request<Outgoing>,
    ) -> Result<(Response<Incoming>, Lease), PoolError> {
        match self {
            Self::Http1(pool) => pool.request(req).await,
            Self::H2(pool) => match pool.request(req).await {
                Ok(resp) => Ok((resp, Lease::none())),
                Err(H2Failure::Pool(e)) => Err(e),
                Err(H2Failure::NotH2(_)) => Err(PoolError::Connect(
                    "the upstream did not choose h2 by ALPN (proxy.upstream_protocol = \"h2\")"
                        .into(),
                )),
            },
            Self::Auto { h2, http1, decided } => {
                if decided.load(Ordering::Relaxed) == SPEAKS_HTTP1 {
                    return http1.request(req).await;
                }
                match h2.request(req).await {
                    Ok(resp) => {
                        decided.store(SPEAKS_H2, Ordering::Relaxed);
                        Ok((resp, Lease::none()))
                    }
                    Err(H2Failure::Pool(e)) => Err(e),
                    Err(H2Failure::NotH2(req)) => {
                        let mut req = *req;
                        tracing::info!("the upstream chose HTTP/1.1 by ALPN: using HTTP/1.1");
                        decided.store(SPEAKS_HTTP1, Ordering::Relaxed);
                        *req.version_mut() = Version::HTTP_11;
                        // Kept for HTTP/2 only: in HTTP/1.1, TE is hop-by-hop.
                        req.headers_mut().remove(http::header::TE);
                        http1.request(req).await
                    }
                }
            }
        }
    }
}
