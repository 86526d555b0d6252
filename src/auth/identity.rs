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

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::verify::VerifiedClaims;
use crate::clerk::claims::{self, Org};
use crate::config::error::ConfigError;

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
    /// The token type (`session_token`, `api_key`, `m2m_token`, `oauth_token`).
    pub token_type: String,
    /// The machine (`mch_…`) of an M2M token, or of an API key a machine owns.
    pub machine_id: String,
    /// The OAuth application (`client_id`) of an OAuth access token.
    pub client_id: String,
    /// The machine token's id (`ak_…`, `mt_…`, `oat_…`, or the JWT's `jti`).
    pub token_id: String,
    /// A machine token's scopes, comma-joined.
    pub scopes: String,
    /// An API key's name.
    pub token_name: String,
    /// A session token's active plans (the `pla` claim, verbatim).
    pub plans: String,
    /// A session token's features (the `fea` claim, verbatim).
    pub features: String,
    /// A session token's factor verification ages (the `fva` claim, as `first,second`).
    pub factor_age: String,
    /// Send `claims_header` at all.
    pub forward_claims: bool,
    /// More header names treated as reserved (stripped from clients like the ones above).
    pub reserved: Vec<String>,
    /// Claim path (dotted, e.g. `public_metadata.plan`) to header name. Arrays are joined with
    /// commas, objects sent as JSON.
    pub claims: BTreeMap<String, String>,
    /// Headers removed from every proxied request (any case, `_` as `-`): the ones some
    /// frameworks obey to serve another path or method than the one clerkgate authorised.
    pub strip_request: Vec<String>,
}

/// The default of `headers.strip_request`: headers some frameworks obey to re-route a request
/// (`X-Original-URL` and `X-Rewrite-URL` in Symfony, IIS and some Java stacks; `X-Forwarded-Uri`,
/// `X-Original-URI`, `X-Forwarded-Prefix` and `X-Forwarded-Path` in apps behind ingresses) or to
/// change its method (`X-HTTP-Method-Override` and its spellings in Express, Rails, Spring,
/// ASP.NET). Route rules are matched on the request's own method and path, so a client must not
/// be able to make the upstream serve another one.
pub const DEFAULT_STRIP_REQUEST: &[&str] = &[
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-forwarded-uri",
    "x-original-uri",
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-original-method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

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
            token_type: "X-Clerk-Token-Type".into(),
            machine_id: "X-Clerk-Machine-Id".into(),
            client_id: "X-Clerk-Client-Id".into(),
            token_id: "X-Clerk-Token-Id".into(),
            scopes: "X-Clerk-Scopes".into(),
            token_name: "X-Clerk-Token-Name".into(),
            plans: "X-Clerk-Plans".into(),
            features: "X-Clerk-Features".into(),
            factor_age: "X-Clerk-Factor-Age".into(),
            forward_claims: true,
            reserved: Vec::new(),
            claims: BTreeMap::new(),
            strip_request: DEFAULT_STRIP_REQUEST
                .iter()
                .map(|s| s.to_string())
                .collect(),
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
    fn named(&self) -> [(&'static str, &String); 17] {
        [
            ("headers.token_type", &self.token_type),
            ("headers.machine_id", &self.machine_id),
            ("headers.client_id", &self.client_id),
            ("headers.token_id", &self.token_id),
            ("headers.scopes", &self.scopes),
            ("headers.token_name", &self.token_name),
            ("headers.plans", &self.plans),
            ("headers.features", &self.features),
            ("headers.factor_age", &self.factor_age),
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
        for (i, name) in self.strip_request.iter().enumerate() {
            check(&format!("headers.strip_request[{i}]"), name)?;
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

/// A half-open byte range into [`Identity`]'s value blob; `ABSENT` marks a missing value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    const ABSENT: Span = Span {
        start: u32::MAX,
        end: u32::MAX,
    };

    fn is_present(self) -> bool {
        self.start != u32::MAX
    }
}

/// The identity values with a header of their own, in blob order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    UserId = 0,
    SessionId,
    OrgId,
    OrgRole,
    OrgSlug,
    OrgPermissions,
    ActorId,
}

const FIELDS: usize = 7;

/// A verified session: who, which session and organization, and the values of the headers to
/// send.
///
/// Kept in the token cache for every verified token, so it is compact: every value lives in
/// one shared byte blob and the fields are ranges into it; the header names live once in the
/// [`IdentityBuilder`]. Inserting the headers slices the blob (a reference count, no copy).
/// About 250 bytes for a session without an organization, against 1,000 when each value was
/// its own `String` and `HeaderValue`.
#[derive(Debug)]
pub struct Identity {
    /// User id, session id, org id, role, slug, comma-joined permissions, actor id, then the
    /// rendered `[headers.claims]` values, back to back.
    blob: Bytes,
    fields: [Span; FIELDS],
    /// Bit per [`Field`]: the value is a valid header value (no control bytes).
    headerable: u8,
    pub iat: Option<i64>,
    pub exp_ms: u64,
    /// What only some configurations need, boxed so that the common identity stays small.
    extra: Option<Box<Extra>>,
    /// The key-store generation the token was verified under (see `KeyStore::generation`).
    pub key_generation: u64,
}

#[derive(Debug, Default)]
struct Extra {
    /// One span per `[headers.claims]` mapping of the builder, in its order; only valid
    /// header values are kept.
    mapped: Box<[Span]>,
    /// The decoded claims, for route claim requirements; `None` unless a route has some (see
    /// [`IdentityBuilder::keep_claims`]).
    claims: Option<Map<String, Value>>,
}

/// The values an [`Identity`] is made of (tests and [`IdentityBuilder::build`]).
#[derive(Debug, Default)]
pub struct IdentityParts<'a> {
    pub user_id: &'a str,
    pub session_id: Option<&'a str>,
    pub org: Option<&'a Org>,
    pub actor_id: Option<&'a str>,
    /// Rendered `[headers.claims]` values, one per mapping (`None`: claim absent).
    pub mapped: Vec<Option<String>>,
    pub iat: Option<i64>,
    pub exp_ms: u64,
    pub claims: Option<Map<String, Value>>,
}

/// The active organization of an [`Identity`], borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgRef<'a> {
    pub id: &'a str,
    pub slug: Option<&'a str>,
    /// Role key with the `org:` prefix.
    pub role: Option<&'a str>,
    permissions: &'a str,
}

impl<'a> OrgRef<'a> {
    /// Full permission keys, e.g. `org:dashboard:read`.
    pub fn permissions(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.permissions.split(',').filter(|p| !p.is_empty())
    }

    pub fn has_permission(&self, wanted: &str) -> bool {
        self.permissions().any(|p| p == wanted)
    }
}

fn header_safe(value: &str) -> bool {
    // HeaderValue's own rule: visible bytes, space and tab; no CR, LF or other controls.
    value
        .bytes()
        .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

impl Identity {
    pub fn new(parts: IdentityParts<'_>) -> Identity {
        // A permission key with a comma would make the joined list ambiguous (for the header
        // and for route checks): such keys are dropped, which grants less, never more.
        let permissions = parts.org.map(|org| {
            org.permissions
                .iter()
                .filter(|p| {
                    let ok = !p.contains(',');
                    if !ok {
                        tracing::debug!("organization permission containing a comma; dropped");
                    }
                    ok
                })
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",")
        });
        let org = parts.org;
        let values: [Option<&str>; FIELDS] = [
            Some(parts.user_id),
            parts.session_id,
            org.map(|o| o.id.as_str()),
            org.and_then(|o| o.role.as_deref()),
            org.and_then(|o| o.slug.as_deref()),
            permissions.as_deref().filter(|p| !p.is_empty()),
            parts.actor_id,
        ];
        let len = values.iter().flatten().map(|v| v.len()).sum::<usize>()
            + parts
                .mapped
                .iter()
                .flatten()
                .map(String::len)
                .sum::<usize>();
        let mut blob = Vec::with_capacity(len);
        let mut push = |value: &str| {
            let start = blob.len() as u32;
            blob.extend_from_slice(value.as_bytes());
            Span {
                start,
                end: blob.len() as u32,
            }
        };
        let mut fields = [Span::ABSENT; FIELDS];
        let mut headerable = 0u8;
        for (i, value) in values.iter().enumerate() {
            if let Some(value) = value {
                fields[i] = push(value);
                if header_safe(value) {
                    headerable |= 1 << i;
                } else {
                    tracing::debug!(
                        field = i,
                        "claim value not representable as a header; not sent"
                    );
                }
            }
        }
        let mapped: Box<[Span]> = parts
            .mapped
            .iter()
            .map(|value| match value {
                Some(v) if header_safe(v) => push(v),
                Some(_) => {
                    tracing::debug!("mapped claim not representable as a header; dropped");
                    Span::ABSENT
                }
                None => Span::ABSENT,
            })
            .collect();
        Identity {
            blob: Bytes::from(blob),
            fields,
            headerable,
            iat: parts.iat,
            exp_ms: parts.exp_ms,
            extra: (mapped.iter().any(|s| s.is_present()) || parts.claims.is_some()).then(|| {
                Box::new(Extra {
                    mapped,
                    claims: parts.claims,
                })
            }),
            key_generation: 0,
        }
    }

    fn text(&self, span: Span) -> Option<&str> {
        if !span.is_present() {
            return None;
        }
        // Every span was cut from a `&str` at a value boundary.
        std::str::from_utf8(&self.blob[span.start as usize..span.end as usize]).ok()
    }

    fn field(&self, f: Field) -> Option<&str> {
        self.text(self.fields[f as usize])
    }

    /// The user id (`sub`).
    pub fn user_id(&self) -> &str {
        self.field(Field::UserId).unwrap_or_default()
    }

    /// The facts revocation is checked against (session, user, issue time in ms).
    pub fn session_ref(&self) -> crate::revocations::SessionRef<'_> {
        crate::revocations::SessionRef {
            sid: self.session_id(),
            user_id: self.user_id(),
            issued_at_ms: self.iat.map(|s| (s.max(0) as u64).saturating_mul(1000)),
        }
    }

    /// The session id (`sid`), when the token has one.
    pub fn session_id(&self) -> Option<&str> {
        self.field(Field::SessionId)
    }

    /// The impersonator's user id (`act.sub`).
    pub fn actor_id(&self) -> Option<&str> {
        self.field(Field::ActorId)
    }

    /// The active organization, v1 and v2 claims normalised.
    pub fn org(&self) -> Option<OrgRef<'_>> {
        Some(OrgRef {
            id: self.field(Field::OrgId)?,
            slug: self.field(Field::OrgSlug),
            role: self.field(Field::OrgRole),
            permissions: self.field(Field::OrgPermissions).unwrap_or_default(),
        })
    }

    /// Still within `exp` plus skew at `now_ms`.
    pub fn usable_at(&self, now_ms: u64, skew_ms: u64) -> bool {
        self.exp_ms.saturating_add(skew_ms) > now_ms
    }

    /// The value at a dotted claim path (only when the builder kept claims).
    pub fn claim(&self, path: &str) -> Option<&Value> {
        claim_at(self.extra.as_ref()?.claims.as_ref()?, path)
    }

    fn value(&self, span: Span) -> Option<HeaderValue> {
        if !span.is_present() {
            return None;
        }
        // Validated when built; the slice shares the blob.
        HeaderValue::from_maybe_shared(self.blob.slice(span.start as usize..span.end as usize)).ok()
    }

    /// Inserts every identity header (names from `builder`, the one that built this identity),
    /// replacing any header of the same name.
    pub fn insert_headers(&self, builder: &IdentityBuilder, h: &mut HeaderMap) {
        for (i, name) in builder.field_names().iter().enumerate() {
            if self.headerable & (1 << i) != 0
                && let Some(value) = self.value(self.fields[i])
            {
                h.insert(name.clone(), value);
            }
        }
        let mapped = self.extra.as_ref().map_or(&[][..], |e| &e.mapped);
        for (span, (_, name)) in mapped.iter().zip(&builder.claim_headers) {
            if let Some(value) = self.value(*span) {
                h.insert(name.clone(), value);
            }
        }
    }

    /// The identity headers as pairs (what [`Self::insert_headers`] inserts).
    #[cfg(test)]
    fn headers(&self, builder: &IdentityBuilder) -> Vec<(HeaderName, HeaderValue)> {
        let mut h = HeaderMap::new();
        self.insert_headers(builder, &mut h);
        h.into_iter()
            .filter_map(|(name, value)| Some((name?, value)))
            .collect()
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
    /// Header name per [`Field`], in its order.
    names: [HeaderName; FIELDS],
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
            names: [
                header_name(&config.user_id),
                header_name(&config.session_id),
                header_name(&config.org_id),
                header_name(&config.org_role),
                header_name(&config.org_slug),
                header_name(&config.org_permissions),
                header_name(&config.actor_id),
            ],
            claims_header: config
                .forward_claims
                .then(|| header_name(&config.claims_header)),
            // The entitlement claims travel like `[headers.claims]` mappings, first.
            claim_headers: [
                ("pla", &config.plans),
                ("fea", &config.features),
                ("fva", &config.factor_age),
            ]
            .into_iter()
            .map(|(path, name)| (path.to_owned(), header_name(name)))
            .chain(
                config
                    .claims
                    .iter()
                    .map(|(path, name)| (path.clone(), header_name(name))),
            )
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

    /// The identity header names, one per [`Field`].
    fn field_names(&self) -> &[HeaderName; FIELDS] {
        &self.names
    }

    /// Builds the identity for verified claims: its values and, through
    /// [`Identity::insert_headers`], every identity header but the claims header (see
    /// [`Self::claims_header`]).
    pub fn build(&self, claims: VerifiedClaims) -> Identity {
        let org = claims::org(&claims.payload);
        let mapped = self
            .claim_headers
            .iter()
            .map(|(path, _)| claim_at(&claims.payload, path).map(render_claim))
            .collect();
        let actor_id = claims::actor_sub(&claims.payload).map(str::to_owned);
        Identity::new(IdentityParts {
            user_id: &claims.sub,
            session_id: claims.sid.as_deref(),
            org: org.as_ref(),
            actor_id: actor_id.as_deref(),
            mapped,
            iat: claims.iat,
            exp_ms: claims.exp_ms,
            claims: self.keep_claims.then_some(claims.payload),
        })
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

    fn header(b: &IdentityBuilder, i: &Identity, name: &str) -> Option<String> {
        let headers = i.headers(b);
        let mut found = headers.iter().filter(|(n, _)| n.as_str() == name);
        let value = found.next().map(|(_, v)| v.to_str().unwrap().to_owned());
        assert!(found.next().is_none(), "{name} once");
        value
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
        assert_eq!(header(&b, &id, "x-user-id").as_deref(), Some("user_1"));
        assert_eq!(header(&b, &id, "x-session-id").as_deref(), Some("sess_1"));
        assert_eq!(header(&b, &id, "x-org-id").as_deref(), Some("org_1"));
        assert_eq!(header(&b, &id, "x-org-role").as_deref(), Some("org:admin"));
        assert_eq!(header(&b, &id, "x-org-slug").as_deref(), Some("acme"));
        assert_eq!(
            header(&b, &id, "x-org-permissions").as_deref(),
            Some("org:dashboard:manage,org:dashboard:read,org:teams:read")
        );
        assert_eq!(header(&b, &id, "x-actor-id").as_deref(), Some("user_admin"));
        assert_eq!(
            header(&b, &id, "x-clerk-claims").as_deref(),
            None,
            "set per request"
        );
        assert_eq!(
            b.claims_header("aGVhZA.cGF5bG9hZA.c2ln"),
            Some((
                HeaderName::from_static("x-clerk-claims"),
                HeaderValue::from_static("cGF5bG9hZA")
            ))
        );
        assert_eq!(header(&b, &id, "x-plan").as_deref(), Some("pro"));
        assert_eq!(header(&b, &id, "x-tags").as_deref(), Some("a,b,3"));
        assert_eq!(
            header(&b, &id, "x-evil").as_deref(),
            None,
            "CR/LF claims are dropped"
        );
        assert_eq!(id.user_id(), "user_1");
        assert_eq!(id.session_id(), Some("sess_1"));
        assert_eq!(id.actor_id(), Some("user_admin"));
        let org = id.org().expect("active org");
        assert_eq!(
            (org.id, org.slug, org.role),
            ("org_1", Some("acme"), Some("org:admin"))
        );
        assert!(org.has_permission("org:teams:read"));
        assert!(!org.has_permission("org:teams"), "whole keys only");
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
