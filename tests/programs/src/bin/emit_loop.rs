//! Hostile: emits 1,000,000 events in one invocation. They are `ping` events with payload
//! `{"i": N}`, which this program ignores when they come back, so a host that lets them all
//! through gets a flood but no feedback loop. A refused emit fails the invocation with the
//! host's reason.
#![forbid(unsafe_code)]

use serde_json::{Value as Json, json};
use storehost_guest_sdk::{events, export_plugin};
use test_programs::{Hostile, Misbehaviour, PING};

struct EmitLoop;

const EVENTS: u32 = 1_000_000;

impl Misbehaviour for EmitLoop {
    fn misbehave(_input: Json) -> Result<(), String> {
        for i in 0..EVENTS {
            events::emit(PING, &json!({ "i": i }))
                .map_err(|err| format!("emit {i} of {EVENTS} refused: {err}"))?;
        }
        Ok(())
    }
}

export_plugin!(Hostile<EmitLoop>);

fn main() {}
