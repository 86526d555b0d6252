//! The happy path and the two promises everything else builds on: a valid token reaches the
//! upstream with verified identity headers, a bad one never reaches it.

use crate::support::{FakeClerk, Sidecar, Upstream, client};

#[tokio::test]
async fn valid_token_reaches_upstream_with_identity_headers_and_without_the_token() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let token = clerk.session_token("user_1");

    let resp = client()
        .get(gate.url("/hello?x=1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.uri.path(), "/hello");
    assert_eq!(seen.uri.query(), Some("x=1"));
    assert_eq!(seen.headers["x-user-id"], "user_1");
    assert!(
        seen.headers["x-session-id"]
            .to_str()
            .unwrap()
            .starts_with("sess_")
    );
    assert!(
        seen.headers.get("authorization").is_none(),
        "token is stripped"
    );
    gate.stop().await;
}

#[tokio::test]
async fn bad_token_never_reaches_upstream() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let token = clerk.session_token("user_1");
    // Flip one character inside the signature: still valid base64url, wrong signature.
    let mut bytes = token.into_bytes();
    let i = bytes.len() - 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let token = String::from_utf8(bytes).unwrap();

    let resp = client()
        .get(gate.url("/hello"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"clerkgate\", error=\"invalid_token\""
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "token-invalid-signature");
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}
