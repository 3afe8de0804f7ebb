//! Opening the store's SQLite files with the host's settings.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use crate::checkpoint::{self, Checkpointer};

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

/// The SQLite VFS every store file is opened with: SQLite's own unix file I/O, with the locks
/// between this process's connections and the WAL index in the process's memory (no `-shm`
/// files), and one lock that keeps other processes out while the host has a database open
/// (see [`crate::vfs`]). Registered by the functions here that open store files; anything else
/// opening a store's live file through it calls [`register_vfs`] first.
///
/// Why no `-shm` file: SQLite truncates and re-extends the `-shm` file of every database it
/// opens first, page by page — file-system metadata work on every wake and every new store.
/// Measured here on the ext4 data disk, reopen + commit + read of a database: p50 317–400 µs
/// with `unix`, 203–231 µs with the WAL index in memory (`unix-excl`, which this VFS replaced).
/// A store also keeps two fewer files and file descriptors.
pub const VFS: &str = "storehost";

/// Registers [`VFS`] with SQLite (once per process; later calls cost nothing).
pub fn register_vfs() -> rusqlite::Result<()> {
    match crate::vfs::register() {
        rusqlite::ffi::SQLITE_OK => Ok(()),
        rc => Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some(format!("could not register the SQLite VFS {VFS:?}")),
        )),
    }
}

/// The WAL file is kept (truncated to this many bytes) when the last connection closes, so
/// reopening a hibernated store's database creates no file (see [`keep_wal`]).
pub(crate) const WAL_SIZE_LIMIT: &str = "4194304";

/// The tables a host database needs, made when it opens (see [`Schema::apply`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schema {
    /// Statements that make the tables; no-ops when they exist (`IF NOT EXISTS`).
    sql: &'static [&'static str],
    /// Brings a database made from other statements (an older host's) up to date, after
    /// `sql`: a change that needs an upgrade changes `sql` too, so old databases run it.
    upgrade: Option<fn(&Connection) -> rusqlite::Result<()>>,
    /// What the database's `user_version` holds once this schema is in it: a checksum of
    /// `sql` (FNV-1a, stable across builds and hosts), positive and never 0 (a new file).
    /// Computed at compile time: hashing the statements on every open took 3–4 µs of a
    /// `store.db` reopen (~90 µs).
    stamp: i64,
}

/// [`Schema::stamp`] of `sql`.
const fn stamp(sql: &[&str]) -> i64 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < sql.len() {
        let bytes = sql[i].as_bytes();
        let mut j = 0;
        while j < bytes.len() {
            hash ^= bytes[j] as u32;
            hash = hash.wrapping_mul(0x0100_0193);
            j += 1;
        }
        i += 1;
    }
    (hash & 0x7fff_ffff) as i64 | 1
}

impl Schema {
    /// No tables: a second connection to a database already opened with its schema.
    pub(crate) const NONE: Schema = Schema::of(&[]);

    /// The tables `sql` makes.
    pub(crate) const fn of(sql: &'static [&'static str]) -> Self {
        Self {
            sql,
            upgrade: None,
            stamp: stamp(sql),
        }
    }

    /// [`Schema::of`], with an upgrade for databases made from other statements.
    pub(crate) const fn with_upgrade(
        sql: &'static [&'static str],
        upgrade: fn(&Connection) -> rusqlite::Result<()>,
    ) -> Self {
        Self {
            upgrade: Some(upgrade),
            ..Self::of(sql)
        }
    }

    /// Makes the tables unless the database's `user_version` says they are made from these
    /// very statements; answers whether it wrote. The statements, the upgrade and the stamp
    /// commit together, so a crash leaves either the old database or the whole new schema.
    /// Reading the stamp instead spares every reopen (a store waking from hibernation) the
    /// statements' parsing, which SQLite does whether the tables exist or not: 50–130 µs of
    /// opening `store.db` measured here.
    fn apply(&self, conn: &Connection) -> rusqlite::Result<bool> {
        if self.sql.is_empty() {
            return Ok(false);
        }
        let stamp = self.stamp;
        let current: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if current == stamp {
            return Ok(false);
        }
        let tx = conn.unchecked_transaction()?;
        for sql in self.sql {
            tx.execute_batch(sql)?;
        }
        if let Some(upgrade) = self.upgrade {
            upgrade(&tx)?;
        }
        tx.pragma_update(None, "user_version", stamp)?;
        tx.commit()?;
        Ok(true)
    }
}

/// Opens (creating if needed) a database file in WAL mode with the durability asked for, and
/// makes `schema`'s tables before it returns.
///
/// Under [`Durability::Process`], a file that is new or whose WAL is empty (a store waking from
/// hibernation: closing checkpointed the WAL into the database, fsynced it, and truncated the
/// WAL) opens without fsyncs (`synchronous=OFF` until `schema` has run and the WAL has its
/// header, see [`start_wal`]). Only the WAL's header would be synced: SQLite fsyncs it whenever
/// it starts a WAL, which under `NORMAL` is the only fsync outside checkpoints, and it was most
/// of the cost of creating a store and of its first commit after a wake (measured here: first
/// commit after reopening p50 0.39–0.46 ms with it, 0.02 ms without). It guards against a
/// restarted WAL's frames reaching the disk out of order with frames of the WAL before it; an
/// empty WAL has none. A process crash never loses written pages; a power loss before the next
/// checkpoint leaves at worst torn frames, which SQLite's checksums discard.
///
/// Its WAL is checkpointed by the host's checkpoint threads, not by its commits (see
/// [`crate::checkpoint`]).
pub(crate) fn open(
    path: &Path,
    durability: Durability,
    schema: &Schema,
) -> rusqlite::Result<Connection> {
    open_with(path, durability, schema, &checkpoint::BACKGROUND)
}

/// [`open`], with the WAL checkpointed by `checkpointer`.
pub(crate) fn open_with(
    path: &Path,
    durability: Durability,
    schema: &Schema,
    checkpointer: &Checkpointer,
) -> rusqlite::Result<Connection> {
    open_inner(path, durability, schema, checkpointer, false)
}

/// [`open`] for a file in a scratch directory that nobody uses before it is complete and
/// renamed into place (a spare store being built): a new file switches to WAL without a
/// rollback journal whatever the durability. Under power durability the journal repairs a
/// power loss in the middle of that switch; such a file goes with its scratch directory.
pub(crate) fn create_in_scratch(
    path: &Path,
    durability: Durability,
    schema: &Schema,
) -> rusqlite::Result<Connection> {
    open_inner(path, durability, schema, &checkpoint::BACKGROUND, true)
}

fn open_inner(
    path: &Path,
    durability: Durability,
    schema: &Schema,
    checkpointer: &Checkpointer,
    scratch: bool,
) -> rusqlite::Result<Connection> {
    let new = !path.exists();
    let wal_empty = std::fs::metadata(wal_path(path)).map_or(true, |m| m.len() == 0);
    register_vfs()?;
    let mut conn = Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), VFS)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let synchronous = synchronous(durability);
    let unsynced = (new || wal_empty) && durability == Durability::Process;
    conn.pragma_update(
        None,
        "synchronous",
        if unsynced { "OFF" } else { synchronous },
    )?;
    keep_wal(&conn)?;
    if new && (scratch || durability == Durability::Process) {
        // A new file switches to WAL by writing its first page, in one `pwrite`: a kill
        // cannot tear it (the file is then empty, a valid empty database, or whole), so
        // under process durability the rollback journal that would guard the switch is only
        // two more file-system operations (creating and deleting `-journal`) per database.
        conn.pragma_update(None, "journal_mode", "OFF")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    checkpointer.watch(&mut conn, path, synchronous)?;
    let wrote = schema.apply(&conn)?;
    if unsynced {
        if !wrote {
            start_wal(&conn)?;
        }
        conn.pragma_update(None, "synchronous", synchronous)?;
    }
    Ok(conn)
}

pub(crate) fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// Makes SQLite start the WAL now, writing its header (a commit that rewrites the header's
/// `user_version` with its own value: one frame, nothing changed), so the first real commit
/// appends to a WAL that is already started and does not sync its header.
fn start_wal(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    conn.pragma_update(None, "user_version", version)
}

/// Keeps the `-wal` file when the connection is the last to close (SQLite's
/// `SQLITE_FCNTL_PERSIST_WAL`; the WAL is checkpointed and truncated all the same). Deleting
/// and creating it again cost a hibernated store much of its wake: measured here, reopening
/// a closed database and committing took p50 0.8–1.0 ms with the files deleted, 0.2–0.35 ms
/// kept (before [`VFS`] did away with the `-shm` file).
///
/// rusqlite has no safe wrapper for file controls (the crate's other `unsafe` code is the VFS,
/// [`crate::vfs`]).
#[allow(unsafe_code)]
fn keep_wal(conn: &Connection) -> rusqlite::Result<()> {
    let mut keep: std::ffi::c_int = 1;
    // SAFETY: the handle is open for the borrow of `conn`; the control reads and writes one
    // int through the pointer, which outlives the call.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            std::ptr::from_mut(&mut keep).cast(),
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some("could not keep the WAL file on close (SQLITE_FCNTL_PERSIST_WAL)".into()),
        ))
    }
}

/// The largest WAL a store's database keeps as it is when the store closes its files after a
/// long hibernation (see [`keep_small_wal_on_close`]).
pub const IDLE_CLOSE_KEEPS_WAL_UP_TO: u64 = 64 * 1024;

/// Lets `conn`, the writer of the database at `path`, close without checkpointing when its WAL
/// file holds at most [`IDLE_CLOSE_KEEPS_WAL_UP_TO`] bytes; answers whether it will. For a store
/// closing its files after a long hibernation: the frames stay in the WAL, which the next open
/// reads back, instead of being copied into the database with an fsync of each file and the
/// WAL truncated. Those closes ran beside other stores' wakes on the host's few cores: profiled
/// in the `hibernation` bench (quick, files closed), the closing threads took 37% of the CPU
/// while stores woke; skipping the small checkpoints made the cold wake's p99 lower in four
/// alternating runs of four (1.58–1.90 against 1.88–2.74 ms; p50 0.87–1.10 against 0.88–1.29
/// ms). Nothing committed is at risk: the frames are in the WAL file as after any commit
/// (under `synchronous=NORMAL` a commit does not wait for them to reach the disk, and under
/// `FULL` it did); a larger WAL is checkpointed as before, so no store asleep with its files
/// closed keeps more than this beside each database.
pub(crate) fn keep_small_wal_on_close(conn: &Connection, path: &Path) -> bool {
    let small =
        std::fs::metadata(wal_path(path)).is_ok_and(|wal| wal.len() <= IDLE_CLOSE_KEEPS_WAL_UP_TO);
    if !small {
        return false;
    }
    match conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    ) {
        Ok(_) => true,
        Err(err) => {
            tracing::debug!("{}: checkpointed on close after all: {err}", path.display());
            false
        }
    }
}

/// Lets `conn` keep at most `pages` pages in its cache. SQLite keeps every page a connection
/// has read or written until its cache is full (2 MB by default), also pages it will never
/// use again.
pub(crate) fn cap_page_cache(conn: &Connection, pages: u32) -> rusqlite::Result<()> {
    conn.pragma_update(None, "cache_size", pages)
}

/// Lets `conn` keep at most `bytes` of page cache (SQLite's `cache_size` in KiB, rounded
/// down; at least 1 KiB).
pub(crate) fn cap_page_cache_bytes(conn: &Connection, bytes: u64) -> rusqlite::Result<()> {
    let kib = i64::try_from(bytes / 1024).unwrap_or(i64::MAX).max(1);
    conn.pragma_update(None, "cache_size", -kib)
}

/// The primary result code and message of the last call on `conn` that failed (SQLite keeps
/// them until the next call), for host code that only learns afterwards what a failure did.
#[allow(unsafe_code)]
pub(crate) fn last_error(conn: &Connection) -> (i32, String) {
    // SAFETY: the handle is open for the borrow of `conn`; SQLite's message is a
    // NUL-terminated string it owns until the next call, copied here before any other.
    unsafe {
        let handle = conn.handle();
        let code = rusqlite::ffi::sqlite3_errcode(handle) & 0xff;
        let message = rusqlite::ffi::sqlite3_errmsg(handle);
        let message = if message.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(message)
                .to_string_lossy()
                .into_owned()
        };
        (code, message)
    }
}

/// The bytes of heap `conn`'s page cache holds now (SQLite's `SQLITE_DBSTATUS_CACHE_USED`;
/// cheap: SQLite counts the pages, it reads nothing).
#[allow(unsafe_code)]
pub(crate) fn cache_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let (mut current, mut highwater) = (0, 0);
    // SAFETY: the handle is open for the borrow of `conn`; SQLite writes the two ints through
    // the pointers, which outlive the call.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_status(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_USED,
            &mut current,
            &mut highwater,
            0,
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(u64::try_from(current).unwrap_or(0))
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some("could not read the page cache's size (SQLITE_DBSTATUS_CACHE_USED)".into()),
        ))
    }
}

/// Opens a read-only connection to a database another connection writes (also one a running
/// store has open).
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    open_existing(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
}

/// Opens a second connection (`flags`: read-only or read-write) to a database another
/// connection of this process has open; never creates the file. Like every connection to a
/// store's database, it keeps the WAL file should it close last.
pub(crate) fn open_existing(
    path: &Path,
    flags: rusqlite::OpenFlags,
) -> rusqlite::Result<Connection> {
    open_existing_via(path, flags, VFS)
}

/// [`open_existing`] through the SQLite VFS `vfs`.
pub(crate) fn open_existing_via(
    path: &Path,
    flags: rusqlite::OpenFlags,
    vfs: &str,
) -> rusqlite::Result<Connection> {
    if vfs == VFS {
        register_vfs()?;
    }
    let conn = Connection::open_with_flags_and_vfs(
        path,
        flags | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        vfs,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    keep_wal(&conn)?;
    Ok(conn)
}

/// A read-only connection opened on first use and closed while its store hibernates (it then
/// costs neither memory nor file descriptors).
pub(crate) struct LazyReader {
    path: std::path::PathBuf,
    /// The most pages its cache keeps (`None`: SQLite's default, 2 MB).
    cache_pages: Option<u32>,
    conn: std::sync::Mutex<Option<Connection>>,
    /// Told each time the reader opens its file (see [`LazyReader::signalling`]).
    opened: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl LazyReader {
    /// A reader of the database at `path`, opened when first used: a store that is only
    /// written to (most are, between their owners' visits) never opens it.
    pub(crate) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            cache_pages: None,
            conn: std::sync::Mutex::new(None),
            opened: None,
        }
    }

    /// This reader, telling `opened` each time it opens its file: its store closed its files
    /// and does not otherwise wake to close them again.
    pub(crate) fn signalling(self, opened: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self {
            opened: Some(opened),
            ..self
        }
    }

    /// [`LazyReader::new`], its page cache capped at `pages` (see [`cap_page_cache`]).
    pub(crate) fn with_page_cache(path: &Path, pages: u32) -> Self {
        Self {
            cache_pages: Some(pages),
            ..Self::new(path)
        }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = open_reader(&self.path)?;
        if let Some(pages) = self.cache_pages {
            cap_page_cache(&conn, pages)?;
        }
        if let Some(opened) = &self.opened {
            opened.notify_one();
        }
        Ok(conn)
    }

    /// Runs `work` on the connection, opening it first when it is closed.
    pub(crate) fn with<T>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut guard = lock(&self.conn);
        let conn = match &mut *guard {
            Some(conn) => conn,
            slot => slot.insert(self.open()?),
        };
        work(conn)
    }

    /// Hands back the connection's caches, if it is open (see [`release_memory`]).
    pub(crate) fn shrink(&self) {
        let guard = lock(&self.conn);
        if let Some(conn) = &*guard
            && let Err(err) = release_memory(conn)
        {
            tracing::debug!("could not shrink a reader's cache: {err}");
        }
    }

    /// Whether the connection is open now.
    pub(crate) fn is_open(&self) -> bool {
        lock(&self.conn).is_some()
    }

    /// Takes the connection out, if it is open, for the caller to close (the next use opens
    /// another).
    pub(crate) fn take(&self) -> Option<Connection> {
        lock(&self.conn).take()
    }
}

/// Moves the WAL checkpoints of `conn` — a connection to one of the host's own databases
/// (`host.db`), opened through SQLite's default VFS with `synchronous=NORMAL` — to the host's
/// checkpoint threads, as the stores' databases do: no commit waits for a checkpoint's copy and
/// fsyncs (timed inside the provisioning row, a webhook's registry write took 7.5 ms once while
/// SQLite checkpointed `host.db` inline; 0.1 ms otherwise).
pub fn checkpoint_in_background(conn: &mut Connection, path: &Path) -> rusqlite::Result<()> {
    checkpoint::BACKGROUND.watch_via(conn, path, "NORMAL", "unix")
}

/// Takes over `conn`, opened at another path by [`create_in_scratch`] (a spare store's, whose
/// directory has since become a store's), for the database now at `path`: its checkpoints are
/// watched at `path`. Everything else the connection was set up with stays.
pub(crate) fn adopt(
    mut conn: Connection,
    path: &Path,
    durability: Durability,
) -> rusqlite::Result<Connection> {
    let synchronous = synchronous(durability);
    // The spare's builder left its tables unsynced in the WAL; the store's last close
    // checkpoints them like everything the store writes.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        false,
    )?;
    checkpoint::BACKGROUND.watch(&mut conn, path, synchronous)?;
    Ok(conn)
}

/// The `synchronous` setting of a store's database under `durability`.
fn synchronous(durability: Durability) -> &'static str {
    match durability {
        Durability::Process => "NORMAL",
        Durability::Power => "FULL",
    }
}

/// Hands back what a connection holds in memory that it can rebuild on demand: its cached
/// prepared statements and its page cache (used when a store hibernates).
pub(crate) fn release_memory(conn: &Connection) -> rusqlite::Result<()> {
    conn.flush_prepared_statement_cache();
    conn.execute_batch("PRAGMA shrink_memory")
}

/// Starts `count` threads named `{name}-{n}` that take jobs from `queue` in turn and run
/// `work` on each, until the queue's senders are gone; answers how many started (a failure
/// to start one is logged).
pub(crate) fn serve_queue<T: Send + 'static>(
    name: &str,
    count: usize,
    queue: &std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<T>>>,
    work: fn(T),
) -> usize {
    let mut started = 0;
    for n in 0..count {
        let queue = queue.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{n}"))
            .spawn(move || {
                // The lock is released before the work: the others take the next jobs.
                while let Ok(job) = lock(&queue).recv() {
                    work(job);
                }
            });
        match spawned {
            Ok(_) => started += 1,
            Err(err) => tracing::error!("could not start thread {name}-{n}: {err}"),
        }
    }
    started
}

/// Locks a mutex that guards a connection or what follows one. A panic while holding it cannot
/// leave SQLite half-written (its transaction rolls back), so a poisoned lock is safe to keep
/// using.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub use crate::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    const T: Schema = Schema::of(&["CREATE TABLE IF NOT EXISTS t (v)"]);

    fn synchronous(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "synchronous", |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn closing_keeps_an_empty_wal_so_reopening_creates_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let conn = open(&path, Durability::Process, &T).unwrap();
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        drop(open_reader(&path).unwrap());
        drop(conn);
        let wal = std::fs::metadata(dir.path().join("x.db-wal")).expect("the WAL is kept");
        assert_eq!(wal.len(), 0, "checkpointed and truncated on close");
        assert!(
            !dir.path().join("x.db-shm").exists(),
            "the WAL index lives in memory, not in a -shm file"
        );

        let conn = open(&path, Durability::Process, &Schema::NONE).unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 1, "the row was checkpointed into the database");
    }

    /// Run by [`another_process_cannot_open_a_database_the_host_has_open`] in a child process.
    #[test]
    #[ignore = "a helper run in a child process"]
    fn child_tries_to_read_the_database() {
        let path = std::env::var("STOREHOST_CHILD_DB").expect("run by the parent test");
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_millis(100)).unwrap();
        let read = conn.query_row("SELECT count(*) FROM t", [], |row| row.get::<_, i64>(0));
        let err = read.expect_err("the host holds the database");
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy),
            "{err}"
        );
    }

    #[test]
    fn another_process_cannot_open_a_database_the_host_has_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let conn = open(&path, Durability::Process, &T).unwrap();
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let reader = open_reader(&path).unwrap();
        let child = |path: &Path| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "sqlite::tests::child_tries_to_read_the_database"])
                .args(["--ignored", "--nocapture", "--test-threads=1"])
                .env("STOREHOST_CHILD_DB", path)
                .output()
                .unwrap()
        };
        let refused = child(&path);
        assert!(
            refused.status.success(),
            "another process was refused: {}",
            String::from_utf8_lossy(&refused.stdout)
        );
        // Inside the process, connections share the database as before.
        let rows: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        // Once the host closes it, the file is anyone's again (the child's assertion fails).
        drop(reader);
        drop(conn);
        assert!(!child(&path).status.success(), "readable once closed");
    }

    #[test]
    fn an_idle_close_keeps_a_small_wal_as_it_is_and_checkpoints_a_large_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let wal = dir.path().join("x.db-wal");
        let conn = open(&path, Durability::Process, &T).unwrap();
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert!(keep_small_wal_on_close(&conn, &path));
        drop(conn);
        let kept = std::fs::metadata(&wal).unwrap().len();
        assert!(
            kept > 0 && kept <= IDLE_CLOSE_KEEPS_WAL_UP_TO,
            "the frames stay in the WAL ({kept} bytes)"
        );
        assert!(!dir.path().join("x.db-shm").exists());

        // A reader opened first (a backup of the sleeping store) reads them back too.
        let reader = open_reader(&path).unwrap();
        assert_eq!(count(&reader, "t"), 1);
        drop(reader);

        // The next open reads them back: nothing is lost, and commits go on after them.
        let conn = open(&path, Durability::Process, &Schema::NONE).unwrap();
        assert_eq!(count(&conn, "t"), 1);
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))", [])
            .unwrap();
        assert!(
            !keep_small_wal_on_close(&conn, &path),
            "a WAL past the limit is checkpointed"
        );
        drop(conn);
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            0,
            "checkpointed, emptied"
        );
        let conn = open(&path, Durability::Process, &Schema::NONE).unwrap();
        assert_eq!(count(&conn, "t"), 2, "every row is in the database");
    }

    #[test]
    fn reopening_with_an_empty_wal_starts_it_before_the_first_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let wal = dir.path().join("x.db-wal");
        let conn = open(&path, Durability::Process, &T).unwrap();
        conn.pragma_update(None, "user_version", 7).unwrap();
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        drop(conn);
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);

        let conn = open(&path, Durability::Process, &Schema::NONE).unwrap();
        assert!(
            std::fs::metadata(&wal).unwrap().len() > 0,
            "the WAL was started (header written, unsynced) while opening"
        );
        assert_eq!(
            synchronous(&conn),
            1,
            "back to NORMAL for every later commit"
        );
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, 7, "starting the WAL changed nothing");
        conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        drop(conn);

        // Under power durability the WAL is started by the first commit, with its fsync.
        let conn = open(&path, Durability::Power, &Schema::NONE).unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 2);
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .unwrap()
    }

    /// A schema whose statements leave a trace each time they run.
    const COUNTED: Schema = Schema::of(&[
        "CREATE TABLE IF NOT EXISTS t (v)",
        "INSERT INTO t VALUES ('schema ran')",
    ]);

    #[test]
    fn reopening_reads_the_stamp_instead_of_running_the_schema_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        for _ in 0..3 {
            drop(open(&path, Durability::Process, &COUNTED).unwrap());
        }
        let conn = open(&path, Durability::Process, &COUNTED).unwrap();
        assert_eq!(
            count(&conn, "t"),
            1,
            "the statements ran once, when the file was new"
        );
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, COUNTED.stamp);
        assert_ne!(
            COUNTED.stamp,
            Schema::of(&["CREATE TABLE IF NOT EXISTS t (v)"]).stamp,
            "other statements, another stamp"
        );
    }

    fn add_u(conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch("INSERT INTO u VALUES ('upgraded')")
    }

    fn failing_upgrade(conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch("INSERT INTO u VALUES ('half an upgrade')")?;
        Err(rusqlite::Error::InvalidQuery)
    }

    #[test]
    fn a_database_made_by_other_statements_is_upgraded_all_at_once_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        drop(open(&path, Durability::Process, &COUNTED).unwrap());

        const BROKEN: Schema = Schema::with_upgrade(
            &[
                "CREATE TABLE IF NOT EXISTS t (v)",
                "CREATE TABLE IF NOT EXISTS u (w)",
            ],
            failing_upgrade,
        );
        assert!(open(&path, Durability::Process, &BROKEN).is_err());
        let conn = open(&path, Durability::Process, &COUNTED).unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'u'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "nothing of the failed upgrade is kept");
        assert_eq!(
            count(&conn, "t"),
            1,
            "the old stamp still stands: nothing ran again"
        );
        drop(conn);

        const NEWER: Schema = Schema::with_upgrade(
            &[
                "CREATE TABLE IF NOT EXISTS t (v)",
                "CREATE TABLE IF NOT EXISTS u (w)",
            ],
            add_u,
        );
        drop(open(&path, Durability::Process, &NEWER).unwrap());
        let conn = open(&path, Durability::Process, &NEWER).unwrap();
        assert_eq!(count(&conn, "u"), 1, "the upgrade ran once");
        assert_eq!(count(&conn, "t"), 1, "the data before it is kept");
    }

    #[test]
    fn a_file_made_in_scratch_is_a_whole_wal_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let conn = create_in_scratch(&path, Durability::Process, &COUNTED).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(synchronous(&conn), 1, "NORMAL once made");
        drop(conn);
        assert!(!dir.path().join("x.db-journal").exists());
        let conn = open(&path, Durability::Process, &COUNTED).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal", "WAL is the file's own mode, kept");
        assert_eq!(count(&conn, "t"), 1, "made once, stamped");
    }

    #[test]
    fn new_files_end_at_the_durability_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        for (name, durability, level) in [
            ("n.db", Durability::Process, 1), // NORMAL, after creating without fsyncs
            ("p.db", Durability::Power, 2),   // FULL
        ] {
            let conn = open(&dir.path().join(name), durability, &T).unwrap();
            assert_eq!(synchronous(&conn), level, "{durability:?}, new file");
            drop(conn);
            let conn = open(&dir.path().join(name), durability, &Schema::NONE).unwrap();
            assert_eq!(synchronous(&conn), level, "{durability:?}, reopened");
        }
    }
}
