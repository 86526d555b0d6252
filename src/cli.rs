//! The command line: `serve` (default), `check-config`, `dev`, `healthcheck`.
//!
//! Exit codes: 0 success, 64 (EX_USAGE) for a bad configuration or command line, 1 for a runtime
//! failure (a port in use, TLS files unreadable), and for `healthcheck` 1 when not ready.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError};

/// Exit code for configuration errors (sysexits EX_USAGE).
pub const EXIT_CONFIG: u8 = ConfigError::EXIT_CODE;

#[derive(Debug, Parser)]
#[command(
    name = "clerkgate",
    version,
    about = "Authentication sidecar for Clerk session tokens"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// TOML configuration file (default: $CLERKGATE_CONFIG, else built-in defaults plus env).
    #[arg(long, global = true, env = "CLERKGATE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Serve,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Zero-setup local mode: in-memory signing key, local JWKS, built-in echo upstream.
    Dev(crate::dev::DevArgs),
    /// Probe this instance's admin /readyz; exit 0 when ready, 1 otherwise (for Docker HEALTHCHECK).
    Healthcheck {
        /// Readiness URL (default: http://127.0.0.1:<admin port>/readyz from the configuration).
        #[arg(long)]
        url: Option<String>,
    },
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.config.clone();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match load(file.as_deref()) {
            Ok(config) => runtime_with(
                crate::runtime::main_runtime_threads(
                    config.proxy.runtime,
                    config.proxy.worker_threads,
                ),
                serve(config),
            ),
            Err(e) => config_error(&e),
        },
        Command::CheckConfig => match load(file.as_deref()) {
            Ok(config) => {
                let _ = std::io::Write::write_all(
                    &mut std::io::stdout().lock(),
                    config.to_redacted_toml().as_bytes(),
                );
                eprintln!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Dev(args) => runtime(crate::dev::run(args, file)),
        Command::Healthcheck { url } => {
            let url = match url {
                Some(u) => u,
                None => match Config::figment(file.as_deref(), std::env::vars()).and_then(|f| {
                    f.extract_inner::<crate::admin::Config>("admin")
                        .map_err(|e| ConfigError::new("admin", e.to_string()))
                }) {
                    Ok(admin) => {
                        let mut addr = admin.listen;
                        if addr.ip().is_unspecified() {
                            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                        }
                        format!("http://{addr}/readyz")
                    }
                    Err(e) => return config_error(&e),
                },
            };
            runtime(async move {
                match probe(&url).await {
                    Ok(200) => ExitCode::SUCCESS,
                    Ok(status) => {
                        eprintln!("not ready: {url} answered {status}");
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("not ready: {url}: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// Loads file plus process environment.
pub fn load(file: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    Config::load(file, std::env::vars())
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("clerkgate: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime<F: std::future::Future<Output = ExitCode>>(f: F) -> ExitCode {
    runtime_with(0, f)
}

/// `workers`: 0 = one per CPU this process may use, more = that many. One worker is a
/// current-thread runtime: no work-stealing bookkeeping and no wakeups between threads. On one
/// pinned core that carried 17.7k proxied req/s at 41 us CPU each, against 10.7k at 67 us for a
/// one-worker multi-thread runtime (`bench/run.py`, cached token).
fn runtime_with<F: std::future::Future<Output = ExitCode>>(workers: usize, f: F) -> ExitCode {
    let workers = crate::runtime::worker_count(workers);
    let built = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    match built {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("clerkgate: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let (otel, layer) = match crate::telemetry::otel::Exporter::start(&config.tracing) {
        Ok(Some((exporter, layer))) => (Some(exporter), Some(layer)),
        Ok(None) => (None, None),
        Err(e) => return config_error(&e),
    };
    crate::telemetry::init_logging_with(&config.log, layer);
    if config.clerk.jwt_key.is_none()
        && config.clerk.secret_key.is_none()
        && config.clerk.jwks_url.is_none()
    {
        tracing::info!(
            "no secret key: fetching keys from the Frontend API's /.well-known/jwks.json"
        );
    }
    let listeners = match crate::app::Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot bind");
            eprintln!("clerkgate: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    let app = match crate::app::App::build(config) {
        Ok(app) => app,
        Err(e) => return config_error(&e),
    };
    let ran = app.run(listeners, crate::shutdown::signal()).await;
    // After the drain: the last requests' spans have ended.
    if let Some(otel) = otel {
        otel.shutdown().await;
    }
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "clerkgate failed");
            eprintln!("clerkgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A minimal HTTP/1.1 GET over plain TCP: the healthcheck must work in an image without CA
/// roots or a shell.
pub async fn probe(url: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".into());
    }
    let authority = uri
        .authority()
        .ok_or("URL needs a host")?
        .as_str()
        .to_owned();
    let addr = if authority.contains(':') {
        authority.clone()
    } else {
        format!("{authority}:80")
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: clerkgate-healthcheck\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let read = stream
                .read(&mut buf[n..])
                .await
                .map_err(|e| e.to_string())?;
            if read == 0 {
                break;
            }
            n += read;
        }
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        head.split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| "not an HTTP response".to_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), io)
        .await
        .map_err(|_| "timed out".to_owned())?
}
