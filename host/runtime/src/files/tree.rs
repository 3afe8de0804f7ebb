//! The directory tree of a store's files directory, reached through handles only: how deep a
//! directory lies below it, and a walk of everything under a directory.
//!
//! Nothing here joins paths. A guest makes each directory relative to the one it holds open,
//! so the absolute path of what it keeps may be longer than the system's `PATH_MAX` (4,096
//! bytes: 16 levels of 255-byte names, or 2,048 of one byte), and every call given such a path
//! fails with "file name too long" — a path-based walk of the tree made the store's start fail
//! that way. Each directory is opened through its parent's handle, by name and without
//! following a link, and a walk climbs back through `..`: it holds at most two directories
//! open and keeps no stack frame per level, however deep the tree.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat, fstat, openat, statat};

/// A directory's identity: its device and inode numbers.
pub(crate) type Identity = (u64, u64);

/// The identity of the directory (or file) `fd` is open on.
pub(crate) fn identity(fd: impl AsFd) -> io::Result<Identity> {
    let stat = fstat(fd)?;
    Ok((stat.st_dev, stat.st_ino))
}

/// What `..` of `dir` is, opened only to be climbed from and compared (`O_PATH`).
fn parent_of(dir: impl AsFd) -> io::Result<std::os::fd::OwnedFd> {
    Ok(openat(
        dir,
        c"..",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// How many levels below the directory `root` the directory `dir` lies (0: it is `root`), if
/// at most `limit`; `None` when deeper. Climbs `..` from `dir`, at most `limit` times. (The
/// `..` of a directory removed while open is still its former parent on Linux; nothing can
/// be made in a removed directory, so its depth matters to no one.)
pub(crate) fn depth_below(
    dir: BorrowedFd<'_>,
    root: Identity,
    limit: usize,
) -> io::Result<Option<usize>> {
    let mut here = identity(dir)?;
    let mut climbed = None;
    for depth in 0..=limit {
        if here == root {
            return Ok(Some(depth));
        }
        if depth == limit {
            break;
        }
        let parent = match &climbed {
            Some(fd) => parent_of(fd)?,
            None => parent_of(dir)?,
        };
        let above = identity(&parent)?;
        if above == here {
            // The filesystem's root, which is its own parent: `dir` is not under `root`.
            break;
        }
        here = above;
        climbed = Some(parent);
    }
    Ok(None)
}

/// An entry a [`walk`] meets.
pub(crate) struct Entry<'a> {
    /// Levels below the walk's top directory: 1 for what the top directory holds.
    pub(crate) depth: usize,
    /// Its name in its directory.
    pub(crate) name: &'a CStr,
    /// What it is (a link is a link: not followed).
    pub(crate) kind: FileType,
    /// The directory holding it, for what the visit needs to know more (`statat`).
    pub(crate) parent: BorrowedFd<'a>,
}

impl Entry<'_> {
    /// Its metadata, not following a link; `None` if it is gone since it was listed.
    pub(crate) fn stat(&self) -> io::Result<Option<Stat>> {
        match statat(self.parent, self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}

/// What a [`walk`] does after its visit of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visit {
    /// Goes on; into the entry too, when it is a directory.
    Descend,
    /// Goes on, without entering the entry.
    Skip,
    /// Ends the walk.
    Stop,
}

/// Whether a [`walk`] saw the whole tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walked {
    /// Every entry was visited (but those in directories not entered).
    Whole,
    /// A visit answered [`Visit::Stop`].
    Stopped,
}

/// One directory the walk is in or will come back to: its identity, to check the climb back
/// through `..` reaches it, and the subdirectories it has still to enter.
struct Level {
    identity: Identity,
    to_enter: Vec<CString>,
}

/// Visits every entry under the directory `top` (not `top` itself), depth first, each
/// directory's entries before what they hold, entering the directories `visit` answers
/// [`Visit::Descend`] for. An entry gone or replaced by something else since its directory was
/// listed is left out; a directory moved elsewhere meanwhile, so that `..` no longer leads
/// back, ends the walk with an error.
pub(crate) fn walk(
    top: BorrowedFd<'_>,
    mut visit: impl FnMut(&Entry<'_>) -> io::Result<Visit>,
) -> io::Result<Walked> {
    let mut here = Dir::read_from(top)?;
    let Some(to_enter) = list(&mut here, 1, &mut visit)? else {
        return Ok(Walked::Stopped);
    };
    let mut levels = vec![Level {
        identity: identity(here.fd()?)?,
        to_enter,
    }];
    while let Some(level) = levels.last_mut() {
        let Some(name) = level.to_enter.pop() else {
            levels.pop();
            let Some(parent) = levels.last() else { break };
            let up = openat(
                here.fd()?,
                c"..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            here = Dir::new(up)?;
            if identity(here.fd()?)? != parent.identity {
                return Err(io::Error::other(
                    "a directory moved while the tree under it was walked",
                ));
            }
            continue;
        };
        let opened = openat(
            here.fd()?,
            &name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        );
        let child = match opened {
            Ok(child) => child,
            // Gone, or no longer a directory (a link now), since it was listed.
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        here = Dir::new(child)?;
        let depth = levels.len() + 1;
        let Some(to_enter) = list(&mut here, depth, &mut visit)? else {
            return Ok(Walked::Stopped);
        };
        levels.push(Level {
            identity: identity(here.fd()?)?,
            to_enter,
        });
    }
    Ok(Walked::Whole)
}

/// Visits the entries of `dir`, `depth` levels below the walk's top; answers the directories
/// among them to enter (`None`: the walk stops).
fn list(
    dir: &mut Dir,
    depth: usize,
    visit: &mut impl FnMut(&Entry<'_>) -> io::Result<Visit>,
) -> io::Result<Option<Vec<CString>>> {
    let mut listed = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        listed.push((entry.file_type(), name.to_owned()));
    }
    let parent = dir.fd()?;
    let mut to_enter = Vec::new();
    for (kind, name) in listed {
        let mut entry = Entry {
            depth,
            name: &name,
            kind,
            parent,
        };
        if kind == FileType::Unknown {
            // A filesystem that does not say in its listings.
            match entry.stat()? {
                Some(stat) => entry.kind = FileType::from_raw_mode(stat.st_mode),
                None => continue,
            }
        }
        let is_dir = entry.kind == FileType::Directory;
        match visit(&entry)? {
            Visit::Stop => return Ok(None),
            Visit::Descend if is_dir => to_enter.push(name),
            Visit::Descend | Visit::Skip => {}
        }
    }
    Ok(Some(to_enter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn open_dir(path: &std::path::Path) -> OwnedFd {
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    /// Makes `name` in `dir` and opens it.
    fn sub(dir: &OwnedFd, name: &str) -> OwnedFd {
        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755)).unwrap();
        openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn a_directory_knows_its_depth_up_to_the_limit() {
        let scratch = tempfile::tempdir().unwrap();
        let root = open_dir(scratch.path());
        let root_id = identity(&root).unwrap();
        let mut chain = vec![root];
        for _ in 0..5 {
            let next = sub(chain.last().unwrap(), "d");
            chain.push(next);
        }
        for (depth, dir) in chain.iter().enumerate() {
            assert_eq!(depth_below(dir.as_fd(), root_id, 5).unwrap(), Some(depth));
        }
        assert_eq!(depth_below(chain[5].as_fd(), root_id, 4).unwrap(), None);
        // A directory beside the root is not under it, however far the climb goes.
        let beside = tempfile::tempdir().unwrap();
        assert_eq!(
            depth_below(open_dir(beside.path()).as_fd(), root_id, 100).unwrap(),
            None
        );
    }

    #[test]
    fn a_walk_meets_everything_once_and_stops_when_told() {
        let scratch = tempfile::tempdir().unwrap();
        let root = open_dir(scratch.path());
        let a = sub(&root, "a");
        let b = sub(&a, "b");
        sub(&b, "c");
        sub(&root, "x");
        std::fs::write(scratch.path().join("a/file"), b"12345").unwrap();
        std::os::unix::fs::symlink("a", scratch.path().join("link")).unwrap();

        let mut seen = Vec::new();
        let walked = walk(root.as_fd(), |entry| {
            let name = entry.name.to_str().unwrap().to_owned();
            seen.push((entry.depth, name, format!("{:?}", entry.kind)));
            Ok(Visit::Descend)
        })
        .unwrap();
        assert_eq!(walked, Walked::Whole);
        seen.sort();
        assert_eq!(
            seen,
            [
                (1, "a".to_owned(), "Directory".to_owned()),
                (1, "link".to_owned(), "Symlink".to_owned()),
                (1, "x".to_owned(), "Directory".to_owned()),
                (2, "b".to_owned(), "Directory".to_owned()),
                (2, "file".to_owned(), "RegularFile".to_owned()),
                (3, "c".to_owned(), "Directory".to_owned()),
            ],
            "the link is not followed"
        );

        let mut visits = 0;
        let walked = walk(root.as_fd(), |entry| {
            visits += 1;
            Ok(if entry.depth == 2 {
                Visit::Stop
            } else {
                Visit::Descend
            })
        })
        .unwrap();
        assert_eq!(walked, Walked::Stopped);
        assert!(visits <= 5, "{visits} visits");
    }
}
