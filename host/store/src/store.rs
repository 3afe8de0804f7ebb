//! The handle to one running store: append, read, query, dead letters, status, stop.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota as GovernorQuota, RateLimiter};
use serde::Serialize;
use storehost_runtime::{
    FailureReason, FilesUsage, InvocationError, Plugin, Runtime, SandboxFiles,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::actor::{Actor, Command, DbFile, Query};
use crate::capabilities::StoreCapabilities;
use crate::dir::{self, StoreDir};
use crate::event_log::{EventLog, LoggedEvent, NewEvent};
use crate::guest_db::{self, DeadLetter, GuestDb};
use crate::id::StoreId;
use crate::metrics::StoreMetrics;
use crate::quotas::{MIN_INGRESS_BURST, Quotas};
use crate::sqlite::{self, Durability};

/// A compiled plugin, as stores use it.
pub type StorePlugin = Plugin<StoreCapabilities>;
/// The runtime, as stores use it.
pub type StoreRuntime = Runtime<StoreCapabilities>;

/// How a failing event is retried before it is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included).
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub base_delay: Duration,
    /// The longest delay between attempts.
    pub max_delay: Duration,
    /// Consecutive failed invocations that open the store's circuit (state `backoff`).
    pub breaker_failures: u32,
    /// How long the circuit stays open the first time; doubles for each further event or
    /// task that fails as its probe, without a success in between (a retry of the same one
    /// rests as long again).
    pub breaker_base_delay: Duration,
    /// The longest the circuit stays open.
    pub breaker_max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            breaker_failures: 10,
            breaker_base_delay: Duration::from_secs(1),
            breaker_max_delay: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        doubling(self.base_delay, attempt, self.max_delay)
    }

    /// How long the circuit stays open after `trip` escalations in a row (1-based).
    pub fn breaker_delay(&self, trip: u32) -> Duration {
        doubling(self.breaker_base_delay, trip, self.breaker_max_delay)
    }
}

/// `base`, doubled `n - 1` times, at most `max`.
fn doubling(base: Duration, n: u32, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(30));
    base.saturating_mul(factor).min(max)
}

/// What the control plane decides for one store; can change while it runs.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The plugin's name (as configured).
    pub plugin_name: String,
    /// The compiled plugin.
    pub plugin: Arc<StorePlugin>,
    /// The store's quotas.
    pub quotas: Quotas,
    /// Key/values the plugin reads through `config`.
    pub config: BTreeMap<String, String>,
    /// How failing events are retried.
    pub retry: RetryPolicy,
    /// Where the plugin's `llm` calls go (`None`: they fail as `not-configured`).
    pub llm: Option<Arc<dyn crate::LlmBackend>>,
    /// Scheduled executions missed by less than this run once after downtime; older ones are
    /// recorded as `missed`.
    pub task_catch_up: std::time::Duration,
    /// A store with nothing to do for this long hibernates: it drops its sandbox (freeing its
    /// pool slot and linear memory) and its SQLite caches until the next event, query or due
    /// task wakes it. A store paused, or waiting (a budget, a retry, an open circuit), this
    /// long drops its sandbox and caches too, keeping its state (a paused one then closes its
    /// files after `close_files_after`). `None`: never.
    pub idle_timeout: Option<std::time::Duration>,
    /// A hibernated store idle this much longer also closes its SQLite files (it then holds
    /// no file descriptor and about 7–9 KB); its next wake opens them again.
    pub close_files_after: std::time::Duration,
    /// The store opens paused (it was paused when the host last stopped): it accepts events
    /// and processes none until it is resumed. Read when the store opens; a live change of
    /// settings leaves the pause as it is.
    pub start_paused: bool,
}

/// The default catch-up window of scheduled tasks (SPEC §4.6).
pub const DEFAULT_TASK_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(600);

/// Everything that can go wrong talking to a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (I/O, corruption, ...).
    #[error("storage error: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The store's directory could not be prepared.
    #[error("the store's directory could not be prepared: {0}")]
    Directory(#[from] std::io::Error),
    /// The plugin failed the invocation.
    #[error("{0}")]
    Invocation(#[from] InvocationError),
    /// The store is stopping or stopped.
    #[error("store {0} is stopped")]
    Stopped(StoreId),
    /// Too many events are waiting to be processed.
    #[error(
        "store {store} has {pending} events waiting (max_pending_events = {max}); {}",
        if *paused { "it is paused, so they wait until it is resumed; resume it, then retry" } else { "retry later" }
    )]
    QueueFull {
        /// The store.
        store: StoreId,
        /// Events accepted but not yet processed.
        pending: u64,
        /// The quota.
        max: u64,
        /// Whether the store is paused (its queue drains only once it is resumed).
        paused: bool,
    },
    /// The store's ingress rate (`events_per_second` + `burst`, or `ingress_bytes_per_second`)
    /// is used up.
    #[error(
        "store {store} accepts {rate}; retry in {} s",
        whole_seconds(*retry_after_ms)
    )]
    RateLimited {
        /// The store.
        store: StoreId,
        /// The rate that is used up, in words: "1000 events per second (burst 2000)".
        rate: String,
        /// When a retry can succeed.
        retry_after_ms: u64,
    },
    /// The store's event log holds its `event_log` quota: nothing more is kept until the quota
    /// is raised (the log keeps every event, so waiting frees no room).
    #[error(
        "store {store}'s event log holds {held} bytes and its event_log quota is {quota} bytes, so these {bytes} bytes of events were not kept; raise the store's event_log quota (PUT /v1/stores/{store} with {{\"quotas\":{{\"event_log\":…}}}} or in its config), then send them again"
    )]
    EventLogFull {
        /// The store.
        store: StoreId,
        /// What the log holds on disk.
        held: u64,
        /// The quota.
        quota: u64,
        /// The events refused (their types, payloads and keys).
        bytes: u64,
    },
    /// More events in one request than the store's burst: no wait lets them in together.
    #[error(
        "store {store} takes at most {burst} events at once (its burst), and this request has {events}; split it into batches of {burst} or fewer"
    )]
    BatchOverBurst {
        /// The store.
        store: StoreId,
        /// The events in the request.
        events: usize,
        /// The burst.
        burst: u32,
    },
    /// More bytes of events in one request than the store's byte burst: no wait lets them in.
    #[error(
        "store {store} takes at most {burst} bytes of events at once (twice its ingress_bytes_per_second quota, and at least 1 MiB), and this request has {bytes}; split it into smaller batches, or raise the store's ingress_bytes_per_second quota"
    )]
    BytesOverBurst {
        /// The store.
        store: StoreId,
        /// The bytes of events in the request.
        bytes: u64,
        /// The byte burst.
        burst: u64,
    },
    /// No dead letter with that `seq`.
    #[error("store {store} has no dead letter with seq {seq}")]
    NoDeadLetter {
        /// The store.
        store: StoreId,
        /// The seq asked for.
        seq: u64,
    },
    /// The store used its CPU budget (`cpu_ms_per_minute`): a query or a retry waits until it
    /// refills.
    #[error(
        "store {store} used its CPU budget ({per_minute_ms} ms per minute); retry in {} s",
        whole_seconds(*retry_after_ms)
    )]
    CpuBudgetUsed {
        /// The store.
        store: StoreId,
        /// Its `cpu_ms_per_minute`.
        per_minute_ms: u64,
        /// When the budget is no longer overdrawn.
        retry_after_ms: u64,
    },
    /// The dead letter with that `seq` was already retried successfully.
    #[error(
        "store {store}'s dead letter {seq} was already retried successfully (resolved at {resolved_at_ms} ms since the epoch); nothing to retry"
    )]
    DeadLetterResolved {
        /// The store.
        store: StoreId,
        /// The seq asked for.
        seq: u64,
        /// When its retry succeeded, in ms since the Unix epoch.
        resolved_at_ms: i64,
    },
    /// A blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The lifecycle state of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreState {
    /// Processing events as they come.
    Running,
    /// An event failed; waiting before the next attempt.
    Retrying,
    /// Paused by an operator: events are accepted but not processed.
    Paused,
    /// Its CPU budget per minute, or its budget of emitted events (`events_per_second` +
    /// `burst`) or of their bytes (`ingress_bytes_per_second`), is used up; it waits for the
    /// budget to refill.
    Throttled,
    /// Too many consecutive failures opened its circuit; it waits, then probes.
    Backoff,
    /// Stopped; no longer processing.
    Stopped,
    /// Idle for `idle_timeout`: its sandbox is dropped; the next event, query or due task wakes
    /// it transparently.
    Hibernated,
}

/// The last failure of a store.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastFailure {
    /// Classified reason.
    pub reason: String,
    /// What happened.
    pub message: String,
    /// The event it happened on.
    pub seq: Option<u64>,
    /// When (ms since the Unix epoch).
    pub at: i64,
}

/// Usage counters of a store.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// CPU time used by the guest, in ms.
    pub cpu_ms: u64,
    /// Fuel used (0 unless fuel is metered).
    pub fuel: u64,
    /// Peak linear memory of the guest, in bytes.
    pub memory_peak: u64,
    /// Size of the store's database (`store.db`, which the `disk` quota caps), in bytes.
    pub disk_bytes: u64,
    /// Size of the store's event log (`events.db`, as of the last commit; not in any quota:
    /// the log keeps every event), in bytes.
    pub event_log_bytes: u64,
    /// What the store's files directory holds, as its `files` quota counts it (bytes, plus
    /// 4 KiB per file, directory and link).
    pub files_bytes: u64,
    /// Page cache the store's database holds in the host's memory, in bytes (at most the
    /// `db_cache` quota; as of the last commit, 0 once the store hibernates).
    pub db_cache_bytes: u64,
}

/// What `GET /v1/stores/{id}` shows about a store's processing.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    /// Lifecycle state.
    pub state: StoreState,
    /// The newest `seq` in the log.
    pub head: u64,
    /// The last `seq` whose effects are committed.
    pub cursor: u64,
    /// Events accepted but not yet processed.
    pub lag: u64,
    /// Events processed successfully since the host started.
    pub events_processed: u64,
    /// Events dead-lettered since the host started.
    pub dead_lettered: u64,
    /// Failed invocations since the host started.
    pub errors_count: u64,
    /// Failed invocations by reason.
    pub failures_by_reason: BTreeMap<String, u64>,
    /// The last failure, if any.
    pub last_failure: Option<LastFailure>,
    /// When the store last processed or answered anything (ms since the Unix epoch).
    pub last_activity: Option<i64>,
    /// Resource usage.
    pub usage: UsageReport,
    /// Until when the store waits (circuit open, or its CPU or emitted events' budget used
    /// up), ms since the Unix epoch.
    pub waiting_until: Option<i64>,
    /// Scheduled task executions completed since the host started.
    pub tasks_executed: u64,
    /// When the store's next scheduled task is due (ms since the Unix epoch).
    pub next_task_due_at: Option<i64>,
}

/// State shared by a store's handle and its actor.
pub(crate) struct Shared {
    pub(crate) id: StoreId,
    pub(crate) log: EventLog,
    pub(crate) head: watch::Sender<u64>,
    pub(crate) cursor: watch::Sender<u64>,
    pub(crate) status: Mutex<StoreStatus>,
    pub(crate) max_pending: std::sync::atomic::AtomicU64,
    /// The store's `event_log` quota, in bytes.
    pub(crate) event_log_quota: std::sync::atomic::AtomicU64,
    pub(crate) metrics: Arc<StoreMetrics>,
    ingress: Mutex<Ingress>,
    reader: sqlite::LazyReader,
    /// Backups under way that hold the plugin's emitted events back from the log
    /// ([`Store::hold_emits`]); the actor drains the outbox only while it is 0, under this lock.
    pub(crate) emits_held: Mutex<u32>,
    /// Told when the log or the shared reader opens a file again after the store closed its
    /// files: a read, or an append that wakes nothing (the store paused, a duplicate key), so
    /// the actor wakes to close them again in time.
    pub(crate) files_opened: Arc<tokio::sync::Notify>,
    /// How many lines its guest may log, over all its calls and sandboxes.
    pub(crate) guest_log: Arc<crate::capabilities::GuestLogLimit>,
    /// Event streams and long-polls open on the store ([`Store::follow`]).
    followers: std::sync::atomic::AtomicUsize,
    /// The store's answers its clients have not read yet, in KiB ([`Store::unread_answers`]).
    unread_answers: Arc<tokio::sync::Semaphore>,
}

/// How many event streams and long-polls one store serves at once: each holds a connection
/// and up to a page of the log in the host's memory, and one store token opening 1,024
/// streams took every connection the host serves (and 1.4 GB of memory unread).
pub const MAX_FOLLOWERS: usize = 64;

/// How much of its answers (query answers, pages of its log, dead letters) a store's clients
/// may leave unread at once, in KiB: an answer stays in the host's memory until its client
/// reads it, and a client reading slowly enough keeps its connection for as long as it likes.
pub const MAX_UNREAD_ANSWER_KIB: usize = 64 << 10;

/// A place among a store's followers ([`Store::follow`]), given back when dropped.
pub struct Follower(Arc<Shared>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0
            .followers
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Shared {
    /// Shrinks the caches of the store's shared connections (hibernation); they stay open.
    pub(crate) fn release_memory(&self) {
        self.log.release_memory();
        self.reader.shrink();
    }

    /// Takes the store's shared readers and the log writer out (a long hibernation when
    /// `idle`, or a stop), each database's reader before its writer, for the caller to close;
    /// each opens again on its next use.
    pub(crate) fn take_connections(&self, idle: bool) -> Vec<rusqlite::Connection> {
        let mut connections = self.log.take_connections(idle);
        connections.extend(self.reader.take());
        connections
    }

    /// Whether the event log or the shared reader of `store.db` holds a file open (each
    /// opens again on its next use, after the store closed its files).
    pub(crate) fn holds_files(&self) -> bool {
        self.log.holds_files() || self.reader.is_open()
    }

    pub(crate) fn status(&self) -> std::sync::MutexGuard<'_, StoreStatus> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn record_failure(&self, err: &InvocationError, seq: Option<u64>) {
        let mut status = self.status();
        status.errors_count += 1;
        *status
            .failures_by_reason
            .entry(err.reason.as_str().to_owned())
            .or_default() += 1;
        status.last_failure = Some(LastFailure {
            reason: err.reason.as_str().to_owned(),
            message: err.message.clone(),
            seq,
            at: sqlite::now_ms(),
        });
    }
}

/// A running store. Cheap to clone; every clone talks to the same actor.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    actor: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    dir: StoreDir,
}

/// A hold on a store's emitted events ([`Store::hold_emits`]).
pub struct EmitsHeld {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

impl Drop for EmitsHeld {
    fn drop(&mut self) {
        let mut held = self
            .shared
            .emits_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *held = held.saturating_sub(1);
        if *held == 0 {
            drop(held);
            // A full inbox has commands ahead, each of which drains first.
            let _ = self.commands.try_send(Command::DrainEmitted);
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens store `id` under `data_dir` (creating its files on first use) and starts its actor
    /// on the current tokio runtime. Events accepted before a crash are processed from where
    /// its cursor stopped.
    pub fn open(
        id: StoreId,
        data_dir: &Path,
        durability: Durability,
        settings: StoreSettings,
    ) -> Result<Self, StoreError> {
        Self::open_with_spares(id, data_dir, durability, settings, None)
    }

    /// [`Store::open`], taking a new store's directory from `spares` when one is ready (a
    /// rename instead of creating its files).
    pub fn open_with_spares(
        id: StoreId,
        data_dir: &Path,
        durability: Durability,
        settings: StoreSettings,
        spares: Option<&crate::spare::SpareStores>,
    ) -> Result<Self, StoreError> {
        let (dir, spare) = dir::prepare(data_dir, &id, spares)?;
        // Files it had before: the host restarting, a failed store started again, a restore.
        let existing = spare.is_none() && dir.events_db().exists();
        let (log, db) = match spare {
            Some(open) => (
                EventLog::adopt(&dir.events_db(), durability, open.events)?,
                GuestDb::adopt(
                    &dir.store_db(),
                    durability,
                    open.store,
                    settings.quotas.disk,
                )?,
            ),
            None => (
                EventLog::open(&dir.events_db(), durability)?,
                GuestDb::open(&dir.store_db(), durability, settings.quotas.disk)?,
            ),
        };
        db.set_cache_quota(settings.quotas.db_cache)?;
        let cursor = db.cursor()?;
        let head = log.head()?;
        // Counted once, when the store starts: from then on the sandboxes count what they add
        // and remove.
        let files = SandboxFiles {
            usage: Arc::new(FilesUsage::measure(&dir.files, settings.quotas.files)?),
            dir: dir.files.clone(),
        };
        let status = StoreStatus {
            state: if settings.start_paused {
                StoreState::Paused
            } else {
                StoreState::Running
            },
            head,
            cursor,
            lag: head.saturating_sub(cursor),
            events_processed: 0,
            dead_lettered: 0,
            errors_count: 0,
            failures_by_reason: BTreeMap::new(),
            last_failure: None,
            last_activity: None,
            usage: UsageReport {
                files_bytes: files.usage.used(),
                // What it holds before its first commit (a restored or restarted store).
                disk_bytes: db.size_bytes().unwrap_or(0),
                ..UsageReport::default()
            },
            waiting_until: None,
            tasks_executed: 0,
            next_task_due_at: None,
        };
        let files_opened = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(Shared {
            id: id.clone(),
            log: log.signalling(files_opened.clone()),
            head: watch::Sender::new(head),
            cursor: watch::Sender::new(cursor),
            status: Mutex::new(status),
            max_pending: settings.quotas.max_pending_events.into(),
            event_log_quota: settings.quotas.event_log.into(),
            metrics: Arc::default(),
            ingress: Mutex::new(Ingress::new(&settings.quotas)),
            reader: sqlite::LazyReader::new(&dir.store_db()).signalling(files_opened.clone()),
            emits_held: Mutex::new(0),
            files_opened,
            guest_log: Arc::default(),
            followers: std::sync::atomic::AtomicUsize::new(0),
            unread_answers: Arc::new(tokio::sync::Semaphore::new(MAX_UNREAD_ANSWER_KIB)),
        });
        let (commands, inbox) = mpsc::channel(64);
        // Stores run apart from the API's threads (see `Runtime::guest_executor`).
        let executor = settings.plugin.guest_executor().clone();
        let actor = Box::new(Actor::new(
            shared.clone(),
            db,
            DbFile {
                path: dir.store_db(),
                durability,
            },
            files,
            settings,
            inbox,
            cursor,
        ));
        let span = tracing::info_span!("store", store_id = %id);
        let handle = executor.spawn(tracing::Instrument::instrument(actor.run(existing), span));
        Ok(Self {
            shared,
            commands,
            actor: Arc::new(tokio::sync::Mutex::new(Some(handle))),
            dir,
        })
    }

    /// The store's id.
    pub fn id(&self) -> &StoreId {
        &self.shared.id
    }

    /// The store's directory.
    pub fn dir(&self) -> &StoreDir {
        &self.dir
    }

    /// Holds the events the plugin emits back from the log until the returned guard drops:
    /// they wait in the outbox (committed with the work that emitted them), and the store
    /// keeps processing. When the last hold is let go the actor moves them into the log. A
    /// backup copies `store.db` and then `events.db` under a hold, so the log copy has no
    /// event emitted by work the `store.db` copy has not seen (see [`crate::backup`]).
    pub fn hold_emits(&self) -> EmitsHeld {
        *self
            .shared
            .emits_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        EmitsHeld {
            shared: self.shared.clone(),
            commands: self.commands.clone(),
        }
    }

    /// The store's counters for `GET /metrics` (shared: the task scheduler and the `llm`
    /// capability bump theirs through it).
    pub fn metrics(&self) -> &Arc<StoreMetrics> {
        &self.shared.metrics
    }

    /// Resolves once the store's actor has stopped (removed, or the host shuts down).
    pub async fn stopped(&self) {
        self.commands.closed().await;
    }

    /// Appends events from `source`; durable (survives `kill -9`) when this returns.
    pub async fn append(
        &self,
        events: Vec<NewEvent>,
        source: &str,
    ) -> Result<Vec<u64>, StoreError> {
        if self.commands.is_closed() {
            return Err(StoreError::Stopped(self.shared.id.clone()));
        }
        let bytes = events.iter().map(event_bytes).sum();
        if let Err(refused) = self
            .log_room(bytes)
            .and_then(|()| self.admit_all(events.len(), bytes))
        {
            // A client retrying events the log already holds (its first request timed out,
            // say) gets their seqs, not a 429 for events that were accepted.
            return match self.already_appended(&events).await {
                Some(seqs) => Ok(seqs),
                None => Err(refused),
            };
        }
        if self.shared.log.is_closed() && !crate::open_files::ran_out_lately() {
            // The append opens the log again: the actor wakes meanwhile (see
            // `Actor::wake_early`). When its inbox is full, the event wakes it as before. Not
            // while the host is short of open files: the actor's opens could take the ones
            // the append needs, and a store woken for an append that then failed would hold
            // its files until it slept again, one more store for every retry.
            let _ = self.commands.try_send(Command::Wake);
        }
        let shared = self.shared.clone();
        let source = source.to_owned();
        let seqs = blocking(move || {
            let seqs = shared.log.append(events, &source)?;
            shared.metrics.add_events_accepted(seqs.len() as u64);
            // The actor learns of the events here, as soon as they are kept: also when the
            // caller has gone away meanwhile (a request dropped mid-append used to leave its
            // event unprocessed until another arrived), and without waiting for the hop back
            // to the async worker that answers the request.
            if let Some(&newest) = seqs.iter().max() {
                shared.head.send_if_modified(|head| {
                    let grew = newest > *head;
                    *head = (*head).max(newest);
                    grew
                });
            }
            Ok::<_, rusqlite::Error>(seqs)
        })
        .await??;
        Ok(seqs)
    }

    /// Refuses `bytes` more of events when the log would pass its `event_log` quota. Checked
    /// before each append, so appends at the same moment may pass it by their own events.
    fn log_room(&self, bytes: u64) -> Result<(), StoreError> {
        let quota = self
            .shared
            .event_log_quota
            .load(std::sync::atomic::Ordering::Relaxed);
        let held = self.shared.log.file_bytes();
        if held.saturating_add(bytes) > quota {
            return Err(StoreError::EventLogFull {
                store: self.shared.id.clone(),
                held,
                quota,
                bytes,
            });
        }
        Ok(())
    }

    /// Admits `count` more events of `bytes` in all: within the queue's depth and the ingress
    /// rates (taken from them).
    fn admit_all(&self, count: usize, bytes: u64) -> Result<(), StoreError> {
        // A full queue is refused before any rate is taken: a client retrying a paused store's
        // full queue used up the rate its first accepted request then needed.
        let pending = self.head().saturating_sub(*self.shared.cursor.borrow());
        let max = self
            .shared
            .max_pending
            .load(std::sync::atomic::Ordering::Relaxed);
        if pending.saturating_add(count as u64) > max {
            return Err(StoreError::QueueFull {
                store: self.shared.id.clone(),
                pending,
                max,
                paused: self.shared.status().state == StoreState::Paused,
            });
        }
        self.admit(count, bytes)
    }

    /// The seqs of `events` when each carries an idempotency key the log already holds.
    async fn already_appended(&self, events: &[NewEvent]) -> Option<Vec<u64>> {
        let keys: Vec<String> = events
            .iter()
            .map(|event| event.idempotency_key.clone())
            .collect::<Option<_>>()?;
        if keys.is_empty() {
            return None;
        }
        let shared = self.shared.clone();
        let found = blocking(move || {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            shared.log.seqs_of_keys(&keys)
        })
        .await;
        match found {
            Ok(Ok(seqs)) => seqs,
            Ok(Err(err)) => {
                tracing::warn!("could not look up idempotency keys: {err}");
                None
            }
            Err(_) => None,
        }
    }

    /// Takes `count` events of `bytes` in all from the store's ingress rates, or says when to
    /// retry. What no wait lets in is refused before anything is taken; then the bytes go
    /// first, so events refused for their bytes take nothing of the event rate (events refused
    /// for their count have taken their bytes, as a client over its rate would).
    fn admit(&self, count: usize, bytes: u64) -> Result<(), StoreError> {
        let ingress = self
            .shared
            .ingress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(n) = u32::try_from(count).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        if n.get() > ingress.burst {
            return Err(StoreError::BatchOverBurst {
                store: self.shared.id.clone(),
                events: count,
                burst: ingress.burst,
            });
        }
        if bytes > ingress.bytes_burst {
            return Err(StoreError::BytesOverBurst {
                store: self.shared.id.clone(),
                bytes,
                burst: ingress.bytes_burst,
            });
        }
        if bytes > 0
            && let Ok(Err(not_until)) = ingress.bytes.check_n(byte_cells(bytes, ingress.byte_cell))
        {
            return Err(self.rate_limited(
                &ingress,
                not_until,
                format!(
                    "{} bytes of events per second (burst {} bytes)",
                    ingress.bytes_per_second, ingress.bytes_burst
                ),
            ));
        }
        match ingress.limiter.check_n(n) {
            Ok(Err(not_until)) => Err(self.rate_limited(
                &ingress,
                not_until,
                format!(
                    "{} events per second (burst {})",
                    ingress.per_second, ingress.burst
                ),
            )),
            Ok(Ok(())) | Err(_) => Ok(()),
        }
    }

    /// The refusal of a request over the `rate` described, retried once `not_until` allows.
    fn rate_limited(
        &self,
        ingress: &Ingress,
        not_until: governor::NotUntil<governor::clock::QuantaInstant>,
        rate: String,
    ) -> StoreError {
        let wait = not_until.wait_time_from(ingress.limiter.clock().now());
        StoreError::RateLimited {
            store: self.shared.id.clone(),
            rate,
            retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// Up to `limit` events after `after`; when none are there yet and `wait` is set, waits up to
    /// that long for one to arrive.
    pub async fn read(
        &self,
        after: u64,
        limit: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        self.read_within(after, limit, crate::event_log::MAX_READ_BYTES, wait)
            .await
    }

    /// [`Store::read`] with pages of at most `max_bytes` of payloads (one event at least).
    pub async fn read_within(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        if let Some(wait) = wait {
            let mut head = self.shared.head.subscribe();
            // A store stopping (removed, restored) ends the wait: its head moves no more.
            tokio::select! {
                _ = tokio::time::timeout(wait, head.wait_for(|&head| head > after)) => {}
                () = self.stopped() => {}
            }
        }
        self.ensure_running()?;
        // The end of the log is in memory: no thread hop for a follower keeping up.
        if let Some(events) = self.shared.log.read_recent_within(after, limit, max_bytes) {
            return Ok(events);
        }
        let shared = self.shared.clone();
        let events =
            blocking(move || shared.log.read_after_within(after, limit, max_bytes)).await??;
        self.ensure_running().map(|()| events)
    }

    /// [`StoreError::Stopped`] once the store's actor has stopped. A read opens the store's
    /// files by path when they are closed: one reaching a stopped store may find another
    /// store's files there (the id removed and created again meanwhile), so what it read is
    /// not answered. Before, a long-poll that outlived its store's removal answered the new
    /// store's events to the old one's client.
    fn ensure_running(&self) -> Result<(), StoreError> {
        if self.commands.is_closed() {
            Err(StoreError::Stopped(self.shared.id.clone()))
        } else {
            Ok(())
        }
    }

    /// The newest `seq` in the log.
    pub fn head(&self) -> u64 {
        *self.shared.head.borrow()
    }

    /// A place among the store's followers (an event stream, a long-poll), held until it is
    /// dropped; `None` while [`MAX_FOLLOWERS`] are open.
    pub fn follow(&self) -> Option<Follower> {
        use std::sync::atomic::Ordering;
        self.shared
            .followers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < MAX_FOLLOWERS).then_some(open + 1)
            })
            .ok()?;
        Some(Follower(self.shared.clone()))
    }

    /// The store's allowance of answers its clients have not read yet, in KiB (see
    /// [`MAX_UNREAD_ANSWER_KIB`]): the API holds permits of it until an answer is written.
    pub fn unread_answers(&self) -> Arc<tokio::sync::Semaphore> {
        self.shared.unread_answers.clone()
    }

    /// The history the store's event log holds: a restore starts another (see
    /// [`crate::event_log::LogEpoch`]).
    pub fn log_epoch(&self) -> crate::event_log::LogEpoch {
        self.shared.log.epoch()
    }

    /// Waits until every event up to `seq` is processed (or dead-lettered), up to `timeout`.
    /// Returns whether it got there.
    pub async fn wait_processed(&self, seq: u64, timeout: Duration) -> bool {
        let mut cursor = self.shared.cursor.subscribe();
        tokio::time::timeout(timeout, cursor.wait_for(|&c| c >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Calls the plugin's `query` export (read-only); `request_id` marks its log lines.
    pub async fn query(
        &self,
        name: &str,
        args: &str,
        request_id: Option<&str>,
    ) -> Result<String, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Query(Box::new(Query {
            name: name.to_owned(),
            args: args.to_owned(),
            request_id: request_id.map(str::to_owned),
            reply,
        })))
        .await?;
        answer
            .await
            .map_err(|_| StoreError::Stopped(self.shared.id.clone()))?
    }

    /// Every dead letter of the store, oldest first.
    pub async fn dead_letters(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.ensure_running()?;
        let shared = self.shared.clone();
        let letters = blocking(move || {
            shared
                .reader
                .with(|conn| guest_db::list_dead_letters(conn, after, limit))
        })
        .await??;
        self.ensure_running().map(|()| letters)
    }

    /// The store's scheduled tasks and its latest executions.
    pub async fn tasks(&self) -> Result<crate::schedules::TasksView, StoreError> {
        self.ensure_running()?;
        let shared = self.shared.clone();
        let tasks = blocking(move || {
            shared
                .reader
                .with(|conn| crate::schedules::view(conn, crate::schedules::RECENT_RUNS))
        })
        .await??;
        self.ensure_running().map(|()| tasks)
    }

    /// Delivers a dead-lettered event to the plugin once more; on success its effects commit
    /// and the dead letter is marked resolved.
    pub async fn retry_dead_letter(&self, seq: u64) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::RetryDeadLetter { seq, reply }).await?;
        answer
            .await
            .map_err(|_| StoreError::Stopped(self.shared.id.clone()))?
    }

    /// Applies new settings (plugin, quotas, config) after the in-flight invocation.
    pub async fn update(&self, settings: StoreSettings) -> Result<(), StoreError> {
        {
            let mut ingress = self
                .shared
                .ingress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !ingress.follows(&settings.quotas) {
                // Only a changed quota refills the bucket (a reload's pass over every store
                // changes nothing here).
                *ingress = Ingress::new(&settings.quotas);
            }
        }
        self.shared.max_pending.store(
            settings.quotas.max_pending_events,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.shared.event_log_quota.store(
            settings.quotas.event_log,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.send(Command::Update(Box::new(settings))).await
    }

    /// Stops or restarts processing (events are still accepted while paused).
    pub async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        self.send(Command::SetPaused(paused)).await
    }

    /// A snapshot of the store's status.
    pub fn status(&self) -> StoreStatus {
        let mut status = self.shared.status().clone();
        // Measured now, the WAL included (where the latest events are): appends change it
        // whether or not the store processes them (a paused store's log grows too).
        status.usage.event_log_bytes = self.shared.log.file_bytes();
        status.head = self.head();
        status.cursor = *self.shared.cursor.borrow();
        status.lag = status.head.saturating_sub(status.cursor);
        status
    }

    /// Stops the actor after its in-flight invocation and waits for it to finish.
    pub async fn stop(&self) {
        let _ = self.commands.send(Command::Stop).await;
        if let Some(handle) = self.actor.lock().await.take() {
            let _ = handle.await;
        }
        self.shared.status().state = StoreState::Stopped;
    }

    async fn send(&self, command: Command) -> Result<(), StoreError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| StoreError::Stopped(self.shared.id.clone()))
    }
}

/// What an event takes of the `event_log` quota as it arrives: its type, payload and key (the
/// log's own bookkeeping comes on top, and shows in its size afterwards).
fn event_bytes(event: &NewEvent) -> u64 {
    let key = event.idempotency_key.as_ref().map_or(0, String::len);
    (event.event_type.len() + event.payload.len() + key) as u64
}

/// The one clock every store's ingress limiter reads. Making a clock costs tens of
/// microseconds (it probes the CPU with `cpuid`, a VM exit under a hypervisor), reading one a
/// few nanoseconds: neither a new store nor a refused request makes one.
pub(crate) static RATE_CLOCK: std::sync::LazyLock<DefaultClock> =
    std::sync::LazyLock::new(DefaultClock::default);

/// A store's ingress rate limiters (events and their bytes) with the quotas they were built
/// from.
struct Ingress {
    limiter: DefaultDirectRateLimiter,
    per_second: u32,
    burst: u32,
    /// Counts bytes, in cells of `byte_cell` bytes.
    bytes: DefaultDirectRateLimiter,
    bytes_per_second: u64,
    bytes_burst: u64,
    byte_cell: u64,
}

/// A store's event rate as its limiters take it: `events_per_second` (at least 1), and a
/// burst of at least that rate. The ingress limiter and the budget of emitted events share it.
pub(crate) fn event_rate(quotas: &Quotas) -> (NonZeroU32, NonZeroU32) {
    let per_second = NonZeroU32::new(quotas.events_per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(quotas.burst.max(quotas.events_per_second)).unwrap_or(per_second);
    (per_second, burst)
}

/// A store's byte rate and burst as its limiters take them, in bytes:
/// `ingress_bytes_per_second` between 1 KiB and [`MAX_BYTE_RATE`], and a burst of twice that,
/// at least [`MIN_INGRESS_BURST`].
pub(crate) fn byte_rate(quotas: &Quotas) -> (u64, u64) {
    let per_second = quotas.ingress_bytes_per_second.clamp(1024, MAX_BYTE_RATE);
    (
        per_second,
        per_second.saturating_mul(2).max(MIN_INGRESS_BURST),
    )
}

/// The fastest byte rate the limiter keeps; a higher quota is as good as none.
const MAX_BYTE_RATE: u64 = 1 << 40;

/// The bytes one cell of a byte limiter of `per_second` stands for: one, or as many as keep
/// its cells at most a million a second. governor refills a cell every whole nanosecond count
/// (`1e9 / cells a second`, rounded down), so a cell a byte let 600 MB/s through as 1 GB/s;
/// a cell refilled every microsecond or slower is off by 0.1% at most.
fn byte_cell(per_second: u64) -> u64 {
    (per_second / 1_000_000).max(1)
}

/// `bytes` in cells of `cell` bytes, rounded up, as the byte limiter takes them.
fn byte_cells(bytes: u64, cell: u64) -> NonZeroU32 {
    NonZeroU32::new(u32::try_from(bytes.div_ceil(cell)).unwrap_or(u32::MAX))
        .unwrap_or(NonZeroU32::MIN)
}

impl Ingress {
    fn new(quotas: &Quotas) -> Self {
        let (per_second, burst) = event_rate(quotas);
        let (bytes_per_second, bytes_burst) = byte_rate(quotas);
        let cell = byte_cell(bytes_per_second);
        let bytes_quota = GovernorQuota::per_second(byte_cells(bytes_per_second, cell))
            .allow_burst(byte_cells(bytes_burst, cell));
        Self {
            limiter: RateLimiter::direct_with_clock(
                GovernorQuota::per_second(per_second).allow_burst(burst),
                RATE_CLOCK.clone(),
            ),
            per_second: per_second.get(),
            burst: burst.get(),
            bytes: RateLimiter::direct_with_clock(bytes_quota, RATE_CLOCK.clone()),
            bytes_per_second,
            bytes_burst,
            byte_cell: cell,
        }
    }

    /// Whether these limiters were built from `quotas`' rates (only a changed quota refills
    /// them).
    fn follows(&self, quotas: &Quotas) -> bool {
        let (per_second, burst) = event_rate(quotas);
        (
            self.per_second,
            self.burst,
            (self.bytes_per_second, self.bytes_burst),
        ) == (per_second.get(), burst.get(), byte_rate(quotas))
    }
}

/// Runs SQLite work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| StoreError::Internal(format!("blocking task failed: {err}")))
}

impl StoreError {
    /// The classified failure reason, when the error is an invocation failure.
    pub fn failure_reason(&self) -> Option<FailureReason> {
        match self {
            StoreError::Invocation(err) => Some(err.reason),
            _ => None,
        }
    }

    /// The whole seconds to wait before retrying, when the error asks for a wait: what its
    /// message says, and so what an HTTP answer's `Retry-After` must say.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            StoreError::RateLimited { retry_after_ms, .. }
            | StoreError::CpuBudgetUsed { retry_after_ms, .. } => {
                Some(whole_seconds(*retry_after_ms))
            }
            _ => None,
        }
    }

    /// Whether the store's own files could not be written because their disk is full (the
    /// filesystem, not the `disk` quota, which guest writes meet as `disk_full` failures).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Storage(err) => is_disk_full(err),
            StoreError::Directory(err) => is_storage_full(err),
            _ => false,
        }
    }

    /// Whether a file could not be opened because the host had as many open as it may
    /// (`EMFILE`, or the system's `ENFILE`): the store's directory, or one of its databases
    /// ([`cannot_open_for_want_of_files`]).
    pub fn is_out_of_files(&self) -> bool {
        match self {
            StoreError::Directory(err) => is_out_of_files(err),
            StoreError::Storage(err) => cannot_open_for_want_of_files(err),
            _ => false,
        }
    }
}

/// Whether SQLite could not open a database file because the host had as many files open as
/// it may: it says only "unable to open database file", so one that failed so lately counts
/// (see [`crate::open_files::ran_out_lately`]).
pub fn cannot_open_for_want_of_files(err: &rusqlite::Error) -> bool {
    err.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen)
        && crate::open_files::ran_out_lately()
}

/// Whether an I/O error says this process (`EMFILE`) or the system (`ENFILE`) has as many
/// files open as it may.
pub fn is_out_of_files(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

/// `ms` rounded up to whole seconds, at least one: `Retry-After` takes whole seconds, and a
/// client waiting less than asked would be refused again.
fn whole_seconds(ms: u64) -> u64 {
    ms.div_ceil(1_000).max(1)
}

/// Whether SQLite failed because the filesystem (or a quota) had no room left.
pub fn is_disk_full(err: &rusqlite::Error) -> bool {
    err.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Whether an I/O error says the filesystem, or the user's quota on it, is full.
pub fn is_storage_full(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte limiter lets through the rate its quota names, within 0.2%, from the least
    /// rate to the fastest kept: governor refills whole nanoseconds a cell, and a cell a byte
    /// let 600 MB/s through as 1 GB/s.
    #[test]
    fn the_byte_limiter_keeps_the_rate_its_quota_names() {
        for rate in [64 << 10, 16 << 20, 100 << 20, 600_000_000, 1 << 40] {
            let cell = byte_cell(rate);
            let interval = GovernorQuota::per_second(byte_cells(rate, cell))
                .replenish_interval()
                .as_nanos() as f64;
            let kept = cell as f64 * 1e9 / interval;
            let off = (kept - rate as f64).abs() / rate as f64;
            assert!(off < 0.002, "{rate} B/s is kept as {kept:.0} B/s");
        }
    }
}
