//! Recurring tasks: their events materialised into `recurring_tasks`, their schedules kept
//! with the host's scheduler, and each due execution run through the agentic loop.
//!
//! - A recurring task is scheduled under its own id: `every` for `intervalHours` (counted from
//!   the end of the previous execution), `cron` for a cron expression. Deleting or disabling it
//!   cancels the schedule; enabling or changing the schedule schedules it again.
//! - An execution runs the loop on the task's prompt with a fresh context (no chat conversation:
//!   a schedule that ran for months must not drag its whole history into every call), and
//!   without `create_recurring_task` (a prompt like "remind me to stretch every hour" would
//!   otherwise add a schedule on every run). It emits
//!   `v1.TaskExecutionStarted`, then `v1.TaskExecutionCompleted` or `v1.TaskExecutionFailed`, and
//!   `v1.RecurringTaskUpdated {nextExecutionAt}`, and records the execution in `executions`.
//! - A failed loop (an LLM error, the iteration limit, a stuck loop) is an outcome, not a crash:
//!   `run-task` returns `Ok` so that the failure event and record commit. The provider already
//!   retried transient errors within its deadline, and the next occurrence is the natural retry;
//!   returning `Err` would have the host retry the whole run and then record it as failed
//!   without any event a client could see. Only the plugin's own failures (SQL) return `Err`.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value as Json, json};
use storehost_guest_sdk::llm::{Message, Role};
use storehost_guest_sdk::scheduler::{self, Trigger};
use storehost_guest_sdk::sql::{self, Row, SqlError};
use storehost_guest_sdk::{Event, Task, clock, events, log, params, query_args};

use crate::agent_loop::{self, Settings};
use crate::limits;
use crate::tasks::PLUGIN_SOURCE;
use crate::timestamp::{Timestamp, iso8601_from_epoch_ms};
use crate::tools::ToolContext;

/// A recurring task was created.
pub const RECURRING_TASK_CREATED: &str = "v1.RecurringTaskCreated";
/// Some fields of a recurring task changed (also: its next execution time).
pub const RECURRING_TASK_UPDATED: &str = "v1.RecurringTaskUpdated";
/// A recurring task was deleted.
pub const RECURRING_TASK_DELETED: &str = "v1.RecurringTaskDeleted";
/// A recurring task was enabled.
pub const RECURRING_TASK_ENABLED: &str = "v1.RecurringTaskEnabled";
/// A recurring task was disabled.
pub const RECURRING_TASK_DISABLED: &str = "v1.RecurringTaskDisabled";
/// An execution of a recurring task started.
pub const TASK_EXECUTION_STARTED: &str = "v1.TaskExecutionStarted";
/// An execution of a recurring task ended with an answer.
pub const TASK_EXECUTION_COMPLETED: &str = "v1.TaskExecutionCompleted";
/// An execution of a recurring task ended without one.
pub const TASK_EXECUTION_FAILED: &str = "v1.TaskExecutionFailed";

/// Query: every recurring task, in creation order.
pub const QUERY_RECURRING_TASKS: &str = "recurring-tasks";
/// Query: executions, newest first, `{"recurringTaskId"?, "limit"?}`.
pub const QUERY_EXECUTIONS: &str = "executions";

const MS_PER_HOUR: f64 = 3_600_000.0;
/// The shortest interval `create_recurring_task` accepts: one minute. Every run costs model
/// calls, and a model that misreads "every 5 minutes" must not set up a run every second. (A
/// client's `v1.RecurringTaskCreated` is taken as given: the scheduler's own limit applies.)
pub const MIN_INTERVAL_HOURS: f64 = 1.0 / 60.0;
/// How many executions the `executions` query answers when not told.
const DEFAULT_EXECUTIONS_LIMIT: i64 = 100;

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS recurring_tasks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        prompt TEXT NOT NULL,
        interval_hours REAL,
        cron TEXT,
        enabled INTEGER NOT NULL,
        next_execution_at,
        last_execution_at,
        schedule_error TEXT,
        created_at,
        updated_at
    )",
    "CREATE TABLE IF NOT EXISTS executions (
        id TEXT PRIMARY KEY,
        recurring_task_id TEXT NOT NULL,
        scheduled_for INTEGER NOT NULL,
        status TEXT NOT NULL,
        started_at,
        finished_at,
        output TEXT,
        error TEXT,
        iterations INTEGER NOT NULL,
        llm_metadata TEXT
    )",
];

const COLUMNS: &str = "id, name, prompt, interval_hours, cron, enabled, next_execution_at, \
                       last_execution_at, schedule_error, created_at, updated_at";

fn ensure_schema() -> Result<(), String> {
    for statement in SCHEMA {
        sql::execute(statement, params![])?;
    }
    Ok(())
}

/// When a recurring task runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Every this many hours, counted from the end of the previous execution.
    Interval(f64),
    /// A cron expression in UTC.
    Cron(String),
}

impl Schedule {
    /// The schedule that `intervalHours` or `cron` (exactly one of them) describe.
    pub fn from_fields(interval_hours: Option<f64>, cron: Option<&str>) -> Result<Self, String> {
        match (interval_hours, cron.map(str::trim)) {
            (Some(_), Some(_)) => {
                Err("give either intervalHours or cron, not both".to_owned())
            }
            (None, None) => Err(
                "a recurring task needs a schedule: intervalHours (like 24) or cron (like \"0 9 * * *\")"
                    .to_owned(),
            ),
            (Some(hours), None) if !(hours.is_finite() && hours > 0.0) => Err(format!(
                "intervalHours must be a positive number of hours, not {hours}"
            )),
            (Some(hours), None) => Ok(Self::Interval(hours)),
            (None, Some("")) => Err("cron must not be empty".to_owned()),
            (None, Some(expression)) => Ok(Self::Cron(expression.to_owned())),
        }
    }

    /// Whether the schedule runs at most once a minute (what the model may set up): an
    /// interval of at least [`MIN_INTERVAL_HOURS`], or a cron expression whose seconds field,
    /// if it has one, is a single second.
    pub fn at_most_once_a_minute(&self) -> Result<(), String> {
        match self {
            Self::Interval(hours) if *hours < MIN_INTERVAL_HOURS - 1e-9 => Err(format!(
                "intervalHours {hours} is under a minute; a recurring task runs at most once a minute (intervalHours 0.0167 or more)"
            )),
            Self::Cron(expression) => {
                let fields: Vec<&str> = expression.split_whitespace().collect();
                let fixed_second = fields
                    .first()
                    .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
                if fields.len() > 5 && !fixed_second {
                    Err(format!(
                        "cron {expression:?} runs more than once a minute; a recurring task runs at most once a minute: use 5 fields (minute hour day month weekday), like \"*/5 * * * *\""
                    ))
                } else {
                    Ok(())
                }
            }
            Self::Interval(_) => Ok(()),
        }
    }

    fn trigger(&self) -> Trigger {
        match self {
            // Rounded to the millisecond; the scheduler refuses intervals under a second.
            Self::Interval(hours) => Trigger::EveryMs((hours * MS_PER_HOUR).round() as u64),
            Self::Cron(expression) => Trigger::Cron(expression.clone()),
        }
    }

    /// Writes `intervalHours` or `cron` into an event payload.
    pub fn write_fields(&self, payload: &mut Json) {
        match self {
            Self::Interval(hours) => payload["intervalHours"] = json!(hours),
            Self::Cron(expression) => payload["cron"] = json!(expression),
        }
    }
}

/// The scheduler's payload: which recurring task is due (the task id says it too).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Due {
    recurring_task_id: String,
}

/// Schedules recurring task `id`; answers its next due time, or why it cannot be scheduled.
fn schedule(id: &str, schedule: &Schedule) -> Result<i64, String> {
    let due = Due {
        recurring_task_id: id.to_owned(),
    };
    scheduler::schedule(id, schedule.trigger(), &due)
}

/// A recurring task as stored, and as queries answer it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecurringTask {
    pub id: String,
    pub name: String,
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_hours: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    pub enabled: bool,
    pub next_execution_at: Option<Timestamp>,
    pub last_execution_at: Option<Timestamp>,
    /// Why the schedule could not be set up (an invalid cron expression...), if it could not.
    pub schedule_error: Option<String>,
    pub created_at: Option<Timestamp>,
    pub updated_at: Option<Timestamp>,
}

impl RecurringTask {
    fn from_row(row: Row<'_>) -> Result<Self, SqlError> {
        Ok(Self {
            id: row.get("id")?,
            name: row.get("name")?,
            prompt: row.get("prompt")?,
            interval_hours: row.get("interval_hours")?,
            cron: row.get("cron")?,
            enabled: row.get("enabled")?,
            next_execution_at: row.get("next_execution_at")?,
            last_execution_at: row.get("last_execution_at")?,
            schedule_error: row.get("schedule_error")?,
            created_at: row.get("created_at")?,
            updated_at: row.get("updated_at")?,
        })
    }

    fn schedule(&self) -> Result<Schedule, String> {
        Schedule::from_fields(self.interval_hours, self.cron.as_deref())
    }

    /// The task as JSON (what queries and tools answer).
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }
}

/// Runs a read; before the first recurring task there is no table, and nothing to read.
fn read<T>(
    statement: &str,
    params: &[sql::Value],
    from_row: fn(Row<'_>) -> Result<T, SqlError>,
) -> Result<Vec<T>, String> {
    let rows = match sql::query(statement, params) {
        Ok(rows) => rows,
        Err(err) if err.is_missing_table() => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    Ok(rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?)
}

/// The recurring task with id `id`, if any.
pub fn get(id: &str) -> Result<Option<RecurringTask>, String> {
    Ok(read(
        &format!("SELECT {COLUMNS} FROM recurring_tasks WHERE id = ?1"),
        params![id],
        RecurringTask::from_row,
    )?
    .into_iter()
    .next())
}

/// A new recurring task.
#[derive(Debug)]
pub struct NewRecurringTask<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub prompt: &'a str,
    pub schedule: &'a Schedule,
    pub enabled: bool,
    pub created_at: &'a Timestamp,
}

/// What [`create`] did.
#[derive(Debug)]
pub enum Created {
    /// A recurring task with that id exists; nothing changed.
    Exists,
    /// The task was stored (and scheduled, when enabled; its `schedule_error` says why not,
    /// if it could not be).
    Stored(Box<RecurringTask>),
    /// The scheduler refused the schedule, and nothing was stored (see [`create`]).
    Refused(String),
}

/// Stores a new recurring task and, when enabled, schedules it. When the scheduler refuses the
/// schedule, `keep_unschedulable` decides: keep the task with its `schedule_error` (for a
/// client's event, which retrying would not fix), or store nothing (for a tool call, so the
/// model can correct itself).
pub fn create(new: &NewRecurringTask<'_>, keep_unschedulable: bool) -> Result<Created, String> {
    ensure_schema()?;
    if get(new.id)?.is_some() {
        return Ok(Created::Exists);
    }
    let (next, schedule_error) = if new.enabled {
        match schedule(new.id, new.schedule) {
            Ok(next) => (Some(Timestamp::from_epoch_ms(next)), None),
            Err(problem) if keep_unschedulable => (None, Some(problem)),
            Err(problem) => return Ok(Created::Refused(problem)),
        }
    } else {
        (None, None)
    };
    let (interval_hours, cron) = match new.schedule {
        Schedule::Interval(hours) => (Some(*hours), None),
        Schedule::Cron(expression) => (None, Some(expression.as_str())),
    };
    sql::execute(
        "INSERT INTO recurring_tasks (id, name, prompt, interval_hours, cron, enabled,
             next_execution_at, schedule_error, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
        params![
            new.id,
            new.name,
            new.prompt,
            interval_hours,
            cron,
            new.enabled,
            next,
            schedule_error,
            new.created_at
        ],
    )?;
    let stored =
        get(new.id)?.ok_or_else(|| format!("recurring task `{}` vanished after insert", new.id))?;
    Ok(Created::Stored(Box::new(stored)))
}

/// Schedules or cancels `task` according to its fields, and records the outcome.
fn reschedule(task: &RecurringTask, now: &Timestamp) -> Result<(), String> {
    let (next, problem) = if task.enabled {
        match task.schedule().and_then(|s| schedule(&task.id, &s)) {
            Ok(next) => (Some(Timestamp::from_epoch_ms(next)), None),
            Err(problem) => {
                scheduler::cancel(&task.id);
                (None, Some(problem))
            }
        }
    } else {
        scheduler::cancel(&task.id);
        (None, None)
    };
    if let Some(problem) = &problem {
        log::error(format_args!(
            "recurring task `{}` cannot be scheduled: {problem}",
            task.id
        ));
    }
    sql::execute(
        "UPDATE recurring_tasks SET next_execution_at = ?2, schedule_error = ?3, updated_at = ?4
         WHERE id = ?1",
        params![task.id, next, problem, now],
    )?;
    Ok(())
}

/// When the host's scheduler runs task `id` next (`None`: it is not scheduled).
fn scheduled_next(id: &str) -> Option<Timestamp> {
    scheduler::scheduled()
        .into_iter()
        .find(|scheduled| scheduled.task_id == id)
        .and_then(|scheduled| scheduled.next_run_ms)
        .map(Timestamp::from_epoch_ms)
}

fn checked_id<'a>(event: &Event, id: &'a str) -> Result<&'a str, String> {
    if id.trim().is_empty() {
        Err(format!(
            "invalid payload for event `{}` (seq {}): `id` must not be empty",
            event.event_type, event.seq
        ))
    } else {
        Ok(id)
    }
}

fn invalid(event: &Event, problem: &str) -> String {
    format!(
        "invalid payload for event `{}` (seq {}): {problem}",
        event.event_type, event.seq
    )
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecurringTaskCreated {
    id: String,
    name: String,
    prompt: String,
    #[serde(default)]
    interval_hours: Option<f64>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    created_at: Option<Timestamp>,
}

/// `v1.RecurringTaskCreated`: stores and schedules the task. A second creation of the same id
/// (like the echo of the agent's own `create_recurring_task`) changes nothing. A schedule the
/// scheduler refuses (an invalid cron expression) is kept with its `scheduleError` for clients
/// to see, rather than failing the event, which retrying could not fix.
pub fn on_created(event: &Event) -> Result<(), String> {
    let created: RecurringTaskCreated = event.payload_json()?;
    let id = checked_id(event, &created.id)?;
    let schedule = Schedule::from_fields(created.interval_hours, created.cron.as_deref())
        .map_err(|problem| invalid(event, &problem))?;
    let created_at = created
        .created_at
        .unwrap_or_else(|| Timestamp::from_epoch_ms(event.at_ms));
    let new = NewRecurringTask {
        id,
        name: &created.name,
        prompt: &created.prompt,
        schedule: &schedule,
        enabled: created.enabled.unwrap_or(true),
        created_at: &created_at,
    };
    match create(&new, true)? {
        Created::Exists if event.source == PLUGIN_SOURCE => {}
        Created::Exists => log::warn(format_args!(
            "{RECURRING_TASK_CREATED} (seq {}): recurring task `{id}` already exists; kept as it was",
            event.seq
        )),
        Created::Stored(task) => {
            if let Some(problem) = &task.schedule_error {
                log::error(format_args!(
                    "{RECURRING_TASK_CREATED} (seq {}): recurring task `{id}` cannot be scheduled: {problem}",
                    event.seq
                ));
            }
        }
        Created::Refused(problem) => log::error(format_args!(
            "{RECURRING_TASK_CREATED} (seq {}): recurring task `{id}` cannot be scheduled: {problem}",
            event.seq
        )),
    }
    Ok(())
}

/// Tells a field given as `null` (`Some(None)`) from a field left out (`None`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecurringTaskUpdated {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    interval_hours: Option<f64>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    next_execution_at: Option<Option<Timestamp>>,
    #[serde(default, deserialize_with = "present")]
    last_execution_at: Option<Option<Timestamp>>,
    #[serde(default)]
    updated_at: Option<Timestamp>,
}

/// `v1.RecurringTaskUpdated`: changes the fields the payload carries; a new schedule (or
/// `enabled`) reschedules the task. `nextExecutionAt`/`lastExecutionAt` alone (what the agent
/// emits after each execution) are only recorded.
pub fn on_updated(event: &Event) -> Result<(), String> {
    let updated: RecurringTaskUpdated = event.payload_json()?;
    let id = checked_id(event, &updated.id)?;
    let Some(mut task) = get(id)? else {
        log::warn(format_args!(
            "{RECURRING_TASK_UPDATED} (seq {}): no recurring task `{id}`; nothing changed",
            event.seq
        ));
        return Ok(());
    };
    let now = updated
        .updated_at
        .clone()
        .unwrap_or_else(|| Timestamp::from_epoch_ms(event.at_ms));
    let mut schedule_changed = false;
    if updated.interval_hours.is_some() || updated.cron.is_some() {
        let schedule = Schedule::from_fields(updated.interval_hours, updated.cron.as_deref())
            .map_err(|problem| invalid(event, &problem))?;
        let (interval_hours, cron) = match schedule {
            Schedule::Interval(hours) => (Some(hours), None),
            Schedule::Cron(expression) => (None, Some(expression)),
        };
        schedule_changed = task.interval_hours != interval_hours || task.cron != cron;
        task.interval_hours = interval_hours;
        task.cron = cron;
    }
    if let Some(enabled) = updated.enabled {
        schedule_changed |= task.enabled != enabled;
        task.enabled = enabled;
    }
    if let Some(name) = updated.name {
        task.name = name;
    }
    if let Some(prompt) = updated.prompt {
        task.prompt = prompt;
    }
    if updated.next_execution_at.is_some() && !schedule_changed {
        // The host's scheduler decides when the task runs next; this field only reports it.
        // The run's own echo of it can arrive after a disable or a new schedule was applied
        // (a run goes before queued events), and would then show a time that will not come.
        task.next_execution_at = scheduled_next(&task.id);
    }
    if let Some(last) = updated.last_execution_at {
        task.last_execution_at = last;
    }
    sql::execute(
        "UPDATE recurring_tasks SET name = ?2, prompt = ?3, interval_hours = ?4, cron = ?5,
             enabled = ?6, next_execution_at = ?7, last_execution_at = ?8, updated_at = ?9
         WHERE id = ?1",
        params![
            id,
            task.name,
            task.prompt,
            task.interval_hours,
            task.cron,
            task.enabled,
            task.next_execution_at,
            task.last_execution_at,
            now
        ],
    )?;
    if schedule_changed {
        reschedule(&task, &now)?;
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct RecurringTaskRef {
    id: String,
}

/// `v1.RecurringTaskDeleted`: removes the task and cancels its schedule. Its executions stay.
pub fn on_deleted(event: &Event) -> Result<(), String> {
    let deleted: RecurringTaskRef = event.payload_json()?;
    let id = checked_id(event, &deleted.id)?;
    ensure_schema()?;
    let cancelled = scheduler::cancel(id);
    let removed = sql::execute("DELETE FROM recurring_tasks WHERE id = ?1", params![id])?;
    if removed == 0 && !cancelled {
        log::warn(format_args!(
            "{RECURRING_TASK_DELETED} (seq {}): no recurring task `{id}`; nothing changed",
            event.seq
        ));
    }
    Ok(())
}

/// `v1.RecurringTaskEnabled` / `v1.RecurringTaskDisabled`: (re)schedules or cancels the task.
/// Enabling a task that is enabled keeps its schedule as it is.
pub fn on_enabled(event: &Event, enabled: bool) -> Result<(), String> {
    let target: RecurringTaskRef = event.payload_json()?;
    let id = checked_id(event, &target.id)?;
    let Some(mut task) = get(id)? else {
        log::warn(format_args!(
            "{} (seq {}): no recurring task `{id}`; nothing changed",
            event.event_type, event.seq
        ));
        return Ok(());
    };
    if task.enabled == enabled && (task.next_execution_at.is_some() || !enabled) {
        return Ok(());
    }
    task.enabled = enabled;
    let now = Timestamp::from_epoch_ms(event.at_ms);
    sql::execute(
        "UPDATE recurring_tasks SET enabled = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, enabled, now],
    )?;
    reschedule(&task, &now)
}

/// Runs one due execution of a recurring task (the host's `run-task`).
pub fn run(due: &Task) -> Result<(), String> {
    ensure_schema()?;
    let execution_id = &due.execution_id;
    let task = match get(&due.task_id)? {
        Some(task) if task.enabled => task,
        other => {
            // Deleting or disabling cancels the schedule in the same transaction, so this is a
            // schedule left from elsewhere: stop it rather than fail every occurrence.
            scheduler::cancel(&due.task_id);
            log::warn(format_args!(
                "task `{}` is due, but {}; its schedule is cancelled",
                due.task_id,
                if other.is_some() {
                    "that recurring task is disabled"
                } else {
                    "there is no such recurring task"
                }
            ));
            return Ok(());
        }
    };
    let already = sql::query(
        "SELECT 1 FROM executions WHERE id = ?1",
        params![execution_id],
    )?;
    if !already.is_empty() {
        log::warn(format_args!(
            "execution `{execution_id}` is already recorded; not running it again"
        ));
        return Ok(());
    }

    let started_ms = clock::now_ms();
    let started_at = Timestamp::from_epoch_ms(started_ms);
    events::emit(
        TASK_EXECUTION_STARTED,
        &json!({
            "id": execution_id,
            "recurringTaskId": task.id,
            "startedAt": started_at,
            "scheduledFor": iso8601_from_epoch_ms(due.scheduled_for_ms),
        }),
    )?;
    let messages = vec![
        Message::text(
            Role::System,
            limits::truncate(&run_prompt(&task, started_ms), limits::MESSAGE_BYTES),
        ),
        Message::text(
            Role::User,
            limits::truncate(&task.prompt, limits::MESSAGE_BYTES),
        ),
    ];
    let mut ctx = ToolContext::for_execution(execution_id, started_ms);
    let outcome = agent_loop::run(&mut ctx, messages, &Settings::from_config())?;
    let finished_at = Timestamp::from_epoch_ms(clock::now_ms());

    // Scheduling again from now gives the exact next due time (the host keeps a schedule the
    // plugin set during the run): for an interval, now + interval; for cron, its next
    // occurrence after now — what the host would have chosen on its own.
    let next = match task.schedule().and_then(|s| schedule(&task.id, &s)) {
        Ok(next) => Some(Timestamp::from_epoch_ms(next)),
        Err(problem) => {
            log::error(format_args!(
                "recurring task `{}` cannot be scheduled again: {problem}",
                task.id
            ));
            None
        }
    };

    let (status, output, error) = if outcome.success {
        ("completed", Some(outcome.reply.as_str()), None)
    } else {
        ("failed", None, Some(outcome.failure()))
    };
    sql::execute(
        "INSERT INTO executions (id, recurring_task_id, scheduled_for, status, started_at,
             finished_at, output, error, iterations, llm_metadata)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            execution_id,
            task.id,
            due.scheduled_for_ms,
            status,
            started_at,
            finished_at,
            output,
            error,
            outcome.iterations,
            outcome.metadata.to_string()
        ],
    )?;
    sql::execute(
        "UPDATE recurring_tasks SET last_execution_at = ?2, next_execution_at = ?3 WHERE id = ?1",
        params![task.id, finished_at, next],
    )?;
    if outcome.success {
        events::emit(
            TASK_EXECUTION_COMPLETED,
            &json!({"id": execution_id, "completedAt": finished_at, "output": outcome.reply}),
        )?;
    } else {
        events::emit(
            TASK_EXECUTION_FAILED,
            &json!({"id": execution_id, "failedAt": finished_at, "error": error}),
        )?;
    }
    // Also after a failure: clients show when the task runs next either way.
    events::emit(
        RECURRING_TASK_UPDATED,
        &json!({"id": task.id, "nextExecutionAt": next, "lastExecutionAt": finished_at}),
    )?;
    Ok(())
}

/// The system prompt of an execution.
fn run_prompt(task: &RecurringTask, now_ms: i64) -> String {
    format!(
        "You are the assistant of a workspace, running its recurring task \"{}\" on schedule. Nobody is chatting with you: carry out the instruction in the next message, using your tools where it asks you to read or change tasks, then answer with a short report of what you did; it is recorded as this execution's output. The time now is {} (UTC).",
        task.name,
        iso8601_from_epoch_ms(now_ms)
    )
}

/// Query `recurring-tasks`: `{"recurringTasks": [...]}` in creation order.
pub fn query_recurring_tasks(_args: Json) -> Result<Json, String> {
    let tasks = read(
        &format!("SELECT {COLUMNS} FROM recurring_tasks ORDER BY rowid"),
        params![],
        RecurringTask::from_row,
    )?;
    Ok(json!({ "recurringTasks": tasks }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct ExecutionsArgs {
    recurring_task_id: Option<String>,
    #[serde(deserialize_with = "crate::args::count")]
    limit: Option<u32>,
}

/// An execution as the `executions` query answers it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Execution {
    id: String,
    recurring_task_id: String,
    scheduled_for: Timestamp,
    status: String,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    output: Option<String>,
    error: Option<String>,
    iterations: i64,
    llm_metadata: Option<Json>,
}

impl Execution {
    fn from_row(row: Row<'_>) -> Result<Self, SqlError> {
        let scheduled_for: i64 = row.get("scheduled_for")?;
        Ok(Self {
            id: row.get("id")?,
            recurring_task_id: row.get("recurring_task_id")?,
            scheduled_for: Timestamp::from_epoch_ms(scheduled_for),
            status: row.get("status")?,
            started_at: row.get("started_at")?,
            finished_at: row.get("finished_at")?,
            output: row.get("output")?,
            error: row.get("error")?,
            iterations: row.get("iterations")?,
            llm_metadata: row.get("llm_metadata")?,
        })
    }
}

/// Query `executions`: `{"executions": [...]}`, newest first; `recurringTaskId` narrows it to
/// one task, `limit` (default 100) bounds it.
pub fn query_executions(args: Json) -> Result<Json, String> {
    let args: ExecutionsArgs = query_args(QUERY_EXECUTIONS, args)?;
    let limit = args.limit.map_or(DEFAULT_EXECUTIONS_LIMIT, i64::from);
    let executions = read(
        "SELECT id, recurring_task_id, scheduled_for, status, started_at, finished_at, output,
             error, iterations, llm_metadata
         FROM executions WHERE ?1 IS NULL OR recurring_task_id = ?1
         ORDER BY rowid DESC LIMIT ?2",
        params![args.recurring_task_id, limit],
        Execution::from_row,
    )?;
    Ok(json!({ "executions": executions }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_an_interval_or_a_cron_expression() {
        assert_eq!(
            Schedule::from_fields(Some(24.0), None),
            Ok(Schedule::Interval(24.0))
        );
        assert_eq!(
            Schedule::from_fields(None, Some(" 0 9 * * * ")),
            Ok(Schedule::Cron("0 9 * * *".into()))
        );
        for (hours, cron, expected) in [
            (Some(1.0), Some("* * * * *"), "not both"),
            (None, None, "needs a schedule"),
            (Some(0.0), None, "positive"),
            (Some(-2.0), None, "positive"),
            (Some(f64::NAN), None, "positive"),
            (None, Some("  "), "must not be empty"),
        ] {
            let err = Schedule::from_fields(hours, cron).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn the_model_may_schedule_at_most_once_a_minute() {
        for ok in [
            Schedule::Interval(1.0 / 60.0),
            Schedule::Interval(24.0),
            Schedule::Cron("* * * * *".into()),
            Schedule::Cron("30 */5 * * * *".into()),
        ] {
            assert_eq!(ok.at_most_once_a_minute(), Ok(()), "{ok:?}");
        }
        for (bad, expected) in [
            (Schedule::Interval(1.0 / 3600.0), "under a minute"),
            (
                Schedule::Cron("*/1 * * * * *".into()),
                "more than once a minute",
            ),
            (
                Schedule::Cron("0,30 * * * * *".into()),
                "more than once a minute",
            ),
        ] {
            let err = bad.at_most_once_a_minute().unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn an_interval_in_hours_becomes_milliseconds() {
        assert_eq!(
            Schedule::Interval(24.0).trigger(),
            Trigger::EveryMs(86_400_000)
        );
        assert_eq!(
            Schedule::Interval(1.0 / 3600.0).trigger(),
            Trigger::EveryMs(1_000)
        );
    }

    #[test]
    fn an_update_tells_a_cleared_time_from_an_absent_one() {
        let cleared: RecurringTaskUpdated =
            serde_json::from_str(r#"{"id":"r","nextExecutionAt":null}"#).unwrap();
        assert_eq!(cleared.next_execution_at, Some(None));
        let absent: RecurringTaskUpdated = serde_json::from_str(r#"{"id":"r"}"#).unwrap();
        assert_eq!(absent.next_execution_at, None);
    }
}
