//! Spare store directories: a new store starts from one prepared ahead of time (a rename
//! instead of creating its files), the pool refills, and spares are never taken for stores.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::json;
use storehost_tests::control::{ControlHostOptions, eventually};
use storehost_tests::{TestHost, TestHostOptions, programs};

/// The spares ready in `DATA_DIR/stores/.spare/` (complete ones have a number as name).
fn spares(data_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data_dir.join("stores/.spare"))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter(|name| name.parse::<u64>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for_spares(data_dir: &Path, count: usize) -> BTreeSet<String> {
    let dir = data_dir.to_owned();
    eventually(&format!("{count} spares ready"), || {
        let dir = dir.clone();
        async move { spares(&dir).len() == count }
    })
    .await;
    spares(data_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_store_starts_from_a_spare_and_the_pool_refills() {
    let host = TestHost::start_with(TestHostOptions {
        spare_stores: 3,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    let before = wait_for_spares(&host.data_dir, 3).await;

    host.add_store("fresh", "writer", &[]).await;
    let after = wait_for_spares(&host.data_dir, 3).await;
    let taken: Vec<_> = before.difference(&after).collect();
    assert_eq!(
        taken.len(),
        1,
        "one spare was taken: {before:?} → {after:?}"
    );
    assert!(host.data_dir.join("stores/fresh/events.db").is_file());

    // The store works as any other, from an empty log and cursor.
    let seq = host
        .append("fresh", "kv.put", json!({"key": "k", "value": 7}))
        .await;
    assert_eq!(seq, 1, "a spare's log starts empty");
    host.settle("fresh").await;
    assert_eq!(
        host.query("fresh", "get", json!({"key": "k"})).await["value"],
        "7"
    );
    // Spares are not stores.
    let (_, listed) = host.get("/v1/stores").await;
    let ids: Vec<_> = listed["stores"]
        .as_array()
        .unwrap_or_else(|| panic!("no stores in {listed}"))
        .iter()
        .map(|store| store["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids, ["fresh"], "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_brings_back_the_stores_and_never_takes_a_spare_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let options = ControlHostOptions {
        data_dir: Some(dir.path().join("data")),
        ..ControlHostOptions::default()
    };
    let first = TestHost::start_control(options.clone(), |_, state| state).await;
    let (status, _) = first
        .call(reqwest::Method::PUT, "/v1/stores/kept", Some(json!({})))
        .await;
    assert_eq!(status, 201);
    first
        .append("kept", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    first.settle("kept").await;
    let data_dir = first.data_dir.clone();
    wait_for_spares(&data_dir, 2).await;
    first.stop().await;

    let host = TestHost::start_control(options, |_, state| state).await;
    assert_eq!(host.orchestrator.restore_persisted().await.unwrap(), 1);
    let listed: Vec<_> = host
        .orchestrator
        .list()
        .await
        .iter()
        .map(|view| view.id.to_string())
        .collect();
    assert_eq!(listed, ["kept"]);
    assert_eq!(
        host.query("kept", "get", json!({"key": "a"})).await["value"],
        "1",
        "the store's own data, not a spare's"
    );
    wait_for_spares(&data_dir, 2).await;
}
