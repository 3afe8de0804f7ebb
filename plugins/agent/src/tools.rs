//! The tools the model may call: their JSON schemas, and what each does.
//!
//! A tool acts on the plugin's own tables right away (so a later call in the same loop sees its
//! effect) and emits the matching domain event (so clients and other readers of the log see
//! it). When that event comes back to `handle-event`, its handler finds the row already in
//! place: creation is idempotent by id, and an update or archive applies the same values again,
//! which leaves the row as replaying the log in order would.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::events;
use storehost_guest_sdk::llm::ToolDefinition;

use crate::ids;
use crate::limits;
use crate::recurring::{self, Created, MIN_INTERVAL_HOURS, NewRecurringTask, Schedule};
use crate::tasks::{self, DEFAULT_STATUS, NewTask, Task, TaskChanges};
use crate::timestamp::Timestamp;

/// The statuses a task may have, as the tools accept them.
pub const STATUSES: [&str; 3] = ["todo", "in-progress", "done"];

/// Why a tool call did not succeed.
#[derive(Debug)]
pub enum ToolFailure {
    /// The call itself was wrong (bad arguments, unknown id): the model is told and may retry.
    Rejected(String),
    /// The plugin could not do its work (a SQL failure): the whole invocation fails and is
    /// retried by the host.
    Internal(String),
}

impl From<String> for ToolFailure {
    fn from(message: String) -> Self {
        Self::Internal(message)
    }
}

/// What a run of the loop works on behalf of: ids of what its tools create derive from it.
#[derive(Debug)]
pub struct ToolContext {
    /// The user message or task execution that started the loop.
    origin: String,
    /// How many ids were derived so far.
    derived: u32,
    /// The time the tools stamp on what they write.
    now: Timestamp,
    /// Whether `create_recurring_task` is offered: not in a recurring task's execution, whose
    /// prompt (often the very request that created it, like "remind me to stretch every hour")
    /// would otherwise create another schedule on every run, without bound.
    may_schedule: bool,
}

impl ToolContext {
    /// A context for a loop answering chat message `message_id` at `now_ms`.
    pub fn for_chat(message_id: &str, now_ms: i64) -> Self {
        Self::new(message_id, now_ms, true)
    }

    /// A context for execution `execution_id` of a recurring task, at `now_ms`: it may not
    /// create recurring tasks.
    pub fn for_execution(execution_id: &str, now_ms: i64) -> Self {
        Self::new(execution_id, now_ms, false)
    }

    fn new(origin: &str, now_ms: i64, may_schedule: bool) -> Self {
        Self {
            origin: origin.to_owned(),
            derived: 0,
            now: Timestamp::from_epoch_ms(now_ms),
            may_schedule,
        }
    }

    /// The next id with `prefix` for which `taken` says no.
    fn next_id(
        &mut self,
        prefix: &str,
        taken: impl Fn(&str) -> Result<bool, String>,
    ) -> Result<String, String> {
        loop {
            let id = ids::derive(prefix, &self.origin, self.derived);
            self.derived += 1;
            if !taken(&id)? {
                return Ok(id);
            }
        }
    }
}

/// The tools offered to the model in `ctx` (a recurring task's execution is not offered
/// `create_recurring_task`).
pub fn definitions(ctx: &ToolContext) -> Vec<ToolDefinition> {
    let mut tools = all_definitions();
    if !ctx.may_schedule {
        tools.retain(|tool| tool.name != CREATE_RECURRING_TASK);
    }
    tools
}

/// The tool that creates recurring tasks (see [`ToolContext::for_execution`]).
const CREATE_RECURRING_TASK: &str = "create_recurring_task";

fn all_definitions() -> Vec<ToolDefinition> {
    let status = json!({"type": "string", "enum": STATUSES, "description": "The task's status."});
    let id = json!({"type": "string", "description": "The task's id, as list_tasks or create_task answered it."});
    let tool = |name: &str, description: &str, parameters: Json| ToolDefinition {
        name: name.to_owned(),
        description: description.to_owned(),
        parameters: parameters.to_string(),
    };
    vec![
        tool(
            "create_task",
            "Create a task in the user's task list. Answers the created task with its id.",
            json!({
                "type": "object",
                "properties": {
                    "title": {"type": "string", "description": "A short title."},
                    "description": {"type": "string", "description": "Optional details."},
                    "status": status,
                },
                "required": ["title"],
                "additionalProperties": false,
            }),
        ),
        tool(
            "update_task",
            "Change the title, description or status of a task. Only the fields given change.",
            json!({
                "type": "object",
                "properties": {
                    "id": id,
                    "title": {"type": "string"},
                    "description": {"type": ["string", "null"], "description": "null clears it."},
                    "status": status,
                },
                "required": ["id"],
                "additionalProperties": false,
            }),
        ),
        tool(
            "archive_task",
            "Archive a task: it disappears from the task list but is kept.",
            json!({
                "type": "object",
                "properties": {"id": id},
                "required": ["id"],
                "additionalProperties": false,
            }),
        ),
        tool(
            "get_task_by_id",
            "Read one task by its id.",
            json!({
                "type": "object",
                "properties": {"id": id},
                "required": ["id"],
                "additionalProperties": false,
            }),
        ),
        tool(
            "list_tasks",
            "List the user's tasks (oldest first), optionally only those with a status. A long list comes in pages: when `more` is in the answer, call again with its `nextOffset` as `offset`.",
            json!({
                "type": "object",
                "properties": {
                    "status": status,
                    "includeArchived": {"type": "boolean", "description": "Also list archived tasks."},
                    "offset": {"type": "integer", "minimum": 0, "description": "Skip this many tasks (from a previous answer's nextOffset)."},
                },
                "additionalProperties": false,
            }),
        ),
        tool(
            "create_recurring_task",
            "Create a recurring task: on its schedule, the assistant runs `prompt` on its own and records the result. Give either intervalHours or cron; it runs at most once a minute.",
            json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "A short name."},
                    "prompt": {"type": "string", "description": "What to do each time, as an instruction to the assistant."},
                    "intervalHours": {"type": "number", "minimum": MIN_INTERVAL_HOURS, "description": "Run every this many hours (at least one minute: 0.0167)."},
                    "cron": {"type": "string", "description": "Or: a cron expression in UTC with 5 fields, like \"0 9 * * MON-FRI\"."},
                },
                "required": ["name", "prompt"],
                "additionalProperties": false,
            }),
        ),
    ]
}

/// Runs tool `name` with the JSON text `arguments`; answers the result to show the model.
pub fn call(ctx: &mut ToolContext, name: &str, arguments: &str) -> Result<Json, ToolFailure> {
    match name {
        "create_task" => create_task(ctx, args(name, arguments)?),
        "update_task" => update_task(ctx, args(name, arguments)?),
        "archive_task" => archive_task(ctx, args(name, arguments)?),
        "get_task_by_id" => get_task_by_id(args(name, arguments)?),
        "list_tasks" => list_tasks(args(name, arguments)?),
        CREATE_RECURRING_TASK if !ctx.may_schedule => Err(ToolFailure::Rejected(
            "create_recurring_task is not available while a recurring task runs: a run may not create more schedules (each run would add another). Carry out this run's instruction with the other tools".into(),
        )),
        CREATE_RECURRING_TASK => create_recurring_task(ctx, args(name, arguments)?),
        other => Err(ToolFailure::Rejected(format!(
            "there is no tool named `{other}`; the tools are create_task, update_task, archive_task, get_task_by_id, list_tasks and create_recurring_task"
        ))),
    }
}

/// Parses a call's arguments (empty text counts as `{}`).
fn args<T: DeserializeOwned>(tool: &str, arguments: &str) -> Result<T, ToolFailure> {
    let text = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    serde_json::from_str(text).map_err(|err| {
        ToolFailure::Rejected(format!(
            "the arguments of {tool} are not valid: {err}; send a JSON object that fits the tool's schema"
        ))
    })
}

fn checked_status(status: Option<&str>) -> Result<Option<&str>, ToolFailure> {
    match status {
        Some(status) if !STATUSES.contains(&status) => Err(ToolFailure::Rejected(format!(
            "status `{status}` is not one of {}",
            STATUSES.join(", ")
        ))),
        other => Ok(other),
    }
}

fn non_empty<'a>(field: &str, value: &'a str) -> Result<&'a str, ToolFailure> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        Err(ToolFailure::Rejected(format!(
            "`{field}` must not be empty"
        )))
    } else {
        Ok(trimmed)
    }
}

fn no_task(id: &str) -> ToolFailure {
    ToolFailure::Rejected(format!(
        "there is no task with id `{id}`; call list_tasks to see the ids"
    ))
}

/// A task as tools answer it: the fields a model needs, compactly.
fn task_json(task: &Task) -> Json {
    let mut value = json!({"id": task.id, "title": task.title, "status": task.status});
    if let Some(description) = &task.description {
        value["description"] = json!(description);
    }
    if task.archived {
        value["archived"] = json!(true);
    }
    value
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

fn create_task(ctx: &mut ToolContext, args: CreateTask) -> Result<Json, ToolFailure> {
    let title = non_empty("title", &args.title)?;
    let status = checked_status(args.status.as_deref())?.unwrap_or(DEFAULT_STATUS);
    let description = args.description.as_deref().filter(|d| !d.trim().is_empty());
    let id = ctx.next_id("t", |id| Ok(tasks::get(id)?.is_some()))?;
    let created_at = ctx.now.clone();
    tasks::insert(&NewTask {
        id: &id,
        title,
        description,
        status,
        created_at: &created_at,
    })?;
    events::emit(
        tasks::TASK_CREATED,
        &json!({
            "id": id,
            "title": title,
            "description": description,
            "status": status,
            "createdAt": created_at,
        }),
    )?;
    let task = tasks::get(&id)?.ok_or_else(|| format!("task `{id}` vanished after insert"))?;
    Ok(json!({ "task": task_json(&task) }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateTask {
    id: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default, deserialize_with = "crate::tasks::present")]
    description: Option<Option<String>>,
    #[serde(default)]
    status: Option<String>,
}

fn update_task(ctx: &mut ToolContext, args: UpdateTask) -> Result<Json, ToolFailure> {
    let title = args
        .title
        .as_deref()
        .map(|t| non_empty("title", t))
        .transpose()?;
    let status = checked_status(args.status.as_deref())?;
    if title.is_none() && args.description.is_none() && status.is_none() {
        return Err(ToolFailure::Rejected(
            "nothing to change: give at least one of title, description, status".into(),
        ));
    }
    let changes = TaskChanges {
        title,
        description: args.description.as_ref().map(Option::as_deref),
        status,
    };
    if !tasks::update(&args.id, &changes, &ctx.now)? {
        return Err(no_task(&args.id));
    }
    let mut payload = json!({"id": args.id, "updatedAt": ctx.now});
    if let Some(title) = title {
        payload["title"] = json!(title);
    }
    if let Some(description) = &args.description {
        payload["description"] = json!(description);
    }
    if let Some(status) = status {
        payload["status"] = json!(status);
    }
    events::emit(tasks::TASK_UPDATED, &payload)?;
    let task = tasks::get(&args.id)?.ok_or_else(|| no_task(&args.id))?;
    Ok(json!({ "task": task_json(&task) }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskId {
    id: String,
}

fn archive_task(ctx: &mut ToolContext, args: TaskId) -> Result<Json, ToolFailure> {
    if !tasks::archive(&args.id, &ctx.now)? {
        return Err(no_task(&args.id));
    }
    events::emit(
        tasks::TASK_ARCHIVED,
        &json!({"id": args.id, "archivedAt": ctx.now}),
    )?;
    Ok(json!({ "archived": true, "id": args.id }))
}

fn get_task_by_id(args: TaskId) -> Result<Json, ToolFailure> {
    let task = tasks::get(&args.id)?.ok_or_else(|| no_task(&args.id))?;
    Ok(json!({ "task": task_json(&task) }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListTasks {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    include_archived: bool,
    #[serde(default)]
    offset: usize,
}

/// The most bytes of tasks one `list_tasks` answer holds (under the cap on any tool result).
const LIST_BYTES: usize = limits::TOOL_RESULT_BYTES - 1024;
/// The most bytes of a title or description a task listing shows (`get_task_by_id` shows
/// it all).
const LISTED_TEXT_BYTES: usize = 500;

/// Lists the tasks from `offset` on, as many as fit in [`LIST_BYTES`]; when more are left,
/// `more` says how many and `nextOffset` where to go on.
fn list_tasks(args: ListTasks) -> Result<Json, ToolFailure> {
    let status = checked_status(args.status.as_deref())?;
    let matching: Vec<Task> = tasks::list(args.include_archived)?
        .into_iter()
        .filter(|task| status.is_none_or(|s| task.status == s))
        .collect();
    let mut listed = Vec::new();
    let mut bytes = 0;
    for task in matching.iter().skip(args.offset) {
        let mut item = task_json(task);
        if task.title.len() > LISTED_TEXT_BYTES {
            item["title"] = json!(limits::truncate(&task.title, LISTED_TEXT_BYTES));
        }
        if let Some(description) = &task.description
            && description.len() > LISTED_TEXT_BYTES
        {
            item["description"] = json!(limits::truncate(description, LISTED_TEXT_BYTES));
        }
        let size = item.to_string().len() + 1;
        if bytes + size > LIST_BYTES {
            break;
        }
        bytes += size;
        listed.push(item);
    }
    let next_offset = args.offset.saturating_add(listed.len());
    let mut answer = json!({ "count": matching.len(), "tasks": listed });
    if next_offset < matching.len() {
        answer["more"] = json!(matching.len() - next_offset);
        answer["nextOffset"] = json!(next_offset);
        answer["note"] = json!(format!(
            "{} more tasks are not shown; call list_tasks with offset {next_offset} for the next ones, or narrow by status",
            matching.len() - next_offset
        ));
    }
    Ok(answer)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateRecurringTask {
    name: String,
    prompt: String,
    #[serde(default)]
    interval_hours: Option<f64>,
    #[serde(default)]
    cron: Option<String>,
}

fn create_recurring_task(
    ctx: &mut ToolContext,
    args: CreateRecurringTask,
) -> Result<Json, ToolFailure> {
    let name = non_empty("name", &args.name)?;
    let prompt = non_empty("prompt", &args.prompt)?;
    let schedule = Schedule::from_fields(args.interval_hours, args.cron.as_deref())
        .and_then(|schedule| schedule.at_most_once_a_minute().map(|()| schedule))
        .map_err(ToolFailure::Rejected)?;
    let id = ctx.next_id("rt", |id| Ok(recurring::get(id)?.is_some()))?;
    let new = NewRecurringTask {
        id: &id,
        name,
        prompt,
        schedule: &schedule,
        enabled: true,
        created_at: &ctx.now,
    };
    let task = match recurring::create(&new, false)? {
        Created::Stored(task) => task,
        Created::Refused(problem) => return Err(ToolFailure::Rejected(problem)),
        Created::Exists => return Err(format!("recurring task `{id}` exists already").into()),
    };
    let mut payload = json!({"id": id, "name": name, "prompt": prompt, "createdAt": ctx.now});
    schedule.write_fields(&mut payload);
    events::emit(recurring::RECURRING_TASK_CREATED, &payload)?;
    Ok(json!({ "recurringTask": task.to_json() }))
}
