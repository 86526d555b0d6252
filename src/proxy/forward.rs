//! The upstream connection's parts around the pools ([`super::pool`], [`super::pool_h2`]):
//! the connector (TCP, TLS, ALPN), the streamed response body that hands its connection back,
//! and the closed kinds failures are classified into for the 502/504 mapping and the metric.

use std::time::Duration;

use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::pool::{Lease, PoolError};
use crate::telemetry::{Metrics, UpstreamErrorKind};

/// The application protocols offered to an https upstream by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alpn {
    /// `http/1.1` only.
    Http1,
    /// `h2` only.
    H2,
    /// `h2`, then `http/1.1`.
    Both,
}

/// [`connector`], offering `alpn` to https upstreams.
pub(crate) fn connector_for(
    connect_timeout: Duration,
    ca_file: Option<&str>,
    alpn: Alpn,
) -> std::io::Result<HttpsConnector<HttpConnector>> {
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
    let builder = builder.https_or_http();
    Ok(match alpn {
        Alpn::Http1 => builder.enable_http1().wrap_connector(http),
        Alpn::H2 => builder.enable_http2().wrap_connector(http),
        Alpn::Both => builder.enable_all_versions().wrap_connector(http),
    })
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

/// The upstream's response body, streamed to the client as it arrives. The head has been
/// forwarded by then, so a break-off (a reset, a chunked body cut short) can only reach the
/// client as a broken body; it is counted here as an upstream protocol error.
///
/// It holds the lease of its upstream connection and hands the connection back to the pool
/// once the body has ended; a body dropped before its end retires the connection instead.
pub struct UpstreamBody {
    inner: Incoming,
    metrics: Arc<Metrics>,
    lease: Option<Lease>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, metrics: Arc<Metrics>, lease: Lease) -> Self {
        let mut body = Self {
            inner,
            metrics,
            lease: Some(lease),
        };
        body.release_if_ended();
        body
    }

    fn release_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(lease) = self.lease.take()
        {
            lease.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                self.metrics
                    .upstream_errors
                    .inc(UpstreamErrorKind::Protocol);
                tracing::debug!(error = %e, "upstream response broke off after the head");
                // The connection is in no state to be reused.
                self.lease = None;
            }
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
            }
            Poll::Ready(Some(Ok(_))) => self.release_if_ended(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether the exchange failed because the client's own request body failed (invalid chunked
/// framing, a body shorter than its Content-Length): the client's fault, not the upstream's.
pub(crate) fn is_client_body_error(e: &PoolError) -> bool {
    matches!(e, PoolError::ClientBody(_)) || e.chain().any(is_failing_request_body)
}

/// hyper reports a failing request body as a user error (`User(Body)`) whose source is the
/// inbound body's own hyper error: bad chunked framing, a short body, or the client going away
/// mid-body.
fn is_failing_request_body(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<hyper::Error>().is_some_and(|h| {
        h.is_user() && std::error::Error::source(h).is_some_and(|inner| inner.is::<hyper::Error>())
    })
}

/// Sorts an exchange error into a closed kind.
pub(crate) fn classify(e: &PoolError) -> UpstreamErrorKind {
    match e {
        PoolError::Connect(_) if e.chain().any(is_timeout) => UpstreamErrorKind::Timeout,
        PoolError::Connect(_) => UpstreamErrorKind::Connect,
        PoolError::Send(_) | PoolError::ClientBody(_) => UpstreamErrorKind::Protocol,
    }
}

/// The connector's timeout surfaces as an io::Error of kind TimedOut somewhere in the source
/// chain (its text is only `Elapsed(())`).
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        || err.is::<tokio::time::error::Elapsed>()
}
