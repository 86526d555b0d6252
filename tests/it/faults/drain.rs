//! The process: SIGTERM under load, against the real binary. Every request whose connection
//! was accepted gets a complete response, connections after the listener closed are refused
//! (never reset mid-response), /readyz is 503 during the drain delay, and the process exits 0
//! within its deadline, cutting off what is still running when the drain deadline passes.
//!
//! Requests are spoken as raw HTTP/1.1, so the test sees exactly how each one ended: a
//! complete response, a refused connection, a connection closed before any response byte, or
//! a broken response (a partial head or a truncated body), which is never acceptable.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::fakes::{Door, Mode};
use crate::support::process::{Served, TempFile, command};
use crate::support::{FakeClerk, Upstream, WAIT, eventually};

/// The TOML for the binary: port 0 everywhere, the fake Clerk (reached at `api_url`, with more
/// `[clerk]` keys in `clerk_extra`), the local API off.
fn config_toml(
    clerk: &FakeClerk,
    api_url: &str,
    clerk_extra: &str,
    upstream: &str,
    delay: u64,
    drain: u64,
) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:0"
[clerk]
secret_key = "{secret}"
publishable_key = "{pk}"
api_url = "{api_url}"
{clerk_extra}
[local_api]
enabled = false
[shutdown]
delay_seconds = {delay}
drain_timeout_seconds = {drain}
[log]
format = "json"
level = "info"
"#,
        secret = clerk.secret_key,
        pk = clerk.publishable_key(),
    )
}

/// Validates the configuration with `check-config`, then starts `serve` and waits for the
/// "clerkgate listening" log line that names the bound ports.
fn start(toml: &str) -> Served {
    let config = TempFile::with("clerkgate.toml", toml);
    let check = command(&["--config", config.path(), "check-config"], &[])
        .output()
        .expect("run check-config");
    assert!(
        check.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    Served::start(toml, &[])
}

/// How one raw request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// 200 with the whole body, which is the upstream's echo of this request.
    Complete,
    /// The connection was refused: nothing listens any more.
    Refused,
    /// Connected (or reused) but closed or reset before a single response byte.
    ClosedBeforeResponse,
    /// Another status than 200.
    Status(u16),
    /// A partial head, a truncated body, a reset mid-response or a stall: never acceptable.
    Broken(String),
}

#[derive(Debug, Clone)]
struct Record {
    id: usize,
    ended: Ended,
    sent: Instant,
    done: Instant,
}

/// A raw HTTP/1.1 client: one connection reused (keep-alive) or a new one per request.
struct RawClient {
    addr: SocketAddr,
    keep_alive: bool,
    stream: Option<TcpStream>,
}

const READ_LIMIT: Duration = Duration::from_secs(20);

impl RawClient {
    async fn get(&mut self, path: &str, token: &str) -> Ended {
        if self.stream.is_none() || !self.keep_alive {
            match TcpStream::connect(self.addr).await {
                Ok(s) => self.stream = Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Ended::Refused;
                }
                Err(e) => return Ended::Broken(format!("connect: {e}")),
            }
        }
        let stream = self.stream.as_mut().expect("connected");
        let close = if self.keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer {token}\r\n{close}\r\n"
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            self.stream = None;
            return Ended::ClosedBeforeResponse;
        }
        let ended = match tokio::time::timeout(READ_LIMIT, read_response(stream)).await {
            Ok(Ok((status, keep))) => {
                if !keep || !self.keep_alive {
                    self.stream = None;
                }
                if status == 200 {
                    Ended::Complete
                } else {
                    Ended::Status(status)
                }
            }
            Ok(Err(ended)) => ended,
            Err(_) => Ended::Broken("stalled".into()),
        };
        if ended != Ended::Complete && !matches!(ended, Ended::Status(_)) {
            self.stream = None;
        }
        ended
    }
}

/// Reads one response; `Ok((status, keep_alive))` once the body is complete.
async fn read_response(stream: &mut TcpStream) -> Result<(u16, bool), Ended> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(Ended::ClosedBeforeResponse),
            Ok(0) => return Err(Ended::Broken("partial head".into())),
            Err(e) => return Err(Ended::Broken(format!("partial head: {e}"))),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Ended::Broken(format!("not a status line: {head}")))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
            .map(str::to_owned)
    };
    let keep = header("connection").is_none_or(|v| v != "close");
    let mut body = buf[head_end..].to_vec();
    let mut more = async |body: &mut Vec<u8>, why: &str| -> Result<(), Ended> {
        match stream.read(&mut chunk).await {
            Ok(0) => Err(Ended::Broken(format!("{why}: closed"))),
            Err(e) => Err(Ended::Broken(format!("{why}: {e}"))),
            Ok(n) => {
                body.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    };
    if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| Ended::Broken("bad length".into()))?;
        while body.len() < len {
            more(&mut body, "truncated body").await?;
        }
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        // Complete once the terminating chunk arrived (no trailers are expected).
        while !body.ends_with(b"0\r\n\r\n") {
            more(&mut body, "truncated chunked body").await?;
        }
    }
    Ok((status, keep))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_accepted_request_and_exits_0_in_time() {
    // `worker_threads = 1` is the single-threaded runtime (the default on a one-core pod).
    sigterm_under_load(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_with_a_multi_thread_runtime() {
    sigterm_under_load(2).await;
}

async fn sigterm_under_load(workers: usize) {
    const DELAY: u64 = 1;
    const DRAIN: u64 = 5;
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let toml = config_toml(&clerk, &clerk.url, "", &upstream.url(), DELAY, DRAIN).replacen(
        "[proxy]\n",
        &format!("[proxy]\nworker_threads = {workers}\n"),
        1,
    );
    let mut gate = start(&toml);
    // The reader thread records the "listening" line just after reporting its addresses.
    let wanted = format!("\"runtime_workers\":{workers}");
    assert!(
        eventually(WAIT, async || gate.log().contains(&wanted)).await,
        "the runtime the configuration asked for; log:\n{}",
        gate.log()
    );
    assert!(
        eventually(WAIT, async || gate.readyz().await == Some(200)).await,
        "ready; log:\n{}",
        gate.log()
    );
    let token = clerk.session_token("user_1");

    let records = Mutex::new(Vec::<Record>::new());
    let next_id = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // Six clients, half on one keep-alive connection each, half on a new connection per
    // request, each request taking 200 ms at the upstream.
    let clients = (0..6).map(|c| {
        let (records, next_id, stop, token, proxy) =
            (&records, &next_id, &stop, &token, gate.proxy);
        async move {
            let mut client = RawClient {
                addr: proxy,
                keep_alive: c % 2 == 0,
                stream: None,
            };
            while !stop.load(Ordering::SeqCst) {
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                let sent = Instant::now();
                let ended = client.get(&format!("/slow/200?id={id}"), token).await;
                let refused = ended == Ended::Refused;
                records.lock().expect("records").push(Record {
                    id,
                    ended,
                    sent,
                    done: Instant::now(),
                });
                if refused {
                    // Pacing of retries against a closed port, not a wait for a condition.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    let load = futures_util::future::join_all(clients);

    let scenario = async {
        // Let the load settle, then terminate.
        assert!(
            upstream.recorder.wait_for_count(12, WAIT).await,
            "the load reaches the upstream"
        );
        gate.sigterm();
        let term = Instant::now();

        // During the delay: /readyz is 503, and the proxy still serves.
        let mut first_503 = None;
        eventually(Duration::from_secs(DELAY), async || {
            if gate.readyz().await == Some(503) {
                first_503 = Some(term.elapsed());
            }
            first_503.is_some()
        })
        .await;
        // One request still running when the listener closes (sent at the start of the delay,
        // answered 1 s after its end).
        let mut long = RawClient {
            addr: gate.proxy,
            keep_alive: false,
            stream: None,
        };
        let long_ended = long.get("/slow/2000?id=long", &token).await;
        let long_done = term.elapsed();

        let status = gate.exited(Duration::from_secs(DELAY + DRAIN + 5)).await;
        let exited = term.elapsed();
        stop.store(true, Ordering::SeqCst);
        (term, first_503, long_ended, long_done, status, exited)
    };
    let (_, (term, first_503, long_ended, long_done, status, exited)) =
        tokio::join!(load, scenario);
    let log = gate.log();
    let records = records.into_inner().expect("records");

    // The process.
    let status = status.unwrap_or_else(|| panic!("no exit within the deadline; log:\n{log}"));
    assert_eq!(status.code(), Some(0), "exit status; log:\n{log}");
    assert!(
        exited <= Duration::from_secs(DELAY + DRAIN + 3),
        "exited {exited:?} after SIGTERM"
    );
    let first_503 = first_503.expect("/readyz turned 503 during the drain delay");
    assert!(first_503 < Duration::from_secs(DELAY), "{first_503:?}");

    // Every request: complete, refused, or closed before any response byte.
    let broken: Vec<&Record> = records
        .iter()
        .filter(|r| matches!(r.ended, Ended::Broken(_) | Ended::Status(_)))
        .collect();
    assert!(broken.is_empty(), "broken or refused responses: {broken:?}");
    // A connection closed before the response is fine only if the request never got in.
    let reached: std::collections::HashSet<String> = upstream
        .recorder
        .all()
        .into_iter()
        .filter_map(|r| r.uri.query().map(str::to_owned))
        .collect();
    for r in &records {
        let got_in = reached.contains(&format!("id={}", r.id));
        match r.ended {
            Ended::Complete => assert!(got_in, "{r:?} was answered without the upstream"),
            Ended::ClosedBeforeResponse => {
                assert!(!got_in, "{r:?} reached the upstream but lost its response")
            }
            _ => {}
        }
    }
    assert_eq!(
        upstream.count(),
        reached.len(),
        "the recorder kept every request"
    );

    // The request in flight when the listener closed was answered in full, after the listener
    // had closed (a refusal came first).
    assert_eq!(long_ended, Ended::Complete, "the long request; log:\n{log}");
    let refused: Vec<&Record> = records
        .iter()
        .filter(|r| r.ended == Ended::Refused)
        .collect();
    let first_refusal = refused
        .iter()
        .map(|r| r.done.duration_since(term))
        .min()
        .expect("connections after the listener closed are refused");
    assert!(
        first_refusal >= Duration::from_millis(DELAY * 1000 - 100),
        "refused only after the drain delay: {first_refusal:?}"
    );
    assert!(
        first_refusal < long_done,
        "the long request ({long_done:?}) was still in flight when the listener closed ({first_refusal:?})"
    );
    let served_after_term = records
        .iter()
        .filter(|r| r.ended == Ended::Complete && r.sent > term)
        .count();
    assert!(
        served_after_term > 0,
        "requests arriving during the delay are served"
    );
    let complete = records
        .iter()
        .filter(|r| r.ended == Ended::Complete)
        .count();
    assert!(complete >= 12, "a real load: {complete} complete");
}

#[tokio::test]
async fn request_still_running_at_the_drain_deadline_is_cut_off_and_the_exit_is_on_time() {
    const DRAIN: u64 = 1;
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let mut gate = start(&config_toml(
        &clerk,
        &clerk.url,
        "",
        &upstream.url(),
        0,
        DRAIN,
    ));
    assert!(
        eventually(WAIT, async || gate.readyz().await == Some(200)).await,
        "ready; log:\n{}",
        gate.log()
    );
    let token = clerk.session_token("user_1");
    let mut client = RawClient {
        addr: gate.proxy,
        keep_alive: false,
        stream: None,
    };
    let slow = client.get("/slow/8000?id=slow", &token);
    let terminate = async {
        assert!(upstream.recorder.wait_for_count(1, WAIT).await);
        gate.sigterm();
        let term = Instant::now();
        let status = gate.exited(Duration::from_secs(DRAIN + 5)).await;
        (term, status, term.elapsed())
    };
    let (ended, (term, status, exited)) = tokio::join!(slow, terminate);
    let log = gate.log();
    let status = status.unwrap_or_else(|| panic!("no exit; log:\n{log}"));
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(
        exited <= Duration::from_secs(DRAIN + 3),
        "exited {exited:?} after SIGTERM, the 8 s request notwithstanding"
    );
    assert!(
        exited >= Duration::from_millis(DRAIN * 1000 - 100),
        "the request got its drain time: {exited:?}"
    );
    assert_ne!(ended, Ended::Complete, "the request was cut off");
    assert!(
        term.elapsed() < Duration::from_secs(7),
        "cut off at the deadline, not answered at 8 s"
    );
}

#[tokio::test]
async fn sigterm_while_a_jwks_fetch_hangs_still_exits_within_the_drain_deadline() {
    const DRAIN: u64 = 1;
    let clerk = FakeClerk::start().await;
    let door = Door::open_to(&clerk.url).await;
    let upstream = Upstream::start().await;
    // Keys refresh every ~1 s; a fetch may take up to 8 s before it times out.
    let mut gate = start(&config_toml(
        &clerk,
        &door.url(),
        "jwks_ttl_seconds = 1\njwks_fetch_timeout_seconds = 8",
        &upstream.url(),
        0,
        DRAIN,
    ));
    assert!(
        eventually(WAIT, async || gate.readyz().await == Some(200)).await,
        "ready; log:\n{}",
        gate.log()
    );
    door.fail(Mode::Hang).await;
    let seen = door.requests();
    assert!(
        eventually(WAIT, async || door.requests() > seen).await,
        "a background refresh is hanging"
    );

    gate.sigterm();
    let term = Instant::now();
    let status = gate.exited(Duration::from_secs(12)).await;
    let exited = term.elapsed();
    let log = gate.log();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "log:\n{log}");
    assert!(
        exited <= Duration::from_secs(DRAIN + 3),
        "nothing was in flight, yet the exit took {exited:?}; log:\n{log}"
    );
}

/// The access log of the real binary: one JSON line per request with the documented fields,
/// and never a token, a cookie or a query string.
#[tokio::test]
async fn access_lines_name_each_request_and_never_its_secrets() {
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = start(&config_toml(&clerk, &clerk.url, "", &upstream.url(), 0, 5));
    assert!(
        eventually(WAIT, async || gate.readyz().await == Some(200)).await,
        "ready; log:\n{}",
        gate.log()
    );
    let token = clerk.session_token("user_access");
    let http = crate::support::client();
    let ok = http
        .get(format!(
            "http://{}/orders/7?api_key=query-secret",
            gate.proxy
        ))
        .bearer_auth(&token)
        .header("cookie", "__session=cookie-secret; theme=dark")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let id = ok.headers()["x-request-id"].to_str().unwrap().to_owned();
    let refused = http
        .get(format!("http://{}/admin?x=1", gate.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let access = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "clerkgate::access")
            .collect()
    };
    assert!(
        eventually(WAIT, async || access(&gate.log()).len() >= 2).await,
        "two access lines; log:\n{}",
        gate.log()
    );
    let log = gate.log();
    let lines = access(&log);
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/orders/7");
    assert_eq!(first["status"], 200);
    assert_eq!(first["outcome"], "forwarded");
    assert_eq!(first["request_id"], id.as_str());
    assert!(first["micros"].as_u64().is_some());
    assert!(first["upstream_micros"].as_u64().is_some());
    assert!(
        first.get("user_id").is_none(),
        "off unless log.access_user_id"
    );
    let second = &lines[1];
    assert_eq!(second["path"], "/admin");
    assert_eq!(second["status"], 401);
    assert_eq!(second["reason"], "session-token-missing");
    for secret in [token.as_str(), "query-secret", "cookie-secret", "api_key"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}
