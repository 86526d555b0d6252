//! Reading the Clerk-specific claims of an already verified session-token payload: the
//! active organization (v1 flat claims and v2 `o` object normalised into one [`Org`]) and
//! the impersonating actor.
//!
//! Everything here is a pure function of the payload. Signature, time and issuer checks
//! happen before this module is reached; what it adds is fail-closed interpretation: a
//! claim that is missing, mistyped or malformed grants nothing rather than something.
//! Rules follow docs/clerk-protocol.md sections 1.2, 1.3 and 1.6 (`@clerk/shared`
//! `jwtPayloadParser` and `splitByScope`).

use serde_json::{Map, Value};

/// The active organization of a session, in one shape for v1 and v2 tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Org {
    /// Organization id (`org_…`); never empty.
    pub id: String,
    pub slug: Option<String>,
    /// Role key with the `org:` prefix, e.g. `org:admin`.
    pub role: Option<String>,
    /// Full permission keys, e.g. `org:dashboard:read`.
    pub permissions: Vec<String>,
}

/// The active organization of a verified payload, or `None`.
///
/// v2 (`"v": 2` in the payload) reads the `o` object (`id`, `slg`, `rol` -> role
/// `"org:" + rol`, `per`, `fpm` together with the top-level `fea`); v1 (no `v`, or
/// `v != 2`) reads the flat `org_id` / `org_slug` / `org_role` / `org_permissions` (array of
/// strings). Returns `None` when no org is active (no `o` / no `org_id`) or when the id is
/// not a non-empty string.
///
/// Like the JS SDK (`switch (claims.v) { case 2: … default: … }`), the version decides which
/// claims are read; the other shape is ignored even if present, so a v2 token cannot smuggle
/// in flat `org_*` claims and vice versa. Empty strings for slug and role count as absent.
pub fn org(payload: &Map<String, Value>) -> Option<Org> {
    if is_v2(payload) {
        org_v2(payload)
    } else {
        org_v1(payload)
    }
}

/// Section 1.3: decodes `o.fpm` against the org-scoped subset (scopes `o`, `ou`, `uo`) of
/// `fea` and the `o.per` list.
///
/// Returns `org:<feature>:<perm>` for every set bit, features in `fea` order and, within a
/// feature, permissions in `per` order. Fail-closed rules:
/// - an `fpm` entry that is not (after trimming) `^\d+$` grants nothing for its feature;
/// - an element of `fea` without `:` (the JS parser throws there) makes the whole `fea`
///   yield no org features;
/// - bits at positions >= the number of permissions, `fpm` entries beyond the org features,
///   and features without an `fpm` entry grant nothing;
/// - an empty feature or permission name is never emitted (its position still counts, so
///   the names after it keep their bit).
pub fn fpm_permissions(fea: &str, per: &str, fpm: &str) -> Vec<String> {
    let Some(features) = org_features(fea) else {
        return Vec::new();
    };
    if per.is_empty() || fpm.is_empty() {
        return Vec::new();
    }
    let permissions: Vec<&str> = per.split(',').map(str::trim).collect();

    let mut granted = Vec::new();
    for (feature, mask) in features.iter().zip(fpm.split(',')) {
        if feature.is_empty() {
            continue;
        }
        let Some(bits) = LowBits::parse(mask.trim(), permissions.len()) else {
            continue;
        };
        for (index, permission) in permissions.iter().enumerate() {
            if !permission.is_empty() && bits.is_set(index) {
                granted.push(format!("org:{feature}:{permission}"));
            }
        }
    }
    granted
}

/// The impersonator's user id from `act.sub`, if any.
///
/// An empty `sub` is treated as absent: it identifies no one.
pub fn actor_sub(payload: &Map<String, Value>) -> Option<&str> {
    payload
        .get("act")?
        .as_object()?
        .get("sub")?
        .as_str()
        .filter(|sub| !sub.is_empty())
}

/// `v == 2` with JS strict-equality semantics: JSON `2` and `2.0` are the same number there,
/// while `"2"` is not.
fn is_v2(payload: &Map<String, Value>) -> bool {
    payload
        .get("v")
        .and_then(Value::as_f64)
        .is_some_and(|v| v == 2.0)
}

fn org_v2(payload: &Map<String, Value>) -> Option<Org> {
    let o = payload.get("o")?.as_object()?;
    let id = non_empty_str(o.get("id"))?;
    Some(Org {
        id: id.to_owned(),
        slug: non_empty_str(o.get("slg")).map(str::to_owned),
        // v2 carries the role key without its prefix (§1.2).
        role: non_empty_str(o.get("rol")).map(|rol| format!("org:{rol}")),
        permissions: fpm_permissions(
            str_or_empty(payload.get("fea")),
            str_or_empty(o.get("per")),
            str_or_empty(o.get("fpm")),
        ),
    })
}

fn org_v1(payload: &Map<String, Value>) -> Option<Org> {
    let id = non_empty_str(payload.get("org_id"))?;
    // A list with any non-string element is malformed as a whole; rather than guess which
    // entries were meant, it grants nothing.
    let permissions = match payload.get("org_permissions") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    Some(Org {
        id: id.to_owned(),
        slug: non_empty_str(payload.get("org_slug")).map(str::to_owned),
        // v1 already carries the prefixed key (`org:admin`).
        role: non_empty_str(payload.get("org_role")).map(str::to_owned),
        permissions,
    })
}

/// A missing or non-string claim reads as empty, which `fpm_permissions` treats as "grants
/// nothing".
fn str_or_empty(value: Option<&Value>) -> &str {
    value.and_then(Value::as_str).unwrap_or("")
}

fn non_empty_str(value: Option<&Value>) -> Option<&str> {
    value?.as_str().filter(|s| !s.is_empty())
}

/// The org-scoped feature names of `fea`, in order; `None` when `fea` is malformed.
///
/// Mirrors `@clerk/shared` `splitByScope`: trim each element, split at the first `:`, keep
/// scopes `o`, `ou` and `uo` exactly. An empty `fea` has no features; an empty element
/// (e.g. a trailing comma) has no `:` and so is malformed, as in the JS parser.
fn org_features(fea: &str) -> Option<Vec<&str>> {
    if fea.is_empty() {
        return Some(Vec::new());
    }
    let mut features = Vec::new();
    for element in fea.split(',') {
        let (scope, name) = element.trim().split_once(':')?;
        if matches!(scope, "o" | "ou" | "uo") {
            features.push(name);
        }
    }
    Some(features)
}

/// The low bits of an arbitrary-precision non-negative decimal integer.
///
/// Only bits below the permission count matter, so the value is reduced modulo
/// 2^(64 * limbs) while it is read: each digit multiplies the little-endian limbs by 10 and
/// adds the digit, dropping the carry out of the top limb. The low bits of a product and
/// sum depend only on the low bits of the operands, so this is exact for every bit kept.
/// Cost is digits x ceil(permissions / 64) limb operations, bounded by the token's size.
struct LowBits {
    limbs: Vec<u64>,
}

impl LowBits {
    /// `None` unless `decimal` matches `^[0-9]+$` (ASCII digits only, no sign, no point).
    fn parse(decimal: &str, bit_count: usize) -> Option<Self> {
        if decimal.is_empty() || !decimal.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut limbs = vec![0_u64; bit_count.div_ceil(64)];
        for byte in decimal.bytes() {
            let mut carry = u128::from(byte - b'0');
            for limb in &mut limbs {
                let wide = u128::from(*limb) * 10 + carry;
                // Truncation intended: keep the low 64 bits, carry the rest upwards.
                *limb = wide as u64;
                carry = wide >> 64;
            }
        }
        Some(Self { limbs })
    }

    fn is_set(&self, bit: usize) -> bool {
        self.limbs
            .get(bit / 64)
            .is_some_and(|limb| (limb >> (bit % 64)) & 1 == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("test payload must be an object, got {other}"),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `permission_0,…,permission_53` from the JS conformance suite.
    fn per_54() -> String {
        (0..54)
            .map(|i| format!("permission_{i}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn feature_perms(indexes: &[usize]) -> Vec<String> {
        indexes
            .iter()
            .map(|i| format!("org:feature:permission_{i}"))
            .collect()
    }

    #[test]
    fn fpm_decodes_the_conformance_vectors() {
        // (fea, per, fpm, expected in output order)
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "o:impersonation",
                "read,manage",
                "3",
                &["org:impersonation:read", "org:impersonation:manage"],
            ),
            (
                "o:impersonation,o:memberships",
                "read,manage",
                "1,3",
                &[
                    "org:impersonation:read",
                    "org:memberships:read",
                    "org:memberships:manage",
                ],
            ),
            (
                "o:impersonation,o:memberships,o:feature3",
                "read,manage",
                "1,3,0",
                &[
                    "org:impersonation:read",
                    "org:memberships:read",
                    "org:memberships:manage",
                ],
            ),
            (
                "uo:impersonation,o:memberships,uo:feature3",
                "read,manage",
                "1,3,1",
                &[
                    "org:impersonation:read",
                    "org:memberships:read",
                    "org:memberships:manage",
                    "org:feature3:read",
                ],
            ),
            (
                "ou:memberships,u:impersonation",
                "read,manage",
                "3,0",
                &["org:memberships:read", "org:memberships:manage"],
            ),
            (
                "o:billing,o:email,o:fraud,o:instance,o:staging_plans",
                "manage,read",
                "3,3,3,3,1",
                &[
                    "org:billing:manage",
                    "org:billing:read",
                    "org:email:manage",
                    "org:email:read",
                    "org:fraud:manage",
                    "org:fraud:read",
                    "org:instance:manage",
                    "org:instance:read",
                    "org:staging_plans:manage",
                ],
            ),
            (
                "o:repositories,o:projects",
                "read,create,update,delete,revoke",
                "7,21",
                &[
                    "org:repositories:read",
                    "org:repositories:create",
                    "org:repositories:update",
                    "org:projects:read",
                    "org:projects:update",
                    "org:projects:revoke",
                ],
            ),
            (
                "o:repositories,o:projects,o:webhooks,o:impersonation",
                "read,manage",
                "1,2,3,0",
                &[
                    "org:repositories:read",
                    "org:projects:manage",
                    "org:webhooks:read",
                    "org:webhooks:manage",
                ],
            ),
            (
                "o:repositories,uo:projects,u:goldprofileborder",
                "read,create,update,delete,revoke",
                "7,21,0",
                &[
                    "org:repositories:read",
                    "org:repositories:create",
                    "org:repositories:update",
                    "org:projects:read",
                    "org:projects:update",
                    "org:projects:revoke",
                ],
            ),
            (
                "o:repositories,o:impersonation,o:billing",
                "manage,read,update",
                "6,0,3",
                &[
                    "org:repositories:read",
                    "org:repositories:update",
                    "org:billing:manage",
                    "org:billing:read",
                ],
            ),
            // `u:`-only features: nothing org-scoped, absent per/fpm.
            ("u:impersonation,u:memberships,u:feature3", "", "", &[]),
            // Same, with per/fpm present: user features never yield org permissions.
            (
                "u:impersonation,u:memberships,u:feature3",
                "read,manage",
                "3,3,3",
                &[],
            ),
            // Docs example ("Decode `o.fpm` manually").
            (
                "o:dashboard,o:teams",
                "manage,read",
                "3,2",
                &[
                    "org:dashboard:manage",
                    "org:dashboard:read",
                    "org:teams:read",
                ],
            ),
        ];
        for (fea, per, fpm, expected) in cases {
            assert_eq!(
                fpm_permissions(fea, per, fpm),
                strings(expected),
                "fea={fea:?} per={per:?} fpm={fpm:?}"
            );
        }
    }

    #[test]
    fn fpm_handles_values_beyond_2_pow_53_like_the_js_parser() {
        let per = per_54();
        let cases: &[(&str, &[usize])] = &[
            ("9007199254740993", &[0, 53]),    // 2^53 + 1
            ("9007199254740995", &[0, 1, 53]), // 2^53 + 3
            ("18014398509481984", &[]),        // 2^54: only bit 54, outside the list
            ("1", &[0]),
            ("3", &[0, 1]),
            ("7", &[0, 1, 2]),
            ("21", &[0, 2, 4]),
            ("0", &[]),
        ];
        for (fpm, indexes) in cases {
            assert_eq!(
                fpm_permissions("o:feature", &per, fpm),
                feature_perms(indexes),
                "fpm={fpm}"
            );
        }
    }

    #[test]
    fn fpm_entries_that_are_not_plain_decimal_grant_nothing() {
        let per = per_54();
        for fpm in [
            "1invalid", "-1", "1.5", "+1", "0x1", "1e3", "", " ", "１", "1 1", "٣",
        ] {
            assert_eq!(
                fpm_permissions("o:feature", &per, fpm),
                Vec::<String>::new(),
                "fpm={fpm:?}"
            );
        }
        // A bad entry only affects its own feature.
        assert_eq!(
            fpm_permissions("o:a,o:b,o:c", "read", "-1,1,1.5"),
            strings(&["org:b:read"])
        );
        assert_eq!(
            fpm_permissions("o:a,o:b", "read", ",1"),
            strings(&["org:b:read"])
        );
    }

    #[test]
    fn fpm_reads_arbitrarily_large_integers() {
        // 2^128 + 1 against three permissions: only bit 0 is inside the list.
        assert_eq!(
            fpm_permissions(
                "o:feature",
                "permission_0,permission_1,permission_2",
                "340282366920938463463374607431768211457"
            ),
            feature_perms(&[0])
        );

        let per_130 = (0..130)
            .map(|i| format!("permission_{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let cases: &[(&str, &[usize])] = &[
            // 2^128 + 1 with enough permissions to see bit 128 too.
            ("340282366920938463463374607431768211457", &[0, 128]),
            // 2^64: exactly one carry into the second limb.
            ("18446744073709551616", &[64]),
            // 2^64 - 1: every bit of the first limb.
            ("18446744073709551615", &(0..64).collect::<Vec<_>>()),
            // 2^129 + 2^127 + 2: bit 129 is the last permission.
            ("850705917302346158658436518579420528642", &[1, 127, 129]),
            // Leading zeros change nothing.
            (
                "000000000000000000000000000000000000000000000000000005",
                &[0, 2],
            ),
        ];
        for (fpm, indexes) in cases {
            assert_eq!(
                fpm_permissions("o:feature", &per_130, fpm),
                feature_perms(indexes),
                "fpm={fpm}"
            );
        }

        // 2^200 + 1: higher bits are dropped, bit 0 survives the truncated carries.
        let two_pow_200_plus_1 = "1606938044258990275541962092341162602522202993782792835301377";
        assert_eq!(
            fpm_permissions("o:feature", &per_130, two_pow_200_plus_1),
            feature_perms(&[0])
        );
    }

    #[test]
    fn low_bits_agree_with_native_integers() {
        // Deterministic pseudo-random u128 values (xorshift), checked bit by bit.
        let mut state: u128 = 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834;
        for _ in 0..500 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for value in [state, state >> 64, state >> 100, state & 0xFFFF] {
                let bits = LowBits::parse(&value.to_string(), 128);
                let Some(bits) = bits else {
                    panic!("{value} should parse");
                };
                for bit in 0..128 {
                    assert_eq!(
                        bits.is_set(bit),
                        (value >> bit) & 1 == 1,
                        "{value} bit {bit}"
                    );
                }
                assert!(
                    !bits.is_set(128),
                    "bits past the requested width are never set"
                );
            }
        }
    }

    #[test]
    fn malformed_fea_yields_no_org_features() {
        let cases: &[(&str, &str, &str)] = &[
            ("o:a,bogus", "read", "1,1"),
            ("bogus,o:a", "read", "1,1"),
            ("o:a,", "read", "1"),
            (",o:a", "read", "1"),
            (" ", "read", "1"),
            ("o:a,,o:b", "read", "1,1"),
        ];
        for (fea, per, fpm) in cases {
            assert_eq!(
                fpm_permissions(fea, per, fpm),
                Vec::<String>::new(),
                "fea={fea:?}"
            );
        }
    }

    #[test]
    fn fpm_edge_cases_follow_the_js_shape() {
        // (fea, per, fpm, expected)
        let cases: &[(&str, &str, &str, &[&str])] = &[
            // No fea, no per or no fpm: nothing.
            ("", "read", "1", &[]),
            ("o:a", "", "1", &[]),
            ("o:a", "read", "", &[]),
            // Unknown scopes are neither org nor user; only exact o / ou / uo count.
            ("org:a,x:b,oo:c,o:d", "read", "1,1,1,1", &["org:d:read"]),
            // Whitespace around elements is trimmed, as in the JS parser.
            (
                " o:a , o:b ",
                " read , manage ",
                " 1 , 2 ",
                &["org:a:read", "org:b:manage"],
            ),
            // The scope ends at the first `:`; the rest is the feature name.
            ("o:a:b", "read", "1", &["org:a:b:read"]),
            // Extra fpm entries are ignored; features without one get nothing.
            ("o:a", "read", "1,1,1", &["org:a:read"]),
            ("o:a,o:b,o:c", "read", "1", &["org:a:read"]),
            // Bits past the permission list are ignored.
            ("o:a", "read,manage", "255", &["org:a:read", "org:a:manage"]),
            // Empty names are skipped but keep their position.
            ("o:a", "read,,manage", "7", &["org:a:read", "org:a:manage"]),
            ("o:,o:b", "read", "1,1", &["org:b:read"]),
            // fpm is indexed against the org-scoped subset, not the whole fea (section 1.3).
            ("u:x,o:a", "read,manage", "2", &["org:a:manage"]),
        ];
        for (fea, per, fpm, expected) in cases {
            assert_eq!(
                fpm_permissions(fea, per, fpm),
                strings(expected),
                "fea={fea:?} per={per:?} fpm={fpm:?}"
            );
        }
    }

    #[test]
    fn org_reads_v2_and_v1_payloads() {
        let cases: Vec<(&str, Value, Option<Org>)> = vec![
            (
                "v2 with every org claim",
                json!({
                    "v": 2, "sub": "user_1", "fea": "o:dashboard,o:teams",
                    "o": {"id": "org_1", "slg": "acme", "rol": "admin", "per": "manage,read", "fpm": "3,2"}
                }),
                Some(Org {
                    id: "org_1".into(),
                    slug: Some("acme".into()),
                    role: Some("org:admin".into()),
                    permissions: strings(&[
                        "org:dashboard:manage",
                        "org:dashboard:read",
                        "org:teams:read",
                    ]),
                }),
            ),
            (
                "v2 without o",
                json!({"v": 2, "sub": "user_1", "fea": "u:impersonation", "pla": "u:free"}),
                None,
            ),
            (
                "v2 o without fpm or fea keeps the role",
                json!({"v": 2, "o": {"id": "org_1", "rol": "admin", "slg": "acme"}}),
                Some(Org {
                    id: "org_1".into(),
                    slug: Some("acme".into()),
                    role: Some("org:admin".into()),
                    permissions: vec![],
                }),
            ),
            (
                "v2 u:-only features with o",
                json!({
                    "v": 2, "fea": "u:impersonation,u:memberships,u:feature3",
                    "o": {"id": "org_1", "rol": "admin"}
                }),
                Some(Org {
                    id: "org_1".into(),
                    slug: None,
                    role: Some("org:admin".into()),
                    permissions: vec![],
                }),
            ),
            (
                "v2 written as 2.0 is still v2",
                json!({"v": 2.0, "o": {"id": "org_1"}}),
                Some(Org {
                    id: "org_1".into(),
                    ..Org::default()
                }),
            ),
            (
                "v2 non-string per and fpm grant nothing",
                json!({"v": 2, "fea": "o:a", "o": {"id": "org_1", "per": ["read"], "fpm": 1}}),
                Some(Org {
                    id: "org_1".into(),
                    ..Org::default()
                }),
            ),
            (
                "v2 empty slug and role count as absent",
                json!({"v": 2, "o": {"id": "org_1", "slg": "", "rol": ""}}),
                Some(Org {
                    id: "org_1".into(),
                    ..Org::default()
                }),
            ),
            (
                "v2 empty id",
                json!({"v": 2, "o": {"id": "", "rol": "admin"}}),
                None,
            ),
            (
                "v2 numeric id",
                json!({"v": 2, "o": {"id": 7, "rol": "admin"}}),
                None,
            ),
            (
                "v2 o without id",
                json!({"v": 2, "o": {"rol": "admin"}}),
                None,
            ),
            ("v2 o not an object", json!({"v": 2, "o": "org_1"}), None),
            ("v2 o null", json!({"v": 2, "o": null}), None),
            (
                "v2 ignores flat v1 org claims",
                json!({"v": 2, "org_id": "org_1", "org_role": "org:admin"}),
                None,
            ),
            (
                "v1 flat org claims",
                json!({
                    "sub": "user_1", "org_id": "org_1", "org_slug": "acme", "org_role": "org:admin",
                    "org_permissions": ["org:impersonation:read", "org:impersonation:manage"]
                }),
                Some(Org {
                    id: "org_1".into(),
                    slug: Some("acme".into()),
                    role: Some("org:admin".into()),
                    permissions: strings(&["org:impersonation:read", "org:impersonation:manage"]),
                }),
            ),
            (
                "v1 with only org_id",
                json!({"org_id": "org_1"}),
                Some(Org {
                    id: "org_1".into(),
                    ..Org::default()
                }),
            ),
            (
                "v1 permissions with a non-string element grant nothing",
                json!({"org_id": "org_1", "org_permissions": ["org:a:read", 1]}),
                Some(Org {
                    id: "org_1".into(),
                    ..Org::default()
                }),
            ),
            (
                "v1 permissions that are not an array grant nothing",
                json!({"org_id": "org_1", "org_permissions": "org:a:read"}),
                Some(Org {
                    id: "org_1".into(),
                    ..Org::default()
                }),
            ),
            (
                "v1 without org_id",
                json!({"sub": "user_1", "org_role": "org:admin"}),
                None,
            ),
            ("v1 empty org_id", json!({"org_id": ""}), None),
            ("v1 non-string org_id", json!({"org_id": ["org_1"]}), None),
            (
                "v1 ignores the v2 o object",
                json!({"v": 1, "o": {"id": "org_1", "rol": "admin"}}),
                None,
            ),
            (
                "string \"2\" is not v2",
                json!({"v": "2", "o": {"id": "org_1"}, "org_id": "org_2"}),
                Some(Org {
                    id: "org_2".into(),
                    ..Org::default()
                }),
            ),
            ("empty payload", json!({}), None),
        ];
        for (name, payload, expected) in cases {
            assert_eq!(org(&object(payload)), expected, "{name}");
        }
    }

    #[test]
    fn v1_and_v2_payloads_for_the_same_membership_agree() {
        let v1 = json!({
            "org_id": "org_1", "org_slug": "acme", "org_role": "org:admin",
            "org_permissions": ["org:impersonation:read", "org:impersonation:manage"]
        });
        let v2 = json!({
            "v": 2, "fea": "o:impersonation",
            "o": {"id": "org_1", "slg": "acme", "rol": "admin", "per": "read,manage", "fpm": "3"}
        });
        let v1 = org(&object(v1));
        assert!(v1.is_some());
        assert_eq!(v1, org(&object(v2)));
    }

    #[test]
    fn actor_sub_reads_the_impersonator() {
        let cases: Vec<(Value, Option<&str>)> = vec![
            (
                json!({"act": {"iss": "https://dashboard.clerk.com", "sid": "sess_2", "sub": "user_admin"}}),
                Some("user_admin"),
            ),
            (json!({"sub": "user_1"}), None),
            (json!({"act": null}), None),
            (json!({"act": "user_admin"}), None),
            (json!({"act": {"sid": "sess_2"}}), None),
            (json!({"act": {"sub": 42}}), None),
            (json!({"act": {"sub": ""}}), None),
        ];
        for (payload, expected) in cases {
            let payload = object(payload);
            assert_eq!(actor_sub(&payload), expected, "{payload:?}");
        }
    }
}
