//! Misbehaving dependencies the shared fakes cannot play: a door in front of the fake Clerk that
//! refuses connections or answers faults itself, per path and on the same port throughout, and
//! a raw-TCP upstream that
//! answers with exactly the bytes a fault needs (a head and then nothing, a chunked body cut
//! off, no answer at all, an enormous head, or never accepting).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a [`Door`] does with a request whose path starts with its fault prefix.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Relay it to the server behind the door.
    Relay,
    /// Nothing listens on the door's port: every connection is refused (whatever the path).
    Refuse,
    /// Read the request and never answer.
    Hang,
    /// Answer this status with a Clerk-shaped error body.
    Status(u16),
    /// Answer `429 Too Many Requests` with `Retry-After: <seconds>`.
    RetryAfter(u64),
    /// Answer `200` `application/json` with exactly these bytes.
    Body(Arc<Vec<u8>>),
    /// The same, chunked in 64 KiB pieces and without a `Content-Length`, so only counting
    /// the bytes as they arrive can enforce a cap.
    Chunked(Arc<Vec<u8>>),
}

struct DoorState {
    mode: Mode,
    /// Only requests whose path starts with this are affected (except by `Refuse`).
    prefix: String,
    /// The accept task, which owns every connection: aborting it cuts them all.
    task: Option<JoinHandle<()>>,
    /// Under `Refuse`: the port, bound but not listening (connections are refused, and no
    /// other test can take the port before the door reopens).
    reserved: Option<TcpSocket>,
}

/// A door on a fixed `127.0.0.1` port in front of an HTTP server (the fake Clerk). It relays,
/// or plays a fault itself: refused connections, a hang, an error status, a 429, any body.
/// Whoever is configured with [`Door::url`] sees the fault and the recovery on the same port.
/// Many doors can share one fake Clerk, each with its own fault, so tests run side by side
/// without each paying for an RSA key generation.
pub struct Door {
    addr: SocketAddr,
    target: SocketAddr,
    state: Arc<Mutex<DoorState>>,
    /// First request heads read, whatever the mode.
    requests: Arc<AtomicUsize>,
}

impl Door {
    /// An open, relaying door in front of `target` (`http://IP:PORT`).
    pub async fn open_to(target: &str) -> Door {
        let target: SocketAddr = target
            .trim_start_matches("http://")
            .parse()
            .expect("an http://IP:PORT URL");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind door");
        let door = Door {
            addr: listener.local_addr().expect("door addr"),
            target,
            state: Arc::new(Mutex::new(DoorState {
                mode: Mode::Relay,
                prefix: "/".into(),
                task: None,
                reserved: None,
            })),
            requests: Arc::new(AtomicUsize::new(0)),
        };
        door.serve(listener);
        door
    }

    /// Connections whose first request head arrived (relayed, failed or hanging).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Plays `mode` for requests under `prefix` from now on. Every open connection is cut, so
    /// no pooled keep-alive connection keeps relaying past the switch.
    pub async fn set(&self, mode: Mode, prefix: &str) {
        let (old, mut reserved) = {
            let mut state = lock(&self.state);
            state.mode = mode.clone();
            state.prefix = prefix.to_owned();
            (state.task.take(), state.reserved.take())
        };
        if let Some(task) = old {
            task.abort();
            let _ = task.await;
        }
        // Rebind at once (the port is free only for that instant); a bound socket that does
        // not listen refuses connections.
        let mut attempts = 0;
        let socket = loop {
            let bound = match reserved.take() {
                Some(socket) => Ok(socket),
                None => TcpSocket::new_v4().and_then(|socket| {
                    socket.set_reuseaddr(true)?;
                    socket.bind(self.addr)?;
                    Ok(socket)
                }),
            };
            match bound {
                Ok(socket) => break socket,
                Err(e) => {
                    attempts += 1;
                    assert!(
                        attempts < 100,
                        "cannot reopen the door on {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        if matches!(mode, Mode::Refuse) {
            lock(&self.state).reserved = Some(socket);
            return;
        }
        let listener = socket
            .listen(1024)
            .unwrap_or_else(|e| panic!("cannot reopen the door on {}: {e}", self.addr));
        self.serve(listener);
    }

    /// [`Door::set`] for every path.
    pub async fn fail(&self, mode: Mode) {
        self.set(mode, "/").await;
    }

    /// Relays everything again.
    pub async fn heal(&self) {
        self.set(Mode::Relay, "/").await;
    }

    fn serve(&self, listener: TcpListener) {
        let target = self.target;
        let state = self.state.clone();
        let requests = self.requests.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(door_connection(
                    inbound,
                    target,
                    state.clone(),
                    requests.clone(),
                ));
                // Reap finished connections so the set does not grow without bound.
                while connections.try_join_next().is_some() {}
            }
        });
        lock(&self.state).task = Some(task);
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.state).task.take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn door_connection(
    mut inbound: TcpStream,
    target: SocketAddr,
    state: Arc<Mutex<DoorState>>,
    requests: Arc<AtomicUsize>,
) {
    // Read the first request head to learn its path.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match inbound.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let path = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let mode = {
        let state = lock(&state);
        if path.starts_with(&state.prefix) {
            state.mode.clone()
        } else {
            Mode::Relay
        }
    };
    let answer = |status: &str, extra: &str, body: &[u8]| {
        let mut response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(body);
        response
    };
    let clerk_error = br#"{"errors":[{"code":"internal_clerk_error","message":"Oops","long_message":"door fault","meta":{}}],"clerk_trace_id":"door"}"#;
    let response = match mode {
        Mode::Relay | Mode::Refuse => {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            if outbound.write_all(&head).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            return;
        }
        Mode::Hang => {
            while matches!(inbound.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
        Mode::Status(code) => answer(&format!("{code} Fault"), "", clerk_error),
        Mode::RetryAfter(seconds) => answer(
            "429 Too Many Requests",
            &format!("Retry-After: {seconds}\r\n"),
            clerk_error,
        ),
        Mode::Body(bytes) => answer("200 OK", "", &bytes),
        Mode::Chunked(bytes) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if inbound.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for piece in bytes.chunks(64 * 1024) {
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(piece);
                chunk.extend_from_slice(b"\r\n");
                // The client hangs up once it has seen enough.
                if inbound.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            b"0\r\n\r\n".to_vec()
        }
    };
    // The client may hang up early (a body over its cap); that is its business.
    let _ = inbound.write_all(&response).await;
    let _ = inbound.shutdown().await;
}

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
    /// Complete request heads received.
    requests: watch::Sender<usize>,
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
        let (requests, _) = watch::channel(0usize);
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

    pub fn requests(&self) -> usize {
        *self.requests.borrow()
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
    requests: watch::Sender<usize>,
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

/// Reads one request head (bodies are not expected: the tests send GETs). `None` on EOF.
async fn read_request_head(stream: &mut TcpStream) -> Option<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(())
}

async fn serve_connection(
    mut stream: TcpStream,
    behavior: Arc<Mutex<Behavior>>,
    requests: watch::Sender<usize>,
) {
    loop {
        if read_request_head(&mut stream).await.is_none() {
            return;
        }
        let current = behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        requests.send_modify(|n| *n += 1);
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
