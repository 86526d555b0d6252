//! The proxy listener's front door: owns the `server::Handler`, gives every request its id,
//! dispatches to the webhook endpoint (verified by its Svix signature, not by a token) or to
//! the proxy (forward-auth, the Frontend API proxy, proxied requests), and records the
//! per-request metric, the trace span's outcome and the access line.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::proxy::{AccessUser, Proxy, ProxyBody, Reason, UpstreamTime};
use crate::server::{ConnInfo, Handler};
use crate::telemetry::{Label, LogConfig, Metrics, Outcome};
use crate::webhook::Webhooks;

/// The handler of the proxy listener.
pub struct Router {
    proxy: Arc<Proxy>,
    webhooks: Arc<Webhooks>,
    request_ids: RequestIds,
    access_log: bool,
    metrics: Arc<Metrics>,
}

impl Router {
    /// `trust_request_id` is `proxy.trust_request_id`.
    pub fn new(
        proxy: Arc<Proxy>,
        webhooks: Arc<Webhooks>,
        trust_request_id: bool,
        log: &LogConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            proxy,
            webhooks,
            request_ids: RequestIds::new(trust_request_id),
            access_log: log.access,
            metrics,
        }
    }

    /// Handles one request from a client.
    pub async fn handle_request(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        // One id per request, sent upstream and back to the client (and in the access line).
        let (request_id, kept) = self.request_ids.for_request(req.headers());
        if !kept {
            req.headers_mut()
                .insert(X_REQUEST_ID.clone(), request_id.clone());
        }
        // Logged without the query string, which may carry secrets.
        let access =
            self.access_log && tracing::enabled!(target: "clerkgate::access", tracing::Level::INFO);
        let log_line = (access || tracing::enabled!(tracing::Level::DEBUG))
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        // CONNECT never reaches the webhook endpoint: the proxy refuses it first thing.
        let (resp, outcome) =
            if req.method() != Method::CONNECT && self.webhooks.matches(req.uri().path()) {
                // Verified by its Svix signature, not by a session token.
                (
                    // Boxed: a webhook's future (verification, the ledger, the forward) is
                    // kilobytes that every proxied request's future would otherwise carry.
                    Box::pin(self.webhooks.handle(req)).await.map(Either::Right),
                    Outcome::Webhook,
                )
            } else {
                self.proxy.dispatch(req, &conn).await
            };
        let mut resp = resp;
        resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
        self.metrics.requests.inc(outcome);
        if crate::telemetry::otel::enabled() {
            let reason = resp.extensions().get::<Reason>().map(|r| r.0);
            crate::telemetry::otel::record_outcome(outcome.as_label(), reason);
        }
        let elapsed = start.elapsed();
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        if access && let Some((method, path)) = &log_line {
            let ext = resp.extensions();
            tracing::info!(
                target: "clerkgate::access",
                method = %method,
                path = path.as_str(),
                status = resp.status().as_u16(),
                outcome = Label::as_label(outcome),
                reason = ext.get::<Reason>().map(|r| r.0),
                micros = elapsed.as_micros() as u64,
                upstream_micros = ext.get::<UpstreamTime>().map(|t| t.0.as_micros() as u64),
                request_id = resp.headers().get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()),
                user_id = ext.get::<AccessUser>().map(|u| &*u.0),
                "access"
            );
        } else if let Some((method, path)) = log_line {
            tracing::debug!(
                %method,
                path,
                status = resp.status().as_u16(),
                outcome = Label::as_label(outcome),
                micros = elapsed.as_micros() as u64,
                peer = %conn.peer,
                "request"
            );
        }
        resp
    }
}

impl Handler for Router {
    type Body = ProxyBody;

    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        if !crate::telemetry::otel::enabled() {
            return self.handle_request(req, conn).await;
        }
        // The request's server span (until the response head), when traces are exported.
        let span = crate::telemetry::otel::request_span(&req);
        let resp =
            tracing::Instrument::instrument(self.handle_request(req, conn), span.clone()).await;
        let id = resp
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok());
        crate::telemetry::otel::record_response(&span, resp.status(), id);
        resp
    }
}

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Request ids: a random per-process prefix and a counter, so an id costs one small formatted
/// string, not a random draw per request, and ids from different replicas never collide.
struct RequestIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
    trust: bool,
}

impl RequestIds {
    fn new(trust: bool) -> Self {
        let mut bytes = [0u8; 6];
        let _ = aws_lc_rs::rand::fill(&mut bytes);
        Self {
            prefix: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            next: std::sync::atomic::AtomicU64::new(1),
            trust,
        }
    }

    /// The request's id: the client's own when trusted and sane (printable ASCII or space, at
    /// most 256 bytes; then the request is left as sent and `None` is returned alongside), else
    /// a new one that the caller sets on the request.
    fn for_request(&self, headers: &http::HeaderMap) -> (HeaderValue, bool) {
        let sane = |v: &HeaderValue| {
            !v.is_empty() && v.len() <= 256 && v.as_bytes().iter().all(|b| (0x20..0x7f).contains(b))
        };
        if self.trust
            && let Some(first) = headers.get(&X_REQUEST_ID)
            && headers.get_all(&X_REQUEST_ID).iter().all(sane)
        {
            return (first.clone(), true);
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Formatted on the stack (12 hex digits, '-', at most 16 more), copied once into the
        // header value: no intermediate `String` per request.
        let mut buf = [0u8; 32];
        let mut out = &mut buf[..];
        let id = match write!(out, "{}-{n:x}", self.prefix) {
            Ok(()) => {
                let len = 32 - out.len();
                HeaderValue::from_bytes(&buf[..len]).ok()
            }
            Err(_) => None,
        };
        (
            id.unwrap_or_else(|| HeaderValue::from_static("unknown")),
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_the_prefix_and_a_hex_counter_up_to_u64_max() {
        let ids = RequestIds::new(false);
        assert_eq!(ids.prefix.len(), 12);
        let (first, kept) = ids.for_request(&http::HeaderMap::new());
        assert!(!kept);
        assert_eq!(first.to_str().unwrap(), format!("{}-1", ids.prefix));
        ids.next
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        let (last, _) = ids.for_request(&http::HeaderMap::new());
        assert_eq!(
            last.to_str().unwrap(),
            format!("{}-ffffffffffffffff", ids.prefix)
        );
    }
}
