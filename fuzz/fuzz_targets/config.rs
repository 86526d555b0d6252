//! Configuration loading: `clerkgate::config::Config::{from_toml, figment, from_figment}` on
//! arbitrary TOML text and environment variables.
//!
//! Input: optional `NAME=value` environment lines, a line `---`, then TOML (without a `---`
//! line the whole input is TOML). Loading must return `Ok` or a `ConfigError` naming a key,
//! never panic. A configuration that loads must then also survive what startup does with it
//! without touching the network: resolving the Clerk instance, compiling the route policy and
//! the identity headers, and rendering the redacted TOML, which must not contain a secret.
#![no_main]

use clerkgate::auth::identity::IdentityBuilder;
use clerkgate::auth::policy::Policy;
use clerkgate::config::{Config, ConfigError};
use figment::providers::{Format, Toml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (env_text, toml) = match text.split_once("\n---\n") {
        Some((env, toml)) => (env, toml),
        None => ("", &*text),
    };
    let env: Vec<(&str, &str)> = env_text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();

    check(Config::from_toml(toml));
    let layered = Config::figment(None, env.iter().copied())
        .and_then(|f| Config::from_figment(&f.merge(Toml::string(toml))));
    check(layered);
});

fn check(result: Result<Config, ConfigError>) {
    let config = match result {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.key.is_empty(), "a ConfigError without a key: {e:?}");
            return;
        }
    };
    let _ = config.clerk.resolve();
    let _ = Policy::new(&config.routes);
    let _ = IdentityBuilder::new(&config.headers);
    let rendered = config.to_redacted_toml();
    for secret in [
        config.clerk.secret_key.as_ref().map(|s| s.expose()),
        config.webhooks.secret.as_ref().map(|s| s.expose()),
    ]
    .into_iter()
    .flatten()
    .chain(config.tracing.headers.values().map(|s| s.expose()))
    {
        let quoted = format!("\"{secret}\"");
        // Short secrets can equal an unrelated value (`"info"` is valid base64).
        if secret.len() >= 12 && secret != "[redacted]" {
            assert!(!rendered.contains(&quoted), "a secret in the redacted TOML");
        }
    }
}
