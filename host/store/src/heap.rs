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
//! So when stores have freed such memory ([`freed`]), a host-wide thread trims the heap once
//! the frees have paused for [`TRIM_DELAY`] (at most one trim per delay, however many stores
//! close). A trim walks the allocator's free lists, each arena under its lock: a few
//! milliseconds, on a thread of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::Duration;

/// How long after memory was freed the heap is trimmed; frees within it share one trim.
pub const TRIM_DELAY: Duration = Duration::from_secs(1);

struct Trimmer {
    /// Whether memory was freed since the last trim began.
    pending: Mutex<bool>,
    wake: Condvar,
    trims: AtomicU64,
}

/// The trimming thread's state, started on first use; `None` where the allocator has no trim
/// (not glibc) or the thread could not start.
static TRIMMER: LazyLock<Option<&'static Trimmer>> = LazyLock::new(|| {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return None;
    }
    let trimmer: &'static Trimmer = Box::leak(Box::new(Trimmer {
        pending: Mutex::new(false),
        wake: Condvar::new(),
        trims: AtomicU64::new(0),
    }));
    let spawned = std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(move || serve(trimmer));
    match spawned {
        Ok(_) => Some(trimmer),
        Err(err) => {
            tracing::error!("could not start the heap-trim thread: {err}");
            None
        }
    }
});

/// Notes that a store freed much memory (it closed its databases): the heap is trimmed
/// [`TRIM_DELAY`] later.
pub fn freed() {
    if let Some(trimmer) = *TRIMMER {
        *crate::sqlite::lock(&trimmer.pending) = true;
        trimmer.wake.notify_one();
    }
}

/// How many times the heap has been trimmed since the process started.
pub fn trims() -> u64 {
    TRIMMER.map_or(0, |trimmer| trimmer.trims.load(Ordering::Relaxed))
}

fn serve(trimmer: &Trimmer) {
    loop {
        {
            let mut pending = crate::sqlite::lock(&trimmer.pending);
            while !*pending {
                pending = trimmer
                    .wake
                    .wait(pending)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        std::thread::sleep(TRIM_DELAY);
        // Frees from here on call for the next trim.
        *crate::sqlite::lock(&trimmer.pending) = false;
        let started = std::time::Instant::now();
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
