//! Machine credentials: API keys, M2M tokens and OAuth access tokens, classified and verified as
//! `@clerk/backend` 3.x does (`tokens/machine.ts`, `verifyMachineAuthToken`), with the stricter
//! rules a gateway needs.
//!
//! Classification ([`classify`]) follows `getMachineTokenType`/`isMachineToken`: the `mt_`,
//! `oat_` and `ak_` prefixes first, then JWT forms (`sub` starting `mch_` is M2M, header `typ`
//! `at+jwt`/`application/at+jwt` is OAuth), and anything else is a session token. A route's
//! `accepts` ([`Accepts`]) decides which types it takes, as `acceptsToken` does; machine tokens
//! are only read from `Authorization`.
//!
//! Verification ([`MachineAuth`]):
//! - opaque tokens (`ak_`, `mt_`, `oat_`): one Backend API call (`POST /api_keys/verify`,
//!   `/m2m_tokens/verify`, `/oauth_applications/access_tokens/verify`, no `/v1`, as the SDK)
//!   per distinct token, concurrent requests for one token joined into that call. The verdict
//!   is cached under the SHA-256 of the token: a pass for `machine.cache_ttl_seconds` and never
//!   past the token's `expiration`, a refusal for `machine.negative_cache_seconds`. Timeouts,
//!   5xx, network errors, an exhausted budget and unreadable answers are 503 and never cached.
//!   Stricter than the SDK: `revoked: true` / `expired: true` in a 200 answer are refused.
//! - JWT forms: verified locally with the instance keys, the `typ`/`cat` rules of the SDK, plus
//!   the `iss` check the SDK skips; OAuth `aud` against `machine.audience` as
//!   `assertOAuthAudienceClaim`.
//! - M2M tokens (both forms) must list `machine.machine_id` in their scopes when it is set
//!   (stricter than the SDK: with the instance secret key, Clerk verifies any token of the
//!   instance).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::de::{self, Deserializer};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::identity::HeadersConfig;
use super::jwks::KeyStore;
use super::token;
use super::verify::Verifier;
use super::{AuthError, DEFAULT_MAX_TOKEN_BYTES};
use crate::clerk::api::{BackendApi, Call, CallError};
use crate::config::error::ConfigError;
use crate::secret::Secret;
use crate::telemetry::{ApiEndpoint, MachineResult, MachineTokenLabel, Metrics};

/// `TokenType` of `@clerk/backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenType {
    SessionToken,
    ApiKey,
    M2mToken,
    OauthToken,
}

impl TokenType {
    pub const ALL: [TokenType; 4] = [
        Self::SessionToken,
        Self::ApiKey,
        Self::M2mToken,
        Self::OauthToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionToken => "session_token",
            Self::ApiKey => "api_key",
            Self::M2mToken => "m2m_token",
            Self::OauthToken => "oauth_token",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn label(self) -> MachineTokenLabel {
        match self {
            Self::ApiKey => MachineTokenLabel::ApiKey,
            Self::M2mToken | Self::SessionToken => MachineTokenLabel::M2mToken,
            Self::OauthToken => MachineTokenLabel::OauthToken,
        }
    }
}

const M2M_PREFIX: &str = "mt_";
const OAUTH_PREFIX: &str = "oat_";
const API_KEY_PREFIX: &str = "ak_";
const M2M_SUBJECT_PREFIX: &str = "mch_";
const OAUTH_TYPES: [&str; 2] = ["at+jwt", "application/at+jwt"];
/// The M2M JWT category (`cat` header).
const CAT_M2M: &str = "cl_B7d4PD333AAA";

/// `isJwtFormat`: three non-empty base64url segments.
pub(crate) fn is_jwt_format(token: &str) -> bool {
    let mut n = 0;
    for part in token.split('.') {
        n += 1;
        if n > 3
            || part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    n == 3
}

/// The decoded header and payload of a JWT-format token (`decodeJwt`), nothing verified.
fn decode_unverified(token: &str) -> Option<(Value, Value)> {
    let b64 = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let mut parts = token.split('.');
    let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
    // `TextDecoder` replaces invalid UTF-8 rather than failing; so do we.
    let json = |seg: &str| -> Option<Value> {
        let bytes = b64.decode(seg).ok()?;
        serde_json::from_str(&String::from_utf8_lossy(&bytes)).ok()
    };
    let header = json(h)?;
    let payload = json(p)?;
    b64.decode(s).ok()?;
    Some((header, payload))
}

fn is_m2m_jwt(header_payload: &Option<(Value, Value)>) -> bool {
    header_payload.as_ref().is_some_and(|(_, p)| {
        p.get("sub")
            .and_then(Value::as_str)
            .is_some_and(|s| s.starts_with(M2M_SUBJECT_PREFIX))
    })
}

fn is_oauth_jwt(header_payload: &Option<(Value, Value)>) -> bool {
    header_payload.as_ref().is_some_and(|(h, _)| {
        h.get("typ")
            .and_then(Value::as_str)
            .is_some_and(|t| OAUTH_TYPES.contains(&t))
    })
}

/// The SDK's classification of a header token: `getMachineTokenType` for machine tokens
/// (`isMachineToken`), `session_token` for everything else.
pub(crate) fn classify(token: &str) -> TokenType {
    let decoded = if is_jwt_format(token) {
        decode_unverified(token)
    } else {
        None
    };
    if token.starts_with(M2M_PREFIX) || is_m2m_jwt(&decoded) {
        TokenType::M2mToken
    } else if token.starts_with(OAUTH_PREFIX) || is_oauth_jwt(&decoded) {
        TokenType::OauthToken
    } else if token.starts_with(API_KEY_PREFIX) {
        TokenType::ApiKey
    } else {
        TokenType::SessionToken
    }
}

/// A route's `accepts`: the token types it takes (`acceptsToken`). A list, or `"any"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepts {
    any: bool,
    bits: u8,
}

impl Default for Accepts {
    fn default() -> Self {
        Self::SESSION_ONLY
    }
}

impl Accepts {
    pub const SESSION_ONLY: Accepts = Accepts {
        any: false,
        bits: 1,
    };
    pub const ANY: Accepts = Accepts {
        any: true,
        bits: 0b1111,
    };

    pub fn list(types: &[TokenType]) -> Self {
        Self {
            any: false,
            bits: types.iter().fold(0, |b, t| b | t.bit()),
        }
    }

    pub fn accepts(self, t: TokenType) -> bool {
        self.bits & t.bit() != 0
    }

    /// Today's behaviour, unchanged: only session tokens.
    pub fn is_session_only(self) -> bool {
        self == Self::SESSION_ONLY
    }

    pub fn is_empty(self) -> bool {
        self.bits == 0
    }

    pub fn is_any(self) -> bool {
        self.any
    }

    /// What both of two matching rules accept (the stricter combination).
    pub fn intersect(self, other: Accepts) -> Accepts {
        Accepts {
            any: self.any && other.any,
            bits: self.bits & other.bits,
        }
    }

    /// Whether some machine type is accepted.
    pub fn any_machine(self) -> bool {
        self.bits & !TokenType::SessionToken.bit() != 0
    }
}

impl Serialize for Accepts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.any {
            return s.serialize_str("any");
        }
        let types: Vec<TokenType> = TokenType::ALL
            .into_iter()
            .filter(|t| self.accepts(*t))
            .collect();
        let mut seq = s.serialize_seq(Some(types.len()))?;
        for t in types {
            seq.serialize_element(&t)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Accepts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            List(Vec<TokenType>),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom(
                "expected \"any\" or a list of session_token, api_key, m2m_token, oauth_token",
            )
        })? {
            Raw::Name(n) if n == "any" => Ok(Self::ANY),
            Raw::Name(n) => Err(de::Error::custom(format!(
                "{n:?}: expected \"any\" or a list such as [\"{n}\"]"
            ))),
            Raw::List(types) => Ok(Self::list(&types)),
        }
    }
}

/// `[machine]`: verifying machine credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `CLERK_MACHINE_SECRET_KEY`: the bearer of `/m2m_tokens/verify` when set (Clerk then also
    /// checks the token was issued to this machine); the instance secret key otherwise.
    pub machine_secret_key: Option<Secret>,
    /// This service's machine (`mch_…`): M2M tokens must list it in their scopes.
    pub machine_id: String,
    /// Deadline of one verification call.
    pub verify_timeout_ms: u64,
    /// How long a verified opaque token is trusted without asking Clerk again; never past the
    /// token's own expiration. Clerk sends no webhook when these tokens are revoked: this is
    /// the revocation delay.
    pub cache_ttl_seconds: u64,
    /// How long a refused opaque token is refused without asking again.
    pub negative_cache_seconds: u64,
    /// OAuth access tokens (JWT and opaque): when non-empty, `aud` must intersect it.
    pub audience: Vec<String>,
    /// Most verdicts cached at once (passes and refusals together).
    pub cache_capacity: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            machine_secret_key: None,
            machine_id: String::new(),
            verify_timeout_ms: 3000,
            cache_ttl_seconds: 30,
            negative_cache_seconds: 5,
            audience: Vec::new(),
            cache_capacity: 100_000,
        }
    }
}

impl Config {
    /// `cache_ttl_seconds`.
    pub fn cache_ttl(&self) -> Duration {
        Duration::from_secs(self.cache_ttl_seconds)
    }

    /// `negative_cache_seconds`.
    pub fn negative_cache(&self) -> Duration {
        Duration::from_secs(self.negative_cache_seconds)
    }

    /// `verify_timeout_ms`.
    pub fn verify_timeout(&self) -> Duration {
        Duration::from_millis(self.verify_timeout_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let valid = self.machine_id.starts_with(M2M_SUBJECT_PREFIX)
            && crate::clerk::api::is_id(&self.machine_id);
        if !self.machine_id.is_empty() && !valid {
            return Err(ConfigError::new(
                "machine.machine_id",
                "must be a machine id (mch_…) or empty",
            ));
        }
        if self.verify_timeout_ms == 0 || self.verify_timeout_ms > 60_000 {
            return Err(ConfigError::new(
                "machine.verify_timeout_ms",
                "must be between 1 and 60000",
            ));
        }
        if self.cache_ttl_seconds > 3600 {
            return Err(ConfigError::new(
                "machine.cache_ttl_seconds",
                "at most 3600: it is the delay before a revoked token is refused",
            ));
        }
        if self.negative_cache_seconds > 3600 {
            return Err(ConfigError::new(
                "machine.negative_cache_seconds",
                "at most 3600",
            ));
        }
        if self.audience.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                "machine.audience",
                "entries must not be empty",
            ));
        }
        if self
            .machine_secret_key
            .as_ref()
            .is_some_and(|k| k.expose().is_empty())
        {
            return Err(ConfigError::new(
                "machine.machine_secret_key",
                "must not be empty when set",
            ));
        }
        Ok(())
    }
}

/// A verified machine token: who it is, and the headers sent upstream for it.
#[derive(Debug)]
pub struct Principal {
    pub token_type: TokenType,
    pub id: String,
    pub subject: String,
    pub scopes: Vec<String>,
    pub client_id: Option<String>,
    pub name: Option<String>,
    /// Unix milliseconds after which the token is expired (`None`: never).
    pub expiration_ms: Option<u64>,
    /// `machine.machine_id` is unset or among the scopes of this M2M token.
    pub machine_scope_ok: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Principal {
    pub fn user_id(&self) -> Option<&str> {
        match self.token_type {
            TokenType::OauthToken => Some(&self.subject),
            _ => self.subject.starts_with("user_").then_some(&self.subject),
        }
    }

    pub fn org_id(&self) -> Option<&str> {
        (self.token_type == TokenType::ApiKey && self.subject.starts_with("org_"))
            .then_some(&self.subject)
    }

    pub fn machine_id(&self) -> Option<&str> {
        match self.token_type {
            TokenType::M2mToken => Some(&self.subject),
            TokenType::ApiKey if self.subject.starts_with(M2M_SUBJECT_PREFIX) => {
                Some(&self.subject)
            }
            _ => None,
        }
    }

    /// Every listed scope is among the token's.
    pub fn has_scopes(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|w| self.scopes.iter().any(|s| s == w))
    }

    /// Inserts the identity headers of this principal (computed once, when verified).
    pub fn insert_headers(&self, h: &mut HeaderMap) {
        for (name, value) in &self.headers {
            h.insert(name.clone(), value.clone());
        }
    }

    /// The local API's answer for a verified machine token (`POST /v1/tokens/verify`).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "object": "verified_token",
            "token_type": self.token_type.as_str(),
            "id": self.id,
            "subject": self.subject,
            "user_id": self.user_id(),
            "org_id": self.org_id(),
            "machine_id": self.machine_id(),
            "client_id": self.client_id,
            "name": self.name,
            "scopes": self.scopes,
            "expiration": self.expiration_ms,
        })
    }

    /// The identity headers, as a list.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }
}

/// The header names for machine principals, parsed once.
#[derive(Debug, Clone)]
pub struct HeaderNames {
    token_type: HeaderName,
    user_id: HeaderName,
    org_id: HeaderName,
    machine_id: HeaderName,
    client_id: HeaderName,
    token_id: HeaderName,
    scopes: HeaderName,
    token_name: HeaderName,
}

fn name(n: &str) -> HeaderName {
    HeaderName::from_bytes(n.as_bytes()).unwrap_or(HeaderName::from_static("x-clerkgate-invalid"))
}

impl HeaderNames {
    pub fn new(c: &HeadersConfig) -> Self {
        Self {
            token_type: name(&c.token_type),
            user_id: name(&c.user_id),
            org_id: name(&c.org_id),
            machine_id: name(&c.machine_id),
            client_id: name(&c.client_id),
            token_id: name(&c.token_id),
            scopes: name(&c.scopes),
            token_name: name(&c.token_name),
        }
    }

    /// The `X-Clerk-Token-Type` header name (sent for session tokens too).
    pub fn token_type(&self) -> &HeaderName {
        &self.token_type
    }
}

/// A verified principal before its headers are built.
struct Parts {
    token_type: TokenType,
    id: String,
    subject: String,
    scopes: Vec<String>,
    client_id: Option<String>,
    name: Option<String>,
    expiration_ms: Option<u64>,
}

/// Verdicts on opaque tokens kept in the cache.
#[derive(Debug, Clone)]
enum Verdict {
    Pass(Arc<Principal>),
    Refused(AuthError),
}

#[derive(Debug)]
struct Cached {
    verdict: Verdict,
    ttl: Duration,
    /// For JWT forms: the key-store generation they were verified under (see
    /// `KeyStore::generation`); a retired key invalidates them.
    key_generation: Option<u64>,
}

struct CachedExpiry;

impl moka::Expiry<[u8; 32], Arc<Cached>> for CachedExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Cached>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Verifies machine tokens for the proxy (see the module docs).
pub struct MachineAuth {
    config: Config,
    keys: Arc<KeyStore>,
    verifier: Verifier,
    api: Option<Arc<BackendApi>>,
    names: HeaderNames,
    cache: moka::future::Cache<[u8; 32], Arc<Cached>>,
    metrics: Arc<Metrics>,
    max_token_bytes: usize,
}

/// Longest opaque token sent to Clerk: real ones are well under 100 bytes.
const MAX_OPAQUE_BYTES: usize = 512;

/// Largest verification answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// `ak_…`, `mt_…`, `oat_…` with something printable after the prefix. Clerk documents no exact
/// shape, so only clearly malformed values are refused before any Backend API call.
pub(crate) fn opaque_shape_ok(token: &str) -> bool {
    let rest = [M2M_PREFIX, OAUTH_PREFIX, API_KEY_PREFIX]
        .iter()
        .find_map(|p| token.strip_prefix(p));
    token.len() <= MAX_OPAQUE_BYTES
        && rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_graphic()))
}

impl MachineAuth {
    pub fn new(
        config: &Config,
        headers: &HeadersConfig,
        keys: Arc<KeyStore>,
        verifier: Verifier,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(config.cache_capacity.max(1))
            .expire_after(CachedExpiry)
            .build();
        Self {
            config: config.clone(),
            keys,
            verifier,
            api: None,
            names: HeaderNames::new(headers),
            cache,
            metrics,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }

    /// The verifier for `[machine]`, sharing the authenticator's keys, issuer rules and token
    /// length cap (`auth.max_token_bytes`).
    pub fn for_config(
        config: &Config,
        headers: &HeadersConfig,
        auth: &super::Authenticator,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::new(
            config,
            headers,
            auth.keys().clone(),
            auth.verifier().clone(),
            metrics,
        )
        .with_max_token_bytes(auth.max_token_bytes)
    }

    /// The Backend API client for opaque tokens (absent: opaque tokens are 503).
    pub fn with_api(mut self, api: Option<Arc<BackendApi>>) -> Self {
        self.api = api;
        self
    }

    /// `auth.max_token_bytes`.
    pub fn with_max_token_bytes(mut self, max: usize) -> Self {
        self.max_token_bytes = max;
        self
    }

    pub fn names(&self) -> &HeaderNames {
        &self.names
    }

    /// Verifies a machine token of the type [`classify`] gave.
    pub async fn verify(
        &self,
        token: &str,
        token_type: TokenType,
        now_ms: u64,
    ) -> Result<Arc<Principal>, AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge);
        }
        // `verifyMachineAuthToken`: the JWT form wins over the prefix.
        if is_jwt_format(token) {
            return self.verify_jwt_cached(token, token_type, now_ms).await;
        }
        if !opaque_shape_ok(token) {
            self.metrics
                .machine_verifications
                .inc(token_type.label(), MachineResult::Invalid);
            return Err(AuthError::Invalid);
        }
        self.verify_opaque(token, token_type, now_ms).await
    }

    /// A machine JWT: from the cache while it is unexpired and its key still current (a hash
    /// and a lookup), otherwise verified locally and cached until `exp`.
    async fn verify_jwt_cached(
        &self,
        token: &str,
        token_type: TokenType,
        now_ms: u64,
    ) -> Result<Arc<Principal>, AuthError> {
        let label = token_type.label();
        let key = super::cache::TokenCache::key(token);
        let skew = self.verifier.skew_ms();
        if let Some(cached) = self.cache.get(&key).await
            && let Verdict::Pass(p) = &cached.verdict
            && cached.key_generation == Some(self.keys.generation())
            && self.keys.ready()
            && p.expiration_ms
                .is_some_and(|exp| exp.saturating_add(skew) > now_ms)
        {
            self.metrics
                .machine_verifications
                .inc(label, MachineResult::CacheHit);
            return Ok(p.clone());
        }
        let generation = self.keys.generation();
        let result = self.verify_jwt(token, now_ms).await;
        self.metrics.machine_verifications.inc(
            label,
            match &result {
                Ok(p) if !p.machine_scope_ok => MachineResult::MachineScopeMissing,
                Ok(_) => MachineResult::Ok,
                Err(e) => result_label(*e),
            },
        );
        if let Ok(p) = &result {
            let until = p.expiration_ms.unwrap_or(now_ms).saturating_add(skew);
            self.cache
                .insert(
                    key,
                    Arc::new(Cached {
                        verdict: Verdict::Pass(p.clone()),
                        ttl: Duration::from_millis(until.saturating_sub(now_ms)),
                        key_generation: Some(generation),
                    }),
                )
                .await;
        }
        result
    }

    async fn verify_opaque(
        &self,
        token: &str,
        token_type: TokenType,
        now_ms: u64,
    ) -> Result<Arc<Principal>, AuthError> {
        let key = super::cache::TokenCache::key(token);
        let label = token_type.label();
        let called = std::sync::atomic::AtomicBool::new(false);
        let cached = self
            .cache
            .try_get_with(key, async {
                called.store(true, std::sync::atomic::Ordering::Relaxed);
                let verdict = self.call(token, token_type, now_ms).await;
                let result = match &verdict {
                    Ok(Verdict::Pass(p)) if !p.machine_scope_ok => {
                        MachineResult::MachineScopeMissing
                    }
                    Ok(Verdict::Pass(_)) => MachineResult::Ok,
                    Ok(Verdict::Refused(e)) => result_label(*e),
                    Err(e) => result_label(*e),
                };
                self.metrics.machine_verifications.inc(label, result);
                let verdict = verdict?;
                let ttl = match &verdict {
                    Verdict::Pass(p) => {
                        let ttl = self.config.cache_ttl();
                        match p.expiration_ms {
                            Some(exp) => ttl.min(Duration::from_millis(exp.saturating_sub(now_ms))),
                            None => ttl,
                        }
                    }
                    Verdict::Refused(_) => self.config.negative_cache(),
                };
                Ok::<_, AuthError>(Arc::new(Cached {
                    verdict,
                    ttl,
                    key_generation: None,
                }))
            })
            .await
            .map_err(|e| *e)?;
        if called.load(std::sync::atomic::Ordering::Relaxed) {
            // After a Backend API call (never on the hot path of a hit): the count is exact
            // once moka's pending inserts and evictions have run.
            self.cache.run_pending_tasks().await;
            self.metrics
                .machine_cache_entries
                .set(self.cache.entry_count() as i64);
        } else {
            self.metrics
                .machine_verifications
                .inc(label, MachineResult::CacheHit);
        }
        match &cached.verdict {
            Verdict::Pass(p) => {
                // The expiry bounds the entry; a hit is also checked against the clock.
                if p.expiration_ms.is_some_and(|exp| exp <= now_ms) {
                    self.cache.invalidate(&key).await;
                    return Err(AuthError::Expired);
                }
                Ok(p.clone())
            }
            Verdict::Refused(e) => Err(*e),
        }
    }

    /// One Backend API verification. `Ok(Refused)` is a verdict on the token (cached);
    /// `Err` is an outage (not cached).
    async fn call(
        &self,
        token: &str,
        token_type: TokenType,
        now_ms: u64,
    ) -> Result<Verdict, AuthError> {
        let Some(api) = &self.api else {
            tracing::warn!("opaque machine token but no clerk.secret_key to verify it with");
            return Err(AuthError::MachineVerifyUnavailable);
        };
        let (endpoint, path, field, bearer) = match token_type {
            TokenType::ApiKey => (
                ApiEndpoint::ApiKeysVerify,
                "api_keys/verify",
                "secret",
                None,
            ),
            TokenType::M2mToken => (
                ApiEndpoint::M2mTokensVerify,
                "m2m_tokens/verify",
                "token",
                self.config.machine_secret_key.as_ref(),
            ),
            TokenType::OauthToken => (
                ApiEndpoint::OauthTokensVerify,
                "oauth_applications/access_tokens/verify",
                "access_token",
                None,
            ),
            TokenType::SessionToken => return Ok(Verdict::Refused(AuthError::TypeMismatch)),
        };
        let mut body = Map::new();
        body.insert(field.to_owned(), Value::String(token.to_owned()));
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let answer = api
            .call_as(
                Call {
                    endpoint,
                    method: reqwest::Method::POST,
                    path,
                    query: None,
                    body: Some(body),
                    timeout: Some(self.config.verify_timeout()),
                    retries: 0,
                    max_body_bytes: MAX_ANSWER_BYTES,
                    api_version: None,
                },
                bearer,
            )
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e @ (CallError::Timeout | CallError::Network(_) | CallError::Invalid)) => {
                tracing::warn!(error = %e, "machine token verification failed");
                return Err(AuthError::MachineVerifyUnavailable);
            }
            Err(e @ (CallError::Paused { .. } | CallError::Budget { .. })) => {
                tracing::debug!(error = %e, "machine token verification deferred");
                return Err(AuthError::MachineVerifyUnavailable);
            }
        };
        match answer.status.as_u16() {
            200..=299 => {}
            401 => {
                tracing::error!("the Backend API refused the secret key verifying a machine token");
                return Err(AuthError::SecretKeyInvalid);
            }
            // Clerk's "not found", and its refusals of the value itself.
            400 | 404 | 422 => return Ok(Verdict::Refused(AuthError::Invalid)),
            status => {
                tracing::warn!(status, "machine token verification answered an error");
                return Err(AuthError::MachineVerifyUnavailable);
            }
        }
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&answer.body) else {
            return Err(AuthError::MachineVerifyUnavailable);
        };
        self.judge_answer(&obj, token_type, now_ms)
    }

    /// A 200 answer: refused when revoked, expired or inactive; otherwise the principal.
    fn judge_answer(
        &self,
        obj: &Map<String, Value>,
        token_type: TokenType,
        now_ms: u64,
    ) -> Result<Verdict, AuthError> {
        if obj.get("active") == Some(&Value::Bool(false)) {
            return Ok(Verdict::Refused(AuthError::Invalid));
        }
        if obj.get("revoked") == Some(&Value::Bool(true)) {
            return Ok(Verdict::Refused(AuthError::Revoked));
        }
        if obj.get("expired") == Some(&Value::Bool(true)) {
            return Ok(Verdict::Refused(AuthError::Expired));
        }
        let expiration_ms = match obj.get("expiration") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(ms) if ms.is_finite() && ms >= 0.0 => Some(ms as u64),
                _ => return Err(AuthError::MachineVerifyUnavailable),
            },
            Some(_) => return Err(AuthError::MachineVerifyUnavailable),
        };
        if expiration_ms.is_some_and(|exp| exp <= now_ms) {
            return Ok(Verdict::Refused(AuthError::Expired));
        }
        let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(id), Some(subject)) = (text("id"), text("subject")) else {
            tracing::warn!("machine token verification answer without id or subject");
            return Err(AuthError::MachineVerifyUnavailable);
        };
        let scopes = string_list(obj.get("scopes"));
        if token_type == TokenType::OauthToken && !self.audience_ok(obj.get("aud")) {
            return Ok(Verdict::Refused(AuthError::VerificationFailed));
        }
        Ok(Verdict::Pass(self.principal(Parts {
            token_type,
            id,
            subject,
            scopes,
            client_id: text("client_id"),
            name: text("name"),
            expiration_ms,
        })))
    }

    /// `assertOAuthAudienceClaim`: with an audience configured, `aud` must be a non-empty
    /// string or array of non-empty strings, one of them configured.
    fn audience_ok(&self, aud: Option<&Value>) -> bool {
        if self.config.audience.is_empty() {
            return true;
        }
        let list: Vec<&str> = match aud {
            Some(Value::String(s)) if !s.is_empty() => vec![s.as_str()],
            Some(Value::Array(items)) => {
                let Some(list) = items
                    .iter()
                    .map(|v| v.as_str().filter(|s| !s.is_empty()))
                    .collect::<Option<Vec<_>>>()
                else {
                    return false;
                };
                list
            }
            _ => return false,
        };
        list.iter()
            .any(|a| self.config.audience.iter().any(|c| c == a))
    }

    async fn verify_jwt(&self, token: &str, now_ms: u64) -> Result<Arc<Principal>, AuthError> {
        let parsed = token::parse_machine(token)?;
        let typ = parsed.raw_header.get("typ");
        let is_m2m = parsed
            .payload
            .get("sub")
            .and_then(Value::as_str)
            .is_some_and(|s| s.starts_with(M2M_SUBJECT_PREFIX));
        let token_type = if is_m2m {
            // `verifyM2MJwt`: category absent or M2M; `typ` absent or `JWT`.
            match parsed.raw_header.get("cat") {
                None => {}
                Some(Value::String(c)) if c == CAT_M2M => {}
                Some(_) => return Err(AuthError::Invalid),
            }
            match typ {
                None => {}
                Some(Value::String(t)) if t == "JWT" => {}
                Some(_) => return Err(AuthError::Invalid),
            }
            TokenType::M2mToken
        } else if typ
            .and_then(Value::as_str)
            .is_some_and(|t| OAUTH_TYPES.contains(&t))
        {
            TokenType::OauthToken
        } else {
            return Err(AuthError::VerificationFailed);
        };
        let may_refetch = self.verifier.issuer_allowed(parsed.unverified_issuer());
        let key = self
            .keys
            .key_for(parsed.header.kid.as_deref(), may_refetch)
            .await?;
        if parsed.header.alg != key.alg {
            return Err(AuthError::InvalidAlgorithm);
        }
        key.public
            .verify_sig(parsed.signing_input().as_bytes(), &parsed.signature)
            .map_err(|_| AuthError::InvalidSignature)?;
        let p = &parsed.payload;
        let subject = match p.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::VerificationFailed),
        };
        // Stricter than the SDK, which checks no issuer on machine JWTs.
        if !self
            .verifier
            .issuer_allowed(p.get("iss").and_then(Value::as_str))
        {
            return Err(AuthError::InvalidIssuer);
        }
        let now = now_ms as f64;
        let skew = self.verifier.skew_ms() as f64;
        let exp_ms = match p.get("exp").and_then(Value::as_f64) {
            Some(exp) => exp * 1000.0,
            None => return Err(AuthError::VerificationFailed),
        };
        if exp_ms <= now - skew {
            return Err(AuthError::Expired);
        }
        for (claim, err) in [
            ("nbf", AuthError::NotActiveYet),
            ("iat", AuthError::IatInTheFuture),
        ] {
            match p.get(claim) {
                None => {}
                Some(Value::Number(n)) if n.as_f64().is_some_and(|v| v * 1000.0 > now + skew) => {
                    return Err(err);
                }
                Some(Value::Number(_)) => {}
                Some(_) => return Err(AuthError::VerificationFailed),
            }
        }
        let text = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_owned);
        let scopes = match token_type {
            // `M2MToken.fromJwtPayload`: `scopes` split on spaces, else `aud`.
            TokenType::M2mToken => match p.get("scopes") {
                Some(Value::String(s)) => s.split(' ').map(str::to_owned).collect(),
                _ => string_list(p.get("aud")),
            },
            // `IdPOAuthAccessToken.fromJwtPayload`: `scp`, else `scope` split on spaces.
            _ => match (p.get("scp"), p.get("scope")) {
                (Some(scp @ Value::Array(_)), _) => string_list(Some(scp)),
                (_, Some(Value::String(s))) => s.split(' ').map(str::to_owned).collect(),
                _ => Vec::new(),
            },
        };
        if token_type == TokenType::OauthToken && !self.audience_ok(p.get("aud")) {
            return Err(AuthError::VerificationFailed);
        }
        Ok(self.principal(Parts {
            token_type,
            id: text("jti").unwrap_or_default(),
            subject,
            scopes,
            client_id: text("client_id"),
            name: None,
            expiration_ms: Some(exp_ms.max(0.0) as u64),
        }))
    }

    fn principal(&self, parts: Parts) -> Arc<Principal> {
        let machine_scope_ok = parts.token_type != TokenType::M2mToken
            || self.config.machine_id.is_empty()
            || parts.scopes.contains(&self.config.machine_id);
        let mut p = Principal {
            token_type: parts.token_type,
            id: parts.id,
            subject: parts.subject,
            scopes: parts.scopes,
            client_id: parts.client_id,
            name: parts.name,
            expiration_ms: parts.expiration_ms,
            machine_scope_ok,
            headers: Vec::new(),
        };
        let n = &self.names;
        // Scopes containing a comma would make the joined list ambiguous: left out of the
        // header (route checks use the exact list).
        let scopes = p
            .scopes
            .iter()
            .filter(|s| !s.contains(',') && !s.is_empty())
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let values: [(&HeaderName, Option<&str>); 8] = [
            (&n.token_type, Some(p.token_type.as_str())),
            (&n.user_id, p.user_id()),
            (&n.org_id, p.org_id()),
            (&n.machine_id, p.machine_id()),
            (&n.client_id, p.client_id.as_deref()),
            (&n.token_id, Some(p.id.as_str()).filter(|s| !s.is_empty())),
            (&n.scopes, Some(scopes.as_str()).filter(|s| !s.is_empty())),
            (&n.token_name, p.name.as_deref()),
        ];
        let headers = values
            .into_iter()
            .filter_map(|(name, value)| {
                let value = HeaderValue::from_str(value?).ok();
                if value.is_none() {
                    tracing::debug!(header = %name, "machine token value not representable as a header; not sent");
                }
                Some((name.clone(), value?))
            })
            .collect();
        p.headers = headers;
        Arc::new(p)
    }

    /// Cached verdicts (for tests and the gauge).
    pub async fn cache_len(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn result_label(e: AuthError) -> MachineResult {
    match e {
        AuthError::Revoked => MachineResult::Revoked,
        AuthError::Expired => MachineResult::Expired,
        e if e.is_outage() => MachineResult::Unavailable,
        _ => MachineResult::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn jwt(h: Value, p: Value) -> String {
        format!("{}.{}.c2ln", b64(&h), b64(&p))
    }

    #[test]
    fn classification_follows_the_sdk() {
        use serde_json::json;
        assert_eq!(classify("ak_123"), TokenType::ApiKey);
        assert_eq!(classify("mt_123"), TokenType::M2mToken);
        assert_eq!(classify("oat_123"), TokenType::OauthToken);
        assert_eq!(classify("garbage"), TokenType::SessionToken);
        let m2m = jwt(json!({"alg": "RS256"}), json!({"sub": "mch_1"}));
        assert_eq!(classify(&m2m), TokenType::M2mToken);
        let oauth = jwt(
            json!({"alg": "RS256", "typ": "at+jwt"}),
            json!({"sub": "user_1"}),
        );
        assert_eq!(classify(&oauth), TokenType::OauthToken);
        let both = jwt(
            json!({"typ": "application/at+jwt"}),
            json!({"sub": "mch_1"}),
        );
        assert_eq!(classify(&both), TokenType::M2mToken, "M2M is tested first");
        let upper = jwt(json!({"typ": "AT+JWT"}), json!({"sub": "user_1"}));
        assert_eq!(classify(&upper), TokenType::SessionToken, "typ is exact");
        let session = jwt(json!({"alg": "RS256"}), json!({"sub": "user_1"}));
        assert_eq!(classify(&session), TokenType::SessionToken);
        // The prefix wins over the JWT form.
        assert_eq!(classify(&format!("mt_{oauth}")), TokenType::M2mToken);
        assert_eq!(classify(&format!("oat_{session}")), TokenType::OauthToken);
        assert_eq!(classify(&format!("ak_{session}")), TokenType::ApiKey);
    }

    #[test]
    fn accepts_parses_and_combines() {
        #[derive(Deserialize)]
        struct T {
            a: Accepts,
        }
        let t: T = toml::from_str("a = \"any\"").unwrap();
        assert!(t.a.is_any() && t.a.accepts(TokenType::ApiKey));
        let t: T = toml::from_str("a = [\"api_key\", \"oauth_token\"]").unwrap();
        assert!(t.a.accepts(TokenType::ApiKey) && !t.a.accepts(TokenType::SessionToken));
        assert!(toml::from_str::<T>("a = \"api_key\"").is_err());
        assert!(toml::from_str::<T>("a = [\"session\"]").is_err());
        assert!(Accepts::default().is_session_only());
        let both = Accepts::ANY.intersect(Accepts::list(&[TokenType::M2mToken]));
        assert!(
            !both.is_any() && both.accepts(TokenType::M2mToken) && !both.accepts(TokenType::ApiKey)
        );
    }

    #[test]
    fn opaque_shapes() {
        assert!(opaque_shape_ok("ak_live_abc"));
        assert!(!opaque_shape_ok("ak_"));
        assert!(!opaque_shape_ok("ak_a b"));
        assert!(!opaque_shape_ok("ak_\u{7f}"));
        assert!(!opaque_shape_ok(&format!("ak_{}", "a".repeat(600))));
        assert!(!opaque_shape_ok("xx_abc"));
    }
}
