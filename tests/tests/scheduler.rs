//! The scheduler capability end to end: a real plugin schedules tasks through the `scheduler`
//! import, the store's actor runs them through `run-task`, and every execution commits once.

use std::time::Duration;

use serde_json::{Value, json};
use storehost_tests::{TestHost, TestHostOptions, programs};

const MINUTE: i64 = 60_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn ticker_host() -> TestHost {
    let host = TestHost::start().await;
    host.deploy("ticker", programs::TICKER).await;
    host.add_store("clock", "ticker", &[]).await;
    host
}

/// Polls `GET /v1/stores/clock/tasks` until `check` holds (at most 30 s).
async fn wait_for_tasks(host: &TestHost, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        let (status, body) = host.get("/v1/stores/clock/tasks").await;
        assert_eq!(status, 200, "{body}");
        if check(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the tasks never reached the expected state; last: {last}");
}

fn executions<'a>(tasks: &'a Value, task_id: &str) -> Vec<&'a Value> {
    tasks["executions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|run| run["taskId"] == task_id)
        .collect()
}

async fn runs(host: &TestHost) -> Vec<Value> {
    host.query("clock", "runs", json!({})).await["runs"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_task_runs_once_and_its_effects_commit_with_it() {
    let host = ticker_host().await;
    let at = now_ms() + 2_000;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "remind", "onceAtMs": at, "payload": {}}),
    )
    .await;
    host.settle("clock").await;
    // Before it is due, the schedule is visible to the operator and to the plugin.
    let (code, scheduled) = host.get("/v1/stores/clock/tasks").await;
    assert_eq!(code, 200, "{scheduled}");
    assert_eq!(
        scheduled["schedules"],
        json!([{"taskId": "remind", "kind": "once", "spec": at.to_string(), "payload": "{}", "nextRunAt": at}])
    );
    assert_eq!(scheduled["nextDueAt"], at);
    let listed = host.query("clock", "scheduled", json!({})).await;
    assert_eq!(
        listed["tasks"],
        json!([{"taskId": "remind", "nextRunMs": at}])
    );

    let tasks = wait_for_tasks(&host, |t| !executions(t, "remind").is_empty()).await;
    let run = executions(&tasks, "remind")[0];
    assert_eq!(run["status"], "completed", "{tasks}");
    assert_eq!(run["scheduledFor"], at);
    assert_eq!(
        tasks["schedules"],
        json!([]),
        "a one-shot task is gone after its run"
    );

    host.settle("clock").await;
    let runs = runs(&host).await;
    assert_eq!(
        runs,
        vec![
            json!({"taskId": "remind", "scheduledFor": at, "executionId": format!("remind@{at}")})
        ]
    );
    // The event it emitted was appended once, after the commit.
    let (_, log) = host.get("/v1/stores/clock/events?after=0&limit=100").await;
    let ran: Vec<_> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "task.ran")
        .collect();
    assert_eq!(ran.len(), 1, "{log}");
    assert_eq!(ran[0]["source"], "plugin");
    let (_, status) = host.get("/v1/stores/clock").await;
    assert_eq!(status["tasksExecuted"], 1, "{status}");
}

/// A query is read-only: cancelling a task from one fails the query as the plugin's `trap`
/// (the import has no error to answer), saying why, and the task stays scheduled.
/// A task cancelled by another task due at the same time does not run: each execution reads
/// its schedule again when it claims it. Before, both were read together when they fell due,
/// and the cancelled one ran from that read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_cancelled_by_a_task_due_with_it_does_not_run() {
    let host = ticker_host().await;
    let at = now_ms() + 1_500;
    let (status, body) = host
        .post(
            "/v1/stores/clock/events",
            json!({"events": [
                {"type": "schedule", "payload": {"taskId": "a-canceller", "onceAtMs": at, "payload": {"cancel": "b-cancelled"}}},
                {"type": "schedule", "payload": {"taskId": "b-cancelled", "onceAtMs": at, "payload": {}}},
            ]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let tasks = wait_for_tasks(&host, |t| !executions(t, "a-canceller").is_empty()).await;
    assert_eq!(executions(&tasks, "a-canceller")[0]["status"], "completed");
    let runs = runs(&host).await;
    assert_eq!(
        runs.iter().map(|run| &run["taskId"]).collect::<Vec<_>>(),
        vec!["a-canceller"],
        "the cancelled task did not run: {runs:?}"
    );
    let (_, tasks) = host.get("/v1/stores/clock/tasks").await;
    assert!(executions(&tasks, "b-cancelled").is_empty(), "{tasks}");
    assert!(
        !tasks["schedules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|schedule| schedule["taskId"] == "b-cancelled"),
        "{tasks}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_cannot_cancel_a_task() {
    let host = ticker_host().await;
    let at = now_ms() + 3_600_000;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "later", "onceAtMs": at, "payload": {}}),
    )
    .await;
    host.settle("clock").await;

    let args = json!({"taskId": "later"}).to_string();
    let (status, body) = host
        .get(&format!(
            "/v1/stores/clock/query/cancel?args={}",
            storehost_tests::urlencode(&args)
        ))
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "trap", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("scheduler.cancel") && message.contains("a query is read-only"),
        "{message}"
    );
    let listed = host.query("clock", "scheduled", json!({})).await;
    assert_eq!(
        listed["tasks"],
        json!([{"taskId": "later", "nextRunMs": at}])
    );
    // The store goes on: the same cancel in an event handler works.
    host.append("clock", "cancel", json!({"taskId": "later"}))
        .await;
    host.settle("clock").await;
    let listed = host.query("clock", "scheduled", json!({})).await;
    assert_eq!(listed["tasks"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_runs_again_counted_from_the_end_of_each_execution() {
    let host = ticker_host().await;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "poll", "everyMs": 1000, "payload": {}}),
    )
    .await;
    let tasks = wait_for_tasks(&host, |t| executions(t, "poll").len() >= 2).await;
    let latest = executions(&tasks, "poll")[0];
    let schedule = &tasks["schedules"][0];
    assert_eq!(schedule["taskId"], "poll");
    assert_eq!(schedule["kind"], "every");
    // nextExecutionAt = completion of the latest execution + the interval.
    assert_eq!(
        schedule["nextRunAt"].as_i64().unwrap(),
        latest["finishedAt"].as_i64().unwrap() + 1000,
        "{tasks}"
    );
    // Different due times each ran, each once.
    let runs = runs(&host).await;
    let mut due: Vec<i64> = runs
        .iter()
        .map(|r| r["scheduledFor"].as_i64().unwrap())
        .collect();
    let count = due.len();
    due.dedup();
    assert_eq!(due.len(), count, "no execution ran twice: {runs:?}");

    // Cancelling stops it.
    host.append("clock", "cancel", json!({"taskId": "poll"}))
        .await;
    let tasks = wait_for_tasks(&host, |t| t["schedules"] == json!([])).await;
    assert_eq!(tasks["nextDueAt"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_expression_is_honoured() {
    let host = ticker_host().await;
    // Every second, on the second (6 fields: seconds first).
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "tick", "cron": "* * * * * *", "payload": {}}),
    )
    .await;
    let tasks = wait_for_tasks(&host, |t| executions(t, "tick").len() >= 2).await;
    for run in executions(&tasks, "tick") {
        assert_eq!(
            run["scheduledFor"].as_i64().unwrap() % 1000,
            0,
            "cron occurrences fall on whole seconds: {run}"
        );
    }
    // An invalid expression is refused with a clear error, so the handler fails.
    let seq = host
        .append(
            "clock",
            "schedule",
            json!({"taskId": "bad", "cron": "every tuesday", "payload": {}}),
        )
        .await;
    let status = host
        .wait_for_status("clock", |s| s["deadLettered"].as_u64() == Some(1))
        .await;
    let failure = &status["lastFailure"];
    assert_eq!(failure["seq"], seq);
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("invalid cron expression"),
        "{failure}"
    );
}

/// After downtime, an occurrence missed within the catch-up window runs once and one older
/// than it is recorded as `missed`; a one-shot task scheduled for a time already past runs,
/// however long ago that was (the plugin world says so: nothing was missed). The downtime is
/// made by stopping the host and moving the stored due times back, as if it had been down
/// for twenty minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_occurrences_run_once_inside_the_catch_up_window_and_are_recorded_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = || TestHostOptions {
        data_dir: Some(data.clone()),
        task_catch_up: Duration::from_secs(600),
        ..TestHostOptions::default()
    };
    let first = TestHost::start_with(options()).await;
    first.deploy("ticker", programs::TICKER).await;
    first.add_store("clock", "ticker", &[]).await;
    let now = now_ms();
    for task in ["recent", "stale"] {
        first
            .append(
                "clock",
                "schedule",
                json!({"taskId": task, "onceAtMs": now + 60 * MINUTE, "payload": {}}),
            )
            .await;
    }
    first.settle("clock").await;
    first.stop().await;
    let (inside, outside) = (now - 5 * MINUTE, now - 20 * MINUTE);
    let db = rusqlite::Connection::open(data.join("stores/clock/store.db")).unwrap();
    for (task, due) in [("recent", inside), ("stale", outside)] {
        let moved = db
            .execute(
                "UPDATE _host_schedules SET spec = ?2, next_run_at = ?2, created_at = ?3,
                     updated_at = ?3 WHERE task_id = ?1",
                rusqlite::params![task, due, now - 30 * MINUTE],
            )
            .unwrap();
        assert_eq!(moved, 1);
    }
    drop(db);

    let host = TestHost::start_with(options()).await;
    host.deploy("ticker", programs::TICKER).await;
    host.orchestrator.restore_persisted().await.unwrap();
    // Scheduled now for twenty minutes ago.
    let past = now_ms() - 20 * MINUTE;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "asked-late", "onceAtMs": past, "payload": {}}),
    )
    .await;
    let tasks = wait_for_tasks(&host, |t| {
        ["recent", "stale", "asked-late"]
            .iter()
            .all(|task| !executions(t, task).is_empty())
    })
    .await;
    assert_eq!(executions(&tasks, "recent")[0]["status"], "completed");
    assert_eq!(executions(&tasks, "stale")[0]["status"], "missed");
    assert_eq!(executions(&tasks, "stale")[0]["scheduledFor"], outside);
    assert_eq!(executions(&tasks, "asked-late")[0]["status"], "completed");
    assert_eq!(executions(&tasks, "asked-late")[0]["scheduledFor"], past);
    host.settle("clock").await;
    let mut ran: Vec<String> = runs(&host)
        .await
        .iter()
        .map(|run| run["taskId"].as_str().unwrap().to_owned())
        .collect();
    ran.sort();
    assert_eq!(
        ran,
        ["asked-late", "recent"],
        "the occurrence older than the window did not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_retried_then_recorded_as_failed_without_effects() {
    let host = ticker_host().await;
    let at = now_ms();
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "doomed", "onceAtMs": at, "payload": {"fail": true}}),
    )
    .await;
    let tasks = wait_for_tasks(&host, |t| !executions(t, "doomed").is_empty()).await;
    let run = executions(&tasks, "doomed")[0];
    assert_eq!(run["status"], "failed", "{tasks}");
    assert_eq!(run["reason"], "plugin_error");
    assert_eq!(
        run["attempts"], 3,
        "the test host's retry policy makes 3 attempts"
    );
    assert!(run["error"].as_str().unwrap().contains("failed on purpose"));
    host.settle("clock").await;
    assert!(
        runs(&host).await.is_empty(),
        "a failed execution leaves no trace"
    );
    let (_, log) = host.get("/v1/stores/clock/events?after=0&limit=100").await;
    assert!(
        log["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["type"] != "task.ran"),
        "{log}"
    );

    // Scheduled again for the same time (a user's "try again"), it runs: its failed record
    // does not count as the execution having happened. Before, the claim found that record,
    // and the task was dropped without a trace.
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "doomed", "onceAtMs": at, "payload": {}}),
    )
    .await;
    let tasks = wait_for_tasks(&host, |t| {
        executions(t, "doomed")[0]["status"] == "completed"
    })
    .await;
    assert_eq!(executions(&tasks, "doomed").len(), 1, "{tasks}");
    assert_eq!(runs(&host).await.len(), 1);
}

/// A schedule that fell several occurrences behind (its store paused, as after downtime) runs
/// once for the latest of them and then moves on past now. It used to stay due in the past:
/// the catch-up ran for the latest occurrence, but moving the schedule on matched the stored
/// (earliest) due time against the latest, so the actor found the same task due again at
/// once, forever — a busy loop that never reached the store's queued events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_behind_by_several_occurrences_catches_up_once_and_moves_on() {
    let host = ticker_host().await;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "beat", "everyMs": 1000, "payload": {}}),
    )
    .await;
    wait_for_tasks(&host, |t| !executions(t, "beat").is_empty()).await;
    let (status, _) = host.post("/v1/stores/clock/pause", json!({})).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let before = runs(&host).await.len();
    let (status, _) = host.post("/v1/stores/clock/resume", json!({})).await;
    assert_eq!(status, 200);

    let tasks = wait_for_tasks(&host, |t| executions(t, "beat").len() > before).await;
    let schedule = &tasks["schedules"][0];
    let latest = executions(&tasks, "beat")[0];
    assert_eq!(
        schedule["nextRunAt"].as_i64().unwrap(),
        latest["finishedAt"].as_i64().unwrap() + 1000,
        "the schedule moved past the catch-up run: {tasks}"
    );
    // The store goes on with its events.
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "later", "onceAtMs": now_ms() + 3_600_000, "payload": {}}),
    )
    .await;
    host.settle("clock").await;
    let tasks = wait_for_tasks(&host, |t| t["schedules"].as_array().unwrap().len() == 2).await;
    let runs = runs(&host).await;
    let mut due: Vec<i64> = runs
        .iter()
        .map(|r| r["scheduledFor"].as_i64().unwrap())
        .collect();
    let count = due.len();
    due.dedup();
    assert_eq!(due.len(), count, "no execution ran twice: {runs:?} {tasks}");
}

/// With no catch-up window (`task_catch_up_ms = 0`) a recurring task still runs while its
/// store is up: an occurrence found a little late is late, not missed. Before, every
/// occurrence was recorded as `missed` (its timer never fires at the very millisecond), so the
/// task never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_catch_up_window_a_recurring_task_still_runs() {
    let host = clock_without_catch_up().await;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "beat", "everyMs": 1000, "payload": {}}),
    )
    .await;
    let tasks = wait_for_tasks(&host, |t| {
        executions(t, "beat")
            .iter()
            .filter(|e| e["status"] == "completed")
            .count()
            >= 2
    })
    .await;
    assert!(
        executions(&tasks, "beat")
            .iter()
            .all(|e| e["status"] == "completed"),
        "none missed: {tasks}"
    );
    assert!(runs(&host).await.len() >= 2);
}

/// A recurring task on a store that fills its disk quota: its executions fail as `disk_full`
/// and are recorded as failed (none half-applied), its schedule goes on meanwhile, and once
/// the quota is raised live the next executions commit again; no occurrence runs twice. A
/// neighbour's task runs throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_on_a_full_disk_fails_cleanly_and_runs_again_when_space_returns() {
    let host = TestHost::start().await;
    host.deploy("ticker", programs::TICKER).await;
    let cramped = storehost_store::Quotas {
        disk: 256 << 10,
        ..storehost_store::Quotas::default()
    };
    host.add_store_with("clock", "ticker", &[], cramped).await;
    host.add_store("neighbour", "ticker", &[]).await;
    for store in ["clock", "neighbour"] {
        host.append(
            store,
            "schedule",
            json!({"taskId": "grow", "everyMs": 1000, "payload": {"padBytes": 64 << 10}}),
        )
        .await;
    }

    let tasks = wait_for_tasks(&host, |t| {
        executions(t, "grow")
            .iter()
            .any(|run| run["status"] == "failed")
    })
    .await;
    let failed: Vec<_> = executions(&tasks, "grow")
        .into_iter()
        .filter(|run| run["status"] == "failed")
        .collect();
    assert!(
        failed.iter().all(|run| run["reason"] == "disk_full"),
        "{failed:?}"
    );
    let before = runs(&host).await.len();
    assert!(
        before < 4,
        "256 KiB hold a few rows of 64 KiB, not more: {before}"
    );
    let succeeded = |tasks: &Value| {
        executions(tasks, "grow")
            .iter()
            .filter(|run| run["status"] == "completed")
            .count()
    };
    assert_eq!(
        succeeded(&tasks),
        before,
        "each committed execution is a row, each failed one none"
    );

    let (code, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/clock",
            Some(json!({"quotas": {"disk": 64 << 20}})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    wait_for_tasks(&host, |t| succeeded(t) >= before + 3).await;
    let rows = runs(&host).await;
    let mut occurrences: Vec<_> = rows.iter().map(|r| r["scheduledFor"].clone()).collect();
    let count = occurrences.len();
    occurrences.sort_by_key(|o| o.as_i64());
    occurrences.dedup();
    assert_eq!(
        occurrences.len(),
        count,
        "an occurrence ran twice: {rows:?}"
    );

    let (_, neighbour) = host.get("/v1/stores/neighbour/tasks").await;
    assert!(
        executions(&neighbour, "grow")
            .iter()
            .filter(|run| run["status"] == "completed")
            .count()
            >= 3,
        "{neighbour}"
    );
}

/// Schedules `n` one-shot tasks `{prefix}-{i}` on `clock` that run again as soon as they end.
async fn schedule_loops(host: &TestHost, prefix: &str, n: usize) {
    for i in 0..n {
        host.append(
            "clock",
            "schedule",
            json!({"taskId": format!("{prefix}-{i}"), "onceAtMs": now_ms(), "payload": {"again": true}}),
        )
        .await;
    }
}

/// Waits until `clock` has executed `at_least` tasks since the host started.
async fn executed(host: &TestHost, at_least: u64) {
    host.wait_for_status("clock", |s| s["tasksExecuted"].as_u64() >= Some(at_least))
        .await;
}

/// A store keeps the records of its latest 1,000 task executions, and of older ones only those
/// within the catch-up window (which keep an occurrence from running twice), not of every
/// one: tasks that run again as soon as they end made 1,200 records here, then, once those
/// were older than the window, 200 more, and the host's bookkeeping would otherwise grow
/// without end (a task due every second recorded 86,400 a day into the store's own database,
/// against its disk quota). The latest executions are still shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_task_execution_records_are_dropped() {
    let host = clock_without_catch_up().await;
    schedule_loops(&host, "early", 5).await;
    executed(&host, 1_200).await;
    for i in 0..5 {
        host.append("clock", "cancel", json!({"taskId": format!("early-{i}")}))
            .await;
    }
    host.settle("clock").await;
    // The first records leave the catch-up window (10 s at least).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (_, status) = host.get("/v1/stores/clock").await;
    let before = status["tasksExecuted"].as_u64().unwrap();
    schedule_loops(&host, "late", 1).await;
    executed(&host, before + 200).await;
    // Through the host's VFS: the store has the file open.
    let db =
        storehost_store::sqlite::open_reader(&host.data_dir.join("stores/clock/store.db")).unwrap();
    let records: usize = db
        .query_row("SELECT count(*) FROM _host_task_runs", [], |row| row.get(0))
        .unwrap();
    assert!(
        (1_000..=1_000 + 100 + 16 + 1).contains(&records),
        "{records} execution records"
    );
    let (_, tasks) = host.get("/v1/stores/clock/tasks").await;
    assert_eq!(tasks["executions"].as_array().unwrap().len(), 50, "{tasks}");
}

/// A host without a catch-up window (`task_catch_up_ms = 0`) running the store `clock` with
/// the ticker plugin.
async fn clock_without_catch_up() -> TestHost {
    let host = TestHost::start_with(TestHostOptions {
        task_catch_up: Duration::ZERO,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("ticker", programs::TICKER).await;
    host.add_store("clock", "ticker", &[]).await;
    host
}

/// A stored schedule that no longer reads (here edited by hand; in life one a newer version
/// wrote, or a backup's) is skipped, and holds nothing up: the store's events are processed
/// and its other tasks run. Before, its due time — still counted as the store's next — made
/// the store run pass after pass over due tasks without a wait, and its events never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_schedule_that_no_longer_reads_holds_nothing_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = || TestHostOptions {
        data_dir: Some(data.clone()),
        ..TestHostOptions::default()
    };
    let first = TestHost::start_with(options()).await;
    first.deploy("ticker", programs::TICKER).await;
    first.add_store("clock", "ticker", &[]).await;
    first
        .append(
            "clock",
            "schedule",
            json!({"taskId": "broken", "everyMs": 60_000, "payload": {}}),
        )
        .await;
    first.settle("clock").await;
    first.stop().await;
    let edited = rusqlite::Connection::open(data.join("stores/clock/store.db"))
        .unwrap()
        .execute(
            "UPDATE _host_schedules SET kind = 'cron', spec = 'no cron at all', next_run_at = ?1
             WHERE task_id = 'broken'",
            [now_ms() - 1_000],
        )
        .unwrap();
    assert_eq!(edited, 1);

    let host = TestHost::start_with(options()).await;
    host.deploy("ticker", programs::TICKER).await;
    host.orchestrator.restore_persisted().await.unwrap();
    let at = now_ms() + 1_000;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "fine", "onceAtMs": at, "payload": {}}),
    )
    .await;
    host.settle("clock").await;
    let tasks = wait_for_tasks(&host, |t| !executions(t, "fine").is_empty()).await;
    assert_eq!(
        executions(&tasks, "fine")[0]["status"],
        "completed",
        "{tasks}"
    );
    host.append("clock", "noop", json!({})).await;
    host.settle("clock").await;
}

/// Tasks that are always due — more of them, each taking longer, than their interval leaves
/// room for — still leave the store's events a turn: after each pass over due tasks the
/// events waiting run. Before, due tasks always went first and the events never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_always_due_leave_the_events_a_turn() {
    let host = ticker_host().await;
    // 400 tasks of at least 5 ms each, every second: a pass takes two seconds or more, so
    // some task is always due.
    let events: Vec<Value> = (0..400)
        .map(|n| {
            json!({"type": "schedule", "payload": {
                "taskId": format!("busy-{n:03}"), "everyMs": 1000, "payload": {"sleepMs": 5}
            }})
        })
        .collect();
    let (status, body) = host
        .post("/v1/stores/clock/events", json!({ "events": events }))
        .await;
    assert_eq!(status, 202, "{body}");
    host.settle("clock").await;
    wait_for_tasks(&host, |t| t["executions"].as_array().unwrap().len() >= 10).await;

    let seq = host.append("clock", "noop", json!({})).await;
    let store = host
        .orchestrator
        .get(&storehost_store::StoreId::new("clock").unwrap())
        .await
        .unwrap();
    assert!(
        store.wait_processed(seq, Duration::from_secs(30)).await,
        "the event waited behind the tasks: {:?}",
        store.status()
    );
}
