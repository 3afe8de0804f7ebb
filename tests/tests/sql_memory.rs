//! One guest SQL statement may take only so much of the host's memory (`sql_memory`): SQLite
//! computes a row whole, and 200 columns of 8 MB values held 1.6 GB of the host's memory
//! before the host could refuse the result.
//!
//! The bound is SQLite's allocator, which the server gives SQLite before anything opens a
//! database. A test process whose other tests open databases on other threads could race it,
//! so every test of this binary installs it first thing (the first install runs while the
//! others wait for it, before any of them uses SQLite).

use serde_json::{Value, json};
use storehost_store::Quotas;
use storehost_tests::{TestHost, TestHostOptions, programs, urlencode};

/// Field `key` (in kB) of `/proc/self/status`.
fn status_kb(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/self/status"))
}

async fn ask_sql(host: &TestHost, store: &str, sql: &str) -> (u16, Value) {
    let args = json!({"sql": sql}).to_string();
    host.get(&format!(
        "/v1/stores/{store}/query/sql?args={}",
        urlencode(&args)
    ))
    .await
}

/// Quotas giving a statement time enough to compute a huge row (a read may run for what its
/// call has left of its CPU time), so only memory stops it.
fn only_memory_stops() -> Quotas {
    Quotas {
        cpu_ms_per_call: 60_000,
        cpu_ms_per_minute: 120_000,
        wall_ms_per_call: 120_000,
        ..Quotas::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_computing_a_huge_row_fails_without_taking_the_hosts_memory() {
    assert!(
        storehost_store::sql_memory::install(),
        "SQLite takes the allocator before it starts"
    );
    let host = TestHost::start_with(TestHostOptions::default()).await;
    host.deploy("abuse", programs::ABUSE).await;
    host.add_store_with("wide", "abuse", &[], only_memory_stops())
        .await;

    // A value as large as a value may be is fine.
    let (status, answer) = ask_sql(&host, "wide", "SELECT length(randomblob(7999000))").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["out"]["rows"],
        json!(["[Value::Integer(7999000)]"]),
        "{answer}"
    );

    let columns: Vec<String> = (0..200)
        .map(|i| format!("randomblob(7999000) AS c{i}"))
        .collect();
    let wide = format!("SELECT {}", columns.join(", "));
    // The peak resident set from here on (writing 5 resets it).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident set");
    let before = status_kb("VmRSS");
    let (status, answer) = ask_sql(&host, "wide", &wide).await;
    let grew_mb = status_kb("VmHWM").saturating_sub(before) / 1024;
    let error = answer["out"]["error"].as_str().unwrap_or_default();
    assert!(
        status == 200 && error.contains("bytes beyond the store's page cache"),
        "{status} (the resident set grew {grew_mb} MB): {answer}"
    );
    // The statement may take 64 MiB beyond the page cache; the whole row is 1.6 GB.
    assert!(
        grew_mb < 400,
        "the host's resident set grew {grew_mb} MB for one statement"
    );

    let (status, answer) = ask_sql(&host, "wide", "SELECT 1").await;
    assert_eq!(status, 200, "the store goes on: {answer}");
}

/// A statement that runs out of memory while reading a table makes SQLite roll back the whole
/// transaction (the batch of events it ran in). A plugin that ignores the error and answers
/// success has nothing kept to answer for: its invocation fails as `memory` (and is
/// dead-lettered), what it emitted is dropped, and the batch's other events (the one before
/// it, when it ran in its batch) are done again, each once. Before, the host's writes after such a call committed one by one: its emitted
/// event reached the log although nothing of its invocation was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_ignoring_a_statement_out_of_memory_keeps_nothing() {
    assert!(storehost_store::sql_memory::install());
    let host = TestHost::start_with(TestHostOptions::default()).await;
    host.deploy("abuse", programs::ABUSE).await;
    host.add_store_with("swallow", "abuse", &[], only_memory_stops())
        .await;
    host.append("swallow", "exec", json!({"sql": "CREATE TABLE t (x)"}))
        .await;
    host.settle("swallow").await;

    let columns: Vec<String> = (0..20)
        .map(|i| format!("randomblob(7999000) AS c{i}"))
        .collect();
    let wide = format!("SELECT {} FROM t", columns.join(", "));
    let events = vec![
        json!({"type": "exec", "payload": {"sql": "INSERT INTO t VALUES (1)"}}),
        json!({"type": "swallow", "payload": {"sql": wide}}),
        json!({"type": "exec", "payload": {"sql": "INSERT INTO t VALUES (2)"}}),
    ];
    let (status, body) = host
        .post("/v1/stores/swallow/events", json!({"events": events}))
        .await;
    assert_eq!(status, 202, "{body}");
    let swallowed_seq = body["seqs"][1].clone();
    host.settle("swallow").await;

    let (_, letters) = host.get("/v1/stores/swallow/dead-letters").await;
    let letter = &letters["deadLetters"][0];
    assert_eq!(letter["seq"], swallowed_seq, "{letters}");
    assert_eq!(letter["reason"], "memory", "{letters}");
    let (_, log) = host.get("/v1/stores/swallow/events?limit=100").await;
    let types: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert!(
        !types.contains(&"swallowed"),
        "nothing of the failed invocation reached the log: {types:?}"
    );
    let (status, answer) = ask_sql(&host, "swallow", "SELECT x FROM t ORDER BY x").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["out"]["rows"],
        json!(["[Value::Integer(1)]", "[Value::Integer(2)]"]),
        "the batch's other events, each once"
    );
}
