//! Finding the session token in a request, and the structural checks that run before any key
//! lookup.
//!
//! Extraction follows `@clerk/backend`'s `authenticateRequest`: an `Authorization` header wins
//! (`Bearer <t>`, or a header without a space taken as the raw token; any other scheme is no
//! header token); otherwise the `__session` cookie, or its suffixed form `__session_<suffix>`
//! derived from the publishable key. A cookie token additionally needs `__client_uat`
//! (see [`check_client_uat`]).
//!
//! [`parse`] rejects, before a key is looked up: anything that is not three base64url JSON
//! segments, a `typ` other than `JWT`, an `alg` outside RS256/384/512 (so never `none` or HS*),
//! a `crit` header (RFC 7515 section 4.1.11: we understand no extensions), and tokens that are
//! not session tokens (machine `sub`, `at+jwt`, a non-session `cat`). Key-carrying headers
//! (`jku`, `x5u`, `jwk`, `x5c`) are never read: keys come only from configuration.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE};
use serde_json::{Map, Value};

use super::AuthError;

/// base64url that tolerates padding, as the SDK's "loose" decoder does.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Clerk's session token category (`cat` header); absent is also a session token.
const CAT_SESSION: &str = "cl_B7d4PD111AAA";
/// Clerk's "ignore" category, accepted like a session token.
const CAT_IGNORE: &str = "cl_I7d4PD111III";

/// Where a token was found; cookie tokens carry extra freshness rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Header,
    Cookie,
}

/// A token located in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<'a> {
    pub token: &'a str,
    pub carrier: Carrier,
    /// The `__client_uat` cookie paired with a cookie token.
    pub client_uat: Option<&'a str>,
}

/// The cookie names for one instance, computed once.
#[derive(Debug, Clone)]
pub struct CookieNames {
    session: &'static str,
    client_uat: &'static str,
    session_suffixed: Option<String>,
    client_uat_suffixed: Option<String>,
}

impl CookieNames {
    pub fn new(suffix: Option<&str>) -> Self {
        Self {
            session: "__session",
            client_uat: "__client_uat",
            session_suffixed: suffix.map(|s| format!("__session_{s}")),
            client_uat_suffixed: suffix.map(|s| format!("__client_uat_{s}")),
        }
    }

    /// `true` for the cookies that carry the token or its freshness marker: these are removed
    /// before forwarding unless the token is forwarded.
    pub fn is_token_cookie(&self, name: &str) -> bool {
        self.is_token_cookie_name(name.as_bytes())
    }

    /// [`Self::is_token_cookie`] on the raw bytes of a cookie name (which need not be UTF-8),
    /// with surrounding whitespace ignored as cookie parsers do (`__session =t` is `__session`).
    pub fn is_token_cookie_name(&self, name: &[u8]) -> bool {
        let name = name.trim_ascii();
        name == self.session.as_bytes()
            || name == self.client_uat.as_bytes()
            || name.starts_with(b"__session_")
            || name.starts_with(b"__client_uat_")
    }
}

/// Finds the token. `Err` only for a request that is ambiguous on purpose (two
/// `Authorization` headers), which no client sends by accident.
pub fn extract<'a>(
    headers: &'a HeaderMap,
    cookies: &CookieNames,
    accept_cookie: bool,
) -> Result<Option<Found<'a>>, AuthError> {
    let mut auth = headers.get_all(AUTHORIZATION).iter();
    if let Some(value) = auth.next() {
        if auth.next().is_some() {
            return Err(AuthError::Invalid);
        }
        let value = value.to_str().map_err(|_| AuthError::Invalid)?;
        let token = match value.split_once(' ') {
            Some(("Bearer", rest)) => Some(rest.trim()),
            Some(_) => None,
            None if !value.is_empty() => Some(value),
            None => None,
        };
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            return Ok(Some(Found {
                token,
                carrier: Carrier::Header,
                client_uat: None,
            }));
        }
    }
    if !accept_cookie {
        return Ok(None);
    }
    let mut session = None;
    let mut session_suffixed = None;
    let mut uat = None;
    let mut uat_suffixed = None;
    for value in headers.get_all(COOKIE) {
        // Browsers send non-ASCII cookie values: one such pair must not hide the others.
        for pair in value.as_bytes().split(|b| *b == b';') {
            let Ok(pair) = std::str::from_utf8(pair) else {
                continue;
            };
            let Some((name, v)) = pair.trim().split_once('=') else {
                continue;
            };
            let name = name.trim_end();
            let v = v.trim().trim_matches('"');
            if v.is_empty() {
                continue;
            }
            if name == cookies.session {
                session.get_or_insert(v);
            } else if name == cookies.client_uat {
                uat.get_or_insert(v);
            } else if cookies.session_suffixed.as_deref() == Some(name) {
                session_suffixed.get_or_insert(v);
            } else if cookies.client_uat_suffixed.as_deref() == Some(name) {
                uat_suffixed.get_or_insert(v);
            }
        }
    }
    // The suffixed pair is specific to this instance; prefer it when present.
    let found = match (session_suffixed, session) {
        (Some(t), _) => Some((t, uat_suffixed.or(uat))),
        (None, Some(t)) => Some((t, uat)),
        (None, None) => None,
    };
    Ok(found.map(|(token, client_uat)| Found {
        token,
        carrier: Carrier::Cookie,
        client_uat,
    }))
}

/// The cookie-path freshness rule: `__client_uat` must be a positive integer and the token must
/// not be older than it (a sign-in or sign-out elsewhere makes older cookies stale).
pub fn check_client_uat(client_uat: Option<&str>, iat: Option<i64>) -> Result<(), AuthError> {
    let uat: i64 = client_uat.and_then(|v| v.parse().ok()).unwrap_or(0);
    if uat <= 0 {
        return Err(AuthError::NoClientUat);
    }
    match iat {
        Some(iat) if iat >= uat => Ok(()),
        _ => Err(AuthError::IatBeforeClientUat),
    }
}

/// RSASSA-PKCS1-v1_5 algorithms, the only ones Clerk signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
}

impl Alg {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Self::Rs256),
            "RS384" => Some(Self::Rs384),
            "RS512" => Some(Self::Rs512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
        }
    }

    /// The aws-lc-rs verification parameters (2048 to 8192-bit moduli).
    pub fn params(self) -> &'static aws_lc_rs::signature::RsaParameters {
        use aws_lc_rs::signature as s;
        match self {
            Self::Rs256 => &s::RSA_PKCS1_2048_8192_SHA256,
            Self::Rs384 => &s::RSA_PKCS1_2048_8192_SHA384,
            Self::Rs512 => &s::RSA_PKCS1_2048_8192_SHA512,
        }
    }
}

/// The protected header fields clerkgate reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alg: Alg,
    pub kid: Option<String>,
}

/// A token that passed the structural checks; nothing in it is trusted yet.
#[derive(Debug, Clone)]
pub struct Parsed<'t> {
    pub header: Header,
    /// The whole protected header, for the machine-token rules (`typ`, `cat`).
    pub raw_header: Map<String, Value>,
    signing_input: &'t str,
    payload_segment: &'t str,
    pub signature: Vec<u8>,
    pub payload: Map<String, Value>,
}

impl<'t> Parsed<'t> {
    /// `base64url(header) "." base64url(payload)`, the bytes the signature covers.
    pub fn signing_input(&self) -> &'t str {
        self.signing_input
    }

    /// The payload exactly as the issuer encoded it (base64url JSON): once verified it can be
    /// forwarded as the claims header without re-serialising anything.
    pub fn payload_segment(&self) -> &'t str {
        self.payload_segment
    }

    /// The `iss` claim before verification: only ever used to decide whether an unknown `kid`
    /// may trigger a JWKS refetch, never to accept a token.
    pub fn unverified_issuer(&self) -> Option<&str> {
        self.payload.get("iss").and_then(Value::as_str)
    }
}

/// Structural checks, in the SDK's order, before any key lookup.
pub fn parse(token: &str) -> Result<Parsed<'_>, AuthError> {
    parse_with(token, check_session_type)
}

/// The structural checks without the session-token type rules, for machine JWTs (M2M and
/// OAuth access tokens, whose `typ` and `cat` rules are checked by `auth::machine`).
pub fn parse_machine(token: &str) -> Result<Parsed<'_>, AuthError> {
    parse_with(token, |_, _| Ok(()))
}

/// Machine and OAuth tokens presented as session tokens (Clerk PR #9168).
fn check_session_type(
    header: &Map<String, Value>,
    payload: &Map<String, Value>,
) -> Result<(), AuthError> {
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" => {}
        Some(Value::String(t))
            if t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt") =>
        {
            return Err(AuthError::TypeMismatch);
        }
        Some(_) => return Err(AuthError::Invalid),
    }
    if payload
        .get("sub")
        .and_then(Value::as_str)
        .is_some_and(|sub| sub.starts_with("mch_"))
    {
        return Err(AuthError::TypeMismatch);
    }
    match header.get("cat") {
        None => {}
        Some(Value::String(c)) if c == CAT_SESSION || c == CAT_IGNORE => {}
        Some(_) => return Err(AuthError::TypeMismatch),
    }
    Ok(())
}

fn parse_with(
    token: &str,
    type_rules: impl Fn(&Map<String, Value>, &Map<String, Value>) -> Result<(), AuthError>,
) -> Result<Parsed<'_>, AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Invalid);
    };
    let header_json = B64URL.decode(h).map_err(|_| AuthError::Invalid)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header_json).map_err(|_| AuthError::Invalid)?;
    let payload_json = B64URL.decode(p).map_err(|_| AuthError::Invalid)?;
    let payload: Map<String, Value> =
        serde_json::from_slice(&payload_json).map_err(|_| AuthError::Invalid)?;
    let signature = B64URL.decode(s).map_err(|_| AuthError::Invalid)?;

    type_rules(&header, &payload)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Alg::from_name)
        .ok_or(AuthError::InvalidAlgorithm)?;
    if header.contains_key("crit") {
        return Err(AuthError::Invalid);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= 256 => Some(k.clone()),
        Some(_) => return Err(AuthError::Invalid),
    };
    Ok(Parsed {
        header: Header { alg, kid },
        raw_header: header,
        signing_input: &token[..h.len() + 1 + p.len()],
        payload_segment: p,
        signature,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn enc(v: &Value) -> String {
        B64URL.encode(serde_json::to_vec(v).unwrap())
    }

    fn tok(header: Value, payload: Value) -> String {
        format!(
            "{}.{}.{}",
            enc(&header),
            enc(&payload),
            B64URL.encode(b"sig")
        )
    }

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
    fn a_non_ascii_cookie_pair_does_not_hide_the_session_cookie() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"name=Ren\xc3\xa9e; __session=tok; bad=\xff; __client_uat=7")
                .unwrap(),
        );
        let found = extract(&h, &CookieNames::new(None), true).unwrap().unwrap();
        assert_eq!(found.token, "tok");
        assert_eq!(found.carrier, Carrier::Cookie);
        assert_eq!(found.client_uat, Some("7"));
    }

    #[test]
    fn structural_rejections_use_clerk_reasons() {
        let ok_payload = serde_json::json!({"sub": "user_1"});
        let cases: Vec<(String, AuthError)> = vec![
            ("a.b".into(), AuthError::Invalid),
            ("a.b.c.d".into(), AuthError::Invalid),
            ("!!.??.**".into(), AuthError::Invalid),
            (
                format!("{}.{}.c2ln", B64URL.encode("not json"), enc(&ok_payload)),
                AuthError::Invalid,
            ),
            (
                tok(serde_json::json!({"alg": "none"}), ok_payload.clone()),
                AuthError::InvalidAlgorithm,
            ),
            (
                tok(serde_json::json!({"alg": "HS256"}), ok_payload.clone()),
                AuthError::InvalidAlgorithm,
            ),
            (
                tok(serde_json::json!({"alg": "ES256"}), ok_payload.clone()),
                AuthError::InvalidAlgorithm,
            ),
            (
                tok(serde_json::json!({"alg": "PS256"}), ok_payload.clone()),
                AuthError::InvalidAlgorithm,
            ),
            (
                tok(serde_json::json!({"typ": "JWT"}), ok_payload.clone()),
                AuthError::InvalidAlgorithm,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "typ": "at+jwt"}),
                    ok_payload.clone(),
                ),
                AuthError::TypeMismatch,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "typ": "application/at+jwt"}),
                    ok_payload.clone(),
                ),
                AuthError::TypeMismatch,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "typ": "JOSE"}),
                    ok_payload.clone(),
                ),
                AuthError::Invalid,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "cat": "cl_B7d4PD333AAA"}),
                    ok_payload.clone(),
                ),
                AuthError::TypeMismatch,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "cat": "cl_template"}),
                    ok_payload.clone(),
                ),
                AuthError::TypeMismatch,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256"}),
                    serde_json::json!({"sub": "mch_123"}),
                ),
                AuthError::TypeMismatch,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "crit": ["b64"]}),
                    ok_payload.clone(),
                ),
                AuthError::Invalid,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "kid": ""}),
                    ok_payload.clone(),
                ),
                AuthError::Invalid,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256", "kid": 7}),
                    ok_payload.clone(),
                ),
                AuthError::Invalid,
            ),
            (
                tok(
                    serde_json::json!({"alg": "RS256"}),
                    serde_json::json!([1, 2]),
                ),
                AuthError::Invalid,
            ),
            // Length alone is not structure: a long token is judged by its shape here and
            // by `auth.max_token_bytes` in the authenticator.
            ("x".repeat(70_000), AuthError::Invalid),
        ];
        for (token, want) in cases {
            assert_eq!(parse(&token).unwrap_err(), want, "{token}");
        }
    }

    #[test]
    fn accepted_shapes_parse() {
        for header in [
            serde_json::json!({"alg": "RS256", "kid": "ins_1"}),
            serde_json::json!({"alg": "RS256", "kid": "ins_1", "typ": "JWT", "cat": CAT_SESSION}),
            serde_json::json!({"alg": "RS512", "cat": CAT_IGNORE, "jku": "https://evil.example/jwks"}),
        ] {
            let t = tok(
                header,
                serde_json::json!({"sub": "user_1", "iss": "https://x"}),
            );
            let p = parse(&t).unwrap();
            assert_eq!(p.unverified_issuer(), Some("https://x"));
            assert!(t.starts_with(p.signing_input()));
            assert_eq!(p.signature, b"sig");
        }
        // Padding is tolerated like the SDK's loose decoder.
        let padded_b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE.encode(serde_json::to_vec(v).unwrap())
        };
        let padded = format!(
            "{}.{}.{}",
            padded_b64(&serde_json::json!({"alg": "RS256"})),
            padded_b64(&serde_json::json!({"sub": "u1"})),
            base64::engine::general_purpose::URL_SAFE.encode(b"sigs")
        );
        assert!(padded.contains('='));
        assert!(parse(&padded).is_ok());
    }

    #[test]
    fn header_token_wins_over_cookie() {
        let names = CookieNames::new(Some("abc"));
        let h = headers(&[
            ("authorization", "Bearer tkn"),
            ("cookie", "__session=ck; __client_uat=5"),
        ]);
        let f = extract(&h, &names, true).unwrap().unwrap();
        assert_eq!((f.token, f.carrier), ("tkn", Carrier::Header));
    }

    #[test]
    fn authorization_schemes_follow_the_sdk() {
        let names = CookieNames::new(None);
        let get = |v: &str| {
            extract(&headers(&[("authorization", v)]), &names, true)
                .unwrap()
                .map(|f| f.token.to_owned())
        };
        assert_eq!(get("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(get("rawtoken").as_deref(), Some("rawtoken"));
        assert_eq!(get("Basic dXNlcjpwdw=="), None);
        assert_eq!(
            get("bearer abc"),
            None,
            "scheme is case-sensitive like the SDK"
        );
        assert_eq!(get("Bearer "), None);
        let two = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(extract(&two, &names, true).unwrap_err(), AuthError::Invalid);
    }

    #[test]
    fn cookies_prefer_the_suffixed_pair() {
        let names = CookieNames::new(Some("QvfNY2dr"));
        let h = headers(&[(
            "cookie",
            "a=1; __session=plain; __client_uat=10; __session_QvfNY2dr=suffixed; __client_uat_QvfNY2dr=20",
        )]);
        let f = extract(&h, &names, true).unwrap().unwrap();
        assert_eq!(
            (f.token, f.carrier, f.client_uat),
            ("suffixed", Carrier::Cookie, Some("20"))
        );
        let h = headers(&[("cookie", "__session=plain"), ("cookie", "__client_uat=10")]);
        let f = extract(&h, &names, true).unwrap().unwrap();
        assert_eq!((f.token, f.client_uat), ("plain", Some("10")));
        assert_eq!(extract(&h, &names, false).unwrap(), None);
        let h = headers(&[("cookie", "__session=; other=x")]);
        assert_eq!(extract(&h, &names, true).unwrap(), None);
    }

    #[test]
    fn client_uat_rules() {
        assert_eq!(
            check_client_uat(None, Some(10)),
            Err(AuthError::NoClientUat)
        );
        assert_eq!(
            check_client_uat(Some("0"), Some(10)),
            Err(AuthError::NoClientUat)
        );
        assert_eq!(
            check_client_uat(Some("junk"), Some(10)),
            Err(AuthError::NoClientUat)
        );
        assert_eq!(
            check_client_uat(Some("11"), Some(10)),
            Err(AuthError::IatBeforeClientUat)
        );
        assert_eq!(
            check_client_uat(Some("10"), None),
            Err(AuthError::IatBeforeClientUat)
        );
        assert_eq!(check_client_uat(Some("10"), Some(10)), Ok(()));
    }
}
