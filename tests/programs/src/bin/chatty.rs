//! Well-behaved, and talkative: prints about 2 KB for each event, 1 KB with `println!` and
//! 1 KB with `eprintln!` (as a plugin tracing through its standard output does), and records
//! each event it handled. `println!` and `eprintln!` panic when the host's end of stdout or
//! stderr cannot take the line.
//!
//! Queries: `count` → `{"handled": N}`.
#![forbid(unsafe_code)]

use serde_json::{Value as Json, json};
use storehost_guest_sdk::{Event, Plugin, export_plugin, params, sql};

struct Chatty;

const LINE_BYTES: usize = 1_000;

impl Plugin for Chatty {
    fn handle_event(event: Event) -> Result<(), String> {
        let filler = "x".repeat(LINE_BYTES);
        println!("chatty: event {} on stdout {filler}", event.seq);
        eprintln!("chatty: event {} on stderr {filler}", event.seq);
        sql::execute(
            "CREATE TABLE IF NOT EXISTS handled (seq INTEGER PRIMARY KEY)",
            params![],
        )?;
        sql::execute(
            "INSERT INTO handled (seq) VALUES (?1)",
            params![event.seq as i64],
        )?;
        Ok(())
    }

    fn query(name: &str, _args: Json) -> Result<Json, String> {
        match name {
            "count" => {
                let handled: i64 = match sql::query("SELECT count(*) FROM handled", params![]) {
                    Ok(rows) => rows.first().map(|row| row.get(0)).transpose()?.unwrap_or(0),
                    Err(err) if err.is_missing_table() => 0,
                    Err(err) => return Err(err.into()),
                };
                Ok(json!({ "handled": handled }))
            }
            other => Err(format!("unknown query `{other}`; chatty answers count")),
        }
    }
}

export_plugin!(Chatty);

fn main() {}
