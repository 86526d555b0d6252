//! The authenticating reverse proxy: the request path, top to bottom.
//!
//! accept -> normalise path -> strip reserved headers -> route match -> the auth gate
//! ([`crate::auth::gate`]: extract token -> cache or verify -> cookie freshness -> revocation ->
//! policy) -> set identity headers -> remove token and hop-by-hop headers -> forward -> record
//! metrics.
//!
//! The same path serves the forward-auth endpoint (nginx `auth_request`, Traefik `ForwardAuth`,
//! Envoy `ext_authz`), which answers with the identity headers instead of forwarding
//! (`proxy/forward_auth.rs`).

mod answer;
mod browser_hook;
pub(crate) mod forward;
mod forward_auth;
pub mod headers;
pub mod path;
mod pool;
mod pool_h2;
pub(crate) mod rejection;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::auth::gate::{Allowed, Decision, Gate};
use crate::auth::policy::{Policy, RouteMatch};
use crate::auth::{SpoofPolicy, now_ms};
use crate::config::error::ConfigError;
use crate::server::ConnInfo;
use crate::telemetry::{Metrics, Outcome, UpstreamErrorKind};
use path::EncodedSlashes;
use pool::Outgoing;
use rejection::Rejection;

/// The response body: the upstream's, streamed, or one of ours.
pub type ProxyBody = Either<forward::UpstreamBody, Full<Bytes>>;

/// `[proxy]`: the listener, the upstream and the limits in between.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Base URL of the backend (http or https).
    pub upstream: String,
    /// Timeout for connecting to the upstream.
    pub connect_timeout_seconds: u64,
    /// Timeout for the upstream's response head once the request is sent.
    pub upstream_timeout_seconds: u64,
    /// Idle pooled upstream connections are closed after this long.
    pub pool_idle_timeout_seconds: u64,
    /// Idle pooled upstream connections kept, for the whole process (each per-core runtime
    /// keeps its share).
    pub pool_max_idle: usize,
    /// A client must send its complete request head within this time (slowloris guard).
    pub header_read_timeout_seconds: u64,
    /// Largest request head accepted (HTTP/1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Most concurrent client connections, for the whole process (the per-core runtimes share
    /// one budget); more wait in the accept queue.
    pub max_connections: usize,
    /// Forward-auth endpoint for ingress controllers; empty disables it.
    pub forward_auth_path: String,
    /// Where forward-auth reads the original URI: `auto` (every source present must agree),
    /// `x_forwarded_uri` (Traefik), `x_original_uri` (nginx) or `path` (Envoy `path_prefix`).
    pub forward_auth_uri_source: UriSource,
    /// `reject` (400) or `decode` percent-encoded slashes in paths.
    pub encoded_slashes: EncodedSlashes,
    /// Keep client-sent `X-Forwarded-*` and append to them (only behind a trusted balancer).
    pub trust_forwarded_headers: bool,
    /// Send the client's `Host` upstream (otherwise the upstream's own authority).
    pub preserve_host: bool,
    /// Keep a client-sent `X-Request-Id` (printable, at most 256 bytes) and log it; `false`
    /// replaces it with clerkgate's own. Absent, clerkgate always sets one.
    pub trust_request_id: bool,
    /// PEM certificate chain for TLS on the proxy listener (with `tls_key_path`).
    pub tls_cert_path: Option<String>,
    /// PEM private key for TLS on the proxy listener.
    pub tls_key_path: Option<String>,
    /// PEM file of CA certificates trusted for an https upstream instead of the system roots.
    pub upstream_ca_path: Option<String>,
    /// Runtime worker threads: 0 = one per CPU the process may use (cgroup quota and affinity
    /// respected); 1 = a single-threaded runtime, the cheapest per request for a sidecar
    /// limited to one core.
    pub worker_threads: usize,
    /// `per-core` (the default): one single-threaded runtime per worker, each accepting on its
    /// own `SO_REUSEPORT` socket; `multi-thread`: one runtime whose workers steal work from
    /// each other.
    pub runtime: crate::runtime::RuntimeKind,
    /// What the upstream is spoken to in: `http1`, `h2c` (cleartext HTTP/2), `h2` (ALPN,
    /// https) or `auto` (h2 when an https upstream agrees by ALPN, else HTTP/1.1).
    pub upstream_protocol: pool_h2::UpstreamProtocol,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid address"),
            upstream: "http://127.0.0.1:3000".into(),
            connect_timeout_seconds: 5,
            upstream_timeout_seconds: 60,
            pool_idle_timeout_seconds: 90,
            pool_max_idle: 256,
            header_read_timeout_seconds: 10,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            forward_auth_path: "/_clerkgate/auth".into(),
            forward_auth_uri_source: UriSource::Auto,
            encoded_slashes: EncodedSlashes::Reject,
            trust_forwarded_headers: false,
            preserve_host: true,
            trust_request_id: true,
            tls_cert_path: None,
            tls_key_path: None,
            upstream_ca_path: None,
            worker_threads: 0,
            runtime: crate::runtime::RuntimeKind::PerCore,
            upstream_protocol: pool_h2::UpstreamProtocol::Http1,
        }
    }
}

impl Config {
    /// `connect_timeout_seconds`.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }

    /// `upstream_timeout_seconds`.
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream_timeout_seconds)
    }

    /// `pool_idle_timeout_seconds`.
    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.pool_idle_timeout_seconds)
    }

    /// `header_read_timeout_seconds`.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_seconds)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let base = self.upstream_base()?;
        let https = base.scheme == http::uri::Scheme::HTTPS;
        match self.upstream_protocol {
            pool_h2::UpstreamProtocol::H2c if https => {
                return Err(ConfigError::new(
                    "proxy.upstream_protocol",
                    "h2c is cleartext HTTP/2 and needs an http:// upstream (h2 or auto for https)",
                ));
            }
            pool_h2::UpstreamProtocol::H2 if !https => {
                return Err(ConfigError::new(
                    "proxy.upstream_protocol",
                    "h2 is negotiated by ALPN and needs an https:// upstream (h2c for http)",
                ));
            }
            _ => {}
        }
        if self.tls_cert_path.is_some() != self.tls_key_path.is_some() {
            return Err(ConfigError::new(
                "proxy.tls_cert_path",
                "tls_cert_path and tls_key_path go together",
            ));
        }
        if !self.forward_auth_path.is_empty() && !self.forward_auth_path.starts_with('/') {
            return Err(ConfigError::new(
                "proxy.forward_auth_path",
                "must start with / (or be empty)",
            ));
        }
        for (key, v) in [
            (
                "proxy.connect_timeout_seconds",
                self.connect_timeout_seconds,
            ),
            (
                "proxy.upstream_timeout_seconds",
                self.upstream_timeout_seconds,
            ),
            (
                "proxy.header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::new(
                "proxy.max_header_bytes",
                "must be at least 8192",
            ));
        }
        if self.worker_threads > 1024 {
            return Err(ConfigError::new(
                "proxy.worker_threads",
                "must be at most 1024 (0 = one per CPU)",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "proxy.max_connections",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The upstream's scheme and authority, plus a path prefix without a trailing slash.
    pub fn upstream_base(&self) -> Result<UpstreamBase, ConfigError> {
        let uri: Uri = self.upstream.parse().map_err(|e: http::uri::InvalidUri| {
            ConfigError::new("proxy.upstream", e.to_string())
        })?;
        let scheme = uri.scheme_str().unwrap_or("");
        if scheme != "http" && scheme != "https" {
            return Err(ConfigError::new(
                "proxy.upstream",
                "must be an http:// or https:// URL",
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| ConfigError::new("proxy.upstream", "needs a host"))?
            .clone();
        if uri.query().is_some() {
            return Err(ConfigError::new("proxy.upstream", "must not have a query"));
        }
        Ok(UpstreamBase {
            scheme: uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// The source of the original URI on the forward-auth endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UriSource {
    Auto,
    XForwardedUri,
    XOriginalUri,
    Path,
}

/// Why the forward-auth endpoint could not tell which URI to authorize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardAuthUriError {
    /// Several sources disagree (or a header is repeated or not text).
    Ambiguous,
    /// The configured source is absent.
    Missing,
}

/// Where requests go, parsed once.
#[derive(Debug, Clone)]
pub struct UpstreamBase {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    prefix: String,
}

impl UpstreamBase {
    /// The upstream URI for a proxied request. When the canonical path is the request's own
    /// and there is no prefix, the request's path-and-query is reused as it is (a reference
    /// count, not a copy and a re-parse).
    pub fn for_request(
        &self,
        original: &Uri,
        path: &path::NormalizedPath<'_>,
    ) -> Result<Uri, http::Error> {
        if let (std::borrow::Cow::Borrowed(_), true, Some(pq)) = (
            &path.upstream,
            self.prefix.is_empty(),
            original.path_and_query(),
        ) {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = Some(pq.clone());
            return Ok(Uri::from_parts(parts)?);
        }
        self.uri(&path.upstream, original.query())
    }

    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let pq = match query {
            Some(q) => format!("{}{path}?{q}", self.prefix),
            None if self.prefix.is_empty() => path.to_owned(),
            None => format!("{}{path}", self.prefix),
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// Everything the request path needs, built once.
pub struct Proxy {
    /// Authentication, revocation and route policy, in one call.
    gate: Arc<Gate>,
    policy: Policy,
    reserved: Vec<String>,
    /// `headers.strip_request`, normalised (lower-case, `_` as `-`).
    strip_request: Vec<String>,
    spoof: SpoofPolicy,
    forward_token: bool,
    upstream: UpstreamBase,
    client: Arc<pool_h2::Client>,
    upstream_timeout: Duration,
    forward_auth_path: Option<String>,
    forward_auth_uri_source: UriSource,
    /// What a forward-auth answer lists in `x-envoy-auth-headers-to-remove`.
    remove_list: answer::RemoveList,
    encoded_slashes: EncodedSlashes,
    trust_forwarded: bool,
    preserve_host: bool,
    access_log: bool,
    access_user_id: bool,
    metrics: Arc<Metrics>,
    /// Browser mode (CORS, handshake, sign-in redirects); `None` keeps the gate alone.
    browser: Option<crate::browser::Browser>,
}

/// What the access line needs from deep inside the request path, carried in the response's
/// extensions (inserted only when the access log is on, or on a refusal).
#[derive(Clone, Copy)]
pub(crate) struct Reason(pub(crate) &'static str);
#[derive(Clone, Copy)]
pub(crate) struct UpstreamTime(pub(crate) Duration);
#[derive(Clone)]
pub(crate) struct AccessUser(pub(crate) Box<str>);

/// The sections the request path reads besides its own `[proxy]`, lent by the composed
/// configuration (which has checked them against each other).
pub struct Sections<'a> {
    pub proxy: &'a Config,
    pub auth: &'a crate::auth::Config,
    pub headers: &'a crate::auth::identity::HeadersConfig,
    pub routes: &'a [crate::auth::policy::RouteConfig],
    pub log: &'a crate::telemetry::LogConfig,
}

impl Proxy {
    pub fn new(
        sections: Sections<'_>,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let Sections {
            proxy: p,
            auth: auth_config,
            headers,
            routes,
            log,
        } = sections;
        let upstream = p.upstream_base()?;
        let client = Arc::new(pool_h2::Client::new(p, &upstream)?);
        Ok(Self {
            reserved: gate.builder().reserved().to_vec(),
            strip_request: headers
                .strip_request
                .iter()
                .map(|n| crate::auth::identity::normalise_name(n))
                .collect(),
            remove_list: answer::RemoveList::new(
                gate.builder().reserved(),
                auth_config.forward_token,
            ),
            gate,
            policy: Policy::new(routes),
            spoof: auth_config.on_spoofed_header,
            forward_token: auth_config.forward_token,
            upstream,
            client,
            upstream_timeout: p.upstream_timeout(),
            forward_auth_path: (!p.forward_auth_path.is_empty())
                .then(|| p.forward_auth_path.clone()),
            forward_auth_uri_source: p.forward_auth_uri_source,
            encoded_slashes: p.encoded_slashes,
            trust_forwarded: p.trust_forwarded_headers,
            preserve_host: p.preserve_host,
            access_log: log.access,
            access_user_id: log.access_user_id,
            metrics,
            browser: None,
        })
    }

    /// The upstream client this proxy sends through, for the webhook forwarder.
    pub fn upstream(&self) -> Upstream {
        Upstream(self.client.clone())
    }

    /// Turns on browser mode ([`crate::browser`]).
    pub fn with_browser(mut self, browser: crate::browser::Browser) -> Self {
        self.browser = Some(browser);
        self
    }

    /// Answers one request that is not a webhook: forward-auth, the Frontend API proxy, or a
    /// proxied request (a gRPC client's refusal in gRPC's own form). The router above records
    /// the metric and the access line.
    pub(crate) async fn dispatch(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> (Response<ProxyBody>, Outcome) {
        if req.method() == Method::CONNECT {
            // A CONNECT tunnel would carry anything past every check (RFC 9110 section 9.3.6).
            self.reject(Rejection::MethodNotAllowed)
        } else if self.is_forward_auth(req.uri().path()) {
            self.forward_auth(req).await
        } else if let Some(fapi) = self.fapi_proxy(req.uri().path()) {
            // Clerk's own traffic: public, authenticated by Clerk itself.
            (
                fapi.forward(req, conn).await.map(Either::Right),
                Outcome::FapiProxy,
            )
        } else if let Some(grpc) = rejection::grpc_content_type(req.headers()).cloned() {
            // A gRPC client reads a refusal from `grpc-status`, not from the HTTP status.
            let (mut resp, outcome) = self.proxy(req, conn).await;
            match resp.extensions().get::<Rejection>().copied() {
                Some(r) => {
                    let mut answer = r.grpc_response(grpc).map(Either::Right);
                    *answer.extensions_mut() = std::mem::take(resp.extensions_mut());
                    (answer, outcome)
                }
                None => (resp, outcome),
            }
        } else {
            self.proxy(req, conn).await
        }
    }

    fn reject(&self, r: Rejection) -> (Response<ProxyBody>, Outcome) {
        if let Rejection::Auth(e) = r {
            self.metrics.auth_failures.inc(e.failure());
        }
        if let Rejection::Upstream(kind) = r {
            self.metrics.upstream_errors.inc(kind);
        }
        tracing::debug!(
            status = r.status().as_u16(),
            reason = r.reason(),
            "request refused"
        );
        let mut resp = r.response().map(Either::Right);
        resp.extensions_mut().insert(Reason(r.reason()));
        // For the gRPC answer, see `dispatch`.
        resp.extensions_mut().insert(r);
        (resp, r.outcome())
    }

    /// Removes client-sent identity headers, or refuses the request under `reject`.
    fn strip_spoofed(&self, headers: &mut http::HeaderMap) -> Result<(), Rejection> {
        let removed = headers::strip_reserved(headers, &self.reserved);
        if removed > 0 {
            self.metrics.spoofed_headers.inc_by(removed as u64);
            tracing::debug!(count = removed, "client sent reserved identity headers");
            if self.spoof == SpoofPolicy::Reject {
                return Err(Rejection::SpoofedHeader);
            }
        }
        Ok(())
    }

    /// The gate's decision for a request on `route`, as of now.
    async fn decide(
        &self,
        headers: &http::HeaderMap,
        route: &RouteMatch<'_>,
    ) -> Result<Option<Allowed>, Rejection> {
        match self.gate.decide(headers, route, now_ms()).await {
            Decision::Allow(allowed) => Ok(allowed),
            Decision::Refuse(refusal) => Err(refusal.into()),
        }
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> (Response<ProxyBody>, Outcome) {
        let (mut parts, body) = req.into_parts();
        let normalized = match path::normalize(parts.uri.path(), self.encoded_slashes) {
            Ok(p) => p,
            Err(e) => return self.reject(Rejection::Path(e)),
        };
        if let Err(r) = self.strip_spoofed(&mut parts.headers) {
            return self.reject(r);
        }
        // Two Host lines leave the upstream's virtual host to whichever it reads (RFC 9112
        // section 3.2: a 400).
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let first_host = hosts.next();
        if first_host.is_some() && hosts.next().is_some() {
            return self.reject(Rejection::DuplicateHost);
        }
        // HTTP/2's `:authority` must name the same host as `Host` (RFC 9113 section 8.3.1):
        // forwarding either one would let the two disagree about which site was authorised.
        // (An HTTP/1.1 absolute-form target keeps its documented rule: routes go by its path
        // and the upstream gets one `Host`.)
        if parts.version == Version::HTTP_2
            && let (Some(host), Some(authority)) = (first_host, parts.uri.authority())
            && !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return self.reject(Rejection::AuthorityMismatch);
        }
        let route = self
            .policy
            .route_for(&normalized.matching, Some(&parts.method));
        let (identity, extra, browser_outcome) = match self.browse(&parts, &route, conn.tls).await {
            Ok(go_on) => go_on,
            Err(answer) => return answer,
        };

        let upstream_uri = match self.upstream.for_request(&parts.uri, &normalized) {
            Ok(uri) => extra.upstream_uri(uri),
            Err(_) => return self.reject(Rejection::Path(path::PathError::BadPercentEncoding)),
        };
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        // Only a WebSocket handshake (GET over HTTP/1.1) may become a tunnel; every other
        // `Upgrade` is removed and the request goes on as a plain one.
        let websocket = parts.method == Method::GET
            && parts.version == Version::HTTP_11
            && self.client.upgrades()
            && headers::is_websocket_upgrade(&parts.headers);
        let h = &mut parts.headers;
        // HTTP/2 keeps one TE, `trailers` (gRPC needs it; RFC 9113 section 8.2.2).
        let te_trailers = self.client.speaks_h2() && headers::te_trailers(h);
        headers::strip_hop_by_hop(h, websocket);
        if te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        headers::strip_listed(h, &self.strip_request);
        if !self.forward_token {
            headers::strip_token(h, self.gate.cookies());
        }
        headers::set_forwarded(
            h,
            &conn.peer_ip,
            conn.tls,
            host.clone(),
            self.trust_forwarded,
        );
        match (&host, self.preserve_host) {
            (Some(host), true) => {
                h.insert(header::HOST, host.clone());
            }
            _ => {
                h.remove(header::HOST);
            }
        }
        let outcome = match &identity {
            Some(allowed) => {
                self.gate.insert_headers(allowed, h);
                tracing::debug!(subject = %allowed.subject(), "authenticated");
                Outcome::Forwarded
            }
            None => browser_outcome.unwrap_or(Outcome::Anonymous),
        };
        parts.uri = upstream_uri;
        // The upstream speaks HTTP/1.1 whatever the client used (the HTTP/2 client sets its own).
        parts.version = Version::HTTP_11;
        let mut req = Request::from_parts(parts, body);

        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        // `Span::none()` unless traces are exported; then it also sets `traceparent`.
        let span = crate::telemetry::otel::upstream_span(&mut req);
        let sent = Instant::now();
        let call = tracing::Instrument::instrument(
            self.client.request(req.map(Outgoing::from)),
            span.clone(),
        );
        let resp = match tokio::time::timeout(self.upstream_timeout, call).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if forward::is_client_body_error(&e) => {
                tracing::debug!(error = ?e, "the client's request body broke off");
                return self.reject(Rejection::ClientBody);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = ?e, "upstream request failed");
                return self.reject(Rejection::Upstream(forward::classify(&e)));
            }
            Err(_) => return self.reject(Rejection::Upstream(UpstreamErrorKind::Timeout)),
        };
        let (mut resp, lease) = resp;
        crate::telemetry::otel::record_status(&span, resp.status());
        let upstream_time = sent.elapsed();
        self.metrics
            .upstream_duration
            .observe(upstream_time.as_secs_f64());
        if self.access_log {
            resp.extensions_mut().insert(UpstreamTime(upstream_time));
            if self.access_user_id
                && let Some(session) = identity.as_ref().and_then(Allowed::session)
            {
                resp.extensions_mut()
                    .insert(AccessUser(session.user_id().into()));
            }
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // A 101 to anything but the WebSocket handshake we forwarded would make the
            // connection a tunnel nobody authorised: refuse it, and drop (never pool) the
            // upstream connection, which has switched protocols.
            let Some(client_upgrade) =
                client_upgrade.filter(|_| headers::switched_to_websocket(resp.headers()))
            else {
                drop(lease);
                tracing::debug!("upstream switched protocols without a WebSocket handshake");
                return self.reject(Rejection::Upstream(UpstreamErrorKind::Protocol));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            // The connection becomes the tunnel: never back to the pool (the lease goes with
            // the tunnel and is dropped, not released, when it ends).
            // A tunnel of a signed-in session is closed when the session or its user is
            // revoked, on this replica or any other of the fleet.
            // (Machine tokens have no session to revoke.)
            let revoked = identity
                .as_ref()
                .and_then(Allowed::session)
                .map(|session| self.gate.watch(session));
            tokio::spawn(tunnel(
                client_upgrade,
                upstream_upgrade,
                lease,
                revoked,
                self.metrics.clone(),
            ));
            let (parts, _) = resp.into_parts();
            return (
                Response::from_parts(parts, Either::Right(Full::new(Bytes::new()))),
                outcome,
            );
        }
        headers::strip_hop_by_hop(resp.headers_mut(), false);
        extra.apply(resp.headers_mut());
        let errors = self.metrics.clone();
        (
            resp.map(|body| Either::Left(forward::UpstreamBody::new(body, errors, lease))),
            outcome,
        )
    }
}

/// The crate's one upstream HTTP client (pooled, in the protocol `proxy.upstream_protocol`
/// chose): the proxy streams clients' requests through it and the webhook forwarder sends
/// verified events through it.
#[derive(Clone)]
pub struct Upstream(Arc<pool_h2::Client>);

/// How much of an answer to a request sent whole is read (then the connection is retired).
const WHOLE_ANSWER_BYTES: usize = 64 * 1024;

impl Upstream {
    /// Sends `req` (an absolute URI under `proxy.upstream`), a body held whole, and reads the
    /// answer's body so that its connection can serve again: the answer's status, or why
    /// there was none. An answer body past 64 KiB is not read: its connection is retired.
    pub(crate) async fn send_whole(&self, req: Request<Bytes>) -> Result<StatusCode, String> {
        let (resp, lease) = self
            .0
            .request(req.map(Outgoing::from))
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        if crate::body::read_capped(body, WHOLE_ANSWER_BYTES)
            .await
            .is_ok()
        {
            lease.release();
        }
        Ok(parts.status)
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _lease: pool::Lease,
    revoked: Option<crate::revocations::StreamHandle>,
    metrics: Arc<Metrics>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            metrics.upstream_errors.inc(UpstreamErrorKind::Upgrade);
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    match &revoked {
        Some(handle) => {
            tokio::select! {
                _ = copy => {}
                () = handle.closed() => {
                    // Both sides are dropped here: the client and the upstream see the
                    // connection close.
                    tracing::debug!("tunnel closed: its session or user was revoked");
                }
            }
        }
        None => {
            let _ = copy.await;
        }
    }
}
