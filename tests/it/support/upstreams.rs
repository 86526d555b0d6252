//! Upstreams the echo upstream cannot play: [`RawUpstream`], a hand-written HTTP/1.1 server that
//! records the exact bytes of every request (chunked bodies and trailer sections included; the
//! echo upstream drops trailers) and answers with exactly the bytes a fault needs (a head and
//! then nothing, a chunked body cut off, no answer at all, an enormous head), and that can stop
//! accepting.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::raw::request_len;

/// One request as the raw upstream saw it: the exact bytes clerkgate wrote.
pub type RawRequest = Vec<u8>;

/// What the raw upstream does with each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// `200 OK` with the body `ok`, keep-alive.
    Normal,
    /// A complete head promising `Content-Length: 1000`, then a reset (RST) before any body.
    HeadThenReset,
    /// A chunked `200 OK` with two chunks, then the connection closes without the last chunk.
    ChunkedThenClose,
    /// Reads the request and never answers (the connection stays open).
    Hang,
    /// A `200 OK` head carrying one header value of this many bytes.
    HugeHeader(usize),
    /// A `200 OK` head with this many distinct headers.
    ManyHeaders(usize),
}

/// A hand-written HTTP/1.1 upstream whose behaviour can change between requests.
pub struct RawUpstream {
    pub addr: SocketAddr,
    behavior: Arc<Mutex<Behavior>>,
    accepting: watch::Sender<bool>,
    /// Complete requests received, byte for byte.
    requests: watch::Sender<Vec<RawRequest>>,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

/// The body [`Behavior::Normal`] answers with.
pub const NORMAL_BODY: &str = "ok";

impl RawUpstream {
    /// Listens on `127.0.0.1:0` with the given accept backlog and serves `behavior`.
    pub async fn start(behavior: Behavior, backlog: u32) -> RawUpstream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind raw upstream");
        let listener = socket.listen(backlog).expect("listen");
        let addr = listener.local_addr().expect("raw upstream addr");
        let behavior = Arc::new(Mutex::new(behavior));
        let (accepting, accepting_rx) = watch::channel(true);
        let (requests, _) = watch::channel(Vec::new());
        let (stop, stop_rx) = watch::channel(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept_loop(
            listener,
            behavior.clone(),
            accepting_rx,
            requests.clone(),
            accepted.clone(),
            stop_rx,
        ));
        RawUpstream {
            addr,
            behavior,
            accepting,
            requests,
            accepted,
            stop,
        }
    }

    /// A [`Behavior::Normal`] upstream that only records what it receives.
    pub async fn recording() -> RawUpstream {
        RawUpstream::start(Behavior::Normal, 1024).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, behavior: Behavior) {
        *lock(&self.behavior) = behavior;
    }

    pub fn behavior(&self) -> Behavior {
        lock(&self.behavior).clone()
    }

    /// Stops calling `accept()`: once the backlog is full the kernel drops new SYNs.
    pub fn pause_accepting(&self) {
        self.accepting.send_replace(false);
    }

    pub fn resume_accepting(&self) {
        self.accepting.send_replace(true);
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every complete request received so far, byte for byte.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.requests.borrow().clone()
    }

    /// How many complete requests arrived.
    pub fn request_count(&self) -> usize {
        self.requests.borrow().len()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    behavior: Arc<Mutex<Behavior>>,
    mut accepting: watch::Receiver<bool>,
    requests: watch::Sender<Vec<RawRequest>>,
    accepted: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = accepting.wait_for(|a| *a) => {}
        }
        let stream = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            // A pause while waiting here takes effect after this one accept.
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let behavior = behavior.clone();
        let requests = requests.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut stop = stop;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = serve_connection(stream, behavior, requests) => {}
            }
        });
    }
}

/// Reads one complete request (head and body) into `buf`'s front and takes it out; `None` on
/// EOF or a read error.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawRequest> {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if let Some(len) = request_len(buf) {
            return Some(buf.drain(..len).collect());
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    behavior: Arc<Mutex<Behavior>>,
    requests: watch::Sender<Vec<RawRequest>>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let current = behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        requests.send_modify(|log| log.push(request));
        match current {
            Behavior::Normal => {
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{NORMAL_BODY}",
                    NORMAL_BODY.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
            Behavior::HeadThenReset => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n")
                    .await;
                let _ = stream.flush().await;
                // Give the head time to reach the proxy before the reset discards it.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = stream.set_zero_linger();
                return;
            }
            Behavior::ChunkedThenClose => {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
                          5\r\nfirst\r\n6\r\nsecond\r\n",
                    )
                    .await;
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = stream.shutdown().await;
                return;
            }
            Behavior::Hang => {
                // Hold the connection until the peer gives up (or the fake is dropped).
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Behavior::HugeHeader(size) => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nX-Huge: {}\r\nContent-Length: 2\r\n\r\nok",
                    "h".repeat(size)
                );
                // The proxy may give up (and close) before reading all of it.
                let _ = stream.write_all(head.as_bytes()).await;
            }
            Behavior::ManyHeaders(count) => {
                let mut head = String::from("HTTP/1.1 200 OK\r\n");
                for i in 0..count {
                    head.push_str(&format!("X-Many-{i}: {i}\r\n"));
                }
                head.push_str("Content-Length: 2\r\n\r\nok");
                let _ = stream.write_all(head.as_bytes()).await;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
