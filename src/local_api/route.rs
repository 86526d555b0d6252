//! Which local API route a request is for: a pure function of method and path.
//!
//! Paths are matched exactly, segment by segment, on the raw (still percent-encoded) path, and
//! every id is checked before it can become part of a Backend API URL: `/v1/users/..%2Fjwks` is a
//! bad id, never a path traversal. A user id must look like one of Clerk's (`user_` and then
//! [`crate::clerk::api::is_id`]'s characters), a session id likewise with `sess_`, so the words
//! Clerk uses as path segments under `/v1/users/` (`count`, ...) can never be taken for ids.

use http::Method;

use crate::clerk::api::is_id;
use crate::telemetry::LocalApiRoute;

/// A matched route and the id it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    UsersGet(&'a str),
    UsersList,
    UsersCount,
    UsersUpdate(&'a str),
    UsersMetadataUpdate(&'a str),
    UsersMetadataReplace(&'a str),
    UsersDelete(&'a str),
    UsersBan(&'a str),
    UsersUnban(&'a str),
    UsersLock(&'a str),
    UsersUnlock(&'a str),
    UsersOrganizationMemberships(&'a str),
    SessionsGet(&'a str),
    SessionsList,
    SessionsRevoke(&'a str),
    SessionsCreate,
    /// `POST /v1/sessions/{id}/tokens[/{template}]`.
    SessionsToken(&'a str, Option<&'a str>),
    SessionsVerify(&'a str),
    TokensVerify,
    Jwks,
}

/// Why no route matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteError {
    NotFound,
    /// The path exists; `allow` lists its methods (RFC 9110 section 15.5.6).
    MethodNotAllowed {
        allow: &'static str,
    },
    /// The path has an id where an id belongs, but not a well-formed one.
    InvalidId,
}

impl Route<'_> {
    pub(crate) fn label(self) -> LocalApiRoute {
        match self {
            Self::UsersGet(_) => LocalApiRoute::UsersGet,
            Self::UsersList => LocalApiRoute::UsersList,
            Self::UsersCount => LocalApiRoute::UsersCount,
            Self::UsersUpdate(_) => LocalApiRoute::UsersUpdate,
            Self::UsersMetadataUpdate(_) => LocalApiRoute::UsersMetadataUpdate,
            Self::UsersMetadataReplace(_) => LocalApiRoute::UsersMetadataReplace,
            Self::UsersDelete(_) => LocalApiRoute::UsersDelete,
            Self::UsersBan(_) => LocalApiRoute::UsersBan,
            Self::UsersUnban(_) => LocalApiRoute::UsersUnban,
            Self::UsersLock(_) => LocalApiRoute::UsersLock,
            Self::UsersUnlock(_) => LocalApiRoute::UsersUnlock,
            Self::UsersOrganizationMemberships(_) => LocalApiRoute::UsersOrganizationMemberships,
            Self::SessionsGet(_) => LocalApiRoute::SessionsGet,
            Self::SessionsList => LocalApiRoute::SessionsList,
            Self::SessionsRevoke(_) => LocalApiRoute::SessionsRevoke,
            Self::SessionsCreate => LocalApiRoute::SessionsCreate,
            Self::SessionsToken(..) => LocalApiRoute::SessionsToken,
            Self::SessionsVerify(_) => LocalApiRoute::SessionsVerify,
            Self::TokensVerify => LocalApiRoute::TokensVerify,
            Self::Jwks => LocalApiRoute::Jwks,
        }
    }
}

/// A Clerk id with its object prefix (`user_`, `sess_`).
fn prefixed_id(id: &str, prefix: &str) -> bool {
    id.len() > prefix.len() && id.starts_with(prefix) && is_id(id)
}

/// A JWT template name as it may appear in a path: ASCII letters, digits, `_` and `-`, at most
/// 128 bytes (no `.`, so never `..`).
fn is_template(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Matches `method` and `path` (without the query).
pub(crate) fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, RouteError> {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err(RouteError::NotFound);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let user = |s: &'a str| {
        if prefixed_id(s, "user_") {
            Ok(s)
        } else {
            Err(RouteError::InvalidId)
        }
    };
    let session = |s: &'a str| {
        if prefixed_id(s, "sess_") {
            Ok(s)
        } else {
            Err(RouteError::InvalidId)
        }
    };
    let pick = |allowed: &'static str,
                choice: Option<Result<Route<'a>, RouteError>>|
     -> Result<Route<'a>, RouteError> {
        choice.unwrap_or(Err(RouteError::MethodNotAllowed { allow: allowed }))
    };
    let m = method.clone();
    let post = m == Method::POST;
    match segments.as_slice() {
        ["users"] => pick("GET", (m == Method::GET).then_some(Ok(Route::UsersList))),
        ["users", "count"] => pick("GET", (m == Method::GET).then_some(Ok(Route::UsersCount))),
        ["users", id] => pick(
            "GET, PATCH, DELETE",
            match m {
                Method::GET => Some(user(id).map(Route::UsersGet)),
                Method::PATCH => Some(user(id).map(Route::UsersUpdate)),
                Method::DELETE => Some(user(id).map(Route::UsersDelete)),
                _ => None,
            },
        ),
        ["users", id, "metadata"] => pick(
            "PATCH, PUT",
            match m {
                Method::PATCH => Some(user(id).map(Route::UsersMetadataUpdate)),
                Method::PUT => Some(user(id).map(Route::UsersMetadataReplace)),
                _ => None,
            },
        ),
        ["users", id, action @ ("ban" | "unban" | "lock" | "unlock")] => pick(
            "POST",
            post.then(|| {
                user(id).map(match *action {
                    "ban" => Route::UsersBan,
                    "unban" => Route::UsersUnban,
                    "lock" => Route::UsersLock,
                    _ => Route::UsersUnlock,
                })
            }),
        ),
        ["users", id, "organization_memberships"] => pick(
            "GET",
            (m == Method::GET).then(|| user(id).map(Route::UsersOrganizationMemberships)),
        ),
        ["sessions"] => pick(
            "GET, POST",
            match m {
                Method::GET => Some(Ok(Route::SessionsList)),
                Method::POST => Some(Ok(Route::SessionsCreate)),
                _ => None,
            },
        ),
        ["sessions", id] => pick(
            "GET",
            (m == Method::GET).then(|| session(id).map(Route::SessionsGet)),
        ),
        ["sessions", id, "revoke"] => {
            pick("POST", post.then(|| session(id).map(Route::SessionsRevoke)))
        }
        ["sessions", id, "verify"] => {
            pick("POST", post.then(|| session(id).map(Route::SessionsVerify)))
        }
        ["sessions", id, "tokens"] => pick(
            "POST",
            post.then(|| session(id).map(|id| Route::SessionsToken(id, None))),
        ),
        ["sessions", id, "tokens", template] => pick(
            "POST",
            post.then(|| {
                let id = session(id)?;
                if is_template(template) {
                    Ok(Route::SessionsToken(id, Some(template)))
                } else {
                    Err(RouteError::InvalidId)
                }
            }),
        ),
        ["tokens", "verify"] => pick("POST", post.then_some(Ok(Route::TokensVerify))),
        ["jwks"] => pick("GET", (m == Method::GET).then_some(Ok(Route::Jwks))),
        _ => Err(RouteError::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_exactly() {
        use Route::*;
        let cases: &[(Method, &str, Result<Route, RouteError>)] = &[
            (Method::GET, "/v1/users", Ok(UsersList)),
            (Method::GET, "/v1/users/user_1", Ok(UsersGet("user_1"))),
            (Method::PATCH, "/v1/users/user_1", Ok(UsersUpdate("user_1"))),
            (
                Method::DELETE,
                "/v1/users/user_1",
                Ok(UsersDelete("user_1")),
            ),
            (
                Method::PATCH,
                "/v1/users/user_1/metadata",
                Ok(UsersMetadataUpdate("user_1")),
            ),
            (Method::GET, "/v1/sessions", Ok(SessionsList)),
            (Method::POST, "/v1/sessions", Ok(SessionsCreate)),
            (
                Method::GET,
                "/v1/sessions/sess_1",
                Ok(SessionsGet("sess_1")),
            ),
            (
                Method::POST,
                "/v1/sessions/sess_1/revoke",
                Ok(SessionsRevoke("sess_1")),
            ),
            (Method::POST, "/v1/tokens/verify", Ok(TokensVerify)),
            (Method::GET, "/v1/users/count", Ok(UsersCount)),
            (
                Method::PUT,
                "/v1/users/user_1/metadata",
                Ok(UsersMetadataReplace("user_1")),
            ),
            (Method::POST, "/v1/users/user_1/ban", Ok(UsersBan("user_1"))),
            (
                Method::POST,
                "/v1/users/user_1/unban",
                Ok(UsersUnban("user_1")),
            ),
            (
                Method::POST,
                "/v1/users/user_1/lock",
                Ok(UsersLock("user_1")),
            ),
            (
                Method::POST,
                "/v1/users/user_1/unlock",
                Ok(UsersUnlock("user_1")),
            ),
            (
                Method::GET,
                "/v1/users/user_1/organization_memberships",
                Ok(UsersOrganizationMemberships("user_1")),
            ),
            (
                Method::POST,
                "/v1/sessions/sess_1/tokens",
                Ok(SessionsToken("sess_1", None)),
            ),
            (
                Method::POST,
                "/v1/sessions/sess_1/tokens/supa-base_2",
                Ok(SessionsToken("sess_1", Some("supa-base_2"))),
            ),
            (
                Method::POST,
                "/v1/sessions/sess_1/verify",
                Ok(SessionsVerify("sess_1")),
            ),
            (Method::GET, "/v1/jwks", Ok(Jwks)),
            (Method::GET, "/", Err(RouteError::NotFound)),
            (
                Method::POST,
                "/v1/users/count",
                Err(RouteError::MethodNotAllowed { allow: "GET" }),
            ),
            (
                Method::POST,
                "/v1/jwks",
                Err(RouteError::MethodNotAllowed { allow: "GET" }),
            ),
            (
                Method::POST,
                "/v1/sessions/sess_1/tokens/..",
                Err(RouteError::InvalidId),
            ),
            (
                Method::POST,
                "/v1/sessions/sess_1/tokens/a%2F..",
                Err(RouteError::InvalidId),
            ),
            (
                Method::GET,
                "/v1/users/user_1/ban",
                Err(RouteError::MethodNotAllowed { allow: "POST" }),
            ),
            (Method::GET, "/v1/users/", Err(RouteError::InvalidId)),
            (Method::GET, "/v1/users/user_1/", Err(RouteError::NotFound)),
            (Method::GET, "/v2/users/user_1", Err(RouteError::NotFound)),
            (
                Method::GET,
                "/v1/users/..%2Fjwks",
                Err(RouteError::InvalidId),
            ),
            (
                Method::GET,
                "/v1/users/user%5F1",
                Err(RouteError::InvalidId),
            ),
            (
                Method::PUT,
                "/v1/users/user_1",
                Err(RouteError::MethodNotAllowed {
                    allow: "GET, PATCH, DELETE",
                }),
            ),
            (
                Method::GET,
                "/v1/sessions/sess_1/revoke",
                Err(RouteError::MethodNotAllowed { allow: "POST" }),
            ),
            (
                Method::GET,
                "/v1/tokens/verify",
                Err(RouteError::MethodNotAllowed { allow: "POST" }),
            ),
        ];
        for (method, path, expected) in cases {
            assert_eq!(&route(method, path), expected, "{method} {path}");
        }
    }

    #[test]
    fn reserved_words_and_foreign_ids_are_never_ids() {
        for word in ["count", "user_", "sess_1", "jwks", "me", "ban"] {
            assert_eq!(
                route(&Method::GET, &format!("/v1/users/{word}")),
                if word == "count" {
                    Ok(Route::UsersCount)
                } else {
                    Err(RouteError::InvalidId)
                },
                "{word}"
            );
            assert_eq!(
                route(&Method::DELETE, &format!("/v1/users/{word}")),
                if word == "count" {
                    Err(RouteError::MethodNotAllowed { allow: "GET" })
                } else {
                    Err(RouteError::InvalidId)
                },
                "{word}"
            );
        }
        for sid in ["user_1", "sess_", "count", "verify"] {
            assert_eq!(
                route(&Method::GET, &format!("/v1/sessions/{sid}")),
                Err(RouteError::InvalidId),
                "{sid}"
            );
        }
        assert_eq!(
            route(&Method::POST, "/v1/users/count/ban"),
            Err(RouteError::InvalidId)
        );
    }

    #[test]
    fn a_bad_method_is_reported_before_a_bad_id() {
        assert_eq!(
            route(&Method::PUT, "/v1/users/a/b/../c"),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            route(&Method::PUT, "/v1/users/bad id"),
            Err(RouteError::MethodNotAllowed {
                allow: "GET, PATCH, DELETE"
            })
        );
    }
}
