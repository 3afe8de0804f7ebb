//! The capabilities a store grants its guest: SQL on its own database, emitting into its own
//! log, its own config, logging and the clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use storehost_runtime::{FailureReason, HostCapabilities, LogLevel, Rows, SqlError, Value};

use crate::guest_db::{self, GuestDb};
use crate::id::StoreId;

/// Most events one invocation may emit.
pub const MAX_EMITS_PER_CALL: usize = 10_000;
/// Most guest log lines one invocation may write (the rest are counted, not written).
pub const MAX_LOG_LINES_PER_CALL: u32 = 100;
/// Longest guest log line kept, in bytes.
const MAX_LOG_LINE: usize = 4_096;

/// One store's grant to its guest. Created per sandbox; reset per invocation.
pub struct StoreCapabilities {
    store_id: StoreId,
    db: Arc<Mutex<GuestDb>>,
    config: Arc<BTreeMap<String, String>>,
    emitted: Vec<(String, String)>,
    breach: Option<(FailureReason, String)>,
    cpu_ms_per_call: u64,
    log_lines: u32,
}

impl StoreCapabilities {
    pub(crate) fn new(
        store_id: StoreId,
        db: Arc<Mutex<GuestDb>>,
        config: Arc<BTreeMap<String, String>>,
        cpu_ms_per_call: u64,
    ) -> Self {
        Self {
            store_id,
            db,
            config,
            emitted: Vec::new(),
            breach: None,
            cpu_ms_per_call,
            log_lines: 0,
        }
    }

    /// Clears what the previous invocation left.
    pub(crate) fn start_invocation(&mut self) {
        self.emitted.clear();
        self.breach = None;
        self.log_lines = 0;
    }

    /// The events emitted by the current invocation, in order.
    pub(crate) fn take_emitted(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.emitted)
    }

    fn db(&self) -> MutexGuard<'_, GuestDb> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note_sql_error(&mut self, err: &SqlError) {
        if self.breach.is_none() {
            self.breach = guest_db::breach_of(err, self.cpu_ms_per_call);
        }
    }
}

impl HostCapabilities for StoreCapabilities {
    fn sql_execute(&mut self, statement: &str, params: Vec<Value>) -> Result<u64, SqlError> {
        let result = self.db().guest_execute(statement, params);
        if let Err(err) = &result {
            self.note_sql_error(err);
        }
        result
    }

    fn sql_query(&mut self, statement: &str, params: Vec<Value>) -> Result<Rows, SqlError> {
        let result = self.db().guest_query(statement, params);
        if let Err(err) = &result {
            self.note_sql_error(err);
        }
        result
    }

    fn emit(&mut self, event_type: String, payload: String) -> Result<(), String> {
        if self.emitted.len() >= MAX_EMITS_PER_CALL {
            let message = format!("one call may emit at most {MAX_EMITS_PER_CALL} events");
            self.breach
                .get_or_insert((FailureReason::RateLimited, message.clone()));
            return Err(message);
        }
        if event_type.is_empty() || event_type.len() > 200 {
            return Err("an event type is 1 to 200 characters".into());
        }
        if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(&payload) {
            return Err(format!(
                "the payload of {event_type:?} is not valid JSON: {err}"
            ));
        }
        self.emitted.push((event_type, payload));
        Ok(())
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            if self.log_lines == MAX_LOG_LINES_PER_CALL + 1 {
                tracing::warn!(store_id = %self.store_id, "guest log lines beyond {MAX_LOG_LINES_PER_CALL} in one call are dropped");
            }
            return;
        }
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let store_id = self.store_id.as_str();
        match level {
            LogLevel::Trace => tracing::trace!(target: "guest", store_id, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "guest", store_id, "{message}"),
            LogLevel::Info => tracing::info!(target: "guest", store_id, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "guest", store_id, "{message}"),
            LogLevel::Error => tracing::error!(target: "guest", store_id, "{message}"),
        }
    }

    fn config_get(&mut self, key: &str) -> Option<String> {
        self.config.get(key).cloned()
    }

    fn config_all(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn now_ms(&mut self) -> i64 {
        crate::sqlite::now_ms()
    }

    fn take_breach(&mut self) -> Option<(FailureReason, String)> {
        self.breach.take()
    }
}
