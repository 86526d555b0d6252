//! Properties over real sockets: generated requests through one clerkgate per property, in
//! front of the recording echo upstream, against the fake Clerk.
//!
//! Requests are written byte for byte on a fresh connection (reqwest would normalise header
//! names), so the reserved names arrive in exactly the spellings generated: mixed case, `_` for
//! `-`, repeated lines, arbitrary `x-clerk-*` names.

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};
use tokio::runtime::Runtime;

use super::{cases, spell};
use crate::support::env::{
    self, DEFAULT_RESERVED, EXTRA_RESERVED, EXTRA_RESERVED_NAMES, shared_clerk,
};
use crate::support::raw::send_raw;
use crate::support::{FakeClerk, Sidecar, SigningKey, Upstream};

/// Routes: `/public/**` public, `/feed/**` optional, everything else required.
const ROUTES: &str = r#"
[[routes]]
path = "/public/**"
auth = "public"
[[routes]]
path = "/feed/**"
auth = "optional"
"#;

/// Names next to the reserved ones that are not reserved, and must reach the upstream.
const ORDINARY: &[&str] = &[
    "x-request-id",
    "x-user-idx",
    "x-users-id",
    "user-id",
    "x-org",
    "x-clerk",
    "x-clerkgate",
    "x-tenant-name",
    "accept-language",
];

/// Every reserved name with [`EXTRA_RESERVED`], folded (`x-clerk-claims` standing for the
/// `x-clerk-*` prefix).
fn reserved_names() -> Vec<&'static str> {
    let mut names = DEFAULT_RESERVED.to_vec();
    names.push("x-clerk-claims");
    names.extend(EXTRA_RESERVED_NAMES);
    names
}

fn is_reserved(name: &str) -> bool {
    env::is_reserved(name, EXTRA_RESERVED_NAMES)
}

/// Every test in this binary shares one runtime, so the fake Clerk and the clerkgate of each
/// property outlive the single case (and the single test) that started them.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// The shared fake Clerk (no property changes it or counts its fetches).
fn clerk() -> Arc<FakeClerk> {
    shared_clerk()
}

/// A key with the fake Clerk's kid that the fake Clerk never published.
fn outsider() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate("ins_fake_1").expect("key"))
}

/// clerkgate and its upstream, owned by one property.
pub struct Gate {
    pub clerk: Arc<FakeClerk>,
    pub upstream: Upstream,
    sidecar: Sidecar,
}

impl Gate {
    pub fn start(extra: &str) -> Gate {
        let clerk = clerk();
        runtime().block_on(async {
            let upstream = Upstream::start().await;
            let sidecar = Sidecar::start(&clerk, &upstream, extra).await;
            Gate {
                clerk,
                upstream,
                sidecar,
            }
        })
    }

    /// One request, written as given; the status and body of the answer.
    pub fn send(&self, target: &str, headers: &[(String, String)]) -> (u16, String) {
        let lines: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| (n.clone(), v.clone().into_bytes()))
            .collect();
        self.send_bytes(target, &lines)
    }

    /// [`Gate::send`] with header values as raw bytes (obs-text included).
    pub fn send_bytes(&self, target: &str, headers: &[(String, Vec<u8>)]) -> (u16, String) {
        let mut request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.sidecar.proxy
        )
        .into_bytes();
        for (name, value) in headers {
            request.extend_from_slice(name.as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let mut replies = runtime().block_on(send_raw(self.sidecar.proxy, &request));
        assert_eq!(replies.len(), 1, "one response to {target}");
        let reply = replies.remove(0);
        (reply.status, reply.text())
    }
}

/// A reserved name in some spelling, or an arbitrary `x-clerk-*` name.
fn reserved_name() -> impl Strategy<Value = String> {
    let base = prop_oneof![
        3 => proptest::sample::select(reserved_names()).prop_map(str::to_owned),
        1 => "[a-z0-9-]{1,10}".prop_map(|s| format!("x-clerk-{s}")),
    ];
    (base, proptest::collection::vec(any::<(bool, bool)>(), 24))
        .prop_map(|(base, flips)| spell(&base, &flips))
}

fn ordinary_name() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(ORDINARY),
        proptest::collection::vec((any::<bool>(), Just(false)), 24),
    )
        .prop_map(|(base, flips)| spell(base, &flips))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Required,
    Optional,
    Public,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Self::Required => "/orders/42",
            Self::Optional => "/feed/latest",
            Self::Public => "/public/page",
        }
    }
}

#[derive(Debug, Clone)]
enum Credential {
    None,
    /// A valid token, optionally with an active organization and the mapped `plan` claim,
    /// sent as a bearer token or as the `__session` cookie.
    Valid {
        org: bool,
        plan: bool,
        cookie: bool,
    },
    /// Not a token at all.
    Garbage(String),
}

fn credential() -> impl Strategy<Value = Credential> {
    prop_oneof![
        1 => Just(Credential::None),
        3 => any::<(bool, bool, bool)>()
            .prop_map(|(org, plan, cookie)| Credential::Valid { org, plan, cookie }),
        1 => "[A-Za-z0-9._-]{1,40}".prop_map(Credential::Garbage),
    ]
}

#[derive(Debug, Clone)]
struct Request {
    route: Route,
    credential: Credential,
    /// `(reserved?, name)`: values are generated from the position so each is unique.
    headers: Vec<(bool, String)>,
}

fn request() -> impl Strategy<Value = Request> {
    let route = prop_oneof![
        Just(Route::Required),
        Just(Route::Optional),
        Just(Route::Public)
    ];
    let header = prop_oneof![
        3 => reserved_name().prop_map(|n| (true, n)),
        1 => ordinary_name().prop_map(|n| (false, n)),
    ];
    (
        route,
        credential(),
        proptest::collection::vec(header, 0..12),
    )
        .prop_map(|(route, credential, headers)| Request {
            route,
            credential,
            headers,
        })
}

fn gate_for_headers() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| Gate::start(&format!("{ROUTES}{EXTRA_RESERVED}")))
}

proptest! {
    #![proptest_config(cases(96))]

    /// For any request, the upstream sees reserved names only with the values clerkgate derived
    /// from a valid token, and every ordinary header exactly as sent.
    #[test]
    fn no_client_header_under_a_reserved_name_reaches_the_upstream(req in request()) {
        let gate = gate_for_headers();
        let clerk = &gate.clerk;

        let mut claims = clerk.claims("user_prop");
        if let Credential::Valid { org, plan, .. } = req.credential {
            if org {
                claims["o"] = json!({"id": "org_prop", "slg": "acme", "rol": "admin"});
            }
            if plan {
                claims["public_metadata"] = json!({"plan": "gold"});
            }
        }
        let token = clerk.mint(claims.clone());
        let mut sent: Vec<(String, String)> = Vec::new();
        match &req.credential {
            Credential::None => {}
            Credential::Valid { cookie: true, .. } => sent.push((
                "Cookie".into(),
                format!("__session={token}; __client_uat={}", claims["iat"]),
            )),
            Credential::Valid { cookie: false, .. } => {
                sent.push(("Authorization".into(), format!("Bearer {token}")));
            }
            Credential::Garbage(g) => sent.push(("Authorization".into(), format!("Bearer {g}"))),
        }
        for (i, (_, name)) in req.headers.iter().enumerate() {
            sent.push((name.clone(), format!("client-{i}")));
        }

        let before = gate.upstream.count();
        let (status, body) = gate.send(req.route.path(), &sent);
        let valid = matches!(req.credential, Credential::Valid { .. });
        if req.route == Route::Required && !valid {
            prop_assert_eq!(status, 401, "{}", body);
            prop_assert_eq!(gate.upstream.count(), before);
            return Ok(());
        }
        prop_assert_eq!(status, 200, "{}", body);
        prop_assert_eq!(gate.upstream.count(), before + 1);
        let seen = gate.upstream.last().headers;

        // Ordinary headers arrive, every value, under the (lower-cased) name sent.
        for (i, (reserved, name)) in req.headers.iter().enumerate() {
            if !reserved {
                let value = format!("client-{i}");
                prop_assert!(
                    seen.get_all(name.to_ascii_lowercase()).iter().any(|v| v == value.as_str()),
                    "ordinary header {} = {} was lost: {:?}", name, value, seen
                );
            }
        }

        // Reserved names: only clerkgate's own, and only for a verified identity.
        let identity = valid && req.route != Route::Public;
        let payload = token.split('.').nth(1).expect("payload segment");
        let sid = claims["sid"].as_str().expect("sid");
        for (name, value) in &seen {
            let value = value.to_str().unwrap_or("");
            prop_assert!(
                !value.starts_with("client-") || !is_reserved(name.as_str()),
                "client value under {}: {:?}", name, seen
            );
            if !is_reserved(name.as_str()) {
                continue;
            }
            prop_assert!(identity, "{} reached the upstream of an anonymous request: {:?}", name, seen);
            let expected: Option<&str> = match name.as_str() {
                "x-user-id" => Some("user_prop"),
                "x-session-id" => Some(sid),
                "x-clerk-claims" => Some(payload),
                "x-clerk-token-type" => Some("session_token"),
                "x-plan" => Some("gold"),
                "x-org-id" => Some("org_prop"),
                "x-org-slug" => Some("acme"),
                "x-org-role" | "x-org-permissions" => None,
                other => {
                    prop_assert!(false, "unexpected identity header {}: {:?}", other, seen);
                    None
                }
            };
            if let Some(expected) = expected {
                prop_assert_eq!(value, expected, "{}", name);
            }
            prop_assert_eq!(seen.get_all(name).iter().count(), 1, "{} repeated", name);
        }
        if identity {
            prop_assert_eq!(seen.get("x-user-id").map(|v| v.as_bytes()), Some(&b"user_prop"[..]));
            prop_assert_eq!(seen.get("x-session-id").map(|v| v.as_bytes()), Some(sid.as_bytes()));
            let org = matches!(req.credential, Credential::Valid { org: true, .. });
            prop_assert_eq!(seen.contains_key("x-org-id"), org);
            let plan = matches!(req.credential, Credential::Valid { plan: true, .. });
            prop_assert_eq!(seen.contains_key("x-plan"), plan);
        }
    }
}

/// How a valid token is turned into one that verification rejects.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace one character of segment `segment` (0 header, 1 payload, 2 signature).
    Flip {
        segment: usize,
        at: Index,
        with: char,
    },
    /// Swap two segments.
    Swap(usize),
    /// Keep only a prefix.
    Truncate(Index),
    /// Sign the same header and claims with a key of the same kid that Clerk never published.
    OtherKey,
    /// Re-sign, with the real key, claims that break one rule.
    Claim(usize),
    /// Re-sign, with the real key, under a header that breaks one rule.
    Header(usize),
}

/// Claim edit `i` (of [`CLAIM_EDITS`]), each of which makes a correctly signed token invalid.
fn claim_edit(i: usize, claims: &mut Value) {
    let now = crate::support::now();
    let object = claims.as_object_mut().expect("claims are an object");
    match i % CLAIM_EDITS {
        0 => {
            object.insert("exp".into(), json!(now - 60));
        }
        1 => {
            object.insert("nbf".into(), json!(now + 600));
        }
        2 => {
            object.insert("iat".into(), json!(now + 600));
        }
        3 => {
            object.insert("iss".into(), json!("https://evil.clerk.accounts.dev"));
        }
        4 => {
            let iss = format!("{}/", object["iss"].as_str().unwrap_or(""));
            object.insert("iss".into(), json!(iss));
        }
        5 => {
            object.remove("sub");
        }
        6 => {
            object.insert("sub".into(), json!(""));
        }
        7 => {
            object.insert("sub".into(), json!(42));
        }
        8 => {
            object.insert("sub".into(), json!("mch_2abc"));
        }
        9 => {
            object.insert("exp".into(), json!((now + 60).to_string()));
        }
        10 => {
            object.remove("exp");
        }
        _ => {
            object.insert("sts".into(), json!("pending"));
        }
    }
}

/// Expired, nbf and iat in the future, another issuer, the issuer with a trailing slash, no
/// sub, empty sub, numeric sub, a machine sub, exp as a string, no exp, a pending session.
const CLAIM_EDITS: usize = 12;

fn header_edit(i: usize) -> Value {
    let headers = [
        json!({"alg": "RS384", "kid": "ins_fake_1", "typ": "JWT"}),
        json!({"alg": "RS512", "kid": "ins_fake_1", "typ": "JWT"}),
        json!({"alg": "none", "kid": "ins_fake_1", "typ": "JWT"}),
        json!({"alg": "HS256", "kid": "ins_fake_1", "typ": "JWT"}),
        json!({"alg": "PS256", "kid": "ins_fake_1", "typ": "JWT"}),
        json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "at+jwt"}),
        json!({"alg": "RS256", "kid": "ins_fake_1", "crit": ["exp"]}),
        json!({"alg": "RS256", "kid": "ins_fake_1", "cat": "cl_B7d4PD333AAA"}),
        json!({"alg": "RS256", "kid": "", "typ": "JWT"}),
        json!({"alg": "RS256", "kid": 1, "typ": "JWT"}),
    ];
    headers[i % headers.len()].clone()
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let replacement = proptest::sample::select(&b"AQgw019-_.=+/%~ "[..]).prop_map(char::from);
    prop_oneof![
        4 => (0..3usize, any::<Index>(), replacement)
            .prop_map(|(segment, at, with)| Mutation::Flip { segment, at, with }),
        1 => (0..3usize).prop_map(Mutation::Swap),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => Just(Mutation::OtherKey),
        2 => (0..CLAIM_EDITS).prop_map(Mutation::Claim),
        2 => (0..10usize).prop_map(Mutation::Header),
    ]
}

/// The token after `m`, or `None` when the mutation would leave it unchanged.
fn mutate(clerk: &FakeClerk, m: &Mutation) -> Option<String> {
    let claims = clerk.claims("user_prop");
    let header = json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "JWT"});
    let token = clerk.sign(header.clone(), claims.clone());
    let parts: Vec<&str> = token.split('.').collect();
    Some(match m {
        Mutation::Flip { segment, at, with } => {
            let mut seg: Vec<char> = parts[*segment].chars().collect();
            let i = at.index(seg.len());
            if seg[i] == *with {
                return None;
            }
            seg[i] = *with;
            let mut parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
            parts[*segment] = seg.into_iter().collect();
            parts.join(".")
        }
        Mutation::Swap(i) => {
            let mut parts = parts.clone();
            parts.swap(*i, (*i + 1) % 3);
            parts.join(".")
        }
        Mutation::Truncate(at) => token[..at.index(token.len())].to_owned(),
        Mutation::OtherKey => outsider().sign(&header, &claims),
        Mutation::Claim(i) => {
            let mut claims = claims;
            claim_edit(*i, &mut claims);
            clerk.sign(header, claims)
        }
        Mutation::Header(i) => clerk.sign(header_edit(*i), claims),
    })
}

fn gate_for_tokens() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| Gate::start(""))
}

proptest! {
    #![proptest_config(cases(128))]

    /// For any token verification rejects, on a route that requires a session: 401 with a
    /// reason, and the upstream receives nothing.
    #[test]
    fn a_rejected_token_reaches_nothing(m in mutation(), cookie in any::<bool>()) {
        let gate = gate_for_tokens();
        let Some(token) = mutate(&gate.clerk, &m) else {
            return Ok(());
        };
        let credential = if cookie {
            ("Cookie".to_owned(), format!("__session={token}; __client_uat=1"))
        } else {
            ("Authorization".to_owned(), format!("Bearer {token}"))
        };
        let before = gate.upstream.count();
        let (status, body) = gate.send("/orders/1", &[credential]);
        prop_assert_eq!(status, 401, "{:?} -> {}", m, body);
        let reason = serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default();
        prop_assert!(!reason.is_empty(), "no reason for {:?}: {}", m, body);
        prop_assert_eq!(gate.upstream.count(), before, "{:?} reached the upstream", m);
    }
}

/// The control for the property above: the unmutated token, by both carriers, is forwarded.
/// On a clerkgate of its own: the property counts upstream requests while this one runs.
#[test]
fn the_unmutated_token_is_forwarded() {
    let gate = Gate::start("");
    let claims = gate.clerk.claims("user_prop");
    let token = gate.clerk.mint(claims.clone());
    for credential in [
        ("Authorization".to_owned(), format!("Bearer {token}")),
        (
            "Cookie".to_owned(),
            format!("__session={token}; __client_uat={}", claims["iat"]),
        ),
    ] {
        let (status, body) = gate.send("/orders/1", &[credential]);
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(gate.upstream.count(), 2);
    let payload = URL_SAFE_NO_PAD
        .decode(token.split('.').nth(1).expect("payload"))
        .expect("base64url");
    assert!(serde_json::from_slice::<Value>(&payload).is_ok());
}
