//! The workspace product's agent plugin.
//!
//! It materialises the product's task events into its own tables and answers queries over
//! them. Each concern owns its module, its tables and its event types; this file only routes
//! events and queries to them. (The agentic loop of SPEC §8a, with conversations and recurring
//! tasks, slots in as further modules routed the same way.)
#![forbid(unsafe_code)]

mod tasks;
mod timestamp;

use serde_json::Value as Json;
use storehost_guest_sdk::{Event, Plugin, export_plugin};

/// The plugin: all of its state lives in the store's database.
struct Agent;

impl Plugin for Agent {
    fn handle_event(event: Event) -> Result<(), String> {
        match event.event_type.as_str() {
            tasks::TASK_CREATED => tasks::on_created(&event),
            tasks::TASK_UPDATED => tasks::on_updated(&event),
            tasks::TASK_ARCHIVED => tasks::on_archived(&event),
            // Events of other types (including the ones this plugin emits) are not for it.
            _ => Ok(()),
        }
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        match name {
            tasks::QUERY_TASKS => tasks::query_tasks(args),
            tasks::QUERY_TASK => tasks::query_task(args),
            other => Err(format!(
                "unknown query `{other}`; the agent answers: {}",
                [tasks::QUERY_TASKS, tasks::QUERY_TASK].join(", ")
            )),
        }
    }
}

export_plugin!(Agent);
