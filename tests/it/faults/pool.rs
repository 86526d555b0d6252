//! The proxy's upstream connection pool against an upstream that counts its connections:
//! keep-alive connections are reused, a connection the upstream closed while idle is never
//! used for a request (no 502 for the client), `Connection: close` answers are honoured, idle
//! connections are closed after `proxy.pool_idle_timeout_seconds`, and no more than
//! `proxy.pool_max_idle` stay open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::common::{get, start_with_upstream_url, wait_ready};
use crate::support::{FakeClerk, Sidecar};

#[derive(Clone, Copy)]
enum Style {
    /// Keep-alive; with `Some(d)` the upstream closes a connection idle for `d` (as Node's
    /// `keepAliveTimeout` does).
    KeepAlive(Option<Duration>),
    /// Every answer says `Connection: close` and the upstream closes after it.
    CloseEach,
}

struct CountingUpstream {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Connections the proxy closed (EOF while the upstream waited for a request).
    closed_by_proxy: Arc<AtomicUsize>,
    /// Connections open right now, announced on every change.
    open: watch::Sender<usize>,
    task: JoinHandle<()>,
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingUpstream {
    async fn start(style: Style) -> CountingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed_by_proxy = Arc::new(AtomicUsize::new(0));
        let (open, _) = watch::channel(0usize);
        let (a, c, o) = (accepted.clone(), closed_by_proxy.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.send_modify(|n| *n += 1);
                let (c, o) = (c.clone(), o.clone());
                tokio::spawn(async move {
                    serve(stream, style, &c).await;
                    o.send_modify(|n| *n -= 1);
                });
            }
        });
        CountingUpstream {
            addr,
            accepted,
            closed_by_proxy,
            open,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits up to 5 s until no more than `n` connections are open.
    async fn open_at_most(&self, n: usize) -> bool {
        let mut open = self.open.subscribe();
        tokio::time::timeout(Duration::from_secs(5), open.wait_for(|open| *open <= n))
            .await
            .is_ok_and(|changed| changed.is_ok())
    }
}

/// Reads one request head; `None` on EOF (counted) or idle timeout.
async fn read_head(
    stream: &mut TcpStream,
    idle: Option<Duration>,
    closed: &AtomicUsize,
) -> Option<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buf);
        let n = match idle {
            Some(d) if head.is_empty() => tokio::time::timeout(d, read).await.ok()?,
            _ => read.await,
        };
        match n {
            Ok(0) | Err(_) => {
                if head.is_empty() {
                    closed.fetch_add(1, Ordering::SeqCst);
                }
                return None;
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(())
}

async fn serve(mut stream: TcpStream, style: Style, closed: &AtomicUsize) {
    let idle = match style {
        Style::KeepAlive(idle) => idle,
        Style::CloseEach => None,
    };
    while read_head(&mut stream, idle, closed).await.is_some() {
        let answer: &[u8] = match style {
            Style::KeepAlive(_) => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Style::CloseEach => {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            }
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
        if matches!(style, Style::CloseEach) {
            return;
        }
    }
}

/// A fake Clerk, an upstream of `style`, clerkgate in front of it (ready) and a valid token.
struct Setup {
    _clerk: FakeClerk,
    upstream: CountingUpstream,
    gate: Sidecar,
    token: String,
}

async fn setup(style: Style, extra: &str) -> Setup {
    let clerk = FakeClerk::start().await;
    let upstream = CountingUpstream::start(style).await;
    let gate = start_with_upstream_url(&clerk, &upstream.url(), extra).await;
    assert!(wait_ready(&gate).await, "clerkgate became ready");
    let token = clerk.session_token("user_1");
    Setup {
        _clerk: clerk,
        upstream,
        gate,
        token,
    }
}

/// `n` sequential requests, each answered 200.
async fn requests_succeed(gate: &Sidecar, token: &str, n: usize, pause: Duration) {
    for i in 0..n {
        assert_eq!(
            get(gate, &format!("/r{i}"), token).await.status,
            200,
            "request {i}"
        );
        tokio::time::sleep(pause).await;
    }
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let s = setup(Style::KeepAlive(None), "").await;
    requests_succeed(&s.gate, &s.token, 20, Duration::ZERO).await;
    assert_eq!(
        s.upstream.accepted(),
        1,
        "one keep-alive connection for all 20"
    );
    s.gate.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
    let s = setup(Style::KeepAlive(Some(Duration::from_millis(50))), "").await;
    // Pauses longer than the upstream's keep-alive: the pooled connection is closed under us.
    requests_succeed(&s.gate, &s.token, 5, Duration::from_millis(150)).await;
    assert_eq!(
        s.upstream.accepted(),
        5,
        "a fresh connection after each idle close"
    );
    let upstream_errors = s.gate.metrics_text().await;
    assert!(
        !upstream_errors
            .lines()
            .any(|l| l.starts_with("clerkgate_upstream_errors_total{") && !l.ends_with(" 0")),
        "no upstream error counted:\n{upstream_errors}"
    );
    s.gate.stop().await;
}

#[tokio::test]
async fn connection_close_answers_are_honoured() {
    let s = setup(Style::CloseEach, "").await;
    // No pause: the next request may come before the proxy has seen the close.
    requests_succeed(&s.gate, &s.token, 5, Duration::ZERO).await;
    assert_eq!(s.upstream.accepted(), 5);
    s.gate.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout_and_bounded_by_max_idle() {
    let Setup {
        _clerk,
        upstream,
        gate,
        token,
    } = setup(
        Style::KeepAlive(None),
        "[proxy]\npool_idle_timeout_seconds = 1\npool_max_idle = 2\n",
    )
    .await;
    // Eight concurrent requests need eight connections; only two may stay idle afterwards.
    let requests = (0..8).map(|i| {
        let (gate, token) = (&gate, &token);
        async move { get(gate, &format!("/r{i}"), token).await.status }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let accepted = upstream.accepted();
    assert!(accepted >= 2, "concurrent requests, {accepted} connections");
    assert!(
        upstream.open_at_most(2).await,
        "at most pool_max_idle connections stay open"
    );
    // Past the idle timeout (reaped every half timeout) every pooled connection is closed,
    // without any request coming to find it.
    assert!(
        upstream.open_at_most(0).await,
        "idle connections closed after pool_idle_timeout_seconds"
    );
    assert_eq!(
        upstream.closed_by_proxy.load(Ordering::SeqCst),
        accepted,
        "every connection was closed by the proxy"
    );
    // And the pool still works.
    assert_eq!(get(&gate, "/again", &token).await.status, 200);
    gate.stop().await;
}
