mod browser;
mod fleet;
mod ingress;
mod keys;
mod local_api;
mod machine;
mod operations;
mod proxy_basics;
mod runtime;
mod sdk_compat;
mod security;
mod sessions;
#[path = "../support/mod.rs"]
mod support;
mod support_smoke;
mod upstream_grpc;
mod upstream_h2;
mod upstream_tls;
