//! Upstream faults: refused, cut off after the head or in the middle of a chunked body, never
//! answering, never accepting, and answering with an enormous head. Each is a 502/504 with a
//! reason code and a metric (or, once the head is on its way, a response the client can tell
//! is incomplete), and afterwards the proxy is healthy: /livez and /readyz 200, and a normal
//! request succeeds without a restart.
//!
//! `tests/it/operations.rs` covers a refused port (without recovery) and a slow `/slow/3000`
//! echo response; the raw-TCP upstream here plays the faults a real HTTP server never would.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::common::{Answer, admin, get, start_with_upstream_url, wait_ready};
use super::fakes::{Door, Mode};
use crate::support::http;
use crate::support::upstreams::{Behavior, NORMAL_BODY, RawUpstream};
use crate::support::{FakeClerk, Sidecar, Upstream};

fn errors(kind: &str) -> String {
    format!("clerkgate_upstream_errors_total{{kind=\"{kind}\"}}")
}

const UPSTREAM_ERROR: &str = "clerkgate_requests_total{outcome=\"upstream_error\"}";

async fn start(clerk: &FakeClerk, upstream: &str, extra: &str) -> Sidecar {
    let gate = start_with_upstream_url(clerk, upstream, extra).await;
    assert!(wait_ready(&gate).await, "clerkgate became ready");
    gate
}

/// /livez and /readyz are 200 and a normal request through the proxy gets `expected_body`.
async fn assert_healthy(gate: &Sidecar, token: &str, expected_body: &str, what: &str) {
    assert_eq!(admin(gate, "/livez").await.0, 200, "{what}: live");
    assert_eq!(admin(gate, "/readyz").await.0, 200, "{what}: ready");
    let resp = http()
        .get(gate.url("/after"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: the proxy answers after the fault: {e}"));
    assert_eq!(resp.status(), 200, "{what}: a normal request succeeds");
    let body = resp.text().await.expect("a complete body");
    assert!(
        body.contains(expected_body),
        "{what}: the upstream's body: {body}"
    );
}

#[tokio::test]
async fn refused_upstream_is_502_and_served_again_once_it_listens() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let door = Door::open_to(&upstream.url()).await;
    let gate = start(&clerk, &door.url(), "").await;
    let token = clerk.session_token("user_1");
    assert_eq!(get(&gate, "/before", &token).await.status, 200);

    door.fail(Mode::Refuse).await;
    assert_eq!(
        get(&gate, "/down", &token).await,
        Answer {
            status: 502,
            reason: "upstream-unavailable".into(),
            retry_after: None,
        }
    );
    assert_eq!(gate.metric(&errors("connect")).await, 1.0);
    assert_eq!(gate.metric(UPSTREAM_ERROR).await, 1.0);
    assert_eq!(
        admin(&gate, "/readyz").await.0,
        200,
        "not clerkgate's outage"
    );

    door.heal().await;
    assert_healthy(&gate, &token, "\"/after\"", "refused").await;
    assert_eq!(upstream.last().uri.path(), "/after");
    gate.stop().await;
}

/// Sends one request whose upstream answer is cut off; returns the status the client saw and
/// whether reading the body failed (instead of ending like a complete response).
async fn cut_off(gate: &Sidecar, token: &str) -> (u16, Result<String, String>) {
    let resp = http()
        .get(gate.url("/cut"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the response head arrives");
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| format!("{e:?}"));
    (status, body)
}

#[tokio::test]
async fn upstream_cut_off_mid_response_is_never_passed_off_as_complete() {
    let clerk = FakeClerk::start().await;
    let raw = RawUpstream::start(Behavior::HeadThenReset, 128).await;
    let gate = start(&clerk, &raw.url(), "").await;
    let token = clerk.session_token("user_1");

    // The head (promising 1000 bytes) is forwarded at once; the reset must reach the client as
    // a broken response, not as a short one that ends cleanly.
    let (status, body) = cut_off(&gate, &token).await;
    assert_eq!(status, 200, "the head was already forwarded");
    assert!(body.is_err(), "head then reset: read {body:?}");
    assert_healthy_after(&gate, &raw, &token, "head then reset").await;

    // A chunked body closed before its last chunk: the client must not get the terminating
    // chunk clerkgate would add if it mistook the close for the end.
    raw.set(Behavior::ChunkedThenClose);
    let (status, body) = cut_off(&gate, &token).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "chunked then close: read {body:?}");
    assert_healthy_after(&gate, &raw, &token, "chunked then close").await;
    gate.stop().await;
}

/// Switches the raw upstream back to normal and checks the proxy serves it.
async fn assert_healthy_after(gate: &Sidecar, raw: &RawUpstream, token: &str, what: &str) {
    let fault = raw.behavior();
    raw.set(Behavior::Normal);
    assert_healthy(gate, token, NORMAL_BODY, what).await;
    raw.set(fault);
}

#[tokio::test]
async fn upstream_cut_off_mid_response_is_counted_as_an_upstream_error() {
    let clerk = FakeClerk::start().await;
    let raw = RawUpstream::start(Behavior::HeadThenReset, 128).await;
    let gate = start(&clerk, &raw.url(), "").await;
    let token = clerk.session_token("user_1");
    let (_, body) = cut_off(&gate, &token).await;
    assert!(body.is_err());
    raw.set(Behavior::ChunkedThenClose);
    let (_, body) = cut_off(&gate, &token).await;
    assert!(body.is_err());
    // "protocol: it broke the HTTP exchange" (deploy/monitoring alert ClerkgateUpstreamErrors).
    let counted = gate.metric(&errors("protocol")).await + gate.metric(&errors("connect")).await;
    assert_eq!(counted, 2.0, "both broken responses are upstream errors");
    gate.stop().await;
}

#[tokio::test]
async fn hanging_upstream_is_504_after_the_configured_timeout() {
    let clerk = FakeClerk::start().await;
    let raw = RawUpstream::start(Behavior::Hang, 128).await;
    let gate = start(
        &clerk,
        &raw.url(),
        "[proxy]\nupstream_timeout_seconds = 1\n",
    )
    .await;
    let token = clerk.session_token("user_1");

    let started = Instant::now();
    let answer = get(&gate, "/hang", &token).await;
    let took = started.elapsed();
    assert_eq!(
        answer,
        Answer {
            status: 504,
            reason: "upstream-timeout".into(),
            retry_after: None,
        }
    );
    assert_eq!(raw.request_count(), 1, "the request reached the upstream");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(6),
        "answered after the 1 s upstream timeout, not before or much later: {took:?}"
    );
    assert_eq!(gate.metric(&errors("timeout")).await, 1.0);
    assert_eq!(gate.metric(UPSTREAM_ERROR).await, 1.0);
    assert_healthy_after(&gate, &raw, &token, "hang").await;
    gate.stop().await;
}

/// An upstream whose accept queue is full: its kernel drops new SYNs, so connecting hangs.
async fn not_accepting() -> (RawUpstream, Vec<TcpStream>) {
    let raw = RawUpstream::start(Behavior::Normal, 1).await;
    raw.pause_accepting();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(raw.addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            // This one is waiting for a SYN-ACK: the queue is full.
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled up");
    }
    (raw, fillers)
}

const CONNECT_TIMEOUT: &str =
    "[proxy]\nconnect_timeout_seconds = 1\nupstream_timeout_seconds = 10\n";

#[tokio::test]
async fn upstream_that_does_not_accept_is_answered_within_the_connect_timeout() {
    let clerk = FakeClerk::start().await;
    let (raw, fillers) = not_accepting().await;
    let gate = start(&clerk, &raw.url(), CONNECT_TIMEOUT).await;
    let token = clerk.session_token("user_1");

    let started = Instant::now();
    let answer = get(&gate, "/accept", &token).await;
    let took = started.elapsed();
    // A connect that hangs until `proxy.connect_timeout_seconds` is a timeout (504), not an
    // unreachable upstream (502): src/proxy/forward.rs `classify`.
    assert_eq!(
        (answer.status, answer.reason.as_str()),
        (504, "upstream-timeout"),
        "{answer:?}"
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(6),
        "after the 1 s connect timeout, long before the 10 s upstream timeout: {took:?}"
    );
    assert_eq!(gate.metric(&errors("timeout")).await, 1.0);
    assert_eq!(gate.metric(&errors("connect")).await, 0.0);
    assert_eq!(raw.request_count(), 0);
    assert_eq!(raw.accepted(), 0, "the upstream accepted nothing");

    // The upstream starts accepting again: served without a restart.
    raw.resume_accepting();
    assert_healthy(&gate, &token, NORMAL_BODY, "not accepting").await;
    assert!(raw.accepted() > fillers.len(), "the proxy's connection too");
    drop(fillers);
    gate.stop().await;
}

#[tokio::test]
async fn upstream_that_does_not_accept_is_504_upstream_timeout() {
    let clerk = FakeClerk::start().await;
    let (raw, _fillers) = not_accepting().await;
    let gate = start(&clerk, &raw.url(), CONNECT_TIMEOUT).await;
    let token = clerk.session_token("user_1");
    assert_eq!(
        get(&gate, "/accept", &token).await,
        Answer {
            status: 504,
            reason: "upstream-timeout".into(),
            retry_after: None,
        }
    );
    assert_eq!(gate.metric(&errors("timeout")).await, 1.0);
    assert_eq!(gate.metric(&errors("connect")).await, 0.0);
    gate.stop().await;
}

#[tokio::test]
async fn enormous_upstream_response_heads_are_502_protocol_errors() {
    let clerk = FakeClerk::start().await;
    let raw = RawUpstream::start(Behavior::HugeHeader(1024 * 1024), 128).await;
    let gate = start(&clerk, &raw.url(), "").await;
    let token = clerk.session_token("user_1");
    let refused = Answer {
        status: 502,
        reason: "upstream-protocol-error".into(),
        retry_after: None,
    };

    assert_eq!(
        get(&gate, "/huge", &token).await,
        refused,
        "one 1 MB header"
    );
    assert_healthy_after(&gate, &raw, &token, "one 1 MB header").await;

    raw.set(Behavior::ManyHeaders(1000));
    assert_eq!(get(&gate, "/many", &token).await, refused, "1000 headers");
    assert_healthy_after(&gate, &raw, &token, "1000 headers").await;

    assert_eq!(gate.metric(&errors("protocol")).await, 2.0);
    assert_eq!(gate.metric(UPSTREAM_ERROR).await, 2.0);
    gate.stop().await;
}
