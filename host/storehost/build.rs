//! Builds the built-in plugins for wasm32-wasip2 so the binary can embed them.

use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest
        .parent()
        .and_then(|host| host.parent())
        .expect("host/storehost lives two levels below the workspace root")
        .to_path_buf();
    let built = storehost_guest_build::GuestBuild::new(&workspace)
        .package("agent", "plugins/agent")
        .run();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy(built.join("agent.wasm"), out.join("agent.wasm"))
        .expect("the agent plugin was built but agent.wasm is missing");
}
