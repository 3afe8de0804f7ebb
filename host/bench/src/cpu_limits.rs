//! What CPU limiting costs: a compute-heavy guest with epoch-based CPU limits on vs off.

use std::time::{Duration, Instant};

use serde_json::json;
use storehost_store::Quotas;
use storehost_tests::{TestHost, TestHostOptions, programs};

use crate::report::{Row, Table, ms, percentile};

pub async fn run(quick: bool, table: &mut Table) {
    let (events, rounds) = if quick {
        (20, 2_000_000)
    } else {
        (60, 5_000_000)
    };
    eprintln!("cpu limits: {events} compute events of {rounds} rounds, limits off then on");
    // Off first, then on, then off again: the reference is the better of the two off runs.
    let mut off = measure(false, events, rounds).await;
    let mut on = measure(true, events, rounds).await;
    let mut off_again = measure(false, events, rounds).await;
    let off_p50 = percentile(&mut off, 50.0).min(percentile(&mut off_again, 50.0));
    let on_p50 = percentile(&mut on, 50.0);
    let on_p99 = percentile(&mut on, 99.0);
    table.push(Row {
        figure: format!("CPU limiting overhead: compute guest, {rounds} rounds per event"),
        unit: "ms/event",
        p50: ms(on_p50),
        p99: ms(on_p99),
        reference: format!("limits off: p50 {}", ms(off_p50)),
        ratio: format!(
            "{:+.1}%",
            (on_p50.as_secs_f64() / off_p50.as_secs_f64().max(1e-9) - 1.0) * 100.0
        ),
        target: "≤ +15%",
    });
}

/// Processing time per event (one store, events delivered back to back).
async fn measure(cpu_limits: bool, events: usize, rounds: u64) -> Vec<Duration> {
    let host = TestHost::start_with(TestHostOptions {
        cpu_limits,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("compute", programs::COMPUTE).await;
    let quotas = Quotas {
        cpu_ms_per_call: 60_000,
        wall_ms_per_call: 60_000,
        cpu_ms_per_minute: 6_000_000,
        ..Quotas::default()
    };
    let store = host.add_store_with("compute", "compute", &[], quotas).await;
    // Warm up: instantiate the sandbox.
    host.append("compute", "compute", json!({"rounds": 1}))
        .await;
    host.settle("compute").await;
    let mut samples = Vec::with_capacity(events);
    for _ in 0..events {
        let started = Instant::now();
        let seq = host
            .append("compute", "compute", json!({"rounds": rounds}))
            .await;
        assert!(
            store.wait_processed(seq, Duration::from_secs(120)).await,
            "compute event not processed"
        );
        samples.push(started.elapsed());
    }
    samples
}
