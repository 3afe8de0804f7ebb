//! Builds the guest test programs (and the built-in plugins) for wasm32-wasip2 and generates
//! `programs.rs`: one path constant per program, and `foreach_program!`, which the
//! `every_program_has_a_test` check uses so that no guest program goes untested (the pattern of
//! wasmtime's crates/test-programs/artifacts).

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf();
    let built = storehost_guest_build::GuestBuild::new(&workspace)
        .package("test-programs", "tests/programs")
        .package("agent", "plugins/agent")
        .package("counter-plugin", "examples/counter-plugin")
        .package("notes-agent", "examples/notes-agent")
        .run();

    let bin_dir = manifest.join("programs/src/bin");
    let mut programs: Vec<String> = std::fs::read_dir(&bin_dir)
        .expect("tests/programs/src/bin is readable")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    programs.sort();

    let mut code = String::new();
    for name in &programs {
        let path = built.join(format!("{name}.wasm"));
        assert!(
            path.exists(),
            "guest program {name} was not built at {}",
            path.display()
        );
        writeln!(code, "/// The `{name}` guest program.").unwrap();
        writeln!(
            code,
            "pub const {}: &str = {:?};",
            name.to_uppercase(),
            path.display().to_string()
        )
        .unwrap();
    }
    let agent = built.join("agent.wasm");
    writeln!(code, "/// The built-in `agent` plugin.").unwrap();
    writeln!(
        code,
        "pub const AGENT: &str = {:?};",
        agent.display().to_string()
    )
    .unwrap();
    let counter = built.join("counter_plugin.wasm");
    writeln!(code, "/// The example plugin in examples/counter-plugin.").unwrap();
    writeln!(
        code,
        "pub const COUNTER_EXAMPLE: &str = {:?};",
        counter.display().to_string()
    )
    .unwrap();
    let notes = built.join("notes_agent.wasm");
    writeln!(code, "/// The example plugin in examples/notes-agent.").unwrap();
    writeln!(
        code,
        "pub const NOTES_AGENT_EXAMPLE: &str = {:?};",
        notes.display().to_string()
    )
    .unwrap();
    writeln!(code, "/// Calls `$mac!(name)` for every guest program.").unwrap();
    writeln!(
        code,
        "#[macro_export]\nmacro_rules! foreach_program {{ ($mac:ident) => {{"
    )
    .unwrap();
    for name in &programs {
        writeln!(code, "    $mac!({});", name.to_uppercase()).unwrap();
    }
    writeln!(code, "}}; }}").unwrap();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("programs.rs"), code).expect("OUT_DIR is writable");
}
