//! The binary's commands: `check-config`, `plugin check`, `serve` on the embedded default,
//! restarts that keep API-created stores, and SIGTERM.

use std::time::Duration;

use serde_json::{Value, json};
use storehost_tests::process::{PROCESS_TOKEN, ServerProcess, run_storehost};
use storehost_tests::{programs, writer_config};

#[test]
fn check_config_accepts_the_example_and_lists_every_error_with_its_line() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/storehost.example.toml"
    );
    // The example names examples/counter-plugin where a release build puts it; the tests
    // built it elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example).unwrap();
    let built = format!("path = {:?}", programs::COUNTER_EXAMPLE);
    let checked = dir.path().join("example.toml");
    std::fs::write(
        &checked,
        text.replace(
            "path = \"../target/wasm32-wasip2/release/counter_plugin.wasm\"",
            &built,
        ),
    )
    .unwrap();
    let (status, stdout, stderr) = run_storehost(&["check-config", &checked.display().to_string()]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");

    // A plugin file serve could not load is an error too: missing, or not a component.
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        "[plugins.gone]\npath = \"nowhere.wasm\"\n[plugins.text]\npath = \"missing.toml\"\n",
    )
    .unwrap();
    let (status, _, stderr) = run_storehost(&["check-config", &missing.display().to_string()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    // Each at the line and column of its path.
    assert!(
        stderr.contains("missing.toml:2:8: [plugins.gone] path: cannot read")
            && stderr.contains("nowhere.wasm"),
        "{stderr}"
    );
    assert!(
        stderr.contains("missing.toml:4:8: [plugins.text] path:")
            && stderr.contains("not a usable plugin"),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:8080\"\nmax_stores = \"many\"\n\n[stores.\"../etc\"]\n\n[stores.good-one]\nquotas = { memroy = 5 }\n",
    )
    .unwrap();
    let (status, _, stderr) = run_storehost(&["check-config", &bad.display().to_string()]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("bad.toml:2:"),
        "max_stores error with its line: {stderr}"
    );
    assert!(
        stderr.contains("../etc"),
        "invalid store id reported: {stderr}"
    );
    assert!(
        stderr.contains("memroy"),
        "unknown quota key reported: {stderr}"
    );
}

#[test]
fn plugin_check_tells_a_plugin_from_anything_else() {
    let (status, stdout, stderr) = run_storehost(&["plugin", "check", programs::WRITER]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("implements storehost:plugin@0.1.0"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let (status, _, stderr) = run_storehost(&["plugin", "check", &junk.display().to_string()]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("not a valid WebAssembly component"),
        "{stderr}"
    );
    // Not WebAssembly at all: the parser's error (two byte arrays, a byte a line) is one line
    // here, as in the log and `/health`.
    std::fs::write(&junk, b"garbage\n").unwrap();
    let (status, _, stderr) = run_storehost(&["plugin", "check", &junk.display().to_string()]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad magic number"), "{stderr}");
}

async fn call(url: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{url}{path}"))
        .bearer_auth(PROCESS_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Asks `path` every 50 ms, for at most 5 s, until its answer satisfies `done`; the last answer.
async fn query_until(url: &str, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut answer = Value::Null;
    for _ in 0..100 {
        (_, answer) = call(url, reqwest::Method::GET, path, None).await;
        if done(&answer) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_serves_demo_stores_and_a_restart_keeps_api_stores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ServerProcess::spawn(&data, &[], &[]);
    let (status, health) = call(&server.url, reqwest::Method::GET, "/health", None).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(
        health["monitoredStoreIds"],
        json!(["demo-alpha", "demo-beta", "demo-gamma"])
    );

    let created =
        json!({"type": "v2.TaskCreated", "payload": {"id": "t1", "title": "Water the plants"}});
    let (status, body) = call(
        &server.url,
        reqwest::Method::POST,
        "/v1/stores/demo-alpha/events",
        Some(created),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = call(
        &server.url,
        reqwest::Method::PUT,
        "/v1/stores/added-later",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    server.stop_cleanly();

    let server = ServerProcess::spawn(&data, &[], &[]);
    let (_, health) = call(&server.url, reqwest::Method::GET, "/health", None).await;
    assert_eq!(
        health["monitoredStoreIds"],
        json!(["added-later", "demo-alpha", "demo-beta", "demo-gamma"]),
        "the store added through the API came back"
    );
    let tasks = query_until(&server.url, "/v1/stores/demo-alpha/query/tasks", |tasks| {
        tasks["tasks"].as_array().is_some_and(|t| !t.is_empty())
    })
    .await;
    assert_eq!(tasks["tasks"][0]["title"], "Water the plants", "{tasks}");
}

#[test]
fn the_embedded_default_generates_an_admin_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bin = storehost_tests::process::storehost_bin();
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env_remove("STOREHOST_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut printed = None;
    for line in lines.by_ref().take(5).map_while(Result::ok) {
        if let Some((_, token)) = line
            .split_once("saved to ")
            .and_then(|(_, rest)| rest.split_once("): "))
        {
            printed = Some(token.to_owned());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let printed = printed.expect("the generated token is printed");
    let saved = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert_eq!(saved.trim(), printed);
    assert_eq!(printed.len(), 64);
}

/// The engine's fuel metering and memory ceiling are fixed at start. A store added through the
/// API with fuel and a large memory quota (allowed because the config then asked for both) comes
/// back with them after a restart on a config that asks for neither: the engine is sized for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_sizes_the_engine_for_the_api_stores_it_brings_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("storehost.toml");
    let plain = writer_config(std::path::Path::new(programs::WRITER), &[]);
    std::fs::write(
        &config,
        format!(
            "{plain}[stores.metered.quotas]\nfuel_per_call = 1000000000\nmemory = \"512MiB\"\n"
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let quotas = json!({"fuel_per_call": 2_000_000_000u64, "memory": 512u64 << 20});
    let (status, body) = call(
        &server.url,
        reqwest::Method::PUT,
        "/v1/stores/api-metered",
        Some(json!({"quotas": quotas})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    server.stop_cleanly();

    std::fs::write(&config, plain).unwrap();
    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let (status, store) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/api-metered",
        None,
    )
    .await;
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert_eq!(status, 200, "the store came back: {store}\nlog:\n{log}");
    assert_eq!(
        store["quotas"]["fuel_per_call"], 2_000_000_000u64,
        "{store}"
    );
    assert_eq!(store["quotas"]["memory"], 512u64 << 20, "{store}");

    let event = json!({"type": "kv.put", "payload": {"key": "a", "value": 1}});
    let (status, body) = call(
        &server.url,
        reqwest::Method::POST,
        "/v1/stores/api-metered/events",
        Some(event),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let count = query_until(&server.url, "/v1/stores/api-metered/query/count", |count| {
        count["kv"] == 1
    })
    .await;
    assert_eq!(count["kv"], 1, "the event was applied: {count}");
}

/// A SIGTERM sent the moment the server says it listens stops it cleanly (exit 0, every store
/// stopped). Before, the handler was set up on the accept loop's first poll, so an early signal
/// met the default action and killed the process (12 runs in 20 in a shell loop).
#[test]
fn a_sigterm_right_after_listening_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for run in 0..3 {
        ServerProcess::spawn(&dir.path().join(format!("data-{run}")), &[], &[]).stop_cleanly();
    }
}

/// A `max_stores` beyond what the sandbox pool holds live is not silently used: the host
/// says at start what happens once more stores than that are awake at once.
#[test]
fn a_max_stores_beyond_the_sandbox_pool_is_reported_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &[],
        &[("MAX_INSTANCES_PER_SERVER", "20000")],
    );
    let log = server.run_log();
    assert!(
        log.contains("max_stores = 20000 is more than the 10000 sandboxes the pool holds live"),
        "{log}"
    );
    server.stop_cleanly();
}

/// A start-up that fails after its stores started (here: the port is taken) stops them
/// cleanly before it reports the error and exits non-zero. Before, it returned at once and
/// left them to the next start's recovery, as after `kill -9`.
#[test]
fn a_start_up_that_cannot_listen_stops_its_stores_first() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        writer_config(std::path::Path::new(programs::WRITER), &["kept"]),
    )
    .unwrap();
    let data = dir.path().join("data");
    let (status, _, stderr) = run_storehost(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &address,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("could not listen on"), "{stderr}");
    assert!(
        stderr.contains("stopping the stores it started"),
        "the started store is stopped before the error: {stderr}"
    );
}

/// A SIGTERM while the server is still starting its stores, before it listens, starts no
/// more of them, stops the ones it started cleanly and exits 0; the next start runs them all.
/// Before, the signal met the default action until the server listened: the process was
/// killed with every started store open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_start_up_stops_the_stores_started_and_starts_no_more() {
    const STORES: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..STORES).map(|i| format!("ws-{i:04}")).collect();
    let store_ids = ids.join(",");
    let env = [("STORE_IDS", store_ids.as_str())];
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        writer_config(std::path::Path::new(programs::WRITER), &[]),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let args = ["--config", config_arg.as_str()];

    // The signal goes out once the first stores have started (a batch of 32 takes about
    // 150 ms here); should a stalled test thread send it only after all of them had, the
    // start-up is tried again on fresh data.
    let mut interrupted = None;
    for attempt in 0..3 {
        let data = dir.path().join(format!("data-{attempt}"));
        let mut server = ServerProcess::spawn_starting(&data, &args, &env);
        server.wait_for_log("store started", Duration::from_secs(60));
        server.send_term();
        let status = server.wait_exit(Duration::from_secs(30));
        let log = server.run_log();
        assert!(
            status.is_some_and(|status| status.success()),
            "a SIGTERM during start-up should stop the server with exit 0; it ended with {status:?}; log:\n{log}"
        );
        assert!(
            log.contains("all stores stopped cleanly"),
            "the stores started are stopped cleanly; log:\n{log}"
        );
        if server.said_listening() {
            continue;
        }
        assert!(
            log.contains("not started: the host shuts down"),
            "the stores left to start are not started; log:\n{log}"
        );
        let started = log.matches("store started").count();
        assert!(
            started < STORES,
            "{started} of {STORES} stores started after the signal; log:\n{log}"
        );
        interrupted = Some(data);
        break;
    }
    let data = interrupted.expect("in three attempts the signal never came during start-up");

    let server = ServerProcess::spawn(&data, &args, &env);
    let (status, list) = call(&server.url, reqwest::Method::GET, "/v1/stores", None).await;
    assert_eq!(status, 200, "{list}");
    let listed = list["stores"].as_array().map_or(0, |stores| {
        stores
            .iter()
            .filter(|store| store["id"].as_str().is_some_and(|id| id.starts_with("ws-")))
            .count()
    });
    assert_eq!(listed, STORES, "the next start runs every store: {list}");
    server.stop_cleanly();
}

/// A second SIGTERM while the server waits for its stores to stop (here one in the middle of
/// a minute-long invocation) ends it at once with status 1; the next start finds every
/// event it had accepted. Before, further signals were ignored until every store stopped.
/// One within a second of the first is taken as the same request and ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_shutdown_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins.spin]\npath = {:?}\n[stores.spinner]\nplugin = \"spin\"\n[stores.spinner.quotas]\ncpu_ms_per_call = 60000\nwall_ms_per_call = 60000\ncpu_ms_per_minute = 600000\n",
            programs::SPIN
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let mut server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let (status, body) = call(
        &server.url,
        reqwest::Method::POST,
        "/v1/stores/spinner/events",
        Some(json!({"type": "spin", "payload": {}})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    // The guest spins once it holds an invocation slot.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = reqwest::get(format!("{}/metrics", server.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics
            .lines()
            .any(|line| line == "storehost_invocation_slots_in_use 1")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the spinning invocation never started; metrics:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Two at once: the same request delivered twice (as GNU `timeout` does), ignored.
    server.send_term();
    server.send_term();
    server.wait_for_log("shutting down", Duration::from_secs(10));
    assert!(
        server.wait_exit(Duration::from_millis(1_500)).is_none(),
        "the first SIGTERM waits for the invocation in flight, and one right after it changes nothing; log:\n{}",
        server.run_log()
    );
    server.send_term();
    let status = server.wait_exit(Duration::from_secs(10));
    let log = server.run_log();
    assert_eq!(
        status.and_then(|status| status.code()),
        Some(1),
        "the second SIGTERM ends the server at once with status 1; it ended with {status:?}; log:\n{log}"
    );
    assert!(log.contains("second signal"), "it says why; log:\n{log}");

    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let (status, events) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/spinner/events",
        None,
    )
    .await;
    assert_eq!(status, 200, "{events}");
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(1),
        "the accepted event is kept: {events}"
    );
    server.kill9();
}

/// A paused store stays paused across a restart, whoever declared it (the config, or the API):
/// after the restart it accepts events and processes none until it is resumed. Before, every
/// restart resumed it — a store an operator had stopped for hurting its neighbours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_store_stays_paused_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ServerProcess::spawn(&data, &[], &[]);
    let (status, body) = call(
        &server.url,
        reqwest::Method::PUT,
        "/v1/stores/api-paused",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    for id in ["demo-beta", "api-paused"] {
        let (status, body) = call(
            &server.url,
            reqwest::Method::POST,
            &format!("/v1/stores/{id}/pause"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    server.stop_cleanly();

    let server = ServerProcess::spawn(&data, &[], &[]);
    let note = json!({"type": "v2.TaskCreated", "payload": {"id": "t1", "title": "Stay put"}});
    for id in ["demo-beta", "api-paused"] {
        let path = format!("/v1/stores/{id}/events");
        let (status, body) = call(
            &server.url,
            reqwest::Method::POST,
            &path,
            Some(note.clone()),
        )
        .await;
        assert_eq!(status, 202, "{id} accepts events while paused: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (_, view) = call(
            &server.url,
            reqwest::Method::GET,
            &format!("/v1/stores/{id}"),
            None,
        )
        .await;
        assert_eq!(view["state"], "paused", "{view}");
        assert_eq!(view["lag"], 1, "nothing processed while paused: {view}");
    }
    let (_, view) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/demo-alpha",
        None,
    )
    .await;
    // Not paused: running, or asleep already (it opened with nothing to do).
    assert!(
        view["state"] == "running" || view["state"] == "hibernated",
        "a store never paused is not paused: {view}"
    );

    let (status, _) = call(
        &server.url,
        reqwest::Method::POST,
        "/v1/stores/demo-beta/resume",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let view = query_until(&server.url, "/v1/stores/demo-beta", |v| v["lag"] == 0).await;
    assert_eq!(view["state"], "running", "{view}");
    server.stop_cleanly();

    let server = ServerProcess::spawn(&data, &[], &[]);
    let (_, beta) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/demo-beta",
        None,
    )
    .await;
    let (_, api) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/api-paused",
        None,
    )
    .await;
    assert!(
        beta["state"] == "running" || beta["state"] == "hibernated",
        "the resumed store is not paused after the next restart: {beta}"
    );
    assert_eq!(api["state"], "paused", "the other stays paused: {api}");
    server.stop_cleanly();
}

/// The latest of a config plugin's file and a version uploaded through the API under its name
/// runs, across restarts too: an upload survives a restart while the file is unchanged; a file
/// changed while the host was down, or changed (and deployed) while it ran, replaces the upload
/// for good. Before, every restart restored the upload over the file's newer version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_of_a_plugin_file_and_an_upload_runs_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("storehost.toml");
    let plugin = dir.path().join("writer.wasm");
    let original = std::fs::read(programs::WRITER).unwrap();
    std::fs::write(&plugin, &original).unwrap();
    std::fs::write(&config, writer_config(&plugin, &["on-file"])).unwrap();
    let config_arg = config.display().to_string();
    let start = || ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let version = |bytes: &[u8]| storehost_tests::sha256sum(bytes);
    let running = |url: String| async move {
        let (_, store) = call(&url, reqwest::Method::GET, "/v1/stores/on-file", None).await;
        store["plugin"]["sha256"].as_str().unwrap_or("").to_owned()
    };
    let upload = |url: String, bytes: Vec<u8>| async move {
        let response = reqwest::Client::new()
            .put(format!("{url}/v1/plugins/writer"))
            .bearer_auth(PROCESS_TOKEN)
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    };
    let wait_for = |url: String, sha: String| async move {
        for _ in 0..600 {
            if running(url.clone()).await == sha {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the store never ran plugin {sha}");
    };

    let server = start();
    let uploaded = storehost_tests::with_custom_section(&original, "uploaded");
    upload(server.url.clone(), uploaded.clone()).await;
    wait_for(server.url.clone(), version(&uploaded)).await;
    server.stop_cleanly();

    let server = start();
    assert_eq!(
        running(server.url.clone()).await,
        version(&uploaded),
        "the file did not change: the upload runs"
    );
    server.stop_cleanly();

    let changed_while_down = storehost_tests::with_custom_section(&original, "while down");
    std::fs::write(&plugin, &changed_while_down).unwrap();
    let server = start();
    assert_eq!(
        running(server.url.clone()).await,
        version(&changed_while_down),
        "the file changed after the upload: its version runs"
    );
    server.stop_cleanly();
    let server = start();
    assert_eq!(
        running(server.url.clone()).await,
        version(&changed_while_down),
        "and goes on running: the upload is gone"
    );

    // The same for a file changed while the host runs: the reload deploys it, and a restart
    // keeps it.
    let again = storehost_tests::with_custom_section(&original, "uploaded again");
    upload(server.url.clone(), again.clone()).await;
    wait_for(server.url.clone(), version(&again)).await;
    let changed_while_up = storehost_tests::with_custom_section(&original, "while up");
    std::fs::write(&plugin, &changed_while_up).unwrap();
    wait_for(server.url.clone(), version(&changed_while_up)).await;
    server.stop_cleanly();
    let server = start();
    assert_eq!(
        running(server.url.clone()).await,
        version(&changed_while_up),
        "the file deployed while the host ran still runs after a restart"
    );
    drop(server);
}

/// A store the API created that the config file declares by the next start (added while the
/// host was down) runs as the config says: source `config`, the config's quotas. Before, the
/// start applied the spec host.db kept for the API over the config's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_the_config_declares_by_a_restart_runs_as_the_config_says() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("storehost.toml");
    let plain = writer_config(std::path::Path::new(programs::WRITER), &[]);
    std::fs::write(&config, &plain).unwrap();
    let config_arg = config.display().to_string();
    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let (status, body) = call(
        &server.url,
        reqwest::Method::PUT,
        "/v1/stores/moved-in",
        Some(json!({"plugin": "writer", "quotas": {"burst": 11}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    server.stop_cleanly();

    std::fs::write(
        &config,
        format!(
            "{plain}[stores.moved-in]\nplugin = \"writer\"\n[stores.moved-in.quotas]\nburst = 33\n"
        ),
    )
    .unwrap();
    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let (status, store) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/moved-in",
        None,
    )
    .await;
    assert_eq!(status, 200, "{store}");
    assert_eq!(store["source"], "config", "{store}");
    assert_eq!(store["quotas"]["burst"], 33, "the config's quotas: {store}");
    server.stop_cleanly();

    // And the next start does not bring the API's spec back either.
    let server = ServerProcess::spawn(&data, &["--config", &config_arg], &[]);
    let (_, store) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/moved-in",
        None,
    )
    .await;
    assert_eq!(store["quotas"]["burst"], 33, "{store}");
}

/// A long-poll waiting when SIGTERM comes is answered (what it has: no events) as the shutdown
/// begins, and the server exits cleanly without waiting for it. Before, it got no answer at
/// all and held the shutdown for the 10 s grace, after which its connection was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_is_answered_when_the_server_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::spawn(&dir.path().join("data"), &[], &[]);
    let (status, view) = call(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/demo-alpha",
        None,
    )
    .await;
    assert_eq!(status, 200, "{view}");
    let head = view["head"].as_u64().unwrap();
    let url = server.url.clone();
    let poll = tokio::spawn(async move {
        call(
            &url,
            reqwest::Method::GET,
            &format!("/v1/stores/demo-alpha/events?after={head}&waitMs=25000"),
            None,
        )
        .await
    });
    // The long-poll is waiting when the signal comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.send_term();
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]), "{body}");
    let exited = server.wait_exit(Duration::from_secs(30));
    assert_eq!(
        exited.and_then(|s| s.code()),
        Some(0),
        "{}",
        server.run_log()
    );
    assert!(
        !server.run_log().contains("still open"),
        "no connection held the shutdown: {}",
        server.run_log()
    );
}

/// One host per data directory: a second `serve` on a directory a running host holds exits 1
/// at once, naming the holder, and touches nothing: the first host's stores and `host.db` stay
/// as they were (before, the second host started, its removal archived a store the first was
/// running, and both took appends into a hibernated store's log). Once the first host stops,
/// the directory starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        writer_config(std::path::Path::new(programs::WRITER), &["held"]),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let first = ServerProcess::spawn(&data, &args, &[]);
    let http = reqwest::Client::new();
    let append = |url: String| {
        http.post(format!("{url}/v1/stores/held/events"))
            .bearer_auth(PROCESS_TOKEN)
            .json(&json!({"type": "kv.put", "payload": {"key": "k", "value": 1}}))
            .send()
    };
    assert_eq!(append(first.url.clone()).await.unwrap().status(), 202);

    let mut second = ServerProcess::spawn_starting(&data, &args, &[]);
    let status = second.wait_exit(Duration::from_secs(60));
    let log = second.run_log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("is in use by another storehost (pid ")
            && log.contains("stop that host first, or give this one another --data-dir"),
        "{log}"
    );
    assert!(!log.contains("store started"), "{log}");
    assert!(!data.join("archive").exists());
    assert_eq!(append(first.url.clone()).await.unwrap().status(), 202);
    first.stop_cleanly();

    let again = ServerProcess::spawn(&data, &args, &[]);
    let (status, body) = {
        let response = http
            .get(format!("{}/v1/stores/held", again.url))
            .bearer_auth(PROCESS_TOKEN)
            .send()
            .await
            .unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["head"], 2, "both appends kept: {body}");
    again.stop_cleanly();
}
