//! The one place that turns a refusal into a response.
//!
//! Each domain error maps exhaustively (no `_` arm) to a status, a reason code for the client,
//! and an outcome label for metrics; a new variant does not compile until someone decides its
//! status. Bodies are small fixed JSON objects with the reason code only: no claim values, no key
//! material, no upstream error text. Details go to debug logs.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use super::ForwardAuthUriError;
use super::path::PathError;
use crate::auth::AuthError;
use crate::auth::policy::PolicyError;
use crate::telemetry::{Outcome, UpstreamErrorKind};

/// Why a request was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    Auth(AuthError),
    Policy(PolicyError),
    Path(PathError),
    /// A reserved identity header was sent and `auth.on_spoofed_header = "reject"`.
    SpoofedHeader,
    /// The forward-auth endpoint could not tell which URI to authorize.
    ForwardAuthUri(ForwardAuthUriError),
    Upstream(UpstreamErrorKind),
    /// More than one `Host` header (RFC 9112 section 3.2).
    DuplicateHost,
    /// The client's request body broke its own framing (an invalid chunk, a short body).
    ClientBody,
    /// `Host` names another host than the request target's authority (HTTP/2 `:authority`,
    /// HTTP/1.1 absolute form).
    AuthorityMismatch,
    /// `CONNECT`: clerkgate is not a forward proxy and never opens a raw tunnel.
    MethodNotAllowed,
}

impl From<crate::auth::gate::Refusal> for Rejection {
    fn from(r: crate::auth::gate::Refusal) -> Self {
        use crate::auth::gate::Refusal;
        match r {
            Refusal::Auth(e) => Self::Auth(e),
            Refusal::Policy(e) => Self::Policy(e),
        }
    }
}

impl Rejection {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::Auth(e) => match e {
                AuthError::KeysUnavailable
                | AuthError::SessionCheckUnavailable
                | AuthError::SecretKeyInvalid
                | AuthError::MachineVerifyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                AuthError::Missing
                | AuthError::Invalid
                | AuthError::TooLarge
                | AuthError::InvalidAlgorithm
                | AuthError::TypeMismatch
                | AuthError::InvalidSignature
                | AuthError::VerificationFailed
                | AuthError::Expired
                | AuthError::NotActiveYet
                | AuthError::IatInTheFuture
                | AuthError::InvalidIssuer
                | AuthError::InvalidAuthorizedParties
                | AuthError::KidMismatch
                | AuthError::SessionPending
                | AuthError::NoClientUat
                | AuthError::IatBeforeClientUat
                | AuthError::SessionRevoked
                | AuthError::UserRevoked
                | AuthError::Revoked => StatusCode::UNAUTHORIZED,
            },
            Self::Policy(_) => StatusCode::FORBIDDEN,
            Self::Path(_)
            | Self::SpoofedHeader
            | Self::ForwardAuthUri(_)
            | Self::DuplicateHost
            | Self::AuthorityMismatch
            | Self::ClientBody => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Upstream(kind) => match kind {
                UpstreamErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
                UpstreamErrorKind::Connect
                | UpstreamErrorKind::Protocol
                | UpstreamErrorKind::Upgrade => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// The reason code sent to the client.
    pub(crate) fn reason(self) -> &'static str {
        use crate::telemetry::Label;
        match self {
            Self::Auth(e) => e.failure().as_label(),
            Self::Policy(e) => e.as_label(),
            Self::Path(e) => e.as_label(),
            Self::SpoofedHeader => "spoofed-identity-header",
            Self::ForwardAuthUri(ForwardAuthUriError::Ambiguous) => "forward-auth-uri-ambiguous",
            Self::ForwardAuthUri(ForwardAuthUriError::Missing) => "forward-auth-uri-missing",
            Self::Upstream(kind) => match kind {
                UpstreamErrorKind::Connect => "upstream-unavailable",
                UpstreamErrorKind::Timeout => "upstream-timeout",
                UpstreamErrorKind::Protocol => "upstream-protocol-error",
                UpstreamErrorKind::Upgrade => "upstream-upgrade-failed",
            },
            Self::DuplicateHost => "duplicate-host",
            Self::ClientBody => "bad-request-body",
            Self::AuthorityMismatch => "host-authority-mismatch",
            Self::MethodNotAllowed => "method-not-allowed",
        }
    }

    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Self::Auth(e) if e.is_outage() => Outcome::Unavailable,
            Self::Auth(_) => Outcome::Unauthorized,
            Self::Policy(_) => Outcome::Forbidden,
            Self::Path(_)
            | Self::SpoofedHeader
            | Self::ForwardAuthUri(_)
            | Self::DuplicateHost
            | Self::AuthorityMismatch
            | Self::MethodNotAllowed
            | Self::ClientBody => Outcome::BadRequest,
            Self::Upstream(_) => Outcome::UpstreamError,
        }
    }

    fn error_word(self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::BAD_GATEWAY => "bad_gateway",
            StatusCode::GATEWAY_TIMEOUT => "gateway_timeout",
            _ => "unavailable",
        }
    }

    /// The response for a client. 401s carry `WWW-Authenticate` per RFC 6750 section 3: without
    /// an error code when no token was sent (3.1), `invalid_token` otherwise.
    pub(crate) fn response(self) -> Response<Full<Bytes>> {
        let body = match self {
            // Clerk's own body, which clerk-js `useReverification()` recognises to prompt the
            // user and retry.
            Self::Policy(PolicyError::Reverification(r)) => r.error_body(),
            _ => format!(
                "{{\"error\":\"{}\",\"reason\":\"{}\"}}\n",
                self.error_word(),
                self.reason()
            ),
        };
        let mut resp = crate::body::json(self.status(), body);
        let h = resp.headers_mut();
        match self {
            Self::Auth(AuthError::Missing) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"clerkgate\""),
                );
            }
            Self::Auth(e) if e.is_outage() => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::Auth(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"clerkgate\", error=\"invalid_token\""),
                );
            }
            Self::Policy(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"clerkgate\", error=\"insufficient_scope\"",
                    ),
                );
            }
            Self::MethodNotAllowed => {
                h.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            Self::Path(_)
            | Self::SpoofedHeader
            | Self::ForwardAuthUri(_)
            | Self::DuplicateHost
            | Self::AuthorityMismatch
            | Self::ClientBody
            | Self::Upstream(_) => {}
        }
        resp
    }
}

/// The content type of a gRPC call (`application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`...), whose client reads the outcome from `grpc-status`, not from the
/// HTTP status; `None` for any other request.
pub(crate) fn grpc_content_type(headers: &http::HeaderMap) -> Option<&HeaderValue> {
    headers
        .get(header::CONTENT_TYPE)
        .filter(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl Rejection {
    /// The gRPC status code for this refusal (gRPC's `doc/statuscodes.md` and its HTTP mapping).
    pub(crate) fn grpc_status(self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "3",         // INVALID_ARGUMENT
            StatusCode::UNAUTHORIZED => "16",       // UNAUTHENTICATED
            StatusCode::FORBIDDEN => "7",           // PERMISSION_DENIED
            StatusCode::METHOD_NOT_ALLOWED => "12", // UNIMPLEMENTED
            StatusCode::GATEWAY_TIMEOUT => "4",     // DEADLINE_EXCEEDED
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => "14", // UNAVAILABLE
            _ => "2",                               // UNKNOWN
        }
    }

    /// The refusal of a gRPC call: a trailers-only response (HTTP 200, the call's own
    /// `content-type`, `grpc-status` and the reason code in `grpc-message`, no body), with the
    /// HTTP answer's `www-authenticate` and `retry-after`.
    pub(crate) fn grpc_response(self, content_type: HeaderValue) -> Response<Full<Bytes>> {
        let mut resp = self.response();
        *resp.status_mut() = StatusCode::OK;
        *resp.body_mut() = Full::new(Bytes::new());
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, content_type);
        h.insert("grpc-status", HeaderValue::from_static(self.grpc_status()));
        // Reason codes are lower-case letters and dashes: nothing to percent-encode.
        h.insert("grpc-message", HeaderValue::from_static(self.reason()));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failures_are_401_with_invalid_token_except_missing_and_keys() {
        let r = Rejection::Auth(AuthError::Expired).response();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
        let r = Rejection::Auth(AuthError::Missing).response();
        assert!(
            !r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("error=")
        );
        let r = Rejection::Auth(AuthError::KeysUnavailable).response();
        assert_eq!(r.status(), 503);
        assert_eq!(
            Rejection::Upstream(UpstreamErrorKind::Timeout).status(),
            504
        );
        assert_eq!(
            Rejection::Upstream(UpstreamErrorKind::Connect).status(),
            502
        );
        assert_eq!(Rejection::Policy(PolicyError::OrgRole).status(), 403);
    }

    #[test]
    fn grpc_refusals_are_trailers_only_with_the_mapped_status() {
        let cases = [
            (Rejection::Auth(AuthError::Missing), "16"),
            (Rejection::Auth(AuthError::Expired), "16"),
            (Rejection::Policy(PolicyError::OrgRole), "7"),
            (Rejection::Auth(AuthError::KeysUnavailable), "14"),
            (Rejection::SpoofedHeader, "3"),
            (Rejection::Upstream(UpstreamErrorKind::Connect), "14"),
            (Rejection::Upstream(UpstreamErrorKind::Timeout), "4"),
        ];
        for (r, code) in cases {
            let resp = r.grpc_response(HeaderValue::from_static("application/grpc"));
            assert_eq!(resp.status(), 200, "{r:?}");
            let h = resp.headers();
            assert_eq!(h["content-type"], "application/grpc");
            assert_eq!(h["grpc-status"], code, "{r:?}");
            assert_eq!(h["grpc-message"], r.reason());
            assert!(http_body::Body::is_end_stream(resp.body()));
        }
        let mut h = http::HeaderMap::new();
        assert!(grpc_content_type(&h).is_none());
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc-web+proto"),
        );
        assert_eq!(grpc_content_type(&h).unwrap(), "application/grpc-web+proto");
        h.insert("content-type", HeaderValue::from_static("application/json"));
        assert!(grpc_content_type(&h).is_none());
    }
}
