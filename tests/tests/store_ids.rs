//! `STORE_IDS` with the real binary (SPEC §5a): a list whose every id is invalid makes
//! `storehost serve` refuse to start, before it listens, with the id rule in its message; a list
//! with spaces, empty entries and duplicates starts each listed store once (source `env`) and
//! warns about the duplicate in the log.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storehost_tests::process::{PROCESS_TOKEN, ServerProcess, storehost_bin};
use storehost_tests::{programs, writer_config};

/// `GET path` on `url` with the admin token; answers status and JSON.
fn get(url: &str, path: &str) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(PROCESS_TOKEN)
        .send()
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

/// The ids of the stores the server at `url` runs, sorted (`/health`'s `monitoredStoreIds`).
fn monitored(url: &str) -> Vec<String> {
    let (status, health) = get(url, "/health");
    assert_eq!(status, 200, "{health}");
    let mut ids: Vec<String> = health["monitoredStoreIds"]
        .as_array()
        .unwrap_or_else(|| panic!("{health}"))
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    ids.sort_unstable();
    ids
}

/// A config file in `dir` running no store, on the `writer` plugin: the only stores are then
/// those `STORE_IDS` names.
fn empty_config(dir: &Path) -> String {
    let path = dir.join("storehost.toml");
    std::fs::write(&path, writer_config(Path::new(programs::WRITER), &[])).unwrap();
    path.display().to_string()
}

/// Every id invalid: `storehost serve` exits non-zero within the deadline, never prints its
/// listen address, and stderr names `STORE_IDS`, says none of its ids is valid and gives the
/// id rule.
#[test]
fn store_ids_that_are_all_invalid_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stdout_path = dir.path().join("stdout.txt");
    let stderr_path = dir.path().join("stderr.txt");
    let mut child = Command::new(storehost_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("STOREHOST_ADMIN_TOKEN", PROCESS_TOKEN)
        .env("STORE_IDS", "../x, a b")
        .env_remove("PORT")
        .env_remove("STORE_DATA_PATH")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn storehost");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "storehost serve with no valid STORE_IDS still runs after 60 s; stdout:\n{}",
                std::fs::read_to_string(&stdout_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success(), "exit {status}; stderr:\n{stderr}");
    assert!(
        !stdout.contains("listening on"),
        "it refused before listening: {stdout}"
    );
    assert!(stderr.contains("STORE_IDS"), "{stderr}");
    assert!(
        stderr.contains("none of its 2 ids is valid"),
        "says why: {stderr}"
    );
    assert!(
        stderr.contains("3 to 64 characters"),
        "gives the id rule: {stderr}"
    );
    assert!(
        !data.join("host.db").exists() && !data.join("stores").exists(),
        "nothing was started"
    );
}

/// `" one-store, ,one-store,two-store "`: trimmed, the empty entry dropped, the duplicate used
/// once: exactly `one-store` and `two-store` run (source `env`), and the log warns that
/// `one-store` is listed twice.
#[test]
fn store_ids_are_trimmed_deduplicated_and_the_duplicate_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let config = empty_config(dir.path());
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &["--config", &config],
        &[("STORE_IDS", " one-store, ,one-store,two-store ")],
    );

    assert_eq!(monitored(&server.url), ["one-store", "two-store"]);
    for id in ["one-store", "two-store"] {
        let (status, view) = get(&server.url, &format!("/v1/stores/{id}"));
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["source"], "env", "{view}");
        assert_eq!(view["plugin"]["name"], json!("writer"), "{view}");
    }

    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains(r#"STORE_IDS lists "one-store" 2 times; it is used once"#),
        "the duplicate is warned about; log:\n{log}"
    );
    assert!(
        !log.contains("two-store\" 2 times"),
        "only the duplicate is; log:\n{log}"
    );
    server.stop_cleanly();
}

/// Without a config file — the drop-in for the service this replaces — `STORE_IDS` names
/// exactly the stores that run: the embedded default's demo stores are left out, so two ids
/// fit `MAX_INSTANCES_PER_SERVER=2`. Before, the three demo stores ran too (taking three of
/// the slots, and undeletable: "declared in the config file" with no file), and this host
/// refused to start. The replaced service's reconcile interval without a registry to reconcile
/// against is warned about (it was ignored without a word).
#[test]
fn without_a_config_file_store_ids_are_the_only_stores() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &[],
        &[
            ("STORE_IDS", "ws-one,ws-two"),
            ("MAX_INSTANCES_PER_SERVER", "2"),
            ("WORKSPACE_RECONCILE_INTERVAL_MS", "60000"),
        ],
    );
    assert_eq!(monitored(&server.url), ["ws-one", "ws-two"]);
    let log = server.run_log();
    assert!(
        log.contains("WORKSPACE_RECONCILE_INTERVAL_MS is set, but no registry is configured"),
        "log:\n{log}"
    );
    server.stop_cleanly();
}
