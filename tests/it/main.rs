mod proxy_basics;
mod sessions;
mod support;
mod support_smoke;
mod upstream_tls;
