//! The benchmark command's guest: point reads through the `sql` capability, and an echo that
//! makes "processed" visible to a client over HTTP.
//!
//! Events: `seed {rows}` fills `points(k INTEGER PRIMARY KEY, v TEXT)` with keys `0..rows`;
//! `echo {...}` emits `echoed {"of": <seq>}` (committed with the cursor, so a client that sees
//! the reply in the log knows its event was processed); every other type does nothing.
//!
//! Queries: `points {n, rows}` runs `n` point selects on keys `i % rows` and answers
//! `{"found": N}`; `n = 0` measures a bare query call.
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::{Event, Plugin, events, export_plugin, params, query_args, sql};

struct Bench;

#[derive(Deserialize)]
struct Seed {
    rows: i64,
}

#[derive(Deserialize)]
struct Points {
    n: u64,
    rows: i64,
}

impl Plugin for Bench {
    fn handle_event(event: Event) -> Result<(), String> {
        match event.event_type.as_str() {
            "seed" => {
                let seed: Seed = event.payload_json()?;
                sql::execute(
                    "CREATE TABLE IF NOT EXISTS points (k INTEGER PRIMARY KEY, v TEXT NOT NULL)",
                    params![],
                )?;
                for k in 0..seed.rows {
                    sql::execute(
                        "INSERT OR REPLACE INTO points (k, v) VALUES (?1, ?2)",
                        params![k, format!("value-{k}")],
                    )?;
                }
                Ok(())
            }
            "echo" => events::emit("echoed", &json!({ "of": event.seq })),
            _ => Ok(()),
        }
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        match name {
            "points" => {
                let points: Points = query_args(name, args)?;
                let rows = points.rows.max(1);
                let mut found = 0u64;
                for i in 0..points.n {
                    let key = (i as i64) % rows;
                    let result = sql::query("SELECT v FROM points WHERE k = ?1", params![key])?;
                    found += result.len() as u64;
                }
                Ok(json!({ "found": found }))
            }
            other => Err(format!("unknown query `{other}`; bench answers points")),
        }
    }
}

export_plugin!(Bench);

fn main() {}
