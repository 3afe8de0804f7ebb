//! Correlation ids from the request to the plugin's own log lines (real binary, JSON logs): a
//! caller's `X-Request-Id` is echoed, kept on the events it appended (and on the events the
//! plugin emitted for them), and set on the guest's log lines with the store id; a request
//! without one gets a fresh id.

use std::time::Duration;

use serde_json::{Value, json};
use storehost_tests::process::{PROCESS_TOKEN, ServerProcess};
use storehost_tests::{programs, writer_config};

/// The server's JSON log lines so far.
fn log_lines(server: &ServerProcess) -> Vec<Value> {
    std::fs::read_to_string(&server.log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits for the guest's log line saying `message`.
async fn guest_line(server: &ServerProcess, message: &str) -> Value {
    for _ in 0..200 {
        if let Some(line) = log_lines(server)
            .into_iter()
            .find(|l| l["target"] == "guest" && l["fields"]["message"] == message)
        {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "no guest log line {message:?}; log:\n{}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
}

/// The `request_id` of the innermost span that has one.
fn span_request_id(line: &Value) -> Option<String> {
    line["spans"]
        .as_array()?
        .iter()
        .rev()
        .find_map(|span| span["request_id"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reaches_the_events_and_the_plugins_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        writer_config(std::path::Path::new(programs::WRITER), &["traced"]),
    )
    .unwrap();
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &["--config", &config.display().to_string()],
        &[("STOREHOST_LOG_FORMAT", "json"), ("STOREHOST_LOG", "info")],
    );
    let http = reqwest::Client::new();
    let events_url = format!("{}/v1/stores/traced/events", server.url);

    // A caller's id: echoed, on the event, and on the plugin's log line while it handles it.
    let response = http
        .post(&events_url)
        .bearer_auth(PROCESS_TOKEN)
        .header("x-request-id", "trace-4bf92f35:span-1")
        .json(&json!({"events": [
            {"type": "kv.log", "payload": {"message": "handling the traced event"}},
            {"type": "kv.emit", "payload": {"type": "kv.put", "payload": {"key": "k", "value": 1}}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(response.headers()["x-request-id"], "trace-4bf92f35:span-1");
    let line = guest_line(&server, "handling the traced event").await;
    assert_eq!(line["fields"]["store_id"], "traced", "{line}");
    assert_eq!(
        span_request_id(&line).as_deref(),
        Some("trace-4bf92f35:span-1"),
        "{line}"
    );

    let mut log = Value::Null;
    for _ in 0..100 {
        log = http
            .get(format!("{events_url}?after=0&limit=10"))
            .bearer_auth(PROCESS_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if log["events"].as_array().unwrap().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let events = log["events"].as_array().unwrap();
    assert_eq!(events.len(), 3, "{log}");
    for event in events {
        assert_eq!(
            event["requestId"], "trace-4bf92f35:span-1",
            "appended and emitted events carry the id: {event}"
        );
    }
    assert_eq!(events[2]["source"], "plugin");

    // A query's log lines carry its request's id too.
    let response = http
        .get(format!(
            "{}/v1/stores/traced/query/log?args=%7B%22message%22%3A%22answering%20the%20query%22%7D",
            server.url
        ))
        .bearer_auth(PROCESS_TOKEN)
        .header("x-request-id", "query-7")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let line = guest_line(&server, "answering the query").await;
    assert_eq!(span_request_id(&line).as_deref(), Some("query-7"), "{line}");

    // No id, or one that is not a plain token: a fresh one is made and used the same way.
    for given in [None, Some("has spaces in it")] {
        let mut request = http
            .post(&events_url)
            .bearer_auth(PROCESS_TOKEN)
            .json(&json!({"type": "kv.log", "payload": {"message": format!("fresh {given:?}")}}));
        if let Some(given) = given {
            request = request.header("x-request-id", given);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let fresh = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(fresh.starts_with("req-") && fresh.len() > 10, "{fresh}");
        let line = guest_line(&server, &format!("fresh {given:?}")).await;
        assert_eq!(span_request_id(&line), Some(fresh), "{line}");
    }

    // Errors carry the id as well (a support ticket can quote it).
    let response = http
        .get(format!("{}/v1/stores/nope-store", server.url))
        .bearer_auth(PROCESS_TOKEN)
        .header("x-request-id", "lost-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(response.headers()["x-request-id"], "lost-1");
    server.terminate();
}

/// A plugin cannot write lines of its own making into the host's log: in the human format,
/// where a line feed would start a new line, a guest log line holding a line feed, a carriage
/// return and a terminal escape stays one line with them escaped, and no line reads as the
/// host's own report about another store. The log, a file here, has no colour codes either,
/// and a filter or a format the host cannot use is named in it, not silently replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_log_line_stays_one_line_in_the_hosts_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("storehost.toml");
    std::fs::write(
        &config,
        writer_config(std::path::Path::new(programs::WRITER), &["forger"]),
    )
    .unwrap();
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &["--config", &config.display().to_string()],
        &[
            ("STOREHOST_LOG_FORMAT", "human"),
            ("STOREHOST_LOG", "info,storehost=loud"),
        ],
    );
    let forged =
        "2026-12-07T09:00:00.000000Z ERROR storehost_control: store removed store_id=victim";
    let message = format!("innocent\n{forged}\r\u{1b}[2Kmore");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/stores/forger/events", server.url))
        .bearer_auth(PROCESS_TOKEN)
        .json(&json!({"type": "kv.log", "payload": {"message": message}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);

    let escaped = format!("innocent\\n{forged}\\r\\u{{1b}}[2Kmore");
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(&server.log).unwrap_or_default();
        if log.contains(&escaped) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let line = log
        .lines()
        .find(|line| line.contains(&escaped))
        .unwrap_or_else(|| panic!("no guest line with {escaped:?} escaped; log:\n{log}"));
    assert!(
        line.contains("forger") && line.contains("innocent"),
        "one line, with the store's id: {line}"
    );
    assert!(
        !log.lines().any(|line| line.starts_with(forged)),
        "a line of the plugin's making: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "a terminal escape reached the log: {log}"
    );
    assert!(
        log.contains("STOREHOST_LOG=\"info,storehost=loud\" is not a log filter")
            && log.contains("STOREHOST_LOG_FORMAT=\"human\" is not a log format"),
        "{log}"
    );
    server.terminate();
}
