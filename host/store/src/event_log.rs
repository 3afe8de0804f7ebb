//! The store's event log (`events.db`): one total order of events, durable before a 2xx.
//!
//! Appends never wait on the plugin: the log lives in its own file, apart from `store.db`
//! where the plugin's transaction runs. Events the plugin emits reach the log through the
//! outbox in `store.db`, keyed by origin so that draining it twice appends them once.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::sqlite::{self, Durability, Schema, lock};

/// The log's table and its unique keys; older logs are brought up to date (see
/// [`upgrade_older_log`]).
pub(crate) const SCHEMA: Schema =
    Schema::with_upgrade(&[TABLE, KEYS, EPOCH_TABLE, FIRST_EPOCH], upgrade_older_log);

/// The statements that make the log's table and its keys (also for the benchmark's raw SQLite
/// reference, which writes the same rows into the same table).
pub const STATEMENTS: &[&str] = &[TABLE, KEYS];

const TABLE: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    at INTEGER NOT NULL,
    source TEXT NOT NULL,
    idempotency_key TEXT,
    origin TEXT,
    request_id TEXT
);
";

/// An idempotency key, and an emitted event's origin, each appear once in the log. The indexes
/// hold only the events that have one: most have neither, and a `UNIQUE` column indexes its
/// NULLs too, so an append of one event wrote three pages (the table's and each index's last
/// leaf) where it now writes one — a third of the WAL per event, so fewer checkpoints and, after
/// a long hibernation, fewer frames for the next open to read back.
const KEYS: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS events_idempotency_key ON events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS events_origin ON events (origin) WHERE origin IS NOT NULL;
";

/// Which history of the store the log holds: a restore from a backup starts another one, in
/// which seqs after the backup's last are handed out again. `epoch` is when it began (ms since
/// the Unix epoch; after a restore, later than any epoch the store had before) and `after` the
/// seq it began after (0 for a new log; the backup's last seq after a restore). A follower
/// that names the epoch it read (`?logEpoch=`) is told when the log is another one, instead of
/// skipping the seqs handed out again.
const EPOCH_TABLE: &str = "
CREATE TABLE IF NOT EXISTS log_epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL,
    after INTEGER NOT NULL
);
";

/// A new log's epoch (also one made by an older host, which had none): now.
const FIRST_EPOCH: &str = "
INSERT OR IGNORE INTO log_epoch (id, epoch, after)
    VALUES (1, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER), 0);
";

/// The history a log holds (see [`EPOCH_TABLE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogEpoch {
    /// When it began (ms since the Unix epoch).
    pub epoch: i64,
    /// The seq it began after: the events up to it came from a backup (0: none did).
    pub after: u64,
}

impl LogEpoch {
    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        conn.query_row(
            "SELECT epoch, after FROM log_epoch WHERE id = 1",
            [],
            |row| {
                Ok(Self {
                    epoch: row.get(0)?,
                    after: row.get(1)?,
                })
            },
        )
    }
}

/// An epoch later than now and than any this process handed out before: logs made (or
/// restored) within one millisecond get different ones.
fn fresh_epoch() -> i64 {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = sqlite::now_ms();
    let previous = LAST
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |last| Some(now.max(last.saturating_add(1))),
        )
        .unwrap_or(now);
    now.max(previous.saturating_add(1))
}

/// Gives the new log `conn` writes (a spare store's) a [`fresh_epoch`].
pub(crate) fn stamp_fresh_epoch(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE log_epoch SET epoch = ?1 WHERE id = 1",
        [fresh_epoch()],
    )?;
    Ok(())
}

/// Starts another history in the log at `path` (a restored backup's, not open elsewhere):
/// its epoch later than `previous` (the replaced log's) and now, beginning after the log's
/// last seq.
pub fn begin_epoch(path: &Path, previous: i64) -> rusqlite::Result<LogEpoch> {
    let conn = Connection::open(path)?;
    conn.execute_batch(EPOCH_TABLE)?;
    let after: u64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |row| {
        row.get(0)
    })?;
    let epoch = LogEpoch {
        epoch: fresh_epoch().max(previous.saturating_add(1)),
        after,
    };
    conn.execute(
        "INSERT OR REPLACE INTO log_epoch (id, epoch, after) VALUES (1, ?1, ?2)",
        rusqlite::params![epoch.epoch, epoch.after],
    )?;
    Ok(epoch)
}

/// The page read behind [`EventLog::read_after`]. No `LIMIT ?`: SQLite plans with a bound
/// limit's value and compiles the statement again whenever it changes (callers page with
/// different sizes), so the page ends where the caller stops stepping the rows instead.
const READ_AFTER: &str =
    "SELECT seq, type, payload, at, source, request_id FROM events WHERE seq > ?1 ORDER BY seq";

/// Room made at once for the events a read from the file returns (growing the vector as
/// rows came was a tenth of such a read's time).
const READ_CAPACITY: usize = 256;

/// A read from the file stops once its events' payloads hold this many bytes: a page of a
/// thousand 1 MB events no longer sits whole in the host's memory (callers read on from the
/// last event returned).
pub const MAX_READ_BYTES: usize = 4 << 20;

/// The tail kept in memory holds at most this many events… (enough for the store's actor to
/// read from memory while a few batches of appends are ahead of it: reading them back from
/// the file was a sixth of its time under a steady stream)
const TAIL_EVENTS: usize = 1024;
/// …and at most this many bytes (see [`Tail::size`]).
const TAIL_BYTES: usize = 128 * 1024;

/// The most pages each of the log's connections keeps in its cache (256 KiB of 4 KiB pages).
/// The writer only ever needs the path to the log's last page (and to an index's, for an
/// event with a key), and the reader pages forward; yet SQLite keeps every page a
/// connection has touched until its cache is full, 2 MB by default: a store that stays awake
/// while its log grows held up to 4 MB of pages it would never read again, so a host's
/// memory grew with its awake stores' logs rather than with their work.
pub const CACHE_PAGES: u32 = 64;

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Event type, e.g. `v2.TaskCreated`.
    pub event_type: String,
    /// JSON payload as text.
    pub payload: String,
    /// Optional idempotency key: the same key in the same store returns the original `seq`.
    pub idempotency_key: Option<String>,
    /// The correlation id of the request that appended it (`X-Request-Id`), carried into the
    /// log lines of its processing.
    pub request_id: Option<String>,
}

/// An event in the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoggedEvent {
    /// Position in the store's total order.
    pub seq: u64,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// JSON payload as text (the API turns it back into JSON).
    #[serde(skip)]
    pub payload: String,
    /// When the host accepted it (ms since the Unix epoch).
    pub at: i64,
    /// Who appended it: `api` or `plugin`.
    pub source: String,
    /// The correlation id of the request that appended it (for an emitted event: of the event
    /// that caused it).
    #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The event log of one store.
pub struct EventLog {
    path: std::path::PathBuf,
    durability: Durability,
    /// Closed while the store hibernates; the next append opens it again (still durable
    /// before it returns).
    writer: Mutex<Option<Connection>>,
    reader: sqlite::LazyReader,
    /// The newest events, so that a follower's long-poll and the store's own actor read the
    /// end of the log without SQLite. `None` until the first append after opening (or after
    /// hibernating), when reads go to the file.
    tail: Mutex<Option<Tail>>,
    /// The history it holds (read when it opens; a restore opens another log).
    epoch: LogEpoch,
    /// Told each time the writer or the reader opens the file (see [`EventLog::signalling`]).
    opened: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The bytes the file and its WAL took when last measured ([`EventLog::file_bytes`])…
    size: std::sync::atomic::AtomicU64,
    /// …and whether the log was written since.
    size_stale: std::sync::atomic::AtomicBool,
}

/// The end of the log in memory: every event with `seq > after`, in order, with no gap.
#[derive(Debug)]
struct Tail {
    after: u64,
    events: VecDeque<LoggedEvent>,
    bytes: usize,
}

impl Tail {
    /// The `seq` of the newest event.
    fn head(&self) -> u64 {
        self.after + self.events.len() as u64
    }

    /// The events after `after` (which must not be before the tail), up to `limit` and
    /// `max_bytes` of payloads (one event at least).
    fn read(&self, after: u64, limit: usize, max_bytes: usize) -> Vec<LoggedEvent> {
        let skip = usize::try_from(after - self.after).unwrap_or(usize::MAX);
        let mut page = PageBytes::new(max_bytes);
        self.events
            .iter()
            .skip(skip)
            .take(limit)
            .take_while(|event| page.takes(event))
            .cloned()
            .collect()
    }

    fn push(&mut self, event: LoggedEvent) {
        self.bytes += Self::size(&event);
        self.events.push_back(event);
        while self.events.len() > TAIL_EVENTS || self.bytes > TAIL_BYTES {
            let Some(evicted) = self.events.pop_front() else {
                break;
            };
            self.bytes -= Self::size(&evicted);
            self.after = evicted.seq;
        }
    }

    /// The memory an event takes in the tail.
    fn size(event: &LoggedEvent) -> usize {
        std::mem::size_of::<LoggedEvent>()
            + event.event_type.len()
            + event.payload.len()
            + event.source.len()
            + event.request_id.as_ref().map_or(0, String::len)
    }
}

/// The payload bytes a page of the log has room for: it takes events until their payloads
/// reach its limit, and always one.
struct PageBytes {
    left: usize,
    full: bool,
}

impl PageBytes {
    fn new(max_bytes: usize) -> Self {
        Self {
            left: max_bytes,
            full: false,
        }
    }

    /// Whether the page takes `event` (after it, the page may be full).
    fn takes(&mut self, event: &LoggedEvent) -> bool {
        if self.full {
            return false;
        }
        let bytes = event.payload.len();
        self.full = bytes >= self.left;
        self.left = self.left.saturating_sub(bytes);
        true
    }
}

/// `conn` as the log's writer: its page cache capped at [`CACHE_PAGES`].
fn writer(conn: Connection) -> rusqlite::Result<Connection> {
    sqlite::cap_page_cache(&conn, CACHE_PAGES)?;
    Ok(conn)
}

/// Adds events just committed to the tail. A new row's `seq` is the largest before it plus
/// one (the write transaction excludes every other writer), so the first new event follows
/// the log's previous head directly: when the tail does not end there (unknown, or the
/// events in between were never seen), it starts again from that point.
fn extend_tail(tail: &Mutex<Option<Tail>>, committed: Vec<LoggedEvent>) {
    let Some(first) = committed.first().map(|e| e.seq) else {
        return;
    };
    let mut tail = lock(tail);
    let tail = match &mut *tail {
        Some(known) if known.head() + 1 == first => known,
        slot => slot.insert(Tail {
            after: first - 1,
            events: VecDeque::new(),
            bytes: 0,
        }),
    };
    for event in committed {
        tail.push(event);
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path, durability: Durability) -> rusqlite::Result<Self> {
        let writer = writer(sqlite::open(path, durability, &SCHEMA)?)?;
        Self::with_writer_connection(path, durability, writer)
    }

    /// The log at `path`, written through `writer`: a spare's connection, made with the log's
    /// schema before the spare's directory became this store's (see [`sqlite::adopt`]).
    pub(crate) fn adopt(
        path: &Path,
        durability: Durability,
        writer: rusqlite::Connection,
    ) -> rusqlite::Result<Self> {
        let writer = self::writer(sqlite::adopt(writer, path, durability)?)?;
        Self::with_writer_connection(path, durability, writer)
    }

    fn with_writer_connection(
        path: &Path,
        durability: Durability,
        writer: rusqlite::Connection,
    ) -> rusqlite::Result<Self> {
        let epoch = LogEpoch::read(&writer)?;
        Ok(Self {
            epoch,
            path: path.to_owned(),
            durability,
            writer: Mutex::new(Some(writer)),
            reader: sqlite::LazyReader::with_page_cache(path, CACHE_PAGES),
            tail: Mutex::new(None),
            opened: None,
            size: std::sync::atomic::AtomicU64::new(0),
            size_stale: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The history the log holds (see [`LogEpoch`]).
    pub fn epoch(&self) -> LogEpoch {
        self.epoch
    }

    /// The bytes the log takes on disk: its file and its WAL (two `stat`s).
    /// Measured again only after a write since the last time (a host listing 10,000 stores,
    /// most of them idle, stats the files of those that changed).
    pub fn file_bytes(&self) -> u64 {
        use std::sync::atomic::Ordering;
        if !self.size_stale.swap(false, Ordering::Relaxed) {
            return self.size.load(Ordering::Relaxed);
        }
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |meta| meta.len());
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let bytes = size(&self.path) + size(Path::new(&wal));
        self.size.store(bytes, Ordering::Relaxed);
        bytes
    }

    /// This log, telling `opened` each time its writer or its reader opens the file again
    /// after [`EventLog::take_connections`]: an append or a read reaching a store whose files
    /// are closed, which nothing else wakes to close them again.
    pub(crate) fn signalling(self, opened: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self {
            reader: self.reader.signalling(opened.clone()),
            opened: Some(opened),
            ..self
        }
    }

    /// The store is hibernating: hands back the reader's and the writer's statement and page
    /// caches (both stay open, so the next event wakes the store quickly).
    pub(crate) fn release_memory(&self) {
        lock(&self.tail).take();
        self.reader.shrink();
        if let Some(writer) = &*lock(&self.writer)
            && let Err(err) = sqlite::release_memory(writer)
        {
            tracing::debug!("could not shrink the event log's cache: {err}");
        }
    }

    /// Whether the log's file is closed (the store hibernated for long): the next append opens
    /// it again.
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.writer).is_none()
    }

    /// Whether the log holds a file open (its writer or its reader).
    pub(crate) fn holds_files(&self) -> bool {
        !self.is_closed() || self.reader.is_open()
    }

    /// The store has hibernated for long: closes the reader and the writer (the next read or
    /// append opens them again), so it holds neither memory nor file descriptors here.
    #[cfg(test)]
    pub(crate) fn close(&self) {
        drop(self.take_connections(false));
    }

    /// [`EventLog::close`], handing the connections to the caller to close, the reader first
    /// (the writer, closing last, checkpoints and empties the WAL — unless `idle`, the store
    /// closing its files after a long hibernation, and the WAL small: see
    /// [`sqlite::keep_small_wal_on_close`]).
    pub(crate) fn take_connections(&self, idle: bool) -> Vec<Connection> {
        // Closing may checkpoint the WAL into the file and empty it.
        self.size_stale
            .store(true, std::sync::atomic::Ordering::Relaxed);
        lock(&self.tail).take();
        let reader = self.reader.take();
        let writer = lock(&self.writer).take();
        if idle && let Some(writer) = &writer {
            sqlite::keep_small_wal_on_close(writer, &self.path);
        }
        reader.into_iter().chain(writer).collect()
    }

    /// Runs `work` on the writer, opening it first when it is closed.
    fn with_writer<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut guard = lock(&self.writer);
        let conn = match &mut *guard {
            Some(conn) => conn,
            slot => {
                let conn = writer(sqlite::open(&self.path, self.durability, &Schema::NONE)?)?;
                if let Some(opened) = &self.opened {
                    opened.notify_one();
                }
                slot.insert(conn)
            }
        };
        let done = work(conn);
        self.size_stale
            .store(true, std::sync::atomic::Ordering::Relaxed);
        done
    }

    /// Appends `events` from `source` in one transaction; returns each event's `seq` (the
    /// original `seq` for an idempotency key seen before). Durable when this returns.
    pub fn append(&self, events: Vec<NewEvent>, source: &str) -> rusqlite::Result<Vec<u64>> {
        self.with_writer(|conn| {
            let (seqs, committed) = Self::append_in(conn, events, source)?;
            extend_tail(&self.tail, committed);
            Ok(seqs)
        })
    }

    /// Appends in one transaction; returns each event's `seq` and the events it added.
    fn append_in(
        conn: &mut Connection,
        events: Vec<NewEvent>,
        source: &str,
    ) -> rusqlite::Result<(Vec<u64>, Vec<LoggedEvent>)> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut seqs = Vec::with_capacity(events.len());
        let mut added = Vec::with_capacity(events.len());
        let now = sqlite::now_ms();
        {
            let mut find =
                tx.prepare_cached("SELECT seq FROM events WHERE idempotency_key = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (type, payload, at, source, idempotency_key, request_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for event in events {
                if let Some(key) = &event.idempotency_key
                    && let Some(seq) = find.query_row([key], |row| row.get(0)).optional()?
                {
                    seqs.push(seq);
                    continue;
                }
                insert.execute(params![
                    event.event_type,
                    event.payload,
                    now,
                    source,
                    event.idempotency_key,
                    event.request_id
                ])?;
                let seq = tx.last_insert_rowid() as u64;
                seqs.push(seq);
                // Moved, not copied: under a steady stream copying each event for the tail
                // was a tenth of an append's time.
                added.push(LoggedEvent {
                    seq,
                    event_type: event.event_type,
                    payload: event.payload,
                    at: now,
                    source: source.to_owned(),
                    request_id: event.request_id,
                });
            }
        }
        tx.commit()?;
        Ok((seqs, added))
    }

    /// Appends events the plugin emitted, each once per origin; returns the log's head after.
    pub fn append_emitted(
        &self,
        entries: &[crate::guest_db::OutboxEntry],
    ) -> rusqlite::Result<u64> {
        self.with_writer(|conn| {
            let committed = Self::append_emitted_in(conn, entries)?;
            extend_tail(&self.tail, committed);
            match &*lock(&self.tail) {
                Some(tail) => Ok(tail.head()),
                None => self.head_on_disk(),
            }
        })
    }

    /// Appends in one transaction; returns the events it added (an origin already in the log
    /// adds nothing).
    fn append_emitted_in(
        conn: &mut Connection,
        entries: &[crate::guest_db::OutboxEntry],
    ) -> rusqlite::Result<Vec<LoggedEvent>> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut added = Vec::with_capacity(entries.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO events (type, payload, at, source, origin, request_id)
                 VALUES (?1, ?2, ?3, 'plugin', ?4, (SELECT request_id FROM events WHERE seq = ?5))
                 RETURNING seq, request_id",
            )?;
            for entry in entries {
                // An event's emissions carry `<cause seq>:<index>` (a task's carry no seq).
                let cause: Option<u64> =
                    entry.origin.split(':').next().and_then(|s| s.parse().ok());
                let inserted = insert
                    .query_row(
                        params![
                            entry.event_type,
                            entry.payload,
                            entry.at,
                            entry.origin,
                            cause
                        ],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?;
                if let Some((seq, request_id)) = inserted {
                    added.push(LoggedEvent {
                        seq,
                        event_type: entry.event_type.clone(),
                        payload: entry.payload.clone(),
                        at: entry.at,
                        source: "plugin".to_owned(),
                        request_id,
                    });
                }
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// The `seq` of the newest event (0 when empty).
    pub fn head(&self) -> rusqlite::Result<u64> {
        if let Some(tail) = &*lock(&self.tail) {
            return Ok(tail.head());
        }
        self.head_on_disk()
    }

    fn head_on_disk(&self) -> rusqlite::Result<u64> {
        self.reader.with(|conn| {
            conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |row| {
                row.get(0)
            })
        })
    }

    /// Up to `limit` events with `seq > after`, in order, and up to [`MAX_READ_BYTES`] of
    /// payloads (one event at least).
    pub fn read_after(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<LoggedEvent>> {
        self.read_after_within(after, limit, MAX_READ_BYTES)
    }

    /// [`Self::read_after`] with pages of at most `max_bytes` of payloads (one event at
    /// least).
    pub fn read_after_within(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> rusqlite::Result<Vec<LoggedEvent>> {
        match self.read_recent_within(after, limit, max_bytes) {
            Some(events) => Ok(events),
            None => self.read_on_disk_within(after, limit, max_bytes),
        }
    }

    /// [`Self::read_after`] when the memory holds the answer (`after` is within the tail of
    /// the log): never touches the file, so it may run on an async worker.
    pub fn read_recent(&self, after: u64, limit: usize) -> Option<Vec<LoggedEvent>> {
        self.read_recent_within(after, limit, MAX_READ_BYTES)
    }

    /// [`Self::read_recent`] with pages of at most `max_bytes` of payloads.
    pub fn read_recent_within(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Option<Vec<LoggedEvent>> {
        match &*lock(&self.tail) {
            Some(tail) if after >= tail.after => Some(tail.read(after, limit, max_bytes)),
            _ => None,
        }
    }

    #[cfg(test)]
    fn read_on_disk(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<LoggedEvent>> {
        self.read_on_disk_within(after, limit, MAX_READ_BYTES)
    }

    /// Up to `limit` events from the file; a page stops once its payloads reach `max_bytes`
    /// (one event at least), so a read of big events holds a few MB of the host's memory,
    /// not `limit` of them (1,000 events of 1 MB each were 3 GB per request with the
    /// answer's JSON).
    fn read_on_disk_within(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> rusqlite::Result<Vec<LoggedEvent>> {
        self.reader.with(|conn| {
            let mut stmt = conn.prepare_cached(READ_AFTER)?;
            let rows = stmt.query_map(params![after], |row| {
                Ok(LoggedEvent {
                    seq: row.get(0)?,
                    event_type: row.get(1)?,
                    payload: row.get(2)?,
                    at: row.get(3)?,
                    source: row.get(4)?,
                    request_id: row.get(5)?,
                })
            })?;
            let mut events = Vec::with_capacity(limit.min(READ_CAPACITY));
            let mut page = PageBytes::new(max_bytes);
            for row in rows.take(limit) {
                let event = row?;
                page.takes(&event);
                events.push(event);
                if page.full {
                    break;
                }
            }
            Ok(events)
        })
    }

    /// The `seq`s of events appended before with these idempotency keys, in order, when
    /// every key has one; `None` when any key is new.
    pub fn seqs_of_keys(&self, keys: &[&str]) -> rusqlite::Result<Option<Vec<u64>>> {
        self.reader.with(|conn| {
            let mut find =
                conn.prepare_cached("SELECT seq FROM events WHERE idempotency_key = ?1")?;
            let mut seqs = Vec::with_capacity(keys.len());
            for key in keys {
                match find.query_row([key], |row| row.get(0)).optional()? {
                    Some(seq) => seqs.push(seq),
                    None => return Ok(None),
                }
            }
            Ok(Some(seqs))
        })
    }

    /// The event with `seq`, if any.
    pub fn get(&self, seq: u64) -> rusqlite::Result<Option<LoggedEvent>> {
        Ok(self
            .read_after(seq.saturating_sub(1), 1)?
            .into_iter()
            .find(|e| e.seq == seq))
    }
}

/// Brings a log written by an older host up to date, inside the transaction that stamps the
/// schema (a crash leaves the old log whole): one whose keys were `UNIQUE` columns is copied
/// into today's table, `seq`s and all, once; one from before correlation ids gets the
/// `request_id` column (empty for its old events).
fn upgrade_older_log(conn: &Connection) -> rusqlite::Result<()> {
    let has_request_id = conn
        .prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = 'request_id'")?
        .exists([])?;
    let request_id = if has_request_id { "request_id" } else { "NULL" };
    let unique_columns = conn
        .prepare(
            "SELECT 1 FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events'
             AND name LIKE 'sqlite_autoindex_events_%'",
        )?
        .exists([])?;
    if unique_columns {
        conn.execute_batch(&format!(
            "ALTER TABLE events RENAME TO events_before_upgrade;
             {TABLE}
             INSERT INTO events
                 (seq, type, payload, at, source, idempotency_key, origin, request_id)
                 SELECT seq, type, payload, at, source, idempotency_key, origin, {request_id}
                 FROM events_before_upgrade ORDER BY seq;
             DROP TABLE events_before_upgrade;
             {KEYS}"
        ))?;
    } else if request_id == "NULL" {
        conn.execute_batch("ALTER TABLE events ADD COLUMN request_id TEXT")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logs made within one millisecond (spares built back to back) get different epochs.
    #[test]
    fn fresh_epochs_never_repeat() {
        let epochs: Vec<i64> = (0..1000).map(|_| fresh_epoch()).collect();
        assert!(
            epochs.windows(2).all(|pair| pair[0] < pair[1]),
            "{epochs:?}"
        );
        assert!(epochs[0] >= sqlite::now_ms() - 1000);
    }

    /// Tailing clients and the store's own actor page through the log with the same cached
    /// statement but different positions and page sizes: SQLite must not compile it again for
    /// each (a re-prepare per read was 15% of a loaded host's CPU).
    #[test]
    fn paging_reuses_the_compiled_statement() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        for _ in 0..10 {
            log.append(vec![event("a", None)], "api").unwrap();
        }
        for (after, limit) in [(0, 256), (3, 1000), (5, 256), (9, 1000), (10, 1)] {
            let page = log.read_on_disk(after, limit).unwrap();
            assert_eq!(
                page.first().map(|e| e.seq),
                (after < 10).then_some(after + 1)
            );
            assert_eq!(page.len(), (10 - after as usize).min(limit));
        }
        let reprepared = log
            .reader
            .with(|conn| {
                Ok(conn
                    .prepare_cached(READ_AFTER)?
                    .get_status(rusqlite::StatementStatus::RePrepare))
            })
            .unwrap();
        assert_eq!(reprepared, 0, "the paging statement was compiled again");
    }

    /// A store that stays awake while its log grows keeps a bounded page cache: the writer
    /// and the reader hold at most [`CACHE_PAGES`], however much was written and read.
    #[test]
    fn the_logs_page_caches_stay_small_however_long_the_log_grows() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        let payload = format!("{{\"text\":\"{}\"}}", "x".repeat(1000));
        for batch in 0..30 {
            let events = (0..100)
                .map(|n| NewEvent {
                    idempotency_key: Some(format!("{batch}-{n}")),
                    payload: payload.clone(),
                    ..event("big", None)
                })
                .collect();
            log.append(events, "api").unwrap();
        }
        let mut read = 0;
        while let Some(last) = log.read_on_disk(read, 256).unwrap().last() {
            read = last.seq;
        }
        assert_eq!(read, 3_000, "every event reads back");
        let bound = u64::from(CACHE_PAGES) * (4096 + 1024);
        let writer = sqlite::cache_bytes(lock(&log.writer).as_ref().unwrap()).unwrap();
        let reader = log.reader.with(sqlite::cache_bytes).unwrap();
        assert!(
            writer <= bound && reader <= bound,
            "3 MB written and read back; the writer caches {writer} bytes, the reader {reader} (at most {bound} each)"
        );
    }

    /// Every page a reader can ask for, from memory where the tail holds it, and the same
    /// page from the file.
    fn assert_tail_matches_the_file(log: &EventLog) {
        let head = log.head_on_disk().unwrap();
        assert_eq!(
            log.head().unwrap(),
            head,
            "the head in memory is the file's"
        );
        for after in 0..=head + 1 {
            for limit in [1, 3, 1000] {
                assert_eq!(
                    log.read_after(after, limit).unwrap(),
                    log.read_on_disk(after, limit).unwrap(),
                    "after {after}, limit {limit}"
                );
            }
        }
    }

    /// Reads of the log's end come from memory, and say exactly what the file says: the
    /// events the API appended, those a plugin emitted (with their cause's request id), none
    /// of the duplicates, and — once the tail has dropped old events — the file for the rest.
    #[test]
    fn the_tail_in_memory_reads_exactly_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        assert_eq!(
            log.read_recent(0, 10),
            None,
            "nothing is known before an append"
        );
        let mut first = event("a", Some("k1"));
        first.request_id = Some("req-1".into());
        log.append(vec![first, event("b", None)], "api").unwrap();
        assert!(
            log.read_recent(0, 10).is_some(),
            "the tail starts at the first append"
        );
        assert_eq!(
            log.append_emitted(&[emitted("1:0"), emitted("1:1")])
                .unwrap(),
            4
        );
        assert_eq!(
            log.append_emitted(&[emitted("1:1"), emitted("2:0")])
                .unwrap(),
            5,
            "an origin already in the log is not added again"
        );
        log.append(vec![event("c", Some("k1"))], "api").unwrap();
        assert_eq!(
            log.read_recent(2, 10).unwrap()[0].request_id.as_deref(),
            Some("req-1")
        );
        assert_tail_matches_the_file(&log);

        for _ in 0..TAIL_EVENTS {
            log.append(vec![event("d", None)], "api").unwrap();
        }
        assert_eq!(
            log.read_recent(0, 10),
            None,
            "the oldest events left the tail"
        );
        assert_tail_matches_the_file(&log);
    }

    /// A page holds events until their payloads reach its bytes (one event at least), from
    /// the tail in memory as from the file.
    #[test]
    fn a_page_stops_once_its_payloads_reach_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        let big = |n: usize| NewEvent {
            payload: format!("\"{}\"", "x".repeat(n)),
            ..event("big", None)
        };
        // The tail keeps 128 KiB: events of 20 KB stay in it.
        log.append((0..5).map(|_| big(20_000)).collect(), "api")
            .unwrap();
        let seqs = |page: Vec<LoggedEvent>| page.iter().map(|e| e.seq).collect::<Vec<_>>();
        let recent = log.read_recent_within(0, 10, 50_000).unwrap();
        assert_eq!(seqs(recent), [1, 2, 3], "the third reaches 50 KB");
        let on_disk = log.read_on_disk_within(1, 10, 50_000).unwrap();
        assert_eq!(seqs(on_disk), [2, 3, 4]);
        let one = log.read_on_disk_within(0, 10, 10).unwrap();
        assert_eq!(seqs(one), [1], "one event at least");
        let one = log.read_recent_within(0, 10, 10).unwrap();
        assert_eq!(seqs(one), [1]);
    }

    /// A hibernating store forgets its tail (its memory is handed back); reads go to the file
    /// until the next append starts the tail again after the head.
    #[test]
    fn a_hibernated_log_reads_the_file_until_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        log.append(vec![event("a", None), event("b", None)], "api")
            .unwrap();
        log.release_memory();
        assert_eq!(log.read_recent(0, 10), None);
        assert_tail_matches_the_file(&log);
        log.append(vec![event("c", None)], "api").unwrap();
        assert_eq!(log.read_recent(1, 10).map(|e| e.len()), None);
        assert_eq!(log.read_recent(2, 10).map(|e| e.len()), Some(1));
        log.close();
        assert_eq!(log.read_recent(2, 10), None);
        log.append(vec![event("d", None)], "api").unwrap();
        assert_tail_matches_the_file(&log);
    }

    fn event(t: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            event_type: t.into(),
            payload: "{}".into(),
            idempotency_key: key.map(Into::into),
            request_id: None,
        }
    }

    /// An event the plugin emitted, from `origin`.
    fn emitted(origin: &str) -> crate::guest_db::OutboxEntry {
        crate::guest_db::OutboxEntry {
            id: 0,
            origin: origin.into(),
            event_type: "reply".into(),
            payload: r#"{"ok":true}"#.into(),
            at: 7,
        }
    }

    /// Logs written by older hosts — keys as `UNIQUE` columns, with or without correlation
    /// ids — keep every event, `seq`, key and origin, and go on: a key or an origin seen
    /// before adds nothing, new events follow without a gap, and the log is today's.
    #[test]
    fn logs_from_older_hosts_are_upgraded_in_place() {
        for with_request_id in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("events.db");
            {
                let old = Connection::open(&path).unwrap();
                old.execute_batch(&format!(
                    "PRAGMA journal_mode = WAL;
                     CREATE TABLE events (
                         seq INTEGER PRIMARY KEY, type TEXT NOT NULL, payload TEXT NOT NULL,
                         at INTEGER NOT NULL, source TEXT NOT NULL,
                         idempotency_key TEXT UNIQUE, origin TEXT UNIQUE{});
                     INSERT INTO events (type, payload, at, source, idempotency_key)
                         VALUES ('keyed', '{{}}', 1, 'api', 'k1');
                     INSERT INTO events (type, payload, at, source, origin)
                         VALUES ('reply', '{{}}', 2, 'plugin', '1:0');
                     INSERT INTO events (type, payload, at, source) VALUES ('plain', '{{}}', 3, 'api');",
                    if with_request_id { ", request_id TEXT" } else { "" }
                ))
                .unwrap();
            }
            let log = EventLog::open(&path, Durability::Process).unwrap();
            let mut new = event("new", None);
            new.request_id = Some("req-1".into());
            assert_eq!(
                log.append(vec![event("again", Some("k1")), new], "api")
                    .unwrap(),
                vec![1, 4],
                "the old key returns its seq; the new event follows without a gap"
            );
            assert_eq!(
                log.append_emitted(&[emitted("1:0"), emitted("4:0")])
                    .unwrap(),
                5,
                "an origin already in the log adds nothing"
            );
            drop(log);

            let log = EventLog::open(&path, Durability::Process).unwrap();
            let seen: Vec<_> = log
                .read_on_disk(0, 10)
                .unwrap()
                .into_iter()
                .map(|e| (e.seq, e.event_type, e.request_id))
                .collect();
            assert_eq!(
                seen,
                [
                    (1, "keyed".into(), None),
                    (2, "reply".into(), None),
                    (3, "plain".into(), None),
                    (4, "new".into(), Some("req-1".into())),
                    (5, "reply".into(), Some("req-1".into())),
                ],
                "request ids: {with_request_id}"
            );
            let indexes: Vec<String> = log
                .with_writer(|conn| {
                    conn.prepare(
                        "SELECT name FROM sqlite_schema WHERE type = 'index' ORDER BY name",
                    )?
                    .query_map([], |row| row.get(0))?
                    .collect()
                })
                .unwrap();
            assert_eq!(indexes, ["events_idempotency_key", "events_origin"]);
        }
    }

    /// An event without an idempotency key or an origin — most events — writes one page: the
    /// table's last leaf, not also an index entry for each missing key.
    #[test]
    fn an_event_without_keys_writes_one_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let log = EventLog::open(&path, Durability::Process).unwrap();
        log.append(vec![event("first", None)], "api").unwrap();
        let wal = || std::fs::metadata(sqlite::wal_path(&path)).unwrap().len();
        let before = wal();
        for _ in 0..10 {
            log.append(vec![event("plain", None)], "api").unwrap();
        }
        // A WAL frame is a 24-byte header and a page.
        let page: u64 = log
            .with_writer(|conn| conn.pragma_query_value(None, "page_size", |row| row.get(0)))
            .unwrap();
        assert_eq!((wal() - before) / (page + 24), 10, "one frame per append");
    }

    /// Looking an idempotency key up reads its index, not the whole log.
    #[test]
    fn a_key_is_found_through_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        let plan: String = log
            .with_writer(|conn| {
                conn.query_row(
                    "EXPLAIN QUERY PLAN SELECT seq FROM events WHERE idempotency_key = ?1",
                    ["k"],
                    |row| row.get(3),
                )
            })
            .unwrap();
        assert!(plan.contains("INDEX events_idempotency_key"), "{plan}");
    }

    #[test]
    fn seqs_are_gap_free_and_idempotency_keys_return_the_first_seq() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        assert_eq!(
            log.append(vec![event("a", None), event("b", Some("k1"))], "api")
                .unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            log.append(vec![event("c", Some("k1")), event("d", None)], "api")
                .unwrap(),
            vec![2, 3]
        );
        assert_eq!(
            log.append(vec![event("e", Some("k2")), event("e", Some("k2"))], "api")
                .unwrap(),
            vec![4, 4]
        );
        let all = log.read_after(0, 100).unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(log.head().unwrap(), 4);
    }

    #[test]
    fn a_closed_log_opens_again_on_the_next_append_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        log.append(vec![event("a", Some("k"))], "api").unwrap();
        log.close();
        assert!(
            lock(&log.writer).is_none(),
            "a long hibernation closes the writer"
        );
        assert_eq!(
            log.append(vec![event("b", None), event("c", Some("k"))], "api")
                .unwrap(),
            vec![2, 1]
        );
        log.close();
        assert_eq!(log.read_after(0, 10).unwrap().len(), 2);
        assert_eq!(log.head().unwrap(), 2);
    }
}
