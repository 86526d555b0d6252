//! Differential tests with `@clerk/backend` 3.x as the oracle (tests/machine-sdk/, installed
//! by `.ci/machine-deps`): the same inputs go to the SDK, through `node oracle.mjs`, and to
//! clerkgate, and the answers must agree.
//!
//! - `authenticateRequest` over token type x `acceptsToken` x Backend API answer, against the
//!   same fake Clerk clerkgate uses, compared with what clerkgate forwards or refuses;
//! - `has()` over a grid of `pla` / `fea` / `fva` claims and asked plans, features and
//!   reverification levels, compared with [`clerkgate::clerk::entitlements`];
//! - `reverificationError(config)` compared with the 403 body clerkgate sends.
//!
//! Deliberate divergences (documented in the README) are listed where they are excluded.

use std::path::PathBuf;
use std::process::Stdio;

use clerkgate::clerk::entitlements::{Level, Reverification, has_scoped};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::{CAT_M2M, get, m2m_jwt, oauth_jwt};
use crate::support::fake_clerk::{api_key_json, m2m_json, oauth_json};
use crate::support::{FakeClerk, Sidecar, Upstream};

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/machine-sdk")
}

/// Runs the oracle on `job`; `None` (after printing why) when the SDK is not installed.
async fn oracle(job: &Value) -> Option<Value> {
    let dir = sdk_dir();
    if !dir
        .join("node_modules/@clerk/backend/package.json")
        .is_file()
    {
        println!("SKIP: tests/machine-sdk/node_modules missing (run .ci/machine-deps: npm ci)");
        return None;
    }
    let mut child = match tokio::process::Command::new("node")
        .arg("oracle.mjs")
        .current_dir(&dir)
        .env("CLERK_TELEMETRY_DISABLED", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            println!("SKIP: node not runnable: {e}");
            return None;
        }
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(job.to_string().as_bytes())
        .await
        .expect("job written");
    drop(stdin);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the oracle finished in time")
        .expect("the oracle ran");
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("oracle JSON"))
}

/// Route path, clerkgate's `accepts` TOML (None: the default), the SDK's `acceptsToken`.
const ACCEPTS: &[(&str, Option<&str>, &str)] = &[
    ("/d", None, r#""session_token""#),
    ("/any", Some(r#""any""#), r#""any""#),
    ("/ak", Some(r#"["api_key"]"#), r#"["api_key"]"#),
    ("/mt", Some(r#"["m2m_token"]"#), r#"["m2m_token"]"#),
    ("/oat", Some(r#"["oauth_token"]"#), r#"["oauth_token"]"#),
    (
        "/mach",
        Some(r#"["api_key", "m2m_token", "oauth_token"]"#),
        r#"["api_key", "m2m_token", "oauth_token"]"#,
    ),
    (
        "/mix",
        Some(r#"["session_token", "api_key"]"#),
        r#"["session_token", "api_key"]"#,
    ),
    (
        "/sm",
        Some(r#"["session_token", "m2m_token", "oauth_token"]"#),
        r#"["session_token", "m2m_token", "oauth_token"]"#,
    ),
];

#[tokio::test]
async fn authenticate_request_matrix_matches_the_sdk() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let routes: String = ACCEPTS
        .iter()
        .filter_map(|(path, accepts, _)| {
            accepts.map(|a| format!("[[routes]]\npath = \"{path}/**\"\naccepts = {a}\n"))
        })
        .collect();
    let gate = Sidecar::start(&clerk, &upstream, &routes).await;

    clerk.machine_answer("ak_good", 200, api_key_json("ak_1", "user_7", &["read"]));
    clerk.machine_answer("mt_good", 200, m2m_json("mt_1", "mch_a", &["mch_b"]));
    clerk.machine_answer(
        "oat_good",
        200,
        oauth_json("oat_1", "client_1", "user_8", &["read"]),
    );
    let mut revoked = api_key_json("ak_2", "user_7", &[]);
    revoked["revoked"] = json!(true);
    clerk.machine_answer("ak_revoked", 200, revoked);
    clerk.machine_answer("ak_badsecret", 401, json!({"errors": []}));

    let n = crate::support::now();
    let oauth = oauth_jwt(&clerk, json!({"scope": "read"}));
    let m2m_typ_at = clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "at+jwt"}),
        json!({"iss": clerk.issuer(), "sub": "mch_a", "iat": n, "exp": n + 60}),
    );
    let session_with_m2m_cat = clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "cat": CAT_M2M}),
        clerk.claims("user_1"),
    );
    let expired_oauth = oauth_jwt(&clerk, json!({"iat": n - 300, "exp": n - 120}));
    let tokens: Vec<(&str, String)> = vec![
        ("session", clerk.session_token("user_1")),
        ("api key", "ak_good".into()),
        ("unknown api key", "ak_unknown".into()),
        ("m2m opaque", "mt_good".into()),
        ("unknown m2m", "mt_unknown".into()),
        ("oauth opaque", "oat_good".into()),
        ("m2m jwt", m2m_jwt(&clerk, "mch_a", "mch_b", CAT_M2M)),
        (
            "m2m jwt, session cat",
            m2m_jwt(&clerk, "mch_a", "mch_b", "cl_B7d4PD111AAA"),
        ),
        ("m2m jwt typ at+jwt", m2m_typ_at),
        ("oauth jwt", oauth.clone()),
        ("expired oauth jwt", expired_oauth),
        ("session jwt with M2M cat", session_with_m2m_cat),
        ("garbage", "hello".into()),
        ("mt_ prefix on an oauth jwt", format!("mt_{oauth}")),
        ("api key refused secret", "ak_badsecret".into()),
    ];
    let mut cases = Vec::new();
    for (_, token) in &tokens {
        for (_, _, sdk_accepts) in ACCEPTS {
            cases.push(json!({
                "token": token,
                "accepts": serde_json::from_str::<Value>(sdk_accepts).unwrap(),
            }));
        }
    }
    let job = json!({
        "secretKey": clerk.secret_key,
        "publishableKey": clerk.publishable_key(),
        "apiUrl": clerk.url,
        "requests": cases,
    });
    let Some(answer) = oracle(&job).await else {
        return;
    };
    let sdk = answer["requests"].as_array().expect("requests");
    let mut i = 0;
    let mut compared = 0;
    let mut signed_in = 0;
    let mut mismatches = Vec::new();
    for (label, token) in &tokens {
        for (path, _, sdk_accepts) in ACCEPTS {
            let oracle = &sdk[i];
            i += 1;
            let ours = get(&gate, &format!("{path}/x"), Some(token), &[]).await;
            let sdk_in = oracle["status"] == "signed-in";
            let ours_in = ours.status == 200;
            // A secret key Clerk refuses: the SDK answers signed-out, clerkgate 503 (an outage
            // of its own configuration, never a client's fault); both refuse.
            let same = sdk_in == ours_in
                && (sdk_in
                    || (oracle["reason"] == "token-type-mismatch")
                        == (ours.reason == "token-type-mismatch"));
            let token_type_ok = !sdk_in
                || upstream
                    .last()
                    .headers
                    .get("x-clerk-token-type")
                    .and_then(|v| v.to_str().ok())
                    == oracle["tokenType"].as_str();
            compared += 1;
            signed_in += usize::from(sdk_in);
            if !(same && token_type_ok) {
                mismatches.push(format!(
                    "{label} on {path} (acceptsToken {sdk_accepts}): SDK {oracle}, clerkgate {} {}",
                    ours.status, ours.reason
                ));
            }
        }
    }
    assert_eq!(compared, tokens.len() * ACCEPTS.len());
    println!(
        "authenticateRequest: {compared} cases agree with @clerk/backend ({signed_in} signed in)"
    );
    // Each machine type and the session token pass somewhere: the matrix compares real
    // verifications, not only refusals.
    assert!(signed_in >= 20, "only {signed_in} signed-in cases");
    assert!(
        mismatches.is_empty(),
        "differences from @clerk/backend:\n{}",
        mismatches.join("\n")
    );

    // The documented stricter case: the SDK lets a 200 `revoked: true` answer in.
    let job = json!({
        "secretKey": clerk.secret_key, "publishableKey": clerk.publishable_key(),
        "apiUrl": clerk.url, "requests": [{"token": "ak_revoked", "accepts": ["api_key"]}],
    });
    let answer = oracle(&job).await.expect("oracle ran before");
    assert_eq!(answer["requests"][0]["status"], "signed-in");
    let ours = get(&gate, "/ak/x", Some("ak_revoked"), &[]).await;
    assert_eq!((ours.status, ours.reason.as_str()), (401, "token-revoked"));
}

fn reverification_configs() -> Vec<(Value, Reverification)> {
    let mut v = vec![
        (json!("strict_mfa"), Reverification::StrictMfa),
        (json!("strict"), Reverification::Strict),
        (json!("moderate"), Reverification::Moderate),
        (json!("lax"), Reverification::Lax),
    ];
    for (level, name) in [
        (Level::FirstFactor, "first_factor"),
        (Level::SecondFactor, "second_factor"),
        (Level::MultiFactor, "multi_factor"),
    ] {
        for minutes in [1u32, 4, 10, 60] {
            v.push((
                json!({"level": name, "afterMinutes": minutes}),
                Reverification::Custom {
                    level,
                    after_minutes: minutes,
                },
            ));
        }
    }
    v
}

#[tokio::test]
async fn has_grid_matches_the_sdk() {
    let claim_values = [
        None,
        Some(json!("u:pro")),
        Some(json!("o:pro")),
        Some(json!("ou:pro")),
        Some(json!("uo:team")),
        Some(json!("u:pro,o:team")),
        Some(json!(" u:pro , o:team ")),
        Some(json!("pro")),
        Some(json!("")),
        Some(json!("u:pro,")),
        Some(json!("x:pro")),
        Some(json!("u:u")),
        Some(json!("o:a:b")),
        Some(json!(5)),
        Some(json!(["u:pro"])),
        Some(Value::Null),
    ];
    let asked = [
        "pro",
        "u:pro",
        "user:pro",
        "o:pro",
        "org:pro",
        "organization:pro",
        "team",
        "o:team",
        "u:team",
        "u:",
        "org:pro:x",
        "x:pro",
        "o:a",
    ];
    let fva_values = [
        None,
        Some(Value::Null),
        Some(json!([5, -1])),
        Some(json!([11, -1])),
        Some(json!([10, -1])),
        Some(json!([9.5, -1])),
        Some(json!([1, 20])),
        Some(json!([20, 1])),
        Some(json!([-1, 1])),
        Some(json!([-1, -1])),
        Some(json!([5])),
        Some(json!(["5", -1])),
        Some(json!([-2, 1])),
        Some(json!([0, 0])),
        Some(json!([1440, -1])),
        Some(json!([1439, -1])),
        Some(json!([60, 59])),
        Some(json!([3, 3, 3])),
        Some(json!("5,-1")),
    ];
    let claims_with = |key: &str, value: &Option<Value>| {
        let mut c = json!({"sub": "user_1", "sid": "sess_1", "v": 2});
        if let Some(v) = value {
            c[key] = v.clone();
        }
        c
    };
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for value in &claim_values {
        for a in asked {
            for (claim, param) in [("pla", "plan"), ("fea", "feature")] {
                let claims = claims_with(claim, value);
                cases.push(json!({"claims": claims, "params": {param: a}}));
                ours.push(has_scoped(claims.get(claim), a));
            }
        }
    }
    let configs = reverification_configs();
    for value in &fva_values {
        for (sdk_config, config) in &configs {
            let claims = claims_with("fva", value);
            cases.push(json!({"claims": claims, "params": {"reverification": sdk_config}}));
            ours.push(config.satisfied_by(claims.get("fva")));
        }
    }
    let job = json!({
        "has": cases,
        "reverification": configs.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(),
    });
    let Some(answer) = oracle(&job).await else {
        return;
    };
    let sdk = answer["has"].as_array().expect("has");
    assert_eq!(sdk.len(), ours.len());
    let differences: Vec<String> = cases
        .iter()
        .zip(sdk.iter().zip(&ours))
        .filter(|(_, (s, o))| s.as_bool() != Some(**o))
        .map(|(case, (s, o))| format!("{case}: SDK {s}, clerkgate {o}"))
        .collect();
    assert!(
        differences.is_empty(),
        "{} of {} has() vectors differ:\n{}",
        differences.len(),
        ours.len(),
        differences.join("\n")
    );
    println!("has(): {} vectors agree with @clerk/backend", ours.len());
    for ((_, config), body) in configs
        .iter()
        .zip(answer["reverification"].as_array().expect("bodies"))
    {
        let ours: Value = serde_json::from_str(&config.error_body()).unwrap();
        assert_eq!(&ours, body, "reverificationError({config:?})");
    }
}

/// `has({ role })` and `has({ permission })` against clerkgate's `org_role` and
/// `org_permissions` route rules, over v1 and v2 organization claims (v2 `o.per`/`o.fpm`
/// decoded against `fea`).
#[tokio::test]
async fn org_role_and_permission_rules_match_has() {
    use clerkgate::auth::identity::{HeadersConfig, IdentityBuilder};
    use clerkgate::auth::policy::{Policy, RouteConfig};
    use clerkgate::auth::verify::VerifiedClaims;

    let claim_sets = [
        json!({"v": 2}),
        json!({"v": 2, "fea": "o:dashboard,o:teams", "o": {"id": "org_1", "rol": "admin", "per": "manage,read", "fpm": "3,2"}}),
        json!({"v": 2, "fea": "u:x,o:dashboard", "o": {"id": "org_1", "rol": "member", "per": "read", "fpm": "1"}}),
        json!({"v": 2, "fea": "dashboard", "o": {"id": "org_1", "rol": "admin", "per": "read", "fpm": "1"}}),
        json!({"v": 2, "fea": "o:dashboard", "o": {"id": "org_1", "per": "read", "fpm": "1"}}),
        json!({"v": 2, "fea": "o:dashboard", "o": {"id": "org_1", "rol": "admin", "per": "read", "fpm": "x"}}),
        json!({"v": 2, "o": {"rol": "admin"}}),
        json!({"org_id": "org_1", "org_role": "org:admin", "org_permissions": ["org:dashboard:read"]}),
        json!({"org_id": "org_1", "org_role": "admin", "org_permissions": ["org:dashboard:read", "org:x:y"]}),
        json!({"org_role": "org:admin", "org_permissions": ["org:dashboard:read"]}),
    ];
    let roles = [
        "admin",
        "org:admin",
        "member",
        "org:member",
        "org:org:admin",
        "Admin",
    ];
    let permissions = [
        "org:dashboard:read",
        "org:dashboard:manage",
        "org:teams:read",
        "org:teams:manage",
        "dashboard:read",
        "org:x:y",
        "org:dashboard",
    ];
    let builder = IdentityBuilder::new(&HeadersConfig::default());
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for claims in &claim_sets {
        let mut payload = claims.as_object().unwrap().clone();
        payload.insert("sub".into(), json!("user_1"));
        payload.insert("sid".into(), json!("sess_1"));
        let identity = builder.build(VerifiedClaims {
            payload: payload.clone(),
            sub: "user_1".into(),
            sid: Some("sess_1".into()),
            iat: None,
            exp_ms: u64::MAX,
        });
        let asks = roles
            .iter()
            .map(|r| ("role", *r))
            .chain(permissions.iter().map(|p| ("permission", *p)));
        for (param, value) in asks {
            let rule = RouteConfig {
                path: "/x".into(),
                org_role: (param == "role").then(|| value.to_owned()),
                org_permissions: if param == "permission" {
                    vec![value.to_owned()]
                } else {
                    Vec::new()
                },
                ..RouteConfig::default()
            };
            let policy = Policy::new(&[rule]);
            ours.push(policy.route("/x").authorize(&identity).is_ok());
            cases.push(json!({"claims": payload, "params": {param: value}}));
        }
    }
    let Some(answer) = oracle(&json!({"has": cases})).await else {
        return;
    };
    let sdk = answer["has"].as_array().expect("has");
    // Deliberate divergence: a v2 token whose `fea` has an element without a colon makes the
    // SDK throw while decoding (no auth object at all); clerkgate grants no permission from
    // that `fea` but still reads the role. Clerk never signs such a `fea`.
    let malformed_fea = |case: &Value| case["claims"]["fea"] == "dashboard";
    let excluded = cases
        .iter()
        .zip(sdk)
        .filter(|(case, s)| s.is_null() && malformed_fea(case))
        .count();
    assert_eq!(
        excluded,
        roles.len() + permissions.len(),
        "only the asks of that one token"
    );
    let differences: Vec<String> = cases
        .iter()
        .zip(sdk.iter().zip(&ours))
        .filter(|(case, (s, _))| !(s.is_null() && malformed_fea(case)))
        .filter(|(_, (s, o))| s.as_bool().unwrap_or(false) != **o)
        .map(|(case, (s, o))| format!("{case}: SDK {s}, clerkgate {o}"))
        .collect();
    assert!(
        differences.is_empty(),
        "{} of {} role/permission vectors differ:\n{}",
        differences.len(),
        ours.len(),
        differences.join("\n")
    );
    println!("has(role/permission): {} vectors agree", ours.len());
}
