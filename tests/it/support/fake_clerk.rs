//! An in-process fake of the Clerk endpoints clerkgate talks to, on `127.0.0.1:0`.
//!
//! It serves the Backend API JWKS (`GET /v1/jwks`, `Authorization: Bearer <secret>` required,
//! clerk-protocol.md §2.4) and the Frontend-API-style `GET /.well-known/jwks.json` (no auth),
//! mints tokens with its current key, rotates and retires keys, fails on demand and counts
//! fetches, so tests can assert how often the code under test went to "Clerk".
//!
//! One fake per test: it is started before the code under test and shut down when dropped.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use clerkgate::dev::signing::{SigningKey, jwks_json, session_claims};
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

const FRONTEND_API: &str = "fake-instance.clerk.accounts.dev";
const ISSUER: &str = "https://fake-instance.clerk.accounts.dev";

/// What the JWKS endpoints do instead of answering normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Answer normally.
    None,
    /// Answer this status with a Clerk-shaped error body.
    Status(u16),
    /// Never answer: hold the request until the fake is dropped.
    Hang,
    /// Answer 200 `application/json` with exactly these bytes (for malformed-JWKS tests).
    Body(Vec<u8>),
    /// Answer 429 with `Retry-After: <seconds>`.
    RetryAfter(u64),
}

/// A running fake Clerk. Dropping it stops the server.
pub struct FakeClerk {
    /// `http://127.0.0.1:PORT`, the Backend API base URL (append `/v1/jwks`).
    pub url: String,
    /// The only secret key `/v1/jwks` accepts.
    pub secret_key: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

struct Shared {
    secret_key: String,
    state: Mutex<State>,
    /// JWKS requests received; a watch so `wait_for_fetches` cannot miss a wake-up.
    fetches: watch::Sender<usize>,
}

struct State {
    /// Every key ever created, so tests can mint with retired ones.
    keys: Vec<Arc<SigningKey>>,
    /// Kids served in the JWKS, in publication order.
    published: Vec<String>,
    current: Arc<SigningKey>,
    failure: Failure,
    /// Session statuses served by `GET /v1/sessions/{id}`.
    sessions: std::collections::HashMap<String, String>,
    /// Failure injection for the sessions endpoint alone.
    session_failure: Failure,
    /// `GET /v1/sessions/{id}` requests received.
    session_fetches: usize,
}

impl FakeClerk {
    /// Binds `127.0.0.1:0` and starts serving with one key, `ins_fake_1`.
    pub async fn start() -> FakeClerk {
        let key = Arc::new(new_key("ins_fake_1"));
        let secret_key = format!("sk_test_fake_{}", random_hex(16));
        let shared = Arc::new(Shared {
            secret_key: secret_key.clone(),
            state: Mutex::new(State {
                keys: vec![key.clone()],
                published: vec![key.kid().to_owned()],
                current: key,
                failure: Failure::None,
                sessions: Default::default(),
                session_failure: Failure::None,
                session_fetches: 0,
            }),
            fetches: watch::Sender::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(serve(listener, shared.clone(), shutdown_rx));
        FakeClerk {
            url: format!("http://{addr}"),
            secret_key,
            shared,
            shutdown,
        }
    }

    /// The `iss` of tokens this instance mints.
    pub fn issuer(&self) -> &str {
        ISSUER
    }

    /// `pk_test_` + base64(`<frontend api>$`), clerk-protocol.md §2.5.
    pub fn publishable_key(&self) -> String {
        format!("pk_test_{}", STANDARD.encode(format!("{FRONTEND_API}$")))
    }

    /// Mints `claims` with the current key and Clerk's header.
    pub fn mint(&self, claims: Value) -> String {
        self.current().mint(&claims)
    }

    /// A valid 60-second session token for `sub`, issued now.
    pub fn session_token(&self, sub: &str) -> String {
        self.mint(self.claims(sub))
    }

    /// The claims [`FakeClerk::session_token`] would mint, for a test to modify first.
    pub fn claims(&self, sub: &str) -> Value {
        session_claims(ISSUER, sub, super::now(), 60)
    }

    /// Signs with the current key under an arbitrary (possibly forged) header.
    pub fn sign(&self, header: Value, claims: Value) -> String {
        self.current().sign(&header, &claims)
    }

    /// Creates key `ins_fake_N`, publishes it alongside the existing ones and mints with it
    /// from now on. Returns its kid.
    pub fn rotate(&self) -> String {
        let kid = format!("ins_fake_{}", self.state().keys.len() + 1);
        // Generated outside the lock: RSA key generation takes a noticeable fraction of a second.
        let key = Arc::new(new_key(&kid));
        let mut state = self.state();
        state.keys.push(key.clone());
        state.published.push(kid.clone());
        state.current = key;
        kid
    }

    /// Stops publishing `kid` (tokens already minted with it stay valid JWTs).
    pub fn retire(&self, kid: &str) {
        self.state().published.retain(|published| published != kid);
    }

    /// The key with this kid, published or not. Panics on an unknown kid (a test bug).
    pub fn key(&self, kid: &str) -> Arc<SigningKey> {
        self.state()
            .keys
            .iter()
            .find(|key| key.kid() == kid)
            .cloned()
            .unwrap_or_else(|| panic!("fake Clerk has no key {kid:?}"))
    }

    /// Makes both JWKS endpoints misbehave from the next request on.
    pub fn fail(&self, failure: Failure) {
        self.state().failure = failure;
    }

    /// JWKS requests received so far: `GET /v1/jwks` and `GET /.well-known/jwks.json`, counted
    /// on arrival, so unauthorised, failed and hanging ones are included.
    pub fn jwks_fetches(&self) -> usize {
        *self.shared.fetches.borrow()
    }

    /// Waits until at least `n` JWKS requests arrived; `false` if `timeout` passed first.
    pub async fn wait_for_fetches(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.shared.fetches.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|fetches| *fetches >= n)).await,
            Ok(Ok(_))
        )
    }

    /// Sets the status `GET /v1/sessions/{sid}` reports (unknown sessions are 404).
    pub fn set_session(&self, sid: &str, status: &str) {
        self.state()
            .sessions
            .insert(sid.to_owned(), status.to_owned());
    }

    /// Makes `GET /v1/sessions/{id}` misbehave (independently of the JWKS endpoints).
    pub fn fail_sessions(&self, failure: Failure) {
        self.state().session_failure = failure;
    }

    /// `GET /v1/sessions/{id}` requests received so far.
    pub fn session_fetches(&self) -> usize {
        self.state().session_fetches
    }

    /// The instance's webhook signing secret (`whsec_...`), fixed per process.
    pub fn webhook_secret(&self) -> &'static str {
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    }

    /// Signs a webhook delivery as Svix would: the `svix-signature` header value.
    pub fn sign_webhook(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        clerkgate::webhook::signature::WebhookSecret::parse(self.webhook_secret())
            .expect("valid secret")
            .sign(id, timestamp, body)
    }

    fn current(&self) -> Arc<SigningKey> {
        self.state().current.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }
}

impl Drop for FakeClerk {
    fn drop(&mut self) {
        // Stops the accept loop, closes idle connections and releases hanging requests.
        self.shutdown.send_replace(true);
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not turn every later assertion into a poison error.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn new_key(kid: &str) -> SigningKey {
    SigningKey::generate(kid).expect("generate an RSA-2048 signing key")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("system RNG");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            () = stopped(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let handler_shutdown = conn_shutdown.clone();
            let service = service_fn(move |request| {
                handle(request, shared.clone(), handler_shutdown.clone())
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopped(&mut conn_shutdown) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// Resolves once the fake is dropped. The watch guard is released before returning, so the
/// caller's future stays `Send`.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which is a shutdown as well.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = request.uri().path();
    if let Some(sid) = path.strip_prefix("/v1/sessions/") {
        return Ok(session(&request, sid, &shared, &mut shutdown).await);
    }
    let needs_secret = match path {
        "/v1/jwks" => true,
        "/.well-known/jwks.json" => false,
        _ => {
            return Ok(clerk_error(
                StatusCode::NOT_FOUND,
                "resource_not_found",
                "not found",
                &format!("No resource at {path}"),
            ));
        }
    };
    if request.method() != Method::GET {
        return Ok(clerk_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
            "The JWKS endpoints only accept GET.",
        ));
    }
    shared.fetches.send_modify(|fetches| *fetches += 1);

    // Injected failures model Clerk being unwell, which happens before it looks at credentials.
    let failure = shared.state().failure.clone();
    match failure {
        Failure::None => {}
        Failure::Status(code) => {
            let status = StatusCode::from_u16(code).expect("Failure::Status needs a valid status");
            return Ok(clerk_error(
                status,
                "internal_clerk_error",
                "Oops, an unexpected error occurred",
                "There was an internal error on our servers. We've been notified and are working on fixing it.",
            ));
        }
        Failure::Hang => {
            // Answered only so the connection can close once the fake is dropped.
            stopped(&mut shutdown).await;
            return Ok(clerk_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "fake Clerk stopped",
                "The fake Clerk was dropped while this request hung.",
            ));
        }
        Failure::Body(bytes) => return Ok(json_response(StatusCode::OK, Bytes::from(bytes))),
        Failure::RetryAfter(seconds) => {
            let mut response = clerk_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests",
                "Too many requests, retry later.",
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
            return Ok(response);
        }
    }

    if needs_secret {
        let expected = format!("Bearer {}", shared.secret_key);
        let presented = request.headers().get(AUTHORIZATION);
        if presented.map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
            return Ok(clerk_error(
                StatusCode::UNAUTHORIZED,
                "clerk_key_invalid",
                "Secret Key is invalid",
                "The provided Clerk Secret Key is invalid. Make sure that your Clerk Secret Key is correct.",
            ));
        }
    }

    let body = {
        let state = shared.state();
        let published = state
            .published
            .iter()
            .filter_map(|kid| state.keys.iter().find(|key| key.kid() == kid));
        jwks_json(published.map(Arc::as_ref))
    };
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}

/// Clerk's Backend API error shape.
fn clerk_error(
    status: StatusCode,
    code: &str,
    message: &str,
    long_message: &str,
) -> Response<Full<Bytes>> {
    let body = json!({
        "errors": [{"code": code, "message": message, "long_message": long_message, "meta": {}}],
        "clerk_trace_id": "fake-trace",
    });
    json_response(status, Bytes::from(body.to_string()))
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `GET /v1/sessions/{id}`: secret required, failure injection, statuses set by the test.
async fn session(
    request: &Request<Incoming>,
    sid: &str,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Response<Full<Bytes>> {
    let (failure, status) = {
        let mut state = shared.state();
        state.session_fetches += 1;
        (
            state.session_failure.clone(),
            state.sessions.get(sid).cloned(),
        )
    };
    match failure {
        Failure::None => {}
        Failure::Status(code) => {
            let status = StatusCode::from_u16(code).expect("valid status");
            return clerk_error(status, "internal_clerk_error", "error", "injected failure");
        }
        Failure::Hang => {
            stopped(shutdown).await;
            return clerk_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "stopped",
                "stopped",
            );
        }
        Failure::Body(bytes) => return json_response(StatusCode::OK, Bytes::from(bytes)),
        Failure::RetryAfter(seconds) => {
            let mut response = clerk_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests",
                "Too many requests, retry later.",
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
    }
    let expected = format!("Bearer {}", shared.secret_key);
    if request
        .headers()
        .get(AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        != Some(expected.as_bytes())
    {
        return clerk_error(
            StatusCode::UNAUTHORIZED,
            "clerk_key_invalid",
            "Secret Key is invalid",
            "invalid",
        );
    }
    match status {
        Some(status) => json_response(
            StatusCode::OK,
            Bytes::from(
                json!({"object": "session", "id": sid, "status": status, "user_id": "user_1"})
                    .to_string(),
            ),
        ),
        None => clerk_error(
            StatusCode::NOT_FOUND,
            "resource_not_found",
            "not found",
            "No session",
        ),
    }
}
