//! Parsing of Clerk publishable keys (`pk_test_…` / `pk_live_…`) into the instance's
//! Frontend API host, its instance type, the issuer its session tokens carry, and the
//! suffix Clerk appends to its cookie names.
//!
//! The rules follow `@clerk/shared` `parsePublishableKey` / `isValidDecodedPublishableKey`
//! (docs/clerk-protocol.md section 2.5). The key is operator configuration, but it decides
//! which issuer we accept, so anything that does not match the format exactly is an error
//! rather than a best-effort guess.

use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, digest};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};

const LIVE_PREFIX: &str = "pk_live_";
const TEST_PREFIX: &str = "pk_test_";

/// Clerk publishes keys with and without `=` padding (both appear in the SDK's own test
/// vectors), so decoding accepts either. Trailing bits must still be zero: a key Clerk
/// issued is always canonically encoded.
const KEY_PAYLOAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Which kind of Clerk instance a publishable key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceType {
    /// `pk_test_` keys.
    Development,
    /// `pk_live_` keys.
    Production,
}

/// A parsed and validated publishable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishableKey {
    /// The Frontend API host, e.g. `clerk.example.com` or `foo-bar-13.clerk.accounts.dev`.
    pub frontend_api: String,
    pub instance_type: InstanceType,
    /// Suffix of Clerk's suffixed cookie names (`__session_<suffix>`, ...); see [`cookie_suffix`].
    pub cookie_suffix: String,
}

/// Why a string is not a valid publishable key. The key itself is deliberately not carried:
/// errors end up in logs, and the variant says everything an operator needs to fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishableKeyError {
    #[error("publishable key must start with `pk_test_` or `pk_live_`")]
    WrongPrefix,
    #[error("publishable key must have exactly 3 `_`-separated parts, found {found}")]
    WrongPartCount { found: usize },
    #[error("publishable key payload is not valid standard base64")]
    NotBase64,
    #[error("publishable key payload does not decode to UTF-8 text")]
    NotUtf8,
    #[error("decoded publishable key does not end with `$`")]
    MissingTrailingDollar,
    #[error("decoded publishable key contains a `$` before the trailing one")]
    ExtraDollar,
    #[error("decoded publishable key host has no `.`")]
    HostWithoutDot,
}

impl PublishableKey {
    /// Parses `pk_test_<b64>` / `pk_live_<b64>` where `<b64>` is standard base64 (padding
    /// optional) of `"<frontend-api-host>$"`.
    pub fn parse(key: &str) -> Result<Self, PublishableKeyError> {
        let instance_type = if key.starts_with(LIVE_PREFIX) {
            InstanceType::Production
        } else if key.starts_with(TEST_PREFIX) {
            InstanceType::Development
        } else {
            return Err(PublishableKeyError::WrongPrefix);
        };

        // The JS SDK takes `key.split("_")[2]`; insisting on exactly three parts means a
        // stray `_` (not in the standard base64 alphabet anyway) is reported as such instead
        // of silently truncating the payload.
        let parts: Vec<&str> = key.split('_').collect();
        let [_, _, payload] = parts.as_slice() else {
            return Err(PublishableKeyError::WrongPartCount { found: parts.len() });
        };

        let decoded = KEY_PAYLOAD
            .decode(payload)
            .map_err(|_| PublishableKeyError::NotBase64)?;
        let decoded = String::from_utf8(decoded).map_err(|_| PublishableKeyError::NotUtf8)?;

        let host = decoded
            .strip_suffix('$')
            .ok_or(PublishableKeyError::MissingTrailingDollar)?;
        if host.contains('$') {
            return Err(PublishableKeyError::ExtraDollar);
        }
        if !host.contains('.') {
            return Err(PublishableKeyError::HostWithoutDot);
        }

        Ok(Self {
            frontend_api: host.to_owned(),
            instance_type,
            cookie_suffix: cookie_suffix(key),
        })
    }

    /// `https://<frontend_api>`, the `iss` of this instance's session tokens.
    pub fn issuer(&self) -> String {
        format!("https://{}", self.frontend_api)
    }
}

/// First 8 chars of standard base64(SHA-1(key string)) with '+'->'-' and '/'->'_'.
///
/// This mirrors `@clerk/shared` `getCookieSuffix`; SHA-1 is only a short, stable name
/// derivation here (it must match what Clerk's frontend writes), not a security boundary.
pub fn cookie_suffix(publishable_key: &str) -> String {
    let hash = digest(&SHA1_FOR_LEGACY_USE_ONLY, publishable_key.as_bytes());
    STANDARD
        .encode(hash.as_ref())
        .chars()
        .take(8)
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_keys_from_the_sdk_vectors_parse() {
        // (key, frontend_api, instance type, cookie suffix if the spec gives one)
        let cases: &[(&str, &str, InstanceType, Option<&str>)] = &[
            (
                "pk_live_ZmFrZS1jbGVyay10ZXN0LmNsZXJrLmFjY291bnRzLmRldiQ=",
                "fake-clerk-test.clerk.accounts.dev",
                InstanceType::Production,
                Some("qReyu04C"),
            ),
            (
                "pk_test_Zm9vLWJhci0xMy5jbGVyay5hY2NvdW50cy5kZXYk",
                "foo-bar-13.clerk.accounts.dev",
                InstanceType::Development,
                None,
            ),
            (
                "pk_test_Y2xlcmsuY2xlcmsuZGV2JA",
                "clerk.clerk.dev",
                InstanceType::Development,
                Some("QvfNY2dr"),
            ),
            (
                "pk_test_ZW5vdWdoLWFscGFjYS04Mi5jbGVyay5hY2NvdW50cy5sY2xjbGVyay5jb20k",
                "enough-alpaca-82.clerk.accounts.lclclerk.com",
                InstanceType::Development,
                Some("jtYvyt_H"),
            ),
            (
                "pk_test_eHh4eHh4LXhhYWFhYS1hYS5jbGVyay5hY2NvdW50cy5sY2xjbGVyay5jb20k",
                "xxxxxx-xaaaaa-aa.clerk.accounts.lclclerk.com",
                InstanceType::Development,
                Some("tZJdb-5s"),
            ),
        ];
        for &(key, frontend_api, instance_type, suffix) in cases {
            let parsed = PublishableKey::parse(key)
                .unwrap_or_else(|e| panic!("{key} should parse, got {e:?}"));
            assert_eq!(parsed.frontend_api, frontend_api, "{key}");
            assert_eq!(parsed.instance_type, instance_type, "{key}");
            assert_eq!(parsed.issuer(), format!("https://{frontend_api}"), "{key}");
            assert_eq!(parsed.cookie_suffix, cookie_suffix(key), "{key}");
            assert_eq!(parsed.cookie_suffix.len(), 8, "{key}");
            if let Some(suffix) = suffix {
                assert_eq!(parsed.cookie_suffix, suffix, "{key}");
            }
        }
    }

    #[test]
    fn invalid_keys_are_rejected_with_a_precise_reason() {
        use PublishableKeyError::*;
        let cases: &[(&str, PublishableKeyError)] = &[
            // The three invalid vectors of section 2.5.
            (
                "pk_live_ZmFrZS1jbGVyay1tYWxmb3JtZWQuY2xlcmsuYWNjb3VudHMuZGV2JGV4dHJh",
                MissingTrailingDollar,
            ),
            (
                "pk_live_ZmFrZS1jbGVyay1tdWx0aXBsZS5jbGVyay5hY2NvdW50cy5kZXYkJA==",
                ExtraDollar,
            ),
            ("pk_live_aW52YWxpZGtleSQ=", HostWithoutDot),
            // Prefixes.
            ("", WrongPrefix),
            ("sk_test_Y2xlcmsuY2xlcmsuZGV2JA", WrongPrefix),
            ("pk_prod_Y2xlcmsuY2xlcmsuZGV2JA", WrongPrefix),
            ("PK_TEST_Y2xlcmsuY2xlcmsuZGV2JA", WrongPrefix),
            (" pk_test_Y2xlcmsuY2xlcmsuZGV2JA", WrongPrefix),
            // Part count: an extra `_` anywhere after the prefix.
            (
                "pk_test_Y2xlcmsuY2xlcmsuZGV2JA_",
                WrongPartCount { found: 4 },
            ),
            (
                "pk_test_Y2xlcmsu_Y2xlcmsuZGV2JA",
                WrongPartCount { found: 4 },
            ),
            // Payload encoding.
            ("pk_test_Y2xlcmsuY2xlcmsuZGV2JA!", NotBase64),
            ("pk_test_Y2xlcmsuY2xlcmsuZGV2JA ", NotBase64),
            // URL-safe alphabet is not standard base64 (`-` here).
            ("pk_test_Y2xlcmsuY2xlcmsuZGV2JA-", NotBase64),
            // Nonzero trailing bits (`JB` instead of `JA`).
            ("pk_test_Y2xlcmsuY2xlcmsuZGV2JB", NotBase64),
            // 0xff 0xfe 0x24 ("\xff\xfe$"): valid base64, not UTF-8.
            ("pk_test__/4k", WrongPartCount { found: 4 }),
            ("pk_test_//4k", NotUtf8),
            // Decoded-text rules.
            ("pk_test_", MissingTrailingDollar), // empty payload decodes to ""
            ("pk_test_JA", HostWithoutDot),      // "$"
            ("pk_test_JCQ", ExtraDollar),        // "$$"
            ("pk_test_Y2xlcmsuZGV2", MissingTrailingDollar), // "clerk.dev"
            ("pk_test_Y2xlcmskLmRldiQ", ExtraDollar), // "clerk$.dev$"
        ];
        for (key, expected) in cases {
            assert_eq!(
                PublishableKey::parse(key).as_ref(),
                Err(expected),
                "{key:?}"
            );
        }
    }

    #[test]
    fn padding_is_optional() {
        let padded =
            PublishableKey::parse("pk_test_Y2xlcmsuY2xlcmsuZGV2JA==").map(|k| k.frontend_api);
        let unpadded =
            PublishableKey::parse("pk_test_Y2xlcmsuY2xlcmsuZGV2JA").map(|k| k.frontend_api);
        assert_eq!(padded, Ok("clerk.clerk.dev".to_owned()));
        assert_eq!(unpadded, Ok("clerk.clerk.dev".to_owned()));
    }

    #[test]
    fn cookie_suffix_is_derived_from_the_exact_key_string() {
        // The padded and unpadded spellings name the same instance but hash differently,
        // which is what Clerk's frontend does too.
        assert_eq!(cookie_suffix("pk_test_Y2xlcmsuY2xlcmsuZGV2JA"), "QvfNY2dr");
        assert_ne!(
            cookie_suffix("pk_test_Y2xlcmsuY2xlcmsuZGV2JA=="),
            "QvfNY2dr"
        );
        assert_eq!(
            cookie_suffix("pk_live_ZmFrZS1jbGVyay10ZXN0LmNsZXJrLmFjY291bnRzLmRldiQ="),
            "qReyu04C"
        );
    }

    #[test]
    fn error_messages_do_not_echo_the_key() {
        let key = "pk_live_aW52YWxpZGtleSQ=";
        let err = PublishableKey::parse(key).map(|_| ()).err();
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(!message.is_empty());
        assert!(!message.contains("aW52YWxpZGtleSQ"));
    }
}
