//! Authentication: from a request's token to a verified [`identity::Identity`].
//!
//! - [`token`] finds the token (header or cookie) and does the structural pre-checks that run
//!   before any key lookup.
//! - [`jwks`] holds the verification keys (pinned PEM or a JWKS with background refresh).
//! - [`verify`] is the pure check of signature and claims against a key and a `now`.
//! - [`cache`] remembers verified tokens until they expire.
//! - [`identity`] turns verified claims into the headers sent upstream.
//! - [`policy`] matches routes and checks their requirements.
//! - [`machine`] verifies API keys, M2M and OAuth tokens.
//! - [`Authenticator`] verifies a session token (cache, then keys plus the pure verifier).
//! - [`gate`] is the one call every request path makes: extraction, verification, cookie
//!   freshness, revocation, policy.

pub mod cache;
pub(crate) mod gate;
pub mod identity;
pub mod jwks;
pub(crate) mod machine;
pub mod policy;
pub mod token;
pub mod verify;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::error::ConfigError;
use crate::telemetry::{AuthFailure, Label, Metrics};
use identity::Identity;

/// `[auth]`: how tokens are accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Allowed clock difference for `exp`, `nbf` and `iat`, in milliseconds (0 allowed).
    pub clock_skew_ms: u64,
    /// With authorized parties configured, accept tokens without `azp` (Backend-API-minted).
    pub allow_missing_azp: bool,
    /// Treat `sts = "pending"` sessions as signed out (the SDK default).
    pub pending_as_signed_out: bool,
    /// What to do with client-sent identity headers: `strip` them or `reject` the request.
    pub on_spoofed_header: SpoofPolicy,
    /// Forward the token (`Authorization`, `__session*` and `__client_uat*` cookies) upstream.
    pub forward_token: bool,
    /// Read the token from the `__session` cookie when there is no `Authorization` header.
    pub accept_cookie: bool,
    /// Most verified tokens remembered at once.
    pub token_cache_capacity: u64,
    /// Longest token accepted, in bytes; longer ones are refused as `token-too-large` before
    /// any hashing or decoding. At most `proxy.max_header_bytes`.
    pub max_token_bytes: usize,
}

/// Clerk's SDK sets no limit of its own; custom claims make tokens grow past the 4 KB a cookie
/// holds when they travel in `Authorization`. 64 KiB is the default `proxy.max_header_bytes`.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 64 * 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            clock_skew_ms: 5_000,
            allow_missing_azp: false,
            pending_as_signed_out: true,
            on_spoofed_header: SpoofPolicy::Strip,
            forward_token: false,
            accept_cookie: true,
            token_cache_capacity: 100_000,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.clock_skew_ms > 300_000 {
            return Err(ConfigError::new(
                "auth.clock_skew_ms",
                "more than 5 minutes of skew defeats expiry checks",
            ));
        }
        if self.max_token_bytes < 1024 {
            return Err(ConfigError::new(
                "auth.max_token_bytes",
                "must be at least 1024 (a Clerk session token alone is close to that)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoofPolicy {
    Strip,
    Reject,
}

/// Why a token was not accepted. Each variant has exactly one status, one reason code and one
/// metric label, decided in the refusal mapping (`proxy::rejection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no session token")]
    Missing,
    #[error("malformed token")]
    Invalid,
    #[error("token longer than auth.max_token_bytes")]
    TooLarge,
    #[error("algorithm not allowed or not the key's")]
    InvalidAlgorithm,
    #[error("not a session token")]
    TypeMismatch,
    #[error("bad signature")]
    InvalidSignature,
    #[error("required claim missing or of the wrong type")]
    VerificationFailed,
    #[error("token expired")]
    Expired,
    #[error("token not active yet")]
    NotActiveYet,
    #[error("token issued in the future")]
    IatInTheFuture,
    #[error("issuer is not the configured Clerk instance")]
    InvalidIssuer,
    #[error("authorized party not allowed")]
    InvalidAuthorizedParties,
    #[error("no key with the token's kid")]
    KidMismatch,
    #[error("session is pending")]
    SessionPending,
    #[error("session cookie without __client_uat")]
    NoClientUat,
    #[error("session cookie older than __client_uat")]
    IatBeforeClientUat,
    #[error("no usable verification keys")]
    KeysUnavailable,
    #[error("session revoked or ended")]
    SessionRevoked,
    #[error("user deleted, banned or locked")]
    UserRevoked,
    #[error("session state cannot be checked")]
    SessionCheckUnavailable,
    /// A machine token Clerk reports as revoked.
    #[error("machine token revoked")]
    Revoked,
    /// The Backend API refused clerkgate's own secret key (401) on a machine verification.
    #[error("Backend API refused the secret key")]
    SecretKeyInvalid,
    /// An opaque machine token could not be verified now (5xx, timeout, network, budget).
    #[error("machine token verification unavailable")]
    MachineVerifyUnavailable,
}

impl AuthError {
    /// The Clerk reason code (and metric label).
    pub fn failure(self) -> AuthFailure {
        match self {
            Self::Missing => AuthFailure::SessionTokenMissing,
            Self::Invalid => AuthFailure::TokenInvalid,
            Self::TooLarge => AuthFailure::TokenTooLarge,
            Self::InvalidAlgorithm => AuthFailure::TokenInvalidAlgorithm,
            Self::TypeMismatch => AuthFailure::TokenTypeMismatch,
            Self::InvalidSignature => AuthFailure::TokenInvalidSignature,
            Self::VerificationFailed => AuthFailure::TokenVerificationFailed,
            Self::Expired => AuthFailure::TokenExpired,
            Self::NotActiveYet => AuthFailure::TokenNotActiveYet,
            Self::IatInTheFuture => AuthFailure::TokenIatInTheFuture,
            Self::InvalidIssuer => AuthFailure::TokenInvalidIssuer,
            Self::InvalidAuthorizedParties => AuthFailure::TokenInvalidAuthorizedParties,
            Self::KidMismatch => AuthFailure::JwkKidMismatch,
            Self::SessionPending => AuthFailure::SessionPending,
            Self::NoClientUat => AuthFailure::SessionTokenButNoClientUat,
            Self::IatBeforeClientUat => AuthFailure::SessionTokenIatBeforeClientUat,
            Self::KeysUnavailable => AuthFailure::KeysUnavailable,
            Self::SessionRevoked => AuthFailure::SessionRevoked,
            Self::UserRevoked => AuthFailure::UserRevoked,
            Self::SessionCheckUnavailable => AuthFailure::SessionCheckUnavailable,
            Self::Revoked => AuthFailure::TokenRevoked,
            Self::SecretKeyInvalid => AuthFailure::SecretKeyInvalid,
            Self::MachineVerifyUnavailable => AuthFailure::MachineVerifyUnavailable,
        }
    }

    /// A failure of a dependency, not of the token: answered 503 and never hidden behind
    /// "anonymous" on optional routes.
    pub fn is_outage(self) -> bool {
        matches!(
            self,
            Self::KeysUnavailable
                | Self::SessionCheckUnavailable
                | Self::SecretKeyInvalid
                | Self::MachineVerifyUnavailable
        )
    }
}

/// Milliseconds since the Unix epoch, the unit every claim comparison uses.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Verifies session tokens: cache first, then keys plus the pure verifier. Verification only:
/// requests go through [`gate::Gate`], which adds the cookie rules, revocation and policy.
pub struct Authenticator {
    verifier: verify::Verifier,
    keys: Arc<jwks::KeyStore>,
    cache: cache::TokenCache,
    builder: identity::IdentityBuilder,
    metrics: Arc<Metrics>,
    max_token_bytes: usize,
}

impl Authenticator {
    pub fn new(
        verifier: verify::Verifier,
        keys: Arc<jwks::KeyStore>,
        cache: cache::TokenCache,
        builder: identity::IdentityBuilder,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            verifier,
            keys,
            cache,
            builder,
            metrics,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }

    /// Refuse tokens longer than `max` bytes (`auth.max_token_bytes`).
    pub fn with_max_token_bytes(mut self, max: usize) -> Self {
        self.max_token_bytes = max;
        self
    }

    pub fn verifier(&self) -> &verify::Verifier {
        &self.verifier
    }

    pub fn keys(&self) -> &Arc<jwks::KeyStore> {
        &self.keys
    }

    pub fn cache(&self) -> &cache::TokenCache {
        &self.cache
    }

    pub fn builder(&self) -> &identity::IdentityBuilder {
        &self.builder
    }

    /// Verifies one token: signature and claims, from the cache while still valid. Neither
    /// the cookie rules (`__client_uat`) nor revocation: callers go through [`gate::Gate`].
    pub async fn authenticate(&self, token: &str, now_ms: u64) -> Result<Arc<Identity>, AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge);
        }
        let cache_key = cache::TokenCache::key(token);
        if let Some(identity) = self.cache.get(&cache_key) {
            // A hit is trusted only while it could still be verified now: within `exp` plus
            // skew (the cache's eviction is lazy), with keys usable (an outage past the stale
            // bound fails closed for cached tokens too) and no key retired since.
            if identity.usable_at(now_ms, self.verifier.skew_ms())
                && identity.key_generation == self.keys.generation()
                && self.keys.ready()
            {
                self.metrics.token_cache_hits.inc();
                return Ok(identity);
            }
            self.cache.invalidate(&cache_key);
        }
        self.metrics.token_cache_misses.inc();
        // A span only for a miss (and only when traces are exported): hits stay span-free.
        let span = crate::telemetry::otel::verify_span();
        // Boxed: the miss path (key fetch included) stays out of every cache hit's future.
        let verified = Box::pin(self.verify_uncached(token, cache_key, now_ms));
        let result = tracing::Instrument::instrument(verified, span.clone()).await;
        if let Err(e) = &result {
            crate::telemetry::otel::record_error(&span, Label::as_label(e.failure()));
        }
        result
    }

    /// Verifies a token the cache did not hold, and caches the identity.
    async fn verify_uncached(
        &self,
        token: &str,
        cache_key: cache::CacheKey,
        now_ms: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        let generation = self.keys.generation();
        let parsed = token::parse(token)?;
        let may_refetch = self.verifier.issuer_allowed(parsed.unverified_issuer());
        let key = self
            .keys
            .key_for(parsed.header.kid.as_deref(), may_refetch)
            .await?;
        let claims = self.verifier.verify(parsed, &key, now_ms)?;
        let mut identity = self.builder.build(claims);
        identity.key_generation = generation;
        let identity = Arc::new(identity);
        self.cache.insert(cache_key, identity.clone());
        Ok(identity)
    }
}
