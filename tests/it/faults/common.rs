//! Helpers shared by the fault tests.

use std::time::Duration;

use serde_json::Value;

use crate::support::sidecar::{base_toml, config};
use crate::support::{FakeClerk, Sidecar, Upstream};

/// Upper bound for every wait; generous because the machine is shared and loaded.
pub const WAIT: Duration = Duration::from_secs(15);

/// One HTTP client for every test. Building a client loads the TLS roots, which costs about
/// 100 ms in a debug build: too much for polling loops. Connections are not pooled, so none
/// outlives the test runtime that opened it.
pub fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client builds")
    });
    &CLIENT
}

/// Status of GET /readyz (0 when the admin listener does not answer).
pub async fn readyz(gate: &Sidecar) -> u16 {
    http()
        .get(gate.admin_url("/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls /readyz until it is 200.
pub async fn wait_ready(gate: &Sidecar) -> bool {
    crate::support::eventually(WAIT, async || readyz(gate).await == 200).await
}

/// The Prometheus text from /metrics.
pub async fn metrics_text(gate: &Sidecar) -> String {
    http()
        .get(gate.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics body")
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

/// The value of one sample (name plus labels exactly as exported) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// [`sample`] of the live /metrics text, panicking with the text when the series is absent.
pub async fn metric(gate: &Sidecar, series: &str) -> f64 {
    let text = metrics_text(gate).await;
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}
