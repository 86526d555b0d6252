mod keys;
mod operations;
mod proxy_basics;
mod security;
mod sessions;
mod support;
mod support_smoke;
mod upstream_tls;
