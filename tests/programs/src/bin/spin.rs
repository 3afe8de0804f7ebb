//! Hostile: an infinite loop that makes no calls at all (only fuel or epoch interruption stops it).
#![forbid(unsafe_code)]

use std::hint::black_box;

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct Spin;

impl Misbehaviour for Spin {
    fn misbehave(_input: Json) -> Result<(), String> {
        let mut turns: u64 = 0;
        loop {
            turns = black_box(turns.wrapping_add(1));
        }
    }
}

export_plugin!(Hostile<Spin>);

fn main() {}
