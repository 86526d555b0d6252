//! Tokens: malformed shapes, wrong JSON types, huge numbers, duplicate members, oversized and
//! non-ASCII tokens, algorithm spellings, hostile `kid`s, key-carrying headers, and claim
//! values at the edges of the time rules. Sources: clerk-protocol.md sections 2.1 and 7.

use serde_json::{Value, json};

use super::kit::PinnedKey;
use crate::support::env::{Env, assert_refused, b64, other_instance, payload_segment, values};
use crate::support::now;
use crate::support::raw::Reply;

/// Sends `token` as a bearer token and checks the refusal and that nothing reached upstream.
async fn expect_refused(env: &Env, case: &str, token: &str, status: u16, reason: &str) {
    let before = env.upstream.count();
    let reply = env.get("/orders", Some(token), &[]).await;
    assert_refused(&reply, status, reason, case);
    assert_eq!(env.upstream.count(), before, "{case}: reached the upstream");
}

/// Sends `token` and checks it was forwarded with `sub` as the only `X-User-Id`.
async fn expect_forwarded(env: &Env, case: &str, token: &str, sub: &str) -> Reply {
    let before = env.upstream.count();
    let reply = env.get("/orders", Some(token), &[]).await;
    assert_eq!(reply.status, 200, "{case}: {}", reply.text());
    assert_eq!(env.upstream.count(), before + 1, "{case}");
    let seen = env.upstream.last();
    assert_eq!(values(&seen.headers, "x-user-id"), [sub], "{case}");
    assert!(seen.headers.get("authorization").is_none(), "{case}");
    reply
}

#[tokio::test]
async fn malformed_token_shapes_are_refused_before_any_key_lookup() {
    let env = Env::start("").await;
    let good = env.clerk.session_token("user_1");
    let mut parts = good.split('.');
    let (h, p, s) = (
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
    );
    let header = |raw: &str| format!("{}.{p}.{s}", b64(raw));
    let payload = |raw: &str| format!("{h}.{}.{s}", b64(raw));
    let in_sig = |c: char| {
        let mut sig: Vec<char> = s.chars().collect();
        let i = sig.len() - 10;
        sig[i] = c;
        format!("{h}.{p}.{}", sig.into_iter().collect::<String>())
    };
    let invalid = "token-invalid";
    let algorithm = "token-invalid-algorithm";
    let cases: Vec<(&str, String, &str)> = vec![
        ("one segment", p.clone(), invalid),
        ("two segments", format!("{h}.{p}"), invalid),
        ("four segments", format!("{h}.{p}.{s}.{s}"), invalid),
        (
            "five segments (JWE shape)",
            format!("{h}.{p}.{s}.{s}.{s}"),
            invalid,
        ),
        ("trailing dot", format!("{h}.{p}.{s}."), invalid),
        ("leading dot", format!(".{h}.{p}.{s}"), invalid),
        ("only dots", "..".into(), invalid),
        ("empty header segment", format!(".{p}.{s}"), invalid),
        ("empty payload segment", format!("{h}..{s}"), invalid),
        ("standard-alphabet + in a segment", in_sig('+'), invalid),
        ("standard-alphabet / in a segment", in_sig('/'), invalid),
        ("padding inside a segment", in_sig('='), invalid),
        ("percent-encoded dots", format!("{h}%2E{p}%2E{s}"), invalid),
        ("header not JSON", header("not json"), invalid),
        (
            "header JSON with trailing bytes",
            header(r#"{"alg":"RS256"}x"#),
            invalid,
        ),
        (
            "header with a UTF-8 BOM",
            header("\u{feff}{\"alg\":\"RS256\"}"),
            invalid,
        ),
        ("header a JSON array", header(r#"["RS256"]"#), invalid),
        ("header a JSON string", header(r#""RS256""#), invalid),
        ("header JSON null", header("null"), invalid),
        ("payload a JSON number", payload("42"), invalid),
        ("payload JSON null", payload("null"), invalid),
        (
            "payload a JSON array",
            payload(r#"[{"sub":"user_1"}]"#),
            invalid,
        ),
        (
            "payload truncated JSON",
            payload(r#"{"sub":"user_1""#),
            invalid,
        ),
        (
            "payload not UTF-8",
            format!("{h}.{}.{s}", b64(b"{\"sub\":\"\xff\"}")),
            invalid,
        ),
        (
            "kid a number",
            header(r#"{"alg":"RS256","kid":1,"typ":"JWT"}"#),
            invalid,
        ),
        (
            "kid an object",
            header(r#"{"alg":"RS256","kid":{"a":1}}"#),
            invalid,
        ),
        ("kid null", header(r#"{"alg":"RS256","kid":null}"#), invalid),
        (
            "typ a number",
            header(r#"{"alg":"RS256","typ":1}"#),
            invalid,
        ),
        (
            "typ lower-case jwt",
            header(r#"{"alg":"RS256","typ":"jwt"}"#),
            invalid,
        ),
        (
            "crit present",
            header(r#"{"alg":"RS256","crit":[]}"#),
            invalid,
        ),
        (
            "alg lower-case rs256",
            header(r#"{"alg":"rs256"}"#),
            algorithm,
        ),
        (
            "alg with a trailing space",
            header(r#"{"alg":"RS256 "}"#),
            algorithm,
        ),
        ("alg None", header(r#"{"alg":"None"}"#), algorithm),
        ("alg NONE", header(r#"{"alg":"NONE"}"#), algorithm),
        ("alg HS512", header(r#"{"alg":"HS512"}"#), algorithm),
        ("alg EdDSA", header(r#"{"alg":"EdDSA"}"#), algorithm),
        ("alg a number", header(r#"{"alg":256}"#), algorithm),
        ("alg null", header(r#"{"alg":null}"#), algorithm),
        ("alg an array", header(r#"{"alg":["RS256"]}"#), algorithm),
        ("alg absent", header(r#"{"kid":"ins_fake_1"}"#), algorithm),
        (
            "empty signature",
            format!("{h}.{p}."),
            "token-invalid-signature",
        ),
    ];
    for (case, token, reason) in &cases {
        expect_refused(&env, case, token, 401, reason).await;
    }
    assert_eq!(env.upstream.count(), 0);
    // Control: the unmodified token passes, so each row above failed on its own defect.
    expect_forwarded(&env, "control", &good, "user_1").await;
    env.stop().await;
}

#[tokio::test]
async fn claims_of_the_wrong_json_type_are_refused_after_the_signature() {
    let env = Env::start("").await;
    let t = now();
    let ours = env.clerk.issuer().to_owned();
    let failed = "token-verification-failed";
    let issuer = "token-invalid-issuer";
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("sub a number", "sub", json!(12345), failed),
        ("sub empty", "sub", json!(""), failed),
        ("sub null", "sub", Value::Null, failed),
        ("sub an object", "sub", json!({"id": "user_1"}), failed),
        ("sub an array", "sub", json!(["user_1"]), failed),
        ("iss a number", "iss", json!(1), issuer),
        ("iss an array holding ours", "iss", json!([ours]), issuer),
        (
            "iss with a trailing slash",
            "iss",
            json!(format!("{ours}/")),
            issuer,
        ),
        (
            "iss over http",
            "iss",
            json!(ours.replace("https", "http")),
            issuer,
        ),
        (
            "iss upper-case host",
            "iss",
            json!(ours.to_uppercase()),
            issuer,
        ),
        ("iss with a path", "iss", json!(format!("{ours}/x")), issuer),
        ("exp null", "exp", Value::Null, failed),
        ("exp true", "exp", json!(true), failed),
        ("exp an array", "exp", json!([t + 60]), failed),
        ("exp an object", "exp", json!({"v": t + 60}), failed),
        ("nbf a string", "nbf", json!((t - 10).to_string()), failed),
        ("nbf null", "nbf", Value::Null, failed),
        ("iat a string", "iat", json!(t.to_string()), failed),
        ("iat an array", "iat", json!([t]), failed),
    ];
    for (case, claim, value, reason) in cases {
        let mut claims = env.clerk.claims("user_1");
        claims[claim] = value;
        expect_refused(&env, case, &env.clerk.mint(claims), 401, reason).await;
    }
    let mut claims = env.clerk.claims("user_1");
    claims.as_object_mut().unwrap().remove("exp");
    expect_refused(&env, "exp absent", &env.clerk.mint(claims), 401, failed).await;
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn time_claims_at_the_edges_of_the_skew_and_of_the_number_range() {
    let env = Env::start("").await;
    let t = now() as f64;
    // Margins of at least two seconds keep these independent of when in the second they run.
    let refused: Vec<(&str, &str, Value, &str)> = vec![
        (
            "expired 1 s beyond the 5 s skew",
            "exp",
            json!(t - 6.0),
            "token-expired",
        ),
        (
            "exp a float in the past",
            "exp",
            json!(t - 10.5),
            "token-expired",
        ),
        ("exp zero", "exp", json!(0), "token-expired"),
        ("exp negative", "exp", json!(-1), "token-expired"),
        ("exp hugely negative", "exp", json!(-1e300), "token-expired"),
        (
            "nbf beyond the skew",
            "nbf",
            json!(t + 8.0),
            "token-not-active-yet",
        ),
        ("nbf huge", "nbf", json!(1e300), "token-not-active-yet"),
        (
            "nbf beyond u64",
            "nbf",
            json!(1.9e19),
            "token-not-active-yet",
        ),
        (
            "iat beyond the skew",
            "iat",
            json!(t + 8.0),
            "token-iat-in-the-future",
        ),
        ("iat huge", "iat", json!(1e300), "token-iat-in-the-future"),
    ];
    for (case, claim, value, reason) in refused {
        let mut claims = env.clerk.claims("user_1");
        claims[claim] = value;
        expect_refused(&env, case, &env.clerk.mint(claims), 401, reason).await;
    }
    assert_eq!(env.upstream.count(), 0);

    // RFC 7519 NumericDate may be non-integer, and nothing caps it: Clerk's SDK accepts these
    // too. Each is sent twice, the second time from the token cache, whose expiry arithmetic
    // must not overflow.
    let accepted: Vec<(&str, &str, Value)> = vec![
        ("exp a float in the future", "exp", json!(t + 60.5)),
        ("exp huge", "exp", json!(1e300)),
        ("exp beyond u64", "exp", json!(1.9e19)),
        ("nbf hugely negative", "nbf", json!(-1e300)),
        ("iat a float", "iat", json!(t - 0.25)),
    ];
    for (case, claim, value) in accepted {
        let mut claims = env.clerk.claims("user_1");
        claims[claim] = value;
        let token = env.clerk.mint(claims);
        expect_forwarded(&env, case, &token, "user_1").await;
        expect_forwarded(&env, &format!("{case}, cached"), &token, "user_1").await;
    }
    env.stop().await;
}

/// A payload of our issuer with `sub`, valid now, as raw JSON text without the braces.
fn raw_claims(sub: &str) -> String {
    let t = now();
    format!(
        r#""iss":"https://fake-instance.clerk.accounts.dev","sub":"{sub}","sid":"sess_raw","iat":{t},"nbf":{},"exp":{}"#,
        t - 10,
        t + 60
    )
}

#[tokio::test]
async fn number_spellings_json_cannot_hold_are_token_invalid() {
    let key = PinnedKey::get();
    let env = Env::start(&key.toml()).await;
    let header = r#"{"alg":"RS256","kid":"ins_fake_1","typ":"JWT"}"#;
    let base = raw_claims("user_raw");
    let digits = "9".repeat(5000);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "exp 1e400",
            format!("{{{base},\"exp\":1e400}}"),
            "token-invalid",
        ),
        (
            "nbf -1e400",
            format!("{{{base},\"nbf\":-1e400}}"),
            "token-invalid",
        ),
        (
            "exp with 5000 digits",
            format!("{{{base},\"exp\":{digits}}}"),
            "token-invalid",
        ),
        (
            "exp NaN",
            format!("{{{base},\"exp\":NaN}}"),
            "token-invalid",
        ),
        (
            "exp Infinity",
            format!("{{{base},\"exp\":Infinity}}"),
            "token-invalid",
        ),
        (
            "exp hex",
            format!("{{{base},\"exp\":0x7fffffff}}"),
            "token-invalid",
        ),
        (
            "exp with a leading +",
            format!("{{{base},\"exp\":+4102444800}}"),
            "token-invalid",
        ),
        (
            "exp 1e-400 (zero)",
            format!("{{{base},\"exp\":1e-400}}"),
            "token-expired",
        ),
    ];
    for (case, payload, reason) in &cases {
        expect_refused(&env, case, &key.sign(header, payload), 401, reason).await;
    }
    assert_eq!(env.upstream.count(), 0);
    // Control: the same payload without the extra member passes.
    let token = key.sign(header, &format!("{{{base}}}"));
    expect_forwarded(&env, "control", &token, "user_raw").await;
    env.stop().await;
}

#[tokio::test]
async fn duplicate_members_are_read_as_the_last_one_everywhere() {
    // RFC 7519 section 4: a parser must reject duplicate claim names or take the lexically last
    // one. Whichever it is, the verifier and the headers it sets must read the same member,
    // or a token could be verified as one user and forwarded as another.
    let key = PinnedKey::get();
    let env = Env::start(&key.toml()).await;
    let header = r#"{"alg":"RS256","kid":"ins_fake_1","typ":"JWT"}"#;
    let t = now();
    let base = raw_claims("user_first");
    let ours = "https://fake-instance.clerk.accounts.dev";

    let refused: Vec<(&str, String, String, &str)> = vec![
        (
            "exp valid then expired",
            header.into(),
            format!("{{{base},\"exp\":{}}}", t - 600),
            "token-expired",
        ),
        (
            "iss ours then another",
            header.into(),
            format!("{{{base},\"iss\":\"https://evil.clerk.accounts.dev\"}}"),
            "token-invalid-issuer",
        ),
        (
            "sts active then pending",
            header.into(),
            format!("{{{base},\"sts\":\"active\",\"sts\":\"pending\"}}"),
            "session-pending",
        ),
        (
            "alg RS256 then none",
            r#"{"alg":"RS256","kid":"ins_fake_1","alg":"none"}"#.into(),
            format!("{{{base}}}"),
            "token-invalid-algorithm",
        ),
        (
            "sub a string then a number",
            header.into(),
            format!("{{{base},\"sub\":7}}"),
            "token-verification-failed",
        ),
    ];
    for (case, h, p, reason) in &refused {
        expect_refused(&env, case, &key.sign(h, p), 401, reason).await;
    }
    assert_eq!(env.upstream.count(), 0);

    let token = key.sign(header, &format!("{{{base},\"sub\":\"user_last\"}}"));
    let reply = expect_forwarded(&env, "sub twice", &token, "user_last").await;
    assert_eq!(reply.status, 200);
    let seen = env.upstream.last();
    assert_eq!(
        values(&seen.headers, "x-clerk-claims"),
        [payload_segment(&token)],
        "the claims header is the verified payload, byte for byte"
    );
    let token = key.sign(
        r#"{"alg":"none","kid":"ins_fake_1","alg":"RS256"}"#,
        &format!("{{\"iss\":\"https://evil.example\",{base},\"iss\":\"{ours}\"}}"),
    );
    expect_forwarded(
        &env,
        "alg and iss: bad first, good last",
        &token,
        "user_first",
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn oversized_tokens_are_refused_without_being_decoded() {
    let env = Env::start("[proxy]\nmax_header_bytes = 262144\n").await;
    // A genuinely signed token that is merely too big: the length cap (auth.max_token_bytes,
    // 64 KiB by default), not the signature, refuses it.
    let mut claims = env.clerk.claims("user_1");
    claims["pad"] = json!("a".repeat(70 * 1024));
    let signed_70k = env.clerk.mint(claims);
    let shapes_100k = format!(
        "{}.{}.{}",
        "a".repeat(40_000),
        "b".repeat(40_000),
        "c".repeat(20_000)
    );
    for (case, token) in [
        ("70 KB signed token", &signed_70k),
        ("100 KB token", &shapes_100k),
    ] {
        expect_refused(&env, case, token, 401, "token-too-large").await;
        // The same in a session cookie.
        let before = env.upstream.count();
        let cookie = format!("__session={token}; __client_uat=1");
        let reply = env.get("/orders", None, &[("cookie", &cookie)]).await;
        assert_refused(
            &reply,
            401,
            "token-too-large",
            &format!("{case} as a cookie"),
        );
        assert_eq!(env.upstream.count(), before);
    }
    env.stop().await;

    // Under the default 64 KiB head limit the same 100 KB token never gets that far.
    let env = Env::start("").await;
    let request = format!(
        "GET /orders HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {shapes_100k}\r\nConnection: close\r\n\r\n"
    );
    let replies = env.send(request.as_bytes()).await;
    assert_eq!(
        replies.iter().map(|r| r.status).collect::<Vec<_>>(),
        [431],
        "one 431"
    );
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn non_ascii_tokens_are_refused() {
    let env = Env::start("").await;
    let token = env.clerk.session_token("user_1");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "UTF-8 after the token",
            format!("Bearer {token}é").into_bytes(),
        ),
        ("Latin-1 byte inside", {
            let mut v = format!("Bearer {token}").into_bytes();
            let i = v.len() - 20;
            v[i] = 0xe9;
            v
        }),
        ("full-width dot", token.replacen('.', "．", 1).into_bytes()),
        (
            "non-breaking space scheme",
            format!("Bearer\u{a0}{token}").into_bytes(),
        ),
    ];
    for (case, value) in cases {
        let mut request = b"GET /orders HTTP/1.1\r\nHost: a\r\nAuthorization: ".to_vec();
        if !value.starts_with(b"Bearer") {
            request.extend_from_slice(b"Bearer ");
        }
        request.extend_from_slice(&value);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let replies = env.send(&request).await;
        assert_eq!(replies.len(), 1, "{case}");
        assert_refused(&replies[0], 401, "token-invalid", case);
    }
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn a_verified_sub_that_cannot_be_a_header_value_never_leaves_the_upstream_without_x_user_id()
{
    // Clerk user ids are plain ASCII, but the invariant an upstream relies on is that a request on a
    // `required` route carries the verified user id. A `sub` that cannot travel as a header
    // value whole is refused at verification (src/auth/verify.rs, `header_safe`), never
    // forwarded without X-User-Id next to an X-Clerk-Claims that says it was authenticated.
    let env = Env::start("").await;
    for (case, sub) in [
        ("CR LF in sub", "user_1\r\nX-Injected: 1"),
        ("DEL in sub", "user_1\u{7f}"),
    ] {
        let reply = env
            .get("/orders", Some(&env.clerk.session_token(sub)), &[])
            .await;
        assert_refused(&reply, 401, "token-verification-failed", case);
    }
    assert_eq!(env.upstream.count(), 0);
    env.stop().await;
}

#[tokio::test]
async fn hostile_kids_never_find_a_key_and_cost_at_most_one_fetch() {
    let env = Env::start_own("").await;
    let claims = env.clerk.claims("user_1");
    let with_kid = |kid: Option<&str>| {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        env.clerk.sign(header, claims.clone())
    };
    let long_ok = format!("ins_{}", "a".repeat(252));
    let too_long = "a".repeat(257);
    let huge = "k".repeat(10 * 1024);
    let before = env.clerk.jwks_fetches();
    let mismatch = "jwk-kid-mismatch";
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        ("kid absent", None, mismatch),
        ("kid empty", Some(""), "token-invalid"),
        ("kid 257 bytes", Some(&too_long), "token-invalid"),
        ("kid 10 KiB", Some(&huge), "token-invalid"),
        ("kid 256 bytes, unknown", Some(&long_ok), mismatch),
        ("kid upper-case", Some("INS_FAKE_1"), mismatch),
        ("kid with a trailing space", Some("ins_fake_1 "), mismatch),
        ("kid with a NUL", Some("ins_fake_1\u{0}"), mismatch),
        (
            "kid path traversal",
            Some("../../../../etc/passwd"),
            mismatch,
        ),
        (
            "kid traversal back to ours",
            Some("x/../ins_fake_1"),
            mismatch,
        ),
        ("kid URL", Some("https://evil.example/jwks.json"), mismatch),
        ("kid query", Some("/v1/jwks?kid=ins_fake_1"), mismatch),
        ("kid percent-encoded", Some("ins%5Ffake%5F1"), mismatch),
        ("kid SQL", Some("' OR '1'='1"), mismatch),
    ];
    for (case, kid, reason) in &cases {
        expect_refused(&env, case, &with_kid(*kid), 401, reason).await;
    }
    let fetches = env.clerk.jwks_fetches() - before;
    assert!(fetches <= 1, "hostile kids caused {fetches} JWKS fetches");
    assert_eq!(env.upstream.count(), 0);
    expect_forwarded(&env, "control", &with_kid(Some("ins_fake_1")), "user_1").await;
    env.stop().await;
}

#[tokio::test]
async fn x5c_and_kidless_embedded_keys_are_ignored() {
    let env = Env::start("").await;
    let attacker = other_instance();
    let attacker_key = attacker.key("ins_fake_1");
    let claims = env.clerk.claims("user_evil");
    let fetches = attacker.jwks_fetches();
    let der = attacker_key.public_key_pem();
    let der_b64: String = der.lines().filter(|l| !l.starts_with("-----")).collect();
    let cases = [
        (
            "x5c with our kid",
            json!({"alg": "RS256", "kid": "ins_fake_1", "x5c": [der_b64]}),
            "token-invalid-signature",
        ),
        (
            "jwk and no kid",
            json!({"alg": "RS256", "jwk": attacker_key.jwk()}),
            "jwk-kid-mismatch",
        ),
        (
            "jku and no kid",
            json!({"alg": "RS256", "jku": format!("{}/.well-known/jwks.json", attacker.url)}),
            "jwk-kid-mismatch",
        ),
    ];
    for (case, header, reason) in cases {
        expect_refused(
            &env,
            case,
            &attacker.sign(header, claims.clone()),
            401,
            reason,
        )
        .await;
    }
    assert_eq!(
        attacker.jwks_fetches(),
        fetches,
        "a token-supplied URL was fetched"
    );
    env.stop().await;
}

#[tokio::test]
async fn forged_tokens_learn_nothing_from_their_claims() {
    // Signature first (clerk-protocol.md 2.1 step 4, PR #8332): a token signed by another
    // instance's key under our kid gets the same answer whatever is wrong with its claims, so
    // it cannot probe the issuer, azp, clock or session configuration.
    let env = Env::start("[clerk]\nauthorized_parties = [\"https://app.example\"]\n").await;
    let other = other_instance();
    let t = now();
    let cases: Vec<(&str, &str, Value)> = vec![
        ("valid claims", "azp", json!("https://app.example")),
        ("expired", "exp", json!(t - 600)),
        ("not active yet", "nbf", json!(t + 600)),
        ("iat in the future", "iat", json!(t + 600)),
        (
            "other issuer",
            "iss",
            json!("https://other.clerk.accounts.dev"),
        ),
        ("wrong azp", "azp", json!("https://evil.example")),
        ("pending", "sts", json!("pending")),
        ("sub a number", "sub", json!(1)),
        ("exp a string", "exp", json!("soon")),
    ];
    for (case, claim, value) in cases {
        let mut claims = other.claims("user_1");
        claims["azp"] = json!("https://app.example");
        claims[claim] = value;
        expect_refused(
            &env,
            case,
            &other.mint(claims),
            401,
            "token-invalid-signature",
        )
        .await;
    }
    env.stop().await;
}
