//! Inputs the fuzz targets (and these properties) found, kept as tests. A finding whose fix is
//! still pending is `#[ignore = "BUG: ..."]`: run them with `cargo test --test properties --
//! --ignored`; remove the `ignore` with the fix.

use clerkgate::auth::token::CookieNames;
use clerkgate::proxy::headers::strip_token;
use http::{HeaderMap, HeaderValue};

/// The cookie names in a `Cookie` value as a lenient upstream reads them: split on `;`, trim,
/// the name before `=` trimmed, whatever the bytes are.
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

fn token_cookies_left(cookie_values: &[&[u8]]) -> Vec<String> {
    let mut headers = HeaderMap::new();
    for v in cookie_values {
        headers.append(
            "cookie",
            HeaderValue::from_bytes(v).expect("valid header value"),
        );
    }
    strip_token(&mut headers, &CookieNames::new(None));
    headers
        .get_all("cookie")
        .iter()
        .flat_map(|v| cookie_names(v.as_bytes()))
        .filter(|n| n.starts_with(b"__session") || n.starts_with(b"__client_uat"))
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .collect()
}

#[test]
fn token_cookies_are_stripped_from_ordinary_cookie_headers() {
    assert!(token_cookies_left(&[b"a=1; __session=t.o.k; __client_uat=5"]).is_empty());
}
