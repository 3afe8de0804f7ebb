//! Durable event throughput: events per second accepted (durable, 202) and processed by the
//! trivial plugin, sent in batches (`{"events":[…]}`) to 1 store and to many stores, against raw
//! rusqlite inserting the same rows in batches of the same size with the same WAL/synchronous
//! settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use storehost_store::{Quotas, Store};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

use crate::raw;
use crate::report::{Progress, Row, Table, per_second, thousands, times};

/// Events per append request.
const BATCH: usize = 100;

struct Outcome {
    accepted: Duration,
    processed: Duration,
    refused: u64,
}

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (one_store_events, many_stores, per_store) = if quick {
        (50_000, 100, 500)
    } else {
        (200_000, 1_000, 200)
    };
    for (stores, events) in [
        (1, one_store_events),
        (many_stores, many_stores * per_store),
    ] {
        eprintln!(
            "throughput: {events} events in batches of {BATCH} to {stores} store(s), then raw SQLite"
        );
        let outcome = measure(stores, events, cores).await?;
        let raw_threads = if stores == 1 { 1 } else { cores };
        raw::settle_disk().await;
        let raw_elapsed = tokio::task::spawn_blocking(move || {
            raw::insert_batches(stores, events, BATCH, raw_threads)
        })
        .await??;
        let processed = per_second(events, outcome.processed);
        let accepted = per_second(events, outcome.accepted);
        let raw_rate = per_second(events, raw_elapsed);
        if outcome.refused > 0 {
            eprintln!(
                "throughput: {} append requests were refused (and retried); the figure includes the retries",
                outcome.refused
            );
        }
        table.push(Row {
            figure: format!(
                "durable throughput, {stores} store{}: events accepted and processed (trivial plugin, batches of {BATCH}; accepted alone {}/s)",
                if stores == 1 { "" } else { "s" },
                thousands(accepted)
            ),
            unit: "events/s",
            p50: thousands(processed),
            p99: "-".into(),
            reference: format!(
                "raw rusqlite, same rows and batches, WAL + synchronous=NORMAL, {raw_threads} thread{}: {}/s",
                if raw_threads == 1 { "" } else { "s" },
                thousands(raw_rate)
            ),
            ratio: times(processed, raw_rate),
            target: if stores == 1 {
                "≥ 0.25× raw"
            } else {
                "≥ 0.25× raw; ≥ 50,000/s aggregate"
            },
        });
    }
    Ok(())
}

/// Sends `events` to `stores` stores in batches and waits until all are processed.
async fn measure(stores: usize, events: usize, cores: usize) -> anyhow::Result<Outcome> {
    // Generous quotas: this row measures the event path, not the ingress limiter.
    let quotas = Quotas {
        events_per_second: 10_000_000,
        burst: 10_000_000,
        ingress_bytes_per_second: 1 << 40,
        max_pending_events: 100_000_000,
        cpu_ms_per_minute: 60_000_000,
        ..Quotas::default()
    };
    let host = Arc::new(
        TestHost::start_with(TestHostOptions {
            max_stores: stores + 10,
            max_concurrent_invocations: cores,
            quotas: quotas.clone(),
            ..TestHostOptions::default()
        })
        .await,
    );
    host.deploy("trivial", programs::TRIVIAL).await;
    let mut handles: Vec<Store> = Vec::with_capacity(stores);
    let mut progress = Progress::new("starting stores (not measured)", stores);
    for i in 0..stores {
        handles.push(
            host.add_store_with(&format!("tp-{i:05}"), "trivial", &[], quotas.clone())
                .await,
        );
        progress.step();
    }
    // One event each first, so every sandbox is live: this row is about steady throughput.
    for store in &handles {
        let seqs = store
            .append(
                vec![storehost_store::NewEvent {
                    event_type: "warm".into(),
                    payload: "{}".into(),
                    idempotency_key: None,
                    request_id: None,
                }],
                "api",
            )
            .await?;
        anyhow::ensure!(
            store.wait_processed(seqs[0], Duration::from_secs(60)).await,
            "store {} did not warm up",
            store.id()
        );
    }

    let batches = events.div_ceil(BATCH);
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..batches)
            .map(|j| {
                let events: Vec<String> = (j * BATCH..((j + 1) * BATCH).min(events))
                    .map(|n| format!("{{\"type\":\"tick\",\"payload\":{}}}", raw::payload(n)))
                    .collect();
                format!("{{\"events\":[{}]}}", events.join(","))
            })
            .collect(),
    );
    let ids: Arc<Vec<String>> = Arc::new(handles.iter().map(|s| s.id().to_string()).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    // Enough requests in flight to keep both the API and the stores busy.
    let streams = if stores == 1 { 4 } else { 32 };
    raw::settle_disk().await;
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (host, bodies, ids, next, refused, sent) = (
            host.clone(),
            bodies.clone(),
            ids.clone(),
            next.clone(),
            refused.clone(),
            sent.clone(),
        );
        senders.spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= bodies.len() {
                    return Ok::<(), anyhow::Error>(());
                }
                let url = format!("{}/v1/stores/{}/events", host.url, ids[j % ids.len()]);
                loop {
                    let response = host
                        .client
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/json")
                        .body(bodies[j].clone())
                        .send()
                        .await?;
                    let status = response.status().as_u16();
                    let _ = response.bytes().await?;
                    match status {
                        202 => break,
                        429 | 503 => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => anyhow::bail!("append to {url} answered {other}"),
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let progress_task = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut progress = Progress::new("batches accepted", batches);
            let mut shown = 0;
            while shown < batches {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = sent.load(Ordering::Relaxed);
                progress.advance(now - shown);
                shown = now;
            }
        })
    };
    while let Some(result) = senders.join_next().await {
        result??;
    }
    let accepted = started.elapsed();
    progress_task.abort();
    let mut progress = Progress::new("stores caught up", stores);
    for store in &handles {
        anyhow::ensure!(
            store
                .wait_processed(store.head(), Duration::from_secs(600))
                .await,
            "store {} did not process its events",
            store.id()
        );
        progress.step();
    }
    let processed = started.elapsed();
    let failed: u64 = handles.iter().map(|s| s.status().errors_count).sum();
    anyhow::ensure!(failed == 0, "{failed} events failed in the plugin");
    drop(handles);
    if let Ok(host) = Arc::try_unwrap(host) {
        host.stop().await;
    }
    Ok(Outcome {
        accepted,
        processed,
        refused: refused.load(Ordering::Relaxed),
    })
}
