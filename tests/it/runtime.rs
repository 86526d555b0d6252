//! `proxy.runtime = "per-core"`: one single-threaded runtime per worker, each accepting proxy
//! connections on its own `SO_REUSEPORT` socket (or a duplicate of the caller's listener).
//! Every runtime must serve, with the same verification, and all of them must drain on stop.

use std::time::Duration;

use clerkgate::app::{App, Listeners};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::WAIT;
use crate::support::raw::read_response;

use crate::support::sidecar::{base_toml, config};
use crate::support::{FakeClerk, Sidecar, Upstream, client};

/// This process's per-core proxy threads: name and nanoseconds spent on a CPU so far.
fn per_core_threads() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("procfs") {
        let dir = task.expect("task entry").path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let comm = comm.trim().to_owned();
        if !comm.starts_with("clerkgate-rt-") {
            continue;
        }
        let ran = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        out.push((comm, ran));
    }
    out.sort();
    out
}

/// Waits until `n` per-core threads carry their names: a thread names itself once it runs,
/// which under load can be after clerkgate is already ready.
async fn wait_for_threads(n: usize) -> Vec<(String, u64)> {
    let named = crate::support::eventually(Duration::from_secs(10), async || {
        per_core_threads().len() == n
    })
    .await;
    let threads = per_core_threads();
    assert!(named, "{n} per-core threads, found {threads:?}");
    threads
}

/// Sends `per` sequential requests on each of `connections` separate connections.
async fn load(url: String, token: &str, connections: usize, per: usize) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let url = url.clone();
        let token = token.to_owned();
        tasks.push(tokio::spawn(async move {
            // One client per connection: its requests reuse that one connection.
            let c = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut ok = 0;
            for _ in 0..per {
                let resp = c.get(&url).bearer_auth(&token).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                ok += 1;
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    ok
}

// Both per-core tests look at this process's thread list: they must not overlap.
static THREADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_runtimes_each_take_connections_on_a_shared_port() {
    let _one = THREADS.lock().await;
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let cfg = config(
        &base_toml(&clerk, &upstream.url()),
        "[proxy]\nruntime = \"per-core\"\nworker_threads = 3\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("valid config");
    // Bound the way `clerkgate serve` binds: SO_REUSEPORT, so each runtime gets a socket.
    let listeners = Listeners::bind(&cfg).await.expect("bind");
    let proxy = listeners.proxy.local_addr().unwrap();
    let admin = listeners.admin.local_addr().unwrap();
    let app = App::build(cfg).expect("app builds");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(app.run(listeners, async move {
        let _ = stopped.await;
    }));
    let ready = crate::support::eventually(Duration::from_secs(10), async || {
        client()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "clerkgate became ready");

    let threads = wait_for_threads(2).await;
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["clerkgate-rt-1", "clerkgate-rt-2"]);

    let token = clerk.session_token("user_1");
    let served = load(format!("http://{proxy}/hello"), &token, 32, 25).await;
    assert_eq!(served, 800);
    assert_eq!(upstream.count(), 800, "every request reached the upstream");
    assert_eq!(upstream.last().headers["x-user-id"], "user_1");
    assert!(upstream.last().headers.get("authorization").is_none());
    // The kernel spread 32 connections over three sockets: both extra runtimes worked (the
    // chance that a socket got none of them is below 1e-5).
    let after = per_core_threads();
    for ((name, before), (_, now)) in threads.iter().zip(&after) {
        assert!(
            now - before > 1_000_000,
            "{name} served connections ({} ns on CPU)",
            now - before
        );
    }

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("drained in time")
        .expect("no panic")
        .expect("ran cleanly");
    assert!(
        per_core_threads().is_empty(),
        "the per-core threads ended with the drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_runtimes_share_a_listener_bound_without_reuseport() {
    let _one = THREADS.lock().await;
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    // The harness binds a plain listener: the extra runtimes accept on duplicates of it.
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[proxy]\nruntime = \"per-core\"\nworker_threads = 2\n",
    )
    .await;
    wait_for_threads(1).await;
    let token = clerk.session_token("user_2");
    assert_eq!(load(gate.url("/x"), &token, 16, 10).await, 160);
    assert_eq!(upstream.count(), 160);
    // A bad token is refused on every runtime alike.
    for _ in 0..16 {
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(gate.url("/x"))
            .bearer_auth("not.a.token")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    assert_eq!(upstream.count(), 160);
    gate.stop().await;
    assert!(per_core_threads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_runtimes_share_one_connection_budget() {
    // `proxy.max_connections` bounds the process, not each runtime: with a budget per runtime
    // three runtimes would serve twelve connections here.
    let _one = THREADS.lock().await;
    let clerk = FakeClerk::start().await;
    let upstream = Upstream::start().await;
    let gate = Sidecar::start(
        &clerk,
        &upstream,
        "[proxy]\nruntime = \"per-core\"\nworker_threads = 3\nmax_connections = 4\n\
         header_read_timeout_seconds = 30\n",
    )
    .await;
    wait_for_threads(2).await;
    const GET: &[u8] = b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n";
    // Four keep-alive connections, each answered once and then held open: the whole budget.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(gate.proxy).await.expect("connect");
        s.write_all(GET).await.expect("write");
        let reply = tokio::time::timeout(WAIT, read_response(&mut s)).await;
        assert_eq!(reply.ok().flatten().map(|r| r.status), Some(401));
        held.push(s);
    }
    // Three more reach the shared accept queue; no runtime may serve them while four are held.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gate.proxy).await.expect("connect");
        s.write_all(GET).await.expect("write");
        waiting.push(s);
    }
    for s in &mut waiting {
        let early = tokio::time::timeout(Duration::from_millis(700), read_response(s)).await;
        assert!(
            early.is_err(),
            "served beyond max_connections = 4 across the runtimes: {early:?}"
        );
    }
    drop(held);
    for s in &mut waiting {
        let late = tokio::time::timeout(WAIT, read_response(s)).await;
        assert_eq!(late.ok().flatten().map(|r| r.status), Some(401));
    }
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
    assert!(per_core_threads().is_empty());
}
