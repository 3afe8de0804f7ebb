//! Command-line interface.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// storehost — one host process, one wasmtime sandbox per tenant store.
#[derive(Debug, Parser)]
#[command(name = "storehost", version, about)]
pub struct Cli {
    /// What to do (default: `serve` on the embedded default).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (without --config: the embedded default with demo stores, data in ./data).
    Serve(ServeArgs),
    /// Validate a config file; prints every error with its location, exits 1 on error.
    CheckConfig {
        /// The TOML config file.
        path: PathBuf,
    },
    /// Admin client over the HTTP API (token from STOREHOST_ADMIN_TOKEN or --token).
    Ctl(crate::ctl::CtlArgs),
    /// Plugin tools.
    Plugin {
        /// What to do with the plugin.
        #[command(subcommand)]
        command: PluginCommand,
    },
}

impl Default for Command {
    fn default() -> Self {
        Command::Serve(ServeArgs::default())
    }
}

/// Plugin subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Say whether a component implements the storehost plugin world.
    Check {
        /// The `.wasm` component.
        file: PathBuf,
    },
}

/// `storehost serve` options; each overrides the config file.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// A TOML config file (see config/storehost.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where stores keep their data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}
