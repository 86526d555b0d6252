//! The accept loop shared by the listeners.
//!
//! Takes a bound listener and a shutdown future (mini-redis style): `main` binds the configured
//! addresses, tests bind `127.0.0.1:0`. HTTP/1.1 and HTTP/2 (h2c, or ALPN under TLS) through
//! hyper-util's auto builder, with upgrades. Limits: a connection cap (a semaphore: excess
//! connections wait in the kernel's accept queue instead of costing memory), a header-read
//! timeout against slowloris, and a cap on the request head size.
//!
//! On shutdown the loop stops accepting, asks every connection to finish its in-flight requests
//! (HTTP/1 keep-alive is disabled, HTTP/2 gets GOAWAY), and waits up to the drain deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's IP as header text (`X-Forwarded-For`), formatted once per connection.
    pub peer_ip: http::HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = http::HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is header text");
        Self { peer, tls, peer_ip }
    }
}

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    type Body: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Self::Body>> + Send;
}

/// Connection limits for one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    /// One budget of `max_connections` shared by several listeners of one address (the
    /// per-core runtimes' sockets); `None`: this listener counts its own.
    pub shared_permits: Option<Arc<Semaphore>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 1024,
            drain_timeout: Duration::from_secs(25),
            shared_permits: None,
        }
    }
}

/// Serves until `shutdown` resolves, then drains. Returns how many connections were still open
/// when the drain deadline passed (0 after a clean drain).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
) -> usize {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        // Detect dead HTTP/2 peers instead of holding their connection slot forever.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let permits = limits
        .shared_permits
        .clone()
        .unwrap_or_else(|| Arc::new(Semaphore::new(limits.max_connections)));
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        let builder = builder.clone();
        let info = ConnInfo::new(peer, tls.is_some());
        // Set by the first request: until then the connection lives on the header-read deadline.
        let started = Arc::new(AtomicBool::new(false));
        let first = started.clone();
        let service = hyper::service::service_fn(move |req| {
            first.store(true, Ordering::Relaxed);
            let handler = handler.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(handler.handle(req, info).await) }
        });
        let deadline = limits.header_read_timeout;
        match &tls {
            None => {
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _permit = permit;
                    first_request_deadline(conn, &started, deadline).await;
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let stream = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        _ => return,
                    };
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    first_request_deadline(watcher.watch(conn), &started, deadline).await;
                });
            }
        }
    }
    drop(listener);
    match tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await {
        Ok(()) => 0,
        Err(_) => {
            tracing::warn!("drain deadline passed with connections still open");
            1
        }
    }
}

/// Drives a connection, closing it if no complete request arrived within `deadline`.
///
/// hyper's HTTP/1 header-read timeout starts only once hyper-util's auto builder has decided
/// between HTTP/1 and HTTP/2, which needs the first bytes: a client that connects and sends
/// nothing (or a partial HTTP/2 preface) would otherwise hold a connection slot forever.
async fn first_request_deadline<F, E>(conn: F, started: &AtomicBool, deadline: Duration)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        r = &mut conn => r,
        _ = tokio::time::sleep(deadline) => {
            if !started.load(Ordering::Relaxed) {
                tracing::debug!("no request within the header-read timeout; closing");
                return;
            }
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::trace!(error = %e, "connection ended with an error");
    }
}

/// Loads a rustls server config from PEM files, with ALPN for h2 and http/1.1.
pub fn tls_acceptor(cert_path: &str, key_path: &str) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("{cert_path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{cert_path}: no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| format!("{key_path}: {e}"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{cert_path}: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
