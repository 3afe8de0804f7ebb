//! A store's files directory (`/data`) is bounded like its database: the `files` quota caps
//! what the guest keeps there (bytes written plus 4 KiB per file, directory or link), and a
//! guest holds only a few files open at once, and all guests together only what the host's
//! open-file limit leaves beside its own files, so tenants can neither fill the filesystem the
//! stores share nor use up the host's open files, alone or together.

use std::path::Path;

use serde_json::{Value, json};
use storehost_store::Quotas;
use storehost_tests::{TestHost, TestHostOptions, programs};

/// The `files` quota of the cramped stores below.
const FILES_QUOTA: u64 = 1 << 20;

/// Starts store `id` on the escape program under a files quota of [`FILES_QUOTA`].
async fn add_cramped(host: &TestHost, id: &str) -> storehost_store::Store {
    let quotas = Quotas {
        files: FILES_QUOTA,
        ..Quotas::default()
    };
    host.add_store_with(id, "escape", &[], quotas).await
}

async fn probe(host: &TestHost, store: &str, probe: Value) -> Value {
    host.append(store, "probe.fs", probe).await;
    host.probes(store).await.pop().unwrap()
}

/// Bytes of every file under `dir`, as the host's filesystem has them.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                bytes_under(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_keep_more_than_its_files_quota_in_data() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    let cramped = add_cramped(&host, "cramped").await;
    let roomy = host.add_store("roomy", "escape", &[]).await;
    let files = cramped.dir().files.clone();

    // Every way of making a file larger stops at the quota: positioned writes, appends, and
    // setting a length (a sparse file counts at its length).
    for hostile in [
        json!({"path": "/data/big", "op": "fill", "bytes": 4 * FILES_QUOTA}),
        json!({"path": "/data/log", "op": "append", "bytes": 4 * FILES_QUOTA}),
        json!({"path": "/data/sparse", "op": "grow", "bytes": 1u64 << 40}),
    ] {
        let result = probe(&host, "cramped", hostile.clone()).await;
        assert_eq!(result["allowed"], false, "{hostile} got through: {result}");
        // A length is set through the descriptor, whose error the guest's libc passes on as
        // it is; a failed stream write reaches Rust's standard library as a plain I/O error.
        if hostile["op"] == "grow" {
            let detail = result["detail"].as_str().unwrap();
            assert!(detail.contains("No space left"), "{detail}");
        }
        assert!(
            bytes_under(&files) <= FILES_QUOTA,
            "{hostile} left {} bytes in a store allowed {FILES_QUOTA}",
            bytes_under(&files)
        );
    }
    // Empty files cost an entry each (4 KiB), so they cannot use up the filesystem's inodes.
    let result = probe(
        &host,
        "cramped",
        json!({"path": "/data", "op": "touch_many", "count": 10_000}),
    )
    .await;
    assert_eq!(result["allowed"], false, "{result}");
    let entries = std::fs::read_dir(&files).unwrap().count() as u64;
    assert!(entries <= FILES_QUOTA / 4096, "{entries} entries");

    // The store's usage shows what its files hold.
    let (_, status) = host.get("/v1/stores/cramped").await;
    let used = status["usage"]["filesBytes"].as_u64().unwrap();
    assert!(
        used > FILES_QUOTA / 2 && used <= FILES_QUOTA,
        "filesBytes {used}: {status}"
    );
    assert_eq!(status["quotas"]["files"], FILES_QUOTA, "{status}");

    // Deleting files gives their space back.
    for path in ["/data/big", "/data/log"] {
        let result = probe(&host, "cramped", json!({"path": path, "op": "delete"})).await;
        assert_eq!(result["allowed"], true, "{result}");
    }
    let result = probe(
        &host,
        "cramped",
        json!({"path": "/data/after", "op": "fill", "bytes": FILES_QUOTA / 4}),
    )
    .await;
    assert_eq!(result["allowed"], true, "space came back: {result}");
    let (_, status) = host.get("/v1/stores/cramped").await;
    assert!(
        status["usage"]["filesBytes"].as_u64().unwrap() < used,
        "{status}"
    );

    // A neighbour under the default quota writes what the cramped store could not.
    let result = probe(
        &host,
        "roomy",
        json!({"path": "/data/big", "op": "fill", "bytes": 4 * FILES_QUOTA}),
    )
    .await;
    assert_eq!(result["allowed"], true, "{result}");
    assert_eq!(
        std::fs::metadata(roomy.dir().files.join("big"))
            .unwrap()
            .len(),
        4 * FILES_QUOTA
    );
}

/// What a store's files already hold when it starts counts against its quota (a host
/// restart, or files an operator put there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_store_already_keeps_count_against_its_quota() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    let files = host.data_dir.join("stores/keeper/files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    std::fs::write(files.join("sub/old"), vec![0u8; 2 * FILES_QUOTA as usize]).unwrap();
    add_cramped(&host, "keeper").await;
    let result = probe(
        &host,
        "keeper",
        json!({"path": "/data/new", "op": "fill", "bytes": 1}),
    )
    .await;
    assert_eq!(result["allowed"], false, "{result}");
    let (_, status) = host.get("/v1/stores/keeper").await;
    assert!(
        status["usage"]["filesBytes"].as_u64().unwrap() >= 2 * FILES_QUOTA,
        "{status}"
    );
    assert!(files.join("sub/old").exists());
}

/// A guest holds at most 64 files open at once: each is one of the host's own open files,
/// which every store's databases need too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_hold_the_hosts_open_files() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    host.add_store("hoarder", "escape", &[]).await;
    let written = probe(
        &host,
        "hoarder",
        json!({"path": "/data/f", "op": "fill", "bytes": 10}),
    )
    .await;
    assert_eq!(written["allowed"], true, "{written}");

    let result = probe(
        &host,
        "hoarder",
        json!({"path": "/data/f", "op": "hold", "count": 5_000}),
    )
    .await;
    assert_eq!(result["allowed"], false, "{result}");
    let detail = result["detail"].as_str().unwrap();
    let held: u64 = detail
        .strip_prefix("held ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{detail}"));
    assert!((32..=64).contains(&held), "{detail}");

    // Closing them gives them back.
    let result = probe(
        &host,
        "hoarder",
        json!({"path": "/data/f", "op": "hold", "count": 32}),
    )
    .await;
    assert_eq!(result["allowed"], true, "{result}");
}

/// A plugin that gives up when `/data` is full fails as `disk_full`, like one whose database
/// is full: the failure says which quota, and the event is dead-lettered, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_on_a_full_files_quota_fails_as_disk_full() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        files: 0,
        ..Quotas::default()
    };
    host.add_store_with("no-files", "writer", &[], quotas).await;
    host.append(
        "no-files",
        "kv.slow",
        json!({"key": "k", "value": 1, "sleepMs": 0}),
    )
    .await;
    let status = host
        .wait_for_status("no-files", |s| s["deadLettered"].as_u64() >= Some(1))
        .await;
    assert_eq!(status["lastFailure"]["reason"], "disk_full", "{status}");
    let message = status["lastFailure"]["message"].as_str().unwrap();
    assert!(message.contains("files"), "{message}");
    let (_, letters) = host.get("/v1/stores/no-files/dead-letters").await;
    assert_eq!(
        letters["deadLetters"][0]["reason"], "disk_full",
        "{letters}"
    );
}

/// A file removed while the guest keeps it open still holds its bytes on disk: they count
/// until the guest closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_file_counts_until_the_guest_closes_it() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    add_cramped(&host, "ghosts").await;
    // 384 KiB each: two fit in 1 MiB, a third does not.
    let ghosts =
        json!({"path": "/data/ghost", "op": "unlink_open", "count": 8, "bytes": 384 << 10});
    let result = probe(&host, "ghosts", ghosts.clone()).await;
    assert_eq!(result["allowed"], false, "{result}");
    let detail = result["detail"].as_str().unwrap();
    assert!(detail.starts_with("kept 2 removed files open"), "{detail}");

    // The probe has closed them: their bytes are back.
    let (_, status) = host.get("/v1/stores/ghosts").await;
    let result = probe(&host, "ghosts", ghosts).await;
    let detail = result["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("kept 2 removed files open"),
        "{detail} {status}"
    );
}

/// What a guest writes to a file after removing it (a scratch file) is given back when it
/// closes the file, like the bytes the file had when it was removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_written_to_a_removed_file_comes_back_when_it_is_closed() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    add_cramped(&host, "scratcher").await;
    // 384 KiB each: only two would fit at once in 1 MiB, and eight run one after another.
    let result = probe(
        &host,
        "scratcher",
        json!({"path": "/data/scratch", "op": "scratch", "count": 8, "bytes": 384 << 10}),
    )
    .await;
    assert_eq!(result["detail"], "used 8 scratch files", "{result}");
    assert_eq!(result["allowed"], true, "{result}");
    let (_, status) = host.get("/v1/stores/scratcher").await;
    assert_eq!(
        status["usage"]["filesBytes"], 0,
        "nothing is left: {status}"
    );
}

/// Replacing a file whole (write a new version, rename it over the old one) over and over
/// keeps the count where it is: the replaced file's bytes come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_file_by_rename_again_and_again_stays_within_the_quota() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    add_cramped(&host, "replacer").await;
    let result = probe(
        &host,
        "replacer",
        json!({"path": "/data/state", "op": "replace_loop", "count": 40, "bytes": 100 << 10}),
    )
    .await;
    assert_eq!(result["allowed"], true, "{result}");
    let (_, status) = host.get("/v1/stores/replacer").await;
    assert_eq!(
        status["usage"]["filesBytes"],
        (100 << 10) + 4096,
        "one file of 100 KiB: {status}"
    );
}

/// A removal that fails gives nothing back: renaming a directory over a file the guest holds
/// open is refused, again and again, and the file still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rename_gives_nothing_back() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    host.add_store("renamer", "escape", &[]).await;
    let bytes = 512 << 10;
    let result = probe(
        &host,
        "renamer",
        json!({"path": "/data/big", "op": "fill", "bytes": bytes}),
    )
    .await;
    assert_eq!(result["allowed"], true, "{result}");
    let result = probe(
        &host,
        "renamer",
        json!({"path": "/data/big", "op": "rename_dir_over", "count": 10}),
    )
    .await;
    assert_eq!(result["detail"], "10 renames refused", "{result}");
    // A write afterwards settles what was closed meanwhile.
    let result = probe(
        &host,
        "renamer",
        json!({"path": "/data/small", "op": "fill", "bytes": 10}),
    )
    .await;
    assert_eq!(result["allowed"], true, "{result}");
    let (_, status) = host.get("/v1/stores/renamer").await;
    let used = status["usage"]["filesBytes"].as_u64().unwrap();
    assert_eq!(
        used,
        bytes + 10 + 3 * 4096,
        "big, small and big.d: {status}"
    );
}

/// What `hostile {kind}` on the `raw_fs` program answered: its status and error message.
async fn raw_fs(host: &TestHost, store: &str, kind: &str) -> (u16, String) {
    let args = storehost_tests::urlencode(&json!({ "kind": kind }).to_string());
    let (status, body) = host
        .get(&format!("/v1/stores/{store}/query/hostile?args={args}"))
        .await;
    (
        status,
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Calling WASI directly does not get round the limits Rust's standard library keeps to: a
/// stream write larger than its permit is refused, a guest keeps at most 16 directory
/// listings (each holds one of the host's open files), and a file created through a
/// link counts like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_wasi_calls_meet_the_same_limits() {
    let host = TestHost::start().await;
    host.deploy("raw_fs", programs::RAW_FS).await;
    let quotas = Quotas {
        files: 64 << 10,
        ..Quotas::default()
    };
    host.add_store_with("raw", "raw_fs", &[], quotas).await;

    let (status, message) = raw_fs(&host, "raw", "big_stream_write").await;
    assert_ne!(status, 200);
    assert!(
        message.contains("larger than check-write permitted"),
        "{status}: {message}"
    );

    let (_, message) = raw_fs(&host, "raw", "listings").await;
    assert!(message.starts_with("held 16 listings, then"), "{message}");

    // 64 KiB hold 16 entries: `big` (from the first probe), the link and 14 files.
    let (_, message) = raw_fs(&host, "raw", "create_through_link").await;
    assert!(
        message.contains("made 14 files through a link, then"),
        "{message}"
    );
}

/// A guest's directory listings are read from the disk as it asks for entries, and their
/// reading is charged to it. 16 listings held at once and read an entry from each in turn
/// each give every entry once (the host holds a few entries of each ahead, not the whole
/// listing as wasmtime-wasi did); a call reading 150 listings of 4,000 entries whole fails as
/// `cpu_time` under a 300 ms `cpu_ms_per_call` (wasmtime-wasi read each in one call, on a
/// blocking thread the CPU meter did not see, which counted one tick for it: it was charged
/// about 150 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_listings_are_read_as_asked_and_charged_their_time() {
    let host = TestHost::start().await;
    host.deploy("raw_fs", programs::RAW_FS).await;
    host.add_store("lister", "raw_fs", &[]).await;
    let hostile = |args: Value| {
        let args = storehost_tests::urlencode(&args.to_string());
        format!("/v1/stores/lister/query/hostile?args={args}")
    };
    for start in (0..4_000).step_by(500) {
        let (_, body) = host
            .get(&hostile(json!({"kind": "make_many", "start": start})))
            .await;
        assert_eq!(body["error"]["message"], "made 500 files", "{body}");
    }
    // `/data` itself, a handle wasmtime-wasi opens only to reach what is under it.
    let (_, body) = host.get(&hostile(json!({"kind": "list_root"}))).await;
    assert_eq!(
        body["error"]["message"], r#"the root holds ["many"]"#,
        "{body}"
    );
    let (_, body) = host.get(&hostile(json!({"kind": "interleave"}))).await;
    assert_eq!(
        body["error"]["message"],
        format!("read 16 listings of {:?} entries", [4_000; 16]),
        "{body}"
    );
    let (_, body) = host
        .get(&hostile(json!({"kind": "relist", "times": 2})))
        .await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("listed 2 times 4000 entries in"),
        "{body}"
    );
    let (code, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/lister",
            Some(json!({"quotas": {"cpu_ms_per_call": 300}})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (status, body) = host
        .get(&hostile(json!({"kind": "relist", "times": 150})))
        .await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("more than 300 ms of CPU time"),
        "the listings were not charged: {status} {message}"
    );
}

/// A guest nests directories at most `MAX_DIR_DEPTH` (64) levels below `/data`, whether it
/// makes them or moves them there: past that it is refused with `name-too-long`. Its 64
/// levels of 200-byte names are a path of 12.8 KB, longer than `PATH_MAX`, which the store's
/// start measured by path and failed on ("file name too long"): it starts again, counting
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_nests_directories_64_deep_at_most_and_its_store_starts_again() {
    use storehost_runtime::files::{ENTRY_BYTES, MAX_DIR_DEPTH};
    let dir = tempfile::tempdir().unwrap();
    let options = storehost_tests::TestHostOptions {
        data_dir: Some(dir.path().join("data")),
        ..storehost_tests::TestHostOptions::default()
    };
    let first = TestHost::start_with(options.clone()).await;
    first.deploy("raw_fs", programs::RAW_FS).await;
    first.add_store("deep", "raw_fs", &[]).await;

    let (_, message) = raw_fs(&first, "deep", "deep_dirs").await;
    assert!(
        message.starts_with(&format!(
            "made {MAX_DIR_DEPTH} directories, then: name-too-long"
        )),
        "{message}"
    );
    // A tree 4 levels high fits under the 60th level, not under the 61st (nor when named
    // through a path longer than PATH_MAX); a lone directory does.
    let (_, message) = raw_fs(&first, "deep", "deep_move").await;
    assert!(
        message.starts_with(
            "under 60: moved; back: moved; under 61: name-too-long; empty under 61: moved; \
             padded under 61: name-too-long"
        ),
        "{message}"
    );
    // The 64 levels, and the chain of 61, the tree of 4 and the lone directory.
    let made = (64 + 61 + 4 + 1) * ENTRY_BYTES;
    let (_, status) = first.get("/v1/stores/deep").await;
    assert_eq!(status["usage"]["filesBytes"], made, "{status}");
    first.stop().await;

    let second = TestHost::start_with(options).await;
    second.deploy("raw_fs", programs::RAW_FS).await;
    second.add_store("deep", "raw_fs", &[]).await;
    let (_, status) = second.get("/v1/stores/deep").await;
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(
        status["usage"]["filesBytes"], made,
        "measured afresh: {status}"
    );
}

/// A guest syncing a file in a loop is charged the time its syncs take as CPU time, through
/// `sync` as through `sync-data`: each sync here writes back 4,096 pages the guest dirtied
/// cheaply (about 35 ms a sync on this machine's disk, which takes a small sync in 0.1 ms), so
/// the epoch ticks alone would count it as one tick. The guest stops by itself once its
/// syncs have taken 500 ms: charged their time, it fails as `cpu_time` under a 600 ms
/// `cpu_ms_per_call` before that (the dirtying is charged about as much again), long before
/// its 30 s `wall_ms_per_call`; charged a tick each, it was charged about 400 ms and answered
/// how long it had synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_in_a_loop_are_charged_their_time_as_cpu_time() {
    let host = TestHost::start().await;
    host.deploy("raw_fs", programs::RAW_FS).await;
    let quotas = Quotas {
        cpu_ms_per_call: 600,
        wall_ms_per_call: 30_000,
        ..Quotas::default()
    };
    host.add_store_with("syncer", "raw_fs", &[], quotas).await;
    for call in ["sync", "sync_data"] {
        let args = json!({"kind": "sync_loop", "call": call, "pages": 4_096, "sync_ms": 500});
        let args = storehost_tests::urlencode(&args.to_string());
        let (status, body) = host
            .get(&format!("/v1/stores/syncer/query/hostile?args={args}"))
            .await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("more than 600 ms of CPU time"),
            "{call}: the syncs' time was not charged: {status} {body}"
        );
    }
}

/// What `hoard` answers from a guest that holds all it may: its own caps (64 files, 16
/// listings) reached.
const HOARDS_ALL: &str =
    "holds 64 files and 16 listings; the next open: quota, the next listing: quota";

/// What `hoard` answers from a guest refused every open because the others hold what all
/// guests together may.
const HOARDS_NONE: &str =
    "holds 0 files and 0 listings; the next open: quota, the next listing: quota";

/// Files and listings one guest holds at its own caps.
const ONE_GUEST_AT_ITS_CAPS: usize = 64 + 16;

/// The files and listings a `hoard` answer says its guest holds.
fn hoarded(message: &str) -> usize {
    let numbers: Vec<usize> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .take(2)
        .collect();
    assert_eq!(numbers.len(), 2, "not a hoard answer: {message}");
    numbers.iter().sum()
}

/// A file or listing a guest holds goes back to the others however its sandbox ends: when it
/// closes it, when the sandbox traps, when its store switches to a new version of its plugin,
/// when the store is removed, and when it hibernates. Here all guests together may hold one
/// guest's worth (80): each time the other guest then holds all of it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_open_files_go_back_to_the_others_however_its_sandbox_ends() {
    let options = TestHostOptions {
        guest_open_files: Some(ONE_GUEST_AT_ITS_CAPS),
        ..TestHostOptions::default()
    };
    let host = TestHost::start_with(options).await;
    host.deploy("raw_fs", programs::RAW_FS).await;
    host.add_store("first", "raw_fs", &[]).await;
    host.add_store("second", "raw_fs", &[]).await;
    assert_eq!(raw_fs(&host, "first", "hoard").await.1, HOARDS_ALL);
    assert_eq!(raw_fs(&host, "second", "hoard").await.1, HOARDS_NONE);
    host.wait_for_gauge("storehost_guest_open_files_in_use", 80)
        .await;

    // Closed by the guest.
    assert_eq!(raw_fs(&host, "first", "release").await.1, "released");
    assert_eq!(
        raw_fs(&host, "second", "hoard").await.1,
        HOARDS_ALL,
        "after a close"
    );

    // A trap: the sandbox is dropped, with what it held.
    let (status, message) = raw_fs(&host, "second", "panic").await;
    assert!(message.contains("asked to panic"), "{status}: {message}");
    assert_eq!(
        raw_fs(&host, "first", "hoard").await.1,
        HOARDS_ALL,
        "after a trap"
    );

    // A new version of the plugin: the store's next call runs in a new sandbox, the old one
    // dropped with what it held.
    let wasm = std::fs::read(programs::RAW_FS).unwrap();
    host.orchestrator
        .deploy_plugin(
            "raw_fs",
            storehost_tests::with_custom_section(&wasm, "version 2"),
        )
        .await
        .unwrap();
    assert_eq!(
        raw_fs(&host, "first", "hoard").await.1,
        HOARDS_ALL,
        "its new sandbox holds what its old one did"
    );
    assert_eq!(raw_fs(&host, "second", "hoard").await.1, HOARDS_NONE);

    // A removal.
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/first", None)
        .await;
    assert!(status < 300, "{status}: {body}");
    assert_eq!(
        raw_fs(&host, "second", "hoard").await.1,
        HOARDS_ALL,
        "after a removal"
    );
    host.stop().await;

    // Hibernation.
    let options = TestHostOptions {
        guest_open_files: Some(ONE_GUEST_AT_ITS_CAPS),
        idle_timeout: Some(std::time::Duration::from_millis(200)),
        ..TestHostOptions::default()
    };
    let host = TestHost::start_with(options).await;
    host.deploy("raw_fs", programs::RAW_FS).await;
    host.add_store("sleeper", "raw_fs", &[]).await;
    assert_eq!(raw_fs(&host, "sleeper", "hoard").await.1, HOARDS_ALL);
    host.wait_for_status("sleeper", |status| status["state"] == "hibernated")
        .await;
    host.wait_for_gauge("storehost_guest_open_files_in_use", 0)
        .await;
    host.add_store("waker", "raw_fs", &[]).await;
    let (_, message) = raw_fs(&host, "waker", "hoard").await;
    assert_eq!(message, HOARDS_ALL, "after a hibernation");
}

/// Many tenants together cannot use up the host's open files either. The real server runs
/// under an open-file limit of its own files for `max_stores` awake stores (`ulimit -n`) plus
/// 300, which is what its plugins together may hold; 24 stores whose plugins each hold all
/// they may (80 files and listings), unbounded, would take more than the limit leaves.
/// They hold the 300 between them and are refused with `quota` past that, and meanwhile a
/// well-behaved store is provisioned and takes and processes events (before the host-wide
/// count, its databases' opens failed with "too many open files"). Removing two of the
/// hoarding stores gives their files back: another plugin can then hold all it may.
#[test]
fn tenants_together_cannot_use_up_the_hosts_open_files() {
    use storehost_store::open_files;
    use storehost_tests::process::{BlockingAdmin, ServerProcess};
    const MAX_STORES: usize = 30;
    const FOR_GUESTS: usize = 300;
    const HOARDERS: usize = 24;
    const CONNECTIONS: usize = 16;
    let limit = open_files::wanted(MAX_STORES, 0) + CONNECTIONS + FOR_GUESTS;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        format!(
            "max_stores = {MAX_STORES}\nspare_stores = 0\nidle_timeout_ms = 0\n\
             [http]\nmax_connections = {CONNECTIONS}\n\
             [defaults]\nplugin = \"writer\"\n\
             [plugins.writer]\npath = {:?}\n[plugins.raw_fs]\npath = {:?}\n",
            programs::WRITER,
            programs::RAW_FS
        ),
    )
    .unwrap();
    let admin = BlockingAdmin::default();
    let call = |url: &str, method, path: &str, body| admin.call(url, method, path, body);
    let hoard = |url: &str, store: &str| {
        let args = storehost_tests::urlencode(&json!({"kind": "hoard"}).to_string());
        let (_, body) = call(
            url,
            reqwest::Method::GET,
            &format!("/v1/stores/{store}/query/hostile?args={args}"),
            None,
        );
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let gauge = |url: &str, name: &str| admin.metric(url, name);

    let server = ServerProcess::spawn_with_open_file_limit(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
        limit as u64,
    );
    let url = server.url.clone();
    assert_eq!(gauge(&url, "storehost_guest_open_files"), FOR_GUESTS);
    let hoarders: Vec<String> = (0..HOARDERS).map(|n| format!("hoarder-{n:02}")).collect();
    for id in &hoarders {
        let (status, body) = call(
            &url,
            reqwest::Method::PUT,
            &format!("/v1/stores/{id}"),
            Some(json!({"plugin": "raw_fs"})),
        );
        assert_eq!(status, 201, "{id}: {body}");
    }
    // Without the host-wide count the hoarders would hold more files than the whole limit
    // (24 × 80 = 1,920 against 1,700).
    const _: () = assert!(
        HOARDERS * ONE_GUEST_AT_ITS_CAPS
            > MAX_STORES * open_files::PER_STORE + open_files::HOST + CONNECTIONS + FOR_GUESTS
    );
    let hoards: Vec<String> = hoarders.iter().map(|id| hoard(&url, id)).collect();

    // A store provisioned now starts, and takes and processes events.
    let (status, body) = call(
        &url,
        reqwest::Method::PUT,
        "/v1/stores/calm",
        Some(json!({})),
    );
    let log_tail = || {
        let log = server.run_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    };
    assert_eq!(
        status,
        201,
        "a new store beside the hoarders: {body}; the log ends:\n{}",
        log_tail()
    );
    for n in 0..3 {
        let (status, body) = call(
            &url,
            reqwest::Method::POST,
            "/v1/stores/calm/events",
            Some(
                json!({"type": "kv.put", "payload": {"key": format!("k{n}"), "value": format!("value {n}")}}),
            ),
        );
        assert_eq!(
            status,
            202,
            "an event beside the hoarders: {body}; the log ends:\n{}",
            log_tail()
        );
    }
    let mut processed = Value::Null;
    for _ in 0..600 {
        let (_, status) = call(&url, reqwest::Method::GET, "/v1/stores/calm", None);
        if status["eventsProcessed"].as_u64() >= Some(3) {
            processed = status;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        processed["eventsProcessed"].as_u64() >= Some(3),
        "the events were not processed: {processed}"
    );
    assert_eq!(processed["deadLettered"], 0, "{processed}");
    let args = storehost_tests::urlencode(&json!({"key": "k2"}).to_string());
    let (status, body) = call(
        &url,
        reqwest::Method::GET,
        &format!("/v1/stores/calm/query/get?args={args}"),
        None,
    );
    assert_eq!((status, &body["value"]), (200, &json!("value 2")), "{body}");

    // The hoarders hold what plugins may together, the first ones all they may each, and
    // the rest are refused with `quota`.
    let held: Vec<usize> = hoards.iter().map(|message| hoarded(message)).collect();
    assert_eq!(held.iter().sum::<usize>(), FOR_GUESTS, "{hoards:#?}");
    assert_eq!(hoards[0], HOARDS_ALL);
    assert_eq!(hoards[HOARDERS - 1], HOARDS_NONE);
    assert_eq!(gauge(&url, "storehost_guest_open_files_in_use"), FOR_GUESTS);
    assert!(
        gauge(&url, "storehost_guest_open_files_refused_total") >= HOARDERS - FOR_GUESTS / 80,
        "each hoarder past the count was refused at least once"
    );
    assert!(
        server
            .run_log()
            .contains("plugins together hold all the open files"),
        "the refusals are in the log"
    );

    // Removed hoarders give theirs back: one refused before now holds all it may.
    for id in &hoarders[..2] {
        let (status, body) = call(
            &url,
            reqwest::Method::DELETE,
            &format!("/v1/stores/{id}"),
            None,
        );
        assert!(status < 300, "{id}: {status} {body}");
    }
    let given_back = FOR_GUESTS - 2 * ONE_GUEST_AT_ITS_CAPS;
    for _ in 0..600 {
        if gauge(&url, "storehost_guest_open_files_in_use") == given_back {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(gauge(&url, "storehost_guest_open_files_in_use"), given_back);
    assert_eq!(hoard(&url, &hoarders[HOARDERS - 1]), HOARDS_ALL);
    server.stop_cleanly();
}

/// A host started with a soft open-file limit below its hard one (1,024 on many systems, where
/// the hard limit is far higher) raises it to the hard one, and sizes what plugins may hold
/// together from that: started at 1,100 files, 30 stores' files and 16 connections would have
/// left plugins nothing.
#[test]
fn a_host_raises_its_open_file_limit_to_the_most_the_system_allows() {
    use storehost_store::open_files;
    use storehost_tests::process::{BlockingAdmin, ServerProcess};
    const MAX_STORES: usize = 30;
    const CONNECTIONS: usize = 16;
    const HARD: usize = 6_000;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        format!(
            "max_stores = {MAX_STORES}\nspare_stores = 0\n[http]\nmax_connections = {CONNECTIONS}\n"
        ),
    )
    .unwrap();
    let own_hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    assert!(
        own_hard.is_none_or(|hard| hard >= HARD as u64),
        "this test needs a hard open-file limit of {HARD} at least (ulimit -Hn), not {own_hard:?}"
    );
    let server = ServerProcess::spawn_with_open_file_limits(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
        1_100,
        HARD as u64,
    );
    let admin = BlockingAdmin::default();
    assert_eq!(
        admin.metric(&server.url, "storehost_guest_open_files"),
        HARD - open_files::wanted(MAX_STORES, 0) - CONNECTIONS
    );
    assert!(
        server
            .run_log()
            .contains("raised the open-file limit (ulimit -n) to the most the system allows"),
        "{}",
        server.run_log()
    );
    server.stop_cleanly();
}

/// A host out of open files refuses a new store with 503 `out_of_files` and `Retry-After`
/// (it answered 500 "internal error"), and a restart brings every store back and leaves room
/// for more: a store opened at start with nothing to do closes its files at once. Before, each
/// held its files for the first `idle_timeout` + `close_files_after` after a restart (30
/// minutes by default), so a host near its limit restarted with no room for a new store, and
/// past it some of its stores failed to start.
#[test]
fn a_host_out_of_open_files_refuses_new_stores_clearly_and_restarts_with_room() {
    use storehost_tests::process::{BlockingAdmin, ServerProcess};
    const LIMIT: u64 = 400;
    const SECRET: &str = "provisioning-secret";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        format!(
            "max_stores = 1000\nspare_stores = 0\n\
             idle_timeout_ms = 600000\nclose_files_after_ms = 600000\n\
             [http]\nmax_connections = 16\n\
             [defaults]\nplugin = \"writer\"\n[plugins.writer]\npath = {:?}\n",
            programs::WRITER
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let admin = BlockingAdmin::default();
    let put = |url: &str, id: &str| {
        admin.call(url, reqwest::Method::PUT, &format!("/v1/stores/{id}"), None)
    };

    let env = [("WEBHOOK_SECRET", SECRET)];
    let server = ServerProcess::spawn_with_open_file_limit(&data, &args, &env, LIMIT);
    let mut created = Vec::new();
    let (status, refusal) = loop {
        let id = format!("s-{:04}", created.len());
        let (status, body) = put(&server.url, &id);
        if status != 201 {
            break (status, body);
        }
        created.push(id);
        assert!(created.len() < 400, "{LIMIT} open files never ran out");
    };
    assert_eq!(status, 503, "{refusal}");
    assert_eq!(refusal["error"]["code"], "out_of_files", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("open-file limit") && message.contains("Retry"),
        "{message}"
    );
    assert!(created.len() >= 10, "only {} stores fit", created.len());
    // A provisioning service's webhook is told the same.
    let created_by_webhook = json!({
        "event": "workspace.created", "instanceId": "from-webhook",
        "userId": "u", "timestamp": "2026-12-07T19:00:00Z"
    });
    let (status, refusal) = admin.webhook(&server.url, SECRET, &created_by_webhook);
    assert_eq!(status, 503, "{refusal}");
    assert_eq!(refusal["error"]["code"], "out_of_files", "{refusal}");
    server.stop_cleanly();

    let server = ServerProcess::spawn_with_open_file_limit(&data, &args, &[], LIMIT);
    let (_, health) = admin.call(&server.url, reqwest::Method::GET, "/health", None);
    let stores = &health["stores"];
    assert_eq!(stores.get("failed"), None, "{health}");
    let counted: u64 = stores
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(counted, created.len() as u64, "{health}");
    // Every one of them goes to sleep with its files closed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, health) = admin.call(&server.url, reqwest::Method::GET, "/health", None);
        if health["stores"]["hibernated"] == created.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all asleep: {health}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Room for new stores again, and the old ones wake to events.
    let (status, body) = put(&server.url, "newcomer");
    assert_eq!(status, 201, "{body}");
    for id in [&created[0], created.last().unwrap()] {
        let (status, body) = admin.call(
            &server.url,
            reqwest::Method::POST,
            &format!("/v1/stores/{id}/events"),
            Some(json!({"type": "kv.put", "payload": {"key": "k", "value": 1}})),
        );
        assert_eq!(status, 202, "{id}: {body}");
    }
    server.stop_cleanly();
}
