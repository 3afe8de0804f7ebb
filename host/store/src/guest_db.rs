//! The store's own database (`store.db`): the plugin's tables beside the host's `_host_*` tables,
//! behind a hardened connection.
//!
//! One file holds both so that the plugin's writes, the events it emits (an outbox) and the
//! store's cursor commit in one SQLite transaction. The guest reaches this connection only
//! through the `sql` capability while the authorizer is in a guest mode, which refuses ATTACH,
//! pragmas that write, extensions, virtual tables, temp objects, transaction control and every
//! access to the host's tables.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, config::DbConfig, params};
use storehost_runtime::{FailureReason, Rows, SqlError, Value};

use crate::quotas::DEFAULT_DB_CACHE;
use crate::sql_memory::{STATEMENT_HEAP, StatementHeap};
use crate::sqlite::{self, Durability};
use crate::vfs::{TempBudget, TempScope};

/// Prefix of every host-owned table; guests may not touch them.
pub const HOST_TABLE_PREFIX: &str = "_host";

/// SQLite's result code for an authorizer refusal.
/// How far past its disk quota a store's database may grow for the host's records of what
/// became of the tenant's work (see [`GuestDb::past_quota`]): each record's error is cut to a
/// few KB, so this is room for many.
pub const HOST_RESERVE_BYTES: u64 = 1 << 20;

const SQLITE_AUTH: i32 = 23;
/// SQLite's result code for "database or disk is full".
const SQLITE_FULL: i32 = 13;
/// SQLite's result code for an interrupted statement.
const SQLITE_INTERRUPT: i32 = 9;
/// SQLite's result code for "string or blob too big".
const SQLITE_TOOBIG: i32 = 18;
/// SQLite's result code for an allocation that failed (see [`StatementHeap`]).
const SQLITE_NOMEM: i32 = 7;
/// SQLite's "callback requested query abort": what a guest statement gets once the
/// invocation's transaction is gone.
const SQLITE_ABORT: i32 = 4;

/// Prefixed to guest SQL before it reaches the statement cache, so a guest that sends the
/// exact text of a host statement gets its own (authorized) compilation, never the host's.
const GUEST_STATEMENT_PREFIX: &str = "/*guest*/ ";

/// The largest result a guest query may return through the host, in bytes of the host's
/// memory (see [`value_size`] and [`ROW_SIZE`]).
const MAX_RESULT_BYTES: usize = 32 << 20;

/// What a row of a result costs the host beyond its values: its `Vec` and the allocator's
/// bookkeeping of the allocation behind it.
const ROW_SIZE: usize = std::mem::size_of::<Vec<Value>>() + 16;

const MODE_HOST: u8 = 0;
const MODE_GUEST_WRITE: u8 = 1;
const MODE_GUEST_READ: u8 = 2;

/// The host's tables in `store.db`.
pub(crate) const SCHEMA: sqlite::Schema =
    sqlite::Schema::of(&[HOST_SCHEMA, crate::schedules::SCHEMA]);

const HOST_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _host_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO _host_cursor (id, last_seq) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS _host_outbox (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _host_dead_letters (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'dead',
    resolved_at INTEGER
);
";

/// A dead-lettered event, as recorded in the store's database.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The event's `seq`.
    pub seq: u64,
    /// The event's type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The classified reason of the last failure.
    pub reason: String,
    /// The last failure's message.
    pub error: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// When it was dead-lettered (ms since the Unix epoch).
    pub failed_at: i64,
    /// `dead`, or `resolved` once a retry succeeded.
    pub status: String,
    /// When a retry succeeded.
    pub resolved_at: Option<i64>,
}

/// An event the plugin emitted, waiting in the outbox for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Row id in the outbox.
    pub id: i64,
    /// Unique origin of the emission (`<cause seq>:<index>`), so a drain is idempotent.
    pub origin: String,
    /// Event type.
    pub event_type: String,
    /// JSON payload.
    pub payload: String,
    /// When it was emitted.
    pub at: i64,
}

impl OutboxEntry {
    /// What it takes of the store's quotas counted in bytes (`event_log`,
    /// `ingress_bytes_per_second`): its type and payload.
    pub fn bytes(&self) -> u64 {
        (self.event_type.len() + self.payload.len()) as u64
    }
}

/// Why a capability could not write the host's tables during a guest call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostWriteRefused {
    /// The call is a query, which is read-only.
    ReadOnly,
    /// The invocation's transaction was rolled back by an earlier error.
    RolledBack,
    /// The savepoint that keeps the invocation's writes apart could not be opened.
    NoSavepoint,
}

impl std::fmt::Display for HostWriteRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ReadOnly => "a query is read-only",
            Self::RolledBack => {
                "this invocation's transaction was rolled back by an earlier error; nothing more is written in it"
            }
            Self::NoSavepoint => {
                "the store's database could not open this invocation's savepoint; nothing is written"
            }
        })
    }
}

/// The store's database connection, shared by the store's actor and its guest's `sql` capability.
pub struct GuestDb {
    conn: Connection,
    mode: Arc<AtomicU8>,
    deadline: Arc<std::sync::Mutex<Option<Instant>>>,
    /// How long one guest statement may run (the call's CPU quota); set in guest mode.
    statement_budget: std::cell::Cell<Option<Duration>>,
    /// What the guest's call has left of its CPU time, as its sandbox last said: a statement
    /// that only reads may run that long (see [`GuestDb::limit_statements`]).
    call_left: std::cell::Cell<Option<Duration>>,
    /// Whether the guest entered inside a host transaction: its statements then run only
    /// while that transaction lasts (see [`GuestDb::prepare_guest`]).
    guest_in_transaction: std::cell::Cell<bool>,
    /// The guest statement's error on which SQLite rolled back the transaction the guest
    /// entered in, since the guest entered (see [`GuestDb::take_lost_transaction`]).
    lost_transaction: std::cell::RefCell<Option<SqlError>>,
    /// The savepoint of the invocation in progress (see [`GuestDb::savepoint`]).
    savepoint: std::cell::Cell<Savepoint>,
    page_size: u64,
    /// The page cache the connection may keep, in bytes (the `db_cache` quota).
    cache_quota: std::cell::Cell<u64>,
    /// Set by the authorizer when it compiles a guest statement that creates or alters a
    /// table (see [`GuestDb::guest_statement`]).
    compiled_table_change: Arc<AtomicBool>,
    /// What the connection's temporary files (sorts of a guest statement that spill to disk,
    /// the transaction's savepoint journal) may hold: the disk quota again.
    temp: Arc<TempBudget>,
}

/// Where an invocation's savepoint is: asked for when the invocation starts, opened by the
/// first statement that could write in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoint {
    None,
    Wanted,
    Open,
}

impl std::fmt::Debug for GuestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDb").finish_non_exhaustive()
    }
}

impl GuestDb {
    /// Opens `store.db`, hardens the connection and creates the host's tables.
    pub fn open(path: &Path, durability: Durability, disk_quota: u64) -> rusqlite::Result<Self> {
        Self::harden(sqlite::open(path, durability, &SCHEMA)?, disk_quota)
    }

    /// `store.db` at `path` through `conn`: a spare's connection, made with the host's tables
    /// before the spare's directory became this store's (see [`sqlite::adopt`]).
    pub(crate) fn adopt(
        path: &Path,
        durability: Durability,
        conn: Connection,
        disk_quota: u64,
    ) -> rusqlite::Result<Self> {
        Self::harden(sqlite::adopt(conn, path, durability)?, disk_quota)
    }

    /// Hardens `conn` for guest SQL and caps it at `disk_quota`.
    fn harden(mut conn: Connection, disk_quota: u64) -> rusqlite::Result<Self> {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, 8_000_000)?;
        conn.set_limit(Limit::SQLITE_LIMIT_SQL_LENGTH, 100_000)?;
        conn.set_limit(Limit::SQLITE_LIMIT_COLUMN, 200)?;
        conn.set_limit(Limit::SQLITE_LIMIT_EXPR_DEPTH, 100)?;
        conn.set_limit(Limit::SQLITE_LIMIT_COMPOUND_SELECT, 10)?;
        conn.set_limit(Limit::SQLITE_LIMIT_VDBE_OP, 25_000)?;
        conn.set_limit(Limit::SQLITE_LIMIT_FUNCTION_ARG, 8)?;
        conn.set_limit(Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 50)?;
        conn.set_limit(Limit::SQLITE_LIMIT_VARIABLE_NUMBER, 500)?;
        conn.set_limit(Limit::SQLITE_LIMIT_TRIGGER_DEPTH, 10)?;
        // The sorter's worker threads would open temporary files off the thread that counts
        // them (see `vfs::TempScope`).
        conn.set_limit(Limit::SQLITE_LIMIT_WORKER_THREADS, 0)?;
        let page_size: u64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;

        let mode = Arc::new(AtomicU8::new(MODE_HOST));
        let auth_mode = mode.clone();
        let compiled_table_change = Arc::new(AtomicBool::new(false));
        let table_change = compiled_table_change.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            let mode = auth_mode.load(Ordering::Relaxed);
            if mode != MODE_HOST
                && matches!(
                    ctx.action,
                    AuthAction::CreateTable { .. } | AuthAction::AlterTable { .. }
                )
            {
                table_change.store(true, Ordering::Relaxed);
            }
            authorize(mode, &ctx)
        }))?;
        let deadline: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let handler_deadline = deadline.clone();
        conn.progress_handler(
            10_000,
            Some(move || {
                handler_deadline
                    .lock()
                    .ok()
                    .and_then(|d| *d)
                    .is_some_and(|d| Instant::now() > d)
            }),
        )?;
        let db = Self {
            conn,
            mode,
            deadline,
            statement_budget: std::cell::Cell::new(None),
            call_left: std::cell::Cell::new(None),
            guest_in_transaction: std::cell::Cell::new(false),
            lost_transaction: std::cell::RefCell::new(None),
            savepoint: std::cell::Cell::new(Savepoint::None),
            page_size,
            // What SQLite gives a new connection (`cache_size = -2000`), so a store on the
            // default quota costs no pragma when it opens.
            cache_quota: std::cell::Cell::new(DEFAULT_DB_CACHE),
            compiled_table_change,
            temp: TempBudget::new(disk_quota),
        };
        db.set_disk_quota(disk_quota)?;
        Ok(db)
    }

    /// Whether the connection's temporary files hold more than half of what they may: the
    /// open transaction's savepoint journal keeps its size until the transaction ends, so a
    /// batch of events commits then, and the next event's sorts and spills keep the rest.
    pub(crate) fn temporary_files_half_full(&self) -> bool {
        self.temp.used() > self.temp.limit() / 2
    }

    /// Caps the database at `bytes` (rounded down to whole pages, never below its current size),
    /// and the connection's temporary files (see [`GuestDb::guest_statement`]) at as many again.
    pub fn set_disk_quota(&self, bytes: u64) -> rusqlite::Result<()> {
        self.temp.set_limit(bytes);
        let pages = (bytes / self.page_size.max(1)).max(1);
        self.conn
            .pragma_update(None, "max_page_count", pages.to_string())
    }

    /// Runs `write`, the host's own record of what became of the tenant's work (a dead letter,
    /// a failed or missed task), with the database allowed [`HOST_RESERVE_BYTES`] past its
    /// disk quota. A store whose plugin filled its quota still records why its events fail
    /// and moves on: before, the dead letter's insert failed for want of a page, the event
    /// went back to the head of the queue, and the store retried it for ever, every event
    /// behind it (a cleanup among them) waiting. The quota is set back after (SQLite keeps it
    /// at the size reached, never below), so the plugin gains nothing.
    pub fn past_quota<T>(
        &self,
        write: impl FnOnce(&Self) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let quota: u64 = self
            .conn
            .pragma_query_value(None, "max_page_count", |row| row.get(0))?;
        let reserve = HOST_RESERVE_BYTES / self.page_size.max(1);
        self.conn
            .pragma_update(None, "max_page_count", (quota + reserve).to_string())?;
        let written = write(self);
        if let Err(err) = self
            .conn
            .pragma_update(None, "max_page_count", quota.to_string())
        {
            tracing::error!("could not set the disk quota back after a host record: {err}");
        }
        written
    }

    /// Lets the connection keep at most `bytes` of page cache (the `db_cache` quota): a
    /// cache larger than that drops its least recently used pages at once, and a page read
    /// again later comes from the file (or the OS's cache of it).
    pub fn set_cache_quota(&self, bytes: u64) -> rusqlite::Result<()> {
        if self.cache_quota.get() != bytes {
            sqlite::cap_page_cache_bytes(&self.conn, bytes)?;
            self.cache_quota.set(bytes);
        }
        Ok(())
    }

    /// The bytes of page cache the connection holds now.
    pub fn cache_bytes(&self) -> rusqlite::Result<u64> {
        sqlite::cache_bytes(&self.conn)
    }

    /// The database's size in bytes.
    pub fn size_bytes(&self) -> rusqlite::Result<u64> {
        let pages: u64 = self
            .conn
            .pragma_query_value(None, "page_count", |row| row.get(0))?;
        Ok(pages * self.page_size)
    }

    /// The `seq` of the last event whose effects are committed.
    pub fn cursor(&self) -> rusqlite::Result<u64> {
        self.conn.query_row(
            "SELECT last_seq FROM _host_cursor WHERE id = 1",
            [],
            |row| row.get(0),
        )
    }

    /// Begins the transaction one invocation's effects go into.
    pub fn begin(&self) -> rusqlite::Result<()> {
        // A transaction starts without savepoints, whatever an interrupted invocation left.
        self.savepoint.set(Savepoint::None);
        self.run("BEGIN IMMEDIATE")
    }

    /// Begins a read-only transaction for a query.
    pub fn begin_read(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch("BEGIN DEFERRED")
    }

    /// Commits the current transaction.
    pub fn commit(&self) -> rusqlite::Result<()> {
        self.run("COMMIT")?;
        self.savepoint.set(Savepoint::None);
        Ok(())
    }

    /// Asks for a savepoint inside the current transaction, so one invocation's work can be
    /// undone without the work committed with it (group commit). It opens with the first
    /// statement that could write — the guest's SQL, a capability's write, an emitted event —
    /// so an invocation that writes nothing runs no SQL for it (the two statements were a
    /// fifth of the actor's time under a steady stream to a plugin that does nothing).
    pub(crate) fn savepoint(&self) {
        self.savepoint.set(Savepoint::Wanted);
    }

    /// Opens the savepoint asked for, if it is not open yet (as the host: the guest may not
    /// control transactions).
    fn open_savepoint(&self) -> rusqlite::Result<()> {
        if self.savepoint.get() == Savepoint::Wanted {
            let mode = self.mode.swap(MODE_HOST, Ordering::Relaxed);
            let opened = self.run("SAVEPOINT invocation");
            self.mode.store(mode, Ordering::Relaxed);
            opened?;
            self.savepoint.set(Savepoint::Open);
        }
        Ok(())
    }

    /// Keeps the work since [`GuestDb::savepoint`] in the transaction.
    pub(crate) fn release_savepoint(&self) -> rusqlite::Result<()> {
        if self.savepoint.get() == Savepoint::Open {
            self.run("RELEASE invocation")?;
        }
        self.savepoint.set(Savepoint::None);
        Ok(())
    }

    /// Runs one of the host's transaction statements through the connection's statement cache:
    /// `SAVEPOINT` and `RELEASE` run around every invocation, and compiling them each time
    /// (`execute_batch`) cost 0.50 µs per invocation against 0.30 µs cached (measured here).
    fn run(&self, sql: &'static str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(drop)
    }

    /// Undoes the work since [`GuestDb::savepoint`]; answers whether the transaction is still
    /// open. It is not when SQLite rolled all of it back itself: an interrupted write (a
    /// statement over its CPU budget) or an I/O error ends the whole transaction.
    pub(crate) fn rollback_to_savepoint(&self) -> bool {
        let savepoint = self.savepoint.replace(Savepoint::None);
        if self.conn.is_autocommit() {
            return false;
        }
        if savepoint != Savepoint::Open {
            // Nothing was written since it was asked for.
            return true;
        }
        match self
            .conn
            .execute_batch("ROLLBACK TO invocation; RELEASE invocation")
        {
            Ok(()) => true,
            Err(err) => {
                tracing::error!("rollback to the savepoint failed: {err}");
                self.rollback();
                false
            }
        }
    }

    /// Rolls back the current transaction, if one is open.
    pub fn rollback(&self) {
        self.savepoint.set(Savepoint::None);
        if !self.conn.is_autocommit()
            && let Err(err) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!("rollback failed: {err}");
        }
    }

    /// Lets guest SQL run (`writable` or read-only); each statement may run for `budget`
    /// (interrupted past it by the progress handler).
    pub(crate) fn enter_guest(&self, writable: bool, budget: Duration) {
        self.statement_budget.set(Some(budget));
        self.call_left.set(None);
        self.guest_in_transaction.set(!self.conn.is_autocommit());
        self.lost_transaction.take();
        let mode = if writable {
            MODE_GUEST_WRITE
        } else {
            MODE_GUEST_READ
        };
        self.mode.store(mode, Ordering::Relaxed);
    }

    /// What the guest's call has left of its CPU time: the guest's next statements that only
    /// read may run that long. One that writes may still run for the call's whole quota (the
    /// call is then charged and stopped after it): SQLite rolls back the whole transaction
    /// when it interrupts a write, and with it the batch of other events' work, so a write
    /// that began near the end of its call's time would cost them all. Nothing changes
    /// outside a guest call.
    pub(crate) fn limit_statements(&self, left: Duration) {
        if self.statement_budget.get().is_some() {
            self.call_left.set(Some(left.max(Duration::from_millis(1))));
        }
    }

    /// Whether SQLite rolled back the transaction the guest entered in (an interrupted write,
    /// memory or disk running out, an I/O error), during a guest statement or a capability's
    /// write. The invocation then failed, whatever the guest answered: the host's own writes
    /// after it (its progress, what it emitted) would each commit on their own. Asked before
    /// [`GuestDb::leave_guest`].
    pub(crate) fn transaction_lost(&self) -> bool {
        self.guest_in_transaction.get() && self.conn.is_autocommit()
    }

    /// Records `cause()` as what ended the transaction the guest entered in, if it just ended
    /// and nothing ended it before.
    fn note_if_lost(&self, cause: impl FnOnce() -> SqlError) {
        if self.transaction_lost() && self.lost_transaction.borrow().is_none() {
            *self.lost_transaction.borrow_mut() = Some(cause());
        }
    }

    /// The error on which SQLite rolled back the transaction the guest entered in, if it did
    /// since the guest entered (see [`GuestDb::transaction_lost`]).
    pub(crate) fn take_lost_transaction(&self) -> Option<SqlError> {
        self.lost_transaction.take()
    }

    /// Back to host mode: the host's own statements run unrestricted.
    pub(crate) fn leave_guest(&self) {
        self.mode.store(MODE_HOST, Ordering::Relaxed);
        self.statement_budget.set(None);
        self.call_left.set(None);
        self.guest_in_transaction.set(false);
        self.set_deadline(None);
    }

    /// Runs host statements in the middle of a guest call (a capability that keeps its state in
    /// the host's tables, inside the invocation's transaction). Refused in read-only mode (a
    /// query), where capabilities must not write, and once the invocation's transaction is gone.
    pub(crate) fn as_host<T>(
        &self,
        write: impl FnOnce(&Connection) -> T,
    ) -> Result<T, HostWriteRefused> {
        let previous = self.mode.load(Ordering::Relaxed);
        if previous == MODE_GUEST_READ {
            return Err(HostWriteRefused::ReadOnly);
        }
        if self.guest_in_transaction.get() && self.conn.is_autocommit() {
            return Err(HostWriteRefused::RolledBack);
        }
        if let Err(err) = self.open_savepoint() {
            tracing::error!("could not open the invocation's savepoint: {err}");
            return Err(HostWriteRefused::NoSavepoint);
        }
        self.mode.store(MODE_HOST, Ordering::Relaxed);
        self.set_deadline(None);
        let result = write(&self.conn);
        self.mode.store(previous, Ordering::Relaxed);
        // A capability's write that failed (the disk full, an I/O error) can end the whole
        // transaction too.
        self.note_if_lost(|| {
            let (code, message) = sqlite::last_error(&self.conn);
            SqlError { code, message }
        });
        Ok(result)
    }

    /// Reads host tables in the middle of a guest call, also in read-only mode.
    pub(crate) fn as_host_reading<T>(&self, read: impl FnOnce(&Connection) -> T) -> T {
        let previous = self.mode.load(Ordering::Relaxed);
        self.mode.store(MODE_HOST, Ordering::Relaxed);
        self.set_deadline(None);
        let result = read(&self.conn);
        self.mode.store(previous, Ordering::Relaxed);
        result
    }

    fn set_deadline(&self, deadline: Option<Instant>) {
        if let Ok(mut d) = self.deadline.lock() {
            *d = deadline;
        }
    }

    /// Ends the guest statement's time `left` from now, if it would end later.
    fn tighten_deadline(&self, left: Duration) {
        let by = Instant::now() + left;
        if let Ok(mut deadline) = self.deadline.lock()
            && deadline.is_some_and(|d| d > by)
        {
            *deadline = Some(by);
        }
    }

    /// Starts the clock of one guest statement.
    fn start_statement(&self) {
        let budget = self.statement_budget.get();
        self.set_deadline(budget.map(|b| Instant::now() + b));
    }

    /// Stages an emitted event in the outbox (inside the current transaction); returns the
    /// entry it wrote.
    pub fn stage_emitted(
        &self,
        origin: String,
        event_type: String,
        payload: String,
        at: i64,
    ) -> rusqlite::Result<OutboxEntry> {
        self.open_savepoint()?;
        self.conn
            .prepare_cached(
                "INSERT INTO _host_outbox (origin, type, payload, at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![origin, event_type, payload, at])?;
        Ok(OutboxEntry {
            id: self.conn.last_insert_rowid(),
            origin,
            event_type,
            payload,
            at,
        })
    }

    /// Moves the cursor to `seq` (inside the current transaction).
    pub fn advance_cursor(&self, seq: u64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("UPDATE _host_cursor SET last_seq = ?1 WHERE id = 1 AND last_seq < ?1")?
            .execute([seq])?;
        Ok(())
    }

    /// The outbox, oldest first.
    pub fn outbox(&self) -> rusqlite::Result<Vec<OutboxEntry>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, origin, type, payload, at FROM _host_outbox ORDER BY id")?;
        let rows = stmt.query_map([], |row| {
            Ok(OutboxEntry {
                id: row.get(0)?,
                origin: row.get(1)?,
                event_type: row.get(2)?,
                payload: row.get(3)?,
                at: row.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Removes outbox entries up to `last_id` once they are in the log.
    pub fn clear_outbox(&self, last_id: i64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM _host_outbox WHERE id <= ?1")?
            .execute([last_id])?;
        Ok(())
    }

    /// Records a dead letter (inside the current transaction).
    pub fn record_dead_letter(
        &self,
        seq: u64,
        event_type: &str,
        reason: FailureReason,
        error: &str,
        attempts: u32,
    ) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO _host_dead_letters (seq, type, reason, error, attempts, failed_at, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'dead')
                 ON CONFLICT (seq) DO UPDATE SET reason = ?3, error = ?4,
                    attempts = _host_dead_letters.attempts + ?5, failed_at = ?6, status = 'dead'",
            )?
            .execute(params![seq, event_type, reason.as_str(), error, attempts, sqlite::now_ms()])?;
        Ok(())
    }

    /// Marks a dead letter resolved (inside the transaction of its successful retry).
    pub fn resolve_dead_letter(&self, seq: u64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE _host_dead_letters SET status = 'resolved', resolved_at = ?2,
                    attempts = attempts + 1 WHERE seq = ?1",
            )?
            .execute(params![seq, sqlite::now_ms()])?;
        Ok(())
    }

    /// One dead letter.
    pub fn dead_letter(&self, seq: u64) -> rusqlite::Result<Option<DeadLetter>> {
        // SQLite's integers stop at i64::MAX, and so do the seqs it keeps.
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        self.conn
            .query_row(
                "SELECT seq, type, reason, error, attempts, failed_at, status, resolved_at
                 FROM _host_dead_letters WHERE seq = ?1",
                [seq],
                dead_letter_from_row,
            )
            .optional()
    }

    /// Runs a guest statement that returns no rows.
    pub fn guest_execute(&self, statement: &str, params: Vec<Value>) -> Result<u64, SqlError> {
        self.guest_statement(statement, |stmt| {
            let params = params.into_iter().map(to_sqlite).collect::<Vec<_>>();
            let changed = stmt
                .execute(rusqlite::params_from_iter(params))
                .map_err(sql_error)?;
            Ok(changed as u64)
        })
    }

    /// Runs a guest statement and returns its rows.
    pub fn guest_query(&self, statement: &str, params: Vec<Value>) -> Result<Rows, SqlError> {
        self.guest_statement(statement, |stmt| Self::rows_of(stmt, params))
    }

    /// Prepares guest `statement` and runs it with `run`. The temporary files it spills to
    /// (sorts, groupings, `DISTINCT`) with the transaction's savepoint journal may hold as
    /// much as the disk quota, and past it the statement fails as `SQLITE_FULL` (see
    /// [`crate::vfs::TempScope`]).
    fn guest_statement<T>(
        &self,
        statement: &str,
        run: impl FnOnce(&mut rusqlite::CachedStatement<'_>) -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        let _temp = TempScope::enter(&self.temp);
        self.temp.take_refused();
        // The cache may still grow to its quota; what it holds already is in the count.
        let cache = sqlite::cache_bytes(&self.conn).unwrap_or(0);
        let heap = self
            .cache_quota
            .get()
            .saturating_sub(cache)
            .saturating_add(STATEMENT_HEAP);
        let result = {
            let _heap = StatementHeap::enter(heap);
            StatementHeap::take_refused();
            self.guest_statement_in_scope(statement, run)
        };
        if let Err(err) = &result {
            self.note_if_lost(|| err.clone());
        }
        match result {
            Err(err) if err.code == SQLITE_NOMEM && StatementHeap::take_refused() => {
                Err(SqlError {
                    code: SQLITE_NOMEM,
                    message: format!(
                        "out of memory: the statement needed more than {heap} bytes of the host's \
                     memory ({STATEMENT_HEAP} bytes beyond the store's page cache), the most \
                     one statement may take; nothing of it was kept. Select fewer or smaller \
                     values per row"
                    ),
                })
            }
            Err(err) if err.code == SQLITE_FULL && self.temp.take_refused() => Err(SqlError {
                code: SQLITE_FULL,
                message: format!(
                    "the store's temporary files (a sort, grouping or DISTINCT too big for \
                     memory, spilled to disk, and the savepoint journal of the pages this \
                     transaction's statements changed) would pass {} bytes, the store's disk \
                     quota; add an index or a LIMIT, change fewer rows per event, or raise the \
                     quota",
                    self.temp.limit()
                ),
            }),
            result => result,
        }
    }

    /// The body of [`GuestDb::guest_statement`]. A statement that creates or alters a
    /// table runs inside a savepoint and is undone when the table it leaves references one of
    /// the host's tables: the host deletes from those, and SQLite would then scan the guest's
    /// table once per deleted row — CPU spent outside every quota. Such a statement is never
    /// kept in the cache, so the authorizer sees it each time it runs.
    fn guest_statement_in_scope<T>(
        &self,
        statement: &str,
        run: impl FnOnce(&mut rusqlite::CachedStatement<'_>) -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        self.compiled_table_change.store(false, Ordering::Relaxed);
        let mut stmt = self.prepare_guest(statement)?;
        if !self.compiled_table_change.swap(false, Ordering::Relaxed) {
            return run(&mut stmt);
        }
        self.as_host_batch("SAVEPOINT guest_table_change")
            .map_err(sql_error)?;
        let result = run(&mut stmt);
        stmt.discard();
        // The check fails closed: when it cannot finish (the statement's deadline passed,
        // which a guest with thousands of foreign keys can arrange), the change is undone too.
        let refusal = match &result {
            Ok(_) => match self.host_table_reference() {
                Ok(None) => None,
                Ok(Some((table, parent))) => Some(SqlError {
                    code: SQLITE_AUTH,
                    message: format!(
                        "not authorized: table {table} may not reference the host's table {parent}; nothing of this statement was kept"
                    ),
                }),
                Err(err) => Some(SqlError {
                    code: sql_error(err).code,
                    message:
                        "the tables' foreign keys could not be checked within the statement's \
                              CPU budget; nothing of this statement was kept (declare fewer \
                              foreign keys)"
                            .into(),
                }),
            },
            Err(_) => None,
        };
        let end = if refusal.is_some() {
            "ROLLBACK TO guest_table_change; RELEASE guest_table_change"
        } else {
            "RELEASE guest_table_change"
        };
        // Undoing must not be interrupted by the deadline the check may have passed.
        self.without_deadline(|| self.as_host_batch(end))
            .map_err(sql_error)?;
        match refusal {
            Some(refusal) => Err(refusal),
            None => result,
        }
    }

    /// Runs `work` with the statement deadline lifted (host work that must finish).
    fn without_deadline<T>(&self, work: impl FnOnce() -> T) -> T {
        let lock = |d: &std::sync::Mutex<Option<Instant>>| {
            d.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        };
        let deadline = lock(&self.deadline);
        let result = work();
        *self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = deadline;
        result
    }

    /// Runs host SQL between guest statements (the guest's mode is restored after).
    fn as_host_batch(&self, sql: &str) -> rusqlite::Result<()> {
        let _host = TempScope::suspend();
        let _heap = StatementHeap::suspend();
        let previous = self.mode.swap(MODE_HOST, Ordering::Relaxed);
        let result = self.conn.execute_batch(sql);
        self.mode.store(previous, Ordering::Relaxed);
        result
    }

    /// A guest table whose foreign key names one of the host's tables: `(table, parent)`.
    fn host_table_reference(&self) -> rusqlite::Result<Option<(String, String)>> {
        let _host = TempScope::suspend();
        let _heap = StatementHeap::suspend();
        let previous = self.mode.swap(MODE_HOST, Ordering::Relaxed);
        let found = self
            .conn
            .prepare_cached(
                "SELECT m.name, f.\"table\" FROM sqlite_schema AS m, pragma_foreign_key_list(m.name) AS f
                 WHERE m.type = 'table' AND f.\"table\" LIKE '\\_host%' ESCAPE '\\' LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            });
        self.mode.store(previous, Ordering::Relaxed);
        found
    }

    fn rows_of(
        stmt: &mut rusqlite::CachedStatement<'_>,
        params: Vec<Value>,
    ) -> Result<Rows, SqlError> {
        let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let params = params.into_iter().map(to_sqlite).collect::<Vec<_>>();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(sql_error)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(sql_error)? {
            let mut values = Vec::with_capacity(columns.len());
            bytes += ROW_SIZE;
            // Counted value by value, so the host's copies of one wide row stop at the cap
            // (checked after the row, a row of 200 values of 8 MB each was copied whole). The
            // row SQLite computes is bounded by the statement's heap (`sql_memory`).
            for index in 0..columns.len() {
                let value = row.get_ref(index).map_err(sql_error)?;
                bytes += value_size(&value);
                if bytes > MAX_RESULT_BYTES {
                    return Err(SqlError {
                        code: SQLITE_TOOBIG,
                        message: format!(
                            "the query result is larger than {MAX_RESULT_BYTES} bytes; select fewer rows (LIMIT) or columns"
                        ),
                    });
                }
                values.push(from_sqlite(value));
            }
            out.push(values);
        }
        Ok(Rows { columns, rows: out })
    }

    /// Prepares a guest statement. Once the transaction the guest entered in has ended (SQLite
    /// rolls a transaction back in full when a write is interrupted past its CPU budget), no
    /// statement runs: each would commit on its own, outside the invocation's atomic unit.
    fn prepare_guest(&self, statement: &str) -> Result<rusqlite::CachedStatement<'_>, SqlError> {
        if self.guest_in_transaction.get() && self.conn.is_autocommit() {
            return Err(SqlError {
                code: SQLITE_ABORT,
                message: "this invocation's transaction was rolled back by an earlier error \
                          (a write over its CPU budget, a statement out of memory or past the \
                          temporary files' share of the disk quota, or an I/O error); no \
                          further statement runs in it, and none of its writes are kept"
                    .into(),
            });
        }
        self.open_savepoint().map_err(sql_error)?;
        self.start_statement();
        let prepared = self
            .conn
            .prepare_cached(&format!("{GUEST_STATEMENT_PREFIX}{statement}"))
            .map_err(sql_error)?;
        // The authorizer judges a statement when it is compiled; one compiled during an event
        // comes back from the cache without being judged again, so a query checks here that
        // it does not write.
        if prepared.readonly()
            && let Some(left) = self.call_left.get()
        {
            self.tighten_deadline(left);
        }
        if self.mode.load(Ordering::Relaxed) == MODE_GUEST_READ && !prepared.readonly() {
            return Err(SqlError {
                code: SQLITE_AUTH,
                message: "a query runs read-only: this statement would write; write from \
                          handle-event or run-task instead"
                    .into(),
            });
        }
        Ok(prepared)
    }

    /// Runs host SQL (used by tests and tools to inspect the plugin's tables).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Reads up to `limit` dead letters of events after `after`, in order, from a connection to
/// `store.db`.
pub(crate) fn list_dead_letters(
    conn: &Connection,
    after: u64,
    limit: usize,
) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, type, reason, error, attempts, failed_at, status, resolved_at
         FROM _host_dead_letters WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    // SQLite's integers stop at i64::MAX, and so do the seqs it keeps: none is after it.
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![after, limit], dead_letter_from_row)?;
    rows.collect()
}

fn dead_letter_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        seq: row.get(0)?,
        event_type: row.get(1)?,
        reason: row.get(2)?,
        error: row.get(3)?,
        attempts: row.get(4)?,
        failed_at: row.get(5)?,
        status: row.get(6)?,
        resolved_at: row.get(7)?,
    })
}

/// The breach a SQL error stands for, if any (so the invocation is classified by it).
pub(crate) fn breach_of(err: &SqlError, cpu_ms: u64) -> Option<(FailureReason, String)> {
    match err.code {
        SQLITE_FULL => Some((
            FailureReason::DiskFull,
            format!("the store reached its disk quota: {}", err.message),
        )),
        SQLITE_TOOBIG => Some((
            FailureReason::Memory,
            format!(
                "a value or result was too big for the store's limits: {}",
                err.message
            ),
        )),
        SQLITE_NOMEM => Some((
            FailureReason::Memory,
            format!("a SQL statement ran out of memory: {}", err.message),
        )),
        SQLITE_INTERRUPT => Some((
            FailureReason::CpuTime,
            format!(
                "a SQL statement ran past what was left of the call's CPU time ({cpu_ms} ms in all)"
            ),
        )),
        _ => None,
    }
}

/// Pragmas a guest may read (never write).
const READABLE_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "page_count",
    "page_size",
    "user_version",
    "data_version",
];

fn authorize(mode: u8, ctx: &AuthContext<'_>) -> Authorization {
    if mode == MODE_HOST {
        return Authorization::Allow;
    }
    if ctx.database_name.is_some_and(|db| db != "main") {
        return Authorization::Deny;
    }
    let read_only = mode == MODE_GUEST_READ;
    let host_table = |name: &str| {
        name.len() >= HOST_TABLE_PREFIX.len()
            && name[..HOST_TABLE_PREFIX.len()].eq_ignore_ascii_case(HOST_TABLE_PREFIX)
    };
    let writable_table = |name: &str| {
        // sqlite_* tables are written by CREATE/DROP themselves; defensive mode keeps direct
        // writes to the schema out.
        if read_only || host_table(name) {
            Authorization::Deny
        } else {
            Authorization::Allow
        }
    };
    match ctx.action {
        AuthAction::Select | AuthAction::Recursive => Authorization::Allow,
        AuthAction::Read { table_name, .. } => {
            if host_table(table_name) {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        AuthAction::Function { function_name } => {
            if function_name.eq_ignore_ascii_case("load_extension") {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let readable = READABLE_PRAGMAS
                .iter()
                .any(|p| p.eq_ignore_ascii_case(pragma_name));
            let is_query = pragma_value.is_none()
                || matches!(
                    pragma_name.to_ascii_lowercase().as_str(),
                    "table_info"
                        | "table_xinfo"
                        | "index_list"
                        | "index_info"
                        | "index_xinfo"
                        | "foreign_key_list"
                );
            if readable && is_query {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        // The host's names are the host's for every kind of object: an index or trigger of a
        // guest table named `_host_…` would stand in for one the host makes `IF NOT EXISTS`,
        // or block a table a later host adds (tables and indexes share one namespace).
        AuthAction::CreateIndex { index_name, .. } if host_table(index_name) => Authorization::Deny,
        AuthAction::CreateTrigger { trigger_name, .. } if host_table(trigger_name) => {
            Authorization::Deny
        }
        AuthAction::Insert { table_name }
        | AuthAction::Delete { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::CreateTable { table_name }
        | AuthAction::DropTable { table_name }
        | AuthAction::CreateIndex { table_name, .. }
        | AuthAction::DropIndex { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
        | AuthAction::DropTrigger { table_name, .. }
        | AuthAction::AlterTable { table_name, .. }
        | AuthAction::Analyze { table_name } => writable_table(table_name),
        AuthAction::CreateView { view_name } | AuthAction::DropView { view_name } => {
            writable_table(view_name)
        }
        AuthAction::Reindex { .. } => {
            if read_only {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        // Transactions belong to the host; attaching, virtual tables and temp objects are out.
        _ => Authorization::Deny,
    }
}

fn sql_error(err: rusqlite::Error) -> SqlError {
    match &err {
        rusqlite::Error::SqliteFailure(code, message) => {
            let primary = code.extended_code & 0xff;
            let message = match (primary, message) {
                (SQLITE_AUTH, _) => format!(
                    "not authorized: guest SQL cannot ATTACH, change pragmas, load extensions, \
                     use virtual tables or temp objects, control transactions, or touch the \
                     host's tables ({HOST_TABLE_PREFIX}*){}",
                    message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ),
                // Only the statement deadline interrupts a guest statement.
                (SQLITE_INTERRUPT, _) => "interrupted: the statement ran out of what its call \
                                          had left of its CPU time (cpu_ms_per_call); nothing \
                                          of it was kept"
                    .to_owned(),
                (_, Some(m)) => m.clone(),
                (_, None) => err.to_string(),
            };
            SqlError {
                code: primary,
                message,
            }
        }
        rusqlite::Error::MultipleStatement => SqlError {
            code: 1,
            message: "one statement per call: split the SQL into separate execute/query calls"
                .into(),
        },
        rusqlite::Error::ExecuteReturnedResults => SqlError {
            code: 1,
            message: "this statement returns rows: use query instead of execute".into(),
        },
        other => SqlError {
            code: 1,
            message: other.to_string(),
        },
    }
}

fn to_sqlite(value: Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(i),
        Value::Real(f) => SqlValue::Real(f),
        Value::Text(s) => SqlValue::Text(s),
        Value::Blob(b) => SqlValue::Blob(b),
    }
}

fn from_sqlite(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

/// What one value of a result costs the host: its bytes and the `Value` holding them (a
/// million rows of a `NULL` were counted as 8 MB and took about 100 MB).
fn value_size(value: &ValueRef<'_>) -> usize {
    let held = std::mem::size_of::<Value>();
    match value {
        ValueRef::Text(t) | ValueRef::Blob(t) => t.len() + held,
        _ => held,
    }
}

/// How long one guest statement may run: the call's CPU quota.
pub(crate) fn statement_budget(cpu_ms: u64) -> Duration {
    Duration::from_millis(cpu_ms.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, GuestDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = GuestDb::open(&dir.path().join("store.db"), Durability::Process, 1 << 30).unwrap();
        (dir, db)
    }

    fn guest(db: &GuestDb, sql: &str) -> Result<u64, SqlError> {
        db.enter_guest(true, statement_budget(1_000));
        let result = db.guest_execute(sql, vec![]);
        db.leave_guest();
        result
    }

    #[test]
    fn guest_sql_works_on_its_own_tables() {
        let (_dir, db) = db();
        guest(
            &db,
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
        )
        .unwrap();
        assert_eq!(
            guest(&db, "INSERT INTO notes (body) VALUES ('hi')").unwrap(),
            1
        );
        db.enter_guest(false, statement_budget(1_000));
        let rows = db.guest_query("SELECT body FROM notes", vec![]).unwrap();
        db.leave_guest();
        assert!(
            matches!(rows.rows.as_slice(), [row] if matches!(row.as_slice(), [Value::Text(t)] if t == "hi"))
        );
    }

    #[test]
    fn guest_sql_cannot_escape_its_database() {
        let (dir, db) = db();
        let other = dir.path().join("other.db");
        let refused = [
            format!("ATTACH DATABASE '{}' AS other", other.display()),
            "PRAGMA journal_mode = DELETE".into(),
            "PRAGMA max_page_count = 100000000".into(),
            "PRAGMA writable_schema = ON".into(),
            "SELECT load_extension('/tmp/evil.so')".into(),
            "SELECT * FROM _host_cursor".into(),
            "UPDATE _host_cursor SET last_seq = 99".into(),
            "DELETE FROM _HOST_dead_letters".into(),
            "DROP TABLE _host_outbox".into(),
            "BEGIN".into(),
            "COMMIT".into(),
            "SAVEPOINT s1".into(),
            "CREATE TEMP TABLE t (x)".into(),
            "CREATE VIRTUAL TABLE v USING fts5(x)".into(),
        ];
        for sql in &refused {
            let err = guest(&db, sql).expect_err(sql);
            assert!(
                [SQLITE_AUTH, 1].contains(&err.code),
                "{sql}: unexpected error {err:?}"
            );
        }
        assert!(
            !other.exists(),
            "ATTACH must not create another database file"
        );
        assert_eq!(db.cursor().unwrap(), 0);
    }

    #[test]
    fn a_guest_table_cannot_reference_a_host_table() {
        // The host deletes from its tables; with a guest table referencing one, SQLite would
        // scan that table once per deleted row, in the host's time.
        let (_dir, db) = db();
        let create = "CREATE TABLE junk (x REFERENCES _host_outbox(origin))";
        for _ in 0..2 {
            // Twice: the second time must not slip through the statement cache.
            let err = guest(&db, create).expect_err(create);
            assert_eq!(err.code, SQLITE_AUTH, "{err:?}");
            assert!(err.message.contains("_host_outbox"), "{err:?}");
        }
        guest(&db, "CREATE TABLE junk2 (x)").unwrap();
        let alter = r#"ALTER TABLE junk2 ADD COLUMN o TEXT REFERENCES "_HOST_outbox"(origin)"#;
        let err = guest(&db, alter).expect_err(alter);
        assert_eq!(err.code, SQLITE_AUTH, "{err:?}");
        let constraint =
            "CREATE TABLE junk3 (x, FOREIGN KEY (x) REFERENCES [_host_dead_letters] (seq))";
        guest(&db, constraint).expect_err(constraint);

        db.enter_guest(false, statement_budget(1_000));
        let missing = db.guest_query("SELECT * FROM junk", vec![]).unwrap_err();
        let columns = db
            .guest_query("SELECT name FROM pragma_table_info('junk2')", vec![])
            .unwrap();
        db.leave_guest();
        assert!(missing.message.contains("no such table"), "{missing:?}");
        assert_eq!(columns.rows.len(), 1, "the column was not added");

        // Its own tables may reference each other.
        guest(&db, "CREATE TABLE parent (id INTEGER PRIMARY KEY)").unwrap();
        guest(&db, "CREATE TABLE child (p REFERENCES parent(id))").unwrap();
        guest(&db, "ALTER TABLE junk2 ADD COLUMN q REFERENCES parent(id)").unwrap();
    }

    #[test]
    fn sqlite_modules_no_store_can_use_are_not_built_in() {
        // FTS3/FTS5, R*Tree and dbstat register SQL functions on every connection; a guest
        // could call them although it cannot create their tables (`.cargo/config.toml`).
        let (_dir, db) = db();
        for function in [
            "SELECT fts5_source_id()",
            "SELECT fts3_tokenizer('simple')",
            "SELECT rtreecheck('t')",
            "SELECT soundex('x')",
        ] {
            db.enter_guest(false, statement_budget(1_000));
            let err = db.guest_query(function, vec![]).unwrap_err();
            db.leave_guest();
            assert!(
                err.message.contains("no such function"),
                "{function}: {err:?}"
            );
        }
        db.enter_guest(false, statement_budget(1_000));
        let err = db.guest_query("SELECT * FROM dbstat", vec![]).unwrap_err();
        db.leave_guest();
        assert!(err.message.contains("no such table"), "dbstat: {err:?}");
    }

    #[test]
    fn a_view_over_host_tables_cannot_be_read() {
        let (_dir, db) = db();
        let _ = guest(&db, "CREATE VIEW peek AS SELECT * FROM _host_cursor");
        db.enter_guest(false, statement_budget(1_000));
        let err = db.guest_query("SELECT * FROM peek", vec![]).unwrap_err();
        db.leave_guest();
        assert_eq!(err.code, SQLITE_AUTH, "{err:?}");
    }

    #[test]
    fn guest_text_equal_to_a_host_statement_is_still_authorized() {
        let (_dir, db) = db();
        db.begin().unwrap();
        db.advance_cursor(1).unwrap();
        db.commit().unwrap();
        let host_text = "UPDATE _host_cursor SET last_seq = ?1 WHERE id = 1 AND last_seq < ?1";
        db.enter_guest(true, statement_budget(1_000));
        let err = db
            .guest_execute(host_text, vec![Value::Integer(99)])
            .unwrap_err();
        db.leave_guest();
        assert_eq!(err.code, SQLITE_AUTH);
        assert_eq!(db.cursor().unwrap(), 1);
    }

    #[test]
    fn a_trigger_cannot_reach_host_tables_either() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        // Creating it may pass; firing it runs its body under the guest's authorizer.
        let _ = guest(
            &db,
            "CREATE TRIGGER sneaky AFTER INSERT ON t BEGIN UPDATE _host_cursor SET last_seq = 99; END",
        );
        let err = guest(&db, "INSERT INTO t VALUES (1)").unwrap_err();
        assert_eq!(err.code, SQLITE_AUTH, "{err:?}");
        assert_eq!(db.cursor().unwrap(), 0);
    }

    #[test]
    fn a_guest_cannot_take_a_host_name_for_an_index_or_trigger() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        for statement in [
            "CREATE INDEX _host_task_runs_next ON t (x)",
            "CREATE INDEX _HOST_later ON t (x)",
            "CREATE TRIGGER _host_t AFTER INSERT ON t BEGIN SELECT 1; END",
        ] {
            let err = guest(&db, statement).unwrap_err();
            assert_eq!(err.code, SQLITE_AUTH, "{statement}: {err:?}");
        }
        guest(&db, "CREATE INDEX t_x ON t (x)").unwrap();
    }

    #[test]
    fn read_mode_refuses_writes() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        db.enter_guest(false, statement_budget(1_000));
        let err = db
            .guest_execute("INSERT INTO t VALUES (1)", vec![])
            .unwrap_err();
        db.leave_guest();
        assert_eq!(err.code, SQLITE_AUTH);
    }

    #[test]
    fn disk_quota_and_runaway_sql_are_classified() {
        let (_dir, db) = db();
        db.set_disk_quota(64 << 10).unwrap();
        guest(&db, "CREATE TABLE big (b BLOB)").unwrap();
        let err = guest(&db, "INSERT INTO big VALUES (zeroblob(1000000))").unwrap_err();
        assert_eq!(
            breach_of(&err, 10).map(|b| b.0),
            Some(FailureReason::DiskFull),
            "{err:?}"
        );

        db.enter_guest(false, statement_budget(50));
        let err = db
            .guest_query(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                vec![],
            )
            .unwrap_err();
        db.leave_guest();
        assert_eq!(
            breach_of(&err, 50).map(|b| b.0),
            Some(FailureReason::CpuTime),
            "{err:?}"
        );
    }

    /// A query sorting about 22 MB, more than the page cache holds, so it spills to disk.
    const SPILLING_SORT: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
        WHERE x < 200000) SELECT x FROM c ORDER BY randomblob(100)";

    fn sort(db: &GuestDb, sql: &str) -> Result<Rows, SqlError> {
        db.enter_guest(false, statement_budget(60_000));
        let result = db.guest_query(sql, vec![]);
        db.leave_guest();
        result
    }

    #[test]
    fn a_sort_spilling_past_the_disk_quota_fails_as_disk_full_and_frees_its_files() {
        let (_dir, db) = db();
        db.set_disk_quota(1 << 20).unwrap();
        let err = sort(&db, SPILLING_SORT).unwrap_err();
        assert_eq!(
            breach_of(&err, 10).map(|b| b.0),
            Some(FailureReason::DiskFull),
            "{err:?}"
        );
        assert!(
            err.message.contains("temporary files") && err.message.contains("1048576 bytes"),
            "the error names what filled up: {}",
            err.message
        );
        assert_eq!(db.temp.used(), 0, "the refused statement's files are gone");

        // With room, the same sort runs, through temporary files that are counted.
        db.set_disk_quota(1 << 30).unwrap();
        let rows = sort(&db, SPILLING_SORT).unwrap();
        assert_eq!(rows.rows.len(), 200_000);
        assert_eq!(db.temp.used(), 0, "a finished statement's files are gone");
        // A refusal is reported once, by the statement it stopped.
        assert!(!db.temp.take_refused());
    }

    #[test]
    fn host_statements_are_not_counted_against_the_guest_s_temporary_files() {
        let (_dir, db) = db();
        db.set_disk_quota(1 << 20).unwrap();
        let mut stmt = db.connection().prepare(SPILLING_SORT).unwrap();
        let rows = stmt.query_map([], |_| Ok(())).unwrap().count();
        assert_eq!(rows, 200_000);
        assert!(!db.temp.take_refused());
    }

    /// A 3 MB table, in a database with a disk quota of `quota` bytes.
    fn db_with_big_table(quota: u64) -> (tempfile::TempDir, GuestDb) {
        let (dir, db) = db();
        db.set_disk_quota(quota).unwrap();
        db.connection()
            .execute_batch(
                "CREATE TABLE big (id INTEGER PRIMARY KEY, b BLOB NOT NULL);
                 WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000)
                 INSERT INTO big SELECT x, randomblob(1000) FROM c;",
            )
            .unwrap();
        (dir, db)
    }

    fn guest_write(db: &GuestDb, sql: &str) -> Result<u64, SqlError> {
        db.enter_guest(true, statement_budget(60_000));
        let result = db.guest_execute(sql, vec![]);
        db.leave_guest();
        result
    }

    /// A rewrite takes the pages it changes into the savepoint journal for the invocation's
    /// savepoint, and again for its own (a `NOT NULL` column may abort it half way) once the
    /// invocation's holds them: a second rewrite of a 3 MB table makes it 6 MB. Past the disk
    /// quota the statement fails as `disk_full`, naming the journal, and the rolled-back
    /// transaction gives the bytes back. Before, the journal was in no quota.
    #[test]
    fn a_rewrite_whose_savepoint_journal_passes_the_disk_quota_fails_as_disk_full() {
        let (_dir, db) = db_with_big_table(5 << 20);
        let rewrite = "UPDATE big SET b = randomblob(1000)";
        db.begin().unwrap();
        db.savepoint();
        guest_write(&db, rewrite).unwrap();
        let err = guest_write(&db, rewrite).unwrap_err();
        assert_eq!(
            breach_of(&err, 10).map(|b| b.0),
            Some(FailureReason::DiskFull),
            "{err:?}"
        );
        assert!(
            err.message.contains("savepoint journal") && err.message.contains("5242880 bytes"),
            "the error names what filled up: {}",
            err.message
        );
        db.rollback();
        assert_eq!(
            db.temp.used(),
            0,
            "the journal is gone with its transaction"
        );

        // With room, the same rewrite passes, its journal counted until the commit.
        db.set_disk_quota(8 << 20).unwrap();
        db.begin().unwrap();
        db.savepoint();
        guest_write(&db, rewrite).unwrap();
        guest_write(&db, rewrite).unwrap();
        assert!(db.temp.used() >= 6_000_000, "{}", db.temp.used());
        db.release_savepoint().unwrap();
        db.commit().unwrap();
        assert_eq!(db.temp.used(), 0);
    }

    /// The savepoint journal counts from its first write to the transaction's end: a later
    /// sort in the same transaction has what is left, and the whole quota once it commits.
    #[test]
    fn a_transaction_s_savepoint_journal_counts_until_it_commits() {
        let (_dir, db) = db_with_big_table(8 << 20);
        let six_mb_sort = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
                           WHERE x < 40000) SELECT x, randomblob(120) FROM c \
                           ORDER BY randomblob(16)";
        db.begin().unwrap();
        db.savepoint();
        guest_write(&db, "UPDATE big SET b = randomblob(1000)").unwrap();
        assert!(
            db.temp.used() >= 3_000_000,
            "the journal holds the 3 MB rewritten: {}",
            db.temp.used()
        );
        assert!(
            !db.temporary_files_half_full(),
            "3 MB of 8 MiB: a batch goes on"
        );
        guest_write(&db, "UPDATE big SET b = randomblob(1000)").unwrap();
        db.release_savepoint().unwrap();
        assert!(
            db.temporary_files_half_full(),
            "6 MB of 8 MiB, kept after the invocation: a batch commits before its next event"
        );
        db.savepoint();
        db.enter_guest(false, statement_budget(60_000));
        let err = db.guest_query(six_mb_sort, vec![]).unwrap_err();
        db.leave_guest();
        assert_eq!(
            breach_of(&err, 10).map(|b| b.0),
            Some(FailureReason::DiskFull),
            "6 MB of journal and a 6 MB sort pass 8 MiB: {err:?}"
        );
        db.rollback();
        assert_eq!(db.temp.used(), 0);
        assert_eq!(sort(&db, six_mb_sort).unwrap().rows.len(), 40_000);
    }

    /// The host's writes on the connection are never refused for the guest's journal: past
    /// the quota they are counted, not stopped, until the transaction ends.
    #[test]
    fn the_host_s_writes_grow_the_savepoint_journal_past_the_quota_without_failing() {
        let (_dir, db) = db_with_big_table(4 << 20);
        db.begin().unwrap();
        db.savepoint();
        guest_write(&db, "UPDATE big SET b = randomblob(1000) WHERE id <= 2000").unwrap();
        let guest_journal = db.temp.used();
        assert!(guest_journal >= 2_000_000, "{guest_journal}");
        db.connection()
            .execute("UPDATE big SET b = zeroblob(1000)", [])
            .unwrap();
        assert!(
            db.temp.used() > 4 << 20,
            "the host's rewrite is counted: {}",
            db.temp.used()
        );
        db.rollback();
        assert_eq!(db.temp.used(), 0);
    }

    fn count(db: &GuestDb, table: &str) -> i64 {
        db.connection()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .unwrap()
    }

    #[test]
    fn nothing_a_guest_writes_after_its_transaction_was_interrupted_is_kept() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        db.begin().unwrap();
        db.enter_guest(true, statement_budget(20));
        db.guest_execute("INSERT INTO t VALUES (1)", vec![])
            .unwrap();
        // Interrupting a write inside a transaction makes SQLite roll all of it back.
        let err = db
            .guest_execute(
                "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
                vec![],
            )
            .unwrap_err();
        assert_eq!(err.code, SQLITE_INTERRUPT, "{err:?}");
        // A guest that ignores the error and writes on would commit each statement alone.
        let err = db
            .guest_execute("INSERT INTO t VALUES (2)", vec![])
            .unwrap_err();
        assert_eq!(err.code, SQLITE_ABORT, "{err:?}");
        assert!(err.message.contains("rolled back"), "{err:?}");
        let refused = db.as_host(|conn| conn.execute("DELETE FROM _host_outbox", []));
        assert_eq!(refused.err(), Some(HostWriteRefused::RolledBack));
        db.leave_guest();
        db.rollback();
        assert_eq!(count(&db, "t"), 0);
    }

    #[test]
    fn rolling_back_to_the_savepoint_keeps_the_work_before_it() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        db.begin().unwrap();
        db.savepoint();
        guest(&db, "INSERT INTO t VALUES (1)").unwrap();
        db.release_savepoint().unwrap();
        db.savepoint();
        guest(&db, "INSERT INTO t VALUES (2)").unwrap();
        assert!(db.rollback_to_savepoint(), "the transaction stays open");
        db.commit().unwrap();
        assert_eq!(count(&db, "t"), 1);

        db.begin().unwrap();
        db.savepoint();
        db.enter_guest(true, statement_budget(20));
        let _ = db.guest_execute(
            "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
            vec![],
        );
        assert!(db.transaction_lost());
        db.leave_guest();
        let lost = db.take_lost_transaction().expect("the loss is reported");
        assert_eq!(lost.code, SQLITE_INTERRUPT, "{lost:?}");
        assert!(db.take_lost_transaction().is_none(), "once");
        assert!(
            !db.rollback_to_savepoint(),
            "an interrupted write ends the whole transaction"
        );
        assert!(db.connection().is_autocommit());
    }

    /// A statement that only reads stops at what its call has left of its CPU time; one that
    /// writes runs on (up to the call's quota), since SQLite would roll the whole transaction
    /// back on interrupting it. Either way the transaction stays.
    #[test]
    fn a_read_stops_at_what_its_call_has_left_and_a_write_does_not() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        guest(&db, "INSERT INTO t VALUES (0)").unwrap();
        db.begin().unwrap();
        db.savepoint();
        db.enter_guest(true, statement_budget(60_000));
        db.limit_statements(Duration::from_millis(1));
        // It reads a table: SQLite would end the transaction on any other interrupted
        // statement that does.
        let err = db
            .guest_query(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000) SELECT count(*) FROM c, t",
                vec![],
            )
            .unwrap_err();
        assert_eq!(err.code, SQLITE_INTERRUPT, "{err:?}");
        db.guest_execute(
            "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000) SELECT x FROM c",
            vec![],
        )
        .unwrap();
        assert!(db.take_lost_transaction().is_none());
        db.leave_guest();
        assert!(db.rollback_to_savepoint(), "the transaction stays open");
        db.commit().unwrap();
    }

    /// A capability's write that makes SQLite end the transaction (the disk quota reached by
    /// a one-row insert, which SQLite undoes by rolling everything back) is reported as the
    /// guest's statements are.
    #[test]
    fn a_capability_write_that_ends_the_transaction_is_reported() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        db.set_disk_quota(db.size_bytes().unwrap() + 8 * 4096)
            .unwrap();
        db.begin().unwrap();
        db.savepoint();
        db.enter_guest(true, statement_budget(60_000));
        db.guest_execute("INSERT INTO t VALUES (1)", vec![])
            .unwrap();
        let written = db
            .as_host(|conn| conn.execute("INSERT INTO t VALUES (zeroblob(1000000))", []))
            .unwrap();
        let err = written.unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DiskFull),
            "{err}"
        );
        assert!(db.transaction_lost(), "SQLite rolled the transaction back");
        db.leave_guest();
        let lost = db.take_lost_transaction().expect("reported");
        assert_eq!(lost.code, SQLITE_FULL, "{lost:?}");
    }

    /// The savepoint opens with the invocation's first write, whichever way it writes; an
    /// invocation that writes nothing leaves none behind, and rolling it back keeps the rest.
    #[test]
    fn the_savepoint_opens_with_the_first_write() {
        let (_dir, db) = db();
        guest(&db, "CREATE TABLE t (x)").unwrap();
        // Rolling back to a savepoint that is not open is an error (and to one that is
        // leaves it open).
        let opened = |db: &GuestDb| {
            db.connection()
                .execute_batch("ROLLBACK TO invocation")
                .is_ok()
        };
        db.begin().unwrap();
        guest(&db, "INSERT INTO t VALUES (1)").unwrap();
        db.savepoint();
        assert!(!opened(&db), "nothing written, no savepoint");
        assert!(db.rollback_to_savepoint(), "the transaction stays open");

        type Write = fn(&GuestDb);
        let writes: [(&str, Write); 3] = [
            ("guest SQL", |db| {
                guest(db, "INSERT INTO t VALUES (2)").unwrap();
            }),
            ("a capability", |db| {
                db.enter_guest(true, statement_budget(20));
                let written = db.as_host(|conn| conn.execute("INSERT INTO t VALUES (2)", []));
                db.leave_guest();
                written.unwrap().unwrap();
            }),
            ("an emitted event", |db| {
                db.stage_emitted("1:0".into(), "e".into(), "{}".into(), 0)
                    .unwrap();
            }),
        ];
        for (how, write) in writes {
            db.savepoint();
            write(&db);
            assert!(db.rollback_to_savepoint(), "{how}");
            db.savepoint();
            write(&db);
            assert!(opened(&db), "{how} opens the savepoint");
            assert!(db.rollback_to_savepoint(), "{how}");
        }
        db.commit().unwrap();
        assert_eq!(
            count(&db, "t"),
            1,
            "only the write before the savepoints is kept"
        );
        assert_eq!(count(&db, "_host_outbox"), 0);
    }
}
