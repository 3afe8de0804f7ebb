//! Opening the store's SQLite files with the host's settings.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// How much a commit must survive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Survives a crash or `kill -9` of the host (WAL, `synchronous=NORMAL`).
    #[default]
    Process,
    /// Also survives power loss (WAL, `synchronous=FULL`; slower commits).
    Power,
}

/// Opens (creating if needed) a database file in WAL mode with the durability asked for.
pub(crate) fn open(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let synchronous = match durability {
        Durability::Process => "NORMAL",
        Durability::Power => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Opens a read-only connection to a database another connection writes.
pub(crate) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// A read-only connection opened on first use and closed while its store hibernates (it then
/// costs neither memory nor file descriptors).
pub(crate) struct LazyReader {
    path: std::path::PathBuf,
    conn: std::sync::Mutex<Option<Connection>>,
}

impl LazyReader {
    /// A reader of the database at `path`, already open as `conn`.
    pub(crate) fn new(path: &Path, conn: Connection) -> Self {
        Self {
            path: path.to_owned(),
            conn: std::sync::Mutex::new(Some(conn)),
        }
    }

    /// Runs `work` on the connection, opening it first when it is closed.
    pub(crate) fn with<T>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let conn = match &mut *guard {
            Some(conn) => conn,
            slot => slot.insert(open_reader(&self.path)?),
        };
        work(conn)
    }

    /// Hands back the connection's caches, if it is open (see [`release_memory`]).
    pub(crate) fn shrink(&self) {
        let guard = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(conn) = &*guard
            && let Err(err) = release_memory(conn)
        {
            tracing::debug!("could not shrink a reader's cache: {err}");
        }
    }

    /// Closes the connection (the next use opens it again).
    pub(crate) fn close(&self) {
        let closed = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(closed);
    }
}

/// Hands back what a connection holds in memory that it can rebuild on demand: its cached
/// prepared statements and its page cache (used when a store hibernates).
pub(crate) fn release_memory(conn: &Connection) -> rusqlite::Result<()> {
    conn.flush_prepared_statement_cache();
    conn.execute_batch("PRAGMA shrink_memory")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
