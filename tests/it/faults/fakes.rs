//! A misbehaving Clerk the shared fake cannot play: a door in front of the fake Clerk that
//! refuses connections or answers faults itself, per path and on the same port throughout.
//! (The misbehaving upstream is [`crate::support::upstreams::RawUpstream`].)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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
