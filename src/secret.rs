//! Secrets: a type that cannot leak, and the rule for where a secret may be sent. A leaf module:
//! the sections that hold secrets (`clerk`, `webhooks`, `local_api`, `machine`) import it, not
//! the composed configuration.

use serde::{Deserialize, Serialize};

/// A secret value: redacted in `Debug` and when serialised, readable only through `expose()`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The one way to read the value. Call it where the secret leaves the process (an
    /// `Authorization` header) or is parsed, and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// `true` when `url` may be used for calls carrying secrets or fetching keys: https anywhere,
/// or plain http to a loopback address (local fakes and `clerkgate dev`).
pub fn is_secure_or_loopback(url: &url::Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        },
        _ => false,
    }
}
