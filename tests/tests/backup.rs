//! Backup and restore of one store through the real router: a backup taken while events keep
//! arriving restores into a store whose log and plugin tables match it up to the backup's seq
//! range; a restore rewinds a store and it resumes; corrupt, truncated, tampered and
//! mismatched archives are refused with a clear error and the store's data stays as it was.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use reqwest::Method;
use serde_json::{Value, json};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

async fn host() -> TestHost {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host
}

/// `GET /v1/stores/{store}/backup` → the archive and its `X-Backup-Seq-Last` header.
async fn backup(host: &TestHost, store: &str) -> (Vec<u8>, u64) {
    let response = host
        .client
        .get(format!("{}/v1/stores/{store}/backup", host.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "application/gzip");
    let last: u64 = response.headers()["x-backup-seq-last"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let length: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = response.bytes().await.unwrap().to_vec();
    assert_eq!(bytes.len(), length);
    (bytes, last)
}

/// `PUT /v1/stores/{store}/backup{query}` with `archive` → status and JSON.
async fn restore(host: &TestHost, store: &str, query: &str, archive: Vec<u8>) -> (u16, Value) {
    let response = host
        .client
        .request(
            Method::PUT,
            format!("{}/v1/stores/{store}/backup{query}", host.url),
        )
        .bearer_auth(TOKEN)
        .header("content-type", "application/gzip")
        .body(archive)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every event of `store`, in order.
async fn events(host: &TestHost, store: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = host
            .get(&format!(
                "/v1/stores/{store}/events?after={after}&limit=1000"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let batch = page["events"].as_array().unwrap().clone();
        if batch.is_empty() {
            return all;
        }
        after = page["next"].as_u64().unwrap();
        all.extend(batch);
    }
}

async fn applied(host: &TestHost, store: &str) -> Vec<u64> {
    serde_json::from_value(host.query(store, "applied", json!({})).await["seqs"].clone()).unwrap()
}

fn put(key: &str, value: u64) -> Value {
    json!({"type": "kv.put", "payload": {"key": key, "value": value}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_the_same_log_and_tables() {
    let host = Arc::new(host().await);
    host.add_store("bk-src", "writer", &[]).await;
    host.add_store("bk-copy", "writer", &[]).await;
    for i in 0..100 {
        host.post("/v1/stores/bk-src/events", put(&format!("pre-{i}"), i))
            .await;
    }

    // Batches keep arriving (with emitted events among them) while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let appender = {
        let (host, stop, batches) = (host.clone(), stop.clone(), batches.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let mut events: Vec<Value> =
                    (0..10).map(|i| put(&format!("k{n}-{i}"), n)).collect();
                events.push(
                    json!({"type": "kv.emit", "payload": {"type": "note", "payload": {"n": n}}}),
                );
                let (status, body) = host
                    .post("/v1/stores/bk-src/events", json!({ "events": events }))
                    .await;
                if status == 429 {
                    // Over the store's ingress rate (a slow backup lets this loop use up the
                    // burst): send the batch again, as a client would.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                assert_eq!(status, 202, "{body}");
                n += 1;
                batches.store(n, Ordering::SeqCst);
            }
        })
    };
    while batches.load(Ordering::SeqCst) < 5 {
        assert!(!appender.is_finished(), "the appender stopped");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (archive, last) = backup(&host, "bk-src").await;
    // More batches after the snapshot, so the source's log goes past it.
    let after_backup = batches.load(Ordering::SeqCst);
    while batches.load(Ordering::SeqCst) < after_backup + 5 {
        assert!(!appender.is_finished(), "the appender stopped");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    appender.await.unwrap();

    let (status, report) = restore(&host, "bk-copy", "?allowDifferentStore=true", archive).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["seq"]["last"], last, "{report}");
    assert_eq!(report["restoredFrom"]["storeId"], "bk-src");
    let cursor = report["cursor"].as_u64().unwrap();
    assert!(cursor <= last, "{report}");
    host.settle("bk-src").await;
    host.settle("bk-copy").await;

    let source_events = events(&host, "bk-src").await;
    let copy_events = events(&host, "bk-copy").await;
    let upto = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["seq"].as_u64().unwrap() <= last)
            .cloned()
            .collect()
    };
    assert_eq!(upto(&source_events).len() as u64, last);
    assert!(
        source_events.len() as u64 > last,
        "the source went on after the backup"
    );
    assert_eq!(
        upto(&copy_events),
        upto(&source_events),
        "the restored log is the source's log up to the backup's last seq"
    );
    assert!(
        copy_events[last as usize..]
            .iter()
            .all(|e| e["source"] == "plugin"),
        "past the backup the copy has only events its plugin emitted while catching up"
    );

    // The plugin's tables: every event up to the backup applied exactly once, same values.
    let expected: Vec<u64> = (1..=last).collect();
    let below = |seqs: Vec<u64>| seqs.into_iter().filter(|&s| s <= last).collect::<Vec<_>>();
    assert_eq!(below(applied(&host, "bk-copy").await), expected);
    assert_eq!(below(applied(&host, "bk-src").await), expected);
    let keys: Vec<Value> = upto(&source_events)
        .iter()
        .filter(|e| e["type"] == "kv.put")
        .map(|e| e["payload"]["key"].clone())
        .collect();
    let step = (keys.len() / 60).max(1);
    for key in keys.iter().step_by(step) {
        let args = json!({ "key": key });
        assert_eq!(
            host.query("bk-copy", "get", args.clone()).await,
            host.query("bk-src", "get", args).await,
            "key {key}"
        );
    }
}

/// Restoring an older backup rewinds the store: it resumes from the backup's head, handing
/// out the later seqs again, and a follower past that head is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_rewinds_a_store_which_resumes_from_there() {
    let host = host().await;
    host.add_store("rewind", "writer", &[]).await;
    for i in 0..50 {
        host.post("/v1/stores/rewind/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("rewind").await;
    let (archive, last) = backup(&host, "rewind").await;
    assert_eq!(last, 50);
    for i in 50..80 {
        host.post("/v1/stores/rewind/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("rewind").await;
    let (status, _) = host.post("/v1/stores/rewind/pause", json!({})).await;
    assert_eq!(status, 200);

    let (status, report) = restore(&host, "rewind", "", archive).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["state"], "paused",
        "a paused store stays paused: {report}"
    );
    let previous = report["previousData"].as_str().unwrap();
    assert!(
        std::path::Path::new(previous).join("events.db").is_file(),
        "the replaced data is kept: {report}"
    );
    let view = host
        .wait_for_status("rewind", |s| s["state"] == "paused")
        .await;
    assert_eq!(view["head"], 50, "{view}");
    assert_eq!(view["cursor"], 50, "{view}");

    let (status, _) = host.post("/v1/stores/rewind/resume", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        host.query("rewind", "get", json!({"key": "k60"})).await["value"],
        Value::Null
    );
    let seq = host
        .append("rewind", "kv.put", json!({"key": "after", "value": 1}))
        .await;
    assert_eq!(seq, 51, "the log goes on from the restored head");
    host.settle("rewind").await;

    // A follower that had read up to 80 before the restore is told, not left waiting for
    // seqs it would then skip (51 is a new event now): by long-poll and by event stream.
    let (status, body) = host
        .get("/v1/stores/rewind/events?after=80&waitMs=10000")
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "after_beyond_head", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("after=51 or earlier"), "{message}");
    let response = reqwest::Client::new()
        .get(format!("{}/v1/stores/rewind/events/stream", host.url))
        .bearer_auth(storehost_tests::TOKEN)
        .header("last-event-id", "80")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 409);
    let (status, body) = host.get("/v1/stores/rewind/events?after=50").await;
    assert_eq!(
        (status, &body["events"][0]["seq"]),
        (200, &json!(51)),
        "{body}"
    );
    assert_eq!(
        applied(&host, "rewind").await,
        (1..=51).collect::<Vec<u64>>()
    );
    assert_eq!(
        host.query("rewind", "get", json!({"key": "k49"})).await["value"],
        "49"
    );
}

/// Rebuilds `archive` with `edit` applied to each (path, bytes) entry.
fn rebuild(archive: &[u8], edit: impl Fn(&str, &mut Vec<u8>)) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut reader = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    for entry in reader.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        edit(&path, &mut bytes);
        entries.push((path, bytes));
    }
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        builder
            .append_data(&mut header, path, bytes.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_truncated_and_tampered_archives_are_refused_and_the_data_is_untouched() {
    let host = host().await;
    host.add_store("keep", "writer", &[]).await;
    for i in 0..40 {
        host.post("/v1/stores/keep/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("keep").await;
    let (archive, _) = backup(&host, "keep").await;
    for i in 40..45 {
        host.post("/v1/stores/keep/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("keep").await;
    let events_before = events(&host, "keep").await;
    let applied_before = applied(&host, "keep").await;

    let mut flipped = archive.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    let tampered_db = rebuild(&archive, |path, bytes| {
        if path == "events.db" {
            let last = bytes.len() - 100;
            bytes[last] ^= 0x01;
        }
    });
    let future_format = rebuild(&archive, |path, bytes| {
        if path == "manifest.json" {
            let mut manifest: Value = serde_json::from_slice(bytes).unwrap();
            manifest["formatVersion"] = json!(99);
            *bytes = serde_json::to_vec(&manifest).unwrap();
        }
    });
    let no_manifest = rebuild(&archive, |path, bytes| {
        if path == "manifest.json" {
            *bytes = b"not json".to_vec();
        }
    });
    let cases: Vec<(&str, Vec<u8>, &[u16], &str)> = vec![
        (
            "truncated",
            archive[..archive.len() / 2].to_vec(),
            &[400, 422],
            "",
        ),
        ("a flipped byte", flipped, &[400, 422], ""),
        (
            "not an archive",
            b"hello, I am not a backup".repeat(40),
            &[400],
            "invalid_archive",
        ),
        ("empty", Vec::new(), &[400], "empty_body"),
        ("a changed database", tampered_db, &[422], "invalid_backup"),
        ("a newer format", future_format, &[422], "invalid_backup"),
        ("a broken manifest", no_manifest, &[422], "invalid_backup"),
    ];
    for (what, bytes, statuses, code) in cases {
        let (status, body) = restore(&host, "keep", "", bytes).await;
        assert!(statuses.contains(&status), "{what}: {status} {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: {body}");
        if !code.is_empty() {
            assert_eq!(body["error"]["code"], code, "{what}: {body}");
        }
        if what == "a changed database" {
            assert!(message.contains("checksum"), "{what}: {body}");
        }
        if what == "a newer format" {
            assert!(message.contains("format version 99"), "{what}: {body}");
        }
    }

    // Nothing changed, the store still runs, and no scratch files are left behind.
    assert_eq!(events(&host, "keep").await, events_before);
    assert_eq!(applied(&host, "keep").await, applied_before);
    let seq = host
        .append("keep", "kv.put", json!({"key": "later", "value": 1}))
        .await;
    assert_eq!(seq, 46);
    host.settle("keep").await;
    let leftovers: Vec<_> = std::fs::read_dir(host.data_dir.join("stores"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // `.spare` is the pool of new-store directories, not a restore's scratch.
        .filter(|name| name.starts_with('.') && name != ".spare")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        !host.data_dir.join("archive").exists(),
        "no data was replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_another_store_is_refused_unless_asked_for() {
    let host = host().await;
    host.add_store("one-store", "writer", &[]).await;
    host.add_store("two-store", "writer", &[]).await;
    host.append("one-store", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.append("two-store", "kv.put", json!({"key": "b", "value": 2}))
        .await;
    host.settle("one-store").await;
    host.settle("two-store").await;
    let (archive, _) = backup(&host, "one-store").await;

    let (status, body) = restore(&host, "two-store", "", archive.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "store_mismatch");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowDifferentStore=true"),
        "{body}"
    );
    assert_eq!(
        host.query("two-store", "get", json!({"key": "b"})).await["value"],
        "2",
        "the refused restore changed nothing"
    );

    let (status, body) = restore(&host, "no-such-store", "", archive.clone()).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = host.get("/v1/stores/no-such-store/backup").await;
    assert_eq!(status, 404, "{body}");

    let (status, body) = restore(&host, "two-store", "?allowDifferentStore=true", archive).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        host.query("two-store", "get", json!({"key": "a"})).await["value"],
        "1"
    );
    assert_eq!(
        host.query("two-store", "get", json!({"key": "b"})).await["value"],
        Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_store_is_backed_up_asleep_and_restored() {
    let host = TestHost::start_with(TestHostOptions {
        idle_timeout: Some(std::time::Duration::from_millis(300)),
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("sleeper", "writer", &[]).await;
    for i in 1..=5 {
        host.append(
            "sleeper",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    host.settle("sleeper").await;
    host.wait_for_status("sleeper", |s| s["state"] == "hibernated")
        .await;

    let (archive, last) = backup(&host, "sleeper").await;
    assert_eq!(last, 5);
    let (_, view) = host.get("/v1/stores/sleeper").await;
    assert_eq!(
        view["state"], "hibernated",
        "a backup reads the files without waking the store: {view}"
    );

    host.append("sleeper", "kv.put", json!({"key": "k6", "value": 6}))
        .await;
    host.settle("sleeper").await;
    let (status, report) = restore(&host, "sleeper", "", archive).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        host.query("sleeper", "get", json!({"key": "k6"})).await["value"],
        Value::Null
    );
    assert_eq!(
        applied(&host, "sleeper").await,
        (1..=5).collect::<Vec<u64>>()
    );
}

/// A paused store restored from a backup with events waiting stays paused through the
/// restore: nothing is processed until it is resumed, and then every event once. Before, the
/// restored store started unpaused and was paused only once it had opened, by which time it
/// had processed an event the operator had held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_store_restored_with_events_waiting_processes_none_until_resumed() {
    let host = host().await;
    host.add_store("held", "writer", &[]).await;
    for i in 1..=5 {
        host.post("/v1/stores/held/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("held").await;
    let (status, _) = host.post("/v1/stores/held/pause", json!({})).await;
    assert_eq!(status, 200);
    for i in 6..=25 {
        host.post("/v1/stores/held/events", put(&format!("k{i}"), i))
            .await;
    }
    let (archive, last) = backup(&host, "held").await;
    assert_eq!(last, 25);

    // Restored again and again: whether the store got to an event before the pause reached
    // it was a race.
    for round in 0..20 {
        let (status, report) = restore(&host, "held", "", archive.clone()).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["state"], "paused", "{report}");
        let (_, view) = host.get("/v1/stores/held").await;
        assert_eq!(
            (&view["state"], &view["head"], &view["cursor"]),
            (&json!("paused"), &json!(25), &json!(5)),
            "round {round}: the restored store processed nothing while paused: {view}"
        );
    }
    assert_eq!(applied(&host, "held").await, (1..=5).collect::<Vec<u64>>());

    let (status, _) = host.post("/v1/stores/held/resume", json!({})).await;
    assert_eq!(status, 200);
    host.settle("held").await;
    assert_eq!(applied(&host, "held").await, (1..=25).collect::<Vec<u64>>());
}

/// A restore whose replaced data cannot be moved into `DATA_DIR/archive/` (here a file is in
/// the way; in life a full disk) keeps that data where the swap left it, beside the stores,
/// and says where: the restore itself is done. Before, the restore answered an error although
/// the store ran on the restored data, and the replaced data, left in the restore's scratch
/// directory, was deleted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_data_that_cannot_be_archived_is_kept_and_the_restore_stands() {
    let host = host().await;
    host.add_store("unarchived", "writer", &[]).await;
    for i in 1..=3 {
        host.post("/v1/stores/unarchived/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("unarchived").await;
    let (archive, last) = backup(&host, "unarchived").await;
    assert_eq!(last, 3);
    for i in 4..=6 {
        host.post("/v1/stores/unarchived/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("unarchived").await;
    std::fs::write(host.data_dir.join("archive"), "not a directory").unwrap();

    let (status, report) = restore(&host, "unarchived", "", archive).await;
    assert_eq!(status, 200, "{report}");
    let previous = std::path::PathBuf::from(report["previousData"].as_str().unwrap());
    assert!(
        previous.starts_with(host.data_dir.join("stores")),
        "kept beside the stores: {report}"
    );
    let kept = rusqlite::Connection::open(previous.join("events.db")).unwrap();
    let head: u64 = kept
        .query_row("SELECT max(seq) FROM events", [], |row| row.get(0))
        .unwrap();
    assert_eq!(head, 6, "the replaced data is all there");
    assert!(
        report["warnings"][0]
            .as_str()
            .is_some_and(|warning| warning.contains("could not be moved into the archive")),
        "{report}"
    );
    let (_, view) = host.get("/v1/stores/unarchived").await;
    assert_eq!(
        (&view["state"], &view["head"]),
        (&json!("running"), &json!(3)),
        "{view}"
    );
    let (_, health) = host.get("/health").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(applied(&host, "unarchived").await, vec![1, 2, 3]);
}

/// While a backup copies the two databases it holds the plugin's emitted events back: the
/// store goes on processing, but what it emits waits in its outbox, so the log copy holds no
/// event emitted by work the `store.db` copy lacks. Let go, they reach the log once. Before,
/// an event emitted between the two copies was in the restored log while the restored tables
/// lacked its work, which the restored store then did again (an LLM answering differently
/// the second time: a log saying one thing and the tables another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_emitted_while_a_backup_copies_wait_for_it_and_arrive_once() {
    let host = host().await;
    host.add_store("held", "writer", &[]).await;
    let store = host
        .orchestrator
        .get(&storehost_store::StoreId::new("held").unwrap())
        .await
        .expect("the store runs");
    let hold = store.hold_emits();
    let seq = host
        .append(
            "held",
            "kv.emit",
            json!({"type": "note", "payload": {"n": 1}}),
        )
        .await;
    // Processed (what it emits would be in the log before it shows so), but held back.
    let status = host
        .wait_for_status("held", |s| s["cursor"].as_u64() == Some(seq))
        .await;
    assert_eq!(
        status["head"].as_u64(),
        Some(seq),
        "the emit waits: {status}"
    );

    drop(hold);
    host.wait_for_status("held", |s| s["head"].as_u64() == Some(seq + 1))
        .await;
    host.settle("held").await;
    let notes: Vec<Value> = events(&host, "held")
        .await
        .into_iter()
        .filter(|e| e["type"] == "note")
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0]["payload"]["n"], 1);
}

/// A follower that names the log's epoch it read (`logEpoch`, in every read and the store's
/// view) is told when a restore replaced the log, even once the new log has grown past where
/// it was: without it, it would read on from its last seq and skip the new events the log
/// handed those seqs to. The answer says where to go on from: the backup's last seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_naming_the_log_epoch_is_told_a_restore_replaced_the_log() {
    let host = host().await;
    host.add_store("epochs", "writer", &[]).await;
    for i in 0..50 {
        host.post("/v1/stores/epochs/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("epochs").await;
    let (archive, last) = backup(&host, "epochs").await;
    assert_eq!(last, 50);
    for i in 50..70 {
        host.post("/v1/stores/epochs/events", put(&format!("k{i}"), i))
            .await;
    }
    host.settle("epochs").await;
    // The follower has read everything, up to 70.
    let (status, page) = host
        .get("/v1/stores/epochs/events?after=60&limit=1000")
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["next"], 70, "{page}");
    let read_epoch = page["logEpoch"].as_i64().expect("logEpoch in a read");
    let (_, view) = host.get("/v1/stores/epochs").await;
    assert_eq!(view["logEpoch"], read_epoch, "{view}");
    assert_eq!(view["logEpochAfter"], 0, "{view}");

    let (status, report) = restore(&host, "epochs", "", archive).await;
    assert_eq!(status, 200, "{report}");
    // The restored log grows past 70 before the follower comes back.
    for i in 0..25 {
        host.post("/v1/stores/epochs/events", put(&format!("new{i}"), i))
            .await;
    }
    host.settle("epochs").await;
    let (_, view) = host.get("/v1/stores/epochs").await;
    assert_eq!(view["head"], 75, "{view}");
    let new_epoch = view["logEpoch"].as_i64().unwrap();
    assert!(new_epoch > read_epoch, "{view}");
    assert_eq!(view["logEpochAfter"], 50, "{view}");

    let (status, body) = host
        .get(&format!(
            "/v1/stores/epochs/events?after=70&logEpoch={read_epoch}"
        ))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "log_replaced", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("after=50") && message.contains(&format!("logEpoch={new_epoch}")),
        "{message}"
    );
    let response = host
        .client
        .get(format!(
            "{}/v1/stores/epochs/events/stream?logEpoch={read_epoch}",
            host.url
        ))
        .bearer_auth(TOKEN)
        .header("last-event-id", "70")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 409);
    // Where it was told to go on from: every new event, once.
    let (status, page) = host
        .get(&format!(
            "/v1/stores/epochs/events?after=50&limit=1000&logEpoch={new_epoch}"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    let keys: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["payload"]["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys, (0..25).map(|i| format!("new{i}")).collect::<Vec<_>>());
}

/// A store's plugin runs while its backup is taken, and may swap a directory of its `/data`
/// for a link out of it (`../../victim`) between the backup's listing and its copy. The
/// backup never follows such a link: no file of another store reaches the archive. Before,
/// the copy went by path and followed the link; 7 or 8 of 20 swapped entries held the
/// victim's databases within two backups (helper 27), and a restore of that archive put
/// them in the racing store's `/data`; or the copy met an entry gone since the listing and the
/// backup failed with a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_never_follows_links_out_of_the_stores_files() {
    let host = host().await;
    host.deploy("racer", programs::LINK_RACER).await;
    host.add_store("victim", "writer", &[]).await;
    host.append(
        "victim",
        "kv.put",
        json!({"key": "k", "value": "victims-secret"}),
    )
    .await;
    host.settle("victim").await;
    let quotas = storehost_store::Quotas {
        cpu_ms_per_call: 9_000,
        cpu_ms_per_minute: 600_000,
        ..storehost_store::Quotas::default()
    };
    host.add_store_with("racer", "racer", &[], quotas).await;
    let (status, prepared) = host
        .get(&format!(
            "/v1/stores/racer/query/prepare?args={}",
            storehost_tests::urlencode(
                &json!({"entries": 20, "target": "../../victim", "mb": 8}).to_string()
            )
        ))
        .await;
    assert_eq!(status, 200, "{prepared}");

    let stop = Arc::new(AtomicBool::new(false));
    let swapping = tokio::spawn({
        let (url, client, stop) = (host.url.clone(), host.client.clone(), stop.clone());
        async move {
            let args = storehost_tests::urlencode(&json!({"entries": 20, "ms": 2_000}).to_string());
            let mut swaps = 0;
            while !stop.load(Ordering::Relaxed) {
                let answer: Value = client
                    .get(format!("{url}/v1/stores/racer/query/swap?args={args}"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                swaps += answer["swaps"].as_u64().unwrap_or(0);
            }
            swaps
        }
    });
    let mut outside = Vec::new();
    for _ in 0..6 {
        let (archive, _) = backup(&host, "racer").await;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&archive[..]));
        for entry in tar.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            // The swapped entries are empty directories: any file in one came from elsewhere.
            if path.starts_with("files/e") && entry.header().entry_type().is_file() {
                outside.push(path);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapping.await.unwrap();
    assert!(
        swaps > 0,
        "the plugin swapped its entries while the backups ran"
    );
    assert!(
        outside.is_empty(),
        "the racer's backups hold files from outside its /data: {outside:?}"
    );
}

/// A file with many names (hard links, which cost the `files` quota an entry each) is in the
/// backup once. Before, every name was copied in full: a 512 MiB file with 130,000 links fit a
/// 1 GiB quota and would have been 64 TiB of copies on the disk every store shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_many_names_is_backed_up_once() {
    let host = host().await;
    host.deploy("racer", programs::LINK_RACER).await;
    host.add_store("linker", "racer", &[]).await;
    let ask = |name: &'static str, args: Value| {
        let host = &host;
        async move {
            host.get(&format!(
                "/v1/stores/linker/query/{name}?args={}",
                storehost_tests::urlencode(&args.to_string())
            ))
            .await
        }
    };
    let (status, body) = ask(
        "prepare",
        json!({"entries": 0, "target": "nowhere", "mb": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = ask("hard_links", json!({"links": 20})).await;
    assert_eq!(status, 200, "{body}");

    let (archive, _) = backup(&host, "linker").await;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&archive[..]));
    let mut copied = 0;
    for entry in tar.entries().unwrap() {
        let entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        if path.starts_with("files/") && entry.header().entry_type().is_file() {
            copied += entry.header().size().unwrap();
        }
    }
    assert_eq!(copied, 2 << 20, "the file's bytes once, not once per name");
}

/// What `hostile {kind}` on the `raw_fs` program in `store` answered (its error message).
async fn raw_fs(host: &TestHost, store: &str, kind: &str) -> String {
    let args = storehost_tests::urlencode(&json!({ "kind": kind }).to_string());
    let (_, body) = host
        .get(&format!("/v1/stores/{store}/query/hostile?args={args}"))
        .await;
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A guest makes each directory through the handle of the one above, so its files may lie
/// deeper than a path reaches: 24 levels of 200-byte names are 4.8 KB, past `PATH_MAX`. Such a
/// store backs up, and its backup restores with the deep file in place. Before, the backup
/// copied the files by path and answered 500 ("file name too long").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_deeper_than_path_max_are_backed_up_and_restored() {
    let host = host().await;
    host.deploy("raw_fs", programs::RAW_FS).await;
    host.add_store("deep", "raw_fs", &[]).await;
    let message = raw_fs(&host, "deep", "deep_file").await;
    assert_eq!(message, "wrote bottom.txt 24 levels down");

    let (archive, _) = backup(&host, "deep").await;
    let bottom = format!(
        "files/{}bottom.txt",
        format!("{}/", "d".repeat(200)).repeat(24)
    );
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&archive[..]));
    let paths: Vec<String> = tar
        .entries()
        .unwrap()
        .map(|entry| entry.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(paths.contains(&bottom), "{paths:?}");

    host.add_store("copy", "raw_fs", &[]).await;
    let (status, body) = restore(&host, "copy", "?allowDifferentStore=true", archive).await;
    assert_eq!(status, 200, "{body}");
    let message = raw_fs(&host, "copy", "read_deep_file").await;
    assert_eq!(message, "bottom.txt holds \"at the bottom\"");
}
