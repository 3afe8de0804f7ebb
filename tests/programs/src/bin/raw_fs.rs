//! Hostile: calls `wasi:filesystem` and `wasi:io/streams` directly (not through Rust's
//! standard library, which keeps to the rules) to press on the files directory's limits. The
//! input's `kind` says how; every kind ends in an error that says how far it got, so the
//! query `hostile {kind}` fails with that message (or with the host's trap):
//! - `big_stream_write`: one 8 MiB write to a file's output stream, past the 64 KiB its
//!   `check-write` permits;
//! - `listings`: starts 64 listings of `/data` and keeps them all;
//! - `create_through_link`: makes a link `link` → `target`, then 100 times creates the file
//!   through the link and renames it away, each time a new file;
//! - `deep_dirs`: makes a directory with a 200-byte name in the one it made before, each
//!   through the handle of the one above (as a path, 64 levels are 12.8 KB, longer than the
//!   host's `PATH_MAX`), until it is refused;
//! - `deep_move`: makes a chain of 61 directories `c/c/…` and a tree `tree/x/x/x` 4 levels
//!   high, and moves the tree under the chain's 60th level (its deepest directory then 64
//!   levels down), back, and under the 61st (65 levels down); then an empty directory under
//!   the 61st, and the tree again under the 61st through a path longer than PATH_MAX. It
//!   answers each outcome;
//! - `deep_file`: makes 24 directories with a 200-byte name each in the one above (as a path,
//!   4.8 KB, longer than the host's `PATH_MAX`) and the file `bottom.txt` in the deepest;
//! - `read_deep_file`: answers what `deep_file`'s `bottom.txt` holds;
//! - `make_many`: makes 500 files with 100-byte names in `many/`, numbered from the input's
//!   `start`;
//! - `relist`: reads a listing of `many/` whole the input's `times` times, and says how many
//!   entries each held and how long that took;
//! - `interleave`: starts 16 listings of `many/` at once and reads them an entry from each in
//!   turn, and says how many entries each gave;
//! - `list_root`: lists `/data` itself (the preopen) through its own handle, and names what it
//!   holds.
//! - `sync_loop`: dirties `pages` pages of the file `synced` (one byte in every other 4 KiB
//!   page, each through a stream of its own: cheap for the guest, a write to the disk each for
//!   the sync), then syncs it with `call` (`sync` or `sync_data`), again and again until its
//!   syncs have taken `sync_ms` in all, and says how many it made and how long they and the
//!   dirtying took.
//! - `hoard`: opens the file `hoarded` again and again, then starts listings of `/data`, each
//!   until refused, and keeps them all, also after the call (until `release`, or the end of
//!   its sandbox); it says how many of each it holds and how the next was refused;
//! - `release`: closes what `hoard` kept;
//! - `panic`: panics (the sandbox traps, and is dropped with what it holds).
#![forbid(unsafe_code)]

use serde_json::Value as Json;
use storehost_guest_sdk::export_plugin;
use test_programs::{Hostile, Misbehaviour};

struct RawFs;

/// How deep `deep_file` makes its file.
#[cfg(target_arch = "wasm32")]
const DEEP_FILE_LEVELS: usize = 24;

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
                Some("hoard") => {
                    let (files, listings, open_refused, listing_refused) =
                        HOARD.with_borrow_mut(|hoard| {
                            let open_refused = loop {
                                match dir.open_at(
                                    PathFlags::empty(),
                                    "hoarded",
                                    OpenFlags::CREATE,
                                    DescriptorFlags::READ,
                                ) {
                                    Ok(file) => hoard.files.push(file),
                                    Err(err) => break err,
                                }
                            };
                            let listing_refused = loop {
                                match dir.read_directory() {
                                    Ok(listing) => hoard.listings.push(listing),
                                    Err(err) => break err,
                                }
                            };
                            (
                                hoard.files.len(),
                                hoard.listings.len(),
                                open_refused,
                                listing_refused,
                            )
                        });
                    Err(format!(
                        "holds {files} files and {listings} listings; the next open: {}, \
                         the next listing: {}",
                        open_refused.name(),
                        listing_refused.name()
                    ))
                }
                Some("release") => {
                    HOARD.with_borrow_mut(|hoard| *hoard = Hoard::default());
                    Err("released".into())
                }
                Some("panic") => panic!("raw_fs: asked to panic"),
                Some("list_root") => {
                    let listing = dir
                        .read_directory()
                        .map_err(|err| format!("listing: {err:?}"))?;
                    let mut names = Vec::new();
                    while let Some(entry) = listing
                        .read_directory_entry()
                        .map_err(|err| format!("entry: {err:?}"))?
                    {
                        names.push(entry.name);
                    }
                    names.sort();
                    Err(format!("the root holds {names:?}"))
                }
                Some(kind @ ("make_many" | "relist" | "interleave")) => {
                    let _ = dir.create_directory_at("many");
                    let many = dir
                        .open_at(
                            PathFlags::empty(),
                            "many",
                            OpenFlags::DIRECTORY,
                            DescriptorFlags::READ | DescriptorFlags::MUTATE_DIRECTORY,
                        )
                        .map_err(|err| format!("open many: {err:?}"))?;
                    if kind == "make_many" {
                        let start = input["start"].as_u64().unwrap_or(0);
                        for i in start..start + 500 {
                            let name = format!("{i:08}-{}", "n".repeat(91));
                            many.open_at(
                                PathFlags::empty(),
                                &name,
                                OpenFlags::CREATE,
                                DescriptorFlags::WRITE,
                            )
                            .map_err(|err| format!("made {i} files, then: {err:?}"))?;
                        }
                        return Err("made 500 files".to_owned());
                    }
                    if kind == "interleave" {
                        let listings = (0..16)
                            .map(|_| many.read_directory())
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|err| format!("listing: {err:?}"))?;
                        let mut counts = vec![0; listings.len()];
                        let mut ended = vec![false; listings.len()];
                        while ended.contains(&false) {
                            for (i, listing) in listings.iter().enumerate() {
                                if ended[i] {
                                    continue;
                                }
                                match listing.read_directory_entry() {
                                    Ok(Some(_)) => counts[i] += 1,
                                    Ok(None) => ended[i] = true,
                                    Err(err) => return Err(format!("entry: {err:?}")),
                                }
                            }
                        }
                        return Err(format!("read 16 listings of {counts:?} entries"));
                    }
                    let times = input["times"].as_u64().unwrap_or(100);
                    let started = storehost_guest_sdk::clock::now_ms();
                    let mut entries = 0;
                    for _ in 0..times {
                        let listing = many
                            .read_directory()
                            .map_err(|err| format!("listing: {err:?}"))?;
                        entries = 0;
                        while let Some(_) = listing
                            .read_directory_entry()
                            .map_err(|err| format!("entry: {err:?}"))?
                        {
                            entries += 1;
                        }
                    }
                    let took = storehost_guest_sdk::clock::now_ms() - started;
                    Err(format!(
                        "listed {times} times {entries} entries in {took} ms"
                    ))
                }
                Some("sync_loop") => {
                    let file = dir
                        .open_at(
                            PathFlags::empty(),
                            "synced",
                            OpenFlags::CREATE,
                            DescriptorFlags::READ | DescriptorFlags::WRITE,
                        )
                        .map_err(|err| format!("open: {err:?}"))?;
                    let pages = input["pages"].as_u64().unwrap_or(1_024);
                    let budget =
                        std::time::Duration::from_millis(input["sync_ms"].as_u64().unwrap_or(500));
                    let full = match input["call"].as_str() {
                        Some("sync") => true,
                        Some("sync_data") => false,
                        other => return Err(format!("unknown call {other:?}")),
                    };
                    let (mut syncs, mut syncing, mut dirtying) =
                        (0, std::time::Duration::ZERO, std::time::Duration::ZERO);
                    while syncing < budget {
                        let started = std::time::Instant::now();
                        for page in 0..pages {
                            let stream = file
                                .write_via_stream(page * 8_192)
                                .map_err(|err| format!("stream: {err:?}"))?;
                            stream
                                .write(&[syncs as u8])
                                .map_err(|err| format!("write: {err:?}"))?;
                        }
                        dirtying += started.elapsed();
                        let started = std::time::Instant::now();
                        let synced = if full { file.sync() } else { file.sync_data() };
                        synced.map_err(|err| format!("sync: {err:?}"))?;
                        syncing += started.elapsed();
                        syncs += 1;
                    }
                    Err(format!(
                        "synced {syncs} times in {} ms, dirtying took {} ms",
                        syncing.as_millis(),
                        dirtying.as_millis()
                    ))
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
                Some("deep_dirs") => {
                    let name = "d".repeat(200);
                    let mut here = dir;
                    for made in 0..1_000 {
                        if let Err(err) = here.create_directory_at(&name) {
                            return Err(format!("made {made} directories, then: {}", err.name()));
                        }
                        here = here
                            .open_at(
                                PathFlags::empty(),
                                &name,
                                OpenFlags::DIRECTORY,
                                DescriptorFlags::READ,
                            )
                            .map_err(|err| format!("open level {}: {err:?}", made + 1))?;
                    }
                    Err("made 1000 directories".into())
                }
                Some("deep_move") => {
                    let chain = |levels: usize| vec!["c"; levels].join("/");
                    dir.create_directory_at("c")
                        .map_err(|err| format!("c: {err:?}"))?;
                    for level in 2..=61 {
                        dir.create_directory_at(&chain(level))
                            .map_err(|err| format!("chain level {level}: {err:?}"))?;
                    }
                    for made in ["tree", "tree/x", "tree/x/x", "tree/x/x/x", "empty"] {
                        dir.create_directory_at(made)
                            .map_err(|err| format!("{made}: {err:?}"))?;
                    }
                    let outcome = |from: &str, to: String| match dir.rename_at(from, &dir, &to) {
                        Ok(()) => "moved".to_owned(),
                        Err(err) => err.name().to_owned(),
                    };
                    let under_60 = outcome("tree", format!("{}/tree", chain(60)));
                    let back = outcome(&format!("{}/tree", chain(60)), "tree".into());
                    let under_61 = outcome("tree", format!("{}/tree", chain(61)));
                    let empty_under_61 = outcome("empty", format!("{}/empty", chain(61)));
                    // The same move, the tree named through a path longer than PATH_MAX.
                    let padded = format!("{}tree", "./".repeat(2_100));
                    let padded_under_61 = outcome(&padded, format!("{}/tree", chain(61)));
                    Err(format!(
                        "under 60: {under_60}; back: {back}; under 61: {under_61}; \
                         empty under 61: {empty_under_61}; padded under 61: {padded_under_61}"
                    ))
                }
                Some("deep_file") => {
                    let here = deep_dir(dir, true)?;
                    let file = here
                        .open_at(
                            PathFlags::empty(),
                            "bottom.txt",
                            OpenFlags::CREATE,
                            DescriptorFlags::WRITE,
                        )
                        .map_err(|err| format!("create bottom.txt: {err:?}"))?;
                    file.write(b"at the bottom", 0)
                        .map_err(|err| format!("write bottom.txt: {err:?}"))?;
                    Err(format!("wrote bottom.txt {DEEP_FILE_LEVELS} levels down"))
                }
                Some("read_deep_file") => {
                    let here = deep_dir(dir, false)?;
                    let file = here
                        .open_at(
                            PathFlags::empty(),
                            "bottom.txt",
                            OpenFlags::empty(),
                            DescriptorFlags::READ,
                        )
                        .map_err(|err| format!("open bottom.txt: {err:?}"))?;
                    let (bytes, _) = file
                        .read(64, 0)
                        .map_err(|err| format!("read bottom.txt: {err:?}"))?;
                    Err(format!(
                        "bottom.txt holds {:?}",
                        String::from_utf8_lossy(&bytes)
                    ))
                }
                other => Err(format!("unknown kind {other:?}")),
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        Err(format!("only runs as a component (input {input})"))
    }
}

/// What `hoard` keeps open across calls.
#[cfg(target_arch = "wasm32")]
#[derive(Default)]
struct Hoard {
    files: Vec<wasi::filesystem::types::Descriptor>,
    listings: Vec<wasi::filesystem::types::DirectoryEntryStream>,
}

#[cfg(target_arch = "wasm32")]
thread_local! {
    static HOARD: std::cell::RefCell<Hoard> = std::cell::RefCell::default();
}

/// The directory [`DEEP_FILE_LEVELS`] levels of 200-byte names below `dir`, each opened
/// through the one above (and made first, with `make`).
#[cfg(target_arch = "wasm32")]
fn deep_dir(
    dir: wasi::filesystem::types::Descriptor,
    make: bool,
) -> Result<wasi::filesystem::types::Descriptor, String> {
    use wasi::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};
    let name = "d".repeat(200);
    let mut here = dir;
    for level in 1..=DEEP_FILE_LEVELS {
        if make {
            here.create_directory_at(&name)
                .map_err(|err| format!("make level {level}: {err:?}"))?;
        }
        here = here
            .open_at(
                PathFlags::empty(),
                &name,
                OpenFlags::DIRECTORY,
                DescriptorFlags::READ,
            )
            .map_err(|err| format!("open level {level}: {err:?}"))?;
    }
    Ok(here)
}

export_plugin!(Hostile<RawFs>);

fn main() {}
