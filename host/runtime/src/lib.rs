//! The sandbox layer of storehost: one wasmtime engine for the host, one sandbox per store.
//!
//! This crate knows WebAssembly, limits and failure classes; it knows nothing of HTTP, SQLite or
//! tenants' configuration. A store hands each sandbox a [`HostCapabilities`] implementation —
//! the only way the guest reaches anything outside its own memory.

pub mod bindings;
pub mod failure;
pub mod files;
pub mod host;
pub mod plugin;
pub mod runtime;
pub mod sandbox;
pub mod scheduler;

pub use bindings::storehost::plugin::scheduler::{ScheduledTask, Trigger};
pub use bindings::storehost::plugin::types::{Event, Rows, SqlError, TaskRun, Value};

/// The `llm` capability's types, as the guest sends and receives them.
pub mod llm {
    pub use crate::bindings::storehost::plugin::llm::{
        ChatRequest, Completion, ErrorClass, LlmError, Message, Role, ToolCall, ToolDefinition,
    };
}
pub use failure::{FailureReason, InvocationError};
pub use files::{FilesUsage, GuestOpenFiles};
pub use host::{CapabilityError, HostCapabilities, LlmFuture, LogLevel};
pub use plugin::{Plugin, PluginError, write_atomically};
pub use runtime::{DEMOTED_NICE, Runtime, RuntimeOptions};
pub use sandbox::{Limits, Sandbox, SandboxFiles, SandboxOptions, Usage};
pub use scheduler::Priority;

/// Locks `mutex`, going on with what a panicked holder left (every state behind these locks
/// is valid between statements).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
