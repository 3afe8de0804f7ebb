//! Hostile: loops forever calling the host (`clock::now_ms`), so the guest is in and out of the
//! host all the time and never idles in pure wasm.
#![forbid(unsafe_code)]

use std::hint::black_box;

use serde_json::Value as Json;
use storehost_guest_sdk::{clock, export_plugin};
use test_programs::{Hostile, Misbehaviour};

struct HostcallLoop;

impl Misbehaviour for HostcallLoop {
    fn misbehave(_input: Json) -> Result<(), String> {
        loop {
            black_box(clock::now_ms());
        }
    }
}

export_plugin!(Hostile<HostcallLoop>);

fn main() {}
