//! JWKS faults: Clerk refusing connections, hanging, failing, rate limiting, answering garbage,
//! a 10 MB body, no keys, keys of the wrong type, and a rotation that drops a kid whose tokens
//! are still unexpired. For each: what the proxy answers, what /readyz says, what /metrics
//! shows, and that clerkgate recovers by itself once Clerk is back, both from a cold start (no
//! keys yet) and on a warm instance (keys cached).
//!
//! `tests/it/keys.rs` already covers a cold start against 500s (with recovery), a warm instance
//! through 500s, garbage and a hang (without recovery), a 10 KB body over a 1 KB cap, and empty
//! or EC-only sets on a cold start (without recovery). This file covers the rest of the matrix.

use serde_json::json;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clerkgate::dev::signing::jwks_json;

use super::common::{Answer, admin, get, start_unready, wait_ready};
use super::fakes::{Door, Mode};
use crate::support::{FakeClerk, Sidecar, SigningKey, Upstream, eventually};
use crate::support::{WAIT, sample};

/// One JWKS fault and the `clerkgate_jwks_fetches_total` result it must be counted as.
struct Case {
    name: &'static str,
    mode: Mode,
    result: &'static str,
}

/// How many cases [`case`] knows.
const CASES: usize = 9;

/// Fault number `i` of the matrix. Bodies that need key material use the key `ins_fake_1`.
fn case(clerk: &FakeClerk, i: usize) -> Case {
    let body = |v: serde_json::Value| Mode::Body(Arc::new(v.to_string().into_bytes()));
    let (name, mode, result) = match i {
        0 => ("connection refused", Mode::Refuse, "network"),
        1 => ("hanging", Mode::Hang, "timeout"),
        2 => ("500", Mode::Status(500), "http_error"),
        3 => ("429 with Retry-After", Mode::RetryAfter(1), "http_error"),
        4 => (
            "non-JSON body",
            Mode::Body(Arc::new(b"<html>Bad gateway</html>".to_vec())),
            "invalid",
        ),
        5 => {
            // A real key set padded to 10 MB: only the size is wrong. Built by concatenation,
            // since serialising 10 MB through serde_json in a debug build takes seconds.
            let jwk = clerk.key("ins_fake_1").jwk().to_string();
            let pad = "x".repeat(10 * 1024 * 1024);
            let ten_mb = format!(r#"{{"keys":[{jwk}],"pad":"{pad}"}}"#).into_bytes();
            ("10 MB body", Mode::Body(Arc::new(ten_mb)), "too_large")
        }
        6 => ("zero keys", body(json!({"keys": []})), "no_usable_keys"),
        7 => {
            let jwk = clerk.key("ins_fake_1").jwk();
            let mut enc = jwk.clone();
            enc["use"] = "enc".into();
            let mut no_alg = jwk;
            no_alg.as_object_mut().expect("a JWK object").remove("alg");
            // An HMAC key under the very kid the tokens carry: algorithm confusion bait.
            let oct = json!({"kty": "oct", "kid": "ins_fake_1", "alg": "HS256", "use": "sig", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"});
            let ec = json!({"kty": "EC", "kid": "ins_fake_1", "alg": "ES256", "use": "sig", "crv": "P-256",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
            (
                "wrong key types",
                body(json!({"keys": [enc, no_alg, oct, ec]})),
                "no_usable_keys",
            )
        }
        8 => {
            let jwk = clerk.key("ins_fake_1").jwk().to_string();
            let pad = "x".repeat(10 * 1024 * 1024);
            let ten_mb = format!(r#"{{"keys":[{jwk}],"pad":"{pad}"}}"#).into_bytes();
            (
                "10 MB chunked body without Content-Length",
                Mode::Chunked(Arc::new(ten_mb)),
                "too_large",
            )
        }
        _ => panic!("no case {i}"),
    };
    Case { name, mode, result }
}

/// clerkgate's settings for these tests: refresh every `ttl_seconds` (backing off at most that
/// long), 1 s fetch timeouts, every Clerk call through `door`.
pub fn toml(door: &Door, ttl_seconds: u64) -> String {
    format!(
        "[clerk]\napi_url = \"{}\"\njwks_ttl_seconds = {ttl_seconds}\njwks_fetch_timeout_seconds = 1\n",
        door.url()
    )
}

/// A token for `sub` signed with `kid` (whatever key the fake currently mints with).
pub fn token(clerk: &FakeClerk, kid: &str, sub: &str) -> String {
    let key: Arc<SigningKey> = clerk.key(kid);
    key.mint(&clerk.claims(sub))
}

fn fetches(result: &str) -> String {
    format!("clerkgate_jwks_fetches_total{{result=\"{result}\"}}")
}

const KEYS_GAUGE: &str = "clerkgate_jwks_keys";
const READY_GAUGE: &str = "clerkgate_ready";
const AGE_GAUGE: &str = "clerkgate_jwks_age_seconds";
const KEYS_UNAVAILABLE: &str =
    "clerkgate_auth_failures_total{reason=\"jwk-remote-failed-to-load\"}";
const UNAVAILABLE: &str = "clerkgate_requests_total{outcome=\"unavailable\"}";
const KID_MISMATCH: &str = "clerkgate_auth_failures_total{reason=\"jwk-kid-mismatch\"}";

/// Runs `case_fn` for every case of the matrix concurrently, each with its own Clerk and
/// clerkgate, and fails naming every case that failed.
async fn for_every_case<'a, F, Fut>(clerk: &'a FakeClerk, case_fn: F)
where
    F: Fn(&'a FakeClerk, usize) -> Fut,
    Fut: std::future::Future<Output = ()> + 'a,
{
    use futures_util::FutureExt;
    let runs = (0..CASES).map(|i| std::panic::AssertUnwindSafe(case_fn(clerk, i)).catch_unwind());
    let failed: Vec<String> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let e = r.err()?;
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Some(format!("case {i}: {why}"))
        })
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
}

async fn cold_case(clerk: &FakeClerk, i: usize) {
    let Case { name, mode, result } = case(clerk, i);
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    door.fail(mode).await;
    let gate = start_unready(clerk, &upstream, &toml(&door, 2)).await;

    assert!(
        eventually(WAIT, async || gate.metric(&fetches(result)).await >= 1.0).await,
        "{name}: the first fetch is counted as {result}"
    );
    assert_eq!(
        admin(&gate, "/readyz").await,
        (503, "not ready: keys-unavailable\n".to_owned()),
        "{name}"
    );
    let token = token(clerk, "ins_fake_1", "user_cold");
    assert_eq!(
        get(&gate, "/cold", &token).await,
        Answer {
            status: 503,
            reason: "jwk-remote-failed-to-load".into(),
            retry_after: Some("5".into()),
        },
        "{name}: no keys fails closed"
    );
    assert_eq!(upstream.count(), 0, "{name}: nothing forwarded");
    let text = gate.metrics_text().await;
    for (series, value) in [
        (KEYS_GAUGE.to_owned(), 0.0),
        (READY_GAUGE.to_owned(), 0.0),
        (KEYS_UNAVAILABLE.to_owned(), 1.0),
        (UNAVAILABLE.to_owned(), 1.0),
        (fetches("ok"), 0.0),
    ] {
        assert_eq!(
            sample(&text, &series),
            Some(value),
            "{name}: {series} in\n{text}"
        );
    }

    // Nobody pokes clerkgate: the background retry alone must bring it up.
    door.heal().await;
    assert!(
        wait_ready(&gate).await,
        "{name}: ready again without a restart"
    );
    assert_eq!(get(&gate, "/cold", &token).await.status, 200, "{name}");
    assert_eq!(upstream.count(), 1, "{name}");
    assert!(gate.metric(&fetches("ok")).await >= 1.0, "{name}");
    assert_eq!(gate.metric(KEYS_GAUGE).await, 2.0, "{name}");
    assert_eq!(gate.metric(READY_GAUGE).await, 1.0, "{name}");
    gate.stop().await;
}

/// Both matrices run against a fake Clerk publishing `ins_fake_1` and `ins_fake_2`.
async fn clerk_with_two_keys() -> FakeClerk {
    let clerk = FakeClerk::start().await;
    assert_eq!(clerk.rotate(), "ins_fake_2");
    clerk
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_under_each_jwks_fault_fails_closed_then_recovers_by_itself() {
    let clerk = clerk_with_two_keys().await;
    for_every_case(&clerk, cold_case).await;
}

async fn warm_case(clerk: &FakeClerk, i: usize) {
    let Case { name, mode, result } = case(clerk, i);
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    // Warm up with a set holding only the first key, so the recovery has news to load.
    let first_only = jwks_json([&*clerk.key("ins_fake_1")]).into_bytes();
    door.fail(Mode::Body(Arc::new(first_only))).await;
    let gate = Sidecar::start(clerk, &upstream, &toml(&door, 1)).await;
    let cached = token(clerk, "ins_fake_1", "user_cached");
    assert_eq!(get(&gate, "/warm", &cached).await.status, 200, "{name}");
    assert_eq!(gate.metric(KEYS_GAUGE).await, 1.0, "{name}");

    door.fail(mode).await;
    let before = gate.metric(&fetches(result)).await;
    let mut fresh = 0;
    let failed = eventually(WAIT, async || {
        fresh += 1;
        let token = token(clerk, "ins_fake_1", &format!("user_fresh_{fresh}"));
        assert_eq!(
            get(&gate, "/warm", &token).await.status,
            200,
            "{name}: a fresh token"
        );
        assert_eq!(
            get(&gate, "/warm", &cached).await.status,
            200,
            "{name}: a cached token"
        );
        assert_eq!(gate.readyz().await, 200, "{name}: still ready");
        gate.metric(&fetches(result)).await > before
    })
    .await;
    assert!(failed, "{name}: a background refresh failed as {result}");
    // The age gauge tells operators the keys are getting old.
    assert!(
        eventually(WAIT, async || gate.metric(AGE_GAUGE).await >= 2.0).await,
        "{name}: the key age grows during the outage"
    );
    assert_eq!(gate.metric(KEYS_GAUGE).await, 1.0, "{name}");
    assert_eq!(gate.metric(READY_GAUGE).await, 1.0, "{name}");
    assert_eq!(gate.metric(UNAVAILABLE).await, 0.0, "{name}");

    // Clerk comes back with a second key: the background refresh alone (no request asks for
    // the new kid) loads it.
    let ok_before = gate.metric(&fetches("ok")).await;
    door.heal().await;
    assert!(
        eventually(WAIT, async || {
            gate.metric(KEYS_GAUGE).await == 2.0 && gate.metric(&fetches("ok")).await > ok_before
        })
        .await,
        "{name}: refreshed by itself after the outage"
    );
    assert!(
        gate.metric(AGE_GAUGE).await <= 1.0,
        "{name}: the age gauge restarts"
    );
    let second = token(clerk, "ins_fake_2", "user_second");
    assert_eq!(get(&gate, "/warm", &second).await.status, 200, "{name}");
    assert_eq!(gate.metric(UNAVAILABLE).await, 0.0, "{name}");
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instance_serves_through_each_jwks_fault_and_refreshes_by_itself_afterwards() {
    let clerk = clerk_with_two_keys().await;
    for_every_case(&clerk, warm_case).await;
}

#[tokio::test]
async fn retired_kid_stops_cached_and_fresh_tokens_once_a_background_refresh_drops_it() {
    let clerk = FakeClerk::start().await;
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, &toml(&door, 1)).await;
    // Verified (and cached) while its key is published; valid for another minute.
    let cached = token(&clerk, "ins_fake_1", "user_cached");
    assert_eq!(get(&gate, "/rot", &cached).await.status, 200);

    // Clerk rotates and drops the old kid; no request asks for anything, the refresh finds it.
    let new_kid = clerk.rotate();
    clerk.retire("ins_fake_1");
    let ok_before = gate.metric(&fetches("ok")).await;
    assert!(
        eventually(WAIT, async || gate.metric(&fetches("ok")).await > ok_before).await,
        "a background refresh loaded the rotated set"
    );
    assert_eq!(gate.metric(KEYS_GAUGE).await, 1.0, "only the new key");

    let forwarded = upstream.count();
    let refused = Answer {
        status: 401,
        reason: "jwk-kid-mismatch".into(),
        retry_after: None,
    };
    assert_eq!(
        get(&gate, "/rot", &cached).await,
        refused,
        "a cached verification by a retired key is not trusted"
    );
    let fresh = token(&clerk, "ins_fake_1", "user_fresh");
    assert_eq!(get(&gate, "/rot", &fresh).await, refused);
    assert_eq!(upstream.count(), forwarded, "neither reached the upstream");
    assert_eq!(gate.metric(KID_MISMATCH).await, 2.0);

    let current = token(&clerk, &new_kid, "user_new");
    assert_eq!(get(&gate, "/rot", &current).await.status, 200);
    assert_eq!(upstream.last().headers["x-user-id"], "user_new");
    assert_eq!(admin(&gate, "/readyz").await.0, 200);
    gate.stop().await;
}

/// Clerk publishes a new key while its JWKS endpoint is down, and starts minting with it.
async fn rotated_during_an_outage() -> (FakeClerk, Door, Upstream, Sidecar, String) {
    let clerk = FakeClerk::start().await;
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    let extra = format!("{}jwks_min_refresh_interval_seconds = 0\n", toml(&door, 1));
    let gate = Sidecar::start(&clerk, &upstream, &extra).await;
    door.fail(Mode::Status(500)).await;
    let new_kid = clerk.rotate();
    (clerk, door, upstream, gate, new_kid)
}

#[tokio::test]
async fn token_of_a_key_published_during_a_jwks_outage_is_refused_as_an_outage() {
    let (clerk, _door, upstream, gate, new_kid) = rotated_during_an_outage().await;
    let fresh = token(&clerk, &new_kid, "user_new");
    // The token is valid; only the key cannot be fetched. Clerk's SDK answers this with
    // jwk-remote-failed-to-load (clerk-protocol.md §2.4), and a 401 invalid_token would make
    // clients drop a good session over clerkgate's outage.
    assert_eq!(
        get(&gate, "/rot", &fresh).await,
        Answer {
            status: 503,
            reason: "jwk-remote-failed-to-load".into(),
            retry_after: Some("5".into()),
        }
    );
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn token_of_a_key_published_during_a_jwks_outage_works_once_clerk_is_back() {
    let (clerk, door, upstream, gate, new_kid) = rotated_during_an_outage().await;
    let fresh = token(&clerk, &new_kid, "user_new");
    // The new key cannot be known yet: refused as the outage it is (as in the test above).
    let during = get(&gate, "/rot", &fresh).await;
    assert_eq!(
        (during.status, during.reason.as_str()),
        (503, "jwk-remote-failed-to-load")
    );
    assert_eq!(upstream.count(), 0);
    let old = token(&clerk, "ins_fake_1", "user_old");
    assert_eq!(
        get(&gate, "/rot", &old).await.status,
        200,
        "cached keys serve"
    );

    // The refused kid must not stay refused (negative cache) once Clerk answers again.
    door.heal().await;
    assert!(
        eventually(WAIT, async || gate.metric(KEYS_GAUGE).await == 2.0).await,
        "the background refresh loads the new key"
    );
    assert_eq!(get(&gate, "/rot", &fresh).await.status, 200);
    assert_eq!(upstream.last().headers["x-user-id"], "user_new");
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clerk_outage_with_cached_keys_causes_not_a_single_5xx_for_valid_tokens() {
    const WORKERS: usize = 10;
    const PER_WORKER: usize = 50;
    let clerk = FakeClerk::start().await;
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    // Refresh every 0.9 s, retry failures at most 1 s apart: the outage spans several cycles.
    let gate = Sidecar::start(&clerk, &upstream, &toml(&door, 1)).await;
    let cached: Vec<String> = (0..5)
        .map(|i| token(&clerk, "ins_fake_1", &format!("user_cached_{i}")))
        .collect();
    for t in &cached {
        assert_eq!(get(&gate, "/load", t).await.status, 200);
    }
    // Half of the stream: distinct tokens never seen before, so each needs a key lookup.
    let fresh: Vec<String> = (0..WORKERS * PER_WORKER / 2)
        .map(|i| token(&clerk, "ins_fake_1", &format!("user_fresh_{i}")))
        .collect();

    let failures = async || {
        let text = gate.metrics_text().await;
        ["network", "timeout", "http_error", "invalid"]
            .iter()
            .map(|r| sample(&text, &fetches(r)).unwrap_or(0.0))
            .sum::<f64>()
    };
    let failed_before = failures().await;
    let ok_before = gate.metric(&fetches("ok")).await;
    let done = std::sync::atomic::AtomicBool::new(false);

    // Clerk misbehaves in every way in turn, for the whole stream.
    let outage = async {
        let faults = [
            Mode::Status(500),
            Mode::Hang,
            Mode::Refuse,
            Mode::RetryAfter(1),
            Mode::Body(Arc::new(b"<html>oops</html>".to_vec())),
            Mode::Status(503),
        ];
        for mode in faults.iter().cycle() {
            door.fail(mode.clone()).await;
            // Pacing of the outage phases, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(400)).await;
            if done.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
        }
    };
    let stream = async {
        let started = Instant::now();
        let workers = (0..WORKERS).map(|w| {
            let (cached, fresh, gate) = (&cached, &fresh, &gate);
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut statuses = Vec::with_capacity(PER_WORKER);
                for n in 0..PER_WORKER {
                    tick.tick().await;
                    let i = w * PER_WORKER + n;
                    let token = if i.is_multiple_of(2) {
                        &cached[i % cached.len()]
                    } else {
                        &fresh[i / 2]
                    };
                    statuses.push(get(gate, "/load", token).await.status);
                }
                statuses
            }
        });
        let statuses: Vec<u16> = futures_util::future::join_all(workers)
            .await
            .into_iter()
            .flatten()
            .collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (statuses, started.elapsed())
    };
    let ((statuses, took), ()) = tokio::join!(stream, outage);

    assert_eq!(statuses.len(), WORKERS * PER_WORKER);
    let server_errors = statuses.iter().filter(|s| **s >= 500).count();
    assert_eq!(server_errors, 0, "5xx during the outage: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every valid token is served: {statuses:?}"
    );
    assert!(took >= Duration::from_secs(2), "a steady stream: {took:?}");
    let failed = failures().await - failed_before;
    assert!(
        failed >= 2.0,
        "the stream spanned several failed refresh cycles ({failed} in {took:?})"
    );
    assert_eq!(
        gate.metric(&fetches("ok")).await,
        ok_before,
        "no fetch succeeded during the outage: every request used the cached keys"
    );
    assert_eq!(gate.metric(UNAVAILABLE).await, 0.0);
    assert_eq!(upstream.count(), cached.len() + WORKERS * PER_WORKER);
    assert_eq!(gate.readyz().await, 200);

    door.heal().await;
    assert!(
        eventually(WAIT, async || gate.metric(&fetches("ok")).await > ok_before).await,
        "refreshes succeed again by themselves"
    );
    gate.stop().await;
}
