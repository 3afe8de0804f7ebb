//! Handing the heap memory stores free back to the operating system.
//!
//! A store that closes its files frees what its SQLite connections held (page caches,
//! lookaside buffers, parsed schemas: far more than the store keeps while it sleeps), and a
//! store that wakes allocates such memory again. glibc's allocator keeps freed memory that lies
//! between live allocations: it is reused, but the process's resident set does not shrink.
//! Measured here (`hibernation` bench row, 10,000 stores hibernated with their files closed):
//! 6.5 KB of live heap per store, yet the resident set grew 16.8–18.8 KB per store; after
//! `malloc_trim` 7.4–7.8 KB.
//!
//! So once stores have freed such memory ([`freed`]) and then freed nothing more for
//! [`TRIM_QUIET`], a host-wide thread trims the heap; while stores keep closing, at most every
//! [`TRIM_AT_MOST_EVERY`]. A trim walks the allocator's free lists, each arena under its lock
//! (a few milliseconds, on a thread of its own), and the pages it hands back fault in again
//! when used: trimming every second while stores kept waking and sleeping slowed their wakes
//! (quick `hibernation` runs, files-closed wake p50 0.96–1.03 ms against 0.88–0.93 without),
//! so a host whose stores churn reuses the freed memory and trims rarely.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How long no store may have freed memory before the heap is trimmed.
pub const TRIM_QUIET: Duration = Duration::from_secs(1);
/// How long memory freed may wait for a trim while stores keep freeing more.
pub const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(30);

struct Trimmer {
    /// When memory was first and last freed since the last trim began (`None`: not since).
    untrimmed: Mutex<Option<Untrimmed>>,
    wake: Condvar,
    trims: AtomicU64,
}

#[derive(Clone, Copy)]
struct Untrimmed {
    first: Instant,
    last: Instant,
}

static TRIMMER: Trimmer = Trimmer {
    untrimmed: Mutex::new(None),
    wake: Condvar::new(),
    trims: AtomicU64::new(0),
};

/// Whether the trimming thread runs, started on first use; `false` where the allocator has no
/// trim (not glibc) or the thread could not start.
static RUNNING: LazyLock<bool> = LazyLock::new(|| {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return false;
    }
    let spawned = std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(|| serve(&TRIMMER));
    if let Err(err) = &spawned {
        tracing::error!("could not start the heap-trim thread: {err}");
    }
    spawned.is_ok()
});

/// Notes that a store freed much memory (it closed its databases): the heap is trimmed once
/// no store has freed any for [`TRIM_QUIET`] (or [`TRIM_AT_MOST_EVERY`] from now).
pub fn freed() {
    if *RUNNING {
        let trimmer = &TRIMMER;
        let now = Instant::now();
        let mut untrimmed = crate::sqlite::lock(&trimmer.untrimmed);
        match &mut *untrimmed {
            Some(since) => since.last = now,
            None => {
                *untrimmed = Some(Untrimmed {
                    first: now,
                    last: now,
                });
                trimmer.wake.notify_one();
            }
        }
    }
}

/// How many times the heap has been trimmed since the process started.
pub fn trims() -> u64 {
    TRIMMER.trims.load(Ordering::Relaxed)
}

fn serve(trimmer: &Trimmer) {
    loop {
        let mut untrimmed = trimmer
            .wake
            .wait_while(crate::sqlite::lock(&trimmer.untrimmed), |u| u.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(since) = *untrimmed else { continue };
        let due = (since.last + TRIM_QUIET).min(since.first + TRIM_AT_MOST_EVERY);
        let now = Instant::now();
        if now < due {
            drop(untrimmed);
            std::thread::sleep(due - now);
            continue;
        }
        // Frees from here on call for the next trim.
        *untrimmed = None;
        drop(untrimmed);
        let started = Instant::now();
        trim();
        trimmer.trims.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("trimmed the heap in {:?}", started.elapsed());
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: `malloc_trim` takes no pointer and locks each arena itself; any thread may call
    // it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
