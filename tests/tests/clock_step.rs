//! Due times across a step of the wall clock. Alone in its test binary: the step it makes
//! ([`storehost_store::clock::step_for_tests`]) moves the clock of the whole process.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storehost_tests::{TestHost, TestHostOptions, programs};

/// A task due after the wall clock stepped forward (NTP, a VM paused or suspended: the
/// monotonic clock tokio's timers count stood still) runs when the wall clock says it is due.
/// Before, the store's timer, set before the step, fired late by the whole step: here 110 s
/// late; after a longer pause, past the catch-up window, a task due while the host was up was
/// recorded `missed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_due_after_a_clock_step_runs_when_the_wall_clock_says() {
    // Hibernation off: no step down wakes the store before its task timer does.
    let host = TestHost::start_with(TestHostOptions {
        idle_timeout: None,
        ..TestHostOptions::default()
    })
    .await;
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
    // The store's status, which its actor publishes: a read of the tasks (or a query) would
    // wake the actor itself, which sets its timer again.
    let mut status = Value::Null;
    while stepped.elapsed() < Duration::from_secs(60) {
        status = host.get("/v1/stores/clock").await.1;
        if status["tasksExecuted"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status["tasksExecuted"], 1,
        "due 10 s after the step, the task had not run 60 s after it: {status}"
    );
    let (code, tasks) = host.get("/v1/stores/clock/tasks").await;
    assert_eq!(code, 200, "{tasks}");
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
