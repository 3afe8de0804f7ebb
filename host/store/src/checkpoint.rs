//! Checkpoints off the commit path.
//!
//! SQLite's default checkpoints a WAL inside the commit that takes it past 1,000 pages: that
//! commit also copies every page into the database and fsyncs both files. On this machine's
//! disk that is tens of milliseconds, paid by whichever event, query or API append happened to
//! commit, and for `store.db` it blocked an async worker. It was the round trip's tail: 2,000
//! events/s over 20 stores on this ext4 disk, p99 72–152 ms with SQLite's checkpoints, 6.6–23 ms
//! with these (and 6.4–17 ms with no checkpoints at all).
//!
//! Instead each store database hands that work to a few host-wide threads. Its connection's WAL
//! hook (run after every commit, with the WAL's size) queues the database once it passes
//! [`QUEUE_AT`] pages; a checkpoint thread opens a connection of its own on the file (this
//! process may: see [`crate::sqlite::VFS`]), runs a `PASSIVE` checkpoint — which never blocks the
//! writer nor waits for it — and closes it. The writer restarts the WAL at its next commit once
//! every frame is in the database. Should the threads fall behind, a commit that finds the WAL
//! past [`CHECKPOINT_INLINE_AT`] pages checkpoints it itself, as SQLite would, so a WAL stays
//! bounded whatever the load.
//!
//! Nothing opens a database behind its store's back: a checkpoint runs only while the store's
//! own connection is open, and closing that connection waits for one in progress.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::Duration;

use rusqlite::Connection;

use crate::sqlite::lock;

/// WAL pages after which a commit queues its database for a checkpoint (SQLite's own default
/// for checkpointing inline).
pub(crate) const QUEUE_AT: i32 = 1_000;

/// WAL pages after which a commit checkpoints inline, because the threads are behind.
pub(crate) const CHECKPOINT_INLINE_AT: i32 = 8 * QUEUE_AT;

/// Threads running checkpoints for the whole host: the work is mostly waiting for fsyncs, and
/// more of them at once would only queue on the disk.
const THREADS: usize = 2;

/// The host's checkpoint threads, started on first use (should none start, the inline
/// checkpoints bound every WAL all the same).
pub(crate) static BACKGROUND: LazyLock<Checkpointer> = LazyLock::new(|| {
    let checkpointer = Checkpointer::new();
    crate::sqlite::serve_queue("sqlite-checkpoint", THREADS, &checkpointer.queue, |wal| {
        wal.checkpoint();
    });
    checkpointer
});

/// A queue of databases whose WAL wants checkpointing, and the threads that serve it.
pub(crate) struct Checkpointer {
    send: mpsc::Sender<Arc<Wal>>,
    queue: Arc<Mutex<mpsc::Receiver<Arc<Wal>>>>,
}

impl Checkpointer {
    /// A queue nobody serves yet.
    fn new() -> Self {
        let (send, receive) = mpsc::channel();
        Self {
            send,
            queue: Arc::new(Mutex::new(receive)),
        }
    }

    /// Hands `conn`'s checkpoints (the database at `path`, checkpointed with `synchronous`, the
    /// connection's own setting) to this checkpointer, replacing SQLite's inline ones.
    pub(crate) fn watch(
        &self,
        conn: &mut Connection,
        path: &Path,
        synchronous: &'static str,
    ) -> rusqlite::Result<()> {
        self.watch_via(conn, path, synchronous, crate::sqlite::VFS)
    }

    /// [`Checkpointer::watch`] for a connection opened through the SQLite VFS `vfs` (the
    /// checkpoint's own connection goes through the same one).
    pub(crate) fn watch_via(
        &self,
        conn: &mut Connection,
        path: &Path,
        synchronous: &'static str,
        vfs: &'static str,
    ) -> rusqlite::Result<()> {
        let wal = Arc::new(Wal {
            path: path.to_owned(),
            vfs,
            synchronous,
            queued: AtomicBool::new(false),
            writer_open: Mutex::new(true),
        });
        // Owned by the hook, which SQLite drops when `conn` closes.
        let registered = Registered(wal);
        let send = self.send.clone();
        conn.wal_hook(Some(move |hook: &mut rusqlite::hooks::Wal, pages| {
            let wal = &registered.0;
            if pages >= CHECKPOINT_INLINE_AT {
                // An error here would fail a commit that has happened; the next one tries again.
                if let Err(err) = hook.checkpoint() {
                    tracing::debug!("inline checkpoint of {} failed: {err}", wal.path.display());
                }
            } else if pages >= QUEUE_AT && !wal.queued.swap(true, Ordering::AcqRel) {
                // Fails only without threads; the inline checkpoints bound the WAL then.
                let _ = send.send(wal.clone());
            }
            Ok(())
        }))
    }

    /// Runs every checkpoint queued so far on the calling thread (a checkpointer nobody
    /// serves); answers how many ran.
    #[cfg(test)]
    fn run_queued(&self) -> usize {
        let mut ran = 0;
        while let Ok(wal) = lock(&self.queue).try_recv() {
            ran += usize::from(wal.checkpoint());
        }
        ran
    }
}

/// One database whose checkpoints run off its commits.
struct Wal {
    path: PathBuf,
    /// The SQLite VFS the database is opened through.
    vfs: &'static str,
    synchronous: &'static str,
    /// Queued and not yet checkpointed: a database is in the queue at most once.
    queued: AtomicBool,
    /// Whether the store's own connection is still open; held while a checkpoint runs.
    writer_open: Mutex<bool>,
}

impl Wal {
    /// Copies the WAL's frames into the database, with a connection of its own, if the store's
    /// connection is still open; answers whether it ran.
    fn checkpoint(&self) -> bool {
        let writer_open = lock(&self.writer_open);
        let ran = *writer_open;
        if ran && let Err(err) = self.checkpoint_now() {
            tracing::debug!("could not checkpoint {}: {err}", self.path.display());
        }
        drop(writer_open);
        self.queued.store(false, Ordering::Release);
        ran
    }

    fn checkpoint_now(&self) -> rusqlite::Result<()> {
        // The store's connection stays open meanwhile (closing it waits for this one).
        let conn = crate::sqlite::open_existing_via(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
            self.vfs,
        )?;
        conn.busy_timeout(Duration::from_secs(1))?;
        conn.pragma_update(None, "journal_size_limit", crate::sqlite::WAL_SIZE_LIMIT)?;
        conn.pragma_update(None, "synchronous", self.synchronous)?;
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
    }
}

/// Marks the store's connection closed when SQLite drops its WAL hook, after waiting for a
/// checkpoint in progress.
struct Registered(Arc<Wal>);

impl Drop for Registered {
    fn drop(&mut self) {
        *lock(&self.0.writer_open) = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::{self, Durability};

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    /// Commits `n` rows of a page each, one per transaction.
    fn commit_rows(conn: &Connection, n: usize) {
        for _ in 0..n {
            conn.execute("INSERT INTO t VALUES (zeroblob(3500))", [])
                .unwrap();
        }
    }

    fn open(dir: &Path, checkpointer: &Checkpointer) -> (PathBuf, Connection) {
        let path = dir.join("x.db");
        let conn = sqlite::open_with(
            &path,
            Durability::Process,
            &sqlite::Schema::of(&["CREATE TABLE t (v)"]),
            checkpointer,
        )
        .unwrap();
        (path, conn)
    }

    #[test]
    fn a_commit_past_the_threshold_queues_its_database_once_and_checkpoints_nothing_itself() {
        let dir = tempfile::tempdir().unwrap();
        let checkpointer = Checkpointer::new();
        let (path, conn) = open(dir.path(), &checkpointer);
        let db_before = size(&path);

        commit_rows(&conn, 2_000); // ≥ 2,000 WAL frames
        assert_eq!(
            size(&path),
            db_before,
            "no commit copied pages into the database (SQLite's inline checkpoint would have)"
        );

        assert_eq!(checkpointer.run_queued(), 1, "queued once, not per commit");
        assert!(
            size(&path) > 2_000 * 4096,
            "the checkpoint moved the WAL's pages into the database"
        );
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let in_wal: i64 = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
            .unwrap();
        assert!(
            in_wal < 10,
            "the commit after a complete checkpoint restarted the WAL ({in_wal} frames)"
        );

        commit_rows(&conn, 1_500);
        assert_eq!(
            checkpointer.run_queued(),
            1,
            "queued again once checkpointed"
        );
    }

    /// The host's own database (`host.db`) goes through SQLite's default VFS.
    #[test]
    fn a_database_of_the_default_vfs_is_checkpointed_off_its_commits_too() {
        let dir = tempfile::tempdir().unwrap();
        let checkpointer = Checkpointer::new();
        let path = dir.path().join("host.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
        conn.execute_batch("CREATE TABLE t (v)").unwrap();
        checkpointer
            .watch_via(&mut conn, &path, "NORMAL", "unix")
            .unwrap();
        let db_before = size(&path);

        commit_rows(&conn, 1_500);
        assert_eq!(
            size(&path),
            db_before,
            "no commit copied pages into the database (SQLite's inline checkpoint would have)"
        );
        assert_eq!(checkpointer.run_queued(), 1);
        assert!(
            size(&path) > 1_500 * 4096,
            "the checkpoint, through the default VFS, moved the WAL's pages into the database"
        );
    }

    #[test]
    fn a_wal_the_threads_leave_behind_is_checkpointed_by_its_commits() {
        let dir = tempfile::tempdir().unwrap();
        let checkpointer = Checkpointer::new();
        let (path, conn) = open(dir.path(), &checkpointer);

        commit_rows(&conn, 12_000); // ≥ 12,000 WAL frames, nobody serving the queue
        let frame = 4096 + 24;
        let most = u64::try_from(CHECKPOINT_INLINE_AT).unwrap() + 100;
        assert!(
            size(&sqlite::wal_path(&path)) < most * frame,
            "the WAL stayed bounded"
        );
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 12_000);
    }

    #[test]
    fn a_database_closed_before_its_checkpoint_ran_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let checkpointer = Checkpointer::new();
        let (path, conn) = open(dir.path(), &checkpointer);
        commit_rows(&conn, 1_100);
        drop(conn);
        assert_eq!(
            size(&sqlite::wal_path(&path)),
            0,
            "closing checkpointed and emptied the WAL"
        );

        assert_eq!(
            checkpointer.run_queued(),
            0,
            "queued, but not run once closed"
        );
    }

    #[test]
    fn the_host_checkpoints_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let conn = sqlite::open(
            &path,
            Durability::Process,
            &sqlite::Schema::of(&["CREATE TABLE t (v)"]),
        )
        .unwrap();
        let db_before = size(&path);
        commit_rows(&conn, 1_100);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while size(&path) == db_before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint thread moved the WAL into the database"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
