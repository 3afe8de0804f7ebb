//! The backup's own trees (a snapshot being packed, an archive being unpacked) reached one
//! name at a time, each directory and file opened through the handle of the directory holding
//! it and never by a joined path.
//!
//! A store's guest makes each directory relative to the one it holds open, so its files may
//! lie deeper than a path of `PATH_MAX` (4,096 bytes) reaches: 64 levels of 255-byte names are
//! 16 KiB. Every call given a longer path fails with "file name too long", cap-std's too (it
//! may hand a whole relative path to the kernel at once), and a backup of such a store failed
//! with a 500. Nothing here follows a link: these trees hold only directories and regular
//! files the host made.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags, mkdirat, openat};

/// Opens the directory `name` in `parent` (a directory's handle, or `rustix::fs::CWD` with a
/// path that fits `PATH_MAX`).
pub(super) fn open_dir(parent: impl AsFd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(openat(parent, name, flags, Mode::empty())?)
}

/// Makes the directory `name` in `parent` unless it is one already, and opens it; `true` when
/// it was made.
pub(super) fn make_dir(
    parent: impl AsFd,
    name: impl rustix::path::Arg + Copy,
) -> io::Result<(OwnedFd, bool)> {
    let made = match mkdirat(&parent, name, Mode::from_bits_truncate(0o777)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(err) => return Err(err.into()),
    };
    // Something else of that name is refused here: `open_dir` opens only a directory.
    Ok((open_dir(parent, name)?, made))
}

/// Creates the regular file `name` in `parent`, which must not hold that name yet.
pub(super) fn create_file(parent: impl AsFd, name: impl rustix::path::Arg) -> io::Result<File> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(openat(parent, name, flags, Mode::from_bits_truncate(0o666))?.into())
}

/// Opens the regular file `name` in `parent` to read it.
pub(super) fn open_file(parent: impl AsFd, name: impl rustix::path::Arg) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(openat(parent, name, flags, Mode::empty())?.into())
}

/// The directories along one path below a root, each opened through the one above. The last
/// path's stay open, so the next path, when it shares a beginning with the last (as paths in
/// sorted order do), opens only the directories where it differs: every directory of a sorted
/// list is opened once, and at most one path's depth of them are held open.
pub(super) struct DirChain {
    root: OwnedFd,
    open: Vec<(String, OwnedFd)>,
}

impl DirChain {
    /// A chain starting at the directory `root`.
    pub(super) fn new(root: OwnedFd) -> Self {
        Self {
            root,
            open: Vec::new(),
        }
    }

    /// The directory `names` leads to from the root (the root itself when empty), and how many
    /// directories were made on the way: with `make`, those missing are. A name that is
    /// something other than a directory is an error.
    pub(super) fn reach(&mut self, names: &[&str], make: bool) -> io::Result<(&OwnedFd, u64)> {
        let mut made_here = 0;
        let shared = self
            .open
            .iter()
            .zip(names)
            .take_while(|((open, _), name)| open == *name)
            .count();
        self.open.truncate(shared);
        for name in &names[shared..] {
            let parent = self.open.last().map_or(&self.root, |(_, dir)| dir);
            let dir = if make {
                let (dir, made) = make_dir(parent, *name)?;
                made_here += u64::from(made);
                dir
            } else {
                open_dir(parent, *name)?
            };
            self.open.push(((*name).to_owned(), dir));
        }
        Ok((
            self.open.last().map_or(&self.root, |(_, dir)| dir),
            made_here,
        ))
    }
}

/// A `/`-separated relative path split into the directories leading to its last name, and
/// that name.
pub(super) fn split(path: &str) -> (Vec<&str>, &str) {
    match path.rsplit_once('/') {
        Some((dirs, name)) => (dirs.split('/').collect(), name),
        None => (Vec::new(), path),
    }
}
