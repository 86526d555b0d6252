//! Shared test support: in-process fakes the integration tests drive the real library against.
//!
//! Every fake binds `127.0.0.1:0` and is owned by the test that started it, so tests run in
//! parallel without sharing ports or state.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

pub mod fake_clerk;
pub mod redis;
pub mod sidecar;

pub use clerkgate::dev::signing::SigningKey;
pub use fake_clerk::{Endpoint, Failure, FakeClerk, user_json};
pub use sidecar::{Sidecar, Upstream, client};

/// The current time in Unix seconds, the unit of `iat`/`nbf`/`exp` (RFC 7519 §2 NumericDate).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the system clock is after 1970")
        .as_secs()
}

/// Polls `check` every 20 ms until it holds or `timeout` passes (for conditions reached by
/// background work, such as a key refresh, where no event can be awaited).
pub async fn eventually(
    timeout: std::time::Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
