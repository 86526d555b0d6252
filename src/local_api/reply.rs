//! The one place the local API turns outcomes into responses.
//!
//! Every error body has Clerk's shape, `{"errors":[{"code","message","long_message"}]}`, so a
//! backend that used a Clerk SDK can keep branching on `errors[0].code`. Clerk's own error
//! answers (a body in Clerk's error shape) are passed through with status and body unchanged, a
//! 500 included; clerkgate's own errors use `clerkgate_*` codes, mapped
//! exhaustively below (a new [`LocalError`] variant does not compile until someone decides its
//! status). Bodies carry fixed texts only: never a token, an id or an upstream error string.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::auth::AuthError;
use crate::clerk::api::{Answer, CallError};
use crate::proxy::rejection::Rejection;
use crate::telemetry::{Label, LocalApiResult};

/// Who asked the caller to slow down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Throttle {
    /// Clerk answered 429 earlier and its `Retry-After` is still running.
    ClerkRetryAfter,
    /// clerkgate's client-side budget for the instance is spent for this window.
    Budget,
    /// Clerk's per-user limit on user updates, enforced locally.
    UserUpdates,
}

/// Why clerkgate itself answered instead of passing Clerk's answer on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalError {
    Unauthorized,
    RouteNotFound,
    MethodNotAllowed {
        allow: &'static str,
    },
    InvalidId,
    InvalidBody,
    /// A `Clerk-API-Version` header that is not a plausible version name.
    InvalidApiVersion,
    /// `GET /v1/jwks` with a pinned PEM key (`clerk.jwt_key`): no JWKS to serve.
    JwksPinned,
    /// `GET /v1/jwks` while no usable verification keys are held.
    KeysUnavailable,
    BodyTooLarge,
    RateLimited {
        retry_after_seconds: u64,
        by: Throttle,
    },
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamInvalid,
}

/// Status, code, message, long message and metric label of an error.
struct Described {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
    long_message: &'static str,
    result: LocalApiResult,
}

impl LocalError {
    fn describe(self) -> Described {
        let d = |status, code, message, long_message, result| Described {
            status,
            code,
            message,
            long_message,
            result,
        };
        match self {
            Self::Unauthorized => d(
                StatusCode::UNAUTHORIZED,
                "clerkgate_unauthorized",
                "Unauthorized",
                "This local API requires `Authorization: Bearer <local_api.token>`.",
                LocalApiResult::Unauthorized,
            ),
            Self::RouteNotFound => d(
                StatusCode::NOT_FOUND,
                "clerkgate_route_not_found",
                "Not found",
                "clerkgate's local API has no such route.",
                LocalApiResult::BadRequest,
            ),
            Self::MethodNotAllowed { .. } => d(
                StatusCode::METHOD_NOT_ALLOWED,
                "clerkgate_method_not_allowed",
                "Method not allowed",
                "This route does not accept this method; see the Allow header.",
                LocalApiResult::BadRequest,
            ),
            Self::InvalidId => d(
                StatusCode::BAD_REQUEST,
                "clerkgate_invalid_id",
                "Invalid id",
                "Ids are ASCII letters, digits and underscores (user_..., sess_...).",
                LocalApiResult::BadRequest,
            ),
            Self::InvalidBody => d(
                StatusCode::BAD_REQUEST,
                "clerkgate_invalid_body",
                "Invalid request body",
                "The request body must be a JSON object with the fields this route expects.",
                LocalApiResult::BadRequest,
            ),
            Self::InvalidApiVersion => d(
                StatusCode::BAD_REQUEST,
                "clerkgate_invalid_api_version",
                "Invalid Clerk-API-Version",
                "Clerk-API-Version must be 1 to 32 ASCII letters, digits, '-', '_' or '.' (e.g. 2025-04-10).",
                LocalApiResult::BadRequest,
            ),
            Self::JwksPinned => d(
                StatusCode::NOT_FOUND,
                "clerkgate_jwks_unavailable",
                "No JWKS to serve",
                "clerkgate verifies with a pinned PEM key (clerk.jwt_key), which has no kid; give the SDK the same key as jwtKey.",
                LocalApiResult::BadRequest,
            ),
            Self::KeysUnavailable => d(
                StatusCode::SERVICE_UNAVAILABLE,
                "clerkgate_keys_unavailable",
                "Verification keys unavailable",
                "clerkgate holds no usable verification keys right now; retry later.",
                LocalApiResult::Unavailable,
            ),
            Self::BodyTooLarge => d(
                StatusCode::PAYLOAD_TOO_LARGE,
                "clerkgate_body_too_large",
                "Request body too large",
                "The request body is larger than local_api.max_body_bytes.",
                LocalApiResult::BadRequest,
            ),
            Self::RateLimited { by, .. } => d(
                StatusCode::TOO_MANY_REQUESTS,
                "clerkgate_rate_limited",
                "Too many requests",
                match by {
                    Throttle::ClerkRetryAfter => {
                        "Clerk asked clerkgate to wait (Retry-After); retry after the given seconds."
                    }
                    Throttle::Budget => {
                        "clerkgate's Backend API budget for this instance is spent; retry after the given seconds."
                    }
                    Throttle::UserUpdates => {
                        "Clerk allows 10 updates per user per 10 seconds; retry after the given seconds."
                    }
                },
                LocalApiResult::RateLimited,
            ),
            Self::UpstreamTimeout => d(
                StatusCode::GATEWAY_TIMEOUT,
                "clerkgate_upstream_timeout",
                "Clerk did not answer in time",
                "The Clerk Backend API did not answer within local_api.request_timeout_ms.",
                LocalApiResult::Timeout,
            ),
            Self::UpstreamUnavailable => d(
                StatusCode::SERVICE_UNAVAILABLE,
                "clerkgate_upstream_unavailable",
                "Clerk is unreachable",
                "clerkgate could not reach the Clerk Backend API; retry later.",
                LocalApiResult::UpstreamError,
            ),
            Self::UpstreamInvalid => d(
                StatusCode::BAD_GATEWAY,
                "clerkgate_upstream_invalid_response",
                "Unexpected answer from Clerk",
                "The Clerk Backend API answered with a body clerkgate could not use.",
                LocalApiResult::UpstreamError,
            ),
        }
    }
}

impl From<CallError> for LocalError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Paused {
                retry_after_seconds,
            } => Self::RateLimited {
                retry_after_seconds,
                by: Throttle::ClerkRetryAfter,
            },
            CallError::Budget {
                retry_after_seconds,
            } => Self::RateLimited {
                retry_after_seconds,
                by: Throttle::Budget,
            },
            CallError::Timeout => Self::UpstreamTimeout,
            CallError::Network(_) => Self::UpstreamUnavailable,
            CallError::Invalid => Self::UpstreamInvalid,
        }
    }
}

/// A response and the metric label it is counted under.
pub(crate) struct Reply {
    pub response: Response<Full<Bytes>>,
    pub result: LocalApiResult,
}

fn errors_body(code: &str, message: &str, long_message: &str) -> Bytes {
    Bytes::from(
        json!({"errors": [{"code": code, "message": message, "long_message": long_message}]})
            .to_string(),
    )
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    crate::body::json(status, body)
}

/// `true` for Clerk's error shape: an object with a non-empty `errors` array.
pub(crate) fn clerk_shaped(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v.get("errors")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    })
}

impl Reply {
    pub(crate) fn error(e: LocalError) -> Reply {
        let d = e.describe();
        let mut response = respond(d.status, errors_body(d.code, d.message, d.long_message));
        let h = response.headers_mut();
        match e {
            LocalError::Unauthorized => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"clerkgate-local-api\""),
                );
            }
            LocalError::MethodNotAllowed { allow } => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            LocalError::RateLimited {
                retry_after_seconds,
                ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
            }
            LocalError::UpstreamUnavailable => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            LocalError::KeysUnavailable => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            LocalError::RouteNotFound
            | LocalError::InvalidId
            | LocalError::InvalidBody
            | LocalError::InvalidApiVersion
            | LocalError::JwksPinned
            | LocalError::BodyTooLarge
            | LocalError::UpstreamTimeout
            | LocalError::UpstreamInvalid => {}
        }
        Reply {
            response,
            result: d.result,
        }
    }

    /// A successful answer of clerkgate's own (tokens/verify).
    pub(crate) fn ok_json(body: &Value) -> Reply {
        Reply {
            response: respond(StatusCode::OK, Bytes::from(body.to_string())),
            result: LocalApiResult::Ok,
        }
    }

    /// A 2xx body from Clerk (possibly from the cache), passed on unchanged.
    pub(crate) fn clerk_ok(status: StatusCode, body: Bytes) -> Reply {
        Reply {
            response: respond(status, body),
            result: LocalApiResult::Ok,
        }
    }

    /// Whatever Clerk answered, passed on: an answer in Clerk's error shape is Clerk's own, and
    /// keeps its status (a 500 stays a 500, as the SDK would have seen it) and its body. Any
    /// other error answer came from something between clerkgate and Clerk: its 4xx status is
    /// kept, a 5xx other than 503/504 becomes 502 (clerkgate is the gateway), and the body is
    /// `clerkgate_upstream_error`. A 429's `Retry-After` is passed on unchanged.
    pub(crate) fn clerk(answer: &Answer) -> Reply {
        let s = answer.status;
        if s.is_success() {
            return Self::clerk_ok(s, answer.body.clone());
        }
        let clerks_own = clerk_shaped(&answer.body);
        let status = match s.as_u16() {
            _ if clerks_own => s,
            503 | 504 => s,
            500..=599 => StatusCode::BAD_GATEWAY,
            _ => s,
        };
        let result = match status.as_u16() {
            404 => LocalApiResult::NotFound,
            429 => LocalApiResult::RateLimited,
            400..=499 => LocalApiResult::ClientError,
            _ => LocalApiResult::UpstreamError,
        };
        let body = if clerks_own {
            answer.body.clone()
        } else {
            errors_body(
                "clerkgate_upstream_error",
                "Clerk answered with an error",
                "The Clerk Backend API answered with an error status and no Clerk error body.",
            )
        };
        let mut response = respond(status, body);
        if let Some(seconds) = answer.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        Reply { response, result }
    }

    /// A token `POST /v1/tokens/verify` did not accept: the status the proxy would answer
    /// (401, or 503 when keys or session state are unavailable) and Clerk's reason code.
    /// A verified token the request may not use (`403`, the route reason code).
    pub(crate) fn policy_rejected(e: crate::auth::policy::PolicyError) -> Reply {
        let message = e.to_string();
        let body = errors_body(
            e.as_label(),
            &message,
            &format!("The token was verified but is not accepted: {message}."),
        );
        Reply {
            response: respond(StatusCode::FORBIDDEN, body),
            result: LocalApiResult::TokenInvalid,
        }
    }

    pub(crate) fn token_rejected(e: AuthError) -> Reply {
        let status = Rejection::Auth(e).status();
        let message = e.to_string();
        let body = errors_body(
            e.failure().as_label(),
            &message,
            &format!("The session token was not accepted: {message}."),
        );
        let mut response = respond(status, body);
        let result = if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            LocalApiResult::Unavailable
        } else {
            LocalApiResult::TokenInvalid
        };
        Reply { response, result }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(r: Reply) -> Value {
        let bytes = r.response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn answer(status: u16, body: &str, retry_after_seconds: Option<u64>) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::from(body.to_owned()),
            retry_after_seconds,
        }
    }

    #[tokio::test]
    async fn own_errors_have_clerks_shape_and_their_headers() {
        let r = Reply::error(LocalError::RateLimited {
            retry_after_seconds: 7,
            by: Throttle::UserUpdates,
        });
        assert_eq!(r.response.status(), 429);
        assert_eq!(r.response.headers()["retry-after"], "7");
        assert_eq!(r.result, LocalApiResult::RateLimited);
        assert_eq!(body(r).await["errors"][0]["code"], "clerkgate_rate_limited");
        let r = Reply::error(LocalError::MethodNotAllowed { allow: "POST" });
        assert_eq!(r.response.headers()["allow"], "POST");
        for (e, status) in [
            (CallError::Timeout, 504),
            (CallError::Network("refused".into()), 503),
            (CallError::Invalid, 502),
        ] {
            let r = Reply::error(e.into());
            assert_eq!(r.response.status(), status);
            assert!(matches!(
                r.result,
                LocalApiResult::Timeout | LocalApiResult::UpstreamError
            ));
            let b = body(r).await;
            assert!(
                b["errors"][0]["code"]
                    .as_str()
                    .unwrap()
                    .starts_with("clerkgate_upstream_")
            );
            assert!(!b.to_string().contains("refused"), "no upstream error text");
        }
    }

    #[tokio::test]
    async fn clerk_answers_pass_through() {
        let clerk_404 = r#"{"errors":[{"code":"resource_not_found","message":"not found","long_message":"No user"}],"clerk_trace_id":"t"}"#;
        let r = Reply::clerk(&answer(404, clerk_404, None));
        assert_eq!(
            (r.response.status().as_u16(), r.result),
            (404, LocalApiResult::NotFound)
        );
        assert_eq!(body(r).await["errors"][0]["code"], "resource_not_found");

        let r = Reply::clerk(&answer(
            429,
            r#"{"errors":[{"code":"too_many_requests"}]}"#,
            Some(9),
        ));
        assert_eq!(r.response.headers()["retry-after"], "9");
        assert_eq!(r.result, LocalApiResult::RateLimited);

        let r = Reply::clerk(&answer(500, "<html>oops</html>", None));
        assert_eq!(r.response.status(), 502);
        assert_eq!(
            body(r).await["errors"][0]["code"],
            "clerkgate_upstream_error"
        );

        // Clerk's own 500: status and body as Clerk sent them.
        let clerk_500 = r#"{"errors":[{"code":"internal_clerk_error","message":"Oops"}],"clerk_trace_id":"t5"}"#;
        let r = Reply::clerk(&answer(500, clerk_500, None));
        assert_eq!(
            (r.response.status().as_u16(), r.result),
            (500, LocalApiResult::UpstreamError)
        );
        let bytes = r.response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes, clerk_500.as_bytes(), "byte for byte");

        let r = Reply::clerk(&answer(422, clerk_404, None));
        assert_eq!(r.result, LocalApiResult::ClientError);

        let r = Reply::clerk(&answer(204, "", None));
        assert_eq!(r.response.status(), 204);
        assert!(r.response.headers().get("content-type").is_none());
    }

    #[tokio::test]
    async fn rejected_tokens_carry_the_clerk_reason_code() {
        let r = Reply::token_rejected(AuthError::Expired);
        assert_eq!(
            (r.response.status().as_u16(), r.result),
            (401, LocalApiResult::TokenInvalid)
        );
        assert_eq!(body(r).await["errors"][0]["code"], "token-expired");
        let r = Reply::token_rejected(AuthError::KeysUnavailable);
        assert_eq!(
            (r.response.status().as_u16(), r.result),
            (503, LocalApiResult::Unavailable)
        );
    }
}
