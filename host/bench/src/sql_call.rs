//! Guest → host SQL call: a point select through the guest's `sql` capability against the same
//! select run by the host straight through rusqlite on the same database file.
//!
//! The guest runs `n` selects inside one `query` call; the per-call cost is the time of that
//! call minus the time of an empty call (`n = 0`), divided by `n`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storehost_tests::{TestHost, programs};

use crate::raw;
use crate::report::{Progress, Row, Table, percentile, times_of, us};

/// Rows in the table the selects read.
const ROWS: i64 = 10_000;

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let (rounds, n) = if quick { (10, 5_000) } else { (30, 20_000) };
    eprintln!(
        "sql call: {rounds} rounds of {n} point selects, through the guest and from the host"
    );
    let host = TestHost::start().await;
    host.deploy("bench", programs::BENCH).await;
    let store = host.add_store("sql-call", "bench", &[]).await;
    host.append("sql-call", "seed", json!({ "rows": ROWS }))
        .await;
    host.settle("sql-call").await;

    // Warm the sandbox, the statement cache and SQLite's page cache.
    guest_call(&store, n).await?;
    let mut guest = Vec::with_capacity(rounds);
    let mut progress = Progress::new("rounds through the guest", rounds);
    for _ in 0..rounds {
        let empty = guest_call(&store, 0).await?;
        let full = guest_call(&store, n).await?;
        guest.push(full.saturating_sub(empty) / u32::try_from(n).unwrap_or(u32::MAX));
        progress.step();
    }

    let path = store.dir().store_db();
    let mut direct = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Duration>> {
        raw::point_selects(&path, n, ROWS)?;
        (0..rounds)
            .map(|_| raw::point_selects(&path, n, ROWS))
            .collect()
    })
    .await??;
    drop(store);
    host.stop().await;

    let p50 = percentile(&mut guest, 50.0);
    let p99 = percentile(&mut guest, 99.0);
    let direct_p50 = percentile(&mut direct, 50.0);
    table.push(Row {
        figure: format!(
            "guest → host SQL call: point select through `sql` (median of {rounds} rounds of {n}; overhead over the host's own select: {} µs)",
            us(p50.saturating_sub(direct_p50))
        ),
        unit: "µs/call",
        p50: us(p50),
        p99: us(p99),
        reference: format!(
            "the same select from the host (rusqlite, prepared): {} µs",
            us(direct_p50)
        ),
        ratio: times_of(p50, direct_p50),
        target: "overhead ≤ 5 µs",
    });
    Ok(())
}

/// Runs the guest's `points` query with `n` selects; answers how long the call took.
async fn guest_call(store: &storehost_store::Store, n: usize) -> anyhow::Result<Duration> {
    let args = json!({ "n": n, "rows": ROWS }).to_string();
    let started = Instant::now();
    let answer = store.query("points", &args, None).await?;
    let elapsed = started.elapsed();
    let answer: Value = serde_json::from_str(&answer)?;
    anyhow::ensure!(
        answer["found"] == json!(n),
        "the guest's point selects found {} of {n} rows",
        answer["found"]
    );
    Ok(elapsed)
}
