//! Spare store directories, prepared ahead of time: a new store takes one with a single rename
//! instead of creating its two directories and four database files while its provisioning
//! request waits (on this machine's disk a file creation costs up to a millisecond; a rename
//! tens of microseconds).
//!
//! Spares live in `DATA_DIR/stores/.spare/<n>/` (a name no store id can have), each a complete,
//! empty store directory: `files/`, and `events.db` and `store.db` with their schemas (under
//! process durability still in their WALs, never synced). A single builder thread makes them
//! while no store is being created. One is built in `.spare/.building-<n>` and renamed into
//! place when complete, so a crash never leaves a half-built spare where a store could take it;
//! leftovers are deleted when the pool opens. Their files hold nothing that names a store.
//!
//! The builder also keeps each spare's two databases open, and the store that takes the spare
//! adopts those connections: opening a database file is the slowest part of a new store (with
//! SQLite's `unix-excl` VFS, which walked a list of every database file the process had open
//! for each file it opened, `events.db` took p50 1.65 ms to open beside 1,200 running stores;
//! [`crate::vfs`] does away with the list). A connection stays valid when its directory is
//! renamed, and its last close still checkpoints and empties the WAL ([`crate::vfs`] does not
//! report the file as moved, which would make SQLite skip that checkpoint). Spares found at
//! start are opened by their store, as before.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::config::DbConfig;

use crate::sqlite::{self, Durability, lock};

const SPARE_DIR: &str = ".spare";

/// How long no store may have asked for a spare before the builder makes the next one, while at
/// least half the pool is ready: the request that took one (its answer, its first event) then
/// has the CPU and the disk to itself. Measured here over 200 webhooks, one after another and
/// 10 a second: p50 2.1–3.0 / 4.3–6.8 ms building at once, 3.1–3.4 / 3.0–3.2 ms after 3 ms,
/// 7.5–8.1 / 3.1–3.3 ms after 20 ms (the pool then drains in a burst and stores create their
/// files in place, slower on this disk).
///
/// Below half the pool the builder does not wait: in a burst the quiet never comes, the pool
/// would drain and every store after it would create its files while its request waits. With
/// 16 spares, 200 webhooks one after another: p50 1.65–1.86 ms building at once below half,
/// 2.42–2.44 ms waiting for quiet; 10 a second (the pool stays above half): unchanged.
const QUIET: Duration = Duration::from_millis(3);
const BUILDING: &str = ".building-";

/// The pool of spare store directories of one data directory.
#[derive(Debug)]
pub struct SpareStores {
    root: PathBuf,
    durability: Durability,
    target: usize,
    ready: Mutex<Vec<Ready>>,
    stopped: AtomicBool,
    next: AtomicU64,
    /// When a store last asked for a spare, and how long after it the builder waits.
    last_taken: Mutex<Option<Instant>>,
    quiet: Duration,
    /// How [`SpareStores::refill`] wakes the builder.
    signal: Arc<Signal>,
    /// The builder thread, started by the first refill and joined by [`SpareStores::stop`].
    builder: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A spare ready to be taken.
#[derive(Debug)]
struct Ready {
    path: PathBuf,
    /// Its databases, open since the builder made them (`None` for spares found at start).
    open: Option<OpenSpare>,
}

/// A spare's databases, opened and set up by the builder, for the store that takes it.
pub struct OpenSpare {
    pub(crate) events: Connection,
    pub(crate) store: Connection,
}

impl std::fmt::Debug for OpenSpare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSpare").finish_non_exhaustive()
    }
}

/// What the builder thread is asked to do next.
#[derive(Debug, Default)]
struct Signal {
    asked: Mutex<Asked>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Asked {
    refill: bool,
    stop: bool,
}

impl Signal {
    fn ask(&self, change: impl FnOnce(&mut Asked)) {
        change(&mut lock(&self.asked));
        self.wake.notify_all();
    }

    /// Waits `how_long`, or less if the end is asked for (`false`).
    fn pause(&self, how_long: Duration) -> bool {
        let asked = lock(&self.asked);
        let (asked, _) = self
            .wake
            .wait_timeout_while(asked, how_long, |asked| !asked.stop)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !asked.stop
    }

    /// Waits for a refill (`true`) or the end (`false`).
    fn next(&self) -> bool {
        let mut asked = lock(&self.asked);
        while !asked.refill && !asked.stop {
            asked = self
                .wake
                .wait(asked)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        std::mem::take(&mut asked.refill) && !asked.stop
    }
}

impl SpareStores {
    /// Opens the pool under `data_dir`, keeping up to `target` spares (0: none are made, and
    /// any left from an earlier run are deleted). Spares found complete are kept; half-built
    /// ones are deleted. Call [`SpareStores::refill`] to build the missing ones.
    pub fn open(data_dir: &Path, durability: Durability, target: usize) -> io::Result<Arc<Self>> {
        let root = data_dir.join("stores").join(SPARE_DIR);
        std::fs::create_dir_all(&root)?;
        let mut ready = Vec::new();
        let mut next = 0;
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let number = name.parse::<u64>().ok();
            let leftover = number.or_else(|| name.strip_prefix(BUILDING)?.parse().ok());
            if let Some(n) = leftover {
                next = next.max(n + 1);
            }
            let complete = number.is_some() && is_complete(&path);
            if complete && ready.len() < target {
                ready.push(Ready { path, open: None });
                continue;
            }
            let removed = if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            // A leftover that cannot be deleted is only litter: new spares get numbers after
            // it, and the host opens anyway.
            if let Err(err) = removed {
                tracing::warn!(path = %path.display(), "could not delete a leftover spare store directory: {err}");
            }
        }
        Ok(Arc::new(Self {
            root,
            durability,
            target,
            ready: Mutex::new(ready),
            stopped: AtomicBool::new(false),
            next: AtomicU64::new(next),
            last_taken: Mutex::new(None),
            quiet: QUIET,
            signal: Arc::default(),
            builder: Mutex::new(None),
        }))
    }

    /// How many spares are ready now.
    pub fn ready(&self) -> usize {
        lock(&self.ready).len()
    }

    /// Moves a spare to `dir` (which must not exist). `None` if there was none to take: the
    /// caller creates the directory itself. `Some` carries the spare's open databases when the
    /// builder kept them, for the store to adopt.
    pub fn take_into(&self, dir: &Path) -> Option<Option<OpenSpare>> {
        *lock(&self.last_taken) = Some(Instant::now());
        let spare = lock(&self.ready).pop()?;
        match std::fs::rename(&spare.path, dir) {
            Ok(()) => Some(spare.open),
            Err(err) => {
                tracing::warn!(spare = %spare.path.display(), "could not use a spare store directory (creating one instead): {err}");
                drop(spare.open);
                let _ = std::fs::remove_dir_all(&spare.path);
                None
            }
        }
    }

    /// Has the builder thread make spares until `target` are ready, each once no store has
    /// asked for one for a few milliseconds; returns at once. A call while it builds changes nothing:
    /// it fills the pool before it waits again. The thread lives as long as the pool (starting
    /// one per refill cost the provisioning request that called it 50–100 µs).
    pub fn refill(self: &Arc<Self>) {
        if self.target == 0 || self.stopped.load(Ordering::Acquire) {
            return;
        }
        let mut builder = lock(&self.builder);
        if builder.is_none() {
            let pool = Arc::downgrade(self);
            let signal = self.signal.clone();
            let started = std::thread::Builder::new()
                .name("storehost-spares".into())
                .spawn(move || build_on_request(&pool, &signal));
            match started {
                Ok(handle) => *builder = Some(handle),
                Err(err) => {
                    tracing::warn!("could not start preparing spare store directories: {err}");
                    return;
                }
            }
        }
        drop(builder);
        self.signal.ask(|asked| asked.refill = true);
    }

    /// Stops preparing spares (the host shuts down): a spare being built is finished, no
    /// other is started. Returns once the builder has let go of the directory, so the next
    /// host to open this data directory never finds a spare still being written. Blocks for
    /// at most one spare's build (a few file creations).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.signal.ask(|asked| asked.stop = true);
        let handle = lock(&self.builder).take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::warn!("the spare store builder panicked");
        }
    }

    /// Builds spares until `target` are ready or the pool stops, each after a quiet spell
    /// while at least half of them are ready, at once below that.
    fn fill(&self) {
        while self.ready() < self.target && !self.stopped.load(Ordering::Acquire) {
            let since = lock(&self.last_taken).map(|taken| taken.elapsed());
            let low = self.ready() * 2 < self.target;
            let wait = match since {
                Some(since) if !low => self.quiet.saturating_sub(since),
                _ => Duration::ZERO,
            };
            if !wait.is_zero() {
                if !self.signal.pause(wait) {
                    return;
                }
                continue;
            }
            match self.build_one() {
                Ok(spare) => lock(&self.ready).push(spare),
                Err(err) => {
                    tracing::warn!("could not prepare a spare store directory: {err}");
                    return;
                }
            }
        }
    }

    /// Builds one spare in a scratch directory and renames it into place, its databases kept
    /// open. Under process durability nothing is synced: closing checkpoints nothing, its
    /// tables stay in the WALs.
    fn build_one(&self) -> io::Result<Ready> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let building = self.root.join(format!("{BUILDING}{n}"));
        let built = (|| {
            std::fs::create_dir_all(building.join("files"))?;
            let create = |file: &str, schema| -> io::Result<Connection> {
                let conn = sqlite::create_in_scratch(&building.join(file), self.durability, schema)
                    .map_err(io::Error::other)?;
                if self.durability == Durability::Process {
                    // The tables stay in the WAL, written but never synced: closing checkpoints
                    // nothing, so building a spare waits for no fsync — nor do the store
                    // creations beside it, whose file-system journal commits those fsyncs
                    // would join. A power loss can drop such frames (their checksums tell),
                    // leaving an empty database whose tables the store's first open makes.
                    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
                        .map_err(io::Error::other)?;
                }
                Ok(conn)
            };
            let events = create("events.db", &crate::event_log::SCHEMA)?;
            // Spares built within one millisecond would share an epoch: a store removed and
            // created again from the next spare could get the one its log had before.
            crate::event_log::stamp_fresh_epoch(&events).map_err(io::Error::other)?;
            let open = OpenSpare {
                events,
                store: create("store.db", &crate::guest_db::SCHEMA)?,
            };
            let spare = self.root.join(n.to_string());
            std::fs::rename(&building, &spare)?;
            Ok(Ready {
                path: spare,
                open: Some(open),
            })
        })();
        if built.is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        built
    }
}

impl Drop for SpareStores {
    fn drop(&mut self) {
        // The builder holds the pool only while it builds; this ends its wait.
        self.signal.ask(|asked| asked.stop = true);
    }
}

/// The builder thread: fills the pool each time it is asked, until the pool stops or is gone.
fn build_on_request(pool: &Weak<SpareStores>, signal: &Signal) {
    while signal.next() {
        let Some(pool) = pool.upgrade() else { return };
        pool.fill();
    }
}

/// Whether `dir` holds everything a spare is made of.
fn is_complete(dir: &Path) -> bool {
    dir.join("files").is_dir() && dir.join("events.db").is_file() && dir.join("store.db").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_log::{EventLog, NewEvent};
    use crate::guest_db::GuestDb;

    fn an_event() -> NewEvent {
        NewEvent {
            event_type: "t".into(),
            payload: "{}".into(),
            idempotency_key: None,
            request_id: None,
        }
    }

    fn wait_ready(pool: &SpareStores, count: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pool.ready() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {count} spares were prepared",
                pool.ready()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A pool of `target` spares under process durability in a new data directory, filled.
    fn filled(target: usize) -> (tempfile::TempDir, Arc<SpareStores>) {
        let data = tempfile::tempdir().unwrap();
        let pool = SpareStores::open(data.path(), Durability::Process, target).unwrap();
        pool.refill();
        wait_ready(&pool, target);
        (data, pool)
    }

    #[test]
    fn the_pool_fills_hands_out_whole_directories_and_refills() {
        let data = tempfile::tempdir().unwrap();
        let pool = SpareStores::open(data.path(), Durability::Process, 2).unwrap();
        assert_eq!(pool.ready(), 0);
        pool.refill();
        wait_ready(&pool, 2);

        let dir = data.path().join("stores").join("taken");
        assert!(pool.take_into(&dir).is_some());
        assert!(
            is_complete(&dir),
            "the taken directory is a whole store directory"
        );
        assert_eq!(pool.ready(), 1);
        let log = EventLog::open(&dir.join("events.db"), Durability::Process).unwrap();
        assert_eq!(log.head().unwrap(), 0, "a spare's log is empty");
        let db = GuestDb::open(&dir.join("store.db"), Durability::Process, 1 << 20).unwrap();
        assert_eq!(db.cursor().unwrap(), 0, "a spare's cursor is at the start");

        pool.refill();
        wait_ready(&pool, 2);
        assert_eq!(
            std::fs::read_dir(data.path().join("stores").join(SPARE_DIR))
                .unwrap()
                .count(),
            2,
            "no scratch directory is left behind"
        );
    }

    #[test]
    fn a_store_adopts_the_spare_s_open_databases_and_closing_them_empties_both_wals() {
        let (data, pool) = filled(1);
        let dir = data.path().join("stores").join("taken");
        let open = pool
            .take_into(&dir)
            .expect("a spare was ready")
            .expect("the builder kept its databases open");
        let log =
            EventLog::adopt(&dir.join("events.db"), Durability::Process, open.events).unwrap();
        let db = GuestDb::adopt(
            &dir.join("store.db"),
            Durability::Process,
            open.store,
            1 << 20,
        )
        .unwrap();
        assert_eq!(log.append(vec![an_event()], "api").unwrap(), vec![1]);
        assert_eq!(log.head().unwrap(), 1);
        assert_eq!(db.cursor().unwrap(), 0);
        db.begin().unwrap();
        db.commit().unwrap();

        // Closed as a store closes its files: the log's connections, then store.db.
        drop(log.take_connections(false));
        drop(db);
        for file in ["events.db", "store.db"] {
            let wal = sqlite::wal_path(&dir.join(file));
            assert_eq!(
                std::fs::metadata(&wal).map(|m| m.len()).ok(),
                Some(0),
                "{file}: checkpointed and emptied on close, kept as an empty file"
            );
        }
        let reopened = EventLog::open(&dir.join("events.db"), Durability::Process).unwrap();
        assert_eq!(reopened.head().unwrap(), 1, "the event is in the database");
    }

    #[test]
    fn stopping_waits_for_the_builder_so_the_directory_can_be_reopened_at_once() {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().join("stores").join(SPARE_DIR);
        for _ in 0..5 {
            let pool = SpareStores::open(data.path(), Durability::Process, 1_000).unwrap();
            pool.refill();
            while pool.ready() == 0 {
                std::thread::yield_now();
            }
            pool.stop();
            let building: Vec<_> = std::fs::read_dir(&root)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(BUILDING))
                .collect();
            assert_eq!(
                building,
                Vec::<String>::new(),
                "no spare is still being built"
            );
            let ready = pool.ready();
            drop(pool);
            let reopened = SpareStores::open(data.path(), Durability::Process, 1_000).unwrap();
            assert_eq!(reopened.ready(), ready, "every finished spare is kept");
        }
    }

    /// Under process durability a spare's tables are never synced: a power loss may take
    /// them. Such a spare still becomes a whole store.
    #[test]
    fn a_spare_whose_unsynced_tables_were_lost_still_becomes_a_whole_store() {
        let (data, pool) = filled(1);
        pool.stop();
        let dir = data.path().join("stores").join("taken");
        assert!(pool.take_into(&dir).is_some());
        for db in ["events.db", "store.db"] {
            let wal = dir.join(format!("{db}-wal"));
            assert!(
                std::fs::metadata(&wal).unwrap().len() > 0,
                "{db}: the tables are in the WAL"
            );
            // What a power loss may leave of frames that were never synced.
            std::fs::File::options()
                .write(true)
                .open(&wal)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        let log = EventLog::open(&dir.join("events.db"), Durability::Process).unwrap();
        assert_eq!(log.append(vec![an_event()], "api").unwrap(), vec![1]);
        let db = GuestDb::open(&dir.join("store.db"), Durability::Process, 1 << 20).unwrap();
        assert_eq!(db.cursor().unwrap(), 0);
    }

    #[test]
    fn one_builder_thread_serves_every_refill() {
        let (data, pool) = filled(2);
        let builder = lock(&pool.builder)
            .as_ref()
            .map(|handle| handle.thread().id())
            .expect("the builder runs");
        for n in 0..3 {
            assert!(
                pool.take_into(&data.path().join(format!("s-{n}")))
                    .is_some()
            );
            pool.refill();
            wait_ready(&pool, 2);
        }
        let same = lock(&pool.builder).as_ref().map(|h| h.thread().id());
        assert_eq!(
            same,
            Some(builder),
            "the first refill's thread built them all"
        );
        pool.stop();
        assert!(lock(&pool.builder).is_none(), "stopping joined the builder");
    }

    #[test]
    fn no_spare_is_built_while_stores_keep_asking_for_them() {
        let data = tempfile::tempdir().unwrap();
        let mut pool = SpareStores::open(data.path(), Durability::Process, 2).unwrap();
        Arc::get_mut(&mut pool).unwrap().quiet = Duration::from_secs(3600);
        pool.refill();
        wait_ready(&pool, 2);
        assert!(pool.take_into(&data.path().join("taken")).is_some());
        pool.refill();
        // Building a spare takes milliseconds; with half the pool ready, the builder waits
        // for an hour of quiet.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            pool.ready(),
            1,
            "nothing was built right after a store took a spare"
        );

        let (done, stopped) = std::sync::mpsc::channel();
        let stopping = pool.clone();
        std::thread::spawn(move || {
            stopping.stop();
            let _ = done.send(());
        });
        assert!(
            stopped.recv_timeout(Duration::from_secs(20)).is_ok(),
            "stopping ends the builder's wait"
        );
    }

    #[test]
    fn a_pool_below_half_is_refilled_to_half_without_waiting_for_quiet() {
        let data = tempfile::tempdir().unwrap();
        let mut pool = SpareStores::open(data.path(), Durability::Process, 4).unwrap();
        Arc::get_mut(&mut pool).unwrap().quiet = Duration::from_secs(3600);
        pool.refill();
        wait_ready(&pool, 4);
        for n in 0..3 {
            assert!(
                pool.take_into(&data.path().join(format!("taken-{n}")))
                    .is_some()
            );
        }
        assert_eq!(pool.ready(), 1);
        pool.refill();
        // Stores keep asking (an hour of quiet never comes), yet a burst must not drain the
        // pool: the builder makes spares until half of them are ready, then waits.
        wait_ready(&pool, 2);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            pool.ready(),
            2,
            "above half, the builder waits for quiet again"
        );
        pool.stop();
    }

    #[test]
    fn an_empty_pool_says_so_and_the_caller_creates_the_directory() {
        let data = tempfile::tempdir().unwrap();
        let pool = SpareStores::open(data.path(), Durability::Process, 0).unwrap();
        pool.refill();
        assert!(
            pool.take_into(&data.path().join("stores").join("x"))
                .is_none()
        );
        assert!(!data.path().join("stores").join("x").exists());
    }

    #[test]
    fn reopening_keeps_complete_spares_and_deletes_half_built_ones() {
        let (data, pool) = filled(3);
        drop(pool);
        let root = data.path().join("stores").join(SPARE_DIR);
        // A crash while building, and a spare that lost a file.
        std::fs::create_dir_all(root.join(".building-7").join("files")).unwrap();
        std::fs::remove_file(root.join("0").join("store.db")).unwrap();

        let pool = SpareStores::open(data.path(), Durability::Process, 3).unwrap();
        assert_eq!(pool.ready(), 2, "the two whole spares are kept");
        assert!(!root.join(".building-7").exists());
        assert!(!root.join("0").exists());
        pool.refill();
        wait_ready(&pool, 3);
        assert!(
            root.join("8").exists(),
            "a new spare is numbered after every leftover, even a half-built one"
        );

        // Fewer wanted now: the extra ones are deleted.
        drop(pool);
        let pool = SpareStores::open(data.path(), Durability::Process, 1).unwrap();
        assert_eq!(pool.ready(), 1);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
    }
}
