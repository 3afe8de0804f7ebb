//! Noisy neighbours: 100 well-behaved stores under steady load, alone and beside 10 hostile
//! stores (spinning, memory-hungry, SQL bombs, and flooded ones). Reports the well-behaved
//! stores' event latency (append → processed) in both conditions, the ratio, and lost or failed
//! events.
//!
//! The two conditions alternate in windows of one host run, so a shared machine's slow and
//! fast moments fall on both alike: in "alone" windows the hostile stores are paused and the
//! flood is off, in "beside" windows they misbehave. The load on the well-behaved stores never
//! stops; an event counts for the window it was sent in, and events sent in the first
//! [`SETTLE`] of a window (while the previous condition drains: a hostile call runs up to its
//! 100 ms CPU quota) count for neither.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use storehost_store::{Quotas, RetryPolicy, Store, StoreId};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

use crate::report::{Row, Table, ms, percentile};

const GOOD_STORES: usize = 100;

/// How long one condition lasts before the other takes over.
const WINDOW: Duration = Duration::from_millis(500);

/// The start of a window whose events are not counted.
const SETTLE: Duration = Duration::from_millis(150);

#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    sent: u64,
    lost: u64,
    failed: u64,
}

pub async fn run(quick: bool, table: &mut Table) {
    let (rate, windows) = if quick { (400, 12) } else { (1_000, 40) };
    eprintln!(
        "noisy neighbours: {GOOD_STORES} stores at {rate} events/s for {windows} windows of {} ms, \
         alone and beside 10 hostile stores in turn",
        WINDOW.as_millis()
    );
    let [mut alone, mut beside] = measure(rate, windows).await;
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
        figure: format!(
            "noisy neighbours: well-behaved event latency beside 10 hostile stores \
             ({rate} ev/s over {GOOD_STORES} stores, alternating {}-ms windows alone / beside)",
            WINDOW.as_millis()
        ),
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
        reference: format!("{} / {} counted", alone.sent, beside.sent),
        ratio: "-".into(),
        target: "0",
    });
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// The well-behaved stores' outcomes `[alone, beside hostile]` over `windows` alternating
/// windows (alone first).
async fn measure(rate: u64, windows: u32) -> [Outcome; 2] {
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
    let flooding = Arc::new(AtomicBool::new(true));
    let flood_requests = Arc::new(AtomicU64::new(0));
    let (hostile, troublemakers) = start_hostile(
        &host,
        stop.clone(),
        flooding.clone(),
        flood_requests.clone(),
    )
    .await;
    // Alone windows follow tenants that already misbehaved (steady state): a hostile tenant's
    // very first calls run at normal priority, until its first breach demotes it.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let outcomes = Arc::new(std::sync::Mutex::new([
        Outcome::default(),
        Outcome::default(),
    ]));
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut n = 0usize;
    let flood_before = flood_requests.load(Ordering::Relaxed);
    for window in 0..windows {
        let beside = window % 2 == 1;
        flooding.store(beside, Ordering::Relaxed);
        for store in &hostile {
            // Queued behind a call in progress, if any: that call is what `SETTLE` waits out.
            let _ = store.set_paused(!beside).await;
        }
        let started = Instant::now();
        while started.elapsed() < WINDOW {
            ticker.tick().await;
            let counted = started.elapsed() >= SETTLE;
            let store: Store = good[n % GOOD_STORES].clone();
            n += 1;
            let (host, outcomes) = (host.clone(), outcomes.clone());
            in_flight.spawn(async move {
                let latency = send_one(&host, &store, n).await;
                if !counted {
                    return;
                }
                let mut outcomes = outcomes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let outcome = &mut outcomes[usize::from(beside)];
                outcome.sent += 1;
                match latency {
                    Sent::Processed(latency) => outcome.latencies.push(latency),
                    Sent::Refused => outcome.failed += 1,
                    Sent::Lost => outcome.lost += 1,
                }
            });
        }
    }
    while in_flight.join_next().await.is_some() {}
    let flooded = flood_requests.load(Ordering::Relaxed) - flood_before;
    let flooding_secs = WINDOW.as_secs_f64() * f64::from(windows / 2);
    eprintln!(
        "flood: {flooded} requests to the 2 flooded stores in {flooding_secs:.0} s of flooding \
         ({:.0}/s against their 2 × 50/s; a refusal answers when the store could take an event)",
        flooded as f64 / flooding_secs
    );
    stop.store(true, Ordering::Relaxed);
    for task in troublemakers {
        let _ = task.await;
    }
    let mut outcomes = std::mem::take(
        &mut *outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    // An event the plugin failed on counts as failed, not as processed (in either condition:
    // a store's error count does not say when).
    let errors: u64 = good.iter().map(|store| store.status().errors_count).sum();
    outcomes[1].failed += errors;
    outcomes
}

enum Sent {
    Processed(Duration),
    Refused,
    Lost,
}

/// Appends one event to `store` over HTTP and waits until it is processed.
async fn send_one(host: &TestHost, store: &Store, n: usize) -> Sent {
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
        return Sent::Refused;
    };
    if store.wait_processed(seq, Duration::from_secs(30)).await {
        Sent::Processed(started.elapsed())
    } else {
        Sent::Lost
    }
}

/// Ten hostile stores, kept busy until `stop`: 3 spinning, 3 memory-hungry, 2 SQL bombs (the
/// stores answered, to be paused and resumed), and 2 well-behaved stores flooded over their
/// ingress rate while `flooding`: a client each that sends again as soon as it is answered,
/// never backing off (counted in `flood_requests`).
async fn start_hostile(
    host: &Arc<TestHost>,
    stop: Arc<AtomicBool>,
    flooding: Arc<AtomicBool>,
    flood_requests: Arc<AtomicU64>,
) -> (Vec<Store>, Vec<tokio::task::JoinHandle<()>>) {
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
        let (host, stop, flooding, flood_requests) = (
            host.clone(),
            stop.clone(),
            flooding.clone(),
            flood_requests.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if !flooding.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                n += 1;
                flood_requests.fetch_add(1, Ordering::Relaxed);
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
    let mut stores = Vec::new();
    for (id, event, payload) in misbehaving {
        let stop = stop.clone();
        let store = host
            .orchestrator
            .get(&StoreId::new(&id).expect("valid id"))
            .await
            .expect("running");
        stores.push(store.clone());
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
    (stores, tasks)
}
