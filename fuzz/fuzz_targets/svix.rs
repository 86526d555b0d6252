//! Svix webhook signatures: `clerkgate::webhook::signature::{WebhookSecret::parse, delivery,
//! verify}` on arbitrary delivery headers and bodies.
//!
//! Input: `Name: value` header lines, an empty line, then the raw body. Two placeholders make
//! acceptance reachable: `@NOW@` in a header becomes the current time, and `@SIG@` becomes the
//! correct base64 HMAC of the delivery as it will be read (so the fuzzer can put a correct
//! signature among broken entries, next to another version, with odd separators...). A
//! `secret:` header replaces the fixed signing secret (and fuzzes `WebhookSecret::parse`).
//!
//! Checks: `delivery` returns a non-empty trimmed id and a positive timestamp; `verify` accepts
//! only when the timestamp is within the tolerance and some space-separated `v1,<base64>` entry
//! decodes to the HMAC-SHA256 of `id.timestamp.body`, computed here independently; and when the
//! input holds exactly such an entry within the tolerance, `verify` accepts.
#![no_main]

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clerkgate::webhook::signature::{WebhookSecret, delivery, verify};
use clerkgate_fuzz::header_block;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: i64 = 1_700_000_000;
const TOLERANCE: i64 = 300;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &b""[..]),
    };
    let now_text = NOW.to_string();
    let head = replace(head, b"@NOW@", now_text.as_bytes());
    let mut headers = header_block(&head);

    let secret_text = headers
        .get("secret")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(SECRET)
        .to_owned();
    headers.remove("secret");
    let Ok(secret) = WebhookSecret::parse(&secret_text) else {
        return;
    };
    let key_bytes = key_model(&secret_text);

    // Fill in @SIG@ with the signature of the delivery as clerkgate will read it.
    let placeholder = b"@SIG@";
    let with_placeholder = headers
        .iter()
        .any(|(_, v)| contains(v.as_bytes(), placeholder));
    if with_placeholder && let Ok(d) = delivery(&headers) {
        let tag = hmac_model(&key_bytes, d.id, d.timestamp, body);
        let b64 = STANDARD.encode(tag);
        let mut filled = http::HeaderMap::new();
        for (name, value) in &headers {
            let bytes = replace(value.as_bytes(), placeholder, b64.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                filled.append(name.clone(), v);
            }
        }
        headers = filled;
    }

    let Ok(d) = delivery(&headers) else {
        return;
    };
    assert!(!d.id.is_empty() && d.id == d.id.trim(), "id {:?}", d.id);
    assert!(!d.signatures.is_empty() && d.signatures == d.signatures.trim());
    assert!(d.timestamp > 0);
    let tag = hmac_model(&key_bytes, d.id, d.timestamp, body);
    let within = (NOW - d.timestamp).abs() <= TOLERANCE;
    let has_match = d
        .signatures
        .split(' ')
        .filter_map(|e| e.strip_prefix("v1,"))
        .any(|sig| STANDARD.decode(sig).is_ok_and(|s| s == tag));
    let got = verify(&d, body, &secret, NOW, TOLERANCE);
    assert_eq!(
        got.is_ok(),
        within && has_match,
        "verify {got:?}; within tolerance {within}, matching v1 entry {has_match}: {d:?}"
    );
    // The library's own signer agrees with the model.
    assert_eq!(
        secret.sign(d.id, d.timestamp, body),
        format!("v1,{}", STANDARD.encode(tag))
    );
});

/// The key: the base64 after an optional `whsec_` prefix (surrounding whitespace ignored).
fn key_model(secret: &str) -> Vec<u8> {
    let s = secret.trim();
    let s = s.strip_prefix("whsec_").unwrap_or(s);
    STANDARD
        .decode(s)
        .expect("parse accepted it, so it is base64")
}

fn hmac_model(key: &[u8], id: &str, ts: i64, body: &[u8]) -> Vec<u8> {
    let mut content = format!("{id}.{ts}.").into_bytes();
    content.extend_from_slice(body);
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &content)
        .as_ref()
        .to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}
