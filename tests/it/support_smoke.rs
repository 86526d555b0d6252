//! Proves the test fakes behave as the other integration tests assume, over real sockets:
//! the fake Clerk's JWKS endpoints (auth, rotation, failure injection, fetch counting) and the
//! echo upstream (recording, special paths, upgraded byte echo).

use std::net::SocketAddr;
use std::time::Duration;

use clerkgate::dev::echo::{self, Recorder};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::support::{Failure, FakeClerk, SigningKey};

/// Upper bound for every wait in this file; generous because CI machines stall.
const WAIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        // A proxy from the environment must not sit between a test and its 127.0.0.1 fakes.
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("build reqwest client")
}

async fn get_jwks(clerk: &FakeClerk, bearer: Option<&str>) -> reqwest::Response {
    let mut request = client().get(format!("{}/v1/jwks", clerk.url));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request.send().await.expect("GET /v1/jwks")
}

async fn published_kids(clerk: &FakeClerk) -> Vec<String> {
    let response = get_jwks(clerk, Some(&clerk.secret_key)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let jwks: Value = response.json().await.expect("JWKS is JSON");
    jwks["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .map(|key| key["kid"].as_str().expect("kid").to_owned())
        .collect()
}

fn header_kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("token header")
        .kid
        .expect("kid in header")
}

/// An echo upstream on 127.0.0.1:0 that stops when this is dropped.
struct Echo {
    addr: SocketAddr,
    url: String,
    recorder: Recorder,
    _stop: oneshot::Sender<()>,
}

async fn start_echo() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let recorder = Recorder::new(16);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(echo::serve(listener, recorder.clone(), async move {
        // Resolves when the sender is dropped with the `Echo`.
        let _ = stopped.await;
    }));
    Echo {
        addr,
        url: format!("http://{addr}"),
        recorder,
        _stop: stop,
    }
}

#[tokio::test]
async fn jwks_requires_the_secret_key_in_clerks_error_shape() {
    let clerk = FakeClerk::start().await;
    assert!(clerk.secret_key.starts_with("sk_test_fake_"));

    for bearer in [None, Some("sk_test_wrong")] {
        let response = get_jwks(&clerk, bearer).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "clerk_key_invalid");
        assert!(body["errors"][0]["message"].is_string());
        assert!(body["errors"][0]["long_message"].is_string());
    }

    let response = get_jwks(&clerk, Some(&clerk.secret_key)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "Clerk serves JSON"
    );
    let jwks: Value = response.json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "ins_fake_1");
    assert_eq!(jwks["keys"][0]["alg"], "RS256");
    assert_eq!(clerk.jwks_fetches(), 3, "rejected fetches count too");
}

#[tokio::test]
async fn well_known_jwks_is_served_without_auth_and_other_paths_404() {
    let clerk = FakeClerk::start().await;
    let response = client()
        .get(format!("{}/.well-known/jwks.json", clerk.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let jwks: Value = response.json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "ins_fake_1");

    let response = client()
        .get(format!("{}/v1/users", clerk.url))
        .bearer_auth(&clerk.secret_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "resource_not_found");
    assert_eq!(clerk.jwks_fetches(), 1, "only JWKS requests are counted");
}

#[tokio::test]
async fn session_token_verifies_against_the_served_jwks() {
    let clerk = FakeClerk::start().await;
    let token = clerk.session_token("user_smoke");

    let set: JwkSet = get_jwks(&clerk, Some(&clerk.secret_key))
        .await
        .json()
        .await
        .unwrap();
    let jwk = set
        .find(&header_kid(&token))
        .expect("token kid is published");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[clerk.issuer()]);
    let data =
        jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
            .expect("fake Clerk token verifies");
    assert_eq!(data.claims["sub"], "user_smoke");
    assert_eq!(
        data.claims["iss"],
        "https://fake-instance.clerk.accounts.dev"
    );
    assert_eq!(data.claims["v"], 2);

    // The publishable key decodes to the issuer's host (clerk-protocol.md §2.5).
    use base64::Engine as _;
    let encoded = clerk.publishable_key();
    let encoded = encoded.strip_prefix("pk_test_").unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(decoded, b"fake-instance.clerk.accounts.dev$");
}

#[tokio::test]
async fn rotation_publishes_both_kids_and_retire_removes_one() {
    let clerk = FakeClerk::start().await;
    assert_eq!(header_kid(&clerk.session_token("user_1")), "ins_fake_1");

    let new_kid = clerk.rotate();
    assert_eq!(new_kid, "ins_fake_2");
    assert_eq!(published_kids(&clerk).await, ["ins_fake_1", "ins_fake_2"]);
    assert_eq!(header_kid(&clerk.session_token("user_1")), "ins_fake_2");

    clerk.retire("ins_fake_1");
    assert_eq!(published_kids(&clerk).await, ["ins_fake_2"]);

    // A retired key can still mint, for "token signed by a key Clerk no longer serves" tests.
    let old: std::sync::Arc<SigningKey> = clerk.key("ins_fake_1");
    let token = old.mint(&clerk.claims("user_1"));
    assert_eq!(header_kid(&token), "ins_fake_1");
}

#[tokio::test]
async fn injected_status_body_and_retry_after_failures_are_served() {
    let clerk = FakeClerk::start().await;
    let secret = clerk.secret_key.clone();

    clerk.fail(Failure::Status(503));
    let response = get_jwks(&clerk, Some(&secret)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert!(body["errors"][0]["code"].is_string());

    clerk.fail(Failure::Body(b"{\"keys\": not json".to_vec()));
    let response = get_jwks(&clerk, Some(&secret)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap(), &b"{\"keys\": not json"[..]);

    clerk.fail(Failure::RetryAfter(7));
    let response = get_jwks(&clerk, Some(&secret)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");

    // The Frontend-API-style endpoint shares the failure injection.
    clerk.fail(Failure::Status(500));
    let response = client()
        .get(format!("{}/.well-known/jwks.json", clerk.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);

    clerk.fail(Failure::None);
    assert_eq!(published_kids(&clerk).await, ["ins_fake_1"]);
    assert_eq!(clerk.jwks_fetches(), 5);
}

#[tokio::test]
async fn hanging_jwks_never_answers_until_the_client_times_out() {
    let clerk = FakeClerk::start().await;
    clerk.fail(Failure::Hang);
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = impatient
        .get(format!("{}/v1/jwks", clerk.url))
        .bearer_auth(&clerk.secret_key)
        .send()
        .await
        .expect_err("a hanging fake must not answer");
    assert!(error.is_timeout(), "{error:?}");
    assert!(clerk.wait_for_fetches(1, WAIT).await);
}

#[tokio::test]
async fn concurrent_fetches_are_counted_and_awaitable() {
    let clerk = FakeClerk::start().await;
    assert!(!clerk.wait_for_fetches(1, Duration::from_millis(1)).await);
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let request = client()
                .get(format!("{}/v1/jwks", clerk.url))
                .bearer_auth(&clerk.secret_key);
            tokio::spawn(async move { request.send().await.map(|r| r.status()) })
        })
        .collect();
    assert!(clerk.wait_for_fetches(3, WAIT).await);
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(clerk.jwks_fetches(), 3);
}

#[tokio::test]
async fn echo_records_method_path_headers_and_body() {
    let echo = start_echo().await;
    let response = client()
        .post(format!("{}/api/items?x=1&y=2", echo.url))
        .header("x-single", "one")
        .header("x-repeated", "a")
        .header("x-repeated", "b")
        .body("hello upstream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/api/items");
    assert_eq!(echoed["query"], "x=1&y=2");
    assert_eq!(echoed["headers"]["x-single"], "one");
    assert_eq!(
        echoed["headers"]["x-repeated"],
        serde_json::json!(["a", "b"])
    );
    assert_eq!(echoed["body_bytes"], 14);

    assert!(echo.recorder.wait_for_count(1, WAIT).await);
    let seen = echo.recorder.last().expect("a recorded request");
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.uri.path(), "/api/items");
    assert_eq!(seen.uri.query(), Some("x=1&y=2"));
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.headers["x-single"], "one");
    assert_eq!(seen.headers.get_all("x-repeated").iter().count(), 2);
    assert_eq!(seen.body, "hello upstream");
    assert_eq!(echo.recorder.count(), 1);
    assert!(
        !echo
            .recorder
            .wait_for_count(2, Duration::from_millis(1))
            .await
    );
}

#[tokio::test]
async fn echo_serves_status_slow_and_big_paths() {
    let echo = start_echo().await;
    let client = client();

    let response = client
        .get(format!("{}/status/418", echo.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["path"], "/status/418");

    let response = client
        .get(format!("{}/status/99", echo.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let response = client
        .get(format!("{}/slow/20", echo.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let response = client
        .get(format!("{}/big/40000", echo.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.content_length(), Some(40_000));
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), 40_000);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, b)| *b == b'a' + (i % 26) as u8)
    );

    assert!(echo.recorder.wait_for_count(4, WAIT).await);
}

#[tokio::test]
async fn echo_speaks_h2c_with_prior_knowledge() {
    let echo = start_echo().await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .unwrap();
    let response = h2.get(format!("{}/h2", echo.url)).send().await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(echo.recorder.last().unwrap().version, http::Version::HTTP_2);
}

#[tokio::test]
async fn upgraded_connection_echoes_bytes_until_eof() {
    let echo = start_echo().await;
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(echo.addr))
        .await
        .expect("connect in time")
        .unwrap();
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        echo.addr
    );
    stream.write_all(handshake.as_bytes()).await.unwrap();

    // Read the response head byte by byte so no echoed byte is consumed with it.
    let mut head = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("response head"));
        }
    })
    .await
    .expect("101 in time");
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");

    let payload = b"\x00\x01binary and text\xff";
    stream.write_all(payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echoed[..], payload);

    // Half-close: the echo finishes and closes its side, so we read EOF.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("EOF in time")
        .unwrap();
    assert!(rest.is_empty());

    let seen = echo.recorder.last().unwrap();
    assert_eq!(seen.uri.path(), "/ws");
    assert_eq!(seen.headers["upgrade"], "websocket");
}
