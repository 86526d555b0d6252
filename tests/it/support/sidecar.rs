//! Runs the real clerkgate library (config, key store, proxy, admin) on `127.0.0.1:0`, in front
//! of a recording echo upstream, against a fake Clerk. Each test owns its instances.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clerkgate::app::{App, Listeners};
use clerkgate::config::Config;
use clerkgate::dev::echo::{self, Recorded, Recorder};
use clerkgate::telemetry::Metrics;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{FakeClerk, eventually, http};

/// The recording echo upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    pub recorder: Recorder,
    _stop: oneshot::Sender<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let recorder = Recorder::new(1000);
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(echo::serve(listener, recorder.clone(), async move {
            let _ = rx.await;
        }));
        Upstream {
            addr,
            recorder,
            _stop: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.recorder.count()
    }

    /// The last request received (panics when none: a test asserting on it expects one).
    pub fn last(&self) -> Recorded {
        self.recorder
            .last()
            .expect("the upstream received a request")
    }
}

/// A running clerkgate.
pub struct Sidecar {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The local API's listener (bound always; served only when the config enables it).
    pub local_api: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

/// The TOML that points clerkgate at a fake Clerk and an upstream.
pub fn base_toml(clerk: &FakeClerk, upstream: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:1"
[clerk]
secret_key = "{secret}"
publishable_key = "{pk}"
api_url = "{api}"
jwks_fetch_timeout_seconds = 2
[shutdown]
delay_seconds = 0
drain_timeout_seconds = 5
[log]
format = "text"
level = "warn"
"#,
        secret = clerk.secret_key,
        pk = clerk.publishable_key(),
        api = clerk.url,
    )
}

/// Builds a configuration from the base plus test-specific TOML (merged key by key).
pub fn config(base: &str, extra: &str) -> Result<Config, clerkgate::config::ConfigError> {
    // An in-process sidecar serves on the test's own runtime: the default per-core mode would
    // start a runtime thread per CPU for every sidecar (and the runtime tests count those
    // threads). The per-core default is exercised by the tests that run the binary, and
    // tests/it/runtime.rs asks for it explicitly.
    let figment = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::string("[proxy]\nruntime = \"multi-thread\"\n"))
        .merge(Toml::string(base))
        .merge(Toml::string(extra));
    Config::from_figment(&figment)
}

impl Sidecar {
    /// Starts clerkgate against `clerk` and `upstream` with extra TOML, and waits until ready.
    pub async fn start(clerk: &FakeClerk, upstream: &Upstream, extra: &str) -> Sidecar {
        let s = Self::start_config(
            config(&base_toml(clerk, &upstream.url()), extra).expect("valid config"),
        )
        .await;
        assert!(
            s.wait_ready(Duration::from_secs(10)).await,
            "clerkgate became ready"
        );
        s
    }

    /// Starts clerkgate with a complete configuration, without waiting for readiness.
    pub async fn start_config(config: Config) -> Sidecar {
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let local_api = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind local api");
        let proxy_addr = proxy.local_addr().expect("proxy addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let local_api_addr = local_api.local_addr().expect("local api addr");
        let app = App::build(config).expect("app builds");
        let metrics = app.metrics.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            let listeners = Listeners {
                proxy,
                admin,
                local_api: Some(local_api),
            };
            app.run(listeners, async move {
                let _ = rx.await;
            })
            .await
            .expect("clerkgate ran");
        });
        Sidecar {
            proxy: proxy_addr,
            admin: admin_addr,
            local_api: local_api_addr,
            metrics,
            stop: Some(tx),
            join: Some(join),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// A URL on the local API listener.
    pub fn local_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.local_api)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Status of GET /readyz (0 when the admin listener does not answer).
    pub async fn readyz(&self) -> u16 {
        http()
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Polls /readyz until 200 or the timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        eventually(timeout, async || self.readyz().await == 200).await
    }

    /// The Prometheus text from /metrics.
    pub async fn metrics_text(&self) -> String {
        http()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics body")
    }

    /// [`sample`] of the live /metrics text, panicking with the text when the series is absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// Triggers the drain sequence and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(join) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(15), join)
                .await
                .expect("clerkgate stopped in time")
                .expect("clerkgate task did not panic");
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// An HTTP client for tests: no environment proxy, bounded waits.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client builds")
}

/// The value of one sample (name plus labels exactly as exported) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
