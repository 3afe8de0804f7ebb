//! What a sandbox may reach outside itself: the capabilities a store grants its guest.

use crate::bindings::storehost::plugin::log::Level;
use crate::{FailureReason, Rows, SqlError, Value};

/// The guest's log levels.
pub type LogLevel = Level;

/// The host side of the plugin world's imports, implemented by a store for its own guest.
///
/// Methods return what the guest sees (`Err` values are guest-visible errors, not traps).
/// A breach the guest must not be able to hide — a full disk, a refused rate — is reported
/// through [`HostCapabilities::take_breach`] so the failure is classified correctly even when the
/// guest swallowed the error.
pub trait HostCapabilities: Send + 'static {
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
    /// A quota breach recorded during the current invocation, if any (cleared by the call).
    fn take_breach(&mut self) -> Option<(FailureReason, String)>;
}
