//! The watched config file: edits (atomic rename or in-place write) add, remove and change
//! stores live; a broken edit keeps the last good config and shows its error with the line in
//! `/health`; unchanged content does nothing; a thousand stores in one edit come up while the
//! API keeps answering. Real files, the real watcher (notify on the parent directory), the
//! real router on a real port.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use storehost_control::watcher::ReloadOutcome;
use storehost_store::StoreId;
use storehost_tests::TestHost;
use storehost_tests::control::{AfterPluginRead, eventually, watched, watched_after_reads};
use storehost_tests::programs;

fn header() -> String {
    format!(
        "max_stores = 1100\n[defaults]\nplugin = \"writer\"\n[plugins.writer]\npath = {:?}\n",
        programs::WRITER
    )
}

fn config_with(stores: &[&str], extra: &str) -> String {
    let mut text = header();
    for id in stores {
        text.push_str(&format!("[stores.{id}]\n"));
    }
    text.push_str(extra);
    text
}

/// Writes `text` to a temporary file beside `path` and renames it over `path`, as editors do.
fn save_by_rename(path: &Path, text: &str) {
    let temp = path.with_extension("toml.swp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

async fn ids(host: &TestHost) -> Vec<String> {
    host.orchestrator
        .ids()
        .await
        .iter()
        .map(|id| id.to_string())
        .collect()
}

async fn store_sha(host: &TestHost) -> String {
    store_sha_of(host, "on-swap").await
}

async fn health(host: &TestHost) -> Value {
    let (status, body) = host.get("/health").await;
    assert_eq!(status, 200, "{body}");
    body
}

fn config_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storehost.toml");
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_add_and_remove_stores_live_by_rename_and_by_in_place_write() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["cfg-one", "cfg-two"], "")).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    host.append("cfg-two", "kv.put", json!({"key": "k", "value": "v"}))
        .await;
    host.settle("cfg-two").await;

    save_by_rename(&path, &config_with(&["cfg-one", "cfg-three"], ""));
    eventually("the renamed config applies", || async {
        ids(host).await == ["cfg-one", "cfg-three"]
    })
    .await;
    host.append("cfg-three", "kv.put", json!({"key": "k", "value": "v"}))
        .await;
    assert!(
        std::fs::read_dir(host.data_dir.join("archive"))
            .unwrap()
            .next()
            .is_some(),
        "the removed store's data is archived, not deleted"
    );

    // A second save by rename: the watch survives the file being replaced.
    save_by_rename(
        &path,
        &config_with(&["cfg-one", "cfg-three", "cfg-four"], ""),
    );
    eventually("the second rename applies", || async {
        ids(host).await.len() == 3
    })
    .await;

    // In-place write (truncate and write the same inode).
    std::fs::write(&path, config_with(&["cfg-three", "cfg-four"], "")).unwrap();
    eventually("the in-place write applies", || async {
        ids(host).await == ["cfg-four", "cfg-three"]
    })
    .await;

    // A store added through the API is not the config's to remove.
    host.add_store("api-owned", "writer", &[]).await;
    std::fs::write(&path, config_with(&["cfg-four", "cfg-five"], "")).unwrap();
    eventually("the next write applies", || async {
        ids(host).await == ["api-owned", "cfg-five", "cfg-four"]
    })
    .await;
    let config_status = &health(host).await["config"];
    assert!(config_status["lastError"].is_null(), "{config_status}");
    assert!(config_status["loadedAt"].is_i64(), "{config_status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_keeps_the_running_set_and_health_shows_the_error_with_its_line() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["keep-one", "keep-two"], "")).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;

    // Line 7: an unknown quota key; the edit also drops keep-two and adds new-one.
    let broken = config_with(
        &["keep-one", "new-one"],
        "[stores.new-one.quotas]\nmemroy = \"1MiB\"\n",
    );
    let bad_line = broken
        .lines()
        .position(|l| l.starts_with("memroy"))
        .unwrap()
        + 1;
    save_by_rename(&path, &broken);
    eventually("the broken edit is reported", || async {
        health(host).await["config"]["lastError"].is_string()
    })
    .await;
    let health = health(host).await;
    let error = health["config"]["lastError"].as_str().unwrap();
    assert!(
        error.contains(&format!("storehost.toml:{bad_line}:")) && error.contains("memroy"),
        "the error names its line: {error}"
    );
    assert_eq!(health["status"], "degraded");
    assert_eq!(
        ids(host).await,
        ["keep-one", "keep-two"],
        "the last good config keeps running"
    );

    // A plugin path that does not exist is refused the same way.
    std::fs::write(
        &path,
        config_with(
            &["keep-one"],
            "[plugins.ghost]\npath = \"/nowhere/ghost.wasm\"\n",
        ),
    )
    .unwrap();
    eventually("the missing plugin is reported", || async {
        self::health(host).await["config"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("ghost"))
    })
    .await;
    assert_eq!(ids(host).await, ["keep-one", "keep-two"]);

    // Fixed: applies, and the error clears.
    std::fs::write(&path, config_with(&["keep-one", "new-one"], "")).unwrap();
    eventually("the fixed edit applies", || async {
        ids(host).await == ["keep-one", "new-one"]
    })
    .await;
    let health = self::health(host).await;
    assert!(health["config"]["lastError"].is_null(), "{health}");
    assert_eq!(health["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_change_applies_live_and_unchanged_content_does_nothing() {
    let (_dir, path) = config_file();
    let quotas = |n: u32| {
        config_with(
            &["quota-one"],
            &format!("[stores.quota-one.quotas]\nmax_pending_events = {n}\n"),
        )
    };
    std::fs::write(&path, quotas(1000)).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    let (status, _) = host.post("/v1/stores/quota-one/pause", json!({})).await;
    assert_eq!(status, 200);

    save_by_rename(&path, &quotas(2));
    eventually("the quota change applies", || async {
        host.get("/v1/stores/quota-one").await.1["quotas"]["max_pending_events"] == 2
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let (status, _) = host
            .post(
                "/v1/stores/quota-one/events",
                json!({"type": "kv.put", "payload": {"key": format!("k{i}"), "value": i}}),
            )
            .await;
        statuses.push(status);
    }
    assert_eq!(statuses, [202, 202, 429], "the new queue limit holds");
    let (_, view) = host.get("/v1/stores/quota-one").await;
    assert_eq!(
        view["state"], "paused",
        "the change kept the store's state: {view}"
    );

    // The same bytes written again: nothing to do.
    let loaded_at = health(host).await["config"]["loadedAt"].clone();
    std::fs::write(&path, quotas(2)).unwrap();
    assert_eq!(w.reloader.reload().await, ReloadOutcome::Unchanged);
    assert_eq!(health(host).await["config"]["loadedAt"], loaded_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stores_in_one_edit_come_up_while_the_api_answers() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["bulk-seed"], "")).unwrap();
    let w = watched(&path, 1100).await;
    let host = &w.host;
    let names: Vec<String> = (0..1000).map(|i| format!("bulk-{i:04}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    save_by_rename(&path, &config_with(&refs, ""));

    let answered = std::sync::atomic::AtomicUsize::new(0);
    eventually("all 1000 stores run", || async {
        // The API answers while the edit is being applied.
        let (status, _) = host.get("/health").await;
        assert_eq!(status, 200);
        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        host.orchestrator.len().await == 1000
    })
    .await;
    assert!(answered.into_inner() >= 1);
    let store = host
        .orchestrator
        .get(&StoreId::new("bulk-0999").unwrap())
        .await
        .unwrap();
    let seq = host
        .append("bulk-0999", "kv.put", json!({"key": "last", "value": "ok"}))
        .await;
    assert_eq!(seq, 1);
    drop(store);
    host.settle("bulk-0999").await;
    assert_eq!(
        host.query("bulk-0999", "get", json!({"key": "last"})).await["value"],
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_rewritten_on_disk_is_deployed_live() {
    let (dir, path) = config_file();
    let plugin_path = dir.path().join("plugins").join("swap.wasm");
    std::fs::create_dir_all(plugin_path.parent().unwrap()).unwrap();
    let writer = std::fs::read(programs::WRITER).unwrap();
    let flaky = std::fs::read(programs::FLAKY).unwrap();
    std::fs::write(&plugin_path, &writer).unwrap();
    std::fs::write(
        &path,
        config_with(
            &[],
            "[plugins.swap]\npath = \"plugins/swap.wasm\"\n[stores.on-swap]\nplugin = \"swap\"\n",
        ),
    )
    .unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    let writer_sha = store_sha(host).await;

    // Replaced by rename (as `cp` to a temp name and `mv` would).
    let temp = plugin_path.with_extension("wasm.new");
    std::fs::write(&temp, &flaky).unwrap();
    std::fs::rename(&temp, &plugin_path).unwrap();
    eventually("the new plugin file is deployed", || async {
        store_sha(host).await != writer_sha
    })
    .await;
    let flaky_sha = store_sha(host).await;
    host.append("on-swap", "risky", json!({"id": 7})).await;
    host.settle("on-swap").await;
    assert_eq!(
        host.query("on-swap", "risky", json!({})).await["ids"],
        json!([7]),
        "the store runs the new version"
    );

    // Junk written in place: refused, the running version stays, /health says why.
    std::fs::write(&plugin_path, b"not wasm at all").unwrap();
    eventually("the broken plugin file is reported", || async {
        health(host).await["config"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("swap"))
    })
    .await;
    assert_eq!(store_sha(host).await, flaky_sha);

    // Roll back by writing the previous bytes. The watcher may read the file half written
    // (refused, as above) before it reads it whole, and /health reports a reload once the
    // plugin is deployed: both are awaited.
    std::fs::write(&plugin_path, &writer).unwrap();
    eventually(
        "the rolled-back plugin is deployed and the error cleared",
        || async {
            store_sha(host).await == writer_sha
                && health(host).await["config"]["lastError"].is_null()
        },
    )
    .await;
}

/// A plugin file first named by an edit, in a directory the watch did not follow before, is
/// followed from then on: rewritten, it is deployed. And the host reads its plugin files only
/// when something changed: its own reads are no edits. Before, the opens of its reads were
/// taken for edits, so after the first edit it read the config and every plugin file about
/// ten times a second for ever, and a file named by an edit was deployed again only by luck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_named_by_an_edit_is_followed_and_the_hosts_own_reads_are_no_edits() {
    let (dir, path) = config_file();
    std::fs::write(&path, config_with(&["base"], "")).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;

    let late = dir.path().join("later").join("late.wasm");
    std::fs::create_dir_all(late.parent().unwrap()).unwrap();
    std::fs::write(&late, std::fs::read(programs::WRITER).unwrap()).unwrap();
    save_by_rename(
        &path,
        &config_with(
            &["base"],
            "[plugins.late]\npath = \"later/late.wasm\"\n[stores.on-late]\nplugin = \"late\"\n",
        ),
    );
    eventually("the store of the new plugin starts", || async {
        ids(host).await.contains(&"on-late".to_owned())
    })
    .await;
    let writer_sha = store_sha_of(host, "on-late").await;

    // Nothing changes for a while: nothing is read again.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let plugin_reads = || w.plugin_reads.load(std::sync::atomic::Ordering::Relaxed);
    let reads = (w.reloader.reads(), plugin_reads());
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        (w.reloader.reads(), plugin_reads()),
        reads,
        "the host read its config or plugin files again with nothing changed"
    );

    std::fs::write(&late, std::fs::read(programs::FLAKY).unwrap()).unwrap();
    eventually("the rewritten plugin file is deployed", || async {
        store_sha_of(host, "on-late").await != writer_sha
    })
    .await;
}

/// An edit naming a plugin file that is not there yet (a deploy copying the config before the
/// plugin) is refused with why, and tried again until the file arrives: then it applies, with
/// no save of its own. Before, the refused edit's content counted as read, and it was lost
/// until the config file's bytes changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_refused_for_a_plugin_not_there_yet_applies_once_the_file_arrives() {
    let (dir, path) = config_file();
    std::fs::write(&path, config_with(&["base"], "")).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;

    save_by_rename(
        &path,
        &config_with(
            &["base"],
            "[plugins.early]\npath = \"later/early.wasm\"\n[stores.on-early]\nplugin = \"early\"\n",
        ),
    );
    eventually("the edit is refused", || async {
        health(host).await["config"]["lastError"]
            .as_str()
            .is_some_and(|error| error.contains("early.wasm"))
    })
    .await;
    assert!(!ids(host).await.contains(&"on-early".to_owned()));

    let plugin = dir.path().join("later").join("early.wasm");
    std::fs::create_dir_all(plugin.parent().unwrap()).unwrap();
    std::fs::write(&plugin, std::fs::read(programs::WRITER).unwrap()).unwrap();
    eventually("the edit applies once its plugin is there", || async {
        ids(host).await.contains(&"on-early".to_owned())
    })
    .await;
    assert!(
        health(host).await["config"]["lastError"].is_null(),
        "{}",
        health(host).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_applies_config_edits_live_and_reports_a_broken_one() {
    use storehost_tests::process::{PROCESS_TOKEN, ServerProcess};
    let (dir, path) = config_file();
    let config = |stores: &[&str], extra: &str| {
        let mut text = String::from("[defaults]\nplugin = \"agent\"\n");
        for id in stores {
            text.push_str(&format!("[stores.{id}]\n"));
        }
        text + extra
    };
    std::fs::write(&path, config(&["bin-one"], "")).unwrap();
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &["--config", path.to_str().unwrap()],
        &[],
    );
    let client = reqwest::Client::new();
    let health = || async {
        client
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(health().await["monitoredStoreIds"], json!(["bin-one"]));
    assert_eq!(
        health().await["config"]["path"],
        json!(path.display().to_string())
    );

    save_by_rename(&path, &config(&["bin-one", "bin-two"], ""));
    eventually("the binary applies the edit", || async {
        health().await["monitoredStoreIds"] == json!(["bin-one", "bin-two"])
    })
    .await;
    let (status, view) = {
        let response = client
            .get(format!("{}/v1/stores/bin-two", server.url))
            .bearer_auth(PROCESS_TOKEN)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    assert_eq!((status, &view["source"]), (200, &json!("config")), "{view}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        !log.contains("only at the next start"),
        "--listen and --data-dir are not mistaken for edits: {log}"
    );

    let broken = config(&["bin-two"], "[stores.bin-two.quotas]\nburst = \"lots\"\n");
    let bad_line = broken.lines().position(|l| l.starts_with("burst")).unwrap() + 1;
    std::fs::write(&path, &broken).unwrap();
    eventually("the binary reports the broken edit", || async {
        health().await["config"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("storehost.toml:{bad_line}:")))
    })
    .await;
    assert_eq!(
        health().await["monitoredStoreIds"],
        json!(["bin-one", "bin-two"]),
        "the last good config keeps running"
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("config edit refused"), "the log has it too");
    server.stop_cleanly();
}

/// A store the config file declares is not the API's to remove: `DELETE` (with or without
/// `purge`) answers 409 `config_owned` saying where to remove it, and the store runs on with
/// its data. Before, the API removed it and the next edit or restart brought it back empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_does_not_remove_a_store_the_config_declares() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["declared"], "")).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    host.append("declared", "kv.put", json!({"key": "k", "value": "v"}))
        .await;
    host.settle("declared").await;
    for query in ["", "?purge=true"] {
        let (status, body) = host
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/stores/declared{query}"),
                None,
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "config_owned", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        // It names the file the host runs, not the embedded default it does not.
        assert!(
            message.contains(&format!("config file {}", path.display()))
                && message.contains("remove it there")
                && !message.contains("embedded default"),
            "{message}"
        );
    }
    assert_eq!(ids(host).await, ["declared"]);
    assert_eq!(host.query("declared", "count", json!({})).await["kv"], 1);

    // Removed from the file, it stops (its data archived).
    std::fs::write(&path, config_with(&[], "")).unwrap();
    eventually("the edit removes it", || async {
        ids(host).await.is_empty()
    })
    .await;
}

/// Nor does the API change what the config decides for a store it declares: `PUT` with a
/// plugin, quotas or config answers 409 `config_owned` and the store keeps the config's
/// quotas — a change through the API would have been undone at the next start. An edit of the
/// file changes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_does_not_change_a_store_the_config_declares() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["declared"], "")).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/declared",
            Some(json!({"quotas": {"cpu_ms_per_call": 500}})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "config_owned", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    // It names the file the host runs (it spoke of the embedded default to a host with one).
    assert!(
        message.contains(&format!("config file {}", path.display()))
            && message.contains("change them there")
            && !message.contains("embedded default"),
        "{message}"
    );
    let (_, view) = host.get("/v1/stores/declared").await;
    assert_eq!(view["quotas"]["cpu_ms_per_call"], 1000, "{view}");

    std::fs::write(
        &path,
        config_with(
            &["declared"],
            "[stores.declared.quotas]\ncpu_ms_per_call = 500\n",
        ),
    )
    .unwrap();
    eventually("the edit changes the quota", || async {
        host.get("/v1/stores/declared").await.1["quotas"]["cpu_ms_per_call"] == 500
    })
    .await;
}

/// A store an edit could not change (its memory above the sandbox pool's ceiling) keeps
/// running as it was and `/health` says why; a later edit that does not touch it tries it
/// again and still reports it, instead of forgetting it while the file and the store differ.
/// Once the file asks for what can run, it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_an_edit_could_not_change_is_tried_again_and_reported_until_it_applies() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["heavy"], "")).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    let heavy = |memory: &str| format!("[stores.heavy.quotas]\nmemory = \"{memory}\"\n");
    let last_error = || async {
        health(host).await["config"]["lastError"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    std::fs::write(&path, config_with(&["heavy"], &heavy("1GiB"))).unwrap();
    eventually("the edit reports the store it could not change", || async {
        last_error().await.contains("heavy")
    })
    .await;
    std::fs::write(&path, config_with(&["heavy", "light"], &heavy("1GiB"))).unwrap();
    eventually("the next edit applies", || async {
        ids(host).await == ["heavy", "light"]
    })
    .await;
    assert!(
        last_error().await.contains("heavy"),
        "still reported: {}",
        last_error().await
    );
    let (_, view) = host.get("/v1/stores/heavy").await;
    assert_eq!(
        view["quotas"]["memory"],
        64 << 20,
        "it runs as it was: {view}"
    );

    std::fs::write(&path, config_with(&["heavy", "light"], &heavy("128MiB"))).unwrap();
    eventually("a quota it can run under applies", || async {
        host.get("/v1/stores/heavy").await.1["quotas"]["memory"] == 128 << 20
    })
    .await;
    // The reload reports once it has applied every store (the quota shows before that).
    eventually("nothing is left to report", || async {
        last_error().await.is_empty()
    })
    .await;
}

/// A version of a config plugin uploaded through the API runs until the plugin's file itself
/// changes: an edit of anything else in the config leaves it running (it used to deploy the
/// file's bytes again, so the upload lasted until the next unrelated edit); rewriting the file
/// deploys the file's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_a_config_plugin_runs_until_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storehost.toml");
    let plugin = dir.path().join("writer.wasm");
    let original = std::fs::read(programs::WRITER).unwrap();
    std::fs::write(&plugin, &original).unwrap();
    let config = |stores: &[&str]| {
        let mut text = storehost_tests::writer_config(&plugin, stores);
        text.insert_str(0, "max_stores = 100\n");
        text
    };
    std::fs::write(&path, config(&["on-file"])).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    let from_file = store_sha_of(host, "on-file").await;
    assert_eq!(from_file, storehost_tests::sha256sum(&original));

    let uploaded = storehost_tests::with_custom_section(&original, "uploaded");
    let (status, body) = host.upload_plugin("writer", uploaded.clone()).await;
    assert_eq!(status, 200, "{body}");
    let uploaded_sha = storehost_tests::sha256sum(&uploaded);
    eventually("the upload runs", || async {
        store_sha_of(host, "on-file").await == uploaded_sha
    })
    .await;

    std::fs::write(&path, config(&["on-file", "another"])).unwrap();
    eventually("the unrelated edit applies", || async {
        ids(host).await == ["another", "on-file"]
    })
    .await;
    assert_eq!(
        store_sha_of(host, "on-file").await,
        uploaded_sha,
        "an edit that does not touch the plugin's file leaves the upload running"
    );

    let rewritten = storehost_tests::with_custom_section(&original, "rewritten");
    std::fs::write(&plugin, &rewritten).unwrap();
    let rewritten_sha = storehost_tests::sha256sum(&rewritten);
    eventually("the rewritten file deploys", || async {
        store_sha_of(host, "on-file").await == rewritten_sha
    })
    .await;
}

async fn store_sha_of(host: &TestHost, id: &str) -> String {
    let (_, view) = host.get(&format!("/v1/stores/{id}")).await;
    view["plugin"]["sha256"].as_str().unwrap_or("").to_owned()
}

/// A store a webhook (or the reconciler, or the API) started that the config file then
/// declares belongs to the config from then on: it shows source `config`, host.db no longer
/// keeps the old owner's spec (which a restart used to apply over the config's), and so the
/// reconciler and webhooks never remove it. Before, it kept its first source, and an empty
/// registry answer removed a store the config declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_takes_over_a_store_it_declares_after_another_source_started_it() {
    use storehost_control::StoreSource;
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["already"], "")).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    let id = StoreId::new("adopted").unwrap();
    let spec = host.orchestrator.settings().defaults.clone();
    host.orchestrator
        .ensure_running(&id, spec, StoreSource::Webhook)
        .await
        .unwrap();
    host.append("adopted", "kv.put", json!({"key": "k", "value": "kept"}))
        .await;
    host.settle("adopted").await;
    let (_, view) = host.get("/v1/stores/adopted").await;
    assert_eq!(view["source"], "webhook");
    assert_eq!(host.orchestrator.registry().all().unwrap().len(), 1);

    std::fs::write(
        &path,
        config_with(
            &["already", "adopted"],
            "[stores.adopted.quotas]\nburst = 77\n",
        ),
    )
    .unwrap();
    eventually("the config owns it", || async {
        host.get("/v1/stores/adopted").await.1["source"] == "config"
    })
    .await;
    let (_, view) = host.get("/v1/stores/adopted").await;
    assert_eq!(view["quotas"]["burst"], 77, "{view}");
    assert!(
        host.orchestrator.registry().all().unwrap().is_empty(),
        "host.db keeps no spec of it any more"
    );
    assert_eq!(
        host.query("adopted", "get", json!({"key": "k"})).await["value"],
        "kept",
        "its data stays"
    );
    let refusal = host
        .orchestrator
        .sources()
        .await
        .get(&id)
        .and_then(|source| source.removal_refused(&id, Some(&path)));
    assert!(
        refusal.is_some(),
        "webhooks and the API may not remove it now"
    );
}

/// Stores added at run time (API, webhook, reconciler) take the config's `[defaults]` for
/// what they did not set themselves: an edit of the defaults reaches them live, and what a
/// store set itself stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_the_defaults_reaches_the_stores_added_at_run_time() {
    use storehost_control::StoreSource;
    use storehost_control::config::OwnSettings;
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["declared"], "")).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    // One as a webhook adds it (nothing of its own), one through the API with a quota and a
    // config key of its own.
    let follower = StoreId::new("follower").unwrap();
    host.orchestrator
        .ensure_running(
            &follower,
            host.orchestrator.spec_with(OwnSettings::default()),
            StoreSource::Webhook,
        )
        .await
        .unwrap();
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/chooser",
            Some(json!({"quotas": {"cpu_ms_per_call": 50}, "config": {"MODE": "mine"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let defaults = "[defaults.quotas]\nmemory = \"32MiB\"\ncpu_ms_per_call = 200\n";
    save_by_rename(&path, &config_with(&["declared"], defaults));
    eventually("the new defaults reach the webhook's store", || async {
        host.get("/v1/stores/follower").await.1["quotas"]["memory"] == 32 << 20
    })
    .await;
    let (_, view) = host.get("/v1/stores/follower").await;
    assert_eq!(view["quotas"]["cpu_ms_per_call"], 200, "{view}");
    let (_, view) = host.get("/v1/stores/chooser").await;
    assert_eq!(view["quotas"]["memory"], 32 << 20, "{view}");
    assert_eq!(
        view["quotas"]["cpu_ms_per_call"], 50,
        "its own quota stays: {view}"
    );
    assert_eq!(view["config"]["MODE"], "mine", "{view}");
    assert_eq!(view["source"], "api");

    // A store added after the edit starts on the new defaults, and host.db keeps only what
    // each store set itself, so a start with other defaults gives it those.
    let (status, body) = host
        .call(reqwest::Method::PUT, "/v1/stores/late", Some(json!({})))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["quotas"]["memory"], 32 << 20, "{body}");
    let persisted = host.orchestrator.registry().all().unwrap();
    let own_of = |id: &str| {
        persisted
            .iter()
            .find(|(store, _, _)| store.as_str() == id)
            .and_then(|(_, _, spec)| spec.own.clone())
            .unwrap()
    };
    assert!(own_of("follower").quotas.is_empty());
    assert_eq!(
        own_of("chooser").quotas.keys().collect::<Vec<_>>(),
        ["cpu_ms_per_call"]
    );
}

/// A config naming the plugin `swap` at `plugin`, run by the store `on-swap`.
fn swap_config(plugin: &Path) -> String {
    config_with(
        &[],
        &format!("[plugins.swap]\npath = {plugin:?}\n[stores.on-swap]\nplugin = \"swap\"\n"),
    )
}

/// A plugin directory removed and made again (`rm -rf plugins && mkdir plugins`, then the
/// plugin written into it) is watched again: the plugin written at once is deployed, so is one
/// written after a pause, and so is the next rewrite in place. Before, the watch ended with
/// the first directory and nothing written into the new one was seen until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_directory_removed_and_made_again_is_watched_again() {
    let (_dir, path) = config_file();
    let elsewhere = tempfile::tempdir().unwrap();
    let plugins = elsewhere.path().join("plugins");
    let plugin = plugins.join("swap.wasm");
    std::fs::create_dir(&plugins).unwrap();
    let writer = std::fs::read(programs::WRITER).unwrap();
    std::fs::write(&plugin, &writer).unwrap();
    std::fs::write(&path, swap_config(&plugin)).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    assert_eq!(store_sha(host).await, storehost_tests::sha256sum(&writer));

    let deployed = |note: &str| {
        let bytes = storehost_tests::with_custom_section(&writer, note);
        (storehost_tests::sha256sum(&bytes), bytes)
    };
    let (first_sha, first) = deployed("first");
    std::fs::remove_dir_all(&plugins).unwrap();
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(&plugin, &first).unwrap();
    eventually(
        "the plugin written into the new directory is deployed",
        || async { store_sha(host).await == first_sha },
    )
    .await;

    // Removed, and made again once the host has seen it gone; the plugin comes later still.
    let (second_sha, second) = deployed("second");
    std::fs::remove_dir_all(&plugins).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    std::fs::create_dir(&plugins).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    std::fs::write(&plugin, &second).unwrap();
    eventually("the plugin written after a pause is deployed", || async {
        store_sha(host).await == second_sha
    })
    .await;

    let (third_sha, third) = deployed("third");
    std::fs::write(&plugin, &third).unwrap();
    eventually("the plugin rewritten in place is deployed", || async {
        store_sha(host).await == third_sha
    })
    .await;
    eventually("the error of the missing plugin clears", || async {
        health(host).await["config"]["lastError"].is_null()
    })
    .await;
}

/// The config file deleted and written again applies, and so does one written into its
/// directory removed and made again, at once or after a pause: the watch outlives both.
/// While the file is missing `/health` says so and the last good config keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_deleted_or_its_directory_made_again_is_still_watched() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("conf");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("storehost.toml");
    std::fs::write(&path, config_with(&["first"], "")).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    let missing = || async {
        health(host).await["config"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read the config file"))
    };

    std::fs::remove_file(&path).unwrap();
    eventually("the missing config is reported", missing).await;
    assert_eq!(ids(host).await, ["first"], "the last good config runs on");
    std::fs::write(&path, config_with(&["second"], "")).unwrap();
    eventually("the config written again applies", || async {
        ids(host).await == ["second"]
    })
    .await;

    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(&path, config_with(&["third"], "")).unwrap();
    eventually("the config in the directory made again applies", || async {
        ids(host).await == ["third"]
    })
    .await;

    std::fs::remove_dir_all(&dir).unwrap();
    eventually("the removed directory is reported", missing).await;
    std::fs::create_dir(&dir).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    save_by_rename(&path, &config_with(&["fourth"], ""));
    eventually("the config written after a pause applies", || async {
        ids(host).await == ["fourth"] && health(host).await["config"]["lastError"].is_null()
    })
    .await;
}

/// A plugin file changed in a directory an edit names for the first time, after the reload
/// read it but before the watch on that directory began, is not missed: once the directory
/// is watched its plugin files are read again and the changed one is deployed. The test
/// writes the file right after the host's read, inside that window; before, the change was
/// seen only at the file's next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_changed_before_its_new_directory_is_watched_is_deployed() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["base"], "")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let late = elsewhere.path().join("later").join("late.wasm");
    std::fs::create_dir(late.parent().unwrap()).unwrap();
    std::fs::write(&late, std::fs::read(programs::WRITER).unwrap()).unwrap();
    let flaky = std::fs::read(programs::FLAKY).unwrap();
    let flaky_sha = storehost_tests::sha256sum(&flaky);
    let raced = std::sync::atomic::AtomicBool::new(false);
    let target = late.clone();
    let after_read: AfterPluginRead = std::sync::Arc::new(move |read: &Path| {
        if read == target && !raced.swap(true, std::sync::atomic::Ordering::Relaxed) {
            std::fs::write(read, &flaky).unwrap();
        }
    });
    let w = watched_after_reads(&path, 10, after_read).await;
    let host = &w.host;

    save_by_rename(
        &path,
        &config_with(
            &["base"],
            &format!("[plugins.late]\npath = {late:?}\n[stores.on-late]\nplugin = \"late\"\n"),
        ),
    );
    eventually(
        "the version written during the reload is deployed",
        || async { store_sha_of(host, "on-late").await == flaky_sha },
    )
    .await;
}

/// A directory no longer named by the config is no longer watched: once an edit drops the
/// last plugin in it, the watch is on the config's directory and the other plugins' again,
/// and writes there read nothing. Before, each directory a config had ever named stayed
/// watched until the host stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_directory_the_config_no_longer_names_is_unwatched() {
    let (_dir, path) = config_file();
    std::fs::write(&path, config_with(&["base"], "")).unwrap();
    let w = watched(&path, 10).await;
    let host = &w.host;
    let at_start = w.watched_directories();
    assert_eq!(
        at_start.len(),
        2,
        "the config's and the writer's: {at_start:?}"
    );

    let elsewhere = tempfile::tempdir().unwrap();
    let later = elsewhere.path().join("later");
    let late = later.join("late.wasm");
    std::fs::create_dir(&later).unwrap();
    std::fs::write(&late, std::fs::read(programs::WRITER).unwrap()).unwrap();
    let later = std::fs::canonicalize(&later).unwrap();
    save_by_rename(
        &path,
        &config_with(
            &["base"],
            &format!("[plugins.late]\npath = {late:?}\n[stores.on-late]\nplugin = \"late\"\n"),
        ),
    );
    eventually("the new plugin's directory is watched", || async {
        w.watched_directories().contains(&later)
    })
    .await;

    save_by_rename(&path, &config_with(&["base"], ""));
    eventually("the edit removes the plugin's store", || async {
        ids(host).await == ["base"]
    })
    .await;
    eventually("the directory named no more is not watched", || async {
        w.watched_directories() == at_start
    })
    .await;
}

/// A config edit and a plugin file rewritten while the host starts its stores (after it read
/// the config, before its watch began) are applied once the watch begins. Before, the
/// reloader took the file as it was when the watch was set up for what ran, so the edit
/// counted as applied until the next one, and the plugin ran its old version until its file
/// was written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_saved_while_the_host_starts_are_applied_once_the_watch_begins() {
    let (dir, path) = config_file();
    let plugin = dir.path().join("plugins").join("writer.wasm");
    std::fs::create_dir_all(plugin.parent().unwrap()).unwrap();
    std::fs::write(&plugin, std::fs::read(programs::WRITER).unwrap()).unwrap();
    let config = |stores: &str| {
        format!(
            "[plugins.writer]\npath = \"plugins/writer.wasm\"\n[defaults]\nplugin = \"writer\"\n{stores}"
        )
    };
    std::fs::write(&path, config("[stores.first]\n")).unwrap();
    let (edited, rewritten) = (path.clone(), plugin.clone());
    let edit = config("[stores.first]\n[stores.second]\n");
    let w = storehost_tests::control::watched_edited_during_start(
        &path,
        100,
        Box::new(move || {
            std::fs::write(&edited, edit).unwrap();
            std::fs::write(&rewritten, std::fs::read(programs::FLAKY).unwrap()).unwrap();
        }),
    )
    .await;
    let host = &w.host;
    let flaky_sha = storehost_tests::sha256sum(&std::fs::read(programs::FLAKY).unwrap());
    eventually("the edit saved during the start applies", || async {
        ids(host).await == ["first", "second"]
    })
    .await;
    eventually(
        "the plugin rewritten during the start is deployed",
        || async { store_sha_of(host, "first").await == flaky_sha },
    )
    .await;
}

/// Opens `path` truncated, as `cat > FILE` does, and writes `parts` to it one by one, `pause`
/// apart: a paste into `cat`, or a script's `echo … >` then `>>`.
async fn write_in_steps(path: &Path, parts: &[&str], pause: std::time::Duration) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        file.write_all(part.as_bytes()).unwrap();
        file.flush().unwrap();
    }
}

/// What `DATA_DIR/archive` holds (nothing when it does not exist).
fn archived(host: &TestHost) -> Vec<String> {
    match std::fs::read_dir(host.data_dir.join("archive")) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => panic!("cannot list the archive: {err}"),
    }
}

/// Four config stores, each with an event, and a token of the last one.
async fn four_stores_with_events(host: &TestHost, stores: &[&str; 4]) -> String {
    for id in stores {
        host.append(id, "kv.put", json!({"key": "k", "value": id}))
            .await;
        host.settle(id).await;
    }
    host.issue_token(stores[3]).await.0
}

/// Every store of `stores` runs with the event [`four_stores_with_events`] gave it, and
/// `token` still reads the last one's events: nothing was archived, emptied or revoked.
async fn still_whole(host: &TestHost, stores: &[&str; 4], token: &str) {
    assert_eq!(archived(host), Vec::<String>::new(), "nothing is archived");
    for id in stores {
        assert_eq!(
            host.query(id, "get", json!({"key": "k"})).await["value"],
            *id,
            "store {id} keeps its data"
        );
    }
    let response = host
        .client
        .get(format!(
            "{}/v1/stores/{}/events?after=0",
            host.url, stores[3]
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "the store token still works: {body}");
    assert_eq!(body["events"].as_array().map(Vec::len), Some(1), "{body}");
}

/// A config written in two steps 150 ms apart (helper 57 finding 2): the debounced event comes
/// about 100 ms after the first, whose content (valid TOML, one store fewer) was applied and
/// archived that store; the second step brought it back empty. An edit applies once the file
/// has stayed the same for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_written_in_steps_applies_once_it_stops_changing() {
    let (_dir, path) = config_file();
    let stores = ["step-one", "step-two", "step-three", "step-four"];
    std::fs::write(&path, config_with(&stores, "")).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    let token = four_stores_with_events(host, &stores).await;

    // The first step lacks step-four (one store of four: no mass removal); the second adds
    // step-five, to tell when the whole file applied.
    let whole = config_with(
        &[
            "step-one",
            "step-two",
            "step-three",
            "step-four",
            "step-five",
        ],
        "",
    );
    let (first, rest) = whole.split_at(whole.find("[stores.step-four]").unwrap());
    write_in_steps(&path, &[first, rest], std::time::Duration::from_millis(150)).await;
    eventually("the whole file applies", || async {
        ids(host).await.contains(&"step-five".to_owned())
    })
    .await;
    still_whole(host, &stores, &token).await;
    assert!(health(host).await["config"]["lastError"].is_null());
}

/// A config truncated and written again with a pause longer than a reload waits for the file
/// to settle (helper 57 finding 2): its first part, declaring one store of four, would remove
/// the other three. Removing more than half of the config's stores at once is held back, as
/// at start, so nothing is archived, no data lost, no token revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_cut_short_for_a_while_archives_none_of_its_stores() {
    let (_dir, path) = config_file();
    let stores = ["cut-one", "cut-two", "cut-three", "cut-four"];
    std::fs::write(&path, config_with(&stores, "")).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    let token = four_stores_with_events(host, &stores).await;

    let whole = config_with(
        &["cut-one", "cut-two", "cut-three", "cut-four", "cut-five"],
        "",
    );
    let (first, rest) = whole.split_at(whole.find("[stores.cut-two]").unwrap());
    write_in_steps(&path, &[first, rest], std::time::Duration::from_millis(400)).await;
    eventually("the whole file applies", || async {
        ids(host).await.contains(&"cut-five".to_owned())
            && health(host).await["config"]["lastError"].is_null()
    })
    .await;
    still_whole(host, &stores, &token).await;
}

/// An edit that removes three of the config's four stores (helper 57 finding 2) holds those
/// removals back: they keep running, the rest of the edit applies, `/health` names them and
/// says how to confirm; saving the file again as it is (a `touch`) removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_removing_most_stores_is_held_until_the_file_is_saved_again() {
    let (_dir, path) = config_file();
    let stores = ["most-one", "most-two", "most-three", "most-four"];
    std::fs::write(&path, config_with(&stores, "")).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    let token = four_stores_with_events(host, &stores).await;

    save_by_rename(&path, &config_with(&["most-one", "most-new"], ""));
    eventually("the held removals are reported", || async {
        health(host).await["config"]["lastError"].is_string()
    })
    .await;
    let error = health(host).await["config"]["lastError"]
        .as_str()
        .unwrap()
        .to_owned();
    for held in ["most-two", "most-three", "most-four"] {
        assert!(error.contains(held), "names {held}: {error}");
    }
    assert!(
        error.contains("3 of the 4 stores") && error.contains(&format!("touch {}", path.display())),
        "says how many and how to confirm: {error}"
    );
    assert_eq!(
        ids(host).await,
        [
            "most-four",
            "most-new",
            "most-one",
            "most-three",
            "most-two"
        ],
        "the rest of the edit applied"
    );
    still_whole(host, &stores, &token).await;
    // Events of the same save seen late are no confirmation.
    assert_eq!(w.reloader.reload().await, ReloadOutcome::Unchanged);
    assert_eq!(ids(host).await.len(), 5);

    // Saved again as it is: confirmed.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(1))
        .unwrap();
    eventually("the confirmed removals apply", || async {
        ids(host).await == ["most-new", "most-one"]
    })
    .await;
    // A removed store leaves the list before its files reach the archive.
    eventually("their data reaches the archive", || async {
        archived(host).len() >= 3
    })
    .await;
    assert_eq!(archived(host).len(), 3, "their data is archived");
    assert!(health(host).await["config"]["lastError"].is_null());
}

/// Polls `check` for at most `within`: whether it came to hold. Shorter than the watch's
/// periodic look, so only an event the watch saw can make it hold.
async fn within<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check().await
}

/// Writes `text` into a new directory `name` of `dir` and points `dir/..data` at it, as the
/// kubelet updates a ConfigMap volume: `..data_tmp` made, renamed over `..data`, the old
/// directory removed.
fn kubelet_update(dir: &Path, name: &str, text: &str) {
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::create_dir(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("storehost.toml"), text).unwrap();
    std::os::unix::fs::symlink(name, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// A config mounted from a Kubernetes ConfigMap (helper 57 finding 1): `storehost.toml ->
/// ..data/storehost.toml`, `..data -> ..2024_A`. An update renames a new `..data` over the old
/// one and removes the old directory; the file's own link never changes. Before, the watch
/// matched no event of that and kept watching the removed directory: no update applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_by_symlink_swap_applies() {
    let dir = tempfile::tempdir().unwrap();
    kubelet_update(dir.path(), "..2024_A", &config_with(&["map-one"], ""));
    std::os::unix::fs::symlink("..data/storehost.toml", dir.path().join("storehost.toml")).unwrap();
    let path = dir.path().join("storehost.toml");
    let w = watched(&path, 100).await;
    let host = &w.host;
    // The watch looks at the file once as it begins: the change below is to come after.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    kubelet_update(
        dir.path(),
        "..2024_B",
        &config_with(&["map-one", "map-two"], ""),
    );
    assert!(
        within(std::time::Duration::from_secs(3), || async {
            ids(host).await == ["map-one", "map-two"]
        })
        .await,
        "the ConfigMap update applies; stores: {:?}",
        ids(host).await
    );
    // The watch follows the new directory: the next update applies too.
    kubelet_update(
        dir.path(),
        "..2024_C",
        &config_with(&["map-one", "map-two", "map-three"], ""),
    );
    assert!(
        within(std::time::Duration::from_secs(3), || async {
            ids(host).await.len() == 3
        })
        .await,
        "the second update applies; stores: {:?}",
        ids(host).await
    );
    assert!(health(host).await["config"]["lastError"].is_null());
}

/// A config in a directory reached through a link a deploy flips (`ln -sfn releases/43
/// current`, a new link renamed over the old) (helper 57 finding 1): the path leads to
/// another file, in a directory the watch did not watch. Before, nothing applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_directory_link_flipped_by_a_deploy_applies() {
    let root = tempfile::tempdir().unwrap();
    for (release, stores) in [
        ("42", &["rel-one"][..]),
        ("43", &["rel-one", "rel-two"][..]),
    ] {
        let release = root.path().join("releases").join(release);
        std::fs::create_dir_all(&release).unwrap();
        std::fs::write(release.join("storehost.toml"), config_with(stores, "")).unwrap();
    }
    std::os::unix::fs::symlink("releases/42", root.path().join("current")).unwrap();
    let path = root.path().join("current").join("storehost.toml");
    let w = watched(&path, 100).await;
    let host = &w.host;
    // The watch looks at the file once as it begins: the change below is to come after.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    std::os::unix::fs::symlink("releases/43", root.path().join("current.new")).unwrap();
    std::fs::rename(root.path().join("current.new"), root.path().join("current")).unwrap();
    assert!(
        within(std::time::Duration::from_secs(3), || async {
            ids(host).await == ["rel-one", "rel-two"]
        })
        .await,
        "the flipped release's config applies; stores: {:?}",
        ids(host).await
    );
}

/// A change no watched directory reports (helper 57 finding 1's fallback): the file written
/// in place through a hard link in another directory, whose events go to that directory
/// only. The watch's periodic look finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_watch_does_not_see_is_found_by_its_periodic_look() {
    let (dir, path) = config_file();
    std::fs::write(&path, config_with(&["seen-one"], "")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let alias = elsewhere.path().join("alias.toml");
    std::fs::hard_link(&path, &alias).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    // The watch looks at the file once as it begins: the change below is to come after.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    std::fs::write(&alias, config_with(&["seen-one", "seen-two"], "")).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        config_with(&["seen-one", "seen-two"], ""),
        "the same file"
    );
    assert!(
        within(std::time::Duration::from_secs(15), || async {
            ids(host).await == ["seen-one", "seen-two"]
        })
        .await,
        "the periodic look applies it; stores: {:?}",
        ids(host).await
    );
    drop(dir);
}
