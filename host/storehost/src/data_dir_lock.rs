//! One host per data directory: `DATA_DIR/host.lock`, locked (`flock`) for the process's life.
//!
//! Two hosts on one `DATA_DIR` share `host.db` and every store's files: the second one's
//! removal archived a store the first was running, and a store whose files hibernation had
//! closed took appends from both into one log. The lock goes with the process, whatever ends
//! it (a `kill -9` too), so a restart never finds a stale one.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;

use anyhow::{Context as _, anyhow};
use rustix::fs::{FlockOperation, flock};

/// The lock file's name in `DATA_DIR`.
pub const LOCK_FILE: &str = "host.lock";

/// The held lock; dropping it (the process ending) lets another host start.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// This process's lock, held until it exits: the runtime's teardown after `serve` returns
/// still closes stores' files.
static HELD: std::sync::OnceLock<DataDirLock> = std::sync::OnceLock::new();

/// Locks `data_dir` for the rest of this process's life (see [`DataDirLock::acquire`]).
pub fn hold(data_dir: &Path, listen: &str) -> anyhow::Result<()> {
    let lock = DataDirLock::acquire(data_dir, listen)?;
    HELD.set(lock)
        .map_err(|_| anyhow!("this process already holds a data directory"))
}

impl DataDirLock {
    /// Locks `data_dir` for this process, writing its pid and `listen` address into the lock
    /// file so that a second host can say who holds it. Fails, saying so, while another
    /// process holds it.
    pub fn acquire(data_dir: &Path, listen: &str) -> anyhow::Result<Self> {
        let path = data_dir.join(LOCK_FILE);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("could not open the lock file {}", path.display()))?;
        if let Err(err) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if err != rustix::io::Errno::WOULDBLOCK {
                // A file system without locks (some network and FUSE mounts): the host runs,
                // and says that nothing keeps a second one off the directory.
                tracing::warn!(
                    "could not lock {} ({err}): nothing keeps a second host off this data directory; run one host on it",
                    path.display()
                );
                return Ok(Self { _file: file });
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(anyhow!(
                "the data directory {} is in use by another storehost ({}); one host runs one \
                 data directory: stop that host first, or give this one another --data-dir \
                 (or data_dir in its config)",
                data_dir.display(),
                if holder.is_empty() {
                    "its lock file names no process"
                } else {
                    &holder
                }
            ));
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "pid {} listen {listen}", std::process::id()))
            .with_context(|| format!("could not write the lock file {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_goes() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path(), "127.0.0.1:1").unwrap();
        let err = DataDirLock::acquire(dir.path(), "127.0.0.1:2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is in use by another storehost")
                && err.contains(&format!("pid {} listen 127.0.0.1:1", std::process::id())),
            "{err}"
        );
        drop(first);
        DataDirLock::acquire(dir.path(), "127.0.0.1:2").unwrap();
    }
}
