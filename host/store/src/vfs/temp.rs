//! Temporary files opened for a guest's SQL, counted against a budget.
//!
//! A sort, a `GROUP BY` or a `DISTINCT` too big for the page cache spills into temporary files
//! that SQLite's unix VFS puts in the system's temporary directory, outside every store's
//! directory and quota. A cross join sorted by a computed column writes as much as its CPU
//! time allows. So while a guest statement runs (a [`TempScope`] on the thread that steps it),
//! every temporary file SQLite opens for it takes the connection's [`TempBudget`], and a write
//! or truncation that would grow the connection's temporary files past it answers
//! `SQLITE_FULL`: the statement fails like a full database, and SQLite deletes its files.
//!
//! The savepoint journal (`SQLITE_OPEN_SUBJOURNAL`) holds the pages a transaction's
//! statements change, for the invocation's savepoint and again for a statement's own (one that
//! may abort half way). It grows with each statement that rewrites pages and also touches new
//! ones (SQLite then keeps the statement's copy after it ends), and the file never shrinks
//! before the transaction ends. It is counted too, from its first write in a guest statement
//! to its close, whoever opened it: the connection's first guest statement to write it gives
//! it its budget (its earlier bytes, the host's, are charged then). Only a guest statement is
//! refused: growth while the host writes (beside or between guest statements) is counted and
//! never refused, so the host's bookkeeping never fails for a guest's journal.
//!
//! SQLite opens a statement's temporary files on the thread stepping it: the sorter's worker
//! threads, which do not, are off for guest connections (`SQLITE_LIMIT_WORKER_THREADS` 0).

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rusqlite::ffi;

use super::{INNER_OFFSET, inner};

/// What one connection's temporary files may hold at once.
#[derive(Debug, Default)]
pub struct TempBudget {
    limit: AtomicU64,
    used: AtomicU64,
    refused: AtomicBool,
}

impl TempBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit: AtomicU64::new(limit),
            ..Self::default()
        })
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The bytes the connection's temporary files hold now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether a temporary file was refused growth since the last call.
    pub fn take_refused(&self) -> bool {
        self.refused.swap(false, Ordering::Relaxed)
    }

    /// Takes `bytes` more past the limit too: growth no guest statement caused.
    fn charge(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes `bytes` more, or answers false past the limit.
    fn reserve(&self, bytes: u64) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    /// A write was refused: the statement's failure is the budget's.
    fn refuse(&self) -> c_int {
        self.refused.store(true, Ordering::Relaxed);
        ffi::SQLITE_FULL
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

thread_local! {
    /// The budget of the guest statement running on this thread, if any.
    static CURRENT: RefCell<Option<Arc<TempBudget>>> = const { RefCell::new(None) };
}

/// While alive, the temporary files SQLite opens on this thread count against a budget.
pub struct TempScope {
    previous: Option<Arc<TempBudget>>,
}

impl TempScope {
    pub fn enter(budget: &Arc<TempBudget>) -> Self {
        let previous = CURRENT.with(|current| current.replace(Some(budget.clone())));
        Self { previous }
    }

    /// While alive, no guest statement runs on this thread: the host's SQL between a guest
    /// statement's steps is never refused.
    pub fn suspend() -> Self {
        let previous = CURRENT.with(|current| current.replace(None));
        Self { previous }
    }
}

impl Drop for TempScope {
    fn drop(&mut self) {
        CURRENT.with(|current| *current.borrow_mut() = self.previous.take());
    }
}

/// The budget temporary files opened now on this thread count against (none while the
/// thread's locals are being torn down).
pub(super) fn current() -> Option<Arc<TempBudget>> {
    CURRENT
        .try_with(|current| current.borrow().clone())
        .ok()
        .flatten()
}

/// Whether a file SQLite opens with `flags` is one of a statement's temporary files: a
/// sorter's (`TEMP_JOURNAL`), an ephemeral table's (`TRANSIENT_DB`) or the temp schema's.
pub(super) fn is_temporary(flags: c_int) -> bool {
    flags
        & (ffi::SQLITE_OPEN_TEMP_DB | ffi::SQLITE_OPEN_TEMP_JOURNAL | ffi::SQLITE_OPEN_TRANSIENT_DB)
        != 0
}

/// Whether a file SQLite opens with `flags` is a transaction's savepoint journal.
pub(super) fn is_savepoint_journal(flags: c_int) -> bool {
    flags & ffi::SQLITE_OPEN_SUBJOURNAL != 0
}

/// A temporary file: the fields below, then the base's file at [`INNER_OFFSET`].
#[repr(C)]
pub(super) struct TempFile {
    /// SQLite reads the methods through the file's first field.
    base: ffi::sqlite3_file,
    /// `None` for a savepoint journal no guest statement has written yet.
    budget: Option<Arc<TempBudget>>,
    /// The furthest the file was written or sized to: what it holds of its budget.
    held: u64,
}

pub(super) const TEMP_FILE_SIZE: usize = std::mem::size_of::<TempFile>();

static TEMP_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(super::read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(super::sync),
    xFileSize: Some(super::file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved),
    xFileControl: Some(file_control),
    xSectorSize: Some(super::sector_size),
    xDeviceCharacteristics: Some(super::device_characteristics),
    // Temporary files have no WAL index.
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: Some(super::fetch),
    xUnfetch: Some(super::unfetch),
};

/// Makes the file at `file`, whose base's file just opened, a temporary file on `budget`
/// (`None`: a savepoint journal the host opened, counted from its first guest write).
///
/// # Safety
/// `file` points to an allocation of the VFS's `szOsFile` bytes whose base's file (at
/// [`INNER_OFFSET`]) opened successfully.
pub(super) unsafe fn wrap(file: *mut ffi::sqlite3_file, budget: Option<Arc<TempBudget>>) {
    // SAFETY: per the contract `file` has room for a `TempFile` before the base's file, and is
    // aligned for SQLite's file structures (8 bytes), which is all `TempFile` needs.
    unsafe {
        file.cast::<TempFile>().write(TempFile {
            base: ffi::sqlite3_file {
                pMethods: &TEMP_METHODS,
            },
            budget,
            held: 0,
        });
    }
}

/// # Safety
/// `file` is a temporary file [`wrap`] made, open for the returned borrow (SQLite calls its
/// methods from one thread at a time per file).
unsafe fn temp_file<'a>(file: *mut ffi::sqlite3_file) -> &'a mut TempFile {
    // SAFETY: per the contract.
    unsafe { &mut *file.cast::<TempFile>() }
}

impl TempFile {
    /// Takes what growing the file to `len` bytes needs; false when the budget refuses it.
    ///
    /// Only growth in a guest statement on the file's own budget may be refused; any other
    /// (the host's writes on the connection) is counted past the limit if it must be.
    fn grow_to(&mut self, len: u64) -> bool {
        if len <= self.held {
            return true;
        }
        let grown = len - self.held;
        let guest = match (&self.budget, current()) {
            (Some(budget), scope) => scope.is_some_and(|scope| Arc::ptr_eq(budget, &scope)),
            // The first guest write of a savepoint journal: the bytes the host wrote before
            // are charged now.
            (None, Some(scope)) => {
                scope.charge(self.held);
                self.budget = Some(scope);
                true
            }
            (None, None) => false,
        };
        if let Some(budget) = &self.budget {
            if guest {
                if !budget.reserve(grown) {
                    return false;
                }
            } else {
                budget.charge(grown);
            }
        }
        self.held = len;
        true
    }

    fn shrink_to(&mut self, len: u64) {
        if len < self.held {
            if let Some(budget) = &self.budget {
                budget.release(self.held - len);
            }
            self.held = len;
        }
    }

    /// A refused write: the statement's failure is the budget's.
    fn refuse(&self) -> c_int {
        self.budget
            .as_ref()
            .map_or(ffi::SQLITE_FULL, |budget| budget.refuse())
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this on a temporary file this VFS opened.
    let temp = unsafe { temp_file(file) };
    let end = u64::try_from(offset).unwrap_or(0) + u64::try_from(amount).unwrap_or(0);
    if !temp.grow_to(end) {
        return temp.refuse();
    }
    // SAFETY: forwarded with SQLite's own arguments.
    unsafe { super::write(file, buf, amount, offset) }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    let len = u64::try_from(size).unwrap_or(0);
    // SAFETY: SQLite calls this on a temporary file this VFS opened.
    let temp = unsafe { temp_file(file) };
    // A truncation may also lengthen a file.
    if !temp.grow_to(len) {
        return temp.refuse();
    }
    // SAFETY: forwarded with SQLite's own arguments.
    let rc = unsafe { super::truncate(file, size) };
    if rc == ffi::SQLITE_OK {
        // SAFETY: as above.
        unsafe { temp_file(file) }.shrink_to(len);
    }
    rc
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // A size hint may make the file that long at once (the sorter's files, which are then
    // mapped). SQLite goes on without it when it is refused: the writes that follow are
    // counted, and refused, on their own.
    if op == ffi::SQLITE_FCNTL_SIZE_HINT && !arg.is_null() {
        // SAFETY: SQLite passes the hinted size as an `i64`; the file is a temporary file
        // this VFS opened.
        let (hint, temp) = unsafe { (*arg.cast::<i64>(), temp_file(file)) };
        if !temp.grow_to(u64::try_from(hint).unwrap_or(0)) {
            return ffi::SQLITE_OK;
        }
    }
    // SAFETY: forwarded with SQLite's own arguments.
    unsafe { super::file_control(file, op, arg) }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file it opened through this VFS, once; the base's file closes
    // (and, as a temporary file, is deleted) first, then the wrapper is dropped.
    unsafe {
        let (inner, methods) = inner(file);
        let rc = methods.xClose.map_or(ffi::SQLITE_OK, |close| close(inner));
        temp_file(file).shrink_to(0);
        std::ptr::drop_in_place(file.cast::<TempFile>());
        rc
    }
}

super::forward! {
    lock => xLock(level: c_int) else ffi::SQLITE_OK;
    unlock => xUnlock(level: c_int) else ffi::SQLITE_OK;
    check_reserved => xCheckReservedLock(out: *mut c_int) else ffi::SQLITE_OK;
}

const _: () = assert!(TEMP_FILE_SIZE <= INNER_OFFSET);
