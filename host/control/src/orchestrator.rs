//! The one place that turns desired state into running stores.
//!
//! The sources of desired state hold an `Arc<Orchestrator>` and call it directly: the config
//! file and `STORE_IDS` (at start and through the watcher) [`Orchestrator::ensure_running_many`]
//! and [`Orchestrator::remove`]; webhooks and the reconciler [`Orchestrator::start_if_new`]
//! and [`Orchestrator::remove_unowned`]; the admin API [`Orchestrator::edit_own`],
//! [`Orchestrator::remove_unowned`] and [`Orchestrator::set_paused`]; a config reload
//! [`Orchestrator::set_defaults`]. Every change is serialised by one change lock and
//! idempotent, so calling twice or concurrently for the same store is safe; the rest of its
//! methods read (views, sources, failures) or manage plugins, tokens and backups.
//!
//! The seam to several hosts (SPEC §10) is below the orchestrator, not between it and the
//! sources: it keeps desired state only through a [`DesiredState`] and asks a [`Placement`]
//! before every start ([`crate::seam`]; by default `host.db` and one host running every store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use serde::Serialize;
use sha2::Digest as _;
use storehost_runtime::PluginError;
use storehost_store::{
    Durability, Quotas, RetryPolicy, SpareStores, Store, StoreError, StoreId, StorePlugin,
    StoreRuntime, StoreSettings, StoreStatus, dir, open_files, sqlite::now_ms,
};
use tokio::sync::{Mutex, RwLock};

use crate::config::{OwnSettings, StoreSpec};
use crate::registry::Registry;
use crate::seam::{DesiredState, Placed, Placement, Seams};

pub mod backup;

/// Where a store's desired state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreSource {
    /// The config file.
    Config,
    /// The `STORE_IDS` environment variable.
    Env,
    /// The admin API.
    Api,
    /// A provisioning webhook (`POST /webhooks/workspaces`).
    Webhook,
    /// The reconciler, from the authoritative registry.
    Registry,
}

impl StoreSource {
    /// The stable name stored in the host registry.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreSource::Config => "config",
            StoreSource::Env => "env",
            StoreSource::Api => "api",
            StoreSource::Webhook => "webhook",
            StoreSource::Registry => "registry",
        }
    }

    /// Parses a name produced by [`StoreSource::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        [
            StoreSource::Config,
            StoreSource::Env,
            StoreSource::Api,
            StoreSource::Webhook,
            StoreSource::Registry,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Whether the host registry keeps stores of this source across restarts (the config file
    /// and the environment are read again at every start instead).
    fn persisted(self) -> bool {
        matches!(
            self,
            StoreSource::Api | StoreSource::Webhook | StoreSource::Registry
        )
    }

    /// Whether the config file or `STORE_IDS` owns the store (the reconciler and webhooks
    /// leave such stores alone).
    pub fn is_config_owned(self) -> bool {
        matches!(self, StoreSource::Config | StoreSource::Env)
    }

    /// For a config-owned store: why a webhook or the API may not remove it, and where to
    /// remove it instead, naming the config the host runs (`config_file`, or the embedded
    /// default without one). `None` for any other source.
    pub fn removal_refused(self, id: &StoreId, config_file: Option<&Path>) -> Option<String> {
        match (self, config_file) {
            (StoreSource::Config, Some(file)) => Some(format!(
                "store {id} is declared in the config file {} and stays; remove it there to \
                 stop it",
                file.display()
            )),
            (StoreSource::Config, None) => Some(format!(
                "store {id} is declared in the embedded default config (the host was started \
                 without --config) and stays; to stop it, start the host with --config FILE \
                 declaring the stores to run"
            )),
            (StoreSource::Env, _) => Some(format!(
                "store {id} is named in the STORE_IDS environment variable and stays; remove it \
                 there and restart the host to stop it"
            )),
            _ => None,
        }
    }

    /// For a config-owned store: why the API may not change its plugin, quotas or config (the
    /// config would undo the change at the next start), naming the config the host runs
    /// (`config_file`, or the embedded default without one). `None` for any other source.
    pub fn change_refused(self, id: &StoreId, config_file: Option<&Path>) -> Option<String> {
        let undone = "a change through the API would be undone at the next start";
        match (self, config_file) {
            (StoreSource::Config, Some(file)) => Some(format!(
                "store {id} is declared in the config file {}, which decides its plugin, quotas \
                 and config; change them there; {undone}",
                file.display()
            )),
            (StoreSource::Config, None) => Some(format!(
                "store {id} is declared in the embedded default config (the host was started \
                 without --config), which decides its plugin, quotas and config; to change them, \
                 start the host with --config FILE declaring the store; {undone}"
            )),
            (StoreSource::Env, Some(file)) => Some(format!(
                "store {id} is named in the STORE_IDS environment variable and runs the \
                 [defaults] of the config file {}, which decide its plugin, quotas and config; \
                 change them there; {undone}",
                file.display()
            )),
            (StoreSource::Env, None) => Some(format!(
                "store {id} is named in the STORE_IDS environment variable and runs the \
                 [defaults] of the embedded default config (the host was started without \
                 --config), which decide its plugin, quotas and config; to change them, start \
                 the host with --config FILE; {undone}"
            )),
            _ => None,
        }
    }
}

/// What `ensure_running` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioned {
    /// The store did not run; now it does.
    Created,
    /// It ran with other settings; the new ones apply after its in-flight invocation.
    Updated,
    /// It already ran exactly so.
    Unchanged,
}

/// Why the control plane refused or failed a change.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The spec names a plugin the host does not have.
    #[error("unknown plugin {name:?}; known plugins: {known}. Deploy it first or fix the name")]
    UnknownPlugin {
        /// The name asked for.
        name: String,
        /// The names the host has, comma-separated.
        known: String,
    },
    /// The host already runs `max_stores` stores.
    #[error(
        "this host already runs its maximum of {max} stores (max_stores / MAX_INSTANCES_PER_SERVER); remove a store, or raise the limit and restart the host (the sandbox pool is sized for it at start, so a live edit of max_stores waits for the restart)"
    )]
    AtCapacity {
        /// The limit.
        max: usize,
    },
    /// No such store.
    #[error("store {0} does not exist on this host")]
    NotFound(StoreId),
    /// The `memory` quota asked for is above what the sandbox pool was sized for at start.
    #[error(
        "memory quota {asked} bytes is above this host's sandbox memory ceiling of {ceiling} bytes, which is fixed when the host starts (the largest memory quota in its config or among its stores added through the API, at least 256 MiB); ask for at most {ceiling}, or name the larger quota in the config and restart"
    )]
    MemoryAboveCeiling {
        /// The quota asked for.
        asked: u64,
        /// The pool's per-sandbox maximum.
        ceiling: u64,
    },
    /// `fuel_per_call` asked for on a host whose engine does not meter fuel.
    #[error(
        "fuel_per_call {asked} cannot be enforced: this host's engine does not meter fuel, which is decided when the host starts (it meters fuel when its config's defaults, a store in its config or a store added through the API before the start set fuel_per_call); leave fuel_per_call out and bound the store with cpu_ms_per_call, or set fuel_per_call in the config and restart"
    )]
    FuelNotMetered {
        /// The quota asked for.
        asked: u64,
    },
    /// The plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The store failed to open or apply the change.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The host is shutting down: no store starts or changes any more.
    #[error(
        "the host is shutting down and starts or changes no more stores; retry against another host or after it restarts"
    )]
    ShuttingDown,
    /// The host registry database failed.
    #[error("host registry error: {0}")]
    Registry(#[from] rusqlite::Error),
    /// Moving or deleting the store's files failed.
    #[error("could not archive or delete the store's files: {0}")]
    Files(#[from] std::io::Error),
    /// The config file or `STORE_IDS` declares the store: only it removes the store.
    #[error("{0}")]
    ConfigOwned(String),
    /// The [`Placement`] runs the store on another host: this one does not start it.
    #[error(
        "store {id} is placed on {}, not on this host, which does not start it; send the request to the host that runs it",
        host.as_deref().map_or_else(|| "another host".to_owned(), |host| format!("host {host:?}"))
    )]
    PlacedElsewhere {
        /// The store.
        id: StoreId,
        /// The host that runs it, when the placement knows which.
        host: Option<String>,
    },
}

impl ControlError {
    /// Whether the change failed because the filesystem of the data directory is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            ControlError::Store(err) => err.is_disk_full(),
            ControlError::Registry(err) => storehost_store::is_disk_full(err),
            ControlError::Files(err) => storehost_store::is_storage_full(err),
            _ => false,
        }
    }

    /// Whether the host had as many files open as it may (see
    /// [`StoreError::is_out_of_files`]).
    pub fn is_out_of_files(&self) -> bool {
        match self {
            ControlError::Store(err) => err.is_out_of_files(),
            ControlError::Files(err) => storehost_store::is_out_of_files(err),
            ControlError::Registry(err) => storehost_store::cannot_open_for_want_of_files(err),
            _ => false,
        }
    }
}

/// New stores of one [`Orchestrator::ensure_running_many`] call opened at once: opening is
/// mostly file creation, which overlaps well (measured here, 1,000 stores' files: 1.7–5.5 s one
/// after another, 1.0–1.3 s two at a time, 0.9–2.2 s four or eight at a time).
const PARALLEL_OPENS: usize = 4;

/// Stores one [`Orchestrator::ensure_running_many`] handles per hold of the change lock.
const BATCH: usize = 32;

/// What [`Orchestrator::change_or_admit`] decided.
enum Admission {
    /// Nothing more to do: the store was left as it was or changed live.
    Done(Provisioned),
    /// A new store, to open with these settings.
    Start(Box<StoreSettings>),
}

/// Host-wide settings every store shares.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// Where stores keep their files.
    pub data_dir: PathBuf,
    /// Commit durability.
    pub durability: Durability,
    /// Retry policy of failing events.
    pub retry: RetryPolicy,
    /// Most stores this host runs.
    pub max_stores: usize,
    /// The spec of a store created without one (default plugin and quotas, no config), at
    /// start; a config reload changes it ([`Orchestrator::set_defaults`]).
    pub defaults: StoreSpec,
    /// Where plugins' `llm` calls go (`None`: they fail as `not-configured`).
    pub llm: Option<std::sync::Arc<dyn storehost_store::LlmBackend>>,
    /// Catch-up window of scheduled tasks after downtime.
    pub task_catch_up: std::time::Duration,
    /// A store idle this long hibernates (`None`: never).
    pub idle_timeout: Option<std::time::Duration>,
    /// A hibernated store idle this much longer closes its files.
    pub close_files_after: std::time::Duration,
    /// How many new-store directories are kept ready in `stores/.spare/` (0: none).
    pub spare_stores: usize,
    /// The config file the host was started with (`None`: the embedded default), named when
    /// a change to a store it declares is refused.
    pub config_file: Option<PathBuf>,
}

/// A running store with the spec it runs under.
#[derive(Debug, Clone)]
struct Entry {
    store: Store,
    spec: StoreSpec,
    source: StoreSource,
    since: i64,
}

/// What the API shows about one store.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreView {
    /// The store's id.
    pub id: StoreId,
    /// Where its desired state came from.
    pub source: StoreSource,
    /// The plugin it runs.
    pub plugin: PluginRef,
    /// Its quotas.
    pub quotas: Quotas,
    /// Its config key/values.
    pub config: BTreeMap<String, String>,
    /// When it started on this host (ms since the Unix epoch).
    pub running_since: i64,
    /// The history its event log holds (`logEpoch`, `logEpochAfter`): a restore starts
    /// another, in which seqs after `logEpochAfter` are handed out again.
    #[serde(rename = "logEpoch")]
    pub log_epoch: i64,
    /// The seq the log's history began after (0, or the restored backup's last seq).
    #[serde(rename = "logEpochAfter")]
    pub log_epoch_after: u64,
    /// Its processing status.
    #[serde(flatten)]
    pub status: StoreStatus,
    /// Its last lifecycle transitions (control plane), oldest first.
    pub transitions: Vec<Transition>,
}

/// A plugin by name and content hash.
#[derive(Debug, Clone, Serialize)]
pub struct PluginRef {
    /// Its name.
    pub name: String,
    /// SHA-256 of its component bytes.
    pub sha256: String,
}

/// Keeps the running stores equal to the desired ones.
pub struct Orchestrator {
    runtime: Arc<StoreRuntime>,
    settings: HostSettings,
    /// What a store added at run time takes for what it does not set itself.
    defaults: std::sync::RwLock<StoreSpec>,
    plugins: std::sync::RwLock<BTreeMap<String, Arc<StorePlugin>>>,
    stores: RwLock<BTreeMap<StoreId, Entry>>,
    changes: Mutex<()>,
    /// Set once the host shuts down: no store starts after it (see [`Orchestrator::stop_starting`]).
    stopping: std::sync::atomic::AtomicBool,
    /// This host's `host.db`: tokens, plugin records, webhook answers, orphan records.
    registry: Arc<Registry>,
    /// Where desired state is kept (`host.db` by default).
    desired: Arc<dyn DesiredState>,
    /// Whether this host runs a store; asked before every start.
    placement: Arc<dyn Placement>,
    spares: Arc<SpareStores>,
    activity: std::sync::Mutex<ProvisioningActivity>,
    history: std::sync::Mutex<BTreeMap<StoreId, std::collections::VecDeque<Transition>>>,
    /// Stores whose removal desired state records as under way
    /// ([`DesiredState::begin_removal`]) and that are not forgotten yet: a start of one of
    /// them cancels it.
    removing: std::sync::Mutex<std::collections::BTreeSet<StoreId>>,
}

/// How many lifecycle transitions are kept per store.
pub const TRANSITIONS_KEPT: usize = 20;

/// One lifecycle transition of a store, as the control plane saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// `provisioning`, `running`, `updated`, `paused`, `resumed`, `stopping`, `released`
    /// (the config dropped it) or `failed`.
    pub state: &'static str,
    /// When (ms since the Unix epoch).
    pub at: i64,
    /// The source for `provisioning`, the error for `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Transition {
    /// Whether this transition says who owns the store: its owner asked for its start
    /// (`provisioning`), or the config let it go (`released`).
    fn names_owner(&self) -> bool {
        self.state == "provisioning" || self.state == "released"
    }
}

/// Counts of stores started and removed since the host started (`GET /stores`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningActivity {
    /// When a store last started (ms since the Unix epoch).
    pub last_provisioned_at: Option<i64>,
    /// When a store was last removed (ms since the Unix epoch).
    pub last_deprovisioned_at: Option<i64>,
    /// Stores started since the host started.
    pub total_provisioned: u64,
    /// Stores removed since the host started.
    pub total_deprovisioned: u64,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("settings", &self.settings)
            .field("placement", &self.placement)
            .finish_non_exhaustive()
    }
}

impl Orchestrator {
    /// An orchestrator running no stores yet, with its registry in `DATA_DIR/host.db`, which
    /// keeps desired state too, on a host that runs every store ([`Seams::default`]).
    pub fn new(runtime: Arc<StoreRuntime>, settings: HostSettings) -> Result<Self, ControlError> {
        Self::with_seams(runtime, settings, Seams::default())
    }

    /// [`Orchestrator::new`] keeping desired state in `seams.desired_state` (when set) and
    /// starting only the stores `seams.placement` places here.
    pub fn with_seams(
        runtime: Arc<StoreRuntime>,
        settings: HostSettings,
        seams: Seams,
    ) -> Result<Self, ControlError> {
        std::fs::create_dir_all(&settings.data_dir)?;
        let files = open_files::wanted(settings.max_stores, settings.spare_stores);
        match open_files::reserve(files, std::fs::File::open(&settings.data_dir)?) {
            Ok(reserved) => tracing::debug!(reserved, "grew the file table"),
            Err(err) => tracing::warn!(
                "could not grow the file table to {files} files (opening files may then wait while it grows): {err}"
            ),
        }
        let registry = Arc::new(Registry::open(&settings.data_dir.join("host.db"))?);
        let desired = seams
            .desired_state
            .unwrap_or_else(|| registry.clone() as Arc<dyn DesiredState>);
        let interrupted = storehost_store::backup::recover_interrupted(&settings.data_dir)?;
        if interrupted.backups_removed > 0 {
            tracing::warn!(
                count = interrupted.backups_removed,
                "deleted the scratch copies of backups that the last run did not finish"
            );
        }
        for kept in &interrupted.restores_archived {
            tracing::warn!(
                path = %kept.display(),
                "a restore did not finish in the last run; its scratch directory is kept there"
            );
        }
        delete_unfinished_uploads(&settings.data_dir.join("plugins"));
        let spares = SpareStores::open(
            &settings.data_dir,
            settings.durability,
            settings.spare_stores,
        )?;
        spares.refill();
        Ok(Self {
            runtime,
            defaults: std::sync::RwLock::new(settings.defaults.clone()),
            settings,
            plugins: std::sync::RwLock::default(),
            stores: RwLock::default(),
            changes: Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            registry,
            desired,
            placement: seams.placement,
            spares,
            activity: std::sync::Mutex::default(),
            history: std::sync::Mutex::default(),
            removing: std::sync::Mutex::default(),
        })
    }

    /// The host-wide settings.
    pub fn settings(&self) -> &HostSettings {
        &self.settings
    }

    /// The spec a store added at run time takes for what it does not set itself: the
    /// config's `[defaults]` (and `LLM_MAX_ITERATIONS`) as last loaded.
    pub fn defaults(&self) -> StoreSpec {
        self.defaults
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The spec of a store added at run time that set `own` itself.
    pub fn spec_with(&self, own: OwnSettings) -> StoreSpec {
        own.over(&self.defaults())
    }

    /// New `[defaults]` (a config reload): every store added at run time takes them for what
    /// it did not set itself, live. Answers the stores it changed or failed to.
    ///
    /// Each store's spec is worked out under the change lock, from its own settings as they
    /// are then, so an API change racing the reload is neither lost nor undone.
    pub async fn set_defaults(
        &self,
        defaults: StoreSpec,
    ) -> Vec<(StoreId, Result<Provisioned, ControlError>)> {
        // Swapped and listed under the lock: a store started after this takes the new ones.
        let (previous, ids) = {
            let _guard = self.changes.lock().await;
            let previous = std::mem::replace(
                &mut *self
                    .defaults
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                defaults,
            );
            let ids: Vec<StoreId> = self
                .stores
                .read()
                .await
                .iter()
                .filter(|(_, entry)| !entry.source.is_config_owned())
                .map(|(id, _)| id.clone())
                .collect();
            (previous, ids)
        };
        // Every store is looked at, also when the defaults did not change: one an earlier
        // reload could not change (a quota above the ceiling) is tried again.
        let mut answers = Vec::new();
        for batch in ids.chunks(BATCH) {
            let _guard = self.changes.lock().await;
            let defaults = self.defaults();
            for id in batch {
                let Some(entry) = self.stores.read().await.get(id).cloned() else {
                    continue;
                };
                if entry.source.is_config_owned() {
                    continue;
                }
                let spec = OwnSettings::of(&entry.spec, &previous).over(&defaults);
                if spec == entry.spec {
                    continue;
                }
                let changed = match self.plugin_within_limits(&spec) {
                    Ok(plugin) => {
                        self.change_or_admit(id, &spec, entry.source, plugin, 0)
                            .await
                    }
                    Err(err) => Err(err),
                };
                // It runs (read above, under the lock), so it is changed, never started.
                let changed = changed.and_then(|admission| match admission {
                    Admission::Done(done) => Ok(done),
                    Admission::Start(_) => Err(StoreError::Internal(
                        "the store stopped while the new defaults applied".into(),
                    )
                    .into()),
                });
                answers.push((id.clone(), changed));
            }
            drop(_guard);
            tokio::task::yield_now().await;
        }
        answers
    }

    /// The runtime every store runs on.
    pub fn runtime(&self) -> &Arc<StoreRuntime> {
        &self.runtime
    }

    /// Compiles `wasm` as plugin `name` and switches every store using that name to it after
    /// its in-flight invocation.
    pub async fn deploy_plugin(
        &self,
        name: &str,
        wasm: Vec<u8>,
    ) -> Result<Arc<StorePlugin>, ControlError> {
        let plugin = self.compile_plugin(wasm).await?;
        self.switch_to(name, plugin).await
    }

    async fn compile_plugin(&self, wasm: Vec<u8>) -> Result<Arc<StorePlugin>, ControlError> {
        let runtime = self.runtime.clone();
        let plugin = tokio::task::spawn_blocking(move || StorePlugin::load(&runtime, &wasm))
            .await
            .map_err(|err| {
                StoreError::Internal(format!("plugin compilation task failed: {err}"))
            })??;
        Ok(plugin)
    }

    /// Makes `plugin` the one named `name`, switching every store using that name to it.
    async fn switch_to(
        &self,
        name: &str,
        plugin: Arc<StorePlugin>,
    ) -> Result<Arc<StorePlugin>, ControlError> {
        let _guard = self.changes.lock().await;
        self.plugins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), plugin.clone());
        let stores = self.stores.read().await;
        for entry in stores.values().filter(|e| e.spec.plugin == name) {
            entry
                .store
                .update(self.store_settings(&entry.spec, plugin.clone()))
                .await?;
        }
        Ok(plugin)
    }

    /// Like [`Orchestrator::deploy_plugin`], and keeps the bytes content-addressed in
    /// `DATA_DIR/plugins/<sha256>.wasm` so a restart deploys the same version again. The
    /// version is saved and recorded before any store switches to it: a failure to save it
    /// leaves every store on the version it ran.
    pub async fn deploy_plugin_persisted(
        &self,
        name: &str,
        wasm: Vec<u8>,
    ) -> Result<Arc<StorePlugin>, ControlError> {
        let dir = self.settings.data_dir.join("plugins");
        let plugin = self.compile_plugin(wasm.clone()).await?;
        let sha256 = plugin.sha256().to_owned();
        let target = dir.join(format!("{sha256}.wasm"));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if target.exists() {
                return Ok(());
            }
            std::fs::create_dir_all(&dir)?;
            // Through a temporary file of this upload's own: two uploads of the same bytes at
            // once wrote one together, and the second's rename found it gone (a 500).
            storehost_runtime::write_atomically(&target, &wasm)
        })
        .await
        .map_err(|err| StoreError::Internal(format!("plugin write task failed: {err}")))??;
        self.registry.put_plugin(name, &sha256)?;
        self.switch_to(name, plugin).await
    }

    /// Deploys config plugin `name` from its file's `bytes`, unless a version uploaded through
    /// the API under that name is newer: the latest of the two runs. The upload is newer when
    /// the file has not changed since it was last deployed from it (this host records that
    /// hash), or when no such record exists yet and the config has named the plugin all along
    /// (`newly_named` false). Deploying the file forgets the upload, so a restart does not bring
    /// it back. Answers the plugin when the file's version was deployed.
    pub async fn deploy_plugin_file(
        &self,
        name: &str,
        bytes: Vec<u8>,
        newly_named: bool,
    ) -> Result<Option<Arc<StorePlugin>>, ControlError> {
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let last_from_file = self.registry.plugin_file(name)?;
        let uploaded = self.registry.uploaded_plugin(name)?;
        let file_unchanged = match &last_from_file {
            Some(last) => *last == sha256,
            None => !newly_named,
        };
        let upload_newer = uploaded.as_ref().is_some_and(|u| *u != sha256) && file_unchanged;
        let running = self.plugins().get(name).map(|p| p.sha256().to_owned());
        if upload_newer && running.is_some() {
            self.registry.put_plugin_file(name, &sha256)?;
            return Ok(None);
        }
        // With an upload newer but nothing under the name yet (at start), the file's version
        // runs until the upload is restored: a lost upload leaves the stores a plugin.
        let plugin = if running.as_deref() == Some(sha256.as_str()) {
            None
        } else {
            Some(self.deploy_plugin(name, bytes).await?)
        };
        if !upload_newer && uploaded.is_some() {
            tracing::info!(plugin = %name, sha256, "the plugin's file changed: its version replaces the one uploaded through the API");
            self.registry.forget_uploaded_plugin(name)?;
        }
        self.registry.put_plugin_file(name, &sha256)?;
        Ok(plugin)
    }

    /// Deploys again every plugin uploaded through the API before a restart (their bytes are
    /// checked against their hash). Returns how many.
    pub async fn restore_plugins(&self) -> Result<usize, ControlError> {
        let mut restored = 0;
        for (name, sha256) in self.registry.plugins()? {
            if self.is_stopping() {
                // The host shuts down: no store will run them.
                break;
            }
            // Already running this version (a second call reads and hashes nothing).
            if self
                .plugins()
                .get(&name)
                .is_some_and(|p| p.sha256() == sha256)
            {
                restored += 1;
                continue;
            }
            let path = self
                .settings
                .data_dir
                .join("plugins")
                .join(format!("{sha256}.wasm"));
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(err) => {
                    tracing::error!(plugin = %name, path = %path.display(), "an uploaded plugin's file is missing; upload it again: {err}");
                    continue;
                }
            };
            if hex::encode(sha2::Sha256::digest(&bytes)) != sha256 {
                tracing::error!(plugin = %name, path = %path.display(), "an uploaded plugin's file does not match its hash; upload it again");
                continue;
            }
            match self.deploy_plugin(&name, bytes).await {
                Ok(_) => restored += 1,
                Err(err) => {
                    tracing::error!(plugin = %name, "an uploaded plugin could not be loaded: {err}")
                }
            }
        }
        Ok(restored)
    }

    /// The plugins this host has, by name.
    pub fn plugins(&self) -> BTreeMap<String, Arc<StorePlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn plugin(&self, name: &str) -> Result<Arc<StorePlugin>, ControlError> {
        let plugins = self
            .plugins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        plugins
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownPlugin {
                name: name.to_owned(),
                known: plugins.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    fn store_settings(&self, spec: &StoreSpec, plugin: Arc<StorePlugin>) -> StoreSettings {
        StoreSettings {
            plugin_name: spec.plugin.clone(),
            plugin,
            quotas: spec.quotas.clone(),
            config: spec.config.clone(),
            retry: self.settings.retry.clone(),
            llm: self.settings.llm.clone(),
            task_catch_up: self.settings.task_catch_up,
            idle_timeout: self.settings.idle_timeout,
            close_files_after: self.settings.close_files_after,
            start_paused: false,
        }
    }

    /// Makes store `id` run under `spec`: starts it, changes it live, or leaves it as it is.
    pub async fn ensure_running(
        &self,
        id: &StoreId,
        spec: StoreSpec,
        source: StoreSource,
    ) -> Result<Provisioned, ControlError> {
        only_answer(
            self.ensure_running_many(vec![(id.clone(), spec, source)])
                .await,
        )
    }

    /// [`Orchestrator::ensure_running`] for many stores at once (a config edit naming
    /// thousands): same answers, in order, but new stores open [`PARALLEL_OPENS`] at a time,
    /// and every [`BATCH`] stores the change lock is let go so webhooks and API changes get in.
    pub async fn ensure_running_many(
        &self,
        wanted: Vec<(StoreId, StoreSpec, StoreSource)>,
    ) -> Vec<(StoreId, Result<Provisioned, ControlError>)> {
        self.in_batches(wanted, false).await
    }

    /// Starts store `id` for the workspace registry or a webhook (`source`) when it does not
    /// run: as a new store on the defaults, or, when host.db keeps it (its start failed), as
    /// its owner had it, owner and settings. Decided under the change lock, so a store that
    /// started meanwhile is left alone: `Unchanged` when one runs under `id`, whoever runs
    /// it; [`ControlError::ConfigOwned`], saying why it does not run, when the config file or
    /// `STORE_IDS` declares it (its start failed; the config starts it again). Before, such a
    /// call changed a running store back to the defaults and took a failed one over (its
    /// settings, and the config's claim, lost).
    pub async fn start_if_new(
        &self,
        id: &StoreId,
        source: StoreSource,
    ) -> Result<Provisioned, ControlError> {
        let spec = self.spec_with(OwnSettings::default());
        only_answer(
            self.in_batches(vec![(id.clone(), spec, source)], true)
                .await,
        )
    }

    /// The body of [`Orchestrator::ensure_running_many`] and [`Orchestrator::start_if_new`].
    async fn in_batches(
        &self,
        wanted: Vec<(StoreId, StoreSpec, StoreSource)>,
        only_new: bool,
    ) -> Vec<(StoreId, Result<Provisioned, ControlError>)> {
        let mut answers = Vec::with_capacity(wanted.len());
        let mut wanted = wanted.into_iter().peekable();
        while wanted.peek().is_some() {
            let batch: Vec<_> = wanted.by_ref().take(BATCH).collect();
            // `changes` serialises every change; the `stores` lock is held only to read or
            // insert, so the API keeps answering while stores open.
            let _guard = self.changes.lock().await;
            if self.is_stopping() {
                // The host shuts down: the batch that was opening has finished, and what is
                // left is not started (a host starting thousands of stores stops in moments).
                answers.extend(
                    batch
                        .into_iter()
                        .chain(wanted)
                        .map(|(id, _, _)| (id, Err(ControlError::ShuttingDown))),
                );
                break;
            }
            answers.extend(self.apply_locked(batch, only_new).await);
            drop(_guard);
            tokio::task::yield_now().await;
        }
        answers
    }

    /// The body of [`Orchestrator::ensure_running_many`] for one batch, with the change lock
    /// held by the caller.
    async fn apply_locked(
        &self,
        batch: Vec<(StoreId, StoreSpec, StoreSource)>,
        only_new: bool,
    ) -> Vec<(StoreId, Result<Provisioned, ControlError>)> {
        let mut answered = Vec::with_capacity(batch.len());
        let mut starting = Vec::new();
        for (index, (id, spec, source)) in batch.into_iter().enumerate() {
            let (spec, source) = if only_new {
                match self.start_plan(&id, spec, source).await {
                    Ok(Some(planned)) => planned,
                    Ok(None) => {
                        answered.push((index, id, Ok(Provisioned::Unchanged)));
                        continue;
                    }
                    Err(err) => {
                        answered.push((index, id, Err(err)));
                        continue;
                    }
                }
            } else {
                (spec, source)
            };
            // A run-time store's spec follows the defaults as they are now, under the
            // lock, whatever they were when its caller worked it out.
            let spec = match spec.own {
                Some(own) => own.over(&self.defaults()),
                None => spec,
            };
            let admitted = match self.plugin_within_limits(&spec) {
                Ok(plugin) => {
                    self.change_or_admit(&id, &spec, source, plugin, starting.len())
                        .await
                }
                Err(err) => Err(err),
            };
            match admitted {
                Ok(Admission::Start(settings)) => {
                    starting.push((index, id, spec, source, settings));
                }
                Ok(Admission::Done(done)) => answered.push((index, id, Ok(done))),
                Err(err) => {
                    // Another host's store is not this host's failure.
                    let placed_elsewhere = matches!(err, ControlError::PlacedElsewhere { .. });
                    if source.is_config_owned()
                        && !placed_elsewhere
                        && !self.stores.read().await.contains_key(&id)
                    {
                        // A store the config declares that cannot start (its plugin, its
                        // quotas): a failed store of the config's, shown with why.
                        self.record(&id, "provisioning", Some(source.as_str().to_owned()));
                        self.record(&id, "failed", Some(err.to_string()));
                    }
                    answered.push((index, id, Err(err)));
                }
            }
        }
        // Collected first: a lazy `map` here makes the future not `Send` (rust#102211).
        let opens: Vec<_> = starting
            .iter()
            .map(|(_, id, _, _, settings)| self.open(id, (**settings).clone()))
            .collect();
        let opened: Vec<_> = futures::stream::iter(opens)
            .buffered(PARALLEL_OPENS)
            .collect()
            .await;
        self.spares.refill();
        for ((index, id, spec, source, _), opened) in starting.into_iter().zip(opened) {
            let answer = self.finish_start(&id, spec, source, opened).await;
            answered.push((index, id, answer));
        }
        answered.sort_by_key(|(index, _, _)| *index);
        answered
            .into_iter()
            .map(|(_, id, answer)| (id, answer))
            .collect()
    }

    /// Edits what store `id` sets itself and applies it, as one change under the change lock,
    /// so two edits racing each other (two `PUT`s) both take effect. `edit` gets the store's
    /// own settings and owner (a running store's; else, for one whose start or restore
    /// failed, its owner and what host.db keeps, or no settings of its own when the config
    /// declares it; `None` for a new store) and the defaults, and answers the new own
    /// settings and owner, or refuses.
    pub async fn edit_own<E: From<ControlError>>(
        &self,
        id: &StoreId,
        edit: impl FnOnce(
            Option<(OwnSettings, StoreSource)>,
            &StoreSpec,
        ) -> Result<(OwnSettings, StoreSource), E>,
    ) -> Result<Provisioned, E> {
        let _guard = self.changes.lock().await;
        if self.is_stopping() {
            return Err(ControlError::ShuttingDown.into());
        }
        let defaults = self.defaults();
        let current = match self.spec(id).await {
            Some((spec, source)) => Some((OwnSettings::of(&spec, &defaults), source)),
            None => match self.failed_start(id).and_then(|(_, source)| source) {
                // A store the config declares is the config's to start again.
                Some(source) if source.is_config_owned() => Some((OwnSettings::default(), source)),
                _ => self
                    .desired
                    .get(id)?
                    .map(|(source, spec)| (OwnSettings::of(&spec, &defaults), source)),
            },
        };
        let (own, source) = edit(current, &defaults)?;
        let spec = own.over(&defaults);
        only_answer(
            self.apply_locked(vec![(id.clone(), spec, source)], false)
                .await,
        )
        .map_err(E::from)
    }

    /// Under the change lock, for [`Orchestrator::start_if_new`]: what to start store `id`
    /// with, or `None` to leave it as it is.
    async fn start_plan(
        &self,
        id: &StoreId,
        spec: StoreSpec,
        source: StoreSource,
    ) -> Result<Option<(StoreSpec, StoreSource)>, ControlError> {
        if self.stores.read().await.contains_key(id) {
            return Ok(None);
        }
        if let Some((failure, Some(owner))) = self.failed_start(id)
            && let Some(refusal) = owner.removal_refused(id, self.settings.config_file.as_deref())
        {
            // Not started: the config is the one to start it again.
            let why = failure.detail.unwrap_or_default();
            return Err(ControlError::ConfigOwned(format!(
                "{refusal}; its start failed ({why}), and the host tries again at the config's next change or its next start"
            )));
        }
        Ok(match self.desired.get(id)? {
            Some((owner, kept)) => {
                let own = OwnSettings::of(&kept, &self.defaults());
                Some((self.spec_with(own), owner))
            }
            None => Some((spec, source)),
        })
    }

    /// The plugin `spec` names, with its quotas checked against what the engine fixed at
    /// start: the sandbox memory ceiling and whether fuel is metered.
    fn plugin_within_limits(&self, spec: &StoreSpec) -> Result<Arc<StorePlugin>, ControlError> {
        let plugin = self.plugin(&spec.plugin)?;
        let options = self.runtime.options();
        if spec.quotas.memory > options.max_memory_bytes {
            return Err(ControlError::MemoryAboveCeiling {
                asked: spec.quotas.memory,
                ceiling: options.max_memory_bytes,
            });
        }
        if let (Some(asked), false) = (spec.quotas.fuel_per_call, options.fuel) {
            return Err(ControlError::FuelNotMetered { asked });
        }
        Ok(plugin)
    }

    /// Under the change lock: leaves store `id` as it is or applies `spec` to it live if it
    /// runs, or else admits it as a new store (the `admitted` others of this batch not yet
    /// running count against `max_stores`) with the settings to open it with.
    async fn change_or_admit(
        &self,
        id: &StoreId,
        spec: &StoreSpec,
        source: StoreSource,
        plugin: Arc<StorePlugin>,
        admitted: usize,
    ) -> Result<Admission, ControlError> {
        let existing = self
            .stores
            .read()
            .await
            .get(id)
            .map(|e| (e.store.clone(), e.spec.clone(), e.source));
        if let Some((store, current, current_source)) = existing {
            // The config file or STORE_IDS declaring a store the API, a webhook or the
            // reconciler started takes it over: from then on only the config changes or
            // removes it, and host.db no longer restores the old owner's spec at a start.
            let taken_over = source.is_config_owned() && !current_source.is_config_owned();
            if current == *spec && !taken_over {
                return Ok(Admission::Done(Provisioned::Unchanged));
            }
            // What the store runs changed (not only what it set itself).
            if (&current.plugin, &current.quotas, &current.config)
                != (&spec.plugin, &spec.quotas, &spec.config)
            {
                store.update(self.store_settings(spec, plugin)).await?;
            }
            let owner = if taken_over {
                self.desired.forget_spec(id)?;
                self.desired.started_by_config(id)?;
                tracing::info!(store_id = %id, from = current_source.as_str(), to = source.as_str(), "the config now declares the store: it owns it");
                source
            } else {
                current_source
            };
            if owner.persisted() {
                self.desired.put(id, owner, spec)?;
            }
            if let Some(entry) = self.stores.write().await.get_mut(id) {
                entry.spec = spec.clone();
                entry.source = owner;
            }
            self.record(id, "updated", taken_over.then(|| owner.as_str().to_owned()));
            tracing::info!(store_id = %id, "store settings updated");
            return Ok(Admission::Done(Provisioned::Updated));
        }
        // Every start comes through here (new stores from any source, those restored at
        // start-up, failed ones started again): another host's store is not started here.
        if let Placed::Elsewhere { host } = self.placement.place(id) {
            return Err(ControlError::PlacedElsewhere {
                id: id.clone(),
                host,
            });
        }
        if self.stores.read().await.len() + admitted >= self.settings.max_stores {
            return Err(ControlError::AtCapacity {
                max: self.settings.max_stores,
            });
        }
        if self.removing().contains(id) {
            // A store whose removal failed, started again: its removal is off.
            self.desired.cancel_removal(id)?;
            self.removing().remove(id);
        }
        self.record(id, "provisioning", Some(source.as_str().to_owned()));
        let mut settings = self.store_settings(spec, plugin);
        settings.start_paused = self.desired.is_paused(id)?;
        Ok(Admission::Start(Box::new(settings)))
    }

    /// Opens store `id`'s files and starts its actor (on a blocking thread: SQLite opens).
    async fn open(&self, id: &StoreId, settings: StoreSettings) -> Result<Store, StoreError> {
        let (open_id, data_dir, durability, spares) = (
            id.clone(),
            self.settings.data_dir.clone(),
            self.settings.durability,
            self.spares.clone(),
        );
        tokio::task::spawn_blocking(move || {
            Store::open_with_spares(open_id, &data_dir, durability, settings, Some(&spares))
        })
        .await
        .map_err(|err| StoreError::Internal(format!("store open task failed: {err}")))
        .and_then(|opened| opened)
    }

    /// Under the change lock: records a newly opened store (in the registry when its source
    /// persists) and makes it visible, or records why it failed.
    async fn finish_start(
        &self,
        id: &StoreId,
        spec: StoreSpec,
        source: StoreSource,
        opened: Result<Store, StoreError>,
    ) -> Result<Provisioned, ControlError> {
        let store = match opened {
            Ok(store) => store,
            Err(err) => {
                self.record(id, "failed", Some(err.to_string()));
                return Err(err.into());
            }
        };
        let recorded = if source.persisted() {
            self.desired.put(id, source, &spec)
        } else {
            self.desired.started_by_config(id)
        };
        if let Err(err) = recorded {
            store.stop().await;
            self.record(id, "failed", Some(err.to_string()));
            return Err(err);
        }
        self.stores.write().await.insert(
            id.clone(),
            Entry {
                store,
                spec,
                source,
                since: now_ms(),
            },
        );
        self.record(id, "running", None);
        tracing::info!(store_id = %id, source = source.as_str(), "store started");
        {
            let mut activity = self.activity();
            activity.total_provisioned += 1;
            activity.last_provisioned_at = Some(now_ms());
        }
        Ok(Provisioned::Created)
    }

    /// Records a lifecycle transition of store `id` (the last [`TRANSITIONS_KEPT`] are kept).
    fn record(&self, id: &StoreId, state: &'static str, detail: Option<String>) {
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let transitions = history.entry(id.clone()).or_default();
        if transitions.len() == TRANSITIONS_KEPT {
            // The latest owner marker stays: it says who owns a store whose start fails.
            let owner = transitions.iter().rposition(Transition::names_owner);
            let oldest_other = (0..transitions.len())
                .find(|index| Some(*index) != owner)
                .unwrap_or(0);
            transitions.remove(oldest_other);
        }
        transitions.push_back(Transition {
            state,
            at: now_ms(),
            detail,
        });
    }

    /// The recorded lifecycle transitions of store `id`, oldest first.
    pub fn transitions(&self, id: &StoreId) -> Vec<Transition> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Stores whose last start failed (they do not run), with the failure.
    pub fn failed(&self) -> BTreeMap<StoreId, Transition> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(|(id, t)| {
                t.back()
                    .filter(|last| last.state == "failed")
                    .map(|last| (id.clone(), last.clone()))
            })
            .collect()
    }

    /// Whether the store's last start failed and the config (or `STORE_IDS`) asked for it.
    fn config_start_failed(&self, id: &StoreId) -> bool {
        self.failed_start(id)
            .and_then(|(_, owner)| owner)
            .is_some_and(StoreSource::is_config_owned)
    }

    /// A store whose last start failed (it does not run): the failure, and the source that
    /// asked for it.
    pub fn failed_start(&self, id: &StoreId) -> Option<(Transition, Option<StoreSource>)> {
        let history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let transitions = history.get(id)?;
        let failure = transitions.back().filter(|last| last.state == "failed")?;
        // Its owner asked for its last start; a config that dropped it released it.
        let source = transitions
            .iter()
            .rev()
            .find(|t| t.names_owner())
            .filter(|t| t.state == "provisioning")
            .and_then(|t| t.detail.as_deref())
            .and_then(StoreSource::parse);
        Some((failure.clone(), source))
    }

    /// Stops store `id` after its in-flight invocation; archives its files, or deletes them
    /// when `purge`. A store whose start failed is forgotten the same way (host.db keeps it
    /// no more, so no restart tries it again). Returns whether there was such a store.
    pub async fn remove(&self, id: &StoreId, purge: bool) -> Result<bool, ControlError> {
        self.remove_checked(id, purge, false).await
    }

    /// [`Orchestrator::remove`] for the API, a webhook or the reconciler: refuses a store the
    /// config file or `STORE_IDS` declares ([`ControlError::ConfigOwned`]), checked under the
    /// change lock, so one the config took over after the caller looked stays too.
    pub async fn remove_unowned(&self, id: &StoreId, purge: bool) -> Result<bool, ControlError> {
        self.remove_checked(id, purge, true).await
    }

    async fn remove_checked(
        &self,
        id: &StoreId,
        purge: bool,
        refuse_owned: bool,
    ) -> Result<bool, ControlError> {
        let _guard = self.changes.lock().await;
        if refuse_owned
            && let Some(refusal) = self
                .source(id)
                .await
                .and_then(|source| source.removal_refused(id, self.settings.config_file.as_deref()))
        {
            return Err(ControlError::ConfigOwned(refusal));
        }
        let known = self.stores.read().await.contains_key(id) || self.failed_start(id).is_some();
        if !known {
            return Ok(false);
        }
        // Recorded before anything of it stops or moves: a host killed before host.db forgets
        // it finishes the removal at its next start, instead of starting it again without
        // its files.
        self.desired.begin_removal(id, purge)?;
        self.removing().insert(id.clone());
        let entry = self.stores.write().await.remove(id);
        let Some(entry) = entry else {
            // Its directory first: when it cannot be moved (the fault that failed the
            // start, say), the store stays known and the answer says why.
            if let Err(err) = self.remove_files(id, purge).await {
                if !refuse_owned {
                    // The config dropped it: no longer the config's to start or remove.
                    self.record(
                        id,
                        "released",
                        Some("no longer declared by the config".into()),
                    );
                    self.record(
                        id,
                        "failed",
                        Some(format!("its files could not be removed: {err}")),
                    );
                }
                return Err(err);
            }
            self.forget_or_record(id)?;
            return Ok(true);
        };
        self.record(id, "stopping", None);
        entry.store.stop().await;
        if !refuse_owned && entry.source.is_config_owned() {
            // The config dropped it: should the removal fail, the store is no longer the
            // config's (which would never try again), and the API may remove it.
            self.record(
                id,
                "released",
                Some("no longer declared by the config".into()),
            );
        }
        // Its directory first here too: a store forgotten with its files left in place would
        // lose them to the next store of that id. When they cannot be moved it stays known, as
        // a failed store whose removal can be asked again.
        if let Err(err) = self.remove_files(id, purge).await {
            self.record(
                id,
                "failed",
                Some(format!(
                    "stopped, but its files could not be removed: {err}"
                )),
            );
            return Err(err);
        }
        self.forget_or_record(id)?;
        Ok(true)
    }

    /// [`Orchestrator::forget`], or, when host.db cannot be written, records the store as
    /// failed with why: its files are gone, and a removal asked again finishes the job
    /// (before, it was neither running nor failed, and came back empty at the next start).
    fn forget_or_record(&self, id: &StoreId) -> Result<(), ControlError> {
        self.forget(id).inspect_err(|err| {
            self.record(
                id,
                "failed",
                Some(format!(
                    "its files were removed, but host.db could not forget it: {err}"
                )),
            );
        })
    }

    /// Forgets a removed store: its tokens and row in host.db (with its removal under way),
    /// its history.
    fn forget(&self, id: &StoreId) -> Result<(), ControlError> {
        // Tokens first: a row left behind finishes the removal at the next start, and does
        // not bring the old tokens back.
        self.registry.revoke_all_store_tokens(id)?;
        self.desired.delete(id)?;
        self.removing().remove(id);
        // A removed store's history goes with it (the map stays bounded by running stores).
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        let mut activity = self.activity();
        activity.total_deprovisioned += 1;
        activity.last_deprovisioned_at = Some(now_ms());
        Ok(())
    }

    /// Archives store `id`'s directory, or deletes it when `purge`.
    async fn remove_files(&self, id: &StoreId, purge: bool) -> Result<(), ControlError> {
        let data_dir = self.settings.data_dir.clone();
        let target = id.clone();
        let archived = tokio::task::spawn_blocking(move || dir::remove(&data_dir, &target, purge))
            .await
            .map_err(|err| StoreError::Internal(format!("removal task failed: {err}")))??;
        match archived {
            Some(path) => {
                tracing::info!(store_id = %id, archive = %path.display(), "store removed; data archived")
            }
            None if purge => tracing::info!(store_id = %id, "store removed and its data purged"),
            None => tracing::info!(store_id = %id, "store removed; it had no files to archive"),
        }
        Ok(())
    }

    /// Whether store `id`'s removal was asked for and is not finished (a failed store then):
    /// a restart finishes it.
    pub fn is_removing(&self, id: &StoreId) -> bool {
        self.removing().contains(id)
    }

    fn removing(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<StoreId>> {
        self.removing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes, as an edit of the running config would have, the stores the config file or
    /// `STORE_IDS` started when the host last ran and declares no more (dropped while the host
    /// was down): their files are archived ([`Orchestrator::finish_removals`] does it), their
    /// tokens revoked and their pause forgotten. Before, their files stayed in place,
    /// running for no one, and the next store of that id, from any source, took over their
    /// data, their pause and the tokens issued for them.
    ///
    /// Unless most of them went at once (more than half, and more than one): a host started
    /// by mistake without its `STORE_IDS` or with another `--config` would archive every
    /// store and revoke their tokens for good. Those are held back as failed stores saying
    /// why, which a start with the right config runs again and a `DELETE` archives. A store
    /// placed on another host is that host's to run or remove.
    async fn remove_undeclared(&self) -> Result<(), ControlError> {
        if self.is_stopping() {
            // A start cut short: which stores the config declares did not all start.
            return Ok(());
        }
        let running = self.sources().await;
        let recorded = self.desired.config_stores()?;
        let mut dropped = Vec::new();
        for id in &recorded {
            let declared = running.get(id).is_some_and(|s| s.is_config_owned())
                || self.config_start_failed(id);
            // Kept for another owner since (host.db restores it), or another host's.
            if declared
                || running.contains_key(id)
                || self.desired.get(id)?.is_some()
                || matches!(self.placement.place(id), Placed::Elsewhere { .. })
            {
                continue;
            }
            dropped.push(id.clone());
        }
        if removes_most(dropped.len(), recorded.len()) {
            let why = format!(
                "{} of the {} stores the config file or STORE_IDS ran when the host last ran are \
                 no longer declared: not archived, in case the host was started without its \
                 STORE_IDS or with another --config",
                dropped.len(),
                recorded.len()
            );
            tracing::error!(
                "{why}; start it with the config that declares them, or remove each (DELETE /v1/stores/{{id}}) to archive its data"
            );
            for id in dropped {
                self.record(
                    &id,
                    "released",
                    Some("no longer declared by the config".into()),
                );
                self.record(
                    &id,
                    "failed",
                    Some(format!(
                        "{why}; start the host with the config that declares it, or remove it (DELETE /v1/stores/{id}) to archive its data"
                    )),
                );
            }
            return Ok(());
        }
        for id in dropped {
            tracing::info!(store_id = %id, "the config no longer declares the store (it did when the host last ran): removing it, its data archived");
            self.desired.begin_removal(&id, false)?;
        }
        Ok(())
    }

    /// Finishes the removals host.db records as under way (the host stopped, or could not
    /// forget the store, before one was done): each store's files are archived (or deleted)
    /// if they are still in place, and the store forgotten. One the config declares again,
    /// and runs, is kept. A removal that fails again leaves a failed store, with why.
    async fn finish_removals(&self) -> Result<(), ControlError> {
        if self.is_stopping() {
            // A start cut short: the config's stores may not have started, so which of these
            // it declares again is not known. The next start finishes them.
            return Ok(());
        }
        let running = self.sources().await;
        for (id, purge) in self.desired.removals()? {
            if running.contains_key(&id) || self.config_start_failed(&id) {
                tracing::info!(store_id = %id, "the config declares the store again: its unfinished removal is off");
                self.desired.cancel_removal(&id)?;
                continue;
            }
            self.removing().insert(id.clone());
            let finished = match self.remove_files(&id, purge).await {
                Ok(()) => self.forget(&id),
                Err(err) => Err(err),
            };
            match finished {
                Ok(()) => {
                    tracing::info!(store_id = %id, "finished the removal the host had begun before it stopped");
                }
                Err(err) => {
                    tracing::error!(store_id = %id, "could not finish the store's removal: {err}");
                    self.record(
                        &id,
                        "failed",
                        Some(format!("its removal could not be finished: {err}")),
                    );
                }
            }
        }
        Ok(())
    }

    /// Starts every store the registry remembers (those added through the API, webhooks or the
    /// reconciler before a restart), after the plugins uploaded through the API. Removals
    /// begun before the host stopped are finished first.
    pub async fn restore_persisted(&self) -> Result<usize, ControlError> {
        self.restore_plugins().await?;
        self.remove_undeclared().await?;
        self.finish_removals().await?;
        let removing = self.removing().clone();
        let running = self.sources().await;
        let defaults = self.defaults();
        let mut wanted = Vec::new();
        for (id, source, spec) in self.desired.all()? {
            if removing.contains(&id) {
                // Its removal failed again just now: a failed store, not started.
                continue;
            }
            if self.config_start_failed(&id)
                || running.get(&id).is_some_and(|s| s.is_config_owned())
            {
                // Declared in the config (or STORE_IDS) since the host last ran: the config
                // decides its spec now.
                tracing::info!(store_id = %id, was = source.as_str(), "the config now declares the store: it owns it");
                self.desired.forget_spec(&id)?;
                continue;
            }
            // What it did not set itself follows today's defaults.
            wanted.push((
                id,
                OwnSettings::of(&spec, &defaults).over(&defaults),
                source,
            ));
        }
        let (mut started, mut not_started) = (0, 0);
        for (id, answer) in self.ensure_running_many(wanted).await {
            match answer {
                Ok(_) => started += 1,
                Err(ControlError::ShuttingDown) => not_started += 1,
                Err(err @ ControlError::PlacedElsewhere { .. }) => {
                    tracing::info!(store_id = %id, "not restored here: {err}");
                }
                Err(err) => tracing::error!(store_id = %id, "could not restore the store: {err}"),
            }
        }
        if not_started > 0 {
            tracing::info!(
                "{not_started} stores added through the API not restored: the host shuts down"
            );
        }
        Ok(started)
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, ProvisioningActivity> {
        self.activity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores started and removed since the host started.
    pub fn provisioning_activity(&self) -> ProvisioningActivity {
        self.activity().clone()
    }

    /// The host registry (`DATA_DIR/host.db`), shared by the control plane's parts.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Where store `id`'s desired state came from, when it runs or its last start failed.
    pub async fn source(&self, id: &StoreId) -> Option<StoreSource> {
        match self.stores.read().await.get(id) {
            Some(entry) => Some(entry.source),
            None => self.failed_start(id).and_then(|(_, source)| source),
        }
    }

    /// Every running store's id with its source.
    pub async fn sources(&self) -> BTreeMap<StoreId, StoreSource> {
        self.stores
            .read()
            .await
            .iter()
            .map(|(id, e)| (id.clone(), e.source))
            .collect()
    }

    /// How many stores run.
    pub async fn len(&self) -> usize {
        self.stores.read().await.len()
    }

    /// Whether no store runs.
    pub async fn is_empty(&self) -> bool {
        self.stores.read().await.is_empty()
    }

    /// Pauses (events are accepted, not processed) or resumes store `id`; the change is
    /// recorded in its transitions as `paused` / `resumed`, and kept in the host registry so a
    /// restart leaves a paused store paused.
    pub async fn set_paused(&self, id: &StoreId, paused: bool) -> Result<Store, ControlError> {
        // Under the change lock: a removal in between would leave host.db a pause of a store
        // that is gone, and a later store of the same id would open paused.
        let _guard = self.changes.lock().await;
        let store = self
            .get(id)
            .await
            .ok_or_else(|| ControlError::NotFound(id.clone()))?;
        // Remembered first: a pause the host forgot would end at the next start.
        self.desired.set_paused(id, paused)?;
        store.set_paused(paused).await?;
        self.record(id, if paused { "paused" } else { "resumed" }, None);
        Ok(store)
    }

    /// Issues a token for running store `id`, under the change lock: a removal (which revokes
    /// the store's tokens) cannot slip in between the check and the token, which would then
    /// open a later store of the same id.
    pub async fn create_store_token(
        &self,
        id: &StoreId,
    ) -> Result<crate::tokens::IssuedToken, ControlError> {
        let _guard = self.changes.lock().await;
        if self.get(id).await.is_none() {
            return Err(ControlError::NotFound(id.clone()));
        }
        Ok(self.registry.create_store_token(id)?)
    }

    /// The running store `id`.
    pub async fn get(&self, id: &StoreId) -> Option<Store> {
        self.stores.read().await.get(id).map(|e| e.store.clone())
    }

    /// The spec store `id` runs under.
    pub async fn spec(&self, id: &StoreId) -> Option<(StoreSpec, StoreSource)> {
        self.stores
            .read()
            .await
            .get(id)
            .map(|e| (e.spec.clone(), e.source))
    }

    /// What the API shows about store `id`.
    pub async fn view(&self, id: &StoreId) -> Option<StoreView> {
        let stores = self.stores.read().await;
        stores.get(id).map(|entry| self.view_of(id, entry))
    }

    /// Every running store, by id.
    pub async fn list(&self) -> Vec<StoreView> {
        let stores = self.stores.read().await;
        stores
            .iter()
            .map(|(id, entry)| self.view_of(id, entry))
            .collect()
    }

    /// The ids of every running store.
    pub async fn ids(&self) -> Vec<StoreId> {
        self.stores.read().await.keys().cloned().collect()
    }

    fn view_of(&self, id: &StoreId, entry: &Entry) -> StoreView {
        let sha256 = self
            .plugins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&entry.spec.plugin)
            .map(|p| p.sha256().to_owned())
            .unwrap_or_default();
        StoreView {
            id: id.clone(),
            source: entry.source,
            plugin: PluginRef {
                name: entry.spec.plugin.clone(),
                sha256,
            },
            quotas: entry.spec.quotas.clone(),
            config: entry.spec.config.clone(),
            running_since: entry.since,
            log_epoch: entry.store.log_epoch().epoch,
            log_epoch_after: entry.store.log_epoch().after,
            status: entry.store.status(),
            transitions: self.transitions(id),
        }
    }

    /// From now on no store starts and no store's own settings change (the host shuts down):
    /// a batch of [`Orchestrator::ensure_running_many`] already opening finishes, and every
    /// later one — the rest of a start-up's stores too — and every [`Orchestrator::edit_own`]
    /// answer [`ControlError::ShuttingDown`]. Removals, pauses and plugin deploys still go
    /// ahead: they start nothing.
    /// [`Orchestrator::shutdown`] then stops the stores that did start.
    pub fn stop_starting(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`Orchestrator::stop_starting`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops every store cleanly (after their in-flight invocations).
    pub async fn shutdown(&self) {
        self.stop_starting();
        let _guard = self.changes.lock().await;
        let spares = self.spares.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || spares.stop()).await {
            tracing::warn!("could not wait for the spare store builder: {err}");
        }
        let mut stopping = tokio::task::JoinSet::new();
        for entry in self.stores.read().await.values() {
            let store = entry.store.clone();
            stopping.spawn(async move { store.stop().await });
        }
        while stopping.join_next().await.is_some() {}
    }
}

/// The answer of a batch of one store.
/// Whether removing `removed` of the config's `of` stores at once is removing most of them
/// (more than half, and more than one): what a config cut short, another file, or a start
/// without `STORE_IDS` looks like. Such removals are held back, at a start
/// ([`Orchestrator::remove_undeclared`]) as on a live edit (the config watcher).
pub(crate) fn removes_most(removed: usize, of: usize) -> bool {
    removed > 1 && removed * 2 > of
}

fn only_answer(
    mut answers: Vec<(StoreId, Result<Provisioned, ControlError>)>,
) -> Result<Provisioned, ControlError> {
    match answers.pop() {
        Some((_, answer)) => answer,
        None => Err(StoreError::Internal("no answer for the store".into()).into()),
    }
}

/// Deletes the temporary files of uploads that a crash cut short in `dir` (`DATA_DIR/plugins`,
/// see [`Orchestrator::deploy_plugin_persisted`] and [`storehost_runtime::write_atomically`]):
/// done as the orchestrator is made, before anything can upload.
fn delete_unfinished_uploads(dir: &std::path::Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
        Err(err) => {
            tracing::warn!(dir = %dir.display(), "could not look for unfinished plugin uploads: {err}");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = %name, "deleted an upload a crash cut short"),
                Err(err) => {
                    tracing::warn!(file = %name, "could not delete an upload a crash cut short: {err}")
                }
            }
        }
    }
}
