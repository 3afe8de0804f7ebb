//! Hostile: hands the host 5 MiB log lines, one after another. Each call costs the host
//! milliseconds of copying and checking the line while the guest's own code, which the epoch
//! ticks meter, runs for next to nothing; the host must count that work against the call's CPU
//! time. Forty such calls are far past a 100 ms budget; a host that counted each as a single
//! tick would let the call finish.
#![forbid(unsafe_code)]

use serde_json::Value as Json;
use storehost_guest_sdk::{export_plugin, log};
use test_programs::{Hostile, Misbehaviour};

struct BulkLog;

impl Misbehaviour for BulkLog {
    fn misbehave(_input: Json) -> Result<(), String> {
        let line = "x".repeat(5 << 20);
        for _ in 0..40 {
            log::info(&line);
        }
        Ok(())
    }
}

export_plugin!(Hostile<BulkLog>);

fn main() {}
