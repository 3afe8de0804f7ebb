//! A plugin deploy racing a store's removal, run many times on a real host on a real port:
//! `PUT /v1/plugins/{name}` or a plugin file rewritten under the config watch, at the same time
//! as `DELETE /v1/stores/{id}`, a `workspace.deleted` webhook or a config edit dropping the
//! store. Whatever the order the two take, the removed store is gone (404, not listed, no
//! sandbox, its directory archived, not restored by a restart), every answer is one the API
//! documents, and each store that stays runs the version deployed last: its `sha256` and its
//! behaviour (the two versions answer a query differently).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use storehost_store::StoreId;
use storehost_tests::control::{ControlHostOptions, Watched, watched};
use storehost_tests::{TestHost, programs, sha256sum};

/// Deploy and removal raced this many times per test.
const ROUNDS: usize = 24;

const SECRET: &str = "whsec_ZGVwbG95LXJhY2VzLXNlY3JldA==";

/// The two versions a deploy alternates between: `writer` answers `count` with its counts,
/// `trivial` answers every query with `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Writer,
    Trivial,
}

impl Version {
    fn of_round(round: usize) -> Self {
        if round.is_multiple_of(2) {
            Version::Trivial
        } else {
            Version::Writer
        }
    }

    fn bytes(self) -> Vec<u8> {
        std::fs::read(match self {
            Version::Writer => programs::WRITER,
            Version::Trivial => programs::TRIVIAL,
        })
        .unwrap()
    }
}

/// Holds one side of round `round`'s race back by 0 to 8 ms, the deploy in even rounds and the
/// removal in odd ones, so both orders (and overlaps) occur: a deploy loads its plugin before it
/// takes the change lock, and otherwise the removal would nearly always get there first. Only
/// the schedule depends on it; no assertion does.
async fn stagger(round: usize, deploy_side: bool) {
    if round.is_multiple_of(2) == deploy_side {
        tokio::time::sleep(Duration::from_millis(2 * (round as u64 / 2 % 5))).await;
    }
}

/// Which version store `id` runs, by how it answers the `count` query (asked after the deploy
/// answered: a query goes after the switch the deploy asked the store for).
async fn behaviour(host: &TestHost, id: &str) -> Version {
    let answer = host.query(id, "count", json!({})).await;
    if answer.get("kv").is_some() {
        Version::Writer
    } else {
        assert_eq!(answer, json!({}), "neither version answers so: {answer}");
        Version::Trivial
    }
}

async fn delete_store(host: &TestHost, id: &str) -> (u16, Value) {
    host.call(reqwest::Method::DELETE, &format!("/v1/stores/{id}"), None)
        .await
}

async fn webhook(host: &TestHost, event: &str, id: &str) -> (u16, Value) {
    let body = json!({"event": event, "instanceId": id, "userId": "user-1",
        "timestamp": "2026-01-01T00:00:00Z"});
    let response = host
        .client
        .post(format!("{}/webhooks/workspaces", host.url))
        .header("x-webhook-secret", SECRET)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn with_webhooks(
    orchestrator: &Arc<storehost_control::Orchestrator>,
    state: storehost_api::AppState,
) -> storehost_api::AppState {
    storehost_tests::control::with_webhooks(orchestrator, state, SECRET, 10_000)
}

/// A deploy's answer: 200 with the version's sha256.
fn assert_deployed(round: usize, (status, body): &(u16, Value), version: Version) {
    assert_eq!(*status, 200, "round {round}: the deploy answered {body}");
    assert_eq!(
        body["sha256"],
        sha256sum(&version.bytes()),
        "round {round}: {body}"
    );
}

/// Store `id` is gone the way a user sees it and the host keeps it: 404, not listed, not
/// failed, no store handle, its directory archived.
async fn assert_removed(host: &TestHost, round: usize, id: &str) {
    let (status, body) = host.get(&format!("/v1/stores/{id}")).await;
    assert_eq!(
        status, 404,
        "round {round}: removed store {id} answers {body}"
    );
    let (_, list) = host.get("/v1/stores").await;
    let listed = |key: &str| {
        list[key]
            .as_array()
            .unwrap()
            .iter()
            .any(|store| store["id"] == id)
    };
    assert!(
        !listed("stores") && !listed("failed"),
        "round {round}: {id} still listed: {list}"
    );
    assert!(
        host.orchestrator
            .get(&StoreId::new(id).unwrap())
            .await
            .is_none(),
        "round {round}: {id} still runs"
    );
    assert!(
        !host.data_dir.join("stores").join(id).exists(),
        "round {round}: {id}'s directory was left in place"
    );
    assert_eq!(
        archived(&host.data_dir, id),
        1,
        "round {round}: {id} archived once"
    );
}

/// How many archives of store `id` the data directory holds.
fn archived(data_dir: &Path, id: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(data_dir.join("archive")) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .strip_prefix(&format!("{id}-"))
                // `<millis>`, or `<millis>-<n>` for a second archive in the same millisecond.
                .is_some_and(|rest| {
                    let numbers: Vec<&str> = rest.split('-').collect();
                    numbers.len() <= 2
                        && numbers
                            .iter()
                            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                })
        })
        .count()
}

/// Store `kept` runs `version`: the API shows its sha256, and it behaves as it.
async fn assert_runs(host: &TestHost, round: usize, kept: &str, version: Version) {
    let (status, view) = host.get(&format!("/v1/stores/{kept}")).await;
    assert_eq!(status, 200, "round {round}: {view}");
    assert_eq!(
        view["plugin"]["sha256"],
        sha256sum(&version.bytes()),
        "round {round}: {kept} shows another version: {view}"
    );
    assert_eq!(
        behaviour(host, kept).await,
        version,
        "round {round}: {kept} does not run the version deployed last"
    );
}

/// No more sandboxes live than stores that run: a removed store's is gone.
async fn assert_no_sandbox_left(host: &TestHost) {
    let running = host.orchestrator.len().await;
    let (live, _) = host.orchestrator.runtime().sandbox_slots();
    assert!(
        live <= running,
        "{live} sandboxes live for {running} running stores"
    );
}

/// Adds API store `id` on `plugin` with an event processed, so it has files and a sandbox.
async fn add_busy_store(host: &TestHost, id: &str, plugin: &str) {
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            &format!("/v1/stores/{id}"),
            Some(json!({"plugin": plugin})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    host.append(id, "kv.put", json!({"key": "k", "value": 1}))
        .await;
    host.settle(id).await;
    // One more in flight (or queued) while the race runs.
    host.append(id, "kv.put", json!({"key": "k", "value": 2}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_deploy_racing_an_api_delete_removes_the_store_and_switches_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let options = ControlHostOptions {
        data_dir: Some(dir.path().join("data")),
        ..ControlHostOptions::default()
    };
    let host = TestHost::start_control(options.clone(), |_, state| state).await;
    let (status, body) = host.upload_plugin("raced", Version::Writer.bytes()).await;
    assert_eq!(status, 201, "{body}");
    add_busy_store(&host, "kept", "raced").await;

    let mut last = Version::Writer;
    for round in 0..ROUNDS {
        let gone = format!("gone-{round}");
        add_busy_store(&host, &gone, "raced").await;
        let version = Version::of_round(round);
        let (deployed, deleted) = tokio::join!(
            async {
                stagger(round, true).await;
                host.upload_plugin("raced", version.bytes()).await
            },
            async {
                stagger(round, false).await;
                delete_store(&host, &gone).await
            }
        );
        assert_deployed(round, &deployed, version);
        assert_eq!(deleted.0, 200, "round {round}: {}", deleted.1);
        assert_eq!(deleted.1["status"], "removed", "round {round}");
        assert_removed(&host, round, &gone).await;
        assert_runs(&host, round, "kept", version).await;
        last = version;
    }
    assert_no_sandbox_left(&host).await;
    let (_, list) = host.get("/v1/stores").await;
    assert_eq!(list["stores"].as_array().unwrap().len(), 1, "{list}");

    // A restart brings back the store that stayed, on the version deployed last, and none of
    // the removed ones.
    host.stop().await;
    let host = TestHost::start_control(options, |_, state| state).await;
    assert_eq!(host.orchestrator.restore_persisted().await.unwrap(), 1);
    assert_eq!(
        host.orchestrator.ids().await,
        [StoreId::new("kept").unwrap()]
    );
    assert_runs(&host, ROUNDS, "kept", last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_deploy_racing_a_workspace_deleted_webhook_removes_the_store() {
    let host = TestHost::start_control(ControlHostOptions::default(), with_webhooks).await;
    // Webhook stores run the default plugin, `writer`: the deploys replace it.
    let (status, body) = webhook(&host, "workspace.created", "kept-ws").await;
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("monitoring_started"))
    );

    for round in 0..ROUNDS {
        let gone = format!("gone-ws-{round}");
        let (status, body) = webhook(&host, "workspace.created", &gone).await;
        assert_eq!(status, 200, "round {round}: {body}");
        host.append(&gone, "kv.put", json!({"key": "k", "value": 1}))
            .await;
        let version = Version::of_round(round);
        let (deployed, deleted) = tokio::join!(
            async {
                stagger(round, true).await;
                host.upload_plugin("writer", version.bytes()).await
            },
            async {
                stagger(round, false).await;
                webhook(&host, "workspace.deleted", &gone).await
            }
        );
        assert_deployed(round, &deployed, version);
        assert_eq!(
            (deleted.0, &deleted.1["status"]),
            (200, &json!("monitoring_stopped")),
            "round {round}: {}",
            deleted.1
        );
        assert_removed(&host, round, &gone).await;
        assert_runs(&host, round, "kept-ws", version).await;
    }
    assert_no_sandbox_left(&host).await;
}

/// A config running plugin `writer` from `plugin` (its defaults: API and webhook stores run it
/// too) and declaring `stores`.
fn config(plugin: &Path, stores: &[&str]) -> String {
    let mut text = storehost_tests::writer_config(plugin, stores);
    text.insert_str(0, "max_stores = 100\n");
    text
}

/// Replaces `path`'s content at once (a rename), so no read sees it half written.
fn replace(path: &Path, bytes: &[u8]) {
    let temp = path.with_extension("new");
    std::fs::write(&temp, bytes).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

fn config_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storehost.toml");
    let plugin = dir.path().join("writer.wasm");
    std::fs::write(&plugin, Version::Writer.bytes()).unwrap();
    (dir, path, plugin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_rewritten_racing_an_api_delete_removes_the_store_and_switches_the_others() {
    let (_dir, path, plugin) = config_dir();
    std::fs::write(&path, config(&plugin, &["kept-cfg"])).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;
    add_busy_store(host, "kept-api", "writer").await;

    for round in 0..ROUNDS {
        let gone = format!("gone-{round}");
        add_busy_store(host, &gone, "writer").await;
        let version = Version::of_round(round);
        // The watch reacts to the write; the refresh asked here races the delete for sure
        // (whichever of the two reads the file first deploys it).
        replace(&plugin, &version.bytes());
        let (_, deleted) = tokio::join!(
            async {
                stagger(round, true).await;
                w.reloader.refresh_plugins().await
            },
            async {
                stagger(round, false).await;
                delete_store(host, &gone).await
            }
        );
        assert_eq!(deleted.0, 200, "round {round}: {}", deleted.1);
        assert_removed(host, round, &gone).await;
        for kept in ["kept-cfg", "kept-api"] {
            assert_runs(host, round, kept, version).await;
        }
        let (_, health) = host.get("/health").await;
        assert!(
            health["config"]["lastError"].is_null(),
            "round {round}: {health}"
        );
    }
    assert_no_sandbox_left(host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_rewritten_racing_a_workspace_deleted_webhook_removes_the_store() {
    let (_dir, path, plugin) = config_dir();
    std::fs::write(&path, config(&plugin, &["kept-cfg"])).unwrap();
    let options = ControlHostOptions {
        max_stores: 100,
        ..ControlHostOptions::default()
    };
    let (w, failed) = storehost_tests::control::watched_with(&path, options, with_webhooks).await;
    assert!(failed.is_empty(), "{failed:?}");
    let host = &w.host;

    for round in 0..ROUNDS {
        let gone = format!("gone-ws-{round}");
        let (status, body) = webhook(host, "workspace.created", &gone).await;
        assert_eq!(status, 200, "round {round}: {body}");
        host.append(&gone, "kv.put", json!({"key": "k", "value": 1}))
            .await;
        let version = Version::of_round(round);
        replace(&plugin, &version.bytes());
        let (_, deleted) = tokio::join!(
            async {
                stagger(round, true).await;
                w.reloader.refresh_plugins().await
            },
            async {
                stagger(round, false).await;
                webhook(host, "workspace.deleted", &gone).await
            }
        );
        assert_eq!(
            (deleted.0, &deleted.1["status"]),
            (200, &json!("monitoring_stopped")),
            "round {round}: {}",
            deleted.1
        );
        assert_removed(host, round, &gone).await;
        assert_runs(host, round, "kept-cfg", version).await;
    }
    assert_no_sandbox_left(host).await;
}

/// Declares the store `gone-{round}` beside `kept-cfg` in the config at `path`, and waits until
/// it runs and holds an event; answers its id.
async fn declare_busy_store(w: &Watched, path: &Path, plugin: &Path, round: usize) -> String {
    let gone = format!("gone-{round}");
    replace(path, config(plugin, &["kept-cfg", &gone]).as_bytes());
    w.reloader.reload().await;
    w.host
        .wait_for_status(&gone, |view| view["state"] == "running")
        .await;
    w.host
        .append(&gone, "kv.put", json!({"key": "k", "value": 1}))
        .await;
    gone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_rewritten_with_an_edit_dropping_a_store_removes_it_and_switches_the_others()
{
    let (_dir, path, plugin) = config_dir();
    std::fs::write(&path, config(&plugin, &["kept-cfg"])).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;

    for round in 0..ROUNDS {
        let gone = declare_busy_store(&w, &path, &plugin, round).await;
        let version = Version::of_round(round);
        // The plugin file and the config change together; the watch and the reloads asked
        // here see them in either order.
        let (..) = tokio::join!(
            async {
                stagger(round, true).await;
                replace(&plugin, &version.bytes());
                w.reloader.refresh_plugins().await
            },
            async {
                stagger(round, false).await;
                replace(&path, config(&plugin, &["kept-cfg"]).as_bytes());
                w.reloader.reload().await
            }
        );
        // Both files were read after they were written: a last look applies what is left.
        w.reloader.reload().await;
        w.reloader.refresh_plugins().await;
        assert_removed(host, round, &gone).await;
        assert_runs(host, round, "kept-cfg", version).await;
    }
    assert_no_sandbox_left(host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_deploy_racing_an_edit_dropping_a_store_removes_it_and_the_upload_runs() {
    let (_dir, path, plugin) = config_dir();
    std::fs::write(&path, config(&plugin, &["kept-cfg"])).unwrap();
    let w = watched(&path, 100).await;
    let host = &w.host;

    for round in 0..ROUNDS {
        let gone = declare_busy_store(&w, &path, &plugin, round).await;
        let version = Version::of_round(round);
        replace(&path, config(&plugin, &["kept-cfg"]).as_bytes());
        let (deployed, _) = tokio::join!(
            async {
                stagger(round, true).await;
                host.upload_plugin("writer", version.bytes()).await
            },
            async {
                stagger(round, false).await;
                w.reloader.reload().await
            }
        );
        assert_deployed(round, &deployed, version);
        assert_removed(host, round, &gone).await;
        // An upload runs until the plugin's file changes (it does not here): the edit's
        // reload leaves it running.
        assert_runs(host, round, "kept-cfg", version).await;
    }
    assert_no_sandbox_left(host).await;
}

/// The same version uploaded twice at once (a deploy retried while the first is under way):
/// both are answered 2xx, and the one file kept for it holds its bytes. Before, both wrote one
/// temporary file, and the second's rename found it gone: a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_version_uploaded_twice_at_once_is_deployed_for_both() {
    let host = TestHost::start_control(ControlHostOptions::default(), |_, state| state).await;
    add_busy_store(&host, "kept", "writer").await;
    for round in 0..ROUNDS {
        let version = Version::of_round(round);
        let bytes = storehost_tests::with_custom_section(&version.bytes(), &format!("r{round}"));
        let (first, second) = tokio::join!(host.upload_plugin("writer", bytes.clone()), async {
            stagger(round, false).await;
            host.upload_plugin("writer", bytes.clone()).await
        });
        let sha256 = sha256sum(&bytes);
        for (status, body) in [&first, &second] {
            assert_eq!(*status, 200, "round {round}: {body}");
            assert_eq!(body["sha256"], sha256, "round {round}: {body}");
        }
        let kept = host.data_dir.join(format!("plugins/{sha256}.wasm"));
        assert_eq!(std::fs::read(&kept).unwrap(), bytes, "round {round}");
        assert_eq!(behaviour(&host, "kept").await, version, "round {round}");
    }
    let temporary: Vec<_> = std::fs::read_dir(host.data_dir.join("plugins"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(temporary.is_empty(), "temporary files left: {temporary:?}");
}
