//! Guest programs (plugins) used by storehost's tests: each `src/bin/<name>.rs` is one
//! component, built for `wasm32-wasip2`.
//!
//! Well-behaved fixtures: `writer` (key/value writes, emits, exactly-once bookkeeping), `flaky`
//! (fails on demand, driven by store config), `trivial` (does nothing; benchmarks), `bench`
//! (point reads through `sql` and an echo reply; the benchmark command), `escape`
//! (probes the sandbox's walls and records what it reached). Hostile programs, each of which
//! misbehaves in `handle_event` (for every event type but `ping`), in `run_task`, and in the
//! query named `hostile`: `spin`, `hostcall_loop`, `memory_hog`, `deep_recursion`, `panicker`,
//! `sql_bomb` (event `bomb {kind}`) and `emit_loop`. Their other queries answer `{}`.
//!
//! This library holds what several of them share.
#![forbid(unsafe_code)]

use std::marker::PhantomData;

use serde_json::{Value as Json, json};
use storehost_guest_sdk::{Event, Plugin};

/// The event type on which hostile programs behave, so tests can see a store still works after
/// one of them misbehaved (and so events they emit themselves are harmless).
pub const PING: &str = "ping";

/// The query name on which hostile programs misbehave (every other query answers `{}`).
pub const HOSTILE_QUERY: &str = "hostile";

/// The store's files directory (`/data`) as raw WASI sees it: for programs that call
/// `wasi:filesystem` directly, past the rules Rust's standard library keeps to.
#[cfg(target_arch = "wasm32")]
pub fn files_dir() -> Result<wasi::filesystem::types::Descriptor, String> {
    wasi::filesystem::preopens::get_directories()
        .into_iter()
        .next()
        .map(|(dir, _)| dir)
        .ok_or_else(|| "no files directory".to_owned())
}

/// The one hostile thing a program does.
pub trait Misbehaviour {
    /// Does it; returns only if the host lets it. `input` is the event payload, the task
    /// payload or the query args, as JSON (`null` when not JSON).
    fn misbehave(input: Json) -> Result<(), String>;
}

/// A plugin that misbehaves with `M` for every event but [`PING`], for every task, and for the
/// query [`HOSTILE_QUERY`]; export it with `export_plugin!(Hostile<M>)`.
pub struct Hostile<M>(PhantomData<M>);

impl<M: Misbehaviour> Plugin for Hostile<M> {
    fn handle_event(event: Event) -> Result<(), String> {
        if event.event_type == PING {
            return Ok(());
        }
        M::misbehave(json_or_null(&event.payload))
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        if name == HOSTILE_QUERY {
            M::misbehave(args)?;
        }
        Ok(json!({}))
    }

    fn run_task(task: storehost_guest_sdk::Task) -> Result<(), String> {
        M::misbehave(json_or_null(&task.payload))
    }
}

fn json_or_null(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or(Json::Null)
}

/// Shortens `text` to at most `max` characters, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncate_cuts_on_character_boundaries() {
        assert_eq!(truncate("héllo", 10), "héllo");
        assert_eq!(truncate("héllo", 2), "hé…");
    }
}
