//! Request header rewriting: `clerkgate::proxy::headers::{strip_reserved, strip_hop_by_hop,
//! strip_token, set_forwarded}`, in the proxy's order, over an arbitrary header block.
//!
//! Input: a flags byte, then `Name: value` lines. A line `reserve: <name>` additionally
//! reserves `<name>` (as `[headers] reserved` would).
//!
//! Checks, against independent models:
//! - after `strip_reserved` no header whose name, lower-cased with `_` read as `-`, is reserved
//!   or starts with `x-clerk-` remains; every other header is kept with its values in order; the
//!   count returned is the number of distinct reserved names that were present;
//! - after `strip_hop_by_hop` no hop-by-hop header and no header named in `Connection` remains
//!   (except `Upgrade` plus `Connection: upgrade` for a kept upgrade), and other headers are
//!   untouched;
//! - after `strip_token` no `Authorization` header remains and no `Cookie` header carries a
//!   `__session*` or `__client_uat*` cookie, reading the bytes as a lenient upstream would;
//! - `set_forwarded` leaves exactly one `X-Forwarded-For` ending in the peer (only the peer
//!   unless trusted), the right proto and host, and no `Forwarded` unless trusted;
//! - at the end, still nothing reserved (besides clerkgate's own `X-Forwarded-*`).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clerkgate::auth::identity::{HeadersConfig, IdentityBuilder};
use clerkgate::auth::token::CookieNames;
use clerkgate::proxy::headers::{set_forwarded, strip_hop_by_hop, strip_reserved, strip_token};
use clerkgate_fuzz::{
    Bytes, cookie_names, entries, fold, header_block, reserved_by_model, token_cookie_by_model,
};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let flags = b.byte();
    let peer_seed = b.u16();
    let mut headers = header_block(b.rest());

    let mut reserved: Vec<String> = IdentityBuilder::new(&HeadersConfig::default())
        .reserved()
        .to_vec();
    for extra in headers.get_all("reserve") {
        if let Ok(name) = extra.to_str() {
            reserved.push(fold(name));
        }
    }
    headers.remove("reserve");
    for name in clerkgate_fuzz::DEFAULT_RESERVED {
        assert!(
            reserved.iter().any(|r| r == name),
            "{name} is not reserved by default"
        );
    }

    // 1. Reserved identity headers.
    let before = entries(&headers);
    let distinct_reserved = headers
        .keys()
        .filter(|n| reserved_by_model(n.as_str(), &reserved))
        .count();
    let removed = strip_reserved(&mut headers, &reserved);
    assert_eq!(removed, distinct_reserved, "count of reserved names");
    assert_nothing_reserved(&headers, &reserved);
    let kept: Vec<_> = before
        .iter()
        .filter(|(n, _)| !reserved_by_model(n, &reserved))
        .cloned()
        .collect();
    assert_eq!(entries(&headers), kept, "a non-reserved header was changed");

    // 2. Hop-by-hop headers.
    let keep_upgrade = flags & 1 != 0;
    let listed: Vec<String> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    // A forwarded WebSocket handshake carries exactly `Upgrade: websocket` afterwards.
    let upgrade_kept = keep_upgrade;
    let before = entries(&headers);
    strip_hop_by_hop(&mut headers, keep_upgrade);
    for name in headers.keys().map(|n| n.as_str()) {
        let hop = HOP_BY_HOP.contains(&name) || listed.iter().any(|l| l == name);
        if hop {
            assert!(
                upgrade_kept && (name == "upgrade" || name == "connection"),
                "hop-by-hop {name} kept: {headers:?}"
            );
        }
    }
    if upgrade_kept {
        let upgrade: Vec<_> = headers.get_all("upgrade").iter().collect();
        assert_eq!(upgrade, ["websocket"]);
        let connection: Vec<_> = headers.get_all("connection").iter().collect();
        assert_eq!(connection, ["upgrade"]);
    }
    let untouched: Vec<_> = before
        .iter()
        .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()) && !listed.contains(n))
        .cloned()
        .collect();
    let after: Vec<_> = entries(&headers)
        .into_iter()
        .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()))
        .collect();
    assert_eq!(after, untouched, "an end-to-end header was changed");

    // 3. The token.
    let cookies = CookieNames::new((flags & 2 != 0).then_some("QvfNY2dr"));
    strip_token(&mut headers, &cookies);
    assert!(!headers.contains_key("authorization"));
    for value in headers.get_all("cookie") {
        for (_, name) in cookie_names(value.as_bytes()) {
            assert!(
                !token_cookie_by_model(name),
                "token cookie {:?} kept in {value:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    // 4. X-Forwarded-*.
    let peer = if flags & 4 != 0 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, peer_seed))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::from(peer_seed) << 8 | 10))
    };
    let https = flags & 8 != 0;
    let trust = flags & 16 != 0;
    let host = (flags & 32 != 0).then(|| HeaderValue::from_static("app.example"));
    let prior_xff = headers
        .get("x-forwarded-for")
        .map(|v| v.as_bytes().to_vec());
    let prior_proto = headers.get("x-forwarded-proto").cloned();
    let prior_host = headers.get("x-forwarded-host").cloned();
    let prior_forwarded = headers.get_all("forwarded").iter().count();
    let peer_value = HeaderValue::from_str(&peer.to_string()).expect("an IP is a header value");
    set_forwarded(&mut headers, &peer_value, https, host.clone(), trust);
    let xff: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let expected_xff = match (prior_xff, trust) {
        (Some(mut prev), true) => {
            prev.extend_from_slice(format!(", {peer}").as_bytes());
            prev
        }
        _ => peer.to_string().into_bytes(),
    };
    assert_eq!(xff, [expected_xff.as_slice()], "x-forwarded-for");
    let proto = if https { "https" } else { "http" };
    match (trust, prior_proto) {
        (true, Some(prior)) => assert_eq!(headers.get("x-forwarded-proto"), Some(&prior)),
        _ => assert_eq!(headers.get("x-forwarded-proto").unwrap(), proto),
    }
    match (trust, prior_host) {
        (true, Some(prior)) => assert_eq!(headers.get("x-forwarded-host"), Some(&prior)),
        _ => assert_eq!(headers.get("x-forwarded-host"), host.as_ref()),
    }
    let forwarded = headers.get_all("forwarded").iter().count();
    // Trusted, every prior element is kept in one value with this hop appended; untrusted,
    // only clerkgate's own headers are left.
    assert_eq!(forwarded, usize::from(trust && prior_forwarded > 0));

    // clerkgate's own X-Forwarded-* values are not client headers, even under a name an
    // operator reserved.
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    ] {
        headers.remove(name);
    }
    // Nor are the `Upgrade: websocket` and `Connection: upgrade` of a forwarded handshake
    // (config validation refuses reserving those names; this target skips validation).
    if upgrade_kept {
        headers.remove("upgrade");
        headers.remove("connection");
    }
    assert_nothing_reserved(&headers, &reserved);
});

fn assert_nothing_reserved(headers: &HeaderMap, reserved: &[String]) {
    for name in headers.keys() {
        assert!(
            !reserved_by_model(name.as_str(), reserved),
            "reserved header {name} survived: {headers:?}"
        );
    }
}
