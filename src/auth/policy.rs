//! Route rules: which paths need a session, and what the session must hold.
//!
//! Rules are `[[routes]]` entries, matched in order against the *normalised* path
//! ([`crate::proxy::path`]), first match wins; a path no rule matches requires a session.
//! Patterns are exact (`/health`) or a prefix ending in `/**` (`/public/**` matches `/public`
//! and everything below it, never `/publicity`). Requirements are all checked (AND) and any
//! indeterminate input fails closed: no active organization fails an org requirement, a
//! missing claim fails a claim requirement.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::identity::Identity;
use super::machine::{Accepts, Principal};
use crate::clerk::entitlements::{self, Reverification};
use crate::config::error::ConfigError;

/// Whether a route needs a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// A valid session token is required (the default for every path).
    #[default]
    Required,
    /// A valid token adds identity headers; no token (or a rejected one) goes through
    /// anonymously, with every identity header still stripped.
    Optional,
    /// No verification at all; identity headers are still stripped.
    Public,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// `/exact/path` or `/prefix/**`.
    pub path: String,
    /// The methods the rule applies to; empty = all. A rule listing `GET` also covers `HEAD`
    /// (the same resource, headers only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    pub auth: AuthMode,
    /// The active organization role required (`org:admin`, or `admin`).
    pub org_role: Option<String>,
    /// Organization permissions all required (`org:<feature>:<permission>`).
    pub org_permissions: Vec<String>,
    /// The active organization required.
    pub org_id: Option<String>,
    /// Claim path to the exact JSON value it must hold.
    pub claims: BTreeMap<String, Value>,
    /// The token types taken (`acceptsToken`): a list, or `"any"`. Default `["session_token"]`.
    pub accepts: Accepts,
    /// Machine tokens: every listed scope must be present.
    pub scopes: Vec<String>,
    /// Session tokens: any of these plans (`has({ plan })`).
    pub plans: Vec<String>,
    /// Session tokens: all of these features (`has({ feature })`).
    pub features: Vec<String>,
    /// Session tokens: a recent enough factor verification (`has({ reverification })`).
    pub reverification: Option<Reverification>,
}

impl RouteConfig {
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') {
            return Err(ConfigError::new(format!("{key}.path"), "must start with /"));
        }
        let body = self.path.strip_suffix("/**").unwrap_or(&self.path);
        if body.contains('*') {
            return Err(ConfigError::new(
                format!("{key}.path"),
                "only a trailing /** wildcard is supported",
            ));
        }
        if body.split('/').any(|s| s == "." || s == "..") || body.contains("//") {
            return Err(ConfigError::new(
                format!("{key}.path"),
                "must be a normalised path (no dot segments or empty segments)",
            ));
        }
        for (i, m) in self.methods.iter().enumerate() {
            let valid = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
            if !valid {
                return Err(ConfigError::new(
                    format!("{key}.methods[{i}]"),
                    "must be an upper-case HTTP method such as \"GET\"",
                ));
            }
        }
        let has_requirements = self.org_role.is_some()
            || !self.org_permissions.is_empty()
            || self.org_id.is_some()
            || !self.claims.is_empty()
            || !self.scopes.is_empty()
            || self.has_entitlements();
        if self.accepts.is_empty() {
            return Err(ConfigError::new(
                format!("{key}.accepts"),
                "must list at least one token type (or be \"any\")",
            ));
        }
        for (field, values) in [("plans", &self.plans), ("features", &self.features)] {
            for (i, v) in values.iter().enumerate() {
                if v.is_empty() || v.contains(',') {
                    return Err(ConfigError::new(
                        format!("{key}.{field}[{i}]"),
                        "must be a non-empty name without commas",
                    ));
                }
                if let Some(scope) = entitlements::invalid_scope(v) {
                    return Err(ConfigError::new(
                        format!("{key}.{field}[{i}]"),
                        format!("unknown scope {scope:?} (o, org, organization, u or user)"),
                    ));
                }
            }
        }
        if self.scopes.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                format!("{key}.scopes"),
                "scopes must not be empty strings",
            ));
        }
        if has_requirements && self.auth != AuthMode::Required {
            return Err(ConfigError::new(
                format!("{key}.auth"),
                "requirements need auth = \"required\"",
            ));
        }
        Ok(())
    }

    /// Plan, feature or reverification rules, which read the `pla`, `fea` and `fva` claims.
    pub fn has_entitlements(&self) -> bool {
        !self.plans.is_empty() || !self.features.is_empty() || self.reverification.is_some()
    }

    /// Whether verified identities must keep their decoded claims for this rule.
    pub fn needs_claims(&self) -> bool {
        !self.claims.is_empty() || self.has_entitlements()
    }
}

/// `value` without any leading run of `org:`.
fn strip_org(mut value: &str) -> &str {
    while let Some(rest) = value.strip_prefix("org:") {
        value = rest;
    }
    value
}

/// The SDK's `prefixWithOrg`: `value.replace(/^(org:)*/, "org:")`.
fn prefix_with_org(value: &str) -> String {
    format!("org:{}", strip_org(value))
}

/// Why a verified session may not use a route (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no active organization")]
    NoActiveOrg,
    #[error("organization role not allowed")]
    OrgRole,
    #[error("organization permission missing")]
    OrgPermission,
    #[error("wrong organization")]
    OrgId,
    #[error("claim requirement not met")]
    Claim,
    #[error("none of the route's plans")]
    PlanMissing,
    #[error("a feature of the route is missing")]
    FeatureMissing,
    #[error("a scope of the route is missing")]
    ScopeMissing,
    #[error("M2M token not issued to this machine")]
    MachineScopeMissing,
    /// Answered with Clerk's reverification body, which clerk-js acts on.
    #[error("reverification needed")]
    Reverification(Reverification),
}

impl PolicyError {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::NoActiveOrg => "org-required",
            Self::OrgRole => "org-role-mismatch",
            Self::OrgPermission => "org-permission-missing",
            Self::OrgId => "org-id-mismatch",
            Self::Claim => "claim-mismatch",
            Self::PlanMissing => "plan-missing",
            Self::FeatureMissing => "feature-missing",
            Self::ScopeMissing => "scope-missing",
            Self::MachineScopeMissing => "machine-scope-missing",
            Self::Reverification(_) => "reverification-error",
        }
    }
}

enum Pattern {
    Exact(String),
    /// The part before `/**`; matches itself and anything below.
    Prefix(String),
}

impl Pattern {
    /// `fold` compares ASCII case-insensitively.
    fn matches(&self, path: &str, fold: bool) -> bool {
        let eq = |a: &str, b: &str| {
            if fold {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        match self {
            Self::Exact(p) => eq(path, p),
            Self::Prefix(p) if p.is_empty() => true,
            Self::Prefix(p) => {
                path.len() >= p.len()
                    && path.is_char_boundary(p.len())
                    && eq(&path[..p.len()], p)
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
        }
    }

    fn has_uppercase(&self) -> bool {
        match self {
            Self::Exact(p) | Self::Prefix(p) => p.bytes().any(|b| b.is_ascii_uppercase()),
        }
    }
}

/// A compiled rule.
pub struct Route {
    pattern: Pattern,
    /// Empty: every method.
    methods: Vec<http::Method>,
    pub auth: AuthMode,
    org_role: Option<String>,
    org_permissions: Vec<String>,
    org_id: Option<String>,
    claims: Vec<(String, Value)>,
    accepts: Accepts,
    scopes: Vec<String>,
    plans: Vec<String>,
    features: Vec<String>,
    reverification: Option<Reverification>,
}

impl Route {
    fn new(c: &RouteConfig) -> Self {
        let pattern = match c.path.strip_suffix("/**") {
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(c.path.clone()),
        };
        let mut methods: Vec<http::Method> = c
            .methods
            .iter()
            .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
            .collect();
        if methods.contains(&http::Method::GET) && !methods.contains(&http::Method::HEAD) {
            methods.push(http::Method::HEAD);
        }
        Self {
            pattern,
            methods,
            auth: c.auth,
            // `prefixWithOrg` of the SDK: any run of `org:` prefixes becomes exactly one.
            org_role: c.org_role.as_deref().map(prefix_with_org),
            org_permissions: c
                .org_permissions
                .iter()
                .map(|p| prefix_with_org(p))
                .collect(),
            org_id: c.org_id.clone(),
            claims: c
                .claims
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            accepts: c.accepts,
            scopes: c.scopes.clone(),
            plans: c.plans.clone(),
            features: c.features.clone(),
            reverification: c.reverification,
        }
    }

    /// The session-only requirements, in the order a session is checked; a machine token
    /// fails the first one present (its `has()` is always false).
    fn session_requirement(&self) -> Option<PolicyError> {
        if self.org_role.is_some() || !self.org_permissions.is_empty() || self.org_id.is_some() {
            Some(PolicyError::NoActiveOrg)
        } else if !self.claims.is_empty() {
            Some(PolicyError::Claim)
        } else if !self.plans.is_empty() {
            Some(PolicyError::PlanMissing)
        } else if !self.features.is_empty() {
            Some(PolicyError::FeatureMissing)
        } else {
            self.reverification.map(PolicyError::Reverification)
        }
    }

    /// Checks the route's requirements against a verified machine token: its scopes; and a
    /// route with session requirements (organization, claims, plans, features,
    /// reverification) is never passed by a machine token.
    pub fn authorize_machine(&self, principal: &Principal) -> Result<(), PolicyError> {
        if !principal.machine_scope_ok {
            return Err(PolicyError::MachineScopeMissing);
        }
        if let Some(e) = self.session_requirement() {
            return Err(e);
        }
        if !principal.has_scopes(&self.scopes) {
            return Err(PolicyError::ScopeMissing);
        }
        Ok(())
    }

    /// Checks the route's requirements against a verified identity.
    pub fn authorize(&self, identity: &Identity) -> Result<(), PolicyError> {
        let needs_org =
            self.org_role.is_some() || !self.org_permissions.is_empty() || self.org_id.is_some();
        if needs_org {
            let org = identity.org().ok_or(PolicyError::NoActiveOrg)?;
            if let Some(id) = &self.org_id
                && org.id != id
            {
                return Err(PolicyError::OrgId);
            }
            // Compared as the SDK does, `org:` prefixes normalised on both sides (v1 tokens may
            // carry the role without its prefix).
            if let Some(role) = &self.org_role
                && org.role.map(strip_org) != Some(strip_org(role))
            {
                return Err(PolicyError::OrgRole);
            }
            if !self.org_permissions.iter().all(|p| org.has_permission(p)) {
                return Err(PolicyError::OrgPermission);
            }
        }
        for (path, want) in &self.claims {
            if identity.claim(path) != Some(want) {
                return Err(PolicyError::Claim);
            }
        }
        // `has()` on the v2 claims: any of the plans, all of the features, then freshness.
        if !self.plans.is_empty()
            && !self
                .plans
                .iter()
                .any(|p| entitlements::has_scoped(identity.claim("pla"), p))
        {
            return Err(PolicyError::PlanMissing);
        }
        if !self
            .features
            .iter()
            .all(|f| entitlements::has_scoped(identity.claim("fea"), f))
        {
            return Err(PolicyError::FeatureMissing);
        }
        if let Some(r) = self.reverification
            && !r.satisfied_by(identity.claim("fva"))
        {
            return Err(PolicyError::Reverification(r));
        }
        Ok(())
    }
}

/// All rules, in order, plus the default.
pub struct Policy {
    routes: Vec<Route>,
    default: Route,
    /// Some pattern has upper-case letters, so case folding can change a match.
    patterns_have_uppercase: bool,
}

/// The rule(s) that apply to a path.
///
/// Many upstreams route case-insensitively (Express by default, IIS, ASP.NET), so `/ADMIN/x` may
/// reach the handler of `/admin/**`. Matching only case-sensitively would skip that rule's
/// requirements; matching only case-insensitively could make a public rule cover a different
/// resource on a case-sensitive upstream. So both matches are taken and the stricter wins:
/// the strictest auth mode, and the requirements of both.
pub struct RouteMatch<'a> {
    pub auth: AuthMode,
    /// The token types both matching rules accept.
    pub accepts: Accepts,
    exact: &'a Route,
    folded: Option<&'a Route>,
}

impl RouteMatch<'_> {
    pub fn authorize(&self, identity: &Identity) -> Result<(), PolicyError> {
        self.exact.authorize(identity)?;
        match self.folded {
            Some(r) => r.authorize(identity),
            None => Ok(()),
        }
    }

    /// [`Route::authorize_machine`] on both matching rules.
    pub fn authorize_machine(&self, principal: &Principal) -> Result<(), PolicyError> {
        self.exact.authorize_machine(principal)?;
        match self.folded {
            Some(r) => r.authorize_machine(principal),
            None => Ok(()),
        }
    }
}

fn strictness(mode: AuthMode) -> u8 {
    match mode {
        AuthMode::Public => 0,
        AuthMode::Optional => 1,
        AuthMode::Required => 2,
    }
}

impl Policy {
    pub fn new(routes: &[RouteConfig]) -> Self {
        let routes: Vec<Route> = routes.iter().map(Route::new).collect();
        Self {
            patterns_have_uppercase: routes.iter().any(|r| r.pattern.has_uppercase()),
            routes,
            default: Route::new(&RouteConfig {
                path: "/**".into(),
                ..RouteConfig::default()
            }),
        }
    }

    fn first(&self, path: &str, method: Option<&http::Method>, fold: bool) -> &Route {
        self.routes
            .iter()
            .find(|r| {
                (r.methods.is_empty() || method.is_some_and(|m| r.methods.contains(m)))
                    && r.pattern.matches(path, fold)
            })
            .unwrap_or(&self.default)
    }

    /// The rules for a normalised path, whatever the method: rules restricted to some methods
    /// never match.
    pub fn route(&self, path: &str) -> RouteMatch<'_> {
        self.route_for(path, None)
    }

    /// The rules for a normalised path and a request method (`None`: unknown, so only rules
    /// without `methods` apply).
    pub fn route_for(&self, path: &str, method: Option<&http::Method>) -> RouteMatch<'_> {
        let exact = self.first(path, method, false);
        // Folding can only change the result when some letter has two cases in play.
        let folded = if self.patterns_have_uppercase || path.bytes().any(|b| b.is_ascii_uppercase())
        {
            Some(self.first(path, method, true)).filter(|r| !std::ptr::eq(*r, exact))
        } else {
            None
        };
        let auth = match folded {
            Some(f) if strictness(f.auth) > strictness(exact.auth) => f.auth,
            _ => exact.auth,
        };
        RouteMatch {
            auth,
            accepts: match folded {
                Some(f) => exact.accepts.intersect(f.accepts),
                None => exact.accepts,
            },
            exact,
            folded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::IdentityParts;
    use crate::clerk::claims::Org;
    use serde_json::{Map, json};

    fn policy(toml: &str) -> Policy {
        let c = crate::config::Config::from_toml(&format!(
            "[clerk]\njwt_key = \"x\"\nissuer = \"https://i.example\"\n{toml}"
        ));
        // jwt_key "x" is only validated when keys are loaded, so config parsing succeeds.
        Policy::new(&c.unwrap().routes)
    }

    fn identity(org: Option<Org>, claims: serde_json::Value) -> Identity {
        Identity::new(IdentityParts {
            user_id: "user_1",
            org: org.as_ref(),
            claims: Some(claims.as_object().cloned().unwrap_or_else(Map::new)),
            ..IdentityParts::default()
        })
    }

    #[test]
    fn first_match_wins_and_default_is_required() {
        let p = policy(
            r#"
            [[routes]]
            path = "/public/**"
            auth = "public"
            [[routes]]
            path = "/health"
            auth = "public"
            [[routes]]
            path = "/feed/**"
            auth = "optional"
            "#,
        );
        let mode = |path: &str| p.route(path).auth;
        assert_eq!(mode("/public"), AuthMode::Public);
        assert_eq!(mode("/public/x/y"), AuthMode::Public);
        assert_eq!(mode("/publicity"), AuthMode::Required);
        assert_eq!(mode("/health"), AuthMode::Public);
        assert_eq!(mode("/health/x"), AuthMode::Required);
        assert_eq!(mode("/feed/1"), AuthMode::Optional);
        assert_eq!(mode("/admin"), AuthMode::Required);
    }

    #[test]
    fn case_variants_get_the_stricter_of_both_matches() {
        let p = policy(
            r#"
            [[routes]]
            path = "/public/**"
            auth = "public"
            [[routes]]
            path = "/admin/**"
            org_role = "admin"
            "#,
        );
        // /ADMIN reaches /admin on a case-insensitive upstream: the admin rule applies.
        let member = Org {
            id: "org_1".into(),
            slug: None,
            role: Some("org:member".into()),
            permissions: vec![],
        };
        let r = p.route("/ADMIN/x");
        assert_eq!(r.auth, AuthMode::Required);
        assert_eq!(
            r.authorize(&identity(Some(member), json!({}))),
            Err(PolicyError::OrgRole)
        );
        // /PUBLIC is public only if a case-insensitive upstream agrees; the exact match (the
        // default rule) requires a session, and the stricter wins.
        assert_eq!(p.route("/PUBLIC/x").auth, AuthMode::Required);
        assert_eq!(p.route("/public/x").auth, AuthMode::Public);
    }

    #[test]
    fn requirements_fail_closed() {
        let p = policy(
            r#"
            [[routes]]
            path = "/admin/**"
            org_role = "admin"
            org_permissions = ["org:billing:manage"]
            claims = { "public_metadata.tier" = "gold" }
            "#,
        );
        let r = p.route("/admin/x");
        let r = &r;
        let admin = Org {
            id: "org_1".into(),
            slug: None,
            role: Some("org:admin".into()),
            permissions: vec!["org:billing:manage".into()],
        };
        let gold = json!({"public_metadata": {"tier": "gold"}});
        assert_eq!(
            r.authorize(&identity(None, gold.clone())),
            Err(PolicyError::NoActiveOrg)
        );
        let member = Org {
            role: Some("org:member".into()),
            ..admin.clone()
        };
        assert_eq!(
            r.authorize(&identity(Some(member), gold.clone())),
            Err(PolicyError::OrgRole)
        );
        let no_perm = Org {
            permissions: vec![],
            ..admin.clone()
        };
        assert_eq!(
            r.authorize(&identity(Some(no_perm), gold.clone())),
            Err(PolicyError::OrgPermission)
        );
        assert_eq!(
            r.authorize(&identity(Some(admin.clone()), json!({}))),
            Err(PolicyError::Claim)
        );
        assert_eq!(r.authorize(&identity(Some(admin), gold)), Ok(()));
    }

    #[test]
    fn methods_restrict_a_rule_and_get_covers_head() {
        let p = policy(
            r#"
            [[routes]]
            path = "/api/**"
            methods = ["GET", "POST"]
            auth = "public"
            [[routes]]
            path = "/api/**"
            auth = "optional"
            "#,
        );
        let mode = |m: &str| p.route_for("/api/x", Some(&m.parse().unwrap())).auth;
        assert_eq!(mode("GET"), AuthMode::Public);
        assert_eq!(mode("HEAD"), AuthMode::Public);
        assert_eq!(mode("POST"), AuthMode::Public);
        assert_eq!(mode("DELETE"), AuthMode::Optional);
        assert_eq!(p.route("/api/x").auth, AuthMode::Optional, "unknown method");
        assert_eq!(
            mode("get"),
            AuthMode::Optional,
            "methods are case-sensitive"
        );
    }

    #[test]
    fn org_prefixes_are_normalised_like_prefix_with_org() {
        let p = policy(
            r#"
            [[routes]]
            path = "/a/**"
            org_role = "org:org:admin"
            org_permissions = ["dashboard:read"]
            "#,
        );
        // A v1 token may carry the role without its prefix; the SDK compares both prefixed.
        let org = Org {
            id: "org_1".into(),
            slug: None,
            role: Some("admin".into()),
            permissions: vec!["org:dashboard:read".into()],
        };
        assert_eq!(
            p.route("/a").authorize(&identity(Some(org), json!({}))),
            Ok(())
        );
    }

    #[test]
    fn bad_routes_are_config_errors() {
        for (toml, key) in [
            ("[[routes]]\npath = \"admin\"", "routes[0].path"),
            ("[[routes]]\npath = \"/a/*/b\"", "routes[0].path"),
            ("[[routes]]\npath = \"/a/../b\"", "routes[0].path"),
            (
                "[[routes]]\npath = \"/a\"\nmethods = [\"GET\", \"get\"]",
                "routes[0].methods[1]",
            ),
            (
                "[[routes]]\npath = \"/a\"\nauth = \"public\"\norg_role = \"admin\"",
                "routes[0].auth",
            ),
        ] {
            let err = crate::config::Config::from_toml(&format!(
                "[clerk]\njwt_key = \"x\"\nissuer = \"https://i.example\"\n{toml}"
            ))
            .unwrap_err();
            assert_eq!(err.key, key, "{toml}");
        }
    }
}
