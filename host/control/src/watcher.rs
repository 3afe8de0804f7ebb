//! The watched config file: edits apply live through the orchestrator, without a restart.
//!
//! The parent directory is watched, not the file: editors that save by writing a temporary
//! file and renaming it over the original replace the file's inode, and a watch on the file
//! itself goes silent after the first such save. Events are debounced, the file is re-read, a
//! reload whose content hash did not change does nothing, and an edit that does not parse (or
//! names a plugin that cannot load) keeps the last good config running.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind};
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

    /// One line for the log and `/health`, when some store failed.
    pub fn failures(&self) -> Option<String> {
        if self.failed.is_empty() {
            return None;
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
        Some(line)
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
            }),
        }
    }

    /// The config file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times [`ConfigReloader::reload`] read the config file.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The plugin files the running config names.
    pub async fn plugin_files(&self) -> Vec<PathBuf> {
        plugin_files(&self.current.lock().await.running)
    }

    /// Reads the file and applies what changed. Reloads run one at a time.
    pub async fn reload(&self) -> ReloadOutcome {
        let mut current = self.current.lock().await;
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(err) => {
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
        };
        let content_hash = hash(&bytes);
        if content_hash == current.hash {
            return ReloadOutcome::Unchanged;
        }
        current.hash = content_hash;
        let text = String::from_utf8_lossy(&bytes);
        let mut next = match config::parse_str(&text, &self.path) {
            Ok(next) => next,
            Err(errors) => {
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
            .deploy_changed_plugins(&current.running, &next, &mut summary)
            .await
        {
            let outcome = ReloadOutcome::Refused(format!(
                "{message}\n(the edit was not applied; the last good config keeps running)"
            ));
            self.report(&outcome);
            return outcome;
        }
        self.apply_stores(&current.running, &next, &mut summary)
            .await;
        current.running = next;
        current.file = file;
        let outcome = ReloadOutcome::Applied(summary);
        self.report(&outcome);
        outcome
    }

    /// Deploys every plugin file of the running config whose bytes changed (the config itself
    /// is not re-read). A file that cannot be read or loaded keeps the running version.
    pub async fn refresh_plugins(&self) -> ReloadOutcome {
        let current = self.current.lock().await;
        let mut summary = ReloadSummary::default();
        let outcome = match self
            .deploy_changed_plugins(&current.running, &current.running, &mut summary)
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
    /// uploaded through the API since runs until its file changes). A plugin that cannot be
    /// read or loaded refuses the whole edit.
    async fn deploy_changed_plugins(
        &self,
        previous: &HostConfig,
        next: &HostConfig,
        summary: &mut ReloadSummary,
    ) -> Result<(), String> {
        let named_before = previous.plugin_sources();
        for (name, source) in next.plugin_sources() {
            if source == PluginSource::Builtin {
                // Compiled into the binary: deployed at start, it never changes.
                continue;
            }
            let reader = self.read_plugin.clone();
            let (task_name, task_source) = (name.clone(), source.clone());
            let bytes = tokio::task::spawn_blocking(move || reader(&task_name, &task_source))
                .await
                .map_err(|err| format!("reading plugin {name:?} failed: {err}"))?
                .map_err(|err| {
                    let path = match &source {
                        PluginSource::File(path) => path.display().to_string(),
                        PluginSource::Builtin => "(built in)".into(),
                    };
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

    /// Starts, changes and stops stores so the running ones follow `next`.
    async fn apply_stores(
        &self,
        previous: &HostConfig,
        next: &HostConfig,
        summary: &mut ReloadSummary,
    ) {
        let before = previous.store_specs();
        let after = next.store_specs();
        let sources = self.orchestrator.sources().await;
        let gone: BTreeSet<&StoreId> = before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .collect();
        for id in gone {
            // A store the config no longer names is stopped only if the config (or STORE_IDS)
            // still owns it; one taken over by the API or a webhook stays. One whose start
            // failed is forgotten too.
            let owner = match sources.get(id) {
                Some(source) => Some(*source),
                None => self.orchestrator.source(id).await,
            };
            if !owner.is_some_and(|s| s.is_config_owned()) {
                continue;
            }
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
    _debouncer: Box<dyn std::any::Any + Send>,
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

/// How long file events settle before a reload (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What a file event asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The config file changed.
    Config,
    /// A plugin file the config names changed.
    Plugin,
}

/// `path`'s directory (canonical when it exists) and file name.
fn split(path: &Path) -> Option<(PathBuf, std::ffi::OsString)> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    Some((dir, path.file_name()?.to_owned()))
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

/// The files a watch reacts to: the config file, and the plugin files its running config
/// names (each as its canonical directory and file name).
struct Watched {
    config: (PathBuf, std::ffi::OsString),
    plugins: BTreeSet<(PathBuf, std::ffi::OsString)>,
}

impl Watched {
    fn change(&self, path: &Path) -> Option<Change> {
        let changed = split(path)?;
        if changed == self.config {
            Some(Change::Config)
        } else if self.plugins.contains(&changed) {
            Some(Change::Plugin)
        } else {
            None
        }
    }
}

/// Watches `reloader`'s file and the plugin files its config names (through their parent
/// directories): a config edit reloads it; a plugin file written anew is deployed (stores using
/// it switch after their in-flight invocation). After each reload the watch follows the plugin
/// files the config names then, in whatever directory.
pub async fn watch(reloader: Arc<ConfigReloader>) -> Result<ConfigWatcher, notify::Error> {
    let path = reloader.path().to_owned();
    let config = split(&path).ok_or_else(|| {
        notify::Error::generic(&format!(
            "{} does not name a file; pass the config file's path",
            path.display()
        ))
    })?;
    let config_dir = config.0.clone();
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
                let watched = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for event in events.iter().filter(|e| may_change_content(&e.kind)) {
                    for change in event.paths.iter().filter_map(|p| watched.change(p)) {
                        let _ = tx.send(change);
                    }
                }
            }
            Err(errors) => {
                for err in errors {
                    tracing::warn!("config watch error: {err}");
                }
            }
        },
    )?;
    let debouncer = Arc::new(std::sync::Mutex::new(debouncer));
    let mut directories = BTreeSet::new();
    watch_directory(&debouncer, &mut directories, &config_dir)?;
    follow_plugin_files(&reloader, &watched, &debouncer, &mut directories).await;
    tracing::info!(path = %path.display(), "watching the config file and its plugin files for edits");
    let watching = debouncer.clone();
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut config_changed = first == Change::Config;
            while let Ok(next) = rx.try_recv() {
                config_changed |= next == Change::Config;
            }
            if config_changed {
                reloader.reload().await;
                follow_plugin_files(&reloader, &watched, &watching, &mut directories).await;
            } else {
                reloader.refresh_plugins().await;
            }
        }
    });
    Ok(ConfigWatcher {
        _debouncer: Box::new(debouncer),
        task,
    })
}

type Debouncer = notify_debouncer_full::Debouncer<
    notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// Watches `directory` unless it is watched already.
fn watch_directory(
    debouncer: &std::sync::Mutex<Debouncer>,
    directories: &mut BTreeSet<PathBuf>,
    directory: &Path,
) -> Result<(), notify::Error> {
    if directories.contains(directory) {
        return Ok(());
    }
    debouncer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .watch(directory, RecursiveMode::NonRecursive)?;
    directories.insert(directory.to_owned());
    Ok(())
}

/// Makes the watch react to the plugin files the running config names now, watching their
/// directories. A directory that cannot be watched (it does not exist yet) is said in the
/// log; the next config edit tries again.
async fn follow_plugin_files(
    reloader: &ConfigReloader,
    watched: &std::sync::Mutex<Watched>,
    debouncer: &std::sync::Mutex<Debouncer>,
    directories: &mut BTreeSet<PathBuf>,
) {
    let plugins: BTreeSet<_> = reloader
        .plugin_files()
        .await
        .iter()
        .filter_map(|p| split(p))
        .collect();
    for (directory, _) in &plugins {
        if let Err(err) = watch_directory(debouncer, directories, directory) {
            tracing::warn!(
                directory = %directory.display(),
                "cannot watch a plugin file's directory; edits of its plugin files are not deployed until the next config edit: {err}"
            );
        }
    }
    watched
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .plugins = plugins;
}

#[cfg(test)]
mod tests {
    use super::*;

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
