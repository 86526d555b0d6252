//! The one test harness: in-process fakes and clients the integration tests drive the real
//! library (and, through [`process`], the real binary) against.
//!
//! - [`fake_clerk`]: the fake Clerk (JWKS, Backend API, machine tokens, webhook signing).
//! - [`sidecar`]: clerkgate on port 0, the recording echo [`Upstream`], the shared client.
//! - [`upstreams`]: the raw upstream that records exact bytes and plays upstream faults.
//! - [`raw`]: the raw HTTP/1.1 client and the one hand-written response parser.
//! - [`env`]: a fake Clerk, an echo upstream and clerkgate per test, and token helpers.
//! - [`process`]: runs the `clerkgate` binary with a cleared environment, bounded waits.
//! - [`redis`]: real `redis-server`s for the fleet tests.
//! - [`eventually`]: the one polling wait, for conditions no event announces.
//!
//! Every fake binds `127.0.0.1:0` and is owned by the test that started it, so tests run in
//! parallel without sharing ports or state. Nothing here reads or changes the process
//! environment: every test shares this process.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

pub mod env;
pub mod fake_clerk;
pub mod process;
pub mod raw;
pub mod redis;
pub mod sidecar;
pub mod upstreams;

use std::time::Duration;

pub use clerkgate::dev::signing::SigningKey;
pub use env::fold;
pub use fake_clerk::{Endpoint, Failure, FakeClerk, user_json};
pub use sidecar::{Sidecar, Upstream, client, sample};

/// Upper bound for every wait on the network or a background task; generous because the
/// machine is shared and loaded.
pub const WAIT: Duration = Duration::from_secs(15);

/// One HTTP client for polling and admin requests. Building a client loads the TLS roots,
/// which costs about 100 ms in a debug build: too much for polling loops. Connections are not
/// pooled, so none outlives the test runtime that opened it.
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

/// The current time in Unix seconds, the unit of `iat`/`nbf`/`exp` (RFC 7519 §2 NumericDate).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the system clock is after 1970")
        .as_secs()
}

/// Polls `check` every 20 ms until it holds or `timeout` passes (for conditions reached by
/// background work, such as a key refresh, where no event can be awaited).
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
