//! Request and response header rewriting.
//!
//! Order matters and is fixed by the caller ([`crate::proxy::Proxy`]): reserved identity headers
//! are removed from every request first, public routes included (linkerd's
//! `set_identity_header.rs` does the same), and the verified ones are inserted afterwards, so no
//! client-chosen value can survive next to a verified one.
//!
//! Reserved names compare case-insensitively with `_` and `-` treated alike, because some
//! servers (CGI, nginx with `underscores_in_headers`, many frameworks) fold `X_User_Id` into the
//! same variable as `X-User-Id`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::token::CookieNames;

/// Every `x-clerk-*` header is Clerk's own (auth status, forwarded tokens, signatures): a client
/// never gets to set one.
const CLERK_PREFIX: &[u8] = b"x-clerk-";

/// Byte-wise equality with ASCII case folded and `_` treated as `-`. `reserved` is already in
/// that normal form.
fn eq_normalised(name: &[u8], reserved: &[u8]) -> bool {
    name.len() == reserved.len() && name.iter().zip(reserved).all(|(a, b)| fold(*a) == *b)
}

fn fold(b: u8) -> u8 {
    if b == b'_' {
        b'-'
    } else {
        b.to_ascii_lowercase()
    }
}

/// Whether `name` is a reserved identity header.
pub fn is_reserved(name: &str, reserved: &[String]) -> bool {
    let bytes = name.as_bytes();
    (bytes.len() >= CLERK_PREFIX.len()
        && bytes[..CLERK_PREFIX.len()]
            .iter()
            .zip(CLERK_PREFIX)
            .all(|(a, b)| fold(*a) == *b))
        || reserved.iter().any(|r| eq_normalised(bytes, r.as_bytes()))
}

/// Removes every reserved header; returns how many header names were present. Allocation-free
/// unless something has to be removed.
pub fn strip_reserved(headers: &mut HeaderMap, reserved: &[String]) -> usize {
    if !headers.keys().any(|n| is_reserved(n.as_str(), reserved)) {
        return 0;
    }
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_reserved(n.as_str(), reserved))
        .cloned()
        .collect();
    for name in &found {
        headers.remove(name);
    }
    found.len()
}

/// Headers that apply to one connection only (RFC 9110 section 7.6.1), plus the obsolete
/// `Proxy-Connection` and the proxy credentials that are meant for us, not the next hop.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`. With `keep_upgrade`
/// (a WebSocket handshake being forwarded) `Upgrade` and `Connection: upgrade` are kept.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests and responses carry none: one pass over the names (standard names compare
    // as integers) instead of a hashed removal per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(&name);
    }
    let upgrade = if keep_upgrade {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a request asks for a protocol upgrade (WebSocket).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the token from the request: `Authorization` and the session cookies. Other cookies
/// are kept byte for byte, including values that are not ASCII.
pub fn strip_token(headers: &mut HeaderMap, cookies: &CookieNames) {
    headers.remove(header::AUTHORIZATION);
    if !headers.contains_key(header::COOKIE) {
        return;
    }
    let is_token = |pair: &[u8]| {
        let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
        cookies.is_token_cookie_name(name)
    };
    let carries_token = headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| v.as_bytes().split(|b| *b == b';').any(is_token));
    if !carries_token {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        for pair in value
            .as_bytes()
            .split(|b| *b == b';')
            .map(<[u8]>::trim_ascii)
        {
            if pair.is_empty() || is_token(pair) {
                continue;
            }
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(pair);
        }
    }
    headers.remove(header::COOKIE);
    if !joined.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(&joined)
    {
        headers.insert(header::COOKIE, v);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For/Proto/Host`. With `trust` (clerkgate behind a load balancer that sets
/// them) existing values are kept and the peer is appended; otherwise client-sent values, and
/// `Forwarded`, are replaced, since anyone can send them.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    https: bool,
    host: Option<HeaderValue>,
    trust: bool,
) {
    let xff = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) if trust => {
            let mut joined = Vec::with_capacity(prev.len() + 2 + peer.len());
            joined.extend_from_slice(prev);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
        _ => Some(peer.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !trust || !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if https { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !trust || !headers.contains_key(&X_FORWARDED_HOST) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST.clone(), h);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
    if !trust {
        headers.remove(header::FORWARDED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn reserved() -> Vec<String> {
        vec!["x-user-id".into(), "x-org-id".into()]
    }

    #[test]
    fn reserved_names_match_in_every_spelling() {
        for name in [
            "x-user-id",
            "X-USER-ID",
            "x_user_id",
            "X_User-Id",
            "x-clerk-auth-status",
            "X_CLERK_ANYTHING",
        ] {
            assert!(is_reserved(name, &reserved()), "{name}");
        }
        for name in ["x-user-idx", "x-user", "user-id", "x-clerkgate", "accept"] {
            assert!(!is_reserved(name, &reserved()), "{name}");
        }
    }

    #[test]
    fn strip_reserved_removes_duplicates_and_variants() {
        let mut h = map(&[
            ("x-user-id", "a"),
            ("x-user-id", "b"),
            ("x_user_id", "c"),
            ("x-clerk-auth-token", "d"),
            ("accept", "*/*"),
        ]);
        assert_eq!(strip_reserved(&mut h, &reserved()), 3);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
        let mut clean = map(&[("accept", "*/*")]);
        assert_eq!(strip_reserved(&mut clean, &reserved()), 0);
    }

    #[test]
    fn hop_by_hop_headers_go_including_connection_listed_ones() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["accept"]
        );
        let mut ws = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&ws));
        strip_hop_by_hop(&mut ws, true);
        assert_eq!(ws.get("upgrade").unwrap(), "websocket");
        assert_eq!(ws.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn token_cookies_are_removed_and_others_kept() {
        let names = CookieNames::new(Some("abc"));
        let mut h = map(&[
            ("authorization", "Bearer t"),
            ("cookie", "theme=dark; __session=t; __client_uat=1"),
            ("cookie", "__session_abc=t2; lang=en"),
        ]);
        strip_token(&mut h, &names);
        assert!(!h.contains_key("authorization"));
        assert_eq!(h.get("cookie").unwrap(), "theme=dark; lang=en");
        let mut only = map(&[("cookie", "__session=t")]);
        strip_token(&mut only, &names);
        assert!(!only.contains_key("cookie"));
    }

    #[test]
    fn token_cookies_next_to_non_ascii_values_are_removed_too() {
        let names = CookieNames::new(None);
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_bytes(b"name=Ren\xc3\xa9e; __session=t; __client_uat=1; raw=\xff")
                .unwrap(),
        );
        strip_token(&mut h, &names);
        assert_eq!(
            h.get("cookie").unwrap().as_bytes(),
            b"name=Ren\xc3\xa9e; raw=\xff",
            "the token goes, the other bytes stay as they were"
        );
    }

    #[test]
    fn forwarded_headers_are_replaced_unless_trusted() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=1.2.3.4")]);
        set_forwarded(
            &mut h,
            &ip,
            false,
            Some(HeaderValue::from_static("app.example")),
            false,
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "app.example");
        assert!(!h.contains_key("forwarded"));
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(&mut h, &ip, false, None, true);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.2.3.4, 10.0.0.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }
}
