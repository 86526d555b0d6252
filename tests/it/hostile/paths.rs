//! Paths: spellings security.rs does not try (overlong UTF-8 dots, encoded `;` and dots in
//! other combinations, control bytes, double encoding, query and fragment tricks),
//! absolute-form and other non-origin request targets, Host mismatches, the `decode` policy
//! for encoded slashes, and forward-auth URIs. The property throughout: the route rule is
//! decided on the same path the upstream receives.

use super::kit::ROUTES;
use crate::support::FakeClerk;
use crate::support::env::{Env, assert_refused, values};

fn org_token(clerk: &FakeClerk, sub: &str, role: &str) -> String {
    let mut claims = clerk.claims(sub);
    claims["o"] = serde_json::json!({"id": "org_1", "slg": "acme", "rol": role});
    clerk.mint(claims)
}

/// What a case must produce: refused with (status, reason), or forwarded to this path.
#[derive(Debug, Clone, Copy)]
enum Want {
    Refused(u16, &'static str),
    Upstream(&'static str),
}

async fn check(env: &Env, case: &str, target: &str, headers: &[(&str, &str)], want: Want) {
    let before = env.upstream.count();
    let reply = env.raw_get(target, headers).await;
    match want {
        Want::Refused(status, reason) => {
            assert_refused(&reply, status, reason, case);
            assert_eq!(env.upstream.count(), before, "{case}: reached the upstream");
        }
        Want::Upstream(path) => {
            assert_eq!(reply.status, 200, "{case}: {}", reply.text());
            assert_eq!(env.upstream.count(), before + 1, "{case}");
            assert_eq!(env.upstream.last().uri.path(), path, "{case}");
        }
    }
}

#[tokio::test]
async fn more_spellings_cannot_carry_a_member_from_public_into_admin() {
    let env = Env::start(ROUTES).await;
    let member = format!("Bearer {}", org_token(&env.clerk, "user_m", "member"));
    let auth = [("Authorization", member.as_str())];
    let role = Want::Refused(403, "org-role-mismatch");
    let cases: Vec<(&str, Want)> = vec![
        ("/./admin/x", role),
        ("/%2e/admin/x", role),
        ("/%2e%2e/admin/x", role),
        ("/public/x/../../admin/x", role),
        ("/public/.%2E/admin/x", role),
        ("/public/%2E./admin/x", role),
        ("/public/..%3B/admin/x", role),
        ("/public/..%3bjsessionid=1/admin/x", role),
        ("/public/%2e%2e;x/admin/x", role),
        ("/public;x/../admin/x", role),
        ("/public/..;/..;/admin/x", role),
        ("/public/;/../admin/x", role),
        ("///admin///x", role),
        ("/admin/x/", role),
        ("/admin", role),
        ("/%61%64%6d%69%6e/x", role),
        (
            "/public/%c0%ae%c0%ae/admin/x",
            Want::Refused(400, "path-non-utf8"),
        ),
        (
            "/public/%e0%80%ae%e0%80%ae/admin/x",
            Want::Refused(400, "path-non-utf8"),
        ),
        (
            "/public/%c0%af../admin/x",
            Want::Refused(400, "path-non-utf8"),
        ),
        (
            "/public/..%u002fadmin/x",
            Want::Refused(400, "path-bad-percent-encoding"),
        ),
        (
            "/public/..%2/admin/x",
            Want::Refused(400, "path-bad-percent-encoding"),
        ),
        (
            "/public/..%00/admin/x",
            Want::Refused(400, "path-control-character"),
        ),
        (
            "/public/..%09/admin/x",
            Want::Refused(400, "path-control-character"),
        ),
        (
            "/public/..%0d%0a/admin/x",
            Want::Refused(400, "path-control-character"),
        ),
        (
            "/public\\..\\admin/x",
            Want::Refused(400, "path-encoded-slash"),
        ),
        (
            "/public/..%5c..%5cadmin/x",
            Want::Refused(400, "path-encoded-slash"),
        ),
        // Decoded once, as RFC 3986 says: these stay data inside a public path, and the
        // upstream receives exactly the spelling the rule was decided on.
        (
            "/public/%252e%252e/admin/x",
            Want::Upstream("/public/%252e%252e/admin/x"),
        ),
        (
            "/public/%252f..%252fadmin/x",
            Want::Upstream("/public/%252f..%252fadmin/x"),
        ),
        ("/public/x?/../../admin/x", Want::Upstream("/public/x")),
        ("/public/x?a=%2F..%2Fadmin", Want::Upstream("/public/x")),
    ];
    for (target, want) in cases {
        check(&env, target, target, &auth, want).await;
    }
    // The query string is passed on as sent, never re-read as a path.
    check(
        &env,
        "query",
        "/public/q?next=/../admin/x",
        &[],
        Want::Upstream("/public/q"),
    )
    .await;
    assert_eq!(env.upstream.last().uri.query(), Some("next=/../admin/x"));
    env.stop().await;
}

/// Header lines of a request.
type Headers<'a> = &'a [(&'a str, &'a str)];

#[tokio::test]
async fn absolute_form_targets_are_ruled_and_forwarded_by_their_path() {
    let env = Env::start(ROUTES).await;
    let member = format!("Bearer {}", org_token(&env.clerk, "user_m", "member"));
    let admin = format!("Bearer {}", org_token(&env.clerk, "user_a", "admin"));
    let as_member = [("Authorization", member.as_str())];
    let as_admin = [("Authorization", admin.as_str())];
    let role = Want::Refused(403, "org-role-mismatch");
    let missing = Want::Refused(401, "session-token-missing");
    let cases: Vec<(&str, &str, Headers, Want)> = vec![
        (
            "member, other host",
            "http://other.example/admin/x",
            &as_member,
            role,
        ),
        (
            "member, dot segments",
            "http://other.example/public/../admin/x",
            &as_member,
            role,
        ),
        (
            "member, encoded dots",
            "http://app.example/public/%2e%2e/admin/x",
            &as_member,
            role,
        ),
        (
            "no token, other host",
            "http://other.example/admin/x",
            &[],
            missing,
        ),
        (
            "no token, https scheme",
            "https://other.example/admin/x",
            &[],
            missing,
        ),
        ("no token, no path", "http://other.example", &[], missing),
        (
            "no token, userinfo",
            "http://public@other.example/admin/x",
            &[],
            missing,
        ),
        (
            "admin, other host",
            "http://other.example/public/../admin/x",
            &as_admin,
            Want::Upstream("/admin/x"),
        ),
        (
            "no token, public",
            "http://other.example/public/x",
            &[],
            Want::Upstream("/public/x"),
        ),
    ];
    for (case, target, headers, want) in cases {
        check(&env, case, target, headers, want).await;
    }
    // Whatever host the target named, the upstream gets one Host and a matching
    // X-Forwarded-Host.
    let seen = env.upstream.last();
    assert_eq!(values(&seen.headers, "host").len(), 1, "{:?}", seen.headers);
    assert_eq!(
        values(&seen.headers, "host"),
        values(&seen.headers, "x-forwarded-host")
    );
    env.stop().await;
}

#[tokio::test]
async fn non_origin_request_targets_are_refused() {
    let env = Env::start(ROUTES).await;
    for (case, request) in [(
        "asterisk-form",
        "OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )] {
        let replies = env.send(request.as_bytes()).await;
        assert_eq!(replies.len(), 1, "{case}");
        assert_refused(&replies[0], 400, "path-not-origin-form", case);
    }
    // clerkgate never opens a CONNECT tunnel (edges.rs covers it further).
    let replies = env
        .send(b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(replies.len(), 1, "authority-form CONNECT");
    assert_refused(
        &replies[0],
        405,
        "method-not-allowed",
        "authority-form CONNECT",
    );
    // A relative target without a leading slash never parses as a request.
    let replies = env
        .send(b"GET admin/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(replies.iter().map(|r| r.status).collect::<Vec<_>>(), [400]);
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn host_header_tricks_leave_the_upstream_one_host() {
    let env = Env::start(ROUTES).await;
    // (case, target, Host lines, the X-Forwarded-Host the upstream must see)
    let cases: Vec<(&str, &str, &str, Option<&str>)> = vec![
        (
            "two Host lines",
            "/public/h",
            "Host: app.example\r\nHost: evil.example\r\n",
            Some("app.example"),
        ),
        ("no Host", "/public/h", "", None),
        (
            "Host and a different absolute target",
            "http://app.example/public/h",
            "Host: evil.example\r\n",
            Some("evil.example"),
        ),
    ];
    for (case, target, host_lines, forwarded_host) in cases {
        let request = format!("GET {target} HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n");
        let before = env.upstream.count();
        let replies = env.send(request.as_bytes()).await;
        let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
        // RFC 9112 section 3.2: two Host lines are a 400.
        if case == "two Host lines" {
            assert_eq!(statuses, [400], "{case}");
            assert_eq!(env.upstream.count(), before, "{case}");
            continue;
        }
        assert_eq!(statuses, [200], "{case}");
        assert_eq!(env.upstream.count(), before + 1, "{case}");
        let seen = env.upstream.last();
        assert_eq!(seen.uri.path(), "/public/h", "{case}");
        let hosts = values(&seen.headers, "host");
        assert_eq!(hosts.len(), 1, "{case}: {:?}", seen.headers);
        let xfh = values(&seen.headers, "x-forwarded-host");
        assert_eq!(
            xfh,
            forwarded_host.into_iter().collect::<Vec<_>>(),
            "{case}"
        );
        if let Some(h) = forwarded_host {
            assert_eq!(hosts, [h], "{case}: Host and X-Forwarded-Host agree");
        }
    }
    env.stop().await;
}

#[tokio::test]
async fn decoded_encoded_slashes_are_separators_for_the_rule_and_the_upstream() {
    let env = Env::start(&format!(
        "{ROUTES}\n[proxy]\nencoded_slashes = \"decode\"\n"
    ))
    .await;
    let member = format!("Bearer {}", org_token(&env.clerk, "user_m", "member"));
    let admin = format!("Bearer {}", org_token(&env.clerk, "user_a", "admin"));
    let role = Want::Refused(403, "org-role-mismatch");
    let cases: Vec<(&str, &str, Want)> = vec![
        ("/public%2F..%2Fadmin/x", &member, role),
        ("/public%2f%2e%2e%2fadmin/x", &member, role),
        ("/public%5C..%5Cadmin/x", &member, role),
        ("/public\\..\\admin/x", &member, role),
        ("/public%2F..%2Fadmin/x", &admin, Want::Upstream("/admin/x")),
        ("/public%2Fx", "", Want::Upstream("/public/x")),
        (
            "/admin%2Fx",
            "",
            Want::Refused(401, "session-token-missing"),
        ),
    ];
    for (target, bearer, want) in cases {
        let headers: Vec<(&str, &str)> = if bearer.is_empty() {
            vec![]
        } else {
            vec![("Authorization", bearer)]
        };
        check(&env, target, target, &headers, want).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn forward_auth_original_uris_get_the_same_rules() {
    let env = Env::start(ROUTES).await;
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        (
            "X-Original-URI",
            "http://other.example/public/x",
            400,
            "path-not-origin-form",
        ),
        (
            "X-Original-URI",
            "/public/%2e%2e/admin/x",
            401,
            "session-token-missing",
        ),
        (
            "X-Forwarded-Uri",
            "/public/..;/admin/x",
            401,
            "session-token-missing",
        ),
        (
            "X-Forwarded-Uri",
            "//admin/x?/public",
            401,
            "session-token-missing",
        ),
        (
            "X-Original-URI",
            "/public%2F..%2Fadmin/x",
            400,
            "path-encoded-slash",
        ),
        (
            "X-Original-URI",
            "/public/%c0%ae%c0%ae/admin",
            400,
            "path-non-utf8",
        ),
        ("X-Original-URI", "", 400, "path-not-origin-form"),
    ];
    for (name, uri, status, reason) in cases {
        let reply = env.raw_get("/_clerkgate/auth", &[(name, uri)]).await;
        assert_refused(&reply, status, reason, &format!("{name}: {uri}"));
        assert!(reply.header("x-user-id").is_none());
    }
    // Control: a public original URI is allowed anonymously.
    let reply = env
        .raw_get("/_clerkgate/auth", &[("X-Original-URI", "/public/x")])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}
