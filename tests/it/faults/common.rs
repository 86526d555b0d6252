//! Helpers shared by the fault tests.

use serde_json::Value;

use crate::support::sidecar::{base_toml, config};
use crate::support::{FakeClerk, Sidecar, Upstream, WAIT, http};

/// Polls /readyz until it is 200 (within [`WAIT`]).
pub async fn wait_ready(gate: &Sidecar) -> bool {
    gate.wait_ready(WAIT).await
}

/// Starts clerkgate without waiting for readiness (cold starts against a failing Clerk).
pub async fn start_unready(clerk: &FakeClerk, upstream: &Upstream, extra: &str) -> Sidecar {
    Sidecar::start_config(config(&base_toml(clerk, &upstream.url()), extra).expect("valid config"))
        .await
}

/// Starts clerkgate in front of an upstream given by URL, without waiting for readiness.
pub async fn start_with_upstream_url(clerk: &FakeClerk, upstream: &str, extra: &str) -> Sidecar {
    Sidecar::start_config(config(&base_toml(clerk, upstream), extra).expect("valid config")).await
}

/// What the proxy answered: status, the `reason` of its own refusals, `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub reason: String,
    pub retry_after: Option<String>,
}

/// `GET path` through the proxy with `token`.
pub async fn get(gate: &Sidecar, path: &str, token: &str) -> Answer {
    let resp = http()
        .get(gate.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("the proxy answers");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        reason: body["reason"].as_str().unwrap_or_default().to_owned(),
        retry_after,
    }
}

/// Status and body of an admin endpoint.
pub async fn admin(gate: &Sidecar, path: &str) -> (u16, String) {
    let resp = http()
        .get(gate.admin_url(path))
        .send()
        .await
        .expect("the admin listener answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}
