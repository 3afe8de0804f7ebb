//! Backup and restore of one store, as the control plane runs them: a backup reads the running
//! store's files (it keeps processing); a restore checks the whole archive first, then stops
//! the store, swaps its directory for the restored one in one rename and starts it again.

use std::path::Path;

use serde::Serialize;
use storehost_store::backup::{
    self, BackupArchive, BackupError, Manifest, ManifestPlugin, RestoreError, ScratchDir,
};
use storehost_store::{Store, StoreError, StoreId, StoreSettings, sqlite::now_ms};

use super::{ControlError, Orchestrator};

/// What a restore may unpack for a store under `quotas`: what the store may hold, and a MiB for
/// the databases' own pages beyond their quotas.
pub fn restore_limit(quotas: &storehost_store::Quotas) -> u64 {
    [quotas.disk, quotas.event_log, quotas.files, 1 << 20]
        .into_iter()
        .fold(0u64, u64::saturating_add)
}

/// The largest archive a restore for a store under `quotas` takes: what it may unpack, and
/// what packing adds at most (a tar header is smaller than the 4 KiB each entry counts, and
/// compression adds a fraction of a percent to data it cannot shrink), the manifest and a
/// margin. A larger upload could not be restored, and filled the disk while it arrived.
pub fn archive_limit(quotas: &storehost_store::Quotas) -> u64 {
    let unpacked = restore_limit(quotas);
    unpacked
        .saturating_add(unpacked / 256)
        .saturating_add(8 << 20)
}

/// Why a restore was refused or failed. In every case but `Control` the store's data is
/// untouched; on `Control` the store runs on its previous data again when that was possible.
#[derive(Debug, thiserror::Error)]
pub enum RestoreFailure {
    /// The store does not run on this host.
    #[error("store {0} does not exist on this host; create it first (PUT /v1/stores/{0})")]
    NotFound(StoreId),
    /// The archive is unreadable or not a valid backup.
    #[error(transparent)]
    Archive(#[from] RestoreError),
    /// The archive is a backup of another store.
    #[error(
        "the archive is a backup of store \"{backup}\", not \"{target}\"; restore it into \"{backup}\", or add ?allowDifferentStore=true to restore it into \"{target}\" on purpose"
    )]
    StoreMismatch {
        /// The store the backup was taken of.
        backup: String,
        /// The store it was to be restored into.
        target: StoreId,
    },
    /// Stopping, swapping or starting the store failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    /// The store restored into.
    pub store_id: StoreId,
    /// The manifest of the restored backup.
    pub manifest: Manifest,
    /// Where the replaced data was kept (`DATA_DIR/archive/<id>-before-restore-<ms>`, with `-<n>` after it when that name was taken).
    pub previous_data: Option<String>,
    /// Things the operator should know (the backup was taken with another plugin version…).
    pub warnings: Vec<String>,
    /// Whether the store was paused, and so stays paused after the restore.
    pub paused: bool,
}

impl From<BackupError> for ControlError {
    fn from(err: BackupError) -> Self {
        match err {
            BackupError::Sqlite(err) => ControlError::Store(StoreError::Storage(err)),
            BackupError::Io(err) => ControlError::Files(err),
        }
    }
}

/// Per-store locks keeping a backup from reading a store's files while a restore swaps them
/// (backups share, a restore is alone), keyed by the store's directory.
fn transfer_lock(dir: std::path::PathBuf) -> std::sync::Arc<tokio::sync::RwLock<()>> {
    type Locks =
        std::collections::HashMap<std::path::PathBuf, std::sync::Arc<tokio::sync::RwLock<()>>>;
    static LOCKS: std::sync::LazyLock<std::sync::Mutex<Locks>> =
        std::sync::LazyLock::new(Default::default);
    let mut locks = LOCKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Forget the locks nobody holds, so the map stays as small as the transfers under way.
    locks.retain(|_, lock| std::sync::Arc::strong_count(lock) > 1);
    locks.entry(dir).or_default().clone()
}

fn join_error(err: tokio::task::JoinError) -> ControlError {
    ControlError::Store(StoreError::Internal(format!("backup task failed: {err}")))
}

impl Orchestrator {
    /// Takes a consistent snapshot of the running store `id` (it keeps processing meanwhile)
    /// and packs it as an archive in a scratch directory, deleted when the returned
    /// [`ScratchDir`] is dropped.
    pub async fn backup_store(
        &self,
        id: &StoreId,
    ) -> Result<(ScratchDir, BackupArchive), ControlError> {
        let view = self
            .view(id)
            .await
            .ok_or_else(|| ControlError::NotFound(id.clone()))?;
        let store = self
            .get(id)
            .await
            .ok_or_else(|| ControlError::NotFound(id.clone()))?;
        let plugin = ManifestPlugin {
            name: view.plugin.name,
            sha256: view.plugin.sha256,
        };
        let lock = transfer_lock(self.settings.data_dir.join("stores").join(id.as_str()));
        let _reading = lock.read().await;
        let data_dir = self.settings.data_dir.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || -> Result<_, ControlError> {
            let scratch = ScratchDir::new(&data_dir, "backup", &id)?;
            let archive = backup::create(&store, plugin, scratch.path())?;
            if archive.manifest.cursor > archive.manifest.seq.last {
                // The snapshot order rules this out (see `storehost_store::backup`).
                return Err(ControlError::Store(StoreError::Internal(format!(
                    "inconsistent snapshot: cursor {} past the log's end {}; take the backup again",
                    archive.manifest.cursor, archive.manifest.seq.last
                ))));
            }
            Ok((scratch, archive))
        })
        .await
        .map_err(join_error)?
    }

    /// Restores store `id` from the archive at `archive` (inside `scratch`): checks all of it,
    /// then stops the store, swaps its directory for the restored one in one rename, and
    /// starts it again (paused if it was paused). The replaced data is kept in
    /// `DATA_DIR/archive/`. A backup of another store is refused unless
    /// `allow_different_store`.
    pub async fn restore_store(
        &self,
        id: &StoreId,
        archive: &Path,
        scratch: &ScratchDir,
        allow_different_store: bool,
    ) -> Result<RestoreReport, RestoreFailure> {
        let Some(view) = self.view(id).await else {
            return Err(RestoreFailure::NotFound(id.clone()));
        };
        let limit = restore_limit(&view.quotas);
        let staged = scratch.path().join("data");
        let manifest = {
            let (archive, staged) = (archive.to_owned(), staged.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir(&staged)?;
                backup::unpack(&archive, &staged, limit)
            })
            .await
            .map_err(join_error)??
        };
        if manifest.store_id != id.as_str() && !allow_different_store {
            return Err(RestoreFailure::StoreMismatch {
                backup: manifest.store_id,
                target: id.clone(),
            });
        }

        let lock = transfer_lock(self.settings.data_dir.join("stores").join(id.as_str()));
        let _swapping = lock.write().await;
        let _guard = self.changes.lock().await;
        let entry = self
            .stores
            .read()
            .await
            .get(id)
            .map(|e| (e.store.clone(), e.spec.clone()))
            .ok_or_else(|| RestoreFailure::NotFound(id.clone()))?;
        let (old_store, spec) = entry;
        let plugin = self.plugin(&spec.plugin)?;
        let mut warnings = Vec::new();
        if manifest.plugin.sha256 != plugin.sha256() {
            warnings.push(format!(
                "the backup was taken with plugin {:?} sha256 {}; the store runs {:?} sha256 {}: the plugin's tables may not be what this version expects",
                manifest.plugin.name,
                manifest.plugin.sha256,
                spec.plugin,
                plugin.sha256()
            ));
        }
        // What a restart would open it as (a pause is kept in host.db before it reaches the
        // store), under the change lock that every pause and resume takes.
        let was_paused = self.desired.is_paused(id)?;
        // Another history of the log: followers that name the epoch they read learn that
        // seqs after the backup's last are handed out again.
        let epoch = {
            let (events, previous) = (staged.join("events.db"), old_store.log_epoch().epoch);
            tokio::task::spawn_blocking(move || {
                storehost_store::event_log::begin_epoch(&events, previous)
            })
            .await
            .map_err(join_error)?
            .map_err(|err| ControlError::Store(StoreError::from(err)))?
        };
        tracing::info!(store_id = %id, log_epoch = epoch.epoch, after = epoch.after, "the restored log starts another epoch");
        self.record(
            id,
            "restoring",
            Some(format!("backup of {}", manifest.store_id)),
        );
        old_store.stop().await;

        let data_dir = self.settings.data_dir.clone();
        let swapped = {
            let (data_dir, id, staged) = (data_dir.clone(), id.clone(), staged.clone());
            tokio::task::spawn_blocking(move || backup::swap_in(&data_dir, &id, &staged))
                .await
                .map_err(join_error)?
        };
        let previous = match swapped {
            Ok(previous) => {
                if previous
                    .as_ref()
                    .is_some_and(|previous| previous.starts_with(scratch.path()))
                {
                    // The replaced data could not be archived: it outlives the restore.
                    scratch.keep();
                    warnings.push(format!(
                        "the replaced data could not be moved into the archive (the host log says why); it is kept at {}, and the host's next start archives it",
                        scratch.path().display()
                    ));
                }
                previous
            }
            Err(err) => {
                // Nothing moved: the store goes on with its own data.
                let reopened = self.reopen(id, &spec, plugin.clone(), was_paused).await;
                if let Err(reopen) = &reopened {
                    tracing::error!(store_id = %id, "could not start the store again after a failed restore: {reopen}");
                }
                self.after_failed_restore(id, reopened.is_ok(), &err).await;
                return Err(ControlError::Files(err).into());
            }
        };

        match self.reopen(id, &spec, plugin.clone(), was_paused).await {
            Ok(()) => {}
            Err(err) => {
                // The restored data does not open: put the previous data back.
                tracing::error!(store_id = %id, "the restored data does not open; putting the previous data back: {err}");
                let mut running_again = false;
                if let Some(previous) = &previous {
                    let rolled_back = {
                        let (data_dir, id, previous) =
                            (data_dir.clone(), id.clone(), previous.clone());
                        tokio::task::spawn_blocking(move || roll_back(&data_dir, &id, &previous))
                            .await
                            .map_err(join_error)?
                    };
                    match rolled_back {
                        Ok(()) => match self.reopen(id, &spec, plugin.clone(), was_paused).await {
                            Ok(()) => running_again = true,
                            Err(reopen) => {
                                tracing::error!(store_id = %id, "could not start the store on its previous data: {reopen}");
                            }
                        },
                        Err(io) => {
                            tracing::error!(store_id = %id, previous = %previous.display(), "could not put the previous data back: {io}")
                        }
                    }
                }
                self.after_failed_restore(id, running_again, &err).await;
                return Err(err.into());
            }
        }
        self.record(
            id,
            "restored",
            Some(format!("backup of {}", manifest.store_id)),
        );
        tracing::info!(
            store_id = %id,
            from = %manifest.store_id,
            last_seq = manifest.seq.last,
            cursor = manifest.cursor,
            "store restored from a backup"
        );
        Ok(RestoreReport {
            store_id: id.clone(),
            manifest,
            previous_data: previous.map(|p| p.display().to_string()),
            warnings,
            paused: was_paused,
        })
    }

    /// Records a restore of store `id` that failed with `why` once the store had stopped. Run
    /// again on its own data, the store shows the failure as a `restore_failed` transition;
    /// not running, it becomes a failed store (listed under `failed`, its routes answering 503
    /// `store_failed`, a `PUT` or a restart starting it again) instead of an entry whose every
    /// route answered `store_stopped` until the host restarted.
    async fn after_failed_restore(
        &self,
        id: &StoreId,
        running_again: bool,
        why: &(dyn std::fmt::Display + Sync),
    ) {
        let detail = Some(format!("restore failed: {why}"));
        if running_again {
            self.record(id, "restore_failed", detail);
        } else {
            self.stores.write().await.remove(id);
            self.record(id, "failed", detail);
        }
    }

    /// Opens store `id` on its current files and puts it in place of its entry.
    async fn reopen(
        &self,
        id: &StoreId,
        spec: &crate::config::StoreSpec,
        plugin: std::sync::Arc<storehost_store::StorePlugin>,
        paused: bool,
    ) -> Result<(), ControlError> {
        // Opened paused, not paused once open: its actor starts at once, and would process
        // a waiting event or a due task before a pause sent afterwards reached it.
        let settings = StoreSettings {
            start_paused: paused,
            ..self.store_settings(spec, plugin)
        };
        let (open_id, data_dir, durability) = (
            id.clone(),
            self.settings.data_dir.clone(),
            self.settings.durability,
        );
        let store = tokio::task::spawn_blocking(move || {
            Store::open(open_id, &data_dir, durability, settings)
        })
        .await
        .map_err(join_error)??;
        if let Some(entry) = self.stores.write().await.get_mut(id) {
            entry.store = store;
            entry.since = now_ms();
        }
        Ok(())
    }
}

/// Moves the data that failed to open aside and the kept previous data back in place.
fn roll_back(data_dir: &Path, id: &StoreId, previous: &Path) -> std::io::Result<()> {
    let current = data_dir.join("stores").join(id.as_str());
    storehost_store::dir::path_into_archive(
        &current,
        &data_dir.join("archive"),
        &format!("{id}-failed-restore"),
        now_ms(),
    )?;
    std::fs::rename(previous, current)
}
