//! The load benchmark's upstream (`bench/run.py`): the smallest fast HTTP/1.1 server we can
//! write with the crate's own stack, so that every contender (direct, clerkgate, nginx, Envoy,
//! Node) forwards to the same backend and the backend's cost stays small and identical.
//!
//! Every request, whatever its method and path, is answered `200` with a fixed 17-byte JSON
//! body; the request body, if any, is drained. One current-thread runtime: the benchmark pins it
//! to the same core as the proxy under test, where a second worker thread would only contend.
//!
//! ```sh
//! cargo build --release --example bench_upstream
//! target/release/examples/bench_upstream 127.0.0.1:18081
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = b"{\"upstream\":\"ok\"}";

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Drain a request body so keep-alive connections stay usable; benchmark requests are GETs.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".to_owned())
        .parse()
        .expect("usage: bench_upstream [127.0.0.1:PORT]");
    assert!(
        addr.ip().is_loopback(),
        "bench_upstream listens on loopback only"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await.expect("bind");
        println!("bench_upstream listening on http://{addr}");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::task::spawn(async move {
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    });
}
