//! A hostile plugin racing the host's backup: it keeps swapping directories of its `/data` for
//! symbolic links that lead out of it (`../../<victim>`), so a copy that lists an entry as a
//! directory and then opens it by path would follow the link into another store's files.
//!
//! Queries:
//! - `prepare {entries, target, mb}`: makes `e0…` (empty directories) with a link `l<i>` to
//!   `target` beside each, and one file `bulk` of `mb` MiB so a backup takes a while;
//! - `swap {entries, ms}`: for `ms` ms, renames each `e<i>` to `d<i>` and `l<i>` to `e<i>`, and
//!   back, over and over; every entry is a directory again when it answers `{swaps}`;
//! - `hard_links {links}`: gives `bulk` `links` more names (`h<i>`), hard links that cost the
//!   `files` quota an entry each, not the file's bytes.
#![forbid(unsafe_code)]

use serde_json::{Value as Json, json};
use storehost_guest_sdk::{Event, Plugin, clock, export_plugin};

struct LinkRacer;

fn num(args: &Json, key: &str, default: u64) -> u64 {
    args.get(key).and_then(Json::as_u64).unwrap_or(default)
}

fn prepare(args: &Json) -> Result<Json, String> {
    let entries = num(args, "entries", 20);
    let target = args
        .get("target")
        .and_then(Json::as_str)
        .ok_or("prepare needs a target")?;
    let bulk = vec![0x5a_u8; (num(args, "mb", 8) as usize) << 20];
    std::fs::write("/data/bulk", bulk).map_err(|err| format!("bulk: {err}"))?;
    for i in 0..entries {
        std::fs::create_dir_all(format!("/data/e{i}")).map_err(|err| format!("e{i}: {err}"))?;
        let _ = std::fs::remove_file(format!("/data/l{i}"));
        link(target, &format!("l{i}"))?;
    }
    Ok(json!({"entries": entries}))
}

/// A symbolic link `name` in `/data` to `target`, through WASI (std has no symlink there).
#[cfg(target_arch = "wasm32")]
fn link(target: &str, name: &str) -> Result<(), String> {
    test_programs::files_dir()?
        .symlink_at(target, name)
        .map_err(|err| format!("{name}: {err:?}"))
}

#[cfg(not(target_arch = "wasm32"))]
fn link(_target: &str, _name: &str) -> Result<(), String> {
    Err("only in a sandbox".into())
}

/// `links` hard links `h<i>` to `/data/bulk`.
#[cfg(target_arch = "wasm32")]
fn hard_links(links: u64) -> Result<Json, String> {
    let dir = test_programs::files_dir()?;
    for i in 0..links {
        dir.link_at(
            wasi::filesystem::types::PathFlags::empty(),
            "bulk",
            &dir,
            &format!("h{i}"),
        )
        .map_err(|err| format!("h{i}: {err:?}"))?;
    }
    Ok(json!({"links": links}))
}

#[cfg(not(target_arch = "wasm32"))]
fn hard_links(_links: u64) -> Result<Json, String> {
    Err("only in a sandbox".into())
}

fn swap(args: &Json) -> Json {
    let entries = num(args, "entries", 20) as usize;
    let until = clock::now_ms() + num(args, "ms", 1_000) as i64;
    let mut linked = vec![false; entries];
    let mut swaps = 0_u64;
    let paths = |i: usize| {
        (
            format!("/data/e{i}"),
            format!("/data/d{i}"),
            format!("/data/l{i}"),
        )
    };
    let turn = |i: usize, to_link: bool| {
        let (entry, dir, link) = paths(i);
        if to_link {
            std::fs::rename(&entry, &dir).and_then(|()| std::fs::rename(&link, &entry))
        } else {
            std::fs::rename(&entry, &link).and_then(|()| std::fs::rename(&dir, &entry))
        }
    };
    while clock::now_ms() < until {
        for (i, is_link) in linked.iter_mut().enumerate() {
            if turn(i, !*is_link).is_ok() {
                *is_link = !*is_link;
                swaps += 1;
            }
        }
    }
    for (i, is_link) in linked.iter().enumerate() {
        if *is_link {
            let _ = turn(i, false);
        }
    }
    json!({"swaps": swaps})
}

impl Plugin for LinkRacer {
    fn handle_event(_event: Event) -> Result<(), String> {
        Ok(())
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        match name {
            "prepare" => prepare(&args),
            "swap" => Ok(swap(&args)),
            "hard_links" => hard_links(num(&args, "links", 10)),
            other => Err(format!("unknown query {other}")),
        }
    }
}

export_plugin!(LinkRacer);

fn main() {}
