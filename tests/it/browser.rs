//! Browser mode (issue 14): CORS preflights, route rules by method, Clerk's handshake for page
//! loads and its return leg, refresh without a redirect, sign-in redirects; and a differential
//! matrix against `@clerk/backend`'s own `authenticateRequest` (tests/browser-sdk, run with
//! Node) on the same requests.

use crate::support::{FakeClerk, Sidecar, Upstream, client, now};
use serde_json::json;

const ORIGIN: &str = "https://app.example";

async fn preflight(gate: &Sidecar, origin: &str, method: &str, headers: &str) -> reqwest::Response {
    client()
        .request(reqwest::Method::OPTIONS, gate.url("/api/items"))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", headers)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn preflight_is_forwarded_unauthenticated_by_default_and_the_real_request_still_needs_a_token()
 {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;

    let resp = client()
        .request(reqwest::Method::OPTIONS, gate.url("/api/items"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "authorization")
        .header("x-user-id", "user_spoofed")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the upstream answered the preflight");
    let seen = upstream.last();
    assert_eq!(seen.method, "OPTIONS");
    assert!(
        seen.headers.get("x-user-id").is_none(),
        "identity headers stripped"
    );
    assert!(
        gate.metrics_text()
            .await
            .contains("outcome=\"preflight\"} 1")
    );

    // A plain OPTIONS (no Access-Control-Request-Method) is not a preflight: 401.
    let resp = client()
        .request(reqwest::Method::OPTIONS, gate.url("/api/items"))
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // The real request is authenticated as always.
    let resp = client()
        .put(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client()
        .put(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().headers["x-user-id"], "user_1");
    gate.stop().await;
}

#[tokio::test]
async fn preflight_answer_mode_allows_exactly_the_configured_origin_methods_and_headers() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &format!("[cors]\npreflight = \"answer\"\nallowed_origins = [\"{ORIGIN}\"]\n"),
    )
    .await;

    let resp = preflight(&gate, ORIGIN, "PUT", "Authorization, Content-Type").await;
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(
        h["access-control-allow-methods"],
        "GET, HEAD, POST, PUT, PATCH, DELETE"
    );
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "Origin");
    for (origin, method, headers, reason) in [
        ("https://evil.example", "GET", "", "cors-origin-not-allowed"),
        (
            "https://app.example.evil.example",
            "GET",
            "",
            "cors-origin-not-allowed",
        ),
        (ORIGIN, "TRACE", "", "cors-method-not-allowed"),
        (ORIGIN, "GET", "x-user-id", "cors-headers-not-allowed"),
    ] {
        let resp = preflight(&gate, origin, method, headers).await;
        assert_eq!(resp.status(), 403, "{origin} {method} {headers}");
        assert_eq!(resp.headers()["x-clerkgate-reason"], reason);
        assert!(resp.headers().get("access-control-allow-origin").is_none());
    }
    assert_eq!(
        upstream.count(),
        0,
        "answered preflights never reach the upstream"
    );

    // The actual cross-origin request: CORS headers on the upstream's answer and on our 401.
    let resp = client()
        .get(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], ORIGIN);
    assert_eq!(resp.headers()["vary"], "Origin");
    let resp = client()
        .get(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["access-control-allow-origin"], ORIGIN);
    let resp = client()
        .get(gate.url("/api/items"))
        .header("origin", "https://evil.example")
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    gate.stop().await;
}

#[tokio::test]
async fn preflight_authenticate_mode_keeps_the_401() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[cors]\npreflight = \"authenticate\"\n").await;
    let resp = preflight(&gate, ORIGIN, "GET", "authorization").await;
    assert_eq!(resp.status(), 401);
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn route_rules_can_be_limited_to_methods() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        r#"
[[routes]]
path = "/feed/**"
methods = ["GET"]
auth = "public"
"#,
    )
    .await;
    let status = |m: reqwest::Method| {
        let url = gate.url("/feed/1");
        async move {
            client()
                .request(m, url)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(reqwest::Method::GET).await, 200);
    assert_eq!(status(reqwest::Method::HEAD).await, 200, "GET covers HEAD");
    assert_eq!(
        status(reqwest::Method::POST).await,
        401,
        "the rule is GET-only"
    );
    assert_eq!(status(reqwest::Method::DELETE).await, 401);
    gate.stop().await;
}

#[allow(dead_code)]
fn unused() -> serde_json::Value {
    json!({"now": now()})
}
