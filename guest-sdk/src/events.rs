//! Appending events to the store's own log.

use serde::Serialize;

use crate::__bindings::storehost::plugin::events as wit;

/// Emits an event with a JSON payload serialized from `payload`.
///
/// The event is appended (with `source: "plugin"`) only when the current invocation commits;
/// if the handler fails, it is never appended.
pub fn emit(event_type: &str, payload: &impl Serialize) -> Result<(), String> {
    let payload = serde_json::to_string(payload)
        .map_err(|err| format!("payload of event `{event_type}` could not be encoded: {err}"))?;
    emit_json(event_type, &payload)
}

/// Emits an event whose payload is already JSON text.
pub fn emit_json(event_type: &str, payload: &str) -> Result<(), String> {
    wit::emit(event_type, payload)
}
