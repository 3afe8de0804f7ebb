//! Spare store directories, prepared ahead of time: a new store takes one with a single rename
//! instead of creating its two directories and six database files while its provisioning
//! request waits (on this machine's disk a file creation costs up to a millisecond; a rename
//! tens of microseconds).
//!
//! Spares live in `DATA_DIR/stores/.spare/<n>/` (a name no store id can have), each a complete,
//! empty store directory: `files/`, and `events.db` and `store.db` with their schemas, closed
//! cleanly. One is built in `.spare/.building-<n>` and renamed into place when complete, so a
//! crash never leaves a half-built spare where a store could take it; leftovers are deleted
//! when the pool opens. Their files hold nothing that names a store.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::event_log::EventLog;
use crate::guest_db::GuestDb;
use crate::sqlite::Durability;

const SPARE_DIR: &str = ".spare";
const BUILDING: &str = ".building-";

/// The pool of spare store directories of one data directory.
#[derive(Debug)]
pub struct SpareStores {
    root: PathBuf,
    durability: Durability,
    target: usize,
    ready: Mutex<Vec<PathBuf>>,
    refilling: AtomicBool,
    stopped: AtomicBool,
    next: AtomicU64,
    /// The running (or last) builder thread, joined by [`SpareStores::stop`].
    builder: Mutex<Option<std::thread::JoinHandle<()>>>,
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
                ready.push(path);
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
            refilling: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            next: AtomicU64::new(next),
            builder: Mutex::new(None),
        }))
    }

    /// How many spares are ready now.
    pub fn ready(&self) -> usize {
        self.lock().len()
    }

    /// Moves a spare to `dir` (which must not exist), answering whether one was there to take.
    /// `false` leaves the caller to create the directory itself.
    pub fn take_into(&self, dir: &Path) -> bool {
        let Some(spare) = self.lock().pop() else {
            return false;
        };
        match std::fs::rename(&spare, dir) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(spare = %spare.display(), "could not use a spare store directory (creating one instead): {err}");
                let _ = std::fs::remove_dir_all(&spare);
                false
            }
        }
    }

    /// Builds spares in the background until `target` are ready (one builder at a time; a call
    /// while one runs does nothing, the running one fills the pool).
    pub fn refill(self: &Arc<Self>) {
        if self.target == 0
            || self.stopped.load(Ordering::Acquire)
            || self.refilling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let pool = self.clone();
        let mut builder = self
            .builder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = std::thread::Builder::new()
            .name("storehost-spares".into())
            .spawn(move || {
                while pool.ready() < pool.target && !pool.stopped.load(Ordering::Acquire) {
                    match pool.build_one() {
                        Ok(spare) => pool.lock().push(spare),
                        Err(err) => {
                            tracing::warn!("could not prepare a spare store directory: {err}");
                            break;
                        }
                    }
                }
                pool.refilling.store(false, Ordering::Release);
            });
        match started {
            // The previous builder has finished (it cleared `refilling`), so its handle can go.
            Ok(handle) => *builder = Some(handle),
            Err(err) => {
                tracing::warn!("could not start preparing spare store directories: {err}");
                self.refilling.store(false, Ordering::Release);
            }
        }
    }

    /// Stops preparing spares (the host shuts down): a spare being built is finished, no
    /// other is started. Returns once the builder has let go of the directory, so the next
    /// host to open this data directory never finds a spare still being written. Blocks for
    /// at most one spare's build (a few file creations).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let handle = self
            .builder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::warn!("the spare store builder panicked");
        }
    }

    /// Builds one spare in a scratch directory and renames it into place.
    fn build_one(&self) -> io::Result<PathBuf> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let building = self.root.join(format!("{BUILDING}{n}"));
        let built = (|| {
            std::fs::create_dir_all(building.join("files"))?;
            drop(
                EventLog::open(&building.join("events.db"), self.durability)
                    .map_err(io::Error::other)?,
            );
            drop(
                GuestDb::open(&building.join("store.db"), self.durability, u64::MAX)
                    .map_err(io::Error::other)?,
            );
            let spare = self.root.join(n.to_string());
            std::fs::rename(&building, &spare)?;
            Ok(spare)
        })();
        if built.is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        built
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether `dir` holds everything a spare is made of.
fn is_complete(dir: &Path) -> bool {
    dir.join("files").is_dir() && dir.join("events.db").is_file() && dir.join("store.db").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_pool_fills_hands_out_whole_directories_and_refills() {
        let data = tempfile::tempdir().unwrap();
        let pool = SpareStores::open(data.path(), Durability::Process, 2).unwrap();
        assert_eq!(pool.ready(), 0);
        pool.refill();
        wait_ready(&pool, 2);

        let dir = data.path().join("stores").join("taken");
        assert!(pool.take_into(&dir));
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

    #[test]
    fn an_empty_pool_says_so_and_the_caller_creates_the_directory() {
        let data = tempfile::tempdir().unwrap();
        let pool = SpareStores::open(data.path(), Durability::Process, 0).unwrap();
        pool.refill();
        assert!(!pool.take_into(&data.path().join("stores").join("x")));
        assert!(!data.path().join("stores").join("x").exists());
    }

    #[test]
    fn reopening_keeps_complete_spares_and_deletes_half_built_ones() {
        let data = tempfile::tempdir().unwrap();
        let pool = SpareStores::open(data.path(), Durability::Process, 3).unwrap();
        pool.refill();
        wait_ready(&pool, 3);
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
