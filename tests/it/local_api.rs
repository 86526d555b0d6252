//! The pod-local Clerk API, over real sockets against the fake Clerk: what it asks Clerk (counted
//! per endpoint by the fake), what it caches, what it passes on, and what it changes at the edge.

use std::time::Duration;

use clerkgate::telemetry::{ApiEndpoint, ApiResult, LocalApiResult, LocalApiRoute};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Endpoint, Failure, FakeClerk, Sidecar, Upstream, client, now, user_json};

const WAIT: Duration = Duration::from_secs(5);

/// A fake Clerk with `users`, and clerkgate in front of an echo upstream with `extra` TOML.
async fn start(users: &[(&str, &str)], extra: &str) -> (FakeClerk, Upstream, Sidecar) {
    let clerk = FakeClerk::start().await;
    clerk.enable_backend_api();
    for (id, name) in users {
        clerk.set_user(user_json(id, name));
    }
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, extra).await;
    (clerk, upstream, gate)
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["errors"][0]["code"].as_str().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One local API request, optionally with a JSON body and the local API bearer token.
async fn call(
    gate: &Sidecar,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Reply {
    let mut req = client().request(method, gate.local_url(path));
    if let Some(body) = body {
        req = req.json(&body);
    }
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("the local API answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.expect("a body");
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn get(gate: &Sidecar, path: &str) -> Reply {
    call(gate, Method::GET, path, None, None).await
}

/// Status and reason of a proxied request carrying `token`.
async fn proxied(gate: &Sidecar, token: &str) -> (u16, Value) {
    let resp = client()
        .get(gate.url("/private"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn claim(token: &str, name: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: Value = serde_json::from_slice(&bytes).unwrap();
    claims[name].as_str().unwrap().to_owned()
}

/// A token issued 30 s ago, so a cut-off at "now" is strictly after it.
fn older_token(clerk: &FakeClerk, sub: &str) -> String {
    let mut claims = clerk.claims(sub);
    claims["iat"] = json!(now() - 30);
    clerk.mint(claims)
}

async fn deliver_webhook(gate: &Sidecar, clerk: &FakeClerk, id: &str, kind: &str, data: Value) {
    let body = serde_json::to_vec(&json!({"type": kind, "object": "event", "data": data, "timestamp": 1_716_883_200, "instance_id": "ins_fake"})).unwrap();
    let ts = now() as i64;
    let resp = client()
        .post(gate.url("/webhooks/clerk"))
        .header("svix-id", id)
        .header("svix-timestamp", ts.to_string())
        .header("svix-signature", clerk.sign_webhook(id, ts, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "webhook {kind} accepted");
}

#[tokio::test]
async fn user_reads_are_cached_and_updates_invalidate_them() {
    let (clerk, _up, gate) = start(&[("user_a", "Ada")], "").await;

    let first = get(&gate, "/v1/users/user_a").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.body,
        user_json("user_a", "Ada"),
        "Clerk's JSON unchanged"
    );
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(
        get(&gate, "/v1/users/user_a").await.body["first_name"],
        "Ada"
    );
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        1,
        "the second read was a hit"
    );

    let updated = call(
        &gate,
        Method::PATCH,
        "/v1/users/user_a",
        Some(json!({"first_name": "Grace"})),
        None,
    )
    .await;
    assert_eq!(
        (updated.status, updated.body["first_name"].as_str()),
        (200, Some("Grace"))
    );
    assert_eq!(
        clerk.last_body(Endpoint::UsersUpdate),
        Some(json!({"first_name": "Grace"})),
        "the body reached Clerk as sent"
    );
    assert_eq!(
        get(&gate, "/v1/users/user_a").await.body["first_name"],
        "Grace"
    );
    assert_eq!(clerk.calls(Endpoint::UsersGet), 2, "PATCH invalidated");

    let meta = call(
        &gate,
        Method::PATCH,
        "/v1/users/user_a/metadata",
        Some(json!({"public_metadata": {"plan": "pro"}})),
        None,
    )
    .await;
    assert_eq!(meta.status, 200);
    let after = get(&gate, "/v1/users/user_a").await;
    assert_eq!(after.body["public_metadata"], json!({"plan": "pro"}));
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        3,
        "metadata PATCH invalidated"
    );
    assert_eq!(get(&gate, "/v1/users/user_a").await.status, 200);
    assert_eq!(clerk.calls(Endpoint::UsersGet), 3);

    assert_eq!(gate.metrics.user_cache_misses.get(), 3);
    assert_eq!(gate.metrics.user_cache_hits.get(), 2);
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::UsersGet, LocalApiResult::Ok),
        5
    );
    assert_eq!(
        gate.metrics
            .clerk_api_requests
            .get(ApiEndpoint::UsersGet, ApiResult::Ok),
        3
    );
    let text = gate.metrics_text().await;
    assert!(
        text.contains(r#"clerkgate_local_api_requests_total{result="ok",route="users_update"} 1"#),
        "{text}"
    );
    assert!(text.contains("clerkgate_user_cache_hits_total 2"));
    assert!(
        text.contains(
            r#"clerkgate_clerk_api_requests_total{endpoint="users_metadata_update",result="ok"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn user_webhooks_invalidate_the_cached_user() {
    let clerk = FakeClerk::start().await;
    clerk.enable_backend_api();
    clerk.set_user(user_json("user_w", "Before"));
    let upstream = Upstream::start().await;
    let extra = format!("[webhooks]\nsecret = \"{}\"\n", clerk.webhook_secret());
    let gate = Sidecar::start(&clerk, &upstream, &extra).await;

    assert_eq!(
        get(&gate, "/v1/users/user_w").await.body["first_name"],
        "Before"
    );
    // Changed in Clerk's dashboard, say: clerkgate cannot know yet.
    clerk.set_user(user_json("user_w", "After"));
    assert_eq!(
        get(&gate, "/v1/users/user_w").await.body["first_name"],
        "Before"
    );
    assert_eq!(clerk.calls(Endpoint::UsersGet), 1);

    deliver_webhook(
        &gate,
        &clerk,
        "msg_upd_w",
        "user.updated",
        user_json("user_w", "After"),
    )
    .await;
    assert_eq!(
        get(&gate, "/v1/users/user_w").await.body["first_name"],
        "After"
    );
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        2,
        "user.updated invalidated"
    );

    // Deleted in the dashboard: after user.deleted the next read asks Clerk, which says 404;
    // other users stay cached.
    clerk.set_user(user_json("user_stays", "Stay"));
    assert_eq!(get(&gate, "/v1/users/user_stays").await.status, 200);
    let calls = clerk.calls(Endpoint::UsersGet);
    clerk.remove_user("user_w");
    assert_eq!(
        get(&gate, "/v1/users/user_w").await.status,
        200,
        "still cached"
    );
    let deleted = json!({"object": "user", "id": "user_w", "deleted": true});
    deliver_webhook(&gate, &clerk, "msg_del_w", "user.deleted", deleted).await;
    let r = get(&gate, "/v1/users/user_w").await;
    assert_eq!((r.status, r.code()), (404, "resource_not_found"));
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        calls + 1,
        "user.deleted invalidated"
    );
    assert_eq!(get(&gate, "/v1/users/user_stays").await.status, 200);
    assert_eq!(clerk.calls(Endpoint::UsersGet), calls + 1);
}

#[tokio::test]
async fn concurrent_misses_for_one_user_make_one_backend_call() {
    let (clerk, _up, gate) = start(&[("user_c", "Cora")], "").await;
    // Clerk holds its answer, so the first read is still in flight while the others arrive; any
    // that arrive after the release are served by the cache. Either way: one call.
    clerk.hold_api();
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let url = gate.local_url("/v1/users/user_c");
            tokio::spawn(async move {
                let resp = client().get(url).send().await.unwrap();
                (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
            })
        })
        .collect();
    assert!(clerk.wait_for_calls(Endpoint::UsersGet, 1, WAIT).await);
    clerk.release_api();
    for reader in readers {
        let (status, body) = reader.await.unwrap();
        assert_eq!((status, body["first_name"].as_str()), (200, Some("Cora")));
    }
    assert_eq!(clerk.calls(Endpoint::UsersGet), 1);
    assert_eq!(gate.metrics.user_cache_misses.get(), 1);
    assert_eq!(gate.metrics.user_cache_hits.get(), 15);
}

#[tokio::test]
async fn an_unknown_user_is_clerks_404_passed_through_and_cached_briefly() {
    let (clerk, _up, gate) = start(&[], "[local_api]\nmissing_user_cache_ttl_seconds = 1\n").await;
    for _ in 0..3 {
        let r = get(&gate, "/v1/users/user_nobody").await;
        assert_eq!((r.status, r.code()), (404, "resource_not_found"));
        assert_eq!(
            r.body["clerk_trace_id"], "fake-trace",
            "Clerk's own body, not a rewrite"
        );
    }
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        1,
        "a burst of reads of a missing user is one Backend API call"
    );
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::UsersGet, LocalApiResult::NotFound),
        3
    );
    // The 404 lives only missing_user_cache_ttl_seconds (the user's TTL is 60 s).
    clerk.set_user(user_json("user_nobody", "Late"));
    // Found by 1.3 s: polled, since reads within the TTL are answered from the cache.
    let mut r = None;
    let found = crate::support::eventually(Duration::from_millis(1_300), async || {
        let reply = get(&gate, "/v1/users/user_nobody").await;
        let done = reply.status == 200;
        r = Some(reply);
        done
    })
    .await;
    let r = r.expect("one request");
    assert!(found, "the 404 outlived its TTL: {}", r.status);
    assert_eq!(
        (r.status, r.body["first_name"].as_str()),
        (200, Some("Late"))
    );
    assert_eq!(clerk.calls(Endpoint::UsersGet), 2);
}

#[tokio::test]
async fn a_user_created_webhook_or_a_write_ends_a_cached_404() {
    let clerk = FakeClerk::start().await;
    clerk.enable_backend_api();
    let upstream = Upstream::start().await;
    let extra = format!("[webhooks]\nsecret = \"{}\"\n", clerk.webhook_secret());
    let gate = Sidecar::start(&clerk, &upstream, &extra).await;
    assert_eq!(get(&gate, "/v1/users/user_new").await.status, 404);
    clerk.set_user(user_json("user_new", "Neo"));
    assert_eq!(
        get(&gate, "/v1/users/user_new").await.status,
        404,
        "still the cached 404 (5 s by default)"
    );
    assert_eq!(clerk.calls(Endpoint::UsersGet), 1);
    deliver_webhook(
        &gate,
        &clerk,
        "msg_created_1",
        "user.created",
        json!({"id": "user_new", "object": "user"}),
    )
    .await;
    let r = get(&gate, "/v1/users/user_new").await;
    assert_eq!(
        (r.status, r.body["first_name"].as_str()),
        (200, Some("Neo"))
    );
    assert_eq!(clerk.calls(Endpoint::UsersGet), 2);

    // A write through the local API invalidates a cached 404 as well.
    assert_eq!(get(&gate, "/v1/users/user_later").await.status, 404);
    clerk.set_user(user_json("user_later", "Lea"));
    let r = call(
        &gate,
        Method::PATCH,
        "/v1/users/user_later",
        Some(json!({"last_name": "L"})),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&gate, "/v1/users/user_later").await.status, 200);

    // With the TTL at 0, 404s are not cached at all.
    let (clerk, _up, gate) = start(&[], "[local_api]\nmissing_user_cache_ttl_seconds = 0\n").await;
    for expected in [1, 2] {
        assert_eq!(get(&gate, "/v1/users/user_nobody").await.status, 404);
        assert_eq!(clerk.calls(Endpoint::UsersGet), expected);
    }
}

#[tokio::test]
async fn clerks_429_is_passed_on_with_its_retry_after_and_pauses_later_calls() {
    let (clerk, _up, gate) = start(&[("user_r", "Rae")], "").await;
    clerk.fail_api(Failure::RetryAfter(7));
    let r = get(&gate, "/v1/users/user_r").await;
    assert_eq!((r.status, r.code()), (429, "too_many_requests"));
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(clerk.calls(Endpoint::UsersGet), 1, "a 429 is not retried");

    // Clerk blocks for 7 s; clerkgate does not ask again before then, whatever the route.
    clerk.fail_api(Failure::None);
    let r = call(
        &gate,
        Method::PATCH,
        "/v1/users/user_r",
        Some(json!({"first_name": "X"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (429, "clerkgate_rate_limited"));
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=7).contains(&wait), "{wait}");
    assert_eq!(clerk.calls(Endpoint::UsersUpdate), 0);
    assert_eq!(
        gate.metrics
            .clerk_api_requests
            .get(ApiEndpoint::UsersGet, ApiResult::RateLimited),
        1
    );
}

#[tokio::test]
async fn user_updates_are_limited_per_user_before_reaching_clerk() {
    let (clerk, _up, gate) = start(
        &[("user_p", "Pat"), ("user_q", "Quinn")],
        "[local_api]\nuser_updates_per_10s = 2\n",
    )
    .await;
    let patch = |id: &'static str| {
        let gate = &gate;
        async move {
            call(
                gate,
                Method::PATCH,
                &format!("/v1/users/{id}"),
                Some(json!({"last_name": "L"})),
                None,
            )
            .await
        }
    };
    assert_eq!(patch("user_p").await.status, 200);
    assert_eq!(patch("user_p").await.status, 200);
    let r = patch("user_p").await;
    assert_eq!((r.status, r.code()), (429, "clerkgate_rate_limited"));
    assert!(r.header("retry-after").is_some());
    assert_eq!(clerk.calls(Endpoint::UsersUpdate), 2);
    assert_eq!(
        patch("user_q").await.status,
        200,
        "another user is unaffected"
    );
}

#[tokio::test]
async fn a_hanging_clerk_is_a_504_with_gets_retried_and_writes_not() {
    let (clerk, _up, gate) = start(
        &[("user_h", "Hal")],
        "[local_api]\nattempt_timeout_ms = 200\nrequest_timeout_ms = 4000\nget_retries = 2\n",
    )
    .await;
    clerk.fail_api(Failure::Hang);
    let r = get(&gate, "/v1/users/user_h").await;
    assert_eq!((r.status, r.code()), (504, "clerkgate_upstream_timeout"));
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        3,
        "one attempt and two retries"
    );

    let r = call(
        &gate,
        Method::PATCH,
        "/v1/users/user_h",
        Some(json!({"first_name": "H"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (504, "clerkgate_upstream_timeout"));
    assert_eq!(
        clerk.calls(Endpoint::UsersUpdate),
        1,
        "a write is never retried"
    );
    assert_eq!(
        gate.metrics
            .clerk_api_requests
            .get(ApiEndpoint::UsersGet, ApiResult::Timeout),
        3
    );
}

#[tokio::test]
async fn the_request_deadline_bounds_the_wait_whatever_the_retries() {
    let (clerk, _up, gate) = start(
        &[("user_d", "Dee")],
        "[local_api]\nattempt_timeout_ms = 60000\nrequest_timeout_ms = 300\n",
    )
    .await;
    clerk.fail_api(Failure::Hang);
    let r = get(&gate, "/v1/users/user_d").await;
    assert_eq!((r.status, r.code()), (504, "clerkgate_upstream_timeout"));
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::UsersGet, LocalApiResult::Timeout),
        1
    );
}

#[tokio::test]
async fn a_failed_get_is_retried_and_a_failed_write_is_passed_on() {
    let (clerk, _up, gate) = start(&[("user_f", "Flo")], "").await;
    clerk.fail_api_times(Failure::Status(503), 1);
    let r = get(&gate, "/v1/users/user_f").await;
    assert_eq!(r.status, 200);
    assert_eq!(clerk.calls(Endpoint::UsersGet), 2);

    clerk.fail_api_times(Failure::Status(503), 1);
    let r = call(
        &gate,
        Method::PATCH,
        "/v1/users/user_f",
        Some(json!({"first_name": "F"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (503, "internal_clerk_error"));
    assert_eq!(clerk.calls(Endpoint::UsersUpdate), 1);

    clerk.fail_api_times(Failure::Status(500), 1);
    let r = call(&gate, Method::DELETE, "/v1/users/user_f", None, None).await;
    assert_eq!(
        (r.status, r.code()),
        (500, "internal_clerk_error"),
        "Clerk's own 500: status and body unchanged"
    );
    assert_eq!(r.body["clerk_trace_id"], "fake-trace");

    // A GET that keeps failing: retried, then Clerk's last answer as it was.
    clerk.fail_api_times(Failure::Status(500), 3);
    let r = get(&gate, "/v1/users/user_f").await;
    assert_eq!((r.status, r.code()), (500, "internal_clerk_error"));
    assert_eq!(clerk.calls(Endpoint::UsersGet), 5);
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::UsersGet, LocalApiResult::UpstreamError),
        1
    );
}

#[tokio::test]
async fn deleting_a_user_denies_their_earlier_tokens_at_the_proxy() {
    let (clerk, upstream, gate) = start(&[("user_x", "Xan")], "").await;
    let token = older_token(&clerk, "user_x");
    assert_eq!(proxied(&gate, &token).await.0, 200);
    assert_eq!(get(&gate, "/v1/users/user_x").await.status, 200);

    let r = call(&gate, Method::DELETE, "/v1/users/user_x", None, None).await;
    assert_eq!(
        (r.status, r.body["deleted"].as_bool()),
        (200, Some(true)),
        "Clerk's DeletedObject"
    );
    let before = upstream.count();
    let (status, body) = proxied(&gate, &token).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("user-revoked"))
    );
    assert_eq!(upstream.count(), before);
    assert_eq!(
        get(&gate, "/v1/users/user_x").await.status,
        404,
        "not served from the cache"
    );
}

#[tokio::test]
async fn revoking_a_session_denies_it_at_the_proxy_on_the_next_request() {
    let (clerk, upstream, gate) = start(&[], "").await;
    let token = clerk.session_token("user_1");
    let sid = claim(&token, "sid");
    clerk.add_session(&sid, "user_1", "active");
    assert_eq!(proxied(&gate, &token).await.0, 200);
    assert_eq!(
        proxied(&gate, &token).await.0,
        200,
        "now in the token cache"
    );
    let session = get(&gate, &format!("/v1/sessions/{sid}")).await;
    assert_eq!(session.body["status"], "active");

    let r = call(
        &gate,
        Method::POST,
        &format!("/v1/sessions/{sid}/revoke"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("revoked"))
    );
    assert_eq!(clerk.session_status(&sid).as_deref(), Some("revoked"));

    let before = upstream.count();
    let (status, body) = proxied(&gate, &token).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("session-revoked"))
    );
    assert_eq!(upstream.count(), before, "never reached the upstream");
    assert_eq!(
        get(&gate, &format!("/v1/sessions/{sid}")).await.body["status"],
        "revoked",
        "the cached session was invalidated"
    );
    let verify = call(
        &gate,
        Method::POST,
        "/v1/tokens/verify",
        Some(json!({"token": token})),
        None,
    )
    .await;
    assert_eq!((verify.status, verify.code()), (401, "session-revoked"));
    assert!(
        gate.metrics_text()
            .await
            .contains("clerkgate_revoked_sessions 1")
    );
}

#[tokio::test]
async fn a_revoke_clerk_refuses_denies_nothing() {
    let (clerk, _up, gate) = start(&[], "").await;
    let token = clerk.session_token("user_1");
    let sid = claim(&token, "sid");
    // The fake does not know the session: Clerk's 404 is passed on and the token still works.
    let r = call(
        &gate,
        Method::POST,
        &format!("/v1/sessions/{sid}/revoke"),
        None,
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (404, "resource_not_found"));
    assert_eq!(proxied(&gate, &token).await.0, 200);
}

#[tokio::test]
async fn session_reads_lists_and_creation_pass_through() {
    let (clerk, _up, gate) = start(&[("user_s", "Sam"), ("user_t", "Tia")], "").await;
    clerk.add_session("sess_s1", "user_s", "active");
    clerk.add_session("sess_s2", "user_s", "ended");
    clerk.add_session("sess_t1", "user_t", "active");

    for _ in 0..2 {
        let r = get(&gate, "/v1/sessions/sess_s1").await;
        assert_eq!(
            (r.status, r.body["user_id"].as_str()),
            (200, Some("user_s"))
        );
    }
    assert_eq!(clerk.session_fetches(), 1, "cached briefly");

    let r = get(&gate, "/v1/sessions?user_id=user_s&status=active").await;
    assert_eq!(r.status, 200);
    let ids: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sess_s1", "sess_s2"]);
    assert_eq!(
        clerk.last_query(Endpoint::SessionsList).as_deref(),
        Some("user_id=user_s&status=active"),
        "filters passed through"
    );
    let r = get(&gate, "/v1/sessions").await;
    assert_eq!(
        (r.status, r.code()),
        (422, "form_param_missing"),
        "Clerk's refusal"
    );

    let r = get(&gate, "/v1/users?user_id=user_t&user_id=user_s&limit=5").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    assert_eq!(
        clerk.last_query(Endpoint::UsersList).as_deref(),
        Some("user_id=user_t&user_id=user_s&limit=5")
    );
    get(&gate, "/v1/users?user_id=user_t").await;
    assert_eq!(clerk.calls(Endpoint::UsersList), 2, "lists are not cached");

    let r = call(
        &gate,
        Method::POST,
        "/v1/sessions",
        Some(json!({"user_id": "user_t"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("active")));
    assert_eq!(r.body["user_id"], "user_t");
    let r = call(
        &gate,
        Method::POST,
        "/v1/sessions",
        Some(json!({"user_id": "user_nobody"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (404, "resource_not_found"));
}

#[tokio::test]
async fn tokens_verify_returns_the_normalised_identity() {
    let (clerk, _up, gate) = start(&[], "").await;
    let mut claims = clerk.claims("user_v");
    claims["fea"] = json!("o:dashboard,o:teams");
    claims["o"] =
        json!({"id": "org_1", "slg": "acme", "rol": "admin", "per": "manage,read", "fpm": "3,2"});
    claims["act"] = json!({"sub": "user_support"});
    let token = clerk.mint(claims);
    let r = call(
        &gate,
        Method::POST,
        "/v1/tokens/verify",
        Some(json!({"token": token})),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user_id"], "user_v");
    assert_eq!(r.body["session_id"], claim(&token, "sid"));
    assert_eq!(
        r.body["org"],
        json!({
            "id": "org_1",
            "slug": "acme",
            "role": "org:admin",
            "permissions": ["org:dashboard:manage", "org:dashboard:read", "org:teams:read"],
        })
    );
    assert_eq!(r.body["actor_id"], "user_support");
    assert_eq!(r.body["claims"]["sub"], "user_v");
    assert_eq!(r.body["claims"]["v"], 2);
    assert_eq!(clerk.calls(Endpoint::UsersGet), 0);
}

#[tokio::test]
async fn tokens_verify_rejects_bad_tokens_with_the_clerk_reason_code() {
    let (clerk, _up, gate) = start(&[], "").await;
    let mut expired = clerk.claims("user_v");
    expired["iat"] = json!(now() - 600);
    expired["nbf"] = json!(now() - 600);
    expired["exp"] = json!(now() - 300);
    let mut wrong_issuer = clerk.claims("user_v");
    wrong_issuer["iss"] = json!("https://evil.example.com");
    for (token, code) in [
        (clerk.mint(expired), "token-expired"),
        (clerk.mint(wrong_issuer), "token-invalid-issuer"),
        ("not.a.jwt".to_owned(), "token-invalid"),
        (String::new(), "session-token-missing"),
    ] {
        let r = call(
            &gate,
            Method::POST,
            "/v1/tokens/verify",
            Some(json!({"token": token})),
            None,
        )
        .await;
        assert_eq!((r.status, r.code()), (401, code));
    }
    let r = call(
        &gate,
        Method::POST,
        "/v1/tokens/verify",
        Some(json!({"jwt": "x"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "clerkgate_invalid_body"));
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::TokensVerify, LocalApiResult::TokenInvalid),
        4
    );
}

#[tokio::test]
async fn a_configured_token_is_required_on_every_request() {
    const TOKEN: &str = "local-api-test-token-0123456789";
    let (clerk, _up, gate) = start(
        &[("user_k", "Kai")],
        &format!("[local_api]\ntoken = \"{TOKEN}\"\n"),
    )
    .await;
    for presented in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
        let r = call(&gate, Method::GET, "/v1/users/user_k", None, presented).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "clerkgate_unauthorized"),
            "{presented:?}"
        );
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    }
    let r = call(
        &gate,
        Method::POST,
        "/v1/tokens/verify",
        Some(json!({"token": clerk.session_token("user_k")})),
        None,
    )
    .await;
    assert_eq!(r.status, 401, "every route, verification included");
    assert_eq!(clerk.calls(Endpoint::UsersGet), 0, "refused before Clerk");

    let r = call(&gate, Method::GET, "/v1/users/user_k", None, Some(TOKEN)).await;
    assert_eq!(
        (r.status, r.body["first_name"].as_str()),
        (200, Some("Kai"))
    );
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::UsersGet, LocalApiResult::Unauthorized),
        3
    );
}

#[tokio::test]
async fn the_default_is_loopback_and_binding_elsewhere_without_a_token_exits_64() {
    let clerk = FakeClerk::start().await;
    let config = crate::support::sidecar::config(
        &crate::support::sidecar::base_toml(&clerk, "http://127.0.0.1:3000"),
        "",
    )
    .unwrap();
    assert!(config.local_api.listen.ip().is_loopback());
    assert!(config.local_api.token.is_none());

    let check = |env: &[(&str, &str)]| {
        let mut cmd = crate::support::process::command(&["check-config"], env);
        cmd.env("CLERK_SECRET_KEY", &clerk.secret_key)
            .env("CLERK_PUBLISHABLE_KEY", clerk.publishable_key());
        cmd.output().expect("clerkgate runs")
    };
    let out = check(&[("CLERKGATE_LOCAL_API__LISTEN", "0.0.0.0:9091")]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("local_api.token"), "{stderr}");

    // A token that looks like a number stays a string, and is never printed.
    let out = check(&[
        ("CLERKGATE_LOCAL_API__LISTEN", "0.0.0.0:9091"),
        ("CLERKGATE_LOCAL_API__TOKEN", "12345678901234567890"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[local_api]"), "{stdout}");
    assert!(!stdout.contains("12345678901234567890"), "{stdout}");
}

#[tokio::test]
async fn a_disabled_local_api_does_not_listen() {
    let (_clerk, _up, gate) = start(&[], "[local_api]\nenabled = false\n").await;
    let err = client()
        .get(gate.local_url("/v1/users/user_1"))
        .send()
        .await
        .expect_err("nothing listens");
    assert!(err.is_connect(), "{err}");
}

#[tokio::test]
async fn unknown_routes_bad_methods_ids_and_bodies_are_refused_in_clerks_shape() {
    let (clerk, _up, gate) = start(&[("user_b", "Bo")], "").await;
    let r = get(&gate, "/v1/organizations").await;
    assert_eq!((r.status, r.code()), (404, "clerkgate_route_not_found"));
    let r = call(&gate, Method::PUT, "/v1/users/user_b", None, None).await;
    assert_eq!((r.status, r.code()), (405, "clerkgate_method_not_allowed"));
    assert_eq!(r.header("allow"), Some("GET, PATCH, DELETE"));
    let r = get(&gate, "/v1/users/..%2Fjwks").await;
    assert_eq!((r.status, r.code()), (400, "clerkgate_invalid_id"));
    let r = client()
        .patch(gate.local_url("/v1/users/user_b"))
        .body("first_name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client()
        .patch(gate.local_url("/v1/users/user_b"))
        .json(&json!({"first_name": "x".repeat(2 * 1024 * 1024)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let every = [
        Endpoint::UsersGet,
        Endpoint::UsersUpdate,
        Endpoint::UsersList,
    ];
    assert!(
        every.iter().all(|e| clerk.calls(*e) == 0),
        "nothing reached Clerk"
    );
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::Unknown, LocalApiResult::BadRequest),
        3
    );
}

#[tokio::test]
async fn users_count_is_an_uncached_pass_through_with_its_query() {
    let (clerk, _up, gate) =
        start(&[("user_a", "Ada"), ("user_b", "Bo"), ("user_c", "Cy")], "").await;
    let r = get(&gate, "/v1/users/count?user_id=user_a&user_id=user_b").await;
    assert_eq!(
        (r.status, r.body.clone()),
        (200, json!({"object": "total_count", "total_count": 2})),
        "the filters reached Clerk"
    );
    assert_eq!(
        clerk.last_query(Endpoint::UsersCount).as_deref(),
        Some("user_id=user_a&user_id=user_b")
    );
    assert_eq!(get(&gate, "/v1/users/count").await.body["total_count"], 3);
    clerk.set_user(user_json("user_d", "Dee"));
    assert_eq!(
        get(&gate, "/v1/users/count").await.body["total_count"],
        4,
        "not cached: a new user counts at once"
    );
    assert_eq!(clerk.calls(Endpoint::UsersCount), 3);
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        0,
        "count is never a user id"
    );
    let r = call(&gate, Method::DELETE, "/v1/users/count", None, None).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    assert_eq!(clerk.calls(Endpoint::UsersDelete), 0);
}

#[tokio::test]
async fn put_metadata_replaces_under_the_same_limit_and_invalidation() {
    let (clerk, _up, gate) = start(
        &[("user_m", "Mo")],
        "[local_api]\nuser_updates_per_10s = 2\n",
    )
    .await;
    let patch = call(
        &gate,
        Method::PATCH,
        "/v1/users/user_m/metadata",
        Some(json!({"public_metadata": {"a": {"x": 1}, "b": 2}})),
        None,
    )
    .await;
    assert_eq!(patch.status, 200);
    assert_eq!(
        get(&gate, "/v1/users/user_m").await.body["public_metadata"]["b"],
        2
    );
    let put = call(
        &gate,
        Method::PUT,
        "/v1/users/user_m/metadata",
        Some(json!({"public_metadata": {"a": {"y": 1}}})),
        None,
    )
    .await;
    assert_eq!(
        (put.status, put.body["public_metadata"].clone()),
        (200, json!({"a": {"y": 1}})),
        "replaced, not merged"
    );
    assert_eq!(
        clerk.last_body(Endpoint::UsersMetadataReplace),
        Some(json!({"public_metadata": {"a": {"y": 1}}})),
        "the body reached Clerk as sent"
    );
    assert_eq!(
        get(&gate, "/v1/users/user_m").await.body["public_metadata"],
        json!({"a": {"y": 1}}),
        "the cached user was invalidated"
    );
    let r = call(
        &gate,
        Method::PUT,
        "/v1/users/user_m/metadata",
        Some(json!({"public_metadata": {}})),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (429, "clerkgate_rate_limited"),
        "the third update"
    );
    assert_eq!(clerk.calls(Endpoint::UsersMetadataReplace), 1);
    assert_eq!(
        gate.metrics
            .clerk_api_requests
            .get(ApiEndpoint::UsersMetadataReplace, ApiResult::Ok),
        1
    );
}

#[tokio::test]
async fn the_callers_api_version_is_forwarded_and_keys_the_cache() {
    let (clerk, _up, gate) = start(&[("user_v", "Vi")], "").await;
    let versioned = |method: Method, path: &str, version: Option<&str>, body: Option<Value>| {
        let mut req = client().request(method, gate.local_url(path));
        if let Some(v) = version {
            req = req.header("Clerk-API-Version", v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(
        versioned(Method::GET, "/v1/users/user_v", None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        clerk.last_api_version(Endpoint::UsersGet).as_deref(),
        Some(clerkgate::clerk::API_VERSION),
        "clerkgate's own version by default"
    );
    assert_eq!(
        versioned(Method::GET, "/v1/users/user_v", Some("2025-04-10"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        clerk.last_api_version(Endpoint::UsersGet).as_deref(),
        Some("2025-04-10"),
        "the caller's version reached Clerk"
    );
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        2,
        "another version is another entry"
    );
    for version in [
        None,
        Some("2025-04-10"),
        Some(clerkgate::clerk::API_VERSION),
    ] {
        versioned(Method::GET, "/v1/users/user_v", version, None).await;
    }
    assert_eq!(clerk.calls(Endpoint::UsersGet), 2, "both versions cached");

    let (status, _) = versioned(
        Method::PATCH,
        "/v1/users/user_v",
        Some("2021-02-05"),
        Some(json!({"first_name": "V"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        clerk.last_api_version(Endpoint::UsersUpdate).as_deref(),
        Some("2021-02-05")
    );
    versioned(Method::GET, "/v1/users/count", Some("2025-04-10"), None).await;
    assert_eq!(
        clerk.last_api_version(Endpoint::UsersCount).as_deref(),
        Some("2025-04-10")
    );
    // Clerk's query-parameter form travels as the header, never both.
    versioned(
        Method::GET,
        "/v1/users/count?__clerk_api_version=2024-10-01&user_id=user_v",
        None,
        None,
    )
    .await;
    assert_eq!(
        clerk.last_api_version(Endpoint::UsersCount).as_deref(),
        Some("2024-10-01")
    );
    assert_eq!(
        clerk.last_query(Endpoint::UsersCount).as_deref(),
        Some("user_id=user_v")
    );
    // The write invalidated every version's entry.
    versioned(Method::GET, "/v1/users/user_v", Some("2025-04-10"), None).await;
    assert_eq!(clerk.calls(Endpoint::UsersGet), 3);

    let (status, body) =
        versioned(Method::GET, "/v1/users/user_v", Some("2025-04-10\tx"), None).await;
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (400, Some("clerkgate_invalid_api_version"))
    );
    assert_eq!(clerk.calls(Endpoint::UsersGet), 3, "nothing reached Clerk");
}

#[tokio::test]
async fn jwks_is_served_from_the_held_keys_without_asking_clerk() {
    let (clerk, _up, gate) = start(&[], "").await;
    let fetches = clerk.jwks_fetches();
    let published = || async {
        let r = client()
            .get(format!("{}/v1/jwks", clerk.url))
            .bearer_auth(&clerk.secret_key)
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()
    };
    let clerks = published().await;
    for _ in 0..5 {
        let r = get(&gate, "/v1/jwks").await;
        assert_eq!((r.status, &r.body), (200, &clerks), "Clerk's JWKS, as held");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(
        clerk.jwks_fetches(),
        fetches + 1,
        "five local reads, no Backend API call (the one fetch is this test's own)"
    );

    // A new key reaches the served JWKS once clerkgate fetched it (here: for a token).
    let kid = clerk.rotate();
    let token = clerk.session_token("user_1");
    assert_eq!(proxied(&gate, &token).await.0, 200);
    let r = get(&gate, "/v1/jwks").await;
    assert_eq!(r.body, published().await);
    assert!(r.body.to_string().contains(&kid));
    assert_eq!(
        gate.metrics
            .local_api_requests
            .get(LocalApiRoute::Jwks, LocalApiResult::Ok),
        6
    );
}

#[tokio::test]
async fn jwks_with_a_pinned_pem_key_is_a_documented_404() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let pem = clerk.key("ins_fake_1").public_key_pem();
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &format!("[clerk]\njwt_key = '''\n{pem}'''\n"),
    )
    .await;
    let r = get(&gate, "/v1/jwks").await;
    assert_eq!((r.status, r.code()), (404, "clerkgate_jwks_unavailable"));
    assert_eq!(clerk.jwks_fetches(), 0);
}

#[tokio::test]
async fn banning_or_locking_denies_earlier_tokens_and_unbanning_passes_through() {
    let (clerk, _up, gate) = start(&[("user_ban", "Ban"), ("user_lock", "Lock")], "").await;
    for (user, action, field) in [
        ("user_ban", "ban", "banned"),
        ("user_lock", "lock", "locked"),
    ] {
        let token = older_token(&clerk, user);
        assert_eq!(proxied(&gate, &token).await.0, 200);
        assert_eq!(
            get(&gate, &format!("/v1/users/{user}")).await.body[field],
            false
        );
        let r = call(
            &gate,
            Method::POST,
            &format!("/v1/users/{user}/{action}"),
            None,
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{action}");
        let (status, body) = proxied(&gate, &token).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (401, Some("user-revoked")),
            "{action}: earlier tokens refused at once"
        );
        assert_eq!(
            get(&gate, &format!("/v1/users/{user}")).await.body[field],
            true,
            "{action}: the cached user was invalidated"
        );
    }
    for (user, action, field) in [
        ("user_ban", "unban", "banned"),
        ("user_lock", "unlock", "locked"),
    ] {
        let r = call(
            &gate,
            Method::POST,
            &format!("/v1/users/{user}/{action}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (r.status, r.body[field].as_bool()),
            (200, Some(false)),
            "{action}"
        );
        assert_eq!(
            get(&gate, &format!("/v1/users/{user}")).await.body[field],
            false
        );
    }
    assert_eq!(clerk.calls(Endpoint::UsersModerate), 4);
    assert_eq!(
        clerk.calls(Endpoint::UsersGet),
        6,
        "every write invalidated"
    );

    // Clerk's refusal denies nothing.
    let token = older_token(&clerk, "user_ghost");
    let r = call(&gate, Method::POST, "/v1/users/user_ghost/ban", None, None).await;
    assert_eq!((r.status, r.code()), (404, "resource_not_found"));
    assert_eq!(proxied(&gate, &token).await.0, 200);
}

#[tokio::test]
async fn memberships_template_tokens_and_verify_session_pass_through() {
    let (clerk, _up, gate) = start(&[("user_o", "Oz")], "").await;
    clerk.add_membership("user_o", "org_a", "org:admin");
    clerk.add_membership("user_o", "org_b", "org:member");
    clerk.add_session("sess_o1", "user_o", "active");
    clerk.add_jwt_template("supabase");

    let r = get(
        &gate,
        "/v1/users/user_o/organization_memberships?limit=1&offset=1",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["total_count"], 2);
    assert_eq!(r.body["data"][0]["organization"]["id"], "org_b");
    assert_eq!(
        clerk.last_query(Endpoint::UsersMemberships).as_deref(),
        Some("limit=1&offset=1")
    );
    get(&gate, "/v1/users/user_o/organization_memberships").await;
    assert_eq!(clerk.calls(Endpoint::UsersMemberships), 2, "not cached");

    let r = call(
        &gate,
        Method::POST,
        "/v1/sessions/sess_o1/tokens/supabase",
        None,
        None,
    )
    .await;
    assert_eq!((r.status, r.body["object"].as_str()), (200, Some("token")));
    assert_eq!(
        claim(r.body["jwt"].as_str().unwrap(), "template"),
        "supabase"
    );
    let r = call(
        &gate,
        Method::POST,
        "/v1/sessions/sess_o1/tokens",
        Some(json!({"expires_in_seconds": 120})),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        clerk.last_body(Endpoint::SessionsToken),
        Some(json!({"expires_in_seconds": 120}))
    );
    let r = call(
        &gate,
        Method::POST,
        "/v1/sessions/sess_o1/tokens/nope",
        None,
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (404, "resource_not_found"));
    let r = call(
        &gate,
        Method::POST,
        "/v1/sessions/sess_o1/tokens/a.b",
        None,
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "clerkgate_invalid_id"));
    assert_eq!(clerk.calls(Endpoint::SessionsToken), 3);

    let r = call(
        &gate,
        Method::POST,
        "/v1/sessions/sess_o1/verify",
        Some(json!({"token": "t"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.body["id"].as_str()), (200, Some("sess_o1")));
    assert_eq!(
        gate.metrics
            .clerk_api_requests
            .get(ApiEndpoint::SessionsVerify, ApiResult::Ok),
        1
    );
}
