//! Example: a minimal storehost plugin that counts a store's events by type.
//!
//! How to run it (from the repository root, with a server running: `cargo run`):
//!
//! ```sh
//! cargo build --release --target wasm32-wasip2 -p counter-plugin
//! cargo run -- plugin check target/wasm32-wasip2/release/counter_plugin.wasm
//! T=$(cat data/admin.token)
//! curl -s -X PUT -H "Authorization: Bearer $T" --data-binary @target/wasm32-wasip2/release/counter_plugin.wasm \
//!      localhost:8080/v1/plugins/counter
//! curl -s -X PUT -H "Authorization: Bearer $T" localhost:8080/v1/stores/counting -d '{"plugin":"counter"}'
//! curl -s -X POST -H "Authorization: Bearer $T" localhost:8080/v1/stores/counting/events -d '{"type":"hello","payload":{}}'
//! curl -s -H "Authorization: Bearer $T" localhost:8080/v1/stores/counting/query/counts
//! # {"counts":{"hello":1}}
//! ```
#![forbid(unsafe_code)]

use serde_json::{Map, Value, json};
use storehost_guest_sdk::{Event, Plugin, export_plugin, params, sql};

struct Counter;

impl Plugin for Counter {
    fn handle_event(event: Event) -> Result<(), String> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS counts (type TEXT PRIMARY KEY, n INTEGER NOT NULL)",
            params![],
        )?;
        sql::execute(
            "INSERT INTO counts (type, n) VALUES (?1, 1) ON CONFLICT (type) DO UPDATE SET n = n + 1",
            params![event.event_type],
        )?;
        Ok(())
    }

    fn query(name: &str, _args: Value) -> Result<Value, String> {
        if name != "counts" {
            return Err(format!(
                "unknown query {name:?}; this plugin answers \"counts\""
            ));
        }
        let Ok(rows) = sql::query("SELECT type, n FROM counts ORDER BY type", params![]) else {
            return Ok(json!({ "counts": {} }));
        };
        let mut counts = Map::new();
        for row in &rows {
            let event_type: String = row.get(0)?;
            let n: i64 = row.get(1)?;
            counts.insert(event_type, json!(n));
        }
        Ok(json!({ "counts": counts }))
    }
}

export_plugin!(Counter);
