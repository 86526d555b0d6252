//! Hostile input, end to end: the real clerkgate between a fake Clerk and a recording upstream,
//! fed malformed and adversarial tokens, headers, paths, HTTP/1.1 and HTTP/2 framing and webhook
//! deliveries. Every refusal asserts the status, the reason code and that the upstream received
//! nothing; every pass asserts what the upstream actually received.
//!
//! `tests/it/security.rs` already covers the common cases (alg none/HS256/ES256/PS256/RS384,
//! forged and unpublished kids, jku/x5u/jwk headers, cross-instance keys and issuers, exact
//! azp, pending sessions, basic time claims, the usual path tricks, spoofed headers in the
//! usual spellings, one CR/LF claim); this module adds what it does not.

mod edges;
mod headers;
mod kit;
mod paths;
mod protocol;
mod tokens;
mod webhooks;
