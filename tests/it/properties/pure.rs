//! Pure-function properties: no sockets.

use clerkgate::auth::identity::{HeadersConfig, IdentityBuilder, normalise_name};
use clerkgate::auth::policy::{AuthMode, Policy, RouteConfig};
use clerkgate::proxy::headers::strip_reserved;
use clerkgate::proxy::path::{EncodedSlashes, normalize};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

use super::{cases, spell};
use crate::support::env::{DEFAULT_RESERVED, is_reserved};
use crate::support::fold;

/// Pieces that matter to normalisation: separators, dots and their encodings, params,
/// escapes (valid, invalid, of unreserved characters, of UTF-8), controls.
const PIECES: &[&str] = &[
    "/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", ";", ";x=1", "a", "B", "~",
    "%41", "%7e", "%C3%A9", "é", "%25", "%", "%zz", " ", "%20", "%00", "%3b", "public", "admin",
    "Admin", "feed",
];

fn hostile_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(PIECES), 0..16)
        .prop_map(|pieces| format!("/{}", pieces.concat()))
}

fn policy() -> Policy {
    let route = |path: &str, auth: &str| -> RouteConfig {
        serde_json::from_value(serde_json::json!({"path": path, "auth": auth})).expect("route")
    };
    Policy::new(&[
        route("/public/**", "public"),
        route("/feed/**", "optional"),
        route("/Admin/**", "required"),
        route("/health", "public"),
        route("/public/admin/**", "required"),
    ])
}

proptest! {
    #![proptest_config(cases(512))]

    /// The forwarded form is a fixed point under both policies, renormalises to the same
    /// matching form (so to the same route), and neither form has `//` or dot segments.
    #[test]
    fn normalisation_is_idempotent(raw in hostile_path(), decode in any::<bool>()) {
        let policy_choice = if decode { EncodedSlashes::Decode } else { EncodedSlashes::Reject };
        let Ok(p) = normalize(&raw, policy_choice) else {
            return Ok(());
        };
        for form in [&*p.upstream, &*p.matching] {
            prop_assert!(form.starts_with('/') && !form.contains("//"), "{:?} -> {:?}", raw, form);
            prop_assert!(
                !form.split('/').any(|s| s == "." || s == ".."),
                "{:?} -> {:?}", raw, form
            );
        }
        let routes = policy();
        for again_policy in [EncodedSlashes::Reject, EncodedSlashes::Decode] {
            let again = normalize(&p.upstream, again_policy);
            prop_assert!(again.is_ok(), "{:?} -> {:?} -> {:?}", raw, p.upstream, again);
            let again = again.unwrap();
            prop_assert_eq!(&again.upstream, &p.upstream, "{:?}", raw);
            prop_assert_eq!(&again.matching, &p.matching, "{:?}", raw);
            prop_assert_eq!(
                routes.route(&again.matching).auth,
                routes.route(&p.matching).auth,
                "{:?}", raw
            );
        }
    }
}

/// One segment of a canonical path, with the ways it can be obfuscated.
#[derive(Debug, Clone)]
struct Segment {
    name: String,
    /// Per character: percent-encode it, and with lower-case hex.
    encode: Vec<(bool, bool)>,
    /// A `;param` suffix (dropped for matching).
    param: Option<String>,
    /// Noise before the segment: 0 none, 1 `./`, 2 `junk/../`, 3 an empty segment,
    /// 4 `%2e/`, 5 `x/%2E%2e;p/`.
    noise: u8,
}

fn segment() -> impl Strategy<Value = Segment> {
    let name = prop_oneof![
        proptest::sample::select(&["public", "Public", "feed", "admin", "Admin", "health"][..])
            .prop_map(str::to_owned),
        "[a-zA-Z0-9_~-]{1,6}".prop_filter("not a dot segment", |s| s != "." && s != ".."),
    ];
    (
        name,
        proptest::collection::vec(any::<(bool, bool)>(), 8),
        proptest::option::weighted(0.2, "[a-z=0-9]{0,4}"),
        0..6u8,
    )
        .prop_map(|(name, encode, param, noise)| Segment {
            name,
            encode,
            param,
            noise,
        })
}

fn obfuscate(segments: &[Segment], trailing: bool) -> String {
    let mut out = String::new();
    for s in segments {
        out.push_str(match s.noise {
            1 => "/.",
            2 => "/junk/..",
            3 => "/",
            4 => "/%2e",
            5 => "/x/%2E%2e;p",
            _ => "",
        });
        out.push('/');
        for (c, (encode, lower)) in s
            .name
            .chars()
            .zip(s.encode.iter().chain(std::iter::repeat(&(false, false))))
        {
            match (encode, lower) {
                (true, true) => out.push_str(&format!("%{:02x}", c as u32)),
                (true, false) => out.push_str(&format!("%{:02X}", c as u32)),
                _ => out.push(c),
            }
        }
        if let Some(param) = &s.param {
            out.push(';');
            out.push_str(param);
        }
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    out
}

proptest! {
    #![proptest_config(cases(512))]

    /// Any spelling of a path (encoded unreserved characters, dot segments raw or encoded,
    /// empty segments, `;params`) matches the route the canonical path matches: the rules see
    /// the resource the upstream will serve.
    #[test]
    fn route_matching_agrees_across_spellings(
        segments in proptest::collection::vec(segment(), 0..5),
        trailing in any::<bool>(),
    ) {
        let mut canonical = String::new();
        for s in &segments {
            canonical.push('/');
            canonical.push_str(&s.name);
        }
        if trailing || segments.is_empty() {
            canonical.push('/');
        }
        let spelled = obfuscate(&segments, trailing);
        let routes = policy();
        for slashes in [EncodedSlashes::Reject, EncodedSlashes::Decode] {
            let p = normalize(&spelled, slashes);
            prop_assert!(p.is_ok(), "{:?}: {:?}", spelled, p);
            let p = p.unwrap();
            prop_assert_eq!(&*p.matching, canonical.as_str(), "{:?}", spelled);
            if segments.iter().all(|s| s.param.is_none()) {
                prop_assert_eq!(&*p.upstream, canonical.as_str(), "{:?}", spelled);
            }
            let direct = normalize(&canonical, slashes).expect("canonical path");
            prop_assert_eq!(
                routes.route(&p.matching).auth,
                routes.route(&direct.matching).auth,
                "{:?} vs {:?}", spelled, canonical
            );
        }
    }
}

#[test]
fn route_matching_sanity() {
    let routes = policy();
    for (path, want) in [
        ("/public/x", AuthMode::Public),
        ("/public/admin/x", AuthMode::Public),
        ("/feed", AuthMode::Optional),
        ("/admin/x", AuthMode::Required),
        ("/health", AuthMode::Public),
        ("/orders", AuthMode::Required),
    ] {
        assert_eq!(routes.route(path).auth, want, "{path}");
    }
}

fn header_name() -> impl Strategy<Value = String> {
    let base = prop_oneof![
        // The defaults, `x-clerk-claims` for the prefix, and `x-tenant`, reserved only when
        // configured.
        3 => proptest::sample::select(
            [DEFAULT_RESERVED, &["x-clerk-claims", "x-tenant"][..]].concat()
        )
        .prop_map(str::to_owned),
        1 => "[a-z0-9_-]{0,8}".prop_map(|s| format!("x-clerk-{s}")),
        2 => "[a-zA-Z0-9_-]{1,14}",
    ];
    (base, proptest::collection::vec(any::<(bool, bool)>(), 20))
        .prop_map(|(base, flips)| spell(&base, &flips))
}

proptest! {
    #![proptest_config(cases(512))]

    /// `strip_reserved` removes every header whose folded name is reserved or `x-clerk-*`,
    /// keeps every other header with its values (in order per name), and counts distinct names removed.
    #[test]
    fn strip_reserved_leaves_nothing_reserved(
        names in proptest::collection::vec(header_name(), 0..24),
        extra in proptest::option::of("[a-zA-Z_-]{1,10}"),
    ) {
        let mut config = HeadersConfig::default();
        config.reserved.extend(extra.clone());
        let reserved = IdentityBuilder::new(&config).reserved().to_vec();
        let model = |name: &str| {
            is_reserved(name, &[]) || extra.as_deref().is_some_and(|e| fold(e) == fold(name))
        };
        prop_assert!(reserved.iter().all(|r| *r == normalise_name(r)));

        let mut headers = HeaderMap::new();
        for (i, name) in names.iter().enumerate() {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("token characters");
            headers.append(name, HeaderValue::from_str(&format!("v{i}")).expect("value"));
        }
        let before: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        let distinct = headers.keys().filter(|n| model(n.as_str())).count();
        let removed = strip_reserved(&mut headers, &reserved);
        prop_assert_eq!(removed, distinct);
        let after: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        let expected: Vec<(String, String)> =
            before.into_iter().filter(|(n, _)| !model(n)).collect();
        // HeaderMap keeps the order of a name's values, not the order between names.
        let by_name = |mut v: Vec<(String, String)>| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        prop_assert_eq!(by_name(after), by_name(expected));
    }
}
