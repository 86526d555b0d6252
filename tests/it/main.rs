mod support;
mod support_smoke;
mod proxy_basics;
mod sessions;
