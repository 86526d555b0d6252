//! Security properties of the request path, end to end: the real clerkgate in front of the
//! recording echo upstream, against fake Clerk instances, over real sockets.
//!
//! Every test asserts on what the upstream actually received (or that it received nothing),
//! not only on the status the client saw: a proxy that answers 401 but forwards anyway, or
//! answers 200 with a client-chosen `X-User-Id` next to the verified one, must fail here.
//!
//! Areas, in file order: spoofed identity headers, algorithm confusion, forged `kid`s and
//! key-carrying headers, cross-instance tokens, `azp`, time and type claims, path
//! normalisation against route rules, cookie tokens, organization claims and route policy, the
//! forward-auth endpoint, optional routes. Sources: docs/clerk-protocol.md sections 1, 2.1,
//! 2.6 and 7.

use http::HeaderMap;
use serde_json::{Value, json};

use crate::support::env::{
    EXTRA_RESERVED, EXTRA_RESERVED_NAMES, Env, b64, is_reserved, other_instance, payload_segment,
    random_hex,
};
use crate::support::{FakeClerk, now};

/// Routes shared by the path, policy and forward-auth tests.
const ROUTES: &str = r#"
[[routes]]
path = "/public/**"
auth = "public"
[[routes]]
path = "/feed/**"
auth = "optional"
[[routes]]
path = "/admin/**"
org_role = "admin"
[[routes]]
path = "/billing/**"
org_permissions = ["org:billing:manage"]
[[routes]]
path = "/gold/**"
claims = { "public_metadata.tier" = "gold" }
"#;

/// The upstream got no identity header in any spelling.
fn assert_anonymous(headers: &HeaderMap) {
    for name in headers.keys() {
        assert!(
            !is_reserved(name.as_str(), EXTRA_RESERVED_NAMES),
            "identity header {name} reached the upstream of an anonymous request: {headers:?}"
        );
    }
}

/// A compact JWS with an arbitrary header and signature bytes.
fn forged(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string()),
        b64(claims.to_string()),
        b64(signature)
    )
}

/// Session claims with an active v2 organization `org_1` (slug `acme`) and this role key.
fn org_claims(clerk: &FakeClerk, sub: &str, role: &str) -> Value {
    let mut claims = clerk.claims(sub);
    claims["o"] = json!({"id": "org_1", "slg": "acme", "rol": role});
    claims
}

// 1. Spoofed identity headers (clerk-protocol.md section 7.11).

#[tokio::test]
async fn spoofed_identity_headers_never_reach_upstream_next_to_a_valid_token() {
    let env = Env::start(EXTRA_RESERVED).await;
    let mut claims = env.clerk.claims("user_real");
    claims["public_metadata"] = json!({"plan": "free"});
    let token = env.clerk.mint(claims);
    let before = env.gate.metrics.spoofed_headers.get();

    let reply = env
        .get(
            "/orders",
            Some(&token),
            &[
                ("X-User-Id", "user_evil"),
                ("X-User-Id", "user_evil_2"),
                ("x_user_id", "user_evil_3"),
                ("X-Session-Id", "sess_evil"),
                ("X-Org-Id", "org_evil"),
                ("X-Org-Role", "org:admin"),
                ("X-Clerk-Claims", "eyJzdWIiOiJ1c2VyX2V2aWwifQ"),
                ("X-Clerk-Anything", "1"),
                ("X-Plan", "enterprise"),
                ("X-Tenant", "tenant_evil"),
                ("X-Request-Id", "req-1"),
            ],
        )
        .await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    let values = |name: &str| -> Vec<&str> {
        seen.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(values("x-user-id"), ["user_real"]);
    assert!(values("x_user_id").is_empty(), "{:?}", seen.headers);
    assert_eq!(values("x-session-id").len(), 1);
    assert_ne!(values("x-session-id"), ["sess_evil"]);
    assert!(values("x-org-id").is_empty(), "the token has no active org");
    assert!(
        values("x-org-role").is_empty(),
        "the token has no active org"
    );
    assert_eq!(values("x-clerk-claims"), [payload_segment(&token)]);
    assert!(values("x-clerk-anything").is_empty());
    assert_eq!(
        values("x-plan"),
        ["free"],
        "the mapped claim, not the client's"
    );
    assert!(values("x-tenant").is_empty());
    assert_eq!(values("x-request-id"), ["req-1"], "ordinary headers pass");
    // Nine distinct reserved names were sent (the two X-User-Id lines are one name).
    let moved = env.gate.metrics.spoofed_headers.get() - before;
    assert!(
        moved >= 9,
        "clerkgate_spoofed_headers_total moved by {moved}"
    );
    env.stop().await;
}

#[tokio::test]
async fn spoofed_identity_headers_in_any_spelling_are_stripped_on_public_routes() {
    let env = Env::start(&format!("{ROUTES}{EXTRA_RESERVED}")).await;
    let before = env.gate.metrics.spoofed_headers.get();

    // Raw bytes: mixed case and underscores exactly as an attacker would send them.
    let reply = env
        .raw_get(
            "/public/page",
            &[
                ("X-User-Id", "user_evil"),
                ("X_User_Id", "user_evil_2"),
                ("X-USER-ID", "user_evil_3"),
                ("x_user_id", "user_evil_4"),
                ("X-Org-Id", "org_evil"),
                ("X_ORG_ROLE", "org:admin"),
                ("X-Actor-Id", "user_admin"),
                ("X-Clerk-Claims", "e30"),
                ("X-Clerk-Anything", "1"),
                ("X_Clerk_Auth_Status", "signed-in"),
                ("X-Plan", "enterprise"),
                ("x-tenant", "tenant_evil"),
                ("X-Request-Id", "req-1"),
            ],
        )
        .await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.count(), 1);
    let seen = env.upstream.last();
    assert_anonymous(&seen.headers);
    assert_eq!(
        seen.headers["x-request-id"], "req-1",
        "ordinary headers pass"
    );
    assert!(env.gate.metrics.spoofed_headers.get() > before);
    env.stop().await;
}

#[tokio::test]
async fn spoofed_identity_headers_are_stripped_on_optional_routes_without_a_token() {
    let env = Env::start(&format!("{ROUTES}{EXTRA_RESERVED}")).await;

    let reply = env
        .raw_get(
            "/feed/latest",
            &[
                ("X-User-Id", "user_evil"),
                ("X_User_Id", "user_evil_2"),
                ("X-Session-Id", "sess_evil"),
                ("X-Org-Id", "org_evil"),
                ("X-Org-Permissions", "org:billing:manage"),
                ("X-Clerk-Claims", "e30"),
                ("X-Clerk-Anything", "1"),
                ("X-Plan", "enterprise"),
                ("X-Tenant", "tenant_evil"),
            ],
        )
        .await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.count(), 1);
    assert_anonymous(&env.upstream.last().headers);
    env.stop().await;
}

#[tokio::test]
async fn spoofed_identity_header_is_refused_with_400_when_the_policy_is_reject() {
    let env = Env::start(&format!(
        "{ROUTES}{EXTRA_RESERVED}\n[auth]\non_spoofed_header = \"reject\"\n"
    ))
    .await;
    let token = env.clerk.session_token("user_real");
    let before = env.gate.metrics.spoofed_headers.get();

    let cases: [(&str, Option<&str>, (&str, &str)); 5] = [
        ("/orders", Some(&token), ("X-User-Id", "user_evil")),
        ("/orders", Some(&token), ("x_user_id", "user_evil")),
        ("/public/page", None, ("X-Org-Id", "org_evil")),
        ("/feed/latest", None, ("X-Clerk-Anything", "1")),
        ("/public/page", None, ("X-Tenant", "tenant_evil")),
    ];
    for (path, token, header) in cases {
        let reply = env.get(path, token, &[header]).await;
        assert_eq!(reply.status, 400, "{path} {header:?}: {}", reply.text());
        assert_eq!(
            reply.reason(),
            "spoofed-identity-header",
            "{path} {header:?}"
        );
    }
    assert_eq!(env.upstream.count(), 0, "no refused request was forwarded");
    assert!(env.gate.metrics.spoofed_headers.get() >= before + 5);

    // The same request without the spoofed header goes through: the policy refuses the
    // header, not the client.
    let reply = env.get("/orders", Some(&token), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.last().headers["x-user-id"], "user_real");
    env.stop().await;
}

// 2. Algorithm confusion (section 7.5): only the key's RSASSA-PKCS1-v1_5 algorithm verifies.

#[tokio::test]
async fn algorithm_confusion_tokens_are_rejected_with_invalid_algorithm() {
    use aws_lc_rs::hmac;

    let env = Env::start("").await;
    let claims = env.clerk.claims("user_1");
    let key = env.clerk.key("ins_fake_1");
    let hs256 = |secret: &[u8]| {
        let header = json!({"alg": "HS256", "kid": "ins_fake_1", "typ": "JWT"});
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    };
    let rsa_with_header = |alg: &str| {
        env.clerk.sign(
            json!({"alg": alg, "kid": "ins_fake_1", "typ": "JWT"}),
            claims.clone(),
        )
    };

    let cases = [
        (
            "alg none, empty signature",
            forged(
                &json!({"alg": "none", "kid": "ins_fake_1", "typ": "JWT"}),
                &claims,
                b"",
            ),
        ),
        (
            "HS256 keyed with the public key PEM",
            hs256(key.public_key_pem().as_bytes()),
        ),
        (
            "HS256 keyed with the public JWK",
            hs256(key.jwk().to_string().as_bytes()),
        ),
        ("RS384 on the RS256 key", rsa_with_header("RS384")),
        ("ES256", rsa_with_header("ES256")),
        ("PS256", rsa_with_header("PS256")),
    ];
    for (name, token) in &cases {
        let reply = env.get("/orders", Some(token), &[]).await;
        assert_eq!(reply.status, 401, "{name}: {}", reply.text());
        assert_eq!(reply.reason(), "token-invalid-algorithm", "{name}");
    }
    assert_eq!(env.upstream.count(), 0);

    // The same claims under the real header are accepted, so the header alone made the
    // difference above.
    let reply = env
        .get("/orders", Some(&rsa_with_header("RS256")), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    env.stop().await;
}

// 3. Forged kids and key-carrying headers (section 7.4).

#[tokio::test]
async fn token_with_a_kid_missing_from_the_jwks_is_rejected_with_jwk_kid_mismatch() {
    let env = Env::start("").await;
    let token = env.clerk.sign(
        json!({"alg": "RS256", "kid": "ins_not_published", "typ": "JWT"}),
        env.clerk.claims("user_1"),
    );

    let reply = env.get("/orders", Some(&token), &[]).await;

    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "jwk-kid-mismatch");
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_forged_kids_cost_at_most_one_jwks_fetch() {
    let env = Env::start_own("").await;
    let before = env.clerk.jwks_fetches();

    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..50 {
        // Claims our issuer, so each one is a candidate for an unknown-kid refetch.
        let token = env.clerk.sign(
            json!({"alg": "RS256", "kid": format!("ins_{}", random_hex(12)), "typ": "JWT"}),
            env.clerk.claims("user_1"),
        );
        let request = env
            .http
            .get(env.gate.url("/orders"))
            .bearer_auth(token)
            .send();
        requests.spawn(async move {
            let resp = request.await.expect("clerkgate answers");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("JSON rejection");
            (
                status,
                body["reason"].as_str().unwrap_or_default().to_owned(),
            )
        });
    }
    while let Some(result) = requests.join_next().await {
        let (status, reason) = result.expect("request task");
        assert_eq!((status, reason.as_str()), (401, "jwk-kid-mismatch"));
    }

    let extra = env.clerk.jwks_fetches() - before;
    assert!(extra <= 1, "50 forged kids caused {extra} JWKS fetches");
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn unknown_kid_of_another_issuer_never_triggers_a_jwks_fetch() {
    // No refetch floor, so an unknown kid that claims *our* issuer does cost a fetch: the
    // control below proves the issuer is what saves the fetch, not the rate limit.
    let env = Env::start_own("[clerk]\njwks_min_refresh_interval_seconds = 0\n").await;
    let mut foreign = env.clerk.claims("user_1");
    foreign["iss"] = json!("https://other-instance.clerk.accounts.dev");
    let before = env.clerk.jwks_fetches();

    for _ in 0..3 {
        let token = env.clerk.sign(
            json!({"alg": "RS256", "kid": format!("ins_{}", random_hex(12)), "typ": "JWT"}),
            foreign.clone(),
        );
        let reply = env.get("/orders", Some(&token), &[]).await;
        assert_eq!(reply.status, 401, "{}", reply.text());
        assert_eq!(reply.reason(), "jwk-kid-mismatch");
    }
    assert_eq!(
        env.clerk.jwks_fetches(),
        before,
        "foreign issuers cost no fetch"
    );

    let ours = env.clerk.sign(
        json!({"alg": "RS256", "kid": format!("ins_{}", random_hex(12)), "typ": "JWT"}),
        env.clerk.claims("user_1"),
    );
    let reply = env.get("/orders", Some(&ours), &[]).await;
    assert_eq!(reply.reason(), "jwk-kid-mismatch");
    assert_eq!(
        env.clerk.jwks_fetches(),
        before + 1,
        "control: our issuer with an unknown kid refetches"
    );
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn jku_x5u_and_embedded_jwk_headers_are_never_used_to_find_a_key() {
    let env = Env::start("").await;
    // The attacker runs their own "Clerk" serving their own key, whose kid is ours too. No
    // clerkgate is configured to fetch from it, so any fetch it sees came from a token header.
    let attacker = other_instance();
    let attacker_key = attacker.key("ins_fake_1");
    let attacker_jwks = format!("{}/.well-known/jwks.json", attacker.url);
    let claims = env.clerk.claims("user_evil");

    let cases = [
        ("our kid", "ins_fake_1", "token-invalid-signature"),
        ("the attacker's kid", "ins_attacker", "jwk-kid-mismatch"),
    ];
    for (name, kid, reason) in cases {
        let token = attacker.sign(
            json!({
                "alg": "RS256",
                "kid": kid,
                "typ": "JWT",
                "jku": attacker_jwks,
                "x5u": attacker_jwks,
                "jwk": attacker_key.jwk(),
            }),
            claims.clone(),
        );
        let reply = env.get("/orders", Some(&token), &[]).await;
        assert_eq!(reply.status, 401, "{name}: {}", reply.text());
        assert_eq!(reply.reason(), reason, "{name}");
    }
    assert_eq!(
        attacker.jwks_fetches(),
        0,
        "token-supplied key URLs were fetched"
    );
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

// 4. Cross-instance tokens (section 7.2).

#[tokio::test]
async fn token_signed_by_another_instance_with_our_kid_is_rejected_with_invalid_signature() {
    let env = Env::start("").await;
    let other = other_instance();
    // Same kid ("ins_fake_1"), same issuer string, different key.
    let token = other.session_token("user_other_instance");

    let reply = env.get("/orders", Some(&token), &[]).await;

    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "token-invalid-signature");
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn token_signed_by_our_key_for_another_issuer_is_rejected_with_invalid_issuer() {
    let env = Env::start("").await;
    let mut claims = env.clerk.claims("user_1");
    claims["iss"] = json!("https://other-instance.clerk.accounts.dev");
    let token = env.clerk.mint(claims);

    let reply = env.get("/orders", Some(&token), &[]).await;

    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "token-invalid-issuer");
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

// 5. Authorized parties (sections 2.1 step 7 and 7.1).

#[tokio::test]
async fn authorized_party_must_match_a_configured_origin_exactly() {
    let env = Env::start("[clerk]\nauthorized_parties = [\"https://app.example\"]\n").await;
    let with_azp = |azp: Option<&str>| {
        let mut claims = env.clerk.claims("user_1");
        if let Some(azp) = azp {
            claims["azp"] = json!(azp);
        }
        env.clerk.mint(claims)
    };

    let reply = env
        .get("/orders", Some(&with_azp(Some("https://app.example"))), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.last().headers["x-user-id"], "user_1");

    for azp in [
        Some("https://app.example/"),
        Some("https://APP.example"),
        Some("https://evil.example"),
        Some("http://app.example"),
        Some(""),
        None,
    ] {
        let reply = env.get("/orders", Some(&with_azp(azp)), &[]).await;
        assert_eq!(reply.status, 401, "azp {azp:?}: {}", reply.text());
        assert_eq!(
            reply.reason(),
            "token-invalid-authorized-parties",
            "azp {azp:?}"
        );
    }
    assert_eq!(
        env.upstream.count(),
        1,
        "only the exact match was forwarded"
    );
    env.stop().await;
}

#[tokio::test]
async fn allow_missing_azp_admits_tokens_without_azp_but_never_a_wrong_one() {
    let env = Env::start(
        "[clerk]\nauthorized_parties = [\"https://app.example\"]\n[auth]\nallow_missing_azp = true\n",
    )
    .await;

    let reply = env
        .get("/orders", Some(&env.clerk.session_token("user_1")), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.count(), 1);

    let mut claims = env.clerk.claims("user_1");
    claims["azp"] = json!("https://evil.example");
    let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "token-invalid-authorized-parties");
    assert_eq!(env.upstream.count(), 1);
    env.stop().await;
}

// 6. Claims: time, session status, token type, absence (sections 2.1 and 2.6).

#[tokio::test]
async fn time_claims_are_enforced_with_the_default_five_second_skew() {
    let env = Env::start("").await;
    let t = now();
    let cases: [(&str, &str, Value, &str); 4] = [
        ("expired 10 s ago", "exp", json!(t - 10), "token-expired"),
        (
            "nbf in a minute",
            "nbf",
            json!(t + 60),
            "token-not-active-yet",
        ),
        (
            "iat in a minute",
            "iat",
            json!(t + 60),
            "token-iat-in-the-future",
        ),
        (
            "exp as a string",
            "exp",
            json!((t + 60).to_string()),
            "token-verification-failed",
        ),
    ];
    for (name, claim, value, reason) in cases {
        let mut claims = env.clerk.claims("user_1");
        claims[claim] = value;
        let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;
        assert_eq!(reply.status, 401, "{name}: {}", reply.text());
        assert_eq!(reply.reason(), reason, "{name}");
    }
    assert_eq!(env.upstream.count(), 0);

    // Within the skew: expired one second ago still passes, so the rejections above are the
    // expiry rule and not something else about the minted tokens.
    let mut claims = env.clerk.claims("user_1");
    claims["exp"] = json!(t - 1);
    let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    env.stop().await;
}

#[tokio::test]
async fn pending_session_is_signed_out_by_default() {
    let env = Env::start("").await;
    let mut claims = env.clerk.claims("user_1");
    claims["sts"] = json!("pending");

    let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;

    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "session-pending");
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn pending_session_is_accepted_when_pending_as_signed_out_is_false() {
    let env = Env::start("[auth]\npending_as_signed_out = false\n").await;
    let mut claims = env.clerk.claims("user_1");
    claims["sts"] = json!("pending");

    let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.last().headers["x-user-id"], "user_1");
    env.stop().await;
}

#[tokio::test]
async fn machine_oauth_and_non_session_tokens_are_rejected_with_token_type_mismatch() {
    let env = Env::start("").await;
    let claims = env.clerk.claims("user_1");
    let machine = env.clerk.mint(env.clerk.claims("mch_2abc"));
    let oauth = env.clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "at+jwt"}),
        claims.clone(),
    );
    let m2m = env.clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "JWT", "cat": "cl_B7d4PD333AAA"}),
        claims.clone(),
    );

    for (name, token) in [
        ("sub mch_", machine),
        ("typ at+jwt", oauth),
        ("cat M2M", m2m),
    ] {
        let reply = env.get("/orders", Some(&token), &[]).await;
        assert_eq!(reply.status, 401, "{name}: {}", reply.text());
        assert_eq!(reply.reason(), "token-type-mismatch", "{name}");
    }
    assert_eq!(env.upstream.count(), 0);

    // The session category itself is accepted.
    let session = env.clerk.sign(
        json!({"alg": "RS256", "kid": "ins_fake_1", "typ": "JWT", "cat": "cl_B7d4PD111AAA"}),
        claims,
    );
    let reply = env.get("/orders", Some(&session), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    env.stop().await;
}

#[tokio::test]
async fn missing_token_is_401_with_a_bearer_challenge_without_an_error_code() {
    let env = Env::start("").await;

    let reply = env.get("/orders", None, &[]).await;

    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "session-token-missing");
    // RFC 6750 section 3.1: no error code when the request carried no credentials.
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"clerkgate\"")
    );
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

// 7. Path normalisation against route rules (section 7.12).

#[tokio::test]
async fn path_tricks_cannot_steer_a_member_around_the_admin_rule() {
    let env = Env::start(ROUTES).await;
    let member = env
        .clerk
        .mint(org_claims(&env.clerk, "user_member", "member"));
    let bearer = format!("Bearer {member}");

    for target in [
        "/admin/x",
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "/public/%2E%2E/admin/x",
        "/public/..;/admin/x",
        "/public/./../admin/x",
        "//admin/x",
        "/admin;x/secret",
        "/admin%3bx/secret",
        "/%61dmin/x",
    ] {
        let reply = env.raw_get(target, &[("Authorization", &bearer)]).await;
        assert_eq!(reply.status, 403, "{target}: {}", reply.text());
        assert_eq!(reply.reason(), "org-role-mismatch", "{target}");

        let reply = env.raw_get(target, &[]).await;
        assert_eq!(
            reply.status,
            401,
            "{target} without a token: {}",
            reply.text()
        );
        assert_eq!(reply.reason(), "session-token-missing", "{target}");
    }
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn encoded_slash_in_a_path_is_rejected_with_400() {
    let env = Env::start(ROUTES).await;

    for target in [
        "/public%2F..%2Fadmin",
        "/public%2f..%2fadmin/x",
        "/public/..%5Cadmin",
    ] {
        let reply = env.raw_get(target, &[]).await;
        assert_eq!(reply.status, 400, "{target}: {}", reply.text());
        assert_eq!(reply.reason(), "path-encoded-slash", "{target}");
    }
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn upstream_receives_the_same_normalised_path_the_rules_were_matched_against() {
    let env = Env::start(ROUTES).await;
    let user = format!("Bearer {}", env.clerk.session_token("user_1"));
    let admin = format!(
        "Bearer {}",
        env.clerk
            .mint(org_claims(&env.clerk, "user_admin", "admin"))
    );

    let cases = [
        ("/a/./b/../c", &user, "/a/c"),
        ("/a//b/%7euser", &user, "/a/b/~user"),
        ("/public/../admin/x", &admin, "/admin/x"),
        ("/public/%2e%2e/admin/x", &admin, "/admin/x"),
        ("//admin/x", &admin, "/admin/x"),
    ];
    for (target, bearer, expected) in cases {
        let reply = env.raw_get(target, &[("Authorization", bearer)]).await;
        assert_eq!(reply.status, 200, "{target}: {}", reply.text());
        assert_eq!(env.upstream.last().uri.path(), expected, "{target}");
    }
    env.stop().await;
}

// 8. Cookie tokens (section 2.6).

#[tokio::test]
async fn session_cookie_with_a_fresh_client_uat_is_accepted_and_never_forwarded() {
    let env = Env::start("").await;
    let claims = env.clerk.claims("user_cookie");
    let iat = claims["iat"].as_u64().unwrap();
    let token = env.clerk.mint(claims);

    for uat in [iat, iat - 30] {
        let cookie = format!("theme=dark; __session={token}; __client_uat={uat}; pref=a=b%3Dc");
        let reply = env.with_cookie("/orders", &cookie).await;
        assert_eq!(reply.status, 200, "uat {uat}: {}", reply.text());
        let seen = env.upstream.last();
        assert_eq!(seen.headers["x-user-id"], "user_cookie");
        assert_eq!(
            seen.headers.get_all("cookie").iter().collect::<Vec<_>>(),
            ["theme=dark; pref=a=b%3Dc"],
            "the token cookies go, the others stay byte for byte"
        );
        assert!(seen.headers.get("authorization").is_none());
    }
    env.stop().await;
}

#[tokio::test]
async fn session_cookie_without_a_fresh_client_uat_is_rejected() {
    let env = Env::start("").await;
    let claims = env.clerk.claims("user_cookie");
    let iat = claims["iat"].as_u64().unwrap();
    let token = env.clerk.mint(claims);

    let cases = [
        (
            format!("__session={token}"),
            "session-token-but-no-client-uat",
        ),
        (
            format!("__session={token}; __client_uat=0"),
            "session-token-but-no-client-uat",
        ),
        (
            format!("__session={token}; __client_uat={}", iat + 1),
            "session-token-iat-before-client-uat",
        ),
    ];
    for (cookie, reason) in &cases {
        let reply = env.with_cookie("/orders", cookie).await;
        assert_eq!(reply.status, 401, "{reason}: {}", reply.text());
        assert_eq!(reply.reason(), *reason);
    }
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn suffixed_session_cookie_of_this_instance_is_accepted_and_removed() {
    let env = Env::start("").await;
    let suffix = clerkgate::clerk::publishable_key::cookie_suffix(&env.clerk.publishable_key());
    let claims = env.clerk.claims("user_suffixed");
    let iat = claims["iat"].as_u64().unwrap();
    let token = env.clerk.mint(claims);

    let cookie = format!("__session_{suffix}={token}; __client_uat_{suffix}={iat}; theme=dark");
    let reply = env.with_cookie("/orders", &cookie).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(seen.headers["x-user-id"], "user_suffixed");
    assert_eq!(seen.headers["cookie"], "theme=dark");
    env.stop().await;
}

#[tokio::test]
async fn authorization_header_wins_over_the_session_cookie() {
    let env = Env::start("").await;
    let header_token = env.clerk.session_token("user_header");
    let cookie_claims = env.clerk.claims("user_cookie");
    let iat = cookie_claims["iat"].as_u64().unwrap();
    let cookie = format!(
        "__session={}; __client_uat={iat}",
        env.clerk.mint(cookie_claims)
    );

    let reply = env
        .get("/orders", Some(&header_token), &[("cookie", &cookie)])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(env.upstream.last().headers["x-user-id"], "user_header");

    // A bad header token is not rescued by a good cookie.
    let reply = env
        .get("/orders", Some("not.a.token"), &[("cookie", &cookie)])
        .await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "token-invalid");
    assert_eq!(env.upstream.count(), 1);
    env.stop().await;
}

#[tokio::test]
async fn forward_token_sends_the_authorization_header_upstream() {
    let env = Env::start("[auth]\nforward_token = true\n").await;
    let token = env.clerk.session_token("user_1");

    let reply = env.get("/orders", Some(&token), &[]).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {token}").as_str()
    );
    assert_eq!(seen.headers["x-user-id"], "user_1");
    env.stop().await;
}

#[tokio::test]
async fn session_cookie_is_ignored_when_accept_cookie_is_false() {
    let env = Env::start("[auth]\naccept_cookie = false\n").await;
    let claims = env.clerk.claims("user_cookie");
    let iat = claims["iat"].as_u64().unwrap();
    let cookie = format!("__session={}; __client_uat={iat}", env.clerk.mint(claims));

    let reply = env.with_cookie("/orders", &cookie).await;

    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "session-token-missing");
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

// 9. Organization claims, route policy and the other identity headers (sections 1.2, 1.3).

#[tokio::test]
async fn v1_and_v2_org_claims_reach_upstream_as_the_same_decoded_headers() {
    let env = Env::start("").await;
    let mut v2 = env.clerk.claims("user_1");
    v2["fea"] = json!("o:dashboard,o:teams");
    v2["o"] =
        json!({"id": "org_1", "rol": "admin", "slg": "acme", "per": "manage,read", "fpm": "3,2"});
    let mut v1 = env.clerk.claims("user_1");
    v1.as_object_mut().unwrap().remove("v");
    v1["org_id"] = json!("org_1");
    v1["org_role"] = json!("org:admin");
    v1["org_slug"] = json!("acme");
    v1["org_permissions"] = json!([
        "org:dashboard:manage",
        "org:dashboard:read",
        "org:teams:read"
    ]);

    for (name, claims) in [("v2", v2), ("v1", v1)] {
        let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        let seen = env.upstream.last();
        assert_eq!(seen.headers["x-org-id"], "org_1", "{name}");
        assert_eq!(seen.headers["x-org-role"], "org:admin", "{name}");
        assert_eq!(seen.headers["x-org-slug"], "acme", "{name}");
        assert_eq!(
            seen.headers["x-org-permissions"],
            "org:dashboard:manage,org:dashboard:read,org:teams:read",
            "{name}"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn route_requirements_are_enforced_with_403() {
    let env = Env::start(ROUTES).await;
    let with_perms = |fpm: &str, tier: &str| {
        let mut claims = org_claims(&env.clerk, "user_1", "member");
        claims["fea"] = json!("o:billing");
        claims["o"]["per"] = json!("manage,read");
        claims["o"]["fpm"] = json!(fpm);
        claims["public_metadata"] = json!({"tier": tier});
        env.clerk.mint(claims)
    };
    let reader_silver = with_perms("2", "silver");
    let manager_gold = with_perms("3", "gold");

    let cases = [
        (
            "/billing/invoices",
            &reader_silver,
            403,
            "org-permission-missing",
        ),
        ("/gold/lounge", &reader_silver, 403, "claim-mismatch"),
        ("/billing/invoices", &manager_gold, 200, ""),
        ("/gold/lounge", &manager_gold, 200, ""),
    ];
    for (path, token, status, reason) in cases {
        let reply = env.get(path, Some(token), &[]).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        assert_eq!(reply.reason(), reason, "{path}");
    }
    assert_eq!(
        env.upstream.count(),
        2,
        "only the allowed requests were forwarded"
    );
    env.stop().await;
}

#[tokio::test]
async fn impersonation_actor_and_the_verified_payload_reach_upstream() {
    let env = Env::start("").await;
    let mut claims = env.clerk.claims("user_1");
    claims["act"] =
        json!({"sub": "user_support", "sid": "sess_imp", "iss": "https://dashboard.clerk.com"});
    let token = env.clerk.mint(claims);

    let reply = env.get("/orders", Some(&token), &[]).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(seen.headers["x-user-id"], "user_1");
    assert_eq!(seen.headers["x-actor-id"], "user_support");
    assert_eq!(seen.headers["x-clerk-claims"], payload_segment(&token));
    env.stop().await;
}

#[tokio::test]
async fn forward_claims_false_removes_the_claims_header() {
    let env = Env::start("[headers]\nforward_claims = false\n").await;

    let reply = env
        .get(
            "/orders",
            Some(&env.clerk.session_token("user_1")),
            &[("X-Clerk-Claims", "e30")],
        )
        .await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(seen.headers["x-user-id"], "user_1");
    assert!(
        seen.headers.get("x-clerk-claims").is_none(),
        "{:?}",
        seen.headers
    );
    env.stop().await;
}

#[tokio::test]
async fn claim_with_cr_lf_is_dropped_and_cannot_inject_a_header() {
    let env = Env::start("[headers.claims]\n\"public_metadata.note\" = \"X-Note\"\n").await;
    let mut claims = env.clerk.claims("user_1");
    claims["public_metadata"] = json!({"note": "ok\r\nX-Injected: 1\r\nX-User-Id: user_evil"});

    let reply = env.get("/orders", Some(&env.clerk.mint(claims)), &[]).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert!(seen.headers.get("x-note").is_none(), "{:?}", seen.headers);
    assert!(
        seen.headers.get("x-injected").is_none(),
        "{:?}",
        seen.headers
    );
    assert_eq!(
        seen.headers.get_all("x-user-id").iter().collect::<Vec<_>>(),
        ["user_1"]
    );
    env.stop().await;
}

// 10. The forward-auth endpoint (nginx auth_request, Traefik ForwardAuth, Envoy ext_authz).

#[tokio::test]
async fn forward_auth_answers_with_identity_headers_and_never_contacts_the_upstream() {
    let env = Env::start(ROUTES).await;
    let token = env.clerk.session_token("user_1");

    let reply = env.get("/_clerkgate/auth", Some(&token), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-user-id"), Some("user_1"));
    assert!(
        reply
            .header("x-session-id")
            .is_some_and(|s| s.starts_with("sess_"))
    );

    let reply = env.get("/_clerkgate/auth", None, &[]).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "session-token-missing");

    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn forward_auth_applies_the_route_rules_of_the_original_uri() {
    let env = Env::start(ROUTES).await;
    let member = env
        .clerk
        .mint(org_claims(&env.clerk, "user_member", "member"));
    let admin = env
        .clerk
        .mint(org_claims(&env.clerk, "user_admin", "admin"));

    // Traefik: X-Forwarded-Uri of a public page, no token.
    let reply = env
        .get(
            "/_clerkgate/auth",
            None,
            &[("X-Forwarded-Uri", "/public/x?y=1")],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.header("x-user-id").is_none());

    // nginx: X-Original-URI of an admin page.
    let original = [("X-Original-URI", "/admin/x")];
    let reply = env.get("/_clerkgate/auth", Some(&member), &original).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.reason(), "org-role-mismatch");
    let reply = env.get("/_clerkgate/auth", Some(&admin), &original).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-org-role"), Some("org:admin"));
    let dotted = [("X-Original-URI", "/public/../admin/x")];
    let reply = env.get("/_clerkgate/auth", Some(&member), &dotted).await;
    assert_eq!(reply.status, 403, "{}", reply.text());

    // Envoy: the original path below the endpoint.
    let reply = env.get("/_clerkgate/auth/public/x", None, &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.header("x-user-id").is_none());
    let reply = env.get("/_clerkgate/auth/admin/x", None, &[]).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.reason(), "session-token-missing");

    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn forward_auth_cannot_be_steered_by_a_passed_through_x_forwarded_uri() {
    let env = Env::start(ROUTES).await;

    // nginx `auth_request` sets X-Original-URI itself but passes every client header on to the
    // subrequest, so an X-Forwarded-Uri here may have been written by the client. Likewise an
    // Envoy that forwards client headers. Whatever the precedence, a disagreement between the
    // ingress's URI and a second one must not turn a protected page into a public one.
    let cases: [(&str, &[(&str, &str)]); 2] = [
        (
            "/_clerkgate/auth",
            &[
                ("X-Original-URI", "/admin/x"),
                ("X-Forwarded-Uri", "/public/x"),
            ],
        ),
        (
            "/_clerkgate/auth/admin/x",
            &[("X-Forwarded-Uri", "/public/x")],
        ),
    ];
    for (path, headers) in cases {
        let reply = env.get(path, None, headers).await;
        assert_eq!(
            reply.status,
            400,
            "{path} {headers:?}: unauthenticated request for /admin/x got {} {}",
            reply.status,
            reply.text()
        );
        assert!(
            reply.text().contains("forward-auth-uri-ambiguous"),
            "{}",
            reply.text()
        );
    }
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

// 11. Optional routes.

#[tokio::test]
async fn optional_route_adds_identity_only_for_a_valid_token() {
    let env = Env::start(ROUTES).await;
    let spoof = [("X-User-Id", "user_evil")];

    let reply = env.get("/feed/latest", None, &spoof).await;
    assert_eq!(reply.status, 200, "no token: {}", reply.text());
    assert_anonymous(&env.upstream.last().headers);

    let mut expired = env.clerk.claims("user_1");
    expired["exp"] = json!(now() - 120);
    for (name, bad) in [
        ("forged", env.clerk.session_token("user_1") + "x"),
        ("expired", env.clerk.mint(expired)),
        ("garbage", "garbage".to_owned()),
    ] {
        let reply = env.get("/feed/latest", Some(&bad), &spoof).await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        let seen = env.upstream.last();
        assert_anonymous(&seen.headers);
        assert!(seen.headers.get("authorization").is_none(), "{name}");
    }

    let reply = env
        .get(
            "/feed/latest",
            Some(&env.clerk.session_token("user_1")),
            &spoof,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.upstream.last();
    assert_eq!(
        seen.headers.get_all("x-user-id").iter().collect::<Vec<_>>(),
        ["user_1"]
    );
    assert_eq!(env.upstream.count(), 5);
    env.stop().await;
}
