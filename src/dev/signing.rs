//! An in-memory RSA signing key that mints Clerk-like session tokens.
//!
//! `clerkgate dev` uses it to stand in for a Clerk instance (it publishes [`SigningKey::jwk`] and
//! mints tokens with [`SigningKey::mint`]), and the integration tests use it to produce tokens
//! that differ from real ones only in the key that signed them. It is deliberately able to sign
//! *any* header ([`SigningKey::sign`]) so tests can forge `alg`, `kid` and `typ` values and check
//! that the verifier rejects them.
//!
//! Token format: clerk-protocol.md §1 (RS256, `kid` = instance id, v2 claims). JWK format:
//! clerk-protocol.md §2.4 and RFC 7517/7518 §6.3.1 (`n` and `e` as unpadded base64url of the
//! big-endian integers without leading zero bytes).

use std::fmt;

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{
    KeyPair as _, RSA_PKCS1_SHA256, RSA_PKCS1_SHA384, RSA_PKCS1_SHA512, RsaEncoding,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// Why a [`SigningKey`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// aws-lc could not generate the RSA key pair (it reports no further detail).
    #[error("failed to generate an RSA-2048 key pair")]
    KeyGeneration,
    /// aws-lc could not serialise the public key as an X.509 SubjectPublicKeyInfo.
    #[error("failed to encode the RSA public key as SubjectPublicKeyInfo")]
    PublicKeyEncoding,
}

/// An RSA-2048 key pair plus the `kid` it is published under.
///
/// The public forms (JWK and PEM) are computed once at generation so that the accessors are
/// infallible and cheap; the private key never leaves this struct and is not printed by `Debug`.
pub struct SigningKey {
    kid: String,
    key_pair: KeyPair,
    /// Unpadded base64url of the modulus, without leading zero bytes (RFC 7518 §6.3.1.1).
    n: String,
    /// Unpadded base64url of the public exponent (RFC 7518 §6.3.1.2).
    e: String,
    public_key_pem: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the public identity: a key pair in a log line is a leaked signing key.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a fresh RSA-2048 key (the size Clerk uses, and the only size Clerk's own PEM
    /// loader accepts, clerk-protocol.md §2.3).
    pub fn generate(kid: impl Into<String>) -> Result<Self, SigningError> {
        let key_pair =
            KeyPair::generate(KeySize::Rsa2048).map_err(|_| SigningError::KeyGeneration)?;
        let public_key = key_pair.public_key();
        let n = URL_SAFE_NO_PAD.encode(public_key.modulus().big_endian_without_leading_zero());
        let e = URL_SAFE_NO_PAD.encode(public_key.exponent().big_endian_without_leading_zero());
        let spki: PublicKeyX509Der<'static> = public_key
            .as_der()
            .map_err(|_| SigningError::PublicKeyEncoding)?;
        let public_key_pem = pem_encode("PUBLIC KEY", spki.as_ref());
        Ok(Self {
            kid: kid.into(),
            key_pair,
            n,
            e,
            public_key_pem,
        })
    }

    /// The `kid` this key is published under and that [`SigningKey::mint`] puts in headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK as Clerk serves it from `/v1/jwks`:
    /// `{"kty":"RSA","kid":..,"use":"sig","alg":"RS256","n":..,"e":..}`.
    pub fn jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "kid": self.kid,
            "use": "sig",
            "alg": "RS256",
            "n": self.n,
            "e": self.e,
        })
    }

    /// The public key as an SPKI `-----BEGIN PUBLIC KEY-----` PEM, which is what Clerk's
    /// dashboard shows as `CLERK_JWT_KEY` (the networkless verification path).
    pub fn public_key_pem(&self) -> String {
        self.public_key_pem.clone()
    }

    /// Signs `base64url(header) + "." + base64url(claims)` with RSASSA-PKCS1-v1_5 and returns the
    /// compact JWT.
    ///
    /// The hash follows `header["alg"]` for RS256/RS384/RS512 and is SHA-256 for anything else,
    /// so a test can put `"alg":"none"` or `"HS256"` in the header and still get a well-formed
    /// token whose only defect is the header it claims.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let encoding: &'static dyn RsaEncoding = match header.get("alg").and_then(Value::as_str) {
            Some("RS384") => &RSA_PKCS1_SHA384,
            Some("RS512") => &RSA_PKCS1_SHA512,
            _ => &RSA_PKCS1_SHA256,
        };
        // `Value`'s Display is its compact JSON serialisation and cannot fail.
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key_pair.public_modulus_len()];
        // The inputs here are not untrusted: the key was generated by us and the buffer has the
        // modulus length PKCS#1 v1.5 requires, so a failure means aws-lc itself is broken.
        self.key_pair
            .sign(
                encoding,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .expect("RSA PKCS#1 v1.5 signing with a freshly generated key cannot fail");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// [`SigningKey::sign`] with the header Clerk puts on session tokens:
    /// `{"alg":"RS256","kid":kid,"typ":"JWT"}`.
    pub fn mint(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "kid": self.kid, "typ": "JWT"});
        self.sign(&header, claims)
    }
}

/// A typical Clerk v2 session payload (clerk-protocol.md §1.2 and §1.4): `nbf` back-dated 10 s
/// and `exp = iat + ttl_seconds`, with a random `sess_` id and a 20-hex-char `jti`.
///
/// `now` is Unix seconds; passing it in keeps token contents a function of the caller's clock,
/// which tests control.
pub fn session_claims(issuer: &str, sub: &str, now: u64, ttl_seconds: u64) -> Value {
    json!({
        "iss": issuer,
        "sub": sub,
        "sid": format!("sess_{}", random_alphanumeric(24)),
        "iat": now,
        "nbf": now.saturating_sub(10),
        "exp": now.saturating_add(ttl_seconds),
        "v": 2,
        "jti": random_hex(20),
    })
}

/// The JWKS document `{"keys":[jwk, ...]}` serialised, in the order given.
pub fn jwks_json<'a>(keys: impl IntoIterator<Item = &'a SigningKey>) -> String {
    let keys: Vec<Value> = keys.into_iter().map(SigningKey::jwk).collect();
    json!({ "keys": keys }).to_string()
}

/// PEM armour (RFC 7468): base64 of the DER in 64-character lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    // Base64 output is ASCII, so every 64-byte chunk is valid UTF-8 on its own.
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    // The system RNG failing is not a recoverable condition for a key-minting tool, and ids
    // from a broken RNG would silently collide.
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random number generator failed");
    bytes
}

fn random_hex(len: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    random_bytes(len)
        .iter()
        .map(|b| char::from(HEX[usize::from(b & 0x0f)]))
        .collect()
}

fn random_alphanumeric(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in random_bytes(len) {
            // Rejection sampling: 248 = 4 * 62, so bytes below it map uniformly.
            if b < 248 && out.len() < len {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    fn split(token: &str) -> (&str, &str) {
        let (message, signature) = token.rsplit_once('.').expect("a compact JWT has dots");
        (message, signature)
    }

    fn jwk_key(key: &SigningKey) -> DecodingKey {
        let jwk: Jwk = serde_json::from_value(key.jwk()).expect("jwk parses");
        DecodingKey::from_jwk(&jwk).expect("jwk is an RSA key")
    }

    fn claims() -> Value {
        session_claims(
            "https://example.clerk.accounts.dev",
            "user_1",
            1_700_000_000,
            60,
        )
    }

    #[test]
    fn minted_token_verifies_with_the_published_jwk() {
        let key = SigningKey::generate("ins_test").unwrap();
        let token = key.mint(&claims());
        let (message, signature) = split(&token);
        let ok = jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &jwk_key(&key),
            Algorithm::RS256,
        )
        .unwrap();
        assert!(ok);
    }

    #[test]
    fn minted_token_decodes_with_the_pem_and_carries_header_and_claims() {
        let key = SigningKey::generate("ins_test").unwrap();
        let pem = key.public_key_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(pem.ends_with("-----END PUBLIC KEY-----\n"));
        let decoding = DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap();

        let claims = claims();
        let token = key.mint(&claims);
        let mut validation = Validation::new(Algorithm::RS256);
        // The claims are from 2023 on purpose; this test is about the signature.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let data = jsonwebtoken::decode::<Value>(&token, &decoding, &validation).unwrap();
        assert_eq!(data.claims, claims);
        assert_eq!(data.header.kid.as_deref(), Some("ins_test"));
        assert_eq!(data.header.typ.as_deref(), Some("JWT"));
        assert_eq!(data.header.alg, Algorithm::RS256);
    }

    #[test]
    fn pem_is_the_2048_bit_spki_clerk_ships() {
        // Clerk's PEM loader strips this fixed DER prefix and suffix (clerk-protocol.md §2.3),
        // so a real dashboard key always has them.
        let key = SigningKey::generate("ins_test").unwrap();
        let body: String = key
            .public_key_pem()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(body.starts_with("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"));
        assert!(body.ends_with("IDAQAB"));
    }

    #[test]
    fn jwk_has_clerks_shape_without_padding_or_leading_zeros() {
        let key = SigningKey::generate("ins_shape").unwrap();
        let jwk = key.jwk();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["kid"], "ins_shape");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "RS256");
        assert_eq!(jwk["e"], "AQAB");
        let n = jwk["n"].as_str().unwrap();
        assert!(!n.contains('=') && !n.contains('+') && !n.contains('/'));
        let n = URL_SAFE_NO_PAD.decode(n).unwrap();
        assert_eq!(n.len(), 256);
        assert_ne!(n[0], 0);
        assert_eq!(jwk.as_object().unwrap().len(), 6);
    }

    #[test]
    fn rs384_header_produces_an_rs384_signature() {
        let key = SigningKey::generate("ins_test").unwrap();
        let token = key.sign(&json!({"alg": "RS384", "kid": "ins_test"}), &claims());
        let (message, signature) = split(&token);
        let decoding = jwk_key(&key);
        let verify = |alg| {
            jsonwebtoken::crypto::verify(signature, message.as_bytes(), &decoding, alg).unwrap()
        };
        assert!(verify(Algorithm::RS384));
        assert!(!verify(Algorithm::RS256));
        assert!(!verify(Algorithm::RS512));
    }

    #[test]
    fn rs512_header_produces_an_rs512_signature() {
        let key = SigningKey::generate("ins_test").unwrap();
        let token = key.sign(&json!({"alg": "RS512"}), &claims());
        let (message, signature) = split(&token);
        let ok = jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &jwk_key(&key),
            Algorithm::RS512,
        )
        .unwrap();
        assert!(ok);
    }

    #[test]
    fn forged_alg_header_is_kept_but_signed_with_sha256() {
        let key = SigningKey::generate("ins_test").unwrap();
        let header = json!({"alg": "none", "kid": "ins_test"});
        let token = key.sign(&header, &claims());
        let (message, signature) = split(&token);
        let (encoded_header, _) = message.split_once('.').unwrap();
        let decoded: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(encoded_header).unwrap()).unwrap();
        assert_eq!(decoded, header);
        let ok = jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &jwk_key(&key),
            Algorithm::RS256,
        )
        .unwrap();
        assert!(ok);
    }

    #[test]
    fn tampered_claims_or_signature_fail_verification() {
        let key = SigningKey::generate("ins_test").unwrap();
        let token = key.mint(&claims());
        let (message, signature) = split(&token);
        let decoding = jwk_key(&key);
        let verify = |message: &str, signature: &str| {
            jsonwebtoken::crypto::verify(signature, message.as_bytes(), &decoding, Algorithm::RS256)
                .unwrap_or(false)
        };

        let (header, _) = message.split_once('.').unwrap();
        let mut forged_claims = claims();
        forged_claims["sub"] = json!("user_admin");
        let forged_message = format!(
            "{header}.{}",
            URL_SAFE_NO_PAD.encode(forged_claims.to_string())
        );
        assert!(!verify(&forged_message, signature));

        let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
        sig[10] ^= 0x01;
        assert!(!verify(message, &URL_SAFE_NO_PAD.encode(sig)));

        let other = SigningKey::generate("ins_test").unwrap();
        let ok = jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &jwk_key(&other),
            Algorithm::RS256,
        )
        .unwrap();
        assert!(!ok);
    }

    #[test]
    fn session_claims_have_clerks_v2_shape() {
        let c = session_claims("https://x.clerk.accounts.dev", "user_42", 1_000, 60);
        assert_eq!(c["iss"], "https://x.clerk.accounts.dev");
        assert_eq!(c["sub"], "user_42");
        assert_eq!(c["iat"], 1_000);
        assert_eq!(c["nbf"], 990);
        assert_eq!(c["exp"], 1_060);
        assert_eq!(c["v"], 2);
        let sid = c["sid"].as_str().unwrap();
        let suffix = sid.strip_prefix("sess_").unwrap();
        assert_eq!(suffix.len(), 24);
        assert!(suffix.bytes().all(|b| b.is_ascii_alphanumeric()));
        let jti = c["jti"].as_str().unwrap();
        assert_eq!(jti.len(), 20);
        assert!(jti.bytes().all(|b| b.is_ascii_hexdigit()));
        let again = session_claims("https://x.clerk.accounts.dev", "user_42", 1_000, 60);
        assert_ne!(c["sid"], again["sid"]);
        assert_ne!(c["jti"], again["jti"]);
    }

    #[test]
    fn jwks_json_lists_every_key_in_order() {
        let a = SigningKey::generate("ins_a").unwrap();
        let b = SigningKey::generate("ins_b").unwrap();
        let jwks: Value = serde_json::from_str(&jwks_json([&a, &b])).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], a.jwk());
        assert_eq!(keys[1], b.jwk());
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).unwrap();
        assert!(set.find("ins_b").is_some());
        assert_eq!(jwks_json([]), r#"{"keys":[]}"#);
    }

    #[test]
    fn debug_does_not_print_key_material() {
        let key = SigningKey::generate("ins_dbg").unwrap();
        let printed = format!("{key:?}");
        assert!(printed.contains("ins_dbg"));
        assert!(!printed.contains(&key.jwk()["n"].as_str().unwrap()[..16]));
    }
}
