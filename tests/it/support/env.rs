//! One environment per test: a fake Clerk, the recording echo upstream and clerkgate between
//! them, with a reqwest client and the raw client, plus the token and header helpers the
//! security, hostile and property tests share.

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;

use super::raw::{self, Reply};
use super::{FakeClerk, Sidecar, Upstream, client};

/// A fake Clerk, a recording upstream and clerkgate between them. The upstream and clerkgate
/// belong to one test; the fake Clerk is shared (see [`shared_clerk`]) unless the test changes
/// it or counts its fetches ([`Env::start_own`]).
pub struct Env {
    pub clerk: Arc<FakeClerk>,
    pub upstream: Upstream,
    pub gate: Sidecar,
    /// One client per test: building one loads the TLS roots, which is not free.
    pub http: reqwest::Client,
}

/// The fake Clerk instance most tests verify against.
///
/// Generating its RSA key costs about a second in a debug build, which dominated the runtime
/// when every test made its own. Sharing it keeps tests independent as long as no test changes
/// it (rotation, failure injection) or asserts on its fetch count; tests that do use
/// [`Env::start_own`]. It is served from a runtime of its own because each `#[tokio::test]`
/// runtime, and every task spawned on it, ends with its test.
pub fn shared_clerk() -> Arc<FakeClerk> {
    static CLERK: OnceLock<Arc<FakeClerk>> = OnceLock::new();
    CLERK.get_or_init(start_detached).clone()
}

/// A second instance with the same kid (`ins_fake_1`) and issuer but its own key, for signing
/// cross-instance tokens. Nothing ever fetches from it.
pub fn other_instance() -> Arc<FakeClerk> {
    static OTHER: OnceLock<Arc<FakeClerk>> = OnceLock::new();
    OTHER.get_or_init(start_detached).clone()
}

fn start_detached() -> Arc<FakeClerk> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("shared fake Clerk runtime")
    });
    // `block_on` may not run on a test's runtime thread, so start the fake from another.
    std::thread::scope(|scope| {
        scope
            .spawn(|| Arc::new(runtime.block_on(FakeClerk::start())))
            .join()
            .expect("fake Clerk started")
    })
}

impl Env {
    /// clerkgate with `extra` TOML against the shared fake Clerk.
    pub async fn start(extra: &str) -> Env {
        Self::with_clerk(shared_clerk(), extra).await
    }

    /// clerkgate against a fake Clerk of this test's own (for tests that count JWKS fetches).
    pub async fn start_own(extra: &str) -> Env {
        Self::with_clerk(Arc::new(FakeClerk::start().await), extra).await
    }

    pub async fn with_clerk(clerk: Arc<FakeClerk>, extra: &str) -> Env {
        let upstream = Upstream::start().await;
        let gate = Sidecar::start(&clerk, &upstream, extra).await;
        Env {
            clerk,
            upstream,
            gate,
            http: client(),
        }
    }

    /// GET through reqwest with an optional bearer token and extra headers (appended, so a
    /// repeated name becomes repeated header lines).
    pub async fn get(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.get(self.gate.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.expect("clerkgate answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("response body").to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// `__session` (or another cookie string) as the only credential.
    pub async fn with_cookie(&self, path: &str, cookie: &str) -> Reply {
        self.get(path, None, &[("cookie", cookie)]).await
    }

    /// One GET written byte for byte on a fresh connection (`Connection: close` added), for
    /// request targets and header spellings reqwest would normalise.
    pub async fn raw_get(&self, target: &str, headers: &[(&str, &str)]) -> Reply {
        let request = raw::get_request(target, "app.example", headers);
        let mut replies = self.send(request.as_bytes()).await;
        assert_eq!(replies.len(), 1, "one response to {target}");
        replies.remove(0)
    }

    /// Writes `bytes` on a fresh connection and returns every response read until the server
    /// closes it (the bytes must end the exchange, e.g. with `Connection: close`).
    pub async fn send(&self, bytes: &[u8]) -> Vec<Reply> {
        raw::send_raw(self.gate.proxy, bytes).await
    }

    pub async fn stop(self) {
        self.gate.stop().await;
    }
}

/// Asserts a refusal: status and reason code.
#[track_caller]
pub fn assert_refused(reply: &Reply, status: u16, reason: &str, case: &str) {
    assert_eq!(
        (reply.status, reply.reason().as_str()),
        (status, reason),
        "{case}: {}",
        reply.text()
    );
}

/// Lower case with `_` read as `-`: how clerkgate, CGI, nginx and many frameworks compare
/// header names.
pub fn fold(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// The identity header names clerkgate reserves with the default `[headers]` section, folded,
/// written out here as the tests' own oracle (not read from the library). `x-clerk-*` is
/// reserved as a prefix besides.
pub const DEFAULT_RESERVED: &[&str] = &[
    "x-user-id",
    "x-session-id",
    "x-org-id",
    "x-org-role",
    "x-org-slug",
    "x-org-permissions",
    "x-actor-id",
];

/// A mapped claim header and an operator-reserved name (in a spelling to be folded), which
/// clients must not be able to set either.
pub const EXTRA_RESERVED: &str = r#"
[headers]
reserved = ["X_Tenant"]
[headers.claims]
"public_metadata.plan" = "X-Plan"
"#;

/// The names [`EXTRA_RESERVED`] adds, folded.
pub const EXTRA_RESERVED_NAMES: &[&str] = &["x-plan", "x-tenant"];

/// Whether only clerkgate may send `name` upstream: an `x-clerk-*` name, a default reserved
/// name, or one of `extra` (folded), compared folded.
pub fn is_reserved(name: &str, extra: &[&str]) -> bool {
    let f = fold(name);
    f.starts_with("x-clerk-")
        || DEFAULT_RESERVED.contains(&f.as_str())
        || extra.contains(&f.as_str())
}

/// The values of a header as text.
pub fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<non-text>"))
        .collect()
}

/// base64url without padding, the JWS encoding.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The base64url payload segment, which clerkgate forwards as `X-Clerk-Claims`.
pub fn payload_segment(token: &str) -> &str {
    token.split('.').nth(1).expect("a compact JWT")
}

/// `bytes` random bytes as lower-case hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("system RNG");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
