//! A plugin that fails on demand, driven by the store's config key `fail`.
//!
//! Event `risky {id}` inserts `id` into `risky`, then: `fail = "trap"` traps (a wasm
//! `unreachable`), `fail = "panic"` panics with "flaky panicked on purpose", `fail = "err"`
//! returns `Err("flaky refused")`; otherwise it succeeds. Other events succeed and do nothing.
//! Since a failed invocation leaves no trace, `risky` only ever holds ids of successful events.
//!
//! Query `risky` → `{"ids": [...]}`.
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::sql;
use storehost_guest_sdk::{Event, Plugin, config, export_plugin, params};

struct Flaky;

#[derive(Deserialize)]
struct Risky {
    id: Json,
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::unreachable()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        panic!("flaky: trap requested (natively, a panic stands in for the wasm trap)")
    }
}

impl Plugin for Flaky {
    fn handle_event(event: Event) -> Result<(), String> {
        if event.event_type != "risky" {
            return Ok(());
        }
        let risky: Risky = event.payload_json()?;
        sql::execute("CREATE TABLE IF NOT EXISTS risky (id)", params![])?;
        sql::execute("INSERT INTO risky (id) VALUES (?1)", params![risky.id])?;
        match config::get("fail").as_deref() {
            Some("trap") => trap(),
            Some("panic") => panic!("flaky panicked on purpose"),
            Some("err") => Err("flaky refused".to_owned()),
            _ => Ok(()),
        }
    }

    fn query(name: &str, _args: Json) -> Result<Json, String> {
        match name {
            "risky" => {
                let ids = match sql::query("SELECT id FROM risky ORDER BY rowid", params![]) {
                    Ok(rows) => rows
                        .iter()
                        .map(|row| row.get::<Json>(0))
                        .collect::<Result<Vec<_>, _>>()?,
                    Err(err) if err.is_missing_table() => Vec::new(),
                    Err(err) => return Err(err.into()),
                };
                Ok(json!({ "ids": ids }))
            }
            other => Err(format!("unknown query `{other}`; flaky answers risky")),
        }
    }
}

export_plugin!(Flaky);

fn main() {}
