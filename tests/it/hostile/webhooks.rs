//! Webhooks (`POST /webhooks/clerk`, Svix-signed): bodies changed after a valid signature,
//! signed bodies that are not UTF-8 JSON, oversized bodies however framed, header tricks,
//! smuggling on the webhook path and other spellings of it. A refused delivery must change
//! nothing: the session it names keeps working and nothing reaches the upstream.

use clerkgate::telemetry::{WebhookEventType, WebhookResult};
use serde_json::{Value, json};

use crate::support::env::{Env, assert_refused, b64, payload_segment};
use crate::support::now;

fn webhook_toml(env_secret: &str, extra: &str) -> String {
    format!("[webhooks]\nsecret = \"{env_secret}\"\n{extra}")
}

async fn start(extra: &str) -> Env {
    let secret = crate::support::env::shared_clerk().webhook_secret();
    Env::start(&webhook_toml(secret, extra)).await
}

fn sid_of(token: &str) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload_segment(token))
        .expect("base64url payload");
    let claims: Value = serde_json::from_slice(&bytes).expect("JSON payload");
    claims["sid"].as_str().expect("sid").to_owned()
}

/// A `session.revoked` event body for `sid`, with its members in this exact order.
fn revoke_body(sid: &str) -> String {
    format!(
        r#"{{"data":{{"id":"{sid}","status":"revoked","user_id":"user_1"}},"instance_id":"ins_fake","object":"event","timestamp":1716883200,"type":"session.revoked"}}"#
    )
}

/// Posts a delivery; `headers` are svix-id, svix-timestamp, svix-signature values.
async fn post(env: &Env, id: &str, ts: &str, sig: &str, body: &[u8]) -> crate::support::raw::Reply {
    let resp = env
        .http
        .post(env.gate.url("/webhooks/clerk"))
        .header("svix-id", id)
        .header("svix-timestamp", ts)
        .header("svix-signature", sig)
        .body(body.to_vec())
        .send()
        .await
        .expect("clerkgate answers");
    crate::support::raw::Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.bytes().await.expect("body").to_vec(),
    }
}

/// The session still works (so no refused delivery revoked it) and reached the upstream.
async fn assert_session_alive(env: &Env, token: &str, case: &str) {
    let before = env.upstream.count();
    let reply = env.get("/orders", Some(token), &[]).await;
    assert_eq!(
        reply.status,
        200,
        "{case}: a refused delivery changed state: {}",
        reply.text()
    );
    assert_eq!(env.upstream.count(), before + 1);
}

fn processed(env: &Env) -> u64 {
    env.gate
        .metrics
        .webhook_events
        .get(WebhookEventType::SessionRevoked, WebhookResult::Processed)
}

#[tokio::test]
async fn a_body_changed_after_a_valid_signature_is_401_and_changes_nothing() {
    let env = start("").await;
    let token = env.clerk.session_token("user_1");
    let sid = sid_of(&token);
    let body = revoke_body(&sid);
    let ts = now() as i64;
    let ts_s = ts.to_string();
    let id = "msg_tamper";
    let sig = env.clerk.sign_webhook(id, ts, body.as_bytes());
    let flip = |at: usize| {
        let mut b = body.clone().into_bytes();
        b[at] ^= 0x01;
        b
    };
    let reordered = format!(
        r#"{{"type":"session.revoked","object":"event","data":{{"user_id":"user_1","status":"revoked","id":"{sid}"}},"instance_id":"ins_fake","timestamp":1716883200}}"#
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("first byte flipped", flip(0)),
        (
            "a byte of the session id flipped",
            flip(body.find(&sid).unwrap() + 6),
        ),
        ("last byte flipped", flip(body.len() - 1)),
        ("a newline appended", format!("{body}\n").into_bytes()),
        ("a space prepended", format!(" {body}").into_bytes()),
        (
            "a second event appended",
            format!("{body}{body}").into_bytes(),
        ),
        ("last byte cut", body.as_bytes()[..body.len() - 1].to_vec()),
        ("members reordered", reordered.into_bytes()),
        (
            "whitespace after a colon",
            body.replacen("\"type\":", "\"type\": ", 1).into_bytes(),
        ),
        (
            "an escaped letter",
            body.replace("session.revoked", "\\u0073ession.revoked")
                .into_bytes(),
        ),
        (
            "type repeated",
            body.replacen('{', "{\"type\":\"user.created\",", 1)
                .into_bytes(),
        ),
        ("empty body", Vec::new()),
    ];
    for (case, tampered) in &cases {
        let reply = post(&env, id, &ts_s, &sig, tampered).await;
        assert_refused(&reply, 401, "webhook-signature-invalid", case);
    }
    // A signature over one body cannot be moved to another delivery id or timestamp either.
    let reply = post(&env, "msg_other", &ts_s, &sig, body.as_bytes()).await;
    assert_refused(&reply, 401, "webhook-signature-invalid", "another id");
    let reply = post(&env, id, &(ts - 1).to_string(), &sig, body.as_bytes()).await;
    assert_refused(
        &reply,
        401,
        "webhook-signature-invalid",
        "another timestamp",
    );
    assert_eq!(processed(&env), 0);
    assert_eq!(env.upstream.count(), 0);
    assert_session_alive(&env, &token, "after tampered deliveries").await;

    // Control: the untouched body is processed and revokes the session.
    let reply = post(&env, id, &ts_s, &sig, body.as_bytes()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = env.get("/orders", Some(&token), &[]).await;
    assert_refused(&reply, 401, "session-revoked", "control");
    env.stop().await;
}

#[tokio::test]
async fn signed_bodies_that_are_not_utf8_json_events_are_400_and_change_nothing() {
    let env = start("").await;
    let token = env.clerk.session_token("user_1");
    let sid = sid_of(&token);
    let wrap = |id_bytes: &[u8]| {
        let mut b = br#"{"type":"session.revoked","object":"event","data":{"id":""#.to_vec();
        b.extend_from_slice(id_bytes);
        b.extend_from_slice(br#""}}"#);
        b
    };
    let utf16: Vec<u8> = revoke_body(&sid)
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "overlong slash in the id",
            wrap(&[sid.as_bytes(), b"\xc0\xaf"].concat()),
        ),
        (
            "surrogate bytes in the id",
            wrap(&[sid.as_bytes(), b"\xed\xa0\x80"].concat()),
        ),
        (
            "Latin-1 byte in the id",
            wrap(&[sid.as_bytes(), b"\xe9"].concat()),
        ),
        (
            "truncated UTF-8 at the end",
            [revoke_body(&sid).as_bytes(), b"\xe2\x82"].concat(),
        ),
        ("UTF-16LE", utf16),
        (
            "UTF-8 BOM",
            [b"\xef\xbb\xbf".as_slice(), revoke_body(&sid).as_bytes()].concat(),
        ),
        (
            "lone surrogate escape",
            wrap(format!("{sid}\\ud800").as_bytes()),
        ),
        ("JSON null", b"null".to_vec()),
        (
            "JSON array",
            format!("[{}]", revoke_body(&sid)).into_bytes(),
        ),
        ("type a number", br#"{"type":5,"data":{"id":"x"}}"#.to_vec()),
        ("not JSON", b"type=session.revoked".to_vec()),
    ];
    let ts = now() as i64;
    for (i, (case, body)) in cases.iter().enumerate() {
        let id = format!("msg_bad_{i}");
        let sig = env.clerk.sign_webhook(&id, ts, body);
        let reply = post(&env, &id, &ts.to_string(), &sig, body).await;
        assert_refused(&reply, 400, "webhook-payload-invalid", case);
    }
    assert_eq!(processed(&env), 0);
    assert_eq!(env.upstream.count(), 0);
    assert_session_alive(&env, &token, "after undecodable deliveries").await;
    env.stop().await;
}

#[tokio::test]
async fn oversized_webhook_bodies_are_413_however_they_are_framed() {
    let env = start("max_body_bytes = 2048").await;
    let token = env.clerk.session_token("user_1");
    let sid = sid_of(&token);
    let ts = now() as i64;
    let mut big = revoke_body(&sid);
    big.insert_str(1, &format!("\"pad\":\"{}\",", "p".repeat(4096)));
    let sig = env.clerk.sign_webhook("msg_big", ts, big.as_bytes());
    let head = format!(
        "POST /webhooks/clerk HTTP/1.1\r\nHost: a\r\nsvix-id: msg_big\r\nsvix-timestamp: {ts}\r\nsvix-signature: {sig}\r\nConnection: close\r\n"
    );
    let chunked = format!(
        "{head}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let many_chunks = {
        let mut s = format!("{head}Transfer-Encoding: chunked\r\n\r\n");
        for c in big.as_bytes().chunks(100) {
            s.push_str(&format!(
                "{:x}\r\n{}\r\n",
                c.len(),
                String::from_utf8_lossy(c)
            ));
        }
        s + "0\r\n\r\n"
    };
    // Announces 10 MiB and sends a few bytes: refused on the announcement, without waiting.
    let lying = format!("{head}Content-Length: 10485760\r\n\r\n{{\"type\":");
    for (case, request) in [
        ("one chunk, signed", chunked),
        ("many small chunks, signed", many_chunks),
        ("Content-Length of 10 MiB", lying),
    ] {
        let replies = env.send(request.as_bytes()).await;
        assert_eq!(replies.len(), 1, "{case}");
        assert_refused(&replies[0], 413, "webhook-body-too-large", case);
    }
    assert_eq!(processed(&env), 0);
    assert_eq!(env.upstream.count(), 0);
    assert_session_alive(&env, &token, "after oversized deliveries").await;
    env.stop().await;
}

/// (case, header lines as (name, value), status, reason)
type HeaderCase<'a> = (&'a str, Vec<(&'a str, String)>, u16, &'a str);

#[tokio::test]
async fn webhook_header_tricks_fail_closed() {
    let env = start("").await;
    let token = env.clerk.session_token("user_1");
    let sid = sid_of(&token);
    let body = revoke_body(&sid);
    let ts = now() as i64;
    let ts_s = ts.to_string();
    let good = env.clerk.sign_webhook("msg_h", ts, body.as_bytes());
    let good_b64 = good.trim_start_matches("v1,");
    let other_body = env.clerk.sign_webhook("msg_h", ts, b"{}");
    let cases: Vec<HeaderCase> = vec![
        (
            "a second svix-id, the signed one last",
            vec![
                ("svix-id", "msg_x".into()),
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", good.clone()),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "a second svix-signature, the valid one last",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", "v1,AAAA".into()),
                ("svix-signature", good.clone()),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "version in upper case",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", format!("V1,{good_b64}")),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "space before the comma",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", format!("v1 ,{good_b64}")),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "v1 with nothing",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", "v1,".into()),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "v1 not base64",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", "v1,!!!!".into()),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "signature of another body",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", other_body),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "signature without a version",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", good_b64.to_owned()),
            ],
            401,
            "webhook-signature-invalid",
        ),
        (
            "timestamp zero",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", "0".into()),
                ("svix-signature", good.clone()),
            ],
            400,
            "webhook-timestamp-invalid",
        ),
        (
            "timestamp negative",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", "-1".into()),
                ("svix-signature", good.clone()),
            ],
            400,
            "webhook-timestamp-invalid",
        ),
        (
            "timestamp in exponent form",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", format!("{}e0", ts)),
                ("svix-signature", good.clone()),
            ],
            400,
            "webhook-timestamp-invalid",
        ),
        (
            "timestamp with a fraction",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", format!("{ts}.0")),
                ("svix-signature", good.clone()),
            ],
            400,
            "webhook-timestamp-invalid",
        ),
        (
            "timestamp beyond i64",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", "99999999999999999999".into()),
                ("svix-signature", good.clone()),
            ],
            400,
            "webhook-timestamp-invalid",
        ),
        (
            "timestamp i64::MAX",
            vec![
                ("svix-id", "msg_h".into()),
                ("svix-timestamp", i64::MAX.to_string()),
                ("svix-signature", good.clone()),
            ],
            401,
            "webhook-timestamp-out-of-tolerance",
        ),
        (
            "empty id",
            vec![
                ("svix-id", String::new()),
                ("svix-timestamp", ts_s.clone()),
                ("svix-signature", good.clone()),
            ],
            400,
            "webhook-headers-missing",
        ),
    ];
    for (case, headers, status, reason) in cases {
        let mut request =
            "POST /webhooks/clerk HTTP/1.1\r\nHost: a\r\nConnection: close\r\n".to_owned();
        for (n, v) in &headers {
            request.push_str(&format!("{n}: {v}\r\n"));
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let replies = env.send(request.as_bytes()).await;
        assert_eq!(replies.len(), 1, "{case}");
        assert_refused(&replies[0], status, reason, case);
    }
    assert_eq!(processed(&env), 0);
    assert_eq!(env.upstream.count(), 0);
    assert_session_alive(&env, &token, "after header tricks").await;

    // A thousand decoys before the valid entry still verify (rotation), in bounded time.
    let decoys: Vec<String> = (0..1000)
        .map(|i| format!("v1,{}", b64(format!("decoy{i:027}"))))
        .collect();
    let sig = format!("{} {good}", decoys.join(" "));
    let reply = post(&env, "msg_h", &ts_s, &sig, body.as_bytes()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(processed(&env), 1);
    env.stop().await;
}

#[tokio::test]
async fn a_delivery_smuggled_behind_a_webhook_request_is_never_applied() {
    let env = start("").await;
    let token = env.clerk.session_token("user_1");
    let sid = sid_of(&token);
    let body = revoke_body(&sid);
    let ts = now() as i64;
    let sig = env.clerk.sign_webhook("msg_smuggled", ts, body.as_bytes());
    let smuggled = format!(
        "POST /webhooks/clerk HTTP/1.1\r\nHost: a\r\nsvix-id: msg_smuggled\r\nsvix-timestamp: {ts}\r\nsvix-signature: {sig}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let first = "POST /webhooks/clerk HTTP/1.1\r\nHost: a\r\n";
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "Content-Length then Transfer-Encoding",
            format!(
                "{first}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
                smuggled.len() + 5
            ),
            400,
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!(
                "{first}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            400,
        ),
        (
            "two different Content-Lengths",
            format!(
                "{first}Content-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            400,
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!("{first}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
    ];
    for (case, request, status) in cases {
        let replies = env.send(request.as_bytes()).await;
        assert_eq!(
            replies.iter().map(|r| r.status).collect::<Vec<_>>(),
            [status],
            "{case}: {:?}",
            replies.iter().map(|r| r.text()).collect::<Vec<_>>()
        );
        assert_eq!(
            processed(&env),
            0,
            "{case}: the smuggled delivery was applied"
        );
    }
    assert_eq!(env.upstream.count(), 0);
    assert_session_alive(&env, &token, "after smuggling attempts").await;
    env.stop().await;
}

#[tokio::test]
async fn other_spellings_of_the_webhook_path_are_ordinary_authenticated_routes() {
    // Only the exact path is the webhook endpoint; any other spelling is a normal route that
    // needs a session, so an unauthenticated delivery to it never reaches the upstream (which
    // may still have its own, pre-clerkgate, webhook handler there).
    let env = start("").await;
    let token = env.clerk.session_token("user_1");
    let body = revoke_body(&sid_of(&token));
    let ts = now() as i64;
    for (i, path) in [
        "/webhooks//clerk",
        "/webhooks/clerk/",
        "/webhooks/%63lerk",
        "/webhooks/./clerk",
        "/x/../webhooks/clerk",
        "/WEBHOOKS/clerk",
        "/webhooks/clerk;x",
        "/webhooks/clerk%3B",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("msg_path_{i}");
        let sig = env.clerk.sign_webhook(&id, ts, body.as_bytes());
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\nsvix-id: {id}\r\nsvix-timestamp: {ts}\r\nsvix-signature: {sig}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let replies = env.send(request.as_bytes()).await;
        assert_eq!(replies.len(), 1, "{path}");
        assert_refused(&replies[0], 401, "session-token-missing", path);
    }
    assert_eq!(processed(&env), 0);
    assert_eq!(env.upstream.count(), 0);
    assert_session_alive(&env, &token, "after other spellings").await;

    // A query string does not change the path: that is the endpoint.
    let sig = env.clerk.sign_webhook("msg_query", ts, body.as_bytes());
    let resp = env
        .http
        .post(env.gate.url("/webhooks/clerk?from=svix"))
        .header("svix-id", "msg_query")
        .header("svix-timestamp", ts.to_string())
        .header("svix-signature", sig)
        .body(body.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let _: Value = resp.json().await.unwrap_or(json!(null));
    assert_eq!(processed(&env), 1);
    env.stop().await;
}
