//! The actor of one store: feeds its sandbox one event at a time, in `seq` order, and commits
//! each invocation's effects together with the cursor in one transaction.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use storehost_runtime::{Event, FailureReason, InvocationError, Limits, Sandbox, SandboxOptions};
use tokio::sync::{mpsc, oneshot};

use crate::capabilities::StoreCapabilities;
use crate::event_log::LoggedEvent;
use crate::guest_db::{self, GuestDb};
use crate::sqlite;
use crate::store::{Shared, StoreError, StoreSettings, StoreState};

/// How many events the actor reads from the log at a time.
const READ_BATCH: usize = 256;

/// What a store's handle asks its actor to do.
pub(crate) enum Command {
    Query {
        name: String,
        args: String,
        reply: oneshot::Sender<Result<String, StoreError>>,
    },
    RetryDeadLetter {
        seq: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Update(Box<StoreSettings>),
    SetPaused(bool),
    Stop,
}

/// Whether the actor goes on after handling something.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// How a successful invocation is recorded in its transaction.
#[derive(Clone, Copy)]
enum Completion {
    /// A new event: the cursor moves to it.
    AdvanceCursor,
    /// A retried dead letter: it is marked resolved.
    ResolveDeadLetter,
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    db: Arc<Mutex<GuestDb>>,
    files_dir: PathBuf,
    settings: StoreSettings,
    config: Arc<std::collections::BTreeMap<String, String>>,
    inbox: mpsc::Receiver<Command>,
    sandbox: Option<Sandbox<StoreCapabilities>>,
    cursor: u64,
    pending: VecDeque<LoggedEvent>,
    paused: bool,
    cpu_budget: CpuBudget,
    consecutive_failures: u32,
    breaker_trips: u32,
}

impl Actor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        db: GuestDb,
        files_dir: PathBuf,
        settings: StoreSettings,
        inbox: mpsc::Receiver<Command>,
        cursor: u64,
    ) -> Self {
        let settings_cpu_per_minute = settings.quotas.cpu_ms_per_minute;
        Self {
            shared,
            db: Arc::new(Mutex::new(db)),
            files_dir,
            config: Arc::new(settings.config.clone()),
            settings,
            inbox,
            sandbox: None,
            cursor,
            pending: VecDeque::new(),
            paused: false,
            cpu_budget: CpuBudget::new(settings_cpu_per_minute),
            consecutive_failures: 0,
            breaker_trips: 0,
        }
    }

    pub(crate) async fn run(mut self) {
        if let Err(err) = self.drain_outbox() {
            tracing::error!("could not move emitted events to the log: {err}");
        }
        let mut head = self.shared.head.subscribe();
        loop {
            while let Ok(command) = self.inbox.try_recv() {
                if self.handle(command).await == Flow::Stop {
                    return;
                }
            }
            if !self.paused
                && let Some(event) = self.next_event()
            {
                if self.process(event).await == Flow::Stop {
                    return;
                }
                continue;
            }
            tokio::select! {
                command = self.inbox.recv() => match command {
                    Some(command) => {
                        if self.handle(command).await == Flow::Stop {
                            return;
                        }
                    }
                    None => return,
                },
                changed = head.changed(), if !self.paused => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The next event after the cursor, reading a batch from the log when the buffer is empty.
    fn next_event(&mut self) -> Option<LoggedEvent> {
        if self.pending.is_empty() && *self.shared.head.borrow() > self.cursor {
            match self.shared.log.read_after(self.cursor, READ_BATCH) {
                Ok(events) => self.pending.extend(events),
                Err(err) => tracing::error!("could not read the event log: {err}"),
            }
        }
        self.pending.pop_front()
    }

    async fn handle(&mut self, command: Command) -> Flow {
        match command {
            Command::Query { name, args, reply } => {
                let answer = self.query(&name, &args).await;
                let _ = reply.send(answer);
            }
            Command::RetryDeadLetter { seq, reply } => {
                let answer = self.retry_dead_letter(seq).await;
                let _ = reply.send(answer);
            }
            Command::Update(settings) => self.apply(*settings),
            Command::SetPaused(paused) => {
                self.paused = paused;
                self.shared.status().state = if paused {
                    StoreState::Paused
                } else {
                    StoreState::Running
                };
            }
            Command::Stop => return Flow::Stop,
        }
        Flow::Continue
    }

    fn apply(&mut self, settings: StoreSettings) {
        if let Err(err) = self.lock_db().set_disk_quota(settings.quotas.disk) {
            tracing::error!("could not apply the disk quota: {err}");
        }
        let plugin_changed = !Arc::ptr_eq(&settings.plugin, &self.settings.plugin);
        let config_changed = settings.config != self.settings.config;
        if plugin_changed || config_changed {
            // The next invocation instantiates the new plugin or config: a hot swap between events.
            self.sandbox = None;
            self.config = Arc::new(settings.config.clone());
        } else if let Some(sandbox) = &mut self.sandbox {
            sandbox.set_limits(limits_of(&settings));
        }
        self.cpu_budget
            .set_per_minute(settings.quotas.cpu_ms_per_minute);
        if plugin_changed {
            tracing::info!(plugin = %settings.plugin_name, sha256 = settings.plugin.sha256(), "plugin switched");
        }
        self.settings = settings;
    }

    /// Delivers `event`, retrying with backoff, then dead-lettering it.
    async fn process(&mut self, event: LoggedEvent) -> Flow {
        let policy = self.settings.retry.clone();
        let mut attempt = 0;
        loop {
            if self.wait_for_cpu_budget().await == Flow::Stop {
                return Flow::Stop;
            }
            attempt += 1;
            match self.attempt(&event, Completion::AdvanceCursor).await {
                Ok(()) => {
                    self.consecutive_failures = 0;
                    self.breaker_trips = 0;
                    let mut status = self.shared.status();
                    status.events_processed += 1;
                    status.state = StoreState::Running;
                    status.waiting_until = None;
                    status.last_activity = Some(sqlite::now_ms());
                    drop(status);
                    self.moved_to(event.seq);
                    return Flow::Continue;
                }
                Err(err) => {
                    tracing::warn!(seq = event.seq, attempt, reason = %err.reason, "event failed: {}", err.message);
                    self.shared.record_failure(&err, Some(event.seq));
                    self.consecutive_failures += 1;
                    let exhausted = attempt >= policy.attempts.max(1);
                    if exhausted {
                        self.dead_letter(&event, &err, attempt);
                    }
                    if self.consecutive_failures >= policy.breaker_failures.max(1) {
                        if self.open_circuit(&policy).await == Flow::Stop {
                            return Flow::Stop;
                        }
                    } else if !exhausted {
                        self.shared.status().state = StoreState::Retrying;
                        if self.wait(policy.delay_after(attempt)).await == Flow::Stop {
                            return Flow::Stop;
                        }
                    }
                    if exhausted {
                        return Flow::Continue;
                    }
                }
            }
        }
    }

    /// Too many failures in a row: the store rests (state `backoff`), then probes with its next
    /// invocation. Each consecutive opening doubles the rest.
    async fn open_circuit(&mut self, policy: &crate::store::RetryPolicy) -> Flow {
        self.breaker_trips += 1;
        self.consecutive_failures = 0;
        let delay = policy.breaker_delay(self.breaker_trips);
        tracing::warn!(
            trips = self.breaker_trips,
            "circuit open after {} consecutive failures; probing again in {} ms",
            policy.breaker_failures,
            delay.as_millis()
        );
        self.rest(StoreState::Backoff, delay).await
    }

    /// Waits until the store's CPU budget per minute has room again (state `throttled`).
    async fn wait_for_cpu_budget(&mut self) -> Flow {
        match self.cpu_budget.wait_needed() {
            Some(delay) => self.rest(StoreState::Throttled, delay).await,
            None => Flow::Continue,
        }
    }

    async fn rest(&mut self, state: StoreState, delay: Duration) -> Flow {
        {
            let mut status = self.shared.status();
            status.state = state;
            let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            status.waiting_until = Some(sqlite::now_ms().saturating_add(delay_ms));
        }
        let flow = self.wait(delay).await;
        let mut status = self.shared.status();
        if status.state == state {
            status.state = StoreState::Running;
        }
        status.waiting_until = None;
        flow
    }

    /// Waits `delay` while still answering commands (a stop ends the wait).
    async fn wait(&mut self, delay: Duration) -> Flow {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return Flow::Continue,
                command = self.inbox.recv() => match command {
                    Some(command) => {
                        if self.handle(command).await == Flow::Stop {
                            return Flow::Stop;
                        }
                    }
                    None => return Flow::Stop,
                },
            }
        }
    }

    fn dead_letter(&mut self, event: &LoggedEvent, err: &InvocationError, attempts: u32) {
        let result = (|| {
            let db = self.lock_db();
            db.begin()?;
            let written = db
                .record_dead_letter(
                    event.seq,
                    &event.event_type,
                    err.reason,
                    &err.message,
                    attempts,
                )
                .and_then(|()| db.advance_cursor(event.seq))
                .and_then(|()| db.commit());
            if written.is_err() {
                db.rollback();
            }
            written
        })();
        match result {
            Ok(()) => {
                tracing::error!(seq = event.seq, reason = %err.reason, "event dead-lettered after {attempts} attempts: {}", err.message);
                let mut status = self.shared.status();
                status.dead_lettered += 1;
                status.state = StoreState::Running;
                drop(status);
                self.moved_to(event.seq);
            }
            Err(db_err) => {
                // The event stays unprocessed and is tried again after a restart.
                tracing::error!(
                    seq = event.seq,
                    "could not record the dead letter: {db_err}"
                );
                self.pending.push_front(event.clone());
            }
        }
    }

    fn moved_to(&mut self, seq: u64) {
        self.cursor = seq;
        self.shared.cursor.send_replace(seq);
    }

    /// One delivery of `event`: the guest's writes, its emitted events and the completion
    /// commit together, or nothing does.
    async fn attempt(
        &mut self,
        event: &LoggedEvent,
        completion: Completion,
    ) -> Result<(), InvocationError> {
        let cpu_ms = self.settings.quotas.cpu_ms_per_call;
        let begun = self.lock_db().begin();
        begun.map_err(|err| host_error("could not begin the transaction", &err))?;
        let outcome = self.invoke_event(event, cpu_ms).await;
        let outcome = outcome.and_then(|emitted| self.commit(event.seq, emitted, completion));
        if outcome.is_err() {
            self.lock_db().rollback();
        }
        if outcome.is_ok()
            && let Err(err) = self.drain_outbox()
        {
            tracing::error!("could not move emitted events to the log (retried later): {err}");
        }
        outcome
    }

    async fn invoke_event(
        &mut self,
        event: &LoggedEvent,
        cpu_ms: u64,
    ) -> Result<Vec<(String, String)>, InvocationError> {
        let wit_event = Event {
            seq: event.seq,
            event_type: event.event_type.clone(),
            payload: event.payload.clone(),
            at_ms: event.at,
            source: event.source.clone(),
        };
        let db = self.db.clone();
        let sandbox = self.sandbox().await?;
        sandbox.host_mut().start_invocation();
        let cpu_before = sandbox.usage().cpu_ms;
        lock(&db).enter_guest(true, guest_db::statement_budget(cpu_ms));
        let result = sandbox.handle_event(&wit_event).await;
        lock(&db).leave_guest();
        let emitted = sandbox.host_mut().take_emitted();
        let cpu_used = sandbox.usage().cpu_ms.saturating_sub(cpu_before);
        self.cpu_budget.charge(cpu_used);
        self.note_usage(cpu_used);
        if self.sandbox.as_ref().is_some_and(Sandbox::is_poisoned) {
            self.sandbox = None;
        }
        result.map(|()| emitted)
    }

    fn commit(
        &self,
        seq: u64,
        emitted: Vec<(String, String)>,
        completion: Completion,
    ) -> Result<(), InvocationError> {
        let db = self.lock_db();
        let now = sqlite::now_ms();
        for (index, (event_type, payload)) in emitted.iter().enumerate() {
            db.stage_emitted(&format!("{seq}:{index}"), event_type, payload, now)
                .map_err(|err| storage_failure("could not stage an emitted event", &err))?;
        }
        match completion {
            Completion::AdvanceCursor => db.advance_cursor(seq),
            Completion::ResolveDeadLetter => db.resolve_dead_letter(seq),
        }
        .map_err(|err| storage_failure("could not record progress", &err))?;
        db.commit()
            .map_err(|err| storage_failure("could not commit", &err))
    }

    /// Moves emitted events from the outbox into the log (idempotent by origin).
    fn drain_outbox(&self) -> rusqlite::Result<()> {
        let db = self.lock_db();
        let entries = db.outbox()?;
        let Some(last) = entries.last() else {
            return Ok(());
        };
        self.shared.log.append_emitted(&entries)?;
        db.clear_outbox(last.id)?;
        drop(db);
        let head = self.shared.log.head()?;
        self.shared.head.send_if_modified(|h| {
            let grew = head > *h;
            *h = (*h).max(head);
            grew
        });
        Ok(())
    }

    async fn query(&mut self, name: &str, args: &str) -> Result<String, StoreError> {
        let cpu_ms = self.settings.quotas.cpu_ms_per_call;
        let db = self.db.clone();
        lock(&db).begin_read()?;
        let (outcome, cpu_used) = match self.sandbox().await {
            Ok(sandbox) => {
                sandbox.host_mut().start_invocation();
                let cpu_before = sandbox.usage().cpu_ms;
                lock(&db).enter_guest(false, guest_db::statement_budget(cpu_ms));
                let result = sandbox.query(name, args).await;
                lock(&db).leave_guest();
                (result, sandbox.usage().cpu_ms.saturating_sub(cpu_before))
            }
            Err(err) => (Err(err), 0),
        };
        self.cpu_budget.charge(cpu_used);
        lock(&db).rollback();
        self.note_usage(cpu_used);
        if self.sandbox.as_ref().is_some_and(Sandbox::is_poisoned) {
            self.sandbox = None;
        }
        self.shared.status().last_activity = Some(sqlite::now_ms());
        if let Err(err) = &outcome
            && err.reason != FailureReason::PluginError
        {
            self.shared.record_failure(err, None);
        }
        Ok(outcome?)
    }

    async fn retry_dead_letter(&mut self, seq: u64) -> Result<(), StoreError> {
        let letter = self.lock_db().dead_letter(seq)?;
        let Some(letter) = letter.filter(|l| l.status == "dead") else {
            return Err(StoreError::NoDeadLetter {
                store: self.shared.id.clone(),
                seq,
            });
        };
        let event = self.shared.log.get(seq)?.ok_or(StoreError::NoDeadLetter {
            store: self.shared.id.clone(),
            seq,
        })?;
        match self.attempt(&event, Completion::ResolveDeadLetter).await {
            Ok(()) => {
                tracing::info!(seq, "dead letter retried successfully");
                self.shared.status().events_processed += 1;
                Ok(())
            }
            Err(err) => {
                self.shared.record_failure(&err, Some(seq));
                let recorded = {
                    let db = self.lock_db();
                    db.record_dead_letter(seq, &letter.event_type, err.reason, &err.message, 1)
                };
                if let Err(db_err) = recorded {
                    tracing::error!(seq, "could not update the dead letter: {db_err}");
                }
                Err(StoreError::Invocation(err))
            }
        }
    }

    /// The live sandbox, instantiated from the current plugin when there is none.
    async fn sandbox(&mut self) -> Result<&mut Sandbox<StoreCapabilities>, InvocationError> {
        if self.sandbox.is_none() {
            let host = StoreCapabilities::new(
                self.shared.id.clone(),
                self.db.clone(),
                self.config.clone(),
                self.settings.quotas.cpu_ms_per_call,
            );
            let options = SandboxOptions {
                files_dir: Some(self.files_dir.clone()),
                limits: limits_of(&self.settings),
            };
            let sandbox = Sandbox::new(&self.settings.plugin, host, options).await?;
            self.sandbox = Some(sandbox);
        }
        self.sandbox.as_mut().ok_or_else(|| {
            InvocationError::new(
                FailureReason::HostError,
                "sandbox missing after instantiation",
            )
        })
    }

    /// Adds one invocation's CPU time to the store's usage and records peaks and disk size.
    fn note_usage(&self, cpu_used_ms: u64) {
        let disk = self.lock_db().size_bytes().unwrap_or(0);
        let sandbox_usage = self
            .sandbox
            .as_ref()
            .map(Sandbox::usage)
            .unwrap_or_default();
        let mut status = self.shared.status();
        status.usage.cpu_ms += cpu_used_ms;
        status.usage.fuel = status.usage.fuel.max(sandbox_usage.fuel);
        status.usage.memory_peak = status.usage.memory_peak.max(sandbox_usage.memory_peak);
        status.usage.disk_bytes = disk;
    }

    fn lock_db(&self) -> MutexGuard<'_, GuestDb> {
        lock(&self.db)
    }
}

/// A store's CPU time budget per minute: refilled continuously, charged after each invocation.
/// When it is overdrawn the store waits; other stores go on.
struct CpuBudget {
    per_minute_ms: u64,
    available_ms: f64,
    refilled_at: Instant,
}

impl CpuBudget {
    fn new(per_minute_ms: u64) -> Self {
        Self {
            per_minute_ms,
            available_ms: per_minute_ms as f64,
            refilled_at: Instant::now(),
        }
    }

    fn set_per_minute(&mut self, per_minute_ms: u64) {
        self.refill();
        self.per_minute_ms = per_minute_ms;
        self.available_ms = self.available_ms.min(per_minute_ms as f64);
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed_ms = now.duration_since(self.refilled_at).as_secs_f64() * 1_000.0;
        self.refilled_at = now;
        let rate = self.per_minute_ms as f64 / 60_000.0;
        self.available_ms = (self.available_ms + elapsed_ms * rate).min(self.per_minute_ms as f64);
    }

    fn charge(&mut self, used_ms: u64) {
        self.refill();
        self.available_ms -= used_ms as f64;
    }

    /// How long to wait until the budget is no longer overdrawn.
    fn wait_needed(&mut self) -> Option<Duration> {
        self.refill();
        if self.available_ms >= 0.0 || self.per_minute_ms == 0 {
            return None;
        }
        let rate = self.per_minute_ms as f64 / 60_000.0;
        Some(Duration::from_secs_f64(-self.available_ms / rate / 1_000.0))
    }
}

fn lock(db: &Mutex<GuestDb>) -> MutexGuard<'_, GuestDb> {
    db.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn limits_of(settings: &StoreSettings) -> Limits {
    Limits {
        memory_bytes: settings.quotas.memory,
        fuel_per_call: settings.quotas.fuel_per_call,
        cpu_ms_per_call: settings.quotas.cpu_ms_per_call,
        wall_ms_per_call: settings.quotas.wall_ms_per_call,
    }
}

fn host_error(what: &str, err: &rusqlite::Error) -> InvocationError {
    InvocationError::new(FailureReason::HostError, format!("{what}: {err}"))
}

/// A storage failure while committing: a full disk is the tenant's quota, anything else the host's.
fn storage_failure(what: &str, err: &rusqlite::Error) -> InvocationError {
    if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
        return InvocationError::new(
            FailureReason::DiskFull,
            format!("{what}: the store's database reached its disk quota"),
        );
    }
    host_error(what, err)
}
