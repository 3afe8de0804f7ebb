//! Hostile: calls `wasi:filesystem` and `wasi:io/streams` directly (not through Rust's
//! standard library, which keeps to the rules) to press on the files directory's limits. The
//! input's `kind` says how; every kind ends in an error that says how far it got, so the
//! query `hostile {kind}` fails with that message (or with the host's trap):
//! - `big_stream_write`: one 8 MiB write to a file's output stream, past the 64 KiB its
//!   `check-write` permits;
//! - `listings`: starts 64 listings of `/data` and keeps them all;
//! - `create_through_link`: makes a link `link` → `target`, then 100 times creates the file
//!   through the link and renames it away, each time a new file.
#![forbid(unsafe_code)]

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct RawFs;

impl Misbehaviour for RawFs {
    fn misbehave(input: Json) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        {
            use wasi::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};

            let dir = test_programs::files_dir()?;
            match input["kind"].as_str() {
                Some("big_stream_write") => {
                    let file = dir
                        .open_at(
                            PathFlags::empty(),
                            "big",
                            OpenFlags::CREATE,
                            DescriptorFlags::WRITE,
                        )
                        .map_err(|err| format!("open: {err:?}"))?;
                    let stream = file
                        .write_via_stream(0)
                        .map_err(|err| format!("stream: {err:?}"))?;
                    stream
                        .write(&vec![7u8; 8 << 20])
                        .map_err(|err| format!("the write failed: {err:?}"))?;
                    Err("the host took an 8 MiB stream write".into())
                }
                Some("listings") => {
                    let mut held = Vec::new();
                    for _ in 0..64 {
                        match dir.read_directory() {
                            Ok(listing) => held.push(listing),
                            Err(err) => {
                                return Err(format!("held {} listings, then: {err:?}", held.len()));
                            }
                        }
                    }
                    Err(format!("held {} listings", held.len()))
                }
                Some("create_through_link") => {
                    dir.symlink_at("target", "link")
                        .map_err(|err| format!("symlink: {err:?}"))?;
                    for made in 0..100 {
                        let created = dir.open_at(
                            PathFlags::SYMLINK_FOLLOW,
                            "link",
                            OpenFlags::CREATE,
                            DescriptorFlags::WRITE,
                        );
                        if let Err(err) = created {
                            return Err(format!("made {made} files through a link, then: {err:?}"));
                        }
                        dir.rename_at("target", &dir, &format!("file-{made}"))
                            .map_err(|err| format!("rename: {err:?}"))?;
                    }
                    Err("made 100 files through a link".into())
                }
                other => Err(format!("unknown kind {other:?}")),
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        Err(format!("only runs as a component (input {input})"))
    }
}

export_plugin!(Hostile<RawFs>);

fn main() {}
