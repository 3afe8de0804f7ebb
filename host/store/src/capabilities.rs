//! The capabilities a store grants its guest: SQL on its own database, emitting into its own
//! log, its own config, logging and the clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use storehost_runtime::llm::{ChatRequest, ErrorClass, LlmError};
use storehost_runtime::{
    CapabilityError, FailureReason, HostCapabilities, LlmFuture, LogLevel, Rows, ScheduledTask,
    SqlError, Trigger, Value,
};

use crate::guest_db::{self, GuestDb, HostWriteRefused};
use crate::id::StoreId;
use crate::schedules::{self, Spec};

/// Where a store's `llm` calls go: the host's provider, behind its quotas. Implemented by the
/// control plane (which owns the providers); the store only forwards.
pub trait LlmBackend: Send + Sync + std::fmt::Debug + 'static {
    /// Starts one completion for `store`, to be answered by `deadline` when there is one (the
    /// provider fits its retries and waits into it). Quota refusals come back as a ready
    /// `rate-limited` error.
    fn complete(
        &self,
        store: &StoreId,
        request: ChatRequest,
        deadline: Option<std::time::Instant>,
    ) -> LlmFuture;

    /// Sets `store`'s `llm_calls_per_minute` (when it starts and whenever its quotas change).
    fn set_calls_per_minute(&self, store: &StoreId, per_minute: u32) {
        let _ = (store, per_minute);
    }

    /// Forgets `store` (it stopped).
    fn forget(&self, store: &StoreId) {
        let _ = store;
    }
}

/// Most events one invocation may emit.
pub const MAX_EMITS_PER_CALL: usize = 10_000;
/// The most text a chat completion request may hold (its messages, tool calls and tools): the
/// host holds it (and the provider's copies of it) outside the guest's memory quota, and the
/// offline provider matches its rules over all of it on the host's time (8 MiB took 1.5 s of
/// CPU, charged 2–5 ms).
pub const MAX_LLM_REQUEST_BYTES: usize = 1 << 20;
/// Largest payload of one emitted event, in bytes (the API's default body limit).
pub const MAX_EMITTED_PAYLOAD: usize = 1 << 20;
/// Most bytes (types and payloads) one invocation may emit: they stay in the host's memory
/// until the invocation ends.
pub const MAX_EMITTED_BYTES_PER_CALL: usize = 16 << 20;
/// Most guest log lines one invocation may write (the rest are counted, not written).
pub const MAX_LOG_LINES_PER_CALL: u32 = 100;
/// Longest guest log line kept, in bytes.
const MAX_LOG_LINE: usize = 4_096;
/// Guest log lines one store may write a second, over all its calls (queries come as often as
/// its callers ask: at 100 lines of 4 KB per call, 200 queries wrote 82 MB of host log in a
/// second)…
pub const GUEST_LOG_LINES_PER_SECOND: u32 = 50;
/// …and at once, after a quiet while.
pub const GUEST_LOG_BURST: u32 = 500;

/// A store's allowance of guest log lines ([`GUEST_LOG_LINES_PER_SECOND`], [`GUEST_LOG_BURST`]);
/// the lines over it are counted, and the count logged once lines pass again.
pub struct GuestLogLimit {
    limiter: governor::DefaultDirectRateLimiter,
    dropped: std::sync::atomic::AtomicU64,
}

impl Default for GuestLogLimit {
    fn default() -> Self {
        let per_second = std::num::NonZeroU32::new(GUEST_LOG_LINES_PER_SECOND)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(GUEST_LOG_BURST).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            limiter: governor::RateLimiter::direct_with_clock(
                governor::Quota::per_second(per_second).allow_burst(burst),
                crate::store::RATE_CLOCK.clone(),
            ),
            dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl GuestLogLimit {
    /// Whether one more line of `store_id` may be written now.
    fn admit(&self, store_id: &StoreId) -> bool {
        use std::sync::atomic::Ordering;
        if self.limiter.check().is_err() {
            if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(store_id = %store_id, "guest log lines over {GUEST_LOG_LINES_PER_SECOND} a second (after a burst of {GUEST_LOG_BURST}) are dropped");
            }
            return false;
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(store_id = %store_id, dropped, "guest log lines were dropped: over {GUEST_LOG_LINES_PER_SECOND} a second");
        }
        true
    }
}

/// The bytes of a chat request: the text of its messages, their tool calls and the tools
/// offered, and 64 for each of those (what the host and its provider copy and send).
fn request_bytes(request: &ChatRequest) -> usize {
    // What each message, call and tool costs beyond its text (a request of a million empty
    // messages is no small request).
    const ITEM: usize = 64;
    let messages: usize = request
        .messages
        .iter()
        .map(|message| {
            ITEM + message.content.as_ref().map_or(0, String::len)
                + message.tool_call_id.as_ref().map_or(0, String::len)
                + message
                    .tool_calls
                    .iter()
                    .map(|call| ITEM + call.id.len() + call.name.len() + call.arguments.len())
                    .sum::<usize>()
        })
        .sum();
    let tools: usize = request
        .tools
        .iter()
        .map(|tool| ITEM + tool.name.len() + tool.description.len() + tool.parameters.len())
        .sum();
    messages + tools
}

/// One store's grant to its guest. Created per sandbox; reset per invocation.
pub struct StoreCapabilities {
    store_id: StoreId,
    db: Arc<Mutex<GuestDb>>,
    config: Arc<BTreeMap<String, String>>,
    emitted: Vec<(String, String)>,
    breach: Option<(FailureReason, String)>,
    cpu_ms_per_call: u64,
    log_lines: u32,
    llm: Option<Arc<dyn LlmBackend>>,
    llm_calls: u64,
    /// When the current invocation reaches its `wall_ms_per_call`, and that limit.
    wall: Option<(std::time::Instant, std::time::Duration)>,
    /// Bytes emitted by the current invocation.
    emitted_bytes: usize,
    /// The store's allowance of log lines, across calls.
    log_limit: Arc<GuestLogLimit>,
    /// What the current invocation may emit.
    emit_room: EmitRoom,
}

/// What one invocation may emit, set as it begins.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmitRoom {
    /// How many events the store's queue takes before `max_pending_events`: emitted events
    /// wait in it like appended ones.
    pub(crate) events: usize,
    /// How many bytes of events the store's log takes before its `event_log` quota.
    pub(crate) log_bytes: u64,
}

impl EmitRoom {
    /// Room for as much as one call may emit.
    pub(crate) const UNBOUNDED: Self = Self {
        events: MAX_EMITS_PER_CALL,
        log_bytes: u64::MAX,
    };
}

impl StoreCapabilities {
    /// The capabilities of store `store_id`: its database `db`, its plugin config, its CPU
    /// budget per call and the host's LLM backend. A store's actor makes them for each sandbox;
    /// public for the benchmark, which instantiates sandboxes as the actor does.
    pub fn new(
        store_id: StoreId,
        db: Arc<Mutex<GuestDb>>,
        config: Arc<BTreeMap<String, String>>,
        cpu_ms_per_call: u64,
        llm: Option<Arc<dyn LlmBackend>>,
    ) -> Self {
        Self {
            store_id,
            db,
            config,
            emitted: Vec::new(),
            breach: None,
            cpu_ms_per_call,
            log_lines: 0,
            llm,
            llm_calls: 0,
            wall: None,
            emitted_bytes: 0,
            emit_room: EmitRoom::UNBOUNDED,
            log_limit: Arc::default(),
        }
    }

    /// These capabilities, logging within the store's allowance `limit` (shared by all its
    /// sandboxes; without it, each set of capabilities has an allowance of its own).
    pub fn with_log_limit(self, limit: Arc<GuestLogLimit>) -> Self {
        Self {
            log_limit: limit,
            ..self
        }
    }

    /// [`HostCapabilities::schedule`]'s work: checks, the store's room for the task, the save.
    fn save_schedule(
        &mut self,
        task_id: &str,
        trigger: &Trigger,
        payload: &str,
    ) -> Result<Option<i64>, String> {
        schedules::validate(task_id, payload)?;
        let spec = Spec::parse(trigger)?;
        let now = crate::sqlite::now_ms();
        let bytes = payload.len() + spec.text().len();
        let saved = self
            .db()
            .as_host(|conn| match schedules::check_room(conn, task_id, bytes)? {
                Ok(()) => schedules::upsert(conn, task_id, &spec, payload, now).map(Ok),
                Err(refused) => Ok(Err(refused)),
            });
        match saved {
            Err(refused) => Err(format!("tasks cannot be scheduled here: {refused}")),
            Ok(Ok(Err(no_room))) => Err(no_room),
            Ok(Ok(Ok(next))) => Ok(next),
            Ok(Err(err)) => {
                let message = format!("could not save the schedule of `{task_id}`: {err}");
                if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                    self.breach
                        .get_or_insert((FailureReason::DiskFull, message.clone()));
                }
                Err(message)
            }
        }
    }

    /// LLM completions started since the last call of this method.
    pub fn take_llm_calls(&mut self) -> u64 {
        std::mem::take(&mut self.llm_calls)
    }

    /// Clears what the previous invocation left; the new one may run for `wall_limit` and
    /// emit what `emit_room` has room for.
    pub(crate) fn start_invocation(
        &mut self,
        wall_limit: std::time::Duration,
        emit_room: EmitRoom,
    ) {
        self.emitted.clear();
        self.emitted_bytes = 0;
        self.emit_room = EmitRoom {
            events: emit_room.events.min(MAX_EMITS_PER_CALL),
            ..emit_room
        };
        self.breach = None;
        self.log_lines = 0;
        self.wall = Some((std::time::Instant::now() + wall_limit, wall_limit));
    }

    /// How long an `llm` call may wait now: what the invocation has left of its wall time,
    /// less a reserve (a quarter of the limit, at most a second) for the plugin to record the
    /// outcome — so a slow model gives the plugin a `timeout` error it can answer with,
    /// instead of the whole invocation failing as `wall_time` with nothing kept. Also the
    /// reserve and the limit.
    fn llm_budget(
        &self,
    ) -> Option<(
        std::time::Duration,
        std::time::Duration,
        std::time::Duration,
    )> {
        let (deadline, limit) = self.wall?;
        let reserve = (limit / 4).min(std::time::Duration::from_secs(1));
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        Some((left.saturating_sub(reserve), reserve, limit))
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
    fn limit_host_time(&mut self, left: std::time::Duration) {
        self.db().limit_statements(left);
    }

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
        if payload.len() > MAX_EMITTED_PAYLOAD {
            return Err(format!(
                "the payload of {event_type:?} is {} bytes; an emitted event's payload is at most {MAX_EMITTED_PAYLOAD}",
                payload.len()
            ));
        }
        let bytes = self.emitted_bytes + event_type.len() + payload.len();
        if bytes > MAX_EMITTED_BYTES_PER_CALL {
            let message =
                format!("one call may emit at most {MAX_EMITTED_BYTES_PER_CALL} bytes of events");
            self.breach
                .get_or_insert((FailureReason::Memory, message.clone()));
            return Err(message);
        }
        if self.emitted.len() >= self.emit_room.events {
            return Err(format!(
                "the store's queue is full: max_pending_events left room for {} more events when this call began, and it has emitted them; emit fewer, or raise the quota",
                self.emit_room.events
            ));
        }
        if bytes as u64 > self.emit_room.log_bytes {
            let message = format!(
                "the store's event log is full: its event_log quota left room for {} bytes of events when this call began, and this event would take the call's emits to {bytes}; emit less, or raise the quota",
                self.emit_room.log_bytes
            );
            // A call that fails on it fails as `disk_full`, as a full files quota does.
            self.breach
                .get_or_insert((FailureReason::DiskFull, message.clone()));
            return Err(message);
        }
        if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(&payload) {
            return Err(format!(
                "the payload of {event_type:?} is not valid JSON: {err}"
            ));
        }
        self.emitted_bytes = bytes;
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
        if !self.log_limit.admit(&self.store_id) {
            return;
        }
        let (message, _) = storehost_runtime::failure::one_line_within(&message, MAX_LOG_LINE);
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

    fn schedule(
        &mut self,
        task_id: String,
        trigger: Trigger,
        payload: String,
    ) -> Result<Option<i64>, String> {
        // The sandbox charges the host's time here to the call (parsing a cron expression
        // that never matches searches thousands of years; counting the store's tasks).
        self.save_schedule(&task_id, &trigger, &payload)
    }

    fn cancel_task(&mut self, task_id: &str) -> Result<bool, CapabilityError> {
        match self.db().as_host(|conn| schedules::cancel(conn, task_id)) {
            Err(HostWriteRefused::NoSavepoint) => Err(CapabilityError::Failed(
                HostWriteRefused::NoSavepoint.to_string(),
            )),
            Err(refused) => Err(CapabilityError::Refused(refused.to_string())),
            Ok(result) => result.map_err(|err| CapabilityError::Failed(err.to_string())),
        }
    }

    fn list_tasks(&mut self) -> Result<Vec<ScheduledTask>, String> {
        self.db()
            .as_host_reading(schedules::list)
            .map(|tasks| tasks.iter().map(schedules::Schedule::to_wit).collect())
            .map_err(|err| err.to_string())
    }

    fn llm_complete(&mut self, request: ChatRequest) -> LlmFuture {
        let Some(llm) = &self.llm else {
            return Box::pin(std::future::ready(Err(LlmError {
                class: ErrorClass::NotConfigured,
                message: "no LLM provider is configured for this host; set [llm] in the config"
                    .into(),
                status: None,
            })));
        };
        let size = request_bytes(&request);
        if size > MAX_LLM_REQUEST_BYTES {
            return Box::pin(std::future::ready(Err(LlmError {
                class: ErrorClass::InvalidRequest,
                message: format!(
                    "the request holds {size} bytes of text; a request holds at most {MAX_LLM_REQUEST_BYTES} (send less of the conversation)"
                ),
                status: None,
            })));
        }
        self.llm_calls += 1;
        let Some((budget, reserve, limit)) = self.llm_budget() else {
            return llm.complete(&self.store_id, request, None);
        };
        let too_late = move || LlmError {
            class: ErrorClass::Timeout,
            message: format!(
                "no answer within the {} ms this invocation had left of its wall_ms_per_call ({} ms); raise wall_ms_per_call for a slower model",
                budget.as_millis(),
                limit.as_millis()
            ),
            status: None,
        };
        if budget.is_zero() {
            return Box::pin(std::future::ready(Err(too_late())));
        }
        // The provider is given the budget as its deadline, so it ends the call there with
        // its own error (a 429 keeps its class and status); this cut, a little into the
        // reserve, is for providers that ignore it.
        let deadline = std::time::Instant::now() + budget;
        let call = llm.complete(&self.store_id, request, Some(deadline));
        Box::pin(async move {
            tokio::time::timeout_at((deadline + reserve / 4).into(), call)
                .await
                .unwrap_or_else(|_| Err(too_late()))
        })
    }

    fn take_breach(&mut self) -> Option<(FailureReason, String)> {
        self.breach.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store's guest log lines pass up to the burst, then at the sustained rate, whatever the
    /// calls: before, each call could write 100 lines however often it was made.
    #[test]
    fn guest_log_lines_pass_up_to_the_burst_and_are_dropped_past_it() {
        let limit = GuestLogLimit::default();
        let store = StoreId::new("logger").unwrap();
        let passed = (0..GUEST_LOG_BURST * 2)
            .filter(|_| limit.admit(&store))
            .count();
        // A line or two may come back as the rate refills during the loop.
        assert!(
            (GUEST_LOG_BURST as usize..GUEST_LOG_BURST as usize + 5).contains(&passed),
            "{passed}"
        );
        assert!(limit.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }

    /// A backend that answers every request, counting them.
    #[derive(Debug, Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl LlmBackend for Counting {
        fn complete(
            &self,
            _store: &StoreId,
            _request: ChatRequest,
            _deadline: Option<std::time::Instant>,
        ) -> LlmFuture {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(std::future::ready(Err(LlmError {
                class: ErrorClass::Transient,
                message: "answered".into(),
                status: None,
            })))
        }
    }

    /// A request holding more text than a request may is refused before it reaches the
    /// provider, saying how much it held (the offline provider spent 1.5 s of the host's CPU
    /// on 8 MiB, charged to no one).
    #[tokio::test]
    async fn a_request_holding_too_much_text_never_reaches_the_provider() {
        let dir = tempfile::tempdir().unwrap();
        let db = GuestDb::open(
            &dir.path().join("store.db"),
            crate::Durability::Process,
            1 << 30,
        )
        .unwrap();
        let backend = Arc::new(Counting::default());
        let mut capabilities = StoreCapabilities::new(
            StoreId::new("asker").unwrap(),
            Arc::new(Mutex::new(db)),
            Arc::default(),
            1_000,
            Some(backend.clone()),
        );
        let request = |bytes: usize| ChatRequest {
            messages: vec![storehost_runtime::llm::Message {
                role: storehost_runtime::llm::Role::User,
                content: Some("x".repeat(bytes)),
                tool_calls: Vec::new(),
                tool_call_id: None,
            }],
            tools: Vec::new(),
            max_tokens: None,
            temperature: None,
        };
        let err = capabilities
            .llm_complete(request(MAX_LLM_REQUEST_BYTES - 64 + 1))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest, "{}", err.message);
        assert!(err.message.contains("1048577 bytes"), "{}", err.message);
        assert_eq!(backend.0.load(std::sync::atomic::Ordering::Relaxed), 0);
        let err = capabilities
            .llm_complete(request(MAX_LLM_REQUEST_BYTES - 64))
            .await
            .unwrap_err();
        assert_eq!(err.message, "answered");
        assert_eq!(backend.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Each message counts, empty or not.
        let mut empty = request(0);
        empty.messages = vec![empty.messages[0].clone(); 20_000];
        let err = capabilities.llm_complete(empty).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest, "{}", err.message);
        assert_eq!(backend.0.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
