//! The verified identity and the headers that carry it upstream.
//!
//! Everything the upstream will see is computed once, when a token is first verified, and kept
//! in the token cache: a cache hit only clones `HeaderValue`s (reference-counted bytes). v1 and
//! v2 organization claims are normalised by [`crate::clerk::claims`], so the upstream gets the
//! same headers whatever token version the instance issues.
//!
//! Header values are built with `HeaderValue::from_str`, which refuses CR, LF and other control
//! bytes: a claim carrying them is dropped (logged at debug), never split into a second header.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::verify::VerifiedClaims;
use crate::clerk::claims::{self, Org};
use crate::config::ConfigError;

/// `[headers]`: names of the identity headers sent upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// The user id (`sub`).
    pub user_id: String,
    /// The session id (`sid`).
    pub session_id: String,
    /// The active organization's id.
    pub org_id: String,
    /// The active organization role, `org:<role>`.
    pub org_role: String,
    /// The active organization's slug.
    pub org_slug: String,
    /// Comma-separated organization permissions (`org:<feature>:<permission>`).
    pub org_permissions: String,
    /// The impersonator's user id (`act.sub`) when a session is impersonated.
    pub actor_id: String,
    /// Header carrying the whole verified payload as base64url JSON.
    pub claims_header: String,
    /// Send `claims_header` at all.
    pub forward_claims: bool,
    /// More header names treated as reserved (stripped from clients like the ones above).
    pub reserved: Vec<String>,
    /// Claim path (dotted, e.g. `public_metadata.plan`) to header name. Arrays are joined with
    /// commas, objects sent as JSON.
    pub claims: BTreeMap<String, String>,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        Self {
            user_id: "X-User-Id".into(),
            session_id: "X-Session-Id".into(),
            org_id: "X-Org-Id".into(),
            org_role: "X-Org-Role".into(),
            org_slug: "X-Org-Slug".into(),
            org_permissions: "X-Org-Permissions".into(),
            actor_id: "X-Actor-Id".into(),
            claims_header: "X-Clerk-Claims".into(),
            forward_claims: true,
            reserved: Vec::new(),
            claims: BTreeMap::new(),
        }
    }
}

/// Headers an identity header may never be named after: they carry the request itself.
const FORBIDDEN_NAMES: &[&str] = &[
    "host",
    "authorization",
    "cookie",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "content-type",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

impl HeadersConfig {
    fn named(&self) -> [(&'static str, &String); 8] {
        [
            ("headers.user_id", &self.user_id),
            ("headers.session_id", &self.session_id),
            ("headers.org_id", &self.org_id),
            ("headers.org_role", &self.org_role),
            ("headers.org_slug", &self.org_slug),
            ("headers.org_permissions", &self.org_permissions),
            ("headers.actor_id", &self.actor_id),
            ("headers.claims_header", &self.claims_header),
        ]
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |key: &str, name: &str| -> Result<(), ConfigError> {
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::new(key, format!("{name:?} is not a valid header name"))
            })?;
            if FORBIDDEN_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(ConfigError::new(
                    key,
                    format!("{name} carries the request itself"),
                ));
            }
            Ok(())
        };
        for (key, name) in self.named() {
            check(key, name)?;
        }
        for (i, name) in self.reserved.iter().enumerate() {
            check(&format!("headers.reserved[{i}]"), name)?;
        }
        for (path, name) in &self.claims {
            check(&format!("headers.claims.{path}"), name)?;
            // A mapped claim must never overwrite a verified identity header.
            if self
                .named()
                .iter()
                .any(|(_, n)| normalise_name(n) == normalise_name(name))
            {
                return Err(ConfigError::new(
                    format!("headers.claims.{path}"),
                    format!("{name} is already an identity header"),
                ));
            }
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(ConfigError::new(
                    format!("headers.claims.{path}"),
                    "claim path must be dotted names such as public_metadata.plan",
                ));
            }
        }
        Ok(())
    }
}

/// A verified session: who, which session and organization, and the headers to send.
#[derive(Debug)]
pub struct Identity {
    pub user_id: String,
    pub session_id: Option<String>,
    pub org: Option<Org>,
    pub actor_id: Option<String>,
    pub iat: Option<i64>,
    pub exp_ms: u64,
    /// The decoded claims, for route claim requirements; empty unless a route has some (see
    /// [`IdentityBuilder::keep_claims`]).
    pub claims: Map<String, Value>,
    /// Every identity header, ready to insert.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The key-store generation the token was verified under (see `KeyStore::generation`).
    pub key_generation: u64,
}

impl Identity {
    /// Still within `exp` plus skew at `now_ms`.
    pub fn usable_at(&self, now_ms: u64, skew_ms: u64) -> bool {
        self.exp_ms.saturating_add(skew_ms) > now_ms
    }

    /// The value at a dotted claim path.
    pub fn claim(&self, path: &str) -> Option<&Value> {
        claim_at(&self.claims, path)
    }
}

fn claim_at<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = claims.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

/// Builds identities with header names parsed once.
#[derive(Debug, Clone)]
pub struct IdentityBuilder {
    user_id: HeaderName,
    session_id: HeaderName,
    org_id: HeaderName,
    org_role: HeaderName,
    org_slug: HeaderName,
    org_permissions: HeaderName,
    actor_id: HeaderName,
    claims_header: Option<HeaderName>,
    claim_headers: Vec<(String, HeaderName)>,
    reserved: Vec<String>,
    /// Keep the decoded claims in the identity (and so in the token cache): only needed when
    /// some route has claim requirements, and the largest part of a cached entry otherwise.
    keep_claims: bool,
}

fn header_name(name: &str) -> HeaderName {
    // Validated in HeadersConfig::validate; a fallback keeps this total.
    HeaderName::from_bytes(name.as_bytes())
        .unwrap_or(HeaderName::from_static("x-clerkgate-invalid"))
}

/// Lower-case with `_` folded into `-`, the form reserved names are compared in.
pub fn normalise_name(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b == b'_' {
                '-'
            } else {
                b.to_ascii_lowercase() as char
            }
        })
        .collect()
}

impl IdentityBuilder {
    pub fn new(config: &HeadersConfig) -> Self {
        let mut reserved: Vec<String> = config
            .named()
            .iter()
            .map(|(_, n)| normalise_name(n))
            .chain(config.reserved.iter().map(|n| normalise_name(n)))
            .chain(config.claims.values().map(|n| normalise_name(n)))
            .collect();
        reserved.sort();
        reserved.dedup();
        Self {
            user_id: header_name(&config.user_id),
            session_id: header_name(&config.session_id),
            org_id: header_name(&config.org_id),
            org_role: header_name(&config.org_role),
            org_slug: header_name(&config.org_slug),
            org_permissions: header_name(&config.org_permissions),
            actor_id: header_name(&config.actor_id),
            claims_header: config
                .forward_claims
                .then(|| header_name(&config.claims_header)),
            claim_headers: config
                .claims
                .iter()
                .map(|(path, name)| (path.clone(), header_name(name)))
                .collect(),
            reserved,
            keep_claims: true,
        }
    }

    /// Whether identities keep their decoded claims (see [`Identity::claims`]).
    pub fn keep_claims(mut self, keep: bool) -> Self {
        self.keep_claims = keep;
        self
    }

    /// Reserved names, normalised (lower-case, `_` as `-`). `x-clerk-*` is reserved as well.
    pub fn reserved(&self) -> &[String] {
        &self.reserved
    }

    /// The claims header for a token that verified: its own base64url payload segment,
    /// forwarded without re-encoding. Built per request from the token the client sent rather
    /// than kept in the token cache, where it would be the largest part of every entry.
    pub fn claims_header(&self, token: &str) -> Option<(HeaderName, HeaderValue)> {
        let name = self.claims_header.as_ref()?;
        let payload = token.split('.').nth(1)?;
        let value = HeaderValue::from_str(payload).ok()?;
        Some((name.clone(), value))
    }

    /// Builds the identity headers for verified claims (all but the claims header, see
    /// [`Self::claims_header`]).
    pub fn build(&self, claims: VerifiedClaims) -> Identity {
        let org = claims::org(&claims.payload);
        let actor_id = claims::actor_sub(&claims.payload).map(str::to_owned);
        let mut headers = Vec::with_capacity(8 + self.claim_headers.len());
        let mut push = |name: &HeaderName, value: &str| match HeaderValue::from_str(value) {
            Ok(v) => headers.push((name.clone(), v)),
            Err(_) => {
                tracing::debug!(header = %name, "claim value not representable as a header; dropped")
            }
        };
        push(&self.user_id, &claims.sub);
        if let Some(sid) = &claims.sid {
            push(&self.session_id, sid);
        }
        if let Some(org) = &org {
            push(&self.org_id, &org.id);
            if let Some(role) = &org.role {
                push(&self.org_role, role);
            }
            if let Some(slug) = &org.slug {
                push(&self.org_slug, slug);
            }
            if !org.permissions.is_empty() {
                push(&self.org_permissions, &org.permissions.join(","));
            }
        }
        if let Some(actor) = &actor_id {
            push(&self.actor_id, actor);
        }
        for (path, name) in &self.claim_headers {
            if let Some(value) = claim_at(&claims.payload, path) {
                push(name, &render_claim(value));
            }
        }
        Identity {
            user_id: claims.sub,
            session_id: claims.sid,
            org,
            actor_id,
            iat: claims.iat,
            exp_ms: claims.exp_ms,
            claims: if self.keep_claims {
                claims.payload
            } else {
                Map::new()
            },
            headers,
            key_generation: 0,
        }
    }
}

/// A claim as a header value: strings as they are, arrays joined with commas, the rest as JSON.
fn render_claim(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verified(payload: Value) -> VerifiedClaims {
        let payload = payload.as_object().unwrap().clone();
        VerifiedClaims {
            sub: payload["sub"].as_str().unwrap().to_owned(),
            sid: payload
                .get("sid")
                .and_then(Value::as_str)
                .map(str::to_owned),
            iat: None,
            exp_ms: 0,
            payload,
        }
    }

    fn header<'a>(i: &'a Identity, name: &str) -> Option<&'a str> {
        i.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap())
    }

    #[test]
    fn v2_org_claims_become_headers() {
        let mut config = HeadersConfig::default();
        config
            .claims
            .insert("public_metadata.plan".into(), "X-Plan".into());
        config
            .claims
            .insert("public_metadata.tags".into(), "X-Tags".into());
        config.claims.insert("evil".into(), "X-Evil".into());
        let b = IdentityBuilder::new(&config);
        let id = b.build(verified(json!({
            "sub": "user_1", "sid": "sess_1", "v": 2, "fea": "o:dashboard,o:teams",
            "o": {"id": "org_1", "slg": "acme", "rol": "admin", "per": "manage,read", "fpm": "3,2"},
            "act": {"sub": "user_admin"},
            "public_metadata": {"plan": "pro", "tags": ["a", "b", 3]},
            "evil": "x\r\nX-User-Id: user_2"
        })));
        assert_eq!(header(&id, "x-user-id"), Some("user_1"));
        assert_eq!(header(&id, "x-session-id"), Some("sess_1"));
        assert_eq!(header(&id, "x-org-id"), Some("org_1"));
        assert_eq!(header(&id, "x-org-role"), Some("org:admin"));
        assert_eq!(header(&id, "x-org-slug"), Some("acme"));
        assert_eq!(
            header(&id, "x-org-permissions"),
            Some("org:dashboard:manage,org:dashboard:read,org:teams:read")
        );
        assert_eq!(header(&id, "x-actor-id"), Some("user_admin"));
        assert_eq!(header(&id, "x-clerk-claims"), None, "set per request");
        assert_eq!(
            b.claims_header("aGVhZA.cGF5bG9hZA.c2ln"),
            Some((
                HeaderName::from_static("x-clerk-claims"),
                HeaderValue::from_static("cGF5bG9hZA")
            ))
        );
        assert_eq!(header(&id, "x-plan"), Some("pro"));
        assert_eq!(header(&id, "x-tags"), Some("a,b,3"));
        assert_eq!(header(&id, "x-evil"), None, "CR/LF claims are dropped");
        assert_eq!(
            id.headers.iter().filter(|(n, _)| n == "x-user-id").count(),
            1
        );
    }

    #[test]
    fn reserved_names_are_normalised() {
        let mut config = HeadersConfig::default();
        config.reserved.push("X_Tenant".into());
        let b = IdentityBuilder::new(&config);
        assert!(b.reserved().contains(&"x-user-id".to_owned()));
        assert!(b.reserved().contains(&"x-tenant".to_owned()));
    }

    #[test]
    fn header_config_is_validated() {
        let c = HeadersConfig {
            user_id: "Authorization".into(),
            ..HeadersConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "headers.user_id");
        let c = HeadersConfig {
            org_id: "bad header".into(),
            ..HeadersConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "headers.org_id");
        let mut c = HeadersConfig::default();
        c.claims
            .insert("public_metadata.uid".into(), "x_user_id".into());
        assert_eq!(
            c.validate().unwrap_err().key,
            "headers.claims.public_metadata.uid",
            "a mapped claim may not overwrite a verified identity header"
        );
    }
}
