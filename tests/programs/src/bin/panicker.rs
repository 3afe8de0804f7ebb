//! Hostile: panics (a Rust panic aborts the instance: the host sees a trap with a panic message).
#![forbid(unsafe_code)]

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct Panicker;

impl Misbehaviour for Panicker {
    fn misbehave(_input: Json) -> Result<(), String> {
        panic!("panicker: deliberate panic")
    }
}

export_plugin!(Hostile<Panicker>);

fn main() {}
