//! Entitlement checks on session claims, decoded exactly like `has()` in `@clerk/shared` 4.41
//! (`authorization.mjs`, `createCheckAuthorization`), which `@clerk/backend` 3.x builds from a
//! v2 session token's `pla`, `fea` and `fva` claims.
//!
//! - `pla` / `fea` are comma-separated `scope:value` lists. Scope `o` is the organization's,
//!   `u` the user's, `ou`/`uo` both; other scopes are ignored. An element without a colon makes
//!   the whole check fail (closed), as does a missing or non-string claim.
//! - An asked plan or feature may carry a scope (`o:`, `org:`, `organization:` or `u:`,
//!   `user:`); unscoped, it matches either list. Only the text up to a second colon counts, and
//!   an empty value after the scope is replaced by the scope itself (both the SDK's own quirks).
//! - `fva` is `[minutes since first factor, minutes since second factor]`, `-1` for never. A
//!   factor is fresh when `after_minutes > age` (strict). Missing, malformed or `[-1, -1]`
//!   fails.

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const ORG_SCOPES: [&str; 3] = ["o", "org", "organization"];
const USER_SCOPES: [&str; 2] = ["u", "user"];

/// Why an asked plan or feature can never match (a configuration error).
pub fn invalid_scope(asked: &str) -> Option<&str> {
    let (scope, _) = asked.split_once(':')?;
    (!ORG_SCOPES.contains(&scope) && !USER_SCOPES.contains(&scope)).then_some(scope)
}

/// `splitByScope`: the org and user lists of a claim, or `None` when an element has no colon.
fn split_by_scope(claim: &str) -> Option<(Vec<&str>, Vec<&str>)> {
    let mut org = Vec::new();
    let mut user = Vec::new();
    for part in claim.split(',') {
        let part = part.trim_matches(is_js_whitespace);
        let (scope, value) = part.split_once(':')?;
        match scope {
            "o" => org.push(value),
            "u" => user.push(value),
            "ou" | "uo" => {
                org.push(value);
                user.push(value);
            }
            _ => {}
        }
    }
    Some((org, user))
}

/// The characters JavaScript's `String.prototype.trim` removes.
fn is_js_whitespace(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}'
}

/// `has({ plan })` / `has({ feature })` against the claim (`pla` / `fea`).
pub fn has_scoped(claim: Option<&Value>, asked: &str) -> bool {
    let Some(Value::String(claim)) = claim else {
        return false;
    };
    if claim.is_empty() {
        return false;
    }
    let Some((org, user)) = split_by_scope(claim) else {
        return false;
    };
    let mut parts = asked.split(':');
    let raw_scope = parts.next().unwrap_or("");
    match parts.next() {
        None => org.contains(&raw_scope) || user.contains(&raw_scope),
        Some(raw_id) => {
            let id = if raw_id.is_empty() { raw_scope } else { raw_id };
            if ORG_SCOPES.contains(&raw_scope) {
                org.contains(&id)
            } else if USER_SCOPES.contains(&raw_scope) {
                user.contains(&id)
            } else {
                false
            }
        }
    }
}

/// A reverification level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    FirstFactor,
    SecondFactor,
    MultiFactor,
}

/// A route's `reverification`: one of Clerk's presets or a custom level and age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reverification {
    StrictMfa,
    Strict,
    Moderate,
    Lax,
    Custom { level: Level, after_minutes: u32 },
}

impl Reverification {
    /// `TYPES_TO_OBJECTS` for the presets.
    pub fn level_and_minutes(self) -> (Level, u32) {
        match self {
            Self::StrictMfa => (Level::MultiFactor, 10),
            Self::Strict => (Level::SecondFactor, 10),
            Self::Moderate => (Level::SecondFactor, 60),
            Self::Lax => (Level::SecondFactor, 1440),
            Self::Custom {
                level,
                after_minutes,
            } => (level, after_minutes),
        }
    }

    fn preset_name(self) -> Option<&'static str> {
        match self {
            Self::StrictMfa => Some("strict_mfa"),
            Self::Strict => Some("strict"),
            Self::Moderate => Some("moderate"),
            Self::Lax => Some("lax"),
            Self::Custom { .. } => None,
        }
    }

    /// The body Clerk's `reverificationErrorResponse(config)` sends: clerk-js
    /// `useReverification()` recognises it, prompts the user and retries. The configured value
    /// verbatim: a preset's name, or `{"level":…,"afterMinutes":…}` (camelCase, as the SDK).
    pub fn error_body(self) -> String {
        let metadata = match self.preset_name() {
            Some(name) => format!("\"{name}\""),
            None => {
                let (level, minutes) = self.level_and_minutes();
                let level = serde_json::to_string(&level).unwrap_or_default();
                format!("{{\"level\":{level},\"afterMinutes\":{minutes}}}")
            }
        };
        format!(
            "{{\"clerk_error\":{{\"type\":\"forbidden\",\"reason\":\"reverification-error\",\"metadata\":{{\"reverification\":{metadata}}}}}}}"
        )
    }

    /// `checkReverificationAuthorization` against the `fva` claim.
    pub fn satisfied_by(self, fva: Option<&Value>) -> bool {
        let Some(Value::Array(ages)) = fva else {
            return false;
        };
        let [a, b] = ages.as_slice() else {
            return false;
        };
        let valid = |v: &Value| {
            v.as_f64()
                .filter(|x| x.is_finite() && (*x == -1.0 || *x >= 0.0))
        };
        let (Some(f1), Some(f2)) = (valid(a), valid(b)) else {
            return false;
        };
        if f1 == -1.0 && f2 == -1.0 {
            return false;
        }
        let (level, minutes) = self.level_and_minutes();
        let limit = f64::from(minutes);
        let fresh1 = f1 != -1.0 && limit > f1;
        let fresh2 = f2 != -1.0 && limit > f2;
        match level {
            Level::FirstFactor => fresh1,
            Level::SecondFactor if f2 == -1.0 => fresh1,
            Level::SecondFactor if f1 == -1.0 => fresh2,
            Level::SecondFactor => fresh2,
            Level::MultiFactor if f2 == -1.0 => fresh1,
            Level::MultiFactor if f1 == -1.0 => false,
            Level::MultiFactor => fresh1 && fresh2,
        }
    }
}

impl Serialize for Reverification {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.preset_name() {
            Some(name) => s.serialize_str(name),
            None => {
                let (level, minutes) = self.level_and_minutes();
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("level", &level)?;
                m.serialize_entry("after_minutes", &minutes)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Reverification {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Custom(Custom),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Custom {
            level: Level,
            after_minutes: u32,
        }
        match Raw::deserialize(d)? {
            Raw::Name(name) => match name.as_str() {
                "strict_mfa" => Ok(Self::StrictMfa),
                "strict" => Ok(Self::Strict),
                "moderate" => Ok(Self::Moderate),
                "lax" => Ok(Self::Lax),
                other => Err(de::Error::custom(format!(
                    "unknown reverification preset {other:?} (strict_mfa, strict, moderate, lax, or {{ level, after_minutes }})"
                ))),
            },
            Raw::Custom(c) if c.after_minutes == 0 => {
                Err(de::Error::custom("after_minutes must be at least 1"))
            }
            Raw::Custom(c) => Ok(Self::Custom {
                level: c.level,
                after_minutes: c.after_minutes,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plans_and_features_follow_has() {
        // The probe of clerk-beyond-sessions.md C.1 (run against @clerk/shared 4.41).
        let pla = json!("u:pro");
        let fea = json!("u:export,o:dashboard");
        assert!(has_scoped(Some(&pla), "pro"));
        assert!(has_scoped(Some(&pla), "user:pro"));
        assert!(!has_scoped(Some(&pla), "org:pro"));
        assert!(has_scoped(Some(&fea), "export"));
        assert!(has_scoped(Some(&fea), "org:dashboard"));
        assert!(!has_scoped(Some(&fea), "u:dashboard"));
        // Fail closed: no colon anywhere, absent, empty, not a string, unknown asked scope.
        assert!(!has_scoped(Some(&json!("u:a,export")), "a"));
        assert!(!has_scoped(None, "a"));
        assert!(!has_scoped(Some(&json!("")), "a"));
        assert!(!has_scoped(Some(&json!(["u:a"])), "a"));
        assert!(!has_scoped(Some(&json!("u:a")), "x:a"));
        assert!(!has_scoped(Some(&json!("u:a,")), "a"), "empty element");
        // Both scopes, unknown claim scopes ignored, whitespace trimmed per element.
        assert!(has_scoped(Some(&json!("ou:x")), "org:x"));
        assert!(has_scoped(Some(&json!("uo:x")), "u:x"));
        assert!(!has_scoped(Some(&json!("z:x")), "x"));
        assert!(has_scoped(Some(&json!(" u:x , o:y")), "o:y"));
        // The SDK's quirks: a third part is ignored, an empty id becomes the scope.
        assert!(has_scoped(Some(&json!("o:a")), "org:a:b"));
        assert!(has_scoped(Some(&json!("u:u")), "u:"));
    }

    #[test]
    fn reverification_follows_has() {
        let fva = |v: Value| Some(v);
        // Probe of C.1: fva [5,-1].
        assert!(Reverification::Strict.satisfied_by(fva(json!([5, -1])).as_ref()));
        assert!(Reverification::Lax.satisfied_by(fva(json!([5, -1])).as_ref()));
        assert!(Reverification::StrictMfa.satisfied_by(fva(json!([5, -1])).as_ref()));
        let first4 = Reverification::Custom {
            level: Level::FirstFactor,
            after_minutes: 4,
        };
        assert!(!first4.satisfied_by(fva(json!([5, -1])).as_ref()));
        // Strict inequality.
        assert!(!Reverification::Strict.satisfied_by(fva(json!([10, -1])).as_ref()));
        assert!(Reverification::Strict.satisfied_by(fva(json!([9.5, -1])).as_ref()));
        // Second factor present: it must be fresh.
        assert!(!Reverification::Strict.satisfied_by(fva(json!([1, 20])).as_ref()));
        assert!(Reverification::Strict.satisfied_by(fva(json!([20, 1])).as_ref()));
        // Multi-factor: both, or the first when there is no second.
        assert!(!Reverification::StrictMfa.satisfied_by(fva(json!([20, 1])).as_ref()));
        assert!(Reverification::StrictMfa.satisfied_by(fva(json!([2, 1])).as_ref()));
        assert!(!Reverification::StrictMfa.satisfied_by(fva(json!([-1, 1])).as_ref()));
        // Malformed fails.
        for bad in [
            json!(null),
            json!([-1, -1]),
            json!([5]),
            json!([5, -1, 3]),
            json!(["5", -1]),
            json!([-2, 1]),
            json!("5,-1"),
        ] {
            assert!(!Reverification::Lax.satisfied_by(Some(&bad)), "{bad}");
        }
        assert!(!Reverification::Lax.satisfied_by(None));
    }

    #[test]
    fn reverification_body_is_clerks() {
        assert_eq!(
            Reverification::Strict.error_body(),
            r#"{"clerk_error":{"type":"forbidden","reason":"reverification-error","metadata":{"reverification":"strict"}}}"#
        );
        assert_eq!(
            Reverification::Custom {
                level: Level::SecondFactor,
                after_minutes: 10
            }
            .error_body(),
            r#"{"clerk_error":{"type":"forbidden","reason":"reverification-error","metadata":{"reverification":{"level":"second_factor","afterMinutes":10}}}}"#
        );
    }

    #[test]
    fn config_forms() {
        #[derive(Deserialize)]
        struct T {
            r: Reverification,
        }
        let t: T = toml::from_str("r = \"strict_mfa\"").unwrap();
        assert_eq!(t.r, Reverification::StrictMfa);
        let t: T = toml::from_str("r = { level = \"first_factor\", after_minutes = 5 }").unwrap();
        assert_eq!(
            t.r,
            Reverification::Custom {
                level: Level::FirstFactor,
                after_minutes: 5
            }
        );
        assert!(toml::from_str::<T>("r = \"sometimes\"").is_err());
        assert!(
            toml::from_str::<T>("r = { level = \"first_factor\", after_minutes = 0 }").is_err()
        );
        assert_eq!(invalid_scope("org:x"), None);
        assert_eq!(invalid_scope("x"), None);
        assert_eq!(invalid_scope("team:x"), Some("team"));
    }
}
