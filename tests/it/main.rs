//! The one integration test binary (`cargo test --test it`): every test that drives clerkgate
//! from outside, grouped by area, on one shared harness in [`support`] (fake Clerk, echo and
//! raw upstreams, raw HTTP/1.1 client, process runner, wait helpers).
//!
//! One binary links the crate once and lets tests of every area run side by side. Tests never
//! mutate the process environment (children get explicit environments, sidecars explicit
//! configs), since every test shares this process.

// A test binary is not an API: its modules share helpers with `pub`, which the crate-wide
// `unreachable_pub` lint (Cargo.toml `[lints]`) would otherwise ask to narrow.
#![allow(unreachable_pub)]

mod browser;
mod cli;
mod faults;
mod fleet;
mod hostile;
mod ingress;
mod keys;
mod local_api;
mod machine;
mod operations;
mod otel;
mod properties;
mod proxy_basics;
mod runtime;
mod sdk_compat;
mod security;
mod sessions;
mod support;
mod support_smoke;
mod upstream_grpc;
mod upstream_h2;
mod upstream_tls;
