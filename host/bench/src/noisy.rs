//! Noisy neighbours: 100 well-behaved stores under steady load, alone and then beside 10 hostile
//! stores (spinning, memory-hungry, SQL bombs, and flooded ones). Reports the well-behaved
//! stores' event latency (append → processed) in both runs, the ratio, and lost or failed events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use storehost_store::{Quotas, RetryPolicy, Store, StoreId};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

use crate::report::{Row, Table, ms, percentile};

const GOOD_STORES: usize = 100;

struct Outcome {
    latencies: Vec<Duration>,
    lost: u64,
    failed: u64,
}

pub async fn run(quick: bool, table: &mut Table) {
    let (rate, seconds) = if quick { (400, 3) } else { (1_000, 10) };
    eprintln!("noisy neighbours: {GOOD_STORES} stores at {rate} events/s for {seconds} s, alone");
    let mut alone = measure(false, rate, seconds).await;
    eprintln!("noisy neighbours: the same beside 10 hostile stores");
    let mut beside = measure(true, rate, seconds).await;
    for (label, outcome) in [("alone", &mut alone), ("beside hostile", &mut beside)] {
        let p50 = percentile(&mut outcome.latencies, 50.0);
        let p99 = percentile(&mut outcome.latencies, 99.0);
        eprintln!(
            "{label}: p50 {} ms p99 {} ms, lost {}, failed {}",
            ms(p50),
            ms(p99),
            outcome.lost,
            outcome.failed
        );
    }
    let alone_p50 = percentile(&mut alone.latencies, 50.0);
    let alone_p99 = percentile(&mut alone.latencies, 99.0);
    let beside_p50 = percentile(&mut beside.latencies, 50.0);
    let beside_p99 = percentile(&mut beside.latencies, 99.0);
    table.push(Row {
        figure: format!("noisy neighbours: well-behaved event latency beside 10 hostile stores ({rate} ev/s over {GOOD_STORES} stores)"),
        unit: "ms",
        p50: ms(beside_p50),
        p99: ms(beside_p99),
        reference: format!("alone: p50 {} / p99 {}", ms(alone_p50), ms(alone_p99)),
        ratio: format!("p99 {:.2}", ratio(beside_p99, alone_p99)),
        target: "p99 ratio ≤ 1.5",
    });
    table.push(Row {
        figure: "noisy neighbours: well-behaved events lost or failed (alone / beside hostile)"
            .into(),
        unit: "events",
        p50: format!(
            "{} / {}",
            alone.lost + alone.failed,
            beside.lost + beside.failed
        ),
        p99: "-".into(),
        reference: format!(
            "{} / {} sent",
            alone.latencies.len() as u64 + alone.lost + alone.failed,
            beside.latencies.len() as u64 + beside.lost + beside.failed
        ),
        ratio: "-".into(),
        target: "0",
    });
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

async fn measure(hostile: bool, rate: u64, seconds: u64) -> Outcome {
    let host = Arc::new(
        TestHost::start_with(TestHostOptions {
            retry: RetryPolicy {
                attempts: 2,
                base_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(50),
                ..RetryPolicy::default()
            },
            max_stores: GOOD_STORES + 20,
            max_concurrent_invocations: std::thread::available_parallelism().map_or(2, |n| n.get()),
            ..TestHostOptions::default()
        })
        .await,
    );
    host.deploy("writer", programs::WRITER).await;
    let mut good = Vec::new();
    for i in 0..GOOD_STORES {
        good.push(host.add_store(&format!("good-{i}"), "writer", &[]).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut troublemakers = Vec::new();
    if hostile {
        troublemakers = start_hostile(&host, stop.clone()).await;
        // Measure beside tenants that are already misbehaving (steady state). A hostile
        // tenant's very first calls run at normal priority, so a fresh SQL bomb can hold a
        // slot for one statement (up to its cpu_ms_per_call) before it is demoted.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut n = 0usize;
    while Instant::now() < deadline {
        ticker.tick().await;
        let store: Store = good[n % GOOD_STORES].clone();
        n += 1;
        let (host, failed, lost, latencies) = (
            host.clone(),
            failed.clone(),
            lost.clone(),
            latencies.clone(),
        );
        sent.fetch_add(1, Ordering::Relaxed);
        in_flight.spawn(async move {
            let started = Instant::now();
            let response = host
                .client
                .post(format!("{}/v1/stores/{}/events", host.url, store.id()))
                .bearer_auth(TOKEN)
                .json(&json!({"type": "kv.put", "payload": {"key": format!("k{n}"), "value": n}}))
                .send()
                .await;
            let seq = match response {
                Ok(r) if r.status().as_u16() == 202 => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|b| b["seq"].as_u64()),
                _ => None,
            };
            let Some(seq) = seq else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if store.wait_processed(seq, Duration::from_secs(30)).await {
                latencies
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(started.elapsed());
            } else {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
    stop.store(true, Ordering::Relaxed);
    for task in troublemakers {
        let _ = task.await;
    }
    // An event the plugin failed on counts as failed, not as processed.
    for store in &good {
        failed.fetch_add(store.status().errors_count, Ordering::Relaxed);
    }
    let latencies = std::mem::take(
        &mut *latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Outcome {
        latencies,
        lost: lost.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
    }
}

/// Ten hostile stores, kept busy until `stop`: 3 spinning, 3 memory-hungry, 2 SQL bombs, and 2
/// well-behaved stores flooded far over their ingress rate.
async fn start_hostile(
    host: &Arc<TestHost>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    host.deploy("spin", programs::SPIN).await;
    host.deploy("memory_hog", programs::MEMORY_HOG).await;
    host.deploy("sql_bomb", programs::SQL_BOMB).await;
    let tight = Quotas {
        memory: 16 << 20,
        cpu_ms_per_call: 100,
        wall_ms_per_call: 1_000,
        ..Quotas::default()
    };
    let mut misbehaving = Vec::new();
    for (i, (plugin, event, payload)) in [
        ("spin", "misbehave", json!({})),
        ("spin", "misbehave", json!({})),
        ("spin", "misbehave", json!({})),
        ("memory_hog", "misbehave", json!({})),
        ("memory_hog", "misbehave", json!({})),
        ("memory_hog", "misbehave", json!({})),
        ("sql_bomb", "bomb", json!({"kind": "cte"})),
        ("sql_bomb", "bomb", json!({"kind": "cte"})),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("hostile-{i}");
        host.add_store_with(&id, plugin, &[], tight.clone()).await;
        misbehaving.push((id, event, payload));
    }
    let flood_quotas = Quotas {
        events_per_second: 50,
        burst: 50,
        ..Quotas::default()
    };
    let mut tasks = Vec::new();
    for i in 0..2 {
        let id = format!("flooded-{i}");
        host.add_store_with(&id, "writer", &[], flood_quotas.clone())
            .await;
        let (host, stop) = (host.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let _ = host
                    .client
                    .post(format!("{}/v1/stores/{id}/events", host.url))
                    .bearer_auth(TOKEN)
                    .json(
                        &json!({"type": "kv.put", "payload": {"key": format!("f{n}"), "value": n}}),
                    )
                    .send()
                    .await;
            }
        }));
    }
    for (id, event, payload) in misbehaving {
        let (host, stop) = (host.clone(), stop.clone());
        let store = host
            .orchestrator
            .get(&StoreId::new(&id).expect("valid id"))
            .await
            .expect("running");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Keep a few hostile events queued at all times.
                if store.status().lag < 4 {
                    let _ = store
                        .append(
                            vec![storehost_store::NewEvent {
                                event_type: event.into(),
                                payload: payload.to_string(),
                                idempotency_key: None,
                                request_id: None,
                            }],
                            "api",
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tasks
}
