//! A request as `@clerk/backend`'s `AuthenticateContext` sees it: which cookies count
//! (`usesSuffixedCookies`), `__client_uat` as `parseInt`, the dev-browser token, the handshake
//! artefacts, the redirect-loop counter, and the public URL (`deriveUrlFromHeaders`).

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::{HeaderMap, Method, header};
use serde::Deserialize;

use super::names;

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Cookie names for one instance, computed once.
pub(crate) struct Names {
    /// The Frontend API host (`tokenBelongsToInstance` compares issuers with it).
    frontend_api: String,
    session_suffixed: String,
    client_uat_suffixed: String,
    refresh_suffixed: String,
    dev_browser_suffixed: String,
}

impl Names {
    pub(crate) fn new(suffix: Option<&str>, frontend_api: &str) -> Self {
        // Without a publishable key there is no suffix; the SDK would then look up
        // `__session_` (an empty suffix), which no browser has.
        let s = suffix.unwrap_or("");
        Self {
            frontend_api: frontend_api.to_owned(),
            session_suffixed: format!("{}_{s}", names::SESSION),
            client_uat_suffixed: format!("{}_{s}", names::CLIENT_UAT),
            refresh_suffixed: format!("{}_{s}", names::REFRESH),
            dev_browser_suffixed: format!("{}_{s}", names::DEV_BROWSER),
        }
    }
}

/// Longest token [`peek`] decodes.
const PEEK_MAX_BYTES: usize = 16 * 1024;

/// The unverified claims the SDK reads before verification.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Peek {
    #[serde(default, deserialize_with = "lenient_string")]
    pub iss: Option<String>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub iat: Option<f64>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub exp: Option<f64>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub sid: Option<String>,
}

fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

fn lenient_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?.as_f64())
}

/// `decodeJwt` without verification: three segments, a JSON header and payload.
pub(crate) fn peek(token: &str) -> Option<Peek> {
    // Clerk's tokens fit a 4 KB cookie; anything near the default `auth.max_token_bytes` is not
    // worth decoding for a heuristic.
    if token.len() > PEEK_MAX_BYTES {
        return None;
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let header = B64URL.decode(h).ok()?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&header).ok()?;
    if !header.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    let payload = B64URL.decode(p).ok()?;
    if !payload.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    serde_json::from_slice(&payload).ok()
}

/// `Number.parseInt(v) || 0`.
fn parse_int(v: &str) -> i64 {
    let t = v.trim_start();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    let n: i64 = digits[..end].parse().unwrap_or(0);
    if neg { -n } else { n }
}

/// `Number(v) || 0` for the redirect counter.
fn parse_number(v: &str) -> f64 {
    let t = v.trim();
    if t.is_empty() {
        return 0.0;
    }
    match t.parse::<f64>() {
        Ok(n) if n.is_finite() => n,
        _ => 0.0,
    }
}

/// A number as JavaScript prints it (integers without a fraction).
pub(crate) fn js_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e21 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Header-safe text for an error code taken from a Backend API answer.
pub(crate) fn is_reason_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The cookies of a request the way the `cookie` package parses them: first occurrence
/// wins, surrounding quotes removed.
struct Jar<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Jar<'a> {
    fn new(headers: &'a HeaderMap) -> Self {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for value in headers.get_all(header::COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            for pair in text.split(';') {
                let Some((k, v)) = pair.split_once('=') else {
                    continue;
                };
                let k = k.trim();
                let mut v = v.trim();
                if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                    v = &v[1..v.len() - 1];
                }
                if !k.is_empty() && !pairs.iter().any(|(n, _)| *n == k) {
                    pairs.push((k, v));
                }
            }
        }
        Self { pairs }
    }

    /// `getCookie(name) || undefined`: an empty value counts as absent.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_empty())
    }
}

/// The first value of a query parameter, decoded (`searchParams.get`).
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// One request, as the SDK reads it.
pub(crate) struct View<'a> {
    /// GET, and `Sec-Fetch-Dest: document|iframe` or no `Sec-Fetch-Dest` and an `Accept`
    /// starting `text/html` (`isRequestEligibleForHandshake`).
    pub eligible: bool,
    pub sec_fetch_dest: Option<&'a str>,
    pub referrer: Option<&'a str>,
    pub header_token: Option<&'a str>,
    pub session: Option<&'a str>,
    pub client_uat: i64,
    pub refresh: Option<&'a str>,
    pub dev_browser: Option<Cow<'a, str>>,
    pub dev_browser_in_query: bool,
    pub handshake_nonce: Option<Cow<'a, str>>,
    pub redirect_count: f64,
    pub suffixed: bool,
}

fn header(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// `isRequestEligibleForHandshake`: a page load.
pub(crate) fn is_navigation(method: &Method, headers: &HeaderMap) -> bool {
    if method != Method::GET {
        return false;
    }
    match header(headers, "sec-fetch-dest") {
        Some(dest) => dest == "document" || dest == "iframe",
        None => header(headers, header::ACCEPT).is_some_and(|a| a.starts_with("text/html")),
    }
}

impl<'a> View<'a> {
    pub(crate) fn new(parts: &'a http::request::Parts, names: &Names, development: bool) -> Self {
        let h = &parts.headers;
        let jar = Jar::new(h);
        let query = parts.uri.query();
        let suffixed = uses_suffixed_cookies(&jar, names, development);
        let pick = |plain: &str, suffixed_name: &str| {
            if suffixed {
                jar.get(suffixed_name)
            } else {
                jar.get(plain)
            }
        };
        let db_query = query_param(query, names::DEV_BROWSER);
        let header_token = header(h, header::AUTHORIZATION).and_then(|a| {
            let mut it = a.split(' ');
            let scheme = it.next().unwrap_or("");
            match it.next() {
                None | Some("") => Some(scheme),
                Some(t) if scheme == "Bearer" => Some(t),
                Some(_) => None,
            }
        });
        Self {
            eligible: is_navigation(&parts.method, h),
            sec_fetch_dest: header(h, "sec-fetch-dest"),
            referrer: header(h, header::REFERER),
            header_token,
            session: pick(names::SESSION, &names.session_suffixed),
            client_uat: pick(names::CLIENT_UAT, &names.client_uat_suffixed)
                .map(parse_int)
                .unwrap_or(0),
            refresh: jar.get(&names.refresh_suffixed),
            dev_browser_in_query: db_query.is_some(),
            dev_browser: db_query.filter(|v| !v.is_empty()).or_else(|| {
                pick(names::DEV_BROWSER, &names.dev_browser_suffixed).map(Cow::Borrowed)
            }),
            handshake_nonce: query_param(query, names::HANDSHAKE_NONCE)
                .filter(|v| !v.is_empty())
                .or_else(|| jar.get(names::HANDSHAKE_NONCE).map(Cow::Borrowed)),
            redirect_count: jar
                .get(names::REDIRECT_COUNT)
                .map(parse_number)
                .unwrap_or(0.0),
            suffixed,
        }
    }
}

/// `usesSuffixedCookies()`.
fn uses_suffixed_cookies(jar: &Jar<'_>, names: &Names, development: bool) -> bool {
    let suffixed_uat = jar.get(&names.client_uat_suffixed);
    let uat = jar.get(names::CLIENT_UAT);
    let suffixed_session = jar.get(&names.session_suffixed);
    let session = jar.get(names::SESSION);
    let session_peek = session.and_then(peek);
    if session.is_some() {
        let Some(iss) = session_peek.as_ref().and_then(|p| p.iss.as_deref()) else {
            // No issuer (or undecodable).
            return false;
        };
        if !issuer_is_instance(iss, &names.frontend_api) {
            return true;
        }
    }
    if suffixed_uat.is_none() && suffixed_session.is_none() {
        return false;
    }
    let session_iat = session_peek.as_ref().and_then(|p| p.iat).unwrap_or(0.0);
    let suffixed_peek = suffixed_session.and_then(peek);
    let suffixed_iat = suffixed_peek.as_ref().and_then(|p| p.iat).unwrap_or(0.0);
    if suffixed_uat != Some("0") && uat != Some("0") && session_iat > suffixed_iat {
        return false;
    }
    if suffixed_uat == Some("0") && uat != Some("0") {
        return false;
    }
    if development {
        let now = (crate::auth::now_ms() / 1000) as f64;
        let expired = suffixed_peek
            .as_ref()
            .is_some_and(|p| p.exp.is_some_and(|exp| exp <= now));
        if suffixed_uat != Some("0") && uat == Some("0") && expired {
            return false;
        }
    }
    if suffixed_uat.is_none() && suffixed_session.is_some() {
        return false;
    }
    true
}

/// `tokenBelongsToInstance`: the issuer with every `http(s)://` removed is the Frontend API.
fn issuer_is_instance(iss: &str, fapi: &str) -> bool {
    let lower = iss.to_ascii_lowercase();
    let mut stripped = String::with_capacity(iss.len());
    let mut i = 0;
    while i < iss.len() {
        if lower[i..].starts_with("https://") {
            i += 8;
        } else if lower[i..].starts_with("http://") {
            i += 7;
        } else {
            let c = iss[i..].chars().next().unwrap_or(' ');
            stripped.push(c);
            i += c.len_utf8();
        }
    }
    stripped == fapi
}

/// The public URL of the request (`deriveUrlFromHeaders`): `X-Forwarded-Proto`/`-Host`
/// (first values) only when they are trusted, else the connection's scheme and `Host`.
pub(crate) fn public_url(
    parts: &http::request::Parts,
    tls: bool,
    trust_forwarded: bool,
) -> Option<url::Url> {
    let h = &parts.headers;
    let first = |name: &str| header(h, name).map(|v| v.split(',').next().unwrap_or("").trim());
    let forwarded_host = trust_forwarded.then(|| first("x-forwarded-host")).flatten();
    let forwarded_proto = trust_forwarded
        .then(|| first("x-forwarded-proto"))
        .flatten();
    let host = forwarded_host
        .or_else(|| header(h, header::HOST))
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))?;
    let proto = forwarded_proto.unwrap_or(if tls { "https" } else { "http" });
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    url::Url::parse(&format!("{proto}://{host}{pq}"))
        .ok()
        .filter(|u| u.has_host())
}

/// `searchParams.delete(...)` for each name: the query is re-serialised (and dropped when
/// empty), as URLSearchParams does.
pub(crate) fn remove_query_params(url: &mut url::Url, remove: &[&str]) {
    if url.query().is_none() {
        return;
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !remove.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
}

/// `isKnownClerkReferrer`: the Frontend API host, the development account portals (non
/// production), or the instance's accounts portal.
pub(crate) fn is_known_clerk_referrer(
    referrer: &url::Url,
    frontend_api: &str,
    development: bool,
) -> bool {
    let host = referrer.host_str().unwrap_or("");
    if host == frontend_api {
        return true;
    }
    if development {
        let legacy = [".lcl.dev", ".lclstage.dev", ".lclclerk.com"]
            .iter()
            .any(|s| host.starts_with("accounts.") && host.ends_with(s));
        let current = [
            ".accounts.dev",
            ".accountsstage.dev",
            ".accounts.lclclerk.com",
        ]
        .iter()
        .any(|s| host.ends_with(s) && !host.ends_with(&format!(".clerk{s}")));
        if legacy || current {
            return true;
        }
    }
    // buildAccountsBaseUrl: clerk.accountsstage. -> accountsstage., else the first
    // clerk.accounts. or clerk. -> accounts.
    let accounts = if let Some(i) = frontend_api.find("clerk.accountsstage.") {
        format!(
            "{}accountsstage.{}",
            &frontend_api[..i],
            &frontend_api[i + "clerk.accountsstage.".len()..]
        )
    } else {
        let a = frontend_api.find("clerk.accounts.");
        let b = frontend_api.find("clerk.");
        match (a, b) {
            (Some(i), Some(j)) if i <= j => format!(
                "{}accounts.{}",
                &frontend_api[..i],
                &frontend_api[i + "clerk.accounts.".len()..]
            ),
            (_, Some(j)) => format!(
                "{}accounts.{}",
                &frontend_api[..j],
                &frontend_api[j + "clerk.".len()..]
            ),
            _ => frontend_api.to_owned(),
        }
    };
    url::Url::parse(&format!("https://{accounts}")).is_ok_and(|u| u.origin() == referrer.origin())
}

/// Removes the handshake parameters from a path-and-query before it goes upstream.
pub(crate) fn strip_handshake_params(pq: &str) -> Option<String> {
    let (path, query) = pq.split_once('?')?;
    let strip = [
        names::HANDSHAKE,
        names::HANDSHAKE_HELP,
        names::DEV_BROWSER,
        names::HANDSHAKE_NONCE,
    ];
    let any =
        url::form_urlencoded::parse(query.as_bytes()).any(|(k, _)| strip.contains(&k.as_ref()));
    if !any {
        return None;
    }
    let kept: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            url::form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| !strip.contains(&k.as_ref())),
        )
        .finish();
    Some(if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{kept}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_int_and_number_follow_javascript() {
        assert_eq!(parse_int("1700000000"), 1_700_000_000);
        assert_eq!(parse_int("12abc"), 12);
        assert_eq!(parse_int(" 7"), 7);
        assert_eq!(parse_int("abc"), 0);
        assert_eq!(parse_int("-5"), -5);
        assert_eq!(parse_number("3"), 3.0);
        assert_eq!(parse_number("3x"), 0.0);
        assert_eq!(js_number(4.0), "4");
        assert_eq!(js_number(2.5), "2.5");
    }

    #[test]
    fn handshake_params_are_stripped_and_others_kept() {
        assert_eq!(
            strip_handshake_params("/p?a=1&__clerk_handshake_nonce=n&b=2").as_deref(),
            Some("/p?a=1&b=2")
        );
        assert_eq!(
            strip_handshake_params("/p?__clerk_handshake_nonce=n").as_deref(),
            Some("/p")
        );
        assert_eq!(strip_handshake_params("/p?a=1"), None);
    }

    #[test]
    fn accounts_portal_is_a_known_referrer() {
        let r = |u: &str| url::Url::parse(u).unwrap();
        assert!(is_known_clerk_referrer(
            &r("https://accounts.example.com/sign-in"),
            "clerk.example.com",
            false
        ));
        assert!(is_known_clerk_referrer(
            &r("https://clerk.example.com/x"),
            "clerk.example.com",
            false
        ));
        assert!(!is_known_clerk_referrer(
            &r("https://evil.example/"),
            "clerk.example.com",
            false
        ));
        assert!(is_known_clerk_referrer(
            &r("https://foo-bar-13.accounts.dev/"),
            "foo-bar-13.clerk.accounts.dev",
            true
        ));
    }
}
