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
    origin TEXT UNIQUE
);
";

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Event type, e.g. `v2.TaskCreated`.
    pub event_type: String,
    /// JSON payload as text.
    pub payload: String,
    /// Optional idempotency key: the same key in the same store returns the original `seq`.
    pub idempotency_key: Option<String>,
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
}

/// The event log of one store.
pub struct EventLog {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path, durability: Durability) -> rusqlite::Result<Self> {
        let writer = sqlite::open(path, durability)?;
        writer.execute_batch(SCHEMA)?;
        let reader = sqlite::open_reader(path)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        })
    }

    /// Appends `events` from `source` in one transaction; returns each event's `seq` (the
    /// original `seq` for an idempotency key seen before). Durable when this returns.
    pub fn append(&self, events: &[NewEvent], source: &str) -> rusqlite::Result<Vec<u64>> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut seqs = Vec::with_capacity(events.len());
        {
            let now = sqlite::now_ms();
            let mut find =
                tx.prepare_cached("SELECT seq FROM events WHERE idempotency_key = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (type, payload, at, source, idempotency_key) VALUES (?1, ?2, ?3, ?4, ?5)",
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
                    event.idempotency_key
                ])?;
                seqs.push(tx.last_insert_rowid() as u64);
            }
        }
        tx.commit()?;
        Ok(seqs)
    }

    /// Appends events the plugin emitted, each once per origin.
    pub fn append_emitted(&self, entries: &[crate::guest_db::OutboxEntry]) -> rusqlite::Result<()> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO events (type, payload, at, source, origin) VALUES (?1, ?2, ?3, 'plugin', ?4)",
            )?;
            for entry in entries {
                insert.execute(params![
                    entry.event_type,
                    entry.payload,
                    entry.at,
                    entry.origin
                ])?;
            }
        }
        tx.commit()
    }

    /// The `seq` of the newest event (0 when empty).
    pub fn head(&self) -> rusqlite::Result<u64> {
        lock(&self.reader).query_row("SELECT coalesce(max(seq), 0) FROM events", [], |row| {
            row.get(0)
        })
    }

    /// Up to `limit` events with `seq > after`, in order.
    pub fn read_after(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<LoggedEvent>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT seq, type, payload, at, source FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |row| {
            Ok(LoggedEvent {
                seq: row.get(0)?,
                event_type: row.get(1)?,
                payload: row.get(2)?,
                at: row.get(3)?,
                source: row.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// The event with `seq`, if any.
    pub fn get(&self, seq: u64) -> rusqlite::Result<Option<LoggedEvent>> {
        Ok(self
            .read_after(seq.saturating_sub(1), 1)?
            .into_iter()
            .find(|e| e.seq == seq))
    }
}

fn lock(mutex: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave SQLite half-written (its transaction rolls
    // back), so a poisoned lock is safe to keep using.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            event_type: t.into(),
            payload: "{}".into(),
            idempotency_key: key.map(Into::into),
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
}
