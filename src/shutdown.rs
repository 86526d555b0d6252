//! Signals and the drain phases.
//!
//! On SIGTERM or SIGINT: readiness turns 503 at once, the proxy keeps serving for
//! `delay_seconds` (so endpoints controllers and load balancers notice before connections are
//! refused; no `preStop: sleep` needed), then stops accepting and drains in-flight requests for
//! at most `drain_timeout_seconds`. Kubernetes' `terminationGracePeriodSeconds` must exceed the
//! sum of both.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[shutdown]`: the drain sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seconds between readiness turning 503 and the listeners closing.
    pub delay_seconds: u64,
    /// Seconds in-flight requests get to finish once the listeners closed.
    pub drain_timeout_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            delay_seconds: 5,
            drain_timeout_seconds: 20,
        }
    }
}

impl Config {
    pub fn delay(&self) -> Duration {
        Duration::from_secs(self.delay_seconds)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_seconds)
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub(crate) async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; relying on SIGINT");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
