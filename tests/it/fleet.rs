//! Fleet state on Redis (issue 15): several clerkgate replicas share one real `redis-server`
//! started by the test on a free port. A revocation seen by one replica is enforced by all, a
//! replica started later refuses at once, an outage converges, a delivery sent to two replicas
//! is processed once, and `fail_closed` turns readiness and session checks to 503.

use std::time::{Duration, Instant};

use crate::support::redis::RedisServer;
use crate::support::{FakeClerk, Sidecar, Upstream, client, eventually, now};

/// The Redis server, or `None` after printing why the test is skipped.
async fn redis() -> Option<RedisServer> {
    match RedisServer::start().await {
        Ok(r) => Some(r),
        Err(why) => {
            println!("SKIP: {why}");
            None
        }
    }
}

fn fleet_toml(clerk: &FakeClerk, redis: &RedisServer, fleet: &str, webhooks: &str) -> String {
    format!(
        "[fleet]\nredis_url = \"{}\"\nconnect_timeout_ms = 300\n{fleet}\n[webhooks]\nsecret = \"{}\"\n{webhooks}",
        redis.url(),
        clerk.webhook_secret()
    )
}

async fn replica(clerk: &FakeClerk, upstream: &Upstream, toml: &str) -> Sidecar {
    let gate = Sidecar::start(clerk, upstream, toml).await;
    assert!(
        eventually(Duration::from_secs(10), async || gate
            .metrics
            .fleet_connected
            .get()
            == 1)
        .await,
        "the replica connected to Redis"
    );
    gate
}

fn sid_of(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    claims["sid"].as_str().expect("sid").to_owned()
}

async fn status(gate: &Sidecar, token: &str) -> u16 {
    client()
        .get(gate.url("/orders"))
        .bearer_auth(token)
        .send()
        .await
        .expect("answer")
        .status()
        .as_u16()
}

async fn revoke_webhook(clerk: &FakeClerk, gate: &Sidecar, msg: &str, sid: &str) -> u16 {
    let body = format!(
        r#"{{"data":{{"id":"{sid}","status":"revoked","user_id":"user_1"}},"object":"event","type":"session.revoked"}}"#
    );
    let ts = now() as i64;
    client()
        .post(gate.url("/webhooks/clerk"))
        .header("svix-id", msg)
        .header("svix-timestamp", ts.to_string())
        .header(
            "svix-signature",
            clerk.sign_webhook(msg, ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .expect("answer")
        .status()
        .as_u16()
}

async fn refused_soon(gate: &Sidecar, token: &str) -> bool {
    eventually(Duration::from_secs(5), async || {
        status(gate, token).await == 401
    })
    .await
}

#[tokio::test]
async fn a_revocation_on_one_replica_is_enforced_by_every_replica() {
    let Some(redis) = redis().await else { return };
    let clerk = FakeClerk::start().await;
    clerk.enable_backend_api();
    let upstream = Upstream::start().await;
    let toml = fleet_toml(&clerk, &redis, "", "");
    let a = replica(&clerk, &upstream, &toml).await;
    let b = replica(&clerk, &upstream, &toml).await;
    let c = replica(&clerk, &upstream, &toml).await;

    // Webhook to A: refused on B and C.
    let token = clerk.session_token("user_1");
    for gate in [&a, &b, &c] {
        assert_eq!(status(gate, &token).await, 200, "cached everywhere first");
    }
    assert_eq!(
        revoke_webhook(&clerk, &a, "msg_fleet_1", &sid_of(&token)).await,
        200
    );
    for (name, gate) in [("A", &a), ("B", &b), ("C", &c)] {
        assert!(refused_soon(gate, &token).await, "refused on {name}");
    }

    // Local-API revoke on C: refused on A and B.
    let token2 = clerk.session_token("user_2");
    let sid2 = sid_of(&token2);
    clerk.add_session(&sid2, "user_2", "active");
    assert_eq!(status(&a, &token2).await, 200);
    let r = client()
        .post(c.local_url(&format!("/v1/sessions/{sid2}/revoke")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (name, gate) in [("A", &a), ("B", &b)] {
        assert!(
            refused_soon(gate, &token2).await,
            "local-API revoke reached {name}"
        );
    }

    // A replica started afterwards refuses both as soon as it is ready.
    let d = Sidecar::start(&clerk, &upstream, &toml).await;
    assert_eq!(
        status(&d, &token).await,
        401,
        "late replica: webhook revocation"
    );
    assert_eq!(
        status(&d, &token2).await,
        401,
        "late replica: local-API revocation"
    );
    assert!(
        redis
            .command(&[
                "EXISTS",
                &format!("clerkgate:{}:deny:s:{}", clerk.issuer(), sid2)
            ])
            .await
            .contains(":1"),
        "a durable entry under the documented key"
    );
    for g in [a, b, c, d] {
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_latency_is_measured_and_small() {
    let Some(redis) = redis().await else { return };
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let toml = fleet_toml(&clerk, &redis, "", "");
    let a = replica(&clerk, &upstream, &toml).await;
    let b = replica(&clerk, &upstream, &toml).await;
    let mut lags = Vec::new();
    for i in 0..40 {
        let token = clerk.session_token(&format!("user_lat_{i}"));
        assert_eq!(status(&b, &token).await, 200);
        let sid = sid_of(&token);
        assert_eq!(
            revoke_webhook(&clerk, &a, &format!("msg_lat_{i}"), &sid).await,
            200
        );
        let started = Instant::now();
        while status(&b, &token).await != 401 {
            assert!(started.elapsed() < Duration::from_secs(5), "propagated");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lags.push(started.elapsed());
    }
    lags.sort();
    let p50 = lags[lags.len() / 2];
    let p99 = lags[lags.len() * 99 / 100];
    let h = &b.metrics.fleet_propagation;
    println!(
        "fleet propagation A -> B (webhook answered -> refused over HTTP): p50 {p50:?} p99 {p99:?}; \
         feed entry written -> applied on B: mean {:.2} ms over {} events",
        h.get_sample_sum() * 1000.0 / h.get_sample_count().max(1) as f64,
        h.get_sample_count()
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert!(b.metrics.fleet_propagation.get_sample_count() >= 40);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_outage_converges_and_an_empty_redis_is_reseeded() {
    let Some(mut redis) = redis().await else {
        return;
    };
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let toml = fleet_toml(&clerk, &redis, "", "");
    let a = replica(&clerk, &upstream, &toml).await;
    let b = replica(&clerk, &upstream, &toml).await;
    let before = clerk.session_token("user_before");
    assert_eq!(
        revoke_webhook(&clerk, &a, "msg_before", &sid_of(&before)).await,
        200
    );
    assert!(refused_soon(&b, &before).await);

    redis.kill();
    assert!(
        eventually(Duration::from_secs(5), async || a
            .metrics
            .fleet_connected
            .get()
            == 0)
        .await
    );
    // During the outage: applied locally and acknowledged (serve_local), never a 4xx.
    let during = clerk.session_token("user_during");
    assert_eq!(
        revoke_webhook(&clerk, &a, "msg_during", &sid_of(&during)).await,
        200
    );
    assert_eq!(status(&a, &during).await, 401, "enforced where it arrived");
    assert_eq!(status(&b, &before).await, 401, "B keeps what it had");

    // Redis comes back empty: the replicas re-seed it and converge on the union.
    redis.restart().await;
    assert!(
        refused_soon(&b, &during).await,
        "B learnt what A saw during the outage"
    );
    let c = Sidecar::start(&clerk, &upstream, &toml).await;
    assert_eq!(
        status(&c, &before).await,
        401,
        "re-seeded: before the outage"
    );
    assert_eq!(
        status(&c, &during).await,
        401,
        "re-seeded: during the outage"
    );
    for g in [a, b, c] {
        g.stop().await;
    }
}

#[tokio::test]
async fn one_delivery_sent_to_two_replicas_is_processed_and_forwarded_once() {
    let Some(redis) = redis().await else { return };
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let toml = fleet_toml(&clerk, &redis, "", "forward_path = \"/internal/hook\"\n");
    let a = replica(&clerk, &upstream, &toml).await;
    let b = replica(&clerk, &upstream, &toml).await;
    let token = clerk.session_token("user_twice");
    let sid = sid_of(&token);
    for round in 0..5 {
        let msg = format!("msg_twice_{round}");
        let (ra, rb) = tokio::join!(
            revoke_webhook(&clerk, &a, &msg, &sid),
            revoke_webhook(&clerk, &b, &msg, &sid)
        );
        assert_eq!((ra, rb), (200, 200), "round {round}");
    }
    let forwarded = upstream
        .recorder
        .all()
        .iter()
        .filter(|r| r.uri.path() == "/internal/hook")
        .count();
    assert_eq!(
        forwarded, 5,
        "each delivery forwarded once across the fleet"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn fail_closed_turns_readiness_and_session_checks_to_503_while_redis_is_away() {
    let Some(redis) = redis().await else { return };
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let toml = fleet_toml(&clerk, &redis, "on_unavailable = \"fail_closed\"\n", "");
    let a = replica(&clerk, &upstream, &toml).await;
    let token = clerk.session_token("user_fc");
    assert_eq!(status(&a, &token).await, 200);
    redis.pause();
    assert!(
        eventually(Duration::from_secs(10), async || a.readyz().await == 503).await,
        "not ready while Redis does not answer"
    );
    let body = client()
        .get(a.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("fleet-unavailable"), "{body}");
    let r = client()
        .get(a.url("/orders"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("session-check-unavailable")
    );
    // Public requests do not depend on session state.
    redis.resume();
    assert!(
        eventually(Duration::from_secs(10), async || a.readyz().await == 200).await,
        "ready again once Redis answers"
    );
    assert_eq!(status(&a, &token).await, 200);
    a.stop().await;
}

/// Opens a WebSocket tunnel through `gate` with `token` and proves bytes flow (the echo
/// upstream echoes upgraded bytes).
async fn open_tunnel(gate: &Sidecar, token: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echoed, b"ping");
    s
}

/// Whether the peer closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn a_revoked_sessions_open_tunnels_are_closed_on_every_replica() {
    let Some(redis) = redis().await else { return };
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let toml = fleet_toml(&clerk, &redis, "", "");
    let a = replica(&clerk, &upstream, &toml).await;
    let b = replica(&clerk, &upstream, &toml).await;
    let revoked = clerk.session_token("user_ws");
    let other = clerk.session_token("user_ws_other");
    let mut on_a = open_tunnel(&a, &revoked).await;
    let mut on_b = open_tunnel(&b, &revoked).await;
    let mut unrelated = open_tunnel(&b, &other).await;

    assert_eq!(
        revoke_webhook(&clerk, &a, "msg_ws", &sid_of(&revoked)).await,
        200
    );
    assert!(
        closed_within(&mut on_a, Duration::from_secs(3)).await,
        "closed where the webhook arrived"
    );
    assert!(
        closed_within(&mut on_b, Duration::from_secs(3)).await,
        "closed on the other replica"
    );
    // Another session's tunnel keeps working.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    unrelated.write_all(b"still").await.unwrap();
    let mut echoed = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(3), unrelated.read_exact(&mut echoed))
        .await
        .expect("unrelated tunnel alive")
        .unwrap();
    assert_eq!(&echoed, b"still");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_deleted_users_tunnels_close_without_a_fleet_too() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &format!("[webhooks]\nsecret = \"{}\"\n", clerk.webhook_secret()),
    )
    .await;
    // Issued before the deletion (a cut-off lets tokens of the same second through).
    let mut claims = clerk.claims("user_gone");
    claims["iat"] = serde_json::json!(now() - 30);
    let token = clerk.mint(claims);
    let mut tunnel = open_tunnel(&gate, &token).await;
    let body =
        r#"{"data":{"id":"user_gone","deleted":true},"object":"event","type":"user.deleted"}"#;
    let ts = now() as i64;
    let r = client()
        .post(gate.url("/webhooks/clerk"))
        .header("svix-id", "msg_user_gone")
        .header("svix-timestamp", ts.to_string())
        .header(
            "svix-signature",
            clerk.sign_webhook("msg_user_gone", ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(closed_within(&mut tunnel, Duration::from_secs(3)).await);
    gate.stop().await;
}
