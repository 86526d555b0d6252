//! Browser mode (issue 14): CORS preflights, route rules by method, Clerk's handshake for page
//! loads and its return leg, refresh without a redirect, sign-in redirects; and a differential
//! matrix against `@clerk/backend`'s own `authenticateRequest` (tests/sdk/authenticate_request.mjs,
//! run with Node; the package is installed by .ci/sdk-deps) on the same requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::support::{FakeClerk, Sidecar, Upstream, client, now};

const ORIGIN: &str = "https://app.example";

async fn preflight(gate: &Sidecar, origin: &str, method: &str, headers: &str) -> reqwest::Response {
    client()
        .request(reqwest::Method::OPTIONS, gate.url("/api/items"))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", headers)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn preflight_is_forwarded_unauthenticated_by_default_and_the_real_request_still_needs_a_token()
 {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "").await;

    let resp = client()
        .request(reqwest::Method::OPTIONS, gate.url("/api/items"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "authorization")
        .header("x-user-id", "user_spoofed")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the upstream answered the preflight");
    let seen = upstream.last();
    assert_eq!(seen.method, "OPTIONS");
    assert!(
        seen.headers.get("x-user-id").is_none(),
        "identity headers stripped"
    );
    assert!(
        gate.metrics_text()
            .await
            .contains("outcome=\"preflight\"} 1")
    );

    // A plain OPTIONS (no Access-Control-Request-Method) is not a preflight: 401.
    let resp = client()
        .request(reqwest::Method::OPTIONS, gate.url("/api/items"))
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // The real request is authenticated as always.
    let resp = client()
        .put(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client()
        .put(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().headers["x-user-id"], "user_1");
    gate.stop().await;
}

#[tokio::test]
async fn preflight_answer_mode_allows_exactly_the_configured_origin_methods_and_headers() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &format!("[cors]\npreflight = \"answer\"\nallowed_origins = [\"{ORIGIN}\"]\n"),
    )
    .await;

    let resp = preflight(&gate, ORIGIN, "PUT", "Authorization, Content-Type").await;
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(
        h["access-control-allow-methods"],
        "GET, HEAD, POST, PUT, PATCH, DELETE"
    );
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "Origin");
    for (origin, method, headers, reason) in [
        ("https://evil.example", "GET", "", "cors-origin-not-allowed"),
        (
            "https://app.example.evil.example",
            "GET",
            "",
            "cors-origin-not-allowed",
        ),
        (ORIGIN, "TRACE", "", "cors-method-not-allowed"),
        (ORIGIN, "GET", "x-user-id", "cors-headers-not-allowed"),
    ] {
        let resp = preflight(&gate, origin, method, headers).await;
        assert_eq!(resp.status(), 403, "{origin} {method} {headers}");
        assert_eq!(resp.headers()["x-clerkgate-reason"], reason);
        assert!(resp.headers().get("access-control-allow-origin").is_none());
    }
    assert_eq!(
        upstream.count(),
        0,
        "answered preflights never reach the upstream"
    );

    // The actual cross-origin request: CORS headers on the upstream's answer and on our 401.
    let resp = client()
        .get(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], ORIGIN);
    assert_eq!(resp.headers()["vary"], "Origin");
    let resp = client()
        .get(gate.url("/api/items"))
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["access-control-allow-origin"], ORIGIN);
    let resp = client()
        .get(gate.url("/api/items"))
        .header("origin", "https://evil.example")
        .bearer_auth(clerk.session_token("user_1"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    gate.stop().await;
}

#[tokio::test]
async fn preflight_authenticate_mode_keeps_the_401() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &upstream, "[cors]\npreflight = \"authenticate\"\n").await;
    let resp = preflight(&gate, ORIGIN, "GET", "authorization").await;
    assert_eq!(resp.status(), 401);
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn route_rules_can_be_limited_to_methods() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        r#"
[[routes]]
path = "/feed/**"
methods = ["GET"]
auth = "public"
"#,
    )
    .await;
    let status = |m: reqwest::Method| {
        let url = gate.url("/feed/1");
        async move {
            client()
                .request(m, url)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(reqwest::Method::GET).await, 200);
    assert_eq!(status(reqwest::Method::HEAD).await, 200, "GET covers HEAD");
    assert_eq!(
        status(reqwest::Method::POST).await,
        401,
        "the rule is GET-only"
    );
    assert_eq!(status(reqwest::Method::DELETE).await, 401);
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A Backend API front: the handshake payload and refresh endpoints, everything else (the JWKS)
// passed to the fake Clerk.

#[derive(Default)]
struct BapiState {
    /// `path?query` of every handshake-payload and refresh call.
    calls: Vec<String>,
    /// JSON bodies of refresh calls.
    refresh_bodies: Vec<Value>,
    /// Directives served for nonce `good`.
    directives: Vec<String>,
    /// Cookies served for refresh token `good`.
    refreshed: Vec<String>,
}

struct Bapi {
    url: String,
    state: Arc<Mutex<BapiState>>,
}

impl Bapi {
    async fn start(clerk: &FakeClerk) -> Bapi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(BapiState::default()));
        let behind = clerk.url.clone();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                let behind = behind.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        let behind = behind.clone();
                        async move { Ok::<_, Infallible>(bapi(req, &st, &behind).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Bapi {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn bapi(
    req: Request<Incoming>,
    st: &Mutex<BapiState>,
    behind: &str,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    if path == "/v1/clients/handshake_payload" {
        let mut s = st.lock().unwrap();
        s.calls.push(pq.clone());
        return if pq.ends_with("nonce=good") {
            json_response(200, json!({"directives": s.directives}))
        } else {
            json_response(
                404,
                json!({"errors": [{"code": "resource_not_found", "message": "not found"}]}),
            )
        };
    }
    if path.starts_with("/v1/sessions/") && path.ends_with("/refresh") {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut s = st.lock().unwrap();
        s.calls.push(pq);
        s.refresh_bodies.push(body.clone());
        return if body["refresh_token"] == "good" {
            json_response(200, json!({"object": "cookies", "cookies": s.refreshed}))
        } else {
            json_response(
                400,
                json!({"errors": [{"code": "refresh_token_invalid", "message": "bad"}]}),
            )
        };
    }
    let mut forward = client().get(format!("{behind}{pq}"));
    if let Some(a) = req.headers().get("authorization") {
        forward = forward.header("authorization", a.to_str().unwrap());
    }
    match forward.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.bytes().await.unwrap_or_default();
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .unwrap()
        }
        Err(_) => json_response(502, json!({})),
    }
}

// ---------------------------------------------------------------------------------------------
// Page loads, fetches and the handshake.

const PROD_PK_HOST: &str = "fake-instance.clerk.accounts.dev";

fn live_pk() -> String {
    use base64::Engine as _;
    format!(
        "pk_live_{}",
        base64::engine::general_purpose::STANDARD.encode(format!("{PROD_PK_HOST}$"))
    )
}

/// A sidecar in front of `upstream`, its Backend API at `bapi`, with a production key unless
/// `dev`.
async fn browser_gate(
    clerk: &FakeClerk,
    upstream: &Upstream,
    bapi: &Bapi,
    dev: bool,
    extra: &str,
) -> Sidecar {
    let pk = if dev {
        clerk.publishable_key()
    } else {
        live_pk()
    };
    Sidecar::start(
        clerk,
        upstream,
        &format!(
            "[clerk]\npublishable_key = \"{pk}\"\napi_url = \"{}\"\n{extra}",
            bapi.url
        ),
    )
    .await
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap()
}

fn expired_token(clerk: &FakeClerk) -> String {
    let mut claims = clerk.claims("user_1");
    let t = now();
    claims["iat"] = json!(t - 180);
    claims["nbf"] = json!(t - 190);
    claims["exp"] = json!(t - 120);
    clerk.mint(claims)
}

fn query_map(url: &str) -> (String, Vec<(String, String)>) {
    let u = url::Url::parse(url).unwrap();
    let base = format!("{}{}", u.origin().ascii_serialization(), u.path());
    (
        base,
        u.query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    )
}

const NAV: &[(&str, &str)] = &[
    ("sec-fetch-dest", "document"),
    ("accept", "text/html,application/xhtml+xml"),
];

#[tokio::test]
async fn expired_cookie_page_load_gets_the_handshake_and_the_return_leg_signs_in() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let bapi = Bapi::start(&clerk).await;
    let gate = browser_gate(&clerk, &upstream, &bapi, false, "").await;
    let expired = expired_token(&clerk);
    let uat = now() - 1000;
    let cookie = format!("__session={expired}; __client_uat={uat}");

    // 1. The page load after a minute idle: 307 to the Frontend API's handshake.
    let mut req = no_redirects()
        .get(gate.url("/dashboard?tab=2"))
        .header("cookie", &cookie);
    for (k, v) in NAV {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 307);
    let h = resp.headers();
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(
        h["set-cookie"],
        "__clerk_redirect_count=1; SameSite=Lax; HttpOnly; Max-Age=2"
    );
    assert_eq!(h["x-clerk-auth-status"], "handshake");
    let reason = "session-token-expired-refresh-non-eligible-no-refresh-cookie";
    assert_eq!(h["x-clerk-auth-reason"], reason);
    let (base, q) = query_map(h["location"].to_str().unwrap());
    assert_eq!(base, format!("https://{PROD_PK_HOST}/v1/client/handshake"));
    let public = gate.url("/dashboard?tab=2");
    assert_eq!(
        q,
        vec![
            ("redirect_url".into(), public.clone()),
            ("__clerk_api_version".into(), "2026-05-12".into()),
            ("suffixed_cookies".into(), "false".into()),
            ("__clerk_hs_reason".into(), reason.into()),
            ("format".into(), "nonce".into()),
            ("__session".into(), expired.clone()),
        ]
    );
    assert_eq!(upstream.count(), 0, "nothing reached the upstream");

    // 2. The same request from fetch(): 401 with the SDK's reason, no redirect.
    let resp = client()
        .get(gate.url("/dashboard"))
        .header("cookie", &cookie)
        .header("sec-fetch-dest", "empty")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-clerk-auth-status"], "signed-out");
    assert_eq!(resp.headers()["x-clerk-auth-reason"], reason);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "token-expired");

    // 3. The return leg: FAPI sends the browser back with a nonce.
    let fresh = clerk.session_token("user_1");
    bapi.state.lock().unwrap().directives = vec![
        format!("__session={fresh}; Path=/; SameSite=Lax"),
        format!("__client_uat={}; Path=/; Max-Age=315360000", now()),
    ];
    let mut req = no_redirects()
        .get(gate.url("/dashboard?tab=2&__clerk_handshake_nonce=good"))
        .header("cookie", &cookie);
    for (k, v) in NAV {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "forwarded signed in");
    let set: Vec<_> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        set,
        bapi.state.lock().unwrap().directives,
        "every directive, verbatim"
    );
    assert_eq!(
        bapi.calls(),
        vec!["/v1/clients/handshake_payload?nonce=good".to_string()]
    );
    let seen = upstream.last();
    assert_eq!(seen.headers["x-user-id"], "user_1");
    assert_eq!(
        seen.uri.path_and_query().unwrap().as_str(),
        "/dashboard?tab=2",
        "handshake parameters removed"
    );

    // 4. A nonce Clerk does not know: signed out, never another handshake.
    let mut req = no_redirects()
        .get(gate.url("/dashboard?__clerk_handshake_nonce=stale"))
        .header("cookie", &cookie);
    for (k, v) in NAV {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["x-clerk-auth-reason"],
        "session-token-missing"
    );
    assert_eq!(bapi.calls().len(), 2, "one call per return leg");

    // 5. The loop guard: the third redirect in a row is the last.
    let mut req = no_redirects()
        .get(gate.url("/dashboard"))
        .header("cookie", format!("{cookie}; __clerk_redirect_count=3"));
    for (k, v) in NAV {
        req = req.header(*k, *v);
    }
    assert_eq!(req.send().await.unwrap().status(), 401);
    gate.stop().await;
}

#[tokio::test]
async fn expired_cookie_with_a_refresh_cookie_is_refreshed_without_a_redirect() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let bapi = Bapi::start(&clerk).await;
    let gate = browser_gate(&clerk, &upstream, &bapi, false, "").await;
    let suffix = clerkgate::clerk::publishable_key::cookie_suffix(&live_pk());
    let expired = expired_token(&clerk);
    let sid = sdk_sid(&expired);
    let fresh = clerk.session_token("user_1");
    bapi.state.lock().unwrap().refreshed = vec![format!("__session={fresh}; Path=/")];
    let resp = client()
        .get(gate.url("/api/me"))
        .header(
            "cookie",
            format!(
                "__session={expired}; __client_uat={}; __refresh_{suffix}=good",
                now() - 1000
            ),
        )
        .header("sec-fetch-dest", "empty")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "fetch refreshed, not redirected");
    assert_eq!(
        resp.headers()["set-cookie"],
        format!("__session={fresh}; Path=/").as_str()
    );
    assert_eq!(upstream.last().headers["x-user-id"], "user_1");
    assert_eq!(
        bapi.calls(),
        vec![format!("/v1/sessions/{sid}/refresh?suffixed_cookies=false")]
    );
    let body = bapi.state.lock().unwrap().refresh_bodies[0].clone();
    assert_eq!(body["format"], "cookie");
    assert_eq!(body["expired_token"], expired.as_str());
    assert_eq!(body["refresh_token"], "good");
    assert_eq!(body["request_origin"], gate.url(""));
    // A refused refresh token: the SDK's reason carries Clerk's error code.
    let resp = client()
        .get(gate.url("/api/me"))
        .header(
            "cookie",
            format!(
                "__session={expired}; __client_uat={}; __refresh_{suffix}=bad",
                now() - 1000
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["x-clerk-auth-reason"],
        "session-token-expired-refresh-refresh_token_invalid"
    );
    gate.stop().await;
}

fn sdk_sid(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice::<Value>(&bytes).unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn signed_out_page_load_on_a_required_route_goes_to_sign_in_and_fetch_keeps_the_401() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let bapi = Bapi::start(&clerk).await;
    let gate = browser_gate(
        &clerk,
        &upstream,
        &bapi,
        false,
        "[browser]\nsign_in_url = \"https://accounts.example/sign-in\"\n[[routes]]\npath = \"/blog/**\"\nauth = \"optional\"\n",
    )
    .await;
    let mut req = no_redirects().get(gate.url("/settings?x=1"));
    for (k, v) in NAV {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 307);
    let (base, q) = query_map(resp.headers()["location"].to_str().unwrap());
    assert_eq!(base, "https://accounts.example/sign-in");
    assert_eq!(q, vec![("redirect_url".into(), gate.url("/settings?x=1"))]);
    assert_eq!(
        resp.headers()["x-clerk-auth-reason"],
        "session-token-and-uat-missing"
    );
    // fetch/XHR: 401 JSON.
    let resp = no_redirects()
        .get(gate.url("/settings"))
        .header("sec-fetch-dest", "empty")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // POST form submission: no redirect either (the SDK's eligibility is GET-only).
    let resp = no_redirects()
        .post(gate.url("/settings"))
        .header("sec-fetch-dest", "document")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // An optional route: signed-out page loads go through anonymously.
    let mut req = no_redirects().get(gate.url("/blog/1"));
    for (k, v) in NAV {
        req = req.header(*k, *v);
    }
    assert_eq!(req.send().await.unwrap().status(), 200);
    assert!(upstream.last().headers.get("x-user-id").is_none());
    assert!(
        gate.metrics_text()
            .await
            .contains("outcome=\"sign_in_redirect\"} 1")
    );
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The differential matrix: the same requests through @clerk/backend's authenticateRequest
// (Node, tests/sdk/authenticate_request.mjs) and through clerkgate.

struct Case {
    name: String,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
}

/// Runs the SDK on `cases`; `None` (with a SKIP line) when Node or the package is missing.
async fn sdk_answers(options: Value, cases: &[Case], gate: &Sidecar) -> Option<Vec<Value>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    if !dir.join("node_modules/@clerk/backend").is_dir() {
        println!("SKIP: tests/sdk/node_modules missing (run .ci/sdk-deps: npm ci)");
        return None;
    }
    let input = json!({
        "options": options,
        "cases": cases.iter().map(|c| {
            let mut headers = serde_json::Map::new();
            headers.insert("host".into(), json!(gate.proxy.to_string()));
            for (k, v) in &c.headers {
                headers.insert(k.clone(), json!(v));
            }
            json!({"url": gate.url(&c.path), "method": c.method, "headers": headers})
        }).collect::<Vec<_>>(),
    });
    // Async: the SDK calls the fake Backend API, served by this very runtime.
    let mut child = match tokio::process::Command::new("node")
        .arg(dir.join("authenticate_request.mjs"))
        .current_dir(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            println!("SKIP: node not runnable: {e}");
            return None;
        }
    };
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "oracle failed");
    Some(serde_json::from_slice(&out.stdout).expect("oracle answers JSON"))
}

/// clerkgate's answer in the SDK's terms.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: String,
    reason: Option<String>,
    location: Option<(String, Vec<(String, String)>)>,
    set_cookies: Vec<String>,
}

async fn gate_answer(gate: &Sidecar, upstream: &Upstream, c: &Case) -> Outcome {
    let before = upstream.count();
    let mut req = no_redirects().request(c.method.parse().unwrap(), gate.url(&c.path));
    for (k, v) in &c.headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.unwrap();
    let h = resp.headers().clone();
    let status = resp.status().as_u16();
    let text = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
    let set_cookies = h
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    match status {
        200 => {
            assert_eq!(upstream.count(), before + 1);
            assert_eq!(upstream.last().headers["x-user-id"], "user_1", "{}", c.name);
            Outcome {
                status: "signed-in".into(),
                reason: None,
                location: None,
                set_cookies,
            }
        }
        307 => {
            assert_eq!(text("cache-control").as_deref(), Some("no-store"));
            assert_eq!(text("x-clerk-auth-status").as_deref(), Some("handshake"));
            Outcome {
                status: "handshake".into(),
                reason: text("x-clerk-auth-reason"),
                location: text("location").map(|l| query_map(&l)),
                set_cookies,
            }
        }
        401 => {
            assert_eq!(upstream.count(), before, "{}", c.name);
            assert_eq!(text("x-clerk-auth-status").as_deref(), Some("signed-out"));
            Outcome {
                status: "signed-out".into(),
                reason: text("x-clerk-auth-reason"),
                location: None,
                set_cookies,
            }
        }
        other => panic!("{}: unexpected status {other}", c.name),
    }
}

fn sdk_outcome(v: &Value) -> Outcome {
    let status = v["status"].as_str().unwrap().to_owned();
    Outcome {
        reason: (status != "signed-in").then(|| v["reason"].as_str().unwrap_or("").to_owned()),
        location: v["location"].as_str().map(query_map),
        set_cookies: v["setCookies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect(),
        status,
    }
}

/// The matrix: cookie situations x request kinds x methods, plus Bearer tokens, redirect-loop
/// and cross-origin cases; for development keys also with and without `__clerk_db_jwt`.
fn matrix(clerk: &FakeClerk, suffix: &str, dev: bool) -> Vec<Case> {
    let t = now();
    let valid = clerk.session_token("user_1");
    let expired = expired_token(clerk);
    let mut stale = clerk.claims("user_1");
    stale["iat"] = json!(t - 30);
    let stale = clerk.mint(stale);
    let cookies: Vec<(&str, String)> = vec![
        ("no cookies", String::new()),
        (
            "valid",
            format!("__session={valid}; __client_uat={}", t - 100),
        ),
        (
            "expired",
            format!("__session={expired}; __client_uat={}", t - 1000),
        ),
        ("uat only", format!("__client_uat={}", t - 100)),
        ("uat=0", format!("__session={valid}; __client_uat=0")),
        ("no uat", format!("__session={valid}")),
        (
            "iat before uat",
            format!("__session={stale}; __client_uat={t}"),
        ),
        (
            "garbage",
            format!("__session=abc; __client_uat={}", t - 100),
        ),
        (
            "expired+refresh",
            format!(
                "__session={expired}; __client_uat={}; __refresh_{suffix}=bad",
                t - 1000
            ),
        ),
        (
            "suffixed valid",
            format!(
                "__session_{suffix}={valid}; __client_uat_{suffix}={}",
                t - 100
            ),
        ),
        (
            "suffixed expired, plain valid and newer",
            format!(
                "__session={valid}; __client_uat={}; __session_{suffix}={expired}; __client_uat_{suffix}={}",
                t - 100,
                t - 1000
            ),
        ),
        (
            "suffixed valid, plain signed out",
            format!(
                "__client_uat=0; __session_{suffix}={valid}; __client_uat_{suffix}={}",
                t - 100
            ),
        ),
        (
            "expired, loop 3",
            format!(
                "__session={expired}; __client_uat={}; __clerk_redirect_count=3",
                t - 1000
            ),
        ),
        (
            "expired, loop 1",
            format!(
                "__session={expired}; __client_uat={}; __clerk_redirect_count=1",
                t - 1000
            ),
        ),
    ];
    let kinds: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "document",
            vec![("sec-fetch-dest", "document"), ("accept", "text/html")],
        ),
        ("iframe", vec![("sec-fetch-dest", "iframe")]),
        ("html, no sec-fetch-dest", vec![("accept", "text/html,*/*")]),
        (
            "fetch",
            vec![("sec-fetch-dest", "empty"), ("accept", "*/*")],
        ),
        ("bare", vec![]),
    ];
    let dev_browser: &[Option<&str>] = if dev { &[None, Some("dvb_1")] } else { &[None] };
    let mut cases = Vec::new();
    for db in dev_browser {
        for (cname, cookie) in &cookies {
            for (kname, kh) in &kinds {
                for method in ["GET", "POST"] {
                    if method == "POST" && *kname != "document" {
                        continue;
                    }
                    let mut cookie = cookie.clone();
                    if let Some(db) = db {
                        cookie = if cookie.is_empty() {
                            format!("__clerk_db_jwt={db}; __clerk_db_jwt_{suffix}={db}")
                        } else {
                            format!("{cookie}; __clerk_db_jwt={db}; __clerk_db_jwt_{suffix}={db}")
                        };
                    }
                    let mut headers: Vec<(String, String)> = kh
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    if !cookie.is_empty() {
                        headers.push(("cookie".into(), cookie));
                    }
                    cases.push(Case {
                        name: format!("{method} {kname}, {cname}, db={db:?}"),
                        method,
                        path: "/page?a=1&b=x%20y".into(),
                        headers,
                    });
                }
            }
        }
        // A browser holds the dev-browser token under both names once suffixed cookies are in use.
        let db_cookie = db.map(|d| format!("__clerk_db_jwt={d}; __clerk_db_jwt_{suffix}={d}"));
        for (bname, token) in [("valid bearer", &valid), ("expired bearer", &expired)] {
            for (kname, kh) in &kinds[..4] {
                let mut headers: Vec<(String, String)> = kh
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                headers.push(("authorization".into(), format!("Bearer {token}")));
                if let Some(c) = &db_cookie {
                    headers.push(("cookie".into(), c.clone()));
                }
                cases.push(Case {
                    name: format!("GET {kname}, {bname}, db={db:?}"),
                    method: "GET",
                    path: "/api/x".into(),
                    headers,
                });
            }
        }
        let mut cookie = format!("__session={valid}; __client_uat={}", t - 100);
        if let Some(c) = &db_cookie {
            cookie = format!("{cookie}; {c}");
        }
        for referer in ["https://other.example/", "https://accounts.example.com/"] {
            cases.push(Case {
                name: format!("GET document, valid, referer {referer}, db={db:?}"),
                method: "GET",
                path: "/".into(),
                headers: vec![
                    ("sec-fetch-dest".into(), "document".into()),
                    ("referer".into(), referer.into()),
                    ("cookie".into(), cookie.clone()),
                ],
            });
        }
    }
    if !dev {
        // The return leg (development differs on purpose: the SDK answers it with a redirect
        // to the cleaned URL, clerkgate forwards the cleaned URL at once).
        for nonce in ["good", "stale"] {
            cases.push(Case {
                name: format!("GET document, expired, nonce {nonce}"),
                method: "GET",
                path: format!("/page?a=1&__clerk_handshake_nonce={nonce}"),
                headers: vec![
                    ("sec-fetch-dest".into(), "document".into()),
                    (
                        "cookie".into(),
                        format!("__session={expired}; __client_uat={}", t - 1000),
                    ),
                ],
            });
        }
    }
    if dev {
        cases.push(Case {
            name: "GET document, dev browser in the query".into(),
            method: "GET",
            path: "/page?__clerk_db_jwt=dvb_q&z=1".into(),
            headers: vec![("sec-fetch-dest".into(), "document".into())],
        });
    }
    cases
}

async fn differential(dev: bool) {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let bapi = Bapi::start(&clerk).await;
    let gate = browser_gate(&clerk, &upstream, &bapi, dev, "").await;
    let pk = if dev {
        clerk.publishable_key()
    } else {
        live_pk()
    };
    let suffix = clerkgate::clerk::publishable_key::cookie_suffix(&pk);
    let cases = matrix(&clerk, &suffix, dev);
    bapi.state.lock().unwrap().directives = vec![
        format!(
            "__session={}; Path=/; SameSite=Lax",
            clerk.session_token("user_1")
        ),
        format!("__client_uat={}; Path=/", now()),
    ];
    let options = json!({
        "publishableKey": pk,
        "secretKey": clerk.secret_key,
        "apiUrl": bapi.url,
        "jwtKey": clerk.key("ins_fake_1").public_key_pem(),
    });
    let Some(answers) = sdk_answers(options, &cases, &gate).await else {
        return;
    };
    assert_eq!(answers.len(), cases.len());
    let (mut same, mut divergent) = (0, Vec::new());
    let by_name: std::collections::HashMap<&str, &Value> = cases
        .iter()
        .map(|c| c.name.as_str())
        .zip(&answers)
        .collect();
    for (c, sdk) in cases.iter().zip(&answers) {
        assert!(
            sdk["error"].is_null(),
            "{}: SDK threw {}",
            c.name,
            sdk["error"]
        );
        let want = sdk_outcome(sdk);
        let got = gate_answer(&gate, &upstream, c).await;
        if got == want {
            same += 1;
            continue;
        }
        // Deliberate difference (README, "Browsers"): on a development instance the SDK signs
        // out every request without a dev-browser token that is not a page load; clerkgate
        // decides those as if the token were there: exactly the SDK's answer for the twin
        // request that carries `__clerk_db_jwt`.
        let twin = c.name.replace("db=None", "db=Some(\"dvb_1\")");
        assert!(
            dev && want.reason.as_deref() == Some("dev-browser-missing") && twin != c.name,
            "case {:?}: clerkgate {got:?}, SDK {want:?}",
            c.name
        );
        assert_eq!(
            got,
            sdk_outcome(by_name[twin.as_str()]),
            "case {:?} (twin)",
            c.name
        );
        divergent.push(c.name.clone());
    }
    println!(
        "differential ({}): {same} cases agree with @clerk/backend, {} documented differences: {divergent:?}",
        if dev { "development" } else { "production" },
        divergent.len()
    );
    assert!(same >= 60, "the matrix compared too little");
    gate.stop().await;
}

#[tokio::test]
async fn differential_production_key_agrees_with_the_sdk() {
    differential(false).await;
}

#[tokio::test]
async fn differential_development_key_agrees_with_the_sdk() {
    differential(true).await;
}

#[tokio::test]
async fn forward_auth_applies_the_preflight_and_method_rules_to_the_original_method() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[[routes]]\npath = \"/feed/**\"\nmethods = [\"GET\"]\nauth = \"public\"\n",
    )
    .await;
    let fa = |method: &str, uri: &str| {
        client()
            .get(gate.url("/_clerkgate/auth"))
            .header("x-forwarded-method", method)
            .header("x-forwarded-uri", uri)
    };
    // Traefik forwards the preflight's headers: allowed without a token, no identity.
    let resp = fa("OPTIONS", "/api/items")
        .header("origin", ORIGIN)
        .header("access-control-request-method", "PUT")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-user-id").is_none());
    let remove = resp.headers()["x-envoy-auth-headers-to-remove"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        remove.split(',').any(|n| n.trim() == "x-user-id"),
        "an anonymous answer still has the ingress remove identity headers: {remove}"
    );
    // A plain OPTIONS is not a preflight.
    let resp = fa("OPTIONS", "/api/items")
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(fa("GET", "/feed/1").send().await.unwrap().status(), 200);
    assert_eq!(fa("POST", "/feed/1").send().await.unwrap().status(), 401);
    // Two sources that disagree are refused, as for the URI.
    let resp = fa("GET", "/feed/1")
        .header("x-original-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Without a method header only rules without `methods` apply.
    let resp = client()
        .get(gate.url("/_clerkgate/auth"))
        .header("x-forwarded-uri", "/feed/1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    gate.stop().await;
}

/// A fake Frontend API: records each request, answers with two cookies and a `Location` on its
/// own host.
/// Method, URI, headers and body of one request the fake Frontend API received.
type FapiRequest = (String, String, http::HeaderMap, Bytes);

struct Fapi {
    url: String,
    seen: Arc<Mutex<Vec<FapiRequest>>>,
}

impl Fapi {
    async fn start() -> Fapi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<FapiRequest>>> = Arc::new(Mutex::new(Vec::new()));
        let st = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move {
                            let method = req.method().to_string();
                            let uri = req.uri().to_string();
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            st.lock().unwrap().push((method, uri, headers, body));
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(302)
                                    .header("location", format!("http://{addr}/v1/foo?x=1"))
                                    .header("set-cookie", "__client=abc; Path=/; HttpOnly")
                                    .header("set-cookie", "__client_uat=1; Path=/")
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Fapi {
            url: format!("http://{addr}"),
            seen,
        }
    }
}

#[tokio::test]
async fn frontend_api_proxy_forwards_clerk_traffic_as_clerk_documents_it() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let fapi = Fapi::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        &format!(
            "[browser]\nfapi_proxy_path = \"/__clerk\"\nfapi_url = \"{}\"\n",
            fapi.url
        ),
    )
    .await;
    let resp = no_redirects()
        .post(gate.url("/__clerk/v1/client/sign_ins?_clerk_js_version=5"))
        .header("cookie", "__client=old; __client_uat=0")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-user-id", "user_spoofed")
        .header("clerk-secret-key", "sk_live_from_the_client")
        .body("identifier=a%40example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302, "redirects are relayed, not followed");
    let set: Vec<_> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        set,
        ["__client=abc; Path=/; HttpOnly", "__client_uat=1; Path=/"]
    );
    assert_eq!(
        resp.headers()["location"],
        gate.url("/__clerk/v1/foo?x=1").as_str(),
        "FAPI Location rewritten to the proxy URL"
    );
    let all_headers = format!("{:?}", resp.headers());
    assert!(
        !all_headers.contains(&clerk.secret_key),
        "secret never returned"
    );
    assert_eq!(resp.text().await.unwrap(), "{\"ok\":true}");

    let seen = fapi.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (method, uri, h, body) = &seen[0];
    assert_eq!(method, "POST");
    assert_eq!(uri, "/v1/client/sign_ins?_clerk_js_version=5");
    assert_eq!(body.as_ref(), b"identifier=a%40example.com");
    assert_eq!(h["clerk-proxy-url"], gate.url("/__clerk").as_str());
    assert_eq!(
        h["clerk-secret-key"],
        clerk.secret_key.as_str(),
        "the server's key, not the client's"
    );
    assert_eq!(h["host"], fapi.url.trim_start_matches("http://"));
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["accept-encoding"], "identity");
    assert_eq!(h["cookie"], "__client=old; __client_uat=0");
    assert_eq!(upstream.count(), 0, "the app never sees Clerk's traffic");
    assert!(
        gate.metrics_text()
            .await
            .contains("outcome=\"fapi_proxy\"} 1")
    );

    // A path that normalises out of the proxy path is not Clerk's: authenticated as usual.
    let resp = client()
        .get(gate.url("/__clerk/../admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(fapi.seen.lock().unwrap().len(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn frontend_api_proxy_needs_the_secret_key_and_a_path() {
    let clerk = FakeClerk::start().await;
    let base = format!(
        "[proxy]\nupstream = \"http://127.0.0.1:1\"\n[clerk]\npublishable_key = \"{}\"\njwt_key = \"x\"\n",
        clerk.publishable_key()
    );
    let err = crate::support::sidecar::config(&base, "[browser]\nfapi_proxy_path = \"/__clerk\"\n")
        .unwrap_err();
    assert_eq!(err.key, "browser.fapi_proxy_path");
    assert!(err.message.contains("secret_key"), "{err}");
    let err = crate::support::sidecar::config(
        &base,
        "[clerk]\nsecret_key = \"sk_test_x\"\n[browser]\nfapi_proxy_path = \"__clerk\"\n",
    )
    .unwrap_err();
    assert_eq!(err.key, "browser.fapi_proxy_path");
    let err = crate::support::sidecar::config(&base, "[browser]\nsign_in_url = \"sign-in\"\n")
        .unwrap_err();
    assert_eq!(err.key, "browser.sign_in_url");
    let err =
        crate::support::sidecar::config(&base, "[cors]\npreflight = \"answer\"\n").unwrap_err();
    assert_eq!(err.key, "cors.allowed_origins");
}

#[tokio::test]
async fn same_origin_spa_fetches_with_cookies_and_is_never_redirected() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let bapi = Bapi::start(&clerk).await;
    let gate = browser_gate(&clerk, &upstream, &bapi, false, "").await;
    let fetch = |cookie: String| {
        no_redirects()
            .post(gate.url("/api/items"))
            .header("sec-fetch-dest", "empty")
            .header("sec-fetch-mode", "same-origin")
            .header("accept", "application/json")
            .header("cookie", cookie)
            .body("{}")
            .send()
    };
    let resp = fetch(format!(
        "__session={}; __client_uat={}",
        clerk.session_token("user_1"),
        now() - 100
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-user-id"], "user_1");
    assert!(
        seen.headers
            .get_all("cookie")
            .iter()
            .all(|c| !c.to_str().unwrap().contains("__session")),
        "the token cookie is not forwarded"
    );
    // After a minute idle, before clerk-js refreshed the cookie: a 401 the app can retry on,
    // never a redirect a fetch cannot follow.
    let resp = fetch(format!(
        "__session={}; __client_uat={}",
        expired_token(&clerk),
        now() - 1000
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["x-clerk-auth-reason"],
        "session-token-expired-refresh-non-eligible-non-get"
    );
    assert!(bapi.calls().is_empty(), "no Backend API call for a fetch");
    gate.stop().await;
}

#[tokio::test]
async fn made_up_nonces_spend_only_the_browser_share_of_the_backend_api_budget() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let bapi = Bapi::start(&clerk).await;
    // A fifth of 10 calls per 10 s: two handshake-payload calls.
    let gate = browser_gate(
        &clerk,
        &upstream,
        &bapi,
        false,
        "[sessions]\napi_budget_per_10s = 10\n",
    )
    .await;
    for i in 0..5 {
        let mut req =
            no_redirects().get(gate.url(&format!("/p?__clerk_handshake_nonce=made-up-{i}")));
        for (k, v) in NAV {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "signed out, never a loop");
        assert_eq!(
            resp.headers()["x-clerk-auth-reason"],
            "session-token-missing"
        );
    }
    assert_eq!(bapi.calls().len(), 2, "{:?}", bapi.calls());
    gate.stop().await;
}
