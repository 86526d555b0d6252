//! The pod-local Clerk API: users and sessions for the backend beside clerkgate, without the
//! backend holding `CLERK_SECRET_KEY`.
//!
//! A third listener (`local_api.listen`, loopback by default) answers a subset of Clerk's Backend
//! API under the same paths and in the same JSON (Clerk's snake_case objects and error shape), so
//! a backend can keep Clerk's types and swap an SDK's base URL for `http://127.0.0.1:9091`:
//!
//! | local API | Backend API call |
//! | --- | --- |
//! | `GET /v1/users/{id}` | `GET /v1/users/{id}`, cached (404s briefly) |
//! | `GET /v1/users?…`, `GET /v1/users/count?…` | the same, query passed through, not cached |
//! | `PATCH /v1/users/{id}` | the same; invalidates the cached user |
//! | `PATCH`/`PUT /v1/users/{id}/metadata` | the same; invalidates the cached user |
//! | `DELETE /v1/users/{id}` | the same; invalidates, and denies the user's tokens at the edge |
//! | `POST /v1/users/{id}/ban`, `…/lock` | the same; invalidates, denies the user's tokens |
//! | `POST /v1/users/{id}/unban`, `…/unlock` | the same; invalidates |
//! | `GET /v1/users/{id}/organization_memberships?…` | the same, not cached |
//! | `GET /v1/sessions/{id}` | the same, cached briefly (`validateSession`) |
//! | `GET /v1/sessions?…` | `GET /v1/sessions` |
//! | `POST /v1/sessions/{id}/revoke` | the same; also denies the session at the edge |
//! | `POST /v1/sessions` | the same (development instances only; Clerk's error passed on) |
//! | `POST /v1/sessions/{id}/tokens[/{template}]` | the same (`getToken`), not cached |
//! | `POST /v1/sessions/{id}/verify` | the same (`verifySession`, deprecated by Clerk) |
//! | `POST /v1/tokens/verify` | none: the proxy's own verification and deny-lists |
//! | `GET /v1/jwks` | none: the keys the proxy verifies with, serialised once per fetch |
//!
//! Everything Clerk answers is passed on as it is, errors included (status and body); what
//! clerkgate answers itself is decided in [`reply`]. The caller's `Clerk-API-Version` is
//! forwarded (clerkgate's own when it sends none) and is part of every cache key. Calls go
//! through the one [`BackendApi`] client, so the local API and api-mode session checks share one
//! client-side budget and one `Retry-After` pause, as Clerk counts them per instance. Only
//! `GET`s are retried.
//!
//! Who may call: anything that can reach the listener. That is why it binds loopback by default
//! and why any other address requires `local_api.token`, checked in constant time on every
//! request.

pub(crate) mod cache;
pub(crate) mod limit;
pub(crate) mod reply;
pub(crate) mod route;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::gate::{Gate, Refusal, Verified};
use crate::auth::identity::Identity;
use crate::auth::jwks::Unpublished;
use crate::auth::{AuthError, now_ms};
use crate::body::BodyError;
use crate::clerk::API_VERSION;
use crate::clerk::api::{Answer, BackendApi, Call, CallError};
use crate::config::error::ConfigError;
use crate::revocations::Guard;
use crate::secret::Secret;
use crate::server::{ConnInfo, Handler};
use crate::telemetry::{ApiEndpoint, Label, LocalApiRoute, Metrics};
use cache::{Cached, Caches, ObjectCache};
use reply::{LocalError, Reply, Throttle};
use route::{Route, RouteError};

/// `[local_api]`: the pod-local Clerk API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Serve the local API. It also needs `clerk.secret_key`: without it the listener is not
    /// started (every route but `tokens/verify` is a Backend API call).
    pub enabled: bool,
    /// Address of the local API. Anything but loopback requires `token`.
    pub listen: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer <token>`); at least 16
    /// characters.
    pub token: Option<Secret>,
    /// Most users, and most sessions, cached (each).
    pub cache_capacity: u64,
    /// Seconds a fetched user is served from the cache (webhooks and writes invalidate sooner).
    pub user_cache_ttl_seconds: u64,
    /// Seconds a fetched session is served from the cache.
    pub session_cache_ttl_seconds: u64,
    /// Seconds Clerk's 404 for a user is served from the cache (0: not cached). A write to the
    /// user and a `user.created` webhook invalidate it sooner.
    pub missing_user_cache_ttl_seconds: u64,
    /// User updates (`PATCH` user or metadata) allowed per user per 10 s (Clerk's limit: 10).
    pub user_updates_per_10s: u32,
    /// Timeout of one Backend API attempt.
    pub attempt_timeout_ms: u64,
    /// Longest a local API request waits for Clerk, retries included (then 504).
    pub request_timeout_ms: u64,
    /// Extra attempts of a `GET` after a timeout, network error or 500/502/503/504.
    pub get_retries: u32,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            token: None,
            cache_capacity: 10_000,
            user_cache_ttl_seconds: 60,
            session_cache_ttl_seconds: 5,
            missing_user_cache_ttl_seconds: 5,
            user_updates_per_10s: 10,
            attempt_timeout_ms: 2_000,
            request_timeout_ms: 5_000,
            get_retries: 2,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Shortest accepted `local_api.token`.
const MIN_TOKEN_CHARS: usize = 16;

/// Largest Backend API response body passed on (a `GET /v1/users?limit=500` is a few MiB).
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

impl Config {
    /// `user_cache_ttl_seconds`.
    pub fn user_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.user_cache_ttl_seconds)
    }

    /// `session_cache_ttl_seconds`.
    pub fn session_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.session_cache_ttl_seconds)
    }

    /// `missing_user_cache_ttl_seconds`.
    pub fn missing_user_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.missing_user_cache_ttl_seconds)
    }

    /// `attempt_timeout_ms`.
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    /// `request_timeout_ms`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks the section (its address against the other listeners' and the shared Backend API
    /// budget are checked by `Config::validate`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(token) = &self.token
            && token.expose().chars().count() < MIN_TOKEN_CHARS
        {
            return Err(ConfigError::new(
                "local_api.token",
                format!("must be at least {MIN_TOKEN_CHARS} characters"),
            ));
        }
        if self.enabled && !self.listen.ip().is_loopback() && self.token.is_none() {
            return Err(ConfigError::new(
                "local_api.token",
                format!(
                    "required because local_api.listen ({}) is not a loopback address: anything \
                     that reaches it could read and change users with the instance's secret key",
                    self.listen
                ),
            ));
        }
        for (key, v, max) in [
            (
                "local_api.user_cache_ttl_seconds",
                self.user_cache_ttl_seconds,
                86_400,
            ),
            (
                "local_api.session_cache_ttl_seconds",
                self.session_cache_ttl_seconds,
                3_600,
            ),
            (
                "local_api.attempt_timeout_ms",
                self.attempt_timeout_ms,
                600_000,
            ),
            (
                "local_api.request_timeout_ms",
                self.request_timeout_ms,
                600_000,
            ),
        ] {
            if v == 0 || v > max {
                return Err(ConfigError::new(
                    key,
                    format!("must be between 1 and {max}"),
                ));
            }
        }
        if self.missing_user_cache_ttl_seconds > 300 {
            return Err(ConfigError::new(
                "local_api.missing_user_cache_ttl_seconds",
                "must be between 0 and 300",
            ));
        }
        if self.cache_capacity == 0 {
            return Err(ConfigError::new(
                "local_api.cache_capacity",
                "must be at least 1",
            ));
        }
        if self.user_updates_per_10s == 0 {
            return Err(ConfigError::new(
                "local_api.user_updates_per_10s",
                "must be at least 1",
            ));
        }
        if self.get_retries > 5 {
            return Err(ConfigError::new(
                "local_api.get_retries",
                "must be at most 5",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "local_api.max_body_bytes",
                "must be at least 1024",
            ));
        }
        Ok(())
    }

    /// Whether the listener runs, or why not.
    pub fn serves(&self, clerk: &crate::clerk::Config) -> Result<(), &'static str> {
        if !self.enabled {
            return Err("local_api.enabled = false");
        }
        if clerk.secret_key.is_none() {
            return Err("no clerk.secret_key (CLERK_SECRET_KEY): its routes are Backend API calls");
        }
        Ok(())
    }
}

/// `Authorization: Bearer <token>` against the token's SHA-256, compared in constant time.
/// Hashing first makes the comparison independent of the presented token's length too.
fn bearer_matches(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    let Some((scheme, token)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
    else {
        return false;
    };
    // RFC 9110 section 11.1: the scheme is case-insensitive.
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let presented = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.trim().as_bytes());
    aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_ref(), expected).is_ok()
}

/// Whether a write Clerk was asked to make may have happened: yes unless Clerk refused it (a
/// 4xx) or it was never sent (a local rate limit). Unknown outcomes count as done, so a timeout
/// on a revoke still closes the session at the edge.
fn may_have_happened(result: &Result<Answer, CallError>) -> bool {
    match result {
        Ok(answer) => !answer.status.is_client_error(),
        Err(CallError::Paused { .. } | CallError::Budget { .. }) => false,
        Err(CallError::Timeout | CallError::Network(_) | CallError::Invalid) => true,
    }
}

/// The normalised identity of a verified token, as `POST /v1/tokens/verify` returns it. The
/// claims are decoded from the token itself (the cached identity keeps them only when routes
/// need them).
pub(crate) fn identity_json(identity: &Identity, token: &str) -> Value {
    let claims = crate::auth::token::parse(token)
        .map(|parsed| Value::Object(parsed.payload))
        .unwrap_or(Value::Null);
    json!({
        "object": "verified_token",
        "user_id": identity.user_id(),
        "session_id": identity.session_id(),
        "org": identity.org().map(|o| json!({
            "id": o.id,
            "slug": o.slug,
            "role": o.role,
            "permissions": o.permissions().collect::<Vec<_>>(),
        })),
        "actor_id": identity.actor_id(),
        "claims": claims,
    })
}

#[derive(Deserialize)]
struct VerifyRequest {
    token: String,
    /// The token types accepted, as a route's `accepts` (default: session tokens only).
    #[serde(default)]
    accepts: crate::auth::machine::Accepts,
}

/// Why a cached read got no body: Clerk's non-2xx answer, or no answer.
enum Fetch {
    Answer(Answer),
    Call(CallError),
}

/// Which cache a read goes through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Object {
    User,
    Session,
}

/// Longest accepted `Clerk-API-Version` (Clerk's are dates, `2025-04-10`).
const MAX_API_VERSION_CHARS: usize = 32;

/// Clerk's alternative to the header: the version as a query parameter (never both).
const API_VERSION_PARAM: &str = "__clerk_api_version";

/// The caller's API version, from `Clerk-API-Version` or `__clerk_api_version` (Clerk accepts
/// either, never both), if it is not clerkgate's own; and the query to pass on, without that
/// parameter (the version always travels as the header, so a query-carried one does not end up
/// sent twice). Only plausible version names are accepted: they become a header to Clerk and
/// part of a cache key.
fn caller_api_version<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<(Option<&'a str>, Option<Cow<'a, str>>), LocalError> {
    let header = match headers.get("clerk-api-version") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| LocalError::InvalidApiVersion)?
                .trim(),
        ),
        None => None,
    };
    let (in_query, query) = match query {
        Some(q) if q.contains(API_VERSION_PARAM) => {
            let mut found = None;
            let mut kept = String::with_capacity(q.len());
            for piece in q.split('&') {
                let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
                if key == API_VERSION_PARAM {
                    if found.replace(value).is_some() {
                        return Err(LocalError::InvalidApiVersion);
                    }
                } else {
                    if !kept.is_empty() {
                        kept.push('&');
                    }
                    kept.push_str(piece);
                }
            }
            (found, (!kept.is_empty()).then_some(Cow::Owned(kept)))
        }
        other => (None, other.map(Cow::Borrowed)),
    };
    let version = match (header, in_query) {
        (Some(_), Some(_)) => return Err(LocalError::InvalidApiVersion),
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => return Ok((None, query)),
    };
    let plausible = !version.is_empty()
        && version.len() <= MAX_API_VERSION_CHARS
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !plausible {
        return Err(LocalError::InvalidApiVersion);
    }
    Ok(((version != API_VERSION).then_some(version), query))
}

/// What a user write does besides invalidating the cached user.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// Nothing more.
    None,
    /// Tokens issued before now stop working at the proxy (delete, ban, lock).
    DenyEarlierTokens,
}

/// The local API handler.
pub struct LocalApi {
    api: Arc<BackendApi>,
    /// `tokens/verify`: the proxy's verification, revocation check and machine verifier.
    gate: Arc<Gate>,
    /// The revocation writes of user and session writes (ban, lock, delete, revoke).
    sessions: Arc<Guard>,
    caches: Arc<Caches>,
    user_updates: limit::PerKey,
    /// SHA-256 of `local_api.token`; the token itself is not kept.
    token: Option<[u8; 32]>,
    /// Whether Clerk's 404s for users are cached (`missing_user_cache_ttl_seconds` > 0).
    cache_missing_users: bool,
    attempt_timeout: Duration,
    request_timeout: Duration,
    get_retries: u32,
    max_body: usize,
    metrics: Arc<Metrics>,
}

impl LocalApi {
    /// Builds the handler and registers its caches for webhook-driven invalidation.
    pub fn new(
        config: &Config,
        api: Arc<BackendApi>,
        gate: Arc<Gate>,
        sessions: Arc<Guard>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let missing_ttl = config.missing_user_cache_ttl();
        let caches = Arc::new(Caches {
            users: ObjectCache::new(config.cache_capacity, config.user_cache_ttl(), missing_ttl),
            sessions: ObjectCache::new(
                config.cache_capacity,
                config.session_cache_ttl(),
                // Session 404s are never stored (see `cached_get`).
                Duration::from_secs(1),
            ),
        });
        sessions.set_change_listener(caches.clone());
        let token = config.token.as_ref().map(|t| {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, t.expose().as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        });
        Self {
            api,
            gate,
            sessions,
            caches,
            user_updates: limit::PerKey::new(
                config.user_updates_per_10s,
                Duration::from_secs(10),
                config.cache_capacity,
            ),
            token,
            cache_missing_users: !missing_ttl.is_zero(),
            attempt_timeout: config.attempt_timeout(),
            request_timeout: config.request_timeout(),
            get_retries: config.get_retries,
            max_body: config.max_body_bytes,
            metrics,
        }
    }

    async fn respond(&self, req: Request<Incoming>) -> (LocalApiRoute, Reply) {
        let (parts, body) = req.into_parts();
        let routed = route::route(&parts.method, parts.uri.path());
        let label = routed.map_or(LocalApiRoute::Unknown, Route::label);
        if let Some(expected) = &self.token
            && !bearer_matches(&parts.headers, expected)
        {
            return (label, Reply::error(LocalError::Unauthorized));
        }
        let route = match routed {
            Ok(route) => route,
            Err(e) => {
                let e = match e {
                    RouteError::NotFound => LocalError::RouteNotFound,
                    RouteError::MethodNotAllowed { allow } => {
                        LocalError::MethodNotAllowed { allow }
                    }
                    RouteError::InvalidId => LocalError::InvalidId,
                };
                return (label, Reply::error(e));
            }
        };
        let (version, query) = match caller_api_version(&parts.headers, parts.uri.query()) {
            Ok(found) => found,
            Err(e) => return (label, Reply::error(e)),
        };
        let to = Target {
            query: query.as_deref(),
            version,
        };
        let reply = match route {
            Route::UsersGet(id) => self.cached_get(Object::User, id, version).await,
            Route::SessionsGet(id) => self.cached_get(Object::Session, id, version).await,
            Route::UsersList => self.get(ApiEndpoint::UsersList, "v1/users", to).await,
            Route::UsersCount => {
                self.get(ApiEndpoint::UsersCount, "v1/users/count", to)
                    .await
            }
            Route::UsersOrganizationMemberships(id) => {
                let path = format!("v1/users/{id}/organization_memberships");
                self.get(ApiEndpoint::UsersOrganizationMemberships, &path, to)
                    .await
            }
            Route::SessionsList => self.get(ApiEndpoint::SessionsList, "v1/sessions", to).await,
            Route::UsersUpdate(id) => {
                let path = format!("v1/users/{id}");
                self.update_user(id, ApiEndpoint::UsersUpdate, Method::PATCH, &path, body, to)
                    .await
            }
            Route::UsersMetadataUpdate(id) => {
                let path = format!("v1/users/{id}/metadata");
                let endpoint = ApiEndpoint::UsersMetadataUpdate;
                self.update_user(id, endpoint, Method::PATCH, &path, body, to)
                    .await
            }
            Route::UsersMetadataReplace(id) => {
                let path = format!("v1/users/{id}/metadata");
                let endpoint = ApiEndpoint::UsersMetadataReplace;
                self.update_user(id, endpoint, Method::PUT, &path, body, to)
                    .await
            }
            Route::UsersDelete(id) => {
                let path = format!("v1/users/{id}");
                let call = self.call(ApiEndpoint::UsersDelete, Method::DELETE, &path, None, to);
                self.user_write(id, call, Edge::DenyEarlierTokens).await
            }
            Route::UsersBan(id) => self.moderate(id, ApiEndpoint::UsersBan, "ban", to).await,
            Route::UsersUnban(id) => {
                self.moderate(id, ApiEndpoint::UsersUnban, "unban", to)
                    .await
            }
            Route::UsersLock(id) => self.moderate(id, ApiEndpoint::UsersLock, "lock", to).await,
            Route::UsersUnlock(id) => {
                self.moderate(id, ApiEndpoint::UsersUnlock, "unlock", to)
                    .await
            }
            Route::SessionsRevoke(id) => self.revoke_session(id, to).await,
            Route::SessionsCreate => {
                self.post(ApiEndpoint::SessionsCreate, "v1/sessions", body, false, to)
                    .await
            }
            Route::SessionsToken(id, template) => {
                let path = match template {
                    Some(template) => format!("v1/sessions/{id}/tokens/{template}"),
                    None => format!("v1/sessions/{id}/tokens"),
                };
                self.post(ApiEndpoint::SessionsToken, &path, body, true, to)
                    .await
            }
            Route::SessionsVerify(id) => {
                let path = format!("v1/sessions/{id}/verify");
                self.post(ApiEndpoint::SessionsVerify, &path, body, false, to)
                    .await
            }
            Route::TokensVerify => self.verify_token(body).await,
            Route::Jwks => self.jwks(),
        };
        (label, reply)
    }

    fn call<'a>(
        &self,
        endpoint: ApiEndpoint,
        method: Method,
        path: &'a str,
        body: Option<Bytes>,
        to: Target<'a>,
    ) -> Call<'a> {
        Call {
            endpoint,
            method,
            path,
            query: to.query,
            body,
            timeout: Some(self.attempt_timeout),
            retries: self.get_retries,
            max_body_bytes: MAX_RESPONSE_BYTES,
            api_version: to.version,
        }
    }

    /// One Backend API call (retries included) within `request_timeout`.
    async fn send(&self, call: Call<'_>) -> Result<Answer, CallError> {
        tokio::time::timeout(self.request_timeout, self.api.call(call))
            .await
            .unwrap_or(Err(CallError::Timeout))
    }

    async fn pass(&self, call: Call<'_>) -> Reply {
        match self.send(call).await {
            Ok(answer) => Reply::clerk(&answer),
            Err(e) => Reply::error(e.into()),
        }
    }

    /// An uncached `GET`, query passed through.
    async fn get(&self, endpoint: ApiEndpoint, path: &str, to: Target<'_>) -> Reply {
        self.pass(self.call(endpoint, Method::GET, path, None, to))
            .await
    }

    /// A `POST` with the caller's JSON object body (`optional`: or none at all).
    async fn post(
        &self,
        endpoint: ApiEndpoint,
        path: &str,
        body: Incoming,
        optional: bool,
        to: Target<'_>,
    ) -> Reply {
        let body = match self.read_json(body, optional).await {
            Ok(body) => body,
            Err(e) => return Reply::error(e),
        };
        self.pass(self.call(endpoint, Method::POST, path, body, to))
            .await
    }

    /// A capped request body that must be a JSON object; passed on byte for byte. `None` when
    /// it is empty and `optional`.
    async fn read_json(&self, body: Incoming, optional: bool) -> Result<Option<Bytes>, LocalError> {
        let bytes = match crate::body::read_capped(body, self.max_body).await {
            Ok(bytes) => bytes,
            Err(BodyError::TooLarge) => return Err(LocalError::BodyTooLarge),
            Err(BodyError::Read(_) | BodyError::Timeout) => return Err(LocalError::InvalidBody),
        };
        if optional && bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(_)) => Ok(Some(bytes)),
            _ => Err(LocalError::InvalidBody),
        }
    }

    /// A read through the user or session cache: one Backend API call for any number of
    /// concurrent misses; 2xx answers cached, and a user's 404 briefly.
    async fn cached_get(&self, object: Object, id: &str, version: Option<&str>) -> Reply {
        let (cache, endpoint, path) = match object {
            Object::User => (
                &self.caches.users,
                ApiEndpoint::UsersGet,
                format!("v1/users/{id}"),
            ),
            Object::Session => (
                &self.caches.sessions,
                ApiEndpoint::SessionsGet,
                format!("v1/sessions/{id}"),
            ),
        };
        let cache_missing = object == Object::User && self.cache_missing_users;
        let api = self.api.clone();
        let (timeout, retries) = (self.attempt_timeout, self.get_retries);
        // Owned: the fetch may outlive this request when a coalesced waiter takes it over.
        let owned_version = version.map(str::to_owned);
        let fetch = async move {
            let call = Call {
                endpoint,
                method: Method::GET,
                path: &path,
                query: None,
                body: None,
                timeout: Some(timeout),
                retries,
                max_body_bytes: MAX_RESPONSE_BYTES,
                api_version: owned_version.as_deref(),
            };
            match api.call(call).await {
                // Only Clerk's own 404 (its error shape), not one from something in between.
                Ok(answer)
                    if answer.status.is_success()
                        || (cache_missing
                            && answer.status == StatusCode::NOT_FOUND
                            && reply::clerk_shaped(&answer.body)) =>
                {
                    Ok(Cached {
                        status: answer.status,
                        body: answer.body,
                    })
                }
                Ok(answer) => Err(Fetch::Answer(answer)),
                Err(e) => Err(Fetch::Call(e)),
            }
        };
        let key_version = version.unwrap_or(API_VERSION);
        let got = tokio::time::timeout(
            self.request_timeout,
            cache.get_or_fetch(id, key_version, fetch),
        )
        .await;
        match got {
            Ok(Ok((cached, fetched))) => {
                if object == Object::User {
                    if fetched {
                        self.metrics.user_cache_misses.inc();
                    } else {
                        self.metrics.user_cache_hits.inc();
                    }
                }
                if cached.status.is_success() {
                    Reply::clerk_ok(cached.status, cached.body)
                } else {
                    Reply::clerk(&Answer {
                        status: cached.status,
                        body: cached.body,
                        retry_after_seconds: None,
                    })
                }
            }
            Ok(Err(e)) => match &*e {
                Fetch::Answer(answer) => Reply::clerk(answer),
                Fetch::Call(e) => Reply::error(e.clone().into()),
            },
            Err(_) => Reply::error(LocalError::UpstreamTimeout),
        }
    }

    /// `PATCH` user, `PATCH`/`PUT` metadata: Clerk's per-user limit enforced here first.
    async fn update_user(
        &self,
        id: &str,
        endpoint: ApiEndpoint,
        method: Method,
        path: &str,
        body: Incoming,
        to: Target<'_>,
    ) -> Reply {
        let body = match self.read_json(body, false).await {
            Ok(body) => body,
            Err(e) => return Reply::error(e),
        };
        if let Err(retry_after_seconds) = self.user_updates.take(id, tokio::time::Instant::now()) {
            return Reply::error(LocalError::RateLimited {
                retry_after_seconds,
                by: Throttle::UserUpdates,
            });
        }
        let call = self.call(endpoint, method, path, body, to);
        self.user_write(id, call, Edge::None).await
    }

    /// `POST /v1/users/{id}/{ban,unban,lock,unlock}` (no body: Clerk takes none).
    async fn moderate(
        &self,
        id: &str,
        endpoint: ApiEndpoint,
        action: &str,
        to: Target<'_>,
    ) -> Reply {
        let path = format!("v1/users/{id}/{action}");
        let edge = if matches!(endpoint, ApiEndpoint::UsersBan | ApiEndpoint::UsersLock) {
            Edge::DenyEarlierTokens
        } else {
            Edge::None
        };
        let call = self.call(endpoint, Method::POST, &path, None, to);
        self.user_write(id, call, edge).await
    }

    /// A write to user `id`: sent once, the cached user invalidated whatever the outcome (even
    /// a failed or timed-out write may have been applied), and `edge` applied if it may have
    /// happened.
    async fn user_write(&self, id: &str, call: Call<'_>, edge: Edge) -> Reply {
        let result = self.send(call).await;
        self.caches.users.invalidate(id);
        if edge == Edge::DenyEarlierTokens && may_have_happened(&result) {
            // Tokens issued before now stop working at this edge at once, not at their `exp`.
            self.sessions.cut_off_user(id, now_ms());
            tracing::debug!(
                user = id,
                "user deleted, banned or locked; earlier tokens denied"
            );
        }
        match result {
            Ok(answer) => Reply::clerk(&answer),
            Err(e) => Reply::error(e.into()),
        }
    }

    async fn revoke_session(&self, id: &str, to: Target<'_>) -> Reply {
        let path = format!("v1/sessions/{id}/revoke");
        let result = self
            .send(self.call(ApiEndpoint::SessionsRevoke, Method::POST, &path, None, to))
            .await;
        self.caches.sessions.invalidate(id);
        if may_have_happened(&result) {
            self.sessions
                .revoke_session(id, crate::revocations::SessionStatus::Revoked)
                .await;
            self.metrics
                .revoked_sessions
                .set(self.sessions.denied_sessions() as i64);
            tracing::debug!(session = id, "session revoked; denied at the edge");
        }
        match result {
            Ok(answer) => Reply::clerk(&answer),
            Err(e) => Reply::error(e.into()),
        }
    }

    /// The keys the proxy verifies with, as Clerk's `GET /v1/jwks` shape, for SDKs whose
    /// `verifyToken` fetches `{apiUrl}/v1/jwks`. No Backend API call: the JSON is built once
    /// per key fetch.
    fn jwks(&self) -> Reply {
        match self.gate.keys().published_jwks() {
            Ok(body) => Reply::clerk_ok(StatusCode::OK, body),
            Err(Unpublished::Pinned) => Reply::error(LocalError::JwksPinned),
            Err(Unpublished::Unavailable) => Reply::error(LocalError::KeysUnavailable),
        }
    }

    /// The proxy's verification (keys, claims, cache) and deny-lists, for tokens that arrive
    /// outside HTTP.
    async fn verify_token(&self, body: Incoming) -> Reply {
        let request = match self.read_json(body, false).await {
            Ok(body) => serde_json::from_slice::<VerifyRequest>(body.as_deref().unwrap_or(b"")),
            Err(e) => return Reply::error(e),
        };
        let Ok(request) = request else {
            return Reply::error(LocalError::InvalidBody);
        };
        let token = request.token.trim();
        if token.is_empty() {
            return Reply::token_rejected(AuthError::Missing);
        }
        match self
            .gate
            .verify_token(token, request.accepts, now_ms())
            .await
        {
            Ok(Verified::Session(identity)) => Reply::ok_json(&identity_json(&identity, token)),
            Ok(Verified::Machine(principal)) => Reply::ok_json(&principal.to_json()),
            Err(Refusal::Auth(e)) => Reply::token_rejected(e),
            Err(Refusal::Policy(e)) => Reply::policy_rejected(e),
        }
    }
}

/// Where a passed-through call goes besides its path: the caller's query and API version.
#[derive(Clone, Copy)]
struct Target<'a> {
    query: Option<&'a str>,
    version: Option<&'a str>,
}

impl Handler for LocalApi {
    type Body = Full<Bytes>;

    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Full<Bytes>> {
        let start = Instant::now();
        let method = req.method().clone();
        let (route, reply) = self.respond(req).await;
        self.metrics.local_api_requests.inc(route, reply.result);
        // Route labels only: paths carry user and session ids.
        tracing::debug!(
            %method,
            route = route.as_label(),
            result = reply.result.as_label(),
            status = reply.response.status().as_u16(),
            micros = start.elapsed().as_micros() as u64,
            peer = %conn.peer,
            "local api request"
        );
        reply.response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn digest(token: &str) -> [u8; 32] {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        d.as_ref().try_into().unwrap()
    }

    #[test]
    fn only_the_configured_bearer_token_passes() {
        let expected = digest("local-api-token-0123");
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            h
        };
        assert!(bearer_matches(
            &with("Bearer local-api-token-0123"),
            &expected
        ));
        assert!(bearer_matches(
            &with("bearer local-api-token-0123"),
            &expected
        ));
        for wrong in [
            "Bearer local-api-token-012",
            "Bearer local-api-token-01234",
            "Basic local-api-token-0123",
            "local-api-token-0123",
            "Bearer ",
        ] {
            assert!(!bearer_matches(&with(wrong), &expected), "{wrong}");
        }
        assert!(!bearer_matches(&HeaderMap::new(), &expected));
    }

    fn config(toml: &str) -> Result<crate::config::Config, ConfigError> {
        crate::config::Config::from_toml(&format!(
            "[clerk]\nsecret_key = \"sk_test_x\"\nissuer = \"https://clerk.example.com\"\n{toml}"
        ))
    }

    #[test]
    fn the_default_listener_is_loopback_and_needs_no_token() {
        let c = config("").unwrap();
        assert_eq!(c.local_api.listen.to_string(), "127.0.0.1:9091");
        assert!(c.local_api.token.is_none());
        assert_eq!(c.local_api.serves(&c.clerk), Ok(()));
        assert!(config("[local_api]\nlisten = \"[::1]:9091\"\n").is_ok());
    }

    #[test]
    fn any_other_address_requires_a_token() {
        for listen in ["0.0.0.0:9091", "10.1.2.3:9091", "[::]:9091"] {
            let err = config(&format!("[local_api]\nlisten = \"{listen}\"\n")).unwrap_err();
            assert_eq!(err.key, "local_api.token", "{listen}: {err}");
        }
        assert!(
            config("[local_api]\nlisten = \"0.0.0.0:9091\"\ntoken = \"0123456789abcdef\"\n")
                .is_ok()
        );
        let err =
            config("[local_api]\nlisten = \"0.0.0.0:9091\"\ntoken = \"short\"\n").unwrap_err();
        assert_eq!(err.key, "local_api.token");
        // Disabled, nothing listens, so nothing needs protecting.
        assert!(config("[local_api]\nenabled = false\nlisten = \"0.0.0.0:9091\"\n").is_ok());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (toml, key) in [
            (
                "user_cache_ttl_seconds = 0",
                "local_api.user_cache_ttl_seconds",
            ),
            ("request_timeout_ms = 0", "local_api.request_timeout_ms"),
            ("cache_capacity = 0", "local_api.cache_capacity"),
            ("user_updates_per_10s = 0", "local_api.user_updates_per_10s"),
            ("get_retries = 9", "local_api.get_retries"),
            (
                "missing_user_cache_ttl_seconds = 301",
                "local_api.missing_user_cache_ttl_seconds",
            ),
            (
                "listen = \"0.0.0.0:9090\"\ntoken = \"0123456789abcdef\"",
                "local_api.listen",
            ),
            ("tokn = \"x\"", "local_api"),
        ] {
            let err = config(&format!("[local_api]\n{toml}\n")).unwrap_err();
            assert!(err.key.starts_with(key), "{toml}: {err}");
        }
        let err = config("[sessions]\napi_budget_per_10s = 0\n").unwrap_err();
        assert_eq!(err.key, "sessions.api_budget_per_10s");
        assert!(
            config("[sessions]\napi_budget_per_10s = 0\n[local_api]\nenabled = false\n").is_ok()
        );
    }

    #[test]
    fn without_a_secret_key_the_listener_does_not_run() {
        let c = crate::config::Config::from_toml(
            "[clerk]\nissuer = \"https://clerk.example.com\"\njwks_url = \"https://clerk.example.com/.well-known/jwks.json\"\n",
        )
        .unwrap();
        assert!(
            c.local_api
                .serves(&c.clerk)
                .unwrap_err()
                .contains("secret_key")
        );
        let c = config("[local_api]\nenabled = false\n").unwrap();
        assert_eq!(
            c.local_api.serves(&c.clerk),
            Err("local_api.enabled = false")
        );
    }

    #[test]
    fn only_plausible_api_versions_are_forwarded_and_the_default_is_none() {
        let with = |value: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert("clerk-api-version", HeaderValue::from_bytes(value).unwrap());
            h
        };
        let version =
            |h: &HeaderMap| caller_api_version(h, None).map(|(v, _)| v.map(str::to_owned));
        assert_eq!(version(&HeaderMap::new()), Ok(None));
        assert_eq!(version(&with(b"2025-04-10")), Ok(Some("2025-04-10".into())));
        assert_eq!(
            version(&with(b" 2021-02-05 ")),
            Ok(Some("2021-02-05".into()))
        );
        assert_eq!(
            version(&with(API_VERSION.as_bytes())),
            Ok(None),
            "clerkgate's own version shares the default cache entries"
        );
        for bad in [
            &b""[..],
            b"2025-04-10 x",
            b"a/b",
            b"\xff",
            "v".repeat(33).as_bytes(),
        ] {
            assert_eq!(
                version(&with(bad)),
                Err(LocalError::InvalidApiVersion),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_query_api_version_becomes_the_header_and_leaves_the_query() {
        let none = HeaderMap::new();
        let split = |h: &HeaderMap, q: &'static str| {
            caller_api_version(h, Some(q))
                .map(|(v, q)| (v.map(str::to_owned), q.map(|q| q.into_owned())))
        };
        assert_eq!(
            split(
                &none,
                "limit=1&__clerk_api_version=2025-04-10&user_id=u%20x"
            ),
            Ok((
                Some("2025-04-10".into()),
                Some("limit=1&user_id=u%20x".into())
            )),
            "the rest of the query byte for byte"
        );
        assert_eq!(
            split(&none, "__clerk_api_version=2025-04-10"),
            Ok((Some("2025-04-10".into()), None))
        );
        assert_eq!(
            split(&none, "limit=1&offset=2"),
            Ok((None, Some("limit=1&offset=2".into())))
        );
        let mut header = HeaderMap::new();
        header.insert("clerk-api-version", HeaderValue::from_static("2025-04-10"));
        for bad in [
            "__clerk_api_version=2025-04-10",
            "__clerk_api_version=a&__clerk_api_version=b",
        ] {
            assert_eq!(
                split(&header, bad),
                Err(LocalError::InvalidApiVersion),
                "both, or twice"
            );
        }
        assert_eq!(
            split(&none, "__clerk_api_version=2025%2D04"),
            Err(LocalError::InvalidApiVersion)
        );
    }

    #[test]
    fn only_refused_or_unsent_writes_count_as_not_done() {
        let answer = |status: u16| {
            Ok(Answer {
                status: StatusCode::from_u16(status).unwrap(),
                body: Bytes::new(),
                retry_after_seconds: None,
            })
        };
        assert!(may_have_happened(&answer(200)));
        assert!(may_have_happened(&answer(502)));
        assert!(!may_have_happened(&answer(404)));
        assert!(!may_have_happened(&answer(429)));
        assert!(may_have_happened(&Err(CallError::Timeout)));
        assert!(!may_have_happened(&Err(CallError::Budget {
            retry_after_seconds: 3
        })));
    }
}
