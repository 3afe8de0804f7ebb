//! Single-event round trip at a fixed offered load: `POST` one `echo` event → processed, seen by
//! the client as the plugin's reply (`echoed {"of": seq}`, committed with the cursor) through
//! the long-poll `GET /v1/stores/{id}/events?waitMs=`, which one follower per store keeps open
//! (as a client tailing a store does). Open loop: requests leave on a fixed schedule whether or
//! not earlier ones have answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

use crate::report::{Progress, Row, Table, ms, per_second, percentile, times_of};

/// Stores the load is spread over.
const STORES: usize = 20;
/// Offered load, in events per second.
const RATE: u64 = 2_000;
/// Requests in flight beyond which the sender skips a beat (a collapsing host would otherwise
/// take every file descriptor of the process).
const MAX_IN_FLIGHT: usize = 1_000;

/// When each reply was seen, by store and the seq of the event it answers.
type Replies = Arc<Mutex<HashMap<(usize, u64), Instant>>>;

/// One request: its store, when it was sent, when it was acknowledged, and its seq.
struct Sent {
    store: usize,
    at: Instant,
    acked: Instant,
    seq: u64,
}

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let seconds = if quick { 3 } else { 10 };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!(
        "round trip: {RATE} events/s for {seconds} s over {STORES} stores (open loop), replies seen by long-poll"
    );
    let host = Arc::new(
        TestHost::start_with(TestHostOptions {
            max_stores: STORES + 5,
            max_concurrent_invocations: cores,
            ..TestHostOptions::default()
        })
        .await,
    );
    host.deploy("bench", programs::BENCH).await;
    let replies: Replies = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut followers = tokio::task::JoinSet::new();
    let mut ids = Vec::with_capacity(STORES);
    for index in 0..STORES {
        let id = format!("rt-{index:02}");
        host.add_store(&id, "bench", &[]).await;
        followers.spawn(follow(
            host.clone(),
            index,
            id.clone(),
            replies.clone(),
            stop.clone(),
        ));
        ids.push(id);
    }
    // Warm up: every sandbox live, connections open, followers polling.
    for (index, id) in ids.iter().enumerate() {
        let sent = post(&host, index, id, Instant::now()).await?;
        wait_for_reply(&replies, index, sent.seq).await?;
    }

    let total = usize::try_from(RATE * seconds).unwrap_or(usize::MAX);
    let period = Duration::from_nanos(1_000_000_000 / RATE);
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let failed = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut skipped = 0usize;
    let mut lag = Vec::with_capacity(total);
    let mut requests = tokio::task::JoinSet::new();
    let mut progress = Progress::new("events sent", total);
    let start = Instant::now();
    for i in 0..total {
        let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
        }
        progress.step();
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        let at = Instant::now();
        lag.push(at.saturating_duration_since(due));
        let index = i % STORES;
        let (host, id, sent, failed, in_flight) = (
            host.clone(),
            ids[index].clone(),
            sent.clone(),
            failed.clone(),
            in_flight.clone(),
        );
        in_flight.fetch_add(1, Ordering::Relaxed);
        requests.spawn(async move {
            match post(&host, index, &id, at).await {
                Ok(one) => lock(&sent).push(one),
                Err(err) => {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("round trip: a request failed: {err:#}");
                    }
                }
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    while requests.join_next().await.is_some() {}
    let offered = per_second(total - skipped, start.elapsed());
    // Give the last replies time to arrive.
    let sent = std::mem::take(&mut *lock(&sent));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && sent
            .iter()
            .any(|s| !lock(&replies).contains_key(&(s.store, s.seq)))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while followers.join_next().await.is_some() {}
    if let Ok(host) = Arc::try_unwrap(host) {
        host.stop().await;
    }

    let replies = lock(&replies);
    let mut acked = Vec::with_capacity(sent.len());
    let mut processed = Vec::with_capacity(sent.len());
    let mut unanswered = 0usize;
    for one in &sent {
        acked.push(one.acked - one.at);
        match replies.get(&(one.store, one.seq)) {
            Some(seen) => processed.push(seen.saturating_duration_since(one.at)),
            None => unanswered += 1,
        }
    }
    let failed = failed.load(Ordering::Relaxed) + unanswered;
    let lag_p99 = percentile(&mut lag, 99.0);
    eprintln!(
        "round trip: {} answered, {failed} failed or unanswered, {skipped} skipped (over {MAX_IN_FLIGHT} in flight); sender lag behind schedule p99 {} ms; sent {offered:.0} events/s",
        processed.len(),
        ms(lag_p99),
    );
    let p50 = percentile(&mut processed, 50.0);
    let p99 = percentile(&mut processed, 99.0);
    let ack_p50 = percentile(&mut acked, 50.0);
    let ack_p99 = percentile(&mut acked, 99.0);
    table.push(Row {
        figure: format!(
            "round trip: POST one event → processed, reply seen by long-poll ({RATE} events/s offered over {STORES} stores, open loop; sent {offered:.0}/s; {failed} failed, {skipped} skipped of {total}; sender lag p99 {} ms)",
            ms(lag_p99)
        ),
        unit: "ms",
        p50: ms(p50),
        p99: ms(p99),
        reference: format!(
            "POST → 202 (durable) of the same requests: p50 {} / p99 {}",
            ms(ack_p50),
            ms(ack_p99)
        ),
        ratio: format!("p99 {}", times_of(p99, ack_p99)),
        target: "p99 ≤ 5 ms",
    });
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends one `echo` event to store `index`; answers what was sent and when it was accepted.
async fn post(host: &TestHost, index: usize, id: &str, at: Instant) -> anyhow::Result<Sent> {
    let response = host
        .client
        .post(format!("{}/v1/stores/{id}/events", host.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"type":"echo","payload":{}}"#)
        .send()
        .await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    let acked = Instant::now();
    anyhow::ensure!(status == 202, "append answered {status}: {body}");
    let seq = body["seq"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no seq in {body}"))?;
    Ok(Sent {
        store: index,
        at,
        acked,
        seq,
    })
}

/// Tails store `id` with long-polls and records when each reply appears, until `stop`.
async fn follow(
    host: Arc<TestHost>,
    index: usize,
    id: String,
    replies: Replies,
    stop: Arc<AtomicBool>,
) {
    let mut after = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let page = async {
            host.client
                .get(format!(
                    "{}/v1/stores/{id}/events?after={after}&limit=1000&waitMs=200",
                    host.url
                ))
                .bearer_auth(TOKEN)
                .send()
                .await?
                .json::<Value>()
                .await
        }
        .await;
        let seen = Instant::now();
        let Ok(page) = page else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if let Some(events) = page["events"].as_array() {
            let mut replies = lock(&replies);
            for event in events.iter().filter(|e| e["type"] == "echoed") {
                if let Some(of) = event["payload"]["of"].as_u64() {
                    replies.entry((index, of)).or_insert(seen);
                }
            }
        }
        after = page["next"].as_u64().unwrap_or(after);
    }
}

/// Waits until the reply to `seq` of store `index` has been seen.
async fn wait_for_reply(replies: &Replies, index: usize, seq: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lock(replies).contains_key(&(index, seq)) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no reply to event {seq} of store {index} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
