//! The workspace product's agent plugin (SPEC §8a).
//!
//! It materialises the product's events into its own tables, answers chat messages with an
//! agentic loop (the model calls tools that read and change the workspace's tasks), and runs
//! recurring tasks on schedule through the same loop. Each concern owns its module, its tables
//! and its event types; this file only routes events, tasks and queries to them.
//!
//! - [`tasks`]: `v2.TaskCreated`, `v1.TaskUpdated`, `v1.TaskArchived` → `tasks`.
//! - [`conversations`]: `v1.ChatMessageSent` → `conversations`, `messages`, and the reply.
//! - [`recurring`]: `v1.RecurringTask*` → `recurring_tasks`, schedules, and each execution.
//! - [`agent_loop`] and [`tools`]: the loop and the tools the model may call.
//! - `limits`: the sizes that keep requests to the model and emitted events within the host's.
#![forbid(unsafe_code)]

pub mod agent_loop;
mod args;
pub mod conversations;
mod ids;
mod limits;
pub mod recurring;
pub mod tasks;
mod timestamp;
pub mod tools;

use serde_json::Value as Json;
use storehost_guest_sdk::{Event, Plugin, Task, export_plugin};

/// The plugin: all of its state lives in the store's database.
struct Agent;

/// Every query the agent answers.
const QUERIES: [&str; 6] = [
    tasks::QUERY_TASKS,
    tasks::QUERY_TASK,
    conversations::QUERY_CONVERSATIONS,
    conversations::QUERY_MESSAGES,
    recurring::QUERY_RECURRING_TASKS,
    recurring::QUERY_EXECUTIONS,
];

impl Plugin for Agent {
    fn handle_event(event: Event) -> Result<(), String> {
        match event.event_type.as_str() {
            tasks::TASK_CREATED => tasks::on_created(&event),
            tasks::TASK_UPDATED => tasks::on_updated(&event),
            tasks::TASK_ARCHIVED => tasks::on_archived(&event),
            conversations::CHAT_MESSAGE_SENT => conversations::on_message_sent(&event),
            conversations::LLM_RESPONSE_RECEIVED => conversations::on_response_received(&event),
            recurring::RECURRING_TASK_CREATED => recurring::on_created(&event),
            recurring::RECURRING_TASK_UPDATED => recurring::on_updated(&event),
            recurring::RECURRING_TASK_DELETED => recurring::on_deleted(&event),
            recurring::RECURRING_TASK_ENABLED => recurring::on_enabled(&event, true),
            recurring::RECURRING_TASK_DISABLED => recurring::on_enabled(&event, false),
            // Events of other types (including the rest of what this plugin emits, which it
            // recorded when it emitted them) are not for it.
            _ => Ok(()),
        }
    }

    fn run_task(task: Task) -> Result<(), String> {
        // Every schedule this plugin makes belongs to a recurring task, under the task's id.
        recurring::run(&task)
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        match name {
            tasks::QUERY_TASKS => tasks::query_tasks(args),
            tasks::QUERY_TASK => tasks::query_task(args),
            conversations::QUERY_CONVERSATIONS => conversations::query_conversations(args),
            conversations::QUERY_MESSAGES => conversations::query_messages(args),
            recurring::QUERY_RECURRING_TASKS => recurring::query_recurring_tasks(args),
            recurring::QUERY_EXECUTIONS => recurring::query_executions(args),
            other => Err(format!(
                "unknown query `{other}`; the agent answers: {}",
                QUERIES.join(", ")
            )),
        }
    }
}

export_plugin!(Agent);
