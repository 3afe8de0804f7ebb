//! A store's directory, `DATA_DIR/stores/<storeId>/`, created and checked through cap-std.
//!
//! Only a validated [`StoreId`] becomes a path component, and every step is taken relative to
//! an opened directory that refuses to follow symlinks out of it.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use crate::id::StoreId;
use crate::spare::{OpenSpare, SpareStores};

/// The store's files, as paths the SQLite and WASI layers open.
#[derive(Debug, Clone)]
pub struct StoreDir {
    /// `DATA_DIR/stores/<id>`.
    pub root: PathBuf,
    /// `DATA_DIR/stores/<id>/files`: the only directory the guest sees (at `/data`).
    pub files: PathBuf,
}

impl StoreDir {
    /// The event log file.
    pub fn events_db(&self) -> PathBuf {
        self.root.join("events.db")
    }

    /// The plugin's database file (with the host's cursor, outbox and dead letters).
    pub fn store_db(&self) -> PathBuf {
        self.root.join("store.db")
    }
}

/// Creates (or checks) the directory of store `id` under `data_dir`; a new one is a spare
/// moved into place when `spares` has one ready, with its open databases when the builder kept
/// them (for the store to adopt).
pub fn prepare(
    data_dir: &Path,
    id: &StoreId,
    spares: Option<&SpareStores>,
) -> io::Result<(StoreDir, Option<OpenSpare>)> {
    std::fs::create_dir_all(data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let data = Dir::open_ambient_dir(&data_dir, ambient_authority())?;
    data.create_dir_all("stores")?;
    let stores = data.open_dir("stores")?;
    let mut open = None;
    if let Some(spares) = spares
        && matches!(stores.symlink_metadata(id.as_str()), Err(err) if err.kind() == io::ErrorKind::NotFound)
    {
        open = spares
            .take_into(&data_dir.join("stores").join(id.as_str()))
            .flatten();
    }
    ensure_real_dir(&stores, id.as_str())?;
    let store = stores.open_dir(id.as_str())?;
    ensure_real_dir(&store, "files")?;
    let root = data_dir.join("stores").join(id.as_str());
    let dir = StoreDir {
        files: root.join("files"),
        root,
    };
    Ok((dir, open))
}

/// Moves the store's directory to `DATA_DIR/archive/<id>-<millis>` (see [`into_archive`]; data
/// kept), or deletes it.
pub fn remove(data_dir: &Path, id: &StoreId, purge: bool) -> io::Result<Option<PathBuf>> {
    let data = Dir::open_ambient_dir(data_dir, ambient_authority())?;
    let Ok(stores) = data.open_dir("stores") else {
        return Ok(None);
    };
    if stores.symlink_metadata(id.as_str()).is_err() {
        return Ok(None);
    }
    if purge {
        stores.remove_dir_all(id.as_str())?;
        return Ok(None);
    }
    data.create_dir_all("archive")?;
    let archive = data.open_dir("archive")?;
    let name = into_archive(
        &stores,
        Path::new(id.as_str()),
        &archive,
        id.as_str(),
        crate::sqlite::now_ms(),
    )?;
    // Tidying only: the archive is whole without it (a directory whose permissions broke
    // cannot be opened, and is archived all the same).
    let tidied = archive.open_dir(&name).and_then(|kept| {
        ["events.db", "store.db"]
            .iter()
            .try_for_each(|db| drop_empty_wal(&kept, db))
    });
    if let Err(err) = tidied {
        tracing::warn!(store_id = %id, "archived, but could not drop its empty WAL files: {err}");
    }
    Ok(Some(data_dir.join("archive").join(name)))
}

/// Moves `from` (in the directory `from_dir`) into the directory `archive` under the name
/// `<stem>-<millis>`, or `<stem>-<millis>-<n>` while that is taken (the same store archived
/// twice in one millisecond, or after the clock was set back); answers the name used. The
/// rename never replaces what is there (`RENAME_NOREPLACE`; where a filesystem lacks it, a
/// plain rename, which replaces no directory with something in it).
pub fn into_archive(
    from_dir: impl AsFd,
    from: &Path,
    archive: impl AsFd,
    stem: &str,
    millis: i64,
) -> io::Result<String> {
    use rustix::fs::{RenameFlags, renameat, renameat_with};
    let mut n = 0;
    loop {
        let name = match n {
            0 => format!("{stem}-{millis}"),
            n => format!("{stem}-{millis}-{n}"),
        };
        let renamed = match renameat_with(&from_dir, from, &archive, &name, RenameFlags::NOREPLACE)
        {
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                renameat(&from_dir, from, &archive, &name)
            }
            renamed => renamed,
        };
        match renamed.map_err(io::Error::from) {
            Ok(()) => return Ok(name),
            Err(err)
                if n < 1000
                    && matches!(
                        err.kind(),
                        io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty
                    ) =>
            {
                n += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// [`into_archive`] by paths: moves `from` into the directory `archive` (made if missing);
/// answers where it now is.
pub fn path_into_archive(
    from: &Path,
    archive: &Path,
    stem: &str,
    millis: i64,
) -> io::Result<PathBuf> {
    std::fs::create_dir_all(archive)?;
    let name = into_archive(
        rustix::fs::CWD,
        from,
        std::fs::File::open(archive)?,
        stem,
        millis,
    )?;
    Ok(archive.join(name))
}

/// Deletes `<db>-wal` and `<db>-shm` when the WAL is empty: the database file then holds
/// everything, and an archive kept for years need not carry 32 KiB of shared memory index per
/// database. A WAL with frames (a store whose files a long hibernation closed, see
/// [`crate::sqlite::keep_small_wal_on_close`], or one that did not close cleanly) stays, with
/// its index.
fn drop_empty_wal(dir: &Dir, db: &str) -> io::Result<()> {
    let wal = format!("{db}-wal");
    match dir.symlink_metadata(&wal) {
        Ok(meta) if meta.is_file() && meta.len() == 0 => dir.remove_file(&wal)?,
        Ok(_) => return Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    match dir.remove_file(format!("{db}-shm")) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Creates `name` as a directory in `parent`, refusing anything else already there (a file or
/// a symlink planted to lead elsewhere).
fn ensure_real_dir(parent: &Dir, name: &str) -> io::Result<()> {
    match parent.symlink_metadata(name) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::other(format!(
            "{name:?} exists but is not a directory (a file or symlink); move it away and retry"
        ))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => parent.create_dir(name),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Archived twice in one millisecond (or after the clock was set back), a store's data
    /// takes the next free name: the rename used to fail, and with it the store's removal (or
    /// replace an empty directory of that name).
    #[test]
    fn an_archive_name_taken_already_gets_a_number_and_nothing_is_replaced() {
        let data = tempfile::tempdir().unwrap();
        let archive = data.path().join("archive");
        std::fs::create_dir(&archive).unwrap();
        let mut names = Vec::new();
        let archive_dir = std::fs::File::open(&archive).unwrap();
        // Something taken already that a plain rename would replace: an empty directory.
        std::fs::create_dir(archive.join("acme-1700000000000")).unwrap();
        for n in 0..3 {
            let from = data.path().join(format!("acme-data-{n}"));
            std::fs::create_dir(&from).unwrap();
            std::fs::write(from.join("events.db"), format!("copy {n}")).unwrap();
            names.push(
                into_archive(
                    rustix::fs::CWD,
                    &from,
                    &archive_dir,
                    "acme",
                    1_700_000_000_000,
                )
                .unwrap(),
            );
        }
        assert_eq!(
            names,
            [
                "acme-1700000000000-1",
                "acme-1700000000000-2",
                "acme-1700000000000-3"
            ]
        );
        for (n, name) in names.iter().enumerate() {
            assert_eq!(
                std::fs::read_to_string(archive.join(name).join("events.db")).unwrap(),
                format!("copy {n}")
            );
        }
        // Any other failure is answered as it is.
        let missing = into_archive(
            rustix::fs::CWD,
            &data.path().join("gone"),
            &archive_dir,
            "acme",
            1,
        );
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn creates_the_store_directory_and_refuses_a_planted_symlink() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let dir = prepare(data.path(), &id, None).unwrap().0;
        assert!(dir.files.is_dir());

        let evil = StoreId::new("evil").unwrap();
        std::fs::create_dir_all(data.path().join("stores")).unwrap();
        std::os::unix::fs::symlink("/etc", data.path().join("stores/evil")).unwrap();
        let err = prepare(data.path(), &evil, None).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn removing_archives_unless_purged() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        prepare(data.path(), &id, None).unwrap();
        let archived = remove(data.path(), &id, false).unwrap().unwrap();
        assert!(archived.join("files").is_dir());
        assert!(!data.path().join("stores/acme").exists());
        prepare(data.path(), &id, None).unwrap();
        assert_eq!(remove(data.path(), &id, true).unwrap(), None);
        assert!(!data.path().join("stores/acme").exists());
    }

    #[test]
    fn an_archive_keeps_its_databases_without_empty_wals_and_keeps_a_wal_with_frames() {
        // A `-shm` file, as SQLite's default VFS leaves it (the host's own keeps none), goes
        // with its empty WAL.
        use crate::sqlite::{self, Durability};
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let dir = prepare(data.path(), &id, None).unwrap().0;
        // store.db closed cleanly (WAL emptied); events.db still open, its WAL holding frames.
        let store =
            sqlite::open(&dir.store_db(), Durability::Process, &sqlite::Schema::NONE).unwrap();
        store
            .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(store);
        std::fs::write(dir.root.join("store.db-shm"), [0u8; 64]).unwrap();
        let events =
            sqlite::open(&dir.events_db(), Durability::Process, &sqlite::Schema::NONE).unwrap();
        events
            .execute_batch("CREATE TABLE e(x); INSERT INTO e VALUES (2);")
            .unwrap();

        let archived = remove(data.path(), &id, false).unwrap().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&archived)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["events.db", "events.db-wal", "files", "store.db"]);
        drop(events);
        let kept = rusqlite::Connection::open(archived.join("store.db")).unwrap();
        let x: i64 = kept.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(x, 1, "the archived database holds its rows without its WAL");
        let kept = rusqlite::Connection::open(archived.join("events.db")).unwrap();
        let x: i64 = kept.query_row("SELECT x FROM e", [], |r| r.get(0)).unwrap();
        assert_eq!(x, 2);
    }
}
