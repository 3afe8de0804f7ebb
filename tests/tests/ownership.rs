//! Who owns a store whose start or removal failed, through the real router on a real port:
//! a webhook's refusal of a config store that could not start is not kept for replays; the
//! watched config file dropping such a store removes it, or releases it to the API when its
//! files cannot be moved; the reconciler tries a failed removal again at its next pass. Real
//! files (a regular file where a directory goes is the fault), the real watcher, and a local
//! HTTP server playing the workspace registry.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use storehost_control::config::Secret;
use storehost_control::reconciler::{Reconciler, ReconcilerSettings};
use storehost_control::webhook::signature_header;
use storehost_store::StoreId;
use storehost_tests::control::{
    ControlHostOptions, Watched, eventually, watched_with, with_webhooks,
};
use storehost_tests::{TestHost, programs, writer_config};

const SECRET: &str = "whsec_c2hhcmVkLXNlY3JldC1mb3ItdGVzdHM=";
const BYPASS: &str = "bypass-token-for-tests";

fn id(name: &str) -> StoreId {
    StoreId::new(name).unwrap()
}

/// A config running `stores` on the `writer` plugin.
fn config_text(stores: &[&str]) -> String {
    writer_config(Path::new(programs::WRITER), stores)
}

/// A config file and a data directory in a fresh temporary directory.
fn config_and_data() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storehost.toml");
    let data = dir.path().join("data");
    (dir, path, data)
}

/// Puts a regular file where store `id`'s directory goes: the store cannot open.
fn block_store_dir(data: &Path, id: &str) -> PathBuf {
    let blocked = data.join("stores").join(id);
    std::fs::create_dir_all(blocked.parent().unwrap()).unwrap();
    std::fs::write(&blocked, b"in the way").unwrap();
    blocked
}

/// Puts a regular file where `DATA_DIR/archive` goes: no store's files can be moved there.
fn block_archive(data: &Path) -> PathBuf {
    let archive = data.join("archive");
    let _ = std::fs::remove_dir(&archive);
    std::fs::write(&archive, b"in the way").unwrap();
    archive
}

/// How many archived copies of store `id` `DATA_DIR/archive` holds.
fn archived(data: &Path, id: &str) -> usize {
    std::fs::read_dir(data.join("archive"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{id}-"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// A host watching the config at `path`, on the data directory `data` (made beforehand so a
/// test can break a store's directory before the start), with webhooks. Its config's stores
/// start as `storehost serve` starts them: one that cannot start is a failed store, the others
/// go on.
async fn config_host(path: &Path, data: &Path) -> Watched {
    let options = ControlHostOptions {
        data_dir: Some(data.to_owned()),
        ..ControlHostOptions::default()
    };
    let (watched, failed) = watched_with(path, options, |orchestrator, state| {
        with_webhooks(orchestrator, state, SECRET, 10_000)
    })
    .await;
    for (id, err) in failed {
        eprintln!("config store {id} did not start: {err}");
    }
    watched
}

/// The entry of `GET /v1/stores`'s `failed` for store `id`, if it is listed there.
async fn failed_entry(host: &TestHost, id: &str) -> Option<Value> {
    let (status, body) = host.get("/v1/stores").await;
    assert_eq!(status, 200, "{body}");
    body["failed"]
        .as_array()
        .expect("a failed list")
        .iter()
        .find(|entry| entry["id"] == id)
        .cloned()
}

fn event(event: &str, id: &str) -> String {
    json!({"event": event, "instanceId": id, "userId": "user-1", "timestamp": "2026-01-01T00:00:00Z"})
        .to_string()
}

/// Standard Webhooks headers of delivery `webhook_id` of `body`, signed now.
fn signed(webhook_id: &str, body: &str) -> Vec<(&'static str, String)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let timestamp = now.to_string();
    let signature = signature_header(
        &Secret::new(SECRET),
        webhook_id,
        &timestamp,
        body.as_bytes(),
    );
    vec![
        ("webhook-id", webhook_id.to_owned()),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", signature),
    ]
}

/// `POST /webhooks/workspaces` with `headers` and `body`; answers status and JSON.
async fn webhook(host: &TestHost, headers: &[(&str, String)], body: &str) -> (u16, Value) {
    let mut request = host
        .client
        .post(format!("{}/webhooks/workspaces", host.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A `workspace.created` webhook for a store the config file declares but could not start
/// gets 409 `config_owned` saying why (the config, not the webhook, starts it again), and the
/// store stays the config's. That refusal is not kept for the delivery's `webhook-id`: once
/// the config's store runs, the provisioning service's retry of the same delivery gets
/// `already_monitored` — not the stored 409 for as long as replay answers are kept — and that
/// answer is the one kept from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_for_a_config_store_that_failed_to_start_gets_a_409_that_replays_do_not_keep() {
    let (_dir, path, data) = config_and_data();
    std::fs::write(&path, config_text(&["cfg-blocked"])).unwrap();
    let blocked = block_store_dir(&data, "cfg-blocked");
    let c = config_host(&path, &data).await;
    let host = &c.host;
    let failure = failed_entry(host, "cfg-blocked")
        .await
        .expect("its start failed");
    assert_eq!(failure["source"], "config", "{failure}");

    let created = event("workspace.created", "cfg-blocked");
    let delivery = signed("msg-cfg-blocked", &created);
    let (status, answer) = webhook(host, &delivery, &created).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "config_owned", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("config file") && message.contains("its start failed"),
        "says who owns it and why it does not run: {message}"
    );
    let failure = failed_entry(host, "cfg-blocked")
        .await
        .expect("still a failed store");
    assert_eq!(
        failure["source"], "config",
        "not taken over by the webhook: {failure}"
    );

    // The obstacle goes and an edit of the config starts the store.
    std::fs::remove_file(&blocked).unwrap();
    std::fs::write(
        &path,
        format!(
            "{}# edited: cfg-blocked can start\n",
            config_text(&["cfg-blocked"])
        ),
    )
    .unwrap();
    eventually("the config's edit starts the store", || async {
        host.get("/v1/stores/cfg-blocked").await.0 == 200
    })
    .await;

    let (status, answer) = webhook(host, &delivery, &created).await;
    assert_eq!(status, 200, "a fresh answer, not the 409: {answer}");
    assert_eq!(answer["status"], "already_monitored", "{answer}");
    let (_, view) = host.get("/v1/stores/cfg-blocked").await;
    assert_eq!(view["source"], "config", "{view}");
    let (status, again) = webhook(host, &delivery, &created).await;
    assert_eq!(
        (status, &again),
        (200, &answer),
        "the 200 is the answer kept for the delivery"
    );
}

/// A config store whose start failed is removed when the config file drops it: it no longer
/// shows as failed (nor degrades `/health`), nothing of it runs, and what stood in its
/// directory's place is archived. Before, it stayed a failed store "declared in the config
/// file", which no longer declared it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_store_whose_start_failed_is_removed_when_the_config_drops_it() {
    let (_dir, path, data) = config_and_data();
    std::fs::write(&path, config_text(&["cfg-kept", "cfg-broken"])).unwrap();
    let blocked = block_store_dir(&data, "cfg-broken");
    let c = config_host(&path, &data).await;
    let host = &c.host;
    let failure = failed_entry(host, "cfg-broken")
        .await
        .expect("its start failed");
    assert_eq!(failure["source"], "config", "{failure}");
    assert_eq!(host.get("/health").await.1["stores"]["failed"], 1);
    // Its answer says what starts it again: the config, not a PUT (which gets 409).
    let (status, shown) = host.get("/v1/stores/cfg-broken").await;
    assert_eq!(status, 503, "{shown}");
    let message = shown["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("change the config file") && !message.contains("PUT"),
        "{message}"
    );
    // Its tenant routes say the same (they answered 404 "does not exist; create it with PUT").
    let (status, refused) = host
        .post(
            "/v1/stores/cfg-broken/events",
            json!({"type": "kv.put", "payload": {}}),
        )
        .await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"]["code"], "store_failed", "{refused}");

    std::fs::write(&path, config_text(&["cfg-kept"])).unwrap();
    eventually("the edit removes the failed store", || async {
        failed_entry(host, "cfg-broken").await.is_none()
    })
    .await;
    let (status, body) = host.get("/v1/stores/cfg-broken").await;
    assert_eq!(status, 404, "{body}");
    assert!(host.orchestrator.get(&id("cfg-broken")).await.is_none());
    assert_eq!(host.orchestrator.source(&id("cfg-broken")).await, None);
    assert_eq!(host.orchestrator.ids().await, [id("cfg-kept")]);
    assert!(!blocked.exists(), "nothing of it is left in stores/");
    assert_eq!(archived(&data, "cfg-broken"), 1, "moved to the archive");
    let (_, health) = host.get("/health").await;
    assert!(health["stores"]["failed"].is_null(), "{health}");
    assert!(health["config"]["lastError"].is_null(), "{health}");
    assert_eq!(health["status"], "ok", "{health}");
}

/// A config store whose start failed, dropped by the config while its files cannot be moved
/// (a file stands where `DATA_DIR/archive` goes), stays a failed store saying so, and is no
/// longer the config's: the config, which no longer declares it, would never try again, so
/// the API's `DELETE` is not refused with 409 `config_owned`, and once the obstacle is gone
/// it removes the store and archives its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_config_store_whose_removal_fails_is_released_to_the_api() {
    let (_dir, path, data) = config_and_data();
    std::fs::write(&path, config_text(&["cfg-kept", "cfg-stuck"])).unwrap();
    let blocked = block_store_dir(&data, "cfg-stuck");
    let c = config_host(&path, &data).await;
    let host = &c.host;
    assert!(failed_entry(host, "cfg-stuck").await.is_some());
    let archive = block_archive(&data);

    std::fs::write(&path, config_text(&["cfg-kept"])).unwrap();
    eventually(
        "the edit reports the removal it could not finish",
        || async {
            host.get("/health").await.1["config"]["lastError"]
                .as_str()
                .is_some_and(|error| error.contains("cfg-stuck"))
        },
    )
    .await;
    let failure = failed_entry(host, "cfg-stuck")
        .await
        .expect("still known, with why");
    assert!(
        failure["error"]
            .as_str()
            .unwrap()
            .contains("could not be removed"),
        "{failure}"
    );
    assert!(failure["source"].is_null(), "released: {failure}");
    assert!(blocked.exists(), "its files stay where they were");

    // The API may remove it now: while the archive is blocked the removal fails again…
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/cfg-stuck", None)
        .await;
    assert_ne!(status, 409, "not the config's any more: {body}");
    assert!(status >= 500, "{status} {body}");
    assert!(failed_entry(host, "cfg-stuck").await.is_some());

    // …and once it is gone, the DELETE removes it.
    std::fs::remove_file(&archive).unwrap();
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/cfg-stuck", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(failed_entry(host, "cfg-stuck").await.is_none());
    assert_eq!(host.get("/v1/stores/cfg-stuck").await.0, 404);
    assert!(!blocked.exists());
    assert_eq!(archived(&data, "cfg-stuck"), 1, "moved to the archive");
    assert_eq!(host.orchestrator.ids().await, [id("cfg-kept")]);
}

/// What the local registry lists.
type Listed = Arc<Mutex<Vec<String>>>;

/// Starts a local HTTP server playing the workspace registry; answers its URL and its list.
async fn registry(ids: &[&str]) -> (String, Listed) {
    let listed: Listed = Arc::new(Mutex::new(ids.iter().map(|id| (*id).to_owned()).collect()));
    let app = axum::Router::new()
        .route(
            "/internal/workspaces",
            axum::routing::get(
                |axum::extract::State(listed): axum::extract::State<Listed>| async move {
                    let ids = listed.lock().unwrap().clone();
                    let workspaces: Vec<Value> =
                        ids.iter().map(|id| json!({"instanceId": id})).collect();
                    axum::Json(json!({ "workspaces": workspaces }))
                },
            ),
        )
        .with_state(listed.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, listed)
}

/// `POST /admin/reconcile` with `SERVER_BYPASS_TOKEN`; answers status and JSON.
async fn reconcile(host: &TestHost) -> (u16, Value) {
    let response = host
        .client
        .post(format!("{}/admin/reconcile", host.url))
        .header("x-server-token", BYPASS)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The ids of a pass's `failedRemovals`.
fn failed_removals(report: &Value) -> Vec<&str> {
    report["result"]["failedRemovals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["storeId"].as_str().unwrap())
        .collect()
}

/// A store the registry no longer lists whose removal failed (its files could not be moved to
/// the archive) is not forgotten by the reconciler: each later pass tries the removal again,
/// and the first one after the obstacle is gone removes the store and archives its data.
/// Before, a pass looked only at running stores, so the failed one stayed until an operator
/// removed it by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_tries_a_failed_removal_again_at_its_next_pass() {
    let (url, listed) = registry(&["ws-a", "ws-b", "ws-c", "ws-gone"]).await;
    let settings = ReconcilerSettings {
        url,
        token: Some(Secret::new(BYPASS)),
        interval: Duration::from_secs(3600),
        grace_period: Duration::ZERO,
        max_removal_share: 0.5,
        manual_min_interval: Duration::ZERO,
        request_timeout: Duration::from_secs(30),
    };
    let host = TestHost::start_control(ControlHostOptions::default(), |orchestrator, state| {
        state
            .with_reconciler(Reconciler::new(orchestrator.clone(), settings))
            .with_bypass_token(Some(&Secret::new(BYPASS)))
    })
    .await;
    let data = host.data_dir.clone();

    let (status, report) = reconcile(&host).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"]["added"].as_array().unwrap().len(), 4);
    host.append("ws-gone", "kv.put", json!({"key": "k", "value": "kept"}))
        .await;
    host.settle("ws-gone").await;

    let archive = block_archive(&data);
    listed.lock().unwrap().retain(|id| id != "ws-gone");
    let (status, report) = reconcile(&host).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(failed_removals(&report), ["ws-gone"], "{report}");
    assert_eq!(report["result"]["removed"], json!([]), "{report}");
    let failure = failed_entry(&host, "ws-gone")
        .await
        .expect("a failed store, with why");
    assert_eq!(failure["source"], "registry", "{failure}");
    assert!(host.orchestrator.get(&id("ws-gone")).await.is_none());
    assert!(data.join("stores/ws-gone/store.db").exists());

    // The next pass tries again (and fails again while the archive is blocked).
    let (status, report) = reconcile(&host).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        failed_removals(&report),
        ["ws-gone"],
        "tried again: {report}"
    );

    std::fs::remove_file(&archive).unwrap();
    let (status, report) = reconcile(&host).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"]["removed"], json!(["ws-gone"]), "{report}");
    assert_eq!(failed_removals(&report), Vec::<&str>::new(), "{report}");
    assert!(failed_entry(&host, "ws-gone").await.is_none());
    assert_eq!(host.get("/v1/stores/ws-gone").await.0, 404);
    assert!(!data.join("stores/ws-gone").exists());
    assert_eq!(archived(&data, "ws-gone"), 1, "its data is archived");
    assert_eq!(
        host.orchestrator.ids().await,
        [id("ws-a"), id("ws-b"), id("ws-c")]
    );
    let (_, health) = host.get("/health").await;
    assert!(health["stores"]["failed"].is_null(), "{health}");
    assert!(health["reconciler"]["lastError"].is_null(), "{health}");

    // Nothing is left that a later pass would try.
    let (status, report) = reconcile(&host).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["driftCount"], 0, "{report}");
}
