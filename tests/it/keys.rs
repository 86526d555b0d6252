//! Verification keys: where they come from and how the cache behaves when Clerk rotates keys,
//! fails, or is not used at all (pinned PEM).
//!
//! Every test asserts on two things the code under test cannot fake: what the fake Clerk
//! received (`jwks_fetches`, or a recording server standing in for a JWKS host) and what the
//! client got back, plus the fetch-result counters that operators alert on.

use std::time::Duration;

use clerkgate::telemetry::{AuthFailure, JwksFetchResult, Outcome};
use serde_json::{Value, json};

use crate::support::eventually;
use crate::support::sidecar::{base_toml, config};
use crate::support::{Failure, FakeClerk, Sidecar, SigningKey, Upstream, client, sample};

/// Upper bound for every wait in this file; generous because CI machines stall.
const WAIT: Duration = Duration::from_secs(10);

/// Starts clerkgate without waiting for readiness (for tests where it must not become ready).
async fn start_unready(clerk: &FakeClerk, upstream: &Upstream, extra: &str) -> Sidecar {
    Sidecar::start_config(config(&base_toml(clerk, &upstream.url()), extra).expect("valid config"))
        .await
}

/// Sends `GET /k` with `token`; returns the status and, for refusals, the body's reason code.
async fn call(gate: &Sidecar, token: &str) -> (u16, String) {
    let resp = client()
        .get(gate.url("/k"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the proxy answers");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let reason = body["reason"].as_str().unwrap_or_default().to_owned();
    (status, reason)
}

/// A fresh token (never seen by the token cache) minted with the key `kid`.
fn token_with(clerk: &FakeClerk, kid: &str, sub: &str) -> String {
    clerk.key(kid).mint(&clerk.claims(sub))
}

#[tokio::test]
async fn jwks_is_fetched_at_start_with_the_secret_key_as_bearer() {
    let upstream = Upstream::start().await;

    let clerk = FakeClerk::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    assert_eq!(clerk.jwks_fetches(), 1, "one fetch at start");
    assert_eq!(gate.metrics.jwks_fetches.get(JwksFetchResult::Ok), 1);
    assert_eq!(call(&gate, &clerk.session_token("user_1")).await.0, 200);

    // The fake refuses any other bearer, so the readiness above proves which one was sent.
    let other = FakeClerk::start().await;
    let wrong = start_unready(
        &other,
        &upstream,
        "[clerk]\nsecret_key = \"sk_test_wrong\"\n",
    )
    .await;
    assert!(
        eventually(WAIT, async || {
            wrong
                .metrics
                .jwks_fetches
                .get(JwksFetchResult::Unauthorized)
                >= 1
        })
        .await,
        "Clerk refused the wrong secret key"
    );
    assert_eq!(wrong.readyz().await, 503);
    assert_eq!(wrong.metrics.jwks_fetches.get(JwksFetchResult::Ok), 0);

    gate.stop().await;
    wrong.stop().await;
}

#[tokio::test]
async fn readiness_waits_for_the_first_good_key_set_and_recovers_by_itself() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    clerk.fail(Failure::Status(500));
    let gate = start_unready(&clerk, &upstream, "").await;
    assert!(
        eventually(WAIT, async || {
            gate.metrics.jwks_fetches.get(JwksFetchResult::HttpError) >= 1
        })
        .await,
        "the first fetch failed"
    );

    assert_eq!(gate.readyz().await, 503);
    let resp = client()
        .get(gate.url("/k"))
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "no keys: fail closed");
    assert_eq!(resp.headers()["retry-after"], "5");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "jwk-remote-failed-to-load");
    assert_eq!(upstream.count(), 0);

    // Nobody pokes clerkgate: the background retry alone must bring it up.
    clerk.fail(Failure::None);
    assert!(gate.wait_ready(WAIT).await, "ready once Clerk answers");
    assert_eq!(call(&gate, &clerk.session_token("user_1")).await.0, 200);
    assert_eq!(gate.metrics.jwks_fetches.get(JwksFetchResult::Ok), 1);
    gate.stop().await;
}

#[tokio::test]
async fn rotated_key_is_fetched_once_and_the_old_key_works_while_published() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let before = clerk.jwks_fetches();

    let new_kid = clerk.rotate();
    assert_eq!(
        call(&gate, &token_with(&clerk, &new_kid, "user_new")).await,
        (200, String::new())
    );
    assert_eq!(clerk.jwks_fetches(), before + 1, "exactly one extra fetch");
    assert_eq!(
        call(&gate, &token_with(&clerk, &new_kid, "user_new_2"))
            .await
            .0,
        200
    );
    assert_eq!(
        call(&gate, &token_with(&clerk, "ins_fake_1", "user_old"))
            .await
            .0,
        200
    );
    assert_eq!(upstream.last().headers["x-user-id"], "user_old");
    assert_eq!(clerk.jwks_fetches(), before + 1, "known kids cost no fetch");
    gate.stop().await;
}

#[tokio::test]
async fn retired_key_is_refused_with_kid_mismatch_after_a_refetch() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[clerk]\njwks_min_refresh_interval_seconds = 0\n",
    )
    .await;
    let second = clerk.rotate();
    assert_eq!(
        call(&gate, &token_with(&clerk, &second, "user_a")).await.0,
        200
    );
    assert_eq!(
        call(&gate, &token_with(&clerk, "ins_fake_1", "user_b"))
            .await
            .0,
        200,
        "still published"
    );

    clerk.retire("ins_fake_1");
    let third = clerk.rotate();
    let fetches = clerk.jwks_fetches();
    assert_eq!(
        call(&gate, &token_with(&clerk, &third, "user_c")).await.0,
        200
    );
    assert!(
        clerk.jwks_fetches() > fetches,
        "the new kid caused a refetch"
    );
    let forwarded = upstream.count();

    let (status, reason) = call(&gate, &token_with(&clerk, "ins_fake_1", "user_d")).await;
    assert_eq!((status, reason.as_str()), (401, "jwk-kid-mismatch"));
    assert_eq!(upstream.count(), forwarded);
    assert_eq!(
        gate.metrics.auth_failures.get(AuthFailure::JwkKidMismatch),
        1
    );
    gate.stop().await;
}

/// Sends a request with each token concurrently; returns the statuses.
async fn call_concurrently(gate: &Sidecar, tokens: Vec<String>) -> Vec<u16> {
    let mut requests = tokio::task::JoinSet::new();
    for token in tokens {
        let url = gate.url("/k");
        requests.spawn(async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = requests.join_next().await {
        statuses.push(status.unwrap().unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_a_new_kid_share_one_fetch() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    // No floor: only single flight can keep this to one fetch.
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[clerk]\njwks_min_refresh_interval_seconds = 0\n",
    )
    .await;
    let before = clerk.jwks_fetches();
    let kid = clerk.rotate();
    let tokens = (0..20)
        .map(|i| token_with(&clerk, &kid, &format!("user_{i}")))
        .collect();
    assert_eq!(call_concurrently(&gate, tokens).await, vec![200; 20]);
    assert_eq!(upstream.count(), 20);
    assert_eq!(clerk.jwks_fetches(), before + 1, "single flight");
    gate.stop().await;
}

#[tokio::test]
async fn second_unknown_kid_within_the_refresh_floor_costs_no_fetch() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let before = clerk.jwks_fetches();
    let kid = clerk.rotate();
    assert_eq!(
        call(&gate, &token_with(&clerk, &kid, "user_1")).await.0,
        200
    );
    assert_eq!(clerk.jwks_fetches(), before + 1);

    // Within jwks_min_refresh_interval_seconds (default 30) another unknown kid costs nothing.
    let too_soon = clerk.rotate();
    let (status, reason) = call(&gate, &token_with(&clerk, &too_soon, "user_2")).await;
    assert_eq!((status, reason.as_str()), (401, "jwk-kid-mismatch"));
    assert_eq!(clerk.jwks_fetches(), before + 1, "the floor holds");
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_kids_claiming_our_issuer_cost_at_most_one_fetch_per_floor() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;
    let before = clerk.jwks_fetches();
    let header = |i: usize| json!({"alg": "RS256", "kid": format!("ins_forged_{i}"), "typ": "JWT"});
    let forged: Vec<String> = (0..20)
        .map(|i| clerk.sign(header(i % 4), clerk.claims("user_1")))
        .collect();
    assert_eq!(call_concurrently(&gate, forged).await, vec![401; 20]);
    assert!(
        clerk.jwks_fetches() <= before + 1,
        "{}",
        clerk.jwks_fetches()
    );
    assert_eq!(
        gate.metrics.auth_failures.get(AuthFailure::JwkKidMismatch),
        20
    );
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn with_a_zero_refresh_floor_every_new_kid_is_fetched() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[clerk]\njwks_min_refresh_interval_seconds = 0\n",
    )
    .await;
    let before = clerk.jwks_fetches();
    for n in 1..=2 {
        let kid = clerk.rotate();
        assert_eq!(
            call(&gate, &token_with(&clerk, &kid, "user_1")).await.0,
            200
        );
        assert_eq!(clerk.jwks_fetches(), before + n);
    }
    gate.stop().await;
}

#[tokio::test]
async fn unknown_kid_from_a_foreign_issuer_never_causes_a_fetch() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[clerk]\njwks_min_refresh_interval_seconds = 0\n",
    )
    .await;
    let before = clerk.jwks_fetches();
    let mut claims = clerk.claims("user_1");
    claims["iss"] = "https://evil.example".into();
    for i in 0..5 {
        let header = json!({"alg": "RS256", "kid": format!("ins_forged_{i}"), "typ": "JWT"});
        let (status, _) = call(&gate, &clerk.sign(header, claims.clone())).await;
        assert_eq!(status, 401);
    }
    assert_eq!(clerk.jwks_fetches(), before);
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn failing_refreshes_keep_the_last_good_keys_serving() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[clerk]\njwks_ttl_seconds = 1\njwks_fetch_timeout_seconds = 1\n",
    )
    .await;
    let mut sent = 0;
    let failures = [
        (Failure::Status(500), JwksFetchResult::HttpError),
        (
            Failure::Body(b"not json".to_vec()),
            JwksFetchResult::Invalid,
        ),
        (Failure::Hang, JwksFetchResult::Timeout),
    ];
    for (failure, result) in failures {
        clerk.fail(failure.clone());
        let before = gate.metrics.jwks_fetches.get(result);
        let failed = eventually(WAIT, async || {
            sent += 1;
            let (status, _) = call(&gate, &clerk.session_token(&format!("user_{sent}"))).await;
            assert_eq!(status, 200, "{failure:?}: valid tokens keep working");
            assert_eq!(gate.readyz().await, 200, "{failure:?}: still ready");
            gate.metrics.jwks_fetches.get(result) > before
        })
        .await;
        assert!(
            failed,
            "{failure:?}: a background refresh failed as {result:?}"
        );
        sent += 1;
        assert_eq!(call(&gate, &clerk.session_token("user_after")).await.0, 200);
        assert_eq!(gate.readyz().await, 200);
    }
    assert_eq!(gate.metrics.requests.get(Outcome::Unavailable), 0);
    assert_eq!(gate.metrics.requests.get(Outcome::Forwarded), sent);
    assert_eq!(upstream.count() as u64, sent);
    gate.stop().await;
}

const MAX_STALE: &str = "[clerk]\njwks_ttl_seconds = 1\njwks_max_stale_seconds = 1\n";

#[tokio::test]
async fn keys_older_than_max_stale_fail_closed_until_clerk_answers_again() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, MAX_STALE).await;

    clerk.fail(Failure::Status(500));
    assert!(
        eventually(WAIT, async || gate.readyz().await == 503).await,
        "not ready once the keys are too old"
    );
    let forwarded = upstream.count();
    let (status, reason) = call(&gate, &clerk.session_token("user_1")).await;
    assert_eq!(
        (status, reason.as_str()),
        (503, "jwk-remote-failed-to-load")
    );
    assert_eq!(upstream.count(), forwarded);

    clerk.fail(Failure::None);
    assert!(gate.wait_ready(WAIT).await, "recovers when Clerk answers");
    assert_eq!(call(&gate, &clerk.session_token("user_1")).await.0, 200);
    gate.stop().await;
}

#[tokio::test]
async fn token_verified_before_an_outage_is_refused_once_keys_are_past_max_stale() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, MAX_STALE).await;
    let token = clerk.session_token("user_1");
    assert_eq!(call(&gate, &token).await.0, 200);

    clerk.fail(Failure::Status(500));
    assert!(eventually(WAIT, async || gate.readyz().await == 503).await);
    let (status, reason) = call(&gate, &token).await;
    assert_eq!(
        (status, reason.as_str()),
        (503, "jwk-remote-failed-to-load"),
        "no usable keys means 503 for every token, cached or not"
    );
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn jwks_body_over_the_cap_is_too_large_and_never_loaded() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    // A valid key set, padded to 10 KB: only its size is wrong.
    let body = json!({"keys": [clerk.key("ins_fake_1").jwk()], "pad": "x".repeat(10 * 1024)})
        .to_string()
        .into_bytes();
    clerk.fail(Failure::Body(body));

    let capped = start_unready(&clerk, &upstream, "[clerk]\njwks_max_body_bytes = 1024\n").await;
    assert!(
        eventually(WAIT, async || {
            capped.metrics.jwks_fetches.get(JwksFetchResult::TooLarge) >= 1
        })
        .await
    );
    assert_eq!(capped.readyz().await, 503);
    assert_eq!(capped.metrics.jwks_fetches.get(JwksFetchResult::Ok), 0);

    // Control: the same body under the default cap (256 KiB) is a usable key set.
    let uncapped = Sidecar::start(&clerk, &upstream, "").await;
    assert_eq!(call(&uncapped, &clerk.session_token("user_1")).await.0, 200);

    capped.stop().await;
    uncapped.stop().await;
}

/// Starts clerkgate against a JWKS that answers `body` and checks it is refused as
/// `no_usable_keys` with readiness down and valid tokens failing closed.
async fn assert_no_usable_keys(body: Value) {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    clerk.fail(Failure::Body(body.to_string().into_bytes()));
    let gate = start_unready(&clerk, &upstream, "").await;
    assert!(
        eventually(WAIT, async || {
            gate.metrics.jwks_fetches.get(JwksFetchResult::NoUsableKeys) >= 1
        })
        .await,
        "{body}: counted as no_usable_keys"
    );
    assert_eq!(gate.readyz().await, 503);
    let (status, reason) = call(&gate, &clerk.session_token("user_1")).await;
    assert_eq!(
        (status, reason.as_str()),
        (503, "jwk-remote-failed-to-load")
    );
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn empty_key_set_is_no_usable_keys_and_not_ready() {
    assert_no_usable_keys(json!({"keys": []})).await;
}

#[tokio::test]
async fn key_set_with_only_ec_keys_is_no_usable_keys_and_not_ready() {
    assert_no_usable_keys(json!({"keys": [{
        "kty": "EC", "kid": "ins_fake_1", "use": "sig", "alg": "ES256", "crv": "P-256",
        "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
    }]}))
    .await;
}

/// A configuration with a pinned PEM and no secret key.
fn pinned_toml(clerk: &FakeClerk, upstream: &Upstream, pem: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:1"
[clerk]
publishable_key = "{pk}"
api_url = "{api}"
jwt_key = '''
{pem}'''
[shutdown]
delay_seconds = 0
[log]
format = "text"
level = "warn"
"#,
        upstream = upstream.url(),
        pk = clerk.publishable_key(),
        api = clerk.url,
    )
}

#[tokio::test]
async fn pinned_pem_is_ready_at_once_and_never_fetches() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let pem = clerk.key("ins_fake_1").public_key_pem();
    let gate =
        Sidecar::start_config(config(&pinned_toml(&clerk, &upstream, &pem), "").unwrap()).await;
    assert_eq!(gate.readyz().await, 200, "ready without waiting");
    assert_eq!(call(&gate, &clerk.session_token("user_1")).await.0, 200);
    assert_eq!(upstream.last().headers["x-user-id"], "user_1");
    assert_eq!(clerk.jwks_fetches(), 0);
    assert_eq!(gate.metrics.jwks_fetches.get(JwksFetchResult::Ok), 0);
    gate.stop().await;
}

#[tokio::test]
async fn pinned_pem_of_another_key_rejects_tokens_as_invalid_signature() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let pem = SigningKey::generate("ins_other").unwrap().public_key_pem();
    let gate =
        Sidecar::start_config(config(&pinned_toml(&clerk, &upstream, &pem), "").unwrap()).await;
    let (status, reason) = call(&gate, &clerk.session_token("user_1")).await;
    assert_eq!((status, reason.as_str()), (401, "token-invalid-signature"));
    assert_eq!(upstream.count(), 0);
    assert_eq!(clerk.jwks_fetches(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn frontend_api_jwks_url_on_another_origin_is_fetched_without_the_secret() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let extra = format!(
        "[clerk]\njwks_url = \"{}/.well-known/jwks.json\"\napi_url = \"http://127.0.0.1:1\"\n",
        clerk.url
    );
    let gate = Sidecar::start(&clerk, &upstream, &extra).await;
    assert!(clerk.jwks_fetches() >= 1, "the fake served the key set");
    assert_eq!(call(&gate, &clerk.session_token("user_1")).await.0, 200);
    gate.stop().await;
}

#[tokio::test]
async fn secret_key_goes_only_to_the_backend_api_origin() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;

    // A recording server as the JWKS host on another origin than api_url.
    let foreign = Upstream::start().await;
    let extra = format!(
        "[clerk]\njwks_url = \"{}/.well-known/jwks.json\"\n",
        foreign.url()
    );
    let gate = start_unready(&clerk, &upstream, &extra).await;
    assert!(foreign.recorder.wait_for_count(1, WAIT).await);
    let seen = foreign.last();
    assert_eq!(seen.uri.path(), "/.well-known/jwks.json");
    assert!(
        seen.headers.get("authorization").is_none(),
        "the secret must not leave for {}",
        foreign.url()
    );

    // Control: the same recorder as the Backend API origin does get the bearer.
    let api = Upstream::start().await;
    let extra = format!(
        "[clerk]\napi_url = \"{url}\"\njwks_url = \"{url}/v1/jwks\"\n",
        url = api.url()
    );
    let same_origin = start_unready(&clerk, &upstream, &extra).await;
    assert!(api.recorder.wait_for_count(1, WAIT).await);
    assert_eq!(
        api.last().headers["authorization"],
        format!("Bearer {}", clerk.secret_key).as_str()
    );
    gate.stop().await;
    same_origin.stop().await;
}

#[tokio::test]
async fn key_count_and_age_gauges_are_exported() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[clerk]\njwks_min_refresh_interval_seconds = 0\n",
    )
    .await;
    let text = gate.metrics_text().await;
    assert_eq!(sample(&text, "clerkgate_jwks_keys"), Some(1.0), "{text}");
    assert!(
        sample(&text, "clerkgate_jwks_age_seconds").is_some(),
        "{text}"
    );

    let kid = clerk.rotate();
    assert_eq!(
        call(&gate, &token_with(&clerk, &kid, "user_1")).await.0,
        200
    );
    let text = gate.metrics_text().await;
    assert_eq!(sample(&text, "clerkgate_jwks_keys"), Some(2.0), "{text}");

    assert!(
        eventually(Duration::from_secs(5), async || {
            sample(&gate.metrics_text().await, "clerkgate_jwks_age_seconds")
                .is_some_and(|age| age >= 1.0)
        })
        .await,
        "the age gauge follows the clock"
    );
    gate.stop().await;
}
