//! Failing dependencies: what clerkgate does when Clerk (the JWKS and the Backend API), the
//! upstream or its own process lifecycle misbehave, and that it recovers without a restart.

#[path = "../support/mod.rs"]
mod support;

mod backend;
mod clerk;
mod common;
mod drain;
mod fakes;
mod upstream;
