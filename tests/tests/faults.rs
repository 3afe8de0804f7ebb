//! Faults from outside the host, and what a user can rely on through each: a registry that
//! answers garbage or hangs changes nothing and is reported; an LLM endpoint that resets its
//! connections gives that store's agent a classified error while another store is answered; a
//! config file deleted or replaced by something unreadable keeps the last good config running
//! and `/health` says why; a plugin file truncated on disk keeps the previous version; a store
//! whose database file is broken fails at start while the other stores run (real binary); a
//! store out of disk (its quota, or a real filesystem that fills up) fails cleanly and recovers
//! when space returns.
//!
//! (The registry returning 5xx, the LLM hanging, and junk written over a plugin file are in
//! reconciler.rs, agent.rs and config_reload.rs.)

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use storehost_control::config::Secret;
use storehost_control::llm_backend::ServiceBackend;
use storehost_control::reconciler::{Reconciler, ReconcilerSettings};
use storehost_llm::{LlmLimits, LlmService, MaxTokensField, OpenAiConfig, OpenAiProvider};
use storehost_store::{LlmBackend, Quotas};
use storehost_tests::control::{ControlHostOptions, eventually, watched};
use storehost_tests::fs::{Tmpfs, fill};
use storehost_tests::{TestHost, TestHostOptions, programs, writer_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Registry: garbage and hanging.

#[derive(Clone, Copy, PartialEq)]
enum RegistryMode {
    Good,
    ServerErrorHtml,
    GarbageBody,
    WrongShape,
    Hang,
}

async fn fault_registry(ids: &[&str]) -> (String, Arc<Mutex<RegistryMode>>) {
    let mode = Arc::new(Mutex::new(RegistryMode::Good));
    let items: Vec<Value> = ids.iter().map(|id| json!({"instanceId": id})).collect();
    let state = mode.clone();
    let app = axum::Router::new().route(
        "/internal/workspaces",
        get(move || {
            let mode = *state.lock().unwrap();
            let items = items.clone();
            async move {
                let response: Response = match mode {
                    RegistryMode::Good => {
                        axum::Json(json!({ "workspaces": items })).into_response()
                    }
                    RegistryMode::ServerErrorHtml => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "<html><body>Internal Server Error</body></html>",
                    )
                        .into_response(),
                    RegistryMode::GarbageBody => {
                        (StatusCode::OK, "\u{1}\u{2}{\"workspaces\": [trunc").into_response()
                    }
                    RegistryMode::WrongShape => {
                        axum::Json(json!({ "workspaces": "all of them" })).into_response()
                    }
                    RegistryMode::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        StatusCode::OK.into_response()
                    }
                };
                response
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_answering_garbage_or_hanging_changes_nothing_and_is_reported() {
    let (url, mode) = fault_registry(&["reg-a", "reg-b"]).await;
    let settings = ReconcilerSettings {
        url,
        token: Some(Secret::new("registry-token")),
        interval: Duration::from_secs(3600),
        grace_period: Duration::ZERO,
        max_removal_share: 1.0,
        manual_min_interval: Duration::ZERO,
        // The safety net this test relies on: a hanging registry is given up on.
        request_timeout: Duration::from_millis(500),
    };
    let mut reconciler = None;
    let host = TestHost::start_control(ControlHostOptions::default(), |orchestrator, state| {
        let r = Reconciler::new(orchestrator.clone(), settings);
        reconciler = Some(r.clone());
        state.with_reconciler(r)
    })
    .await;
    let reconciler = reconciler.unwrap();
    reconciler
        .run_pass()
        .await
        .expect("the first pass succeeds");
    let running = || async {
        let mut ids: Vec<String> = host
            .orchestrator
            .ids()
            .await
            .iter()
            .map(ToString::to_string)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(running().await, ["reg-a", "reg-b"]);

    let faults = [
        (RegistryMode::ServerErrorHtml, "500 with an HTML page"),
        (
            RegistryMode::GarbageBody,
            "200 with a body that is not JSON",
        ),
        (RegistryMode::WrongShape, "200 with JSON of the wrong shape"),
        (RegistryMode::Hang, "no answer at all"),
    ];
    for (failures, (fault, what)) in faults.into_iter().enumerate() {
        *mode.lock().unwrap() = fault;
        let err = reconciler
            .run_pass()
            .await
            .expect_err(&format!("a pass against a registry giving {what} fails"));
        assert!(!err.to_string().is_empty());
        assert_eq!(
            running().await,
            ["reg-a", "reg-b"],
            "{what}: no store is removed"
        );
        let status = reconciler.status();
        assert_eq!(
            status.consecutive_failures as usize,
            failures + 1,
            "{what}: failures are counted (each one waits longer before the next pass)"
        );
        let (_, health) = host.get("/health").await;
        let last_error = health["reconciler"]["lastError"]
            .as_str()
            .unwrap_or_default();
        assert!(
            last_error.contains("nothing was changed"),
            "{what}: /health says the registry failed and nothing changed: {health}"
        );
        // The stores keep serving their tenants meanwhile.
        let (status, view) = host.get("/v1/stores/reg-a").await;
        assert_eq!(status, 200, "{what}: {view}");
    }
    let backoff_after_four = storehost_control::reconciler::backoff(4, Duration::from_secs(3600));
    assert!(
        backoff_after_four > storehost_control::reconciler::backoff(1, Duration::from_secs(3600))
    );

    *mode.lock().unwrap() = RegistryMode::Good;
    reconciler.run_pass().await.expect("the registry is back");
    assert_eq!(reconciler.status().consecutive_failures, 0);
    let (_, health) = host.get("/health").await;
    assert!(health["reconciler"]["lastError"].is_null(), "{health}");
}

// ---------------------------------------------------------------------------------------------
// LLM endpoint resetting connections.

/// A server speaking just enough HTTP/1.1: a request whose body mentions `reset` has its
/// connection reset (RST) without an answer; any other gets a chat completion.
async fn resetting_llm() -> (String, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let resets = Arc::new(Mutex::new(0usize));
    let counter = resets.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 8192];
                // Headers, then the body by Content-Length.
                let body = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buffer.len() >= end + 4 + length {
                        break String::from_utf8_lossy(&buffer[end + 4..end + 4 + length])
                            .into_owned();
                    }
                };
                if body.contains("reset") {
                    *counter.lock().unwrap() += 1;
                    // SO_LINGER 0: closing sends RST, the client sees "connection reset by peer".
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    return;
                }
                let answer = json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                    "model": "fake-model",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "answered fine"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                })
                .to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, resets)
}

async fn chat(host: &TestHost, store: &str, id: &str, text: &str) {
    host.append(
        store,
        "v1.ChatMessageSent",
        json!({"id": id, "conversationId": "conv-1", "message": text, "role": "user",
               "createdAt": "2025-01-01T10:00:00.000Z"}),
    )
    .await;
}

/// The agent's reply event for the message (the one carrying `llmMetadata`).
async fn reply(host: &TestHost, store: &str) -> Value {
    let (status, body) = host
        .get(&format!("/v1/stores/{store}/events?after=0&limit=1000"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["payload"]["llmMetadata"].is_object())
        .cloned()
        .unwrap_or_else(|| panic!("no reply in {store}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_endpoint_resetting_connections_is_a_transient_error_and_another_store_is_answered()
{
    let (base_url, resets) = resetting_llm().await;
    let provider = OpenAiProvider::new(OpenAiConfig {
        base_url,
        model: "fake-model".into(),
        api_key_env: None,
        timeout_ms: 10_000,
        deadline_ms: 20_000,
        max_retries: 2,
        backoff_base_ms: 10,
        backoff_max_ms: 50,
        max_tokens_field: MaxTokensField::MaxTokens,
    })
    .expect("valid provider");
    let llm: Arc<dyn LlmBackend> = ServiceBackend::new(Arc::new(LlmService::new(
        Arc::new(provider),
        LlmLimits::default(),
    )));
    let host = TestHost::start_with(TestHostOptions {
        llm: Some(llm),
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("agent", programs::AGENT).await;
    host.add_store("ws-reset", "agent", &[]).await;
    host.add_store("ws-fine", "agent", &[]).await;

    chat(&host, "ws-reset", "m1", "please reset the line").await;
    chat(&host, "ws-fine", "m2", "a normal question").await;
    host.settle("ws-reset").await;
    host.settle("ws-fine").await;

    let failed = reply(&host, "ws-reset").await;
    let metadata = &failed["payload"]["llmMetadata"];
    assert_eq!(metadata["stopReason"], "llm_error", "{failed}");
    assert_eq!(metadata["errorClass"], "transient", "{failed}");
    let message = failed["payload"]["message"].as_str().unwrap();
    assert!(
        !message.contains("127.0.0.1") && !message.is_empty(),
        "a polite reply without the operator's details: {message}"
    );
    assert_eq!(
        *resets.lock().unwrap(),
        3,
        "the first attempt and two retries"
    );

    let answered = reply(&host, "ws-fine").await;
    assert_eq!(
        answered["payload"]["message"], "answered fine",
        "{answered}"
    );
    // The failing endpoint did not poison the store: it is running, nothing dead-lettered.
    let (_, status) = host.get("/v1/stores/ws-reset").await;
    assert_eq!(status["deadLettered"], 0, "{status}");
}

// ---------------------------------------------------------------------------------------------
// The watched config file: deleted, unreadable, and a plugin file truncated on disk.

async fn ids(host: &TestHost) -> Vec<String> {
    let mut ids: Vec<String> = host
        .orchestrator
        .ids()
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    ids.sort();
    ids
}

async fn config_error(host: &TestHost) -> Option<String> {
    let (_, health) = host.get("/health").await;
    health["config"]["lastError"].as_str().map(str::to_owned)
}

/// A `kv.put` is applied by the running plugin.
async fn put_and_get(host: &TestHost, store: &str, key: &str) {
    host.append(store, "kv.put", json!({"key": key, "value": "v"}))
        .await;
    host.settle(store).await;
    assert_eq!(
        host.query(store, "get", json!({"key": key})).await["value"],
        "v",
        "store {store} applies events"
    );
}

fn is_root() -> bool {
    // Root reads through mode 000, so for root that fault takes another form.
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_unreadable_config_keeps_the_last_good_config_and_health_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storehost.toml");
    let plugin = dir.path().join("writer.wasm");
    std::fs::copy(programs::WRITER, &plugin).unwrap();
    std::fs::write(&path, writer_config(&plugin, &["cfg-one", "cfg-two"])).unwrap();
    let w = watched(&path, ControlHostOptions::default().max_stores).await;
    let host = &w.host;
    assert_eq!(ids(host).await, ["cfg-one", "cfg-two"]);

    // Deleted.
    std::fs::remove_file(&path).unwrap();
    eventually("the deleted config is reported", || async {
        config_error(host).await.is_some()
    })
    .await;
    let error = config_error(host).await.unwrap();
    assert!(error.contains("storehost.toml"), "names the file: {error}");
    assert_eq!(
        ids(host).await,
        ["cfg-one", "cfg-two"],
        "nothing was stopped"
    );
    put_and_get(host, "cfg-one", "after-delete").await;

    // Back, then unreadable: mode 000 when that stops us, otherwise bytes that are not text.
    std::fs::write(&path, writer_config(&plugin, &["cfg-one", "cfg-two"])).unwrap();
    eventually("the restored config clears the error", || async {
        config_error(host).await.is_none()
    })
    .await;
    if is_root() {
        std::fs::write(&path, [0xff, 0xfe, 0x00, 0x9f, b'[', 0xc3]).unwrap();
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        // Touch the directory so the watcher looks again.
        std::fs::write(dir.path().join("touch"), b"").unwrap();
        std::fs::rename(dir.path().join("touch"), dir.path().join("touched")).unwrap();
    }
    eventually("the unreadable config is reported", || async {
        config_error(host).await.is_some()
    })
    .await;
    assert_eq!(
        ids(host).await,
        ["cfg-one", "cfg-two"],
        "nothing was stopped"
    );
    put_and_get(host, "cfg-two", "while-unreadable").await;
    let (_, health) = host.get("/health").await;
    assert_eq!(health["status"], "degraded", "{health}");

    // Fixed, with an edit: it applies and the error clears.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, writer_config(&plugin, &["cfg-one", "cfg-three"])).unwrap();
    eventually("the fixed config applies", || async {
        ids(host).await == ["cfg-one", "cfg-three"]
    })
    .await;
    assert!(config_error(host).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_truncated_on_disk_keeps_the_previous_version_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storehost.toml");
    let plugin = dir.path().join("writer.wasm");
    let wasm = std::fs::read(programs::WRITER).unwrap();
    std::fs::write(&plugin, &wasm).unwrap();
    std::fs::write(&path, writer_config(&plugin, &["trunc-one"])).unwrap();
    let w = watched(&path, ControlHostOptions::default().max_stores).await;
    let host = &w.host;
    let sha = || async {
        let (_, view) = host.get("/v1/stores/trunc-one").await;
        view["plugin"]["sha256"].as_str().unwrap_or("").to_owned()
    };
    let before = sha().await;
    put_and_get(host, "trunc-one", "before").await;

    // A copy cut off half way (a full disk, an interrupted upload), then one with a flipped
    // byte in the middle.
    std::fs::write(&plugin, &wasm[..wasm.len() / 2]).unwrap();
    eventually("the truncated plugin is reported", || async {
        config_error(host)
            .await
            .is_some_and(|e| e.contains("writer"))
    })
    .await;
    assert_eq!(sha().await, before, "the previous version stays");
    put_and_get(host, "trunc-one", "after-truncation").await;

    let mut flipped = wasm.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    flipped[8] ^= 0x55;
    std::fs::write(&plugin, &flipped).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    eventually("the corrupted plugin is still reported", || async {
        config_error(host)
            .await
            .is_some_and(|e| e.contains("writer"))
    })
    .await;
    assert_eq!(sha().await, before, "the previous version stays");
    put_and_get(host, "trunc-one", "after-corruption").await;

    // (Writing back the running version's exact bytes deploys nothing; the error shown stays
    // until the next change: see the report.)
}

// ---------------------------------------------------------------------------------------------
// One store's data broken: the real binary.

#[test]
fn a_store_with_a_broken_database_fails_at_start_while_the_others_run() {
    use storehost_tests::process::{BlockingAdmin, ServerProcess};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = dir.path().join("storehost.toml");
    std::fs::write(
        &path,
        writer_config(
            Path::new(programs::WRITER),
            &["disk-a", "disk-bad", "disk-c"],
        ),
    )
    .unwrap();
    let args = ["--config", path.to_str().unwrap()];
    let admin = BlockingAdmin::default();
    let call = |url: &str, method, path: &str, body| admin.call(url, method, path, body);

    let server = ServerProcess::spawn(&data, &args, &[]);
    for id in ["disk-a", "disk-bad", "disk-c"] {
        let (status, body) = call(
            &server.url,
            reqwest::Method::POST,
            &format!("/v1/stores/{id}/events"),
            Some(json!({"type": "kv.put", "payload": {"key": "k", "value": id}})),
        );
        assert_eq!(status, 202, "{body}");
    }
    server.terminate();

    // Break disk-bad: mode 000 on its directory when that stops this user; as root (CI), which
    // reads through any mode, its events.db becomes garbage.
    let store_dir: PathBuf = data.join("stores").join("disk-bad");
    let events_db = store_dir.join("events.db");
    assert!(events_db.exists(), "layout: {}", events_db.display());
    let root = is_root();
    if root {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(store_dir.join(format!("events.db{suffix}")));
        }
        std::fs::write(&events_db, vec![0x5a; 64 * 1024]).unwrap();
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o000)).unwrap();
    }

    let server = ServerProcess::spawn(&data, &args, &[]);
    let (status, health) = call(&server.url, reqwest::Method::GET, "/health", None);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(
        health["stores"]["failed"], 1,
        "/health counts the failed store: {health}"
    );
    // The other two run, or already sleep: they opened with nothing to do.
    let up = |state: &str| health["stores"][state].as_u64().unwrap_or(0);
    assert_eq!(up("running") + up("hibernated"), 2, "{health}");
    assert_eq!(
        health["monitoredStoreIds"],
        json!(["disk-a", "disk-c"]),
        "{health}"
    );
    for id in ["disk-a", "disk-c"] {
        let query = format!("/v1/stores/{id}/query/get?args=%7B%22key%22%3A%22k%22%7D");
        let (status, body) = call(&server.url, reqwest::Method::GET, &query, None);
        assert_eq!(
            (status, &body["value"]),
            (200, &json!(id)),
            "{id} keeps its data: {body}"
        );
        let (status, body) = call(
            &server.url,
            reqwest::Method::POST,
            &format!("/v1/stores/{id}/events"),
            Some(json!({"type": "kv.put", "payload": {"key": "k2", "value": "new"}})),
        );
        assert_eq!(status, 202, "{id} takes new events: {body}");
    }
    let (status, body) = call(
        &server.url,
        reqwest::Method::POST,
        "/v1/stores/disk-bad/events",
        Some(json!({"type": "kv.put", "payload": {"key": "k3", "value": "x"}})),
    );
    assert!(
        status >= 400
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
        "the broken store does not take events, and says so: {status} {body}"
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(log.contains("disk-bad"), "the log names the store");

    // The API shows it and why (it used to answer 404 for a store /health counted); being
    // the config's, only the config removes or changes it.
    let (status, body) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/disk-bad",
        None,
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_failed", "{body}");
    let (_, list) = call(&server.url, reqwest::Method::GET, "/v1/stores", None);
    assert_eq!(list["failed"][0]["id"], "disk-bad", "{list}");
    assert_eq!(list["failed"][0]["source"], "config", "{list}");
    assert!(
        list["failed"][0]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{list}"
    );
    let (status, body) = call(
        &server.url,
        reqwest::Method::DELETE,
        "/v1/stores/disk-bad",
        None,
    );
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("config_owned")),
        "{body}"
    );
    let (status, body) = call(
        &server.url,
        reqwest::Method::PUT,
        "/v1/stores/disk-bad",
        Some(json!({})),
    );
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("config_owned")),
        "{body}"
    );
    server.terminate();
    if !root {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o755));
    }
}

/// A store the API created whose start fails (its directory broken while the host was down)
/// is shown with why, and `DELETE` forgets it: its directory is archived and host.db no longer
/// holds it, so the next start is clean. It used to answer 404 to both while /health counted
/// it, and every start tried it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_failed_to_start_is_shown_and_can_be_removed() {
    use storehost_tests::process::{PROCESS_TOKEN, ServerProcess};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let call = |url: String, method: reqwest::Method, path: &'static str| async move {
        let mut request = reqwest::Client::new()
            .request(method.clone(), format!("{url}{path}"))
            .bearer_auth(PROCESS_TOKEN);
        if method == reqwest::Method::PUT {
            request = request.json(&json!({}));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    let server = ServerProcess::spawn(&data, &[], &[]);
    let (status, body) = call(
        server.url.clone(),
        reqwest::Method::PUT,
        "/v1/stores/api-bad",
    )
    .await;
    assert_eq!(status, 201, "{body}");
    server.terminate();

    let store_dir = data.join("stores").join("api-bad");
    let root = is_root();
    if root {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(store_dir.join(format!("events.db{suffix}")));
        }
        std::fs::write(store_dir.join("events.db"), vec![0x5a; 64 * 1024]).unwrap();
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let server = ServerProcess::spawn(&data, &[], &[]);
    let (status, body) = call(
        server.url.clone(),
        reqwest::Method::GET,
        "/v1/stores/api-bad",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("could not start") && message.contains("DELETE"),
        "{message}"
    );
    let (_, list) = call(server.url.clone(), reqwest::Method::GET, "/v1/stores").await;
    assert_eq!(list["failed"][0]["source"], "api", "{list}");
    // `ctl` shows it too: a `failed` row in the list, and `show` says why and exits non-zero.
    let ctl = |args: &[&str]| {
        std::process::Command::new(storehost_tests::process::storehost_bin())
            .args(["ctl", "--server", &server.url, "--token", PROCESS_TOKEN])
            .args(args)
            .env_remove("STOREHOST_URL")
            .env_remove("STOREHOST_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    let listed = ctl(&["stores", "list"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("api-bad"))
        .unwrap_or_default();
    assert!(row.contains("failed") && row.contains("api"), "{table}");
    let shown = ctl(&["stores", "show", "api-bad"]);
    assert!(!shown.status.success());
    assert!(
        String::from_utf8_lossy(&shown.stderr).contains("could not start"),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    // A backup or a restore of it says why too, as pause and tokens do (they said 404
    // "create it with PUT").
    for method in [reqwest::Method::GET, reqwest::Method::PUT] {
        let (status, body) = call(
            server.url.clone(),
            method.clone(),
            "/v1/stores/api-bad/backup",
        )
        .await;
        assert_eq!(status, 503, "{method} backup: {body}");
        assert_eq!(
            body["error"]["code"], "store_failed",
            "{method} backup: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("could not start"),
            "{method} backup: {body}"
        );
    }

    let (status, body) = call(
        server.url.clone(),
        reqwest::Method::DELETE,
        "/v1/stores/api-bad",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], "archived", "{body}");
    let (status, _) = call(
        server.url.clone(),
        reqwest::Method::GET,
        "/v1/stores/api-bad",
    )
    .await;
    assert_eq!(status, 404);
    let (_, health) = call(server.url.clone(), reqwest::Method::GET, "/health").await;
    assert!(health["stores"].get("failed").is_none(), "{health}");
    assert!(!store_dir.exists(), "its directory moved to the archive");
    let archived: Vec<String> = std::fs::read_dir(data.join("archive"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        archived.iter().any(|name| name.starts_with("api-bad-")),
        "{archived:?}"
    );
    server.terminate();

    let server = ServerProcess::spawn(&data, &[], &[]);
    let (_, health) = call(server.url.clone(), reqwest::Method::GET, "/health").await;
    assert!(
        health["stores"].get("failed").is_none(),
        "not tried again: {health}"
    );
    server.terminate();
    if !root {
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(data.join("archive")).unwrap() {
            let _ = std::fs::set_permissions(
                entry.unwrap().path(),
                std::fs::Permissions::from_mode(0o755),
            );
        }
    }
}

/// A store that fills its disk quota fails those events cleanly (`disk_full`, dead-lettered,
/// then its circuit opens; nothing half-written) while a neighbour goes on; once space returns
/// (the quota raised live) it goes on from where it stopped, its dead letters retry into place,
/// and its database checks out intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_out_of_disk_fails_cleanly_and_recovers_when_space_returns() {
    let mut options = TestHostOptions::default();
    options.retry.breaker_failures = 4;
    options.retry.breaker_base_delay = Duration::from_millis(200);
    options.retry.breaker_max_delay = Duration::from_millis(800);
    let host = TestHost::start_with(options).await;
    host.deploy("writer", programs::WRITER).await;
    let cramped = Quotas {
        disk: 256 << 10,
        ..Quotas::default()
    };
    host.add_store_with("cramped", "writer", &[], cramped).await;
    host.add_store("roomy", "writer", &[]).await;

    // 40 values of 16 KiB: about 640 KiB for a store allowed 256 KiB.
    let filler = "x".repeat(16 << 10);
    for i in 0..40 {
        host.append(
            "cramped",
            "kv.put",
            json!({"key": format!("big{i}"), "value": filler}),
        )
        .await;
        host.append(
            "roomy",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    host.settle("roomy").await;
    assert_eq!(host.query("roomy", "count", json!({})).await["kv"], 40);

    let status = host
        .wait_for_status("cramped", |s| {
            s["lastFailure"]["reason"] == "disk_full" && s["deadLettered"].as_u64() >= Some(1)
        })
        .await;
    assert!(
        status["lag"].as_u64().unwrap() > 0,
        "it stopped short: {status}"
    );
    let (_, letters) = host.get("/v1/stores/cramped/dead-letters").await;
    let letters = letters["deadLetters"].as_array().unwrap().clone();
    assert!(
        letters.iter().all(|l| l["reason"] == "disk_full"),
        "{letters:?}"
    );
    let stored = host.query("cramped", "count", json!({})).await;
    let (_, status) = host.get("/v1/stores/cramped").await;
    assert_eq!(
        stored["applied"].as_u64().unwrap() + status["deadLettered"].as_u64().unwrap(),
        status["cursor"].as_u64().unwrap(),
        "every event before the cursor applied or dead-lettered, none half-applied: {stored} {status}"
    );

    // Space returns: the quota is raised live; the store goes on and its dead letters retry.
    let (code, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/cramped",
            Some(json!({"quotas": {"disk": 64 << 20}})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    host.settle("cramped").await;
    let (_, letters) = host.get("/v1/stores/cramped/dead-letters").await;
    for letter in letters["deadLetters"].as_array().unwrap() {
        let seq = letter["seq"].as_u64().unwrap();
        let (code, body) = host
            .post(
                &format!("/v1/stores/cramped/dead-letters/{seq}/retry"),
                json!({}),
            )
            .await;
        assert_eq!(code, 200, "retry of {seq}: {body}");
    }
    host.append("cramped", "kv.put", json!({"key": "after", "value": 1}))
        .await;
    host.settle("cramped").await;
    let stored = host.query("cramped", "count", json!({})).await;
    assert_eq!(stored["kv"], 41, "{stored}");
    assert_eq!(stored["applied"], 41, "each event applied exactly once");

    assert_intact(&host.data_dir.join("stores/cramped"));
}

/// A store whose directory sits on a filesystem that fills up (a real tmpfs of 1 MiB mounted
/// over it, not its quota): appends it cannot keep are refused with 507 `disk_full`, and when
/// only `store.db` has no room its events fail as `disk_full`; every acknowledged event stays
/// in its log, and a neighbour on the ordinary disk goes on. Once space returns its dead
/// letters retry, every acknowledged event is applied exactly once, and both its databases
/// check out intact.
/// Needs the right to mount (root in CI); elsewhere it says it was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_a_full_filesystem_fails_cleanly_and_recovers_when_space_returns() {
    let mut options = TestHostOptions::default();
    options.retry.breaker_failures = 4;
    options.retry.breaker_base_delay = Duration::from_millis(200);
    options.retry.breaker_max_delay = Duration::from_millis(800);
    let host = TestHost::start_with(options).await;
    let dir = host.data_dir.join("stores/full");
    std::fs::create_dir_all(&dir).unwrap();
    let Some(small) = Tmpfs::mount(&dir, "1m") else {
        storehost_tests::report(
            "faults: SKIPPED the full filesystem (could not mount a tmpfs: needs root or CAP_SYS_ADMIN)",
        );
        return;
    };
    host.deploy("writer", programs::WRITER).await;
    host.add_store("full", "writer", &[]).await;
    host.add_store("roomy", "writer", &[]).await;

    // 16 KiB values go into the log and again into the store's table: 1 MiB is soon full.
    let filler = "x".repeat(16 << 10);
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..120 {
        let (code, body) = host
            .post(
                "/v1/stores/full/events",
                json!({"type": "kv.put", "payload": {"key": format!("big{i}"), "value": filler}}),
            )
            .await;
        match code {
            202 => acknowledged.push(body["seq"].as_u64().unwrap()),
            507 => {
                assert_eq!(body["error"]["code"], "disk_full", "{body}");
                refused += 1;
            }
            other => panic!("append {i}: {other} {body}"),
        }
        host.append(
            "roomy",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    host.settle("roomy").await;
    assert_eq!(host.query("roomy", "count", json!({})).await["kv"], 120);
    // What the log took is processed, or, when `store.db` found no room for it (the log
    // took the space first: on a busy machine processing lags behind the appends), fails as
    // `disk_full` and waits for space, which the next step gives it.
    host.wait_for_status("full", |s| {
        s["lag"] == 0 || s["lastFailure"]["reason"] == "disk_full"
    })
    .await;
    assert!(
        refused > 0,
        "the filesystem filled up under the log: {refused} appends refused"
    );
    assert_eq!(
        logged_seqs(&host, "full").await,
        acknowledged,
        "every acknowledged event is in the log, once"
    );

    // Now the log has room and `store.db` has none: events are taken while the store is
    // paused, then a file takes the rest of the filesystem, then the store resumes.
    small.resize("4m");
    assert_eq!(host.post("/v1/stores/full/pause", json!({})).await.0, 200);
    for i in 0..10 {
        let seq = host
            .append(
                "full",
                "kv.put",
                json!({"key": format!("late{i}"), "value": filler}),
            )
            .await;
        acknowledged.push(seq);
    }
    let hog = fill(&dir.join("files/hog"));
    assert_eq!(host.post("/v1/stores/full/resume", json!({})).await.0, 200);
    let status = host
        .wait_for_status("full", |s| s["lastFailure"]["reason"] == "disk_full")
        .await;
    assert!(
        status["cursor"].as_u64() < acknowledged.last().copied(),
        "{status}"
    );

    // Space returns: the store goes on and its dead letters retry into place.
    std::fs::remove_file(hog).unwrap();
    host.append("full", "kv.put", json!({"key": "after", "value": 1}))
        .await;
    host.settle("full").await;
    let (_, letters) = host.get("/v1/stores/full/dead-letters").await;
    for letter in letters["deadLetters"].as_array().unwrap() {
        assert_eq!(letter["reason"], "disk_full", "{letter}");
        let seq = letter["seq"].as_u64().unwrap();
        let (code, body) = host
            .post(
                &format!("/v1/stores/full/dead-letters/{seq}/retry"),
                json!({}),
            )
            .await;
        assert_eq!(code, 200, "retry of {seq}: {body}");
    }
    host.settle("full").await;
    let stored = host.query("full", "count", json!({})).await;
    let expected = acknowledged.len() + 1;
    assert_eq!(
        stored["applied"], expected,
        "each acknowledged event applied once: {stored}"
    );
    assert_eq!(logged_seqs(&host, "full").await.len(), expected);
    assert_intact(&dir);
}

/// Both databases in the store directory `dir` pass SQLite's `integrity_check`.
fn assert_intact(dir: &Path) {
    for file in ["events.db", "store.db"] {
        // Through the host's VFS: the store may still have the file open.
        let db = storehost_store::sqlite::open_reader(&dir.join(file)).unwrap();
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(check, "ok", "{file}");
    }
}

/// The `seq` of every event in `store`'s log.
async fn logged_seqs(host: &TestHost, store: &str) -> Vec<u64> {
    let (_, log) = host
        .get(&format!("/v1/stores/{store}/events?after=0&limit=1000"))
        .await;
    log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// Sets or clears the immutable attribute (`chattr +i` / `-i`) on the files in `dir` — a broken
/// permission that stops root too, and takes effect on files already open. Answers whether it
/// could.
fn set_immutable(dir: &Path, immutable: bool) -> bool {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    let flag = if immutable { "+i" } else { "-i" };
    std::process::Command::new("chattr")
        .arg(flag)
        .args(&files)
        .status()
        .is_ok_and(|status| status.success())
}

/// Clears the immutable attribute again however the test ends (the temporary directory must
/// be removable).
struct Unlock(PathBuf);

impl Drop for Unlock {
    fn drop(&mut self) {
        set_immutable(&self.0, false);
    }
}

/// One store's files become unwritable while it runs (root included): its appends are refused
/// with an error and nothing is acknowledged that is not kept, its neighbour goes on, and once
/// the permission is fixed the store takes events again — everything acknowledged applied once,
/// both databases intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_files_become_unwritable_refuses_appends_and_recovers_when_fixed() {
    if !is_root() {
        storehost_tests::report(
            "faults: SKIPPED the unwritable files (making files unwritable for their owner needs root: chattr +i)",
        );
        return;
    }
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("locked", "writer", &[]).await;
    host.add_store("neighbour", "writer", &[]).await;
    for store in ["locked", "neighbour"] {
        host.append(store, "kv.put", json!({"key": "before", "value": 1}))
            .await;
        host.settle(store).await;
    }
    let dir = host.data_dir.join("stores/locked");
    let unlock = Unlock(dir.clone());
    if !set_immutable(&dir, true) {
        storehost_tests::report(
            "faults: SKIPPED the unwritable files (this filesystem has no immutable attribute: chattr +i failed)",
        );
        return;
    }

    let (status, body) = host
        .post(
            "/v1/stores/locked/events",
            json!({"type": "kv.put", "payload": {"key": "refused", "value": 2}}),
        )
        .await;
    assert!(
        status >= 500,
        "an append that cannot be made durable is refused: {status} {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "with an error saying so: {body}"
    );
    host.append("neighbour", "kv.put", json!({"key": "during", "value": 2}))
        .await;
    host.settle("neighbour").await;
    assert_eq!(host.query("neighbour", "count", json!({})).await["kv"], 2);

    // Fixed: the store takes events again; the refused one was never kept.
    drop(unlock);
    let mut accepted = None;
    for _ in 0..100 {
        let (status, body) = host
            .post(
                "/v1/stores/locked/events",
                json!({"type": "kv.put", "payload": {"key": "after", "value": 3}}),
            )
            .await;
        if status == 202 {
            accepted = body["seq"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seq = accepted.expect("the store takes events once its files are writable");
    assert_eq!(seq, 2, "the refused append left no event behind");
    host.settle("locked").await;
    assert_eq!(
        host.query("locked", "applied", json!({})).await["seqs"],
        json!([1, 2])
    );
    assert_eq!(
        host.query("locked", "get", json!({"key": "refused"})).await["value"],
        Value::Null
    );
    assert_intact(&dir);
}
