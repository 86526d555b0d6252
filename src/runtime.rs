//! How many threads serve the proxy, and how: `proxy.runtime` and `proxy.worker_threads`.
//!
//! - `per-core` (the default): one current-thread runtime per CPU, each accepting proxy connections on its
//!   own socket bound to the proxy address with `SO_REUSEPORT` (the kernel spreads new
//!   connections over them), so a connection, its requests and its upstream connections stay
//!   on one thread: no work stealing, no wakeups across threads. The first runtime also runs
//!   the admin and local-API listeners and the background tasks (key refresh, fleet).
//!   State that all requests need (token cache, keys, revocations) is shared between them;
//!   the upstream pool keeps one idle list per runtime (see [`worker`]).
//! - `multi-thread`: one tokio runtime with a worker per CPU, work-stealing between them.
//!   Better when a few long-lived connections carry everything (the kernel spreads
//!   connections, not requests, over the per-core sockets).
//!
//! With one CPU both are one current-thread runtime. At 2 CPUs the per-core mode carried 1.30×
//! (plain requests) and 1.14× (browser-shaped requests) the multi-thread mode's cached-token
//! throughput: BENCHMARKS.md ("Multi-core").

use std::cell::Cell;

use serde::{Deserialize, Serialize};

/// `proxy.runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    MultiThread,
    #[default]
    PerCore,
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the per-core runtime this thread runs (0 outside the per-core mode, and on the
/// first runtime). Lets shared structures keep per-runtime shards without a lock between them.
pub(crate) fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// Marks this thread as running per-core runtime `index`.
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// `proxy.worker_threads` resolved: 0 means one per CPU this process may use (the affinity
/// mask and a cgroup CPU quota are respected by `available_parallelism`).
pub(crate) fn worker_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The threads of the main runtime: the per-core mode's first runtime is a current-thread one.
pub(crate) fn main_runtime_threads(kind: RuntimeKind, configured: usize) -> usize {
    match kind {
        RuntimeKind::MultiThread => worker_count(configured),
        RuntimeKind::PerCore => 1,
    }
}

/// How many extra per-core runtimes serve the proxy beside the main one.
pub(crate) fn extra_proxy_runtimes(kind: RuntimeKind, configured: usize) -> usize {
    match kind {
        RuntimeKind::MultiThread => 0,
        RuntimeKind::PerCore => worker_count(configured).saturating_sub(1),
    }
}

/// One runtime's share of a process-wide budget (`proxy.pool_max_idle`): the per-core runtimes
/// keep one idle list each, so each gets `total / runtimes`, rounded up.
pub(crate) fn per_runtime_share(total: usize, kind: RuntimeKind, configured: usize) -> usize {
    total.div_ceil(extra_proxy_runtimes(kind, configured) + 1)
}

/// Binds a listening socket with `SO_REUSEPORT` (and `SO_REUSEADDR`), so that the per-core
/// runtimes can each bind their own socket to the same address.
pub(crate) fn bind_reuseport(
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_core_runs_one_main_thread_and_the_rest_beside_it() {
        assert_eq!(main_runtime_threads(RuntimeKind::PerCore, 4), 1);
        assert_eq!(extra_proxy_runtimes(RuntimeKind::PerCore, 4), 3);
        assert_eq!(main_runtime_threads(RuntimeKind::MultiThread, 4), 4);
        assert_eq!(extra_proxy_runtimes(RuntimeKind::MultiThread, 4), 0);
        assert_eq!(extra_proxy_runtimes(RuntimeKind::PerCore, 1), 0);
    }

    #[test]
    fn a_process_budget_is_split_over_the_per_core_runtimes() {
        assert_eq!(per_runtime_share(256, RuntimeKind::PerCore, 4), 64);
        assert_eq!(per_runtime_share(5, RuntimeKind::PerCore, 2), 3);
        assert_eq!(per_runtime_share(256, RuntimeKind::MultiThread, 4), 256);
        assert_eq!(per_runtime_share(256, RuntimeKind::PerCore, 1), 256);
        assert_eq!(per_runtime_share(0, RuntimeKind::PerCore, 4), 0);
    }

    #[tokio::test]
    async fn two_sockets_share_a_reuseport_address() {
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_reuseport(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // A socket without SO_REUSEPORT cannot join them.
        assert!(std::net::TcpListener::bind(addr).is_err());
    }
}
