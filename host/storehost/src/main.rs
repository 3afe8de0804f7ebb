//! `storehost`: runs many tenants' plugins, one wasmtime sandbox per store.
//!
//! `main` only wires config → control plane → stores → API; see `serve.rs`.

mod admin_token;
mod check;
mod cli;
mod ctl;
mod data_dir_lock;
mod logging;
mod serve;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, PluginCommand};

/// The `agent` plugin, built for wasm32-wasip2 by build.rs and embedded in the binary.
pub(crate) const BUILTIN_AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/agent.wasm"));

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or_default() {
        Command::Serve(args) => {
            logging::init();
            // Before anything opens a database: SQLite takes an allocator only before it starts.
            storehost_store::sql_memory::install();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("error: could not start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { path } => check::config(&path),
        Command::Ctl(args) => ctl::run(args),
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => check::plugin(&file),
    }
}
