//! The store's event log (`events.db`): one total order of events, durable before a 2xx.
//!
//! Appends never wait on the plugin: the log lives in its own file, apart from `store.db`
//! where the plugin's transaction runs. Events the plugin emits reach the log through the
//! outbox in `store.db`, keyed by origin so that draining it twice appends them once.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::sqlite::{self, Durability};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    at INTEGER NOT NULL,
    source TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    origin TEXT UNIQUE,
    request_id TEXT
);
";

/// The page read behind [`EventLog::read_after`]. No `LIMIT ?`: SQLite plans with a bound
/// limit's value and compiles the statement again whenever it changes (callers page with
/// different sizes), so the page ends where the caller stops stepping the rows instead.
const READ_AFTER: &str =
    "SELECT seq, type, payload, at, source, request_id FROM events WHERE seq > ?1 ORDER BY seq";

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
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path, durability: Durability) -> rusqlite::Result<Self> {
        let writer = sqlite::open(path, durability, SCHEMA)?;
        add_request_id_column(&writer)?;
        let reader = sqlite::open_reader(path)?;
        Ok(Self {
            path: path.to_owned(),
            durability,
            writer: Mutex::new(Some(writer)),
            reader: sqlite::LazyReader::new(path, reader),
        })
    }

    /// The store is hibernating: hands back the reader's and the writer's statement and page
    /// caches (both stay open, so the next event wakes the store quickly).
    pub(crate) fn release_memory(&self) {
        self.reader.shrink();
        if let Some(writer) = &*lock(&self.writer)
            && let Err(err) = sqlite::release_memory(writer)
        {
            tracing::debug!("could not shrink the event log's cache: {err}");
        }
    }

    /// The store has hibernated for long: closes the reader and the writer (the next read or
    /// append opens them again), so it holds neither memory nor file descriptors here.
    pub(crate) fn close(&self) {
        self.reader.close();
        let closed = lock(&self.writer).take();
        drop(closed);
    }

    /// Runs `work` on the writer, opening it first when it is closed.
    fn with_writer<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut guard = lock(&self.writer);
        let conn = match &mut *guard {
            Some(conn) => conn,
            slot => slot.insert(sqlite::open(&self.path, self.durability, "")?),
        };
        work(conn)
    }

    /// Appends `events` from `source` in one transaction; returns each event's `seq` (the
    /// original `seq` for an idempotency key seen before). Durable when this returns.
    pub fn append(&self, events: &[NewEvent], source: &str) -> rusqlite::Result<Vec<u64>> {
        self.with_writer(|conn| Self::append_in(conn, events, source))
    }

    fn append_in(
        conn: &mut Connection,
        events: &[NewEvent],
        source: &str,
    ) -> rusqlite::Result<Vec<u64>> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut seqs = Vec::with_capacity(events.len());
        {
            let now = sqlite::now_ms();
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
                seqs.push(tx.last_insert_rowid() as u64);
            }
        }
        tx.commit()?;
        Ok(seqs)
    }

    /// Appends events the plugin emitted, each once per origin.
    pub fn append_emitted(&self, entries: &[crate::guest_db::OutboxEntry]) -> rusqlite::Result<()> {
        self.with_writer(|conn| Self::append_emitted_in(conn, entries))
    }

    fn append_emitted_in(
        conn: &mut Connection,
        entries: &[crate::guest_db::OutboxEntry],
    ) -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO events (type, payload, at, source, origin, request_id)
                 VALUES (?1, ?2, ?3, 'plugin', ?4, (SELECT request_id FROM events WHERE seq = ?5))",
            )?;
            for entry in entries {
                // An event's emissions carry `<cause seq>:<index>` (a task's carry no seq).
                let cause: Option<u64> =
                    entry.origin.split(':').next().and_then(|s| s.parse().ok());
                insert.execute(params![
                    entry.event_type,
                    entry.payload,
                    entry.at,
                    entry.origin,
                    cause
                ])?;
            }
        }
        tx.commit()
    }

    /// The `seq` of the newest event (0 when empty).
    pub fn head(&self) -> rusqlite::Result<u64> {
        self.reader.with(|conn| {
            conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |row| {
                row.get(0)
            })
        })
    }

    /// Up to `limit` events with `seq > after`, in order.
    pub fn read_after(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<LoggedEvent>> {
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
            rows.take(limit).collect()
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

/// Logs written before correlation ids existed get the column (empty for their old events).
fn add_request_id_column(conn: &Connection) -> rusqlite::Result<()> {
    let has_column = conn
        .prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = 'request_id'")?
        .exists([])?;
    if !has_column {
        conn.execute_batch("ALTER TABLE events ADD COLUMN request_id TEXT")?;
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave SQLite half-written (its transaction rolls
    // back), so a poisoned lock is safe to keep using.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tailing clients and the store's own actor page through the log with the same cached
    /// statement but different positions and page sizes: SQLite must not compile it again for
    /// each (a re-prepare per read was 15% of a loaded host's CPU).
    #[test]
    fn paging_reuses_the_compiled_statement() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        for _ in 0..10 {
            log.append(&[event("a", None)], "api").unwrap();
        }
        for (after, limit) in [(0, 256), (3, 1000), (5, 256), (9, 1000), (10, 1)] {
            let page = log.read_after(after, limit).unwrap();
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

    fn event(t: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            event_type: t.into(),
            payload: "{}".into(),
            idempotency_key: key.map(Into::into),
            request_id: None,
        }
    }

    #[test]
    fn seqs_are_gap_free_and_idempotency_keys_return_the_first_seq() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.db"), Durability::Process).unwrap();
        assert_eq!(
            log.append(&[event("a", None), event("b", Some("k1"))], "api")
                .unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            log.append(&[event("c", Some("k1")), event("d", None)], "api")
                .unwrap(),
            vec![2, 3]
        );
        assert_eq!(
            log.append(&[event("e", Some("k2")), event("e", Some("k2"))], "api")
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
        log.append(&[event("a", Some("k"))], "api").unwrap();
        log.close();
        assert!(
            lock(&log.writer).is_none(),
            "a long hibernation closes the writer"
        );
        assert_eq!(
            log.append(&[event("b", None), event("c", Some("k"))], "api")
                .unwrap(),
            vec![2, 1]
        );
        log.close();
        assert_eq!(log.read_after(0, 10).unwrap().len(), 2);
        assert_eq!(log.head().unwrap(), 2);
    }
}
