//! Soak: many stores under mixed load for a fixed time on one host (real HTTP, real SQLite,
//! real wasmtime). Writers take events and queries, tickers run scheduled tasks, webhooks add
//! and remove stores all along, and one hostile tenant (an infinite loop) gets events and
//! queries throughout; stores idle for a second hibernate, and close their files two seconds
//! later, so most requests wake one. Checked at the end: every accepted event applied exactly once (zero
//! lost), no unexpected failure on any well-behaved store, every scheduled run recorded once,
//! the hostile tenant's failures contained in its own dead letters. Printed: RSS at the start,
//! over the second half and at the end, p99 latency and RSS per 10-second window, and a summary
//! of what was checked.
//!
//! CI size: 1,000 stores for 2 minutes. The long run by hand: `SOAK_SECONDS=1800 cargo test
//! -p storehost-tests --release --test soak -- --nocapture` (`SOAK_STORES` sets the size).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use storehost_store::Quotas;
use storehost_tests::control::{ControlHostOptions, with_webhooks};
use storehost_tests::{TestHost, programs};

const SECRET: &str = "soak-webhook-secret";
const HOSTILE: &str = "soak-hostile";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"))
        })
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Latencies (µs) per 10-second window since the start.
#[derive(Default)]
struct Latencies {
    windows: BTreeMap<u64, Vec<u64>>,
}

impl Latencies {
    fn record(&mut self, since_start: Duration, took: Duration) {
        self.windows
            .entry(since_start.as_secs() / 10)
            .or_default()
            .push(took.as_micros() as u64);
    }
}

fn p99(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[(values.len() * 99 / 100).min(values.len() - 1)]
}

#[derive(Default)]
struct Tally {
    appended: AtomicU64,
    queries: AtomicU64,
    hostile_appends: AtomicU64,
    hostile_queries_refused: AtomicU64,
    webhook_adds: AtomicU64,
    webhook_removes: AtomicU64,
    churn_events: AtomicU64,
    unexpected: Mutex<Vec<String>>,
}

impl Tally {
    fn unexpected(&self, what: String) {
        let mut list = self.unexpected.lock().unwrap();
        if list.len() < 50 {
            list.push(what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_stores_under_mixed_load_lose_nothing_and_fail_nowhere_unexpected() {
    let stores = env_or("SOAK_STORES", 1_000) as usize;
    let seconds = env_or("SOAK_SECONDS", 120);
    assert!(stores >= 10, "SOAK_STORES must be at least 10");
    let workers = 8usize;

    let host = Arc::new(
        TestHost::start_control(
            ControlHostOptions {
                max_stores: stores + 200,
                // Writers see a request every few seconds: most of them find their store
                // hibernated, many with its files closed, so wakes go on all along, and what
                // an awake store caches (its log's tail, its databases' pages) goes with each
                // hibernation instead of growing for the whole run.
                idle_timeout: Some(Duration::from_secs(1)),
                close_files_after: Duration::from_secs(2),
                ..ControlHostOptions::default()
            },
            |orchestrator, state| with_webhooks(orchestrator, state, SECRET, 1_000_000),
        )
        .await,
    );
    host.deploy("ticker", programs::TICKER).await;
    host.deploy("spin", programs::SPIN).await;

    // Every tenth store runs scheduled tasks; the rest are writers.
    let mut writers = Vec::new();
    let mut tickers = Vec::new();
    let setup_started = Instant::now();
    for i in 0..stores {
        if i % 10 == 0 {
            let id = format!("soak-tick-{i:04}");
            host.add_store(&id, "ticker", &[]).await;
            tickers.push(id);
        } else {
            let id = format!("soak-w-{i:04}");
            host.add_store(&id, "writer", &[]).await;
            writers.push(id);
        }
    }
    host.add_store_with(
        HOSTILE,
        "spin",
        &[],
        Quotas {
            cpu_ms_per_call: 50,
            wall_ms_per_call: 1_000,
            ..Quotas::default()
        },
    )
    .await;
    for id in &tickers {
        host.append(id, "schedule", json!({"taskId": "tick", "everyMs": 1000}))
            .await;
    }
    println!(
        "soak: {} stores started in {:.1} s ({} writers, {} with tasks, 1 hostile); load for {seconds} s with {workers} clients",
        stores + 1,
        setup_started.elapsed().as_secs_f64(),
        writers.len(),
        tickers.len()
    );
    let rss_start = rss_bytes();

    let writers = Arc::new(writers);
    let appended_per_store: Arc<Vec<AtomicU64>> =
        Arc::new((0..writers.len()).map(|_| AtomicU64::new(0)).collect());
    let tally = Arc::new(Tally::default());
    let appends = Arc::new(Mutex::new(Latencies::default()));
    let queries = Arc::new(Mutex::new(Latencies::default()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    // RSS at the end of each 10-second window: a leak shows as growth that goes on after the
    // first windows, where stores meet their first events and their sandboxes and caches fill.
    let rss_windows = tokio::spawn(async move {
        let mut samples = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while Instant::now() < deadline {
            tick.tick().await;
            samples.insert(start.elapsed().as_secs() / 10, rss_bytes());
        }
        samples
    });

    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (host, writers, per_store, tally, appends, queries) = (
            host.clone(),
            writers.clone(),
            appended_per_store.clone(),
            tally.clone(),
            appends.clone(),
            queries.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                n += 1;
                let pick = (n.wrapping_mul(2654435761).wrapping_add(worker as u64 * 97)) as usize
                    % writers.len();
                let store = &writers[pick];
                match n % 20 {
                    0 => {
                        let (status, body) = host
                            .post(
                                &format!("/v1/stores/{HOSTILE}/events"),
                                json!({"type": "spin", "payload": {}}),
                            )
                            .await;
                        if status == 202 {
                            tally.hostile_appends.fetch_add(1, Ordering::Relaxed);
                        } else if status != 429 {
                            tally.unexpected(format!("hostile append: {status} {body}"));
                        }
                    }
                    1 => {
                        let (status, _) = host
                            .get(&format!("/v1/stores/{HOSTILE}/query/hostile?args=%7B%7D"))
                            .await;
                        if status == 200 {
                            tally.unexpected("a spinning query answered 200".into());
                        } else {
                            tally
                                .hostile_queries_refused
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    2..=5 => {
                        let began = Instant::now();
                        let (status, body) = host
                            .get(&format!("/v1/stores/{store}/query/count?args=%7B%7D"))
                            .await;
                        queries
                            .lock()
                            .unwrap()
                            .record(began - start, began.elapsed());
                        if status == 200 && body["applied"].is_u64() {
                            tally.queries.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.unexpected(format!("query {store}: {status} {body}"));
                        }
                    }
                    _ => {
                        let began = Instant::now();
                        let (status, body) = host
                            .post(
                                &format!("/v1/stores/{store}/events"),
                                json!({"type": "kv.put",
                                       "payload": {"key": format!("k-{worker}-{n}"), "value": n}}),
                            )
                            .await;
                        appends
                            .lock()
                            .unwrap()
                            .record(began - start, began.elapsed());
                        if status == 202 {
                            per_store[pick].fetch_add(1, Ordering::Relaxed);
                            tally.appended.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.unexpected(format!("append {store}: {status} {body}"));
                        }
                    }
                }
            }
        }));
    }

    // Webhooks add a store, feed it, and remove it again, all along.
    let churn = {
        let (host, tally) = (host.clone(), tally.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            while Instant::now() < deadline {
                k += 1;
                let id = format!("soak-churn-{k:05}");
                let send = |event: &'static str, id: String| {
                    let host = host.clone();
                    async move {
                        let response = host
                            .client
                            .post(format!("{}/webhooks/workspaces", host.url))
                            .header("x-webhook-secret", SECRET)
                            .header("content-type", "application/json")
                            .body(json!({"event": event, "instanceId": id}).to_string())
                            .send()
                            .await
                            .expect("webhook request");
                        let status = response.status().as_u16();
                        (status, response.text().await.unwrap_or_default())
                    }
                };
                let (status, body) = send("workspace.created", id.clone()).await;
                if status != 200 {
                    tally.unexpected(format!("webhook created {id}: {status} {body}"));
                    continue;
                }
                tally.webhook_adds.fetch_add(1, Ordering::Relaxed);
                for i in 0..3 {
                    let (status, body) = host
                        .post(
                            &format!("/v1/stores/{id}/events"),
                            json!({"type": "kv.put", "payload": {"key": format!("c{i}"), "value": i}}),
                        )
                        .await;
                    if status == 202 {
                        tally.churn_events.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.unexpected(format!("append churn {id}: {status} {body}"));
                    }
                }
                host.settle(&id).await;
                let count = host.query(&id, "count", json!({})).await;
                if count["applied"] != 3 {
                    tally.unexpected(format!("churn store {id} applied {count}"));
                }
                let (status, body) = send("workspace.deleted", id.clone()).await;
                if status == 200 {
                    tally.webhook_removes.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.unexpected(format!("webhook deleted {id}: {status} {body}"));
                }
            }
        })
    };

    for task in tasks {
        task.await.expect("load client");
    }
    churn.await.expect("webhook churn");
    let rss_windows = rss_windows.await.expect("RSS sampler");
    let rss_end = rss_bytes();
    let load_secs = start.elapsed().as_secs_f64();

    // Zero lost events: every accepted append is applied exactly once.
    let mut checked_events = 0u64;
    for (index, id) in writers.iter().enumerate() {
        host.settle(id).await;
        let expected = appended_per_store[index].load(Ordering::Relaxed);
        let count = host.query(id, "count", json!({})).await;
        assert_eq!(
            count["applied"].as_u64(),
            Some(expected),
            "{id}: every accepted event applied once ({count})"
        );
        assert_eq!(count["kv"].as_u64(), Some(expected), "{id}: {count}");
        checked_events += expected;
    }
    // Scheduled tasks ran, and no run is recorded twice.
    let mut runs_total = 0usize;
    for id in tickers.iter() {
        let runs = host.query(id, "runs", json!({})).await;
        let runs = runs["runs"].as_array().cloned().unwrap_or_default();
        assert!(!runs.is_empty(), "{id}: its task ran");
        let distinct: HashSet<String> = runs
            .iter()
            .map(|r| format!("{}@{}", r["taskId"], r["scheduledFor"]))
            .collect();
        assert_eq!(distinct.len(), runs.len(), "{id}: a run recorded twice");
        runs_total += runs.len();
    }
    // The hostile tenant's failures stayed its own.
    let (_, hostile) = host.get(&format!("/v1/stores/{HOSTILE}")).await;
    let unexpected = tally.unexpected.lock().unwrap().clone();

    println!("soak: p99 latency per 10 s window (append / query), RSS at its end:");
    let mut appends = std::mem::take(&mut *appends.lock().unwrap());
    let mut queries = std::mem::take(&mut *queries.lock().unwrap());
    for (window, values) in appends.windows.iter_mut() {
        let count = values.len();
        let append_p99 = p99(values);
        let query_p99 = queries.windows.get_mut(window).map_or(0, |v| p99(v));
        println!(
            "  {:>4}-{:<4} s: {count:>7} appends, p99 {:>8.2} ms / {:>8.2} ms, RSS {}",
            window * 10,
            window * 10 + 10,
            append_p99 as f64 / 1000.0,
            query_p99 as f64 / 1000.0,
            rss_windows.get(window).map_or("-".into(), |&rss| mib(rss))
        );
    }
    let mut all_appends: Vec<u64> = appends.windows.values().flatten().copied().collect();
    let mut all_queries: Vec<u64> = queries.windows.values().flatten().copied().collect();
    // Flat RSS: what the second half of the load spans (the first fills the sandbox pool and
    // the caches of stores that wake for the first time).
    let second_half: Vec<u64> = rss_windows
        .iter()
        .filter(|&(&window, _)| window * 10 >= seconds / 2)
        .map(|(_, &rss)| rss)
        .collect();
    storehost_tests::report(&format!(
        "soak: RSS {} at the start of the load, {} to {} over its second half, {} at its end",
        mib(rss_start),
        mib(second_half.iter().copied().min().unwrap_or(0)),
        mib(second_half.iter().copied().max().unwrap_or(0)),
        mib(rss_end)
    ));
    storehost_tests::report(&format!(
        "soak summary ({} stores, {load_secs:.0} s):\n  \
         {} events appended to writers and all {checked_events} applied exactly once (p99 {:.2} ms)\n  \
         {} queries answered (p99 {:.2} ms)\n  \
         {} scheduled runs across {} stores, none recorded twice\n  \
         {} stores added and {} removed by webhook, {} events to them all applied\n  \
         hostile tenant: {} events accepted, {} spinning queries refused, {} of its calls stopped at its CPU quota (its own failures)\n  \
         unexpected failures: {}",
        stores + 1,
        tally.appended.load(Ordering::Relaxed),
        p99(&mut all_appends) as f64 / 1000.0,
        tally.queries.load(Ordering::Relaxed),
        p99(&mut all_queries) as f64 / 1000.0,
        runs_total,
        tickers.len(),
        tally.webhook_adds.load(Ordering::Relaxed),
        tally.webhook_removes.load(Ordering::Relaxed),
        tally.churn_events.load(Ordering::Relaxed),
        tally.hostile_appends.load(Ordering::Relaxed),
        tally.hostile_queries_refused.load(Ordering::Relaxed),
        hostile["failuresByReason"]["cpu_time"],
        unexpected.len(),
    ));
    assert!(
        unexpected.is_empty(),
        "unexpected failures: {unexpected:#?}"
    );
    assert!(
        tally.webhook_adds.load(Ordering::Relaxed) > 0,
        "webhooks added stores"
    );
    let hostile_failures = hostile["failuresByReason"]["cpu_time"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        hostile_failures > 0 || tally.hostile_appends.load(Ordering::Relaxed) == 0,
        "the hostile tenant's events fail on its own CPU quota: {hostile}"
    );
}
