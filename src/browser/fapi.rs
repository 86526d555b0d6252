//! The Frontend API proxy (`browser.fapi_proxy_path`): Clerk's "proxy" setup, where all of
//! clerk-js's traffic goes to `https://<app>/__clerk/...` and the app forwards it to Clerk.
//!
//! As `@clerk/backend`'s `clerkFrontendApiProxy` does it: `<path>/<rest>?<query>` goes to
//! `<fapi_url>/<rest>?<query>` with method, body and headers (hop-by-hop aside) intact, plus
//! `Clerk-Proxy-Url: <public origin><path>`, `Clerk-Secret-Key`, `Host: <fapi host>`,
//! `Accept-Encoding: identity`, `X-Forwarded-For: <client>`; redirects are not followed; a
//! `Location` on the FAPI host is rewritten to the proxy URL; every `Set-Cookie` is kept;
//! `Content-Length`/`Content-Encoding` are recomputed/dropped. The secret key travels only to
//! `fapi_url` and never back: any `Clerk-Secret-Key` in an answer is removed.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::proxy::headers;
use crate::proxy::path::{self, EncodedSlashes};
use crate::secret::Secret;
use crate::server::ConnInfo;

/// Largest request body forwarded (clerk-js sends small forms).
const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest answer relayed (the clerk-js bundle is served through the proxy too).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The proxy, compiled once.
pub struct FapiProxy {
    path: String,
    base: String,
    fapi_host: String,
    host_header: HeaderValue,
    secret: Secret,
    http: reqwest::Client,
    trust_forwarded: bool,
    encoded_slashes: EncodedSlashes,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    crate::body::json(status, body)
}

impl FapiProxy {
    /// `None` when `browser.fapi_proxy_path` is empty. Needs the secret key (checked by
    /// [`super::Config::validate`]).
    pub fn new(config: &super::Sections<'_>) -> Option<Self> {
        let b = &config.browser;
        if b.fapi_proxy_path.is_empty() {
            return None;
        }
        let secret = config.clerk.secret_key.clone()?;
        let url = url::Url::parse(&b.fapi_url).ok()?;
        let host = url.host_str()?;
        let fapi_host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.upstream_timeout)
            .connect_timeout(config.connect_timeout)
            .no_proxy()
            .build()
            .ok()?;
        Some(Self {
            path: b.fapi_proxy_path.trim_end_matches('/').to_owned(),
            base: b.fapi_url.trim_end_matches('/').to_owned(),
            host_header: HeaderValue::from_str(&fapi_host).ok()?,
            fapi_host,
            secret,
            http,
            trust_forwarded: config.trust_forwarded,
            encoded_slashes: config.encoded_slashes,
        })
    }

    /// `true` for the proxy path itself and everything below it.
    pub fn matches(&self, path: &str) -> bool {
        path.strip_prefix(&self.path)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Forwards one request to the Frontend API.
    pub async fn forward(
        &self,
        req: http::Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let normalized = match path::normalize(parts.uri.path(), self.encoded_slashes) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, "proxy_path_mismatch", e.as_label()),
        };
        // `/__clerk/../admin` normalises out of the proxy path: refused, never sent to Clerk.
        let Some(rest) = normalized.upstream.strip_prefix(&self.path) else {
            return error(
                StatusCode::BAD_REQUEST,
                "proxy_path_mismatch",
                "path is not below the proxy path",
            );
        };
        let rest = if rest.is_empty() { "/" } else { rest };
        let target = match parts.uri.query() {
            Some(q) => format!("{}{rest}?{q}", self.base),
            None => format!("{}{rest}", self.base),
        };
        let Some(public) = super::sdk::public_url(&parts, conn.tls, self.trust_forwarded) else {
            return error(StatusCode::BAD_REQUEST, "proxy_request_failed", "no Host");
        };
        let origin = public.origin().ascii_serialization();
        let proxy_url = format!("{origin}{}", self.path);

        let body = match crate::body::read_capped(body, MAX_REQUEST_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "proxy_request_failed",
                    "request body too large or broken",
                );
            }
        };
        let mut h = parts.headers;
        headers::strip_hop_by_hop(&mut h, false);
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::HOST, self.host_header.clone());
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let set = |h: &mut HeaderMap, name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        set(&mut h, "clerk-proxy-url", &proxy_url);
        set(&mut h, "clerk-secret-key", self.secret.expose());
        if !self.trust_forwarded || !h.contains_key("x-forwarded-host") {
            set(&mut h, "x-forwarded-host", public.host_str().unwrap_or(""));
        }
        if !self.trust_forwarded || !h.contains_key("x-forwarded-proto") {
            set(&mut h, "x-forwarded-proto", public.scheme());
        }
        // The client's address as clerkgate saw it (or the first trusted hop's claim).
        let client_ip = if self.trust_forwarded {
            h.get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_owned())
        } else {
            None
        };
        match client_ip {
            Some(ip) => set(&mut h, "x-forwarded-for", &ip),
            None => {
                h.insert("x-forwarded-for", conn.peer_ip.clone());
            }
        }
        let mut request = self.http.request(parts.method, &target).headers(h);
        if !body.is_empty() {
            request = request.body(body);
        }
        let resp = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let status = if e.is_timeout() {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                tracing::debug!(error = %e.without_url(), "Frontend API proxy request failed");
                return error(
                    status,
                    "proxy_request_failed",
                    "Clerk Frontend API unreachable",
                );
            }
        };
        let status = resp.status();
        let mut out_headers = resp.headers().clone();
        let body = match crate::body::read_response_capped(resp, MAX_RESPONSE_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "proxy_request_failed",
                    "Clerk Frontend API answer unreadable",
                );
            }
        };
        headers::strip_hop_by_hop(&mut out_headers, false);
        out_headers.remove(header::CONTENT_LENGTH);
        out_headers.remove(header::CONTENT_ENCODING);
        out_headers.remove("clerk-secret-key");
        if let Some(location) = out_headers
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| {
                url::Url::parse(&format!("{}/", self.base))
                    .ok()?
                    .join(l)
                    .ok()
            })
        {
            let same_host = location
                .host_str()
                .map(|h| match location.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_owned(),
                })
                .is_some_and(|h| h == self.fapi_host);
            if same_host {
                let mut rewritten = format!("{proxy_url}{}", location.path());
                if let Some(q) = location.query() {
                    rewritten.push('?');
                    rewritten.push_str(q);
                }
                if let Some(f) = location.fragment() {
                    rewritten.push('#');
                    rewritten.push_str(f);
                }
                if let Ok(v) = HeaderValue::from_str(&rewritten) {
                    out_headers.insert(header::LOCATION, v);
                }
            }
        }
        let mut out = Response::new(Full::new(Bytes::from(body)));
        *out.status_mut() = status;
        *out.headers_mut() = out_headers;
        out
    }
}
