//! A bound on the heap memory one guest SQL statement takes inside SQLite.
//!
//! SQLite computes a row whole before it hands the row over, and its limits bound single
//! values (`SQLITE_LIMIT_LENGTH`) and the number of columns, not their product: one
//! `SELECT randomblob(7999000), …` of 200 columns held 1.6 GB of the host's memory before the
//! host could refuse the result. SQLite has no memory limit per connection
//! (`sqlite3_hard_heap_limit64` is the process's: a tenant reaching it would fail every other
//! store's statements).
//!
//! So the host gives SQLite an allocator ([`install`], `SQLITE_CONFIG_MALLOC`) that counts
//! the bytes allocated and freed on each thread. A guest statement runs on one thread from
//! start to end; while it runs ([`StatementHeap::enter`]) an allocation that would take the
//! thread's count more than the statement's allowance past where it began fails, SQLite
//! answers `SQLITE_NOMEM`, and the statement fails with nothing of it kept (SQLite's own tests
//! cover every allocation failing). Outside guest statements nothing is refused.
//!
//! The allocator is the C library's `malloc`, as SQLite's own is, with the size of each
//! allocation kept in the 8 bytes before it (as SQLite's does where the C library cannot tell
//! an allocation's size).

#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The heap one guest statement may take beyond the store's page cache: sorts and groupings
/// too big for this spill to temporary files, so what needs more is a row or a value far
/// larger than a plugin could take (a query's result stops at 32 MiB).
pub const STATEMENT_HEAP: u64 = 64 << 20;

/// The bytes before each allocation that hold its size (SQLite wants 8-byte alignment).
const HEADER: usize = 8;

thread_local! {
    /// Bytes allocated less bytes freed on this thread since it began (a thread freeing what
    /// another allocated counts below zero).
    static NET: Cell<i64> = const { Cell::new(0) };
    /// How far `NET` may grow: `i64::MAX` outside guest statements.
    static CEILING: Cell<i64> = const { Cell::new(i64::MAX) };
    /// Whether an allocation was refused since the last [`StatementHeap::take_refused`].
    static REFUSED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the allocator is SQLite's: `false` when SQLite had started before [`install`].
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Gives SQLite the counting allocator. It must come before SQLite starts (the first
/// connection opened in the process) and while no other thread uses SQLite: `sqlite3_config`
/// is not thread-safe, and a connection opening meanwhile could allocate with one allocator
/// and free with the other. So the server calls it first thing, before its threads start;
/// later, SQLite refuses it, and guest statements are not bounded (the answer is `false`, and
/// it is logged). Later calls answer the first's result.
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(x_malloc),
            xFree: Some(x_free),
            xRealloc: Some(x_realloc),
            xSize: Some(x_size),
            xRoundup: Some(x_roundup),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: `SQLITE_CONFIG_MALLOC` takes one pointer to a `sqlite3_mem_methods`, which
        // SQLite copies; the functions below are thread-safe and meet SQLite's contract
        // (8-byte aligned memory, `xSize` of any live allocation).
        let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const methods) };
        if rc != ffi::SQLITE_OK {
            tracing::warn!(
                "SQLite started before the host could give it its allocator (code {rc}): a \
                 guest SQL statement's memory is not bounded"
            );
        }
        rc == ffi::SQLITE_OK
    })
}

/// Whether [`install`] succeeded (`None`: not called yet).
pub fn installed() -> Option<bool> {
    INSTALLED.get().copied()
}

/// While alive, SQLite's allocations on this thread may take at most a given number of bytes
/// more than when it began (net of what they free); restores the previous bound when dropped.
pub(crate) struct StatementHeap {
    previous: i64,
}

impl StatementHeap {
    /// A guest statement may allocate `allowance` bytes from now.
    pub(crate) fn enter(allowance: u64) -> Self {
        let ceiling = NET
            .get()
            .saturating_add(i64::try_from(allowance).unwrap_or(i64::MAX));
        Self {
            previous: CEILING.replace(ceiling),
        }
    }

    /// While alive, no guest statement runs on this thread: the host's SQL between a guest
    /// statement's steps is never refused.
    pub(crate) fn suspend() -> Self {
        Self {
            previous: CEILING.replace(i64::MAX),
        }
    }

    /// Whether an allocation on this thread was refused since the last call.
    pub(crate) fn take_refused() -> bool {
        REFUSED.replace(false)
    }
}

impl Drop for StatementHeap {
    fn drop(&mut self) {
        CEILING.set(self.previous);
    }
}

/// Counts `grow` more bytes on this thread, or refuses them (`false`) past its ceiling.
fn admit(grow: i64) -> bool {
    let net = NET.get().saturating_add(grow);
    if grow > 0 && net > CEILING.get() {
        REFUSED.set(true);
        return false;
    }
    NET.set(net);
    true
}

fn counted(bytes: c_int) -> i64 {
    i64::from(bytes)
}

unsafe extern "C" fn x_malloc(bytes: c_int) -> *mut c_void {
    let Ok(size) = usize::try_from(bytes) else {
        return std::ptr::null_mut();
    };
    if !admit(counted(bytes)) {
        return std::ptr::null_mut();
    }
    // SAFETY: `malloc` of a positive size; the header holds the size.
    unsafe {
        let base = libc::malloc(size + HEADER).cast::<u64>();
        if base.is_null() {
            NET.set(NET.get() - counted(bytes));
            return std::ptr::null_mut();
        }
        base.write(size as u64);
        base.cast::<u8>().add(HEADER).cast()
    }
}

/// The size recorded before allocation `p` (made by [`x_malloc`] or [`x_realloc`]).
///
/// # Safety
/// `p` is a live allocation of this allocator.
unsafe fn size_of(p: *mut c_void) -> usize {
    // SAFETY: the caller's; the header is the 8 bytes before `p`.
    unsafe { p.cast::<u8>().sub(HEADER).cast::<u64>().read() as usize }
}

unsafe extern "C" fn x_free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: SQLite frees only what this allocator gave it.
    unsafe {
        let size = size_of(p);
        NET.set(NET.get() - size as i64);
        libc::free(p.cast::<u8>().sub(HEADER).cast());
    }
}

unsafe extern "C" fn x_realloc(p: *mut c_void, bytes: c_int) -> *mut c_void {
    if p.is_null() {
        // SAFETY: as `malloc`.
        return unsafe { x_malloc(bytes) };
    }
    let Ok(size) = usize::try_from(bytes) else {
        return std::ptr::null_mut();
    };
    // SAFETY: SQLite reallocates only what this allocator gave it; on failure the old
    // allocation is left as it was, as SQLite expects.
    unsafe {
        let old = size_of(p);
        let grow = size as i64 - old as i64;
        if !admit(grow) {
            return std::ptr::null_mut();
        }
        let base = libc::realloc(p.cast::<u8>().sub(HEADER).cast(), size + HEADER).cast::<u64>();
        if base.is_null() {
            NET.set(NET.get() - grow);
            return std::ptr::null_mut();
        }
        base.write(size as u64);
        base.cast::<u8>().add(HEADER).cast()
    }
}

unsafe extern "C" fn x_size(p: *mut c_void) -> c_int {
    if p.is_null() {
        return 0;
    }
    // SAFETY: SQLite asks only the size of what this allocator gave it.
    c_int::try_from(unsafe { size_of(p) }).unwrap_or(c_int::MAX)
}

unsafe extern "C" fn x_roundup(bytes: c_int) -> c_int {
    bytes.saturating_add(7) & !7
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_may_grow_the_threads_count_by_its_allowance_only() {
        let start = NET.get();
        {
            let _heap = StatementHeap::enter(1_000);
            assert!(admit(600));
            assert!(!admit(600), "1,200 bytes past a 1,000-byte allowance");
            assert!(StatementHeap::take_refused());
            assert!(admit(-600), "frees are always counted");
            assert!(admit(900));
            {
                let _host = StatementHeap::suspend();
                assert!(admit(1 << 30), "the host's own SQL is never refused");
                assert!(admit(-(1 << 30)));
            }
            assert!(!admit(200), "the statement's bound is back");
        }
        assert!(admit(1 << 30), "no bound outside a statement");
        assert!(admit(-(1 << 30)));
        assert_eq!(NET.get(), start + 900);
    }
}
