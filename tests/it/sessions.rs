//! Session awareness: Svix-signed Clerk webhooks and the Backend API close the window in which a
//! revoked session's still-unexpired token would be accepted.

use std::time::Duration;

use clerkgate::telemetry::{WebhookEventType, WebhookResult};
use serde_json::{Value, json};

use crate::support::upstreams::RawUpstream;
use crate::support::{FakeClerk, Sidecar, Upstream, client, now};

fn webhook_toml(clerk: &FakeClerk, extra: &str) -> String {
    format!(
        "[webhooks]\nsecret = \"{}\"\n{extra}",
        clerk.webhook_secret()
    )
}

fn sid_of(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: Value = serde_json::from_slice(&bytes).unwrap();
    claims["sid"].as_str().unwrap().to_owned()
}

/// Posts a signed delivery; returns (status, body).
async fn deliver(
    gate: &Sidecar,
    clerk: &FakeClerk,
    id: &str,
    ts: i64,
    body: &[u8],
) -> (u16, Value) {
    let sig = clerk.sign_webhook(id, ts, body);
    post(
        gate,
        &[
            ("svix-id", id),
            ("svix-timestamp", &ts.to_string()),
            ("svix-signature", &sig),
        ],
        body,
    )
    .await
}

async fn post(gate: &Sidecar, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let mut req = client()
        .post(gate.url("/webhooks/clerk"))
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn event(kind: &str, data: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": kind, "object": "event", "data": data, "timestamp": 1_716_883_200, "instance_id": "ins_fake"}))
        .unwrap()
}

async fn get_status(gate: &Sidecar, token: &str) -> (u16, Value) {
    let resp = client()
        .get(gate.url("/private"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn revoked_session_is_rejected_at_the_edge_even_from_the_token_cache() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, &webhook_toml(&clerk, "")).await;
    let token = clerk.session_token("user_1");
    assert_eq!(get_status(&gate, &token).await.0, 200);
    assert_eq!(get_status(&gate, &token).await.0, 200);
    assert_eq!(
        gate.metrics.token_cache_hits.get(),
        1,
        "the second request was a cache hit"
    );
    let before = upstream.count();

    let body = event(
        "session.revoked",
        json!({"id": sid_of(&token), "status": "revoked", "user_id": "user_1"}),
    );
    let (status, reply) = deliver(&gate, &clerk, "msg_revoke_1", now() as i64, &body).await;
    assert_eq!((status, reply["status"].as_str()), (200, Some("processed")));

    let (status, reply) = get_status(&gate, &token).await;
    assert_eq!(
        (status, reply["reason"].as_str()),
        (401, Some("session-revoked"))
    );
    assert_eq!(
        upstream.count(),
        before,
        "the revoked session never reached the upstream"
    );
    // Another session of the same user is unaffected.
    assert_eq!(
        get_status(&gate, &clerk.session_token("user_1")).await.0,
        200
    );
    assert!(
        gate.metrics_text()
            .await
            .contains("clerkgate_revoked_sessions 1")
    );
}

#[tokio::test]
async fn ended_and_removed_sessions_are_denied_too() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, &webhook_toml(&clerk, "")).await;
    for (i, kind) in ["session.ended", "session.removed"].into_iter().enumerate() {
        let token = clerk.session_token("user_1");
        let body = event(kind, json!({"id": sid_of(&token)}));
        assert_eq!(
            deliver(&gate, &clerk, &format!("msg_end_{i}"), now() as i64, &body)
                .await
                .0,
            200
        );
        assert_eq!(
            get_status(&gate, &token).await.1["reason"],
            "session-revoked",
            "{kind}"
        );
    }
}

#[tokio::test]
async fn deleted_or_banned_users_lose_every_earlier_token() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, &webhook_toml(&clerk, "")).await;
    let mut old = clerk.claims("user_gone");
    old["iat"] = json!(now() - 30);
    let old = clerk.mint(old);
    let other = clerk.session_token("user_stays");
    assert_eq!(get_status(&gate, &old).await.0, 200);

    let body = event(
        "user.deleted",
        json!({"object": "user", "id": "user_gone", "deleted": true}),
    );
    assert_eq!(
        deliver(&gate, &clerk, "msg_del", now() as i64, &body)
            .await
            .0,
        200
    );
    assert_eq!(get_status(&gate, &old).await.1["reason"], "user-revoked");
    assert_eq!(get_status(&gate, &other).await.0, 200);

    let mut banned = clerk.claims("user_banned");
    banned["iat"] = json!(now() - 30);
    let banned = clerk.mint(banned);
    let body = event(
        "user.updated",
        json!({"id": "user_banned", "banned": true, "locked": false}),
    );
    assert_eq!(
        deliver(&gate, &clerk, "msg_ban", now() as i64, &body)
            .await
            .0,
        200
    );
    assert_eq!(get_status(&gate, &banned).await.1["reason"], "user-revoked");

    // An ordinary profile update changes nothing.
    let fine = clerk.session_token("user_fine");
    let body = event(
        "user.updated",
        json!({"id": "user_fine", "banned": false, "locked": false}),
    );
    assert_eq!(
        deliver(&gate, &clerk, "msg_upd", now() as i64, &body)
            .await
            .0,
        200
    );
    assert_eq!(get_status(&gate, &fine).await.0, 200);
}

#[tokio::test]
async fn svix_known_answer_vector_passes_the_signature_check() {
    // clerk-protocol.md 4.2 vector A has a 2021 timestamp: a huge tolerance lets it through the
    // window so the signature itself is what is tested. Its body is not a Clerk event, so the
    // answer after a good signature is 400 payload-invalid, never 401.
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &webhook_toml(&clerk, "tolerance_seconds = 300000000"),
    )
    .await;
    let headers = [
        ("svix-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
        ("svix-timestamp", "1614265330"),
        (
            "svix-signature",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
    ];
    let (status, reply) = post(&gate, &headers, br#"{"test": 2432232314}"#).await;
    assert_eq!(
        (status, reply["reason"].as_str()),
        (400, Some("webhook-payload-invalid"))
    );
    let (status, reply) = post(&gate, &headers, br#"{"test": 2432232315}"#).await;
    assert_eq!(
        (status, reply["reason"].as_str()),
        (401, Some("webhook-signature-invalid"))
    );
}

/// (name, headers, body, expected status, expected reason)
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, u16, &'a str);

#[tokio::test]
async fn signature_rules_are_enforced() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &webhook_toml(&clerk, "max_body_bytes = 2048"),
    )
    .await;
    let token = clerk.session_token("user_1");
    let body = event("session.revoked", json!({"id": sid_of(&token)}));
    let ts = now() as i64;
    let good = clerk.sign_webhook("msg_a", ts, &body);
    let ts_s = ts.to_string();

    // Rotation: any matching v1 entry among decoys.
    let rotated = format!("v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v2,abc {good}");
    // Tampered body.
    let mut tampered = body.clone();
    let last = tampered.len() - 2;
    tampered[last] = b' ';
    let cases: Vec<Case> = vec![
        (
            "tampered body",
            vec![
                ("svix-id", "msg_a".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", good.clone()),
            ],
            tampered,
            401,
            "webhook-signature-invalid",
        ),
        (
            "stale timestamp",
            vec![
                ("svix-id", "msg_a".into()),
                ("svix-timestamp", (ts - 600).to_string()),
                (
                    "svix-signature",
                    clerk.sign_webhook("msg_a", ts - 600, &body),
                ),
            ],
            body.clone(),
            401,
            "webhook-timestamp-out-of-tolerance",
        ),
        (
            "future timestamp",
            vec![
                ("svix-id", "msg_a".into()),
                ("svix-timestamp", (ts + 600).to_string()),
                (
                    "svix-signature",
                    clerk.sign_webhook("msg_a", ts + 600, &body),
                ),
            ],
            body.clone(),
            401,
            "webhook-timestamp-out-of-tolerance",
        ),
        (
            "signature for another id",
            vec![
                ("svix-id", "msg_b".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", good.clone()),
            ],
            body.clone(),
            401,
            "webhook-signature-invalid",
        ),
        (
            "missing signature",
            vec![
                ("svix-id", "msg_a".into()),
                ("svix-timestamp", ts_s.clone()),
            ],
            body.clone(),
            400,
            "webhook-headers-missing",
        ),
        (
            "missing id",
            vec![
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", good.clone()),
            ],
            body.clone(),
            400,
            "webhook-headers-missing",
        ),
        (
            "non-numeric timestamp",
            vec![
                ("svix-id", "msg_a".into()),
                ("svix-timestamp", "soon".into()),
                ("svix-signature", good.clone()),
            ],
            body.clone(),
            400,
            "webhook-timestamp-invalid",
        ),
        (
            "oversized body",
            vec![
                ("svix-id", "msg_a".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", good.clone()),
            ],
            vec![b'x'; 4096],
            413,
            "webhook-body-too-large",
        ),
    ];
    for (name, headers, body, want_status, want_reason) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, reply) = post(&gate, &headers, &body).await;
        assert_eq!(
            (status, reply["reason"].as_str()),
            (want_status, Some(want_reason)),
            "{name}"
        );
        let text = reply.to_string();
        assert!(
            !text.contains("sess_") && !text.contains("revoked\""),
            "no payload in error bodies: {text}"
        );
    }
    assert_eq!(
        get_status(&gate, &token).await.0,
        200,
        "nothing was applied by refused deliveries"
    );

    let headers = [
        ("svix-id", "msg_a"),
        ("svix-timestamp", ts_s.as_str()),
        ("svix-signature", rotated.as_str()),
    ];
    assert_eq!(
        post(&gate, &headers, &body).await.0,
        200,
        "rotation: one valid v1 among several"
    );
    assert_eq!(
        get_status(&gate, &token).await.1["reason"],
        "session-revoked"
    );
}

#[tokio::test]
async fn replayed_deliveries_are_acknowledged_without_acting_twice() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, &webhook_toml(&clerk, "")).await;
    let body = event("session.revoked", json!({"id": "sess_replayed"}));
    let ts = now() as i64;
    assert_eq!(
        deliver(&gate, &clerk, "msg_once", ts, &body).await.1["status"],
        "processed"
    );
    assert_eq!(
        deliver(&gate, &clerk, "msg_once", ts, &body).await.1["status"],
        "duplicate"
    );
    let m = &gate.metrics.webhook_events;
    assert_eq!(
        m.get(WebhookEventType::SessionRevoked, WebhookResult::Processed),
        1
    );
    assert_eq!(
        m.get(WebhookEventType::SessionRevoked, WebhookResult::Duplicate),
        1
    );
}

#[tokio::test]
async fn standard_webhook_header_names_and_a_bare_secret_work() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let bare = clerk.webhook_secret().trim_start_matches("whsec_");
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &format!("[webhooks]\nsecret = \"{bare}\"\n"),
    )
    .await;
    let body = event("user.created", json!({"id": "user_new"}));
    let ts = now() as i64;
    let sig = clerk.sign_webhook("msg_std", ts, &body);
    let ts = ts.to_string();
    let headers = [
        ("webhook-id", "msg_std"),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    assert_eq!(post(&gate, &headers, &body).await.0, 200);
}

#[tokio::test]
async fn without_a_secret_the_endpoint_answers_503_and_never_reaches_the_upstream() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let body = event("session.revoked", json!({"id": "sess_x"}));
    let (status, reply) = deliver(&gate, &clerk, "msg_x", now() as i64, &body).await;
    assert_eq!(
        (status, reply["reason"].as_str()),
        (503, Some("webhook-secret-unconfigured"))
    );
    let resp = client()
        .get(gate.url("/webhooks/clerk"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn non_utf8_payloads_with_a_valid_signature_are_rejected() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, &webhook_toml(&clerk, "")).await;
    let (status, reply) = deliver(&gate, &clerk, "msg_bin", now() as i64, b"\xff\xfe{}").await;
    assert_eq!(
        (status, reply["reason"].as_str()),
        (400, Some("webhook-payload-invalid"))
    );
}

#[tokio::test]
async fn verified_events_are_forwarded_unchanged_with_a_trusted_header_and_no_svix_headers() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &webhook_toml(&clerk, "forward_path = \"/internal/clerk-webhooks\""),
    )
    .await;
    let body = event(
        "user.created",
        json!({"id": "user_new", "email_addresses": []}),
    );
    assert_eq!(
        deliver(&gate, &clerk, "msg_fwd", now() as i64, &body)
            .await
            .0,
        200
    );
    let seen = upstream.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri.path(), "/internal/clerk-webhooks");
    assert_eq!(seen.body.as_ref(), body.as_slice(), "body byte for byte");
    assert_eq!(seen.headers["x-clerk-webhook-verified"], "1");
    assert_eq!(seen.headers["x-clerk-webhook-type"], "user.created");
    assert_eq!(seen.headers["x-clerk-webhook-id"], "msg_fwd");
    assert!(
        seen.headers
            .keys()
            .all(|k| !k.as_str().starts_with("svix-") && !k.as_str().starts_with("webhook-"))
    );
    // A replay after successful delivery is not forwarded again.
    assert_eq!(
        deliver(&gate, &clerk, "msg_fwd", now() as i64, &body)
            .await
            .1["status"],
        "duplicate"
    );
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn forwarded_events_go_through_the_proxys_pooled_upstream_connection() {
    // One upstream client in the process: a verified event goes upstream over the same
    // keep-alive connection that proxied requests use, and the connection stays reusable.
    let clerk = FakeClerk::start().await;
    let upstream = RawUpstream::recording().await;
    let config = crate::support::sidecar::config(
        &crate::support::sidecar::base_toml(&clerk, &upstream.url()),
        &webhook_toml(&clerk, "forward_path = \"/internal/clerk-webhooks\""),
    )
    .expect("valid config");
    let gate = Sidecar::start_config(config).await;
    assert!(gate.wait_ready(Duration::from_secs(10)).await);
    let token = clerk.session_token("user_1");
    assert_eq!(get_status(&gate, &token).await.0, 200);
    let body = event(
        "user.created",
        json!({"id": "user_pooled", "email_addresses": []}),
    );
    assert_eq!(
        deliver(&gate, &clerk, "msg_pooled", now() as i64, &body)
            .await
            .0,
        200
    );
    assert_eq!(get_status(&gate, &token).await.0, 200);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(
        upstream.accepted(),
        1,
        "proxy, forwarder, proxy: one pooled connection"
    );
    let forwarded = String::from_utf8_lossy(&requests[1]).into_owned();
    assert!(
        forwarded.starts_with("POST /internal/clerk-webhooks HTTP/1.1\r\n"),
        "{forwarded}"
    );
    // Every header line of the head, each ended by CRLF.
    let head = format!("{}\r\n", forwarded.split("\r\n\r\n").next().unwrap()).to_ascii_lowercase();
    assert_eq!(head.matches("\r\nhost: ").count(), 1, "{head}");
    assert!(
        head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
        "{head}"
    );
    assert!(requests[1].ends_with(&body), "the event, byte for byte");
}

#[tokio::test]
async fn a_failing_forward_answers_502_but_applies_the_state_change_once() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    // The echo upstream answers /status/500 with a 500.
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &webhook_toml(&clerk, "forward_path = \"/status/500\""),
    )
    .await;
    let token = clerk.session_token("user_1");
    let body = event("session.revoked", json!({"id": sid_of(&token)}));
    let ts = now() as i64;
    let (status, reply) = deliver(&gate, &clerk, "msg_retry", ts, &body).await;
    assert_eq!(
        (status, reply["reason"].as_str()),
        (502, Some("webhook-forward-failed"))
    );
    assert_eq!(
        get_status(&gate, &token).await.1["reason"],
        "session-revoked",
        "applied despite the failed forward"
    );
    // Svix retries: forwarded again, still failing, and not applied a second time.
    assert_eq!(deliver(&gate, &clerk, "msg_retry", ts, &body).await.0, 502);
    assert_eq!(upstream.count(), 2, "each delivery attempt was forwarded");
    let m = &gate.metrics.webhook_events;
    assert_eq!(
        m.get(
            WebhookEventType::SessionRevoked,
            WebhookResult::ForwardFailed
        ),
        2
    );
    assert_eq!(
        m.get(WebhookEventType::SessionRevoked, WebhookResult::Processed),
        0
    );
}

#[tokio::test]
async fn api_mode_checks_each_session_once_and_rejects_inactive_ones() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[sessions]\ncheck = \"api\"\n").await;
    let active = clerk.session_token("user_1");
    clerk.set_session(&sid_of(&active), "active");
    assert_eq!(get_status(&gate, &active).await.0, 200);
    assert_eq!(get_status(&gate, &active).await.0, 200);
    assert_eq!(
        clerk.session_fetches(),
        1,
        "status cached after the first check"
    );

    let revoked = clerk.session_token("user_2");
    clerk.set_session(&sid_of(&revoked), "revoked");
    assert_eq!(
        get_status(&gate, &revoked).await.1["reason"],
        "session-revoked"
    );
    let unknown = clerk.session_token("user_3");
    assert_eq!(
        get_status(&gate, &unknown).await.1["reason"],
        "session-revoked",
        "404 is not active"
    );
    assert_eq!(upstream.count(), 2);
}

#[tokio::test]
async fn api_mode_honours_retry_after_and_fails_closed_by_default() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[sessions]\ncheck = \"api\"\n").await;
    clerk.fail_sessions(crate::support::Failure::RetryAfter(30));
    let first = clerk.session_token("user_1");
    let resp = client()
        .get(gate.url("/private"))
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        resp.json::<Value>().await.unwrap()["reason"],
        "session-check-unavailable"
    );
    let fetches = clerk.session_fetches();
    clerk.fail_sessions(crate::support::Failure::None);
    let second = clerk.session_token("user_2");
    clerk.set_session(&sid_of(&second), "active");
    assert_eq!(
        get_status(&gate, &second).await.0,
        503,
        "paused for Retry-After"
    );
    assert_eq!(
        clerk.session_fetches(),
        fetches,
        "no call to Clerk during the pause"
    );
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn api_mode_can_fail_open() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[sessions]\ncheck = \"api\"\nfail_open = true\napi_timeout_ms = 300\n",
    )
    .await;
    clerk.fail_sessions(crate::support::Failure::Hang);
    let token = clerk.session_token("user_1");
    let started = std::time::Instant::now();
    assert_eq!(get_status(&gate, &token).await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the request path waited at most the API timeout"
    );
}
