//! Wiring: builds the services from a [`Config`], runs the listeners (proxy, admin and, when it
//! can serve, the local API) and the key refresh, and carries out the drain sequence. No request
//! logic lives here.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::admin::{Admin, Readiness};
use crate::auth::Authenticator;
use crate::auth::cache::TokenCache;
use crate::auth::gate::Gate;
use crate::auth::identity::IdentityBuilder;
use crate::auth::jwks::{JwksSettings, KeyStore};
use crate::auth::verify::Verifier;
use crate::clerk::api::BackendApi;
use crate::config::{Config, ConfigError};
use crate::fleet::{Fleet, FleetStore};
use crate::local_api::LocalApi;
use crate::proxy::Proxy;
use crate::revocations::{Guard, InMemoryStore, SessionStore};
use crate::router::Router;
use crate::runtime::{self, RuntimeKind};
use crate::server::{self, Limits};
use crate::telemetry::Metrics;
use crate::webhook::ledger::{LocalLedger, WebhookLedger};
use crate::webhook::{Forwarder, Webhooks};
use std::time::Duration;

/// The listeners, bound by the caller (`main` from the config, tests on port 0).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    /// The local API's; `None` when it does not run. A listener passed while the local API is
    /// disabled is closed at start.
    pub local_api: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses (the local API's only when it will run).
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let proxy = match config.proxy.runtime {
            RuntimeKind::PerCore => runtime::bind_reuseport(config.proxy.listen),
            RuntimeKind::MultiThread => TcpListener::bind(config.proxy.listen).await,
        }
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("proxy.listen {}: {e}", config.proxy.listen),
            )
        })?;
        let admin = TcpListener::bind(config.admin.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("admin.listen {}: {e}", config.admin.listen),
            )
        })?;
        let local_api = match config.local_api.serves(&config.clerk) {
            Ok(()) => Some(
                TcpListener::bind(config.local_api.listen)
                    .await
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("local_api.listen {}: {e}", config.local_api.listen),
                        )
                    })?,
            ),
            Err(_) => None,
        };
        Ok(Self {
            proxy,
            admin,
            local_api,
        })
    }
}

/// Everything built from the configuration, before anything listens.
pub struct App {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<KeyStore>,
    pub readiness: Arc<Readiness>,
    /// The proxy listener's handler: webhooks, forward-auth and the proxy behind it.
    pub router: Arc<Router>,
    /// The pod-local Clerk API, when enabled and a secret key is configured.
    pub local_api: Option<Arc<LocalApi>>,
    /// The shared fleet store's client, when `fleet.redis_url` is set.
    pub fleet: Option<Arc<Fleet>>,
}

/// Why the app could not start (beyond configuration errors).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Tls(String),
    /// The per-core runtimes could not get their proxy sockets or threads.
    #[error("proxy.runtime per-core: {0}")]
    Listen(std::io::Error),
}

impl App {
    pub fn build(config: Config) -> Result<App, ConfigError> {
        let metrics = Arc::new(Metrics::new());
        let instance = config.clerk.resolve()?;
        let keys = Arc::new(
            KeyStore::new(
                &instance,
                JwksSettings::from_config(&config.clerk),
                metrics.clone(),
            )
            .map_err(|e| ConfigError::new("clerk.jwt_key", e.to_string()))?,
        );
        let verifier = Verifier::new(
            instance.issuers.clone(),
            instance.authorized_parties.clone(),
            config.auth.allow_missing_azp,
            config.auth.clock_skew_ms,
            config.auth.pending_as_signed_out,
        );
        let auth = Arc::new(
            Authenticator::new(
                verifier,
                keys.clone(),
                TokenCache::new(config.auth.token_cache_capacity, config.auth.clock_skew_ms)
                    .with_eviction_counter(metrics.token_cache_evictions.clone()),
                IdentityBuilder::new(&config.headers)
                    .keep_claims(config.routes.iter().any(|r| r.needs_claims())),
                metrics.clone(),
            )
            .with_max_token_bytes(config.auth.max_token_bytes),
        );
        // Retain webhook ids well past the Svix tolerance window.
        let webhook_retention = crate::webhook::retention(&config.webhooks);
        let retention = config.sessions.retention();
        let local = Arc::new(InMemoryStore::new(retention, config.sessions.max_entries));
        let fleet = if config.fleet.enabled() {
            let issuer = instance.issuers.first().map_or("default", String::as_str);
            Some(Fleet::new(
                &config.fleet,
                issuer,
                local.clone(),
                retention,
                webhook_retention,
                metrics.clone(),
            )?)
        } else {
            None
        };
        // The fleet store also keeps the webhook ledger, so that its claims hold fleet-wide.
        let (store, ledger): (Arc<dyn SessionStore>, Option<Arc<dyn WebhookLedger>>) = match &fleet
        {
            Some(fleet) => {
                let ledger = LocalLedger::new(webhook_retention, config.sessions.max_entries);
                let store = Arc::new(FleetStore::new(local, ledger, fleet.clone()));
                (store.clone(), Some(store))
            }
            None => (local, None),
        };
        let api = match &instance.secret_key {
            Some(secret) => Some(Arc::new(
                BackendApi::new(
                    instance.api_url.clone(),
                    secret.clone(),
                    config.sessions.api_timeout().max(Duration::from_millis(1)),
                    config.sessions.api_budget_per_10s,
                    metrics.clone(),
                )
                .map_err(|e| ConfigError::new("clerk.api_url", format!("HTTP client: {e}")))?,
            )),
            None => None,
        };
        let sessions = Arc::new(Guard::new(
            &config.sessions,
            store,
            api.clone(),
            metrics.clone(),
        ));
        if let Some(fleet) = &fleet {
            fleet.attach(&sessions);
            if fleet.fail_closed() {
                sessions.fail_closed_on(fleet.link());
            }
        }
        // One Backend API client for the session checks, machine tokens and the local API:
        // Clerk's rate limit is per instance, so they share its budget and any Retry-After
        // pause.
        let machine = Arc::new(
            crate::auth::machine::MachineAuth::for_config(
                &config.machine,
                &config.headers,
                &auth,
                metrics.clone(),
            )
            .with_api(api.clone()),
        );
        // Every path that accepts a token (proxy, forward-auth, browser mode, the local API's
        // `tokens/verify`) goes through this one gate.
        let gate = Arc::new(Gate::new(
            auth,
            sessions.clone(),
            machine,
            instance.cookie_suffix.as_deref(),
            config.auth.accept_cookie,
            metrics.clone(),
        ));
        let browser = crate::browser::Browser::new(
            crate::browser::Sections {
                browser: &config.browser,
                cors: &config.cors,
                clerk: &config.clerk,
                accept_cookie: config.auth.accept_cookie,
                api_budget_per_10s: config.sessions.api_budget_per_10s,
                trust_forwarded: config.proxy.trust_forwarded_headers,
                encoded_slashes: config.proxy.encoded_slashes,
                connect_timeout: config.proxy.connect_timeout(),
                upstream_timeout: config.proxy.upstream_timeout(),
            },
            gate.clone(),
            api.clone(),
        );
        let local_api = match (config.local_api.serves(&config.clerk), api) {
            (Ok(()), Some(api)) => Some(Arc::new(LocalApi::new(
                &config.local_api,
                api,
                gate.clone(),
                sessions.clone(),
                metrics.clone(),
            ))),
            _ => None,
        };
        let proxy = Arc::new(
            Proxy::new(
                crate::proxy::Sections {
                    proxy: &config.proxy,
                    auth: &config.auth,
                    headers: &config.headers,
                    routes: &config.routes,
                    log: &config.log,
                },
                gate,
                metrics.clone(),
            )?
            .with_browser(browser),
        );
        // Verified events go upstream through the proxy's own upstream client.
        let forwarder = match &config.webhooks.forward_path {
            Some(path) => Some(Forwarder::new(
                config
                    .proxy
                    .upstream_base()?
                    .uri(path, None)
                    .map_err(|e| ConfigError::new("webhooks.forward_path", e.to_string()))?,
                proxy.upstream(),
                config.proxy.upstream_timeout(),
            )),
            None => None,
        };
        let ledger = ledger.unwrap_or_else(|| {
            Arc::new(LocalLedger::new(
                webhook_retention,
                config.sessions.max_entries,
            ))
        });
        let webhooks = Arc::new(Webhooks::new(
            &config.webhooks,
            forwarder,
            ledger,
            sessions.clone(),
            metrics.clone(),
        )?);
        let router = Arc::new(Router::new(
            proxy,
            webhooks,
            config.proxy.trust_request_id,
            &config.log,
            metrics.clone(),
        ));
        let mut readiness = Readiness::new(keys.clone());
        if let Some(fleet) = &fleet {
            readiness = readiness.with_fleet(fleet.link(), fleet.fail_closed());
        }
        let readiness = Arc::new(readiness);
        Ok(App {
            config,
            metrics,
            keys,
            readiness,
            router,
            local_api,
            fleet,
        })
    }

    /// Runs until `shutdown` resolves, then drains: readiness off, `shutdown.delay_seconds` of
    /// continued service, listeners closed, in-flight requests finished within the deadline.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AppError> {
        let tls = match (
            &self.config.proxy.tls_cert_path,
            &self.config.proxy.tls_key_path,
        ) {
            (Some(cert), Some(key)) => {
                Some(server::tls_acceptor(cert, key).map_err(AppError::Tls)?)
            }
            _ => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };

        let refresh = tokio::spawn({
            let keys = self.keys.clone();
            let rx = stop_rx.clone();
            async move {
                if let Err(e) = keys.refresh().await {
                    tracing::warn!(error = %e, "initial key fetch failed; not ready until keys load");
                }
                keys.run_refresh(stopped(rx)).await;
            }
        });
        let fleet_task = self
            .fleet
            .clone()
            .map(|fleet| tokio::spawn(fleet.run(stopped(stop_rx.clone()))));
        let drain_timeout = self.config.shutdown.drain_timeout();
        let extra = runtime::extra_proxy_runtimes(
            self.config.proxy.runtime,
            self.config.proxy.worker_threads,
        );
        let max_connections = self.config.proxy.max_connections;
        let proxy_limits = Limits {
            header_read_timeout: self.config.proxy.header_read_timeout(),
            max_header_bytes: self.config.proxy.max_header_bytes,
            max_connections,
            drain_timeout,
            // `proxy.max_connections` is the process's budget, however many runtimes accept.
            shared_permits: (extra > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(max_connections))),
        };
        let proxy_addr = listeners.proxy.local_addr().ok();
        let admin_addr = listeners.admin.local_addr().ok();
        let (proxy_listener, per_core) = if extra > 0 {
            per_core_listeners(listeners.proxy, extra).map_err(AppError::Listen)?
        } else {
            (listeners.proxy, Vec::new())
        };
        let per_core: Vec<_> = per_core
            .into_iter()
            .enumerate()
            .map(|(i, listener)| {
                spawn_per_core(
                    i + 1,
                    listener,
                    tls.clone(),
                    proxy_limits.clone(),
                    self.router.clone(),
                    stop_rx.clone(),
                )
            })
            .collect::<Result<_, _>>()
            .map_err(AppError::Listen)?;
        let proxy_server = tokio::spawn(server::serve(
            proxy_listener,
            tls,
            proxy_limits,
            self.router.clone(),
            stopped(stop_rx.clone()),
        ));
        let admin = Arc::new(Admin::new(
            self.readiness.clone(),
            self.metrics.clone(),
            self.keys.clone(),
        ));
        let admin_server = tokio::spawn(server::serve(
            listeners.admin,
            None,
            Limits {
                max_connections: 256,
                drain_timeout,
                ..Limits::default()
            },
            admin,
            stopped(stop_rx.clone()),
        ));
        let local_api_server = match (self.local_api.clone(), listeners.local_api) {
            (Some(handler), Some(listener)) => {
                let addr = listener.local_addr().ok();
                if !self.config.local_api.listen.ip().is_loopback() {
                    tracing::warn!(
                        listen = %self.config.local_api.listen,
                        "the local Clerk API listens beyond loopback; every request needs local_api.token"
                    );
                }
                tracing::info!(local_api = ?addr, "local Clerk API listening");
                Some(tokio::spawn(server::serve(
                    listener,
                    None,
                    Limits {
                        max_connections: 1024,
                        drain_timeout,
                        ..Limits::default()
                    },
                    handler,
                    stopped(stop_rx.clone()),
                )))
            }
            (Some(_), None) => {
                tracing::warn!("local Clerk API not started: no listener was bound for it");
                None
            }
            (None, _) => {
                if let Err(why) = self.config.local_api.serves(&self.config.clerk) {
                    tracing::info!(reason = why, "local Clerk API not started");
                }
                None
            }
        };
        let runtime_workers = tokio::runtime::Handle::current().metrics().num_workers() + extra;
        tracing::info!(proxy = ?proxy_addr, admin = ?admin_addr, upstream = %self.config.proxy.upstream, runtime_workers, runtime = ?self.config.proxy.runtime, "clerkgate listening");

        shutdown.await;
        self.readiness.start_draining();
        tracing::info!(
            delay_seconds = self.config.shutdown.delay_seconds,
            "draining: readiness is now 503"
        );
        tokio::time::sleep(self.config.shutdown.delay()).await;
        let _ = stop_tx.send(true);
        let mut left = proxy_server.await.unwrap_or(1) + admin_server.await.unwrap_or(1);
        for thread in per_core {
            // The per-core runtimes drain on the same signal and deadline as this one.
            left += tokio::task::spawn_blocking(move || thread.join().unwrap_or(1))
                .await
                .unwrap_or(1);
        }
        if let Some(server) = local_api_server {
            left += server.await.unwrap_or(1);
        }
        // A key fetch in flight (a hanging JWKS endpoint) must not hold the exit past the
        // drain deadline; the refresher keeps no state worth finishing.
        refresh.abort();
        if let Some(task) = fleet_task {
            task.abort();
        }
        let _ = refresh.await;
        if left > 0 {
            tracing::warn!("stopped with connections still open after the drain deadline");
        } else {
            tracing::info!("drained; bye");
        }
        Ok(())
    }
}

/// The proxy listener and `extra` more for the per-core runtimes: sockets of their own bound to
/// the same address when the listener has `SO_REUSEPORT` (as [`Listeners::bind`] makes it in
/// the per-core mode), otherwise duplicates of the one socket (a listener bound by a caller).
fn per_core_listeners(
    listener: TcpListener,
    extra: usize,
) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
    let addr = listener.local_addr()?;
    let main = listener.into_std()?;
    let mut others = Vec::with_capacity(extra);
    for _ in 0..extra {
        let own = runtime::bind_reuseport(addr).and_then(|l| l.into_std());
        others.push(match own {
            Ok(own) => own,
            Err(_) => main.try_clone()?,
        });
    }
    Ok((TcpListener::from_std(main)?, others))
}

/// Starts per-core runtime `index` on its own thread, serving the proxy on `listener` until
/// `stop` turns true. Joining the thread gives the connections left after its drain.
fn spawn_per_core(
    index: usize,
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    router: Arc<Router>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<usize>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("clerkgate-rt-{index}"))
        .spawn(move || {
            runtime::set_worker(index);
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, index, "per-core runtime cannot listen");
                        return 0;
                    }
                };
                let stopped = async move {
                    let _ = stop.wait_for(|v| *v).await;
                };
                server::serve(listener, tls, limits, router, stopped).await
            })
        })
}
