//! An in-process fake of the Clerk endpoints clerkgate talks to, on `127.0.0.1:0`.
//!
//! It serves the Backend API JWKS (`GET /v1/jwks`, `Authorization: Bearer <secret>` required,
//! clerk-protocol.md §2.4) and the Frontend-API-style `GET /.well-known/jwks.json` (no auth),
//! mints tokens with its current key, rotates and retires keys, fails on demand and counts
//! fetches, so tests can assert how often the code under test went to "Clerk".
//!
//! It also serves the users and sessions part of the Backend API the local API maps to
//! (clerk-protocol.md §3): `GET/PATCH/DELETE /v1/users/{id}`, `PATCH`/`PUT
//! /v1/users/{id}/metadata`, `GET /v1/users`, `GET /v1/users/count`, `POST
//! /v1/users/{id}/{ban,unban,lock,unlock}`, `GET /v1/users/{id}/organization_memberships`,
//! `GET /v1/sessions`, `POST /v1/sessions/{id}/revoke`, `POST /v1/sessions`, `POST
//! /v1/sessions/{id}/tokens[/{template}]`, `POST /v1/sessions/{id}/verify`, with calls counted
//! per [`Endpoint`], the query, body and `Clerk-API-Version` of the last call kept, failure
//! injection ([`FakeClerk::fail_api`], [`FakeClerk::fail_user`]) and a gate that holds answers
//! until released ([`FakeClerk::hold_api`]). Those endpoints are off until
//! [`FakeClerk::enable_backend_api`], so a fresh fake still answers 404 on every other path.
//!
//! And the machine-token verification endpoints (clerk-beyond-sessions.md §A.3, without `/v1`
//! as the SDK calls them): `POST /api_keys/verify`, `POST /m2m_tokens/verify`,
//! `POST /oauth_applications/access_tokens/verify`. Answers are set per token
//! ([`FakeClerk::machine_answer`]), every call is recorded ([`FakeClerk::machine_calls`]), and
//! [`FakeClerk::fail_machine`] / [`FakeClerk::hold_api`] inject failures and delays.
//!
//! One fake per test: it is started before the code under test and shut down when dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use clerkgate::dev::signing::{SigningKey, jwks_json, session_claims};
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::env::random_hex;

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

/// The users and sessions endpoints of the fake Backend API, for counting calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /v1/users/{id}`
    UsersGet,
    /// `GET /v1/users`
    UsersList,
    /// `PATCH /v1/users/{id}`
    UsersUpdate,
    /// `PATCH /v1/users/{id}/metadata`
    UsersMetadata,
    /// `DELETE /v1/users/{id}`
    UsersDelete,
    /// `GET /v1/sessions`
    SessionsList,
    /// `POST /v1/sessions/{id}/revoke`
    SessionsRevoke,
    /// `POST /v1/sessions`
    SessionsCreate,
    /// `GET /v1/users/count`
    UsersCount,
    /// `PUT /v1/users/{id}/metadata`
    UsersMetadataReplace,
    /// `POST /v1/users/{id}/ban`, `unban`, `lock`, `unlock`
    UsersModerate,
    /// `GET /v1/users/{id}/organization_memberships`
    UsersMemberships,
    /// `POST /v1/sessions/{id}/tokens[/{template}]`
    SessionsToken,
    /// `POST /v1/sessions/{id}/verify`
    SessionsVerify,
}

/// A Clerk-like User object (the fields a test usually looks at; timestamps in ms).
pub fn user_json(id: &str, first_name: &str) -> Value {
    json!({
        "object": "user",
        "id": id,
        "external_id": null,
        "username": null,
        "first_name": first_name,
        "last_name": "Tester",
        "image_url": "https://img.clerk.com/fake",
        "primary_email_address_id": format!("idn_{id}"),
        "email_addresses": [{"id": format!("idn_{id}"), "object": "email_address", "email_address": format!("{id}@example.com"), "verification": null, "linked_to": []}],
        "public_metadata": {},
        "private_metadata": {},
        "unsafe_metadata": {},
        "banned": false,
        "locked": false,
        "created_at": 1_716_883_200_000u64,
        "updated_at": 1_716_883_200_000u64,
    })
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
    /// Users and sessions API calls received, per endpoint (a watch, for `wait_for_calls`).
    api_calls: watch::Sender<HashMap<Endpoint, usize>>,
    /// While `true`, users and sessions API answers wait.
    hold: watch::Sender<bool>,
    /// Whether the users and sessions API is served at all.
    backend_api: std::sync::atomic::AtomicBool,
    /// The machine-token verification endpoints.
    machine: Mutex<MachineState>,
}

/// One recorded call to a machine-token verification endpoint.
#[derive(Debug, Clone)]
pub struct MachineCall {
    /// `/api_keys/verify`, `/m2m_tokens/verify` or `/oauth_applications/access_tokens/verify`.
    pub path: String,
    pub authorization: Option<String>,
    pub api_version: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct MachineState {
    /// Status and body per token value.
    answers: HashMap<String, (u16, Value)>,
    calls: Vec<MachineCall>,
    failure: Option<Failure>,
    /// Also accepted as the bearer of `/m2m_tokens/verify`.
    machine_secret: Option<String>,
}

/// A Clerk-like API key object (`POST /api_keys/verify` answer).
pub fn api_key_json(id: &str, subject: &str, scopes: &[&str]) -> Value {
    json!({
        "object": "api_key", "id": id, "type": "api_key", "subject": subject,
        "name": "ci key", "description": null, "claims": null, "scopes": scopes,
        "revoked": false, "revocation_reason": null, "expired": false, "expiration": null,
        "created_by": null, "last_used_at": null,
        "created_at": 1_716_883_200_000u64, "updated_at": 1_716_883_200_000u64,
    })
}

/// A Clerk-like M2M token object (`POST /m2m_tokens/verify` answer).
pub fn m2m_json(id: &str, subject: &str, scopes: &[&str]) -> Value {
    json!({
        "object": "machine_to_machine_token", "id": id, "subject": subject, "claims": null,
        "scopes": scopes, "revoked": false, "revocation_reason": null, "expired": false,
        "expiration": null, "last_used_at": null,
        "created_at": 1_716_883_200_000u64, "updated_at": 1_716_883_200_000u64,
    })
}

/// A Clerk-like OAuth access token object (`POST /oauth_applications/access_tokens/verify`).
pub fn oauth_json(id: &str, client_id: &str, subject: &str, scopes: &[&str]) -> Value {
    json!({
        "object": "clerk_idp_oauth_access_token", "id": id, "client_id": client_id,
        "subject": subject, "scopes": scopes, "revoked": false, "revocation_reason": null,
        "expired": false, "expiration": null,
        "created_at": 1_716_883_200_000u64, "updated_at": 1_716_883_200_000u64,
    })
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
    /// Users served by the users endpoints, by id.
    users: BTreeMap<String, Value>,
    /// The user of each session (`user_1` when unset).
    session_users: HashMap<String, String>,
    /// Failure injection for the users and sessions API endpoints (not `GET /v1/sessions/{id}`).
    api_failure: Failure,
    /// How many more calls `api_failure` applies to; `None` for all of them.
    api_failures_left: Option<usize>,
    /// Query string and JSON body of the last call per endpoint.
    last_query: HashMap<Endpoint, String>,
    last_body: HashMap<Endpoint, Value>,
    /// Sessions created by `POST /v1/sessions`.
    created_sessions: usize,
    /// `Clerk-API-Version` of the last call per endpoint.
    last_version: HashMap<Endpoint, String>,
    /// Users whose `GET /v1/users/{id}` always answers this status (Clerk-shaped).
    user_failures: HashMap<String, u16>,
    /// Organization memberships per user: `(org id, role)`, in order.
    memberships: BTreeMap<String, Vec<(String, String)>>,
    /// JWT templates `POST /v1/sessions/{id}/tokens/{template}` knows.
    templates: Vec<String>,
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
                users: BTreeMap::new(),
                session_users: HashMap::new(),
                api_failure: Failure::None,
                api_failures_left: None,
                last_query: HashMap::new(),
                last_body: HashMap::new(),
                created_sessions: 0,
                last_version: HashMap::new(),
                user_failures: HashMap::new(),
                memberships: BTreeMap::new(),
                templates: Vec::new(),
            }),
            fetches: watch::Sender::new(0),
            api_calls: watch::Sender::new(HashMap::new()),
            hold: watch::Sender::new(false),
            backend_api: std::sync::atomic::AtomicBool::new(false),
            machine: Mutex::new(MachineState::default()),
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

    /// Serves the users and sessions API from now on (off by default: those paths are 404, and
    /// `/v1/sessions/{id}/revoke` reaches the `GET /v1/sessions/{id}` handler, as before).
    pub fn enable_backend_api(&self) {
        self.shared
            .backend_api
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Adds or replaces a user (keyed by its `id`).
    pub fn set_user(&self, user: Value) {
        let id = user["id"].as_str().expect("a user has an id").to_owned();
        self.state().users.insert(id, user);
    }

    /// Removes a user, as a deletion in Clerk's dashboard would.
    pub fn remove_user(&self, id: &str) {
        self.state().users.remove(id);
    }

    /// The user as the fake holds it now.
    pub fn user(&self, id: &str) -> Option<Value> {
        self.state().users.get(id).cloned()
    }

    /// Adds a session of `user_id` with `status` (served by every sessions endpoint).
    pub fn add_session(&self, sid: &str, user_id: &str, status: &str) {
        let mut state = self.state();
        state.sessions.insert(sid.to_owned(), status.to_owned());
        state
            .session_users
            .insert(sid.to_owned(), user_id.to_owned());
    }

    /// The status of a session as the fake holds it now.
    pub fn session_status(&self, sid: &str) -> Option<String> {
        self.state().sessions.get(sid).cloned()
    }

    /// Calls received by a users or sessions API endpoint, counted on arrival (failed, held
    /// and hanging ones included).
    pub fn calls(&self, endpoint: Endpoint) -> usize {
        self.shared
            .api_calls
            .borrow()
            .get(&endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `endpoint` received at least `n` calls; `false` if `timeout` passed first.
    pub async fn wait_for_calls(&self, endpoint: Endpoint, n: usize, timeout: Duration) -> bool {
        let mut rx = self.shared.api_calls.subscribe();
        matches!(
            tokio::time::timeout(
                timeout,
                rx.wait_for(|calls| calls.get(&endpoint).copied().unwrap_or(0) >= n)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// The query string of the last call to `endpoint`.
    pub fn last_query(&self, endpoint: Endpoint) -> Option<String> {
        self.state().last_query.get(&endpoint).cloned()
    }

    /// The JSON body of the last call to `endpoint`.
    pub fn last_body(&self, endpoint: Endpoint) -> Option<Value> {
        self.state().last_body.get(&endpoint).cloned()
    }

    /// The `Clerk-API-Version` header of the last call to `endpoint`.
    pub fn last_api_version(&self, endpoint: Endpoint) -> Option<String> {
        self.state().last_version.get(&endpoint).cloned()
    }

    /// Makes `GET /v1/users/{id}` of this user always answer `status` in Clerk's error shape.
    pub fn fail_user(&self, id: &str, status: u16) {
        self.state().user_failures.insert(id.to_owned(), status);
    }

    /// Makes `user_id` a member of `org_id` with `role`.
    pub fn add_membership(&self, user_id: &str, org_id: &str, role: &str) {
        self.state()
            .memberships
            .entry(user_id.to_owned())
            .or_default()
            .push((org_id.to_owned(), role.to_owned()));
    }

    /// Defines a JWT template for `POST /v1/sessions/{id}/tokens/{name}`.
    pub fn add_jwt_template(&self, name: &str) {
        self.state().templates.push(name.to_owned());
    }

    /// Forgets every user, session, membership, template and per-user failure (call counters
    /// and last calls are kept), so a test can replay a scenario from the same state.
    pub fn reset_backend_api(&self) {
        let mut state = self.state();
        state.users.clear();
        state.sessions.clear();
        state.session_users.clear();
        state.created_sessions = 0;
        state.user_failures.clear();
        state.memberships.clear();
        state.templates.clear();
    }

    /// Makes every users and sessions API endpoint misbehave from the next call on.
    pub fn fail_api(&self, failure: Failure) {
        let mut state = self.state();
        state.api_failure = failure;
        state.api_failures_left = None;
    }

    /// Makes the next `n` users and sessions API calls misbehave, then answers normally again.
    pub fn fail_api_times(&self, failure: Failure, n: usize) {
        let mut state = self.state();
        state.api_failure = failure;
        state.api_failures_left = Some(n);
    }

    /// Holds every users and sessions API answer (calls are still counted on arrival) until
    /// [`FakeClerk::release_api`].
    pub fn hold_api(&self) {
        self.shared.hold.send_replace(true);
    }

    pub fn release_api(&self) {
        self.shared.hold.send_replace(false);
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

    /// What the machine verification endpoints answer for `token` (others get Clerk's 404).
    pub fn machine_answer(&self, token: &str, status: u16, body: Value) {
        self.machine()
            .answers
            .insert(token.to_owned(), (status, body));
    }

    /// Every machine verification call so far, in order.
    pub fn machine_calls(&self) -> Vec<MachineCall> {
        self.machine().calls.clone()
    }

    /// Makes the machine verification endpoints misbehave (`Failure::None` to stop).
    pub fn fail_machine(&self, failure: Failure) {
        self.machine().failure = Some(failure);
    }

    /// A machine secret key `/m2m_tokens/verify` accepts as its bearer.
    pub fn set_machine_secret(&self, secret: &str) {
        self.machine().machine_secret = Some(secret.to_owned());
    }

    fn machine(&self) -> MutexGuard<'_, MachineState> {
        self.shared
            .machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
    let path = request.uri().path().to_owned();
    if let Some(endpoint) = api_endpoint(request.method(), &path)
        && shared.backend_api.load(std::sync::atomic::Ordering::SeqCst)
    {
        return Ok(api(request, endpoint, &path, &shared, &mut shutdown).await);
    }
    if request.method() == Method::POST
        && matches!(
            path.as_str(),
            "/api_keys/verify" | "/m2m_tokens/verify" | "/oauth_applications/access_tokens/verify"
        )
    {
        return Ok(machine_verify(request, &path, &shared, &mut shutdown).await);
    }
    let path = path.as_str();
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
    if let Some(response) = injected(failure, &mut shutdown).await {
        return Ok(response);
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
/// The response an injected failure calls for, or `None` to answer normally.
async fn injected(
    failure: Failure,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Response<Full<Bytes>>> {
    match failure {
        Failure::None => None,
        Failure::Status(code) => {
            let status = StatusCode::from_u16(code).expect("Failure::Status needs a valid status");
            Some(clerk_error(
                status,
                "internal_clerk_error",
                "Oops, an unexpected error occurred",
                "There was an internal error on our servers. We've been notified and are working on fixing it.",
            ))
        }
        Failure::Hang => {
            // Answered only so the connection can close once the fake is dropped.
            stopped(shutdown).await;
            Some(clerk_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "fake Clerk stopped",
                "The fake Clerk was dropped while this request hung.",
            ))
        }
        Failure::Body(bytes) => Some(json_response(StatusCode::OK, Bytes::from(bytes))),
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
            Some(response)
        }
    }
}

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
    if let Some(response) = injected(failure, shutdown).await {
        return response;
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
                json!({"object": "session", "id": sid, "status": status, "user_id": shared.state().session_users.get(sid).map_or("user_1", String::as_str)})
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

/// Which users or sessions API endpoint a request is for (`GET /v1/sessions/{id}` is not one:
/// it keeps its own counter and failure switch).
fn api_endpoint(method: &Method, path: &str) -> Option<Endpoint> {
    let segments: Vec<&str> = path.strip_prefix("/v1/")?.split('/').collect();
    Some(match (method, segments.as_slice()) {
        (&Method::GET, ["users"]) => Endpoint::UsersList,
        (&Method::GET, ["users", "count"]) => Endpoint::UsersCount,
        (&Method::PUT, ["users", _, "metadata"]) => Endpoint::UsersMetadataReplace,
        (&Method::POST, ["users", _, "ban" | "unban" | "lock" | "unlock"]) => {
            Endpoint::UsersModerate
        }
        (&Method::GET, ["users", _, "organization_memberships"]) => Endpoint::UsersMemberships,
        (&Method::POST, ["sessions", _, "tokens"] | ["sessions", _, "tokens", _]) => {
            Endpoint::SessionsToken
        }
        (&Method::POST, ["sessions", _, "verify"]) => Endpoint::SessionsVerify,
        (&Method::GET, ["users", _]) => Endpoint::UsersGet,
        (&Method::PATCH, ["users", _]) => Endpoint::UsersUpdate,
        (&Method::DELETE, ["users", _]) => Endpoint::UsersDelete,
        (&Method::PATCH, ["users", _, "metadata"]) => Endpoint::UsersMetadata,
        (&Method::GET, ["sessions"]) => Endpoint::SessionsList,
        (&Method::POST, ["sessions"]) => Endpoint::SessionsCreate,
        (&Method::POST, ["sessions", _, "revoke"]) => Endpoint::SessionsRevoke,
        _ => return None,
    })
}

/// Every value of `key` (also as `key[]`) in a query string.
fn query_values(query: &str, key: &str) -> Vec<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == key || k.strip_suffix("[]") == Some(key))
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// A list request's `limit` (10 by default) and `offset` (0), as the Backend API pages.
fn page(query: &str) -> (usize, usize) {
    let number = |key, default| {
        query_values(query, key)
            .first()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    (number("limit", 10), number("offset", 0))
}

/// The `GET /v1/users` and `/v1/users/count` filters the fake knows: `user_id`,
/// `email_address` (any of them) and `query` (a substring of the id or first name).
fn user_matches(user: &Value, query: &str) -> bool {
    let ids = query_values(query, "user_id");
    let emails = query_values(query, "email_address");
    let text = query_values(query, "query");
    let id = user["id"].as_str().unwrap_or("");
    let first_name = user["first_name"].as_str().unwrap_or("");
    let has_email = |wanted: &String| {
        user["email_addresses"].as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["email_address"].as_str() == Some(wanted))
        })
    };
    (ids.is_empty() || ids.iter().any(|w| w == id))
        && (emails.is_empty() || emails.iter().any(has_email))
        && text
            .iter()
            .all(|t| id.contains(t.as_str()) || first_name.contains(t.as_str()))
}

/// A Clerk-like OrganizationMembership of `user` in `org`.
fn membership_json(user: &Value, org: &str, role: &str) -> Value {
    let user_id = user["id"].as_str().unwrap_or("");
    json!({
        "object": "organization_membership",
        "id": format!("orgmem_{org}_{user_id}"),
        "role": role,
        "role_name": role.trim_start_matches("org:"),
        "permissions": [],
        "public_metadata": {},
        "private_metadata": {},
        "created_at": 1_716_883_200_000u64,
        "updated_at": 1_716_883_200_000u64,
        "organization": {
            "object": "organization",
            "id": org,
            "name": org,
            "slug": org,
            "image_url": "https://img.clerk.com/org",
            "has_image": false,
            "created_by": user_id,
            "created_at": 1_716_883_200_000u64,
            "updated_at": 1_716_883_200_000u64,
            "public_metadata": {},
            "private_metadata": {},
            "max_allowed_memberships": 5,
            "admin_delete_enabled": true,
            "members_count": 1,
        },
        "public_user_data": {
            "user_id": user_id,
            "first_name": user["first_name"],
            "last_name": user["last_name"],
            "image_url": user["image_url"],
            "has_image": false,
            "identifier": format!("{user_id}@example.com"),
        },
    })
}

fn not_found(what: &str) -> Response<Full<Bytes>> {
    clerk_error(
        StatusCode::NOT_FOUND,
        "resource_not_found",
        "not found",
        &format!("No {what} was found with the given id."),
    )
}

fn ok_json(value: &Value) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, Bytes::from(value.to_string()))
}

fn session_json(state: &State, sid: &str) -> Option<Value> {
    let status = state.sessions.get(sid)?;
    Some(json!({
        "object": "session",
        "id": sid,
        "user_id": state.session_users.get(sid).map_or("user_1", String::as_str),
        "client_id": "client_fake",
        "status": status,
        "last_active_at": 1_716_883_200_000u64,
        "expire_at": 1_717_488_000_000u64,
        "created_at": 1_716_883_200_000u64,
        "updated_at": 1_716_883_200_000u64,
    }))
}

/// Merges `patch` into `target` as `PATCH /v1/users/{id}/metadata` does: objects deep-merged,
/// `null` deletes a key.
fn deep_merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else if v.is_object() && t.get(k).is_some_and(Value::is_object) {
                    deep_merge(t.get_mut(k).expect("present"), v);
                } else {
                    t.insert(k.clone(), v.clone());
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// The users and sessions API: counted on arrival, then held, failed or answered.
async fn api(
    request: Request<Incoming>,
    endpoint: Endpoint,
    path: &str,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Response<Full<Bytes>> {
    let authorized = request
        .headers()
        .get(AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        == Some(format!("Bearer {}", shared.secret_key).as_bytes());
    let query = request.uri().query().unwrap_or("").to_owned();
    let version = request
        .headers()
        .get("clerk-api-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body =
        match tokio::time::timeout(Duration::from_secs(5), request.into_body().collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            _ => Bytes::new(),
        };
    let json_body: Option<Value> = serde_json::from_slice(&body).ok();
    let failure = {
        let mut state = shared.state();
        state.last_query.insert(endpoint, query.clone());
        state.last_version.insert(endpoint, version);
        if let Some(b) = &json_body {
            state.last_body.insert(endpoint, b.clone());
        }
        match state.api_failures_left {
            Some(0) => Failure::None,
            Some(n) => {
                state.api_failures_left = Some(n - 1);
                state.api_failure.clone()
            }
            None => state.api_failure.clone(),
        }
    };
    shared
        .api_calls
        .send_modify(|calls| *calls.entry(endpoint).or_insert(0) += 1);

    // Held answers wait for the release (or for the fake to be dropped).
    let mut hold = shared.hold.subscribe();
    tokio::select! {
        _ = hold.wait_for(|held| !*held) => {}
        () = stopped(shutdown) => {}
    }

    if let Some(response) = injected(failure, shutdown).await {
        return response;
    }
    if !authorized {
        return clerk_error(
            StatusCode::UNAUTHORIZED,
            "clerk_key_invalid",
            "Secret Key is invalid",
            "invalid",
        );
    }

    let segments: Vec<&str> = path["/v1/".len()..].split('/').collect();
    let id = segments.get(1).copied().unwrap_or("");
    let user_failure = if endpoint == Endpoint::UsersGet {
        shared.state().user_failures.get(id).copied()
    } else {
        None
    };
    if let Some(status) = user_failure {
        return injected(Failure::Status(status), shutdown)
            .await
            .expect("a status failure answers");
    }
    let mut state = shared.state();
    match endpoint {
        Endpoint::UsersGet => match state.users.get(id) {
            Some(user) => ok_json(user),
            None => not_found("user"),
        },
        Endpoint::UsersList => {
            let (limit, offset) = page(&query);
            let users: Vec<Value> = state
                .users
                .values()
                .filter(|u| user_matches(u, &query))
                .skip(offset)
                .take(limit)
                .cloned()
                .collect();
            ok_json(&Value::Array(users))
        }
        Endpoint::UsersCount => {
            let n = state
                .users
                .values()
                .filter(|u| user_matches(u, &query))
                .count();
            ok_json(&json!({"object": "total_count", "total_count": n}))
        }
        Endpoint::UsersModerate => {
            let action = segments.get(2).copied().unwrap_or("");
            let Some(user) = state.users.get_mut(id) else {
                return not_found("user");
            };
            match action {
                "ban" => user["banned"] = json!(true),
                "unban" => user["banned"] = json!(false),
                "lock" => user["locked"] = json!(true),
                _ => user["locked"] = json!(false),
            }
            user["updated_at"] = json!(user["updated_at"].as_u64().unwrap_or(0) + 1);
            let user = user.clone();
            if action == "ban" {
                // Clerk revokes a banned user's sessions.
                let theirs: Vec<String> = state
                    .session_users
                    .iter()
                    .filter(|(_, u)| u.as_str() == id)
                    .map(|(sid, _)| sid.clone())
                    .collect();
                for sid in theirs {
                    state.sessions.insert(sid, "revoked".to_owned());
                }
            }
            ok_json(&user)
        }
        Endpoint::UsersMemberships => {
            let Some(user) = state.users.get(id) else {
                return not_found("user");
            };
            let all = state.memberships.get(id).cloned().unwrap_or_default();
            let (limit, offset) = page(&query);
            let data: Vec<Value> = all
                .iter()
                .skip(offset)
                .take(limit)
                .map(|(org, role)| membership_json(user, org, role))
                .collect();
            ok_json(&json!({"data": data, "total_count": all.len()}))
        }
        Endpoint::SessionsToken => {
            let template = segments.get(3).copied();
            let Some(user) = state
                .sessions
                .contains_key(id)
                .then(|| state.session_users.get(id).map_or("user_1", String::as_str))
            else {
                return not_found("session");
            };
            if let Some(template) = template
                && !state.templates.iter().any(|t| t == template)
            {
                return not_found("JWT template");
            }
            let lifetime = json_body
                .as_ref()
                .and_then(|b| b["expires_in_seconds"].as_u64())
                .unwrap_or(60);
            // Fixed times, so the same call always mints the same token.
            let iat = 1_716_883_200u64;
            let mut claims = json!({"iss": ISSUER, "sub": user, "sid": id, "iat": iat, "nbf": iat - 10, "exp": iat + lifetime});
            if let Some(template) = template {
                claims["template"] = json!(template);
            }
            let jwt = state.current.mint(&claims);
            ok_json(&json!({"object": "token", "jwt": jwt}))
        }
        Endpoint::SessionsVerify => {
            if json_body
                .as_ref()
                .and_then(|b| b["token"].as_str())
                .is_none_or(str::is_empty)
            {
                return clerk_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "form_param_missing",
                    "missing",
                    "token is required.",
                );
            }
            match session_json(&state, id) {
                Some(session) => ok_json(&session),
                None => not_found("session"),
            }
        }
        Endpoint::UsersUpdate | Endpoint::UsersMetadata | Endpoint::UsersMetadataReplace => {
            let Some(Value::Object(patch)) = json_body else {
                return clerk_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "form_param_format_invalid",
                    "is invalid",
                    "The request body is not a JSON object.",
                );
            };
            let Some(user) = state.users.get_mut(id) else {
                return not_found("user");
            };
            for (k, v) in &patch {
                let metadata = matches!(
                    k.as_str(),
                    "public_metadata" | "private_metadata" | "unsafe_metadata"
                );
                if endpoint == Endpoint::UsersMetadata {
                    if metadata {
                        deep_merge(&mut user[k.as_str()], v);
                    }
                } else if endpoint == Endpoint::UsersMetadataReplace {
                    if metadata {
                        user[k.as_str()] = v.clone();
                    }
                } else if !metadata && k != "id" && k != "object" {
                    user[k.as_str()] = v.clone();
                }
            }
            user["updated_at"] = json!(user["updated_at"].as_u64().unwrap_or(0) + 1);
            ok_json(user)
        }
        Endpoint::UsersDelete => match state.users.remove(id) {
            Some(_) => ok_json(&json!({"object": "user", "id": id, "deleted": true})),
            None => not_found("user"),
        },
        Endpoint::SessionsList => {
            let user = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "user_id")
                .map(|(_, v)| v.into_owned());
            let Some(user) = user else {
                return clerk_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "form_param_missing",
                    "missing",
                    "Either user_id or client_id is required.",
                );
            };
            let mut ids: Vec<&String> = state
                .sessions
                .keys()
                .filter(|sid| state.session_users.get(*sid) == Some(&user))
                .collect();
            ids.sort();
            let sessions: Vec<Value> = ids
                .into_iter()
                .filter_map(|sid| session_json(&state, sid))
                .collect();
            ok_json(&Value::Array(sessions))
        }
        Endpoint::SessionsRevoke => {
            if !state.sessions.contains_key(id) {
                return not_found("session");
            }
            state.sessions.insert(id.to_owned(), "revoked".to_owned());
            ok_json(&session_json(&state, id).expect("present"))
        }
        Endpoint::SessionsCreate => {
            let user = json_body
                .as_ref()
                .and_then(|b| b["user_id"].as_str())
                .map(str::to_owned);
            let Some(user) = user.filter(|u| state.users.contains_key(u)) else {
                return not_found("user");
            };
            state.created_sessions += 1;
            let sid = format!("sess_fake_created_{}", state.created_sessions);
            state.sessions.insert(sid.clone(), "active".to_owned());
            state.session_users.insert(sid.clone(), user);
            ok_json(&session_json(&state, &sid).expect("present"))
        }
    }
}

/// The machine verification endpoints: recorded, held, failed, or answered per token.
async fn machine_verify(
    request: Request<Incoming>,
    path: &str,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header("authorization");
    let api_version = header("clerk-api-version");
    let content_type = header("content-type");
    let body =
        match tokio::time::timeout(Duration::from_secs(5), request.into_body().collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            _ => Bytes::new(),
        };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let field = match path {
        "/api_keys/verify" => "secret",
        "/m2m_tokens/verify" => "token",
        _ => "access_token",
    };
    let token = body[field].as_str().unwrap_or("").to_owned();
    let (failure, answer, machine_secret) = {
        let mut m = shared
            .machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        m.calls.push(MachineCall {
            path: path.to_owned(),
            authorization: authorization.clone(),
            api_version,
            content_type,
            body,
        });
        (
            m.failure.clone().unwrap_or(Failure::None),
            m.answers.get(&token).cloned(),
            m.machine_secret.clone(),
        )
    };
    let mut hold = shared.hold.subscribe();
    tokio::select! {
        _ = hold.wait_for(|held| !*held) => {}
        () = stopped(shutdown) => {}
    }
    if let Some(response) = injected(failure, shutdown).await {
        return response;
    }
    let instance = format!("Bearer {}", shared.secret_key);
    let machine = machine_secret
        .filter(|_| path == "/m2m_tokens/verify")
        .map(|s| format!("Bearer {s}"));
    let authorized = authorization.as_deref() == Some(instance.as_str())
        || (machine.is_some() && authorization == machine);
    if !authorized {
        return clerk_error(
            StatusCode::UNAUTHORIZED,
            "clerk_key_invalid",
            "Secret Key is invalid",
            "invalid",
        );
    }
    match answer {
        Some((status, body)) => json_response(
            StatusCode::from_u16(status).expect("a valid status"),
            Bytes::from(body.to_string()),
        ),
        None => not_found("token"),
    }
}
