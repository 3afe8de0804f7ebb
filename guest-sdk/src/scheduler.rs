//! Recurring and one-shot tasks.
//!
//! A schedule changes when the current invocation commits, like a SQL write: a handler that
//! fails leaves the schedules as they were. When a task is due the host calls
//! [`Plugin::run_task`](crate::Plugin::run_task) with a [`Task`](crate::Task), once per
//! `(task_id, scheduled_for)` — also across restarts.

use serde::Serialize;

use crate::__bindings::storehost::plugin::scheduler as wit;

pub use wit::Trigger;

/// A task as the host keeps it.
pub type ScheduledTask = wit::ScheduledTask;

/// Runs `task_id` on a cron expression (UTC; 5 fields, or 6 with seconds first).
/// Answers when it first runs (ms since the Unix epoch).
pub fn cron(task_id: &str, expression: &str, payload: &impl Serialize) -> Result<i64, String> {
    schedule(task_id, Trigger::Cron(expression.to_owned()), payload)
}

/// Runs `task_id` every `interval_ms`, counted from the end of the previous execution.
pub fn every(task_id: &str, interval_ms: u64, payload: &impl Serialize) -> Result<i64, String> {
    schedule(task_id, Trigger::EveryMs(interval_ms), payload)
}

/// Runs `task_id` once at `at_ms` (ms since the Unix epoch; a past time runs right away).
pub fn once(task_id: &str, at_ms: i64, payload: &impl Serialize) -> Result<i64, String> {
    schedule(task_id, Trigger::OnceAtMs(at_ms), payload)
}

/// Schedules (or reschedules) `task_id`; answers its first due time.
pub fn schedule(task_id: &str, trigger: Trigger, payload: &impl Serialize) -> Result<i64, String> {
    let payload = serde_json::to_string(payload)
        .map_err(|err| format!("payload of task `{task_id}` could not be encoded: {err}"))?;
    let next = wit::schedule(task_id, &trigger, &payload)?;
    next.ok_or_else(|| format!("task `{task_id}` has no future occurrence"))
}

/// Cancels `task_id`; answers whether it was scheduled. Call it from an event handler or a
/// task: a query may not write, and there the call traps.
pub fn cancel(task_id: &str) -> bool {
    wit::cancel(task_id)
}

/// The store's scheduled tasks, sorted by id.
pub fn scheduled() -> Vec<ScheduledTask> {
    wit::scheduled()
}
