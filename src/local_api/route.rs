//! Which local API route a request is for: a pure function of method and path.
//!
//! Paths are matched exactly, segment by segment, on the raw (still percent-encoded) path, and
//! every id is checked with [`crate::clerk::api::is_id`] before it can become part of a Backend
//! API URL: `/v1/users/..%2Fjwks` is a bad id, never a path traversal.

use http::Method;

use crate::clerk::api::is_id;
use crate::telemetry::LocalApiRoute;

/// A matched route and the id it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    UsersGet(&'a str),
    UsersList,
    UsersUpdate(&'a str),
    UsersMetadataUpdate(&'a str),
    UsersDelete(&'a str),
    SessionsGet(&'a str),
    SessionsList,
    SessionsRevoke(&'a str),
    SessionsCreate,
    TokensVerify,
}

/// Why no route matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The path exists; `allow` lists its methods (RFC 9110 section 15.5.6).
    MethodNotAllowed {
        allow: &'static str,
    },
    /// The path has an id where an id belongs, but not a well-formed one.
    InvalidId,
}

impl Route<'_> {
    pub fn label(self) -> LocalApiRoute {
        match self {
            Self::UsersGet(_) => LocalApiRoute::UsersGet,
            Self::UsersList => LocalApiRoute::UsersList,
            Self::UsersUpdate(_) => LocalApiRoute::UsersUpdate,
            Self::UsersMetadataUpdate(_) => LocalApiRoute::UsersMetadataUpdate,
            Self::UsersDelete(_) => LocalApiRoute::UsersDelete,
            Self::SessionsGet(_) => LocalApiRoute::SessionsGet,
            Self::SessionsList => LocalApiRoute::SessionsList,
            Self::SessionsRevoke(_) => LocalApiRoute::SessionsRevoke,
            Self::SessionsCreate => LocalApiRoute::SessionsCreate,
            Self::TokensVerify => LocalApiRoute::TokensVerify,
        }
    }
}

/// Matches `method` and `path` (without the query).
pub fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, RouteError> {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err(RouteError::NotFound);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let id = |s: &'a str| {
        if is_id(s) {
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
    match segments.as_slice() {
        ["users"] => pick("GET", (m == Method::GET).then_some(Ok(Route::UsersList))),
        ["users", user] => pick(
            "GET, PATCH, DELETE",
            match m {
                Method::GET => Some(id(user).map(Route::UsersGet)),
                Method::PATCH => Some(id(user).map(Route::UsersUpdate)),
                Method::DELETE => Some(id(user).map(Route::UsersDelete)),
                _ => None,
            },
        ),
        ["users", user, "metadata"] => pick(
            "PATCH",
            (m == Method::PATCH).then(|| id(user).map(Route::UsersMetadataUpdate)),
        ),
        ["sessions"] => pick(
            "GET, POST",
            match m {
                Method::GET => Some(Ok(Route::SessionsList)),
                Method::POST => Some(Ok(Route::SessionsCreate)),
                _ => None,
            },
        ),
        ["sessions", session] => pick(
            "GET",
            (m == Method::GET).then(|| id(session).map(Route::SessionsGet)),
        ),
        ["sessions", session, "revoke"] => pick(
            "POST",
            (m == Method::POST).then(|| id(session).map(Route::SessionsRevoke)),
        ),
        ["tokens", "verify"] => pick(
            "POST",
            (m == Method::POST).then_some(Ok(Route::TokensVerify)),
        ),
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
            (Method::GET, "/", Err(RouteError::NotFound)),
            (Method::GET, "/v1/jwks", Err(RouteError::NotFound)),
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
