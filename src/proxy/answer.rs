//! What the forward-auth answer tells the ingress to remove.
//!
//! An ingress copies the headers it was told to copy from a `200` answer onto the original
//! request, and passes every other client header on. Envoy's `ext_authz` (HTTP service) only
//! overwrites the headers the answer carries, so a client-sent `X-Org-Role` would survive an
//! answer for a user without an organization, and every identity header would survive an
//! anonymous answer on a public route. The answer therefore lists, in
//! `x-envoy-auth-headers-to-remove`, every managed header it does not carry: the reserved
//! identity names and, unless `auth.forward_token`, `authorization` and `cookie` (the answer
//! carries `cookie` with the token cookies removed when any other cookie is left). Client-sent names that are reserved only by
//! spelling (`x_user_id`) or by the `x-clerk-` prefix are appended, so the ingress removes them
//! too.
//!
//! Which managed names an answer carries varies little (anonymous, signed in with or without an
//! organization, impersonated), so each combination's value is built once, on first use, and
//! kept: an answer looks up its combination by bit mask, without building a string.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// The header Envoy's `ext_authz` HTTP client reads: a comma-separated list of request header
/// names to remove before the request goes upstream.
pub(super) static HEADERS_TO_REMOVE: HeaderName =
    HeaderName::from_static("x-envoy-auth-headers-to-remove");

/// Up to this many managed names the per-combination values are cached (2^12 slots of a
/// pointer-sized `OnceLock` each); beyond it every answer builds its value.
const MAX_CACHED_BITS: usize = 12;

/// The removal lists, built once from the reserved names.
pub(super) struct RemoveList {
    /// The managed names, lower-case: reserved identity names, `authorization`, `cookie`.
    names: Vec<HeaderName>,
    /// Index: bit `i` set when `names[i]` is to be removed.
    cache: Box<[OnceLock<HeaderValue>]>,
}

impl RemoveList {
    /// `reserved` is [`crate::auth::identity::IdentityBuilder::reserved`] (lower-case, `_`
    /// folded into `-`). With `forward_token` the token headers are the app's: never listed
    /// (the answer still carries them, for ingresses that set them from it).
    pub(super) fn new(reserved: &[String], forward_token: bool) -> Self {
        let mut names: Vec<HeaderName> = reserved
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        if !forward_token {
            names.push(header::AUTHORIZATION);
            names.push(header::COOKIE);
        }
        let slots = if names.len() <= MAX_CACHED_BITS {
            1usize << names.len()
        } else {
            0
        };
        Self {
            names,
            cache: (0..slots).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Whether `name` (lower-case, as `http` keeps it) is managed: the answer either carries
    /// it or lists it.
    pub(super) fn manages(&self, name: &HeaderName) -> bool {
        self.names.contains(name)
    }

    /// The value for an answer whose headers are `answer`: every managed name it does not
    /// carry, then `extra` (client-sent reserved spellings the ingress cannot know of).
    pub(super) fn value(&self, answer: &HeaderMap, extra: &[HeaderName]) -> HeaderValue {
        if !extra.is_empty() || self.cache.is_empty() {
            return self.build(answer, extra);
        }
        let mask = self
            .names
            .iter()
            .enumerate()
            .filter(|(_, name)| !answer.contains_key(*name))
            .fold(0usize, |mask, (i, _)| mask | (1 << i));
        self.cache[mask]
            .get_or_init(|| self.build(answer, &[]))
            .clone()
    }

    fn build(&self, answer: &HeaderMap, extra: &[HeaderName]) -> HeaderValue {
        let list = self
            .names
            .iter()
            .filter(|name| !answer.contains_key(*name))
            .chain(extra)
            .map(HeaderName::as_str)
            .collect::<Vec<_>>()
            .join(",");
        // Header names are valid header-value bytes. An empty value (everything carried, or
        // nothing managed) is a valid, empty list.
        HeaderValue::from_str(&list).unwrap_or(HeaderValue::from_static(""))
    }
}

/// The request's cookies as one value (HTTP/2 clients may send several `cookie` fields).
pub(super) fn joined_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(header::COOKIE).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(first.clone());
    };
    let mut joined = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(values) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> RemoveList {
        RemoveList::new(
            &[
                "x-clerk-claims".into(),
                "x-org-id".into(),
                "x-user-id".into(),
            ],
            false,
        )
    }

    #[test]
    fn an_empty_answer_removes_every_managed_name() {
        let v = list().value(&HeaderMap::new(), &[]);
        assert_eq!(v, "x-clerk-claims,x-org-id,x-user-id,authorization,cookie");
    }

    #[test]
    fn names_the_answer_carries_are_not_listed_and_values_are_cached_per_combination() {
        let l = list();
        let mut answer = HeaderMap::new();
        answer.insert("x-user-id", HeaderValue::from_static("user_1"));
        answer.insert(header::COOKIE, HeaderValue::from_static("theme=dark"));
        assert_eq!(
            l.value(&answer, &[]),
            "x-clerk-claims,x-org-id,authorization"
        );
        answer.insert("x-org-id", HeaderValue::from_static("org_1"));
        assert_eq!(l.value(&answer, &[]), "x-clerk-claims,authorization");
        assert_eq!(l.cache.iter().filter(|s| s.get().is_some()).count(), 2);
    }

    #[test]
    fn client_sent_spellings_are_appended() {
        let extra = [
            HeaderName::from_static("x_user_id"),
            HeaderName::from_static("x-clerk-anything"),
        ];
        let v = list().value(&HeaderMap::new(), &extra);
        assert_eq!(
            v,
            "x-clerk-claims,x-org-id,x-user-id,authorization,cookie,x_user_id,x-clerk-anything"
        );
    }

    #[test]
    fn many_names_are_built_per_answer() {
        let reserved: Vec<String> = (0..20).map(|i| format!("x-h{i}")).collect();
        let l = RemoveList::new(&reserved, false);
        assert!(l.cache.is_empty());
        let v = l.value(&HeaderMap::new(), &[]);
        assert!(v.to_str().unwrap().starts_with("x-h0,x-h1,"));
    }

    #[test]
    fn forward_token_leaves_the_token_headers_unlisted() {
        let l = RemoveList::new(&["x-user-id".into()], true);
        assert_eq!(l.value(&HeaderMap::new(), &[]), "x-user-id");
        assert!(!l.manages(&header::AUTHORIZATION));
    }

    #[test]
    fn cookies_are_joined() {
        let mut h = HeaderMap::new();
        assert!(joined_cookies(&h).is_none());
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        assert_eq!(joined_cookies(&h).unwrap(), "a=1");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(joined_cookies(&h).unwrap(), "a=1; b=2");
    }
}
