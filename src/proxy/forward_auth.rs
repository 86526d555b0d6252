//! The forward-auth endpoint (nginx `auth_request`, Traefik `ForwardAuth`, Envoy `ext_authz`):
//! the request path's checks on the original request the ingress describes, answered with the
//! identity headers instead of a forwarded request.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::rejection::Rejection;
use super::{ForwardAuthUriError, Proxy, ProxyBody, UriSource, answer, headers, path};
use crate::telemetry::Outcome;

impl Proxy {
    pub(super) fn is_forward_auth(&self, path: &str) -> bool {
        self.forward_auth_path.as_deref().is_some_and(|fa| {
            path.strip_prefix(fa)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// The original request's URI for forward-auth: `X-Forwarded-Uri` (Traefik),
    /// `X-Original-URI` (nginx), or the path below the endpoint (Envoy's `path_prefix`). Each
    /// ingress sets one source itself and passes the client's other headers through, so a
    /// client could add a second, different one: with `auto`, every source present must agree,
    /// and a disagreement is refused.
    fn original_uri(&self, req: &Request<Incoming>) -> Result<String, Rejection> {
        let header = |name: &str| -> Result<Option<String>, Rejection> {
            let mut values = req.headers().get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => Ok(None),
                (Some(v), None) => v
                    .to_str()
                    .map(|v| Some(v.to_owned()))
                    .map_err(|_| Rejection::ForwardAuthUri(ForwardAuthUriError::Ambiguous)),
                (Some(_), Some(_)) => {
                    Err(Rejection::ForwardAuthUri(ForwardAuthUriError::Ambiguous))
                }
            }
        };
        let below = || {
            let fa = self.forward_auth_path.as_deref().unwrap_or("");
            let below = req.uri().path().strip_prefix(fa).unwrap_or("");
            (!below.is_empty()).then(|| below.to_owned())
        };
        let missing = Rejection::ForwardAuthUri(ForwardAuthUriError::Missing);
        match self.forward_auth_uri_source {
            UriSource::XForwardedUri => header("x-forwarded-uri")?.ok_or(missing),
            UriSource::XOriginalUri => header("x-original-uri")?.ok_or(missing),
            UriSource::Path => below().ok_or(missing),
            UriSource::Auto => {
                let candidates = [
                    header("x-forwarded-uri")?,
                    header("x-original-uri")?,
                    below(),
                ];
                let mut present = candidates.into_iter().flatten();
                let Some(first) = present.next() else {
                    return Ok("/".to_owned());
                };
                if present.any(|other| other != first) {
                    return Err(Rejection::ForwardAuthUri(ForwardAuthUriError::Ambiguous));
                }
                Ok(first)
            }
        }
    }

    /// The forward-auth answer: 200 with the identity headers, the token headers the app may
    /// see and `x-envoy-auth-headers-to-remove` (see [`answer`]), or the refusal.
    pub(super) async fn forward_auth(
        &self,
        mut req: Request<Incoming>,
    ) -> (Response<ProxyBody>, Outcome) {
        let original = match self.original_uri(&req) {
            Ok(uri) => uri,
            Err(r) => return self.reject(r),
        };
        let original_path = original.split(['?', '#']).next().unwrap_or("/");
        let normalized = match path::normalize(original_path, self.encoded_slashes) {
            Ok(p) => p,
            Err(e) => return self.reject(Rejection::Path(e)),
        };
        // Names reserved only by spelling or prefix (`x_user_id`, `x-clerk-anything`): the
        // ingress cannot know them, so the answer names them. One scan of the names when the
        // client sent no reserved header (the usual case), and no allocation.
        let spoofed = req
            .headers()
            .keys()
            .any(|n| headers::is_reserved(n.as_str(), &self.reserved));
        let extra: Vec<http::HeaderName> = if spoofed {
            let extra = req
                .headers()
                .keys()
                .filter(|n| headers::is_reserved(n.as_str(), &self.reserved))
                .filter(|n| !self.remove_list.manages(n))
                .cloned()
                .collect();
            if let Err(r) = self.strip_spoofed(req.headers_mut()) {
                return self.reject(r);
            }
            extra
        } else {
            Vec::new()
        };
        let method = match self.forward_auth_method(req.headers()) {
            Ok(m) => m,
            Err(r) => return self.reject(r),
        };
        // A preflight goes on without a token, answered like an anonymous request (the spoofed
        // identity headers still listed for removal).
        let preflight = self.forward_auth_preflight(method.as_ref(), req.headers());
        let route = self.policy.route_for(&normalized.matching, method.as_ref());
        let decision = if preflight {
            Ok(None)
        } else {
            self.decide(req.headers(), &route).await
        };
        match decision {
            Err(r) => self.reject(r),
            Ok(identity) => {
                let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
                *resp.status_mut() = StatusCode::OK;
                let h = resp.headers_mut();
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                if let Some(allowed) = &identity {
                    self.gate.insert_headers(allowed, h);
                }
                // The token reaches the app only with `auth.forward_token`: the answer carries
                // what the app may see of `Authorization` and `Cookie`, and the ingress sets
                // (nginx, Traefik) or removes (Envoy) them from the answer.
                if self.forward_token {
                    if let Some(authorization) = req.headers().get(header::AUTHORIZATION) {
                        h.insert(header::AUTHORIZATION, authorization.clone());
                    }
                } else {
                    headers::strip_token(req.headers_mut(), self.gate.cookies());
                }
                if let Some(cookies) = answer::joined_cookies(req.headers()) {
                    h.insert(header::COOKIE, cookies);
                }
                let remove = self.remove_list.value(h, &extra);
                if !remove.is_empty() {
                    h.insert(answer::HEADERS_TO_REMOVE.clone(), remove);
                }
                let outcome = if preflight {
                    Outcome::Preflight
                } else {
                    Outcome::ForwardAuthAllowed
                };
                (resp, outcome)
            }
        }
    }
}
