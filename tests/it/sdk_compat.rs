//! Clerk's own Node SDK (`@clerk/backend`, tests/sdk) against the local API: every call the
//! scenario in tests/sdk/compat.mjs makes must give the SDK the same result through clerkgate as
//! from the (fake) Backend API directly: same typed objects, same errors and statuses.
//!
//! Needs `node` and `npm ci` in tests/sdk (`.ci/sdk-deps`, run by `.ci/run`); without them the
//! test prints `SKIP:` and passes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::support::{Endpoint, FakeClerk, Sidecar, Upstream, user_json};

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// Why the SDK cannot run here, if it cannot.
async fn missing_sdk() -> Option<String> {
    let sdk = sdk_dir().join("node_modules/@clerk/backend/package.json");
    if !sdk.exists() {
        return Some(format!(
            "{} not installed (run .ci/sdk-deps)",
            sdk.display()
        ));
    }
    match tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await
    {
        Ok(out) if out.status.success() => None,
        _ => Some("node is not on PATH".to_owned()),
    }
}

/// The starting state of both runs.
fn seed(clerk: &FakeClerk) {
    for (id, name) in [
        ("user_ada", "Ada"),
        ("user_bob", "Bob"),
        ("user_cy", "Cy"),
        ("user_del", "Del"),
        ("user_boom", "Boom"),
    ] {
        clerk.set_user(user_json(id, name));
    }
    clerk.fail_user("user_boom", 500);
    clerk.add_session("sess_ada1", "user_ada", "active");
    clerk.add_session("sess_ada2", "user_ada", "active");
    clerk.add_session("sess_bob1", "user_bob", "active");
    clerk.add_membership("user_ada", "org_acme", "org:admin");
    clerk.add_membership("user_ada", "org_beta", "org:member");
    clerk.add_jwt_template("supabase");
}

/// Runs the scenario against `api_url` and returns its results by call name.
async fn run_sdk(
    clerk: &FakeClerk,
    api_url: &str,
    secret_key: &str,
    token: &str,
) -> Map<String, Value> {
    let run = tokio::process::Command::new("node")
        .arg("compat.mjs")
        .current_dir(sdk_dir())
        .env("PUBLISHABLE_KEY", clerk.publishable_key())
        .env("API_URL", api_url)
        .env("SECRET_KEY", secret_key)
        .env("SESSION_TOKEN", token)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the SDK scenario finishes within 60 s")
        .expect("node starts");
    assert!(
        out.status.success(),
        "node compat.mjs failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Object(results)) => results,
        _ => panic!(
            "compat.mjs printed no JSON object: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
    }
}

fn ok<'a>(results: &'a Map<String, Value>, name: &str) -> &'a Value {
    let r = &results[name];
    assert!(r.get("ok").is_some(), "{name} succeeded directly: {r}");
    &r["ok"]
}

fn error_status(results: &Map<String, Value>, name: &str) -> Option<u64> {
    results[name]["error"]["status"].as_u64()
}

#[tokio::test]
async fn clerks_node_sdk_gets_the_same_results_from_the_local_api_as_from_clerk() {
    if let Some(why) = missing_sdk().await {
        println!("SKIP: {why}");
        return;
    }
    let clerk = FakeClerk::start().await;
    clerk.enable_backend_api();
    seed(&clerk);
    let upstream = Upstream::start().await;
    let local_token = "local-api-token-for-the-sdk";
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &format!("[local_api]\ntoken = \"{local_token}\"\n"),
    )
    .await;
    let token = clerk.session_token("user_ada");

    // Through clerkgate: the SDK's "secret key" is local_api.token (sent as its bearer); the
    // real secret stays in clerkgate.
    let via_gate = run_sdk(&clerk, &gate.local_url(""), local_token, &token).await;
    let count_calls = clerk.calls(Endpoint::UsersCount);
    let count_query = clerk.last_query(Endpoint::UsersCount);
    let jwks_fetches = clerk.jwks_fetches();

    clerk.reset_backend_api();
    seed(&clerk);
    let direct = run_sdk(&clerk, &clerk.url, &clerk.secret_key, &token).await;

    // The scenario itself must mean something: the direct results are the expected ones.
    assert_eq!(ok(&direct, "getUser")["firstName"], "Ada");
    assert_eq!(ok(&direct, "getUserList")["totalCount"], 5);
    assert_eq!(ok(&direct, "getUserList filtered")["totalCount"], 2);
    assert_eq!(
        ok(&direct, "getUserList filtered")["data"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(*ok(&direct, "getCount filtered"), 1);
    assert_eq!(
        ok(&direct, "getUser after updateUser")["publicMetadata"]["plan"],
        "pro"
    );
    assert_eq!(
        ok(&direct, "getUser after replaceUserMetadata")["publicMetadata"],
        serde_json::json!({"tier": 2})
    );
    assert_eq!(ok(&direct, "getUser after ban")["banned"], true);
    assert!(ok(&direct, "getToken template")["jwt"].is_string());
    assert_eq!(ok(&direct, "verifyToken")["sub"], "user_ada");
    assert_eq!(ok(&direct, "authenticateRequest")["status"], "signed-in");
    assert_eq!(ok(&direct, "authenticateRequest")["userId"], "user_ada");
    assert_eq!(
        ok(&direct, "getOrganizationMembershipList")["totalCount"],
        2
    );
    assert_eq!(error_status(&direct, "getUser missing"), Some(404));
    assert_eq!(error_status(&direct, "getUser clerk 500"), Some(500));
    assert_eq!(
        error_status(&direct, "getToken unknown template"),
        Some(404)
    );

    // Every call: the same result through clerkgate.
    let mut differences = Vec::new();
    for (name, expected) in &direct {
        let got = via_gate.get(name).unwrap_or(&Value::Null);
        if got != expected {
            differences.push(format!(
                "{name}:\n  direct:    {expected}\n  clerkgate: {got}"
            ));
        }
    }
    assert_eq!(via_gate.len(), direct.len());
    assert!(
        differences.is_empty(),
        "{} of {} SDK calls differ through the local API:\n{}",
        differences.len(),
        direct.len(),
        differences.join("\n")
    );

    // And what Clerk saw from clerkgate: every count with its filters, no JWKS fetch for the
    // SDK's verifyToken/getJwks (clerkgate fetched at start-up, before the scenario).
    assert_eq!(
        count_calls, 6,
        "getUserList x3 and getCount x3: none cached"
    );
    assert_eq!(count_query.as_deref(), Some("query=Bo"));
    assert_eq!(jwks_fetches, 1, "served from the keys clerkgate holds");
}
