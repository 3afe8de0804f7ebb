//! A store's files directory as its guest sees it (`/data`): wasmtime-wasi's filesystem with
//! the store's `files` quota and an open-file cap in front of it.
//!
//! Every call of `wasi:filesystem/types` goes to wasmtime-wasi's own implementation; the ones
//! that make the directory hold more (writes, a larger length, new files, directories and
//! links) first reserve what they add from the store's [`FilesUsage`], and are refused with
//! `insufficient-space` (the guest's "No space left on device") when it has no room. The ones
//! that free space (removals, truncation, a rename over a file) give it back. Streams opened
//! for writing are wrapped so that each write reserves what it adds.
//!
//! The count errs towards too much (a file still open when it is removed, or one written by
//! two streams at once, is counted until the store starts again and its directory is measured
//! afresh), never towards too little: what the directory holds stays within the quota.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, DescriptorType, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, FsError, FsResult};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::sandbox::charge_moving;

/// What each file, directory and link counts besides its bytes: one filesystem block.
pub const ENTRY_BYTES: u64 = 4096;

/// The most files and directories one sandbox's guest holds open at once. Each is one of the
/// host's own open files, which every store's databases need too.
pub const MAX_OPEN_FILES: usize = 64;

/// What a store's files directory holds and may hold, in bytes (each file, directory and link
/// counted as its length plus [`ENTRY_BYTES`]). One per store, shared by its sandboxes.
#[derive(Debug)]
pub struct FilesUsage {
    used: AtomicU64,
    limit: AtomicU64,
}

impl FilesUsage {
    /// Counts what `dir` holds now, under a quota of `limit` bytes.
    pub fn measure(dir: &Path, limit: u64) -> io::Result<Self> {
        Ok(Self {
            used: AtomicU64::new(bytes_in(dir)?),
            limit: AtomicU64::new(limit),
        })
    }

    /// A count with no quota, for a sandbox without a files directory.
    pub(crate) fn unlimited() -> Self {
        Self {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
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

/// Bytes under `dir` as the quota counts them; symbolic links are counted, not followed.
fn bytes_in(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let entries = match std::fs::read_dir(&next) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            total = total.saturating_add(ENTRY_BYTES);
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(total)
}

/// One sandbox's side of its store's files: the shared count, the files its guest holds open,
/// and whether the current call was refused for want of space.
#[derive(Debug)]
pub(crate) struct FilesState {
    usage: Arc<FilesUsage>,
    /// The host files behind the guest's open descriptors and the streams made from them (a
    /// stream keeps its file open after its descriptor is dropped).
    open: Vec<Weak<std::fs::File>>,
    refused: Arc<AtomicBool>,
    /// CPU ticks owed for the bytes positioned writes moved, the one file call whose size
    /// the guest chooses (see [`crate::sandbox::BYTES_PER_CPU_MS`]).
    owed: Arc<AtomicU64>,
}

impl FilesState {
    pub(crate) fn new(usage: Arc<FilesUsage>, owed: Arc<AtomicU64>) -> Self {
        Self {
            usage,
            open: Vec::new(),
            refused: Arc::default(),
            owed,
        }
    }

    fn moved(&self, bytes: usize) {
        charge_moving(&self.owed, bytes);
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
    fn reserve(&self, bytes: u64) -> FsResult<()> {
        if self.usage.reserve(bytes) {
            Ok(())
        } else {
            Err(self.out_of_space())
        }
    }

    /// Files the guest holds open now.
    fn open_count(&mut self) -> usize {
        self.open.retain(|file| file.strong_count() > 0);
        self.open.len()
    }
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
    /// What is at `path` under directory `dir`, without following a link; `None` if nothing.
    async fn stat_at(
        &mut self,
        dir: &Resource<types::Descriptor>,
        path: &str,
    ) -> Option<types::DescriptorStat> {
        let dir = Resource::new_borrow(dir.rep());
        self.fs
            .stat_at(dir, types::PathFlags::empty(), path.to_owned())
            .await
            .ok()
    }

    /// The length of the open file `fd`.
    fn len_of(&mut self, fd: &Resource<types::Descriptor>) -> FsResult<u64> {
        match self.fs.table.get(fd)? {
            Descriptor::File(file) => Ok(file.file.metadata().map_err(ErrorCode::from)?.len()),
            Descriptor::Dir(_) => Err(ErrorCode::BadDescriptor.into()),
        }
    }

    /// The host file behind `fd`.
    fn host_file(&mut self, fd: &Resource<types::Descriptor>) -> FsResult<Arc<std::fs::File>> {
        match self.fs.table.get(fd)? {
            Descriptor::File(file) => Ok(file.file.clone()),
            Descriptor::Dir(_) => Err(ErrorCode::BadDescriptor.into()),
        }
    }

    /// Puts `stream` (writing `file`) behind a wrapper that reserves what each write adds.
    fn metered(
        &mut self,
        stream: Resource<DynOutputStream>,
        file: Arc<std::fs::File>,
        mode: WriteMode,
    ) -> FsResult<Resource<DynOutputStream>> {
        let inner = self.fs.table.delete(stream)?;
        let metered: DynOutputStream = Box::new(MeteredStream {
            inner,
            file,
            mode,
            usage: self.files.usage.clone(),
            refused: self.files.refused.clone(),
        });
        Ok(self.fs.table.push(metered)?)
    }

    /// What removing the entry described by `stat` frees.
    fn freed_by_removing(stat: &types::DescriptorStat) -> u64 {
        let data = if stat.type_ == DescriptorType::RegularFile && stat.link_count <= 1 {
            stat.size
        } else {
            0
        };
        ENTRY_BYTES + data
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
        self.fs.sync_data(fd).await
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
        let before = self.len_of(&fd)?;
        self.files.reserve(size.saturating_sub(before))?;
        match self.fs.set_size(fd, size).await {
            Ok(()) => {
                self.files.usage.release(before.saturating_sub(size));
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
        let before = self.len_of(&fd)?;
        let end = |len: usize| offset.saturating_add(len as u64);
        let growth = end(buf.len()).saturating_sub(before);
        self.files.reserve(growth)?;
        self.files.moved(buf.len());
        match self.fs.write(fd, buf, offset).await {
            Ok(written) => {
                // A short write added less than was reserved.
                let added = offset.saturating_add(written).saturating_sub(before);
                self.files.usage.release(growth.saturating_sub(added));
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
        self.fs.read_directory(fd).await
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        self.fs.sync(fd).await
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        self.files.reserve(ENTRY_BYTES)?;
        let made = self.fs.create_directory_at(fd, path).await;
        if made.is_err() {
            self.files.usage.release(ENTRY_BYTES);
        }
        made
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
        if linked.is_err() {
            self.files.usage.release(ENTRY_BYTES);
        }
        linked
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
            self.stat_at(&fd, &path).await
        } else {
            None
        };
        let entry = if creates && existing.is_none() {
            ENTRY_BYTES
        } else {
            0
        };
        self.files.reserve(entry)?;
        let opened = match self.fs.open_at(fd, path_flags, path, oflags, flags).await {
            Ok(opened) => opened,
            Err(err) => {
                self.files.usage.release(entry);
                return Err(err);
            }
        };
        if truncates
            && let Some(old) = existing
            && old.type_ == DescriptorType::RegularFile
        {
            self.files.usage.release(old.size);
        }
        let host_file = match self.fs.table.get(&opened)? {
            Descriptor::File(file) => &file.file,
            Descriptor::Dir(dir) => &dir.dir,
        };
        self.files.open.push(Arc::downgrade(host_file));
        Ok(opened)
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        HostDescriptor::drop(&mut self.fs, fd)
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
        let replaced = self.stat_at(&new_fd, &new_path).await;
        let moved = self.stat_at(&fd, &old_path).await;
        self.fs.rename_at(fd, old_path, new_fd, new_path).await?;
        // Renaming an entry onto itself (or a hard link of it) replaces nothing.
        if let (Some(replaced), Some(moved)) = (replaced, moved)
            && (replaced.type_, replaced.size, replaced.link_count)
                != (moved.type_, moved.size, moved.link_count)
        {
            self.files
                .usage
                .release(FilesView::freed_by_removing(&replaced));
        }
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
        if linked.is_err() {
            self.files.usage.release(ENTRY_BYTES);
        }
        linked
    }

    async fn unlink_file_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        let removed = self.stat_at(&fd, &path).await;
        self.fs.unlink_file_at(fd, path).await?;
        if let Some(removed) = removed {
            self.files
                .usage
                .release(FilesView::freed_by_removing(&removed));
        }
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
        let mode = WriteMode::At {
            next: offset,
            reserved_to: 0,
        };
        self.metered(stream, file, mode)
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
        self.fs.read_directory_entry(stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        HostDirectoryEntryStream::drop(&mut self.fs, stream)
    }
}

/// Where a metered stream writes.
#[derive(Debug, Clone, Copy)]
enum WriteMode {
    /// From a position on: `next` is where the next write lands, `reserved_to` the end of
    /// what this stream has reserved (its earlier writes may still be on their way to the
    /// file, whose length then does not show them yet).
    At { next: u64, reserved_to: u64 },
    /// At the end of the file: every byte is new.
    Append,
}

/// A file's output stream that reserves what each write adds before passing it on (a stream
/// write is at most 64 KiB, wasmtime-wasi's permit, so the epoch ticks see its time).
struct MeteredStream {
    inner: DynOutputStream,
    file: Arc<std::fs::File>,
    mode: WriteMode,
    usage: Arc<FilesUsage>,
    refused: Arc<AtomicBool>,
}

impl MeteredStream {
    /// Reserves what writing `len` more bytes adds to the file.
    fn reserve(&mut self, len: usize) -> StreamResult<()> {
        let len = len as u64;
        let growth = match &mut self.mode {
            WriteMode::Append => len,
            WriteMode::At { next, reserved_to } => {
                let on_disk = self
                    .file
                    .metadata()
                    .map_err(|err| StreamError::LastOperationFailed(err.into()))?
                    .len();
                let end = next.saturating_add(len);
                let growth = end.saturating_sub(on_disk.max(*reserved_to));
                if self.usage.reserve(growth) {
                    *next = end;
                    *reserved_to = (*reserved_to).max(end);
                    return Ok(());
                }
                return Err(self.out_of_space());
            }
        };
        if self.usage.reserve(growth) {
            Ok(())
        } else {
            Err(self.out_of_space())
        }
    }

    fn out_of_space(&self) -> StreamError {
        self.refused.store(true, Ordering::Relaxed);
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        StreamError::LastOperationFailed(full.into())
    }
}

#[async_trait::async_trait]
impl OutputStream for MeteredStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.reserve(bytes.len())?;
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.reserve(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.reserve(nelem)?;
        self.inner.write_zeroes(nelem)
    }

    async fn write_ready(&mut self) -> StreamResult<usize> {
        self.inner.write_ready().await
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

#[async_trait::async_trait]
impl Pollable for MeteredStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}
