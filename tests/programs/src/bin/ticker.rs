//! A plugin that schedules tasks on request and records every execution: the scheduler's
//! fixture.
//!
//! Events:
//! - `schedule {taskId, cron? | everyMs? | onceAtMs?, payload?}` schedules (or replaces) a task;
//! - `cancel {taskId}` cancels one.
//!
//! `run_task` inserts `(task_id, scheduled_for, execution_id)` into `runs` and emits
//! `task.ran {taskId, scheduledFor}`. When the payload says `{"fail": true}` it inserts, then
//! answers `Err` (so nothing of it commits). When it says `{"padBytes": N}` its row carries N
//! bytes more (a store filling its disk). When it says `{"again": true}` the run schedules the
//! task again, once, 1 ms after its own due time (so it runs again at once). When it says
//! `{"sleepMs": N}` it first writes a
//! marker line to `/data/started.log` (outside the transaction) and sleeps N ms — a window in
//! which the host can be killed between the claim and the commit. When it says
//! `{"cancel": "other"}` the run cancels task `other`.
//!
//! Queries: `runs` → `{"runs": [{"taskId", "scheduledFor", "executionId"}]}`,
//! `scheduled` → what `scheduler::scheduled()` answers, `cancel {taskId}` → tries to cancel a
//! task from a query (which may not write).
#![forbid(unsafe_code)]

use std::io::Write as _;

use serde::Deserialize;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::scheduler::{self, Trigger};
use storehost_guest_sdk::{Event, Plugin, Task, events, export_plugin, params, sql};

struct Ticker;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScheduleRequest {
    task_id: String,
    cron: Option<String>,
    every_ms: Option<u64>,
    once_at_ms: Option<i64>,
    #[serde(default)]
    payload: Json,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelRequest {
    task_id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TaskPayload {
    #[serde(default)]
    fail: bool,
    sleep_ms: Option<u64>,
    #[serde(default)]
    pad_bytes: u32,
    #[serde(default)]
    again: bool,
    cancel: Option<String>,
}

fn create_table() -> Result<(), String> {
    sql::execute(
        "CREATE TABLE IF NOT EXISTS runs (task_id TEXT, scheduled_for INTEGER, execution_id TEXT, pad BLOB)",
        params![],
    )?;
    Ok(())
}

impl Plugin for Ticker {
    fn handle_event(event: Event) -> Result<(), String> {
        match event.event_type.as_str() {
            "schedule" => {
                let request: ScheduleRequest = event.payload_json()?;
                let trigger = match (request.cron, request.every_ms, request.once_at_ms) {
                    (Some(cron), None, None) => Trigger::Cron(cron),
                    (None, Some(ms), None) => Trigger::EveryMs(ms),
                    (None, None, Some(at)) => Trigger::OnceAtMs(at),
                    _ => return Err("give exactly one of cron, everyMs, onceAtMs".into()),
                };
                scheduler::schedule(&request.task_id, trigger, &request.payload)?;
                Ok(())
            }
            "cancel" => {
                let request: CancelRequest = event.payload_json()?;
                scheduler::cancel(&request.task_id);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn run_task(task: Task) -> Result<(), String> {
        let payload: TaskPayload = task.payload_json().unwrap_or_default();
        if let Some(ms) = payload.sleep_ms {
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open("/data/started.log")
                .map_err(|err| format!("open started.log: {err}"))?;
            // One write for the whole line: `writeln!` on a `File` writes the id and the newline
            // separately, and a kill between the two leaves a line without its end.
            log.write_all(format!("{}\n", task.execution_id).as_bytes())
                .map_err(|err| err.to_string())?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        create_table()?;
        sql::execute(
            "INSERT INTO runs (task_id, scheduled_for, execution_id, pad) VALUES (?1, ?2, ?3, zeroblob(?4))",
            params![
                task.task_id.clone(),
                task.scheduled_for_ms,
                task.execution_id.clone(),
                i64::from(payload.pad_bytes)
            ],
        )?;
        events::emit(
            "task.ran",
            &json!({"taskId": task.task_id, "scheduledFor": task.scheduled_for_ms}),
        )?;
        if payload.fail {
            return Err(format!("task {} failed on purpose", task.task_id));
        }
        if let Some(other) = &payload.cancel {
            scheduler::cancel(other);
        }
        if payload.again {
            scheduler::once(
                &task.task_id,
                task.scheduled_for_ms + 1,
                &json!({"again": true}),
            )?;
        }
        Ok(())
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        match name {
            "cancel" => {
                let request: CancelRequest =
                    serde_json::from_value(args).map_err(|err| err.to_string())?;
                let cancelled = scheduler::cancel(&request.task_id);
                Ok(json!({ "cancelled": cancelled }))
            }
            "runs" => {
                let rows = match sql::query(
                    "SELECT task_id, scheduled_for, execution_id FROM runs ORDER BY rowid",
                    params![],
                ) {
                    Ok(rows) => rows,
                    Err(err) if err.is_missing_table() => return Ok(json!({"runs": []})),
                    Err(err) => return Err(err.into()),
                };
                let runs = rows
                    .iter()
                    .map(|row| {
                        Ok(json!({
                            "taskId": row.get::<String>(0)?,
                            "scheduledFor": row.get::<i64>(1)?,
                            "executionId": row.get::<String>(2)?,
                        }))
                    })
                    .collect::<Result<Vec<_>, sql::SqlError>>()?;
                Ok(json!({ "runs": runs }))
            }
            "scheduled" => {
                let tasks = scheduler::scheduled()
                    .into_iter()
                    .map(|task| json!({"taskId": task.task_id, "nextRunMs": task.next_run_ms}))
                    .collect::<Vec<_>>();
                Ok(json!({ "tasks": tasks }))
            }
            other => Err(format!("unknown query `{other}`")),
        }
    }
}

export_plugin!(Ticker);

fn main() {}
