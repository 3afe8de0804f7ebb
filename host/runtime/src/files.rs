//! A store's files directory as its guest sees it (`/data`): wasmtime-wasi's filesystem with
//! the store's `files` quota and an open-file cap in front of it.
//!
//! Every call of `wasi:filesystem/types` but a directory listing (read a few entries at a time,
//! see [`listing`]) goes to wasmtime-wasi's own implementation; the ones
//! that make the directory hold more (writes, a larger length, new files, directories and
//! links) first reserve what they add from the store's [`FilesUsage`], and are refused with
//! `insufficient-space` (the guest's "No space left on device") when it has no room. The ones
//! that free space (removals, truncation, a rename over a file) give it back, once they are
//! done. A stream opened for writing is one of ours, which reserves what each write adds and
//! writes at once, so no write is ever under way in the background while another call is
//! counted. A guest holds at most [`MAX_OPEN_FILES`] files and [`MAX_LISTINGS`] directory
//! listings at once, all guests of a host together at most what their [`GuestOpenFiles`]
//! allows, and a guest nests directories at most [`MAX_DIR_DEPTH`] levels deep.
//!
//! A file removed while the guest holds it open keeps its bytes on disk: they are given back
//! once it is closed. Where the count cannot tell (a removed file that could not be compared
//! with the open ones, bytes written to a file after it was removed) it errs towards too
//! much until the store starts again and its directory is measured afresh, never towards too
//! little: what the directory holds stays within the quota.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, DescriptorType, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, FsError, FsResult};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::lock;
use crate::sandbox::BYTES_PER_CPU_MS;
use listing::Listing;

mod listing;
mod tree;

/// The most directory listings one sandbox's guest holds at once: each holds one of the host's
/// open files, and up to [`listing::READ_AHEAD`] entries read ahead.
pub const MAX_LISTINGS: usize = 16;

/// What each file, directory and link counts besides its bytes: one filesystem block.
pub const ENTRY_BYTES: u64 = 4096;

/// The most files and directories one sandbox's guest holds open at once. Each is one of the
/// host's own open files, which every store's databases need too.
pub const MAX_OPEN_FILES: usize = 64;

/// The most levels of directories below `/data`: a directory the guest would make (or move)
/// deeper is refused with `name-too-long`. Deep enough for any layout a plugin keeps; it
/// bounds what each level costs the host: the climb through `..` by which a new directory's
/// depth is learnt (one open per level), and the open file per level that the tools walking
/// a store's files hold (removing a purged store's directory, the backup's copy, which goes
/// no deeper than 256). It is not what keeps paths under the system's `PATH_MAX`: 64 levels
/// of 255-byte names are 16 KiB, so the host must reach the files through handles, not paths
/// (its count does; the backup still writes, lists and packs its copy by path, and fails on
/// such a store).
pub const MAX_DIR_DEPTH: usize = 64;

/// The host's open files that all guests together may hold: each file, directory or
/// listing a guest keeps open is one of the host's own open files, which every store's
/// databases, event appends, provisioning and the API's accept need too. The per-guest caps
/// ([`MAX_OPEN_FILES`], [`MAX_LISTINGS`]) keep one guest from taking them; this keeps many
/// from taking them together (a few hundred guests holding 80 each used up a 20,000-file
/// limit, and every other store's next open failed with "too many open files"). A guest open
/// past it is refused with WASI's `quota`, as past its own cap. One per runtime, shared by
/// every sandbox.
#[derive(Debug)]
pub struct GuestOpenFiles {
    held: AtomicUsize,
    limit: usize,
    /// Opens and listings refused because all guests together held `limit`.
    refused: AtomicU64,
    /// When the last refusal was logged, in milliseconds after `made` (`u64::MAX`: never).
    warned_at_ms: AtomicU64,
    made: std::time::Instant,
}

/// At most one log line a minute says that guests were refused for the host-wide count.
const REFUSAL_WARNING_EVERY_MS: u64 = 60_000;

impl GuestOpenFiles {
    /// Room for `limit` open files and listings, all guests together.
    pub fn new(limit: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit,
            refused: AtomicU64::new(0),
            warned_at_ms: AtomicU64::new(u64::MAX),
            made: std::time::Instant::now(),
        }
    }

    /// Files and listings guests hold now, and opens under way (one closed since counts
    /// until its guest's next open, listing or close, or the end of the call that closed it).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The most they may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Opens and listings refused so far because all guests together held [`Self::limit`].
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Counts a refusal, and says so in the log (at most once a minute): the guest only sees
    /// WASI's `quota`, the same as past its own cap.
    fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.made.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let last = self.warned_at_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= REFUSAL_WARNING_EVERY_MS;
        if due
            && self
                .warned_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                held = self.held(),
                limit = self.limit,
                refused = self.refusals(),
                "plugins together hold all the open files the host's open-file limit leaves them: \
                 further guest opens get WASI `quota` until some are closed; raise the hard open-file limit \
                 (systemd LimitNOFILE=, ulimit -Hn: the host raises its own to it at start) or \
                 lower max_stores to give them more"
            );
        }
    }

    /// Counts one more if there is room; `false` (and nothing counted) if not.
    fn take_one(&self) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < self.limit).then_some(held + 1)
            })
            .is_ok()
    }

    /// Counts `count` fewer.
    fn give_back(&self, count: usize) {
        if count == 0 {
            return;
        }
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                debug_assert!(held >= count, "{count} given back of {held} held");
                Some(held.saturating_sub(count))
            });
    }
}

/// What a store's files directory holds and may hold, in bytes (each file, directory and link
/// counted as its length plus [`ENTRY_BYTES`]). One per store, shared by its sandboxes.
#[derive(Debug)]
pub struct FilesUsage {
    used: AtomicU64,
    limit: AtomicU64,
    /// The directory measured (the guest's `/data`), which depths are counted from; `None`
    /// when there was none (no directory the guest may make then).
    root: Option<tree::Identity>,
}

impl FilesUsage {
    /// Counts what `dir` holds now, under a quota of `limit` bytes. Every level is counted,
    /// also those deeper than [`MAX_DIR_DEPTH`] (made before there was a cap, or by an
    /// operator) or than `PATH_MAX`: the walk holds two directories open and no stack frame
    /// per level, so depth costs it nothing, and a store whose files could not be counted
    /// could not start.
    pub fn measure(dir: &Path, limit: u64) -> io::Result<Self> {
        let (used, root) = match bytes_in(dir)? {
            Some((used, root)) => (used, Some(root)),
            None => (0, None),
        };
        Ok(Self {
            used: AtomicU64::new(used),
            limit: AtomicU64::new(limit),
            root,
        })
    }

    /// A count with no quota, for a sandbox without a files directory.
    pub(crate) fn unlimited() -> Self {
        Self {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            root: None,
        }
    }

    /// What the directory holds, as counted.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The quota.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Applies a new quota (what is held already stays; only growth is refused).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Counts `bytes` more if they fit under the quota; `false` (and nothing counted) if not.
    fn reserve(&self, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    /// Counts `bytes` less.
    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// The length of `file`.
fn length(file: &std::fs::File) -> FsResult<u64> {
    Ok(file.metadata().map_err(ErrorCode::from)?.len())
}

/// Whether `file` has no name left (it was removed while open).
fn removed(file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata().is_ok_and(|meta| meta.nlink() == 0)
}

/// Bytes under `dir` as the quota counts them, with `dir`'s identity; `None` when there is no
/// `dir`. Symbolic links are counted, not followed, and a file with several names counts its
/// bytes once. The tree is walked through handles (see [`tree`]): its paths may be longer
/// than `PATH_MAX`.
fn bytes_in(dir: &Path) -> io::Result<Option<(u64, tree::Identity)>> {
    use rustix::fs::{FileType, Mode, OFlags};
    let root = match rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(root) => root,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let mut total = 0u64;
    let mut linked = std::collections::HashSet::new();
    tree::walk(root.as_fd(), |entry| {
        let Some(stat) = entry.stat()? else {
            return Ok(tree::Visit::Skip);
        };
        total = total.saturating_add(ENTRY_BYTES);
        let kind = FileType::from_raw_mode(stat.st_mode);
        if kind == FileType::RegularFile
            && (stat.st_nlink <= 1 || linked.insert((stat.st_dev, stat.st_ino)))
        {
            total = total.saturating_add(u64::try_from(stat.st_size).unwrap_or(0));
        }
        Ok(if kind == FileType::Directory {
            tree::Visit::Descend
        } else {
            tree::Visit::Skip
        })
    })
    .map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("could not count what {} holds: {err}", dir.display()),
        )
    })?;
    Ok(Some((total, tree::identity(&root)?)))
}

/// One sandbox's side of its store's files: the shared count, the files its guest holds open,
/// and whether the current call was refused for want of space.
///
/// Every entry of `open`, every listing and every open under way holds one of the host-wide
/// [`GuestOpenFiles`]: what drops out of them gives it back, and so does the drop of this
/// state, everything it held, however its sandbox ended (hibernation, a trap, a plugin swap,
/// a removal, a call cut off in the middle of an open by its wall time).
#[derive(Debug)]
pub(crate) struct FilesState {
    usage: Arc<FilesUsage>,
    /// The host's open files all guests share.
    shared_open: Arc<GuestOpenFiles>,
    /// The host files behind the guest's open descriptors and the streams made from them (a
    /// stream keeps its file open after its descriptor is dropped).
    open: Vec<Weak<std::fs::File>>,
    /// Files removed while the guest held them open (shared with its write streams).
    removed_open: RemovedOpen,
    /// Directory listings the guest holds.
    listings: usize,
    /// Opens and listings under way, each holding the share of the host's open files it took.
    opening: usize,
    refused: Arc<AtomicBool>,
    /// CPU ticks owed for positioned writes, the one file call whose size the guest chooses
    /// (the bytes they moved, see [`crate::sandbox::BYTES_PER_CPU_MS`], or the time they took
    /// when more), and for the time its syncs kept the disk busy and its moves of directories
    /// took to walk.
    owed: Arc<AtomicU64>,
    /// Microseconds of such calls charged so far, whole ticks of which went to `owed`.
    busy_micros: u64,
}

impl FilesState {
    pub(crate) fn new(
        usage: Arc<FilesUsage>,
        shared_open: Arc<GuestOpenFiles>,
        owed: Arc<AtomicU64>,
    ) -> Self {
        Self {
            usage,
            shared_open,
            open: Vec::new(),
            removed_open: RemovedOpen::default(),
            listings: 0,
            opening: 0,
            refused: Arc::default(),
            owed,
            busy_micros: 0,
        }
    }

    /// Charges a positioned write of `bytes` that took `took`: the bytes it moved, or the
    /// time it took when that is more. The kernel holds back a process that dirties pages
    /// faster than the disk takes them (a 5 MiB write took over 100 ms while the disk was
    /// busy, charged 5 ms by its bytes alone), and that disk is the one every store's commits
    /// wait on.
    fn wrote(&mut self, bytes: usize, took: std::time::Duration) {
        let by_bytes = std::time::Duration::from_millis(bytes as u64 / BYTES_PER_CPU_MS);
        // `busy_for` leaves out the tick the epoch counts; the bytes' charge is owed whole.
        self.busy_for(took.max(by_bytes + std::time::Duration::from_millis(1)));
    }

    /// Charges a call that kept the host busy for `took` (a `sync` or `sync-data`, the walk
    /// of a directory moved deeper) as CPU time. Waiting for the disk is not the host's CPU,
    /// but it is the disk every store's commits wait on: a guest syncing in a loop would
    /// otherwise hold it for its whole `wall_ms_per_call` at the price of one epoch tick per
    /// call (the ticks that meter guest code count a host call spanning many as one). That
    /// tick is left out of the charge, so a call costs what it took; the fractions of a
    /// millisecond add up across calls.
    fn busy_for(&mut self, took: std::time::Duration) {
        let charged = took.saturating_sub(std::time::Duration::from_millis(1));
        let micros = u64::try_from(charged.as_micros()).unwrap_or(u64::MAX);
        let before = self.busy_micros;
        self.busy_micros = before.saturating_add(micros);
        let ticks = self.busy_micros / 1_000 - before / 1_000;
        if ticks > 0 {
            self.owed.fetch_add(ticks, Ordering::Relaxed);
        }
    }

    /// Whether a write was refused for want of space since the last call of this (the failure
    /// of a call that gave up then is the quota's).
    pub(crate) fn take_refused(&self) -> Option<String> {
        self.refused.swap(false, Ordering::Relaxed).then(|| {
            format!(
                "the store's files directory (/data) is full: it may hold {} bytes (the files \
                 quota), counting each file, directory and link as its length plus {ENTRY_BYTES} \
                 bytes",
                self.usage.limit()
            )
        })
    }

    fn out_of_space(&self) -> FsError {
        self.refused.store(true, Ordering::Relaxed);
        ErrorCode::InsufficientSpace.into()
    }

    /// Reserves `bytes`, or the error that refuses the call.
    fn reserve(&mut self, bytes: u64) -> FsResult<()> {
        self.release_closed();
        if self.usage.reserve(bytes) {
            Ok(())
        } else {
            Err(self.out_of_space())
        }
    }

    /// Settles a call that reserved [`ENTRY_BYTES`] for a new entry: a call that made none
    /// gives it back.
    fn entry_made(&self, made: FsResult<()>) -> FsResult<()> {
        if made.is_err() {
            self.usage.release(ENTRY_BYTES);
        }
        made
    }

    /// Files the guest holds open now.
    fn open_count(&mut self) -> usize {
        self.release_closed();
        self.open.len()
    }

    /// Takes one of the host's open files for a file or listing the guest is about to open
    /// (after its own cap was checked), or refuses it with `quota` when all guests together
    /// hold what they may. A call that then opens nothing gives it back.
    fn take_shared_open(&mut self) -> FsResult<()> {
        self.open_count();
        if self.shared_open.take_one() {
            self.opening += 1;
            Ok(())
        } else {
            self.shared_open.refused();
            Err(ErrorCode::Quota.into())
        }
    }

    /// An open under way opened nothing: its share goes back.
    fn open_failed(&mut self) {
        self.opening = self.opening.saturating_sub(1);
        self.shared_open.give_back(1);
    }

    /// An open under way opened `file`, which holds its share from now on.
    fn opened(&mut self, file: &Arc<std::fs::File>) {
        self.opening = self.opening.saturating_sub(1);
        self.open.push(Arc::downgrade(file));
    }

    /// A listing under way started, and holds its share from now on.
    fn listing_started(&mut self) {
        self.opening = self.opening.saturating_sub(1);
        self.listings += 1;
    }

    /// Gives back what the files the guest has closed since held: their share of the host's
    /// open files, and the bytes of those it had removed (all of them once the sandbox is
    /// gone: its table, which holds the files, is dropped before this state). Done at every
    /// open, close and listing, and when each call returns: a file whose last holder was a
    /// stream dropped after its descriptor goes back then.
    pub(crate) fn release_closed(&mut self) {
        self.removed_open.release_closed(&self.usage);
        let before = self.open.len();
        self.open.retain(|file| file.strong_count() > 0);
        self.shared_open.give_back(before - self.open.len());
    }
}

/// Files removed while the guest held them open, each with the bytes it keeps on disk: its
/// length at the removal and what was written to it since. They are given back once the
/// file is closed.
#[derive(Debug, Clone, Default)]
struct RemovedOpen(Arc<Mutex<Vec<Held>>>);

/// A removed file the guest holds open, and the bytes it keeps on disk until closed.
#[derive(Debug)]
struct Held {
    file: Weak<std::fs::File>,
    bytes: u64,
}

impl RemovedOpen {
    fn hold(&self, held: Held) {
        lock(&self.0).push(held);
    }

    /// `file` grew by `bytes`, reserved: if it is a removed one, they are given back with it.
    fn grew(&self, file: &Arc<std::fs::File>, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut removed = lock(&self.0);
        if let Some(held) = removed
            .iter_mut()
            .find(|held| std::ptr::eq(held.file.as_ptr(), Arc::as_ptr(file)))
        {
            held.bytes += bytes;
        }
    }

    fn release_closed(&self, usage: &FilesUsage) {
        lock(&self.0).retain(|held| {
            let open = held.file.strong_count() > 0;
            if !open {
                usage.release(held.bytes);
            }
            open
        });
    }
}

impl Drop for FilesState {
    fn drop(&mut self) {
        self.release_closed();
        // The sandbox's table, which held the files and listings, is gone already.
        self.shared_open.give_back(
            self.open
                .len()
                .saturating_add(self.listings)
                .saturating_add(self.opening),
        );
    }
}

/// What removing an entry frees, counted before the removal and given back once it is done.
#[derive(Default)]
struct Removal {
    /// Freed at once.
    freed: u64,
    /// A file the guest holds open.
    held: Option<Held>,
}

impl Removal {
    /// The removal happened: gives back what it freed.
    fn done(self, files: &mut FilesState) {
        files.usage.release(self.freed);
        if let Some(held) = self.held {
            files.removed_open.hold(held);
        }
    }
}

/// Whether the guest holds a file open.
enum HeldOpen {
    No,
    /// Yes: the file it holds.
    Yes(Weak<std::fs::File>),
    /// It could not be told (the file could not be opened to compare): its bytes are not
    /// given back (counting too much, never too little, until the store starts again).
    Unknown,
}

/// The [`HasData`] of the files-directory bindings.
pub(crate) struct Files;

impl HasData for Files {
    type Data<'a> = FilesView<'a>;
}

/// wasmtime-wasi's filesystem view with the sandbox's files state beside it.
pub(crate) struct FilesView<'a> {
    pub(crate) fs: WasiFilesystemCtxView<'a>,
    pub(crate) files: &'a mut FilesState,
}

impl FilesView<'_> {
    /// What is at `path` under directory `dir` (following a final link when `flags` say so,
    /// as the call about to be made will); `None` if nothing.
    async fn stat_at(
        &mut self,
        dir: &Resource<types::Descriptor>,
        flags: types::PathFlags,
        path: &str,
    ) -> Option<types::DescriptorStat> {
        let dir = Resource::new_borrow(dir.rep());
        self.fs.stat_at(dir, flags, path.to_owned()).await.ok()
    }

    /// The identity (device and inode, hashed) of the entry at `path` under `dir`.
    async fn identity_at(
        &mut self,
        dir: &Resource<types::Descriptor>,
        path: &str,
    ) -> Option<(u64, u64)> {
        let dir = Resource::new_borrow(dir.rep());
        let hash = self
            .fs
            .metadata_hash_at(dir, types::PathFlags::empty(), path.to_owned())
            .await
            .ok()?;
        Some((hash.lower, hash.upper))
    }

    /// The host file behind `fd`.
    fn host_file(&mut self, fd: &Resource<types::Descriptor>) -> FsResult<Arc<std::fs::File>> {
        match self.fs.table.get(fd)? {
            Descriptor::File(file) => Ok(file.file.clone()),
            Descriptor::Dir(_) => Err(ErrorCode::BadDescriptor.into()),
        }
    }

    /// Replaces `stream`, wasmtime-wasi's output stream on `file` (made only for the checks
    /// it makes), with one that reserves what each write adds.
    fn metered(
        &mut self,
        stream: Resource<DynOutputStream>,
        file: Arc<std::fs::File>,
        mode: WriteMode,
    ) -> FsResult<Resource<DynOutputStream>> {
        drop(self.fs.table.delete(stream)?);
        let metered: DynOutputStream = Box::new(QuotaStream {
            file,
            mode,
            usage: self.files.usage.clone(),
            removed_open: self.files.removed_open.clone(),
            refused: self.files.refused.clone(),
            closed: false,
        });
        Ok(self.fs.table.push(metered)?)
    }

    /// How many levels below `/data` the directory `dir` lies (0: it is `/data`); `None` when
    /// deeper than [`MAX_DIR_DEPTH`] (or not under `/data`).
    fn depth_of(&mut self, dir: &Resource<types::Descriptor>) -> FsResult<Option<usize>> {
        let Descriptor::Dir(dir) = self.fs.table.get(dir)? else {
            return Err(ErrorCode::NotDirectory.into());
        };
        let Some(root) = self.files.usage.root else {
            return Ok(None);
        };
        Ok(tree::depth_below(dir.dir.as_fd(), root, MAX_DIR_DEPTH)?)
    }

    /// How many levels below `/data` the directory lies that holds (or would hold) the entry
    /// at `path` under `dir`; `None` when deeper than [`MAX_DIR_DEPTH`]. A path through other
    /// directories (`a/b/name`) is resolved as the call about to be made resolves it; one
    /// that leads to no directory fails as that call would.
    async fn depth_of_parent(
        &mut self,
        dir: &Resource<types::Descriptor>,
        path: &str,
    ) -> FsResult<Option<usize>> {
        let Some((parent, _)) = path.trim_end_matches('/').rsplit_once('/') else {
            return self.depth_of(dir);
        };
        let opened = self
            .fs
            .open_at(
                Resource::new_borrow(dir.rep()),
                types::PathFlags::SYMLINK_FOLLOW,
                if parent.is_empty() { "/" } else { parent }.to_owned(),
                types::OpenFlags::DIRECTORY,
                types::DescriptorFlags::READ,
            )
            .await?;
        let depth = self.depth_of(&opened);
        drop(self.fs.table.delete(opened)?);
        depth
    }

    /// Refuses a call that makes a directory at `path` under `dir` unless it lies at most
    /// [`MAX_DIR_DEPTH`] levels below `/data`.
    async fn may_make_dir(
        &mut self,
        dir: &Resource<types::Descriptor>,
        path: &str,
    ) -> FsResult<()> {
        match self.depth_of_parent(dir, path).await? {
            Some(parent) if parent < MAX_DIR_DEPTH => Ok(()),
            _ => Err(ErrorCode::NameTooLong.into()),
        }
    }

    /// Refuses moving the entry at `old_path` under `old_dir` to `new_path` under `new_dir`
    /// when it is a directory and it, or one it holds, would then lie deeper than
    /// [`MAX_DIR_DEPTH`]. A move that takes it no deeper is let through at the cost of two
    /// climbs; one that does walks the directories it holds as deep as the cap allows (their
    /// number is bounded by the `files` quota, and the walk's time is charged as CPU).
    async fn may_move(
        &mut self,
        old_dir: &Resource<types::Descriptor>,
        old_path: &str,
        new_dir: &Resource<types::Descriptor>,
        new_path: &str,
    ) -> FsResult<()> {
        // An entry that cannot be looked at is not moved: the move's own lookup may still
        // succeed where this one fails (a path over PATH_MAX, which the rename resolves
        // through its parent directory), and letting it through skipped the cap.
        let moved = self
            .fs
            .stat_at(
                Resource::new_borrow(old_dir.rep()),
                types::PathFlags::empty(),
                old_path.to_owned(),
            )
            .await?;
        if moved.type_ != DescriptorType::Directory {
            // Files and links add no level (a link to a directory is not walked into).
            return Ok(());
        }
        let Some(to) = self.depth_of_parent(new_dir, new_path).await? else {
            return Err(ErrorCode::NameTooLong.into());
        };
        if to >= MAX_DIR_DEPTH {
            return Err(ErrorCode::NameTooLong.into());
        }
        // `None`: deeper than the cap now (from before there was one): walked below, so it
        // moves only if it then fits.
        if let Some(from) = self.depth_of_parent(old_dir, old_path).await?
            && from >= to
        {
            return Ok(());
        }
        // What the moved directory holds may lie this many levels below it.
        let room = MAX_DIR_DEPTH - (to + 1);
        let opened = self
            .fs
            .open_at(
                Resource::new_borrow(old_dir.rep()),
                types::PathFlags::empty(),
                old_path.to_owned(),
                types::OpenFlags::DIRECTORY,
                types::DescriptorFlags::READ,
            )
            .await?;
        let moved = match self.fs.table.delete(opened)? {
            Descriptor::Dir(dir) => dir.dir,
            Descriptor::File(_) => return Err(ErrorCode::NotDirectory.into()),
        };
        let started = std::time::Instant::now();
        let walked = tokio::task::spawn_blocking(move || {
            tree::walk(moved.as_fd(), |entry| {
                Ok(if entry.kind != rustix::fs::FileType::Directory {
                    tree::Visit::Skip
                } else if entry.depth > room {
                    tree::Visit::Stop
                } else {
                    tree::Visit::Descend
                })
            })
        })
        .await
        .map_err(FsError::trap)?;
        self.files.busy_for(started.elapsed());
        match walked? {
            tree::Walked::Whole => Ok(()),
            tree::Walked::Stopped => Err(ErrorCode::NameTooLong.into()),
        }
    }

    /// What removing the entry at `path` under `dir` would free: its entry, and its bytes when
    /// it is a file's last name. A file the guest holds open keeps its bytes on disk until it
    /// is closed: they are given back then ([`Removal::done`]).
    async fn removal(&mut self, dir: &Resource<types::Descriptor>, path: &str) -> Removal {
        let Some(stat) = self.stat_at(dir, types::PathFlags::empty(), path).await else {
            return Removal::default();
        };
        let entry_only = Removal {
            freed: ENTRY_BYTES,
            held: None,
        };
        if stat.type_ != DescriptorType::RegularFile || stat.link_count > 1 {
            return entry_only;
        }
        match self.held_open(dir, path).await {
            HeldOpen::No => Removal {
                freed: ENTRY_BYTES + stat.size,
                held: None,
            },
            HeldOpen::Yes(file) => Removal {
                freed: ENTRY_BYTES,
                held: Some(Held {
                    file,
                    bytes: stat.size,
                }),
            },
            HeldOpen::Unknown => entry_only,
        }
    }

    /// Whether the file at `path` under `dir` is one the guest holds open.
    async fn held_open(&mut self, dir: &Resource<types::Descriptor>, path: &str) -> HeldOpen {
        let identity = |file: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            file.metadata().ok().map(|meta| (meta.dev(), meta.ino()))
        };
        let open: Vec<(Weak<std::fs::File>, (u64, u64))> = self
            .files
            .open
            .iter()
            .filter_map(|weak| {
                let file = weak.upgrade()?;
                Some((weak.clone(), identity(&file)?))
            })
            .collect();
        if open.is_empty() {
            return HeldOpen::No;
        }
        // Looked up through the sandbox's own directory, as the guest would.
        let Ok(target) = self
            .fs
            .open_at(
                Resource::new_borrow(dir.rep()),
                types::PathFlags::empty(),
                path.to_owned(),
                types::OpenFlags::empty(),
                types::DescriptorFlags::READ,
            )
            .await
        else {
            return HeldOpen::Unknown;
        };
        let target = match self.fs.table.delete(target) {
            Ok(Descriptor::File(file)) => identity(&file.file),
            _ => None,
        };
        let Some(target) = target else {
            return HeldOpen::Unknown;
        };
        match open.into_iter().find(|(_, id)| *id == target) {
            Some((file, _)) => HeldOpen::Yes(file),
            None => HeldOpen::No,
        }
    }
}

impl types::Host for FilesView<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        self.fs.convert_error_code(err)
    }

    fn filesystem_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        self.fs.filesystem_error_code(err)
    }
}

impl HostDescriptor for FilesView<'_> {
    async fn advise(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        self.fs.advise(fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        let started = std::time::Instant::now();
        let synced = self.fs.sync_data(fd).await;
        self.files.busy_for(started.elapsed());
        synced
    }

    async fn get_flags(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorFlags> {
        self.fs.get_flags(fd).await
    }

    async fn get_type(&mut self, fd: Resource<types::Descriptor>) -> FsResult<DescriptorType> {
        self.fs.get_type(fd).await
    }

    async fn set_size(
        &mut self,
        fd: Resource<types::Descriptor>,
        size: types::Filesize,
    ) -> FsResult<()> {
        let file = self.host_file(&fd)?;
        let before = length(&file)?;
        self.files.reserve(size.saturating_sub(before))?;
        match self.fs.set_size(fd, size).await {
            Ok(()) => {
                // A removed file's bytes are given back when it is closed.
                if removed(&file) {
                    self.files
                        .removed_open
                        .grew(&file, size.saturating_sub(before));
                } else {
                    self.files.usage.release(before.saturating_sub(size));
                }
                Ok(())
            }
            Err(err) => {
                self.files.usage.release(size.saturating_sub(before));
                Err(err)
            }
        }
    }

    async fn set_times(
        &mut self,
        fd: Resource<types::Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        self.fs.set_times(fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<types::Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        // At most 64 KiB a call (wasmtime-wasi's cap): the epoch ticks see its time.
        self.fs.read(fd, len, offset).await
    }

    async fn write(
        &mut self,
        fd: Resource<types::Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        let file = self.host_file(&fd)?;
        let before = length(&file)?;
        let end = |len: usize| offset.saturating_add(len as u64);
        let growth = end(buf.len()).saturating_sub(before);
        self.files.reserve(growth)?;
        let (bytes, started) = (buf.len(), std::time::Instant::now());
        let wrote = self.fs.write(fd, buf, offset).await;
        self.files.wrote(bytes, started.elapsed());
        match wrote {
            Ok(written) => {
                // A short write added less than was reserved.
                let added = offset.saturating_add(written).saturating_sub(before);
                self.files.usage.release(growth.saturating_sub(added));
                self.files.removed_open.grew(&file, added.min(growth));
                Ok(written)
            }
            Err(err) => {
                self.files.usage.release(growth);
                Err(err)
            }
        }
    }

    async fn read_directory(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        if self.files.listings >= MAX_LISTINGS {
            return Err(ErrorCode::Quota.into());
        }
        let Descriptor::Dir(dir) = self.fs.table.get(&fd)? else {
            return Err(ErrorCode::NotDirectory.into());
        };
        let dir = dir.dir.clone();
        self.files.take_shared_open()?;
        let listing = match Listing::start(dir).await {
            Ok(listing) => listing,
            Err(err) => {
                self.files.open_failed();
                return Err(err);
            }
        };
        let listing = match self.fs.table.push(listing) {
            Ok(listing) => listing,
            Err(err) => {
                self.files.open_failed();
                return Err(err.into());
            }
        };
        self.files.listing_started();
        // The guest's handle is typed as wasmtime-wasi's listing; every call on it comes here,
        // and the table checks the type of what it finds under it.
        Ok(Resource::new_own(listing.rep()))
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        let started = std::time::Instant::now();
        let synced = self.fs.sync(fd).await;
        self.files.busy_for(started.elapsed());
        synced
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        self.may_make_dir(&fd, &path).await?;
        self.files.reserve(ENTRY_BYTES)?;
        let made = self.fs.create_directory_at(fd, path).await;
        self.files.entry_made(made)
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        self.fs.stat(fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        self.fs.stat_at(fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        self.fs.set_times_at(fd, path_flags, path, atim, mtim).await
    }

    async fn link_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        self.files.reserve(ENTRY_BYTES)?;
        let linked = self
            .fs
            .link_at(fd, old_path_flags, old_path, new_descriptor, new_path)
            .await;
        self.files.entry_made(linked)
    }

    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        if self.files.open_count() >= MAX_OPEN_FILES {
            // WASI has no "too many open files"; `quota` says a limit was reached.
            return Err(ErrorCode::Quota.into());
        }
        let creates = oflags.contains(types::OpenFlags::CREATE);
        let truncates = oflags.contains(types::OpenFlags::TRUNCATE);
        let existing = if creates || truncates {
            // With the guest's flags: a create through a link makes the link's target.
            self.stat_at(&fd, path_flags, &path).await
        } else {
            None
        };
        let entry = if creates && existing.is_none() {
            ENTRY_BYTES
        } else {
            0
        };
        self.files.reserve(entry)?;
        if let Err(err) = self.files.take_shared_open() {
            self.files.usage.release(entry);
            return Err(err);
        }
        let opened = match self.fs.open_at(fd, path_flags, path, oflags, flags).await {
            Ok(opened) => opened,
            Err(err) => {
                self.files.usage.release(entry);
                self.files.open_failed();
                return Err(err);
            }
        };
        if truncates
            && let Some(old) = existing
            && old.type_ == DescriptorType::RegularFile
        {
            self.files.usage.release(old.size);
        }
        let host_file = match self.fs.table.get(&opened) {
            Ok(Descriptor::File(file)) => file.file.clone(),
            Ok(Descriptor::Dir(dir)) => dir.dir.clone(),
            Err(err) => {
                // Not what wasmtime-wasi makes (it always pushes a descriptor); should it ever
                // be, nothing holds it open uncounted.
                drop(self.fs.table.delete(opened));
                self.files.open_failed();
                return Err(err.into());
            }
        };
        self.files.opened(&host_file);
        Ok(opened)
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        HostDescriptor::drop(&mut self.fs, fd)?;
        // Its share of the host's open files goes back at once (unless a stream still holds
        // the file: then once the stream is dropped too, by the end of that call).
        self.files.open_count();
        Ok(())
    }

    async fn readlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<String> {
        self.fs.readlink_at(fd, path).await
    }

    async fn remove_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        self.fs.remove_directory_at(fd, path).await?;
        self.files.usage.release(ENTRY_BYTES);
        Ok(())
    }

    async fn rename_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path: String,
        new_fd: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        self.may_move(&fd, &old_path, &new_fd, &new_path).await?;
        // Renaming an entry onto itself (or a hard link of it) replaces nothing.
        let replaced = self.identity_at(&new_fd, &new_path).await;
        let moved = self.identity_at(&fd, &old_path).await;
        let removal = match (replaced, moved) {
            (Some(replaced), Some(moved)) if replaced != moved => {
                self.removal(&new_fd, &new_path).await
            }
            _ => Removal::default(),
        };
        self.fs.rename_at(fd, old_path, new_fd, new_path).await?;
        removal.done(self.files);
        Ok(())
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        self.files.reserve(ENTRY_BYTES)?;
        let linked = self.fs.symlink_at(fd, src_path, dest_path).await;
        self.files.entry_made(linked)
    }

    async fn unlink_file_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        let removal = self.removal(&fd, &path).await;
        self.fs.unlink_file_at(fd, path).await?;
        removal.done(self.files);
        Ok(())
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        self.fs.read_via_stream(fd, offset)
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        let file = self.host_file(&fd)?;
        let stream = self.fs.write_via_stream(fd, offset)?;
        self.metered(stream, file, WriteMode::At { next: offset })
    }

    fn append_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let file = self.host_file(&fd)?;
        let stream = self.fs.append_via_stream(fd)?;
        self.metered(stream, file, WriteMode::Append)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<types::Descriptor>,
        b: Resource<types::Descriptor>,
    ) -> wasmtime::Result<bool> {
        self.fs.is_same_object(a, b).await
    }

    async fn metadata_hash(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::MetadataHashValue> {
        self.fs.metadata_hash(fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        self.fs.metadata_hash_at(fd, path_flags, path).await
    }
}

impl HostDirectoryEntryStream for FilesView<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        let listing = self
            .fs
            .table
            .get_mut(&Resource::<Listing>::new_borrow(stream.rep()))?;
        // Reading the next batch from the disk is done on a blocking thread the epoch does
        // not see: the call is charged the time the reading took there (not the wait for the
        // thread, which other stores' work may fill).
        let next = listing.next().await;
        self.files.busy_for(listing.take_read_time());
        next
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        drop(
            self.fs
                .table
                .delete(Resource::<Listing>::new_own(stream.rep()))?,
        );
        self.files.listings = self.files.listings.saturating_sub(1);
        self.files.shared_open.give_back(1);
        Ok(())
    }
}

/// Where a file's output stream writes.
#[derive(Debug, Clone, Copy)]
enum WriteMode {
    /// From a position on: the next write lands at `next`.
    At { next: u64 },
    /// At the end of the file: every byte is new.
    Append,
}

/// The most a write to a file's output stream may carry: what `check-write` permits (as
/// wasmtime-wasi's own file streams do).
const WRITE_PERMIT: usize = 64 << 10;

/// A file's output stream with the files quota in front of it. It writes at once, on the
/// calling thread (at most [`WRITE_PERMIT`] bytes, so its time shows in the epoch ticks): no
/// write is ever under way in the background when the next one, a truncation or a removal is
/// counted, so the file's length is current then.
struct QuotaStream {
    file: Arc<std::fs::File>,
    mode: WriteMode,
    usage: Arc<FilesUsage>,
    removed_open: RemovedOpen,
    refused: Arc<AtomicBool>,
    /// A write failed: the stream is closed.
    closed: bool,
}

impl QuotaStream {
    /// Writes `bytes` where the stream writes next, reserving what that adds to the file.
    fn write_now(&mut self, bytes: &[u8]) -> StreamResult<()> {
        use std::os::unix::fs::FileExt;
        if self.closed {
            return Err(StreamError::Closed);
        }
        if bytes.len() > WRITE_PERMIT {
            return Err(StreamError::trap(
                "a write larger than check-write permitted",
            ));
        }
        let fail = |this: &mut Self, err: io::Error| {
            this.closed = true;
            StreamError::LastOperationFailed(err.into())
        };
        let on_disk = match self.file.metadata() {
            Ok(meta) => meta.len(),
            Err(err) => return Err(fail(self, err)),
        };
        let len = bytes.len() as u64;
        let at = match self.mode {
            WriteMode::At { next } => next,
            WriteMode::Append => on_disk,
        };
        let growth = at.saturating_add(len).saturating_sub(on_disk);
        if !self.usage.reserve(growth) {
            self.refused.store(true, Ordering::Relaxed);
            return Err(fail(self, io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        match self.file.write_all_at(bytes, at) {
            Ok(()) => {
                if let WriteMode::At { next } = &mut self.mode {
                    *next = at.saturating_add(len);
                }
                self.removed_open.grew(&self.file, growth);
                Ok(())
            }
            Err(err) => {
                self.usage.release(growth);
                Err(fail(self, err))
            }
        }
    }
}

#[async_trait::async_trait]
impl OutputStream for QuotaStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_now(&bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        if self.closed {
            Err(StreamError::Closed)
        } else {
            Ok(())
        }
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        if self.closed {
            Err(StreamError::Closed)
        } else {
            Ok(WRITE_PERMIT)
        }
    }
}

#[async_trait::async_trait]
impl Pollable for QuotaStream {
    /// Always ready: every write is done before its call returns.
    async fn ready(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A positioned write is charged the bytes it moved, or the time it took when that is
    /// more (the kernel held it back while the disk was busy).
    #[test]
    fn writes_are_charged_their_bytes_or_their_time_whichever_is_more() {
        let owed = Arc::new(AtomicU64::new(0));
        let mut files = FilesState::new(
            Arc::new(FilesUsage::unlimited()),
            Arc::new(GuestOpenFiles::new(usize::MAX)),
            owed.clone(),
        );
        files.wrote(5 << 20, Duration::from_micros(900));
        assert_eq!(owed.load(Ordering::Relaxed), 5, "5 MiB written at once");
        files.wrote(5 << 20, Duration::from_micros(5_500));
        assert_eq!(
            owed.load(Ordering::Relaxed),
            10,
            "5 MiB in 5.5 ms: its bytes"
        );
        files.wrote(5 << 20, Duration::from_millis(120));
        assert_eq!(
            owed.load(Ordering::Relaxed),
            10 + 119,
            "5 MiB held back 120 ms"
        );
        files.wrote(10, Duration::from_micros(10));
        assert_eq!(owed.load(Ordering::Relaxed), 129, "a small quick write");
    }

    /// A sync is charged what it took beyond the one epoch tick that sees it, and the
    /// fractions of a millisecond add up across syncs rather than being lost on each.
    #[test]
    fn syncs_are_charged_their_time_beyond_one_tick_and_fractions_add_up() {
        let owed = Arc::new(AtomicU64::new(0));
        let mut files = FilesState::new(
            Arc::new(FilesUsage::unlimited()),
            Arc::new(GuestOpenFiles::new(usize::MAX)),
            owed.clone(),
        );
        files.busy_for(Duration::from_millis(40));
        assert_eq!(owed.load(Ordering::Relaxed), 39, "a 40 ms sync");
        files.busy_for(Duration::from_micros(800));
        assert_eq!(
            owed.load(Ordering::Relaxed),
            39,
            "under a tick: the epoch sees it"
        );
        for _ in 0..4 {
            files.busy_for(Duration::from_micros(1_250));
        }
        assert_eq!(
            owed.load(Ordering::Relaxed),
            40,
            "four syncs of 1.25 ms: 0.25 ms each beyond their tick, 1 ms in all"
        );
    }

    /// A sandbox's files state on `shared`, as a sandbox makes it.
    fn sandbox_files(shared: &Arc<GuestOpenFiles>) -> FilesState {
        FilesState::new(
            Arc::new(FilesUsage::unlimited()),
            shared.clone(),
            Arc::default(),
        )
    }

    /// What `open_at` does once wasmtime-wasi opened `file` for the guest: the share is
    /// taken first (or the open refused), then held by the file's entry.
    fn guest_opens(files: &mut FilesState, file: &Arc<std::fs::File>) -> FsResult<()> {
        files.take_shared_open()?;
        files.opened(file);
        Ok(())
    }

    fn refused_with_quota(result: FsResult<()>) -> bool {
        result.is_err_and(|err| err.downcast_ref() == Some(&ErrorCode::Quota))
    }

    /// All guests together hold at most the host-wide count: a guest under its own cap is
    /// refused with `quota` once the others hold the rest (and the refusal is counted), and
    /// a file one of them closed goes back by the end of the call, when the other can open
    /// again.
    #[test]
    fn guests_together_hold_at_most_the_shared_count_and_closed_files_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = || Arc::new(std::fs::File::open(dir.path()).unwrap());
        let shared = Arc::new(GuestOpenFiles::new(3));
        let (mut first, mut second) = (sandbox_files(&shared), sandbox_files(&shared));
        let held: Vec<_> = (0..2).map(|_| file()).collect();
        for held in &held {
            guest_opens(&mut first, held).unwrap();
        }
        let other = file();
        guest_opens(&mut second, &other).unwrap();
        assert_eq!(shared.held(), 3);
        assert!(
            refused_with_quota(guest_opens(&mut second, &file())),
            "the fourth open of all guests"
        );
        assert_eq!(shared.held(), 3, "a refused open takes nothing");
        assert_eq!(shared.refusals(), 1);

        drop(held);
        // What each call's end does (a file a stream held last closes with no later open).
        first.release_closed();
        assert_eq!(
            shared.held(),
            1,
            "the first guest closed both: they went back"
        );
        assert_eq!(first.open_count(), 0);
        guest_opens(&mut second, &file()).unwrap();
        assert_eq!(shared.held(), 2);
    }

    /// Listings count with files, and a sandbox's state gives back everything it held when
    /// it is dropped (hibernation, a trap, a plugin swap, a removal), its files still open
    /// or not, and an open cut off half-way.
    #[test]
    fn a_dropped_sandbox_gives_back_every_file_and_listing_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let file = || Arc::new(std::fs::File::open(dir.path()).unwrap());
        let shared = Arc::new(GuestOpenFiles::new(100));
        let mut files = sandbox_files(&shared);
        // An open cut off by the call's wall time, neither done nor failed.
        files.take_shared_open().unwrap();
        for _ in 0..2 {
            files.take_shared_open().unwrap();
            files.listing_started();
        }
        let kept: Vec<_> = (0..5).map(|_| file()).collect();
        for file in &kept {
            guest_opens(&mut files, file).unwrap();
        }
        // Closed at once, and not settled: no open or close came after it.
        guest_opens(&mut files, &file()).unwrap();
        let mut neighbour = sandbox_files(&shared);
        let neighbours = file();
        guest_opens(&mut neighbour, &neighbours).unwrap();
        assert_eq!(
            shared.held(),
            1 + 2 + 5 + 1 + 1,
            "an open under way, two listings, six files (one closed since) and the neighbour's"
        );
        drop(files);
        assert_eq!(
            shared.held(),
            1,
            "all of it, also what it had not settled; the neighbour's stays"
        );
        drop(neighbour);
        assert_eq!(shared.held(), 0);
    }

    /// A tree whose paths are longer than `PATH_MAX` (300 levels of a 15-byte name, 4,800
    /// bytes) is counted whole: a store whose guest made one, a directory at a time through
    /// the handle of the one above, failed to start ("file name too long") while its files
    /// were measured by path. (Not 2,100 levels of `a/`: removing a directory costs this
    /// kernel time in proportion to its depth, and the test took 7 s.)
    #[test]
    fn a_tree_deeper_than_path_max_is_measured_whole() {
        use rustix::fs::{Mode, OFlags, mkdirat, openat};
        const LEVELS: usize = 300;
        const NAME: &str = "deep-directory-";
        let scratch = tempfile::tempdir().unwrap();
        std::fs::write(scratch.path().join("top"), [1u8; 10]).unwrap();
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut here = rustix::fs::open(scratch.path(), dir_flags, Mode::empty()).unwrap();
        for _ in 0..LEVELS {
            mkdirat(&here, NAME, Mode::from_raw_mode(0o755)).unwrap();
            here = openat(&here, NAME, dir_flags, Mode::empty()).unwrap();
        }
        let bottom = openat(
            &here,
            "bottom",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&bottom, &[2u8; 1_000]).unwrap();
        drop(bottom);
        let by_path = scratch
            .path()
            .join(format!("{NAME}/").repeat(LEVELS))
            .join("bottom");
        assert_eq!(
            std::fs::symlink_metadata(&by_path)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENAMETOOLONG),
            "the bottom is out of a path's reach"
        );

        let usage = FilesUsage::measure(scratch.path(), u64::MAX).unwrap();
        assert_eq!(
            usage.used(),
            (LEVELS as u64 + 2) * ENTRY_BYTES + 10 + 1_000,
            "every directory and both files"
        );
    }
}
