//! What only the hostile-input tests need (the shared environment, raw client and raw upstream
//! are in [`crate::support`]): the route table every bypass attempt tries to cross, and a
//! pinned key that signs arbitrary bytes.

use std::sync::OnceLock;

use base64::Engine as _;

use crate::support::env::b64;

/// A public prefix and an admin-only prefix: the two sides every bypass attempt tries to cross.
pub const ROUTES: &str = r#"
[[routes]]
path = "/public/**"
auth = "public"
[[routes]]
path = "/admin/**"
org_role = "admin"
"#;

/// An RSA key of the tests' own, given to clerkgate as a pinned PEM (`clerk.jwt_key`), that
/// signs arbitrary header and payload bytes: `SigningKey` signs `serde_json::Value`s, which
/// cannot hold duplicate members or number spellings such as `1e400`.
pub struct PinnedKey {
    pair: aws_lc_rs::rsa::KeyPair,
    pem: String,
}

impl PinnedKey {
    /// One per process: RSA key generation is slow in a debug build.
    pub fn get() -> &'static PinnedKey {
        static KEY: OnceLock<PinnedKey> = OnceLock::new();
        KEY.get_or_init(|| {
            use aws_lc_rs::encoding::AsDer;
            use aws_lc_rs::signature::KeyPair as _;
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA key");
            let der = pair.public_key().as_der().expect("SPKI");
            let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                pem.push('\n');
            }
            pem.push_str("-----END PUBLIC KEY-----\n");
            PinnedKey { pair, pem }
        })
    }

    /// The `[clerk]` TOML that pins this key.
    pub fn toml(&self) -> String {
        format!("[clerk]\njwt_key = \"\"\"\n{}\"\"\"\n", self.pem)
    }

    /// RS256 over `base64url(header) "." base64url(payload)`, both taken byte for byte.
    pub fn sign(&self, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", b64(header), b64(payload));
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        format!("{input}.{}", b64(sig))
    }
}
