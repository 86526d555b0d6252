//! Inputs the fuzz targets (and these properties) found, kept as tests. A finding whose fix is
//! still pending is `#[ignore = "BUG: ..."]` (run with `cargo test --test it properties --
//! --ignored`) and skipped in its fuzz target behind a `KNOWN BUG` comment; both go with the
//! fix. None is pending now: the three `strip_token` findings below were fixed in 5fc00c2 and
//! b127767 while this suite was being written.
//!
//! The raw crash input is `fuzz/regressions/headers/non-ascii-cookie-keeps-token`, which
//! `.ci/fuzz` replays on every run.

use clerkgate::auth::token::CookieNames;
use clerkgate::proxy::headers::strip_token;
use http::{HeaderMap, HeaderValue};

use super::requests::Gate;

/// The cookie names in a `Cookie` value as a lenient upstream reads them (Go's net/http and
/// Node's `cookie` both split on `;` and trim the name), whatever the bytes are.
fn cookie_names(value: &[u8]) -> Vec<Vec<u8>> {
    value
        .split(|b| *b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|b| *b == b'=') {
            Some(i) => p[..i].trim_ascii().to_vec(),
            None => p.to_vec(),
        })
        .collect()
}

fn is_token_cookie(name: &[u8]) -> bool {
    name == b"__session"
        || name == b"__client_uat"
        || name.starts_with(b"__session_")
        || name.starts_with(b"__client_uat_")
}

/// The token cookies still in `headers` after `strip_token`.
fn token_cookies_left(cookie_values: &[&[u8]]) -> Vec<String> {
    let mut headers = HeaderMap::new();
    for v in cookie_values {
        headers.append(
            "cookie",
            HeaderValue::from_bytes(v).expect("valid header value"),
        );
    }
    strip_token(&mut headers, &CookieNames::new(Some("QvfNY2dr")));
    headers
        .get_all("cookie")
        .iter()
        .flat_map(|v| cookie_names(v.as_bytes()))
        .filter(|n| is_token_cookie(n))
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .collect()
}

#[test]
fn token_cookies_are_stripped_from_ordinary_cookie_headers() {
    assert!(token_cookies_left(&[b"a=1; __session=t.o.k; __client_uat=5"]).is_empty());
    assert!(
        token_cookies_left(&[b"__session_QvfNY2dr=t", b"lang=en; __client_uat_x=1"]).is_empty()
    );
}

/// Found by the `headers` target: `strip_token` used to skip a `Cookie` value with any
/// obs-text byte (0x80-0xFF, which hyper accepts), `__session` included; fixed in 5fc00c2 while
/// this suite was written. Kept as a regression.
#[test]
fn a_non_ascii_byte_in_the_cookie_header_does_not_keep_the_token_cookie() {
    assert_eq!(
        token_cookies_left(&[b"__session=t.o.k; theme=caf\xe9"]),
        Vec::<String>::new()
    );
}

/// The `headers` target's crash input, still failing after 5fc00c2: a cookie name that starts
/// with `__session_` but is not UTF-8 is not recognised as a token cookie (the name check
/// needs `str`), so `__session_<obs-text>=<token>` reaches the upstream.
#[test]
fn a_non_utf8_session_cookie_name_is_still_a_token_cookie() {
    assert_eq!(
        token_cookies_left(&[b"__session_Q\xb5\xb5vft=t.o.k"]),
        Vec::<String>::new()
    );
    assert_eq!(
        token_cookies_left(&[b"__session_Q\xb5\xb5vft"]),
        Vec::<String>::new(),
        "the fuzzer's input"
    );
}

/// Found while writing the model for the `headers` target: `strip_token` compares the cookie
/// name before `=` without trimming it, so `__session =<token>` is kept, while Go's net/http
/// and Node's `cookie` read that pair as `__session`.
#[test]
fn whitespace_before_the_equals_sign_does_not_keep_the_token_cookie() {
    assert_eq!(
        token_cookies_left(&[b"a=1; __session =t.o.k; __client_uat\t=5"]),
        Vec::<String>::new()
    );
}

/// The first finding end to end: a valid bearer token on a required route, plus a `Cookie`
/// header carrying the same token next to one obs-text byte. The upstream must not receive the
/// token (forward_token defaults to false).
#[test]
fn the_upstream_never_receives_the_session_cookie() {
    let gate = Gate::start("");
    let token = gate.clerk.session_token("user_regression");
    let (status, body) = gate.send_bytes(
        "/orders/1",
        &[
            (
                "Authorization".into(),
                format!("Bearer {token}").into_bytes(),
            ),
            (
                "Cookie".into(),
                [format!("__session={token}; theme=caf").as_bytes(), b"\xe9"].concat(),
            ),
        ],
    );
    assert_eq!(status, 200, "{body}");
    let seen = gate.upstream.last().headers;
    assert!(seen.get("authorization").is_none());
    for value in seen.get_all("cookie") {
        assert!(
            !value
                .as_bytes()
                .windows(token.len())
                .any(|w| w == token.as_bytes()),
            "the session token reached the upstream in {value:?}"
        );
    }
}
