//! Fleet simulation: N replicas' fleet stores in one process follow one Redis change feed while
//! one of them revokes sessions at a steady rate. Prints the propagation latency every
//! subscriber saw and the load Redis carried, the figures README's fleet section quotes.
//!
//!   redis-server --port 6399 --save '' &
//!   cargo run --release --example fleet_sim -- redis://127.0.0.1:6399/0 50 50 10
//!   (url, subscribers, revocations per second, seconds)

use std::sync::Arc;
use std::time::Duration;

use clerkgate::fleet::{Config, Fleet, FleetStore};
use clerkgate::revocations::{InMemoryStore, SessionStore};
use clerkgate::telemetry::Metrics;
use clerkgate::webhook::ledger::LocalLedger;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
    let subscribers: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let rate: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50);
    let seconds: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(10);

    let config: Config = toml::from_str(&format!(
        "redis_url = \"{url}\"\nkey_prefix = \"sim{}\"\n",
        std::process::id()
    ))
    .expect("fleet config");
    let day = Duration::from_secs(86_400);
    let mut replicas = Vec::new();
    for _ in 0..=subscribers {
        let metrics = Arc::new(Metrics::new());
        let local = Arc::new(InMemoryStore::new(day, 1_000_000));
        let fleet = Fleet::new(
            &config,
            "https://sim.example",
            local.clone(),
            day,
            day,
            metrics.clone(),
        )
        .expect("fleet");
        tokio::spawn(fleet.clone().run(std::future::pending()));
        let ledger = LocalLedger::new(Duration::from_secs(3600), 1_000_000);
        replicas.push((
            FleetStore::new(local, ledger, fleet.clone()),
            fleet,
            metrics,
        ));
    }
    for (_, fleet, _) in &replicas {
        while !fleet.link().is_up() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let ops_before = redis_commands(&url).await;
    let started = std::time::Instant::now();
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    for i in 0..total {
        tick.tick().await;
        replicas[0].0.deny_session(&format!("sess_sim_{i}"));
    }
    // Let the last events arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let ops = redis_commands(&url).await.saturating_sub(ops_before);

    // Merge every subscriber's histogram.
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let (mut count, mut sum) = (0u64, 0f64);
    for (_, _, metrics) in &replicas[1..] {
        let h = &metrics.fleet_propagation;
        count += h.get_sample_count();
        sum += h.get_sample_sum();
        let proto = prometheus::core::Collector::collect(h);
        let m = &proto[0].get_metric()[0];
        for (i, b) in m.get_histogram().get_bucket().iter().enumerate() {
            if buckets.len() <= i {
                buckets.push((b.upper_bound(), 0));
            }
            buckets[i].1 += b.cumulative_count();
        }
    }
    let quantile = |q: f64| {
        let want = (count as f64 * q).ceil() as u64;
        buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    let applied: usize = replicas[1..]
        .iter()
        .filter(|(store, _, _)| store.denied_sessions() == total)
        .count();
    println!(
        "{subscribers} subscribers, {total} revocations at {rate}/s: {count} applications \
         ({applied}/{subscribers} replicas hold all {total}); propagation mean {:.2} ms, \
         p50 <= {} ms, p99 <= {} ms; Redis {:.0} commands/s",
        sum * 1000.0 / count.max(1) as f64,
        quantile(0.5) * 1000.0,
        quantile(0.99) * 1000.0,
        ops as f64 / elapsed
    );
}

/// `total_commands_processed` from `INFO stats`.
async fn redis_commands(url: &str) -> u64 {
    let client = redis::Client::open(url).expect("url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut con)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
