//! Hostile: allocates 1 MiB chunks without bound, writing to every page of each so the memory
//! is really used, until the host's memory limit (or the 4 GiB address space) stops it.
#![forbid(unsafe_code)]

use std::hint::black_box;

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct MemoryHog;

const CHUNK_BYTES: usize = 1 << 20;
const PAGE_BYTES: usize = 4096;

impl Misbehaviour for MemoryHog {
    fn misbehave(_input: Json) -> Result<(), String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            for byte in chunk.iter_mut().step_by(PAGE_BYTES) {
                *byte = 1;
            }
            hoard.push(black_box(chunk));
        }
    }
}

export_plugin!(Hostile<MemoryHog>);

fn main() {}
