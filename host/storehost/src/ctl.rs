//! `storehost ctl`: an admin client over the HTTP API.
//!
//! Exit codes scripts can rely on: 0 done; 1 the server said no (its error code and message are
//! printed); 2 usage error (bad arguments, no token, an unreadable or unwritable local file);
//! 3 the server cannot be reached.

mod client;
mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

pub use client::CtlError;

/// Where the embedded default keeps its admin token (read when no token is given).
const DEFAULT_TOKEN_FILE: &str = "data/admin.token";

/// `storehost ctl` options.
#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 done; 1 the server said no (its error code and message are printed); 2 usage error (arguments, token, local files); 3 the server cannot be reached."
)]
pub struct CtlArgs {
    /// The server's URL.
    #[arg(
        long,
        env = "STOREHOST_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// The admin token (default: $STOREHOST_ADMIN_TOKEN, else ./data/admin.token).
    #[arg(
        long,
        env = "STOREHOST_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Print the server's JSON instead of tables (one JSON object per line for `events tail`).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `storehost ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List, show, add, remove, pause and resume stores.
    Stores {
        /// What to do with stores.
        #[command(subcommand)]
        command: StoresCommand,
    },
    /// Deploy and list plugins.
    Plugin {
        /// What to do with plugins.
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Post events to a store and follow its log.
    Events {
        /// What to do with events.
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Download a consistent backup of a store (taken while it runs).
    Backup {
        /// The store.
        id: String,
        /// The archive to write (`.tar.gz`).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Replace a store's data with a backup (checked whole first; the store resumes after).
    Restore {
        /// The store to restore into.
        id: String,
        /// The archive `storehost ctl backup` wrote.
        file: PathBuf,
        /// Restore a backup taken of another store.
        #[arg(long)]
        allow_different_store: bool,
    },
    /// Run a reconcile pass against the workspace registry now.
    Reconcile,
    /// Create, list and revoke store tokens.
    Tokens {
        /// What to do with tokens.
        #[command(subcommand)]
        command: TokensCommand,
    },
}

/// `storehost ctl stores …`
#[derive(Debug, Subcommand)]
pub enum StoresCommand {
    /// Every store with its state, plugin, lag and counters.
    List,
    /// One store in detail.
    Show {
        /// The store.
        id: String,
    },
    /// Create stores, or change them (plugin, quotas, config): one or many at once, with a
    /// progress bar for many.
    Add {
        /// The store ids (3 to 64 letters, digits, `_` or `-` each).
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// The plugin it runs (default: the host's default plugin).
        #[arg(long)]
        plugin: Option<String>,
        /// A quota, e.g. `--quota memory=67108864 --quota events_per_second=50`.
        #[arg(long = "quota", value_name = "KEY=VALUE")]
        quotas: Vec<String>,
        /// A config key/value the plugin reads, e.g. `--config greeting=hello`.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// Stop a store; its data is archived (or deleted with --purge).
    Remove {
        /// The store.
        id: String,
        /// Delete its data instead of archiving it.
        #[arg(long)]
        purge: bool,
    },
    /// Stop processing a store's events (they are still accepted).
    Pause {
        /// The store.
        id: String,
    },
    /// Process a paused store's events again.
    Resume {
        /// The store.
        id: String,
    },
}

/// `storehost ctl plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Upload a component as plugin NAME; stores using NAME switch to it (hot swap).
    Deploy {
        /// The plugin's name.
        name: String,
        /// The `.wasm` component.
        file: PathBuf,
    },
    /// Every plugin the host has.
    List,
}

/// `storehost ctl events …`
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Append one event; prints its seq.
    Post {
        /// The store.
        id: String,
        /// The event type, e.g. `v1.ChatMessageSent`.
        #[arg(value_name = "TYPE")]
        event_type: String,
        /// The payload, as JSON (default `{}`).
        payload: Option<String>,
        /// The same key in the same store returns the original seq instead of appending.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Follow a store's log (Server-Sent Events), reconnecting where it left off.
    Tail {
        /// The store.
        id: String,
        /// Start after this seq (default: the log's current end, so only new events; 0 for all).
        #[arg(long)]
        after: Option<u64>,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// `storehost ctl tokens …`
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token reaching only this store's tenant endpoints (shown once).
    Create {
        /// The store.
        id: String,
    },
    /// A store's tokens (ids and creation times; never the tokens).
    List {
        /// The store.
        id: String,
    },
    /// Revoke one of a store's tokens.
    Revoke {
        /// The store.
        id: String,
        /// The token's id.
        token_id: u64,
    },
}

/// Runs `storehost ctl`; returns the documented exit code.
pub fn run(args: CtlArgs) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

fn execute(args: CtlArgs) -> Result<(), CtlError> {
    let token = match args.token.filter(|t| !t.trim().is_empty()) {
        Some(token) => token.trim().to_owned(),
        None => std::fs::read_to_string(DEFAULT_TOKEN_FILE)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                CtlError::Usage(format!(
                    "no admin token: set STOREHOST_ADMIN_TOKEN or pass --token (the embedded default writes it to ./{DEFAULT_TOKEN_FILE})"
                ))
            })?,
    };
    let client = client::Client::new(&args.server, token)?;
    commands::run(&client, args.json, args.command)
}
