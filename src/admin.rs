//! The admin listener: `GET /livez`, `GET /readyz`, `GET /metrics`. Never served on the proxy
//! port, so a client of the proxy cannot read metrics or flip readiness.
//!
//! Readiness is a latch of two facts: verification keys are usable (loaded and not older than
//! the stale bound) and the process is not draining. Liveness only says the process answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::auth::jwks::KeyStore;
use crate::server::{ConnInfo, Handler};
use crate::telemetry::Metrics;

/// `[admin]`: where health and metrics are served.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the admin listener.
    pub listen: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9090".parse().expect("valid address"),
        }
    }
}

/// Shared readiness state.
pub struct Readiness {
    draining: AtomicBool,
    keys: Arc<KeyStore>,
    /// The fleet store's link, when configured, and whether it must be up
    /// (`fleet.on_unavailable = "fail_closed"`) or only have settled.
    fleet: Option<(Arc<crate::fleet::Link>, bool)>,
}

impl Readiness {
    pub fn new(keys: Arc<KeyStore>) -> Self {
        Self {
            draining: AtomicBool::new(false),
            keys,
            fleet: None,
        }
    }

    /// Not ready until the fleet store's first load is over; with `required`
    /// (`fleet.on_unavailable = "fail_closed"`) not ready while Redis is unreachable.
    pub fn with_fleet(mut self, link: Arc<crate::fleet::Link>, required: bool) -> Self {
        self.fleet = Some((link, required));
        self
    }

    /// Called at the start of shutdown: load balancers stop sending new traffic.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `Err` names the first unmet condition.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.draining() {
            return Err("draining");
        }
        if !self.keys.ready() {
            return Err("keys-unavailable");
        }
        if let Some((link, required)) = &self.fleet {
            if !link.settled() {
                return Err("fleet-loading (first load of the fleet state from Redis)");
            }
            if *required && !link.is_up() {
                return Err(
                    "fleet-unavailable (Redis unreachable, fleet.on_unavailable = fail_closed)",
                );
            }
        }
        Ok(())
    }
}

pub(crate) struct Admin {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    keys: Arc<KeyStore>,
}

impl Admin {
    pub(crate) fn new(
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
        keys: Arc<KeyStore>,
    ) -> Self {
        Self {
            readiness,
            metrics,
            keys,
        }
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl Handler for Admin {
    type Body = Full<Bytes>;

    async fn handle(&self, req: Request<Incoming>, _conn: ConnInfo) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n",
            );
        }
        match req.uri().path() {
            "/livez" => text(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => {
                let check = self.readiness.check();
                self.metrics.ready.set(i64::from(check.is_ok()));
                match check {
                    Ok(()) => text(StatusCode::OK, "text/plain", "ready\n"),
                    Err(why) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("not ready: {why}\n"),
                    ),
                }
            }
            "/metrics" => {
                self.keys.update_gauges();
                self.metrics
                    .ready
                    .set(i64::from(self.readiness.check().is_ok()));
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.encode(),
                )
            }
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}
