//! https upstreams: verified against `proxy.upstream_ca_path`, refused when the certificate is not
//! trusted.

use std::sync::Arc;

use bytes::Bytes;
use clerkgate::server::{ConnInfo, Handler, Limits, serve, tls_acceptor};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::support::sidecar::{base_toml, config};
use crate::support::{FakeClerk, Sidecar, client};

/// An https upstream that answers with the `x-user-id` it received.
struct TlsEcho;

impl Handler for TlsEcho {
    type Body = Full<Bytes>;
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Full<Bytes>> {
        let user = req
            .headers()
            .get("x-user-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Response::new(Full::new(Bytes::from(format!(
            "tls={} user={user}",
            conn.tls
        ))))
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("clerkgate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start_tls_upstream(dir: &std::path::Path) -> (u16, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.join("upstream.crt");
    let key_path = dir.join("upstream.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let acceptor = tls_acceptor(cert_path.to_str().unwrap(), key_path.to_str().unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve(
        listener,
        Some(acceptor),
        Limits::default(),
        Arc::new(TlsEcho),
        std::future::pending::<()>(),
    ));
    (port, cert_path.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn https_upstream_is_verified_against_the_configured_ca() {
    clerkgate::install_crypto_provider();
    let dir = temp_dir("upstream-tls");
    let (port, ca) = start_tls_upstream(&dir).await;
    let clerk = FakeClerk::start().await;
    let upstream = format!("https://localhost:{port}");
    let gate = Sidecar::start_config(
        config(
            &base_toml(&clerk, &upstream),
            &format!("[proxy]\nupstream_ca_path = \"{ca}\"\n"),
        )
        .unwrap(),
    )
    .await;
    assert!(gate.wait_ready(std::time::Duration::from_secs(10)).await);
    let resp = client()
        .get(gate.url("/x"))
        .bearer_auth(clerk.session_token("user_tls"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "tls=true user=user_tls");
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_a_502() {
    clerkgate::install_crypto_provider();
    let dir = temp_dir("upstream-untrusted");
    let (port, _ca) = start_tls_upstream(&dir).await;
    // A different CA than the one that issued the upstream's certificate.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_path = dir.join("other.crt");
    std::fs::write(&other_path, other.cert.pem()).unwrap();
    let clerk = FakeClerk::start().await;
    let upstream = format!("https://localhost:{port}");
    let gate = Sidecar::start_config(
        config(
            &base_toml(&clerk, &upstream),
            &format!("[proxy]\nupstream_ca_path = \"{}\"\n", other_path.display()),
        )
        .unwrap(),
    )
    .await;
    assert!(gate.wait_ready(std::time::Duration::from_secs(10)).await);
    let resp = client()
        .get(gate.url("/x"))
        .bearer_auth(clerk.session_token("user_tls"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "upstream-unavailable");
}
