//! What is Clerk-specific: the `[clerk]` section (instance identity, key sources), publishable
//! keys and session-token claims.
//!
//! The section is resolved once at start-up into a [`Instance`]: the issuers a token must carry,
//! the cookie suffix, and where verification keys come from. Nothing on the request path
//! re-derives any of it.

pub(crate) mod api;
pub mod claims;
pub mod entitlements;
pub mod publishable_key;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::error::ConfigError;
use crate::secret::{Secret, is_secure_or_loopback};
use publishable_key::PublishableKey;

/// The Backend API version clerkgate speaks (the one `@clerk/backend` 3.25 pins).
pub const API_VERSION: &str = "2026-05-12";

/// `[clerk]`: which Clerk instance tokens must come from, and where its keys are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `CLERK_SECRET_KEY`: Backend API key, used to fetch the JWKS from `{api_url}/v1/jwks`.
    pub secret_key: Option<Secret>,
    /// `CLERK_PUBLISHABLE_KEY`: decoded into the Frontend API host; `iss` must be `https://<host>`.
    pub publishable_key: Option<String>,
    /// `CLERK_JWT_KEY`: PEM public key for networkless verification (no JWKS fetch at all).
    pub jwt_key: Option<String>,
    /// `CLERK_API_URL`: Backend API base.
    pub api_url: String,
    /// Overrides the JWKS location (e.g. the Frontend API's `/.well-known/jwks.json`).
    pub jwks_url: Option<String>,
    /// Expected `iss` when no publishable key is given (or in addition to it).
    pub issuer: Option<String>,
    /// More accepted issuers (a Frontend API proxy URL, satellite domains).
    pub extra_issuers: Vec<String>,
    /// `CLERK_AUTHORIZED_PARTIES`: exact origins allowed in `azp`.
    pub authorized_parties: Vec<String>,
    /// `CLERK_JWT_TTL`: seconds fetched keys stay fresh before a background refresh.
    pub jwks_ttl_seconds: u64,
    /// Floor between two fetches caused by unknown `kid`s (forged kids cost one fetch).
    pub jwks_min_refresh_interval_seconds: u64,
    /// How long the last good keys keep serving while the JWKS endpoint fails.
    pub jwks_max_stale_seconds: u64,
    /// Timeout of one JWKS fetch (connect plus body).
    pub jwks_fetch_timeout_seconds: u64,
    /// Largest JWKS body accepted.
    pub jwks_max_body_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            secret_key: None,
            publishable_key: None,
            jwt_key: None,
            api_url: "https://api.clerk.com".into(),
            jwks_url: None,
            issuer: None,
            extra_issuers: Vec::new(),
            authorized_parties: Vec::new(),
            jwks_ttl_seconds: 3600,
            jwks_min_refresh_interval_seconds: 30,
            jwks_max_stale_seconds: 86_400,
            jwks_fetch_timeout_seconds: 5,
            jwks_max_body_bytes: 256 * 1024,
        }
    }
}

/// Where verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A pinned PEM: ready at once, never fetched.
    Pem(String),
    /// A JWKS document, optionally fetched with the secret key as bearer.
    Jwks {
        url: reqwest::Url,
        bearer: Option<Secret>,
    },
}

/// The resolved instance: everything verification needs from `[clerk]`.
#[derive(Debug, Clone)]
pub struct Instance {
    pub issuers: Vec<String>,
    pub authorized_parties: Vec<String>,
    pub cookie_suffix: Option<String>,
    pub key_source: KeySource,
    pub api_url: reqwest::Url,
    pub secret_key: Option<Secret>,
}

impl Config {
    /// `jwks_ttl_seconds`.
    pub fn jwks_ttl(&self) -> Duration {
        Duration::from_secs(self.jwks_ttl_seconds)
    }

    /// `jwks_min_refresh_interval_seconds`.
    pub fn jwks_min_refresh_interval(&self) -> Duration {
        Duration::from_secs(self.jwks_min_refresh_interval_seconds)
    }

    /// `jwks_max_stale_seconds`.
    pub fn jwks_max_stale(&self) -> Duration {
        Duration::from_secs(self.jwks_max_stale_seconds)
    }

    /// `jwks_fetch_timeout_seconds`.
    pub fn jwks_fetch_timeout(&self) -> Duration {
        Duration::from_secs(self.jwks_fetch_timeout_seconds)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.resolve().map(|_| ())
    }

    fn publishable(&self) -> Result<Option<PublishableKey>, ConfigError> {
        self.publishable_key
            .as_deref()
            .map(|k| {
                PublishableKey::parse(k.trim())
                    .map_err(|e| ConfigError::new("clerk.publishable_key", e.to_string()))
            })
            .transpose()
    }

    /// Resolves the section into an [`Instance`], or names the key that prevents it.
    pub fn resolve(&self) -> Result<Instance, ConfigError> {
        let publishable = self.publishable()?;
        let api_url = parse_url("clerk.api_url", &self.api_url)?;
        if let Some(secret) = &self.secret_key {
            let s = secret.expose();
            if !(s.starts_with("sk_test_") || s.starts_with("sk_live_")) {
                return Err(ConfigError::new(
                    "clerk.secret_key",
                    "must start with sk_test_ or sk_live_",
                ));
            }
        }
        let mut issuers = Vec::new();
        if let Some(pk) = &publishable {
            issuers.push(pk.issuer());
        }
        if let Some(issuer) = &self.issuer {
            check_issuer("clerk.issuer", issuer)?;
            issuers.push(issuer.clone());
        }
        for (i, issuer) in self.extra_issuers.iter().enumerate() {
            check_issuer(&format!("clerk.extra_issuers[{i}]"), issuer)?;
            issuers.push(issuer.clone());
        }
        issuers.dedup();
        for (i, party) in self.authorized_parties.iter().enumerate() {
            if party.is_empty() || party.ends_with('/') || !party.contains("://") {
                return Err(ConfigError::new(
                    format!("clerk.authorized_parties[{i}]"),
                    "must be an exact origin such as https://app.example.com (no trailing slash)",
                ));
            }
        }

        let key_source = if let Some(pem) = &self.jwt_key {
            KeySource::Pem(pem.clone())
        } else if let Some(url) = &self.jwks_url {
            let url = parse_url("clerk.jwks_url", url)?;
            // The secret key only ever goes to the Backend API host.
            let bearer = if url.origin() == api_url.origin() {
                self.secret_key.clone()
            } else {
                None
            };
            KeySource::Jwks { url, bearer }
        } else if let Some(secret) = &self.secret_key {
            let url = api_url
                .join("v1/jwks")
                .map_err(|e| ConfigError::new("clerk.api_url", e.to_string()))?;
            KeySource::Jwks {
                url,
                bearer: Some(secret.clone()),
            }
        } else if let Some(pk) = &publishable {
            let url = parse_url(
                "clerk.publishable_key",
                &format!("https://{}/.well-known/jwks.json", pk.frontend_api),
            )?;
            KeySource::Jwks { url, bearer: None }
        } else {
            return Err(ConfigError::new(
                "clerk.secret_key",
                "no verification key source: set CLERK_SECRET_KEY, CLERK_JWT_KEY, \
                 CLERK_PUBLISHABLE_KEY or clerk.jwks_url",
            ));
        };
        if issuers.is_empty() {
            return Err(ConfigError::new(
                "clerk.publishable_key",
                "no expected issuer: set CLERK_PUBLISHABLE_KEY or clerk.issuer \
                 (clerkgate always checks `iss`, unlike the SDK)",
            ));
        }
        for (key, value) in [
            ("clerk.jwks_ttl_seconds", self.jwks_ttl_seconds),
            (
                "clerk.jwks_fetch_timeout_seconds",
                self.jwks_fetch_timeout_seconds,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        if self.jwks_max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "clerk.jwks_max_body_bytes",
                "must be at least 1024",
            ));
        }
        Ok(Instance {
            issuers,
            authorized_parties: self.authorized_parties.clone(),
            cookie_suffix: self
                .publishable_key
                .as_deref()
                .map(|k| publishable_key::cookie_suffix(k.trim())),
            key_source,
            api_url,
            secret_key: self.secret_key.clone(),
        })
    }
}

fn parse_url(key: &str, raw: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(raw).map_err(|e| ConfigError::new(key, e.to_string()))?;
    if !is_secure_or_loopback(&url) {
        return Err(ConfigError::new(
            key,
            "must be https (plain http is allowed only to a loopback address)",
        ));
    }
    Ok(url)
}

fn check_issuer(key: &str, issuer: &str) -> Result<(), ConfigError> {
    if !(issuer.starts_with("https://") || issuer.starts_with("http://")) || issuer.ends_with('/') {
        return Err(ConfigError::new(
            key,
            "must be a Frontend API URL such as https://clerk.example.com (no trailing slash)",
        ));
    }
    Ok(())
}
