//! Configuration: layering, composition and cross-field validation.
//!
//! Layers, lowest first: built-in defaults (documented key by key in `config/clerkgate.toml`),
//! the TOML file, the `CLERK_*` variables Clerk users already know, then `CLERKGATE_<SECTION>__<KEY>`
//! for any key. Each module owns its section's struct; this module only composes them. Every
//! struct denies unknown fields: a misspelled key in an auth proxy silently disables a check.
//!
//! Loading is pure: the environment is passed in as pairs, so tests never mutate the process
//! environment.

use std::path::Path;

use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
    value::Value,
};
use serde::{Deserialize, Serialize};

pub(crate) mod error;

pub use crate::secret::{Secret, is_secure_or_loopback};
pub use error::ConfigError;

use crate::{
    admin, auth, browser, clerk, local_api, proxy, revocations, shutdown, telemetry, webhook,
};

/// The whole configuration, as composed from the sections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: proxy::Config,
    pub admin: admin::Config,
    pub clerk: clerk::Config,
    pub auth: auth::Config,
    pub headers: auth::identity::HeadersConfig,
    pub routes: Vec<auth::policy::RouteConfig>,
    pub browser: browser::Config,
    pub cors: browser::cors::Config,
    pub webhooks: webhook::Config,
    pub sessions: revocations::Config,
    pub fleet: crate::fleet::Config,
    pub local_api: local_api::Config,
    pub machine: auth::machine::Config,
    pub log: telemetry::LogConfig,
    pub tracing: telemetry::otel::Config,
    pub shutdown: shutdown::Config,
}

/// The `CLERK_*` variables and where each lands. All are taken as plain strings except the
/// ones with a parser, so a secret that happens to look like a number stays a string.
const CLERK_VARIABLES: &[(&str, &str, ClerkVar)] = &[
    ("CLERK_SECRET_KEY", "clerk.secret_key", ClerkVar::Text),
    (
        "CLERK_PUBLISHABLE_KEY",
        "clerk.publishable_key",
        ClerkVar::Text,
    ),
    ("CLERK_JWT_KEY", "clerk.jwt_key", ClerkVar::Text),
    (
        "CLERK_MACHINE_SECRET_KEY",
        "machine.machine_secret_key",
        ClerkVar::Text,
    ),
    ("CLERK_API_URL", "clerk.api_url", ClerkVar::Text),
    (
        "CLERK_AUTHORIZED_PARTIES",
        "clerk.authorized_parties",
        ClerkVar::List,
    ),
    ("CLERK_JWT_TTL", "clerk.jwks_ttl_seconds", ClerkVar::Integer),
    // Clerk's docs use both names; the shorter one wins when both are set.
    (
        "CLERK_WEBHOOK_SIGNING_SECRET",
        "webhooks.secret",
        ClerkVar::Text,
    ),
    ("CLERK_WEBHOOK_SECRET", "webhooks.secret", ClerkVar::Text),
    // OpenTelemetry's standard variables for the two keys they name.
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "tracing.otlp_endpoint",
        ClerkVar::Text,
    ),
    ("OTEL_SERVICE_NAME", "tracing.service_name", ClerkVar::Text),
    (
        "CLERK_SESSION_DURATION",
        "sessions.duration_seconds",
        ClerkVar::Integer,
    ),
];

#[derive(Clone, Copy)]
enum ClerkVar {
    Text,
    List,
    Integer,
}

/// Kubernetes injects `<SERVICE>_PORT`, `<SERVICE>_PORT_8080_TCP_ADDR`, `<SERVICE>_SERVICE_HOST`,
/// ... for every Service in the namespace; a Service named `clerkgate` would otherwise make its
/// own pods fail to start. None of them contains the `__` every setting has.
fn is_service_link(rest: &str) -> bool {
    !rest.contains("__")
        && (rest == "PORT"
            || rest.starts_with("PORT_")
            || rest == "SERVICE_HOST"
            || rest.starts_with("SERVICE_PORT"))
}

/// Prefix of the variables that can set any key: `CLERKGATE_PROXY__LISTEN` sets `proxy.listen`.
const ENV_PREFIX: &str = "CLERKGATE_";

impl Config {
    /// Builds the figment of all layers. `env` is the process environment (or a test's).
    pub fn figment<I, K, V>(file: Option<&Path>, env: I) -> Result<Figment, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} is not a readable file", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .collect();
        for (name, key, kind) in CLERK_VARIABLES {
            let Some((_, raw)) = env.iter().find(|(k, _)| k == name) else {
                continue;
            };
            let value = match kind {
                ClerkVar::Text => Value::from(raw.clone()),
                ClerkVar::List => Value::from(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                ),
                ClerkVar::Integer => {
                    let n: u64 = raw.trim().parse().map_err(|_| {
                        ConfigError::new(*name, "must be a whole number of seconds")
                    })?;
                    Value::from(n)
                }
            };
            figment = figment.merge(Serialized::default(key, value));
        }
        let mut prefixed: Vec<&(String, String)> = env
            .iter()
            .filter(|(k, _)| {
                k.starts_with(ENV_PREFIX)
                    && k != "CLERKGATE_CONFIG"
                    && !is_service_link(&k[ENV_PREFIX.len()..])
            })
            .collect();
        prefixed.sort();
        for (name, raw) in prefixed {
            let path = name[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::new(
                    name.as_str(),
                    "expected CLERKGATE_<SECTION>__<KEY>",
                ));
            }
            let key = path.join(".");
            let value = if key.ends_with("secret_key")
                || key.ends_with("secret")
                || key.ends_with("token")
                || key.ends_with("publishable_key")
                || key.ends_with("jwt_key")
            {
                Value::from(raw.clone())
            } else {
                raw.parse::<Value>().unwrap_or_else(|e| match e {})
            };
            figment = figment.merge(Serialized::default(&key, value));
        }
        Ok(figment)
    }

    /// Extracts and validates a configuration from a figment.
    pub fn from_figment(figment: &Figment) -> Result<Config, ConfigError> {
        let config = Self::extract(figment)?;
        config.validate()?;
        Ok(config)
    }

    /// Extracts without the cross-field checks (`clerkgate dev` replaces `[clerk]` first).
    pub fn extract(figment: &Figment) -> Result<Config, ConfigError> {
        figment.extract().map_err(|e| {
            let key = if e.path.is_empty() {
                "config".to_owned()
            } else {
                e.path.join(".")
            };
            ConfigError::new(key, e.kind.to_string())
        })
    }

    /// Loads file plus environment, then validates.
    pub fn load<I, K, V>(file: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        Self::from_figment(&Self::figment(file, env)?)
    }

    /// A configuration from a TOML string alone (tests and examples).
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml));
        Self::from_figment(&figment)
    }

    /// Cross-field checks that serde cannot express. Each section checks itself; the ones that
    /// need two sections are here.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.proxy.validate()?;
        self.clerk.validate()?;
        self.auth.validate()?;
        self.headers.validate()?;
        self.webhooks.validate()?;
        self.sessions.validate()?;
        self.fleet.validate()?;
        self.local_api.validate()?;
        self.validate_local_api()?;
        self.machine.validate()?;
        self.tracing.validate()?;
        if self.auth.max_token_bytes > self.proxy.max_header_bytes {
            return Err(ConfigError::new(
                "auth.max_token_bytes",
                format!(
                    "must not exceed proxy.max_header_bytes ({}): a longer token never arrives",
                    self.proxy.max_header_bytes
                ),
            ));
        }
        self.browser.validate(self.clerk.secret_key.is_some())?;
        self.cors.validate(&self.clerk.authorized_parties)?;
        if self.sessions.check == revocations::CheckMode::Api && self.clerk.secret_key.is_none() {
            return Err(ConfigError::new(
                "sessions.check",
                "\"api\" needs clerk.secret_key (CLERK_SECRET_KEY) to call the Backend API",
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            route.validate(&format!("routes[{i}]"))?;
            // API keys are always opaque: only the Backend API can verify them.
            if route.accepts.accepts(auth::machine::TokenType::ApiKey)
                && self.clerk.secret_key.is_none()
            {
                return Err(ConfigError::new(
                    format!("routes[{i}].accepts"),
                    "api_key needs clerk.secret_key (CLERK_SECRET_KEY) to verify keys with the Backend API",
                ));
            }
        }
        // Port 0 asks the kernel for a free port: two of them never collide.
        if self.admin.listen == self.proxy.listen && self.proxy.listen.port() != 0 {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from proxy.listen: admin endpoints are never served on the proxy port",
            ));
        }
        Ok(())
    }

    /// The local API against the sections it shares something with.
    fn validate_local_api(&self) -> Result<(), ConfigError> {
        let api = &self.local_api;
        if api.enabled && self.sessions.api_budget_per_10s == 0 {
            return Err(ConfigError::new(
                "sessions.api_budget_per_10s",
                "must be at least 1 while the local API is enabled (it shares this budget)",
            ));
        }
        if api.enabled && api.listen.port() != 0 {
            for (key, other) in [
                ("proxy.listen", self.proxy.listen),
                ("admin.listen", self.admin.listen),
            ] {
                if other == api.listen {
                    return Err(ConfigError::new(
                        "local_api.listen",
                        format!("must differ from {key}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml_string(self)
    }
}

fn toml_string<T: Serialize>(value: &T) -> String {
    toml::to_string_pretty(value)
        .unwrap_or_else(|e| format!("# could not render configuration: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_ENV: [(&str, &str); 0] = [];

    fn pk() -> &'static str {
        // fake-instance.clerk.accounts.dev$
        "pk_test_ZmFrZS1pbnN0YW5jZS5jbGVyay5hY2NvdW50cy5kZXYk"
    }

    #[test]
    fn defaults_need_a_key_source() {
        let err = Config::load(None, NO_ENV).unwrap_err();
        assert_eq!(err.key, "clerk.secret_key");
    }

    #[test]
    fn clerk_variables_are_layered_over_the_file_and_under_clerkgate_variables() {
        let env = [
            ("CLERK_SECRET_KEY", "sk_test_abc"),
            ("CLERK_PUBLISHABLE_KEY", pk()),
            (
                "CLERK_AUTHORIZED_PARTIES",
                "https://a.example, https://b.example",
            ),
            ("CLERK_JWT_TTL", "120"),
            ("CLERKGATE_PROXY__LISTEN", "127.0.0.1:18080"),
            ("CLERKGATE_AUTH__CLOCK_SKEW_MS", "0"),
            ("CLERKGATE_CLERK__JWKS_TTL_SECONDS", "90"),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.clerk.secret_key.as_ref().unwrap().expose(), "sk_test_abc");
        assert_eq!(
            c.clerk.authorized_parties,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:18080");
        assert_eq!(c.auth.clock_skew_ms, 0);
        assert_eq!(c.clerk.jwks_ttl_seconds, 90, "CLERKGATE_ wins over CLERK_");
        let c = Config::load(
            None,
            [
                ("CLERK_SECRET_KEY", "sk_test_abc"),
                ("CLERK_PUBLISHABLE_KEY", pk()),
                ("CLERK_WEBHOOK_SIGNING_SECRET", "whsec_c2lnbmluZw=="),
                ("CLERK_SESSION_DURATION", "600"),
            ],
        )
        .unwrap();
        assert_eq!(c.webhooks.secret.unwrap().expose(), "whsec_c2lnbmluZw==");
        assert_eq!(c.sessions.duration_seconds, 600);
    }

    #[test]
    fn kubernetes_service_link_variables_are_ignored() {
        let env = [
            ("CLERK_SECRET_KEY", "sk_test_abc"),
            ("CLERK_PUBLISHABLE_KEY", pk()),
            ("CLERKGATE_PORT", "tcp://10.0.0.1:80"),
            ("CLERKGATE_PORT_80_TCP_ADDR", "10.0.0.1"),
            ("CLERKGATE_SERVICE_HOST", "10.0.0.1"),
            ("CLERKGATE_SERVICE_PORT_HTTP", "80"),
        ];
        assert!(Config::load(None, env).is_ok());
        // A real setting with a typo is still an error.
        let err = Config::load(None, [("CLERKGATE_PROXY_LISTEN", "x")]).unwrap_err();
        assert!(err.message.contains("proxy_listen"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = Config::from_toml("[auth]\nallow_missing_azpp = true\n").unwrap_err();
        assert!(err.key.contains("auth"), "{err}");
        assert!(err.message.contains("allow_missing_azpp"), "{err}");
        let err = Config::load(None, [("CLERKGATE_PROXY__LISTN", "x")]).unwrap_err();
        assert!(err.message.contains("listn"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load(
            None,
            [
                ("CLERK_SECRET_KEY", "sk_test_x"),
                ("CLERKGATE_PROXY__LISTEN", "nope"),
            ],
        )
        .unwrap_err();
        assert_eq!(err.key, "proxy.listen", "{err}");
        let err = Config::load(
            None,
            [("CLERK_PUBLISHABLE_KEY", "pk_live_aW52YWxpZGtleSQ=")],
        )
        .unwrap_err();
        assert_eq!(err.key, "clerk.publishable_key", "{err}");
        let err = Config::load(None, [("CLERK_JWT_TTL", "soon")]).unwrap_err();
        assert_eq!(err.key, "CLERK_JWT_TTL", "{err}");
    }

    #[test]
    fn api_url_must_be_https_unless_loopback() {
        let env = |url: &'static str| {
            [
                ("CLERK_SECRET_KEY", "sk_test_x"),
                ("CLERK_PUBLISHABLE_KEY", pk()),
                ("CLERK_API_URL", url),
            ]
        };
        assert!(Config::load(None, env("http://127.0.0.1:1234")).is_ok());
        assert!(Config::load(None, env("https://api.clerk.com")).is_ok());
        let err = Config::load(None, env("http://api.clerk.com")).unwrap_err();
        assert_eq!(err.key, "clerk.api_url");
    }

    #[test]
    fn documented_defaults_match_the_code() {
        // config/clerkgate.toml documents every default; parsing it must give exactly the
        // built-in defaults, and every default key must appear in it uncommented.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/clerkgate.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let documented: Config = Figment::from(Toml::string(&text)).extract().unwrap();
        let as_json = |c: &Config| serde_json::to_value(c).unwrap();
        assert_eq!(as_json(&documented), as_json(&Config::default()));
        let defaults = as_json(&Config::default());
        for (section, keys) in defaults.as_object().unwrap() {
            let Some(keys) = keys.as_object() else {
                continue;
            };
            let header = format!("[{section}]");
            assert!(
                text.contains(&header),
                "{header} missing from config/clerkgate.toml"
            );
            for (key, value) in keys {
                if value.is_null() {
                    continue;
                }
                let present = text.lines().any(|l| l.starts_with(&format!("{key} = ")));
                let table = text.contains(&format!("[{section}.{key}]"));
                assert!(
                    present || table,
                    "{section}.{key} missing from config/clerkgate.toml"
                );
            }
        }
    }

    #[test]
    fn redacted_output_never_contains_secrets() {
        let c = Config::load(
            None,
            [
                ("CLERK_SECRET_KEY", "sk_test_supersecret"),
                ("CLERK_PUBLISHABLE_KEY", pk()),
            ],
        )
        .unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("supersecret"), "{out}");
        assert!(out.contains("[redacted]"));
        assert!(out.contains("[proxy]"));
        assert!(!format!("{c:?}").contains("supersecret"));
    }
}
