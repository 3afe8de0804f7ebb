//! `check-config` and `plugin check`.

use std::path::Path;
use std::process::ExitCode;

use storehost_control::config;
use storehost_runtime::RuntimeOptions;
use storehost_store::{StorePlugin, StoreRuntime};

/// Validates a config file: every error with its location, exit 1 on error. The plugin
/// files it names are read and checked as `serve` would load them.
pub fn config(path: &Path) -> ExitCode {
    match config::load_file(path) {
        Ok(config) => {
            let problems = plugin_file_problems(&config);
            if !problems.is_empty() {
                for problem in &problems {
                    eprintln!("{problem}");
                }
                eprintln!("{}: {} error(s)", path.display(), problems.len());
                return ExitCode::FAILURE;
            }
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

/// Why each plugin file `config` names could not be loaded: unreadable, or not a component
/// implementing the plugin world.
fn plugin_file_problems(config: &config::HostConfig) -> Vec<String> {
    let files: Vec<(String, std::path::PathBuf, String)> = config
        .plugin_sources()
        .into_iter()
        .filter_map(|(name, source)| match source {
            config::PluginSource::File(file) => {
                let at = config
                    .plugins
                    .get(&name)
                    .and_then(|plugin| plugin.path_at.as_ref())
                    .map_or_else(|| "(config)".to_owned(), ToString::to_string);
                Some((name, file, at))
            }
            config::PluginSource::Builtin => None,
        })
        .collect();
    if files.is_empty() {
        return Vec::new();
    }
    let runtime = match plugin_runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            return vec![format!(
                "could not start the runtime to check plugins: {err}"
            )];
        }
    };
    let mut problems = Vec::new();
    for (name, file, at) in files {
        let loaded = std::fs::read(&file)
            .map_err(|err| format!("cannot read {}: {err}", file.display()))
            .and_then(|bytes| {
                StorePlugin::load(&runtime, &bytes)
                    .map(drop)
                    .map_err(|err| format!("{} is not a usable plugin: {err}", file.display()))
            });
        if let Err(problem) = loaded {
            problems.push(format!(
                "{at}: [plugins.{name}] path: {problem}; fix the path or the file (serve would refuse to start)"
            ));
        }
    }
    problems
}

/// A runtime for loading plugins only (one sandbox slot).
fn plugin_runtime() -> Result<std::sync::Arc<StoreRuntime>, String> {
    let options = RuntimeOptions {
        max_live_sandboxes: 1,
        ..RuntimeOptions::default()
    };
    StoreRuntime::new(options).map_err(|err| format!("{err:#}"))
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
    let runtime = match plugin_runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the runtime: {err}");
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
