//! The upstream client: pooled keep-alive connections, http or https, bounded waits.
//!
//! Bodies stream in both directions (the inbound `Incoming` body is handed to the client as it
//! is). Failures are classified into closed kinds for the 502/504 mapping and the metric.

use std::time::Duration;

use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::telemetry::UpstreamErrorKind;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Incoming>;

/// Builds the pooled client for request bodies of type `B`. Fails only when the platform's TLS roots cannot be loaded.
pub fn client<B>(
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    ca_file: Option<&str>,
) -> std::io::Result<Client<HttpsConnector<HttpConnector>, B>>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = match ca_file {
        // A private CA for the upstream (a service mesh, an internal PKI): trust only it.
        Some(path) => HttpsConnectorBuilder::new().with_tls_config(private_roots(path)?),
        None => HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(std::io::Error::other)?,
    };
    let https = builder.https_or_http().enable_http1().wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(https))
}

/// A rustls client configuration trusting only the certificates in a PEM file.
fn private_roots(path: &str) -> std::io::Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .map_err(|e| std::io::Error::other(format!("{path}: {e}")))?
    {
        let cert = cert.map_err(|e| std::io::Error::other(format!("{path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| std::io::Error::other(format!("{path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(std::io::Error::other(format!(
            "{path}: no certificate found"
        )));
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Sorts a client error into a closed kind.
pub fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamErrorKind {
    if e.is_connect() {
        // A connect timeout surfaces as a connect error whose source mentions the timeout.
        let text = format!("{e:?}");
        if text.contains("Timeout") || text.contains("timed out") {
            UpstreamErrorKind::Timeout
        } else {
            UpstreamErrorKind::Connect
        }
    } else {
        UpstreamErrorKind::Protocol
    }
}
