//! Every guest program in tests/programs implements the plugin world (a program that stopped
//! compiling against `wit/`, or lost an export, fails here by name) — but `http_answer`, a
//! wasi:http component, which must be refused with the reason.

use storehost_runtime::RuntimeOptions;
use storehost_store::{StorePlugin, StoreRuntime};
use storehost_tests::{foreach_program, programs};

#[test]
fn every_guest_program_loads_as_a_plugin() {
    let runtime = StoreRuntime::new(RuntimeOptions {
        max_live_sandboxes: 1,
        cache_dir: Some(storehost_tests::target_dir().join("test-plugin-cache")),
        ..RuntimeOptions::default()
    })
    .unwrap();
    let mut loaded = Vec::new();
    macro_rules! load {
        // The benchmark's `wasmtime serve` peer implements wasi:http, not the plugin world:
        // storehost refuses it and says which of its imports no plugin gets.
        (HTTP_ANSWER) => {{
            let wasm = std::fs::read(programs::HTTP_ANSWER).unwrap();
            let err = StorePlugin::load(&runtime, &wasm)
                .err()
                .expect("a wasi:http component is not a plugin");
            let message = err.to_string();
            assert!(
                message.contains("storehost:plugin@0.1.0") && message.contains("wasi:http"),
                "the refusal names the world and what does not fit: {message}"
            );
        }};
        ($name:ident) => {{
            let path = programs::$name;
            let wasm = std::fs::read(path).unwrap();
            StorePlugin::load(&runtime, &wasm)
                .unwrap_or_else(|err| panic!("{}: {err}", stringify!($name)));
            loaded.push(stringify!($name));
        }};
    }
    foreach_program!(load);
    load!(AGENT);
    assert!(loaded.len() >= 12, "{loaded:?}");
}

#[test]
fn a_corrupted_compiled_plugin_in_the_cache_is_detected_and_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let runtime = StoreRuntime::new(RuntimeOptions {
        max_live_sandboxes: 1,
        cache_dir: Some(cache.path().to_owned()),
        ..RuntimeOptions::default()
    })
    .unwrap();
    let wasm = std::fs::read(programs::WRITER).unwrap();
    StorePlugin::load(&runtime, &wasm).unwrap();
    let artifact = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("the compiled plugin is cached");
    let original = std::fs::read(&artifact).unwrap();
    let name = artifact.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with(&StorePlugin::load(&runtime, &wasm).unwrap().sha256()[..16]),
        "content-addressed: {name}"
    );

    // Flip bytes in the middle of the executable artifact: it must not be loaded as is.
    let mut corrupted = original.clone();
    let middle = corrupted.len() / 2;
    for byte in &mut corrupted[middle..middle + 64] {
        *byte ^= 0xA5;
    }
    std::fs::write(&artifact, &corrupted).unwrap();
    let plugin = StorePlugin::load(&runtime, &wasm).expect("recompiled from the .wasm");
    assert_eq!(plugin.size(), wasm.len());
    assert_ne!(
        std::fs::read(&artifact).unwrap(),
        corrupted,
        "the cache entry was rewritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_plugin_counts_events_by_type() {
    let host = storehost_tests::TestHost::start().await;
    host.deploy("counter", programs::COUNTER_EXAMPLE).await;
    host.add_store("counting", "counter", &[]).await;
    for event_type in ["hello", "hello", "bye"] {
        host.append("counting", event_type, serde_json::json!({}))
            .await;
    }
    host.settle("counting").await;
    let counts = host
        .query("counting", "counts", serde_json::json!({}))
        .await;
    assert_eq!(
        counts,
        serde_json::json!({"counts": {"bye": 1, "hello": 2}})
    );
}
