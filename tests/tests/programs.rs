//! Every guest program in tests/programs implements the plugin world (a program that stopped
//! compiling against `wit/`, or lost an export, fails here by name).

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
