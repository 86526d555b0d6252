//! The pure verification core: a parsed token, a key and `now` in, verified claims or a reason
//! out. No I/O, no clock, no cache.
//!
//! Order (as `@clerk/backend` 3.25 since PR #8332, then stricter):
//! 1. the token's `alg` must be the key's `alg` (the SDK gets this from Web Crypto refusing a
//!    mismatched JWK; we check it explicitly);
//! 2. the RSASSA-PKCS1-v1_5 signature, before any claim, so a forged token learns nothing
//!    about the configuration from distinct claim errors;
//! 3. `sub` a string; `azp` exact match when authorized parties are configured (a missing
//!    `azp` is then rejected unless allowed); `iss` one of the configured issuers (the SDK
//!    skips this: a cross-instance hole); `exp` required, `nbf` and `iat` checked when present,
//!    all with the configured skew (RFC 7519 sections 4.1.4 to 4.1.6); `sts = "pending"`
//!    treated as signed out.

use serde_json::{Map, Value};

use super::AuthError;
use super::jwks::Key;
use super::token::Parsed;

/// Claims that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedClaims {
    pub payload: Map<String, Value>,
    pub sub: String,
    pub sid: Option<String>,
    /// `iat` in whole seconds, if present (the cookie rule compares it with `__client_uat`).
    pub iat: Option<i64>,
    /// `exp` in milliseconds.
    pub exp_ms: u64,
}

/// The verification policy of one Clerk instance.
#[derive(Debug, Clone)]
pub struct Verifier {
    issuers: Vec<String>,
    authorized_parties: Vec<String>,
    allow_missing_azp: bool,
    skew_ms: u64,
    pending_as_signed_out: bool,
}

impl Verifier {
    pub fn new(
        issuers: Vec<String>,
        authorized_parties: Vec<String>,
        allow_missing_azp: bool,
        skew_ms: u64,
        pending_as_signed_out: bool,
    ) -> Self {
        Self {
            issuers,
            authorized_parties,
            allow_missing_azp,
            skew_ms,
            pending_as_signed_out,
        }
    }

    pub fn skew_ms(&self) -> u64 {
        self.skew_ms
    }

    /// Whether an (unverified) issuer is one of ours. Used only to decide if an unknown `kid`
    /// may trigger a key refetch: tokens claiming another instance never cost a fetch.
    pub fn issuer_allowed(&self, iss: Option<&str>) -> bool {
        iss.is_some_and(|iss| self.issuers.iter().any(|i| i == iss))
    }

    pub fn verify(
        &self,
        token: Parsed<'_>,
        key: &Key,
        now_ms: u64,
    ) -> Result<VerifiedClaims, AuthError> {
        if token.header.alg != key.alg {
            return Err(AuthError::InvalidAlgorithm);
        }
        key.public
            .verify_sig(token.signing_input().as_bytes(), &token.signature)
            .map_err(|_| AuthError::InvalidSignature)?;

        // Taken, not cloned: the verified claims keep the parsed payload itself (a deep copy
        // of the claim tree was a tenth of a cold verification's own cost).
        let payload = token.payload;
        let sub = match payload.get("sub") {
            // The user id is sent upstream as X-User-Id: it must fit a header value whole.
            Some(Value::String(s)) if !s.is_empty() && header_safe(s) => s.clone(),
            _ => return Err(AuthError::VerificationFailed),
        };
        if !self.authorized_parties.is_empty() {
            match payload.get("azp") {
                Some(Value::String(azp)) if !azp.is_empty() => {
                    if !self.authorized_parties.iter().any(|p| p == azp) {
                        return Err(AuthError::InvalidAuthorizedParties);
                    }
                }
                None if self.allow_missing_azp => {}
                Some(Value::String(_)) if self.allow_missing_azp => {}
                _ => return Err(AuthError::InvalidAuthorizedParties),
            }
        }
        match payload.get("iss") {
            Some(Value::String(iss)) if self.issuers.iter().any(|i| i == iss) => {}
            _ => return Err(AuthError::InvalidIssuer),
        }

        let now = now_ms as f64;
        let skew = self.skew_ms as f64;
        let exp_ms = match payload.get("exp") {
            Some(Value::Number(n)) => n.as_f64().ok_or(AuthError::VerificationFailed)? * 1000.0,
            _ => return Err(AuthError::VerificationFailed),
        };
        if exp_ms <= now - skew {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = number_claim(&payload, "nbf")?
            && nbf * 1000.0 > now + skew
        {
            return Err(AuthError::NotActiveYet);
        }
        let iat = number_claim(&payload, "iat")?;
        if let Some(iat) = iat
            && iat * 1000.0 > now + skew
        {
            return Err(AuthError::IatInTheFuture);
        }
        if self.pending_as_signed_out
            && payload.get("sts").and_then(Value::as_str) == Some("pending")
        {
            return Err(AuthError::SessionPending);
        }
        let sid = match payload.get("sid") {
            Some(Value::String(sid)) if header_safe(sid) => Some(sid.clone()),
            Some(Value::String(_)) => return Err(AuthError::VerificationFailed),
            _ => None,
        };
        Ok(VerifiedClaims {
            payload,
            sub,
            sid,
            iat: iat.map(|v| v.floor() as i64),
            exp_ms: exp_ms.clamp(0.0, u64::MAX as f64) as u64,
        })
    }
}

/// Clerk ids are printable ASCII; anything else (CR/LF, DEL, non-ASCII) could not be sent as
/// the identity header and is refused rather than forwarded without it.
fn header_safe(id: &str) -> bool {
    id.bytes().all(|b| b.is_ascii_graphic())
}

/// An optional numeric claim: absent is fine, present but not a number is a failure.
fn number_claim(payload: &Map<String, Value>, name: &str) -> Result<Option<f64>, AuthError> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(AuthError::VerificationFailed),
        Some(_) => Err(AuthError::VerificationFailed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::{Alg, parse};
    use crate::dev::signing::SigningKey;
    use serde_json::json;
    use std::sync::OnceLock;

    const ISS: &str = "https://fake-instance.clerk.accounts.dev";
    const NOW_S: u64 = 1_800_000_000;
    const NOW: u64 = NOW_S * 1000;

    fn signer() -> &'static SigningKey {
        static K: OnceLock<SigningKey> = OnceLock::new();
        K.get_or_init(|| SigningKey::generate("ins_test").unwrap())
    }

    fn other_signer() -> &'static SigningKey {
        static K: OnceLock<SigningKey> = OnceLock::new();
        K.get_or_init(|| SigningKey::generate("ins_test").unwrap())
    }

    fn key(alg: Alg) -> Key {
        Key::from_jwk_value(&signer().jwk(), Some(alg)).unwrap()
    }

    fn claims() -> Value {
        json!({"iss": ISS, "sub": "user_1", "sid": "sess_1", "iat": NOW_S, "nbf": NOW_S - 10, "exp": NOW_S + 60, "v": 2})
    }

    fn verifier() -> Verifier {
        Verifier::new(vec![ISS.into()], vec![], false, 5_000, true)
    }

    fn check(v: &Verifier, token: &str, now: u64) -> Result<VerifiedClaims, AuthError> {
        v.verify(parse(token).unwrap(), &key(Alg::Rs256), now)
    }

    fn with(mut c: Value, k: &str, v: Value) -> Value {
        c[k] = v;
        c
    }

    fn without(mut c: Value, k: &str) -> Value {
        c.as_object_mut().unwrap().remove(k);
        c
    }

    #[test]
    fn a_valid_token_verifies() {
        let c = check(&verifier(), &signer().mint(&claims()), NOW).unwrap();
        assert_eq!(c.sub, "user_1");
        assert_eq!(c.sid.as_deref(), Some("sess_1"));
        assert_eq!(c.iat, Some(NOW_S as i64));
        assert_eq!(c.exp_ms, (NOW_S + 60) * 1000);
    }

    #[test]
    fn claim_rules_table() {
        let v = verifier();
        let cases: Vec<(&str, Value, u64, Result<(), AuthError>)> = vec![
            (
                "expired beyond skew",
                claims(),
                (NOW_S + 65) * 1000,
                Err(AuthError::Expired),
            ),
            ("expired within skew", claims(), (NOW_S + 64) * 1000, Ok(())),
            (
                "exp exactly now-skew",
                claims(),
                (NOW_S + 65) * 1000,
                Err(AuthError::Expired),
            ),
            (
                "nbf in the future",
                with(claims(), "nbf", json!(NOW_S + 6)),
                NOW,
                Err(AuthError::NotActiveYet),
            ),
            (
                "nbf within skew",
                with(claims(), "nbf", json!(NOW_S + 5)),
                NOW,
                Ok(()),
            ),
            (
                "iat in the future",
                with(claims(), "iat", json!(NOW_S + 6)),
                NOW,
                Err(AuthError::IatInTheFuture),
            ),
            (
                "no exp",
                without(claims(), "exp"),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "exp as string",
                with(claims(), "exp", json!("1900000000")),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "exp as float",
                with(claims(), "exp", json!((NOW_S + 60) as f64 + 0.5)),
                NOW,
                Ok(()),
            ),
            (
                "nbf as string",
                with(claims(), "nbf", json!("x")),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "no nbf, no iat",
                without(without(claims(), "nbf"), "iat"),
                NOW,
                Ok(()),
            ),
            (
                "sub missing",
                without(claims(), "sub"),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "sub a number",
                with(claims(), "sub", json!(5)),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "sub with CR/LF",
                with(claims(), "sub", json!("user_1\r\nX-Injected: 1")),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "sub with DEL",
                with(claims(), "sub", json!("user_1\u{7f}")),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "sub with a space",
                with(claims(), "sub", json!("user 1")),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "sid with LF",
                with(claims(), "sid", json!("sess_1\nx")),
                NOW,
                Err(AuthError::VerificationFailed),
            ),
            (
                "iss of another instance",
                with(claims(), "iss", json!("https://other.clerk.accounts.dev")),
                NOW,
                Err(AuthError::InvalidIssuer),
            ),
            (
                "iss missing",
                without(claims(), "iss"),
                NOW,
                Err(AuthError::InvalidIssuer),
            ),
            (
                "iss with trailing slash",
                with(claims(), "iss", json!(format!("{ISS}/"))),
                NOW,
                Err(AuthError::InvalidIssuer),
            ),
            (
                "pending session",
                with(claims(), "sts", json!("pending")),
                NOW,
                Err(AuthError::SessionPending),
            ),
            (
                "active session",
                with(claims(), "sts", json!("active")),
                NOW,
                Ok(()),
            ),
        ];
        for (name, c, now, want) in cases {
            let got = check(&v, &signer().mint(&c), now).map(|_| ());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn zero_skew_is_honoured() {
        let v = Verifier::new(vec![ISS.into()], vec![], false, 0, true);
        let t = signer().mint(&claims());
        assert_eq!(
            check(&v, &t, (NOW_S + 60) * 1000).unwrap_err(),
            AuthError::Expired
        );
        assert!(check(&v, &t, (NOW_S + 60) * 1000 - 1).is_ok());
    }

    #[test]
    fn pending_can_be_allowed() {
        let v = Verifier::new(vec![ISS.into()], vec![], false, 5_000, false);
        assert!(
            check(
                &v,
                &signer().mint(&with(claims(), "sts", json!("pending"))),
                NOW
            )
            .is_ok()
        );
    }

    #[test]
    fn authorized_parties_are_exact() {
        let v = Verifier::new(
            vec![ISS.into()],
            vec!["https://app.example".into()],
            false,
            5_000,
            true,
        );
        let azp = |a: Value| check(&v, &signer().mint(&with(claims(), "azp", a)), NOW).map(|_| ());
        assert_eq!(azp(json!("https://app.example")), Ok(()));
        assert_eq!(
            azp(json!("https://app.example/")),
            Err(AuthError::InvalidAuthorizedParties)
        );
        assert_eq!(
            azp(json!("https://APP.example")),
            Err(AuthError::InvalidAuthorizedParties)
        );
        assert_eq!(
            azp(json!("https://evil.example")),
            Err(AuthError::InvalidAuthorizedParties)
        );
        assert_eq!(azp(json!("")), Err(AuthError::InvalidAuthorizedParties));
        assert_eq!(
            check(&v, &signer().mint(&claims()), NOW).map(|_| ()),
            Err(AuthError::InvalidAuthorizedParties),
            "missing azp is rejected when parties are configured"
        );
        let lenient = Verifier::new(
            vec![ISS.into()],
            vec!["https://app.example".into()],
            true,
            5_000,
            true,
        );
        assert!(check(&lenient, &signer().mint(&claims()), NOW).is_ok());
        assert_eq!(
            check(
                &lenient,
                &signer().mint(&with(claims(), "azp", json!("https://evil.example"))),
                NOW
            )
            .map(|_| ()),
            Err(AuthError::InvalidAuthorizedParties),
            "allow_missing_azp never admits a wrong azp"
        );
    }

    #[test]
    fn signature_is_checked_before_claims() {
        // A forged token with bad claims reports the signature, not the claim.
        let forged = other_signer().mint(&with(claims(), "iss", json!("https://other")));
        assert_eq!(
            check(&verifier(), &forged, NOW).unwrap_err(),
            AuthError::InvalidSignature
        );
        // Flip a character well inside the signature: the last one also carries padding bits,
        // and changing those makes the base64 itself invalid rather than the signature wrong.
        let mut t = signer().mint(&claims()).into_bytes();
        let i = t.len() - 10;
        t[i] = if t[i] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(t).unwrap();
        assert_eq!(
            check(&verifier(), &t, NOW).unwrap_err(),
            AuthError::InvalidSignature
        );
    }

    #[test]
    fn the_token_alg_must_be_the_key_alg() {
        let rs384 = signer().sign(&json!({"alg": "RS384", "kid": "ins_test"}), &claims());
        let p = || parse(&rs384).unwrap();
        assert_eq!(
            verifier().verify(p(), &key(Alg::Rs256), NOW).unwrap_err(),
            AuthError::InvalidAlgorithm
        );
        assert!(verifier().verify(p(), &key(Alg::Rs384), NOW).is_ok());
    }
}
