//! `PUT /v1/plugins/{name}` and `GET /v1/plugins` through the real router: validation with a
//! clear 422, content hashes, and a hot swap (and roll back) under continuous event load
//! that loses no event and processes none twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use storehost_tests::control::{ControlHostOptions, eventually};
use storehost_tests::{TestHost, programs};

async fn host() -> TestHost {
    TestHost::start_control(ControlHostOptions::default(), |_, state| state).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_is_validated_content_addressed_and_listed() {
    let host = host().await;
    let writer = std::fs::read(programs::WRITER).unwrap();

    let (status, body) = host.upload_plugin("counter", writer.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["sha256"], storehost_tests::sha256sum(&writer));
    assert_eq!(body["size"], writer.len());
    let (status, _) = host.upload_plugin("counter", writer.clone()).await;
    assert_eq!(status, 200, "deploying an existing name replaces it");

    let (status, list) = host.get("/v1/plugins").await;
    assert_eq!(status, 200);
    let counter = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "counter")
        .expect("listed");
    assert_eq!(counter["sha256"], storehost_tests::sha256sum(&writer));

    // A store can run on it right away.
    let (status, _) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/on-counter",
            Some(json!({"plugin": "counter"})),
        )
        .await;
    assert_eq!(status, 201);

    let core_module = b"\0asm\x01\0\0\0".to_vec();
    for (bytes, what) in [
        (b"definitely not wasm".to_vec(), "junk"),
        (core_module, "a core module, not a component"),
    ] {
        let (status, body) = host.upload_plugin("broken", bytes).await;
        assert_eq!(status, 422, "{what}: {body}");
        assert_eq!(body["error"]["code"], "invalid_plugin");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("wasm32-wasip2"),
            "the message says how to build a plugin: {body}"
        );
    }
    let (status, body) = host.upload_plugin("Bad Name", writer.clone()).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = host.upload_plugin("empty", Vec::new()).await;
    assert_eq!(status, 400);
    let (status, _) = host.upload_plugin_as("sneaky", writer, None).await;
    assert_eq!(status, 401);
    let (_, list) = host.get("/v1/plugins").await;
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["counter", "writer"],
        "refused uploads leave nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_and_roll_back_under_load_lose_nothing_and_duplicate_nothing() {
    let host = Arc::new(host().await);
    let writer = std::fs::read(programs::WRITER).unwrap();
    let flaky = std::fs::read(programs::FLAKY).unwrap();
    host.upload_plugin("swap", writer.clone()).await;
    host.add_store("swapping", "swap", &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (host, stop) = (host.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 60 {
                acked.push(
                    host.append(
                        "swapping",
                        "kv.put",
                        json!({"key": format!("k{i}"), "value": i}),
                    )
                    .await,
                );
                i += 1;
            }
            acked
        })
    };
    let processed = |host: Arc<TestHost>, at_least: u64| async move {
        let (_, view) = host.get("/v1/stores/swapping").await;
        view["eventsProcessed"].as_u64().unwrap_or(0) >= at_least
    };
    eventually("the writer processes some events", || {
        processed(host.clone(), 10)
    })
    .await;

    // Swap to another component (flaky ignores kv.put), then roll back to the writer's bytes.
    let (status, body) = host.upload_plugin("swap", flaky.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stores"], json!(["swapping"]));
    let (_, view) = host.get("/v1/stores/swapping").await;
    assert_eq!(view["plugin"]["sha256"], storehost_tests::sha256sum(&flaky));
    let after_swap = view["eventsProcessed"].as_u64().unwrap();
    eventually("the new version processes events", || {
        processed(host.clone(), after_swap + 10)
    })
    .await;

    let (status, _) = host.upload_plugin("swap", writer.clone()).await;
    assert_eq!(status, 200);
    let (_, view) = host.get("/v1/stores/swapping").await;
    assert_eq!(
        view["plugin"]["sha256"],
        storehost_tests::sha256sum(&writer),
        "rolled back"
    );
    let after_rollback = view["eventsProcessed"].as_u64().unwrap();
    eventually("the rolled-back version processes events", || {
        processed(host.clone(), after_rollback + 10)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    host.settle("swapping").await;

    let total = acked.len() as u64;
    assert_eq!(
        acked,
        (1..=total).collect::<Vec<_>>(),
        "every append acknowledged, gap-free"
    );
    let (_, view) = host.get("/v1/stores/swapping").await;
    assert_eq!(view["cursor"], total, "{view}");
    assert_eq!(
        view["eventsProcessed"], total,
        "each event processed once: {view}"
    );
    assert_eq!(view["errorsCount"], 0, "{view}");
    let (_, dead) = host.get("/v1/stores/swapping/dead-letters").await;
    assert_eq!(dead["deadLetters"], json!([]));

    // The writer recorded the events it handled: a prefix before the swap and a suffix after
    // the roll back, each seq once, in order; flaky handled the ones in between.
    let applied: Vec<u64> =
        serde_json::from_value(host.query("swapping", "applied", json!({})).await["seqs"].clone())
            .unwrap();
    assert!(
        applied.windows(2).all(|w| w[0] < w[1]),
        "no duplicates, in order"
    );
    let gaps = applied.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert_eq!(
        gaps, 1,
        "one block handled by the swapped-in version: {applied:?}"
    );
    assert_eq!(applied[0], 1);
    assert_eq!(*applied.last().unwrap(), total);
    assert!(applied.len() as u64 >= 20 && (applied.len() as u64) < total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_plugin_and_its_stores_come_back_after_a_restart_and_a_crashed_uploads_file_goes()
 {
    let dir = tempfile::tempdir().unwrap();
    let options = ControlHostOptions {
        data_dir: Some(dir.path().join("data")),
        ..ControlHostOptions::default()
    };
    let flaky = std::fs::read(programs::FLAKY).unwrap();
    let first = TestHost::start_control(options.clone(), |_, state| state).await;
    let (status, _) = first.upload_plugin("uploaded", flaky.clone()).await;
    assert_eq!(status, 201);
    let (status, _) = first
        .call(
            reqwest::Method::PUT,
            "/v1/stores/on-uploaded",
            Some(json!({"plugin": "uploaded"})),
        )
        .await;
    assert_eq!(status, 201);
    first.append("on-uploaded", "risky", json!({"id": 1})).await;
    first.settle("on-uploaded").await;
    first.stop().await;
    assert!(
        dir.path()
            .join(format!(
                "data/plugins/{}.wasm",
                storehost_tests::sha256sum(&flaky)
            ))
            .exists(),
        "kept content-addressed"
    );
    // An upload's write cut short by a crash leaves its temporary file behind.
    let leftover = dir
        .path()
        .join(format!("data/plugins/.{}.wasm.4242.7.tmp", "ab".repeat(32)));
    std::fs::write(&leftover, &flaky[..100]).unwrap();

    let host = TestHost::start_control(options, |_, state| state).await;
    assert_eq!(host.orchestrator.restore_persisted().await.unwrap(), 1);
    assert!(
        !leftover.exists(),
        "a crashed upload's temporary file is deleted at start"
    );
    let (_, view) = host.get("/v1/stores/on-uploaded").await;
    assert_eq!(view["plugin"]["name"], "uploaded");
    assert_eq!(view["plugin"]["sha256"], storehost_tests::sha256sum(&flaky));
    assert_eq!(
        host.query("on-uploaded", "risky", json!({})).await["ids"],
        json!([1])
    );
}

/// An upload is saved before any store switches to it: when it cannot be saved, the API says
/// so and every store goes on with the version it ran (which a restart would bring back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_cannot_be_saved_switches_no_store() {
    let host = host().await;
    let trivial = std::fs::read(programs::TRIVIAL).unwrap();
    let (status, _) = host.upload_plugin("swapped", trivial.clone()).await;
    assert_eq!(status, 201);
    let (status, _) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/on-swapped",
            Some(json!({"plugin": "swapped"})),
        )
        .await;
    assert_eq!(status, 201);

    // Where uploads are kept is now a file: no new version can be saved.
    let plugins = host.data_dir.join("plugins");
    std::fs::remove_dir_all(&plugins).unwrap();
    std::fs::write(&plugins, b"in the way").unwrap();
    let writer = std::fs::read(programs::WRITER).unwrap();
    let (status, body) = host.upload_plugin("swapped", writer).await;
    assert!(status >= 500, "{status} {body}");
    let (_, view) = host.get("/v1/stores/on-swapped").await;
    assert_eq!(
        view["plugin"]["sha256"],
        storehost_tests::sha256sum(&trivial),
        "{view}"
    );
    let (_, list) = host.get("/v1/plugins").await;
    assert!(
        list.to_string()
            .contains(&storehost_tests::sha256sum(&trivial)),
        "{list}"
    );
}
