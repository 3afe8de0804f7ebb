//! Tasks: the product's task events materialised into the `tasks` table, and the queries over it.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value as Json, json};
use storehost_guest_sdk::sql::{self, Row, SqlError};
use storehost_guest_sdk::{Event, log, params, query_args};

use crate::timestamp::Timestamp;

/// A task was created.
pub const TASK_CREATED: &str = "v2.TaskCreated";
/// Some fields of a task changed.
pub const TASK_UPDATED: &str = "v1.TaskUpdated";
/// A task was archived: hidden from lists unless asked for.
pub const TASK_ARCHIVED: &str = "v1.TaskArchived";

/// Query: every task, `{"includeArchived"?: bool}` → `{"tasks": [...]}`.
pub const QUERY_TASKS: &str = "tasks";
/// Query: one task, `{"id"}` → `{"task": {...} | null}`.
pub const QUERY_TASK: &str = "task";

/// The status of a task whose creation did not say.
pub const DEFAULT_STATUS: &str = "todo";

/// The `source` of events this plugin emitted.
pub const PLUGIN_SOURCE: &str = "plugin";

/// The host gives plugins no init hook, so each task event creates the table if needed.
/// `created_at`/`updated_at` have no declared type (no affinity), so they keep the event's form:
/// ISO 8601 text or epoch milliseconds.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0,
    created_at,
    updated_at
)";

const COLUMNS: &str = "id, title, description, status, archived, created_at, updated_at";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskCreated {
    id: String,
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    created_at: Option<Timestamp>,
}

/// Only the fields present in the payload change; `description: null` clears the description.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskUpdated {
    id: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    updated_at: Option<Timestamp>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskArchived {
    id: String,
    #[serde(default)]
    archived_at: Option<Timestamp>,
}

/// Tells a field given as `null` (`Some(None)`) from a field left out (`None`).
pub(crate) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// A task as queries (and the agent's tools) answer it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    pub title: String,
    pub description: Option<String>,
    pub status: String,
    pub archived: bool,
    pub created_at: Option<Timestamp>,
    pub updated_at: Option<Timestamp>,
}

impl Task {
    fn from_row(row: Row<'_>) -> Result<Self, SqlError> {
        Ok(Self {
            id: row.get("id")?,
            title: row.get("title")?,
            description: row.get("description")?,
            status: row.get("status")?,
            archived: row.get("archived")?,
            created_at: row.get("created_at")?,
            updated_at: row.get("updated_at")?,
        })
    }
}

/// Creates the `tasks` table if it does not exist yet.
pub fn ensure_schema() -> Result<(), String> {
    sql::execute(SCHEMA, params![])?;
    Ok(())
}

/// Rejects an empty id, which would make the task unreachable by `task` and updates.
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

/// A new task, as an event or the agent's `create_task` tool describes it.
#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    pub id: &'a str,
    pub title: &'a str,
    pub description: Option<&'a str>,
    pub status: &'a str,
    pub created_at: &'a Timestamp,
}

/// Inserts a task; answers `false` (changing nothing) when a task with that id exists.
pub fn insert(task: &NewTask<'_>) -> Result<bool, String> {
    ensure_schema()?;
    let inserted = sql::execute(
        "INSERT INTO tasks (id, title, description, status, archived, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5)
         ON CONFLICT (id) DO NOTHING",
        params![
            task.id,
            task.title,
            task.description,
            task.status,
            task.created_at
        ],
    )?;
    Ok(inserted > 0)
}

/// The fields of a task to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct TaskChanges<'a> {
    pub title: Option<&'a str>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<&'a str>>,
    pub status: Option<&'a str>,
}

/// Changes the given fields of task `id`; answers `false` when there is no such task.
pub fn update(id: &str, changes: &TaskChanges<'_>, updated_at: &Timestamp) -> Result<bool, String> {
    ensure_schema()?;
    let (description_given, description) = match changes.description {
        Some(description) => (true, description),
        None => (false, None),
    };
    let changed = sql::execute(
        "UPDATE tasks SET
             title = COALESCE(?2, title),
             description = CASE WHEN ?3 THEN ?4 ELSE description END,
             status = COALESCE(?5, status),
             updated_at = ?6
         WHERE id = ?1",
        params![
            id,
            changes.title,
            description_given,
            description,
            changes.status,
            updated_at,
        ],
    )?;
    Ok(changed > 0)
}

/// Marks task `id` archived; answers `false` when there is no such task.
pub fn archive(id: &str, archived_at: &Timestamp) -> Result<bool, String> {
    ensure_schema()?;
    let changed = sql::execute(
        "UPDATE tasks SET archived = 1, updated_at = ?2 WHERE id = ?1",
        params![id, archived_at],
    )?;
    Ok(changed > 0)
}

/// The task with id `id`, if any.
pub fn get(id: &str) -> Result<Option<Task>, String> {
    Ok(read_tasks(
        &format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"),
        params![id],
    )?
    .into_iter()
    .next())
}

/// Tasks in creation order; archived ones only when `include_archived`.
pub fn list(include_archived: bool) -> Result<Vec<Task>, String> {
    read_tasks(
        &format!("SELECT {COLUMNS} FROM tasks WHERE archived = 0 OR ?1 ORDER BY rowid"),
        params![include_archived],
    )
}

/// `v2.TaskCreated`: inserts the task. A second creation of the same id changes nothing (the
/// agent's own `create_task` tool writes the task and emits this event, which then comes back
/// here and finds the task in place).
pub fn on_created(event: &Event) -> Result<(), String> {
    let created: TaskCreated = event.payload_json()?;
    let id = checked_id(event, &created.id)?;
    let created_at = created
        .created_at
        .unwrap_or_else(|| Timestamp::from_epoch_ms(event.at_ms));
    let inserted = insert(&NewTask {
        id,
        title: &created.title,
        description: created.description.as_deref(),
        status: created.status.as_deref().unwrap_or(DEFAULT_STATUS),
        created_at: &created_at,
    })?;
    if !inserted {
        let message = format_args!(
            "{TASK_CREATED} (seq {}): task `{id}` already exists; kept as it was",
            event.seq
        );
        if event.source == PLUGIN_SOURCE {
            log::debug(message);
        } else {
            log::warn(message);
        }
    }
    Ok(())
}

/// `v1.TaskUpdated`: changes the fields the payload carries.
pub fn on_updated(event: &Event) -> Result<(), String> {
    let updated: TaskUpdated = event.payload_json()?;
    let id = checked_id(event, &updated.id)?;
    let updated_at = updated
        .updated_at
        .unwrap_or_else(|| Timestamp::from_epoch_ms(event.at_ms));
    let changes = TaskChanges {
        title: updated.title.as_deref(),
        description: updated.description.as_ref().map(Option::as_deref),
        status: updated.status.as_deref(),
    };
    if !update(id, &changes, &updated_at)? {
        // Retrying cannot make an unknown task appear, so this is not a failure of the event.
        log::warn(format_args!(
            "{TASK_UPDATED} (seq {}): no task `{id}`; nothing changed",
            event.seq
        ));
    }
    Ok(())
}

/// `v1.TaskArchived`: marks the task archived.
pub fn on_archived(event: &Event) -> Result<(), String> {
    let archived: TaskArchived = event.payload_json()?;
    let id = checked_id(event, &archived.id)?;
    let archived_at = archived
        .archived_at
        .unwrap_or_else(|| Timestamp::from_epoch_ms(event.at_ms));
    if !archive(id, &archived_at)? {
        log::warn(format_args!(
            "{TASK_ARCHIVED} (seq {}): no task `{id}`; nothing changed",
            event.seq
        ));
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct TasksArgs {
    #[serde(deserialize_with = "crate::args::flag")]
    include_archived: bool,
}

#[derive(Debug, Deserialize)]
struct TaskArgs {
    id: String,
}

/// Runs a read of the `tasks` table; before the first task event there is no table, and no task.
fn read_tasks(statement: &str, params: &[sql::Value]) -> Result<Vec<Task>, String> {
    let rows = match sql::query(statement, params) {
        Ok(rows) => rows,
        Err(err) if err.is_missing_table() => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    let tasks = rows
        .iter()
        .map(Task::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(tasks)
}

/// Query `tasks`: tasks in creation order, archived ones only when `includeArchived` is true.
pub fn query_tasks(args: Json) -> Result<Json, String> {
    let args: TasksArgs = query_args(QUERY_TASKS, args)?;
    Ok(json!({ "tasks": list(args.include_archived)? }))
}

/// Query `task`: the task with the given id, or `null`.
pub fn query_task(args: Json) -> Result<Json, String> {
    let args: TaskArgs = query_args(QUERY_TASK, args)?;
    Ok(json!({ "task": get(&args.id)? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_payload_tells_null_from_absent() {
        let cleared: TaskUpdated =
            serde_json::from_str(r#"{"id":"t1","description":null}"#).unwrap();
        assert_eq!(cleared.description, Some(None));
        let untouched: TaskUpdated = serde_json::from_str(r#"{"id":"t1","title":"x"}"#).unwrap();
        assert_eq!(untouched.description, None);
        assert_eq!(untouched.title.as_deref(), Some("x"));
    }

    #[test]
    fn malformed_payload_names_the_event() {
        let event = Event {
            seq: 4,
            event_type: TASK_CREATED.into(),
            payload: r#"{"title":"no id"}"#.into(),
            at_ms: 0,
            source: "api".into(),
        };
        let err = event.payload_json::<TaskCreated>().unwrap_err();
        assert!(
            err.starts_with(
                "invalid payload for event `v2.TaskCreated` (seq 4): missing field `id`"
            ),
            "{err}"
        );
    }
}
