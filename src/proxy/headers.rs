//! Request and response header rewriting.
//!
//! Order matters and is fixed by the caller (the proxy): reserved identity headers
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
/// `Proxy-Connection`, the proxy credentials that are meant for us, not the next hop, and
/// `HTTP2-Settings`, the connection-specific companion of an `h2c` upgrade (RFC 7540
/// section 3.2.1), which is never forwarded.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers, including those named in `Connection`. With `websocket` (a
/// WebSocket handshake being forwarded, see [`is_websocket_upgrade`]) the request then carries
/// exactly `Upgrade: websocket` and `Connection: upgrade`; any other upgrade never leaves here.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, websocket: bool) {
    // Most requests and responses carry none: one pass over the names (standard names compare
    // as integers) instead of a hashed removal per hop-by-hop name.
    if !websocket && !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(&name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if websocket {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether the comma-separated tokens of every `name` header, taken together, are exactly one
/// token equal to `token` (ASCII case-insensitive).
fn only_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    let mut seen = false;
    for value in headers.get_all(name) {
        let Ok(value) = value.to_str() else {
            return false;
        };
        for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if seen || !t.eq_ignore_ascii_case(token) {
                return false;
            }
            seen = true;
        }
    }
    seen
}

/// Whether the request's `TE` lists `trailers` (the one TE an HTTP/2 request may carry, RFC 9113
/// section 8.2.2; gRPC clients send it).
pub fn te_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Whether a request is a WebSocket opening handshake (RFC 6455 section 4.1): `Connection`
/// lists `upgrade` and `Upgrade` is exactly `websocket`. The caller also requires `GET` over
/// HTTP/1.1. Every other upgrade (`h2c`, `TLS/1.x`, anything unknown) would turn the connection
/// into a tunnel that skips verification for every request after it, so it is never forwarded.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && only_token(headers, &header::UPGRADE, "websocket")
}

/// Whether an upstream's `101 Switching Protocols` switched to WebSocket and nothing else.
pub fn switched_to_websocket(headers: &HeaderMap) -> bool {
    only_token(headers, &header::UPGRADE, "websocket")
}

/// Whether `name` equals one of `list` (each already lower-case with `_` as `-`), compared
/// case-insensitively with `_` and `-` alike.
fn in_normalised(name: &HeaderName, list: &[String]) -> bool {
    let bytes = name.as_str().as_bytes();
    list.iter().any(|r| eq_normalised(bytes, r.as_bytes()))
}

/// Removes every header named in `list` (normalised names, see [`in_normalised`]); returns how
/// many names were present. Allocation-free unless something has to be removed.
pub fn strip_listed(headers: &mut HeaderMap, list: &[String]) -> usize {
    if list.is_empty() || !headers.keys().any(|n| in_normalised(n, list)) {
        return 0;
    }
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|n| in_normalised(n, list))
        .cloned()
        .collect();
    for name in &found {
        headers.remove(name);
    }
    found.len()
}

/// Client-IP headers other than `X-Forwarded-*` that frameworks and log pipelines read as the
/// client's address (nginx `real_ip`, Cloudflare, Akamai, Fastly, Rails, Django middleware).
/// Without `proxy.trust_forwarded_headers` a client must not choose them: `X-Real-IP` is set to
/// the peer, the rest are removed. Normalised form (lower-case, `-`).
const CLIENT_IP: &[&str] = &[
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "client-ip",
    "x-forwarded",
    "forwarded-for",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "forwarded",
];

/// Whether a (normalised) name belongs to the forwarding family a client may not set when the
/// peer is not trusted: every `x-forwarded-*` (for, proto, host, port, ssl, scheme, server, ...)
/// and the client-IP headers above, in every spelling (`X_Real_IP` reaches PHP and CGI
/// applications as the same variable as `X-Real-IP`).
fn is_forwarding(name: &HeaderName) -> bool {
    const PREFIX: &[u8] = b"x-forwarded-";
    let bytes = name.as_str().as_bytes();
    (bytes.len() > PREFIX.len()
        && bytes[..PREFIX.len()]
            .iter()
            .zip(PREFIX)
            .all(|(a, b)| fold(*a) == *b))
        || CLIENT_IP.iter().any(|r| eq_normalised(bytes, r.as_bytes()))
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
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Sets `X-Forwarded-For/Proto/Host` and `X-Real-IP`. With `trust` (clerkgate behind a load
/// balancer that sets them) existing values are kept, the peer is appended to
/// `X-Forwarded-For` and `Forwarded` (RFC 7239 section 4: one element per hop); otherwise every
/// client-sent forwarding header, in every spelling (see [`is_forwarding`]), is removed first,
/// since anyone can send them, and only clerkgate's own values reach the upstream.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    https: bool,
    host: Option<HeaderValue>,
    trust: bool,
) {
    if !trust && headers.keys().any(is_forwarding) {
        let found: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_forwarding(n))
            .cloned()
            .collect();
        for name in &found {
            headers.remove(name);
        }
    }
    if trust && headers.contains_key(header::FORWARDED) {
        // Every prior element, in order (several lines are one list, RFC 9110 section 5.3),
        // then this hop. `for=` takes a node: an IPv6 address is quoted and bracketed (RFC 7239
        // section 6).
        let ip = peer.as_bytes();
        let mut joined = Vec::with_capacity(64);
        for (i, prev) in headers.get_all(header::FORWARDED).iter().enumerate() {
            if i > 0 {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(prev.as_bytes());
        }
        joined.extend_from_slice(b", for=");
        if ip.contains(&b':') {
            joined.extend_from_slice(b"\"[");
            joined.extend_from_slice(ip);
            joined.extend_from_slice(b"]\"");
        } else {
            joined.extend_from_slice(ip);
        }
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            headers.insert(header::FORWARDED, v);
        }
    }
    if !trust || !headers.contains_key(&X_REAL_IP) {
        headers.insert(X_REAL_IP.clone(), peer.clone());
    }
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
        let mut ws = map(&[("connection", "Upgrade"), ("upgrade", "WebSocket")]);
        assert!(is_websocket_upgrade(&ws));
        strip_hop_by_hop(&mut ws, true);
        assert_eq!(ws.get("upgrade").unwrap(), "websocket");
        assert_eq!(ws.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn only_a_websocket_upgrade_is_one() {
        for (connection, upgrade) in [
            ("Upgrade", "websocket"),
            ("keep-alive, upgrade", "WEBSOCKET"),
            ("upgrade", " websocket "),
        ] {
            let h = map(&[("connection", connection), ("upgrade", upgrade)]);
            assert!(is_websocket_upgrade(&h), "{connection} / {upgrade}");
        }
        for (connection, upgrade) in [
            ("Upgrade, HTTP2-Settings", "h2c"),
            ("upgrade", "TLS/1.2"),
            ("upgrade", "websocket, h2c"),
            ("upgrade", "h2c, websocket"),
            ("upgrade", "websocket/13"),
            ("upgrade", ""),
            ("keep-alive", "websocket"),
        ] {
            let h = map(&[("connection", connection), ("upgrade", upgrade)]);
            assert!(!is_websocket_upgrade(&h), "{connection} / {upgrade}");
        }
        let two = map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
        ]);
        assert!(!is_websocket_upgrade(&two), "a second Upgrade line");
        assert!(!is_websocket_upgrade(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn a_websocket_handshake_carries_exactly_its_upgrade_even_from_a_bare_map() {
        // Found by the headers fuzz target: the no-hop-by-hop fast path returned early.
        let mut h = map(&[("accept", "*/*")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn an_h2c_upgrade_loses_upgrade_settings_and_connection() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["accept"]
        );
        // Not listed in Connection: still connection-specific, still removed.
        let mut h = map(&[("http2-settings", "AAMAAABk"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("http2-settings"));
    }

    #[test]
    fn listed_headers_go_in_every_spelling() {
        let list: Vec<String> = crate::auth::identity::DEFAULT_STRIP_REQUEST
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut h = map(&[
            ("x-original-url", "/admin"),
            ("X_Rewrite_URL", "/admin"),
            ("x-forwarded-prefix", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-forwarded-for", "1.2.3.4"),
            ("accept", "*/*"),
        ]);
        assert_eq!(strip_listed(&mut h, &list), 4);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, vec!["accept", "x-forwarded-for"]);
        assert_eq!(strip_listed(&mut h, &[]), 0);
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
        assert_eq!(h.get("x-real-ip").unwrap(), "10.0.0.9");
        assert!(!h.contains_key("forwarded"));
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(&mut h, &ip, false, None, true);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.2.3.4, 10.0.0.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }

    #[test]
    fn untrusted_client_ip_headers_go_in_every_spelling() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let mut h = map(&[
            ("x-real-ip", "1.1.1.1"),
            ("X_Real_IP", "1.1.1.2"),
            ("true-client-ip", "1.1.1.3"),
            ("x-client-ip", "1.1.1.4"),
            ("cf-connecting-ip", "1.1.1.5"),
            ("X_Forwarded_For", "1.1.1.6"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-ssl", "on"),
            ("forwarded", "for=1.1.1.7"),
            ("accept", "*/*"),
        ]);
        set_forwarded(&mut h, &ip, false, None, false);
        let mut left: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                "accept=*/*",
                "x-forwarded-for=10.0.0.9",
                "x-forwarded-proto=http",
                "x-real-ip=10.0.0.9",
            ]
        );
    }

    #[test]
    fn trusted_forwarded_gets_this_hop_appended() {
        let mut h = map(&[("forwarded", "for=203.0.113.7;proto=https")]);
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("10.0.0.9"),
            false,
            None,
            true,
        );
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=203.0.113.7;proto=https, for=10.0.0.9"
        );
        let mut h = map(&[
            ("forwarded", "for=203.0.113.7"),
            ("x-real-ip", "203.0.113.7"),
        ]);
        set_forwarded(&mut h, &HeaderValue::from_static("::1"), false, None, true);
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=203.0.113.7, for=\"[::1]\""
        );
        assert_eq!(
            h.get("x-real-ip").unwrap(),
            "203.0.113.7",
            "kept when trusted"
        );
        let mut h = map(&[("forwarded", "for=a"), ("forwarded", "for=b")]);
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("10.0.0.9"),
            false,
            None,
            true,
        );
        let all: Vec<_> = h.get_all("forwarded").iter().collect();
        assert_eq!(all, ["for=a, for=b, for=10.0.0.9"], "every prior line kept");
    }
}
