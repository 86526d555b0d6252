//! Failing dependencies: what clerkgate does when Clerk (the JWKS and the Backend API), the
//! upstream or its own process lifecycle misbehave, and that it recovers without a restart.
//! `clerk`: JWKS faults, cold and warm, key rotation, a rolling outage under load.
//! `backend`: Backend API faults (api-mode session checks, the local API).
//! `upstream`: upstream faults, answered 502/504 with a reason and a metric.
//! `drain`: SIGTERM against the real binary.
//! `pool`: upstream keep-alive connections: reuse, upstream-closed idle connections, reaping.
//! `fakes`: the misbehaving servers (a fault door in front of the fake Clerk, a raw upstream).

mod backend;
mod clerk;
mod common;
mod drain;
mod fakes;
mod pool;
mod upstream;
