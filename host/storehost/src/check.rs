//! `check-config` and `plugin check`.

use std::path::Path;
use std::process::ExitCode;

use storehost_control::config;
use storehost_runtime::RuntimeOptions;
use storehost_store::{StorePlugin, StoreRuntime};

/// Validates a config file: every error with its location, exit 1 on error.
pub fn config(path: &Path) -> ExitCode {
    match config::load_file(path) {
        Ok(config) => {
            println!(
                "{}: ok ({} stores, {} plugins, listen {})",
                path.display(),
                config.stores.len(),
                config.plugin_sources().len(),
                config.listen
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.len());
            ExitCode::FAILURE
        }
    }
}

/// Says whether a component implements the plugin world.
pub fn plugin(file: &Path) -> ExitCode {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(err) => {
            eprintln!("error: could not read {}: {err}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let options = RuntimeOptions {
        max_live_sandboxes: 1,
        ..RuntimeOptions::default()
    };
    let runtime = match StoreRuntime::new(options) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the runtime: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    match StorePlugin::load(&runtime, &bytes) {
        Ok(plugin) => {
            println!(
                "{}: ok — implements storehost:plugin@0.1.0 (sha256 {}, {} bytes)",
                file.display(),
                plugin.sha256(),
                plugin.size()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}: {err}", file.display());
            ExitCode::FAILURE
        }
    }
}
