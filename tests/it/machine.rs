//! Machine credentials (API keys, M2M and OAuth tokens) and entitlement rules (plans,
//! features, reverification, scopes), over real sockets against the fake Clerk, asserting on
//! what the fake Backend API was asked and what the upstream received.
//!
//! The SDK differential tests (`@clerk/backend` as the oracle) are in [`sdk`].

mod sdk;

use std::time::Duration;

use clerkgate::telemetry::{MachineResult, MachineTokenLabel};
use serde_json::{Value, json};

use crate::support::fake_clerk::{api_key_json, m2m_json, oauth_json};
use crate::support::{Failure, FakeClerk, Sidecar, Upstream, client, now};

const CAT_M2M: &str = "cl_B7d4PD333AAA";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Routes used by most tests: one per `accepts` setting.
const ROUTES: &str = r#"
[[routes]]
path = "/keys/**"
accepts = ["api_key"]
[[routes]]
path = "/write/**"
accepts = ["api_key"]
scopes = ["write"]
[[routes]]
path = "/machines/**"
accepts = ["m2m_token"]
[[routes]]
path = "/oauth/**"
accepts = ["oauth_token"]
[[routes]]
path = "/any/**"
accepts = "any"
[[routes]]
path = "/maybe/**"
auth = "optional"
accepts = ["api_key"]
[[routes]]
path = "/pro/**"
accepts = "any"
plans = ["pro"]
"#;

async fn start(extra: &str) -> (FakeClerk, Upstream, Sidecar) {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, &format!("{ROUTES}\n{extra}")).await;
    (clerk, upstream, gate)
}

struct Reply {
    status: u16,
    reason: String,
    body: String,
}

async fn get(gate: &Sidecar, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Reply {
    let mut req = client().get(gate.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("clerkgate answers");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let reason = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Reply {
        status,
        reason,
        body,
    }
}

fn upstream_header(upstream: &Upstream, name: &str) -> Option<String> {
    upstream
        .last()
        .headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn m2m_jwt(clerk: &FakeClerk, sub: &str, scopes: &str, cat: &str) -> String {
    let n = now();
    clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "JWT", "cat": cat}),
        json!({"iss": clerk.issuer(), "sub": sub, "iat": n, "nbf": n - 5, "exp": n + 60,
               "jti": "mt_jwt_1", "scopes": scopes}),
    )
}

fn oauth_jwt(clerk: &FakeClerk, claims: Value) -> String {
    let n = now();
    let mut payload = json!({"iss": clerk.issuer(), "sub": "user_9", "iat": n, "exp": n + 60,
                             "jti": "oat_jwt_1", "client_id": "client_abc"});
    for (k, v) in claims.as_object().unwrap() {
        payload[k] = v.clone();
    }
    clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "at+jwt"}),
        payload,
    )
}

#[tokio::test]
async fn api_key_is_verified_once_and_its_identity_forwarded() {
    let (clerk, upstream, gate) = start("").await;
    clerk.machine_answer(
        "ak_live_x",
        200,
        api_key_json("ak_0123", "user_7", &["read"]),
    );
    let r = get(
        &gate,
        "/keys/a",
        Some("ak_live_x"),
        &[("x-clerk-machine-id", "mch_forged")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let calls = clerk.machine_calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.path, "/api_keys/verify", "no /v1 prefix, as the SDK");
    assert_eq!(call.body, json!({"secret": "ak_live_x"}));
    assert_eq!(
        call.authorization.as_deref(),
        Some(format!("Bearer {}", clerk.secret_key).as_str())
    );
    assert_eq!(call.api_version.as_deref(), Some("2026-05-12"));
    assert_eq!(call.content_type.as_deref(), Some("application/json"));
    for (name, want) in [
        ("x-clerk-token-type", Some("api_key")),
        ("x-user-id", Some("user_7")),
        ("x-clerk-scopes", Some("read")),
        ("x-clerk-token-id", Some("ak_0123")),
        ("x-clerk-token-name", Some("ci key")),
        ("x-org-id", None),
        ("x-clerk-machine-id", None),
        ("authorization", None),
        ("x-session-id", None),
    ] {
        assert_eq!(upstream_header(&upstream, name).as_deref(), want, "{name}");
    }
    // A second request within cache_ttl_seconds: no second call.
    let r = get(&gate, "/keys/b", Some("ak_live_x"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(clerk.machine_calls().len(), 1);
    let m = &gate.metrics.machine_verifications;
    assert_eq!(m.get(MachineTokenLabel::ApiKey, MachineResult::Ok), 1);
    assert_eq!(m.get(MachineTokenLabel::ApiKey, MachineResult::CacheHit), 1);
    assert!(
        gate.metrics_text()
            .await
            .contains("clerkgate_machine_cache_entries 1")
    );
}

#[tokio::test]
async fn an_org_key_sets_the_org_header() {
    let (clerk, upstream, gate) = start("").await;
    clerk.machine_answer("ak_org", 200, api_key_json("ak_1", "org_5", &[]));
    assert_eq!(get(&gate, "/keys", Some("ak_org"), &[]).await.status, 200);
    assert_eq!(
        upstream_header(&upstream, "x-org-id").as_deref(),
        Some("org_5")
    );
    assert_eq!(upstream_header(&upstream, "x-user-id"), None);
}

#[tokio::test]
async fn the_cache_ends_at_the_ttl_and_never_outlives_the_expiration() {
    let (clerk, _upstream, gate) = start("[machine]\ncache_ttl_seconds = 1\n").await;
    clerk.machine_answer("ak_ttl", 200, api_key_json("ak_1", "user_1", &[]));
    assert_eq!(get(&gate, "/keys", Some("ak_ttl"), &[]).await.status, 200);
    // Revoked at Clerk: refused once the TTL (the revocation delay) has passed.
    let mut revoked = api_key_json("ak_1", "user_1", &[]);
    revoked["revoked"] = json!(true);
    clerk.machine_answer("ak_ttl", 200, revoked);
    assert_eq!(get(&gate, "/keys", Some("ak_ttl"), &[]).await.status, 200);
    assert_eq!(clerk.machine_calls().len(), 1, "cached within the TTL");
    // Refused by 1.2 s: polled, since requests within the TTL are cache hits (no call).
    let mut r = None;
    let refused = crate::support::eventually(Duration::from_millis(1200), async || {
        let reply = get(&gate, "/keys", Some("ak_ttl"), &[]).await;
        let done = reply.status != 200;
        r = Some(reply);
        done
    })
    .await;
    let r = r.expect("one request");
    assert!(refused, "still served from the cache: {}", r.body);
    assert_eq!((r.status, r.reason.as_str()), (401, "token-revoked"));
    assert_eq!(clerk.machine_calls().len(), 2);

    // A key expiring in 700 ms is not trusted past that, whatever the TTL.
    let (clerk, _upstream, gate) = start("[machine]\ncache_ttl_seconds = 30\n").await;
    let mut short = api_key_json("ak_2", "user_1", &[]);
    short["expiration"] = json!(now_ms() + 700);
    clerk.machine_answer("ak_short", 200, short);
    assert_eq!(get(&gate, "/keys", Some("ak_short"), &[]).await.status, 200);
    // Refused by 2 s, whatever the 30 s TTL.
    let mut r = None;
    let refused = crate::support::eventually(Duration::from_millis(2000), async || {
        let reply = get(&gate, "/keys", Some("ak_short"), &[]).await;
        let done = reply.status != 200;
        r = Some(reply);
        done
    })
    .await;
    let r = r.expect("one request");
    assert!(refused, "trusted past its expiration: {}", r.body);
    assert_eq!((r.status, r.reason.as_str()), (401, "token-expired"));
}

#[tokio::test]
async fn backend_api_answers_map_to_precise_refusals() {
    let (clerk, upstream, gate) = start("[machine]\nverify_timeout_ms = 300\n").await;
    // 404: token-invalid, and negatively cached.
    let r = get(&gate, "/keys", Some("ak_unknown"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-invalid"));
    let r = get(&gate, "/keys", Some("ak_unknown"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-invalid"));
    assert_eq!(clerk.machine_calls().len(), 1, "refusal cached");
    // Stricter than the SDK: 200 with revoked/expired is refused.
    let mut revoked = api_key_json("ak_r", "user_1", &[]);
    revoked["revoked"] = json!(true);
    clerk.machine_answer("ak_revoked", 200, revoked);
    let r = get(&gate, "/keys", Some("ak_revoked"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-revoked"));
    let mut expired = api_key_json("ak_e", "user_1", &[]);
    expired["expired"] = json!(true);
    clerk.machine_answer("ak_expired", 200, expired);
    let r = get(&gate, "/keys", Some("ak_expired"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-expired"));
    // Clerk refusing our secret key: 503, never a pass.
    clerk.machine_answer("ak_badsecret", 401, json!({"errors": []}));
    let r = get(&gate, "/keys", Some("ak_badsecret"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (503, "secret-key-invalid"));
    // 5xx, then a timeout: 503, not cached.
    clerk.machine_answer("ak_ok", 200, api_key_json("ak_o", "user_1", &[]));
    clerk.fail_machine(Failure::Status(500));
    let r = get(&gate, "/keys", Some("ak_ok"), &[]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (503, "machine-verify-unavailable")
    );
    clerk.fail_machine(Failure::Hang);
    let r = get(&gate, "/keys", Some("ak_ok"), &[]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (503, "machine-verify-unavailable")
    );
    // An optional route never hides the outage behind "anonymous".
    let r = get(&gate, "/maybe", Some("ak_ok"), &[]).await;
    assert_eq!(r.status, 503);
    clerk.fail_machine(Failure::None);
    let before = clerk.machine_calls().len();
    assert_eq!(get(&gate, "/keys", Some("ak_ok"), &[]).await.status, 200);
    assert_eq!(
        clerk.machine_calls().len(),
        before + 1,
        "the outage was not cached"
    );
    assert_eq!(upstream.count(), 1);
    // A 429: Clerk's Retry-After pauses every further call (other keys included).
    clerk.fail_machine(Failure::RetryAfter(30));
    let r = get(&gate, "/keys", Some("ak_limited_1"), &[]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (503, "machine-verify-unavailable")
    );
    clerk.fail_machine(Failure::None);
    let calls = clerk.machine_calls().len();
    let r = get(&gate, "/keys", Some("ak_limited_2"), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        clerk.machine_calls().len(),
        calls,
        "paused: no call was made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_new_key_make_one_call() {
    let (clerk, upstream, gate) = start("").await;
    clerk.machine_answer("ak_burst", 200, api_key_json("ak_b", "user_1", &[]));
    clerk.hold_api();
    let http = client();
    let url = gate.url("/keys");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let req = http.get(&url).bearer_auth("ak_burst");
        tasks.push(tokio::spawn(async move {
            req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
    }
    assert!(
        crate::support::eventually(Duration::from_secs(5), async || {
            !clerk.machine_calls().is_empty()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    clerk.release_api();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(clerk.machine_calls().len(), 1);
    assert_eq!(upstream.count(), 100);
}

#[tokio::test]
async fn types_not_accepted_never_reach_the_backend_api() {
    let (clerk, upstream, gate) = start("").await;
    let r = get(&gate, "/keys", Some("mt_abc"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-type-mismatch"));
    let session = clerk.session_token("user_1");
    let r = get(&gate, "/keys", Some(&session), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-type-mismatch"));
    // No header token on a machine-only route: the SDK's mismatch too (cookies not read).
    let r = get(
        &gate,
        "/keys",
        None,
        &[("cookie", &format!("__session={session}; __client_uat=1"))],
    )
    .await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-type-mismatch"));
    // Default routes are session-only: an API key is not a JWT (SDK parity).
    let r = get(&gate, "/other", Some("ak_abc"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-invalid"));
    // Malformed opaque values are refused before any call.
    let long = format!("ak_{}", "a".repeat(600));
    let r = get(&gate, "/keys", Some(&long), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-invalid"));
    assert!(clerk.machine_calls().is_empty());
    assert_eq!(upstream.count(), 0);
    // Optional route with no token at all: anonymous, identity headers stripped.
    let r = get(&gate, "/maybe", None, &[("x-clerk-token-type", "api_key")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(upstream_header(&upstream, "x-clerk-token-type"), None);
}

#[tokio::test]
async fn m2m_jwts_are_verified_locally_and_must_name_this_machine() {
    let (clerk, upstream, gate) = start("[machine]\nmachine_id = \"mch_self\"\n").await;
    let ok = m2m_jwt(&clerk, "mch_a", "mch_self mch_b", CAT_M2M);
    let r = get(&gate, "/machines", Some(&ok), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        upstream_header(&upstream, "x-clerk-machine-id").as_deref(),
        Some("mch_a")
    );
    assert_eq!(
        upstream_header(&upstream, "x-clerk-token-type").as_deref(),
        Some("m2m_token")
    );
    assert_eq!(
        upstream_header(&upstream, "x-clerk-scopes").as_deref(),
        Some("mch_self,mch_b")
    );
    // Verified once; the second request is a cache hit (a hash and a lookup).
    assert_eq!(get(&gate, "/machines", Some(&ok), &[]).await.status, 200);
    let m = &gate.metrics.machine_verifications;
    assert_eq!(m.get(MachineTokenLabel::M2mToken, MachineResult::Ok), 1);
    assert_eq!(
        m.get(MachineTokenLabel::M2mToken, MachineResult::CacheHit),
        1
    );
    let other = m2m_jwt(&clerk, "mch_a", "mch_b", CAT_M2M);
    let r = get(&gate, "/machines", Some(&other), &[]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (403, "machine-scope-missing")
    );
    let session_cat = m2m_jwt(&clerk, "mch_a", "mch_self", "cl_B7d4PD111AAA");
    let r = get(&gate, "/machines", Some(&session_cat), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-invalid"));
    // Stricter than the SDK: another instance's issuer is refused.
    let n = now();
    let foreign = clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "cat": CAT_M2M}),
        json!({"iss": "https://other.clerk.accounts.dev", "sub": "mch_a", "iat": n, "exp": n + 60, "scopes": "mch_self"}),
    );
    let r = get(&gate, "/machines", Some(&foreign), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-invalid-issuer"));
    // Forged signature.
    let mut forged = ok.clone();
    forged.pop();
    forged.push(if ok.ends_with('A') { 'B' } else { 'A' });
    let r = get(&gate, "/machines", Some(&forged), &[]).await;
    assert_eq!(r.status, 401);
    assert!(
        clerk.machine_calls().is_empty(),
        "JWTs never call the Backend API"
    );
}

#[tokio::test]
async fn opaque_m2m_tokens_use_the_machine_secret_key_and_the_scope_rule() {
    let (clerk, _upstream, gate) =
        start("[machine]\nmachine_id = \"mch_self\"\nmachine_secret_key = \"ak_machine_secret\"\n")
            .await;
    clerk.set_machine_secret("ak_machine_secret");
    clerk.machine_answer("mt_ok", 200, m2m_json("mt_1", "mch_a", &["mch_self"]));
    clerk.machine_answer("mt_other", 200, m2m_json("mt_2", "mch_a", &["mch_b"]));
    assert_eq!(
        get(&gate, "/machines", Some("mt_ok"), &[]).await.status,
        200
    );
    let r = get(&gate, "/machines", Some("mt_other"), &[]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (403, "machine-scope-missing")
    );
    let calls = clerk.machine_calls();
    assert_eq!(calls[0].path, "/m2m_tokens/verify");
    assert_eq!(calls[0].body, json!({"token": "mt_ok"}));
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some("Bearer ak_machine_secret")
    );
}

#[tokio::test]
async fn oauth_tokens_jwt_and_opaque() {
    let (clerk, upstream, gate) = start("").await;
    let token = oauth_jwt(&clerk, json!({"scope": "read write"}));
    let r = get(&gate, "/oauth", Some(&token), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for (name, want) in [
        ("x-clerk-client-id", "client_abc"),
        ("x-clerk-scopes", "read,write"),
        ("x-user-id", "user_9"),
        ("x-clerk-token-type", "oauth_token"),
        ("x-clerk-token-id", "oat_jwt_1"),
    ] {
        assert_eq!(
            upstream_header(&upstream, name).as_deref(),
            Some(want),
            "{name}"
        );
    }
    clerk.machine_answer(
        "oat_opaque",
        200,
        oauth_json("oat_1", "client_x", "user_3", &["profile"]),
    );
    assert_eq!(
        get(&gate, "/oauth", Some("oat_opaque"), &[]).await.status,
        200
    );
    assert_eq!(
        clerk.machine_calls()[0].path,
        "/oauth_applications/access_tokens/verify"
    );
    assert_eq!(
        clerk.machine_calls()[0].body,
        json!({"access_token": "oat_opaque"})
    );
    // A session-only route refuses OAuth JWTs as the SDK does.
    let r = get(&gate, "/other", Some(&token), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (401, "token-type-mismatch"));

    let (clerk, _upstream, gate) =
        start("[machine]\naudience = [\"https://api.example.com\"]\n").await;
    let no_aud = oauth_jwt(&clerk, json!({}));
    let r = get(&gate, "/oauth", Some(&no_aud), &[]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (401, "token-verification-failed")
    );
    let aud = oauth_jwt(&clerk, json!({"aud": ["x", "https://api.example.com"]}));
    assert_eq!(get(&gate, "/oauth", Some(&aud), &[]).await.status, 200);
}

#[tokio::test]
async fn scopes_and_session_rules_apply_to_machine_tokens() {
    let (clerk, _upstream, gate) = start("").await;
    clerk.machine_answer("ak_read", 200, api_key_json("ak_1", "user_1", &["read"]));
    clerk.machine_answer(
        "ak_rw",
        200,
        api_key_json("ak_2", "user_1", &["read", "write"]),
    );
    let r = get(&gate, "/write", Some("ak_read"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (403, "scope-missing"));
    assert_eq!(get(&gate, "/write", Some("ak_rw"), &[]).await.status, 200);
    // Machine tokens never pass plan rules (the SDK's machine has() is always false).
    let r = get(&gate, "/pro", Some("ak_rw"), &[]).await;
    assert_eq!((r.status, r.reason.as_str()), (403, "plan-missing"));
    // Sessions on an "any" route still go through the session path.
    let mut claims = clerk.claims("user_1");
    claims["pla"] = json!("u:pro");
    let r = get(&gate, "/pro", Some(&clerk.mint(claims)), &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_flood_of_random_keys_is_bounded_by_the_budget() {
    let (clerk, _upstream, gate) = start("[sessions]\napi_budget_per_10s = 5\n").await;
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(
            get(&gate, "/keys", Some(&format!("ak_random_{i}")), &[])
                .await
                .status,
        );
    }
    assert_eq!(
        clerk.machine_calls().len(),
        5,
        "the shared budget caps the calls"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 5);
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 15);
    // Refused keys asked again come from the negative cache, not from Clerk.
    for i in 0..5 {
        get(&gate, "/keys", Some(&format!("ak_random_{i}")), &[]).await;
    }
    assert_eq!(clerk.machine_calls().len(), 5);
}

#[tokio::test]
async fn forward_auth_answers_with_the_machine_identity() {
    let (clerk, _upstream, gate) = start("").await;
    clerk.machine_answer("ak_fa", 200, api_key_json("ak_1", "user_4", &["read"]));
    let resp = client()
        .get(gate.url("/_clerkgate/auth"))
        .header("x-forwarded-uri", "/keys/x")
        .bearer_auth("ak_fa")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-user-id"], "user_4");
    assert_eq!(resp.headers()["x-clerk-token-type"], "api_key");
}

/// Entitlement rules on session tokens, decoded as `has()`.
const ENTITLEMENT_ROUTES: &str = r#"
[[routes]]
path = "/export/**"
features = ["export"]
[[routes]]
path = "/orgpro/**"
plans = ["org:pro"]
[[routes]]
path = "/anypro/**"
plans = ["pro"]
[[routes]]
path = "/danger/**"
reverification = "strict"
[[routes]]
path = "/custom/**"
reverification = { level = "second_factor", after_minutes = 10 }
"#;

#[tokio::test]
async fn plans_features_and_reverification_follow_has() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, ENTITLEMENT_ROUTES).await;
    let token = |extra: Value| {
        let mut c = clerk.claims("user_1");
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        clerk.mint(c)
    };
    let status = async |path: &str, extra: Value| {
        let r = get(&gate, path, Some(&token(extra)), &[]).await;
        (r.status, r.reason, r.body)
    };
    assert_eq!(status("/export", json!({"fea": "u:export"})).await.0, 200);
    assert_eq!(
        upstream_header(&upstream, "x-clerk-features").as_deref(),
        Some("u:export")
    );
    assert_eq!(
        upstream_header(&upstream, "x-clerk-token-type").as_deref(),
        Some("session_token")
    );
    for fea in [json!("o:dashboard"), json!("export"), Value::Null] {
        let extra = if fea.is_null() {
            json!({})
        } else {
            json!({"fea": fea})
        };
        let (s, reason, _) = status("/export", extra).await;
        assert_eq!((s, reason.as_str()), (403, "feature-missing"), "{fea}");
    }
    assert_eq!(status("/orgpro", json!({"pla": "u:pro"})).await.0, 403);
    assert_eq!(status("/orgpro", json!({"pla": "o:pro"})).await.0, 200);
    assert_eq!(
        upstream_header(&upstream, "x-clerk-plans").as_deref(),
        Some("o:pro")
    );
    assert_eq!(status("/anypro", json!({"pla": "u:pro"})).await.0, 200);
    assert_eq!(status("/anypro", json!({"pla": "o:pro"})).await.0, 200);

    assert_eq!(status("/danger", json!({"fva": [5, -1]})).await.0, 200);
    assert_eq!(
        upstream_header(&upstream, "x-clerk-factor-age").as_deref(),
        Some("5,-1")
    );
    let strict_body = r#"{"clerk_error":{"type":"forbidden","reason":"reverification-error","metadata":{"reverification":"strict"}}}"#;
    for fva in [
        json!([11, -1]),
        json!([1, 20]),
        json!([-1, -1]),
        json!([10, -1]),
    ] {
        let (s, _, body) = status("/danger", json!({"fva": fva})).await;
        assert_eq!((s, body.as_str()), (403, strict_body), "{fva}");
    }
    let (s, _, body) = status("/danger", json!({})).await;
    assert_eq!((s, body.as_str()), (403, strict_body));
    let (s, _, body) = status("/custom", json!({"fva": [1, 12]})).await;
    assert_eq!(
        (s, body.as_str()),
        (
            403,
            r#"{"clerk_error":{"type":"forbidden","reason":"reverification-error","metadata":{"reverification":{"level":"second_factor","afterMinutes":10}}}}"#
        )
    );
    // Client-sent entitlement headers never reach the upstream.
    let r = get(
        &gate,
        "/public-ish",
        Some(&token(json!({}))),
        &[
            ("x-clerk-plans", "o:enterprise"),
            ("x-clerk-features", "o:all"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(upstream_header(&upstream, "x-clerk-plans"), None);
    assert_eq!(upstream_header(&upstream, "x-clerk-features"), None);
}

#[tokio::test]
async fn bad_machine_config_names_the_key() {
    let clerk = FakeClerk::start().await;
    let base = crate::support::sidecar::base_toml(&clerk, "http://127.0.0.1:9");
    for (extra, key) in [
        (
            "[[routes]]\npath = \"/a\"\naccepts = []\n",
            "routes[0].accepts",
        ),
        (
            "[[routes]]\npath = \"/a\"\nplans = [\"team:pro\"]\n",
            "routes[0].plans[0]",
        ),
        ("[machine]\nmachine_id = \"user_1\"\n", "machine.machine_id"),
        (
            "[machine]\nverify_timeout_ms = 0\n",
            "machine.verify_timeout_ms",
        ),
        (
            "[[routes]]\npath = \"/a\"\nauth = \"public\"\nscopes = [\"x\"]\n",
            "routes[0].auth",
        ),
    ] {
        let err = crate::support::sidecar::config(&base, extra).unwrap_err();
        assert_eq!(err.key, key, "{extra}");
    }
}

/// `POST /v1/tokens/verify` on the local API, with and without `accepts`.
async fn local_verify(gate: &Sidecar, body: Value) -> (u16, Value) {
    let resp = client()
        .post(gate.local_url("/v1/tokens/verify"))
        .json(&body)
        .send()
        .await
        .expect("the local API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_local_api_verifies_machine_tokens_it_is_told_to_accept() {
    let (clerk, _upstream, gate) = start("[machine]\nmachine_id = \"mch_self\"\n").await;
    clerk.machine_answer(
        "ak_local",
        200,
        api_key_json("ak_9", "user_5", &["read", "write"]),
    );
    let (status, body) =
        local_verify(&gate, json!({"token": "ak_local", "accepts": ["api_key"]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "api_key");
    assert_eq!(body["user_id"], "user_5");
    assert_eq!(body["id"], "ak_9");
    assert_eq!(body["scopes"], json!(["read", "write"]));
    // Default: session tokens only, as the SDK's default acceptsToken.
    let (status, body) = local_verify(&gate, json!({"token": "ak_local"})).await;
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (401, Some("token-invalid"))
    );
    let (status, body) =
        local_verify(&gate, json!({"token": "mt_x", "accepts": ["api_key"]})).await;
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (401, Some("token-type-mismatch"))
    );
    // The machine scope rule holds here too.
    let other = m2m_jwt(&clerk, "mch_a", "mch_b", CAT_M2M);
    let (status, body) = local_verify(&gate, json!({"token": other, "accepts": "any"})).await;
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (403, Some("machine-scope-missing"))
    );
    // A session token still verifies with accepts = "any".
    let session = clerk.session_token("user_1");
    let (status, body) = local_verify(&gate, json!({"token": session, "accepts": "any"})).await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some("user_1")));
    // One verification for the key: the proxy and the local API share the verdict cache.
    assert_eq!(get(&gate, "/keys", Some("ak_local"), &[]).await.status, 200);
    assert_eq!(clerk.machine_calls().len(), 1);
}
