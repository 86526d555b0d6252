//! clerkgate: an authentication sidecar for Clerk session tokens.
//!
//! # Layout
//!
//! - [`config`] composes the sections each module owns and layers defaults, file and env;
//!   `config::error` and `secret` are leaves every section imports, so no section imports
//!   the composed `Config` (and no module imports another in a loop).
//! - [`clerk`] holds what is Clerk-specific: the instance, publishable keys, claim decoding.
//! - [`auth`] decides whether a request may pass: `auth::gate` is the one call every path
//!   makes (token extraction, cache or verification, cookie freshness, the revocation check,
//!   route policy, identity headers), for session and machine tokens alike.
//! - `body` reads bodies with a cap and builds clerkgate's own JSON answers (one helper).
//! - [`router`] owns the proxy listener's handler: request ids, dispatch to the webhook
//!   endpoint or the proxy, the per-request metric, trace outcome and access line.
//! - [`proxy`] is the request path (forward-auth in `proxy/forward_auth.rs`) and the upstream
//!   client; `proxy::rejection` the one place that maps refusals to responses.
//! - [`server`] is the accept loop, `runtime` how many threads run it (multi-thread or one
//!   runtime per CPU), `admin` the health and metrics listener, `shutdown` the
//!   drain sequence, [`app`] the wiring, [`telemetry`] logs and metrics.
//! - [`revocations`] holds the deny-lists and session statuses behind one door (the
//!   `Guard`: a check, and a few typed writes); [`fleet`] shares them across replicas on Redis.
//! - [`webhook`] verifies Clerk's Svix-signed webhooks, keeps their ids (its `ledger`, for
//!   idempotency) and feeds [`revocations`].
//! - `browser` is browser mode: CORS preflights, Clerk's handshake for page loads, sign-in
//!   redirects.
//! - `local_api` is the pod-local Clerk API on a third listener: users and sessions through
//!   the one Backend API client (`clerk::api`), cached, and token verification for the backend.
//! - [`dev`] is `clerkgate dev`: an in-memory signing key, a local JWKS, an echo upstream.
//!
//! Modules without a link are private to the crate (`[lints]` in Cargo.toml warns about any
//! `pub` item nothing outside could reach, so dead code shows); the public ones are what tests,
//! benches, examples and the fuzz targets use.
//!
//! # Request path
//!
//! accept -> normalise path -> strip reserved headers -> route match -> gate (extract token ->
//! cache or verify -> cookie freshness -> revocation -> policy) -> set identity headers ->
//! forward -> metrics. See [`router`] (ids, dispatch, metrics), [`proxy`] (everything in
//! between) and `auth::gate`.

mod admin;
pub mod app;
pub mod auth;
mod body;
mod browser;
pub mod clerk;
pub mod cli;
pub mod config;
pub mod dev;
pub mod fleet;
mod local_api;
pub mod proxy;
pub mod router;

pub mod revocations;
mod runtime;
mod secret;
pub mod server;
mod shutdown;
pub mod telemetry;
pub mod webhook;

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent. Called first thing in
/// `main` (and by tests) so that no dependency can make rustls pick another provider.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
