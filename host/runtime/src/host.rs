//! What a sandbox may reach outside itself: the capabilities a store grants its guest.

use crate::bindings::storehost::plugin::log::Level;
use crate::llm::{ChatRequest, Completion, LlmError};
use crate::{FailureReason, Rows, ScheduledTask, SqlError, Trigger, Value};

/// The guest's log levels.
pub type LogLevel = Level;

/// An LLM completion in flight. It owns everything it needs, so the sandbox can give up its
/// invocation slot while it waits.
pub type LlmFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Completion, LlmError>> + Send + 'static>>;

/// Why a capability whose import answers the guest no error could not do what it asked: the
/// call traps, classified by which it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapabilityError {
    /// The guest may not do this here, e.g. write from a query: classified as `trap`.
    Refused(String),
    /// The host failed (an I/O error): classified as `host_error`.
    Failed(String),
}

/// The host side of the plugin world's imports, implemented by a store for its own guest.
///
/// Methods return what the guest sees (`Err` values are guest-visible errors, not traps).
/// A breach the guest must not be able to hide — a full disk, a refused rate — is reported
/// through [`HostCapabilities::take_breach`] so the failure is classified correctly even when the
/// guest swallowed the error.
pub trait HostCapabilities: Send + 'static {
    /// The CPU time the current call has `left`, told before each capability that may run SQL
    /// (a statement, the scheduler's calls): statements must stop by then. The sandbox charges
    /// the capability's time to the call afterwards.
    fn limit_host_time(&mut self, left: std::time::Duration);
    /// Runs one statement without result rows on the store's database.
    fn sql_execute(&mut self, statement: &str, params: Vec<Value>) -> Result<u64, SqlError>;
    /// Runs one statement and returns its rows.
    fn sql_query(&mut self, statement: &str, params: Vec<Value>) -> Result<Rows, SqlError>;
    /// Buffers an event to append when the invocation commits.
    fn emit(&mut self, event_type: String, payload: String) -> Result<(), String>;
    /// Writes a guest log line to the host log.
    fn log(&mut self, level: LogLevel, message: String);
    /// The store's config value for `key`.
    fn config_get(&mut self, key: &str) -> Option<String>;
    /// All of the store's config values, sorted by key.
    fn config_all(&mut self) -> Vec<(String, String)>;
    /// Wall-clock milliseconds since the Unix epoch.
    fn now_ms(&mut self) -> i64;
    /// Schedules (or replaces) a task in the current invocation's transaction; answers its first
    /// due time.
    fn schedule(
        &mut self,
        task_id: String,
        trigger: Trigger,
        payload: String,
    ) -> Result<Option<i64>, String>;
    /// Cancels a task in the current invocation's transaction; answers whether it existed.
    /// The guest's `cancel` has no error to answer, so a failure traps the call.
    fn cancel_task(&mut self, task_id: &str) -> Result<bool, CapabilityError>;
    /// The store's scheduled tasks, as the current transaction sees them.
    fn list_tasks(&mut self) -> Result<Vec<ScheduledTask>, String>;
    /// Starts a chat completion. Checks quotas before it returns; the future does the waiting.
    fn llm_complete(&mut self, request: ChatRequest) -> LlmFuture;
    /// A quota breach recorded during the current invocation, if any (cleared by the call).
    fn take_breach(&mut self) -> Option<(FailureReason, String)>;
}
