//! Due times across a step of the wall clock. Alone in its test binary: the step it makes
//! ([`storehost_store::clock::step_for_tests`]) moves the clock of the whole process.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storehost_tests::{TestHost, programs};

/// A task due after the wall clock stepped forward (NTP, a VM paused or suspended: the
/// monotonic clock tokio's timers count stood still) runs when the wall clock says it is due.
/// Before, the store's timer, set before the step, fired late by the whole step: here 110 s
/// late; after a longer pause, past the catch-up window, a task due while the host was up was
/// recorded `missed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_due_after_a_clock_step_runs_when_the_wall_clock_says() {
    let host = TestHost::start().await;
    host.deploy("ticker", programs::TICKER).await;
    host.add_store("clock", "ticker", &[]).await;
    let at = storehost_store::sqlite::now_ms() + 120_000;
    host.append(
        "clock",
        "schedule",
        json!({"taskId": "after-the-step", "onceAtMs": at, "payload": {}}),
    )
    .await;
    host.settle("clock").await;

    storehost_store::clock::step_for_tests(110_000);
    let stepped = Instant::now();
    let mut tasks = Value::Null;
    while stepped.elapsed() < Duration::from_secs(60) {
        let (status, body) = host.get("/v1/stores/clock/tasks").await;
        assert_eq!(status, 200, "{body}");
        tasks = body;
        if tasks["executions"]
            .as_array()
            .is_some_and(|runs| !runs.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let runs = tasks["executions"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        1,
        "due 10 s after the step, the task had not run 60 s after it: {tasks}"
    );
    assert_eq!(runs[0]["taskId"], "after-the-step");
    assert_eq!(runs[0]["status"], "completed", "{tasks}");
    assert_eq!(runs[0]["scheduledFor"], at);
}
