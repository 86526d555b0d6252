//! `[cors]`: CORS preflights and, in `answer` mode, the CORS headers on every answer.
//!
//! A request carrying `Authorization` is never a CORS "simple request", so a browser first sends
//! an `OPTIONS` preflight without any token. Answering it `401` kills every cross-origin `fetch`
//! with a Clerk token. A preflight is `OPTIONS` with `Origin` and
//! `Access-Control-Request-Method` (Fetch standard, "CORS-preflight request").

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::config::error::ConfigError;

/// What happens to a CORS preflight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreflightMode {
    /// To the upstream unauthenticated, identity headers stripped as always.
    Forward,
    /// clerkgate answers it from `[cors]`, and adds CORS headers to answers for allowed origins.
    Answer,
    /// Like any other request: a token is needed where the route needs one.
    Authenticate,
}

/// `[cors]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub preflight: PreflightMode,
    /// `answer` mode: exact origins allowed; empty = `clerk.authorized_parties`.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    /// Request headers a preflight may ask for (compared case-insensitively).
    pub allowed_headers: Vec<String>,
    pub max_age_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            preflight: PreflightMode::Forward,
            allowed_origins: Vec::new(),
            allowed_methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
                .map(String::from)
                .to_vec(),
            allowed_headers: vec!["authorization".into(), "content-type".into()],
            max_age_seconds: 600,
        }
    }
}

impl Config {
    pub fn validate(&self, authorized_parties: &[String]) -> Result<(), ConfigError> {
        for (i, o) in self.allowed_origins.iter().enumerate() {
            let ok = (o.starts_with("https://") || o.starts_with("http://"))
                && !o.ends_with('/')
                && HeaderValue::from_str(o).is_ok()
                && !o[o.find("://").map_or(0, |i| i + 3)..].contains('/');
            if !ok {
                return Err(ConfigError::new(
                    format!("cors.allowed_origins[{i}]"),
                    "must be an exact origin such as https://app.example.com (no path, no *)",
                ));
            }
        }
        for (i, m) in self.allowed_methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError::new(
                    format!("cors.allowed_methods[{i}]"),
                    "must be an upper-case HTTP method such as \"GET\"",
                ));
            }
        }
        for (i, h) in self.allowed_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    format!("cors.allowed_headers[{i}]"),
                    "must be a header name",
                ));
            }
        }
        if self.preflight == PreflightMode::Answer
            && self.allowed_origins.is_empty()
            && authorized_parties.is_empty()
        {
            return Err(ConfigError::new(
                "cors.allowed_origins",
                "preflight = \"answer\" needs allowed origins (or clerk.authorized_parties)",
            ));
        }
        Ok(())
    }
}

/// Why an `answer`-mode preflight was refused (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorsError {
    Origin,
    Method,
    Headers,
}

impl CorsError {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::Origin => "cors-origin-not-allowed",
            Self::Method => "cors-method-not-allowed",
            Self::Headers => "cors-headers-not-allowed",
        }
    }
}

/// `[cors]`, compiled once.
pub struct Cors {
    pub mode: PreflightMode,
    origins: Vec<String>,
    methods: Vec<String>,
    /// Lower-case.
    headers: Vec<String>,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
}

/// `true` for a CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
pub(crate) fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl Cors {
    pub fn new(c: &Config, authorized_parties: &[String]) -> Self {
        let origins = if c.allowed_origins.is_empty() {
            authorized_parties.to_vec()
        } else {
            c.allowed_origins.clone()
        };
        let headers: Vec<String> = c
            .allowed_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let value = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""));
        Self {
            mode: c.preflight,
            allow_methods: value(c.allowed_methods.join(", ")),
            allow_headers: value(headers.join(", ")),
            max_age: HeaderValue::from(c.max_age_seconds),
            origins,
            methods: c.allowed_methods.clone(),
            headers,
        }
    }

    /// The request's `Origin` when it is one of the allowed origins.
    fn allowed_origin<'a>(&self, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
        let mut values = headers.get_all(header::ORIGIN).iter();
        let origin = values.next()?;
        if values.next().is_some() {
            return None;
        }
        self.origins
            .iter()
            .any(|o| o.as_bytes() == origin.as_bytes())
            .then_some(origin)
    }

    /// The answer to a preflight in `answer` mode: `204` with the CORS headers, or why not.
    pub fn answer_preflight(&self, headers: &HeaderMap) -> Result<HeaderMap, CorsError> {
        let origin = self.allowed_origin(headers).ok_or(CorsError::Origin)?;
        let method = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| m.to_str().ok())
            .ok_or(CorsError::Method)?;
        if !self.methods.iter().any(|m| m == method) {
            return Err(CorsError::Method);
        }
        for value in headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let list = value.to_str().map_err(|_| CorsError::Headers)?;
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !self.headers.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                    return Err(CorsError::Headers);
                }
            }
        }
        let mut out = HeaderMap::new();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        out.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            self.allow_headers.clone(),
        );
        out.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        out.append(header::VARY, HeaderValue::from_static("Origin"));
        Ok(out)
    }

    /// The `Origin` to echo on an actual (non-preflight) answer in `answer` mode.
    pub fn response_origin(&self, request: &HeaderMap) -> Option<HeaderValue> {
        if self.mode != PreflightMode::Answer {
            return None;
        }
        self.allowed_origin(request).cloned()
    }

    /// Sets the CORS headers of an answer to an allowed origin (replacing the upstream's own:
    /// in `answer` mode clerkgate owns CORS).
    pub fn decorate(origin: HeaderValue, h: &mut HeaderMap) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }

    /// `403` for a refused preflight, or `204` for an allowed one.
    pub fn preflight_status(result: &Result<HeaderMap, CorsError>) -> StatusCode {
        match result {
            Ok(_) => StatusCode::NO_CONTENT,
            Err(_) => StatusCode::FORBIDDEN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn preflight_needs_options_origin_and_request_method() {
        let h = headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "GET"),
        ]);
        assert!(is_preflight(&Method::OPTIONS, &h));
        assert!(!is_preflight(&Method::GET, &h));
        let h = headers(&[("origin", "https://a.example")]);
        assert!(!is_preflight(&Method::OPTIONS, &h), "plain OPTIONS");
    }

    #[test]
    fn answer_checks_origin_method_and_headers_exactly() {
        let cors = Cors::new(
            &Config {
                preflight: PreflightMode::Answer,
                ..Config::default()
            },
            &["https://app.example".into()],
        );
        let pre = |origin: &str, method: &str, hdrs: &str| {
            cors.answer_preflight(&headers(&[
                ("origin", origin),
                ("access-control-request-method", method),
                ("access-control-request-headers", hdrs),
            ]))
        };
        let ok = pre("https://app.example", "PUT", "Authorization, content-type").unwrap();
        assert_eq!(ok["access-control-allow-origin"], "https://app.example");
        assert_eq!(ok["access-control-max-age"], "600");
        assert_eq!(ok["vary"], "Origin");
        assert_eq!(
            pre("https://app.example.evil", "GET", "").unwrap_err(),
            CorsError::Origin
        );
        assert_eq!(
            pre("https://APP.example", "GET", "").unwrap_err(),
            CorsError::Origin
        );
        assert_eq!(
            pre("https://app.example", "TRACE", "").unwrap_err(),
            CorsError::Method
        );
        assert_eq!(
            pre("https://app.example", "GET", "x-user-id").unwrap_err(),
            CorsError::Headers
        );
    }
}
