//! A watched config file edited to add 1,000 stores: the time from the editor's save (write to a
//! temporary file, rename over the config) until every new store runs. The reference is the
//! least those stores cost on disk: their directories and SQLite files, created one after
//! another without storehost.

use std::path::Path;
use std::time::{Duration, Instant};

use storehost_tests::control::watched;
use storehost_tests::programs;

use crate::raw;
use crate::report::{Row, Table, ms, percentile, times_of};

/// Stores one edit adds.
const STORES: usize = 1_000;

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let runs = if quick { 1 } else { 3 };
    let mut times = Vec::with_capacity(runs);
    for run in 1..=runs {
        eprintln!("config edit: run {run}/{runs}: one save adds {STORES} stores");
        times.push(measure().await?);
        eprintln!(
            "  all {STORES} stores running after {} ms",
            ms(times[run - 1])
        );
    }
    // The reference: every store's files created one after another (a quick run measures a
    // quarter of them and scales up; it says so).
    let measured = if quick { STORES / 4 } else { STORES };
    let factor = u32::try_from(STORES / measured).unwrap_or(1);
    raw::settle_disk().await;
    let floor = tokio::task::spawn_blocking(move || {
        raw::store_files(measured, raw::Creation::LikeStorehost)
    })
    .await??
    .into_iter()
    .sum::<Duration>()
        * factor;
    raw::settle_disk().await;
    let synced =
        tokio::task::spawn_blocking(move || raw::store_files(measured, raw::Creation::Synced))
            .await??
            .into_iter()
            .sum::<Duration>()
            * factor;
    raw::settle_disk().await;
    let creations = tokio::task::spawn_blocking(|| raw::file_creations_per_second(1_000)).await??;
    let inode_floor = Duration::from_secs_f64((STORES * raw::INODES_PER_STORE) as f64 / creations);
    let scaled = if measured < STORES {
        format!(" ({measured} measured, ×{})", STORES / measured)
    } else {
        String::new()
    };
    let p50 = percentile(&mut times, 50.0);
    let worst = percentile(&mut times, 100.0);
    table.push(Row {
        figure: format!(
            "config edit: save adding {STORES} stores → all running (median of {runs} run{}; includes the watcher's 100 ms debounce and the 300 ms the file must stay unchanged)",
            if runs == 1 { "" } else { "s" }
        ),
        unit: "ms",
        p50: ms(p50),
        p99: format!("max {}", ms(worst)),
        reference: format!(
            "{STORES} stores' directories + SQLite files in WAL, raw, one after another, as storehost creates them: {} ms{scaled} (with SQLite's creation fsyncs: {} ms); this disk creates {creations:.0} files/s: {} files take {} ms at least",
            ms(floor),
            ms(synced),
            STORES * raw::INODES_PER_STORE,
            ms(inode_floor)
        ),
        ratio: times_of(p50, floor),
        target: "≤ 2,000 ms",
    });
    Ok(())
}

fn config_text(stores: impl Iterator<Item = String>) -> String {
    let mut text = format!(
        "max_stores = {}\n[defaults]\nplugin = \"trivial\"\n[plugins.trivial]\npath = {:?}\n",
        STORES + 100,
        programs::TRIVIAL
    );
    for id in stores {
        text.push_str(&format!("[stores.{id}]\n"));
    }
    text
}

/// Writes `text` to a temporary file beside `path` and renames it over `path`, as editors do.
fn save_by_rename(path: &Path, text: &str) -> std::io::Result<()> {
    let temp = path.with_extension("toml.swp");
    std::fs::write(&temp, text)?;
    std::fs::rename(&temp, path)
}

/// One watched host; one edit; the time until all its stores run.
async fn measure() -> anyhow::Result<Duration> {
    let dir = storehost_tests::scratch_dir()?;
    let path = dir.path().join("storehost.toml");
    std::fs::write(&path, config_text(std::iter::once("seed-store".to_owned())))?;
    let watched = watched(&path, STORES + 100).await;
    let host = &watched.host;
    // Let the watch settle so the save below is its first event.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = config_text(
        std::iter::once("seed-store".to_owned()).chain((0..STORES).map(|i| format!("cfg-{i:05}"))),
    );
    raw::settle_disk().await;
    let started = Instant::now();
    save_by_rename(&path, &text)?;
    let deadline = started + Duration::from_secs(120);
    while host.orchestrator.len().await < STORES + 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} stores run 120 s after the edit",
            host.orchestrator.len().await,
            STORES + 1
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    watched.host.stop().await;
    Ok(elapsed)
}
