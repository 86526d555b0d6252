//! `clerkgate dev`: the zero-setup local mode.
//!
//! It generates an RSA signing key in memory, serves it as a JWKS from a tiny local stand-in for
//! Clerk's Backend API (`/v1/jwks`, bearer-protected like the real one), starts the built-in
//! echo upstream (or points at `--upstream`), and runs the *production* proxy against them: the
//! key store fetches the JWKS over HTTP exactly as it would from api.clerk.com, and every token
//! goes through the same verifier. Only the key source differs.
//!
//! The same key server mints tokens (`POST /dev/mint`), which is how `clerkgate dev --mint
//! user_123` prints a token for the running instance.

pub mod echo;
pub mod signing;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::config::{Config, ConfigError};
use crate::secret::Secret;
use crate::server::{ConnInfo, Handler};
use signing::SigningKey;

/// The Frontend API host of the dev instance; tokens carry `iss = https://<host>`.
pub const DEV_FRONTEND_API: &str = "dev.clerkgate.localhost";

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Proxy address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin address (/livez, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Address of the local key server (JWKS and token minting).
    #[arg(long, default_value = "127.0.0.1:9099")]
    pub keys_listen: SocketAddr,
    /// Address of the local Clerk API (`POST /v1/tokens/verify` works in dev mode; user and
    /// session routes need a real Clerk instance).
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub local_api_listen: SocketAddr,
    /// Your own upstream instead of the built-in echo server.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Do not serve: ask the running dev instance for a token for this user id and print it.
    #[arg(long, value_name = "USER_ID")]
    pub mint: Option<String>,
    /// Extra claims (a JSON object) for minted tokens, e.g. '{"o":{"id":"org_1","rol":"admin"}}'.
    #[arg(long, value_name = "JSON")]
    pub claims: Option<String>,
    /// Lifetime of minted tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
}

/// The publishable key of the dev instance.
pub fn dev_publishable_key() -> String {
    use base64::Engine;
    format!(
        "pk_test_{}",
        base64::engine::general_purpose::STANDARD.encode(format!("{DEV_FRONTEND_API}$"))
    )
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Body of `POST /dev/mint`.
#[derive(Debug, Deserialize, serde::Serialize)]
struct MintRequest {
    sub: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    claims: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The local stand-in for Clerk: JWKS plus minting.
pub struct DevClerk {
    key: SigningKey,
    secret_key: String,
    issuer: String,
    default_ttl: u64,
}

impl DevClerk {
    pub fn new(default_ttl: u64) -> Result<Self, signing::SigningError> {
        Ok(Self {
            key: SigningKey::generate("ins_clerkgate_dev")?,
            secret_key: format!("sk_test_clerkgate_dev_{:016x}", rand_u64()),
            issuer: format!("https://{DEV_FRONTEND_API}"),
            default_ttl,
        })
    }

    pub fn mint(
        &self,
        sub: &str,
        ttl: u64,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> String {
        let mut claims = signing::session_claims(&self.issuer, sub, now_s(), ttl);
        if let (Some(extra), Some(obj)) = (extra, claims.as_object_mut()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        self.key.mint(&claims)
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    u64::from_le_bytes(b)
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

impl Handler for DevClerk {
    type Body = Full<Bytes>;

    async fn handle(&self, req: Request<Incoming>, _conn: ConnInfo) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/v1/jwks") => {
                let want = format!("Bearer {}", self.secret_key);
                if req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    != Some(want.as_str())
                {
                    return json(
                        StatusCode::UNAUTHORIZED,
                        r#"{"errors":[{"code":"clerk_key_invalid","message":"secret key invalid","long_message":"The secret key is invalid."}]}"#.into(),
                    );
                }
                json(StatusCode::OK, signing::jwks_json([&self.key]))
            }
            (&Method::POST, "/dev/mint") => {
                let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => {
                        return json(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            r#"{"error":"too large"}"#.into(),
                        );
                    }
                };
                let Ok(mint) = serde_json::from_slice::<MintRequest>(&body) else {
                    return json(
                        StatusCode::BAD_REQUEST,
                        r#"{"error":"expected {\"sub\": \"user_...\"}"}"#.into(),
                    );
                };
                let token = self.mint(
                    &mint.sub,
                    mint.ttl_seconds.unwrap_or(self.default_ttl),
                    mint.claims.as_ref(),
                );
                json(
                    StatusCode::OK,
                    serde_json::json!({ "jwt": token }).to_string(),
                )
            }
            _ => json(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"resource_not_found","message":"not found"}]}"#.into(),
            ),
        }
    }
}

/// Runs `clerkgate dev` (or, with `--mint`, asks a running one for a token).
pub async fn run(args: DevArgs, file: Option<PathBuf>) -> ExitCode {
    let extra = match args
        .claims
        .as_deref()
        .map(serde_json::from_str::<serde_json::Map<String, serde_json::Value>>)
    {
        None => None,
        Some(Ok(map)) => Some(map),
        Some(Err(e)) => {
            eprintln!("clerkgate dev: --claims must be a JSON object: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE);
        }
    };
    if let Some(sub) = &args.mint {
        return mint_remote(&args, sub, extra).await;
    }

    // The user's file and CLERKGATE_* settings (routes, headers, log) apply; the Clerk instance
    // is replaced by the local one.
    let mut config: Config = match Config::figment(file.as_deref(), std::env::vars())
        .and_then(|f| Config::extract(&f))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clerkgate: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE);
        }
    };
    let clerk = match DevClerk::new(args.ttl) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("clerkgate dev: cannot generate a signing key: {e}");
            return ExitCode::FAILURE;
        }
    };
    let keys_listener = match tokio::net::TcpListener::bind(args.keys_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "clerkgate dev: cannot bind the key server on {}: {e}",
                args.keys_listen
            );
            return ExitCode::FAILURE;
        }
    };
    let keys_addr = keys_listener.local_addr().unwrap_or(args.keys_listen);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    tokio::spawn(crate::server::serve(
        keys_listener,
        None,
        crate::server::Limits::default(),
        clerk.clone(),
        stopped(stop_rx.clone()),
    ));

    let (upstream, echo) = match &args.upstream {
        Some(u) => (u.clone(), false),
        None => match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => {
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tokio::spawn(echo::serve(
                    l,
                    echo::Recorder::new(100),
                    stopped(stop_rx.clone()),
                ));
                (format!("http://{addr}"), true)
            }
            Err(e) => {
                eprintln!("clerkgate dev: cannot start the echo upstream: {e}");
                return ExitCode::FAILURE;
            }
        },
    };

    config.proxy.listen = args.listen;
    config.proxy.upstream = upstream.clone();
    config.admin.listen = args.admin_listen;
    config.local_api.listen = args.local_api_listen;
    config.clerk = crate::clerk::Config {
        secret_key: Some(Secret::new(clerk.secret_key())),
        publishable_key: Some(dev_publishable_key()),
        api_url: format!("http://{keys_addr}"),
        ..crate::clerk::Config::default()
    };
    config.shutdown.delay_seconds = 0;
    // Human-readable logs unless the user asked for JSON explicitly.
    if std::env::var_os("CLERKGATE_LOG__FORMAT").is_none() && file.is_none() {
        config.log.format = crate::telemetry::LogFormat::Text;
    }
    if let Err(e) = config.validate() {
        eprintln!("clerkgate: {e}");
        return ExitCode::from(ConfigError::EXIT_CODE);
    }
    crate::telemetry::init_logging(&config.log);
    tracing::warn!(
        "DEVELOPMENT MODE: in-memory signing key and local JWKS; never use this in production"
    );

    let listeners = match crate::app::Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("clerkgate dev: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    let proxy_addr = listeners.proxy.local_addr().unwrap_or(args.listen);
    let admin_addr = listeners.admin.local_addr().unwrap_or(args.admin_listen);
    let local_api_addr = listeners
        .local_api
        .as_ref()
        .and_then(|l| l.local_addr().ok());
    let app = match crate::app::App::build(config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("clerkgate: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE);
        }
    };
    let token = clerk.mint("user_dev_123", args.ttl, extra.as_ref());
    print_banner(
        proxy_addr,
        admin_addr,
        local_api_addr,
        keys_addr,
        &upstream,
        echo,
        &token,
        args.ttl,
    );
    let result = app.run(listeners, crate::shutdown::signal()).await;
    let _ = stop_tx.send(true);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clerkgate dev: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn print_banner(
    proxy: SocketAddr,
    admin: SocketAddr,
    local_api: Option<SocketAddr>,
    keys: SocketAddr,
    upstream: &str,
    echo: bool,
    token: &str,
    ttl: u64,
) {
    let line = "=".repeat(78);
    let upstream_note = if echo { " (built-in echo)" } else { "" };
    let local_api_line = local_api
        .map(|a| format!("local API http://{a}/v1/tokens/verify\n"))
        .unwrap_or_default();
    // The banner is a convenience: a closed stdout (`clerkgate dev | head`) must not stop the
    // proxy, so write errors are ignored instead of panicking like println! would.
    let _ = writeln!(
        std::io::stdout().lock(),
        "{line}\n  clerkgate DEVELOPMENT MODE: in-memory signing key, local JWKS.\n  \
         NOT FOR PRODUCTION: anyone who can reach {keys} can mint tokens.\n{line}\n\
         proxy     http://{proxy}  ->  {upstream}{upstream_note}\n\
         admin     http://{admin}/readyz   http://{admin}/metrics\n\
         jwks      http://{keys}/v1/jwks\n{local_api_line}\n\
         Try it (token for user_dev_123, valid {ttl} s):\n\n  \
         curl -s -H 'Authorization: Bearer {token}' http://{proxy}/hello\n\n\
         Without a token the proxy answers 401:\n\n  curl -i http://{proxy}/hello\n\n\
         Mint more tokens while this runs:\n\n  \
         clerkgate dev --mint user_123\n  \
         clerkgate dev --mint user_123 --claims '{{\"v\":2,\"o\":{{\"id\":\"org_1\",\"rol\":\"admin\",\"slg\":\"acme\"}}}}'\n\n\
         Stop with Ctrl-C.\n{line}"
    );
}

async fn mint_remote(
    args: &DevArgs,
    sub: &str,
    claims: Option<serde_json::Map<String, serde_json::Value>>,
) -> ExitCode {
    let body = MintRequest {
        sub: sub.to_owned(),
        ttl_seconds: Some(args.ttl),
        claims,
    };
    let url = format!("http://{}/dev/mint", args.keys_listen);
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clerkgate dev: {e}");
            return ExitCode::FAILURE;
        }
    };
    let resp = match client.post(&url).json(&body).send().await {
        Ok(r) => r,
        Err(_) => {
            eprintln!(
                "clerkgate dev: no dev instance answers at {url}; start one with `clerkgate dev` first"
            );
            return ExitCode::FAILURE;
        }
    };
    match resp.json::<serde_json::Value>().await {
        Ok(v) if v.get("jwt").and_then(|j| j.as_str()).is_some() => {
            let _ = writeln!(
                std::io::stdout().lock(),
                "{}",
                v["jwt"].as_str().unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("clerkgate dev: unexpected answer from {url}");
            ExitCode::FAILURE
        }
    }
}
