//! Headers: duplicate and oddly spelled `Authorization`, token in header and cookie, spoofed
//! identity headers in malformed lines and in the trailer section of a chunked body,
//! `Connection`-nominated identity headers, oversized heads and cookie jars, and claim values
//! that are not valid header values.

use serde_json::json;

use super::kit::ROUTES;
use crate::support::Sidecar;
use crate::support::WAIT;
use crate::support::env::{self, Env, assert_refused, fold, shared_clerk, values};
use crate::support::raw::find;
use crate::support::sidecar::{base_toml, config};
use crate::support::upstreams::RawUpstream;

/// With the default `[headers]` section.
fn is_reserved(name: &str) -> bool {
    env::is_reserved(name, &[])
}

#[tokio::test]
async fn two_authorization_headers_are_refused_whatever_they_hold() {
    let env = Env::start("").await;
    let a = env.clerk.session_token("user_a");
    let b = env.clerk.session_token("user_b");
    let cookie = format!("__session={a}; __client_uat=1");
    let (ba, bb) = (format!("Bearer {a}"), format!("Bearer {b}"));
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "the same token twice",
            vec![("Authorization", &ba), ("Authorization", &ba)],
        ),
        (
            "two users' tokens",
            vec![("Authorization", &ba), ("Authorization", &bb)],
        ),
        (
            "valid then garbage",
            vec![("Authorization", &ba), ("Authorization", "Bearer x")],
        ),
        (
            "garbage then valid",
            vec![("Authorization", "Bearer x"), ("Authorization", &ba)],
        ),
        (
            "valid then another scheme",
            vec![("Authorization", &ba), ("Authorization", "Basic eDp5")],
        ),
        (
            "different spellings of the name",
            vec![("authorization", &ba), ("AUTHORIZATION", &bb)],
        ),
        (
            "two headers next to a valid cookie",
            vec![
                ("Authorization", &ba),
                ("Authorization", &bb),
                ("Cookie", &cookie),
            ],
        ),
    ];
    for (case, headers) in &cases {
        let reply = env.raw_get("/orders", headers).await;
        assert_refused(&reply, 401, "token-invalid", case);
    }
    // Two tokens folded into one header line are one malformed token.
    let joined = format!("Bearer {a}, Bearer {b}");
    let reply = env.raw_get("/orders", &[("Authorization", &joined)]).await;
    assert_refused(&reply, 401, "token-invalid", "comma-joined");
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn bearer_scheme_is_case_sensitive_like_clerks_sdk_and_a_cookie_still_counts() {
    // clerk-protocol.md 2.6: the header is split on its first space and only `Bearer` (case
    // sensitive) yields a token; a value without a space is the raw token; any other scheme is
    // no header token at all, so the cookie path applies.
    let env = Env::start("").await;
    let header_token = env.clerk.session_token("user_header");
    let cookie_claims = env.clerk.claims("user_cookie");
    let iat = cookie_claims["iat"].as_u64().unwrap();
    let cookie = format!(
        "theme=dark; __session={}; __client_uat={iat}",
        env.clerk.mint(cookie_claims)
    );

    for scheme in ["bearer", "BEARER", "Basic", "Token", "Bearer:"] {
        let value = format!("{scheme} {header_token}");
        let before = env.upstream.count();
        let reply = env.raw_get("/orders", &[("Authorization", &value)]).await;
        assert_refused(&reply, 401, "session-token-missing", scheme);
        assert_eq!(env.upstream.count(), before, "{scheme}");

        let reply = env
            .raw_get("/orders", &[("Authorization", &value), ("Cookie", &cookie)])
            .await;
        assert_eq!(reply.status, 200, "{scheme} + cookie: {}", reply.text());
        let seen = env.upstream.last();
        assert_eq!(
            values(&seen.headers, "x-user-id"),
            ["user_cookie"],
            "{scheme}"
        );
        assert!(
            seen.headers.get("authorization").is_none(),
            "{scheme}: {:?}",
            seen.headers
        );
        assert_eq!(values(&seen.headers, "cookie"), ["theme=dark"], "{scheme}");
    }
    let count = env.upstream.count();

    // A raw token without a scheme is accepted; a tab is not the separating space.
    let reply = env
        .raw_get("/orders", &[("Authorization", &header_token)])
        .await;
    assert_eq!(reply.status, 200, "raw token: {}", reply.text());
    assert_eq!(
        values(&env.upstream.last().headers, "x-user-id"),
        ["user_header"]
    );
    let tab = format!("Bearer\t{header_token}");
    let reply = env.raw_get("/orders", &[("Authorization", &tab)]).await;
    assert_refused(&reply, 401, "token-invalid", "tab after Bearer");
    // `Bearer ` with nothing after it arrives as `Bearer` (trailing whitespace is not part of a
    // field value): a value without a space, so a raw token, and a malformed one.
    let reply = env
        .raw_get("/orders", &[("Authorization", "Bearer ")])
        .await;
    assert_refused(&reply, 401, "token-invalid", "Bearer and nothing");
    assert_eq!(env.upstream.count(), count + 1);
    env.stop().await;
}

#[tokio::test]
async fn duplicate_session_cookies_use_the_first_and_all_are_removed() {
    let env = Env::start("").await;
    let claims = env.clerk.claims("user_cookie");
    let iat = claims["iat"].as_u64().unwrap();
    let good = env.clerk.mint(claims);
    let uat = format!("__client_uat={iat}");

    let reply = env
        .raw_get(
            "/orders",
            &[(
                "Cookie",
                &format!("__session=junk; __session={good}; {uat}"),
            )],
        )
        .await;
    assert_refused(&reply, 401, "token-invalid", "garbage first");
    assert_eq!(env.upstream.count(), 0);

    // The good one first, then junk, then a jar of other-instance-looking token cookies,
    // across several Cookie lines: forwarded, and every token cookie is gone.
    let jar: Vec<String> = (0..200)
        .map(|i| format!("__session_x{i}=junk{i}"))
        .collect();
    let reply = env
        .raw_get(
            "/orders",
            &[
                ("Cookie", &format!("a=1; __session={good}; __session=junk")),
                ("Cookie", &format!("{}; b=2", jar.join("; "))),
                ("Cookie", &format!("{uat}; __client_uat_x=9; c=3")),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(values(&seen.headers, "x-user-id"), ["user_cookie"]);
    assert_eq!(values(&seen.headers, "cookie"), ["a=1; b=2; c=3"]);
    env.stop().await;
}

#[tokio::test]
async fn session_cookie_in_a_cookie_line_with_non_ascii_bytes_never_reaches_upstream() {
    // Token cookies are removed before forwarding "unless auth.forward_token = true" (README).
    // A Cookie line that also carries one non-ASCII byte (a UTF-8 cookie value, which browsers
    // do send) is skipped both when looking for the token and when removing it, so the token
    // goes upstream: on public routes, and next to a valid Authorization header.
    let env = Env::start(ROUTES).await;
    let claims = env.clerk.claims("user_cookie");
    let iat = claims["iat"].as_u64().unwrap();
    let token = env.clerk.mint(claims);
    let bearer = format!("Bearer {}", env.clerk.session_token("user_header"));
    let mut sent = 0;
    for (case, path, auth) in [
        ("public route", "/public/page", None),
        (
            "next to a valid Authorization header",
            "/orders",
            Some(bearer.as_str()),
        ),
    ] {
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n").into_bytes();
        if let Some(auth) = auth {
            request.extend_from_slice(format!("Authorization: {auth}\r\n").as_bytes());
        }
        request.extend_from_slice(b"Cookie: name=Ren\xc3\xa9e; __session=");
        request.extend_from_slice(token.as_bytes());
        request.extend_from_slice(format!("; __client_uat={iat}\r\n\r\n").as_bytes());
        let replies = env.send(&request).await;
        assert_eq!(replies.len(), 1, "{case}");
        assert_eq!(replies[0].status, 200, "{case}: {}", replies[0].text());
        sent += 1;
        assert_eq!(env.upstream.count(), sent);
        let seen = env.upstream.last();
        for value in seen.headers.get_all("cookie") {
            assert!(
                find(value.as_bytes(), token.as_bytes()).is_none(),
                "{case}: the session token reached the upstream in {value:?}"
            );
        }
    }
    env.stop().await;
}

#[tokio::test]
async fn malformed_header_lines_never_smuggle_an_identity_header() {
    let env = Env::start(ROUTES).await;
    // (case, raw header lines) on a public route: each is either refused by the HTTP parser
    // before clerkgate sees it, or parsed into headers that are then stripped.
    let cases: Vec<(&str, &str, u16)> = vec![
        (
            "obs-fold continuation",
            "X-Request-Id: a\r\n X-User-Id: user_evil\r\n",
            400,
        ),
        (
            "obs-fold with a tab",
            "X-Request-Id: a\r\n\tX-User-Id: user_evil\r\n",
            400,
        ),
        ("space before the colon", "X-User-Id : user_evil\r\n", 400),
        ("tab before the colon", "X-User-Id\t: user_evil\r\n", 400),
        (
            "leading space on the first line",
            " X-User-Id: user_evil\r\n",
            400,
        ),
        (
            "bare CR inside a value",
            "X-Request-Id: a\rX-User-Id: user_evil\r\n",
            400,
        ),
        (
            "bare LF line end",
            "X-User-Id: user_evil\nX-Org-Role: org:admin_evil\r\n",
            200,
        ),
        ("empty name", ": user_evil\r\n", 400),
        (
            "NUL in a value",
            "X-Request-Id: a\0X-User-Id: user_evil\r\n",
            400,
        ),
        ("name with a slash", "X-User-Id/x: user_evil\r\n", 400),
        (
            "mixed-case underscores",
            "X_uSeR_iD: user_evil\r\nx-CLERK_auth-STATUS: evil\r\n",
            200,
        ),
        (
            "the same name five ways",
            "X-User-Id: user_evil\r\nx-user-id: user_evil\r\nX_USER_ID: user_evil\r\nx_User-id: user_evil\r\nX-User_Id: user_evil\r\n",
            200,
        ),
    ];
    let mut forwarded = 0;
    for (case, lines, status) in cases {
        let request =
            format!("GET /public/page HTTP/1.1\r\nHost: a\r\n{lines}Connection: close\r\n\r\n");
        let replies = env.send(request.as_bytes()).await;
        assert_eq!(
            replies.iter().map(|r| r.status).collect::<Vec<_>>(),
            [status],
            "{case}"
        );
        if status == 200 {
            forwarded += 1;
        }
        assert_eq!(env.upstream.count(), forwarded, "{case}");
        if status == 200 {
            let seen = env.upstream.last();
            for (name, value) in &seen.headers {
                assert!(
                    !is_reserved(name.as_str()),
                    "{case}: {name} reached the upstream"
                );
                assert!(
                    find(value.as_bytes(), b"evil").is_none(),
                    "{case}: {name}: {value:?} reached the upstream"
                );
            }
        }
    }
    env.stop().await;
}

/// clerkgate in front of a [`RawUpstream`], against the shared fake Clerk.
async fn gate_before_raw(extra: &str) -> (RawUpstream, Sidecar) {
    let raw = RawUpstream::recording().await;
    let clerk = shared_clerk();
    let gate =
        Sidecar::start_config(config(&base_toml(&clerk, &raw.url()), extra).expect("config")).await;
    assert!(gate.wait_ready(WAIT).await, "clerkgate became ready");
    (raw, gate)
}

#[tokio::test]
async fn identity_headers_in_a_chunked_trailer_section_never_reach_the_upstream() {
    let (raw, gate) = gate_before_raw(ROUTES).await;
    let token = shared_clerk().session_token("user_real");
    let trailers = "X-User-Id: user_evil\r\nx_user_id: user_evil\r\nX-USER-ID: user_evil\r\n\
                    X-Clerk-Claims: evil\r\nX_Clerk_Auth_Status: evil\r\nX-Org-Role: org:evil\r\n\
                    X-Session-Id: sess_evil\r\nX-Other: fine\r\n";
    for (case, path, auth) in [
        ("public route", "/public/upload", String::new()),
        (
            "authenticated route",
            "/upload",
            format!("Authorization: Bearer {token}\r\n"),
        ),
    ] {
        let before = raw.requests().len();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\n{auth}Transfer-Encoding: chunked\r\n\
             Trailer: X-User-Id, x_user_id, X-USER-ID, X-Clerk-Claims, X_Clerk_Auth_Status, X-Org-Role, X-Session-Id, X-Other\r\n\
             TE: trailers\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n{trailers}\r\n"
        );
        let replies = crate::support::raw::send_raw(gate.proxy, request.as_bytes()).await;
        assert_eq!(
            replies.iter().map(|r| r.status).collect::<Vec<_>>(),
            [200],
            "{case}: {:?}",
            replies.first().map(|r| r.text())
        );
        let requests = raw.requests();
        assert_eq!(requests.len(), before + 1, "{case}");
        let bytes = &requests[before];
        let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
        assert!(
            text.contains("hello") && text.contains(" world"),
            "{case}: body lost: {text}"
        );
        assert!(
            !text.contains("evil"),
            "{case}: a spoofed value reached the upstream:\n{text}"
        );
        let user_lines: Vec<&str> = text
            .split("\r\n")
            .filter(|l| {
                l.split(':')
                    .next()
                    .is_some_and(|n| fold(n.trim()) == "x-user-id")
            })
            .collect();
        if auth.is_empty() {
            assert!(user_lines.is_empty(), "{case}: {text}");
        } else {
            assert_eq!(user_lines, ["x-user-id: user_real"], "{case}: {text}");
        }
    }
    gate.stop().await;
}

#[tokio::test]
async fn connection_header_cannot_remove_the_verified_identity_headers() {
    let env = Env::start("").await;
    let token = env.clerk.session_token("user_real");
    let bearer = format!("Bearer {token}");
    let reply = env
        .raw_get(
            "/orders",
            &[
                ("Authorization", &bearer),
                (
                    "Connection",
                    "X-User-Id, X-Session-Id, X-Clerk-Claims, x_user_id",
                ),
                ("Connection", "keep-alive, X-Forwarded-For"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(values(&seen.headers, "x-user-id"), ["user_real"]);
    assert_eq!(values(&seen.headers, "x-session-id").len(), 1);
    assert_eq!(values(&seen.headers, "x-clerk-claims").len(), 1);
    assert_eq!(values(&seen.headers, "x-forwarded-for"), ["127.0.0.1"]);
    env.stop().await;
}

#[tokio::test]
async fn oversized_heads_and_cookie_jars() {
    let env = Env::start("").await;
    let claims = env.clerk.claims("user_cookie");
    let iat = claims["iat"].as_u64().unwrap();
    let token = env.clerk.mint(claims);

    // A 58 KB jar of 2000 cookies with the session in the middle fits the 64 KiB head: served,
    // and the upstream gets every other cookie byte for byte.
    let others: Vec<String> = (0..2000).map(|i| format!("c{i:04}=v{i:020}")).collect();
    let (first, last) = others.split_at(1000);
    let jar = format!(
        "{}; __session={token}; __client_uat={iat}; {}",
        first.join("; "),
        last.join("; ")
    );
    assert!(jar.len() > 55_000 && jar.len() < 63_000, "{}", jar.len());
    let reply = env.raw_get("/orders", &[("Cookie", &jar)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(values(&seen.headers, "x-user-id"), ["user_cookie"]);
    assert_eq!(
        values(&seen.headers, "cookie"),
        [others.join("; ").as_str()]
    );

    // Over the limit, in one line or in many, or as too many header lines: 431, nothing sent.
    let big_jar = format!("{jar}; {}", others.join("; "));
    let many_lines: Vec<(String, String)> = (0..1100)
        .map(|i| ("Cookie".to_owned(), format!("k{i}={}", "v".repeat(50))))
        .collect();
    let many_small: Vec<(String, String)> = (0..150)
        .map(|i| (format!("X-H{i}"), "1".to_owned()))
        .collect();
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("a 120 KB cookie jar", vec![("Cookie".into(), big_jar)]),
        ("1100 cookie lines", many_lines),
        ("150 header lines", many_small),
    ];
    for (case, headers) in cases {
        let mut request = "GET /orders HTTP/1.1\r\nHost: a\r\n".to_owned();
        for (n, v) in &headers {
            request.push_str(&format!("{n}: {v}\r\n"));
        }
        request.push_str(&format!(
            "Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ));
        let replies = env.send(request.as_bytes()).await;
        assert_eq!(
            replies.iter().map(|r| r.status).collect::<Vec<_>>(),
            [431],
            "{case}"
        );
    }
    assert_eq!(env.upstream.count(), 1);
    env.stop().await;
}

#[tokio::test]
async fn mapped_claims_with_non_visible_bytes_are_dropped_or_encoded_never_split() {
    let env = Env::start("[headers.claims]\n\"public_metadata.note\" = \"X-Note\"\n").await;
    // Control bytes are dropped. Bytes of 0x80 and above are obs-text (RFC 9110 section 5.5):
    // a legal header value, forwarded as the claim's UTF-8 and never split.
    let cases: Vec<(&str, serde_json::Value, Option<&str>)> = vec![
        ("NUL", json!("a\u{0}X-Injected: 1"), None),
        ("bare CR", json!("a\rX-Injected: 1"), None),
        ("bare LF", json!("a\nX-Injected: 1"), None),
        ("obs-fold", json!("a\r\n\tX-Injected: 1"), None),
        ("vertical tab", json!("a\u{b}b"), None),
        ("form feed", json!("a\u{c}b"), None),
        ("DEL", json!("a\u{7f}b"), None),
        ("escape", json!("a\u{1b}[31mred"), None),
        (
            "an array with CR LF",
            json!(["a", "b\r\nX-Injected: 1"]),
            None,
        ),
        ("non-ASCII", json!("Renée"), Some("Renée")),
        (
            "NEL",
            json!("a\u{85}X-Injected: 1"),
            Some("a\u{85}X-Injected: 1"),
        ),
        (
            "line separator",
            json!("a\u{2028}X-Injected: 1"),
            Some("a\u{2028}X-Injected: 1"),
        ),
        (
            "U+010A, whose low byte is LF",
            json!("a\u{10a}X-Injected: 1"),
            Some("a\u{10a}X-Injected: 1"),
        ),
        (
            "an object with CR LF (sent as JSON text)",
            json!({"k": "b\r\nX-Injected: 1"}),
            Some(r#"{"k":"b\r\nX-Injected: 1"}"#),
        ),
        ("a plain array", json!(["gold", "beta"]), Some("gold,beta")),
    ];
    for (case, note, expected) in cases {
        let mut claims = env.clerk.claims("user_1");
        claims["public_metadata"] = json!({"note": note});
        let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;
        assert_eq!(reply.status, 200, "{case}: {}", reply.text());
        let seen = env.upstream.last();
        let notes: Vec<&[u8]> = seen
            .headers
            .get_all("x-note")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let expected: Vec<&[u8]> = expected.iter().map(|e| e.as_bytes()).collect();
        assert_eq!(notes, expected, "{case}");
        assert!(
            seen.headers.get("x-injected").is_none(),
            "{case}: {:?}",
            seen.headers
        );
        assert_eq!(values(&seen.headers, "x-user-id"), ["user_1"], "{case}");
    }
    env.stop().await;
}

#[tokio::test]
async fn spoofed_webhook_trust_headers_never_reach_the_webhook_forward_path() {
    // With webhooks.forward_path the upstream trusts X-Clerk-Webhook-Verified from clerkgate.
    // A signed-in user calling that path directly must not be able to set it.
    let env = Env::start("[webhooks]\nforward_path = \"/internal/clerk-webhooks\"\n").await;
    let token = env.clerk.session_token("user_1");
    let reply = env
        .raw_get(
            "/internal/clerk-webhooks",
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("X-Clerk-Webhook-Verified", "1"),
                ("x_clerk_webhook_type", "user.deleted"),
                ("X-CLERK-WEBHOOK-ID", "msg_evil"),
                ("X-Clerk-Webhook-Verified", "1"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    for name in seen.headers.keys() {
        assert!(
            !fold(name.as_str()).starts_with("x-clerk-webhook"),
            "{name}: {:?}",
            seen.headers
        );
    }
    assert_eq!(values(&seen.headers, "x-user-id"), ["user_1"]);
    env.stop().await;
}
