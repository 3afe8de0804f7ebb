//! Isolation on disk: a guest reaches its own files directory and its own tables, nothing else —
//! not through WASI paths (`..`, absolute paths, planted symlinks), not through SQL (ATTACH,
//! pragmas, extensions, the host's tables).

use serde_json::json;
use storehost_tests::{TestHost, programs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_open_anything_outside_its_files_directory() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    let escape = host.add_store("escaper", "escape", &[]).await;
    let victim = host.add_store("victim", "escape", &[]).await;
    let secret = victim.dir().files.join("secret.txt");
    std::fs::write(&secret, "the victim's secret").unwrap();
    // Links planted in the guest's own directory by someone else still lead nowhere.
    let files = &escape.dir().files;
    std::os::unix::fs::symlink(&secret, files.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../../victim/files/secret.txt", files.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc", files.join("etc-link")).unwrap();

    let victim_files = victim.dir().files.display().to_string();
    let hostile = [
        json!({"path": "/data/../store.db", "op": "read"}),
        json!({"path": "/data/../../victim/files/secret.txt", "op": "read"}),
        json!({"path": "../", "op": "list"}),
        json!({"path": "/", "op": "list"}),
        json!({"path": "/etc/passwd", "op": "read"}),
        json!({"path": format!("{victim_files}/secret.txt"), "op": "read"}),
        json!({"path": "/data/../events.db", "op": "write"}),
        json!({"path": "/data/abs-link", "op": "read"}),
        json!({"path": "/data/rel-link", "op": "read"}),
        json!({"path": "/data/etc-link/passwd", "op": "read"}),
        json!({"path": "/data/new-link", "op": "symlink_read", "target": "../store.db"}),
        json!({"path": "/data/new-abs-link", "op": "symlink_read", "target": "/etc/passwd"}),
    ];
    for probe in &hostile {
        host.append("escaper", "probe.fs", probe.clone()).await;
    }
    // Its own directory works, which shows the probes themselves work.
    host.append(
        "escaper",
        "probe.fs",
        json!({"path": "/data/mine.txt", "op": "write"}),
    )
    .await;
    host.append(
        "escaper",
        "probe.fs",
        json!({"path": "/data/mine.txt", "op": "read"}),
    )
    .await;

    let results = host.probes("escaper").await;
    assert_eq!(results.len(), hostile.len() + 2, "{results:#?}");
    for result in &results[..hostile.len()] {
        assert_eq!(result["allowed"], false, "escaped the sandbox: {result}");
    }
    for result in &results[hostile.len()..] {
        assert_eq!(result["allowed"], true, "its own files must work: {result}");
    }
    assert!(escape.dir().files.join("mine.txt").exists());
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        "the victim's secret"
    );
}

/// A guest reaches no network: `wasi:sockets` is linked (wasmtime-wasi links it with the rest),
/// and the host refuses every socket and name lookup, so a plugin can neither reach the
/// host's own services on loopback (the API, a database) nor hold sockets beside its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_open_a_socket_or_look_up_a_name() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    host.add_store("escaper", "escape", &[]).await;
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    service.set_nonblocking(true).unwrap();
    let port = service.local_addr().unwrap().port();
    // Refused at the first step, by the host: no socket is made, so none holds a host file.
    // (A lookup the host does not allow is a `permanent-resolver-failure` in wasmtime-wasi.)
    let probes = [
        ("tcp", "create refused: access-denied"),
        ("udp", "create refused: access-denied"),
        ("lookup", "resolve refused: permanent-resolver-failure"),
    ];
    for (op, _) in probes {
        host.append("escaper", "probe.net", json!({"op": op, "port": port}))
            .await;
    }

    let results = host.probes("escaper").await;
    assert_eq!(results.len(), probes.len(), "{results:#?}");
    for (result, (op, refusal)) in results.iter().zip(probes) {
        assert_eq!(
            result["allowed"], false,
            "{op} reached the network: {result}"
        );
        assert_eq!(result["detail"], refusal, "{op}: {result}");
    }
    assert!(
        service.accept().is_err(),
        "nothing connected to the host's loopback service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sql_cannot_attach_another_store_or_touch_host_tables() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    host.add_store("sql-escaper", "escape", &[]).await;
    let victim = host.add_store("sql-victim", "escape", &[]).await;
    let victim_db = victim.dir().store_db().display().to_string();

    let hostile = [
        format!("ATTACH DATABASE '{victim_db}' AS victim"),
        format!("VACUUM INTO '{victim_db}.copy'"),
        "PRAGMA journal_mode = DELETE".to_owned(),
        "PRAGMA max_page_count = 999999999".to_owned(),
        "PRAGMA writable_schema = ON".to_owned(),
        "SELECT load_extension('/usr/lib/x86_64-linux-gnu/libz.so')".to_owned(),
        "SELECT last_seq FROM _host_cursor".to_owned(),
        "UPDATE _host_cursor SET last_seq = 1000".to_owned(),
        "INSERT INTO _host_outbox (origin, type, payload, at) VALUES ('x', 'forged', '{}', 0)"
            .to_owned(),
        "DELETE FROM _host_dead_letters".to_owned(),
        "BEGIN IMMEDIATE".to_owned(),
        "COMMIT".to_owned(),
        "CREATE TEMP TABLE sneaky (x)".to_owned(),
    ];
    for sql in &hostile {
        host.append(
            "sql-escaper",
            "probe.sql",
            json!({"sql": sql, "mode": "execute"}),
        )
        .await;
    }
    host.append(
        "sql-escaper",
        "probe.sql",
        json!({"sql": "CREATE TABLE mine (x)", "mode": "execute"}),
    )
    .await;

    let results = host.probes("sql-escaper").await;
    assert_eq!(results.len(), hostile.len() + 1, "{results:#?}");
    for (result, sql) in results.iter().zip(&hostile) {
        assert_eq!(result["allowed"], false, "{sql} was allowed: {result}");
    }
    assert_eq!(
        results.last().unwrap()["allowed"],
        true,
        "its own tables work"
    );
    assert!(!std::path::Path::new(&format!("{victim_db}.copy")).exists());

    // Nothing forged reached the log; the cursor is where processing put it.
    let (_, store) = host.get("/v1/stores/sql-escaper").await;
    assert_eq!(store["head"], store["cursor"]);
    assert_eq!(store["head"], hostile.len() as u64 + 1);
}

/// A query runs read-only, also for a statement an event compiled before: SQLite judges a
/// statement once, when it is compiled, and the guest's statements are cached by their text,
/// so an INSERT compiled during an event used to run again inside a query (taking the write
/// lock and writing the WAL before the query's rollback). Reads still work there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_cannot_write_even_with_a_statement_an_event_compiled() {
    let host = TestHost::start().await;
    host.deploy("escape", programs::ESCAPE).await;
    host.add_store("read-only", "escape", &[]).await;
    let insert = "INSERT INTO mine (x) VALUES (1)";
    for sql in ["CREATE TABLE mine (x)", insert] {
        host.append(
            "read-only",
            "probe.sql",
            json!({"sql": sql, "mode": "execute"}),
        )
        .await;
    }
    let results = host.probes("read-only").await;
    assert!(
        results.iter().all(|r| r["allowed"] == true),
        "the event wrote: {results:#?}"
    );

    let answer = host
        .query(
            "read-only",
            "probe.sql",
            json!({"sql": insert, "mode": "execute"}),
        )
        .await;
    assert_eq!(answer["allowed"], false, "{answer}");
    let detail = answer["detail"].as_str().unwrap();
    assert!(detail.contains("read-only"), "{detail}");
    let answer = host
        .query(
            "read-only",
            "probe.sql",
            json!({"sql": "SELECT count(*) FROM mine", "mode": "query"}),
        )
        .await;
    assert_eq!(answer["allowed"], true, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains('1'), "{answer}");
}
