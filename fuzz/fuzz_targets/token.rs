//! Token extraction, parsing and verification: `clerkgate::auth::token::{extract, parse,
//! check_client_uat}` and `clerkgate::auth::verify::Verifier` against a fixed key set.
//!
//! The first byte picks the mode:
//! - `H`: the rest is a header block (`Name: value` lines). `extract` must find a token only
//!   where the SDK rules put one (one `Authorization` header, or the `__session` cookies when
//!   cookies are accepted), and the token it returns must be part of that header. Whatever it
//!   finds then goes through `parse` and verification, which must fail: nothing in fuzz input
//!   is signed by the fixed keys.
//! - `M`: a flags byte, a JOSE header JSON line, a claims JSON line, then mutation bytes. The
//!   harness signs the header and claims with the fixed key, so claim handling is reached with a
//!   valid signature, then applies the mutations (byte flips, inserts, deletions, truncation,
//!   segment swaps, re-signing with a key outside the set). A token verifies only if its signed
//!   bytes and signature are exactly the ones the fixed key produced, and only if the claims
//!   satisfy an independent model of the rules (sub, azp, iss, exp/nbf/iat with skew, pending
//!   sessions). With no mutation, a token the model accepts must verify.
//! - anything else: the whole input is a token, which must never verify.
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clerkgate::auth::AuthError;
use clerkgate::auth::jwks::Key;
use clerkgate::auth::token::{self, Alg, Carrier, CookieNames};
use clerkgate::auth::verify::{VerifiedClaims, Verifier};
use clerkgate::dev::signing::SigningKey;
use clerkgate_fuzz::{Bytes, header_block};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const ISSUER: &str = "https://fuzz.clerk.accounts.dev";
const PARTY: &str = "https://app.example";
const NOW_S: u64 = 1_800_000_000;
const NOW_MS: u64 = NOW_S * 1000;

struct Keys {
    /// Signs the `M` tokens; in the set as RS256 and as RS384/RS512.
    signer: SigningKey,
    /// Not in the set: re-signing with it must not help.
    outsider: SigningKey,
    /// The fixed key set: `(key, which signer it belongs to)`.
    set: Vec<Key>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = SigningKey::generate("ins_fuzz_1").expect("key");
        let outsider = SigningKey::generate("ins_fuzz_1").expect("key");
        let other = SigningKey::generate("ins_fuzz_2").expect("key");
        let set = vec![
            Key::from_jwk_value(&signer.jwk(), None).expect("jwk"),
            Key::from_jwk_value(&signer.jwk(), Some(Alg::Rs384)).expect("jwk"),
            Key::from_jwk_value(&signer.jwk(), Some(Alg::Rs512)).expect("jwk"),
            Key::from_jwk_value(&other.jwk(), None).expect("jwk"),
            Key::from_pem(&other.public_key_pem()).expect("pem"),
        ];
        Keys {
            signer,
            outsider,
            set,
        }
    })
}

fn verifier(flags: u8) -> Verifier {
    let parties = if flags & 1 != 0 {
        vec![PARTY.to_owned()]
    } else {
        vec![]
    };
    let skew = [0, 5_000, 60_000, u64::MAX / 2][(flags as usize >> 3) & 3];
    Verifier::new(
        vec![ISSUER.to_owned()],
        parties,
        flags & 2 != 0,
        skew,
        flags & 4 != 0,
    )
}

fuzz_target!(|data: &[u8]| {
    let _ = keys();
    match data.split_first() {
        Some((b'H', rest)) => extraction(rest),
        Some((b'M', rest)) => mutated(rest),
        _ => never_verifies(&String::from_utf8_lossy(data), 0),
    }
});

/// Parses, and verifies against every key in the set under a few policies: must not verify.
fn never_verifies(token: &str, flags: u8) {
    let Ok(parsed) = token::parse(token) else {
        return;
    };
    // (The length limit is `auth.max_token_bytes`, applied by the authenticator before parsing.)
    assert!(token.starts_with(parsed.signing_input()));
    assert!(parsed.signing_input().ends_with(parsed.payload_segment()));
    for key in &keys().set {
        for f in [flags, flags ^ 0x1f] {
            if let Ok(claims) = verifier(f).verify(parsed.clone(), key, NOW_MS) {
                panic!("unsigned input verified: {token:?} -> {claims:?}");
            }
        }
    }
}

fn extraction(rest: &[u8]) {
    let mut b = Bytes::new(rest);
    let flags = b.byte();
    let iat = i64::from(b.u16()) * 1000;
    let headers = header_block(b.rest());
    let names = CookieNames::new((flags & 1 != 0).then_some("QvfNY2dr"));
    let accept_cookie = flags & 2 != 0;
    let auth_count = headers.get_all("authorization").iter().count();
    match token::extract(&headers, &names, accept_cookie) {
        Err(e) => assert!(
            auth_count > 1 || e == AuthError::Invalid,
            "unexpected error {e:?}"
        ),
        Ok(None) => {}
        Ok(Some(found)) => {
            assert!(
                auth_count <= 1,
                "a token was taken from two Authorization headers"
            );
            assert!(!found.token.is_empty());
            let carrier = match found.carrier {
                Carrier::Header => "authorization",
                Carrier::Cookie => {
                    assert!(accept_cookie, "a cookie token although cookies are off");
                    "cookie"
                }
            };
            let inside = |needle: &str| {
                headers
                    .get_all(carrier)
                    .iter()
                    .any(|v| contains(v.as_bytes(), needle.as_bytes()))
            };
            assert!(inside(found.token), "token not from {carrier}: {found:?}");
            if let Some(uat) = found.client_uat {
                assert_eq!(found.carrier, Carrier::Cookie);
                assert!(inside(uat));
            }
            if token::check_client_uat(found.client_uat, Some(iat)).is_ok() {
                let uat: i64 = found.client_uat.expect("uat").parse().expect("integer uat");
                assert!(
                    uat > 0 && uat <= iat,
                    "client_uat {uat} accepted for iat {iat}"
                );
            }
            never_verifies(found.token, flags);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn mutated(rest: &[u8]) {
    let mut lines = rest.splitn(4, |b| *b == b'\n');
    let flags = lines.next().and_then(|l| l.first().copied()).unwrap_or(0);
    let json_line = |line: Option<&[u8]>, default: Value| {
        line.and_then(|l| serde_json::from_slice::<Value>(l).ok())
            .unwrap_or(default)
    };
    let header = json_line(
        lines.next(),
        json!({"alg": "RS256", "kid": "ins_fuzz_1", "typ": "JWT"}),
    );
    let claims = json_line(
        lines.next(),
        json!({"iss": ISSUER, "sub": "user_1", "iat": NOW_S, "exp": NOW_S + 60}),
    );
    let mut ops = Bytes::new(lines.next().unwrap_or(b""));

    let keys = keys();
    let original = keys.signer.sign(&header, &claims);
    let (signed_input, signature) = split_signature(&original);
    let mut token = original.clone().into_bytes();
    let mut mutations = 0;
    while !ops.is_empty() && mutations < 8 {
        mutations += 1;
        let op = ops.byte();
        let at = usize::from(ops.u16()) % (token.len() + 1);
        match op % 7 {
            0 if at < token.len() => token[at] ^= ops.byte() | 1,
            1 => token.insert(at, ops.byte()),
            2 if at < token.len() => {
                token.remove(at);
            }
            3 => token.truncate(at),
            4 => token = swap_segments(&token, ops.byte()),
            5 => token = keys.outsider.sign(&header, &claims).into_bytes(),
            _ => token.extend_from_slice(b"="),
        }
    }
    let text = String::from_utf8_lossy(&token).into_owned();
    let Ok(parsed) = token::parse(&text) else {
        return;
    };
    for (i, key) in keys.set.iter().enumerate() {
        let v = verifier(flags);
        let got = v.verify(parsed.clone(), key, NOW_MS);
        let signed_here = i < 3 && key.alg == parsed.header.alg;
        if let Ok(verified) = &got {
            assert!(
                signed_here,
                "verified with a key that did not sign: {text:?}"
            );
            assert_eq!(
                parsed.signing_input(),
                signed_input,
                "signed bytes were changed"
            );
            assert_eq!(
                parsed.signature,
                URL_SAFE_NO_PAD.decode(signature).expect("own signature"),
                "signature was changed"
            );
            if let Err(why) = claims_model(&parsed.payload, flags) {
                panic!("claims verified although {why}: {verified:?}");
            }
            check_verified(verified, &parsed.payload);
        }
        let expected_alg = match header.get("alg").and_then(Value::as_str) {
            Some("RS384") => Alg::Rs384,
            Some("RS512") => Alg::Rs512,
            _ => Alg::Rs256,
        };
        if text == original
            && signed_here
            && key.alg == expected_alg
            && claims_model(&parsed.payload, flags).is_ok()
        {
            assert!(
                got.is_ok(),
                "a valid token was refused: {got:?} for {claims}"
            );
        }
    }
}

fn split_signature(token: &str) -> (&str, &str) {
    token.rsplit_once('.').expect("compact JWS")
}

fn swap_segments(token: &[u8], which: u8) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = token.split(|b| *b == b'.').collect();
    if parts.len() >= 2 {
        let i = usize::from(which) % parts.len();
        let j = (i + 1) % parts.len();
        parts.swap(i, j);
    }
    parts.join(&b'.')
}

/// The claim rules, written from the documentation in `verify.rs`'s header: `Err` names the
/// first rule a payload breaks.
fn claims_model(p: &Map<String, Value>, flags: u8) -> Result<(), &'static str> {
    let allow_missing_azp = flags & 2 != 0;
    let pending_out = flags & 4 != 0;
    let skew = [0u64, 5_000, 60_000, u64::MAX / 2][(flags as usize >> 3) & 3] as f64;
    let now = NOW_MS as f64;
    // sub and sid travel upstream as header values: printable ASCII without spaces, whole.
    let header_safe = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    match p.get("sub") {
        Some(Value::String(s)) if !s.is_empty() && header_safe(s) => {}
        _ => return Err("sub is not a non-empty header-safe string"),
    }
    if let Some(Value::String(sid)) = p.get("sid")
        && !header_safe(sid)
    {
        return Err("sid is not header-safe");
    }
    if flags & 1 != 0 {
        match p.get("azp") {
            Some(Value::String(a)) if a == PARTY => {}
            Some(Value::String(a)) if a.is_empty() && allow_missing_azp => {}
            None if allow_missing_azp => {}
            _ => return Err("azp is not an authorized party"),
        }
    }
    if p.get("iss").and_then(Value::as_str) != Some(ISSUER) {
        return Err("iss is not the issuer");
    }
    let number = |name: &str| -> Result<Option<f64>, &'static str> {
        match p.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(_) => Err("a time claim is not a number"),
        }
    };
    match number("exp")? {
        Some(exp) if exp * 1000.0 > now - skew => {}
        _ => return Err("exp is missing or in the past"),
    }
    if number("nbf")?.is_some_and(|nbf| nbf * 1000.0 > now + skew) {
        return Err("nbf is in the future");
    }
    if number("iat")?.is_some_and(|iat| iat * 1000.0 > now + skew) {
        return Err("iat is in the future");
    }
    if pending_out && p.get("sts").and_then(Value::as_str) == Some("pending") {
        return Err("the session is pending");
    }
    Ok(())
}

fn check_verified(v: &VerifiedClaims, p: &Map<String, Value>) {
    assert_eq!(Some(v.sub.as_str()), p.get("sub").and_then(Value::as_str));
    assert_eq!(v.sid.as_deref(), p.get("sid").and_then(Value::as_str));
    assert_eq!(&v.payload, p);
}
