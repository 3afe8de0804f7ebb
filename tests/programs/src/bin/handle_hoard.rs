//! Hostile: asks the host for WASI handles (clock pollables) without bound and keeps every one.
//! Each costs the guest 4 bytes and the host far more (its resource table entry and the
//! pollable behind it), so the host must stop it long before its memory quota would.
#![forbid(unsafe_code)]

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct HandleHoard;

impl Misbehaviour for HandleHoard {
    fn misbehave(_input: Json) -> Result<(), String> {
        let mut hoard = Vec::new();
        // A million is past any cap the host may set; a host with none holds them all.
        for _ in 0..1_000_000 {
            hoard.push(wasi::clocks::monotonic_clock::subscribe_duration(
                3_600_000_000_000,
            ));
        }
        Err(format!(
            "the host let this guest hold {} handles",
            hoard.len()
        ))
    }
}

export_plugin!(Hostile<HandleHoard>);

fn main() {}
