//! Browser mode: what Clerk's SDK does for browsers, in front of a server-rendered or mixed app.
//!
//! - [`cors`]: CORS preflights (forwarded unauthenticated, answered, or authenticated).
//! - [`sdk`]: the request as `@clerk/backend`'s `authenticateRequest` sees it (cookie choice,
//!   `__client_uat`, dev browser, handshake artefacts, eligibility, the public URL).
//! - [`Browser::authenticate`]: the SDK's decision for `required` and `optional` routes
//!   (signed in, signed out with the SDK's reason, or a handshake `307`), including the return
//!   leg (`__clerk_handshake_nonce`) and the refresh without a redirect (`__refresh_<suffix>`).
//!
//! The authority is `@clerk/backend` 3.x `src/tokens/request.ts` and `handshake.ts`
//! (`authenticateRequest`, `HandshakeService`); `tests/it/browser.rs` runs it as an oracle.
//! Deliberate differences, each stricter or loop-free, are listed in the README ("Browsers").

pub(crate) mod cors;
pub(crate) mod fapi;
pub(crate) mod sdk;

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::auth::gate::Gate;
use crate::auth::identity::Identity;
use crate::auth::token::{self, Carrier, CookieNames};
use crate::auth::{AuthError, now_ms};
use crate::clerk::api::{BackendApi, Call};
use crate::clerk::publishable_key::{InstanceType, PublishableKey};
use crate::config::error::ConfigError;
use crate::telemetry::ApiEndpoint;
use sdk::View;

/// `[browser]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Clerk's handshake for eligible page loads; effective when the publishable key and the
    /// secret key are both known.
    pub handshake: bool,
    /// Signed-out page loads on `required` routes are sent here (307, `redirect_url=`); empty
    /// keeps the 401.
    pub sign_in_url: String,
    /// Path under which Clerk Frontend API traffic is forwarded to `fapi_url`; empty = off.
    pub fapi_proxy_path: String,
    /// Where `fapi_proxy_path` forwards to.
    pub fapi_url: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            handshake: true,
            sign_in_url: String::new(),
            fapi_proxy_path: String::new(),
            fapi_url: "https://frontend-api.clerk.dev".into(),
        }
    }
}

impl Config {
    pub fn validate(&self, has_secret_key: bool) -> Result<(), ConfigError> {
        if !self.sign_in_url.is_empty() {
            let ok = url::Url::parse(&self.sign_in_url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                || (self.sign_in_url.starts_with('/') && !self.sign_in_url.starts_with("//"));
            if !ok {
                return Err(ConfigError::new(
                    "browser.sign_in_url",
                    "must be an absolute http(s) URL or a path starting with /",
                ));
            }
        }
        if !self.fapi_proxy_path.is_empty() {
            let p = self.fapi_proxy_path.trim_end_matches('/');
            if !p.starts_with('/')
                || p.is_empty()
                || p.contains(['?', '#', '*'])
                || p.contains("//")
            {
                return Err(ConfigError::new(
                    "browser.fapi_proxy_path",
                    "must be a path such as \"/__clerk\" (or empty)",
                ));
            }
            if !has_secret_key {
                return Err(ConfigError::new(
                    "browser.fapi_proxy_path",
                    "the Frontend API proxy needs clerk.secret_key (CLERK_SECRET_KEY)",
                ));
            }
        }
        url::Url::parse(&self.fapi_url)
            .ok()
            .filter(|u| u.scheme() == "https" || crate::secret::is_secure_or_loopback(u))
            .ok_or_else(|| ConfigError::new("browser.fapi_url", "must be an https URL"))?;
        Ok(())
    }
}

/// Clerk's cookie and query parameter names (`constants.Cookies`, `constants.QueryParameters`).
pub(crate) mod names {
    pub(crate) const SESSION: &str = "__session";
    pub(crate) const CLIENT_UAT: &str = "__client_uat";
    pub(crate) const REFRESH: &str = "__refresh";
    pub(crate) const DEV_BROWSER: &str = "__clerk_db_jwt";
    pub(crate) const LEGACY_DEV_BROWSER: &str = "__dev_session";
    pub(crate) const HANDSHAKE: &str = "__clerk_handshake";
    pub(crate) const HANDSHAKE_NONCE: &str = "__clerk_handshake_nonce";
    pub(crate) const HANDSHAKE_HELP: &str = "__clerk_help";
    pub(crate) const REDIRECT_COUNT: &str = "__clerk_redirect_count";
}

/// The SDK's `AuthErrorReason` values clerkgate emits (plus token verification reasons, which
/// are [`AuthError`] labels).
pub(crate) mod reason {
    pub(crate) const DEV_BROWSER_MISSING: &str = "dev-browser-missing";
    pub(crate) const DEV_BROWSER_SYNC: &str = "dev-browser-sync";
    pub(crate) const CLIENT_UAT_WITHOUT_SESSION: &str = "client-uat-but-no-session-token";
    pub(crate) const SESSION_WITHOUT_CLIENT_UAT: &str = "session-token-but-no-client-uat";
    pub(crate) const IAT_BEFORE_CLIENT_UAT: &str = "session-token-iat-before-client-uat";
    pub(crate) const TOKEN_AND_UAT_MISSING: &str = "session-token-and-uat-missing";
    pub(crate) const TOKEN_MISSING: &str = "session-token-missing";
    pub(crate) const NBF: &str = "session-token-nbf";
    pub(crate) const IAT_IN_THE_FUTURE: &str = "session-token-iat-in-the-future";
    pub(crate) const CROSS_ORIGIN_SYNC: &str = "primary-domain-cross-origin-sync";
}

/// What the SDK would decide for a request.
pub enum Verdict<'a> {
    SignedIn {
        identity: Arc<Identity>,
        /// The token the identity came from (a new one after a handshake or refresh).
        token: Cow<'a, str>,
        /// `Set-Cookie` directives for the browser (handshake payload, refresh).
        cookies: Vec<HeaderValue>,
        /// The handshake query parameters are removed before forwarding.
        strip_handshake_params: bool,
    },
    SignedOut {
        /// The nearest clerkgate error, for the 401 body and metrics.
        error: AuthError,
        /// The SDK's `x-clerk-auth-reason`.
        reason: Cow<'static, str>,
        cookies: Vec<HeaderValue>,
    },
    /// A `307` to the Frontend API's handshake endpoint.
    Handshake {
        location: String,
        reason: Cow<'static, str>,
        /// The redirect-loop counter cookie.
        counter: HeaderValue,
    },
    /// Keys or session state unavailable: never hidden behind "signed out".
    Unavailable(AuthError),
}

/// What the handshake needs, present only when it is effective.
struct Handshake {
    /// The Frontend API host from the publishable key.
    frontend_api: String,
    /// `https://<frontend_api>/v1/client/handshake`.
    endpoint: url::Url,
    development: bool,
    api: Arc<BackendApi>,
    /// A fifth of `sessions.api_budget_per_10s` for browser-triggered calls.
    share: CallShare,
}

/// What browser mode reads: its own sections, `[clerk]`, and the few values it shares with the
/// proxy, the authenticator and the session checks (checked together by `Config::validate`).
pub struct Sections<'a> {
    pub browser: &'a Config,
    pub cors: &'a cors::Config,
    pub clerk: &'a crate::clerk::Config,
    /// `auth.accept_cookie`.
    pub accept_cookie: bool,
    /// `sessions.api_budget_per_10s`, of which the browser's calls get a fifth.
    pub api_budget_per_10s: u32,
    /// `proxy.trust_forwarded_headers`.
    pub trust_forwarded: bool,
    /// `proxy.encoded_slashes`, for the Frontend API proxy's paths.
    pub encoded_slashes: crate::proxy::path::EncodedSlashes,
    /// `proxy.connect_timeout_seconds` and `proxy.upstream_timeout_seconds`, for the Frontend
    /// API proxy.
    pub connect_timeout: std::time::Duration,
    pub upstream_timeout: std::time::Duration,
}

/// Browser mode, compiled once.
pub struct Browser {
    pub cors: cors::Cors,
    /// `browser.fapi_proxy_path`.
    pub fapi: Option<fapi::FapiProxy>,
    handshake: Option<Handshake>,
    sign_in_url: Option<String>,
    names: sdk::Names,
    /// Verification and revocation, as on every other path.
    gate: Arc<Gate>,
    header_names: CookieNames,
    trust_forwarded: bool,
    accept_cookie: bool,
}

/// A share of the Backend API budget for the calls a browser can trigger (handshake payload,
/// refresh): anyone can send a made-up `__clerk_handshake_nonce`, and those calls must not spend
/// the budget the session checks and the local API live on.
struct CallShare {
    limit: u32,
    window: std::sync::Mutex<(tokio::time::Instant, u32)>,
}

impl CallShare {
    fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            window: std::sync::Mutex::new((tokio::time::Instant::now(), 0)),
        }
    }

    /// Takes one call from the current 10-second window, or says no.
    fn take(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0.elapsed() >= std::time::Duration::from_secs(10) {
            *w = (tokio::time::Instant::now(), 0);
        }
        if w.1 >= self.limit {
            return false;
        }
        w.1 += 1;
        true
    }
}

/// Largest Backend API answer read for a handshake payload or a refresh.
const MAX_BODY_BYTES: usize = 64 * 1024;

impl Browser {
    /// Browser mode for `config`; `api` is the shared Backend API client (absent without a
    /// secret key). Logs once whether the handshake is effective and why not.
    pub fn new(config: Sections<'_>, gate: Arc<Gate>, api: Option<Arc<BackendApi>>) -> Self {
        let pk = config
            .clerk
            .publishable_key
            .as_deref()
            .and_then(|k| PublishableKey::parse(k.trim()).ok());
        let handshake = match (config.browser.handshake, &pk, api) {
            (false, _, _) => None,
            (true, Some(pk), Some(api)) if config.accept_cookie => {
                let endpoint =
                    url::Url::parse(&format!("https://{}/v1/client/handshake", pk.frontend_api))
                        .ok();
                endpoint.map(|endpoint| Handshake {
                    frontend_api: pk.frontend_api.clone(),
                    endpoint,
                    development: pk.instance_type == InstanceType::Development,
                    api,
                    share: CallShare::new(config.api_budget_per_10s / 5),
                })
            }
            (true, _, _) => {
                tracing::warn!(
                    "browser.handshake is off: it needs clerk.publishable_key, clerk.secret_key \
                     and auth.accept_cookie = true"
                );
                None
            }
        };
        if let Some(h) = &handshake {
            tracing::info!(frontend_api = %h.frontend_api, development = h.development, "browser handshake on");
        }
        let suffix = pk.as_ref().map(|p| p.cookie_suffix.clone());
        let fapi = fapi::FapiProxy::new(&config);
        if fapi.is_some() {
            let path = config.browser.fapi_proxy_path.trim_end_matches('/');
            if !config.clerk.extra_issuers.iter().any(|i| i.ends_with(path)) {
                tracing::warn!(
                    path,
                    "browser.fapi_proxy_path is set but no clerk.extra_issuers entry ends with it: \
                     add https://<your domain>{path} if your instance's tokens carry the proxy URL as iss"
                );
            }
        }
        Self {
            fapi,
            cors: cors::Cors::new(config.cors, &config.clerk.authorized_parties),
            handshake,
            sign_in_url: (!config.browser.sign_in_url.is_empty())
                .then(|| config.browser.sign_in_url.clone()),
            names: sdk::Names::new(
                suffix.as_deref(),
                pk.as_ref().map_or("", |p| p.frontend_api.as_str()),
            ),
            header_names: CookieNames::new(suffix.as_deref()),
            gate,
            trust_forwarded: config.trust_forwarded,
            accept_cookie: config.accept_cookie,
        }
    }

    /// `true` when the handshake decides cookie requests (else the plain rules apply).
    pub fn handshake_on(&self) -> bool {
        self.handshake.is_some()
    }

    /// `true` when `browser.sign_in_url` is set.
    pub fn has_sign_in_url(&self) -> bool {
        self.sign_in_url.is_some()
    }

    /// The sign-in redirect for a signed-out page load: `307` to `sign_in_url` with
    /// `redirect_url=<the public URL>`.
    pub fn sign_in_redirect(&self, parts: &http::request::Parts, tls: bool) -> Option<String> {
        let sign_in = self.sign_in_url.as_deref()?;
        if !sdk::is_navigation(&parts.method, &parts.headers) {
            return None;
        }
        let here = sdk::public_url(parts, tls, self.trust_forwarded)?;
        let mut target = if sign_in.starts_with('/') {
            here.join(sign_in).ok()?
        } else {
            url::Url::parse(sign_in).ok()?
        };
        target
            .query_pairs_mut()
            .append_pair("redirect_url", here.as_str());
        Some(target.into())
    }

    /// Verifies a token with the normal rules: signature and claims (cached), then
    /// revocation.
    async fn verify(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        self.gate.session(token, now_ms()).await
    }

    /// The SDK's decision for a request on a `required` or `optional` route.
    pub async fn authenticate<'a>(
        &self,
        parts: &'a http::request::Parts,
        tls: bool,
    ) -> Verdict<'a> {
        let Some(hs) = &self.handshake else {
            return self.plain(&parts.headers).await;
        };
        // The header path reads the cookies only when the token is refused: an API client's
        // valid token costs no cookie parsing.
        let header_token = match token::extract(&parts.headers, &self.header_names, false) {
            Err(e) => return signed_out(e, Vec::new()),
            Ok(Some(found)) if found.carrier == Carrier::Header => Some(found.token),
            Ok(_) => None,
        };
        let verified = match header_token {
            Some(token) => Some(self.verify(token).await),
            None => None,
        };
        if let (Some(token), Some(Ok(identity))) = (header_token, &verified) {
            return Verdict::SignedIn {
                identity: identity.clone(),
                token: Cow::Borrowed(token),
                cookies: Vec::new(),
                strip_handshake_params: false,
            };
        }
        let view = View::new(parts, &self.names, hs.development);
        let ctx = Ctx {
            browser: self,
            hs,
            view: &view,
            parts,
            tls,
        };
        match (header_token, verified) {
            (Some(token), Some(Err(e))) => ctx.token_error(e, token).await,
            _ => ctx.cookie().await,
        }
    }

    /// Without the handshake: today's rules (header or cookie, `__client_uat` checks).
    async fn plain<'a>(&self, headers: &'a HeaderMap) -> Verdict<'a> {
        let found = match token::extract(headers, &self.header_names, self.accept_cookie) {
            Ok(Some(found)) => found,
            Ok(None) => return signed_out(AuthError::Missing, Vec::new()),
            Err(e) => return signed_out(e, Vec::new()),
        };
        match self.gate.found(&found, now_ms()).await {
            Ok(identity) => Verdict::SignedIn {
                identity,
                token: Cow::Borrowed(found.token),
                cookies: Vec::new(),
                strip_handshake_params: false,
            },
            Err(e) => signed_out(e, Vec::new()),
        }
    }
}

fn signed_out(error: AuthError, cookies: Vec<HeaderValue>) -> Verdict<'static> {
    if matches!(
        error,
        AuthError::KeysUnavailable | AuthError::SessionCheckUnavailable
    ) {
        return Verdict::Unavailable(error);
    }
    Verdict::SignedOut {
        error,
        reason: Cow::Borrowed(sdk_reason(error)),
        cookies,
    }
}

/// The SDK's reason for a clerkgate error outside the handshake paths.
fn sdk_reason(error: AuthError) -> &'static str {
    match error {
        AuthError::Missing => reason::TOKEN_AND_UAT_MISSING,
        AuthError::NoClientUat => reason::SESSION_WITHOUT_CLIENT_UAT,
        AuthError::IatBeforeClientUat => reason::IAT_BEFORE_CLIENT_UAT,
        other => crate::telemetry::Label::as_label(other.failure()),
    }
}

/// One request's decision, with everything it reads.
struct Ctx<'b, 'a> {
    browser: &'b Browser,
    hs: &'b Handshake,
    view: &'b View<'a>,
    parts: &'a http::request::Parts,
    tls: bool,
}

/// A token verification failure the SDK answers with "maybe handshake".
fn time_reason(e: AuthError) -> Option<&'static str> {
    match e {
        AuthError::Expired => Some("token-expired"),
        AuthError::NotActiveYet => Some(reason::NBF),
        AuthError::IatInTheFuture => Some(reason::IAT_IN_THE_FUTURE),
        _ => None,
    }
}

impl<'a> Ctx<'_, 'a> {
    /// `authenticateRequestWithTokenInCookie` (satellite and organization-sync rules aside:
    /// clerkgate has neither option).
    async fn cookie(&self) -> Verdict<'a> {
        let v = self.view;
        let eligible = v.eligible;
        // The return leg. Resolved on page loads only (as newer SDKs do with
        // `__internal_resolveHandshakeOnlyForNavigation`): a stale nonce on a fetch costs no
        // Backend API call.
        if eligible && let Some(nonce) = v.handshake_nonce.as_deref() {
            return self.resolve_nonce(nonce).await;
        }
        if self.hs.development && eligible {
            if v.dev_browser_in_query {
                return self.maybe_handshake(Cow::Borrowed(reason::DEV_BROWSER_SYNC));
            }
            if v.dev_browser.is_none() {
                return self.maybe_handshake(Cow::Borrowed(reason::DEV_BROWSER_MISSING));
            }
        }
        let session = v.session;
        match (v.client_uat > 0, session) {
            (false, None) => return signed_out(AuthError::Missing, Vec::new()),
            (false, Some(_)) => {
                return self.maybe_handshake_or(
                    Cow::Borrowed(reason::SESSION_WITHOUT_CLIENT_UAT),
                    AuthError::NoClientUat,
                );
            }
            (true, None) => {
                return self.maybe_handshake_or(
                    Cow::Borrowed(reason::CLIENT_UAT_WITHOUT_SESSION),
                    AuthError::Missing,
                );
            }
            (true, Some(_)) => {}
        }
        let token = session.unwrap_or_default();
        let verified = self.browser.verify(token).await;
        // The SDK decodes and checks the token's type and `iat` before verifying it; a
        // verified token passed the first two, a rejected one is decoded here for the order.
        let iat = match &verified {
            Ok(identity) => identity.iat.map(|i| i as f64),
            // Refused on its length alone, never decoded.
            Err(AuthError::TooLarge) => return signed_out(AuthError::TooLarge, Vec::new()),
            Err(_) => {
                let Some(peek) = sdk::peek(token) else {
                    return signed_out(AuthError::Invalid, Vec::new());
                };
                if matches!(token::parse(token), Err(AuthError::TypeMismatch)) {
                    return signed_out(AuthError::TypeMismatch, Vec::new());
                }
                peek.iat
            }
        };
        if iat.is_some_and(|iat| iat < v.client_uat as f64) {
            return self.maybe_handshake_or(
                Cow::Borrowed(reason::IAT_BEFORE_CLIENT_UAT),
                AuthError::IatBeforeClientUat,
            );
        }
        match verified {
            Ok(identity) => {
                let cross_origin = self.parts.method == http::Method::GET
                    && v.sec_fetch_dest == Some("document")
                    && v.redirect_count == 0.0
                    && self.cross_origin_referrer();
                if cross_origin {
                    return self
                        .maybe_handshake_or(
                            Cow::Borrowed(reason::CROSS_ORIGIN_SYNC),
                            AuthError::Missing,
                        )
                        .or_signed_in(identity, token);
                }
                Verdict::SignedIn {
                    identity,
                    token: Cow::Borrowed(token),
                    cookies: Vec::new(),
                    strip_handshake_params: false,
                }
            }
            Err(e) => self.token_error(e, token).await,
        }
    }

    /// `isCrossOriginReferrer() && !isKnownClerkReferrer()`.
    fn cross_origin_referrer(&self) -> bool {
        let Some(referrer) = self.view.referrer.and_then(|r| url::Url::parse(r).ok()) else {
            return false;
        };
        let Some(here) = sdk::public_url(self.parts, self.tls, self.browser.trust_forwarded) else {
            return false;
        };
        if referrer.origin() == here.origin() {
            return false;
        }
        !sdk::is_known_clerk_referrer(&referrer, &self.hs.frontend_api, self.hs.development)
    }

    /// `handleSessionTokenError`: refresh when the SDK would, else maybe a handshake.
    async fn token_error(&self, e: AuthError, token: &'a str) -> Verdict<'a> {
        let Some(time) = time_reason(e) else {
            return signed_out(e, Vec::new());
        };
        let is_get = self.parts.method == http::Method::GET;
        let refresh_error: Option<Cow<'static, str>> = if e == AuthError::Expired
            && is_get
            && let Some(refresh) = self.view.refresh
        {
            match self.refresh(token, refresh).await {
                Ok(verdict) => return verdict,
                Err(why) => Some(why),
            }
        } else if !is_get {
            Some(Cow::Borrowed("non-eligible-non-get"))
        } else if self.view.refresh.is_none() {
            Some(Cow::Borrowed("non-eligible-no-refresh-cookie"))
        } else {
            None
        };
        let reason: Cow<'static, str> = match (e, refresh_error) {
            (AuthError::Expired, Some(r)) => {
                Cow::Owned(format!("session-token-expired-refresh-{r}"))
            }
            (AuthError::Expired, None) => Cow::Borrowed("session-token-expired"),
            _ => Cow::Borrowed(time),
        };
        self.maybe_handshake_or(reason, e)
    }

    /// `handleMaybeHandshakeStatus` for a reason with no closer clerkgate error.
    fn maybe_handshake(&self, reason: Cow<'static, str>) -> Verdict<'a> {
        self.maybe_handshake_or(reason, AuthError::Missing)
    }

    /// `handleMaybeHandshakeStatus`: a `307` for eligible requests unless the loop counter
    /// reached 3, else signed out with the same reason.
    fn maybe_handshake_or(&self, reason: Cow<'static, str>, error: AuthError) -> Verdict<'a> {
        let out = || Verdict::SignedOut {
            error,
            reason: reason.clone(),
            cookies: Vec::new(),
        };
        if !self.view.eligible || self.view.redirect_count == 3.0 {
            return out();
        }
        let Some(location) = self.location(&reason) else {
            return out();
        };
        let counter = format!(
            "{}={}; SameSite=Lax; HttpOnly; Max-Age=2",
            names::REDIRECT_COUNT,
            sdk::js_number(self.view.redirect_count + 1.0)
        );
        match HeaderValue::from_str(&counter) {
            Ok(counter) => Verdict::Handshake {
                location,
                reason,
                counter,
            },
            Err(_) => out(),
        }
    }

    /// `buildRedirectToHandshake`.
    fn location(&self, reason: &str) -> Option<String> {
        let v = self.view;
        let mut here = sdk::public_url(self.parts, self.tls, self.browser.trust_forwarded)?;
        sdk::remove_query_params(&mut here, &[names::DEV_BROWSER, names::LEGACY_DEV_BROWSER]);
        let mut url = self.hs.endpoint.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("redirect_url", here.as_str());
            q.append_pair("__clerk_api_version", crate::clerk::API_VERSION);
            q.append_pair(
                "suffixed_cookies",
                if v.suffixed { "true" } else { "false" },
            );
            q.append_pair("__clerk_hs_reason", reason);
            q.append_pair("format", "nonce");
            if let Some(t) = v.session.or(v.header_token) {
                q.append_pair("__session", t);
            }
            if self.hs.development
                && let Some(db) = v.dev_browser.as_deref()
            {
                q.append_pair(names::DEV_BROWSER, db);
            }
        }
        Some(url.into())
    }

    /// The return leg: `GET /v1/clients/handshake_payload?nonce=`, every directive to the
    /// browser, the new `__session` verified. Any failure is signed out, never another
    /// handshake.
    async fn resolve_nonce(&self, nonce: &str) -> Verdict<'a> {
        if !self.hs.share.take() {
            tracing::debug!("handshake payload call refused: browser share of the budget spent");
            return Verdict::SignedOut {
                error: AuthError::Missing,
                reason: Cow::Borrowed(reason::TOKEN_MISSING),
                cookies: Vec::new(),
            };
        }
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("nonce", nonce)
            .finish();
        let answer = self
            .hs
            .api
            .call(Call {
                endpoint: ApiEndpoint::ClientsHandshakePayload,
                method: reqwest::Method::GET,
                path: "v1/clients/handshake_payload",
                query: Some(&query),
                body: None,
                timeout: None,
                retries: 0,
                max_body_bytes: MAX_BODY_BYTES,
                api_version: None,
            })
            .await;
        #[derive(Deserialize)]
        struct Payload {
            directives: Vec<String>,
        }
        let directives = match answer {
            Ok(a) if a.status.is_success() => serde_json::from_slice::<Payload>(&a.body)
                .map(|p| p.directives)
                .unwrap_or_default(),
            Ok(a) => {
                tracing::debug!(status = a.status.as_u16(), "handshake payload refused");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!(error = %e, "handshake payload unavailable");
                Vec::new()
            }
        };
        let (cookies, session) = set_cookies(&directives);
        let Some(session) = session else {
            return Verdict::SignedOut {
                error: AuthError::Missing,
                reason: Cow::Borrowed(reason::TOKEN_MISSING),
                cookies,
            };
        };
        match self.browser.verify(&session).await {
            Ok(identity) => Verdict::SignedIn {
                identity,
                token: Cow::Owned(session),
                cookies,
                strip_handshake_params: true,
            },
            Err(e @ (AuthError::KeysUnavailable | AuthError::SessionCheckUnavailable)) => {
                Verdict::Unavailable(e)
            }
            Err(e) => Verdict::SignedOut {
                error: e,
                reason: Cow::Borrowed(sdk_reason(e)),
                cookies,
            },
        }
    }

    /// `attemptRefresh`: `POST /v1/sessions/{sid}/refresh` with `format=cookie`. `Err` is the
    /// SDK's `RefreshTokenErrorReason` (or the Backend API's error code).
    async fn refresh(
        &self,
        expired: &str,
        refresh: &str,
    ) -> Result<Verdict<'a>, Cow<'static, str>> {
        let peek =
            sdk::peek(expired).ok_or(Cow::Borrowed("expired-session-token-decode-failed"))?;
        let sid = peek
            .sid
            .filter(|s| crate::clerk::api::is_id(s))
            .ok_or(Cow::Borrowed("expired-session-token-missing-sid-claim"))?;
        if !self.hs.share.take() {
            // What the SDK reports when Clerk refuses for its rate limit.
            return Err(Cow::Borrowed("unexpected-bapi-error"));
        }
        let origin = sdk::public_url(self.parts, self.tls, self.browser.trust_forwarded)
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default();
        let mut request_headers = serde_json::Map::new();
        for (name, value) in &self.parts.headers {
            if let Ok(v) = value.to_str() {
                request_headers
                    .entry(name.as_str())
                    .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                // The SDK sends each header's (joined) value as a one-element list.
                if let Some(serde_json::Value::Array(list)) = request_headers.get_mut(name.as_str())
                {
                    match list.first_mut() {
                        Some(serde_json::Value::String(joined)) => {
                            joined.push_str(", ");
                            joined.push_str(v);
                        }
                        _ => list.push(serde_json::Value::String(v.to_owned())),
                    }
                }
            }
        }
        let body = serde_json::json!({
            "format": "cookie",
            "expired_token": expired,
            "refresh_token": refresh,
            "request_origin": origin,
            "request_headers": request_headers,
        });
        let path = format!("v1/sessions/{sid}/refresh");
        let query = if self.view.suffixed {
            "suffixed_cookies=true"
        } else {
            "suffixed_cookies=false"
        };
        let answer = self
            .hs
            .api
            .call(Call {
                endpoint: ApiEndpoint::SessionsRefresh,
                method: reqwest::Method::POST,
                path: &path,
                query: Some(query),
                body: Some(Bytes::from(body.to_string())),
                timeout: None,
                retries: 0,
                max_body_bytes: MAX_BODY_BYTES,
                api_version: None,
            })
            .await
            .map_err(|_| Cow::Borrowed("unexpected-bapi-error"))?;
        if !answer.status.is_success() {
            #[derive(Deserialize)]
            struct Errors {
                errors: Vec<ErrorCode>,
            }
            #[derive(Deserialize)]
            struct ErrorCode {
                code: String,
            }
            let code = serde_json::from_slice::<Errors>(&answer.body)
                .ok()
                .and_then(|e| e.errors.into_iter().next())
                .map(|e| e.code);
            return Err(match code {
                Some(c) if c == "unexpected_error" => Cow::Borrowed("fetch-error"),
                Some(c) if sdk::is_reason_text(&c) => Cow::Owned(c),
                _ => Cow::Borrowed("unexpected-bapi-error"),
            });
        }
        #[derive(Deserialize)]
        struct Cookies {
            #[serde(default)]
            cookies: Vec<String>,
        }
        let directives = serde_json::from_slice::<Cookies>(&answer.body)
            .map(|c| c.cookies)
            .unwrap_or_default();
        if directives.is_empty() {
            return Err(Cow::Borrowed("unexpected-sdk-error"));
        }
        let (cookies, session) = set_cookies(&directives);
        let session = session.unwrap_or_default();
        match self.browser.verify(&session).await {
            Ok(identity) => Ok(Verdict::SignedIn {
                identity,
                token: Cow::Owned(session),
                cookies,
                strip_handshake_params: false,
            }),
            Err(e @ (AuthError::KeysUnavailable | AuthError::SessionCheckUnavailable)) => {
                Ok(Verdict::Unavailable(e))
            }
            Err(_) => Err(Cow::Borrowed("invalid-session-token")),
        }
    }
}

impl<'a> Verdict<'a> {
    /// A cross-origin-sync decision that came out signed out (not eligible, or the loop
    /// guard) stays signed in: the token itself was valid.
    fn or_signed_in(self, identity: Arc<Identity>, token: &'a str) -> Verdict<'a> {
        match self {
            Verdict::SignedOut { .. } => Verdict::SignedIn {
                identity,
                token: Cow::Borrowed(token),
                cookies: Vec::new(),
                strip_handshake_params: false,
            },
            other => other,
        }
    }
}

/// The `Set-Cookie` values of Clerk's directives, and the value of the last `__session*`
/// cookie among them (`getCookieName(x).startsWith("__session")`).
fn set_cookies(directives: &[String]) -> (Vec<HeaderValue>, Option<String>) {
    let mut cookies = Vec::with_capacity(directives.len());
    let mut session = None;
    for d in directives {
        let Ok(value) = HeaderValue::from_str(d) else {
            continue;
        };
        cookies.push(value);
        let first = d.split(';').next().unwrap_or("");
        let mut kv = first.split('=');
        let name = kv.next().unwrap_or("");
        if name.starts_with(names::SESSION) {
            session = Some(kv.next().unwrap_or("").to_owned());
        }
    }
    (cookies, session.filter(|s| !s.is_empty()))
}

/// Adds the SDK's debug headers (`x-clerk-auth-status`, `x-clerk-auth-reason`).
pub(crate) fn auth_headers(h: &mut HeaderMap, status: &'static str, reason: &str) {
    h.insert("x-clerk-auth-status", HeaderValue::from_static(status));
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert("x-clerk-auth-reason", v);
    }
}

/// A `307` with `Location` and `Cache-Control: no-store`.
pub(crate) fn redirect(location: &str) -> Option<http::Response<http_body_util::Full<Bytes>>> {
    let mut resp = http::Response::new(http_body_util::Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(location).ok()?);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(resp)
}
