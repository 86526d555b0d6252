//! Authentication as one call that cannot be half-done.
//!
//! [`Gate::decide`] takes a request's headers, its matched route and `now`, and runs the whole
//! sequence: token extraction (header or cookie, [`super::token`]), the machine-token path for
//! routes whose `accepts` lists machine types ([`super::machine`]), cache or verification
//! ([`super::Authenticator`]), the cookie freshness rule (`__client_uat`), the revocation check
//! ([`crate::revocations::Guard`], on every request, cache hits included), the route's policy
//! ([`super::policy`]), and the claims header of this very token. The proxy, forward-auth,
//! browser mode and the local API's `tokens/verify` all go through the gate, so none of them
//! can forget revocation. The narrower entry points ([`Gate::session`], [`Gate::found`],
//! [`Gate::verify_token`]) exist for callers that find the token elsewhere (browser mode's
//! handshake, a request body) and include the revocation check too.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::identity::{Identity, IdentityBuilder};
use super::machine::{self, Accepts, MachineAuth, Principal, TokenType};
use super::policy::{AuthMode, PolicyError, RouteMatch};
use super::token::{self, Carrier, CookieNames, Found};
use super::{AuthError, Authenticator};
use crate::revocations::{Guard, RevocationError, StreamHandle};
use crate::telemetry::Metrics;

/// What the gate decided about a request.
pub enum Decision {
    /// Go on: with a verified session or machine, or anonymously (public route, or an
    /// optional route without a usable token).
    Allow(Option<Allowed>),
    Refuse(Refusal),
}

/// Why a request is refused: its token, or the route's requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Auth(AuthError),
    Policy(PolicyError),
}

/// A verified request: the (cached) identity and the claims header of this very token, or a
/// verified machine token.
pub enum Allowed {
    Session {
        identity: Arc<Identity>,
        claims: Option<(HeaderName, HeaderValue)>,
    },
    Machine(Arc<Principal>),
}

impl Allowed {
    /// The verified session, when it is one.
    pub fn session(&self) -> Option<&Arc<Identity>> {
        match self {
            Self::Session { identity, .. } => Some(identity),
            Self::Machine(_) => None,
        }
    }

    /// Who, for the debug log.
    pub fn subject(&self) -> &str {
        match self {
            Self::Session { identity, .. } => identity.user_id(),
            Self::Machine(principal) => &principal.subject,
        }
    }
}

/// What `tokens/verify` found a token to be.
pub enum Verified {
    Session(Arc<Identity>),
    Machine(Arc<Principal>),
}

impl From<RevocationError> for AuthError {
    fn from(e: RevocationError) -> Self {
        match e {
            RevocationError::SessionRevoked => Self::SessionRevoked,
            RevocationError::UserRevoked => Self::UserRevoked,
            RevocationError::Unavailable => Self::SessionCheckUnavailable,
        }
    }
}

/// Everything authentication needs, built once.
pub struct Gate {
    auth: Arc<Authenticator>,
    revocations: Arc<Guard>,
    machine: Arc<MachineAuth>,
    cookies: CookieNames,
    accept_cookie: bool,
    /// `X-Clerk-Token-Type: session_token`, sent with every verified session.
    session_type: (HeaderName, HeaderValue),
    metrics: Arc<Metrics>,
}

impl Gate {
    /// `cookie_suffix` is the instance's (`__session_<suffix>`); `accept_cookie` is
    /// `auth.accept_cookie`.
    pub fn new(
        auth: Arc<Authenticator>,
        revocations: Arc<Guard>,
        machine: Arc<MachineAuth>,
        cookie_suffix: Option<&str>,
        accept_cookie: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        let session_type = (
            machine.names().token_type().clone(),
            HeaderValue::from_static("session_token"),
        );
        Self {
            auth,
            revocations,
            machine,
            cookies: CookieNames::new(cookie_suffix),
            accept_cookie,
            session_type,
            metrics,
        }
    }

    /// The identity header names and builder.
    pub fn builder(&self) -> &IdentityBuilder {
        self.auth.builder()
    }

    /// The token cookie names the gate reads.
    pub fn cookies(&self) -> &CookieNames {
        &self.cookies
    }

    /// The verifier's key store (the local API publishes its keys).
    pub fn keys(&self) -> &super::jwks::KeyStore {
        self.auth.keys()
    }

    /// Sets the verified identity headers of `allowed` (after the caller stripped every
    /// client-sent one).
    pub fn insert_headers(&self, allowed: &Allowed, h: &mut HeaderMap) {
        match allowed {
            Allowed::Session { identity, claims } => {
                identity.insert_headers(self.auth.builder(), h);
                h.insert(self.session_type.0.clone(), self.session_type.1.clone());
                if let Some((name, value)) = claims {
                    h.insert(name.clone(), value.clone());
                }
            }
            Allowed::Machine(principal) => principal.insert_headers(h),
        }
    }

    /// Registers a long-lived stream of a verified session, closed when it is revoked.
    pub fn watch(&self, identity: &Identity) -> StreamHandle {
        self.revocations.watch(&identity.session_ref())
    }

    /// A session token, verified (cache or keys) and checked against revocation.
    pub async fn session(&self, token: &str, now_ms: u64) -> Result<Arc<Identity>, AuthError> {
        let identity = self.auth.authenticate(token, now_ms).await?;
        // Revocation is checked after verification on every request, cache hits included.
        self.revocations.check(&identity.session_ref()).await?;
        Ok(identity)
    }

    /// A token found in a request: [`Self::session`], plus the cookie freshness rule
    /// (`__client_uat`) when it came from a cookie. The freshness rule runs before the
    /// revocation check, so a stale cookie is refused as such.
    pub async fn found(&self, found: &Found<'_>, now_ms: u64) -> Result<Arc<Identity>, AuthError> {
        let identity = self.auth.authenticate(found.token, now_ms).await?;
        if found.carrier == Carrier::Cookie {
            token::check_client_uat(found.client_uat, identity.iat)?;
        }
        self.revocations.check(&identity.session_ref()).await?;
        Ok(identity)
    }

    /// A verified session on `route`: its policy, and the claims header of `token`.
    pub fn admit(&self, identity: Arc<Identity>, token: &str, route: &RouteMatch<'_>) -> Decision {
        match route.authorize(&identity) {
            Ok(()) => Decision::Allow(Some(Allowed::Session {
                claims: self.auth.builder().claims_header(token),
                identity,
            })),
            Err(e) => Decision::Refuse(Refusal::Policy(e)),
        }
    }

    /// The whole decision for a request on `route`: token, verification, cookie freshness,
    /// revocation, route requirements.
    pub async fn decide(
        &self,
        headers: &HeaderMap,
        route: &RouteMatch<'_>,
        now_ms: u64,
    ) -> Decision {
        if route.auth == AuthMode::Public {
            return Decision::Allow(None);
        }
        let optional = route.auth == AuthMode::Optional;
        let extracted = token::extract(headers, &self.cookies, self.accept_cookie);
        if !route.accepts.is_session_only()
            && let Some(decision) = self
                .decide_machine(&extracted, route, optional, now_ms)
                .await
        {
            return decision;
        }
        let found = match extracted {
            Ok(Some(found)) => found,
            Ok(None) if optional => return Decision::Allow(None),
            Ok(None) => return Decision::Refuse(Refusal::Auth(AuthError::Missing)),
            Err(e) if optional => {
                self.metrics.auth_failures.inc(e.failure());
                return Decision::Allow(None);
            }
            Err(e) => return Decision::Refuse(Refusal::Auth(e)),
        };
        let identity = match self.found(&found, now_ms).await {
            Ok(identity) => identity,
            // An outage is never hidden behind "anonymous".
            Err(e) if e.is_outage() => return Decision::Refuse(Refusal::Auth(e)),
            Err(e) if optional => {
                self.metrics.auth_failures.inc(e.failure());
                return Decision::Allow(None);
            }
            Err(e) => return Decision::Refuse(Refusal::Auth(e)),
        };
        self.admit(identity, found.token, route)
    }

    /// `accepts` as `authenticateRequest` applies `acceptsToken` (a list or `any`): a header
    /// token of a type not listed (no header token counts as a session token) is
    /// `token-type-mismatch` before any verification; a machine token is verified here; a
    /// session token (header or cookie) returns `None`, for the session path.
    async fn decide_machine(
        &self,
        extracted: &Result<Option<Found<'_>>, AuthError>,
        route: &RouteMatch<'_>,
        optional: bool,
        now_ms: u64,
    ) -> Option<Decision> {
        let header_token = match extracted {
            Ok(Some(found)) if found.carrier == Carrier::Header => Some(found.token),
            Ok(Some(_)) => None,
            Ok(None) if optional => return Some(Decision::Allow(None)),
            Ok(None) => None,
            // Two `Authorization` headers: the session path refuses them.
            Err(_) => return None,
        };
        let refuse = |e: AuthError| {
            if optional && !e.is_outage() {
                self.metrics.auth_failures.inc(e.failure());
                Decision::Allow(None)
            } else {
                Decision::Refuse(Refusal::Auth(e))
            }
        };
        let token_type = header_token.map_or(TokenType::SessionToken, machine::classify);
        if !route.accepts.accepts(token_type) {
            return Some(refuse(AuthError::TypeMismatch));
        }
        let token = header_token.filter(|_| token_type != TokenType::SessionToken)?;
        // Boxed: the Backend API call inside would make every session request's future
        // kilobytes larger.
        Some(
            match Box::pin(self.machine.verify(token, token_type, now_ms)).await {
                Ok(principal) => match route.authorize_machine(&principal) {
                    Ok(()) => Decision::Allow(Some(Allowed::Machine(principal))),
                    Err(e) => Decision::Refuse(Refusal::Policy(e)),
                },
                Err(e) => refuse(e),
            },
        )
    }

    /// A token that arrived outside HTTP (the local API's `tokens/verify`), with `accepts` as
    /// on a route: a type not accepted is `token-type-mismatch`; a machine token is verified
    /// (and must carry clerkgate's machine scope); a session token is verified and checked
    /// against revocation.
    pub async fn verify_token(
        &self,
        token: &str,
        accepts: Accepts,
        now_ms: u64,
    ) -> Result<Verified, Refusal> {
        if !accepts.is_session_only() {
            let token_type = machine::classify(token);
            if !accepts.accepts(token_type) {
                return Err(Refusal::Auth(AuthError::TypeMismatch));
            }
            if token_type != TokenType::SessionToken {
                let principal = self
                    .machine
                    .verify(token, token_type, now_ms)
                    .await
                    .map_err(Refusal::Auth)?;
                if !principal.machine_scope_ok {
                    return Err(Refusal::Policy(PolicyError::MachineScopeMissing));
                }
                return Ok(Verified::Machine(principal));
            }
        }
        self.session(token, now_ms)
            .await
            .map(Verified::Session)
            .map_err(Refusal::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::cache::TokenCache;
    use crate::auth::identity::HeadersConfig;
    use crate::auth::jwks::{JwksSettings, KeyStore};
    use crate::auth::policy::Policy;
    use crate::auth::verify::Verifier;
    use crate::dev::signing::{SigningKey, session_claims};
    use crate::revocations::{InMemoryStore, SessionStatus};

    const ISSUER: &str = "https://clerk.gate.test";

    fn fixture() -> (Gate, Arc<Guard>, SigningKey) {
        let signing = SigningKey::generate("k1").expect("key");
        let clerk = crate::clerk::Config {
            jwt_key: Some(signing.public_key_pem()),
            issuer: Some(ISSUER.into()),
            ..Default::default()
        };
        let instance = clerk.resolve().expect("instance");
        let metrics = Arc::new(Metrics::new());
        let keys = Arc::new(
            KeyStore::new(
                &instance,
                JwksSettings::from_config(&clerk),
                metrics.clone(),
            )
            .expect("PEM key store"),
        );
        let verifier = Verifier::new(instance.issuers.clone(), Vec::new(), false, 5_000, true);
        let auth = Arc::new(Authenticator::new(
            verifier.clone(),
            keys.clone(),
            TokenCache::new(100, 5_000),
            IdentityBuilder::new(&HeadersConfig::default()),
            metrics.clone(),
        ));
        let store = Arc::new(InMemoryStore::new(std::time::Duration::from_secs(60), 100));
        let guard = Arc::new(Guard::new(
            &crate::revocations::Config::default(),
            store,
            None,
            metrics.clone(),
        ));
        let machine = Arc::new(MachineAuth::new(
            &machine::Config::default(),
            &HeadersConfig::default(),
            keys,
            verifier,
            metrics.clone(),
        ));
        let gate = Gate::new(auth, guard.clone(), machine, None, true, metrics);
        (gate, guard, signing)
    }

    fn headers(name: http::header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).expect("header value"));
        h
    }

    /// Every entry point answers `token` the same way, `expected` (`None`: accepted).
    async fn every_entry_point(gate: &Gate, token: &str, now_s: u64, expected: Option<AuthError>) {
        let now_ms = now_s * 1000;
        let policy = Policy::new(&[]);
        let route = policy.route_for("/", None);
        let bearer = headers(http::header::AUTHORIZATION, &format!("Bearer {token}"));
        let cookie = headers(
            http::header::COOKIE,
            &format!("__session={token}; __client_uat={}", now_s - 5),
        );
        for h in [&bearer, &cookie] {
            let got = match gate.decide(h, &route, now_ms).await {
                Decision::Allow(Some(Allowed::Session { .. })) => None,
                Decision::Refuse(Refusal::Auth(e)) => Some(e),
                _ => panic!("neither a session nor an auth refusal"),
            };
            assert_eq!(got, expected, "decide");
            let found = token::extract(h, gate.cookies(), true)
                .expect("extracts")
                .expect("a token");
            assert_eq!(gate.found(&found, now_ms).await.err(), expected, "found");
        }
        assert_eq!(gate.session(token, now_ms).await.err(), expected, "session");
        let verified = gate.verify_token(token, Accepts::ANY, now_ms).await;
        assert_eq!(verified.err(), expected.map(Refusal::Auth), "verify_token");
    }

    #[tokio::test]
    async fn no_entry_point_forgets_revocation() {
        let (gate, guard, key) = fixture();
        let now_s = super::super::now_ms() / 1000;
        let claims = session_claims(ISSUER, "user_1", now_s - 1, 60);
        let sid = claims["sid"].as_str().expect("sid").to_owned();
        let token = key.mint(&claims);
        every_entry_point(&gate, &token, now_s, None).await;
        // A cache hit too: the token was verified above and stays cached.
        guard.revoke_session(&sid, SessionStatus::Revoked).await;
        every_entry_point(&gate, &token, now_s, Some(AuthError::SessionRevoked)).await;

        let other = key.mint(&session_claims(ISSUER, "user_2", now_s - 1, 60));
        every_entry_point(&gate, &other, now_s, None).await;
        guard.cut_off_user("user_2", now_s * 1000);
        every_entry_point(&gate, &other, now_s, Some(AuthError::UserRevoked)).await;
    }

    #[test]
    fn revocation_answers_map_to_their_refusals() {
        for (e, want) in [
            (RevocationError::SessionRevoked, AuthError::SessionRevoked),
            (RevocationError::UserRevoked, AuthError::UserRevoked),
            (
                RevocationError::Unavailable,
                AuthError::SessionCheckUnavailable,
            ),
        ] {
            assert_eq!(AuthError::from(e), want);
        }
    }
}
