//! Backend API faults: the session check of `sessions.check = "api"` on the request path, and
//! the pod-local Clerk API, while Clerk refuses connections, hangs, fails, rate limits, or
//! answers garbage or 10 MB. Each: what the client gets, that /readyz stays 200 (the keys are
//! fine), the metrics, and the recovery without a restart.
//!
//! `tests/it/sessions.rs` covers a 429 (fail closed, pause held) and a hang with
//! `fail_open = true`; `tests/it/local_api.rs` covers 429, a hang and 500/503 retries.

use std::sync::Arc;

use serde_json::Value;

use super::common::{Answer, get};
use super::fakes::{Door, Mode};
use crate::support::{
    Endpoint, Failure, FakeClerk, Sidecar, Upstream, client, eventually, user_json,
};
use crate::support::{WAIT, http, sample};

/// One Backend API fault, and the `clerkgate_clerk_api_requests_total` result it is counted
/// as (`None` when the call is abandoned by the request deadline before it ends).
struct Case {
    name: &'static str,
    mode: Mode,
    result: Option<&'static str>,
}

fn ten_mb() -> Arc<Vec<u8>> {
    Arc::new(format!(r#"{{"object":"session","pad":"{}"}}"#, "x".repeat(10 << 20)).into_bytes())
}

fn session_cases() -> Vec<Case> {
    vec![
        Case {
            name: "connection refused",
            mode: Mode::Refuse,
            result: Some("error"),
        },
        Case {
            name: "hanging",
            mode: Mode::Hang,
            result: None,
        },
        Case {
            name: "500",
            mode: Mode::Status(500),
            result: Some("error"),
        },
        Case {
            name: "429 with Retry-After",
            mode: Mode::RetryAfter(1),
            result: Some("rate_limited"),
        },
        Case {
            name: "non-JSON body",
            mode: Mode::Body(Arc::new(b"<html>oops</html>".to_vec())),
            result: Some("error"),
        },
        Case {
            name: "10 MB body",
            mode: Mode::Body(ten_mb()),
            result: Some("error"),
        },
    ]
}

async fn session_case(clerk: &FakeClerk, i: usize, case: Case) {
    let Case { name, mode, result } = case;
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    let extra = format!(
        "[clerk]\napi_url = \"{}\"\n[sessions]\ncheck = \"api\"\napi_timeout_ms = 500\n",
        door.url()
    );
    let gate = Sidecar::start(clerk, &upstream, &extra).await;
    let sid = format!("sess_fault_{i}");
    clerk.set_session(&sid, "active");
    let mut claims = clerk.claims("user_1");
    claims["sid"] = sid.into();
    let token = clerk.mint(claims);

    // Only the sessions endpoint fails (a refused port fails the keys' refresh too, but the
    // keys are cached for an hour).
    door.set(mode, "/v1/sessions/").await;
    assert_eq!(
        get(&gate, "/s", &token).await,
        Answer {
            status: 503,
            reason: "session-check-unavailable".into(),
            retry_after: Some("5".into()),
        },
        "{name}: fails closed"
    );
    assert_eq!(upstream.count(), 0, "{name}");
    assert_eq!(gate.readyz().await, 200, "{name}: the keys are fine");
    let text = gate.metrics_text().await;
    let mut expected = vec![
        (
            "clerkgate_session_checks_total{result=\"unavailable\"}".to_owned(),
            1.0,
        ),
        (
            "clerkgate_auth_failures_total{reason=\"session-check-unavailable\"}".to_owned(),
            1.0,
        ),
        (
            "clerkgate_requests_total{outcome=\"unavailable\"}".to_owned(),
            1.0,
        ),
        ("clerkgate_ready".to_owned(), 1.0),
    ];
    if let Some(result) = result {
        expected.push((
            format!(
                "clerkgate_clerk_api_requests_total{{endpoint=\"sessions_get\",result=\"{result}\"}}"
            ),
            1.0,
        ));
    }
    for (series, value) in expected {
        assert_eq!(
            sample(&text, &series),
            Some(value),
            "{name}: {series} in\n{text}"
        );
    }

    door.heal().await;
    assert!(
        eventually(WAIT, async || get(&gate, "/s", &token).await.status == 200).await,
        "{name}: the same token passes once Clerk answers (a 429 after its Retry-After)"
    );
    assert_eq!(
        gate.metric("clerkgate_session_checks_total{result=\"allowed\"}")
            .await,
        1.0,
        "{name}"
    );
    assert_eq!(upstream.count(), 1, "{name}");
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_mode_session_check_fails_closed_under_each_backend_api_fault_and_recovers() {
    let clerk = FakeClerk::start().await;
    let runs = session_cases()
        .into_iter()
        .enumerate()
        .map(|(i, case)| session_case(&clerk, i, case));
    futures_util::future::join_all(runs).await;
}

/// A local API GET: status, Clerk-shaped error code.
async fn local_get(gate: &Sidecar, path: &str) -> (u16, String, Value) {
    let resp = http()
        .get(gate.local_url(path))
        .send()
        .await
        .expect("the local API answers");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = body["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, body)
}

#[tokio::test]
async fn local_api_answers_clerk_outages_in_clerks_shape_and_recovers() {
    let clerk = FakeClerk::start().await;
    clerk.enable_backend_api();
    for (id, name) in [("user_a", "Ann"), ("user_b", "Bob"), ("user_c", "Cy")] {
        clerk.set_user(user_json(id, name));
    }
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    let extra = format!(
        "[clerk]\napi_url = \"{}\"\n[local_api]\nattempt_timeout_ms = 500\nrequest_timeout_ms = 3000\nget_retries = 1\n",
        door.url()
    );
    let gate = Sidecar::start(&clerk, &upstream, &extra).await;
    let token = clerk.session_token("user_proxy");
    let series = |result: &str| {
        format!("clerkgate_local_api_requests_total{{result=\"{result}\",route=\"users_get\"}}")
    };

    // Refused: retried once (a GET), then 503.
    door.fail(Mode::Refuse).await;
    let (status, code, _) = local_get(&gate, "/v1/users/user_a").await;
    assert_eq!(
        (status, code.as_str()),
        (503, "clerkgate_upstream_unavailable")
    );
    assert_eq!(gate.metric(&series("upstream_error")).await, 1.0);
    assert_eq!(
        gate.metric("clerkgate_clerk_api_requests_total{endpoint=\"users_get\",result=\"error\"}")
            .await,
        2.0,
        "one attempt and one retry"
    );
    // The proxy path and readiness do not depend on the Backend API.
    assert_eq!(get(&gate, "/p", &token).await.status, 200);
    assert_eq!(gate.readyz().await, 200);
    door.heal().await;
    let (status, _, body) = local_get(&gate, "/v1/users/user_a").await;
    assert_eq!((status, body["first_name"].as_str()), (200, Some("Ann")));

    // Garbage and a 10 MB body from Clerk: 502, not retried, not cached.
    let garbage = b"<html>oops</html>".to_vec();
    let huge = format!(r#"{{"object":"user","pad":"{}"}}"#, "x".repeat(10 << 20)).into_bytes();
    for (user, failure) in [("user_b", garbage), ("user_c", huge)] {
        let calls = clerk.calls(Endpoint::UsersGet);
        clerk.fail_api(Failure::Body(failure));
        let (status, code, _) = local_get(&gate, &format!("/v1/users/{user}")).await;
        assert_eq!(
            (status, code.as_str()),
            (502, "clerkgate_upstream_invalid_response"),
            "{user}"
        );
        assert_eq!(
            clerk.calls(Endpoint::UsersGet),
            calls + 1,
            "{user}: no retry"
        );
        clerk.fail_api(Failure::None);
        let (status, _, body) = local_get(&gate, &format!("/v1/users/{user}")).await;
        assert_eq!((status, body["id"].as_str()), (200, Some(user)));
    }
    assert_eq!(gate.metric(&series("upstream_error")).await, 3.0);
    assert_eq!(gate.metric(&series("ok")).await, 3.0);

    // A one-off client, as an operator's curl would be: the admin side is healthy throughout.
    let livez = client().get(gate.admin_url("/livez")).send().await;
    assert_eq!(livez.map(|r| r.status().as_u16()).ok(), Some(200));
    gate.stop().await;
}
