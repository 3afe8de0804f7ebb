//! Hostile: emits 1,000,000 events in one invocation. They are `ping` events with payload
//! `{"i": N}`, which this program ignores when they come back, so a host that lets them all
//! through gets a flood but no feedback loop. A refused emit fails the invocation with the
//! host's reason.
//!
//! The event's payload may change the flood: `{"events": N}` emits N events, `{"padBytes": B}`
//! pads each payload with B bytes (a flood of size rather than count).
#![forbid(unsafe_code)]

use serde_json::{Value as Json, json};
use storehost_guest_sdk::{events, export_plugin};
use test_programs::{Hostile, Misbehaviour, PING};

struct EmitLoop;

const EVENTS: u64 = 1_000_000;

impl Misbehaviour for EmitLoop {
    fn misbehave(input: Json) -> Result<(), String> {
        let count = input["events"].as_u64().unwrap_or(EVENTS);
        let pad = "x".repeat(input["padBytes"].as_u64().unwrap_or(0) as usize);
        for i in 0..count {
            events::emit(PING, &json!({ "i": i, "pad": pad }))
                .map_err(|err| format!("emit {i} of {count} refused: {err}"))?;
        }
        Ok(())
    }
}

export_plugin!(Hostile<EmitLoop>);

fn main() {}
