//! The actor of one store: feeds its sandbox one event at a time, in `seq` order, and commits
//! each invocation's effects together with the cursor.
//!
//! Events commit in groups: while more events are waiting, each invocation's writes, emitted
//! events and cursor move go into a savepoint of one open transaction, and the transaction
//! commits when the queue runs dry, after [`BATCH_EVENTS`] events or [`BATCH_AGE`], and before
//! anything else (a query, a task, a wait, a stop) touches the database. A failed invocation
//! rolls back only its savepoint. Nothing outside the actor sees an event as processed before
//! its transaction commits: the cursor, `events_processed` and emitted events move then.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use storehost_runtime::{
    Event, FailureReason, InvocationError, Limits, Priority, Sandbox, SandboxFiles, SandboxOptions,
    TaskRun,
};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::capabilities::{EmitRoom, StoreCapabilities};
use crate::closing;
use crate::event_log::LoggedEvent;
use crate::guest_db::{self, DeadLetter, GuestDb, OutboxEntry};
use crate::schedules::{self, DuePlan, Schedule};
use crate::sqlite::{self, Durability};
use crate::store::{Shared, StoreError, StoreSettings, StoreState};

/// How many events the actor reads from the log at a time.
const READ_BATCH: usize = 256;
/// How soon a read of the event log that failed is tried again.
const LOG_RETRY: Duration = Duration::from_secs(1);
/// How many due schedules the actor picks up at a time (events are served in between).
const DUE_BATCH: usize = 16;
/// The most events one transaction commits...
const BATCH_EVENTS: u64 = 128;
/// ...and how long after its first event it commits at the latest, so a slow plugin does not
/// hold back what it has processed.
const BATCH_AGE: Duration = Duration::from_millis(2);

/// What a store's handle asks its actor to do.
///
/// Kept small: the channel allocates its slots 32 at a time when the store opens, and they
/// stay allocated for the store's life, also while it hibernates (80-byte commands made that
/// 2.6 KB per store; a query's strings are boxed instead).
pub(crate) enum Command {
    Query(Box<Query>),
    RetryDeadLetter {
        seq: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Update(Box<StoreSettings>),
    SetPaused(bool),
    /// An event to a store whose files are closed is being appended: open `store.db` and
    /// instantiate the sandbox meanwhile.
    Wake,
    /// The last hold on emitted events was let go ([`crate::Store::hold_emits`]): move
    /// what waits in the outbox into the log.
    DrainEmitted,
    Stop,
}

const _: () = assert!(
    std::mem::size_of::<Command>() <= 24,
    "a command stays small: every store keeps 32 slots of them"
);

/// A query for the plugin's `query` export.
pub(crate) struct Query {
    pub(crate) name: String,
    pub(crate) args: String,
    pub(crate) request_id: Option<String>,
    pub(crate) reply: oneshot::Sender<Result<String, StoreError>>,
}

/// Whether the actor goes on after handling something.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// Events processed in the open transaction and not committed yet (see the module doc).
struct Batch {
    events: u64,
    /// The newest event in it (`0` while it holds none).
    last_seq: u64,
    /// What its invocations emitted, moved to the log once it commits.
    staged: Vec<OutboxEntry>,
    began: Instant,
}

/// Why an event's delivery did not complete.
enum EventFailure {
    /// The invocation failed; only its own work was undone.
    Invocation(InvocationError),
    /// The transaction was lost with events processed before this one in it (SQLite rolls a
    /// whole transaction back when a write is interrupted, and a commit may fail): they are
    /// processed again from the committed cursor, each alone (see [`Actor::replay`]).
    BatchLost,
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    /// `store.db`; `None` while the store hibernates (see [`Actor::ensure_db`]).
    db: Option<Arc<Mutex<GuestDb>>>,
    db_file: DbFile,
    files: SandboxFiles,
    settings: StoreSettings,
    config: Arc<std::collections::BTreeMap<String, String>>,
    inbox: mpsc::Receiver<Command>,
    sandbox: Option<Sandbox<StoreCapabilities>>,
    /// The last event processed, inside the open batch or committed.
    cursor: u64,
    /// The last event whose effects are committed (what `store.db`'s cursor holds).
    committed: u64,
    /// The open transaction's events (group commit).
    batch: Option<Batch>,
    /// Until the cursor reaches this seq each event commits alone: set when a batch was lost,
    /// so the event that lost it fails on its own rather than taking the others with it again.
    solo_through: u64,
    pending: VecDeque<LoggedEvent>,
    /// The last read of the waiting events failed (their file missing, the host out of open
    /// files): they are read again every [`LOG_RETRY`], as nothing else would wake the store
    /// for them.
    log_unread: bool,
    /// Due tasks ran last: waiting events get the next turn, so tasks that are always due
    /// (thousands of them, each taking a while) cannot hold the store's events back for good.
    events_turn: bool,
    paused: bool,
    cpu_budget: Budget,
    /// The events its invocations emitted, against `events_per_second` + `burst`: charged
    /// once they are committed (a rolled-back invocation costs nothing), waited for like the
    /// CPU budget, so what the plugin adds to the log follows the rate a client's appends do.
    emit_budget: Budget,
    /// The bytes of those events, against `ingress_bytes_per_second` (and its burst) alike:
    /// a plugin emitting 1 MiB events at the event rate would otherwise write the log at a
    /// gigabyte a second, whatever the quota lets clients append.
    emit_bytes_budget: Budget,
    consecutive_failures: u32,
    breaker_trips: u32,
    /// The event or task execution whose failure last lengthened the circuit's rest: a retry
    /// of it (after a pause too) rests as long again.
    breaker_work: Option<String>,
    /// The earliest due time of the store's schedules (ms since the Unix epoch).
    next_due: Option<i64>,
    /// Task executions recorded since the old records were last pruned
    /// ([`schedules::prune_runs`]).
    runs_recorded: usize,
    /// Whether the last invocation breached a quota or trapped: the store is then demoted
    /// until one succeeds, its calls running in the demoted stores' slots on the threads with
    /// the least CPU priority ([`Actor::call_demoted`]).
    penalized: bool,
    outbox: Outbox,
    /// Changes when the wall clock steps ([`crate::clock`]): the due timer is set again.
    clock_steps: tokio::sync::watch::Receiver<u64>,
}

/// Emitted events on their way from `store.db`'s outbox to the log. The actor is the only
/// writer of the outbox, so once it has read the table it knows what the table holds: moving
/// an invocation's events costs no read of it, and the entries already in the log are
/// deleted by the next transaction that commits work rather than by one of their own. A
/// crash in between leaves entries the log has; the next start appends them again, which
/// their origin makes a no-op.
#[derive(Debug, Default)]
struct Outbox {
    /// Committed to the outbox and not yet in the log; `None` until the first drain reads
    /// the table.
    unsent: Option<Vec<OutboxEntry>>,
    /// The newest entry in the log that may still be in the table.
    sent_through: Option<i64>,
}

impl Outbox {
    /// A transaction staging `staged` (and clearing what was sent) has committed.
    fn committed(&mut self, staged: Vec<OutboxEntry>) {
        self.sent_through = None;
        // Unknown yet: the next drain reads the table in full.
        if let Some(unsent) = &mut self.unsent {
            unsent.extend(staged);
        }
    }
}

/// Where `store.db` is and how it is opened (again, after hibernation).
pub(crate) struct DbFile {
    pub(crate) path: PathBuf,
    pub(crate) durability: Durability,
}

/// What one invocation delivers to the guest.
#[derive(Clone)]
enum Call {
    Event(Event),
    Task(TaskRun),
}

impl Actor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        db: GuestDb,
        db_file: DbFile,
        files: SandboxFiles,
        settings: StoreSettings,
        inbox: mpsc::Receiver<Command>,
        cursor: u64,
    ) -> Self {
        let settings_cpu_per_minute = settings.quotas.cpu_ms_per_minute;
        let emit_budget = Budget::events(&settings.quotas);
        let emit_bytes_budget = Budget::bytes(&settings.quotas);
        let paused = settings.start_paused;
        Self {
            shared,
            db: Some(Arc::new(Mutex::new(db))),
            db_file,
            files,
            config: Arc::new(settings.config.clone()),
            settings,
            inbox,
            sandbox: None,
            cursor,
            committed: cursor,
            batch: None,
            solo_through: 0,
            pending: VecDeque::new(),
            log_unread: false,
            events_turn: false,
            paused,
            cpu_budget: Budget::cpu(settings_cpu_per_minute),
            emit_budget,
            emit_bytes_budget,
            consecutive_failures: 0,
            breaker_trips: 0,
            breaker_work: None,
            next_due: None,
            runs_recorded: 0,
            penalized: false,
            outbox: Outbox::default(),
            clock_steps: crate::clock::steps(),
        }
    }

    /// Serves the store until it stops, then closes its files. The actor is boxed: a future
    /// keeps an argument taken by value twice (as passed and as bound), and this one lives as
    /// long as the store, also while it hibernates (744 bytes more per store, measured in a
    /// release build).
    ///
    /// `existing`: the store opened files it had before (see [`Actor::rest_at_open`]).
    pub(crate) async fn run(mut self: Box<Self>, existing: bool) {
        if let Some(llm) = &self.settings.llm {
            llm.set_calls_per_minute(&self.shared.id, self.settings.quotas.llm_calls_per_minute);
        }
        self.serve(existing).await;
        self.flush();
        if let Some(llm) = &self.settings.llm {
            llm.forget(&self.shared.id);
        }
        // Stopped: the files close now, each WAL checkpointed and emptied, so a directory
        // archived or backed up right after holds only its databases (or, for a store whose
        // files a long hibernation had closed, its databases and their small WALs, which the
        // archive keeps).
        self.sandbox = None;
        self.close_files(closing::Why::Stop).await;
    }

    async fn serve(&mut self, existing: bool) {
        let drained = self.drain_outbox();
        if let Err(err) = &drained {
            tracing::error!("could not move emitted events to the log: {err}");
        }
        self.refresh_next_due();
        if existing && drained.is_ok() {
            self.rest_at_open().await;
        }
        let mut head = self.shared.head.subscribe();
        let files_opened = self.shared.files_opened.clone();
        // The work each turn starts is boxed: this future lives as long as the store, also
        // while it hibernates, and would otherwise be as large as the largest piece of work
        // it awaits (5.7 KB per store instead of 2.2, measured in a release build).
        loop {
            while let Ok(command) = self.inbox.try_recv() {
                if Box::pin(self.handle(command)).await == Flow::Stop {
                    return;
                }
            }
            // Due tasks go before queued events, so a deep queue never delays a schedule; but
            // after a pass over due tasks the events waiting get a turn (a run of them until a
            // task is due again, at least one).
            if !self.paused && self.task_due() && !(self.events_turn && self.event_waiting()) {
                if !self.flush() {
                    continue;
                }
                if !self.ensure_db_or_wait().await {
                    continue;
                }
                if Box::pin(self.run_due_tasks()).await == Flow::Stop {
                    return;
                }
                self.events_turn = true;
                continue;
            }
            if !self.paused && self.event_waiting() {
                self.events_turn = false;
                if Box::pin(self.process_waiting()).await == Flow::Stop {
                    return;
                }
                continue;
            }
            if !self.flush() {
                continue;
            }
            // One timer for both the next due task and the next step down when idle (every
            // loop turn starts the idle wait afresh): a timer is 136 bytes of this future.
            let due_in = self.due_in().filter(|_| !self.paused);
            // (A log read again is due like a task: the next turn reads it.)
            let due_in = if self.log_unread && !self.paused {
                Some(due_in.map_or(LOG_RETRY, |due| due.min(LOG_RETRY)))
            } else {
                due_in
            };
            let idle_in = self.idle_in();
            let idle_first = match (due_in, idle_in) {
                (Some(due), Some(idle)) => idle < due,
                (due, idle) => due.is_none() && idle.is_some(),
            };
            tokio::select! {
                () = sleep_or_forever(if idle_first { idle_in } else { due_in }) => {
                    // A due task needs nothing here: the next turn runs it.
                    if idle_first {
                        Box::pin(self.on_idle()).await;
                    }
                }
                command = self.inbox.recv() => match command {
                    Some(command) => {
                        if Box::pin(self.handle(command)).await == Flow::Stop {
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
                // A file opened again: the next turn's `idle_in` counts down to closing it.
                () = files_opened.notified() => {}
                // The wall clock stepped: the next turn sets the due timer from it again.
                _ = self.clock_steps.changed() => {}
            }
        }
    }

    /// How long the store may stay idle before its next step down (`None`: none is left, or
    /// hibernation is off): a running store hibernates after `idle_timeout`, a hibernated one
    /// closes its files `close_files_after` later; a paused one takes the same steps. A read
    /// or an append that opens a file again after that wakes the actor
    /// (`Shared::files_opened`), which closes it `close_files_after` later.
    fn idle_in(&self) -> Option<Duration> {
        let timeout = self.settings.idle_timeout.filter(|t| !t.is_zero())?;
        let holds_files = || self.db.is_some() || self.shared.holds_files();
        if self.paused {
            // A paused store takes the same steps down, and stays paused.
            return if self.sandbox.is_some() {
                Some(timeout)
            } else {
                holds_files().then_some(self.settings.close_files_after)
            };
        }
        match self.shared.status().state {
            StoreState::Running => Some(timeout),
            StoreState::Hibernated if holds_files() => Some(self.settings.close_files_after),
            _ => None,
        }
    }

    /// The store has been idle for [`Actor::idle_in`]: it takes its next step down.
    async fn on_idle(&mut self) {
        if self.paused && self.sandbox.is_some() {
            self.release_sandbox();
            return;
        }
        let state = self.shared.status().state;
        if self.paused || state == StoreState::Hibernated {
            // (A hibernated store comes here only with a file open.)
            if self.db.is_some() || self.shared.holds_files() {
                self.pending = VecDeque::new();
                self.close_files(closing::Why::Idle).await;
                self.shared.status().usage.db_cache_bytes = 0;
            }
        } else if state == StoreState::Running {
            self.hibernate().await;
        }
    }

    /// Idle for `idle_timeout`: drops the sandbox (its pool slot and linear memory go back to
    /// the runtime), shrinks the SQLite connections' caches and shows
    /// `hibernated`. The actor itself stays, a parked task; the next event, query, dead-letter
    /// retry or due task wakes it with one sandbox instantiation.
    async fn hibernate(&mut self) {
        if self.shared.status().state != StoreState::Running {
            return;
        }
        self.pending = VecDeque::new();
        if self.settings.close_files_after.is_zero() {
            // Closed before the state shows it: whoever sees `hibernated` sees no open file.
            self.sandbox = None;
            self.close_files(closing::Why::Idle).await;
            self.shared.status().usage.db_cache_bytes = 0;
        } else {
            self.release_sandbox();
        }
        let mut status = self.shared.status();
        if status.state == StoreState::Running {
            status.state = StoreState::Hibernated;
            drop(status);
            tracing::debug!("hibernated after being idle");
        }
    }

    /// A store that opened the files it had before (the host restarting, a failed store
    /// started again, a restore) with nothing to do — no event waiting, no task due, no
    /// command (a query, say) come in meanwhile — goes straight to hibernation with its files
    /// closed, as if it had been idle for `idle_timeout` and `close_files_after` (a paused one
    /// closes its files and stays paused); its next event, query or due task wakes it. Otherwise every store of a host
    /// that restarts held its files and SQLite caches for the first `idle_timeout` +
    /// `close_files_after` (30 minutes by default): 2,496 stores took 1.3 GB and 20,000 open
    /// files, and the stores past the open-file limit failed to start. A host without
    /// hibernation (`idle_timeout` off) keeps them open.
    async fn rest_at_open(&mut self) {
        if self.settings.idle_timeout.is_none_or(|t| t.is_zero()) {
            return;
        }
        if !self.inbox.is_empty() || (!self.paused && (self.task_due() || self.event_waiting())) {
            return;
        }
        self.pending = VecDeque::new();
        self.close_files(closing::Why::Idle).await;
        let mut status = self.shared.status();
        status.usage.db_cache_bytes = 0;
        if status.state == StoreState::Running {
            status.state = StoreState::Hibernated;
        }
        drop(status);
        tracing::debug!("opened with nothing to do: hibernated with its files closed");
    }

    /// Hibernated and idle for `close_files_after` more: closes `store.db` and the event log
    /// too, so the store holds no file descriptor and little memory. The next append reopens
    /// the log (still durable before its 2xx) and the next piece of work `store.db`
    /// ([`Actor::ensure_db`]). The closing (checkpoints and fsyncs) runs on the host's
    /// closing threads, not on this actor's async worker (see [`crate::closing`]); the actor
    /// goes on when every file is closed. A stop's closing goes before every hibernation's.
    async fn close_files(&mut self, why: closing::Why) {
        // Readers first: the last connection to close checkpoints its WAL into the database
        // and empties it, which a read-only one cannot. The sandbox, gone since hibernation,
        // held the only other handle on the database.
        // A long hibernation leaves small WALs as they are (see
        // `sqlite::keep_small_wal_on_close`); a stop checkpoints them.
        let idle = why == closing::Why::Idle;
        let mut files: Vec<closing::OpenFiles> = self
            .shared
            .take_connections(idle)
            .into_iter()
            .map(|conn| Box::new(conn) as closing::OpenFiles)
            .collect();
        if let Some(db) = self.db.take() {
            if idle {
                sqlite::keep_small_wal_on_close(lock(&db).connection(), &self.db_file.path);
            }
            files.push(Box::new(db));
        }
        closing::close(files, why).await;
        tracing::debug!("closed its files");
    }

    /// Gives the sandbox back (its pool slot and linear memory) and shrinks the SQLite
    /// connections' caches: a store hibernating, and one paused or waiting (a retry's
    /// backoff, an open circuit, a budget) for longer than `idle_timeout`, whose state stays
    /// what it was. Its next invocation instantiates the sandbox again.
    fn release_sandbox(&mut self) {
        self.sandbox = None;
        if let Some(db) = &self.db
            && let Err(err) = sqlite::release_memory(lock(db).connection())
        {
            tracing::debug!("could not shrink the store database's cache: {err}");
        }
        self.shared.release_memory();
        self.shared.status().usage.db_cache_bytes = 0;
    }

    /// Leaves hibernation: the store shows `running` again (work is about to start).
    fn wake(&self) {
        let mut status = self.shared.status();
        if status.state == StoreState::Hibernated {
            status.state = StoreState::Running;
            drop(status);
            tracing::debug!("woke from hibernation");
        }
    }

    /// A store whose files a long hibernation closed wakes while its event's append opens the
    /// event log again and commits, on another thread: meanwhile this actor's worker wakes up,
    /// opens `store.db` and instantiates the sandbox, so the event finds them ready. Otherwise
    /// each step waited for the one before, and each thread woken is one more wait for a CPU
    /// to start it (0.1–0.9 ms on a VM whose idle CPUs halt). Nothing more happens if the
    /// append fails: the store, running with nothing to do, hibernates again after
    /// `idle_timeout`.
    async fn wake_early(&mut self) {
        if self.paused || self.shared.status().state != StoreState::Hibernated {
            return;
        }
        if let Err(err) = self.ensure_db() {
            // The event's turn opens it again, and says what went wrong if it still cannot.
            tracing::debug!("could not open the store's database early: {err}");
            return;
        }
        if let Err(err) = self.sandbox().await {
            // The event's invocation instantiates it again and records the failure.
            tracing::debug!("could not instantiate the sandbox early: {}", err.message);
        }
    }

    /// How many more events the store's queue takes before `max_pending_events`: the room an
    /// invocation's emitted events may fill.
    fn queue_room(&self) -> usize {
        let pending = self.shared.head.borrow().saturating_sub(self.cursor);
        let max = self
            .shared
            .max_pending
            .load(std::sync::atomic::Ordering::Relaxed);
        usize::try_from(max.saturating_sub(pending)).unwrap_or(usize::MAX)
    }

    /// How many bytes of events the store's log takes before its `event_log` quota: the room
    /// an invocation's emitted events may fill, less what earlier invocations emitted that is
    /// not in the log yet (staged in the open batch, or committed to the outbox).
    fn log_room(&self) -> u64 {
        let staged = self
            .batch
            .as_ref()
            .map_or(&[][..], |batch| &batch.staged[..]);
        let unsent = self.outbox.unsent.as_deref().unwrap_or_default();
        let on_the_way: u64 = staged.iter().chain(unsent).map(OutboxEntry::bytes).sum();
        let held = self.shared.log.file_bytes() + on_the_way;
        self.settings.quotas.event_log.saturating_sub(held)
    }

    /// Whether an event waits to be processed (reading the next ones from the log when none
    /// is read yet).
    fn event_waiting(&mut self) -> bool {
        if self.pending.is_empty() && *self.shared.head.borrow() > self.cursor {
            match self.shared.log.read_after(self.cursor, READ_BATCH) {
                Ok(events) => {
                    if std::mem::take(&mut self.log_unread) {
                        tracing::info!("the event log can be read again");
                    }
                    self.pending.extend(events);
                }
                Err(err) => {
                    if !std::mem::replace(&mut self.log_unread, true) {
                        tracing::error!(
                            "could not read the event log (trying again every second): {err}"
                        );
                    }
                }
            }
        }
        !self.pending.is_empty()
    }

    /// Processes the waiting events one after another until none is left or a command or a
    /// due task is waiting (those go first). One turn of the serve loop, and one boxed
    /// future, for a run of events rather than for each: allocating and copying a future this
    /// large per event was ~6% of the actor's time under a steady stream.
    async fn process_waiting(&mut self) -> Flow {
        while !self.paused && self.event_waiting() {
            if !self.ensure_db_or_wait().await {
                return Flow::Continue;
            }
            let Some(event) = self.pending.pop_front() else {
                break;
            };
            if self.process(event).await == Flow::Stop {
                return Flow::Stop;
            }
            if !self.inbox.is_empty() || self.task_due() {
                break;
            }
        }
        Flow::Continue
    }

    async fn handle(&mut self, command: Command) -> Flow {
        // What the command does (or answers) follows every event processed before it; an
        // event whose batch is lost here is processed again afterwards.
        self.flush();
        // Emitted events a backup held back (or a failed drain left) go to the log now,
        // whatever the command: the one meant to say so may not have fit in the inbox.
        if self
            .outbox
            .unsent
            .as_ref()
            .is_some_and(|unsent| !unsent.is_empty())
            && let Err(err) = self.drain_outbox()
        {
            tracing::error!("could not move emitted events to the log (retried later): {err}");
        }
        match command {
            Command::Query(query) => {
                let Query {
                    name,
                    args,
                    request_id,
                    reply,
                } = *query;
                let shown = storehost_runtime::failure::one_line(&name);
                let span =
                    tracing::info_span!("query", name = %shown, request_id = request_id.as_deref());
                let answer = match self.budget_left().and_then(|()| self.ensure_db()) {
                    Ok(()) => self.query(&name, &args).instrument(span).await,
                    Err(err) => Err(err),
                };
                let _ = reply.send(answer);
            }
            Command::RetryDeadLetter { seq, reply } => {
                let answer = match self.budget_left().and_then(|()| self.ensure_db()) {
                    Ok(()) => self.retry_dead_letter(seq).await,
                    Err(err) => Err(err),
                };
                let _ = reply.send(answer);
            }
            Command::Update(settings) => self.apply(*settings),
            Command::Wake => self.wake_early().await,
            // Drained above, as before every command.
            Command::DrainEmitted => {}
            Command::SetPaused(paused) => {
                self.paused = paused;
                let mut status = self.shared.status();
                if paused {
                    status.state = StoreState::Paused;
                } else if status.state != StoreState::Hibernated {
                    // Resuming a store that was not paused leaves a hibernating one asleep.
                    status.state = StoreState::Running;
                }
            }
            Command::Stop => return Flow::Stop,
        }
        Flow::Continue
    }

    fn apply(&mut self, settings: StoreSettings) {
        // A hibernating store's database is closed: it gets the quotas when it opens again.
        if let Some(db) = &self.db {
            let db = lock(db);
            if let Err(err) = db.set_disk_quota(settings.quotas.disk) {
                tracing::error!("could not apply the disk quota: {err}");
            }
            if let Err(err) = db.set_cache_quota(settings.quotas.db_cache) {
                tracing::error!("could not apply the db_cache quota: {err}");
            }
        }
        self.files.usage.set_limit(settings.quotas.files);
        let plugin_changed = !Arc::ptr_eq(&settings.plugin, &self.settings.plugin);
        let config_changed = settings.config != self.settings.config;
        // A lower memory limit only stops growth: a guest already past it would keep what it
        // has. A new sandbox starts under the new limit.
        let memory_lowered = settings.quotas.memory < self.settings.quotas.memory;
        if plugin_changed || config_changed {
            // The failures so far were the old plugin's or config's: the circuit closes.
            self.consecutive_failures = 0;
            self.breaker_trips = 0;
        }
        if plugin_changed || config_changed || memory_lowered {
            // The next invocation instantiates the new plugin or config: a hot swap between events.
            self.sandbox = None;
            self.config = Arc::new(settings.config.clone());
        } else if let Some(sandbox) = &mut self.sandbox {
            sandbox.set_limits(limits_of(&settings));
        }
        self.cpu_budget
            .set_per_minute(settings.quotas.cpu_ms_per_minute);
        self.emit_budget.set_events(&settings.quotas);
        self.emit_bytes_budget.set_bytes(&settings.quotas);
        if let Some(llm) = &settings.llm {
            llm.set_calls_per_minute(&self.shared.id, settings.quotas.llm_calls_per_minute);
        }
        if plugin_changed {
            tracing::info!(plugin = %settings.plugin_name, sha256 = settings.plugin.sha256(), "plugin switched");
        }
        self.settings = settings;
    }

    /// Delivers `event`, retrying with backoff, then dead-lettering it.
    /// Processes one event (retries, then a dead letter) in a span carrying its seq and the
    /// correlation id of the request that appended it, so the plugin's log lines have both.
    async fn process(&mut self, event: LoggedEvent) -> Flow {
        let span = tracing::info_span!(
            "event",
            seq = event.seq,
            request_id = event.request_id.as_deref()
        );
        self.process_in_span(event).instrument(span).await
    }

    async fn process_in_span(&mut self, event: LoggedEvent) -> Flow {
        let policy = self.settings.retry.clone();
        let work = format!("event {}", event.seq);
        let mut attempt = 0;
        loop {
            // A store over a budget (CPU time, emitted events) waits with its processed events
            // committed.
            if self.batch.is_some() && self.budget_wait().is_some() && !self.flush() {
                return Flow::Continue;
            }
            if self.wait_for_budgets().await == Flow::Stop {
                return Flow::Stop;
            }
            if self.paused {
                // Paused while it waited: the event waits for the resume.
                self.pending.push_front(event);
                return Flow::Continue;
            }
            attempt += 1;
            match self.attempt_event(&event).await {
                Ok(()) => {
                    self.consecutive_failures = 0;
                    self.breaker_trips = 0;
                    let mut status = self.shared.status();
                    status.state = StoreState::Running;
                    status.waiting_until = None;
                    status.last_activity = Some(sqlite::now_ms());
                    return Flow::Continue;
                }
                Err(EventFailure::BatchLost) => {
                    tracing::debug!(
                        seq = event.seq,
                        "the transaction was lost with earlier events in it; they are processed again"
                    );
                    return Flow::Continue;
                }
                Err(EventFailure::Invocation(err)) => {
                    // The events before this one commit before it is retried or dead-lettered.
                    if !self.flush() {
                        return Flow::Continue;
                    }
                    tracing::warn!(seq = event.seq, attempt, reason = %err.reason, "event failed: {}", err.message);
                    self.shared.record_failure(&err, Some(event.seq));
                    self.consecutive_failures += 1;
                    let exhausted = attempt >= policy.attempts.max(1);
                    if exhausted {
                        self.dead_letter(&event, &err, attempt);
                    }
                    if let Some(flow) = self.after_failure(&policy, &work, attempt, exhausted).await
                    {
                        return flow;
                    }
                }
            }
        }
    }

    /// What follows a failed attempt of `work` (an event or a task execution), once it is
    /// recorded, and dead-lettered or recorded as failed when its attempts are `exhausted`:
    /// the circuit opens if the failures say so, or the store waits for the retry. `Some`
    /// ends the work's loop with that flow; `None` tries it again.
    async fn after_failure(
        &mut self,
        policy: &crate::store::RetryPolicy,
        work: &str,
        attempt: u32,
        exhausted: bool,
    ) -> Option<Flow> {
        if self.breaker_should_open(policy) {
            if self.open_circuit(policy, work.to_owned()).await == Flow::Stop {
                return Some(Flow::Stop);
            }
        } else if !exhausted {
            self.shared.status().state = StoreState::Retrying;
            if self.wait(policy.delay_after(attempt)).await == Flow::Stop {
                return Some(Flow::Stop);
            }
        }
        exhausted.then_some(Flow::Continue)
    }

    /// Whether the last failure opens the circuit: K failures in a row, or any failure of the
    /// probe that follows a rest (half-open: one failed probe is enough to rest again, longer).
    fn breaker_should_open(&self, policy: &crate::store::RetryPolicy) -> bool {
        self.consecutive_failures >= policy.breaker_failures.max(1) || self.breaker_trips > 0
    }

    /// Too many failures in a row: the store rests (state `backoff`), then probes with its next
    /// invocation. The rest doubles for each further event or task execution (`work`) that
    /// fails as the probe; a retry of the same one that fails (after a pause too) rests as long
    /// again. So a run of bad events lengthens the rest once per event, not once per attempt,
    /// while a plugin that fails everything still rests longer and longer. A settings change
    /// or a pause ends the rest (see [`Actor::apply`]).
    async fn open_circuit(&mut self, policy: &crate::store::RetryPolicy, work: String) -> Flow {
        if self.breaker_trips == 0 || self.breaker_work.as_ref() != Some(&work) {
            self.breaker_trips += 1;
            self.breaker_work = Some(work);
        }
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

    /// Refuses work a caller asked for (a query, a dead-letter retry) while the store's CPU
    /// budget is overdrawn: events wait for it, a caller is told when to come back. (The
    /// emitted events' budget does not refuse them: a query emits nothing, and a retry's
    /// emits are charged and waited for before the next event.)
    fn budget_left(&mut self) -> Result<(), StoreError> {
        match self.cpu_budget.wait_needed() {
            Some(delay) => Err(StoreError::CpuBudgetUsed {
                store: self.shared.id.clone(),
                per_minute_ms: self.settings.quotas.cpu_ms_per_minute,
                retry_after_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1),
            }),
            None => Ok(()),
        }
    }

    /// Waits until neither budget is overdrawn (state `throttled`), still answering commands;
    /// looks again after a settings change or a pause (a higher rate may end the wait, a
    /// retry meanwhile may lengthen it).
    async fn wait_for_budgets(&mut self) -> Flow {
        while let Some(delay) = self.budget_wait() {
            if self.paused {
                return Flow::Continue;
            }
            if self.rest(StoreState::Throttled, delay).await == Flow::Stop {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Charges committed emits to the budgets of the events and the bytes the plugin adds.
    fn charge_emits(&mut self, staged: &[OutboxEntry]) {
        self.emit_budget.charge(staged.len() as u64);
        self.emit_bytes_budget
            .charge(staged.iter().map(OutboxEntry::bytes).sum());
    }

    /// How long the store must wait before its next event or task: until its CPU budget is no
    /// longer overdrawn, nor its budget of emitted events.
    fn budget_wait(&mut self) -> Option<Duration> {
        let cpu = self.cpu_budget.wait_needed();
        let emits = self.emit_budget.wait_needed();
        let emitted_bytes = self.emit_bytes_budget.wait_needed();
        cpu.max(emits).max(emitted_bytes)
    }

    async fn rest(&mut self, state: StoreState, delay: Duration) -> Flow {
        {
            let mut status = self.shared.status();
            status.state = state;
            let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            status.waiting_until = Some(sqlite::now_ms().saturating_add(delay_ms));
        }
        // A settings change or a pause ends the rest: a throttled store looks at its budgets
        // again, a store whose circuit is open probes at once (a new plugin, config or quota
        // may be the operator's fix).
        let flow = self.wait(delay).await;
        let mut status = self.shared.status();
        if status.state == state {
            status.state = StoreState::Running;
        }
        status.waiting_until = None;
        flow
    }

    /// Waits `delay` while still answering commands (a stop, a settings change or a pause
    /// ends the wait). A wait longer than `idle_timeout` gives the
    /// sandbox back once the store has been idle that long ([`Actor::release_sandbox`]).
    async fn wait(&mut self, delay: Duration) -> Flow {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let idle = self
            .settings
            .idle_timeout
            .filter(|idle| !idle.is_zero() && *idle < delay);
        let release = tokio::time::sleep(idle.unwrap_or(delay));
        tokio::pin!(release);
        loop {
            tokio::select! {
                _ = &mut sleep => return Flow::Continue,
                () = &mut release, if idle.is_some() && self.sandbox.is_some() => {
                    self.release_sandbox();
                }
                command = self.inbox.recv() => match command {
                    Some(command) => {
                        let changes =
                            matches!(command, Command::Update(_) | Command::SetPaused(_));
                        if self.handle(command).await == Flow::Stop {
                            return Flow::Stop;
                        }
                        if changes {
                            return Flow::Continue;
                        }
                        // A command (a query) may have instantiated the sandbox again: the
                        // idle time counts from it.
                        if let Some(idle) = idle {
                            release.as_mut().reset(tokio::time::Instant::now() + idle);
                        }
                    }
                    None => return Flow::Stop,
                },
            }
        }
    }

    fn dead_letter(&mut self, event: &LoggedEvent, err: &InvocationError, attempts: u32) {
        let result = self.lock_db().past_quota(|db| {
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
        });
        match result {
            Ok(()) => {
                self.note_disk();
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

    /// Reads the earliest due time of the store's schedules and publishes it.
    fn refresh_next_due(&mut self) {
        let next = match schedules::next_due(self.lock_db().connection()) {
            Ok(next) => next,
            Err(err) => {
                tracing::error!("could not read the next due task: {err}");
                // Look again in a second rather than never.
                Some(sqlite::now_ms() + 1_000)
            }
        };
        self.next_due = next;
        self.shared.status().next_task_due_at = next;
    }

    fn task_due(&self) -> bool {
        self.next_due.is_some_and(|due| due <= sqlite::now_ms())
    }

    /// How long until the next task is due (`None`: nothing is scheduled).
    fn due_in(&self) -> Option<Duration> {
        let due = self.next_due?;
        let wait = due.saturating_sub(sqlite::now_ms()).max(0);
        Some(Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
    }

    /// Runs (or records as missed) the schedules due now, earliest first.
    async fn run_due_tasks(&mut self) -> Flow {
        let now = sqlite::now_ms();
        let due = schedules::due(self.lock_db().connection(), now, DUE_BATCH);
        let due = match due {
            Ok(due) => due,
            Err(err) => {
                tracing::error!("could not read the due tasks: {err}");
                self.next_due = Some(now + 1_000);
                return Flow::Continue;
            }
        };
        let window = i64::try_from(self.settings.task_catch_up.as_millis()).unwrap_or(i64::MAX);
        let mut moved = false;
        for schedule in due {
            let flow = match schedules::plan(&schedule, now, window) {
                None => Flow::Continue,
                Some(DuePlan::Missed {
                    occurrences,
                    next,
                    skipped_before,
                }) => {
                    moved |= self.record_missed(&schedule, &occurrences, next, skipped_before);
                    self.runs_recorded += occurrences.len();
                    Flow::Continue
                }
                Some(DuePlan::Run(at)) => {
                    moved = true;
                    self.run_task(&schedule, at).await
                }
            };
            if flow == Flow::Stop {
                return Flow::Stop;
            }
        }
        if self.runs_recorded >= schedules::PRUNE_EVERY {
            self.prune_runs();
        }
        self.refresh_next_due();
        if !moved && self.next_due.is_some_and(|due| due <= now) {
            // Nothing due could move: a stored schedule that no longer reads (skipped), or a
            // disk too full to record what was missed. The next pass is in a second, not at
            // once: passes without a wait held the store's thread and starved its events.
            self.next_due = Some(now + 1_000);
        }
        Flow::Continue
    }

    /// Drops the execution records past the latest [`schedules::KEPT_RUNS`] and the catch-up
    /// window: a task due every second recorded 86,400 a day, which filled the store's disk
    /// quota with the host's bookkeeping in time.
    fn prune_runs(&mut self) {
        self.runs_recorded = 0;
        let window = i64::try_from(self.settings.task_catch_up.as_millis()).unwrap_or(i64::MAX);
        let db = self.lock_db();
        let pruned = db
            .begin()
            .and_then(|()| schedules::prune_runs(db.connection(), sqlite::now_ms(), window))
            .and_then(|pruned| db.commit().map(|()| pruned));
        match pruned {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "dropped old task execution records"),
            Err(err) => {
                db.rollback();
                tracing::warn!(
                    "could not drop old task execution records (tried again later): {err}"
                );
            }
        }
    }

    /// Records `schedule`'s `occurrences` as missed and moves it to `next`; false when that
    /// could not be written (logged).
    fn record_missed(
        &self,
        schedule: &Schedule,
        occurrences: &[i64],
        next: Option<i64>,
        skipped_before: Option<i64>,
    ) -> bool {
        let now = sqlite::now_ms();
        let written = self.lock_db().past_quota(|db| {
            db.begin()?;
            let result = schedules::record_missed(
                db.connection(),
                schedule,
                occurrences,
                next,
                skipped_before,
                now,
            )
            .and_then(|()| db.commit());
            if result.is_err() {
                db.rollback();
            }
            result
        });
        match written {
            Ok(()) => {
                tracing::warn!(
                    task_id = schedule.task_id,
                    missed = occurrences.len(),
                    skipped_before,
                    "task occurrences older than the catch-up window were recorded as missed"
                );
                true
            }
            Err(err) => {
                tracing::error!(
                    task_id = schedule.task_id,
                    "could not record missed occurrences (tried again in a second): {err}"
                );
                false
            }
        }
    }

    /// Runs the execution of `schedule` due at `due`: retried with backoff like an event, then
    /// recorded as failed; its effects, its claim and the schedule's advance commit together.
    async fn run_task(&mut self, schedule: &Schedule, due: i64) -> Flow {
        self.runs_recorded += 1;
        let policy = self.settings.retry.clone();
        let work = format!("task {}@{due}", schedule.task_id);
        let started_at = sqlite::now_ms();
        let mut attempt = 0;
        loop {
            if self.wait_for_budgets().await == Flow::Stop {
                return Flow::Stop;
            }
            if self.paused {
                // Paused while it waited: the task stays due until the resume.
                return Flow::Continue;
            }
            attempt += 1;
            match self.attempt_task(schedule, due, attempt, started_at).await {
                Ok(ran) => {
                    self.consecutive_failures = 0;
                    self.breaker_trips = 0;
                    if ran {
                        self.shared.metrics.add_task_executed();
                        let mut status = self.shared.status();
                        status.tasks_executed += 1;
                        status.state = StoreState::Running;
                        status.last_activity = Some(sqlite::now_ms());
                    }
                    return Flow::Continue;
                }
                Err(err) => {
                    tracing::warn!(task_id = schedule.task_id, due, attempt, reason = %err.reason, "task failed: {}", err.message);
                    self.shared.record_failure(&err, None);
                    self.consecutive_failures += 1;
                    let exhausted = attempt >= policy.attempts.max(1);
                    if exhausted {
                        self.task_failed(schedule, due, &err, attempt, started_at);
                    }
                    if let Some(flow) = self.after_failure(&policy, &work, attempt, exhausted).await
                    {
                        return flow;
                    }
                }
            }
        }
    }

    /// One attempt of a task execution. `Ok(false)`: it had already run (its claim exists), so
    /// only the schedule moved on; or its schedule changed since it was read, so it is not
    /// run (the next pass reads the new one).
    async fn attempt_task(
        &mut self,
        schedule: &Schedule,
        due: i64,
        attempt: u32,
        started_at: i64,
    ) -> Result<bool, InvocationError> {
        let cpu_ms = self.settings.quotas.cpu_ms_per_call;
        let claimed = {
            let db = self.lock_db();
            db.begin()
                .map_err(|err| host_error("could not begin the transaction", &err))?;
            // Read with others that fell due together, or before a retry's wait: a task or
            // event that ran meanwhile may have cancelled or replaced it.
            schedules::still_as_read(db.connection(), schedule).and_then(|current| {
                if current {
                    schedules::claim(db.connection(), &schedule.task_id, due, sqlite::now_ms())
                        .map(Some)
                } else {
                    Ok(None)
                }
            })
        };
        let claimed = match claimed {
            Ok(Some(claimed)) => claimed,
            Ok(None) => {
                self.lock_db().rollback();
                return Ok(false);
            }
            Err(err) => {
                self.lock_db().rollback();
                return Err(storage_failure("could not claim the task execution", &err));
            }
        };
        if !claimed {
            let db = self.lock_db();
            let moved = schedules::advance(db.connection(), schedule, due, sqlite::now_ms())
                .and_then(|()| db.commit());
            if let Err(err) = moved {
                db.rollback();
                return Err(storage_failure("could not move the schedule on", &err));
            }
            return Ok(false);
        }
        let task = TaskRun {
            task_id: schedule.task_id.clone(),
            payload: schedule.payload.clone(),
            scheduled_for_ms: due,
            execution_id: format!("{}@{due}", schedule.task_id),
        };
        let outcome = self.invoke(&Call::Task(task), cpu_ms).await;
        let outcome = outcome.and_then(|emitted| {
            let db = self.lock_db();
            let now = sqlite::now_ms();
            let origin = |index| format!("task:{}@{due}:{index}", schedule.task_id);
            self.clear_sent(&db)?;
            let staged = stage(&db, emitted, origin, now)?;
            let conn = db.connection();
            schedules::finish(
                conn,
                &schedule.task_id,
                due,
                "completed",
                attempt,
                Some(started_at),
                None,
                now,
            )
            .and_then(|()| schedules::advance(conn, schedule, due, now))
            .map_err(|err| storage_failure("could not record the execution", &err))?;
            db.commit()
                .map_err(|err| storage_failure("could not commit", &err))?;
            Ok(staged)
        });
        match outcome {
            Ok(staged) => {
                self.note_disk();
                self.charge_emits(&staged);
                self.outbox.committed(staged);
            }
            Err(err) => {
                self.lock_db().rollback();
                return Err(err);
            }
        }
        if let Err(err) = self.drain_outbox() {
            tracing::error!("could not move emitted events to the log (retried later): {err}");
        }
        Ok(true)
    }

    /// Records an execution that failed every attempt, and moves its schedule on.
    fn task_failed(
        &self,
        schedule: &Schedule,
        due: i64,
        err: &InvocationError,
        attempts: u32,
        started_at: i64,
    ) {
        let now = sqlite::now_ms();
        let written = self.lock_db().past_quota(|db| {
            db.begin()?;
            let conn = db.connection();
            let result = schedules::finish(
                conn,
                &schedule.task_id,
                due,
                "failed",
                attempts,
                Some(started_at),
                Some((err.reason.as_str(), &err.message)),
                now,
            )
            .and_then(|()| schedules::advance(conn, schedule, due, now))
            .and_then(|()| db.commit());
            if result.is_err() {
                db.rollback();
            }
            result
        });
        match written {
            Ok(()) => {
                tracing::error!(task_id = schedule.task_id, due, reason = %err.reason, "task execution failed after {attempts} attempts: {}", err.message)
            }
            Err(db_err) => tracing::error!(
                task_id = schedule.task_id,
                due,
                "could not record the failed execution: {db_err}"
            ),
        }
    }

    /// The cursor committed at `seq`: the store's handle sees it processed.
    fn moved_to(&mut self, seq: u64) {
        self.cursor = seq;
        self.committed = seq;
        self.shared.cursor.send_replace(seq);
    }

    /// One delivery of `event` in the open batch: the guest's writes, its emitted events and
    /// the cursor's move are kept together or undone together (a savepoint); the batch
    /// commits when [`Actor::batch_is_due`] says so.
    async fn attempt_event(&mut self, event: &LoggedEvent) -> Result<(), EventFailure> {
        let cpu_ms = self.settings.quotas.cpu_ms_per_call;
        if self.batch.is_none() {
            self.open_batch().map_err(EventFailure::Invocation)?;
        }
        self.lock_db().savepoint();
        let outcome = self.invoke_event(event, cpu_ms).await;
        let outcome = outcome.and_then(|emitted| self.keep(event.seq, emitted));
        if let Err(err) = outcome {
            if self.lock_db().rollback_to_savepoint() {
                return Err(EventFailure::Invocation(err));
            }
            let lost = self.batch.take().map_or(0, |batch| batch.events);
            if lost == 0 {
                return Err(EventFailure::Invocation(err));
            }
            self.replay(event.seq);
            return Err(EventFailure::BatchLost);
        }
        if !self.batch_is_due() {
            return Ok(());
        }
        match self.commit_batch() {
            Ok(()) => Ok(()),
            Err((batch, err)) if batch.events == 1 => Err(EventFailure::Invocation(
                storage_failure("could not commit", &err),
            )),
            Err((batch, err)) => {
                self.commit_failed(&batch, &err);
                Err(EventFailure::BatchLost)
            }
        }
    }

    /// Begins the transaction of a batch; it also clears the outbox entries already in the log.
    fn open_batch(&mut self) -> Result<(), InvocationError> {
        let db = self.lock_db();
        db.begin()
            .map_err(|err| storage_failure("could not begin the transaction", &err))?;
        if let Err(err) = self.clear_sent(&db) {
            db.rollback();
            return Err(err);
        }
        drop(db);
        self.batch = Some(Batch {
            events: 0,
            last_seq: 0,
            staged: Vec::new(),
            began: Instant::now(),
        });
        Ok(())
    }

    /// Keeps a successful invocation of event `seq` in the batch: stages what it emitted and
    /// releases its savepoint. The cursor moves once for the whole batch, when it commits.
    fn keep(&mut self, seq: u64, emitted: Vec<(String, String)>) -> Result<(), InvocationError> {
        let db = self.lock_db();
        let now = sqlite::now_ms();
        let staged = stage(&db, emitted, |index| format!("{seq}:{index}"), now)?;
        db.release_savepoint()
            .map_err(|err| storage_failure("could not record progress", &err))?;
        drop(db);
        let Some(batch) = self.batch.as_mut() else {
            return Err(InvocationError::new(
                FailureReason::HostError,
                "the batch's transaction vanished during the invocation",
            ));
        };
        batch.events += 1;
        batch.last_seq = seq;
        batch.staged.extend(staged);
        self.cursor = seq;
        Ok(())
    }

    /// Whether the open batch commits now: nothing more is waiting, it is full or old enough,
    /// events commit one at a time after a lost batch, or its savepoint journal holds half
    /// the temporary files' room (the next event's sorts and spills would have only the
    /// rest: the journal keeps its size until the transaction ends).
    fn batch_is_due(&self) -> bool {
        let Some(batch) = &self.batch else {
            return false;
        };
        let more_waiting = !self.pending.is_empty() || *self.shared.head.borrow() > self.cursor;
        !more_waiting
            || batch.events >= BATCH_EVENTS
            || batch.began.elapsed() >= BATCH_AGE
            || self.cursor <= self.solo_through
            || self.lock_db().temporary_files_half_full()
    }

    /// Commits the open batch, if any; then its events are processed for everyone: the
    /// cursor moves, what they emitted goes to the log. On failure nothing of it is kept and
    /// the cursor is back at the last committed event.
    fn commit_batch(&mut self) -> Result<(), (Batch, rusqlite::Error)> {
        let Some(batch) = self.batch.take() else {
            return Ok(());
        };
        let db = self.lock_db();
        if batch.events == 0 {
            // Only failed invocations: there is nothing to keep.
            db.rollback();
            return Ok(());
        }
        // One cursor update per batch, in its transaction: the batch's effects and its
        // progress commit together or not at all.
        if let Err(err) = db.advance_cursor(batch.last_seq).and_then(|()| db.commit()) {
            db.rollback();
            drop(db);
            self.cursor = self.committed;
            return Err((batch, err));
        }
        drop(db);
        self.note_disk();
        self.charge_emits(&batch.staged);
        self.outbox.committed(batch.staged);
        // The invocations may have scheduled or cancelled tasks.
        self.refresh_next_due();
        // What the events emitted reaches the log before they show as processed: whoever
        // waits for them to be processed then also finds the log's head past their emits.
        if let Err(err) = self.drain_outbox() {
            tracing::error!("could not move emitted events to the log (retried later): {err}");
        }
        self.shared.metrics.add_event_commit();
        self.shared.status().events_processed += batch.events;
        self.moved_to(batch.last_seq);
        Ok(())
    }

    /// Commits the open batch before something else uses the database or the store waits.
    /// `false`: the commit failed and its events are to be processed again.
    fn flush(&mut self) -> bool {
        match self.commit_batch() {
            Ok(()) => true,
            Err((batch, err)) => {
                self.commit_failed(&batch, &err);
                false
            }
        }
    }

    /// A batch did not commit: its events are processed again, one at a time.
    fn commit_failed(&mut self, batch: &Batch, err: &rusqlite::Error) {
        tracing::error!(
            events = batch.events,
            "could not commit the processed events; they are processed again, one at a time: {err}"
        );
        self.replay(batch.last_seq);
    }

    /// The open transaction is gone: the events after the committed cursor are read from the
    /// log again, and each commits alone through `through`.
    fn replay(&mut self, through: u64) {
        self.batch = None;
        self.cursor = self.committed;
        self.pending.clear();
        self.solo_through = self.solo_through.max(through);
    }

    /// Retries a dead letter: the guest's writes, its emitted events and the letter's
    /// resolution commit together, or nothing does.
    async fn attempt_dead_letter(&mut self, event: &LoggedEvent) -> Result<(), InvocationError> {
        let cpu_ms = self.settings.quotas.cpu_ms_per_call;
        let begun = self.lock_db().begin();
        begun.map_err(|err| host_error("could not begin the transaction", &err))?;
        let outcome = self.invoke_event(event, cpu_ms).await;
        let outcome = outcome.and_then(|emitted| self.resolve(event.seq, emitted));
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
        let call = Call::Event(Event {
            seq: event.seq,
            event_type: event.event_type.clone(),
            payload: event.payload.clone(),
            at_ms: event.at,
            source: event.source.clone(),
        });
        self.invoke(&call, cpu_ms).await
    }

    /// One guest invocation inside the caller's open transaction; answers what it emitted.
    async fn invoke(
        &mut self,
        call: &Call,
        cpu_ms: u64,
    ) -> Result<Vec<(String, String)>, InvocationError> {
        let db = self.db_handle();
        let metrics = self.shared.metrics.clone();
        let priority = if self.penalized {
            Priority::Low
        } else {
            Priority::Normal
        };
        let wall = Duration::from_millis(self.settings.quotas.wall_ms_per_call);
        let emit_room = EmitRoom {
            events: self.queue_room(),
            log_bytes: self.log_room(),
        };
        let sandbox = self.sandbox().await?;
        sandbox.set_priority(priority);
        sandbox.host_mut().start_invocation(wall, emit_room);
        let before = sandbox.usage();
        lock(&db).enter_guest(true, guest_db::statement_budget(cpu_ms));
        let started = Instant::now();
        let result = if priority == Priority::Low {
            self.call_demoted(call).await
        } else {
            call_sandbox(sandbox, call).await
        };
        metrics.observe_invocation(started.elapsed());
        let (lost, cause) = {
            let db = lock(&db);
            let lost = db.transaction_lost();
            db.leave_guest();
            (lost, db.take_lost_transaction())
        };
        // A plugin that handled the error SQLite rolled its transaction back on has nothing
        // kept to answer for: the invocation failed (and the batch it ran in).
        let result = match result {
            Ok(()) if lost => Err(lost_transaction(cause.as_ref(), cpu_ms)),
            result => result,
        };
        let Some(sandbox) = self.sandbox.as_mut() else {
            // The demoted call's task died with the sandbox (a panic in the host): the next
            // call instantiates a fresh one.
            return result.map(|()| Vec::new());
        };
        let emitted = sandbox.host_mut().take_emitted();
        for _ in 0..sandbox.host_mut().take_llm_calls() {
            metrics.add_llm_call();
        }
        let after = sandbox.usage();
        let cpu_used = after.cpu_ms.saturating_sub(before.cpu_ms);
        self.cpu_budget.charge(cpu_used);
        self.note_usage(cpu_used, after.fuel.saturating_sub(before.fuel));
        if self.sandbox.as_ref().is_some_and(Sandbox::is_poisoned) {
            self.sandbox = None;
        }
        // A plugin's own error is its business; a breach or a trap costs the store priority.
        self.penalized = result
            .as_ref()
            .is_err_and(|err| err.reason != FailureReason::PluginError);
        result.map(|()| emitted)
    }

    /// Runs `call` on the threads with the least CPU priority (the idle scheduling policy, see
    /// `storehost_runtime::Runtime::demoted_executor`), so a demoted store's guest code and SQL give way to
    /// stores in good standing and to the API. The sandbox travels with the call and comes back.
    async fn call_demoted(&mut self, call: &Call) -> Result<(), InvocationError> {
        let Some(mut sandbox) = self.sandbox.take() else {
            return Err(InvocationError::new(
                FailureReason::HostError,
                "sandbox missing before a demoted call",
            ));
        };
        let call = call.clone();
        let mut task = AbortOnDrop(self.settings.plugin.demoted_executor().spawn(async move {
            let result = call_sandbox(&mut sandbox, &call).await;
            (sandbox, result)
        }));
        match (&mut task.0).await {
            Ok((sandbox, result)) => {
                self.sandbox = Some(sandbox);
                result
            }
            Err(err) => Err(InvocationError::new(
                FailureReason::HostError,
                format!("the demoted call's task ended without an answer: {err}"),
            )),
        }
    }

    /// Commits a retried dead letter's invocation and marks the letter resolved.
    fn resolve(&mut self, seq: u64, emitted: Vec<(String, String)>) -> Result<(), InvocationError> {
        let db = self.lock_db();
        let now = sqlite::now_ms();
        self.clear_sent(&db)?;
        let staged = stage(&db, emitted, |index| format!("{seq}:{index}"), now)?;
        db.resolve_dead_letter(seq)
            .map_err(|err| storage_failure("could not record progress", &err))?;
        db.commit()
            .map_err(|err| storage_failure("could not commit", &err))?;
        drop(db);
        // Like any committed invocation: its disk use shows, and what it emitted counts
        // against the event rate (a retry is no way around it).
        self.note_disk();
        self.charge_emits(&staged);
        self.outbox.committed(staged);
        // The invocation may have scheduled or cancelled tasks.
        self.refresh_next_due();
        Ok(())
    }

    /// Deletes the outbox entries already in the log, inside a transaction that commits work.
    fn clear_sent(&self, db: &GuestDb) -> Result<(), InvocationError> {
        match self.outbox.sent_through {
            Some(through) => db
                .clear_outbox(through)
                .map_err(|err| storage_failure("could not clear the outbox", &err)),
            None => Ok(()),
        }
    }

    /// Moves emitted events from the outbox into the log (idempotent by origin). The first
    /// drain reads the outbox table; later ones know what it holds (see [`Outbox`]).
    fn drain_outbox(&mut self) -> rusqlite::Result<()> {
        // A backup copying the two databases holds them back: they wait in the outbox (the
        // first drain reads it) until it is done ([`crate::Store::hold_emits`]).
        let shared = self.shared.clone();
        let held = shared
            .emits_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *held > 0 {
            if self.outbox.unsent.is_none() {
                let unsent = self.lock_db().outbox()?;
                self.outbox.unsent = Some(unsent);
            }
            return Ok(());
        }
        let unsent = match self.outbox.unsent.take() {
            Some(unsent) => unsent,
            None => self.lock_db().outbox()?,
        };
        let Some(last) = unsent.last().map(|entry| entry.id) else {
            self.outbox.unsent = Some(unsent);
            return Ok(());
        };
        let head = match self.shared.log.append_emitted(&unsent) {
            Ok(head) => head,
            Err(err) => {
                self.outbox.unsent = Some(unsent);
                return Err(err);
            }
        };
        self.outbox.unsent = Some(Vec::new());
        self.outbox.sent_through = Some(last);
        self.shared.head.send_if_modified(|h| {
            let grew = head > *h;
            *h = (*h).max(head);
            grew
        });
        Ok(())
    }

    async fn query(&mut self, name: &str, args: &str) -> Result<String, StoreError> {
        let cpu_ms = self.settings.quotas.cpu_ms_per_call;
        let wall = Duration::from_millis(self.settings.quotas.wall_ms_per_call);
        let db = self.db_handle();
        let metrics = self.shared.metrics.clone();
        lock(&db).begin_read()?;
        let (outcome, cpu_used, fuel_used) = match self.sandbox().await {
            Ok(sandbox) => {
                sandbox
                    .host_mut()
                    .start_invocation(wall, EmitRoom::UNBOUNDED);
                let before = sandbox.usage();
                lock(&db).enter_guest(false, guest_db::statement_budget(cpu_ms));
                let started = Instant::now();
                let result = sandbox.query(name, args).await;
                metrics.observe_invocation(started.elapsed());
                lock(&db).leave_guest();
                let after = sandbox.usage();
                (
                    result,
                    after.cpu_ms.saturating_sub(before.cpu_ms),
                    after.fuel.saturating_sub(before.fuel),
                )
            }
            Err(err) => (Err(err), 0, 0),
        };
        self.cpu_budget.charge(cpu_used);
        lock(&db).rollback();
        self.note_usage(cpu_used, fuel_used);
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
        let letter = match letter {
            Some(letter) if letter.status == "dead" => letter,
            Some(DeadLetter {
                resolved_at: Some(resolved_at_ms),
                ..
            }) => {
                return Err(StoreError::DeadLetterResolved {
                    store: self.shared.id.clone(),
                    seq,
                    resolved_at_ms,
                });
            }
            _ => {
                return Err(StoreError::NoDeadLetter {
                    store: self.shared.id.clone(),
                    seq,
                });
            }
        };
        let event = self.shared.log.get(seq)?.ok_or(StoreError::NoDeadLetter {
            store: self.shared.id.clone(),
            seq,
        })?;
        match self.attempt_dead_letter(&event).await {
            Ok(()) => {
                tracing::info!(seq, "dead letter retried successfully");
                self.shared.metrics.add_event_commit();
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
        self.wake();
        if self.sandbox.is_none() {
            let host = StoreCapabilities::new(
                self.shared.id.clone(),
                self.db_handle(),
                self.config.clone(),
                self.settings.quotas.cpu_ms_per_call,
                self.settings.llm.clone(),
            )
            .with_log_limit(self.shared.guest_log.clone());
            let options = SandboxOptions {
                files: Some(self.files.clone()),
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

    /// Adds one invocation's CPU time and fuel to the store's usage and records its peaks (the disk size
    /// is recorded per commit, [`Actor::note_disk`]).
    fn note_usage(&self, cpu_used_ms: u64, fuel_used: u64) {
        let sandbox_usage = self
            .sandbox
            .as_ref()
            .map(Sandbox::usage)
            .unwrap_or_default();
        let mut status = self.shared.status();
        status.usage.cpu_ms += cpu_used_ms;
        // Added per invocation: a sandbox's own count starts again at 0 when it is rebuilt
        // (hibernation, a trap, a plugin swap).
        status.usage.fuel += fuel_used;
        status.usage.memory_peak = status.usage.memory_peak.max(sandbox_usage.memory_peak);
        status.usage.files_bytes = self.files.usage.used();
    }

    /// Records the database's size after a commit (`Store::open` records it first). Once per
    /// commit, not per invocation: SQLite compiles a `PRAGMA` again each time it runs, which
    /// cost a batch of trivial events a seventh of its time. (The event log's size is measured
    /// when the status is read: see `Store::status`.)
    fn note_disk(&self) {
        let db = self.lock_db();
        let disk = db.size_bytes().unwrap_or(0);
        let cache = db.cache_bytes().unwrap_or(0);
        drop(db);
        let mut status = self.shared.status();
        status.usage.disk_bytes = disk;
        status.usage.db_cache_bytes = cache;
    }

    /// Opens `store.db` again after hibernation (nothing to do while it is open). Every piece
    /// of work the serve loop starts — an event, a due task, a query, a dead-letter retry —
    /// calls this first, so [`Actor::lock_db`] always finds it open.
    fn ensure_db(&mut self) -> Result<(), StoreError> {
        if self.db.is_none() {
            let file = &self.db_file;
            let db = GuestDb::open(&file.path, file.durability, self.settings.quotas.disk)?;
            db.set_cache_quota(self.settings.quotas.db_cache)?;
            self.db = Some(Arc::new(Mutex::new(db)));
        }
        Ok(())
    }

    /// [`Actor::ensure_db`] for the serve loop: when the file cannot be opened (a disk
    /// problem) the work waits a second and is tried again.
    async fn ensure_db_or_wait(&mut self) -> bool {
        match self.ensure_db() {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(
                    "could not open the store's database again after hibernating (retrying in 1 s): {err}"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        }
    }

    /// The open database, shared with the sandbox's `sql` capability.
    fn db_handle(&self) -> Arc<Mutex<GuestDb>> {
        self.db
            .clone()
            .expect("store.db is open while the store works (Actor::ensure_db)")
    }

    fn lock_db(&self) -> MutexGuard<'_, GuestDb> {
        lock(
            self.db
                .as_ref()
                .expect("store.db is open while the store works (Actor::ensure_db)"),
        )
    }
}

/// A budget refilled continuously up to its capacity, charged after the work it counts:
/// a store's CPU time per minute, or the events its plugin emits. When it is overdrawn the
/// store waits (state `throttled`); other stores go on.
struct Budget {
    capacity: f64,
    /// Refill per millisecond.
    per_ms: f64,
    available: f64,
    refilled_at: Instant,
}

impl Budget {
    fn new(capacity: f64, per_ms: f64) -> Self {
        Self {
            capacity,
            per_ms,
            available: capacity,
            refilled_at: Instant::now(),
        }
    }

    /// `cpu_ms_per_minute`, in milliseconds of CPU time.
    fn cpu(per_minute_ms: u64) -> Self {
        Self::new(per_minute_ms as f64, per_minute_ms as f64 / 60_000.0)
    }

    /// The store's event rate as the ingress limiter takes it, in events.
    fn events(quotas: &crate::quotas::Quotas) -> Self {
        let (capacity, per_ms) = Self::event_rate(quotas);
        Self::new(capacity, per_ms)
    }

    fn event_rate(quotas: &crate::quotas::Quotas) -> (f64, f64) {
        let (per_second, burst) = crate::store::event_rate(quotas);
        (
            f64::from(burst.get()),
            f64::from(per_second.get()) / 1_000.0,
        )
    }

    /// The store's byte rate as the ingress limiter takes it, in bytes.
    fn bytes(quotas: &crate::quotas::Quotas) -> Self {
        let (capacity, per_ms) = Self::byte_rate(quotas);
        Self::new(capacity, per_ms)
    }

    fn byte_rate(quotas: &crate::quotas::Quotas) -> (f64, f64) {
        let (per_second, burst) = crate::store::byte_rate(quotas);
        (burst as f64, per_second as f64 / 1_000.0)
    }

    fn set_bytes(&mut self, quotas: &crate::quotas::Quotas) {
        let (capacity, per_ms) = Self::byte_rate(quotas);
        self.set(capacity, per_ms);
    }

    fn set_per_minute(&mut self, per_minute_ms: u64) {
        self.set(per_minute_ms as f64, per_minute_ms as f64 / 60_000.0);
    }

    fn set_events(&mut self, quotas: &crate::quotas::Quotas) {
        let (capacity, per_ms) = Self::event_rate(quotas);
        self.set(capacity, per_ms);
    }

    fn set(&mut self, capacity: f64, per_ms: f64) {
        self.refill();
        self.capacity = capacity;
        self.per_ms = per_ms;
        self.available = self.available.min(capacity);
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed_ms = now.duration_since(self.refilled_at).as_secs_f64() * 1_000.0;
        self.refilled_at = now;
        self.available = (self.available + elapsed_ms * self.per_ms).min(self.capacity);
    }

    fn charge(&mut self, used: u64) {
        if used == 0 {
            return;
        }
        self.refill();
        self.available -= used as f64;
    }

    /// How long to wait until the budget is no longer overdrawn.
    fn wait_needed(&mut self) -> Option<Duration> {
        // A refill only adds: a budget not overdrawn needs no clock read (asked per event).
        if self.available >= 0.0 {
            return None;
        }
        self.refill();
        if self.available >= 0.0 || self.per_ms <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(
            -self.available / self.per_ms / 1_000.0,
        ))
    }
}

/// Sleeps for `duration`, or forever when there is none.
async fn call_sandbox(
    sandbox: &mut Sandbox<StoreCapabilities>,
    call: &Call,
) -> Result<(), InvocationError> {
    match call {
        Call::Event(event) => sandbox.handle_event(event).await,
        Call::Task(task) => sandbox.run_task(task).await,
    }
}

/// A spawned task that is aborted when its handle is dropped (the store stopped mid-call).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

/// Writes an invocation's emitted events to the outbox, inside the transaction that commits
/// its work; answers what it staged.
fn stage(
    db: &GuestDb,
    emitted: Vec<(String, String)>,
    origin: impl Fn(usize) -> String,
    now: i64,
) -> Result<Vec<OutboxEntry>, InvocationError> {
    emitted
        .into_iter()
        .enumerate()
        .map(|(index, (event_type, payload))| {
            db.stage_emitted(origin(index), event_type, payload, now)
                .map_err(|err| storage_failure("could not stage an emitted event", &err))
        })
        .collect()
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

/// The failure of an invocation whose transaction SQLite rolled back (on error `cause`, when
/// known), though the plugin went on and answered success.
fn lost_transaction(cause: Option<&storehost_runtime::SqlError>, cpu_ms: u64) -> InvocationError {
    let (reason, detail) = match cause {
        Some(err) => guest_db::breach_of(err, cpu_ms).unwrap_or((
            FailureReason::HostError,
            format!("a SQL statement failed: {}", err.message),
        )),
        None => (FailureReason::HostError, "a write failed".to_owned()),
    };
    InvocationError::new(
        reason,
        format!(
            "{detail}; SQLite rolled back the invocation's transaction on it, so nothing of the invocation was kept, though the plugin went on and answered success"
        ),
    )
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
