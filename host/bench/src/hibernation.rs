//! Hibernation: the cold wake of a hibernated store (POST one event → processed, its sandbox
//! instantiated again) with its files still open and with them closed, against a warm event
//! to the same store right after; and what a store hibernated for long still costs the host
//! (RSS and open file descriptors per store, over N stores that each processed one event and
//! then went to sleep). Also the cold wake on a quiet host, the way a hibernated store is
//! usually woken: after a spell in which the host did nothing, against an event to a store
//! that never hibernates after the same spell.

use std::time::{Duration, Instant};

use serde_json::json;
use storehost_store::{Store, StoreId, heap};
use storehost_tests::{TestHost, TestHostOptions, programs};

use crate::raw;
use crate::report::{Progress, Row, Table, ms, percentile, thousands, times_of};

/// Idle time before a store hibernates in this benchmark.
const IDLE: Duration = Duration::from_millis(200);
/// Sandbox pool slots: far fewer than stores, as on a host that relies on hibernation.
const POOL_SLOTS: u32 = 256;
/// How long the host does nothing before each wake of the quiet-host figure: longer than
/// [`IDLE`], so the store woken before has hibernated and closed its files by then.
const QUIET: Duration = Duration::from_millis(300);
/// Wakes, unmeasured, between the pause that settles the disk and the measured ones of a
/// host waking stores one after another: the first wakes after a pause are wakes on a quiet
/// host, which the quiet-host figure measures (on this VM they were 2–3.6 ms, among the ten
/// slowest of 1,000 on which the p99 stands).
const WARM_UP_WAKES: usize = 5;

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let samples = if quick { 200 } else { 1_000 };
    let quiet_samples = if quick { 30 } else { 100 };
    // A store hibernated for long keeps none of its files open, so neither memory nor the
    // descriptor limit stops a host at the 10,000 stores.
    let sleepers = if quick { 1_000 } else { 10_000 };
    let active = if quick { 100 } else { 1_000 };
    let rss_at_start = rss_bytes()?;

    // Stores that close their files as soon as they hibernate (`close_files_after_ms = 0`):
    // what a long-idle store costs, and its wake.
    let data = storehost_tests::scratch_dir()?;
    let max_stores = samples + quiet_samples + sleepers + 20;
    let host = start_on(Some(data.path()), max_stores, Duration::ZERO).await;
    for i in 0..10 {
        let store = provision(&host, &format!("warm-{i:02}")).await?;
        event_round(&host, &store).await?;
    }
    wait_all_hibernated(&host, "warm", 10).await?;
    raw::settle_disk().await;
    settle_heap().await;
    let rss_before = rss_bytes()?;
    let fds_before = open_fds()?;
    let mut progress = Progress::new(
        format!("{sleepers} stores: provisioned, one event each, then idle"),
        sleepers,
    );
    for i in 0..sleepers {
        let store = provision(&host, &format!("sleep-{i:05}")).await?;
        event_round(&host, &store).await?;
        progress.step();
    }
    wait_all_hibernated(&host, "sleep", sleepers).await?;
    settle_heap().await;
    let rss_after = rss_bytes()?;
    let fds_after = open_fds()?;
    let per_store = rss_after.saturating_sub(rss_before) as f64 / sleepers as f64;
    let fds_per_store = fds_after.saturating_sub(fds_before) as f64 / sleepers as f64;

    // Beside them, stores that stay awake (a second host in this process that never
    // hibernates): each keeps its sandbox, its linear memory and its files.
    let awake = TestHost::start_with(TestHostOptions {
        max_stores: active + 10,
        pool_slots: Some(u32::try_from(active + 10)?),
        idle_timeout: None,
        ..TestHostOptions::default()
    })
    .await;
    awake.deploy("trivial", programs::TRIVIAL).await;
    let mut progress = Progress::new(
        format!("{active} active stores beside them: provisioned, two events each"),
        active,
    );
    for i in 0..active {
        let store = provision(&awake, &format!("busy-{i:05}")).await?;
        event_round(&awake, &store).await?;
        event_round(&awake, &store).await?;
        progress.step();
    }
    let rss_mixed = rss_bytes()?;
    awake.stop().await;
    let deep = cold_wakes(&host, "files closed", samples).await?;
    let quiet_cold = quiet_wakes(&host, quiet_samples).await?;
    host.stop().await;
    let restart = restart(data.path(), max_stores).await?;
    let quiet_awake = quiet_events_to_an_awake_store(quiet_samples).await?;

    // Stores that keep their files open while they hibernate (the first `close_files_after_ms`).
    let host = start(samples + 20, Duration::from_secs(3600)).await;
    let light = cold_wakes(&host, "files open", samples).await?;
    host.stop().await;

    for (wakes, what) in [
        (light, "files still open (the first close_files_after_ms)"),
        (deep, "files closed too"),
    ] {
        let Wakes { mut cold, mut warm } = wakes;
        let cold_p50 = percentile(&mut cold, 50.0);
        let cold_p99 = percentile(&mut cold, 99.0);
        let warm_p50 = percentile(&mut warm, 50.0);
        let warm_p99 = percentile(&mut warm, 99.0);
        table.push(Row {
            figure: format!(
                "cold wake: POST event → processed on a hibernated store, {what} (trivial plugin, {samples} stores one after another, after {WARM_UP_WAKES} unmeasured; sandbox re-instantiated)"
            ),
            unit: "ms",
            p50: ms(cold_p50),
            p99: ms(cold_p99),
            reference: format!(
                "the next event to the same, now awake store: p50 {} ms / p99 {} ms",
                ms(warm_p50),
                ms(warm_p99)
            ),
            ratio: format!(
                "p50 {} / p99 {}",
                times_of(cold_p50, warm_p50),
                times_of(cold_p99, warm_p99)
            ),
            target: "p99 ≤ 1 ms",
        });
    }
    let (mut cold, mut awake) = (quiet_cold, quiet_awake);
    let (cold_p50, cold_p99) = (percentile(&mut cold, 50.0), percentile(&mut cold, 99.0));
    let (awake_p50, awake_p99) = (percentile(&mut awake, 50.0), percentile(&mut awake, 99.0));
    table.push(Row {
        figure: format!(
            "cold wake on a quiet host: POST event → processed on a store hibernated with its files closed, the host idle for {} ms before each (trivial plugin, {quiet_samples} stores)",
            QUIET.as_millis()
        ),
        unit: "ms",
        p50: ms(cold_p50),
        p99: ms(cold_p99),
        reference: format!(
            "an event to a store that never hibernates, the host idle as long before: p50 {} ms / p99 {} ms",
            ms(awake_p50),
            ms(awake_p99)
        ),
        ratio: format!(
            "p50 {} / p99 {}",
            times_of(cold_p50, awake_p50),
            times_of(cold_p99, awake_p99)
        ),
        target: "p99 ≤ 1 ms",
    });
    table.push(Row {
        figure: format!(
            "memory per hibernated store, files closed: RSS delta over {sleepers} stores once the host settled (its heap trimmed; {} open fds per store)",
            thousands(fds_per_store)
        ),
        unit: "KB",
        p50: format!("{:.1}", per_store / 1024.0),
        p99: "—".to_owned(),
        reference: format!(
            "RSS {} MB before, {} MB after",
            thousands(rss_before as f64 / 1_048_576.0),
            thousands(rss_after as f64 / 1_048_576.0)
        ),
        ratio: "—".to_owned(),
        target: "≤ 20 KB",
    });
    table.push(Row {
        figure: format!(
            "host restart with {} stores (each processed events, then slept): every store opened and recovered, as before the API listens",
            thousands(restart.stores as f64)
        ),
        unit: "s",
        p50: format!("{:.2}", restart.took.as_secs_f64()),
        p99: "—".to_owned(),
        reference: format!(
            "after it: RSS +{} MB, {} more open files (stores with nothing to do sleep with their files closed)",
            thousands(restart.rss_added as f64 / 1_048_576.0),
            restart.fds_added
        ),
        ratio: "—".to_owned(),
        target: "—",
    });
    table.push(Row {
        figure: format!(
            "RSS with {} stores of which {active} active (awake, sandbox live), the rest hibernated with files closed",
            thousands((sleepers + active) as f64)
        ),
        unit: "MB",
        p50: thousands(rss_mixed as f64 / 1_048_576.0),
        p99: "—".to_owned(),
        reference: format!(
            "the process before any store: {} MB",
            thousands(rss_at_start as f64 / 1_048_576.0)
        ),
        ratio: "—".to_owned(),
        target: if quick {
            "≤ 1.5 GB (at 10,000 + 1,000; quick runs fewer)"
        } else {
            "≤ 1.5 GB"
        },
    });
    Ok(())
}

/// What a host restart on the sleeping stores' data cost.
struct Restart {
    stores: usize,
    took: Duration,
    rss_added: u64,
    fds_added: usize,
}

/// Starts a host again on `data` (its stores all stopped) and times the opening of every
/// store it had, as `storehost serve` opens them before it listens; then measures what the
/// host holds once it settled.
async fn restart(data: &std::path::Path, max_stores: usize) -> anyhow::Result<Restart> {
    let host = start_on(Some(data), max_stores, Duration::ZERO).await;
    settle_heap().await;
    let (rss_before, fds_before) = (rss_bytes()?, open_fds()?);
    eprintln!("restart: opening every store again");
    let started = Instant::now();
    let stores = host.orchestrator.restore_persisted().await?;
    let took = started.elapsed();
    wait_all_hibernated(&host, "", stores).await?;
    settle_heap().await;
    let measured = Restart {
        stores,
        took,
        rss_added: rss_bytes()?.saturating_sub(rss_before),
        fds_added: open_fds()?.saturating_sub(fds_before),
    };
    host.stop().await;
    Ok(measured)
}

/// A host whose stores hibernate after [`IDLE`] and close their files `close_files_after`
/// later, with the trivial plugin deployed.
async fn start(max_stores: usize, close_files_after: Duration) -> TestHost {
    start_on(None, max_stores, close_files_after).await
}

/// [`start`] on the data directory `data` (a scratch one when `None`).
async fn start_on(
    data: Option<&std::path::Path>,
    max_stores: usize,
    close_files_after: Duration,
) -> TestHost {
    let host = TestHost::start_with(TestHostOptions {
        data_dir: data.map(|dir| dir.join("data")),
        max_stores,
        pool_slots: Some(POOL_SLOTS),
        idle_timeout: Some(IDLE),
        close_files_after,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("trivial", programs::TRIVIAL).await;
    host
}

/// Cold wakes and the warm events right after them.
struct Wakes {
    cold: Vec<Duration>,
    warm: Vec<Duration>,
}

/// `samples` stores, each provisioned, given one event and left to hibernate; then for each a
/// cold wake (one event) and a warm event right after.
async fn cold_wakes(host: &TestHost, what: &str, samples: usize) -> anyhow::Result<Wakes> {
    let mut stores = sleeping_stores(
        host,
        "wake",
        samples + WARM_UP_WAKES,
        &format!("stores to wake ({what})"),
    )
    .await?;
    for store in stores.drain(..WARM_UP_WAKES) {
        event_round(host, &store).await?;
    }
    let mut wakes = Wakes {
        cold: Vec::with_capacity(samples),
        warm: Vec::with_capacity(samples),
    };
    let mut progress = Progress::new(
        format!("hibernated store ({what}): event → processed, then a warm one"),
        samples,
    );
    for store in &stores {
        ensure_hibernated(store)?;
        wakes.cold.push(event_round(host, store).await?);
        wakes.warm.push(event_round(host, store).await?);
        progress.step();
    }
    Ok(wakes)
}

/// `count` stores named `{prefix}-N`, each provisioned and given one event, once all have
/// hibernated and the disk has settled.
async fn sleeping_stores(
    host: &TestHost,
    prefix: &str,
    count: usize,
    what: &str,
) -> anyhow::Result<Vec<Store>> {
    let mut stores = Vec::with_capacity(count);
    let mut progress = Progress::new(format!("{what}: provisioned, one event each"), count);
    for i in 0..count {
        let store = provision(host, &format!("{prefix}-{i:05}")).await?;
        event_round(host, &store).await?;
        stores.push(store);
        progress.step();
    }
    wait_all_hibernated(host, prefix, count).await?;
    raw::settle_disk().await;
    Ok(stores)
}

/// Fails the run when `store`, about to be measured waking, is awake already.
fn ensure_hibernated(store: &Store) -> anyhow::Result<()> {
    anyhow::ensure!(
        store.status().state == storehost_store::StoreState::Hibernated,
        "store {} woke up before it was measured",
        store.id()
    );
    Ok(())
}

/// `samples` stores, each provisioned, given one event and left to hibernate with its files
/// closed; then each woken by one event after [`QUIET`] in which the host did nothing (the
/// store woken before has gone back to sleep meanwhile).
async fn quiet_wakes(host: &TestHost, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let stores = sleeping_stores(host, "quiet", samples, "stores to wake on a quiet host").await?;
    let mut progress = Progress::new(
        format!(
            "hibernated store on a quiet host: event → processed, {} ms apart",
            QUIET.as_millis()
        ),
        samples,
    );
    let mut wakes = Vec::with_capacity(samples);
    for store in &stores {
        tokio::time::sleep(QUIET).await;
        ensure_hibernated(store)?;
        wakes.push(event_round(host, store).await?);
        progress.step();
    }
    Ok(wakes)
}

/// The reference of [`quiet_wakes`]: `samples` events to a store on a host where stores never
/// hibernate (its sandbox live, its files open), each after [`QUIET`] in which the host did
/// nothing but advance the epoch for that sandbox.
async fn quiet_events_to_an_awake_store(samples: usize) -> anyhow::Result<Vec<Duration>> {
    let host = TestHost::start_with(TestHostOptions {
        idle_timeout: None,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("trivial", programs::TRIVIAL).await;
    let store = provision(&host, "awake").await?;
    event_round(&host, &store).await?;
    raw::settle_disk().await;
    let mut progress = Progress::new(
        format!(
            "awake store on a quiet host: event → processed, {} ms apart",
            QUIET.as_millis()
        ),
        samples,
    );
    let mut events = Vec::with_capacity(samples);
    for _ in 0..samples {
        tokio::time::sleep(QUIET).await;
        events.push(event_round(&host, &store).await?);
        progress.step();
    }
    host.stop().await;
    Ok(events)
}

/// `PUT /v1/stores/{id}` with the trivial plugin; answers the running store.
async fn provision(host: &TestHost, id: &str) -> anyhow::Result<Store> {
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            &format!("/v1/stores/{id}"),
            Some(json!({"plugin": "trivial"})),
        )
        .await;
    anyhow::ensure!(
        status == 201,
        "PUT /v1/stores/{id} answered {status}: {body}"
    );
    host.orchestrator
        .get(&StoreId::new(id)?)
        .await
        .ok_or_else(|| anyhow::anyhow!("store {id} does not run"))
}

/// One event to `store`: the time from `POST` until it is processed.
async fn event_round(host: &TestHost, store: &Store) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (status, body) = host
        .post(
            &format!("/v1/stores/{}/events", store.id()),
            json!({"type": "tick", "payload": {}}),
        )
        .await;
    anyhow::ensure!(
        status == 202,
        "POST event to {} answered {status}: {body}",
        store.id()
    );
    let seq = body["seq"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no seq in {body}"))?;
    anyhow::ensure!(
        store.wait_processed(seq, Duration::from_secs(30)).await,
        "store {} did not process event {seq}",
        store.id()
    );
    Ok(started.elapsed())
}

/// Waits until the `count` stores whose ids start with `prefix` all hibernate.
async fn wait_all_hibernated(host: &TestHost, prefix: &str, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let asleep = host
            .orchestrator
            .list()
            .await
            .iter()
            .filter(|view| view.id.as_str().starts_with(prefix))
            .filter(|view| view.status.state == storehost_store::StoreState::Hibernated)
            .count();
        if asleep >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {asleep} of {count} {prefix} stores hibernated"
        );
        tokio::time::sleep(IDLE).await;
    }
}

/// Waits until the host has handed back the heap memory the stores that just closed their
/// files freed (see `storehost_store::heap`): a trim begins at most one trim delay after the
/// last close, or after the trim running then.
async fn settle_heap() {
    tokio::time::sleep(heap::TRIM_QUIET * 2 + Duration::from_millis(500)).await;
}

/// The process's resident set, from `/proc/self/statm`.
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/statm: {statm}"))?
        .parse()?;
    Ok(pages * 4096)
}

/// How many file descriptors the process has open.
fn open_fds() -> anyhow::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}
