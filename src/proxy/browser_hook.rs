//! The request path's hook into browser mode ([`crate::browser`]): CORS preflights, the SDK's
//! decision (handshake, return leg, refresh), sign-in redirects, and what those add to the
//! answer (`Set-Cookie`, CORS headers).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};

use super::rejection::Rejection;
use super::{Proxy, ProxyBody};
use crate::auth::AuthError;
use crate::auth::gate::{Allowed, Decision};
use crate::auth::policy::{AuthMode, RouteMatch};
use crate::browser::cors::{self, Cors, PreflightMode};
use crate::browser::{self, Verdict, sdk};
use crate::telemetry::Outcome;

/// What browser mode adds to the answer of a request that goes on.
#[derive(Default)]
pub(super) struct Extra {
    /// `Set-Cookie` directives from a handshake payload or a refresh.
    cookies: Vec<HeaderValue>,
    /// `answer` mode: the allowed `Origin` to echo.
    cors_origin: Option<HeaderValue>,
    /// The handshake parameters come off the URL the upstream sees.
    strip_handshake_params: bool,
}

impl Extra {
    /// The upstream URI without Clerk's handshake parameters, when they are to be removed.
    pub(super) fn upstream_uri(&self, uri: http::Uri) -> http::Uri {
        if !self.strip_handshake_params {
            return uri;
        }
        let Some(stripped) = uri
            .path_and_query()
            .and_then(|pq| sdk::strip_handshake_params(pq.as_str()))
        else {
            return uri;
        };
        let mut parts = uri.into_parts();
        match stripped.parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(_) => return http::Uri::default(),
        }
        http::Uri::from_parts(parts).unwrap_or_default()
    }

    pub(super) fn apply(self, h: &mut HeaderMap) {
        for c in self.cookies {
            h.append(header::SET_COOKIE, c);
        }
        if let Some(origin) = self.cors_origin {
            Cors::decorate(origin, h);
        }
    }
}

/// The request goes on (with its identity, if any), or this is the answer.
pub(super) type Browsed =
    Result<(Option<Allowed>, Extra, Option<Outcome>), (Response<ProxyBody>, Outcome)>;

fn empty(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.status_mut() = status;
    resp
}

impl Proxy {
    /// The Frontend API proxy, when `path` is below `browser.fapi_proxy_path`.
    pub(super) fn fapi_proxy(&self, path: &str) -> Option<&crate::browser::fapi::FapiProxy> {
        self.browser
            .as_ref()?
            .fapi
            .as_ref()
            .filter(|f| f.matches(path))
    }

    /// The original request's method on the forward-auth endpoint: `X-Forwarded-Method`
    /// (Traefik) or `X-Original-Method` (nginx, set with `proxy_set_header`); both present
    /// must agree, as with the original URI. `None` when neither is sent: then only route
    /// rules without `methods` apply.
    pub(super) fn forward_auth_method(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<http::Method>, Rejection> {
        let ambiguous = Rejection::ForwardAuthUri(super::ForwardAuthUriError::Ambiguous);
        let mut found: Option<&[u8]> = None;
        for name in ["x-forwarded-method", "x-original-method"] {
            for v in headers.get_all(name) {
                match found {
                    Some(f) if f != v.as_bytes() => return Err(ambiguous),
                    _ => found = Some(v.as_bytes()),
                }
            }
        }
        found
            .map(|m| http::Method::from_bytes(m).map_err(|_| ambiguous))
            .transpose()
    }

    /// A CORS preflight on the forward-auth endpoint, allowed without a token unless
    /// `cors.preflight = "authenticate"` (an ingress cannot take a CORS answer from
    /// forward-auth, so `answer` allows it too and the upstream answers).
    pub(super) fn forward_auth_preflight(
        &self,
        method: Option<&http::Method>,
        headers: &HeaderMap,
    ) -> bool {
        let mode = self
            .browser
            .as_ref()
            .map_or(PreflightMode::Forward, |b| b.cors.mode);
        mode != PreflightMode::Authenticate
            && method.is_some_and(|m| cors::is_preflight(m, headers))
    }

    /// The auth step with browser mode: `decide` when it is off.
    pub(super) async fn browse(
        &self,
        parts: &http::request::Parts,
        route: &RouteMatch<'_>,
        tls: bool,
    ) -> Browsed {
        let Some(b) = &self.browser else {
            return match self.decide(&parts.headers, route).await {
                Ok(a) => Ok((a, Extra::default(), None)),
                Err(r) => Err(self.reject(r)),
            };
        };
        let mut extra = Extra {
            cors_origin: b.cors.response_origin(&parts.headers),
            ..Extra::default()
        };
        if cors::is_preflight(&parts.method, &parts.headers) {
            match b.cors.mode {
                PreflightMode::Forward => return Ok((None, extra, Some(Outcome::Preflight))),
                PreflightMode::Answer => {
                    let answer = b.cors.answer_preflight(&parts.headers);
                    let mut resp = empty(Cors::preflight_status(&answer));
                    match answer {
                        Ok(h) => resp.headers_mut().extend(h),
                        Err(e) => {
                            tracing::debug!(reason = e.as_label(), "preflight refused");
                            resp.headers_mut().insert(
                                "x-clerkgate-reason",
                                HeaderValue::from_static(e.as_label()),
                            );
                        }
                    }
                    return Err((resp, Outcome::Preflight));
                }
                PreflightMode::Authenticate => {}
            }
        }
        if route.auth == AuthMode::Public {
            return Ok((None, extra, None));
        }
        if !b.handshake_on() && !b.has_sign_in_url() {
            return match self.decide(&parts.headers, route).await {
                Ok(a) => Ok((a, extra, None)),
                Err(r) => {
                    let (mut resp, outcome) = self.reject(r);
                    extra.apply(resp.headers_mut());
                    Err((resp, outcome))
                }
            };
        }
        // On a route that accepts machine tokens, an `Authorization` token (machine or not) is
        // judged by `decide`, as `authenticateRequest` does with `acceptsToken` (a type the
        // route does not list is `token-type-mismatch`); browser mode keeps the cookies.
        // A route that takes no session tokens at all never reads cookies either.
        if !route.accepts.is_session_only()
            && (!route
                .accepts
                .accepts(crate::auth::machine::TokenType::SessionToken)
                || matches!(
                    crate::auth::token::extract(&parts.headers, self.gate.cookies(), false),
                    Ok(Some(_)) | Err(_)
                ))
        {
            return match self.decide(&parts.headers, route).await {
                Ok(a) => Ok((a, extra, None)),
                Err(r) => {
                    let (mut resp, outcome) = self.reject(r);
                    extra.apply(resp.headers_mut());
                    Err((resp, outcome))
                }
            };
        }
        // Boxed: the handshake and refresh paths would make every proxied request's future,
        // browser mode or not, several kilobytes larger.
        let verdict = Box::pin(b.authenticate(parts, tls)).await;
        match verdict {
            Verdict::SignedIn {
                identity,
                token,
                cookies,
                strip_handshake_params,
            } => {
                extra.cookies = cookies;
                let decision = self.gate.admit(identity, &token, route);
                drop(token);
                extra.strip_handshake_params = strip_handshake_params;
                match decision {
                    Decision::Allow(allowed) => Ok((allowed, extra, None)),
                    Decision::Refuse(r) => {
                        let (mut resp, outcome) = self.reject(r.into());
                        extra.apply(resp.headers_mut());
                        Err((resp, outcome))
                    }
                }
            }
            Verdict::SignedOut {
                error,
                reason,
                cookies,
            } => {
                extra.cookies = cookies;
                if route.auth == AuthMode::Optional {
                    if error != AuthError::Missing {
                        self.metrics.auth_failures.inc(error.failure());
                    }
                    return Ok((None, extra, None));
                }
                if let Some(location) = b.sign_in_redirect(parts, tls)
                    && let Some(resp) = browser::redirect(&location)
                {
                    let mut resp = resp.map(Either::Right);
                    browser::auth_headers(resp.headers_mut(), "signed-out", &reason);
                    extra.apply(resp.headers_mut());
                    return Err((resp, Outcome::SignInRedirect));
                }
                let (mut resp, outcome) = self.reject(Rejection::Auth(error));
                browser::auth_headers(resp.headers_mut(), "signed-out", &reason);
                extra.apply(resp.headers_mut());
                Err((resp, outcome))
            }
            Verdict::Handshake {
                location,
                reason,
                counter,
            } => match browser::redirect(&location) {
                Some(resp) => {
                    let mut resp = resp.map(Either::Right);
                    resp.headers_mut().append(header::SET_COOKIE, counter);
                    browser::auth_headers(resp.headers_mut(), "handshake", &reason);
                    extra.apply(resp.headers_mut());
                    Err((resp, Outcome::Handshake))
                }
                None => Err(self.reject(Rejection::Auth(AuthError::Invalid))),
            },
            Verdict::Unavailable(e) => Err(self.reject(Rejection::Auth(e))),
        }
    }
}
