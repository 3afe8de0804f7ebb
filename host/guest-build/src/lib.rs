//! Build-script helper: compiles guest crates of this workspace for `wasm32-wasip2`.
//!
//! Used by `host/storehost/build.rs` (to embed the built-in plugins) and `tests/build.rs` (to
//! build the guest test programs), so that `cargo build` and `cargo test` need nothing built by
//! hand. The inner cargo gets its own target directory, so it never waits on the outer build's
//! lock, and a clean environment, so the outer build's flags and wrappers (clippy) do not leak in.
#![forbid(unsafe_code)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target every guest is built for.
pub const GUEST_TARGET: &str = "wasm32-wasip2";

/// What to build: a set of workspace packages, in release mode, for `wasm32-wasip2`.
#[derive(Debug, Default)]
pub struct GuestBuild {
    workspace_root: PathBuf,
    packages: Vec<String>,
}

impl GuestBuild {
    /// A build in the workspace at `workspace_root`.
    pub fn new(workspace_root: impl Into<PathBuf>) -> Self {
        Self {
            workspace_root: workspace_root.into(),
            packages: Vec::new(),
        }
    }

    /// Adds a package to build, and tells cargo to rerun the build script when its sources change.
    pub fn package(mut self, name: &str, dir: &str) -> Self {
        self.packages.push(name.to_owned());
        rerun_if_changed(&self.workspace_root.join(dir));
        self
    }

    /// Runs the inner cargo and returns the directory holding the built `.wasm` files.
    ///
    /// Panics (failing the build script) with the inner cargo's own error text.
    pub fn run(self) -> PathBuf {
        let root = &self.workspace_root;
        for shared in ["wit", "guest-sdk/src", "guest-sdk/Cargo.toml", "Cargo.lock"] {
            rerun_if_changed(&root.join(shared));
        }
        ensure_target_installed();

        let target_dir = guest_target_dir(root);
        let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        command
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--target",
                GUEST_TARGET,
                "--target-dir",
            ])
            .arg(&target_dir);
        for package in &self.packages {
            command.args(["-p", package]);
        }
        clean_environment(&mut command);

        let output = command
            .output()
            .unwrap_or_else(|err| panic!("could not run cargo to build the guest plugins: {err}"));
        if !output.status.success() {
            panic!(
                "building the guest plugins for {GUEST_TARGET} failed (packages {:?}):\n{}",
                self.packages,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        target_dir.join(GUEST_TARGET).join("release")
    }
}

fn rerun_if_changed(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

/// Guests get a target directory beside the outer build's, shared by every build script.
///
/// When several checkouts share one `CARGO_TARGET_DIR`, each gets its own guest directory:
/// cargo records guest sources by paths relative to the checkout, so a shared directory would
/// let one checkout's build pass for another's (stale plugins).
fn guest_target_dir(workspace_root: &Path) -> PathBuf {
    let Some(shared) = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) else {
        return workspace_root.join("target").join("guests");
    };
    let outer = if shared.is_absolute() {
        shared
    } else {
        workspace_root.join(shared)
    };
    if outer.starts_with(workspace_root) {
        return outer.join("guests");
    }
    // FNV-1a of the checkout's path: stable, and distinct per checkout.
    let hash = workspace_root
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        });
    outer.join(format!("guests-{hash:016x}"))
}

/// Removes what the outer cargo set for its own compilation, so it does not leak into the
/// guest build (a clippy wrapper, host rustflags, the outer target, build-script variables).
fn clean_environment(command: &mut Command) {
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer_only = (key.starts_with("CARGO_")
            && key != "CARGO_HOME"
            && key != "CARGO_MAKEFLAGS"
            && !key.starts_with("CARGO_REGISTRIES_")
            && !key.starts_with("CARGO_NET_")
            && !key.starts_with("CARGO_HTTP_"))
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if outer_only {
            command.env_remove(key);
        }
    }
}

/// A fresh machine may have the toolchain without the wasm target when rustup did not read
/// `rust-toolchain.toml`'s `targets`; add it rather than fail with a confusing link error.
fn ensure_target_installed() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", GUEST_TARGET])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if libdir.is_some_and(|dir| dir.exists()) {
        return;
    }
    let status = Command::new("rustup")
        .args(["target", "add", GUEST_TARGET])
        .status();
    match status {
        Ok(status) if status.success() => {}
        other => panic!(
            "the {GUEST_TARGET} target is not installed and `rustup target add {GUEST_TARGET}` failed ({other:?}); install it and build again"
        ),
    }
}
