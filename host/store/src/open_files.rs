//! The process's table of open files, grown once when the host starts.
//!
//! Linux grows a process's file table when an open needs a slot past its end, to the next
//! power of two, and the table never shrinks. In a process with several threads each growth
//! first waits for an RCU grace period (`expand_files` → `synchronize_rcu`), and every thread
//! opening a file meanwhile waits with it: on this VM 10–25 ms. A host creating stores one
//! after another crosses a growth every time its open files double (256, 512, … 8,192 for
//! 1,000 stores), and the store being created then, and any waking store, waited the whole
//! grace period: found with `perf sched` in the `provisioning` bench row, where those waits were
//! the slowest webhooks (10–27 ms against a p50 of 1.2–1.5 ms).
//!
//! Growing the table to the files the host will hold, once at start, takes those waits off
//! the requests. It costs the kernel 8 bytes per slot (about 100 KB per 1,000 stores).

use std::io;
use std::os::fd::AsFd;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Resource, getrlimit};

/// Files an awake store holds: its two databases and their WALs, each opened by the store's
/// writer and by its reader, its `files/` directory, and a few more at times (counted by the
/// `reconcile` bench row: about 12).
pub const PER_STORE: usize = 12;

/// Files a spare store directory holds: its two databases and their WALs.
pub const PER_SPARE: usize = 4;

/// Files the host holds besides its stores: its own database, the plugins, sockets.
pub const HOST: usize = 1024;

/// How many files a host running `stores` stores and keeping `spares` spare directories may
/// hold open.
pub fn wanted(stores: usize, spares: usize) -> usize {
    stores
        .saturating_mul(PER_STORE)
        .saturating_add(spares.saturating_mul(PER_SPARE))
        .saturating_add(HOST)
}

/// The fewest files all guests together may hold open (see [`for_guests`]): four guests with
/// all the files they may each hold open (listings aside). A host whose open-file limit leaves
/// less beside its own files still lets its guests open some, and says at start that it is
/// short.
pub const GUESTS_AT_LEAST: usize = 4 * storehost_runtime::files::MAX_OPEN_FILES;

/// How many files, directories and listings all guests together may hold open on a host
/// running `stores` stores, keeping `spares` spare directories and serving up to
/// `connections` API connections at once: what the open-file limit leaves beside the host's
/// own files ([`wanted`], which the host grows its file table to at start) and its
/// connections' sockets, and at least [`GUESTS_AT_LEAST`] (see [`room_for_guests`]).
pub fn for_guests(stores: usize, spares: usize, connections: usize) -> usize {
    room_for_guests(stores, spares, connections).max(GUESTS_AT_LEAST)
}

/// What the open-file limit leaves guests beside the host's own files and connections (see
/// [`for_guests`]); less than [`GUESTS_AT_LEAST`] on a host whose limit is short.
pub fn room_for_guests(stores: usize, spares: usize, connections: usize) -> usize {
    limit()
        .saturating_sub(wanted(stores, spares))
        .saturating_sub(connections)
}

/// Raises this process's open-file limit (its soft `RLIMIT_NOFILE`) to the most the system
/// lets it (the hard limit), as servers holding many files do: many systems start a process
/// with 1,024 however many it may hold, fewer than a host of 100 awake stores needs. Answers
/// the limit before and after, or why it could not be raised (the limit then stays as it was).
pub fn raise_limit() -> io::Result<(usize, usize)> {
    use rustix::process::{Rlimit, setrlimit};
    let before = limit();
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current != maximum {
        let raised = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: maximum,
                maximum,
            },
        );
        if raised == Err(rustix::io::Errno::PERM) {
            // A hard limit above the system's most open files per process (`fs.nr_open`,
            // lowered since the limit was set) is refused whole: both go to that most.
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok());
            let most = nr_open
                .zip(maximum)
                .map(|(nr_open, hard)| nr_open.min(hard));
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: most,
                    maximum: most,
                },
            )?;
        } else {
            raised?;
        }
    }
    Ok((before, limit()))
}

/// When an open of a store file through SQLite last failed for want of file descriptors
/// (milliseconds since [`EPOCH`], 0: never), noted by the VFS ([`note_ran_out`]).
static RAN_OUT_AT: AtomicU64 = AtomicU64::new(0);

/// The start of [`RAN_OUT_AT`]'s clock.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// How long after an open failed for want of file descriptors another SQLite open failure is
/// taken for the same cause.
const RAN_OUT_LATELY: Duration = Duration::from_secs(2);

/// Notes that an open failed with `EMFILE` or `ENFILE` (this process, or the system, holds
/// as many files open as it may).
pub(crate) fn note_ran_out() {
    let at = EPOCH.elapsed().as_millis().max(1);
    RAN_OUT_AT.store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Whether an open failed for want of file descriptors in the last two seconds: SQLite says
/// only "unable to open database file" when an open fails, whatever the reason, so a store
/// whose database could not be opened asks this (the VFS sees the open's `errno`).
pub(crate) fn ran_out_lately() -> bool {
    let at = RAN_OUT_AT.load(Ordering::Relaxed);
    at != 0
        && EPOCH.elapsed().as_millis().saturating_sub(u128::from(at)) <= RAN_OUT_LATELY.as_millis()
}

/// The most files this process may hold open (its soft `RLIMIT_NOFILE`; `usize::MAX` when
/// unlimited).
pub fn limit() -> usize {
    getrlimit(Resource::Nofile)
        .current
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// Grows this process's file table so that `files` files fit without growing it again (up to
/// the open-file limit, past which no file opens anyway); answers the slots it now has at
/// least. `near` is any open file, used to take the table's last slot for a moment.
pub fn reserve(files: usize, near: impl AsFd) -> io::Result<usize> {
    // Descriptors run from 0 to `limit - 1`.
    let last = files.min(limit()).saturating_sub(1);
    let Ok(last_fd) = i32::try_from(last) else {
        return Err(io::Error::other(format!(
            "{files} files is more than a file table holds"
        )));
    };
    // The lowest free descriptor at or above `last`: the table grows to hold it, and keeps
    // that size once it is closed again.
    drop(rustix::io::fcntl_dupfd_cloexec(near, last_fd)?);
    Ok(last + 1)
}
