//! Helpers shared by the fuzz targets: turning fuzz input into requests, and the independent
//! models ("oracles") the targets check clerkgate's answers against.
//!
//! The models are written from the documented rules, not from clerkgate's code, so a target
//! fails when the two disagree.

use http::{HeaderMap, HeaderName, HeaderValue};

/// A header block: one `Name: value` per line (`\n`, an optional `\r` before it is dropped).
/// Lines whose name or value `http` refuses are skipped, as hyper would have refused the
/// request. Values are raw bytes, so obs-text (0x80-0xFF) reaches clerkgate as it does from a
/// socket.
pub fn header_block(bytes: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in bytes.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = trim_ascii(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    headers
}

pub fn trim_ascii(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// Every entry of a header map, owned, sorted by name: a `HeaderMap` keeps the order of one
/// name's values (kept here, the sort is stable) but not the order between names.
pub fn entries(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<_> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The comparison form of a header name: ASCII lower case, `_` read as `-` (how CGI, nginx with
/// `underscores_in_headers` and many frameworks fold names).
pub fn fold(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// The identity header names clerkgate reserves with the default `[headers]` section, in the
/// comparison form. `x-clerk-*` is reserved as a prefix on top of these.
pub const DEFAULT_RESERVED: &[&str] = &[
    "x-user-id",
    "x-session-id",
    "x-org-id",
    "x-org-role",
    "x-org-slug",
    "x-org-permissions",
    "x-actor-id",
    "x-clerk-claims",
];

/// Whether a client header must never reach the upstream: its folded name is reserved, or
/// starts with `x-clerk-`.
pub fn reserved_by_model(name: &str, reserved: &[String]) -> bool {
    let folded = fold(name);
    folded.starts_with("x-clerk-") || reserved.iter().any(|r| *r == folded)
}

/// Whether a cookie name carries the session token or its freshness marker, from the cookie
/// names Clerk documents: `__session`, `__client_uat` and their `_<suffix>` forms.
pub fn token_cookie_by_model(name: &[u8]) -> bool {
    name == b"__session"
        || name == b"__client_uat"
        || name.starts_with(b"__session_")
        || name.starts_with(b"__client_uat_")
}

/// The cookie names in a `Cookie` header value, read byte-wise the way a lenient upstream
/// parser does (split on `;`, trim, name before `=`, trimmed again as Go's and Node's parsers
/// do), whatever the bytes are: `(name as sent, trimmed name)`.
pub fn cookie_names(value: &[u8]) -> Vec<(&[u8], &[u8])> {
    value
        .split(|b| *b == b';')
        .map(trim_ascii)
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|b| *b == b'=') {
            Some(i) => (&p[..i], trim_ascii(&p[..i])),
            None => (p, p),
        })
        .collect()
}

/// A small cursor over fuzz bytes for the few choices a target makes beyond its text input.
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}
