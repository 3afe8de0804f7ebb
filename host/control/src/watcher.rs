//! The watched config file: edits apply live through the orchestrator, without a restart.
//!
//! The parent directory is watched, not the file: editors that save by writing a temporary
//! file and renaming it over the original replace the file's inode, and a watch on the file
//! itself goes silent after the first such save. The directory of each symbolic link on the
//! file's path is watched too, and the path resolved again when one changes: a Kubernetes
//! ConfigMap update (`storehost.toml -> ..data/storehost.toml`, `..data` renamed to point at a
//! new directory) or a deploy flipping a `current` link points it at another file. The file is
//! also looked at every [`LOOK_EVERY`], in case its change sent no event a watch saw.
//!
//! Events are debounced, the file is re-read until its content has stayed the same for
//! [`SETTLE`] (a file written in several steps is not applied half-written), a reload whose
//! content hash did not change does nothing, and an edit that does not parse (or names a
//! plugin that cannot load) keeps the last good config running. An edit that would remove
//! most of the config's stores at once holds those removals back until the file is saved
//! again as it is.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind};
use notify_debouncer_full::file_id::{FileId, get_file_id};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use sha2::{Digest, Sha256};
use storehost_store::StoreId;

use crate::ControlError;
use crate::config::{self, HostConfig, PluginSource};
use crate::orchestrator::Orchestrator;

/// What one reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadOutcome {
    /// The file's content is what was last read: nothing to do.
    Unchanged,
    /// The new config was applied (some stores may still have failed: see the summary).
    Applied(ReloadSummary),
    /// The edit was refused; the last good config keeps running. The message lists every
    /// error with its `file:line:column`.
    Refused(String),
}

/// The changes a reload applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadSummary {
    /// Stores started.
    pub added: Vec<StoreId>,
    /// Stores whose plugin, quotas or config changed.
    pub updated: Vec<StoreId>,
    /// Stores stopped (data archived).
    pub removed: Vec<StoreId>,
    /// Plugins (re)deployed because their file changed.
    pub plugins_deployed: Vec<String>,
    /// Stores that could not be started, changed or stopped, with why.
    pub failed: Vec<(StoreId, String)>,
    /// Stores the edit no longer declares that were not removed: more than half of the
    /// config's stores at once (see [`ConfigReloader::reload`]).
    pub held: Option<HeldRemovals>,
}

/// Removals an edit asked for and a reload held back: they keep running, data and tokens
/// intact, until the file is saved again as it is (or declares them again).
#[derive(Debug, Clone, PartialEq)]
pub struct HeldRemovals {
    /// The stores held back.
    pub stores: Vec<StoreId>,
    /// Why, and how to remove them or keep them (for the log and `/health`).
    pub message: String,
}

impl ReloadSummary {
    /// Counts the orchestrator's answers to the stores a reload wanted changed.
    fn count(&mut self, answers: Vec<(StoreId, Result<crate::Provisioned, ControlError>)>) {
        for (id, answer) in answers {
            match answer {
                Ok(crate::Provisioned::Created) => self.added.push(id),
                Ok(crate::Provisioned::Updated) => self.updated.push(id),
                Ok(crate::Provisioned::Unchanged) => {}
                Err(err) => self.failed.push((id, err.to_string())),
            }
        }
    }

    /// One line for the log and `/health`, when some store failed or removals were held back.
    pub fn failures(&self) -> Option<String> {
        let held = self.held.as_ref().map(|held| held.message.clone());
        if self.failed.is_empty() {
            return held;
        }
        let shown: Vec<String> = self
            .failed
            .iter()
            .take(5)
            .map(|(id, err)| format!("{id}: {err}"))
            .collect();
        let more = self.failed.len().saturating_sub(shown.len());
        let mut line = format!(
            "{} stores of the config could not be applied: {}",
            self.failed.len(),
            shown.join("; ")
        );
        if more > 0 {
            line.push_str(&format!(" (and {more} more)"));
        }
        Some(match held {
            Some(held) => format!("{held}; {line}"),
            None => line,
        })
    }
}

/// Called after every reload that read the file (not for unchanged content).
pub type ReloadListener = Arc<dyn Fn(&ReloadOutcome) + Send + Sync>;

/// Reads bytes of a plugin the config names (the built-in one comes from the binary).
pub type PluginReader = Arc<dyn Fn(&str, &PluginSource) -> std::io::Result<Vec<u8>> + Send + Sync>;

/// Re-reads one config file and applies its differences.
pub struct ConfigReloader {
    path: PathBuf,
    orchestrator: Arc<Orchestrator>,
    read_plugin: PluginReader,
    listener: ReloadListener,
    /// How many times the config file was read.
    reads: std::sync::atomic::AtomicU64,
    /// The last good config (with the environment applied) and the hash of the last content read.
    current: tokio::sync::Mutex<Loaded>,
}

/// The config a reloader last applied.
struct Loaded {
    /// With the environment and command-line overrides applied: what runs.
    running: HostConfig,
    /// As the file says (no overrides): to tell which restart-only keys an edit changed.
    file: HostConfig,
    /// Hash of the content last read (good or not).
    hash: [u8; 32],
    /// The removals the last applied edit held back, with the content and modification time
    /// it was read with: the same content saved again confirms them.
    held: Option<Held>,
    /// Why the last edit was refused, when a plugin file it names could not be read or loaded:
    /// such an edit is read again at each of the watch's looks (the file may arrive after the
    /// config naming it), and the same refusal is not reported again.
    waits_for_plugin: Option<String>,
}

/// Removals a reload held back, and the file as it was read then.
struct Held {
    stores: BTreeSet<StoreId>,
    hash: [u8; 32],
    modified: Option<std::time::SystemTime>,
}

impl Loaded {
    /// Whether `read` is the content whose removals were held back, saved again since: the
    /// operator confirms them.
    fn confirms(&self, read: &FileRead) -> bool {
        self.held
            .as_ref()
            .is_some_and(|held| held.hash == read.hash && held.modified != read.modified)
    }
}

/// The config file's content as one read found it.
struct FileRead {
    bytes: Vec<u8>,
    hash: [u8; 32],
    modified: Option<std::time::SystemTime>,
}

/// Reads the file at `path` (through its symbolic links), with its modification time.
async fn read_file(path: &Path) -> std::io::Result<FileRead> {
    let bytes = tokio::fs::read(path).await?;
    let modified = tokio::fs::metadata(path)
        .await
        .and_then(|metadata| metadata.modified())
        .ok();
    Ok(FileRead {
        hash: hash(&bytes),
        bytes,
        modified,
    })
}

impl std::fmt::Debug for ConfigReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigReloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ConfigReloader {
    /// A reloader for the file at `path`, whose content `running` (environment applied) runs now.
    pub fn new(
        path: impl Into<PathBuf>,
        running: HostConfig,
        orchestrator: Arc<Orchestrator>,
        read_plugin: PluginReader,
        listener: ReloadListener,
    ) -> Self {
        let path = path.into();
        let hash = std::fs::read(&path).map(|b| hash(&b)).unwrap_or_default();
        let file = config::load_file(&path).unwrap_or_else(|_| running.clone());
        Self {
            reads: std::sync::atomic::AtomicU64::new(0),
            path,
            orchestrator,
            read_plugin,
            listener,
            current: tokio::sync::Mutex::new(Loaded {
                file,
                running,
                hash,
                held: None,
                waits_for_plugin: None,
            }),
        }
    }

    /// This reloader, knowing that `running` was loaded from `bytes` (read before the host
    /// started its stores): an edit saved while they started differs from them, and the watch's
    /// first look applies it. Without this the file is taken as it is when the reloader is
    /// made, and such an edit counted as applied until the next one.
    #[must_use]
    pub fn loaded_from(mut self, bytes: &[u8]) -> Self {
        self.current.get_mut().hash = hash(bytes);
        self
    }

    /// The config file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times [`ConfigReloader::reload`] read the config file.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the file's content differs from what [`ConfigReloader::reload`] read last (or
    /// is its held removals saved again), without applying it: what a watch's periodic look
    /// asks. Not counted in [`ConfigReloader::reads`].
    pub async fn changed_since_read(&self) -> bool {
        let read = read_file(&self.path).await;
        let current = self.current.lock().await;
        match read {
            Ok(read) => read.hash != current.hash || current.confirms(&read),
            // Reported already, unless the content was readable last time.
            Err(_) => current.hash != [0; 32],
        }
    }

    /// Whether the last edit was refused for a plugin file it names: the watch's looks try it
    /// again.
    pub async fn waits_for_plugin(&self) -> bool {
        self.current.lock().await.waits_for_plugin.is_some()
    }

    /// The plugin files the running config names.
    pub async fn plugin_files(&self) -> Vec<PathBuf> {
        plugin_files(&self.current.lock().await.running)
    }

    /// Reads the file and applies what changed. Reloads run one at a time.
    ///
    /// An edit applies once the file's content has stayed the same for [`SETTLE`]: a file
    /// written in several steps (`cat > storehost.toml` and a paste, a script's `>` then `>>`)
    /// is first read empty or cut short, which can be valid TOML declaring fewer stores, and
    /// applying it would archive the others. A file still changing after [`SETTLE_AT_MOST`]
    /// is left for its next change.
    ///
    /// An edit that would remove more than half of the stores the config runs, and more than
    /// one, holds those removals back, as a start does (a file cut short, or another file
    /// copied over it, looks like that): they keep running, the rest of the edit applies, and
    /// `/health` says which and how to go on. Saving the same content again (`touch` will do)
    /// confirms them; declaring them again keeps them.
    pub async fn reload(&self) -> ReloadOutcome {
        let mut current = self.current.lock().await;
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let read = match self.read_settled(&current).await {
            Ok(Some(read)) => read,
            Ok(None) => return ReloadOutcome::Unchanged,
            Err(Unsettled::Unreadable(err)) => {
                // Forget the content read last, so the same file coming back is applied again
                // (and clears this error) instead of being skipped as unchanged.
                current.hash = [0; 32];
                let outcome = ReloadOutcome::Refused(format!(
                    "{}: cannot read the config file: {err}; the last good config keeps running",
                    self.path.display()
                ));
                self.report(&outcome);
                return outcome;
            }
            Err(Unsettled::StillChanging) => {
                // The content read last stays known: the file is read again at its next change.
                let outcome = ReloadOutcome::Refused(format!(
                    "{}: the config file was still being written {} s after it changed (it \
                     changed at every look, {} ms apart); the edit was not applied yet: it \
                     applies once the file stops changing; the last good config keeps running",
                    self.path.display(),
                    SETTLE_AT_MOST.as_secs(),
                    SETTLE.as_millis()
                ));
                self.report(&outcome);
                return outcome;
            }
        };
        let confirmed = match &current.held {
            Some(held) if current.confirms(&read) => held.stores.clone(),
            _ => BTreeSet::new(),
        };
        current.hash = read.hash;
        let text = String::from_utf8_lossy(&read.bytes);
        let mut next = match config::parse_str(&text, &self.path) {
            Ok(next) => next,
            Err(errors) => {
                current.waits_for_plugin = None;
                let outcome = ReloadOutcome::Refused(format!(
                    "{errors}\n(the edit was not applied; the last good config keeps running)"
                ));
                self.report(&outcome);
                return outcome;
            }
        };
        let _ = warn_restart_only(&current.file, &next);
        let file = next.clone();
        next.env = current.running.env.clone();
        let mut summary = ReloadSummary::default();
        if let Err(message) = self
            .deploy_changed_plugins(&current.running, &next, None, &mut summary)
            .await
        {
            // Read again at the watch's next look: a deploy may copy the plugin file after the
            // config naming it. Before, the edit was lost until the file's bytes changed.
            current.hash = [0; 32];
            if current.waits_for_plugin.as_ref() == Some(&message) {
                return ReloadOutcome::Unchanged;
            }
            current.waits_for_plugin = Some(message.clone());
            let outcome = ReloadOutcome::Refused(format!(
                "{message}\n(the edit was not applied; the last good config keeps running, and \
                 the host tries the edit again every {} s until the plugin loads)",
                LOOK_EVERY.as_secs()
            ));
            self.report(&outcome);
            return outcome;
        }
        current.waits_for_plugin = None;
        let held = self
            .apply_stores(&current.running, &next, &confirmed, &mut summary)
            .await;
        current.held = None;
        if !held.is_empty() {
            // They run as the config last declared them, and the next edit weighs their
            // removal again.
            keep_declared(&current.running, &mut next, &held);
            current.held = Some(Held {
                stores: held,
                hash: read.hash,
                modified: read.modified,
            });
        }
        current.running = next;
        current.file = file;
        let outcome = ReloadOutcome::Applied(summary);
        self.report(&outcome);
        outcome
    }

    /// The file once its content has stayed the same for [`SETTLE`] (or it could not be read
    /// twice in a row); `None` when that is the content `current` was read from (and not a
    /// save confirming its held removals).
    async fn read_settled(&self, current: &Loaded) -> Result<Option<FileRead>, Unsettled> {
        let unchanged = |read: &std::io::Result<FileRead>| {
            read.as_ref()
                .is_ok_and(|read| read.hash == current.hash && !current.confirms(read))
        };
        let mut read = read_file(&self.path).await;
        if unchanged(&read) {
            return Ok(None);
        }
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(SETTLE).await;
            let again = read_file(&self.path).await;
            let settled = match (&read, &again) {
                (Ok(read), Ok(again)) => read.hash == again.hash,
                // Missing while an editor replaces it, say: one failure is not reported.
                (Err(_), Err(_)) => true,
                _ => false,
            };
            read = again;
            if settled {
                break;
            }
            if started.elapsed() >= SETTLE_AT_MOST {
                return Err(Unsettled::StillChanging);
            }
        }
        // Changed and changed back while it settled: nothing to do.
        if unchanged(&read) {
            return Ok(None);
        }
        read.map(Some).map_err(Unsettled::Unreadable)
    }

    /// Deploys every plugin file of the running config whose bytes changed (the config itself
    /// is not re-read). A file that cannot be read or loaded keeps the running version.
    pub async fn refresh_plugins(&self) -> ReloadOutcome {
        self.refresh(None).await
    }

    /// [`ConfigReloader::refresh_plugins`] for those of `files` the running config names.
    pub async fn refresh_plugin_files(&self, files: &BTreeSet<PathBuf>) -> ReloadOutcome {
        self.refresh(Some(files)).await
    }

    async fn refresh(&self, only: Option<&BTreeSet<PathBuf>>) -> ReloadOutcome {
        let current = self.current.lock().await;
        let mut summary = ReloadSummary::default();
        let outcome = match self
            .deploy_changed_plugins(&current.running, &current.running, only, &mut summary)
            .await
        {
            Err(message) => ReloadOutcome::Refused(format!(
                "{message}\n(the running version of the plugin keeps running)"
            )),
            Ok(()) if summary.plugins_deployed.is_empty() => return ReloadOutcome::Unchanged,
            Ok(()) => ReloadOutcome::Applied(summary),
        };
        self.report(&outcome);
        outcome
    }

    fn report(&self, outcome: &ReloadOutcome) {
        match outcome {
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Refused(message) => {
                tracing::error!(path = %self.path.display(), "config edit refused:\n{message}");
            }
            ReloadOutcome::Applied(summary) => {
                tracing::info!(
                    path = %self.path.display(),
                    added = summary.added.len(),
                    updated = summary.updated.len(),
                    removed = summary.removed.len(),
                    plugins = summary.plugins_deployed.len(),
                    "config reloaded"
                );
                if let Some(failures) = summary.failures() {
                    tracing::error!("{failures}");
                }
            }
        }
        (self.listener)(outcome);
    }

    /// Deploys every file plugin of `next` whose file changed since it was last deployed from
    /// it, or that `previous` did not name (see [`Orchestrator::deploy_plugin_file`]: a version
    /// uploaded through the API since runs until its file changes). Only the files in `only`,
    /// when given. A plugin that cannot be read or loaded refuses the whole edit.
    async fn deploy_changed_plugins(
        &self,
        previous: &HostConfig,
        next: &HostConfig,
        only: Option<&BTreeSet<PathBuf>>,
        summary: &mut ReloadSummary,
    ) -> Result<(), String> {
        let named_before = previous.plugin_sources();
        for (name, source) in next.plugin_sources() {
            let PluginSource::File(file) = &source else {
                // Compiled into the binary: deployed at start, it never changes.
                continue;
            };
            if only.is_some_and(|only| !only.contains(file)) {
                continue;
            }
            let reader = self.read_plugin.clone();
            let (task_name, task_source) = (name.clone(), source.clone());
            let bytes = tokio::task::spawn_blocking(move || reader(&task_name, &task_source))
                .await
                .map_err(|err| format!("reading plugin {name:?} failed: {err}"))?
                .map_err(|err| {
                    let path = file.display();
                    format!(
                        "plugin {name:?}: cannot read {path}: {err}; fix the path in [plugins.{name}]"
                    )
                })?;
            let newly_named = !named_before.contains_key(&name);
            let deployed = self
                .orchestrator
                .deploy_plugin_file(&name, bytes, newly_named)
                .await
                .map_err(|err| format!("plugin {name:?} could not be loaded: {err}"))?;
            if let Some(plugin) = deployed {
                tracing::info!(plugin = %name, sha256 = plugin.sha256(), "plugin deployed from the config");
                summary.plugins_deployed.push(name);
            }
        }
        Ok(())
    }

    /// Starts, changes and stops stores so the running ones follow `next`, except removals
    /// of more than half of the config's stores (and more than one) at once, not counting
    /// those in `confirmed`: those stay, and are answered.
    async fn apply_stores(
        &self,
        previous: &HostConfig,
        next: &HostConfig,
        confirmed: &BTreeSet<StoreId>,
        summary: &mut ReloadSummary,
    ) -> BTreeSet<StoreId> {
        let before = previous.store_specs();
        let after = next.store_specs();
        let sources = self.orchestrator.sources().await;
        // The config's stores: those it declared that it (or STORE_IDS) still owns, running or
        // failed. A store taken over by the API or a webhook since is not the config's to stop.
        let mut owned = BTreeSet::new();
        for id in before.keys() {
            let owner = match sources.get(id) {
                Some(source) => Some(*source),
                None => self.orchestrator.source(id).await,
            };
            if owner.is_some_and(|s| s.is_config_owned()) {
                owned.insert(id);
            }
        }
        // A store the config no longer names is stopped only if the config still owns it.
        // One whose start failed is forgotten too.
        let gone: Vec<&StoreId> = owned
            .iter()
            .copied()
            .filter(|id| !after.contains_key(*id))
            .collect();
        let unconfirmed: BTreeSet<StoreId> = gone
            .iter()
            .filter(|id| !confirmed.contains(**id))
            .map(|id| (*id).clone())
            .collect();
        let held = if crate::orchestrator::removes_most(unconfirmed.len(), owned.len()) {
            summary.held = Some(self.hold(&unconfirmed, owned.len()));
            unconfirmed
        } else {
            BTreeSet::new()
        };
        for id in gone.into_iter().filter(|id| !held.contains(*id)) {
            match self.orchestrator.remove(id, false).await {
                Ok(true) => summary.removed.push(id.clone()),
                Ok(false) => {}
                Err(err) => summary.failed.push((id.clone(), err.to_string())),
            }
        }
        let mut wanted = Vec::new();
        for (id, spec) in after {
            let unchanged = before.get(&id) == Some(&spec)
                && match sources.get(&id) {
                    None => false,
                    // A store the config owns runs what the file says, unless applying it
                    // failed before (a quota above the ceiling, a plugin that would not
                    // load): then every edit tries again, and reports it while it fails.
                    Some(source) if source.is_config_owned() => self
                        .orchestrator
                        .spec(&id)
                        .await
                        .is_some_and(|(running, _)| running == spec),
                    Some(_) => true,
                };
            if !unchanged {
                let source = next.source_of(&id);
                wanted.push((id, spec, source));
            }
        }
        // Thousands of stores in one edit open several at a time, in batches that let API
        // requests and webhooks in between.
        let answers = self.orchestrator.ensure_running_many(wanted).await;
        summary.count(answers);
        // Stores added at run time take the new `[defaults]` for what they did not set.
        let answers = self.orchestrator.set_defaults(next.default_spec()).await;
        summary.count(answers);
        held
    }

    /// What the log and `/health` say of the removals of `held`, of the `owned` stores the
    /// config ran, held back: why, and how to go on.
    fn hold(&self, held: &BTreeSet<StoreId>, owned: usize) -> HeldRemovals {
        let shown: Vec<String> = held.iter().take(10).map(ToString::to_string).collect();
        let more = held.len().saturating_sub(shown.len());
        let mut names = shown.join(", ");
        if more > 0 {
            names.push_str(&format!(" and {more} more"));
        }
        let message = format!(
            "{} of the {owned} stores the config file ran are no longer declared by this edit \
             ({names}): not removed, their data not archived, in case the file was saved \
             half-written or is another file; they keep running and the rest of the edit \
             applied. To remove them, save the file again as it is (`touch {}` will do); to \
             keep them, declare them again",
            held.len(),
            self.path.display()
        );
        HeldRemovals {
            stores: held.iter().cloned().collect(),
            message,
        }
    }
}

/// Declares in `next` the stores of `held` as `previous` declared them (with the plugin file
/// each names, if `next` dropped it): they keep running, and the config still owns them.
fn keep_declared(previous: &HostConfig, next: &mut HostConfig, held: &BTreeSet<StoreId>) {
    for id in held {
        let Some(store) = previous.stores.get(id) else {
            continue;
        };
        let plugin = store
            .plugin
            .clone()
            .unwrap_or_else(|| previous.defaults.plugin.clone());
        if let Some(file) = previous.plugins.get(&plugin) {
            next.plugins
                .entry(plugin.clone())
                .or_insert_with(|| file.clone());
        }
        let mut store = store.clone();
        store.plugin = Some(plugin);
        next.stores.insert(id.clone(), store);
    }
}

/// Logs the keys an edit changed that apply only at the next start; answers them.
fn warn_restart_only(previous: &HostConfig, next: &HostConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if previous.listen != next.listen {
        changed.push("listen");
    }
    if previous.data_dir != next.data_dir {
        changed.push("data_dir");
    }
    if previous.admin_token_env != next.admin_token_env {
        changed.push("admin_token_env");
    }
    if previous.max_stores != next.max_stores {
        changed.push("max_stores");
    }
    if previous.durability != next.durability {
        changed.push("durability");
    }
    if previous.task_catch_up_ms != next.task_catch_up_ms {
        changed.push("task_catch_up_ms");
    }
    if previous.idle_timeout_ms != next.idle_timeout_ms {
        changed.push("idle_timeout_ms");
    }
    if previous.close_files_after_ms != next.close_files_after_ms {
        changed.push("close_files_after_ms");
    }
    if previous.spare_stores != next.spare_stores {
        changed.push("spare_stores");
    }
    if previous.llm != next.llm {
        changed.push("[llm]");
    }
    if previous.http != next.http {
        changed.push("[http]");
    }
    if previous.retry != next.retry {
        changed.push("[retry]");
    }
    if previous.webhook != next.webhook {
        changed.push("[webhook]");
    }
    if previous.registry != next.registry {
        changed.push("[registry]");
    }
    if !changed.is_empty() {
        tracing::warn!(
            "config keys changed that apply only at the next start: {}; restart storehost to use them",
            changed.join(", ")
        );
    }
    changed
}

/// The plugin files `config` names.
fn plugin_files(config: &HostConfig) -> Vec<PathBuf> {
    config
        .plugin_sources()
        .into_values()
        .filter_map(|source| match source {
            PluginSource::File(path) => Some(path),
            PluginSource::Builtin => None,
        })
        .collect()
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A running watch on a config file; dropping it stops watching.
pub struct ConfigWatcher {
    watches: Arc<std::sync::Mutex<Watches>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher").finish_non_exhaustive()
    }
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConfigWatcher {
    /// The directories watched now: each one the config file or a plugin file of the running
    /// config is in, or, while one of those does not exist, its nearest existing ancestor.
    pub fn directories(&self) -> Vec<PathBuf> {
        lock(&self.watches).on.keys().cloned().collect()
    }
}

/// How long file events settle before a reload (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How long the config file's content must stay the same before an edit of it applies: the
/// debounced events come about [`DEBOUNCE`] after the first write, not once the writer is done.
const SETTLE: Duration = Duration::from_millis(300);

/// How long a reload waits for the config file to stop changing.
const SETTLE_AT_MOST: Duration = Duration::from_secs(5);

/// How often a watch looks whether the config file changed without an event it saw (a file
/// changed through a hard link elsewhere, a symbolic link outside the watched directories,
/// lost events): the file is read and its hash compared, nothing more while it is the same.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// Most symbolic links followed while resolving one path (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// Why a reload found no settled content to apply.
enum Unsettled {
    /// The file could not be read.
    Unreadable(std::io::Error),
    /// The file kept changing for [`SETTLE_AT_MOST`].
    StillChanging,
}

/// What a file event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// The config file changed.
    Config,
    /// A plugin file the config names changed.
    Plugin,
    /// A directory at this path was made, removed or renamed, and it is (or is an ancestor of)
    /// the directory of a watched file: a watch may have ended with it, or one that was
    /// missing may be back.
    Directory(PathBuf),
    /// The watch lost events: anything may have changed.
    Rescan,
}

/// `path` with its symbolic links resolved as far as it exists: a directory keeps the same
/// name while it is removed and made again.
fn canonical(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut below = Vec::new();
    loop {
        if let Ok(mut resolved) = std::fs::canonicalize(existing) {
            resolved.extend(below.iter().rev());
            return resolved;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                below.push(name);
                existing = parent;
            }
            _ => return path.to_owned(),
        }
    }
}

/// A file as a watch follows it: where its path leads now, every symbolic link on the way
/// (the file's own too) resolved, as that directory and file name; and each symbolic link met
/// on the way, as its directory and name. Replacing one of those links points the path at
/// another file: a Kubernetes ConfigMap update renames `..data` over itself to point at a new
/// directory (`storehost.toml -> ..data/storehost.toml`), a deploy flips `current`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FollowedPath {
    file: (PathBuf, std::ffi::OsString),
    links: BTreeSet<(PathBuf, std::ffi::OsString)>,
}

impl FollowedPath {
    /// `path` resolved as far as it exists, with the links met (at most [`MAX_LINKS`]
    /// followed: a loop of links leaves the rest of the path as it is written).
    fn resolve(path: &Path) -> Option<Self> {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let mut pending: VecDeque<PathBuf> = absolute
            .components()
            .map(|part| PathBuf::from(part.as_os_str()))
            .collect();
        let mut resolved = PathBuf::new();
        let mut links = BTreeSet::new();
        let mut followed = 0;
        while let Some(part) = pending.pop_front() {
            match part.components().next() {
                Some(std::path::Component::Normal(name)) => {
                    let next = resolved.join(name);
                    match std::fs::read_link(&next) {
                        Ok(target) if followed < MAX_LINKS => {
                            followed += 1;
                            links.insert((resolved.clone(), name.to_owned()));
                            // Relative to the link's directory; an absolute one starts over.
                            for part in target.components().rev() {
                                pending.push_front(PathBuf::from(part.as_os_str()));
                            }
                        }
                        _ => resolved = next,
                    }
                }
                Some(std::path::Component::ParentDir) => {
                    resolved.pop();
                }
                Some(std::path::Component::CurDir) | None => {}
                // The root (or a Windows prefix): replaces what was resolved so far.
                Some(_) => resolved.push(&part),
            }
        }
        let name = resolved.file_name()?.to_owned();
        let directory = resolved.parent().map(Path::to_owned)?;
        Some(Self {
            file: (directory, name),
            links,
        })
    }

    /// The directories whose events can change what the path leads to: the file's, and each
    /// link's.
    fn directories(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.file.0).chain(self.links.iter().map(|(directory, _)| directory))
    }

    /// Whether `changed` (a directory and name, as [`split`] gives) is the file or one of
    /// the links on its path.
    fn is_on_path(&self, changed: &(PathBuf, std::ffi::OsString)) -> bool {
        *changed == self.file || self.links.contains(changed)
    }
}

/// `path`'s directory (canonical as far as it exists) and file name.
fn split(path: &Path) -> Option<(PathBuf, std::ffi::OsString)> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Some((canonical(dir), path.file_name()?.to_owned()))
}

/// Whether a file event can mean new content: not the opens, reads and closes without a
/// write that the host's own reads of the file cause (reacting to those re-read the config
/// and its plugin files about ten times a second, for ever, after the first edit).
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        _ => true,
    }
}

/// Whether a file event makes, removes or renames what is at its path (a directory among
/// others). The host's own reads and writes never do this to the directories it watches.
fn may_move_directories(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    )
}

/// The files a watch reacts to: the config file (with the symbolic links on its path), and
/// the plugin files its running config names (each as its canonical directory and file name).
struct Watched {
    config: FollowedPath,
    plugins: BTreeSet<(PathBuf, std::ffi::OsString)>,
}

impl Watched {
    /// The directories the watched files (and the config's links) are in.
    fn directories(&self) -> BTreeSet<PathBuf> {
        self.config
            .directories()
            .chain(self.plugins.iter().map(|(directory, _)| directory))
            .cloned()
            .collect()
    }

    /// What an event asks for.
    fn changes(&self, event: &notify::Event) -> Vec<Change> {
        if event.need_rescan() {
            return vec![Change::Rescan];
        }
        let mut changes = Vec::new();
        if may_change_content(&event.kind) {
            for path in &event.paths {
                let Some(changed) = split(path) else { continue };
                if self.config.is_on_path(&changed) {
                    // The file, or a link its path goes through (which may now lead to
                    // another file): read it again, and watch where its path leads now.
                    changes.push(Change::Config);
                } else if self.plugins.contains(&changed) {
                    changes.push(Change::Plugin);
                }
            }
        }
        if may_move_directories(&event.kind) {
            for path in event.paths.iter().map(|p| canonical(p)) {
                if self.directories().iter().any(|d| d.starts_with(&path)) {
                    changes.push(Change::Directory(path));
                }
            }
        }
        changes
    }
}

type Debouncer = notify_debouncer_full::Debouncer<
    notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// The directories a watch is on: each directory of a watched file, or, while one does not
/// exist, its nearest existing ancestor, whose events tell when it is made again.
struct Watches {
    debouncer: Debouncer,
    /// Each watched directory, and which directory it was when its watch began: one removed
    /// and made again under the same name needs a watch of its own.
    on: BTreeMap<PathBuf, FileId>,
}

/// How many times [`Watches::follow`] looks again at directories being made while it adds
/// watches, before it leaves the rest to their events.
const FOLLOW_ROUNDS: usize = 8;

impl Watches {
    /// Watches each of `directories` (or its nearest existing ancestor while it does not
    /// exist) and stops watching any other directory. Answers the directories whose watch
    /// began now, with the errors of those that could not be watched.
    fn follow(
        &mut self,
        directories: &BTreeSet<PathBuf>,
    ) -> (BTreeSet<PathBuf>, Vec<notify::Error>) {
        let mut began = BTreeSet::new();
        let mut errors = Vec::new();
        let mut targets = nearest_existing(directories);
        for _ in 0..FOLLOW_ROUNDS {
            errors.clear();
            for (directory, id) in &targets {
                if self.on.get(directory) == Some(id) {
                    continue;
                }
                match self.debouncer.watch(directory, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.on.insert(directory.clone(), *id);
                        began.insert(directory.clone());
                    }
                    Err(err) => errors.push(err),
                }
            }
            let stale: Vec<PathBuf> = self
                .on
                .keys()
                .filter(|directory| !targets.contains_key(*directory))
                .cloned()
                .collect();
            for directory in stale {
                self.stop(&directory);
                began.remove(&directory);
            }
            // A directory made (or removed) between looking for it and the watch beginning on
            // its parent sent its event to no watch: look again until nothing moved.
            let now = nearest_existing(directories);
            if now == targets {
                break;
            }
            targets = now;
        }
        (began, errors)
    }

    /// Forgets the watches on `moved` and below: they ended with it, or are on another
    /// directory than their name now says. [`Watches::follow`] begins them again.
    fn forget_under(&mut self, moved: &Path) {
        let ended: Vec<PathBuf> = self
            .on
            .keys()
            .filter(|directory| directory.starts_with(moved))
            .cloned()
            .collect();
        for directory in ended {
            self.stop(&directory);
        }
    }

    /// Forgets every watch (after lost events).
    fn forget_all(&mut self) {
        let all: Vec<PathBuf> = self.on.keys().cloned().collect();
        for directory in all {
            self.stop(&directory);
        }
    }

    fn stop(&mut self, directory: &Path) {
        // A watch whose directory was removed has ended already: nothing to stop.
        if let Err(err) = self.debouncer.unwatch(directory) {
            tracing::debug!(directory = %directory.display(), "watch already ended: {err}");
        }
        self.on.remove(directory);
    }
}

/// Each of `directories`, or its nearest existing ancestor while it does not exist, with the
/// identity of the directory found.
fn nearest_existing(directories: &BTreeSet<PathBuf>) -> BTreeMap<PathBuf, FileId> {
    directories
        .iter()
        .filter_map(|directory| {
            directory
                .ancestors()
                .find_map(|d| Some((d.to_owned(), get_file_id(d).ok()?)))
        })
        .collect()
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Watches `reloader`'s file and the plugin files its config names (through their parent
/// directories): a config edit reloads it; a plugin file written anew is deployed (stores using
/// it switch after their in-flight invocation). After each reload the watch follows the plugin
/// files the config names then, in whatever directory, and stops watching the directories it
/// no longer names. A directory removed and made again is watched again, and the files of a
/// directory whose watch just began are read again, so a change made before is not missed.
/// A symbolic link on the config's path replaced (a ConfigMap update, a deploy's `current`
/// flipped) reloads it from where the path leads now, and the watch follows it there. Every
/// [`LOOK_EVERY`] the config file is read and reloaded if it changed without an event.
pub async fn watch(reloader: Arc<ConfigReloader>) -> Result<ConfigWatcher, notify::Error> {
    let path = reloader.path().to_owned();
    let config = FollowedPath::resolve(&path).ok_or_else(|| {
        notify::Error::generic(&format!(
            "{} does not name a file; pass the config file's path",
            path.display()
        ))
    })?;
    let config_dir = config.file.0.clone();
    if !config_dir.is_dir() {
        return Err(notify::Error::path_not_found().add_path(config_dir));
    }
    let watched = Arc::new(std::sync::Mutex::new(Watched {
        config,
        plugins: BTreeSet::new(),
    }));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
    let seen = watched.clone();
    let debouncer = new_debouncer(
        DEBOUNCE,
        None,
        move |result: DebounceEventResult| match result {
            Ok(events) => {
                let watched = lock(&seen);
                for change in events.iter().flat_map(|event| watched.changes(event)) {
                    let _ = tx.send(change);
                }
            }
            Err(errors) => {
                for err in errors {
                    tracing::warn!("config watch error: {err}");
                }
            }
        },
    )?;
    let watches = Arc::new(std::sync::Mutex::new(Watches {
        debouncer,
        on: BTreeMap::new(),
    }));
    let (_, mut errors) = follow_plugin_files(&reloader, &watched, &watches).await;
    if !lock(&watches).on.contains_key(&config_dir) {
        let err = errors.pop();
        return Err(err.unwrap_or_else(|| notify::Error::path_not_found().add_path(config_dir)));
    }
    warn_unwatched(errors);
    tracing::info!(path = %path.display(), "watching the config file and its plugin files for edits");
    let watching = watches.clone();
    let task = tokio::spawn(async move {
        // Edits saved before the watch began (while the host started its stores, say) sent
        // their events to no watch: the config and every plugin file are looked at once, after
        // the time events take to settle (a file being written as the watch began is read
        // whole), together with the events of that time.
        tokio::time::sleep(DEBOUNCE).await;
        let mut changes = vec![Change::Config, Change::Plugin];
        while let Ok(next) = rx.try_recv() {
            changes.push(next);
        }
        apply(&reloader, &watched, &watching, changes).await;
        let mut look =
            tokio::time::interval_at(tokio::time::Instant::now() + LOOK_EVERY, LOOK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changes = tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    let mut changes = vec![first];
                    while let Ok(next) = rx.try_recv() {
                        changes.push(next);
                    }
                    changes
                }
                _ = look.tick() => {
                    let moved = FollowedPath::resolve(&path)
                        .is_some_and(|now| now != lock(&watched).config);
                    if !moved && !reloader.changed_since_read().await {
                        continue;
                    }
                    if !reloader.waits_for_plugin().await {
                        tracing::info!(
                            path = %path.display(),
                            "the config file changed without an event the watch saw; reading it again"
                        );
                    }
                    vec![Change::Config]
                }
            };
            apply(&reloader, &watched, &watching, changes).await;
        }
    });
    Ok(ConfigWatcher { watches, task })
}

/// Reloads, re-watches and deploys what `changes` ask for.
async fn apply(
    reloader: &ConfigReloader,
    watched: &std::sync::Mutex<Watched>,
    watches: &std::sync::Mutex<Watches>,
    changes: Vec<Change>,
) {
    let (mut reload, mut refresh, mut moved) = (false, false, false);
    for change in changes {
        match change {
            Change::Config => reload = true,
            Change::Plugin => refresh = true,
            Change::Rescan => {
                (reload, refresh, moved) = (true, true, true);
                lock(watches).forget_all();
            }
            Change::Directory(path) => {
                moved = true;
                {
                    let watched = lock(watched);
                    // The files in it are gone, or may be back.
                    reload |= watched.config.directories().any(|d| d.starts_with(&path));
                    refresh |= watched.plugins.iter().any(|(d, _)| d.starts_with(&path));
                }
                lock(watches).forget_under(&path);
            }
        }
    }
    if reload {
        reloader.reload().await;
    }
    let mut began = BTreeSet::new();
    if reload || moved {
        let (now, errors) = follow_plugin_files(reloader, watched, watches).await;
        warn_unwatched(errors);
        began = now;
        let config_dirs: Vec<PathBuf> = lock(watched).config.directories().cloned().collect();
        if config_dirs.iter().any(|d| began.contains(d))
            && matches!(reloader.reload().await, ReloadOutcome::Applied(_))
        {
            // The config was written (or a link on its path replaced) before the watch of its
            // directory began.
            let (now, errors) = follow_plugin_files(reloader, watched, watches).await;
            warn_unwatched(errors);
            began.extend(now);
        }
    }
    if refresh {
        reloader.refresh_plugins().await;
    } else if !began.is_empty() {
        // A plugin file written after the reload read it and before its directory's watch
        // began sent its events to no watch: read those files again.
        let files: BTreeSet<PathBuf> = reloader
            .plugin_files()
            .await
            .into_iter()
            .filter(|file| split(file).is_some_and(|(directory, _)| began.contains(&directory)))
            .collect();
        if !files.is_empty() {
            reloader.refresh_plugin_files(&files).await;
        }
    }
}

fn warn_unwatched(errors: Vec<notify::Error>) {
    for err in errors {
        tracing::warn!(
            "cannot watch a directory of the config or its plugin files; edits there apply at the next config edit: {err}"
        );
    }
}

/// Makes the watch react to the config file (where its path leads now) and the plugin files
/// the running config names now, watching their directories (and no other). Answers the
/// directories whose watch began.
async fn follow_plugin_files(
    reloader: &ConfigReloader,
    watched: &std::sync::Mutex<Watched>,
    watches: &std::sync::Mutex<Watches>,
) -> (BTreeSet<PathBuf>, Vec<notify::Error>) {
    let plugins: BTreeSet<_> = reloader
        .plugin_files()
        .await
        .iter()
        .filter_map(|p| split(p))
        .collect();
    let config = FollowedPath::resolve(reloader.path());
    let directories = {
        let mut watched = lock(watched);
        if let Some(config) = config {
            watched.config = config;
        }
        watched.plugins = plugins;
        watched.directories()
    };
    lock(watches).follow(&directories)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ConfigMap volume's layout: the path leads through both links to the data directory,
    /// and both links (in the mounted directory) are on it; a loop of links ends.
    #[test]
    fn a_path_through_links_is_resolved_with_each_link_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("..2024_A")).unwrap();
        std::os::unix::fs::symlink("..2024_A", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/storehost.toml", root.join("storehost.toml")).unwrap();
        let followed = FollowedPath::resolve(&root.join("storehost.toml")).unwrap();
        assert_eq!(
            followed.file,
            (root.join("..2024_A"), "storehost.toml".into())
        );
        assert_eq!(
            followed.links,
            BTreeSet::from([
                (root.clone(), "..data".into()),
                (root.clone(), "storehost.toml".into())
            ])
        );

        std::os::unix::fs::symlink("loop-b", root.join("loop-a")).unwrap();
        std::os::unix::fs::symlink("loop-a", root.join("loop-b")).unwrap();
        let looped = FollowedPath::resolve(&root.join("loop-a")).unwrap();
        assert_eq!(looped.links.len(), 2);
    }

    /// An edit of a key the running host cannot take live is named in the log, not passed
    /// over as if applied: `[llm]` (the backend is built at start), hibernation's timings
    /// and the spare stores among them.
    #[test]
    fn an_edit_of_a_start_only_key_is_reported() {
        let previous = HostConfig::default();
        let mut next = previous.clone();
        assert!(warn_restart_only(&previous, &next).is_empty());
        next.idle_timeout_ms += 1;
        next.close_files_after_ms += 1;
        next.spare_stores += 1;
        next.llm.model = "another-model".into();
        next.max_stores += 1;
        assert_eq!(
            warn_restart_only(&previous, &next),
            [
                "max_stores",
                "idle_timeout_ms",
                "close_files_after_ms",
                "spare_stores",
                "[llm]"
            ]
        );
    }
}
