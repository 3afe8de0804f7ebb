//! Backups of one store: a consistent online snapshot of its databases packed as a `.tar.gz`
//! with a manifest, and, for a restore, the checks an archive must pass and the atomic swap of
//! the store's directory.
//!
//! ## Why the snapshot is consistent
//! A store keeps its state in two files: `events.db` (the log, append-only) and `store.db` (the
//! plugin's tables with the host's cursor, outbox and dead letters, committed together). Each
//! file is copied with SQLite's online backup API in a single step, which reads one committed
//! snapshot of that file while the store goes on writing (WAL: readers never block writers).
//!
//! `store.db` is copied first, `events.db` second. Because the log only ever grows, the log
//! copy then holds every event the `store.db` copy has seen: its cursor and its dead letters.
//! The log copy may hold more events appended after `store.db` was copied: a restored store
//! processes those from its cursor, as after a crash. It holds no event emitted by work the
//! `store.db` copy has not seen: the store keeps processing during the copies, but the events
//! its plugin emits wait in its outbox (committed with that work) until both are taken
//! ([`crate::Store::hold_emits`]); a restored store moves its outbox into its log when it
//! starts, and an emitted event is never appended twice because the log keys plugin events by
//! their origin (`<cause seq>:<index>`). Before the hold, an event emitted between the copies
//! was in the restored log while the tables lacked its work, which the restored store then did
//! again: a plugin answering differently the second time (an LLM's reply) had the log say one
//! thing and its tables another. The other order would be wrong: a `store.db` copied after the
//! log could have a cursor past the log's head, and the restored store would skip the next
//! events appended to it.
//!
//! The guest's `files/` directory is copied as it is at backup time (file by file, not part of
//! the SQLite snapshot).
//!
//! Its tree may lie deeper than a path reaches (see `backup/handles.rs`): the copy, the packing
//! and the unpacking open every directory and file by name through its parent's handle.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dir::StoreDir;
use crate::id::StoreId;
use crate::sqlite::now_ms;

mod handles;
use handles::DirChain;

/// What each unpacked file and directory counts against a restore's room besides its bytes,
/// as the `files` quota counts it.
const ENTRY_BYTES: u64 = storehost_runtime::files::ENTRY_BYTES;

/// The `format` every manifest carries.
pub const FORMAT: &str = "storehost-store-backup";
/// The newest manifest format this host writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's name in the archive.
pub const MANIFEST: &str = "manifest.json";
/// The largest manifest accepted.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Longest name of one file or directory (Linux's `NAME_MAX`).
const MAX_NAME_BYTES: usize = 255;

/// Longest name an archive entry may have: [`MAX_COPY_DEPTH`] directories of 255 bytes below
/// `files/`, and a file in the deepest. (The tar crate reads a GNU long name whole into memory,
/// whatever size its header claims: a few MB of gzip could have asked for gigabytes.)
const MAX_ENTRY_NAME_BYTES: u64 = ((MAX_COPY_DEPTH as u64) + 2) * 256;

/// What an archive holds, written as `manifest.json`, its first entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version ([`FORMAT_VERSION`] when written by this host).
    pub format_version: u32,
    /// The store the backup was taken of.
    pub store_id: String,
    /// When it was taken (ms since the Unix epoch).
    pub created_at: i64,
    /// The plugin the store ran.
    pub plugin: ManifestPlugin,
    /// The events in the backed-up log.
    pub seq: SeqRange,
    /// The last `seq` whose effects are in the backed-up `store.db`.
    pub cursor: u64,
    /// Every file in the archive but the manifest, with its size and SHA-256.
    pub files: Vec<ManifestFile>,
}

/// The plugin a backed-up store ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPlugin {
    /// Its name.
    pub name: String,
    /// SHA-256 of its component.
    pub sha256: String,
}

/// The first and last `seq` of the backed-up log (both 0 when it is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    /// The first event's `seq`.
    pub first: u64,
    /// The last event's `seq`.
    pub last: u64,
}

/// One file of an archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Its path in the archive (`events.db`, `store.db`, `files/...`).
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

/// A backup archive written to disk.
#[derive(Debug)]
pub struct BackupArchive {
    /// The `.tar.gz` file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// What it holds.
    pub manifest: Manifest,
}

/// Why a backup could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading a database failed.
    #[error("could not snapshot the store's database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Reading or writing files failed.
    #[error("could not write the backup: {0}")]
    Io(#[from] io::Error),
}

/// Why an archive cannot be restored. The store's data is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The bytes are not a readable `.tar.gz` / `.tar` (truncated, corrupt, another format).
    #[error(
        "the archive cannot be read ({0}); send the unmodified file `GET /v1/stores/{{id}}/backup` produced"
    )]
    Unreadable(String),
    /// The archive reads, but is not a valid backup (manifest, checksums, databases).
    #[error("{0}")]
    Invalid(String),
    /// The archive unpacks to more than the store may hold.
    #[error(
        "the archive unpacks to more than {limit} bytes (4 KiB counted for each file and directory), what the store's disk, event_log and files quotas hold together and a MiB more; raise them (through PUT /v1/stores/<id>, or in the config file for a store it declares), then restore again"
    )]
    TooLarge {
        /// The most it could have unpacked to.
        limit: u64,
    },
    /// The host could not write the unpacked files.
    #[error("could not unpack the archive: {0}")]
    Io(#[from] io::Error),
}

/// A directory for one backup or restore inside `DATA_DIR/stores/` (the same filesystem as the
/// stores, so a restore's final rename is atomic); deleted when dropped, unless kept
/// ([`ScratchDir::keep`]).
#[derive(Debug)]
pub struct ScratchDir {
    dir: tempfile::TempDir,
    keep: std::sync::atomic::AtomicBool,
}

impl ScratchDir {
    /// Creates `DATA_DIR/stores/.<purpose>-<id>-XXXXXX`. The leading dot keeps it apart from
    /// stores: no store id starts with one.
    pub fn new(data_dir: &Path, purpose: &str, id: &StoreId) -> io::Result<Self> {
        let stores = data_dir.join("stores");
        std::fs::create_dir_all(&stores)?;
        tempfile::Builder::new()
            .prefix(&format!(".{purpose}-{id}-"))
            .tempdir_in(stores)
            .map(|dir| Self {
                dir,
                keep: false.into(),
            })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the directory when dropped: it holds data that must outlive the operation (a
    /// store's replaced data that could not be archived). The next start archives it
    /// ([`recover_interrupted`]).
    pub fn keep(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if *self.keep.get_mut() {
            self.dir.disable_cleanup(true);
        }
    }
}

/// What [`recover_interrupted`] did with the scratch directories a crash left behind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Interrupted {
    /// Backups cut short (their snapshot copies were deleted).
    pub backups_removed: usize,
    /// Restores cut short, moved whole into `DATA_DIR/archive/` (they may hold a store's
    /// previous data between the swap and its archiving, so nothing is deleted).
    pub restores_archived: Vec<PathBuf>,
}

/// At start: deletes the scratch directories of backups that a crash interrupted (copies only)
/// and moves those of interrupted restores into `DATA_DIR/archive/`, so neither leaks disk nor
/// is mistaken for a store.
pub fn recover_interrupted(data_dir: &Path) -> io::Result<Interrupted> {
    let stores = data_dir.join("stores");
    let mut found = Interrupted::default();
    let entries = match std::fs::read_dir(&stores) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if name.starts_with(".backup-") {
            std::fs::remove_dir_all(entry.path())?;
            found.backups_removed += 1;
        } else if let Some(rest) = name.strip_prefix(".restore-") {
            let kept = crate::dir::path_into_archive(
                &entry.path(),
                &data_dir.join("archive"),
                &format!("interrupted-restore-{rest}"),
                now_ms(),
            )?;
            found.restores_archived.push(kept);
        }
    }
    Ok(found)
}

/// Takes a consistent snapshot of the store in `dir` (while it keeps running) and packs it as
/// `work/backup.tar.gz`.
pub fn create(
    store: &crate::Store,
    plugin: ManifestPlugin,
    work: &Path,
) -> Result<BackupArchive, BackupError> {
    create_from(store.dir(), store.id(), plugin, work, || store.hold_emits())
}

/// [`create`] for the store in `dir`, its emitted events held back by what `hold` answers
/// while the two databases are copied.
fn create_from<H>(
    dir: &StoreDir,
    id: &StoreId,
    plugin: ManifestPlugin,
    work: &Path,
    hold: impl FnOnce() -> H,
) -> Result<BackupArchive, BackupError> {
    let snapshot = work.join("snapshot");
    std::fs::create_dir(&snapshot)?;
    // Order matters, and no emitted event reaches the log between the two copies: see the
    // module documentation.
    {
        let _held = hold();
        snapshot_db(&dir.store_db(), &snapshot.join("store.db"))?;
        snapshot_db(&dir.events_db(), &snapshot.join("events.db"))?;
    }
    let root = handles::open_dir(rustix::fs::CWD, &snapshot)?;
    let mut files = copy_tree(&dir.files, &root)?;
    for name in ["events.db", "store.db"] {
        let (size, sha256) = hash_file(handles::open_file(&root, name)?)?;
        files.push(ManifestFile {
            path: name.to_owned(),
            size,
            sha256,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));

    let cursor: u64 = Connection::open(snapshot.join("store.db"))?.query_row(
        "SELECT last_seq FROM _host_cursor WHERE id = 1",
        [],
        |row| row.get(0),
    )?;
    let (first, last): (u64, u64) = Connection::open(snapshot.join("events.db"))?.query_row(
        "SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM events",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;

    let created_at = now_ms();
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        format_version: FORMAT_VERSION,
        store_id: id.as_str().to_owned(),
        created_at,
        plugin,
        seq: SeqRange { first, last },
        cursor,
        files,
    };

    let path = work.join("backup.tar.gz");
    let file = File::create(&path)?;
    let encoder = flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::fast());
    let mut tar = tar::Builder::new(encoder);
    let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
    append(
        &mut tar,
        MANIFEST,
        manifest_json.len() as u64,
        created_at,
        manifest_json.as_slice(),
    )?;
    // In sorted order, so each directory of the snapshot is opened once.
    let mut snapshot_dirs = DirChain::new(root);
    for entry in &manifest.files {
        let (dirs, name) = handles::split(&entry.path);
        let file = handles::open_file(snapshot_dirs.reach(&dirs, false)?.0, name)?;
        append(
            &mut tar,
            &entry.path,
            entry.size,
            created_at,
            BufReader::new(file),
        )?;
    }
    let file = tar
        .into_inner()?
        .finish()?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    let size = file.metadata()?.len();
    std::fs::remove_dir_all(&snapshot)?;
    Ok(BackupArchive {
        path,
        size,
        manifest,
    })
}

/// Copies the database at `source` to `target` with SQLite's online backup API, in one step
/// (one read transaction, so one committed snapshot) while other connections write.
fn snapshot_db(source: &Path, target: &Path) -> rusqlite::Result<()> {
    // Through the host's VFS: the store's own connections have the file open (and keep other
    // openers out), and this one shares their WAL index.
    let source = crate::sqlite::open_existing(source, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let mut target = Connection::open(target)?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut target)?;
        let mut waited = Duration::ZERO;
        loop {
            match backup.step(-1)? {
                rusqlite::backup::StepResult::Done => break,
                // A writer holds a lock it must not (WAL readers are not blocked) or the
                // database is being recovered: try again shortly, for a bounded time.
                _ if waited < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(20));
                    waited += Duration::from_millis(20);
                }
                other => {
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some(format!("the backup did not complete: {other:?}")),
                    ));
                }
            }
        }
    }
    // A single file, without a WAL beside it, whatever the source's journal mode.
    target.pragma_update(None, "journal_mode", "DELETE")?;
    target.close().map_err(|(_, err)| err)
}

/// Copies the regular files under `from` (a store's files directory) into a new directory
/// `files` in `snapshot` (symlinks and special files are skipped), and answers what it copied:
/// each file's path in the archive (`files/...`), size and SHA-256.
///
/// The store's plugin keeps running meanwhile and may swap any entry for a symbolic link
/// between the listing and the copy: `../../victim` in place of a directory led a path-based
/// copy into another store's directory (its databases ended up in this store's backup). So
/// every directory and file is opened through its parent's handle with cap-std, which never
/// resolves a path outside the directory it starts from, and copied only if what was opened
/// is the very directory or regular file the listing showed (same device and inode). The copy
/// is made through handles too, and hashed as it is written.
fn copy_tree(from: &Path, snapshot: &OwnedFd) -> io::Result<Vec<ManifestFile>> {
    let (to, _) = handles::make_dir(snapshot, "files")?;
    let mut copied = Vec::new();
    let root = match cap_std::fs::Dir::open_ambient_dir(from, cap_std::ambient_authority()) {
        Ok(root) => root,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(copied),
        Err(err) => return Err(err),
    };
    let mut linked = std::collections::HashSet::new();
    copy_dir(&root, &to, Path::new("files"), 0, &mut linked, &mut copied)?;
    Ok(copied)
}

/// How deep [`copy_tree`] follows directories; deeper, the backup fails saying so.
const MAX_COPY_DEPTH: usize = 256;

/// [`copy_tree`]'s walk of one directory, opened as `dir`, `depth` levels below the root, into
/// `to`, which is `at` in the archive; `linked` holds the files with several names already
/// copied. A file is copied under its first name only: the `files` quota counts its bytes once,
/// and a 512 MiB file with 130,000 hard links (4 KiB of quota each) would have been 64 TiB of
/// copies on the disk every store shares.
fn copy_dir(
    dir: &cap_std::fs::Dir,
    to: &OwnedFd,
    at: &Path,
    depth: usize,
    linked: &mut std::collections::HashSet<(u64, u64)>,
    copied: &mut Vec<ManifestFile>,
) -> io::Result<()> {
    use cap_std::fs::MetadataExt;
    if depth > MAX_COPY_DEPTH {
        return Err(io::Error::other(format!(
            "the store's files nest more than {MAX_COPY_DEPTH} directories deep; the backup \
             copies no deeper (flatten the plugin's directories)"
        )));
    }
    for entry in dir.entries()? {
        let entry = entry?;
        // What the listing showed, not following a link.
        let listed = match entry.metadata() {
            Ok(listed) => listed,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let same = |opened: &cap_std::fs::Metadata| {
            opened.dev() == listed.dev() && opened.ino() == listed.ino()
        };
        let name = entry.file_name();
        if listed.is_dir() {
            // A directory swapped for a link since the listing: not followed, skipped.
            let Ok(sub) = entry.open_dir() else { continue };
            if same(&sub.dir_metadata()?) {
                let (made, _) = handles::make_dir(to, name.as_os_str())?;
                copy_dir(&sub, &made, &at.join(&name), depth + 1, linked, copied)?;
            }
        } else if listed.is_file() {
            let Ok(mut file) = entry.open() else { continue };
            let opened = file.metadata()?;
            let again = opened.nlink() > 1 && !linked.insert((opened.dev(), opened.ino()));
            if opened.is_file() && same(&opened) && !again {
                let path = at.join(&name);
                let path = path.to_str().ok_or_else(|| {
                    io::Error::other(format!(
                        "{} is not a UTF-8 file name; rename it to back the store up",
                        path.display()
                    ))
                })?;
                let out = handles::create_file(to, name.as_os_str())?;
                let mut out = HashingWriter::new(BufWriter::new(out));
                io::copy(&mut file, &mut out)?;
                out.flush()?;
                let (size, sha256) = out.finish();
                copied.push(ManifestFile {
                    path: path.to_owned(),
                    size,
                    sha256,
                });
            }
        }
    }
    Ok(())
}

fn hash_file(file: File) -> io::Result<(u64, String)> {
    let mut writer = HashingWriter::new(io::sink());
    io::copy(&mut BufReader::new(file), &mut writer)?;
    Ok(writer.finish())
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    created_at: i64,
    data: impl Read,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(u64::try_from(created_at / 1_000).unwrap_or(0));
    tar.append_data(&mut header, path, data)
}

/// A writer that counts and hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> (u64, String) {
        (self.size, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where an archive entry goes, or why it may not be in a backup.
fn entry_target(path: &Path) -> Result<String, RestoreError> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                let part = part.to_str().ok_or_else(|| {
                    RestoreError::Invalid(format!(
                        "archive entry {} is not a UTF-8 path; a backup never holds one",
                        path.display()
                    ))
                })?;
                // No file system takes such a name (a long GNU name may carry either), and
                // the host's refusal of it would be its own failure, a 500.
                if part.len() > MAX_NAME_BYTES || part.contains('\0') {
                    return Err(RestoreError::Invalid(format!(
                        "archive entry {} has a name longer than {MAX_NAME_BYTES} bytes or holding a NUL; a backup never holds one",
                        path.display()
                    )));
                }
                parts.push(part);
            }
            Component::CurDir => {}
            _ => {
                return Err(RestoreError::Invalid(format!(
                    "archive entry {} leaves the store's directory; a backup never holds such a path",
                    path.display()
                )));
            }
        }
    }
    let allowed = matches!(
        parts.as_slice(),
        [MANIFEST] | ["events.db"] | ["store.db"] | ["files", ..]
    );
    if !allowed {
        return Err(RestoreError::Invalid(format!(
            "unexpected archive entry {}; a backup holds manifest.json, events.db, store.db and files/",
            path.display()
        )));
    }
    Ok(parts.join("/"))
}

/// Unpacks `archive` (a `.tar.gz` or `.tar`) into the empty directory `into` and checks all of
/// it: the manifest, every file against its size and SHA-256, no file missing or extra, and both
/// databases (integrity, a gap-free log matching the manifest's seq range, the cursor). Returns
/// the manifest; on error `into` may hold partial files (the caller deletes it). The files it
/// holds may add up to `limit` bytes at most: a small archive can unpack to any size, and
/// unpacking fills the disk every store shares.
pub fn unpack(archive: &Path, into: &Path, limit: u64) -> Result<Manifest, RestoreError> {
    let mut file = BufReader::new(File::open(archive)?);
    let mut magic = [0u8; 2];
    let peeked = {
        let mut read = 0;
        while read < 2 {
            match file.read(&mut magic[read..])? {
                0 => break,
                n => read += n,
            }
        }
        read
    };
    if peeked < 2 {
        return Err(RestoreError::Unreadable("it is empty".into()));
    }
    let reader = io::Cursor::new(magic).chain(file);
    let reader: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let unreadable = |err: io::Error| RestoreError::Unreadable(err.to_string());

    let mut tar = tar::Archive::new(reader);
    let mut unpacked_dirs = DirChain::new(handles::open_dir(rustix::fs::CWD, into)?);
    // `files` itself, the guest's /data, is no entry of its quota: made here, it takes no room.
    unpacked_dirs.reach(&["files"], true)?;
    let mut manifest_bytes: Option<Vec<u8>> = None;
    let mut unpacked: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut room = limit;
    // Raw entries: a GNU long name (how the packer writes a path longer than 100 bytes) is read
    // here, within its bound, and names the entry after it.
    let mut long_name: Option<PathBuf> = None;
    for entry in tar.entries().map_err(unreadable)?.raw(true) {
        let mut entry = entry.map_err(unreadable)?;
        if entry.header().entry_type().is_gnu_longname() {
            if long_name.is_some() {
                return Err(RestoreError::Invalid(
                    "the archive gives one entry two long names".into(),
                ));
            }
            let mut bytes = read_within(&mut entry, MAX_ENTRY_NAME_BYTES, || {
                format!(
                    "an archive entry's name is longer than {MAX_ENTRY_NAME_BYTES} bytes; a backup never holds one"
                )
            })?;
            while bytes.last() == Some(&0) {
                bytes.pop();
            }
            long_name = Some(PathBuf::from(std::ffi::OsString::from_vec(bytes)));
            continue;
        }
        let path = match long_name.take() {
            Some(path) => path,
            None => entry.path().map_err(unreadable)?.into_owned(),
        };
        let name = entry_target(&path)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory if name == "files" || name.starts_with("files/") => {
                // Entries are not free (millions of empty ones fit a small archive): each
                // directory made takes its 4 KiB of the room, whichever entry makes it.
                let dirs: Vec<&str> = name.split('/').collect();
                make_dirs(&mut unpacked_dirs, &name, &dirs, &mut room, limit)?;
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            other => {
                return Err(RestoreError::Invalid(format!(
                    "archive entry {name} is a {other:?}; a backup holds only regular files"
                )));
            }
        }
        if name == MANIFEST {
            if manifest_bytes.is_some() {
                return Err(RestoreError::Invalid(
                    "the archive holds two manifests".into(),
                ));
            }
            manifest_bytes = Some(read_within(&mut entry, MAX_MANIFEST_BYTES, || {
                format!("manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
            })?);
            continue;
        }
        if unpacked.contains_key(&name) {
            return Err(RestoreError::Invalid(format!(
                "the archive holds {name} twice"
            )));
        }
        let (dirs, file_name) = handles::split(&name);
        let parent = make_dirs(&mut unpacked_dirs, &name, &dirs, &mut room, limit)?;
        let file = handles::create_file(parent, file_name).map_err(|err| collision(&name, err))?;
        let mut writer = HashingWriter::new(BufWriter::new(file));
        copy_entry(&mut (&mut entry).take(room.saturating_add(1)), &mut writer).map_err(|err| {
            match err {
                CopyError::Read(err) => unreadable(err),
                CopyError::Write(err) => RestoreError::Io(err),
            }
        })?;
        writer.flush()?;
        let (size, sha256) = writer.finish();
        room = room
            .checked_sub(size.saturating_add(ENTRY_BYTES))
            .ok_or(RestoreError::TooLarge { limit })?;
        unpacked.insert(name, (size, sha256));
    }
    if long_name.is_some() {
        return Err(RestoreError::Unreadable(
            "it ends with a long name that names no entry (truncated?)".into(),
        ));
    }
    // Read to the end of the compressed stream so its checksum is verified too.
    io::copy(&mut tar.into_inner(), &mut io::sink()).map_err(unreadable)?;

    let manifest_bytes = manifest_bytes.ok_or_else(|| {
        RestoreError::Invalid(
            "the archive has no manifest.json: it is not a storehost store backup (or it is truncated)".into(),
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|err| RestoreError::Invalid(format!("manifest.json is not valid: {err}")))?;
    check_manifest(&manifest, &unpacked)?;
    check_databases(into, &manifest)?;
    std::fs::create_dir_all(into.join("files"))?;
    Ok(manifest)
}

/// An archive entry read whole, if it holds at most `max` bytes; a larger one is invalid,
/// saying `too_large`.
fn read_within(
    entry: &mut impl Read,
    max: u64,
    too_large: impl FnOnce() -> String,
) -> Result<Vec<u8>, RestoreError> {
    let mut bytes = Vec::new();
    entry
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| RestoreError::Unreadable(err.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(RestoreError::Invalid(too_large()));
    }
    Ok(bytes)
}

/// The directory `dirs` names in a restore, made where missing, for archive entry `name`
/// (a file in it, or that directory itself), each directory made taken from `room`.
fn make_dirs<'a>(
    unpacked_dirs: &'a mut DirChain,
    name: &str,
    dirs: &[&str],
    room: &mut u64,
    limit: u64,
) -> Result<&'a OwnedFd, RestoreError> {
    // `files` and the directories below it: a backup holds none deeper than it copies.
    if dirs.len() > MAX_COPY_DEPTH + 1 {
        return Err(RestoreError::Invalid(format!(
            "archive entry {name} lies more than {MAX_COPY_DEPTH} directories deep in files/; a backup never holds one that deep"
        )));
    }
    let (dir, made) = unpacked_dirs
        .reach(dirs, true)
        .map_err(|err| collision(name, err))?;
    // The directories a file's path makes count like those named by entries of their own:
    // one entry of a small archive could otherwise make hundreds.
    *room = room
        .checked_sub(made.saturating_mul(ENTRY_BYTES))
        .ok_or(RestoreError::TooLarge { limit })?;
    Ok(dir)
}

/// Why archive entry `name` could not be unpacked: another entry took its name or one of its
/// directories' as something else (a file and a directory of one name), or the host failed.
fn collision(name: &str, err: io::Error) -> RestoreError {
    match err.kind() {
        io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => {
            RestoreError::Invalid(format!(
                "archive entry {name} collides with another entry that makes one of its names a file and a directory both; a backup never holds such a pair"
            ))
        }
        _ => RestoreError::Io(err),
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies an entry, telling a read failure (a bad archive) from a write failure (the host).
fn copy_entry(from: &mut impl Read, to: &mut impl Write) -> Result<(), CopyError> {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(CopyError::Read(err)),
        };
        to.write_all(&buffer[..read]).map_err(CopyError::Write)?;
    }
}

fn check_manifest(
    manifest: &Manifest,
    unpacked: &BTreeMap<String, (u64, String)>,
) -> Result<(), RestoreError> {
    if manifest.format != FORMAT {
        return Err(RestoreError::Invalid(format!(
            "manifest.json says format {:?}; a storehost store backup says {FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.format_version == 0 || manifest.format_version > FORMAT_VERSION {
        return Err(RestoreError::Invalid(format!(
            "the backup has format version {}; this host reads versions 1 to {FORMAT_VERSION} (upgrade the host to restore it)",
            manifest.format_version
        )));
    }
    StoreId::new(&manifest.store_id).map_err(|err| {
        RestoreError::Invalid(format!("manifest.json names an invalid store id: {err}"))
    })?;
    let mut listed = BTreeMap::new();
    for file in &manifest.files {
        if listed.insert(file.path.as_str(), file).is_some() {
            return Err(RestoreError::Invalid(format!(
                "manifest.json lists {} twice",
                file.path
            )));
        }
    }
    for required in ["events.db", "store.db"] {
        if !listed.contains_key(required) {
            return Err(RestoreError::Invalid(format!(
                "manifest.json does not list {required}; a store backup always holds it"
            )));
        }
    }
    for (path, file) in &listed {
        let Some((size, sha256)) = unpacked.get(*path) else {
            return Err(RestoreError::Invalid(format!(
                "{path} is listed in manifest.json but missing from the archive (truncated?)"
            )));
        };
        if *size != file.size || *sha256 != file.sha256 {
            return Err(RestoreError::Invalid(format!(
                "{path} does not match its checksum in manifest.json ({size} bytes, sha256 {sha256}; expected {} bytes, sha256 {}): the archive is corrupt",
                file.size, file.sha256
            )));
        }
    }
    if let Some(extra) = unpacked.keys().find(|p| !listed.contains_key(p.as_str())) {
        return Err(RestoreError::Invalid(format!(
            "the archive holds {extra}, which manifest.json does not list"
        )));
    }
    Ok(())
}

fn check_databases(dir: &Path, manifest: &Manifest) -> Result<(), RestoreError> {
    let invalid = |what: &str, err: rusqlite::Error| {
        RestoreError::Invalid(format!("{what} in the backup is not usable: {err}"))
    };
    for name in ["events.db", "store.db"] {
        let conn = Connection::open_with_flags(
            dir.join(name),
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|err| invalid(name, err))?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(|err| invalid(name, err))?;
        if check != "ok" {
            return Err(RestoreError::Invalid(format!(
                "{name} in the backup fails SQLite's integrity check: {check}"
            )));
        }
    }
    let events = Connection::open(dir.join("events.db")).map_err(|e| invalid("events.db", e))?;
    let (count, first, last): (u64, u64, u64) = events
        .query_row(
            "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM events",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .map_err(|err| invalid("events.db", err))?;
    if (SeqRange { first, last }) != manifest.seq {
        return Err(RestoreError::Invalid(format!(
            "events.db holds seq {first}..={last} but manifest.json says {}..={}",
            manifest.seq.first, manifest.seq.last
        )));
    }
    if count > 0 && (first != 1 || count != last) {
        return Err(RestoreError::Invalid(format!(
            "events.db holds {count} events in seq {first}..={last}: the log has gaps"
        )));
    }
    let store = Connection::open(dir.join("store.db")).map_err(|e| invalid("store.db", e))?;
    let cursor: u64 = store
        .query_row(
            "SELECT last_seq FROM _host_cursor WHERE id = 1",
            [],
            |row| row.get(0),
        )
        .map_err(|err| invalid("store.db", err))?;
    if cursor != manifest.cursor || cursor > last {
        return Err(RestoreError::Invalid(format!(
            "store.db's cursor is {cursor}; manifest.json says {} and the log ends at {last}",
            manifest.cursor
        )));
    }
    Ok(())
}

/// Puts the verified store directory `staged` (inside `DATA_DIR/stores/`) in place of store
/// `id`'s directory in one atomic rename (an exchange), then moves the replaced data to
/// `DATA_DIR/archive/<id>-before-restore-<ms>` (see [`crate::dir::into_archive`]) and returns that path (`None` when the store had
/// no directory). The store must be stopped.
///
/// An error means nothing moved. Once the directories are exchanged the store's data is the
/// restored one: should the replaced data then not move into the archive (a full disk), it
/// stays at `staged`, whose path is returned, and the caller must keep it.
pub fn swap_in(data_dir: &Path, id: &StoreId, staged: &Path) -> io::Result<Option<PathBuf>> {
    let stores = data_dir.join("stores");
    let current = stores.join(id.as_str());
    if std::fs::symlink_metadata(&current).is_err() {
        std::fs::rename(staged, &current)?;
        sync_dir(&stores)?;
        return Ok(None);
    }
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        staged,
        rustix::fs::CWD,
        &current,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {}
        Err(err)
            if err == rustix::io::Errno::INVAL
                || err == rustix::io::Errno::NOSYS
                || err == rustix::io::Errno::OPNOTSUPP =>
        {
            // The filesystem cannot exchange: two renames (a crash between them leaves the
            // store's data in `staged` and the old data beside it, nothing lost).
            tracing::warn!(store_id = %id, "the filesystem cannot swap directories atomically; restoring with two renames");
            let aside = staged.with_extension("replaced");
            std::fs::rename(&current, &aside)?;
            std::fs::rename(staged, &current)?;
            std::fs::rename(&aside, staged)?;
        }
        Err(err) => return Err(err.into()),
    }
    if let Err(err) = sync_dir(&stores) {
        tracing::warn!(store_id = %id, "the swapped directories may not survive a power loss: {err}");
    }
    match crate::dir::path_into_archive(
        staged,
        &data_dir.join("archive"),
        &format!("{id}-before-restore"),
        now_ms(),
    ) {
        Ok(kept) => Ok(Some(kept)),
        Err(err) => {
            tracing::error!(store_id = %id, kept = %staged.display(), "could not move the replaced data into the archive; it stays where it is, and the next start archives it: {err}");
            Ok(Some(staged.to_owned()))
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_backups_are_deleted_and_interrupted_restores_archived() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("tenant-a").unwrap();
        let store = data.path().join("stores/tenant-a");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join("events.db"), "the store's own").unwrap();
        let backup = ScratchDir::new(data.path(), "backup", &id).unwrap();
        std::fs::write(backup.path().join("backup.tar.gz"), "half").unwrap();
        let restore = ScratchDir::new(data.path(), "restore", &id).unwrap();
        std::fs::write(restore.path().join("previous"), "old data").unwrap();
        // A crash: neither scratch directory is cleaned up by its owner.
        let left = |scratch: ScratchDir| {
            scratch.keep();
            scratch.path().to_owned()
        };
        let (backup, restore) = (left(backup), left(restore));

        let found = recover_interrupted(data.path()).unwrap();
        assert_eq!(found.backups_removed, 1);
        assert_eq!(found.restores_archived.len(), 1);
        assert!(!backup.exists() && !restore.exists());
        assert_eq!(
            std::fs::read_to_string(found.restores_archived[0].join("previous")).unwrap(),
            "old data"
        );
        assert_eq!(
            std::fs::read_to_string(store.join("events.db")).unwrap(),
            "the store's own"
        );
        assert_eq!(
            recover_interrupted(data.path()).unwrap(),
            Interrupted::default()
        );
    }

    fn plugin() -> ManifestPlugin {
        ManifestPlugin {
            name: "writer".into(),
            sha256: "ab".repeat(32),
        }
    }

    /// A store directory with `events` events, its cursor at `cursor`, and a guest file.
    fn store_dir(data: &Path, id: &StoreId, events: u64, cursor: u64) -> StoreDir {
        let (dir, _) = crate::dir::prepare(data, id, None).unwrap();
        let log =
            crate::event_log::EventLog::open(&dir.events_db(), crate::Durability::Process).unwrap();
        for i in 0..events {
            log.append(
                vec![crate::NewEvent {
                    event_type: "t".into(),
                    payload: format!("{{\"i\":{i}}}"),
                    idempotency_key: None,
                    request_id: None,
                }],
                "api",
            )
            .unwrap();
        }
        let db =
            crate::guest_db::GuestDb::open(&dir.store_db(), crate::Durability::Process, 1 << 30)
                .unwrap();
        db.begin().unwrap();
        db.advance_cursor(cursor).unwrap();
        db.commit().unwrap();
        std::fs::create_dir_all(dir.files.join("notes")).unwrap();
        std::fs::write(dir.files.join("notes/a.txt"), "hello").unwrap();
        dir
    }

    #[test]
    fn a_backup_unpacks_into_the_same_data() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let dir = store_dir(data.path(), &id, 5, 3);
        let work = ScratchDir::new(data.path(), "backup", &id).unwrap();
        let archive = create_from(&dir, &id, plugin(), work.path(), || ()).unwrap();
        assert_eq!(archive.manifest.seq, SeqRange { first: 1, last: 5 });
        assert_eq!(archive.manifest.cursor, 3);
        let paths: Vec<_> = archive
            .manifest
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(paths, ["events.db", "files/notes/a.txt", "store.db"]);

        // It unpacks to its files' bytes and 4 KiB each, and 4 KiB for the directory notes/:
        // a byte less of room refuses it.
        let total: u64 = archive
            .manifest
            .files
            .iter()
            .map(|f| f.size + ENTRY_BYTES)
            .sum::<u64>()
            + ENTRY_BYTES;
        let cramped = ScratchDir::new(data.path(), "restore", &id).unwrap();
        assert!(matches!(
            unpack(&archive.path, cramped.path(), total - 1),
            Err(RestoreError::TooLarge { limit }) if limit == total - 1
        ));
        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        let manifest = unpack(&archive.path, into.path(), total).unwrap();
        assert_eq!(manifest, archive.manifest);
        assert_eq!(
            std::fs::read_to_string(into.path().join("files/notes/a.txt")).unwrap(),
            "hello"
        );
        let log = crate::event_log::EventLog::open(
            &into.path().join("events.db"),
            crate::Durability::Process,
        )
        .unwrap();
        assert_eq!(log.head().unwrap(), 5);
    }

    /// The directory `levels` names below `top`, each opened through the one above (a path
    /// to it may be longer than `PATH_MAX`).
    fn descend(top: &Path, levels: &[String]) -> cap_std::fs::Dir {
        let mut here =
            cap_std::fs::Dir::open_ambient_dir(top, cap_std::ambient_authority()).unwrap();
        for name in levels {
            here = here.open_dir(name).unwrap();
        }
        here
    }

    /// A guest makes each directory through the handle of the one above, so its files may lie
    /// deeper than a path reaches: 20 levels of 250-byte names are 5 KB, past `PATH_MAX`
    /// (4,096 bytes). Such a store backs up and restores whole. Before, the copy, the hashing,
    /// the packing and the unpacking went by path and failed "file name too long" (the backup
    /// answered 500).
    #[test]
    fn files_deeper_than_path_max_back_up_and_restore() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let dir = store_dir(data.path(), &id, 3, 3);
        let levels: Vec<String> = (0..20)
            .map(|level| format!("{level:02}{}", "d".repeat(248)))
            .collect();
        let mut here = descend(&dir.files, &[]);
        for (level, name) in levels.iter().enumerate() {
            here.create_dir(name).unwrap();
            here = here.open_dir(name).unwrap();
            if level == 9 {
                here.write("midway.txt", "halfway down").unwrap();
            }
        }
        here.write("bottom.txt", "at the bottom").unwrap();
        let deep = format!("files/{}", levels.join("/"));
        let midway = format!("files/{}/midway.txt", levels[..10].join("/"));
        let bottom = format!("{deep}/bottom.txt");
        assert!(bottom.len() > 4096);

        let work = ScratchDir::new(data.path(), "backup", &id).unwrap();
        let archive = create_from(&dir, &id, plugin(), work.path(), || ()).unwrap();
        let paths: Vec<_> = archive
            .manifest
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(
            paths,
            [
                "events.db",
                bottom.as_str(),
                midway.as_str(),
                "files/notes/a.txt",
                "store.db"
            ]
        );
        let listed = &archive.manifest.files[1];
        assert_eq!(
            (listed.size, listed.sha256.as_str()),
            (13, hex::encode(Sha256::digest("at the bottom")).as_str())
        );
        assert!(
            !work.path().join("snapshot").exists(),
            "the copy is deleted"
        );

        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        let manifest = unpack(&archive.path, into.path(), u64::MAX).unwrap();
        assert_eq!(manifest, archive.manifest);
        let restored = into.path().join("files");
        assert_eq!(
            descend(&restored, &levels)
                .read_to_string("bottom.txt")
                .unwrap(),
            "at the bottom"
        );
        assert_eq!(
            descend(&restored, &levels[..10])
                .read_to_string("midway.txt")
                .unwrap(),
            "halfway down"
        );
        assert_eq!(
            std::fs::read_to_string(restored.join("notes/a.txt")).unwrap(),
            "hello"
        );
        // The scratch directory's removal goes through handles too (std's, on Linux).
        let scratch = into.path().to_owned();
        drop(into);
        assert!(!scratch.exists());
    }

    /// An archive whose entries would nest deeper than a backup copies, or make one name a
    /// file and a directory both, is refused as invalid (and unpacks nothing unbounded).
    #[test]
    fn entries_too_deep_or_colliding_are_refused() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let archive_of = |paths: &[String]| {
            let path = data.path().join("hostile.tar");
            let mut tar = tar::Builder::new(File::create(&path).unwrap());
            for entry in paths {
                append(&mut tar, entry, 1, 0, &b"x"[..]).unwrap();
            }
            tar.into_inner().unwrap();
            path
        };
        let too_deep = format!("files/{}x", "d/".repeat(MAX_COPY_DEPTH + 1));
        let collide = ["files/a".to_owned(), "files/a/b".to_owned()];
        // At the depth a backup copies to, the refusal is for what else it lacks.
        let deepest = format!("files/{}x", "d/".repeat(MAX_COPY_DEPTH));
        for (paths, says) in [
            (vec![deepest], "no manifest.json"),
            (vec![too_deep], "directories deep"),
            (collide.to_vec(), "a file and a directory both"),
        ] {
            let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
            let refused = unpack(&archive_of(&paths), into.path(), u64::MAX);
            assert!(
                matches!(&refused, Err(RestoreError::Invalid(message)) if message.contains(says)),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn corrupt_and_truncated_archives_are_refused() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let dir = store_dir(data.path(), &id, 50, 50);
        let work = ScratchDir::new(data.path(), "backup", &id).unwrap();
        let archive = create_from(&dir, &id, plugin(), work.path(), || ()).unwrap();
        let bytes = std::fs::read(&archive.path).unwrap();

        let truncated = work.path().join("truncated.tar.gz");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        assert!(matches!(
            unpack(&truncated, into.path(), u64::MAX),
            Err(RestoreError::Unreadable(_) | RestoreError::Invalid(_))
        ));

        let mut flipped = bytes.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x55;
        let corrupt = work.path().join("corrupt.tar.gz");
        std::fs::write(&corrupt, &flipped).unwrap();
        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        assert!(unpack(&corrupt, into.path(), u64::MAX).is_err());

        let empty = work.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        assert!(matches!(
            unpack(&empty, into.path(), u64::MAX),
            Err(RestoreError::Unreadable(_))
        ));
    }

    /// A GNU long name is read within its bound: the tar crate read one whole into memory,
    /// whatever size its header claimed, before the entry reached the checks.
    #[test]
    fn a_long_name_past_its_bound_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let archive = data.path().join("long-name.tar");
        let mut tar = tar::Builder::new(File::create(&archive).unwrap());
        let name = vec![b'a'; 1 << 20];
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(name.len() as u64);
        tar.append_data(&mut header, "././@LongLink", name.as_slice())
            .unwrap();
        append(&mut tar, "files/x", 1, 0, &b"x"[..]).unwrap();
        tar.into_inner().unwrap().sync_all().unwrap();

        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        match unpack(&archive, into.path(), u64::MAX) {
            Err(RestoreError::Invalid(message)) => assert!(
                message.contains(&format!("longer than {MAX_ENTRY_NAME_BYTES} bytes")),
                "{message}"
            ),
            other => panic!("expected the long name refused, got {other:?}"),
        }
    }

    /// The directories a file entry's path makes count against the restore's room like
    /// directory entries: one entry used to make up to 256 of them for nothing.
    #[test]
    fn directories_a_path_makes_count_against_the_room() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let archive = data.path().join("deep.tar");
        let mut tar = tar::Builder::new(File::create(&archive).unwrap());
        let path = format!("files/{}x", "d/".repeat(100));
        append(&mut tar, &path, 1, 0, &b"x"[..]).unwrap();
        tar.into_inner().unwrap().sync_all().unwrap();

        // Room for the file and 50 directories: its path makes 101.
        let limit = 1 + ENTRY_BYTES * 51;
        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        assert!(
            matches!(
                unpack(&archive, into.path(), limit),
                Err(RestoreError::TooLarge { .. })
            ),
            "the path's directories are counted"
        );
    }

    /// A directory entry takes 4 KiB of the room once, whether it or a file's path makes the
    /// directory; names no file system takes are refused as invalid, not failed as the host's
    /// error.
    #[test]
    fn directory_entries_count_once_and_impossible_names_are_invalid() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let archive = data.path().join("dirs.tar");
        let mut tar = tar::Builder::new(File::create(&archive).unwrap());
        for dir in ["files", "files/a", "files/a/b"] {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, dir, io::empty()).unwrap();
        }
        append(&mut tar, "files/a/b/x", 1, 0, &b"x"[..]).unwrap();
        tar.into_inner().unwrap().sync_all().unwrap();
        // Room for a/, a/b/ and x: the archive then only lacks its manifest.
        let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
        match unpack(&archive, into.path(), 3 * ENTRY_BYTES + 1) {
            Err(RestoreError::Invalid(message)) => {
                assert!(message.contains("no manifest.json"), "{message}")
            }
            other => panic!("expected only the manifest missing, got {other:?}"),
        }

        for name in [format!("files/{}", "n".repeat(256)), "files/a\0b".into()] {
            let archive = data.path().join("names.tar");
            let mut tar = tar::Builder::new(File::create(&archive).unwrap());
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::GNULongName);
            header.set_size(name.len() as u64);
            tar.append_data(&mut header, "././@LongLink", name.as_bytes())
                .unwrap();
            append(&mut tar, "files/placeholder", 1, 0, &b"x"[..]).unwrap();
            tar.into_inner().unwrap().sync_all().unwrap();
            let into = ScratchDir::new(data.path(), "restore", &id).unwrap();
            match unpack(&archive, into.path(), u64::MAX) {
                Err(RestoreError::Invalid(message)) => {
                    assert!(
                        message.contains("longer than 255 bytes or holding a NUL"),
                        "{message}"
                    )
                }
                other => panic!("expected {name:?} refused as invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn swapping_replaces_the_directory_and_keeps_the_old_data() {
        let data = tempfile::tempdir().unwrap();
        let id = StoreId::new("acme").unwrap();
        let dir = store_dir(data.path(), &id, 2, 2);
        let staged = ScratchDir::new(data.path(), "restore", &id).unwrap();
        let new_data = staged.path().join("data");
        std::fs::create_dir(&new_data).unwrap();
        std::fs::write(new_data.join("marker"), "new").unwrap();
        let kept = swap_in(data.path(), &id, &new_data).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.root.join("marker")).unwrap(),
            "new"
        );
        assert!(kept.join("events.db").is_file());
        assert!(!new_data.exists());
    }
}
