//! Hostile: non-tail recursion without end, until the stack overflows (a trap).
#![forbid(unsafe_code)]

use std::hint::black_box;

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct DeepRecursion;

/// Each frame keeps an array alive across the recursive call, and `black_box` hides both the
/// array and the stop condition, so the optimizer can neither drop the frames nor the recursion.
#[inline(never)]
fn descend(depth: u64) -> u64 {
    let frame = black_box([depth; 32]);
    if black_box(true) {
        descend(depth + 1).wrapping_add(frame[(depth % 32) as usize])
    } else {
        frame[0]
    }
}

impl Misbehaviour for DeepRecursion {
    fn misbehave(_input: Json) -> Result<(), String> {
        let deepest = descend(0);
        Err(format!("deep_recursion returned from depth {deepest}"))
    }
}

export_plugin!(Hostile<DeepRecursion>);

fn main() {}
