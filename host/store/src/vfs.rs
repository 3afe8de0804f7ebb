//! The SQLite VFS every store file is opened through: SQLite's own unix file I/O, with the
//! locks between this process's connections and the WAL index kept in the process's memory,
//! found by inode in a hash map.
//!
//! Why not SQLite's `unix-excl`, which does the same: its open walks a linked list of every file
//! the process has open through a posix-locking unix VFS, under one process-wide mutex, twice
//! per database (`findReusableFd`, `findInodeInfo`; closing takes the same mutex). With
//! thousands of stores awake every open, wake and close paid for all of them: measured here,
//! `sqlite3_open_v2` of a database took p50 6.4 µs beside no other open database and 124 µs
//! beside 2,000 with `unix-excl`, 8.7 µs beside 2,000 with this VFS; in the `hibernation`
//! bench's cold wakes (a few hundred stores awake) 80 → 42 µs per database. Here the files are
//! SQLite's `unix-none` files (no locks, so not in that list), and this module keeps what
//! `unix-excl` kept per inode:
//!
//! - **file locks** between connections of this process (SHARED, RESERVED, PENDING, EXCLUSIVE,
//!   the same rules as SQLite's `unixLock`, which the WAL and the last connection's closing
//!   checkpoint rely on);
//! - **the WAL index** (SQLite's "shared memory"): 32 KB regions on the heap, shared by the
//!   connections to one file and freed with the last one (the next opener rebuilds it from the
//!   WAL, as SQLite does after a restart), and its eight locks;
//! - **one lock for other processes**: while any connection of this process has a database
//!   open, an open-file-description lock (`F_OFD_SETLK`) holds the bytes SQLite's readers and
//!   writers lock, so another process — a second host on the same data directory, the `sqlite3`
//!   shell — gets `SQLITE_BUSY` ("database is locked") instead of writing beside the host, as
//!   with `unix-excl`. Unlike a classic posix lock it is not dropped when some other descriptor
//!   of the file closes.
//!
//! Journals, WALs and temporary files are plain `unix-none` files: SQLite never locks them.
//!
//! It also spares opens the unix VFS's walk of a path's every component to resolve symbolic
//! links where nothing would differ (see [`full_pathname`]).
//!
//! This is the crate's FFI boundary with SQLite's VFS interface, so it is where its `unsafe`
//! code lives; each block says what it relies on.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, LazyLock, Mutex};

use rusqlite::ffi;

use crate::sqlite::lock;

mod temp;

pub use temp::{TempBudget, TempScope};

/// The VFS's name, for `sqlite3_open_v2` (see [`crate::sqlite::VFS`]).
pub(crate) const NAME: &CStr = c"storehost";

/// SQLite's lock bytes (`PENDING_BYTE` at 1 GiB, then RESERVED, then the SHARED range): the
/// range SQLite's readers lock is what [`Node`] holds for the process.
const SHARED_FIRST: i64 = 0x4000_0000 + 2;
const SHARED_SIZE: i64 = 510;

/// Registers the VFS once per process; answers SQLite's result code of the registration.
pub(crate) fn register() -> c_int {
    static REGISTERED: LazyLock<c_int> = LazyLock::new(|| {
        // SAFETY: `sqlite3_vfs_find` initializes SQLite and answers a VFS that lives as long as
        // the process (built-in VFSes are static), or null.
        let base = unsafe { ffi::sqlite3_vfs_find(c"unix-none".as_ptr()) };
        if base.is_null() {
            return ffi::SQLITE_ERROR;
        }
        // SAFETY: `base` points to a registered VFS (above); its fields are only read.
        let base_ref = unsafe { &*base };
        let vfs = Box::new(ffi::sqlite3_vfs {
            iVersion: base_ref.iVersion,
            szOsFile: INNER_OFFSET as c_int + base_ref.szOsFile,
            mxPathname: base_ref.mxPathname,
            pNext: std::ptr::null_mut(),
            zName: NAME.as_ptr(),
            pAppData: base.cast(),
            xOpen: Some(open),
            // The unix VFS's own functions, which ignore the VFS they are called through.
            xDelete: base_ref.xDelete,
            xAccess: base_ref.xAccess,
            xFullPathname: Some(full_pathname),
            xDlOpen: base_ref.xDlOpen,
            xDlError: base_ref.xDlError,
            xDlSym: base_ref.xDlSym,
            xDlClose: base_ref.xDlClose,
            xRandomness: base_ref.xRandomness,
            xSleep: base_ref.xSleep,
            xCurrentTime: base_ref.xCurrentTime,
            xGetLastError: base_ref.xGetLastError,
            xCurrentTimeInt64: base_ref.xCurrentTimeInt64,
            xSetSystemCall: base_ref.xSetSystemCall,
            xGetSystemCall: base_ref.xGetSystemCall,
            xNextSystemCall: base_ref.xNextSystemCall,
        });
        // SAFETY: the VFS is leaked, so it outlives every connection; SQLite only reads it.
        unsafe { ffi::sqlite3_vfs_register(Box::into_raw(vfs), 0) }
    });
    *REGISTERED
}

/// The name SQLite keeps for a database and derives its `-wal` and `-journal` names from.
///
/// SQLite's unix VFS resolves every symbolic link on the way to an absolute path, one `lstat`
/// per component (six for `<data>/stores/<id>/store.db` under `/var/lib/storehost`): 8.9 µs
/// of each open measured here, against 1 µs for one `lstat`. A store's files are named by
/// absolute paths the host builds, without `.` or `..`: such a path is its own full name when
/// the file itself is not a symbolic link — a link among its directories leads to the same
/// directory, so to the same `-wal` file, whichever way it is named. Any other name goes to
/// the unix VFS's resolution.
unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    out_len: c_int,
    out: *mut c_char,
) -> c_int {
    if !name.is_null() {
        // SAFETY: SQLite passes a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(name) };
        let bytes = name.to_bytes_with_nul();
        if names_itself(name) && usize::try_from(out_len).is_ok_and(|len| bytes.len() <= len) {
            // SAFETY: `out` has room for `out_len` bytes, checked above to hold the name and
            // its NUL; SQLite's buffers never overlap the name it passes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().cast(), out, bytes.len()) };
            return ffi::SQLITE_OK;
        }
    }
    // SAFETY: SQLite calls this through the VFS `register` made; the base's function gets
    // SQLite's own arguments.
    unsafe {
        let base = base_of(vfs);
        let resolve = (*base).xFullPathname.expect("unix-none has xFullPathname");
        resolve(base, name, out_len, out)
    }
}

/// Whether `name` is an absolute path without `.`, `..` or empty components, of something
/// that is not a symbolic link (see [`full_pathname`]).
fn names_itself(name: &CStr) -> bool {
    let Some(rest) = name.to_bytes().strip_prefix(b"/") else {
        return false;
    };
    let plain = rest
        .split(|&byte| byte == b'/')
        .all(|part| !matches!(part, b"" | b"." | b".."));
    plain
        && rustix::fs::lstat(name)
            .is_ok_and(|stat| !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_symlink())
}

/// What one inode's connections share; in [`NODES`] while any of them is open.
struct Node {
    /// The descriptor holding the process's lock against other processes.
    _process_lock: OwnedFd,
    state: Mutex<NodeState>,
}

#[derive(Default)]
struct NodeState {
    /// The strongest file lock any connection holds.
    level: c_int,
    /// Connections holding SHARED or more.
    shared: u32,
    /// The WAL index's regions.
    regions: Vec<Region>,
    /// Connections that mapped the WAL index.
    shm_users: u32,
    /// Per WAL-index lock: 0 free, -1 held exclusively, n > 0 held shared by n connections.
    shm_locks: [i32; ffi::SQLITE_SHM_NLOCK as usize],
}

/// A file's device and inode.
type Key = (u64, u64);

/// One region of a WAL index: zeroed heap memory at an address that never moves, read and
/// written only by SQLite through the pointer [`shm_map`] hands out (never through a Rust
/// reference, as connections on other threads use it at the same time).
struct Region {
    start: *mut u8,
    len: usize,
}

impl Region {
    fn new(len: usize) -> Self {
        let start = Box::into_raw(vec![0u8; len].into_boxed_slice()).cast::<u8>();
        Self { start, len }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `start` and `len` are the boxed slice `Region::new` leaked, freed once here;
        // regions are dropped only when no connection has the index mapped.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.start, self.len)) });
    }
}

// SAFETY: a region is plain memory; SQLite synchronizes its own accesses with the WAL-index
// locks, and the node's mutex guards the list.
unsafe impl Send for Region {}

/// Open nodes by file.
static NODES: LazyLock<Mutex<HashMap<Key, Attached>>> = LazyLock::new(Mutex::default);

/// A node, and the number of this process's open files on it.
struct Attached {
    node: Arc<Node>,
    files: u32,
}

/// A main database file: the fields below, then SQLite's `unix-none` file at
/// [`INNER_OFFSET`] (temporary files are a [`temp::TempFile`] and then the `unix-none` file;
/// files of other kinds are only the `unix-none` file).
#[repr(C)]
struct MainFile {
    /// SQLite reads the methods through the file's first field.
    base: ffi::sqlite3_file,
    node: Option<Arc<Node>>,
    key: Key,
    /// This connection's file lock.
    level: c_int,
    /// Whether it mapped the WAL index, and the WAL-index locks it holds.
    shm_mapped: bool,
    shm_shared: u16,
    shm_exclusive: u16,
}

/// Where the base's file starts in a main or temporary file.
const INNER_OFFSET: usize = {
    let main = std::mem::size_of::<MainFile>();
    let larger = if main > temp::TEMP_FILE_SIZE {
        main
    } else {
        temp::TEMP_FILE_SIZE
    };
    larger.next_multiple_of(16)
};

static MAIN_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock_file),
    xUnlock: Some(unlock_file),
    xCheckReservedLock: Some(check_reserved),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// The `unix-none` VFS this one opens files through.
///
/// # Safety
/// `vfs` is this VFS (registered by [`register`], whose `pAppData` is the base).
unsafe fn base_of(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: per the contract.
    unsafe { (*vfs).pAppData.cast() }
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls this through the VFS `register` made.
    let base = unsafe { base_of(vfs) };
    // SAFETY: `base` is the registered `unix-none` VFS, whose `xOpen` is set.
    let base_open = unsafe { (*base).xOpen.expect("unix-none has xOpen") };
    let budget = temp::current();
    if (temp::is_temporary(flags) && budget.is_some()) || temp::is_savepoint_journal(flags) {
        // SAFETY: `file` has room for a temporary file and then the base's file (`szOsFile`);
        // the base writes its file at `inner`, which `wrap` wraps once it opened.
        unsafe {
            let inner = inner_of(file);
            let rc = base_open(base, name, inner, flags, out_flags);
            if rc == ffi::SQLITE_OK {
                temp::wrap(file, budget);
            } else {
                note_failed_open(rc);
                (*file).pMethods = std::ptr::null();
            }
            return rc;
        }
    }
    if flags & ffi::SQLITE_OPEN_MAIN_DB == 0 || name.is_null() {
        // SAFETY: SQLite allocated `szOsFile` bytes at `file`, more than the base needs; the
        // base opened (or not) the file there.
        return unsafe {
            not_read_only_for_want_of_files(
                base_open(base, name, file, flags, out_flags),
                file,
                flags,
                out_flags,
            )
        };
    }
    let main = file.cast::<MainFile>();
    // SAFETY: `file` has room for a `MainFile` and then the base's file (`szOsFile`), and is
    // aligned for SQLite's file structures (8 bytes), which is all `MainFile` needs.
    let inner = unsafe { inner_of(file) };
    // SAFETY: as above; the base writes its file at `inner`, which it opened (or not).
    let rc = unsafe {
        not_read_only_for_want_of_files(
            base_open(base, name, inner, flags, out_flags),
            inner,
            flags,
            out_flags,
        )
    };
    // SAFETY: `main` is ours to initialize; SQLite reads `pMethods` only after a success.
    unsafe {
        main.write(MainFile {
            base: ffi::sqlite3_file {
                pMethods: std::ptr::null(),
            },
            node: None,
            key: (0, 0),
            level: ffi::SQLITE_LOCK_NONE,
            shm_mapped: false,
            shm_shared: 0,
            shm_exclusive: 0,
        });
    }
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    // SAFETY: SQLite passes the database's path, a NUL-terminated string that outlives the file.
    let path = unsafe { CStr::from_ptr(name) };
    match attach(path, flags & ffi::SQLITE_OPEN_READONLY != 0) {
        Ok((key, node)) => {
            // SAFETY: initialized above.
            let main = unsafe { &mut *main };
            main.key = key;
            main.node = Some(node);
            main.base.pMethods = &MAIN_METHODS;
            ffi::SQLITE_OK
        }
        Err(rc) => {
            // SAFETY: the base opened `inner` successfully, so its methods are set; SQLite
            // will not call `xClose` on a file whose open failed, so it is closed here.
            unsafe {
                if let Some(close) = (*(*inner).pMethods).xClose {
                    close(inner);
                }
                std::ptr::drop_in_place(main);
            }
            rc
        }
    }
}

/// After the base VFS's open answered `rc`: a failed open is noted when its cause was a lack
/// of file descriptors ([`note_failed_open`]). And the unix VFS, refused a read-write open,
/// tries again read-only and answers that file (`SQLITE_OPEN_READONLY` in `out_flags`): when
/// the refusal was for want of file descriptors (another thread closed one in between), the
/// store's database would be open read-only and fail every write until it is closed again.
/// That file is closed and the open fails instead, as `SQLITE_CANTOPEN`.
///
/// # Safety
/// Called at once after the base's open, `file` being where it opened its file (when `rc`
/// is `SQLITE_OK`) and `out_flags` what SQLite passed (possibly null).
unsafe fn not_read_only_for_want_of_files(
    rc: c_int,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *const c_int,
) -> c_int {
    if rc != ffi::SQLITE_OK {
        note_failed_open(rc);
        return rc;
    }
    // SAFETY: SQLite's `pOutFlags` is null or points to an int the base has set.
    let read_only = !out_flags.is_null() && unsafe { *out_flags } & ffi::SQLITE_OPEN_READONLY != 0;
    if flags & ffi::SQLITE_OPEN_READWRITE == 0 || !read_only || !errno_says_out_of_files() {
        return rc;
    }
    crate::open_files::note_ran_out();
    // SAFETY: the open succeeded, so the base set the file's methods; SQLite calls no
    // `xClose` on a file whose open failed, so it is closed here, and `pMethods` is null
    // afterwards as SQLite expects of a failed open.
    unsafe {
        if let Some(close) = (*(*file).pMethods).xClose {
            close(file);
        }
        (*file).pMethods = std::ptr::null();
    }
    ffi::SQLITE_CANTOPEN
}

/// After the base VFS's open failed with `rc`: notes it when the cause was a lack of file
/// descriptors (its `errno`, which the base leaves as the failed `open` set it), so the store
/// can say so ([`crate::open_files::ran_out_lately`]).
fn note_failed_open(rc: c_int) {
    if rc & 0xff == ffi::SQLITE_CANTOPEN && errno_says_out_of_files() {
        crate::open_files::note_ran_out();
    }
}

/// Whether `errno` is `EMFILE` or `ENFILE`: this process, or the system, holds as many files
/// open as it may.
fn errno_says_out_of_files() -> bool {
    std::io::Error::last_os_error()
        .raw_os_error()
        .is_some_and(|code| code == libc::EMFILE || code == libc::ENFILE)
}

/// The base's file inside a main or temporary file.
///
/// # Safety
/// `file` points to an allocation of this VFS's `szOsFile` bytes.
unsafe fn inner_of(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: per the contract the allocation extends past the offset by the base's size.
    unsafe { file.cast::<u8>().add(INNER_OFFSET).cast() }
}

/// Finds or makes the node of the file at `path`, counting one more open file on it.
fn attach(path: &CStr, read_only: bool) -> Result<(Key, Arc<Node>), c_int> {
    let stat = rustix::fs::stat(path).map_err(|_| ffi::SQLITE_CANTOPEN)?;
    let key = (stat.st_dev, stat.st_ino);
    let mut nodes = lock(&NODES);
    if let Some(attached) = nodes.get_mut(&key) {
        attached.files += 1;
        return Ok((key, attached.node.clone()));
    }
    let node = Arc::new(Node {
        _process_lock: lock_for_process(path, read_only)?,
        state: Mutex::default(),
    });
    nodes.insert(
        key,
        Attached {
            node: node.clone(),
            files: 1,
        },
    );
    Ok((key, node))
}

/// Opens the file once more and locks SQLite's SHARED range with an open-file-description lock
/// (a write lock, or a read lock when the file can only be read): another process's SQLite
/// then finds the database locked. `SQLITE_BUSY` when another process holds a lock on it
/// (SQLite's "database is locked"), `SQLITE_IOERR_LOCK` when the file system refuses the lock.
fn lock_for_process(path: &CStr, read_only: bool) -> Result<OwnedFd, c_int> {
    use rustix::fs::{Mode, OFlags};
    let open = |flags| rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty());
    let cannot_open = |err: rustix::io::Errno| {
        if err == rustix::io::Errno::MFILE || err == rustix::io::Errno::NFILE {
            crate::open_files::note_ran_out();
        }
        ffi::SQLITE_CANTOPEN
    };
    let (fd, kind) = match open(OFlags::RDWR) {
        Ok(fd) => (fd, libc::F_WRLCK),
        Err(_) if read_only => (open(OFlags::RDONLY).map_err(cannot_open)?, libc::F_RDLCK),
        Err(err) => return Err(cannot_open(err)),
    };
    // SAFETY: a zeroed `flock` is valid (plain integers); the fields are set below.
    let mut range: libc::flock = unsafe { std::mem::zeroed() };
    range.l_type = kind as libc::c_short;
    range.l_whence = libc::SEEK_SET as libc::c_short;
    range.l_start = SHARED_FIRST;
    range.l_len = SHARED_SIZE;
    // A lock held elsewhere is tried again for a moment: a child this process forks (a test's
    // helper, say) shares, between its fork and its exec, the open file descriptions of the
    // files this process just closed, and with them their locks. Another process's SQLite
    // holding the database stays refused.
    let mut tries = 0;
    loop {
        // SAFETY: `fd` is open for the call; `range` is a valid `flock` that outlives it.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &raw const range) };
        if rc == 0 {
            return Ok(fd);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) if tries < LOCK_TRIES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Some(libc::EAGAIN | libc::EACCES) => return Err(ffi::SQLITE_BUSY),
            _ => return Err(ffi::SQLITE_IOERR_LOCK),
        }
    }
}

/// How many more times [`lock_for_process`] tries a lock held elsewhere, 2 ms apart.
const LOCK_TRIES: u32 = 25;

/// # Safety
/// `file` is a main file this VFS opened, open for the returned borrow (SQLite calls its
/// methods from one thread at a time per file).
unsafe fn main_file<'a>(file: *mut ffi::sqlite3_file) -> &'a mut MainFile {
    // SAFETY: per the contract.
    unsafe { &mut *file.cast::<MainFile>() }
}

/// The base's file and its methods, for the calls forwarded to it.
///
/// # Safety
/// `file` is a main or temporary file this VFS opened and has not closed.
unsafe fn inner(
    file: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    // SAFETY: per the contract the base's file opened successfully, so its methods are set
    // (static in SQLite).
    unsafe {
        let inner = inner_of(file);
        (inner, &*(*inner).pMethods)
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file it opened through this VFS, once.
    unsafe {
        let _ = unlock_file(file, ffi::SQLITE_LOCK_NONE);
        let _ = shm_unmap(file, 0);
        let main = main_file(file);
        if let Some(node) = main.node.take() {
            let mut nodes = lock(&NODES);
            if let Some(attached) = nodes.get_mut(&main.key) {
                attached.files -= 1;
                if attached.files == 0 {
                    nodes.remove(&main.key);
                }
            }
            drop(node);
        }
        let (inner, methods) = inner(file);
        let rc = methods.xClose.map_or(ffi::SQLITE_OK, |close| close(inner));
        std::ptr::drop_in_place(file.cast::<MainFile>());
        rc
    }
}

// Plain I/O goes to the base's file.

/// Defines I/O methods that forward their call to the base's file, answering `$fallback` should
/// the base lack the method.
macro_rules! forward {
    ($($name:ident => $method:ident($($arg:ident: $ty:ty),*) else $fallback:expr;)*) => {$(
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite calls this on a main or temporary file this VFS opened; the call
            // goes to the base's file with SQLite's own arguments.
            unsafe {
                let (inner, methods) = inner(file);
                methods.$method.map_or($fallback, |f| f(inner, $($arg),*))
            }
        }
    )*};
}
use forward;

forward! {
    read => xRead(buf: *mut c_void, amount: c_int, offset: i64) else ffi::SQLITE_IOERR_READ;
    write => xWrite(buf: *const c_void, amount: c_int, offset: i64) else ffi::SQLITE_IOERR_WRITE;
    truncate => xTruncate(size: i64) else ffi::SQLITE_IOERR_TRUNCATE;
    sync => xSync(flags: c_int) else ffi::SQLITE_IOERR_FSYNC;
    file_size => xFileSize(size: *mut i64) else ffi::SQLITE_IOERR_FSTAT;
    file_control => xFileControl(op: c_int, arg: *mut c_void) else ffi::SQLITE_NOTFOUND;
    sector_size => xSectorSize() else 4096;
    device_characteristics => xDeviceCharacteristics() else 0;
    unfetch => xUnfetch(offset: i64, page: *mut c_void) else ffi::SQLITE_OK;
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded with SQLite's own arguments; without the method nothing is mapped
    // (SQLite then reads the page).
    unsafe {
        let (inner, methods) = inner(file);
        match methods.xFetch {
            Some(f) => f(inner, offset, amount, out),
            None => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

// File locks between this process's connections: SQLite's `unixLock` / `posixUnlock` rules for
// the connections of one process, without the posix locks (the node holds the process's).

unsafe extern "C" fn lock_file(file: *mut ffi::sqlite3_file, wanted: c_int) -> c_int {
    // SAFETY: SQLite calls this on a file this VFS opened.
    let main = unsafe { main_file(file) };
    let Some(node) = &main.node else {
        return ffi::SQLITE_IOERR_LOCK;
    };
    let mut state = lock(&node.state);
    let (rc, level) = take_lock(&mut state, main.level, wanted);
    main.level = level;
    rc
}

/// Moves a connection holding `held` towards `wanted`; answers the result and the lock it then
/// holds.
fn take_lock(state: &mut NodeState, held: c_int, wanted: c_int) -> (c_int, c_int) {
    use ffi::{SQLITE_LOCK_EXCLUSIVE, SQLITE_LOCK_PENDING, SQLITE_LOCK_SHARED};
    if held >= wanted {
        return (ffi::SQLITE_OK, held);
    }
    // Another connection holds a lock that precludes this one.
    if held != state.level && (state.level >= SQLITE_LOCK_PENDING || wanted > SQLITE_LOCK_SHARED) {
        return (ffi::SQLITE_BUSY, held);
    }
    if wanted == SQLITE_LOCK_SHARED {
        state.shared += 1;
        if state.level < SQLITE_LOCK_SHARED {
            state.level = SQLITE_LOCK_SHARED;
        }
        return (ffi::SQLITE_OK, SQLITE_LOCK_SHARED);
    }
    if wanted == SQLITE_LOCK_EXCLUSIVE && state.shared > 1 {
        // Readers of this process are still in: PENDING keeps new ones out meanwhile.
        state.level = SQLITE_LOCK_PENDING;
        return (ffi::SQLITE_BUSY, SQLITE_LOCK_PENDING);
    }
    // RESERVED, or EXCLUSIVE with no other reader (SQLite asks for either only once it holds
    // SHARED).
    state.level = wanted;
    (ffi::SQLITE_OK, wanted)
}

unsafe extern "C" fn unlock_file(file: *mut ffi::sqlite3_file, wanted: c_int) -> c_int {
    // SAFETY: SQLite calls this on a file this VFS opened.
    let main = unsafe { main_file(file) };
    let Some(node) = &main.node else {
        return ffi::SQLITE_OK;
    };
    let mut state = lock(&node.state);
    main.level = release_lock(&mut state, main.level, wanted);
    ffi::SQLITE_OK
}

/// Moves a connection holding `held` down to `wanted` (SHARED or NONE); answers the lock it
/// then holds.
fn release_lock(state: &mut NodeState, held: c_int, wanted: c_int) -> c_int {
    if held <= wanted {
        return held;
    }
    if held > ffi::SQLITE_LOCK_SHARED {
        state.level = ffi::SQLITE_LOCK_SHARED;
    }
    if wanted == ffi::SQLITE_LOCK_NONE {
        state.shared = state.shared.saturating_sub(1);
        if state.shared == 0 {
            state.level = ffi::SQLITE_LOCK_NONE;
        }
    }
    wanted
}

unsafe extern "C" fn check_reserved(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: SQLite calls this on a file this VFS opened, with a place for the answer.
    unsafe {
        let main = main_file(file);
        let reserved = main
            .node
            .as_ref()
            .is_some_and(|node| lock(&node.state).level > ffi::SQLITE_LOCK_SHARED);
        *out = c_int::from(reserved);
    }
    ffi::SQLITE_OK
}

// The WAL index, on the heap.

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls this on a file this VFS opened, with a place for the address.
    let main = unsafe { main_file(file) };
    let Some(node) = &main.node else {
        return ffi::SQLITE_IOERR_SHMMAP;
    };
    let (Ok(region), Ok(size)) = (usize::try_from(region), usize::try_from(size)) else {
        return ffi::SQLITE_IOERR_SHMMAP;
    };
    let mut state = lock(&node.state);
    if !main.shm_mapped {
        main.shm_mapped = true;
        state.shm_users += 1;
    }
    while state.regions.len() <= region && extend != 0 {
        state.regions.push(Region::new(size));
    }
    let address = state
        .regions
        .get(region)
        .map_or(std::ptr::null_mut(), |region| region.start.cast());
    // SAFETY: `out` is SQLite's place for the address; a region stays allocated until the
    // last connection unmaps the index.
    unsafe { *out = address };
    ffi::SQLITE_OK
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: SQLite calls this on a file this VFS opened.
    let main = unsafe { main_file(file) };
    let Some(node) = &main.node else {
        return ffi::SQLITE_IOERR_SHMLOCK;
    };
    let (Ok(offset), Ok(n)) = (usize::try_from(offset), usize::try_from(n)) else {
        return ffi::SQLITE_IOERR_SHMLOCK;
    };
    if n == 0 || offset + n > ffi::SQLITE_SHM_NLOCK as usize {
        return ffi::SQLITE_IOERR_SHMLOCK;
    }
    let mut state = lock(&node.state);
    shm_lock_in(
        &mut state.shm_locks,
        &mut main.shm_shared,
        &mut main.shm_exclusive,
        offset,
        n,
        flags,
    )
}

/// SQLite's `unixShmLock` for the connections of one process: takes or releases locks
/// `offset..offset + n` of the WAL index for a connection holding `shared` and `exclusive`.
fn shm_lock_in(
    locks: &mut [i32],
    shared: &mut u16,
    exclusive: &mut u16,
    offset: usize,
    n: usize,
    flags: c_int,
) -> c_int {
    let mask: u16 = ((1u16 << n) - 1) << offset;
    let range = offset..offset + n;
    if flags & ffi::SQLITE_SHM_UNLOCK != 0 {
        for i in range {
            let bit = 1u16 << i;
            if *exclusive & bit != 0 {
                locks[i] = 0;
            } else if *shared & bit != 0 {
                locks[i] -= 1;
            }
        }
        *shared &= !mask;
        *exclusive &= !mask;
        return ffi::SQLITE_OK;
    }
    if flags & ffi::SQLITE_SHM_SHARED != 0 {
        if *shared & mask == mask {
            return ffi::SQLITE_OK;
        }
        if locks[offset] < 0 {
            return ffi::SQLITE_BUSY;
        }
        locks[offset] += 1;
        *shared |= mask;
        return ffi::SQLITE_OK;
    }
    if locks[range.clone()].iter().any(|&held| held != 0) {
        return ffi::SQLITE_BUSY;
    }
    for held in &mut locks[range] {
        *held = -1;
    }
    *exclusive |= mask;
    ffi::SQLITE_OK
}

unsafe extern "C" fn shm_barrier(_file: *mut ffi::sqlite3_file) {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, _delete: c_int) -> c_int {
    // SAFETY: SQLite calls this on a file this VFS opened.
    let main = unsafe { main_file(file) };
    let Some(node) = &main.node else {
        return ffi::SQLITE_OK;
    };
    if !main.shm_mapped {
        return ffi::SQLITE_OK;
    }
    let mut state = lock(&node.state);
    let (mut shared, mut exclusive) = (main.shm_shared, main.shm_exclusive);
    shm_lock_in(
        &mut state.shm_locks,
        &mut shared,
        &mut exclusive,
        0,
        ffi::SQLITE_SHM_NLOCK as usize,
        ffi::SQLITE_SHM_UNLOCK,
    );
    main.shm_shared = 0;
    main.shm_exclusive = 0;
    main.shm_mapped = false;
    state.shm_users -= 1;
    if state.shm_users == 0 {
        state.regions = Vec::new();
    }
    ffi::SQLITE_OK
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::Connection;

    use super::*;
    use crate::sqlite::{self, Durability, Schema};

    const T: Schema = Schema::of(&["CREATE TABLE IF NOT EXISTS t (v)"]);

    fn wal_len(path: &Path) -> u64 {
        std::fs::metadata(sqlite::wal_path(path)).map_or(u64::MAX, |m| m.len())
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn connections_of_the_process_share_the_wal_index_and_a_reader_keeps_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let writer = sqlite::open(&path, Durability::Process, &T).unwrap();
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let reader = sqlite::open_reader(&path).unwrap();
        assert_eq!(
            count(&reader),
            1,
            "the reader sees the writer's commit, still in the WAL"
        );

        reader.execute_batch("BEGIN").unwrap();
        assert_eq!(count(&reader), 1);
        writer.execute("INSERT INTO t VALUES (2)", []).unwrap();
        assert_eq!(count(&reader), 1, "a read transaction keeps its snapshot");
        reader.execute_batch("COMMIT").unwrap();
        assert_eq!(count(&reader), 2, "the next one sees the new commit");

        // A third connection checkpoints while both are open (as the checkpoint threads do).
        let checkpointer =
            sqlite::open_existing(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE).unwrap();
        let (busy, _, done): (i64, i64, i64) = checkpointer
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0);
        assert!(done > 0, "the frames went into the database");
        writer.execute("INSERT INTO t VALUES (3)", []).unwrap();
        assert_eq!(count(&reader), 3);
        assert_eq!(count(&checkpointer), 3);
    }

    /// A store's path is its own full name; a database reached through a symbolic link is
    /// named, and keeps its WAL, where the link leads; `..` is resolved. Connections naming
    /// one file through a linked directory and through the real one share its WAL.
    #[test]
    fn names_resolve_links_and_dots_only_where_the_files_would_differ() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let real = root.join("real");
        std::fs::create_dir(&real).unwrap();
        let plain = real.join("plain.db");
        let conn = sqlite::open(&plain, Durability::Process, &T).unwrap();
        assert_eq!(
            conn.path(),
            plain.to_str(),
            "a plain absolute path names itself"
        );

        let target = real.join("target.db");
        drop(sqlite::open(&target, Durability::Process, &T).unwrap());
        let link = root.join("link.db");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let conn = sqlite::open(&link, Durability::Process, &T).unwrap();
        assert_eq!(
            conn.path(),
            target.to_str(),
            "a linked database is named by its target"
        );
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert!(
            wal_len(&target) > 0,
            "the WAL is beside the database itself"
        );
        assert!(!sqlite::wal_path(&link).exists(), "and not beside the link");

        let dotted = root.join("real/../real/plain.db");
        let conn = sqlite::open(&dotted, Durability::Process, &T).unwrap();
        assert_eq!(conn.path(), plain.to_str(), "`..` resolved");

        let linked_dir = root.join("linked");
        std::os::unix::fs::symlink(&real, &linked_dir).unwrap();
        let writer = sqlite::open(&linked_dir.join("plain.db"), Durability::Process, &T).unwrap();
        writer.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let reader = sqlite::open_reader(&plain).unwrap();
        assert_eq!(
            count(&reader),
            1,
            "the commit in the WAL is seen through the real path"
        );
        assert!(wal_len(&plain) > 0);
    }

    /// Readers on other threads see whole transactions only, in order, while a writer commits
    /// and a third connection checkpoints: what the shared WAL index and its locks are for.
    #[test]
    fn concurrent_readers_see_only_whole_transactions_while_a_writer_commits_and_checkpoints() {
        const TRANSFERS: i64 = 20_000;
        const TOTAL: i64 = 1_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let writer = sqlite::open(
            &path,
            Durability::Process,
            &Schema::of(&["CREATE TABLE IF NOT EXISTS acct (id INTEGER PRIMARY KEY, bal INTEGER)"]),
        )
        .unwrap();
        writer
            .execute_batch(&format!(
                "INSERT INTO acct VALUES (1, {TOTAL}), (2, 0), (3, 0)" // 3: transfers made
            ))
            .unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        let reader = sqlite::open_reader(&path).unwrap();
                        let (mut seen, mut reads) = (0, 0);
                        let read = || -> (i64, i64) {
                            reader
                                .query_row(
                                    "SELECT (SELECT sum(bal) FROM acct WHERE id < 3),
                                            (SELECT bal FROM acct WHERE id = 3)",
                                    [],
                                    |row| Ok((row.get(0)?, row.get(1)?)),
                                )
                                .unwrap()
                        };
                        while !done.load(std::sync::atomic::Ordering::Acquire) || reads == 0 {
                            // One read transaction across commits and checkpoints: its
                            // snapshot must not move (nor may the frames under it be reused).
                            reader.execute_batch("BEGIN").unwrap();
                            let (sum, made) = read();
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            let again = read();
                            reader.execute_batch("COMMIT").unwrap();
                            assert_eq!(sum, TOTAL, "a transfer seen half done");
                            assert_eq!(again, (sum, made), "the snapshot moved");
                            assert!(made >= seen, "transfers went back: {made} after {seen}");
                            seen = made;
                            reads += 1;
                        }
                        seen
                    })
                })
                .collect();
            let checkpointer = scope.spawn(|| {
                let conn =
                    sqlite::open_existing(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
                        .unwrap();
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                        .unwrap();
                    std::thread::yield_now();
                }
            });
            for _ in 0..TRANSFERS {
                writer
                    .execute_batch(
                        "BEGIN IMMEDIATE;
                         UPDATE acct SET bal = bal - 1 WHERE id = 1;
                         UPDATE acct SET bal = bal + 1 WHERE id = 2;
                         UPDATE acct SET bal = bal + 1 WHERE id = 3;
                         COMMIT;",
                    )
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Release);
            checkpointer.join().unwrap();
            for reader in readers {
                assert!(reader.join().unwrap() <= TRANSFERS);
            }
        });
        let made: i64 = writer
            .query_row("SELECT bal FROM acct WHERE id = 3", [], |row| row.get(0))
            .unwrap();
        assert_eq!(made, TRANSFERS);
    }

    #[test]
    fn the_last_connection_to_close_checkpoints_and_empties_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let writer = sqlite::open(&path, Durability::Process, &T).unwrap();
        let reader = sqlite::open_reader(&path).unwrap();
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert_eq!(count(&reader), 1);
        let other =
            sqlite::open_existing(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE).unwrap();
        drop(other);
        assert!(
            wal_len(&path) > 0,
            "not the last: the others still use the WAL"
        );
        let stat = rustix::fs::stat(&path).unwrap();
        let opens = || {
            lock(&NODES)
                .get(&(stat.st_dev, stat.st_ino))
                .map(|attached| attached.files)
        };
        assert_eq!(opens(), Some(2));
        drop(reader);
        drop(writer);
        assert_eq!(
            wal_len(&path),
            0,
            "the last close checkpointed and emptied the WAL"
        );
        assert_eq!(
            opens(),
            None,
            "closed: the file's node and its lock are gone"
        );
        let reopened = sqlite::open(&path, Durability::Process, &Schema::NONE).unwrap();
        assert_eq!(count(&reopened), 1, "the row is in the database");
        assert_eq!(opens(), Some(1));
    }

    /// Hostile: a connection through SQLite's default VFS — another tool in this process or
    /// another process — must not write beside the host's connections (it would keep its own
    /// WAL index and corrupt the database).
    #[test]
    fn a_connection_through_another_vfs_finds_a_live_database_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let writer = sqlite::open(&path, Durability::Process, &T).unwrap();
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let outsider = Connection::open(&path).unwrap();
        outsider.busy_timeout(std::time::Duration::ZERO).unwrap();
        let err = outsider
            .execute("INSERT INTO t VALUES (2)", [])
            .expect_err("the host holds the database");
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy),
            "{err}"
        );
        drop(outsider);
        drop(writer);
        let outsider = Connection::open(&path).unwrap();
        assert_eq!(
            count(&outsider),
            1,
            "once the host closed it, anyone may open it"
        );
    }

    #[test]
    fn file_locks_follow_sqlite_s_rules_between_connections() {
        use ffi::{
            SQLITE_LOCK_EXCLUSIVE, SQLITE_LOCK_NONE, SQLITE_LOCK_PENDING, SQLITE_LOCK_RESERVED,
            SQLITE_LOCK_SHARED,
        };
        let mut node = NodeState::default();
        let (ok, a) = take_lock(&mut node, SQLITE_LOCK_NONE, SQLITE_LOCK_SHARED);
        assert_eq!((ok, a), (ffi::SQLITE_OK, SQLITE_LOCK_SHARED));
        let (ok, b) = take_lock(&mut node, SQLITE_LOCK_NONE, SQLITE_LOCK_SHARED);
        assert_eq!(
            (ok, b),
            (ffi::SQLITE_OK, SQLITE_LOCK_SHARED),
            "readers share"
        );
        let (ok, a) = take_lock(&mut node, a, SQLITE_LOCK_RESERVED);
        assert_eq!((ok, a), (ffi::SQLITE_OK, SQLITE_LOCK_RESERVED));
        let (busy, b2) = take_lock(&mut node, b, SQLITE_LOCK_RESERVED);
        assert_eq!(
            (busy, b2),
            (ffi::SQLITE_BUSY, SQLITE_LOCK_SHARED),
            "one writer at a time"
        );
        let (busy, a) = take_lock(&mut node, a, SQLITE_LOCK_EXCLUSIVE);
        assert_eq!(
            (busy, a),
            (ffi::SQLITE_BUSY, SQLITE_LOCK_PENDING),
            "no EXCLUSIVE while another connection reads; PENDING meanwhile"
        );
        let (busy, c) = take_lock(&mut node, SQLITE_LOCK_NONE, SQLITE_LOCK_SHARED);
        assert_eq!(
            (busy, c),
            (ffi::SQLITE_BUSY, SQLITE_LOCK_NONE),
            "PENDING keeps new readers out"
        );
        let b = release_lock(&mut node, b, SQLITE_LOCK_NONE);
        assert_eq!(b, SQLITE_LOCK_NONE);
        let (ok, a) = take_lock(&mut node, a, SQLITE_LOCK_EXCLUSIVE);
        assert_eq!(
            (ok, a),
            (ffi::SQLITE_OK, SQLITE_LOCK_EXCLUSIVE),
            "alone, it gets EXCLUSIVE"
        );
        let (busy, _) = take_lock(&mut node, SQLITE_LOCK_NONE, SQLITE_LOCK_SHARED);
        assert_eq!(busy, ffi::SQLITE_BUSY);
        let a = release_lock(&mut node, a, SQLITE_LOCK_SHARED);
        assert_eq!(a, SQLITE_LOCK_SHARED);
        let (ok, _) = take_lock(&mut node, SQLITE_LOCK_NONE, SQLITE_LOCK_SHARED);
        assert_eq!(
            ok,
            ffi::SQLITE_OK,
            "after the downgrade readers come in again"
        );
        assert_eq!(node.shared, 2);
    }

    #[test]
    fn wal_index_locks_are_shared_or_exclusive_between_connections() {
        const LOCK_SHARED: c_int = ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_SHARED;
        const LOCK_EXCLUSIVE: c_int = ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE;
        const UNLOCK_SHARED: c_int = ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_SHARED;
        const UNLOCK_EXCLUSIVE: c_int = ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE;
        let mut locks = [0i32; 8];
        let (mut a_shared, mut a_excl, mut b_shared, mut b_excl) = (0u16, 0u16, 0u16, 0u16);
        let mut a = |locks: &mut [i32], offset, n, flags| {
            shm_lock_in(locks, &mut a_shared, &mut a_excl, offset, n, flags)
        };
        assert_eq!(a(&mut locks, 3, 1, LOCK_SHARED), ffi::SQLITE_OK);
        assert_eq!(
            shm_lock_in(&mut locks, &mut b_shared, &mut b_excl, 3, 1, LOCK_SHARED),
            ffi::SQLITE_OK,
            "two readers share a read lock"
        );
        assert_eq!(
            shm_lock_in(&mut locks, &mut b_shared, &mut b_excl, 0, 8, LOCK_EXCLUSIVE),
            ffi::SQLITE_BUSY,
            "no exclusive range over a slot another connection reads"
        );
        assert_eq!(
            locks,
            [0, 0, 0, 2, 0, 0, 0, 0],
            "a refused lock takes nothing"
        );
        assert_eq!(
            a(&mut locks, 0, 1, LOCK_EXCLUSIVE),
            ffi::SQLITE_OK,
            "the write lock"
        );
        assert_eq!(
            shm_lock_in(&mut locks, &mut b_shared, &mut b_excl, 0, 1, LOCK_EXCLUSIVE),
            ffi::SQLITE_BUSY,
            "one writer"
        );
        assert_eq!(a(&mut locks, 3, 1, UNLOCK_SHARED), ffi::SQLITE_OK);
        assert_eq!(locks[3], 1, "the other reader still holds its share");
        assert_eq!(a(&mut locks, 0, 1, UNLOCK_EXCLUSIVE), ffi::SQLITE_OK);
        assert_eq!(
            shm_lock_in(&mut locks, &mut b_shared, &mut b_excl, 0, 1, LOCK_EXCLUSIVE),
            ffi::SQLITE_OK
        );
        assert_eq!(
            shm_lock_in(
                &mut locks,
                &mut b_shared,
                &mut b_excl,
                0,
                8,
                UNLOCK_EXCLUSIVE
            ),
            ffi::SQLITE_OK,
            "unlocking a range releases what the connection holds in it"
        );
        assert_eq!(locks, [0; 8]);
    }
}
