//! The Svix signature check Clerk webhooks use, as a pure function of (headers, raw body,
//! secret, now).
//!
//! Signed content is `"{id}.{timestamp}.{raw body}"`, HMAC-SHA256 with the key that follows
//! `whsec_` (standard base64), compared in constant time against every `v1,<base64>` entry of the
//! signature header (rotation sends several; other versions are ignored). The timestamp must be
//! within the tolerance in both directions and is checked before the signature, as the Svix
//! libraries do. Header names: `svix-*`, or the Standard Webhooks `webhook-*` equivalents; the
//! `svix-*` form wins when both are present.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;

/// A webhook signing secret (`whsec_<base64>`, or the bare base64).
#[derive(Clone)]
pub struct WebhookSecret {
    key: hmac::Key,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret([redacted])")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("not base64 after the whsec_ prefix")]
    NotBase64,
    #[error("empty key")]
    Empty,
}

impl WebhookSecret {
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let b64 = secret.trim();
        let b64 = b64.strip_prefix("whsec_").unwrap_or(b64);
        let bytes = STANDARD.decode(b64).map_err(|_| SecretError::NotBase64)?;
        if bytes.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// The `v1,<signature>` entry for a message (tests and the fake Clerk sign with it).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!(
            "v1,{}",
            STANDARD.encode(self.tag(id, timestamp, body).as_ref())
        )
    }

    fn tag(&self, id: &str, timestamp: i64, body: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        ctx.sign()
    }
}

/// Why a delivery was refused. `status()` decides 400 versus 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing webhook id, timestamp or signature header")]
    MissingHeaders,
    #[error("timestamp is not a positive integer")]
    BadTimestamp,
    #[error("timestamp outside the tolerance")]
    Stale,
    #[error("no matching v1 signature")]
    Mismatch,
}

impl SignatureError {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::MissingHeaders => "webhook-headers-missing",
            Self::BadTimestamp => "webhook-timestamp-invalid",
            Self::Stale => "webhook-timestamp-out-of-tolerance",
            Self::Mismatch => "webhook-signature-invalid",
        }
    }

    /// Malformed requests are 400; authentication failures (stale or wrong signature) 401.
    pub fn status(self) -> http::StatusCode {
        match self {
            Self::MissingHeaders | Self::BadTimestamp => http::StatusCode::BAD_REQUEST,
            Self::Stale | Self::Mismatch => http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// The three delivery headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub id: &'a str,
    pub timestamp: i64,
    pub signatures: &'a str,
}

fn header<'a>(headers: &'a HeaderMap, svix: &str, standard: &str) -> Option<&'a str> {
    headers
        .get(svix)
        .or_else(|| headers.get(standard))
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Reads the delivery headers (`svix-*` preferred over `webhook-*`).
pub fn delivery(headers: &HeaderMap) -> Result<Delivery<'_>, SignatureError> {
    let id = header(headers, "svix-id", "webhook-id");
    let ts = header(headers, "svix-timestamp", "webhook-timestamp");
    let sig = header(headers, "svix-signature", "webhook-signature");
    let (Some(id), Some(ts), Some(signatures)) = (id, ts, sig) else {
        return Err(SignatureError::MissingHeaders);
    };
    let timestamp: i64 = ts.parse().map_err(|_| SignatureError::BadTimestamp)?;
    if timestamp <= 0 {
        return Err(SignatureError::BadTimestamp);
    }
    Ok(Delivery {
        id,
        timestamp,
        signatures,
    })
}

/// Verifies a delivery against the raw body at `now` (Unix seconds).
pub fn verify(
    delivery: &Delivery<'_>,
    body: &[u8],
    secret: &WebhookSecret,
    now: i64,
    tolerance_seconds: i64,
) -> Result<(), SignatureError> {
    if (now - delivery.timestamp).abs() > tolerance_seconds {
        return Err(SignatureError::Stale);
    }
    let expected = secret.tag(delivery.id, delivery.timestamp, body);
    let matched = delivery
        .signatures
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
        .any(|sig| {
            aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_ref(), &sig).is_ok()
        });
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    // Vector A of clerk-protocol.md section 4.2 (svix@2.5.0 webhook.test.ts).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn d(signatures: &str) -> Delivery<'_> {
        Delivery {
            id: ID,
            timestamp: TS,
            signatures,
        }
    }

    fn secret() -> WebhookSecret {
        WebhookSecret::parse(SECRET).unwrap()
    }

    #[test]
    fn known_answer_vector_signs_and_verifies() {
        assert_eq!(secret().sign(ID, TS, BODY), SIG);
        assert_eq!(verify(&d(SIG), BODY, &secret(), TS, 300), Ok(()));
        let bare = WebhookSecret::parse(SECRET.trim_start_matches("whsec_")).unwrap();
        assert_eq!(
            verify(&d(SIG), BODY, &bare, TS, 300),
            Ok(()),
            "secret without whsec_"
        );
    }

    #[test]
    fn rotation_accepts_any_matching_v1_entry() {
        let decoys = "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=";
        let with_real = format!("{decoys} {SIG} v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=");
        assert_eq!(verify(&d(&with_real), BODY, &secret(), TS, 300), Ok(()));
        assert_eq!(
            verify(&d(decoys), BODY, &secret(), TS, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn malformed_truncated_and_other_versions_fail() {
        for sig in [
            "v1,dawfeoifkpqwoekfpqoekf",
            "v1,g0hM9SsE",
            "v1,",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            assert_eq!(
                verify(&d(sig), BODY, &secret(), TS, 300),
                Err(SignatureError::Mismatch),
                "{sig}"
            );
        }
    }

    #[test]
    fn tampered_body_fails() {
        assert_eq!(
            verify(&d(SIG), br#"{"test": 2432232315}"#, &secret(), TS, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn timestamps_outside_tolerance_fail_both_ways() {
        assert_eq!(
            verify(&d(SIG), BODY, &secret(), TS + 301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&d(SIG), BODY, &secret(), TS - 301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(verify(&d(SIG), BODY, &secret(), TS + 300, 300), Ok(()));
    }

    #[test]
    fn headers_are_read_in_both_namings() {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_static(ID));
        h.insert("webhook-timestamp", HeaderValue::from_static("1614265330"));
        h.insert("webhook-signature", HeaderValue::from_static(SIG));
        assert_eq!(delivery(&h), Ok(d(SIG)));
        h.insert("svix-id", HeaderValue::from_static("msg_other"));
        assert_eq!(delivery(&h).unwrap().id, "msg_other", "svix-* wins");
        let mut missing = HeaderMap::new();
        missing.insert("svix-id", HeaderValue::from_static(ID));
        assert_eq!(delivery(&missing), Err(SignatureError::MissingHeaders));
        let mut bad = h.clone();
        bad.insert("svix-timestamp", HeaderValue::from_static("soon"));
        assert_eq!(delivery(&bad), Err(SignatureError::BadTimestamp));
        bad.insert("svix-timestamp", HeaderValue::from_static("-5"));
        assert_eq!(delivery(&bad), Err(SignatureError::BadTimestamp));
    }

    #[test]
    fn bad_secrets_are_rejected() {
        assert_eq!(
            WebhookSecret::parse("whsec_!!!").unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(
            WebhookSecret::parse("whsec_").unwrap_err(),
            SecretError::Empty
        );
    }
}
