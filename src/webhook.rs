//! The Clerk webhook endpoint: `POST /webhooks/clerk` on the proxy listener, verified by the Svix
//! scheme instead of a session token.
//!
//! Sequence: method, secret configured, body capped and read as raw bytes, delivery headers,
//! timestamp window and signature against an injected `now` ([`signature`]), then idempotency by
//! webhook id: an id whose state change was applied is never applied twice; one whose forwarding
//! failed is forwarded again on Svix's retry. Only then is the payload parsed ([`events`]).
//! Error bodies carry a reason code and nothing from the payload.

mod events;
pub mod ledger;
pub mod signature;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use serde::{Deserialize, Serialize};

use crate::body::BodyError;
use crate::config::error::ConfigError;
use crate::proxy::Upstream;
use crate::revocations::Guard;
use crate::secret::Secret;
use crate::telemetry::{Metrics, WebhookEventType, WebhookResult};
use ledger::{WebhookClaim, WebhookLedger, WebhookProgress};
use signature::{SignatureError, WebhookSecret};

/// `[webhooks]`: the Clerk webhook endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `CLERK_WEBHOOK_SECRET` or `CLERK_WEBHOOK_SIGNING_SECRET`: the `whsec_...` signing secret.
    pub secret: Option<Secret>,
    /// Path of the endpoint on the proxy listener; empty disables it.
    pub path: String,
    /// Largest body accepted (413 above).
    pub max_body_bytes: usize,
    /// Allowed distance between the delivery timestamp and now, both directions.
    pub tolerance_seconds: u64,
    /// Upstream path that receives verified events (body unchanged); unset keeps them local.
    pub forward_path: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            secret: None,
            path: "/webhooks/clerk".into(),
            max_body_bytes: 1024 * 1024,
            tolerance_seconds: 300,
            forward_path: None,
        }
    }
}

impl Config {
    /// `tolerance_seconds` (the pure check takes whole seconds).
    pub fn tolerance(&self) -> Duration {
        Duration::from_secs(self.tolerance_seconds)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(secret) = &self.secret {
            WebhookSecret::parse(secret.expose())
                .map_err(|e| ConfigError::new("webhooks.secret", e.to_string()))?;
        }
        if !self.path.is_empty() && !self.path.starts_with('/') {
            return Err(ConfigError::new(
                "webhooks.path",
                "must start with / (or be empty)",
            ));
        }
        if let Some(p) = &self.forward_path
            && !p.starts_with('/')
        {
            return Err(ConfigError::new(
                "webhooks.forward_path",
                "must start with /",
            ));
        }
        if self.tolerance_seconds > crate::revocations::MAX_RETENTION_SECONDS {
            return Err(ConfigError::new(
                "webhooks.tolerance_seconds",
                "must be at most 10 years",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "webhooks.max_body_bytes",
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}

/// Sends verified events to the upstream, through the proxy's own upstream client.
pub struct Forwarder {
    upstream: Upstream,
    uri: http::Uri,
    timeout: Duration,
}

/// The endpoint.
pub struct Webhooks {
    secret: Option<WebhookSecret>,
    path: String,
    max_body: usize,
    tolerance: i64,
    forwarder: Option<Forwarder>,
    /// How long a delivery waits for another delivery of the same id before answering 409
    /// (Svix then retries): Svix gives an endpoint 15 s.
    claim_wait: Duration,
    /// Which ids were applied and delivered, and who acts on one now (fleet-wide with
    /// `fleet.redis_url`).
    ledger: Arc<dyn WebhookLedger>,
    sessions: Arc<Guard>,
    metrics: Arc<Metrics>,
}

/// Unix seconds now; the handler's only clock read, passed into the pure check.
fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn reply(status: StatusCode, key: &str, value: &str) -> Response<Full<Bytes>> {
    crate::body::json(status, format!("{{\"{key}\":\"{value}\"}}\n"))
}

/// How long webhook ids are remembered: well past the Svix tolerance window (retries come
/// within it), and at least an hour.
pub fn retention(config: &Config) -> Duration {
    config
        .tolerance()
        .saturating_mul(2)
        .max(Duration::from_secs(3600))
}

impl Forwarder {
    /// Sends verified events to `uri` on the upstream (`webhooks.forward_path` under
    /// `proxy.upstream`) through `upstream`, waiting at most `timeout` (`proxy.upstream_timeout`).
    pub fn new(uri: http::Uri, upstream: Upstream, timeout: Duration) -> Self {
        Self {
            upstream,
            uri,
            timeout,
        }
    }
}

impl Webhooks {
    /// The endpoint for `[webhooks]`; `forwarder` sends verified events upstream (set when
    /// `webhooks.forward_path` is).
    /// `ledger` keeps the `svix-id` table (the fleet's, to claim deliveries fleet-wide).
    pub fn new(
        w: &Config,
        forwarder: Option<Forwarder>,
        ledger: Arc<dyn WebhookLedger>,
        sessions: Arc<Guard>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let secret = w
            .secret
            .as_ref()
            .map(|s| WebhookSecret::parse(s.expose()))
            .transpose()
            .map_err(|e| ConfigError::new("webhooks.secret", e.to_string()))?;
        if secret.is_none() && !w.path.is_empty() {
            tracing::warn!(
                path = %w.path,
                "no webhook secret (CLERK_WEBHOOK_SECRET): the webhook endpoint answers 503 and revocations arrive only through token expiry"
            );
        }
        let claim_wait = forwarder
            .as_ref()
            .map_or(Duration::from_secs(5), |f| {
                f.timeout + Duration::from_secs(2)
            })
            .min(Duration::from_secs(15));
        Ok(Self {
            claim_wait,
            ledger,
            secret,
            path: w.path.clone(),
            max_body: w.max_body_bytes,
            tolerance: w.tolerance_seconds as i64,
            forwarder,
            sessions,
            metrics,
        })
    }

    /// Whether a request is for this endpoint (exact path).
    pub fn matches(&self, path: &str) -> bool {
        !self.path.is_empty() && path == self.path
    }

    fn refuse(
        &self,
        result: WebhookResult,
        status: StatusCode,
        reason: &str,
    ) -> Response<Full<Bytes>> {
        self.metrics
            .webhook_events
            .inc(WebhookEventType::Unverified, result);
        tracing::debug!(status = status.as_u16(), reason, "webhook refused");
        reply(status, "reason", reason)
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.handle_at(req, now_s()).await
    }

    /// Handles one delivery as of `now` (Unix seconds).
    pub async fn handle_at(&self, req: Request<Incoming>, now: i64) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "reason",
                "method-not-allowed",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
        let Some(secret) = &self.secret else {
            return self.refuse(
                WebhookResult::Unconfigured,
                StatusCode::SERVICE_UNAVAILABLE,
                "webhook-secret-unconfigured",
            );
        };
        let (parts, body) = req.into_parts();
        if body.size_hint().lower() > self.max_body as u64 {
            return self.refuse(
                WebhookResult::TooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                "webhook-body-too-large",
            );
        }
        let body = match crate::body::read_capped(body, self.max_body).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return self.refuse(
                    WebhookResult::TooLarge,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "webhook-body-too-large",
                );
            }
            Err(BodyError::Read(_) | BodyError::Timeout) => {
                return self.refuse(
                    WebhookResult::Malformed,
                    StatusCode::BAD_REQUEST,
                    "webhook-body-unreadable",
                );
            }
        };
        let delivery = match signature::delivery(&parts.headers) {
            Ok(d) => d,
            Err(e) => return self.refuse(WebhookResult::Malformed, e.status(), e.as_label()),
        };
        if let Err(e) = signature::verify(&delivery, &body, secret, now, self.tolerance) {
            let result = match e {
                SignatureError::Stale => WebhookResult::Stale,
                SignatureError::Mismatch => WebhookResult::BadSignature,
                SignatureError::MissingHeaders | SignatureError::BadTimestamp => {
                    WebhookResult::Malformed
                }
            };
            return self.refuse(result, e.status(), e.as_label());
        }

        // Verified from here on. Concurrent deliveries of one id (Svix retries overlap) act one
        // at a time: the first claims the id, the others wait for its outcome and then either
        // find the work done (`duplicate`) or, after a failed forward, take their turn.
        // With a fleet, one replica acts on a delivery that reached several.
        let mut claim = match self.ledger.claim(delivery.id, self.claim_wait).await {
            WebhookClaim::Won(progress) => Claim {
                ledger: self.ledger.as_ref(),
                id: delivery.id,
                progress,
            },
            WebhookClaim::Busy => {
                return self.refuse(
                    WebhookResult::InProgress,
                    StatusCode::CONFLICT,
                    "webhook-in-progress",
                );
            }
            // Svix retries a 503; the replicas cannot agree on who acts right now.
            WebhookClaim::Unavailable => {
                return self.refuse(
                    WebhookResult::InProgress,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "fleet-unavailable",
                );
            }
        };
        let progress = &mut claim.progress;
        let needs_delivery = self.forwarder.is_some() && !progress.delivered;
        if progress.applied && !needs_delivery {
            let kind = events::event_type(&body).unwrap_or(WebhookEventType::Other);
            self.metrics
                .webhook_events
                .inc(kind, WebhookResult::Duplicate);
            return reply(StatusCode::OK, "status", "duplicate");
        }
        let event = match events::parse(&body) {
            Ok(event) => event,
            Err(_) => {
                return self.refuse(
                    WebhookResult::Malformed,
                    StatusCode::BAD_REQUEST,
                    "webhook-payload-invalid",
                );
            }
        };
        let duplicate = progress.applied;
        if !progress.applied {
            let now_ms = (now.max(0) as u64).saturating_mul(1000);
            events::apply(&event, &self.sessions, now_ms).await;
            self.metrics
                .revoked_sessions
                .set(self.sessions.denied_sessions() as i64);
            progress.applied = true;
            tracing::info!(event = event.kind.as_label_str(), "webhook applied");
        }
        if let Some(forwarder) = &self.forwarder
            && !progress.delivered
        {
            if let Err(why) = forwarder.send(&event, delivery.id, body).await {
                tracing::warn!(error = %why, "webhook forwarding failed; answering 502 so Svix retries");
                self.metrics
                    .webhook_events
                    .inc(event.kind, WebhookResult::ForwardFailed);
                return reply(StatusCode::BAD_GATEWAY, "reason", "webhook-forward-failed");
            }
            progress.delivered = true;
        }
        let result = if duplicate {
            WebhookResult::Duplicate
        } else {
            WebhookResult::Processed
        };
        self.metrics.webhook_events.inc(event.kind, result);
        reply(
            StatusCode::OK,
            "status",
            if duplicate { "duplicate" } else { "processed" },
        )
    }
}

/// A held webhook claim; dropping it (the delivery finished, failed, or its client went away
/// mid-way) records the progress made and releases the id for the next delivery.
struct Claim<'a> {
    ledger: &'a dyn WebhookLedger,
    id: &'a str,
    progress: WebhookProgress,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.ledger.release(self.id, self.progress);
    }
}

impl Forwarder {
    async fn send(&self, event: &events::Event, id: &str, body: Bytes) -> Result<(), String> {
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-clerk-webhook-verified", HeaderValue::from_static("1"));
        if let Ok(v) = HeaderValue::from_str(&event.type_name) {
            h.insert("x-clerk-webhook-type", v);
        }
        if let Ok(v) = HeaderValue::from_str(id) {
            h.insert("x-clerk-webhook-id", v);
        }
        match tokio::time::timeout(self.timeout, self.upstream.send_whole(req)).await {
            Ok(Ok(status)) if status.is_success() => Ok(()),
            Ok(Ok(status)) => Err(format!("upstream answered {status}")),
            Ok(Err(e)) => Err(format!("upstream request failed: {e}")),
            Err(_) => Err("upstream timed out".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_bad_secrets_and_paths() {
        let c = Config {
            secret: Some(Secret::new("whsec_!!")),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "webhooks.secret");
        let c = Config {
            forward_path: Some("internal".into()),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "webhooks.forward_path");
    }
}
