//! Hostile: writes 5 MiB to the same place in a file under `/data`, again and again, with
//! `wasi:filesystem`'s positioned `write` (the one file call whose size the guest chooses; a
//! stream takes at most 64 KiB a call). The file never grows past 5 MiB, so the files quota
//! never stops it; each call costs the host milliseconds of copying and writing, which must
//! count against the call's CPU time. Forty such calls are far past a 100 ms budget.
//!
//! With `{"sync_ms": N}` it instead rewrites 64 KiB and `sync-data`s the file, again and
//! again, until its syncs have taken N ms in all: the disk every store's commits wait on,
//! held by one guest, which must count against the call's CPU time as well.
#![forbid(unsafe_code)]

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct BulkWrite;

impl Misbehaviour for BulkWrite {
    fn misbehave(input: Json) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        {
            use wasi::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};

            if let Some(sync_ms) = input["sync_ms"].as_u64() {
                let dir = test_programs::files_dir()?;
                let file = dir
                    .open_at(
                        PathFlags::empty(),
                        "synced",
                        OpenFlags::CREATE,
                        DescriptorFlags::WRITE,
                    )
                    .map_err(|err| format!("open: {err:?}"))?;
                let chunk = vec![7u8; 64 << 10];
                let budget = std::time::Duration::from_millis(sync_ms);
                let mut syncing = std::time::Duration::ZERO;
                while syncing < budget {
                    file.write(&chunk, 0)
                        .map_err(|err| format!("write: {err:?}"))?;
                    let started = std::time::Instant::now();
                    file.sync_data()
                        .map_err(|err| format!("sync-data: {err:?}"))?;
                    syncing += started.elapsed();
                }
                return Ok(());
            }

            let dir = test_programs::files_dir()?;
            let file = dir
                .open_at(
                    PathFlags::empty(),
                    "churn",
                    OpenFlags::CREATE,
                    DescriptorFlags::WRITE,
                )
                .map_err(|err| format!("open: {err:?}"))?;
            let chunk = vec![7u8; 5 << 20];
            for _ in 0..40 {
                file.write(&chunk, 0)
                    .map_err(|err| format!("write: {err:?}"))?;
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        let _ = input;
        Ok(())
    }
}

export_plugin!(Hostile<BulkWrite>);

fn main() {}
