//! The verification key cache: a pinned PEM, or a JWKS fetched from Clerk and kept fresh.
//!
//! Design (after neon's `proxy/src/auth/backend/jwt.rs`):
//! - Readers never lock: the current key set sits behind an `ArcSwap`.
//! - A background task refreshes before `jwks_ttl_seconds` runs out, with backoff on failure.
//! - An unknown `kid` triggers at most one fetch per `jwks_min_refresh_interval_seconds`,
//!   single-flight (concurrent misses wait for the same fetch), and only for tokens that claim
//!   our issuer. A negative cache answers repeated forged kids without waiting.
//! - A failing endpoint keeps the last good keys serving (stale-if-error) for at most
//!   `jwks_max_stale_seconds`; after that there are no usable keys and requests get 503.
//! - Fetches have a timeout, a body cap and no redirects; the secret key only goes to the
//!   Backend API origin (decided in [`crate::clerk::Config::resolve`]).
//!
//! Keys are parsed once, at fetch time, into aws-lc-rs `ParsedPublicKey`s, so a verification
//! is the RSA operation and nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use aws_lc_rs::rsa::PublicKeyComponents;
use aws_lc_rs::signature::ParsedPublicKey;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::AuthError;
use super::token::Alg;
use crate::clerk::{API_VERSION, Instance, KeySource};
use crate::secret::Secret;
use crate::telemetry::{JwksFetchResult, Label, Metrics};

/// One verification key, parsed and bound to its algorithm.
pub struct Key {
    pub kid: Option<String>,
    pub alg: Alg,
    pub public: ParsedPublicKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

/// Why a JWK or PEM was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not an RSA key")]
    NotRsa,
    #[error("unsupported or missing alg")]
    Algorithm,
    #[error("not a signature key")]
    Use,
    #[error("malformed key material")]
    Malformed,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

impl Key {
    /// A key from one JWK. `alg_override` replaces the JWK's `alg` (tests only need it).
    pub fn from_jwk_value(
        jwk: &serde_json::Value,
        alg_override: Option<Alg>,
    ) -> Result<Key, KeyError> {
        let raw: RawJwk = serde_json::from_value(jwk.clone()).map_err(|_| KeyError::Malformed)?;
        Self::from_raw(raw, alg_override)
    }

    fn from_raw(raw: RawJwk, alg_override: Option<Alg>) -> Result<Key, KeyError> {
        if raw.kty.as_deref() != Some("RSA") {
            return Err(KeyError::NotRsa);
        }
        if raw.use_.as_deref().is_some_and(|u| u != "sig") {
            return Err(KeyError::Use);
        }
        // A JWK without `alg` would let the token choose the hash; Clerk always sets it.
        let alg = match alg_override {
            Some(a) => a,
            None => raw
                .alg
                .as_deref()
                .and_then(Alg::from_name)
                .ok_or(KeyError::Algorithm)?,
        };
        let (Some(n), Some(e)) = (raw.n, raw.e) else {
            return Err(KeyError::Malformed);
        };
        let n = URL_SAFE_NO_PAD
            .decode(n.trim_end_matches('='))
            .map_err(|_| KeyError::Malformed)?;
        let e = URL_SAFE_NO_PAD
            .decode(e.trim_end_matches('='))
            .map_err(|_| KeyError::Malformed)?;
        let public = PublicKeyComponents {
            n: &n[..],
            e: &e[..],
        }
        .to_parsed_public_key(alg.params())
        .map_err(|_| KeyError::Malformed)?;
        Ok(Key {
            kid: raw.kid,
            alg,
            public,
        })
    }

    /// A key from a PEM public key (`CLERK_JWT_KEY`), SPKI or PKCS#1. Clerk's PEM keys are
    /// RS256 keys, as the SDK's `loadClerkJwkFromPem` assumes.
    pub fn from_pem(pem: &str) -> Result<Key, KeyError> {
        // The PEM often arrives through an environment variable with literal "\n".
        let pem = pem.replace("\\n", "\n");
        let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(pem.trim().as_bytes())
            .map_err(|_| KeyError::Malformed)?;
        let der = decoding
            .try_get_as_bytes()
            .map_err(|_| KeyError::Malformed)?;
        let public =
            ParsedPublicKey::new(Alg::Rs256.params(), der).map_err(|_| KeyError::Malformed)?;
        Ok(Key {
            kid: None,
            alg: Alg::Rs256,
            public,
        })
    }
}

/// A set of keys fetched together.
pub struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// `None` for a pinned PEM: it never goes stale.
    fetched_at: Option<Instant>,
    /// The only key of a PEM source, used whatever the token's `kid`.
    pinned: Option<Arc<Key>>,
    /// `{"keys":[...]}` with the JWKs of `by_kid` as Clerk published them, serialised once per
    /// fetch for the local API's `GET /v1/jwks`; `None` for a PEM source (it has no kid).
    published: Option<bytes::Bytes>,
}

/// Why [`KeyStore::published_jwks`] has no JWKS to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpublished {
    /// The key is a pinned PEM (`clerk.jwt_key`): no kid, so no JWKS an SDK could match.
    Pinned,
    /// No usable keys held right now (not fetched yet, or stale past `jwks_max_stale_seconds`).
    Unavailable,
}

impl KeySet {
    fn len(&self) -> usize {
        self.by_kid.len() + usize::from(self.pinned.is_some())
    }
}

/// Tunables of the remote key source.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub ttl: Duration,
    pub min_refresh_interval: Duration,
    pub max_stale: Duration,
    pub fetch_timeout: Duration,
    pub max_body_bytes: usize,
}

impl JwksSettings {
    pub fn from_config(c: &crate::clerk::Config) -> Self {
        Self {
            ttl: c.jwks_ttl(),
            min_refresh_interval: c.jwks_min_refresh_interval(),
            max_stale: c.jwks_max_stale(),
            fetch_timeout: c.jwks_fetch_timeout(),
            max_body_bytes: c.jwks_max_body_bytes,
        }
    }
}

/// Why a fetch failed (logged and counted; never shown to clients).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("JWKS endpoint answered {0}")]
    Status(u16),
    #[error("JWKS endpoint rejected the secret key (401/403)")]
    Unauthorized,
    #[error("JWKS request failed: {0}")]
    Network(String),
    #[error("JWKS request timed out")]
    Timeout,
    #[error("JWKS body larger than the cap")]
    TooLarge,
    #[error("JWKS body is not a JWK set")]
    Invalid,
    #[error("JWKS has no usable RS256/384/512 signature key")]
    NoUsableKeys,
}

impl FetchError {
    fn result(&self) -> JwksFetchResult {
        match self {
            Self::Status(_) => JwksFetchResult::HttpError,
            Self::Unauthorized => JwksFetchResult::Unauthorized,
            Self::Network(_) => JwksFetchResult::Network,
            Self::Timeout => JwksFetchResult::Timeout,
            Self::TooLarge => JwksFetchResult::TooLarge,
            Self::Invalid => JwksFetchResult::Invalid,
            Self::NoUsableKeys => JwksFetchResult::NoUsableKeys,
        }
    }
}

struct Remote {
    url: reqwest::Url,
    bearer: Option<Secret>,
    http: reqwest::Client,
    settings: JwksSettings,
}

struct RefreshState {
    /// The last fetch caused by an unknown kid: the floor applies between those only, so a
    /// background refresh never delays a rotated key.
    last_kid_refetch: Option<Instant>,
}

/// The key cache shared by every request.
pub struct KeyStore {
    current: ArcSwapOption<KeySet>,
    remote: Option<Remote>,
    refresh: Mutex<RefreshState>,
    /// kids that were still unknown after a refetch, until the next refetch is allowed.
    unknown_kids: moka::sync::Cache<String, ()>,
    /// Bumped whenever a key disappears; verifications made under an older generation are
    /// no longer trusted from the token cache.
    generation: AtomicU64,
    /// The latest fetch (background or kid-triggered) failed: an unknown kid then means "we
    /// could not look", not "Clerk has no such key".
    last_fetch_failed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl KeyStore {
    /// Builds the store; a PEM source is loaded (and ready) at once, a JWKS source is empty
    /// until [`KeyStore::refresh`] succeeds.
    pub fn new(
        instance: &Instance,
        settings: JwksSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KeyError> {
        let unknown_kids = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .time_to_live(settings.min_refresh_interval.max(Duration::from_secs(1)))
            .build();
        match &instance.key_source {
            KeySource::Pem(pem) => {
                let key = Arc::new(Key::from_pem(pem)?);
                metrics.jwks_keys.set(1);
                Ok(Self {
                    current: ArcSwapOption::from_pointee(KeySet {
                        by_kid: HashMap::new(),
                        fetched_at: None,
                        pinned: Some(key),
                        published: None,
                    }),
                    remote: None,
                    refresh: Mutex::new(RefreshState {
                        last_kid_refetch: None,
                    }),
                    unknown_kids,
                    generation: AtomicU64::new(0),
                    last_fetch_failed: AtomicBool::new(false),
                    metrics,
                })
            }
            KeySource::Jwks { url, bearer } => {
                let http = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(settings.fetch_timeout)
                    .connect_timeout(settings.fetch_timeout)
                    .user_agent(concat!("clerkgate/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|_| KeyError::Malformed)?;
                Ok(Self {
                    current: ArcSwapOption::empty(),
                    remote: Some(Remote {
                        url: url.clone(),
                        bearer: bearer.clone(),
                        http,
                        settings,
                    }),
                    refresh: Mutex::new(RefreshState {
                        last_kid_refetch: None,
                    }),
                    unknown_kids,
                    generation: AtomicU64::new(0),
                    last_fetch_failed: AtomicBool::new(false),
                    metrics,
                })
            }
        }
    }

    /// The key generation (see the field): read it before a verification, store it with the
    /// result, and compare on every cache hit.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// `true` when requests can be verified: keys are held and not older than the stale bound.
    pub fn ready(&self) -> bool {
        self.usable().is_some()
    }

    /// The current key set if it may be used.
    fn usable(&self) -> Option<Arc<KeySet>> {
        let set = self.current.load_full()?;
        match (&self.remote, set.fetched_at) {
            (Some(remote), Some(at)) if at.elapsed() > remote.settings.max_stale => None,
            _ if set.len() == 0 => None,
            _ => Some(set),
        }
    }

    /// The usable keys as a JWKS (precomputed: a reference count, no serialisation), for
    /// clients that verify tokens themselves with the keys this store holds.
    pub fn published_jwks(&self) -> Result<bytes::Bytes, Unpublished> {
        let set = self.usable().ok_or(Unpublished::Unavailable)?;
        set.published.clone().ok_or(Unpublished::Pinned)
    }

    /// Seconds since the held keys were fetched (0 for a pinned key or none yet).
    pub fn age_seconds(&self) -> u64 {
        self.current
            .load()
            .as_ref()
            .and_then(|s| s.fetched_at)
            .map(|t| t.elapsed().as_secs())
            .unwrap_or(0)
    }

    /// Updates the gauges that depend on time; called before metrics are rendered.
    pub fn update_gauges(&self) {
        self.metrics.jwks_age_seconds.set(self.age_seconds() as i64);
        let keys = self.usable().map(|s| s.len()).unwrap_or(0);
        self.metrics.jwks_keys.set(keys as i64);
    }

    /// The key for a token's `kid`. `may_refetch` is false for tokens that do not claim our
    /// issuer: they can never cause a fetch.
    pub async fn key_for(
        &self,
        kid: Option<&str>,
        may_refetch: bool,
    ) -> Result<Arc<Key>, AuthError> {
        let Some(set) = self.usable() else {
            // Nothing to verify with: fail closed. A refetch attempt is the background task's
            // job, but a first request may kick one off (single-flight, rate-limited).
            if may_refetch && self.remote.is_some() {
                let _ = self.refetch_for(None).await;
                if let Some(set) = self.usable() {
                    return lookup(&set, kid).ok_or(AuthError::KidMismatch);
                }
            }
            return Err(AuthError::KeysUnavailable);
        };
        if let Some(key) = lookup(&set, kid) {
            return Ok(key);
        }
        let Some(kid) = kid else {
            return Err(AuthError::KidMismatch);
        };
        if !may_refetch || self.remote.is_none() || self.unknown_kids.contains_key(kid) {
            return Err(AuthError::KidMismatch);
        }
        self.refetch_for(Some(kid)).await;
        match self.usable().and_then(|set| lookup(&set, Some(kid))) {
            Some(key) => Ok(key),
            // Clerk may have published the key while its JWKS endpoint fails: an outage, not
            // a bad token (and nothing is remembered about the kid).
            None if self.last_fetch_failed.load(Ordering::Acquire) => {
                Err(AuthError::KeysUnavailable)
            }
            None => {
                self.unknown_kids.insert(kid.to_owned(), ());
                Err(AuthError::KidMismatch)
            }
        }
    }

    /// Single-flight refetch for an unknown kid, at most once per minimum interval.
    async fn refetch_for(&self, kid: Option<&str>) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        let mut state = self.refresh.lock().await;
        // Someone else may have fetched while we waited for the lock.
        if let Some(set) = self.usable()
            && lookup(&set, kid).is_some()
        {
            return true;
        }
        if state
            .last_kid_refetch
            .is_some_and(|t| t.elapsed() < remote.settings.min_refresh_interval)
        {
            return false;
        }
        state.last_kid_refetch = Some(Instant::now());
        self.fetch_and_store(remote).await.is_ok()
    }

    /// Fetches now (start-up and the background loop), serialised with unknown-kid refetches.
    pub async fn refresh(&self) -> Result<(), FetchError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let _serialised = self.refresh.lock().await;
        self.fetch_and_store(remote).await
    }

    async fn fetch_and_store(&self, remote: &Remote) -> Result<(), FetchError> {
        let span = crate::telemetry::otel::jwks_fetch_span();
        match tracing::Instrument::instrument(fetch(remote), span.clone()).await {
            Ok(set) => {
                self.last_fetch_failed.store(false, Ordering::Release);
                self.metrics.jwks_fetches.inc(JwksFetchResult::Ok);
                self.metrics.jwks_keys.set(set.len() as i64);
                tracing::debug!(keys = set.len(), "JWKS fetched");
                let previous = self.current.swap(Some(Arc::new(set)));
                let removed = previous.is_some_and(|old| {
                    let new = self.current.load();
                    old.by_kid
                        .keys()
                        .any(|kid| new.as_ref().is_none_or(|n| !n.by_kid.contains_key(kid)))
                });
                if removed {
                    // Tokens verified with a retired key must not live on in the token cache.
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    tracing::info!("a key was retired; cached verifications are discarded");
                }
                self.unknown_kids.invalidate_all();
                Ok(())
            }
            Err(e) => {
                self.last_fetch_failed.store(true, Ordering::Release);
                self.metrics.jwks_fetches.inc(e.result());
                crate::telemetry::otel::record_error(&span, e.result().as_label());
                tracing::warn!(error = %e, url = %remote.url, "JWKS fetch failed; keeping the last good keys");
                Err(e)
            }
        }
    }

    /// Refreshes in the background until `shutdown` resolves: before the TTL runs out, and
    /// with capped exponential backoff after a failure.
    pub async fn run_refresh(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let Some(remote) = &self.remote else { return };
        let ttl = remote.settings.ttl;
        tokio::pin!(shutdown);
        let mut failures: u32 = 0;
        loop {
            let wait = if self.ready() && failures == 0 {
                // Refresh at 90% of the TTL so keys never expire in normal operation.
                ttl.mul_f64(0.9).max(Duration::from_secs(1))
            } else {
                let backoff = Duration::from_millis(500u64.saturating_mul(1 << failures.min(6)));
                backoff.min(Duration::from_secs(30)).min(ttl)
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.refresh().await {
                Ok(()) => failures = 0,
                Err(_) => failures = failures.saturating_add(1),
            }
        }
    }
}

fn lookup(set: &KeySet, kid: Option<&str>) -> Option<Arc<Key>> {
    if let Some(pinned) = &set.pinned {
        return Some(pinned.clone());
    }
    set.by_kid.get(kid?).cloned()
}

async fn fetch(remote: &Remote) -> Result<KeySet, FetchError> {
    let mut req = remote
        .http
        .get(remote.url.clone())
        .header("Clerk-API-Version", API_VERSION)
        .header(http::header::ACCEPT, "application/json");
    if let Some(secret) = &remote.bearer {
        req = req.bearer_auth(secret.expose());
    }
    let resp = req.send().await.map_err(classify)?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(FetchError::Unauthorized);
    }
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    let body = crate::body::read_response_capped(resp, remote.settings.max_body_bytes)
        .await
        .map_err(|e| match e {
            crate::body::BodyError::TooLarge => FetchError::TooLarge,
            crate::body::BodyError::Timeout => FetchError::Timeout,
            crate::body::BodyError::Read(e) => FetchError::Network(e),
        })?;
    parse_jwks(&body)
}

fn classify(e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout
    } else {
        FetchError::Network(e.to_string())
    }
}

/// Parses a JWK set, keeping the usable RSA signature keys. Unusable entries are skipped (a
/// JWKS may legitimately carry keys for other purposes); none usable is an error.
pub fn parse_jwks(body: &[u8]) -> Result<KeySet, FetchError> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|_| FetchError::Invalid)?;
    let mut by_kid = HashMap::new();
    let mut published = Vec::new();
    for jwk in set.keys {
        let Ok(raw) = RawJwk::deserialize(&jwk) else {
            continue;
        };
        match Key::from_raw(raw, None) {
            Ok(key) => {
                if let Some(kid) = key.kid.clone() {
                    // A repeated kid: the last one wins, in the published set as well.
                    published.retain(|(k, _): &(String, serde_json::Value)| *k != kid);
                    published.push((kid.clone(), jwk));
                    by_kid.insert(kid, Arc::new(key));
                }
            }
            Err(e) => tracing::debug!(error = %e, "skipping unusable JWK"),
        }
    }
    if by_kid.is_empty() {
        return Err(FetchError::NoUsableKeys);
    }
    let keys: Vec<serde_json::Value> = published.into_iter().map(|(_, jwk)| jwk).collect();
    let published = serde_json::json!({ "keys": keys }).to_string();
    Ok(KeySet {
        by_kid,
        fetched_at: Some(Instant::now()),
        pinned: None,
        published: Some(bytes::Bytes::from(published)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::signing::SigningKey;

    #[test]
    fn jwks_parsing_keeps_only_usable_rsa_signature_keys() {
        let k = SigningKey::generate("ins_a").unwrap();
        let mut enc = k.jwk();
        enc["use"] = "enc".into();
        enc["kid"] = "ins_enc".into();
        let mut no_alg = k.jwk();
        no_alg.as_object_mut().unwrap().remove("alg");
        no_alg["kid"] = "ins_noalg".into();
        let mut hs = k.jwk();
        hs["alg"] = "HS256".into();
        hs["kid"] = "ins_hs".into();
        let ec =
            serde_json::json!({"kty": "EC", "kid": "ins_ec", "crv": "P-256", "x": "AA", "y": "AA"});
        let body = serde_json::json!({"keys": [k.jwk(), enc, no_alg, hs, ec]}).to_string();
        let set = parse_jwks(body.as_bytes()).unwrap();
        assert_eq!(set.by_kid.keys().collect::<Vec<_>>(), vec!["ins_a"]);
        let published: serde_json::Value =
            serde_json::from_slice(set.published.as_deref().unwrap()).unwrap();
        assert_eq!(
            published,
            serde_json::json!({"keys": [k.jwk()]}),
            "only the usable key, as published"
        );
    }

    #[test]
    fn empty_or_garbage_sets_are_errors() {
        assert!(matches!(
            parse_jwks(br#"{"keys":[]}"#),
            Err(FetchError::NoUsableKeys)
        ));
        assert!(matches!(parse_jwks(b"<html>"), Err(FetchError::Invalid)));
        assert!(matches!(
            parse_jwks(br#"{"keys":{}}"#),
            Err(FetchError::Invalid)
        ));
    }

    #[test]
    fn pem_keys_load_with_and_without_escaped_newlines() {
        let k = SigningKey::generate("ins_a").unwrap();
        let pem = k.public_key_pem();
        assert!(Key::from_pem(&pem).is_ok());
        assert!(Key::from_pem(&pem.replace('\n', "\\n")).is_ok());
        assert_eq!(Key::from_pem("not a pem").unwrap_err(), KeyError::Malformed);
    }
}
