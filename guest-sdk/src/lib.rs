//! Write storehost plugins in Rust.
//!
//! A plugin is a type that implements [`Plugin`], exported with [`export_plugin!`] and built
//! with `cargo build --target wasm32-wasip2` (as a `cdylib`, or as a `bin` with an empty
//! `main`). The host delivers the store's events one at a time, in order; everything a handler
//! does through [`sql`] and [`events`] commits together with the store's cursor when it returns
//! `Ok`, and is rolled back when it returns `Err` or traps.
//!
//! ```no_run
//! use serde::Deserialize;
//! use serde_json::{Value as Json, json};
//! use storehost_guest_sdk::{Event, Plugin, export_plugin, log, params, sql};
//!
//! struct Notes;
//!
//! #[derive(Deserialize)]
//! struct NoteAdded {
//!     id: String,
//!     text: String,
//! }
//!
//! impl Plugin for Notes {
//!     fn handle_event(event: Event) -> Result<(), String> {
//!         match event.event_type.as_str() {
//!             "note.added" => {
//!                 let note: NoteAdded = event.payload_json()?;
//!                 sql::execute(
//!                     "CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, text TEXT NOT NULL)",
//!                     params![],
//!                 )?;
//!                 sql::execute(
//!                     "INSERT OR REPLACE INTO notes (id, text) VALUES (?1, ?2)",
//!                     params![note.id, note.text],
//!                 )?;
//!                 log::info(format_args!("note {} saved", note.id));
//!                 Ok(())
//!             }
//!             _ => Ok(()), // events of other types are not ours
//!         }
//!     }
//!
//!     fn query(name: &str, _args: Json) -> Result<Json, String> {
//!         match name {
//!             "notes" => {
//!                 let rows = sql::query("SELECT id, text FROM notes ORDER BY id", params![])?;
//!                 let notes = rows
//!                     .iter()
//!                     .map(|row| Ok(json!({"id": row.get::<String>("id")?, "text": row.get::<String>("text")?})))
//!                     .collect::<Result<Vec<_>, sql::SqlError>>()?;
//!                 Ok(json!({ "notes": notes }))
//!             }
//!             other => Err(format!("unknown query `{other}`; this plugin answers `notes`")),
//!         }
//!     }
//! }
//!
//! export_plugin!(Notes);
//! # fn main() {}
//! ```
//!
//! Natively (for `cargo test` and `cargo clippy` of a plugin crate) everything compiles, but the
//! host capabilities only exist inside the sandbox: calling them outside it panics.

use serde::de::DeserializeOwned;

pub mod clock;
pub mod config;
pub mod events;
pub mod llm;
pub mod log;
pub mod scheduler;
pub mod sql;

/// The bindings `wit-bindgen` generates for the plugin world; an implementation detail of this
/// crate (use the safe modules and [`export_plugin!`] instead).
#[doc(hidden)]
// The generated glue lifts and lowers values across the component ABI, which takes `unsafe`;
// it is the only `unsafe` code in this crate, and plugins built on it need none.
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "$crate::__bindings",
        additional_derives: [PartialEq],
    });
}

/// What a plugin does with the store's events, queries and scheduled tasks.
///
/// The methods take no `self`: a plugin keeps its state in the store's database (through
/// [`sql`]), which is what survives restarts and is rolled back with a failed invocation.
pub trait Plugin {
    /// Handles one event of the store, in `seq` order. `Ok` commits what the handler wrote and
    /// emitted; `Err(reason)` rolls it back and the host retries the event, then dead-letters it.
    fn handle_event(event: Event) -> Result<(), String>;

    /// Answers the named read-only query with JSON. `args` is `{}` when the caller gave none.
    fn query(name: &str, args: serde_json::Value) -> Result<serde_json::Value, String>;

    /// Runs one due execution of a task scheduled with [`scheduler::schedule`]. `Ok` commits
    /// what it wrote and emitted (and marks the execution done); `Err` rolls it back and the
    /// host retries, then records the execution as failed. Plugins that schedule nothing can
    /// keep this default.
    fn run_task(task: Task) -> Result<(), String> {
        Err(format!(
            "this plugin schedules no tasks, but task `{}` is due",
            task.task_id
        ))
    }
}

/// Exports a type implementing [`Plugin`] as the component's plugin world.
///
/// Use it once per component, at the top level of a `cdylib` crate or of a `bin` (next to an
/// empty `fn main() {}`).
///
/// ```ignore
/// storehost_guest_sdk::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            type __StorehostPluginExport = $crate::__private::Export<$plugin>;
            $crate::__bindings::__export_plugin_world!(
                __StorehostPluginExport with_types_in $crate::__bindings
            );
        };
    };
}

/// One event from the store's log, as delivered to [`Plugin::handle_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the store's total order: strictly increasing, without gaps.
    pub seq: u64,
    /// The event type, e.g. `v2.TaskCreated`.
    pub event_type: String,
    /// The payload as JSON text.
    pub payload: String,
    /// When the host accepted the event, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Who appended it: `api`, `plugin`, ...
    pub source: String,
}

impl Event {
    /// Deserializes the payload, with an error that names the event when it does not fit `T`.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.payload).map_err(|err| {
            format!(
                "invalid payload for event `{}` (seq {}): {err}",
                self.event_type, self.seq
            )
        })
    }
}

impl From<__bindings::Event> for Event {
    fn from(event: __bindings::Event) -> Self {
        Self {
            seq: event.seq,
            event_type: event.event_type,
            payload: event.payload,
            at_ms: event.at_ms,
            source: event.source,
        }
    }
}

/// One due execution of a scheduled task, as delivered to [`Plugin::run_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The id the task was scheduled under.
    pub task_id: String,
    /// The payload it was scheduled with.
    pub payload: String,
    /// When this execution was due (ms since the Unix epoch).
    pub scheduled_for_ms: i64,
    /// `{task_id}@{scheduled_for_ms}`: stable across retries of this execution.
    pub execution_id: String,
}

impl Task {
    /// Deserializes the payload, with an error that names the task when it does not fit `T`.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.payload)
            .map_err(|err| format!("invalid payload for task `{}`: {err}", self.task_id))
    }
}

impl From<__bindings::TaskRun> for Task {
    fn from(task: __bindings::TaskRun) -> Self {
        Self {
            task_id: task.task_id,
            payload: task.payload,
            scheduled_for_ms: task.scheduled_for_ms,
            execution_id: task.execution_id,
        }
    }
}

/// Deserializes a query's `args` into `T`, with an error that names the query.
pub fn query_args<T: DeserializeOwned>(query: &str, args: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(args).map_err(|err| format!("invalid args for query `{query}`: {err}"))
}

/// Glue used by [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use std::marker::PhantomData;

    use crate::{__bindings, Plugin};

    /// Adapts a [`Plugin`] to the trait `wit-bindgen` generates for the world's exports.
    pub struct Export<P>(PhantomData<P>);

    impl<P: Plugin> __bindings::Guest for Export<P> {
        fn handle_event(event: __bindings::Event) -> Result<(), String> {
            P::handle_event(event.into())
        }

        fn run_task(task: __bindings::TaskRun) -> Result<(), String> {
            P::run_task(task.into())
        }

        fn query(name: String, args: String) -> Result<String, String> {
            let args = if args.trim().is_empty() {
                serde_json::Value::Object(Default::default())
            } else {
                serde_json::from_str(&args)
                    .map_err(|err| format!("args of query `{name}` are not JSON: {err}"))?
            };
            let answer = P::query(&name, args)?;
            serde_json::to_string(&answer)
                .map_err(|err| format!("answer of query `{name}` could not be encoded: {err}"))
        }
    }
}
