//! A directory listing read from the disk a few entries at a time, as the guest asks for them.
//!
//! wasmtime-wasi reads a whole directory (every name, and each entry's metadata) into the
//! host's memory when a listing starts, and only it can make the listing its bindings hold:
//! 16 listings of 15,000 entries held 55 MiB of the host's memory, outside every quota, and
//! each took its whole time in one call. A [`Listing`] holds its own handle on the directory
//! and at most [`READ_AHEAD`] entries read from it; it stands in the sandbox's resource table
//! where wasmtime-wasi's would, under the `directory-entry-stream` handle the guest holds.
//!
//! What the guest sees is what `readdir` gives: every entry present throughout the listing
//! once, and an entry made or removed while it goes on seen or not.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, openat, statat};
use wasmtime_wasi::p2::bindings::filesystem::types::{DescriptorType, DirectoryEntry, ErrorCode};
use wasmtime_wasi::p2::{FsError, FsResult};

/// The most entries a listing reads ahead of the guest (names are at most 255 bytes).
pub(crate) const READ_AHEAD: usize = 64;

/// A directory listing the guest holds.
pub(crate) struct Listing {
    /// The directory, read from where the last batch ended; `None` once read to its end, or
    /// while a batch is read.
    dir: Option<Dir>,
    /// Entries read and not yet taken, each an entry or why it could not be read.
    ahead: VecDeque<Result<DirectoryEntry, ErrorCode>>,
    /// How long reading from the disk took since [`Listing::take_read_time`] was last asked,
    /// timed on the blocking thread: not the wait for one, which other stores' work may fill.
    read_time: Duration,
}

impl Listing {
    /// Starts listing the directory `dir` is open on, from its first entry, through a handle
    /// of its own (so that neither moves the other's position). Opened for reading whatever
    /// `dir` was opened as: `/data` itself is an `O_PATH` handle, which rustix's
    /// `Dir::read_from` copied, and which cannot be read (`bad-descriptor`).
    pub(crate) async fn start(dir: Arc<std::fs::File>) -> FsResult<Self> {
        let dir = tokio::task::spawn_blocking(move || {
            let own = openat(
                dir.as_fd(),
                c".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Dir::new(own)
        })
        .await
        .map_err(FsError::trap)?
        .map_err(io::Error::from)?;
        Ok(Self {
            dir: Some(dir),
            ahead: VecDeque::new(),
            read_time: Duration::ZERO,
        })
    }

    /// The next entry (`None` at the end), reading the next batch when none is left.
    pub(crate) async fn next(&mut self) -> FsResult<Option<DirectoryEntry>> {
        if self.ahead.is_empty()
            && let Some(dir) = self.dir.take()
        {
            let (dir, read, took) = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let (dir, read) = read_ahead(dir);
                (dir, read, started.elapsed())
            })
            .await
            .map_err(FsError::trap)?;
            self.dir = dir;
            self.ahead = read;
            self.read_time += took;
        }
        match self.ahead.pop_front() {
            None => Ok(None),
            Some(Ok(entry)) => Ok(Some(entry)),
            Some(Err(code)) => Err(code.into()),
        }
    }

    /// How long reading from the disk took since this was last asked (what the guest is
    /// charged for its listing).
    pub(crate) fn take_read_time(&mut self) -> Duration {
        std::mem::take(&mut self.read_time)
    }

    /// Entries read ahead of the guest.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.ahead.len()
    }
}

/// Reads up to [`READ_AHEAD`] entries of `dir` (not `.` and `..`); answers `dir` back unless
/// it has come to its end, or failed (a failure is the last entry read).
fn read_ahead(mut dir: Dir) -> (Option<Dir>, VecDeque<Result<DirectoryEntry, ErrorCode>>) {
    let mut read = VecDeque::with_capacity(READ_AHEAD);
    while read.len() < READ_AHEAD {
        let entry = match dir.read() {
            None => return (None, read),
            Some(Err(err)) => {
                read.push_back(Err(io::Error::from(err).into()));
                return (None, read);
            }
            Some(Ok(entry)) => entry,
        };
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let kind = match entry.file_type() {
            // A filesystem that does not say in its listings.
            FileType::Unknown => {
                let stat = dir
                    .fd()
                    .and_then(|fd| statat(fd, name, AtFlags::SYMLINK_NOFOLLOW));
                match stat {
                    Ok(stat) => FileType::from_raw_mode(stat.st_mode),
                    // Removed since it was listed.
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(err) => {
                        read.push_back(Err(io::Error::from(err).into()));
                        continue;
                    }
                }
            }
            kind => kind,
        };
        read.push_back(match name.to_str() {
            Ok(name) => Ok(DirectoryEntry {
                type_: descriptor_type(kind),
                name: name.to_owned(),
            }),
            Err(_) => Err(ErrorCode::IllegalByteSequence),
        });
    }
    (Some(dir), read)
}

fn descriptor_type(kind: FileType) -> DescriptorType {
    match kind {
        FileType::RegularFile => DescriptorType::RegularFile,
        FileType::Directory => DescriptorType::Directory,
        FileType::Symlink => DescriptorType::SymbolicLink,
        FileType::Fifo => DescriptorType::Fifo,
        FileType::Socket => DescriptorType::Socket,
        FileType::CharacterDevice => DescriptorType::CharacterDevice,
        FileType::BlockDevice => DescriptorType::BlockDevice,
        FileType::Unknown => DescriptorType::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    async fn listing_of(dir: &Path) -> Listing {
        Listing::start(Arc::new(std::fs::File::open(dir).unwrap()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_listing_holds_a_batch_of_entries_and_gives_every_one_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut made = BTreeSet::new();
        for i in 0..1_000 {
            let name = format!("{i:04}-{}", "n".repeat(200));
            std::fs::write(dir.path().join(&name), b"").unwrap();
            made.insert(name);
        }
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("sub", dir.path().join("link")).unwrap();

        let mut listing = listing_of(dir.path()).await;
        let mut files = BTreeSet::new();
        let mut others = Vec::new();
        let mut most_held = 0;
        while let Some(entry) = listing.next().await.unwrap() {
            most_held = most_held.max(listing.held() + 1);
            if entry.type_ == DescriptorType::RegularFile {
                assert!(files.insert(entry.name.clone()), "{} twice", entry.name);
            } else {
                others.push((entry.name, entry.type_));
            }
        }
        assert_eq!(files, made);
        others.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            others,
            [
                ("link".to_owned(), DescriptorType::SymbolicLink),
                ("sub".to_owned(), DescriptorType::Directory)
            ]
        );
        // wasmtime-wasi's listing held all 1,002 entries from the start.
        assert!(most_held <= READ_AHEAD, "held {most_held} entries at once");
        assert!(
            listing.next().await.unwrap().is_none(),
            "ended, and stays so"
        );
    }

    /// `/data` is an `O_PATH` handle (wasmtime-wasi opens its preopens so): its listing is
    /// read through a handle opened for reading.
    #[tokio::test]
    async fn a_directory_held_by_an_o_path_handle_is_listed() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("only"), b"").unwrap();
        let path_only = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir.path())
            .unwrap();
        let mut listing = Listing::start(Arc::new(path_only)).await.unwrap();
        let entry = listing.next().await.unwrap().expect("an entry");
        assert_eq!(entry.name, "only");
        assert!(listing.next().await.unwrap().is_none());
    }

    /// A listing is charged its reading on the blocking thread, not its wait for one (other
    /// stores' work may keep every blocking thread busy): here the only one is held 200 ms.
    #[test]
    fn a_listing_is_charged_its_reading_not_its_wait_for_a_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            for name in ["a", "b", "c"] {
                std::fs::write(dir.path().join(name), b"").unwrap();
            }
            let mut listing = listing_of(dir.path()).await;
            let (release, held) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || held.recv());
            let reading_started = std::time::Instant::now();
            let reading = tokio::spawn(async move {
                let first = listing.next().await;
                (listing, first)
            });
            let waited = std::time::Duration::from_millis(200);
            tokio::time::sleep(waited).await;
            release.send(()).unwrap();
            let (mut listing, first) = reading.await.unwrap();
            assert!(first.unwrap().is_some());
            assert!(
                reading_started.elapsed() >= waited,
                "the read waited for the thread"
            );
            busy.await.unwrap().unwrap();
            let charged = listing.take_read_time();
            assert!(
                !charged.is_zero() && charged < waited,
                "charged {charged:?} after waiting {waited:?} for the thread"
            );
            assert!(listing.take_read_time().is_zero(), "charged once");
        });
    }

    #[tokio::test]
    async fn a_name_that_is_not_utf8_is_an_error_and_the_listing_goes_on() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(std::ffi::OsStr::from_bytes(b"bad-\xff")),
            b"",
        )
        .unwrap();
        std::fs::write(dir.path().join("good"), b"").unwrap();
        let mut listing = listing_of(dir.path()).await;
        let (mut names, mut errors) = (Vec::new(), Vec::new());
        loop {
            match listing.next().await {
                Ok(Some(entry)) => names.push(entry.name),
                Ok(None) => break,
                Err(err) => errors.push(err.downcast().unwrap()),
            }
        }
        assert_eq!(names, ["good"]);
        assert!(matches!(errors[..], [ErrorCode::IllegalByteSequence]));
    }
}
