//! Compute-heavy and well-behaved: event `compute {rounds}` mixes a 64-bit state `rounds` times
//! (pure CPU, no host calls) and stores the result. Used to measure what CPU limiting costs.
//!
//! Query `last` → `{"value": N|null}`.
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::{Event, Plugin, export_plugin, params, sql};

struct Compute;

#[derive(Deserialize)]
struct Work {
    rounds: u64,
}

fn mix(rounds: u64) -> u64 {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for round in 0..rounds {
        state ^= state >> 33;
        state = state
            .wrapping_mul(0xFF51_AFD7_ED55_8CCD)
            .wrapping_add(round);
        state ^= state >> 29;
    }
    state
}

impl Plugin for Compute {
    fn handle_event(event: Event) -> Result<(), String> {
        if event.event_type != "compute" {
            return Ok(());
        }
        let work: Work = event.payload_json()?;
        let value = mix(std::hint::black_box(work.rounds));
        sql::execute(
            "CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER)",
            params![],
        )?;
        // Stored as text: a u64 does not always fit SQLite's signed integer.
        sql::execute(
            "INSERT OR REPLACE INTO results VALUES (1, ?1)",
            params![value.to_string()],
        )?;
        Ok(())
    }

    fn query(_name: &str, _args: Json) -> Result<Json, String> {
        // Before the first event there is no table yet: no value.
        let Ok(rows) = sql::query("SELECT value FROM results", params![]) else {
            return Ok(json!({ "value": null }));
        };
        let value: Option<String> = match rows.first() {
            Some(row) => Some(row.get(0)?),
            None => None,
        };
        Ok(json!({ "value": value }))
    }
}

export_plugin!(Compute);

fn main() {}
