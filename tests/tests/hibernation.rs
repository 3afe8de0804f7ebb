//! Hibernation end to end: a store idle for `idle_timeout` drops its sandbox (its pool slot goes
//! back to the runtime) and shows `hibernated`; the next event, query, dead-letter retry or due
//! task wakes it transparently, and nothing is lost or applied twice. After `close_files_after`
//! more it also closes its files.

use std::time::Duration;

use serde_json::{Value, json};
use storehost_tests::{TestHost, TestHostOptions, programs};

/// Short enough that tests wait little, long enough that a store is never idle mid-test by
/// accident between two requests of the same step.
const IDLE: Duration = Duration::from_millis(300);

async fn host_with(options: TestHostOptions) -> TestHost {
    let host = TestHost::start_with(TestHostOptions {
        idle_timeout: Some(IDLE),
        ..options
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    host
}

async fn hibernated(host: &TestHost, id: &str) -> Value {
    host.wait_for_status(id, |s| s["state"] == "hibernated")
        .await
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_store_hibernates_and_an_event_wakes_it_exactly_once() {
    let host = host_with(TestHostOptions::default()).await;
    host.add_store("sleepy", "writer", &[]).await;
    for i in 1..=3 {
        host.append(
            "sleepy",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    host.settle("sleepy").await;
    let status = hibernated(&host, "sleepy").await;
    assert_eq!(status["cursor"], 3, "{status}");
    assert_eq!(status["lag"], 0, "{status}");
    assert_eq!(
        open_files_under(&host.data_dir.join("stores/sleepy")),
        Vec::<String>::new(),
        "a hibernated store keeps none of its files open"
    );

    // Events that arrive while it sleeps are accepted at once and processed, each once.
    let mut seqs = Vec::new();
    for i in 4..=6 {
        seqs.push(
            host.append(
                "sleepy",
                "kv.put",
                json!({"key": format!("k{i}"), "value": i}),
            )
            .await,
        );
    }
    assert_eq!(seqs, [4, 5, 6]);
    host.settle("sleepy").await;
    assert_eq!(
        host.query("sleepy", "applied", json!({})).await["seqs"],
        json!([1, 2, 3, 4, 5, 6])
    );
    let status = hibernated(&host, "sleepy").await;
    assert_eq!(status["eventsProcessed"], 6, "{status}");
    assert_eq!(status["deadLettered"], 0, "{status}");
    assert_eq!(status["errorsCount"], 0, "{status}");

    // Several hibernate/wake cycles in a row still apply every event once, in order.
    for i in 7..=9 {
        host.append(
            "sleepy",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
        host.settle("sleepy").await;
        hibernated(&host, "sleepy").await;
    }
    assert_eq!(
        host.query("sleepy", "applied", json!({})).await["seqs"],
        json!([1, 2, 3, 4, 5, 6, 7, 8, 9])
    );
    assert_eq!(
        host.query("sleepy", "count", json!({})).await,
        json!({"kv": 9, "applied": 9})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_wakes_a_hibernated_store_and_answers_from_its_data() {
    let host = host_with(TestHostOptions::default()).await;
    host.add_store("asked", "writer", &[]).await;
    host.append("asked", "kv.put", json!({"key": "colour", "value": "teal"}))
        .await;
    host.settle("asked").await;
    let before = hibernated(&host, "asked").await;

    assert_eq!(
        host.query("asked", "get", json!({"key": "colour"})).await,
        json!({"value": "teal"})
    );
    // The query ran in a fresh sandbox (the store was woken), then the store went back to sleep.
    let after = hibernated(&host, "asked").await;
    assert!(
        after["lastActivity"].as_i64() > before["lastActivity"].as_i64(),
        "the query was not answered by the store: {before} then {after}"
    );
    // Reads that need no plugin answer without waking anything, from the same files.
    let (status, body) = host.get("/v1/stores/asked/events?after=0").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["type"], "kv.put", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_task_wakes_a_hibernated_store_and_runs_once() {
    let host = host_with(TestHostOptions::default()).await;
    host.deploy("ticker", programs::TICKER).await;
    host.add_store("alarm", "ticker", &[]).await;
    let at = now_ms() + 3_000;
    host.append(
        "alarm",
        "schedule",
        json!({"taskId": "wake-up", "onceAtMs": at}),
    )
    .await;
    host.settle("alarm").await;

    // Asleep before the task is due, yet it knows when to wake.
    let status = hibernated(&host, "alarm").await;
    assert_eq!(status["nextTaskDueAt"], at, "{status}");
    assert!(
        now_ms() < at,
        "the store took too long to hibernate for this test to mean anything"
    );

    // The task runs on time, once, and the store sleeps again afterwards.
    let status = host
        .wait_for_status("alarm", |s| {
            s["tasksExecuted"] == 1 && s["state"] == "hibernated"
        })
        .await;
    assert_eq!(status["nextTaskDueAt"], Value::Null, "{status}");
    let runs = host.query("alarm", "runs", json!({})).await["runs"].clone();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    assert_eq!(runs[0]["taskId"], "wake-up");
    assert_eq!(runs[0]["scheduledFor"], at);
    // The task's emitted event was processed too (it woke the store once more, or ran in the
    // same waking).
    host.settle("alarm").await;
    let (_, events) = host.get("/v1/stores/alarm/events?after=0").await;
    let ran: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "task.ran")
        .collect();
    assert_eq!(ran.len(), 1, "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernated_stores_give_their_pool_slots_to_others() {
    // Two sandbox slots for three stores: only hibernation lets the third one run at all.
    let host = host_with(TestHostOptions {
        pool_slots: Some(2),
        ..TestHostOptions::default()
    })
    .await;
    for id in ["first", "second", "third"] {
        host.add_store(id, "writer", &[]).await;
    }
    for id in ["first", "second"] {
        host.append(id, "kv.put", json!({"key": "k", "value": id}))
            .await;
        host.settle(id).await;
    }
    hibernated(&host, "first").await;
    hibernated(&host, "second").await;

    host.append("third", "kv.put", json!({"key": "k", "value": "third"}))
        .await;
    host.settle("third").await;
    let status = host.get("/v1/stores/third").await.1;
    assert_eq!(status["deadLettered"], 0, "{status}");
    assert_eq!(status["errorsCount"], 0, "{status}");
    assert_eq!(
        host.query("third", "get", json!({"key": "k"})).await,
        json!({"value": "third"})
    );

    // And round again: each store wakes in the slot another one gave back.
    for id in ["first", "second", "third"] {
        hibernated(&host, id).await;
    }
    for id in ["first", "second", "third"] {
        host.append(id, "kv.put", json!({"key": "again", "value": id}))
            .await;
        host.settle(id).await;
        hibernated(&host, id).await;
    }
    for id in ["first", "second", "third"] {
        let status = host.get(&format!("/v1/stores/{id}")).await.1;
        assert_eq!(status["eventsProcessed"], 2, "{status}");
        assert_eq!(status["deadLettered"], 0, "{status}");
        assert_eq!(
            host.query(id, "get", json!({"key": "again"})).await,
            json!({"value": id})
        );
        // The query woke it: let it give its slot back before the next store's turn.
        hibernated(&host, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_update_retry_and_remove_work_on_a_hibernated_store() {
    let host = host_with(TestHostOptions::default()).await;
    host.deploy("flaky", programs::FLAKY).await;
    host.add_store("dozing", "flaky", &[("fail", "err")]).await;
    let risky = host.append("dozing", "risky", json!({"id": 1})).await;
    host.wait_for_status("dozing", |s| s["deadLettered"] == 1)
        .await;
    hibernated(&host, "dozing").await;

    // Pause: the store stays asleep and accepts events without processing them.
    let (status, body) = host.post("/v1/stores/dozing/pause", json!({})).await;
    assert_eq!(status, 200, "{body}");
    host.wait_for_status("dozing", |s| s["state"] == "paused")
        .await;
    let quiet = host.append("dozing", "noop", json!({})).await;
    tokio::time::sleep(IDLE * 2).await;
    let status = host.get("/v1/stores/dozing").await.1;
    assert_eq!(
        status["state"], "paused",
        "a paused store must not hibernate: {status}"
    );
    assert_eq!(status["lag"], 1, "{status}");

    // Resume: the waiting event is processed, then the store sleeps again.
    let (status, body) = host.post("/v1/stores/dozing/resume", json!({})).await;
    assert_eq!(status, 200, "{body}");
    host.settle("dozing").await;
    let status = hibernated(&host, "dozing").await;
    assert_eq!(status["cursor"], quiet, "{status}");

    // Update while asleep, then retry the dead letter: the retry wakes it under the new config.
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/dozing",
            Some(json!({"config": {"fail": "no"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    hibernated(&host, "dozing").await;
    let (status, body) = host
        .post(
            &format!("/v1/stores/dozing/dead-letters/{risky}/retry"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        host.query("dozing", "risky", json!({})).await["ids"],
        json!([1])
    );

    // Remove: a hibernated store stops like any other.
    hibernated(&host, "dozing").await;
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/dozing", None)
        .await;
    assert!(status == 200 || status == 204, "{status} {body}");
    let (status, _) = host.get("/v1/stores/dozing").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernation_is_off_when_no_idle_timeout_is_set() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("awake", "writer", &[]).await;
    host.append("awake", "kv.put", json!({"key": "k", "value": 1}))
        .await;
    host.settle("awake").await;
    tokio::time::sleep(IDLE * 3).await;
    let status = host.get("/v1/stores/awake").await.1;
    assert_eq!(status["state"], "running", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_hibernation_closes_the_stores_files_and_an_event_still_wakes_it() {
    let host = host_with(TestHostOptions {
        close_files_after: Duration::from_secs(3),
        ..TestHostOptions::default()
    })
    .await;
    host.add_store("dozing", "writer", &[]).await;
    let dir = host.data_dir.join("stores/dozing");
    host.append("dozing", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("dozing").await;

    // Hibernated: the sandbox is gone, the files are still open (a quick wake).
    hibernated(&host, "dozing").await;
    assert!(
        !open_files_under(&dir).is_empty(),
        "a store that just hibernated keeps its files open"
    );
    // Idle for `close_files_after` more: nothing of it is open any more; still `hibernated`.
    files_closed(&dir).await;
    let (_, status) = host.get("/v1/stores/dozing").await;
    assert_eq!(status["state"], "hibernated", "{status}");
    // Both WALs are kept for the next open (which then creates no file); small, they were
    // left as they were, not checkpointed (no fsync while closing), and no `-shm` file exists.
    for db in ["events.db", "store.db"] {
        let size = std::fs::metadata(dir.join(format!("{db}-wal")))
            .map(|m| m.len())
            .expect("the WAL is kept");
        assert!(
            size > 0 && size <= storehost_store::sqlite::IDLE_CLOSE_KEEPS_WAL_UP_TO,
            "{db}: {size} bytes of WAL left as they were"
        );
        assert!(!dir.join(format!("{db}-shm")).exists());
    }

    // A read of its log and of its dead letters opens files again without waking it; they
    // close again `close_files_after` later (before, they stayed open until the next event).
    let (status, events) = host.get("/v1/stores/dozing/events?after=0").await;
    assert_eq!(status, 200, "{events}");
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(1),
        "{events}"
    );
    let (status, dead) = host.get("/v1/stores/dozing/dead-letters").await;
    assert_eq!(status, 200, "{dead}");
    assert!(
        !open_files_under(&dir).is_empty(),
        "the reads opened the store's files"
    );
    files_closed(&dir).await;
    let (_, status) = host.get("/v1/stores/dozing").await;
    assert_eq!(status["state"], "hibernated", "{status}");

    // An event wakes it as before: applied once, after the first.
    host.append("dozing", "kv.put", json!({"key": "b", "value": 2}))
        .await;
    host.settle("dozing").await;
    assert_eq!(
        host.query("dozing", "applied", json!({})).await["seqs"],
        json!([1, 2])
    );
    assert_eq!(
        host.query("dozing", "get", json!({"key": "b"})).await["value"],
        "2"
    );
}

/// Waits (at most 15 s) until this process has no file open under `dir`.
async fn files_closed(dir: &std::path::Path) {
    for _ in 0..300 {
        if open_files_under(dir).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still open: {:?}", open_files_under(dir));
}

/// The files this process has open whose path starts with `prefix`.
fn open_files_under(prefix: &std::path::Path) -> Vec<String> {
    let prefix = prefix.display().to_string();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target.starts_with(&prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_stands_still_while_every_store_sleeps_and_a_spinning_guest_that_wakes_is_still_stopped()
 {
    let host = host_with(TestHostOptions {
        retry: storehost_store::store::RetryPolicy {
            attempts: 1,
            ..storehost_store::store::RetryPolicy::default()
        },
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("spin", programs::SPIN).await;
    host.add_store("sleeper", "writer", &[]).await;
    host.append("sleeper", "kv.put", json!({"key": "k", "value": 1}))
        .await;
    host.settle("sleeper").await;
    hibernated(&host, "sleeper").await;

    // No sandbox anywhere: the ticker thread parks (after the tick it may be in), and there
    // are no more wake-ups every millisecond.
    let runtime = host.orchestrator.runtime();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = runtime.epoch_ticks();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        runtime.epoch_ticks(),
        before,
        "the epoch advanced with no sandbox alive"
    );

    // The first sandbox to come starts it again: a guest spinning from its first call is
    // stopped at its CPU quota (not only at its far longer wall time).
    host.add_store_with(
        "spinner",
        "spin",
        &[],
        storehost_store::Quotas {
            cpu_ms_per_call: 50,
            wall_ms_per_call: 10_000,
            ..storehost_store::Quotas::default()
        },
    )
    .await;
    let spun = host.append("spinner", "misbehave", json!({})).await;
    host.settle("spinner").await;
    let (_, letters) = host.get("/v1/stores/spinner/dead-letters").await;
    let letter = &letters["deadLetters"][0];
    assert_eq!(letter["seq"], spun, "{letters}");
    assert_eq!(letter["reason"], "cpu_time", "{letter}");
    assert!(
        runtime.epoch_ticks() >= before + 50,
        "the epoch advanced while the guest ran"
    );
}

/// The fuel a store has used keeps counting across the sandboxes it goes through: each one
/// counts from 0, and the store's usage used to keep only the largest single sandbox's count,
/// so after a hibernation (or a trap) `usage.fuel` and its metric stood still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_used_keeps_counting_across_hibernations() {
    let host = host_with(TestHostOptions {
        fuel: true,
        ..TestHostOptions::default()
    })
    .await;
    host.add_store("metered", "writer", &[]).await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/metered",
            Some(json!({"quotas": {"fuel_per_call": 1_000_000_000u64}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let fuel = |status: &Value| status["usage"]["fuel"].as_u64().unwrap();
    let put = |i: u32| json!({"key": format!("k{i}"), "value": i});

    host.append("metered", "kv.put", put(1)).await;
    host.settle("metered").await;
    host.append("metered", "kv.put", put(2)).await;
    host.settle("metered").await;
    let (_, warm) = host.get("/v1/stores/metered").await;
    host.append("metered", "kv.put", put(3)).await;
    host.settle("metered").await;
    let (_, one_more) = host.get("/v1/stores/metered").await;
    let per_event = fuel(&one_more) - fuel(&warm);
    assert!(per_event > 0, "an event costs fuel: {one_more}");

    let asleep = hibernated(&host, "metered").await;
    assert_eq!(fuel(&asleep), fuel(&one_more));
    host.append("metered", "kv.put", put(4)).await;
    host.settle("metered").await;
    let (_, woken) = host.get("/v1/stores/metered").await;
    assert!(
        fuel(&woken) >= fuel(&asleep) + per_event,
        "the fresh sandbox's event adds its fuel ({per_event} or more): {} then {}",
        fuel(&asleep),
        fuel(&woken)
    );
}

/// A paused store idle for `idle_timeout` gives its sandbox back, then closes its files, and
/// stays `paused`: with a single pool slot another store runs meanwhile, and the paused one
/// runs again when resumed. Before, a paused store never hibernated and held its slot, its
/// guest's memory and its files for as long as it stayed paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_store_gives_its_sandbox_and_files_back_and_stays_paused() {
    let host = host_with(TestHostOptions {
        pool_slots: Some(1),
        ..TestHostOptions::default()
    })
    .await;
    host.add_store("resting", "writer", &[]).await;
    host.append("resting", "kv.put", json!({"key": "k", "value": "one"}))
        .await;
    host.settle("resting").await;
    let (status, body) = host.post("/v1/stores/resting/pause", json!({})).await;
    assert_eq!(status, 200, "{body}");
    // A query instantiates its sandbox while it is paused (it may have hibernated first).
    assert_eq!(
        host.query("resting", "get", json!({"key": "k"})).await,
        json!({"value": "one"})
    );
    host.wait_for_gauge("storehost_sandbox_slots_in_use", 0)
        .await;
    // Then its files close, as a hibernated store's do (`close_files_after` is 0 here).
    let dir = host.data_dir.join("stores/resting");
    files_closed(&dir).await;
    let (_, status) = host.get("/v1/stores/resting").await;
    assert_eq!(status["state"], "paused", "{status}");
    // An event appended while it is paused opens its log again; it closes again.
    host.append("resting", "kv.put", json!({"key": "k", "value": "three"}))
        .await;
    files_closed(&dir).await;

    host.add_store("busy", "writer", &[]).await;
    host.append("busy", "kv.put", json!({"key": "k", "value": "two"}))
        .await;
    host.settle("busy").await;
    let (_, status) = host.get("/v1/stores/busy").await;
    assert_eq!(
        status["errorsCount"], 0,
        "it ran in the freed slot: {status}"
    );
    hibernated(&host, "busy").await;

    let (status, body) = host.post("/v1/stores/resting/resume", json!({})).await;
    assert_eq!(status, 200, "{body}");
    host.settle("resting").await;
    let (_, status) = host.get("/v1/stores/resting").await;
    assert_eq!(status["errorsCount"], 0, "{status}");
    assert_eq!(status["eventsProcessed"], 2, "{status}");
    assert_eq!(
        host.query("resting", "get", json!({"key": "k"})).await,
        json!({"value": "three"})
    );
}

/// Events waiting in a log that cannot be read for a while (here its file is gone; in life
/// the host is out of open files or the disk fails) are read again every second and processed
/// once they can be. Before, a store whose read failed went to sleep with its files closed
/// and nothing left to wake it: its events waited for the next append, however long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_in_a_log_that_could_not_be_read_are_processed_once_it_can_be() {
    let host = host_with(TestHostOptions::default()).await;
    host.add_store("unread", "writer", &[]).await;
    host.append("unread", "kv.put", json!({"key": "k0", "value": 0}))
        .await;
    host.settle("unread").await;
    let (status, body) = host.post("/v1/stores/unread/pause", json!({})).await;
    assert_eq!(status, 200, "{body}");
    for i in 1..=5 {
        host.append(
            "unread",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    let dir = host.data_dir.join("stores/unread");
    files_closed(&dir).await;

    let (log, away) = (dir.join("events.db"), dir.join("events.db.away"));
    std::fs::rename(&log, &away).unwrap();
    let (status, body) = host.post("/v1/stores/unread/resume", json!({})).await;
    assert_eq!(status, 200, "{body}");
    // Long enough for the store to fail its read, go idle and close what it had open.
    tokio::time::sleep(IDLE * 4).await;
    let (_, view) = host.get("/v1/stores/unread").await;
    assert_eq!(
        (&view["head"], &view["cursor"]),
        (&json!(6), &json!(1)),
        "nothing was read while the log was away: {view}"
    );

    std::fs::rename(&away, &log).unwrap();
    host.settle("unread").await;
    let (_, view) = host.get("/v1/stores/unread").await;
    assert_eq!(
        (&view["eventsProcessed"], &view["errorsCount"]),
        (&json!(6), &json!(0)),
        "{view}"
    );
    assert_eq!(
        host.query("unread", "get", json!({"key": "k5"})).await,
        json!({"value": "5"})
    );
}

/// A host that restarts opens each store's files to recover it; a store with nothing to do
/// then goes straight to hibernation with its files closed, a paused one closes them and stays
/// paused, and one with a task due stays awake and runs it. Before, every store held its files
/// and caches for `idle_timeout` + `close_files_after` after each restart (30 minutes by
/// default: 0.5 MB and 8 files per store), and the stores past the open-file limit failed to
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hosts_idle_stores_sleep_with_their_files_closed_and_wake_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Long enough that nothing hibernates or closes its files by being idle in this test.
    let options = || TestHostOptions {
        data_dir: Some(data.clone()),
        idle_timeout: Some(Duration::from_secs(120)),
        close_files_after: Duration::from_secs(120),
        ..TestHostOptions::default()
    };
    let first = TestHost::start_with(options()).await;
    first.deploy("writer", programs::WRITER).await;
    first.deploy("ticker", programs::TICKER).await;
    for id in ["quiet", "resting"] {
        first.add_store(id, "writer", &[]).await;
        first
            .append(id, "kv.put", json!({"key": "k", "value": "before"}))
            .await;
        first.settle(id).await;
    }
    let (status, body) = first.post("/v1/stores/resting/pause", json!({})).await;
    assert_eq!(status, 200, "{body}");
    first
        .append(
            "resting",
            "kv.put",
            json!({"key": "k", "value": "while paused"}),
        )
        .await;
    // Due while the host is down (inside the catch-up window), and due after it restarts.
    let soon = now_ms() + 5_000;
    let later = soon + 25_000;
    for (id, at) in [("due-now", soon), ("due-later", later)] {
        first.add_store(id, "ticker", &[]).await;
        first
            .append(id, "schedule", json!({"taskId": "t", "onceAtMs": at}))
            .await;
        first.settle(id).await;
    }
    assert!(
        now_ms() < soon,
        "this machine was too slow for the test's timing"
    );
    first.stop().await;
    let down = u64::try_from(soon + 200 - now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(down)).await;

    let second = TestHost::start_with(options()).await;
    second.deploy("writer", programs::WRITER).await;
    second.deploy("ticker", programs::TICKER).await;
    second.orchestrator.restore_persisted().await.unwrap();
    let stores = second.data_dir.join("stores");
    hibernated(&second, "quiet").await;
    files_closed(&stores.join("quiet")).await;
    let (_, resting) = second.get("/v1/stores/resting").await;
    assert_eq!(resting["state"], "paused", "{resting}");
    files_closed(&stores.join("resting")).await;
    let sleeping = hibernated(&second, "due-later").await;
    assert_eq!(sleeping["nextTaskDueAt"], later, "{sleeping}");
    files_closed(&stores.join("due-later")).await;
    assert!(
        now_ms() < later,
        "this machine was too slow for the test's timing"
    );
    // The due task ran at once, its store awake.
    let ran = second
        .wait_for_status("due-now", |s| s["tasksExecuted"] == 1)
        .await;
    assert_eq!(ran["state"], "running", "{ran}");

    // Each wakes as a hibernated store does, with what it had.
    second
        .append("quiet", "kv.put", json!({"key": "k", "value": "after"}))
        .await;
    second.settle("quiet").await;
    assert_eq!(
        second.query("quiet", "applied", json!({})).await["seqs"],
        json!([1, 2])
    );
    let (status, body) = second.post("/v1/stores/resting/resume", json!({})).await;
    assert_eq!(status, 200, "{body}");
    second.settle("resting").await;
    assert_eq!(
        second.query("resting", "get", json!({"key": "k"})).await,
        json!({"value": "while paused"})
    );
    // The sleeping store's timer wakes it for its task.
    let ran = second
        .wait_for_status("due-later", |s| s["tasksExecuted"] == 1)
        .await;
    assert!(now_ms() >= later, "{ran}");
}
