//! Cold start: a store's first event after it is provisioned (`PUT` store → first event
//! processed), and the first event of a provisioned store whose sandbox is not live yet
//! (instantiated on demand), against a bare wasmtime `InstancePre::instantiate_async` of the
//! same plugin on the same pooling configuration.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use storehost_store::{Store, StoreId};
use storehost_tests::{TestHost, TestHostOptions, programs};

use crate::raw;
use crate::report::{Progress, Row, Table, ms, percentile, times_of, us};

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let samples = if quick { 200 } else { 1_000 };
    let max_stores = 2 * samples + 20;
    eprintln!("cold start: {samples} stores provisioned then given their first event");
    let host = TestHost::start_with(TestHostOptions {
        max_stores,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("trivial", programs::TRIVIAL).await;
    // Warm the host's paths (HTTP connections, allocator) with a few unmeasured stores.
    for i in 0..10 {
        provision_and_wait(&host, &format!("warm-{i:02}")).await?;
    }

    raw::settle_disk().await;
    let mut provisioned = Vec::with_capacity(samples);
    let mut progress = Progress::new("PUT store → first event processed", samples);
    for i in 0..samples {
        provisioned.push(provision_and_wait(&host, &format!("cold-{i:05}")).await?);
        progress.step();
    }

    let mut progress = Progress::new("provisioning idle stores (not measured)", samples);
    for i in 0..samples {
        put_store(&host, &format!("idle-{i:05}")).await?;
        progress.step();
    }
    raw::settle_disk().await;
    let mut first = Vec::with_capacity(samples);
    let mut warm = Vec::with_capacity(samples);
    let mut progress = Progress::new("first and second event of idle stores", samples);
    for i in 0..samples {
        let id = format!("idle-{i:05}");
        let store = running(&host, &id).await?;
        first.push(event_round(&host, &store).await?);
        warm.push(event_round(&host, &store).await?);
        progress.step();
    }
    host.stop().await;

    eprintln!("cold start: {samples} bare instantiations of the same plugin");
    raw::settle_disk().await;
    let mut bare = raw::bare_instantiations(
        programs::TRIVIAL,
        raw::test_host_runtime_options(max_stores),
        samples,
    )
    .await?;
    eprintln!("cold start: {samples} storehost sandbox instantiations of the same plugin");
    let mut ours = raw::storehost_instantiations(
        programs::TRIVIAL,
        raw::test_host_runtime_options(max_stores),
        samples,
    )
    .await?;
    let bare_p50 = percentile(&mut bare.instantiate, 50.0);
    let bare_p99 = percentile(&mut bare.instantiate, 99.0);
    let called_p50 = percentile(&mut bare.first_call, 50.0);
    let called_p99 = percentile(&mut bare.first_call, 99.0);
    let reference = format!(
        "bare instantiate_async: p50 {} µs / p99 {} µs (and its first handle-event call: p50 {} µs / p99 {} µs)",
        us(bare_p50),
        us(bare_p99),
        us(called_p50),
        us(called_p99)
    );
    let p50 = percentile(&mut provisioned, 50.0);
    let p99 = percentile(&mut provisioned, 99.0);
    table.push(Row {
        figure: format!(
            "cold start: PUT store → first event processed (trivial plugin, {samples} stores)"
        ),
        unit: "ms",
        p50: ms(p50),
        p99: ms(p99),
        reference: reference.clone(),
        ratio: format!(
            "p50 {} / p99 {}",
            times_of(p50, bare_p50),
            times_of(p99, bare_p99)
        ),
        target: "≤ 3× bare; p99 ≤ 1 ms",
    });
    let first_p50 = percentile(&mut first, 50.0);
    let first_p99 = percentile(&mut first, 99.0);
    let warm_p50 = percentile(&mut warm, 50.0);
    table.push(Row {
        figure: format!(
            "cold sandbox: first event of a provisioned store, POST → processed (sandbox instantiated on demand; the second event, warm: p50 {} ms)",
            ms(warm_p50)
        ),
        unit: "ms",
        p50: ms(first_p50),
        p99: ms(first_p99),
        reference: reference.clone(),
        ratio: format!(
            "p50 {} / p99 {}",
            times_of(first_p50, bare_p50),
            times_of(first_p99, bare_p99)
        ),
        target: "≤ 3× bare; p99 ≤ 1 ms",
    });
    let ours_p50 = percentile(&mut ours.instantiate, 50.0);
    let ours_p99 = percentile(&mut ours.instantiate, 99.0);
    let ours_called_p50 = percentile(&mut ours.first_call, 50.0);
    let ours_called_p99 = percentile(&mut ours.first_call, 99.0);
    table.push(Row {
        figure: format!(
            "sandbox instantiation alone: storehost's `Sandbox::new` (a store's capabilities, WASI context with its files directory, limits, wall-time bound), the loop of the bare reference ({samples} rounds; with the first handle-event call through storehost: p50 {} µs / p99 {} µs)",
            us(ours_called_p50),
            us(ours_called_p99)
        ),
        unit: "µs",
        p50: us(ours_p50),
        p99: us(ours_p99),
        reference,
        ratio: format!(
            "p50 {} / p99 {}",
            times_of(ours_p50, bare_p50),
            times_of(ours_p99, bare_p99)
        ),
        target: "≤ 3× bare",
    });
    Ok(())
}

/// `PUT /v1/stores/{id}` with the trivial plugin; fails unless it answers 201.
async fn put_store(host: &TestHost, id: &str) -> anyhow::Result<()> {
    let (status, body) = host
        .call(
            Method::PUT,
            &format!("/v1/stores/{id}"),
            Some(json!({"plugin": "trivial"})),
        )
        .await;
    anyhow::ensure!(
        status == 201,
        "PUT /v1/stores/{id} answered {status}: {body}"
    );
    Ok(())
}

/// `POST` one event to `store`; answers its seq.
async fn post_event(host: &TestHost, id: &str) -> anyhow::Result<u64> {
    let (status, body) = host
        .post(
            &format!("/v1/stores/{id}/events"),
            json!({"type": "tick", "payload": {}}),
        )
        .await;
    anyhow::ensure!(
        status == 202,
        "POST event to {id} answered {status}: {body}"
    );
    body["seq"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no seq in {body}"))
}

async fn running(host: &TestHost, id: &str) -> anyhow::Result<Store> {
    host.orchestrator
        .get(&StoreId::new(id)?)
        .await
        .ok_or_else(|| anyhow::anyhow!("store {id} does not run"))
}

/// Provisions store `id` and gives it its first event; answers the time until it is processed.
async fn provision_and_wait(host: &TestHost, id: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    put_store(host, id).await?;
    let seq = post_event(host, id).await?;
    let store = running(host, id).await?;
    anyhow::ensure!(
        store.wait_processed(seq, Duration::from_secs(30)).await,
        "store {id} did not process its first event"
    );
    Ok(started.elapsed())
}

/// One event to `store`: the time from `POST` until it is processed.
async fn event_round(host: &TestHost, store: &Store) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let seq = post_event(host, store.id().as_str()).await?;
    anyhow::ensure!(
        store.wait_processed(seq, Duration::from_secs(30)).await,
        "store {} did not process event {seq}",
        store.id()
    );
    Ok(started.elapsed())
}
