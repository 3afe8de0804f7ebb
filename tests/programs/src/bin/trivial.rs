//! Does nothing and succeeds: the baseline for benchmarks.
#![forbid(unsafe_code)]

use serde_json::{Value as Json, json};
use storehost_guest_sdk::{Event, Plugin, export_plugin};

struct Trivial;

impl Plugin for Trivial {
    fn handle_event(_event: Event) -> Result<(), String> {
        Ok(())
    }

    fn query(_name: &str, _args: Json) -> Result<Json, String> {
        Ok(json!({}))
    }
}

export_plugin!(Trivial);

fn main() {}
