mod proxy_basics;
mod support;
mod support_smoke;
