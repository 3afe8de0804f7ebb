//! Test hosts for the control plane: an in-process host whose API state carries webhooks, a
//! reconciler or a config status, on a data directory a test may reuse across "restarts".

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use storehost_api::AppState;
use storehost_control::config::{self, PluginSource};
use storehost_control::watcher::{self, ConfigReloader, ConfigWatcher};
use storehost_control::{Orchestrator, StoreSource};

use crate::{TestHost, TestHostOptions, programs};

/// Options of a control-plane test host.
#[derive(Debug, Clone)]
pub struct ControlHostOptions {
    /// Most stores the host runs.
    pub max_stores: usize,
    /// Data directory to use (to restart on the same data); a fresh one when `None`.
    pub data_dir: Option<PathBuf>,
    /// Idle time after which a store hibernates (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// How much longer a hibernated store waits before it closes its files.
    pub close_files_after: Duration,
    /// The config file the host runs (`None`: the embedded default); [`watched_with`] sets it.
    pub config_file: Option<PathBuf>,
}

impl Default for ControlHostOptions {
    fn default() -> Self {
        Self {
            max_stores: 100,
            data_dir: None,
            idle_timeout: None,
            close_files_after: Duration::ZERO,
            config_file: None,
        }
    }
}

impl TestHost {
    /// A host whose default plugin is `writer` (already deployed), with `configure` adding
    /// control-plane parts (webhooks, reconciler…) to its API state before it serves.
    pub async fn start_control(
        options: ControlHostOptions,
        configure: impl FnOnce(&Arc<Orchestrator>, AppState) -> AppState,
    ) -> Self {
        Self::start_configured(
            TestHostOptions {
                max_stores: options.max_stores,
                data_dir: options.data_dir,
                idle_timeout: options.idle_timeout,
                close_files_after: options.close_files_after,
                config_file: options.config_file,
                ..TestHostOptions::default()
            },
            &[("writer", programs::WRITER)],
            configure,
        )
        .await
    }

    /// Stops serving and every store (as a shutdown does), so another host can open the data.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.orchestrator.shutdown().await;
    }
}

/// A host running the stores of the config at `path` (at most `max_stores`), watching it.
pub struct Watched {
    /// The host.
    pub host: TestHost,
    /// What applies the config's edits.
    pub reloader: Arc<ConfigReloader>,
    /// How many times the host has read a plugin file the config names.
    pub plugin_reads: Arc<std::sync::atomic::AtomicUsize>,
    _watch: ConfigWatcher,
}

impl Watched {
    /// The directories the watch is on now.
    pub fn watched_directories(&self) -> Vec<PathBuf> {
        self._watch.directories()
    }
}

/// Starts a host on the config at `path`: its plugins deployed, its stores running, and the
/// file watched (edits apply live). Every store of the config must start.
pub async fn watched(path: &Path, max_stores: usize) -> Watched {
    let options = ControlHostOptions {
        max_stores,
        ..ControlHostOptions::default()
    };
    let (watched, failed) = watched_with(path, options, |_, state| state).await;
    assert!(failed.is_empty(), "config stores did not start: {failed:?}");
    watched
}

/// Called with a plugin file's path each time the host has read it, before the host uses the
/// bytes: a test changes the file there to race the host's reads against its watch.
pub type AfterPluginRead = Arc<dyn Fn(&Path) + Send + Sync>;

/// [`watched`], with `after_read` called after each read of a plugin file the config names.
pub async fn watched_after_reads(
    path: &Path,
    max_stores: usize,
    after_read: AfterPluginRead,
) -> Watched {
    let options = ControlHostOptions {
        max_stores,
        ..ControlHostOptions::default()
    };
    let (watched, failed) =
        start_watched(path, options, |_, state| state, Some(after_read), None).await;
    assert!(failed.is_empty(), "config stores did not start: {failed:?}");
    watched
}

/// [`watched`] with `options`, `configure` adding parts (webhooks…) to its API state, and the
/// config's stores started as `storehost serve` starts them: one that cannot start is a failed
/// store (answered with why), and the others go on.
pub async fn watched_with(
    path: &Path,
    options: ControlHostOptions,
    configure: impl FnOnce(&Arc<Orchestrator>, AppState) -> AppState,
) -> (Watched, Vec<(storehost_store::StoreId, String)>) {
    start_watched(path, options, configure, None, None).await
}

/// [`watched`], with `edit` called once the config's stores have started and before the watch
/// begins: an edit saved while the host starts.
pub async fn watched_edited_during_start(
    path: &Path,
    max_stores: usize,
    edit: Box<dyn FnOnce() + Send>,
) -> Watched {
    let options = ControlHostOptions {
        max_stores,
        ..ControlHostOptions::default()
    };
    let (watched, failed) = start_watched(path, options, |_, state| state, None, Some(edit)).await;
    assert!(failed.is_empty(), "config stores did not start: {failed:?}");
    watched
}

async fn start_watched(
    path: &Path,
    options: ControlHostOptions,
    configure: impl FnOnce(&Arc<Orchestrator>, AppState) -> AppState,
    after_read: Option<AfterPluginRead>,
    during_start: Option<Box<dyn FnOnce() + Send>>,
) -> (Watched, Vec<(storehost_store::StoreId, String)>) {
    // Read before it is parsed, as `storehost serve` reads it.
    let loaded = std::fs::read(path).unwrap();
    let config = config::load_file(path).unwrap_or_else(|e| panic!("{e}"));
    let options = ControlHostOptions {
        config_file: Some(path.to_owned()),
        ..options
    };
    let plugin_reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reads = plugin_reads.clone();
    let read_plugin: watcher::PluginReader = Arc::new(move |_name, source| match source {
        PluginSource::File(path) => {
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let bytes = std::fs::read(path);
            if let Some(after_read) = &after_read {
                after_read(path);
            }
            bytes
        }
        PluginSource::Builtin => Err(std::io::ErrorKind::NotFound.into()),
    });
    let mut listener = None;
    let host = TestHost::start_control(options, |orchestrator, state| {
        listener = Some(state.config_reload_listener());
        configure(orchestrator, state)
    })
    .await;
    for (name, source) in config.plugin_sources() {
        if let PluginSource::File(path) = source {
            let wasm = std::fs::read(&path).unwrap();
            host.orchestrator
                .deploy_plugin_file(&name, wasm, false)
                .await
                .unwrap();
        }
    }
    let specs = config
        .store_specs()
        .into_iter()
        .map(|(id, spec)| (id, spec, StoreSource::Config))
        .collect();
    let failed = host
        .orchestrator
        .ensure_running_many(specs)
        .await
        .into_iter()
        .filter_map(|(id, answer)| Some((id, answer.err()?.to_string())))
        .collect();
    if let Some(edit) = during_start {
        edit();
    }
    // Made once the stores have started, as `storehost serve` makes it.
    let reloader = Arc::new(
        ConfigReloader::new(
            path,
            config.clone(),
            host.orchestrator.clone(),
            read_plugin,
            listener.unwrap(),
        )
        .loaded_from(&loaded),
    );
    let watch = watcher::watch(reloader.clone())
        .await
        .expect("watch the config directory");
    let watched = Watched {
        host,
        reloader,
        plugin_reads,
        _watch: watch,
    };
    (watched, failed)
}

/// Polls `check` until it holds (giving up after a minute, a bound only a broken host reaches).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting until {what}");
}

/// `state` answering provisioning webhooks on `orchestrator` with the secret `secret` (a
/// signature is checked when sent, not required; 5 minutes' tolerance, replays kept an hour),
/// up to `per_minute` a minute: what the tests that post webhooks start with.
pub fn with_webhooks(
    orchestrator: &Arc<Orchestrator>,
    state: AppState,
    secret: &str,
    per_minute: u32,
) -> AppState {
    let settings = storehost_control::webhook::WebhookSettings {
        secret: Some(config::Secret::new(secret)),
        require_signature: false,
        tolerance: Duration::from_secs(300),
        replay_retention: Duration::from_secs(3600),
    };
    state.with_webhooks(
        Arc::new(storehost_control::webhook::Webhooks::new(
            orchestrator.clone(),
            settings,
        )),
        per_minute,
    )
}
