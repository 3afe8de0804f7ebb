//! `storehost serve`: config → control plane → stores → API, until SIGTERM or Ctrl-C.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use storehost_api::{AppState, ConfigStatus, ServeOptions};
use storehost_control::config::{self, HostConfig, PluginSource, ProcessEnv, StoreSpec};
use storehost_control::llm_backend::ServiceBackend;
use storehost_control::reconciler::{Reconciler, ReconcilerSettings};
use storehost_control::registry::Registry;
use storehost_control::watcher::{self, ConfigReloader};
use storehost_control::webhook::{WebhookSettings, Webhooks};
use storehost_control::{ControlError, HostSettings, Orchestrator, StoreSource};
use storehost_runtime::RuntimeOptions;
use storehost_store::{StoreId, StoreRuntime, open_files, sqlite::now_ms};

use crate::admin_token::{self, TokenOrigin};
use crate::cli::ServeArgs;

/// The most sandboxes the pool holds live: each slot reserves its memory ceiling of address
/// space (with guard regions), and 10,000 of them fill a good part of what a process may map.
const MAX_LIVE_SANDBOXES: u32 = 10_000;

/// Runs the server until a shutdown signal, then stops every store cleanly.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Before anything starts: a signal during start-up stops the stores already started
    // cleanly, instead of killing the process.
    let mut signals = ShutdownSignals::listen()?;
    // The file's bytes are read before it is parsed: an edit saved from then on is one the
    // watch applies (see `ConfigReloader::loaded_from`).
    let loaded_bytes = args
        .config
        .as_ref()
        .and_then(|path| std::fs::read(path).ok());
    let (mut config, config_path) = match &args.config {
        Some(path) => (
            config::load_file(path).map_err(|errors| anyhow!("invalid config:\n{errors}"))?,
            Some(path.clone()),
        ),
        None => (HostConfig::embedded_default(), None),
    };
    let report = config::apply_env(&mut config, &ProcessEnv)
        .map_err(|errors| anyhow!("invalid environment:\n{errors}"))?;
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    for error in &report.errors {
        tracing::error!("{error}");
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "could not create the data directory {}",
            config.data_dir.display()
        )
    })?;
    // Held until the process ends: nothing of the directory is read before it.
    crate::data_dir_lock::hold(&config.data_dir, &config.listen.to_string())?;

    let specs = config.store_specs();
    // The engine's memory ceiling and fuel metering are fixed now, so they cover the stores
    // added through the API before a restart as well as the config's: each comes back as it was.
    let persisted = Registry::open(&config.data_dir.join("host.db"))
        .and_then(|registry| registry.all())
        .with_context(|| {
            format!(
                "could not read the host registry {}",
                config.data_dir.join("host.db").display()
            )
        })?;
    let defaults = config.default_quotas();
    let quotas: Vec<_> = specs
        .values()
        .chain(persisted.iter().map(|(_, _, spec)| spec))
        .map(|spec| &spec.quotas)
        .chain([&defaults])
        .collect();
    let max_memory = quotas
        .iter()
        .map(|quotas| quotas.memory)
        .chain([256 << 20])
        .max()
        .unwrap_or(256 << 20);
    if config.max_stores > MAX_LIVE_SANDBOXES as usize {
        tracing::warn!(
            "max_stores = {} is more than the {MAX_LIVE_SANDBOXES} sandboxes the pool holds live: while more than {MAX_LIVE_SANDBOXES} stores are awake at once, the further ones fail their invocations as host_error (no free sandbox slot) until some hibernate; keep idle_timeout_ms short",
            config.max_stores
        );
    }
    match open_files::raise_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(
                before,
                after,
                "raised the open-file limit (ulimit -n) to the most the system allows"
            );
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(
            limit = open_files::limit(),
            "could not raise the open-file limit (ulimit -n) to the most the system allows: {err}"
        ),
    }
    let connections = config.http.max_connections;
    let guest_open_files =
        open_files::for_guests(config.max_stores, config.spare_stores, connections);
    if open_files::room_for_guests(config.max_stores, config.spare_stores, connections)
        < open_files::GUESTS_AT_LEAST
    {
        let host_files = open_files::wanted(config.max_stores, config.spare_stores);
        tracing::warn!(
            "the open-file limit ({}, ulimit -n) leaves plugins less than {} files beside the {host_files} the host may hold for max_stores = {} awake stores and its {connections} connections: they may still hold {guest_open_files} together, and while most stores are awake the host's own opens (databases, event appends, new stores, connections) may fail with \"too many open files\"; raise the hard open-file limit (systemd LimitNOFILE=, ulimit -Hn) to at least {}",
            open_files::limit(),
            open_files::GUESTS_AT_LEAST,
            config.max_stores,
            host_files
                .saturating_add(connections)
                .saturating_add(guest_open_files)
        );
    }
    let runtime = StoreRuntime::new(RuntimeOptions {
        max_live_sandboxes: u32::try_from(config.max_stores)
            .unwrap_or(u32::MAX)
            .clamp(1, MAX_LIVE_SANDBOXES),
        max_memory_bytes: max_memory,
        fuel: quotas.iter().any(|quotas| quotas.fuel_per_call.is_some()),
        cache_dir: Some(config.data_dir.join("cache")),
        guest_open_files,
        ..RuntimeOptions::default()
    })
    .map_err(|err| anyhow!("could not start the wasm runtime: {err:#}"))?;

    let llm = config
        .llm_service(&ProcessEnv)
        .map_err(|err| anyhow!("the LLM provider could not be set up: {err}"))?;
    tracing::info!("LLM provider: {}", config.describe_llm());
    let llm: Arc<dyn storehost_store::LlmBackend> = ServiceBackend::new(Arc::new(llm));

    let orchestrator = Arc::new(Orchestrator::new(
        runtime,
        HostSettings {
            data_dir: config.data_dir.clone(),
            durability: config.durability,
            retry: config.retry.policy(),
            max_stores: config.max_stores,
            defaults: config.default_spec(),
            llm: Some(llm),
            task_catch_up: config.task_catch_up(),
            idle_timeout: config.idle_timeout(),
            close_files_after: config.close_files_after(),
            spare_stores: config.spare_stores,
            config_file: config_path.clone(),
        },
    )?);

    let specs = specs
        .into_iter()
        .map(|(id, spec)| {
            let source = config.source_of(&id);
            (id, spec, source)
        })
        .collect();
    let starting = start_stores(&orchestrator, &config, specs);
    tokio::pin!(starting);
    let started = tokio::select! {
        started = &mut starting => Some(started),
        () = signals.recv() => None,
    };
    match started {
        Some(Ok(())) => {}
        Some(Err(err)) => {
            stop_after_failed_start(&orchestrator, &mut signals, &err).await;
            return Err(err);
        }
        None => {
            tracing::info!(
                "shutting down during start-up: no more stores start; stopping the ones started"
            );
            orchestrator.stop_starting();
            signals.force_exit_on_next();
            // The batch of stores being opened finishes; the rest are not started.
            let finished = starting.await;
            orchestrator.shutdown().await;
            finished?;
            tracing::info!("all stores stopped cleanly");
            return Ok(());
        }
    }

    let bound = async {
        let (token, origin) = admin_token::resolve(&config.admin_token_env, &config.data_dir)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| {
                format!(
                    "could not listen on {}; is another server using the port? (set --listen or PORT)",
                    config.listen
                )
            })?;
        let address = listener.local_addr()?;
        anyhow::Ok((token, origin, listener, address))
    };
    let (token, origin, listener, address) = match bound.await {
        Ok(bound) => bound,
        Err(err) => {
            stop_after_failed_start(&orchestrator, &mut signals, &err).await;
            return Err(err);
        }
    };

    let state = AppState::new(
        orchestrator.clone(),
        &token,
        config.http.max_body_bytes as usize,
    )
    .with_connection_limit(config.http.max_connections);
    if let Ok(mut status) = state.config_status().write() {
        *status = ConfigStatus {
            path: config_path.as_ref().map(|p| p.display().to_string()),
            loaded_at: Some(now_ms()),
            last_error: None,
        };
    }
    let webhooks = Arc::new(Webhooks::new(
        orchestrator.clone(),
        WebhookSettings::new(&config.webhook, config.env.webhook_secret.clone()),
    ));
    if config.env.webhook_secret.is_none() {
        tracing::warn!(
            "WEBHOOK_SECRET is not set: POST /webhooks/workspaces answers 500 until it is"
        );
    }
    let mut state = state
        .with_webhooks(webhooks, config.webhook.requests_per_minute)
        .with_bypass_token(config.env.server_bypass_token.as_ref());
    let interval_from_env = report.applied.contains(&"WORKSPACE_RECONCILE_INTERVAL_MS");
    let reconciler_task = match ReconcilerSettings::from_config(&config, interval_from_env) {
        Some(settings) => {
            tracing::info!(registry = %settings.url, interval_ms = settings.interval.as_millis() as u64, "reconciler enabled");
            let reconciler = Reconciler::new(orchestrator.clone(), settings);
            state = state.with_reconciler(reconciler.clone());
            Some(reconciler.spawn())
        }
        None => {
            if interval_from_env {
                tracing::warn!(
                    "WORKSPACE_RECONCILE_INTERVAL_MS is set, but no registry is configured \
                     (AUTH_WORKER_INTERNAL_URL or [registry] url): no reconciler runs"
                );
            }
            None
        }
    };
    let _config_watcher = match &config_path {
        Some(path) => {
            let listener = state.config_reload_listener();
            let read_plugin: watcher::PluginReader = Arc::new(|_name, source| match source {
                PluginSource::Builtin => Ok(crate::BUILTIN_AGENT.to_vec()),
                PluginSource::File(path) => std::fs::read(path),
            });
            let reloader = ConfigReloader::new(
                path.clone(),
                config.clone(),
                orchestrator.clone(),
                read_plugin,
                listener,
            );
            let reloader = Arc::new(match &loaded_bytes {
                Some(bytes) => reloader.loaded_from(bytes),
                None => reloader,
            });
            match watcher::watch(reloader).await {
                Ok(watch) => Some(watch),
                Err(err) => {
                    tracing::error!(path = %path.display(), "cannot watch the config file; edits apply only at the next start: {err}");
                    None
                }
            }
        }
        None => None,
    };
    println!("storehost listening on http://{address}");
    match origin {
        TokenOrigin::Generated => println!(
            "admin token (shown once, saved to {}): {token}",
            config.data_dir.join("admin.token").display()
        ),
        TokenOrigin::File => println!(
            "admin token: in {}",
            config.data_dir.join("admin.token").display()
        ),
        TokenOrigin::Env(var) => println!("admin token: from ${var}"),
    }

    let options = ServeOptions {
        max_connections: config.http.max_connections,
        max_connections_per_ip: config.http.max_connections_per_ip,
        header_read_timeout: config.http.header_read_timeout(),
        write_timeout: config.http.write_timeout(),
        shutdown_grace: config.http.shutdown_grace(),
    };
    let draining = state.clone();
    let shutdown = async move {
        signals.recv().await;
        signals.force_exit_on_next();
        tracing::info!("shutting down: refusing new requests, finishing in-flight work");
        draining.start_draining();
    };
    storehost_api::serve(listener, storehost_api::app(state), options, shutdown).await;
    if let Some(task) = reconciler_task {
        task.abort();
    }
    drop(_config_watcher);
    orchestrator.shutdown().await;
    tracing::info!("all stores stopped cleanly");
    Ok(())
}

/// Stops the stores a start-up that then failed had started (cleanly, as at a shutdown),
/// before the error is reported; a signal meanwhile ends the process at once.
async fn stop_after_failed_start(
    orchestrator: &Orchestrator,
    signals: &mut ShutdownSignals,
    err: &anyhow::Error,
) {
    tracing::error!("start-up failed ({err:#}); stopping the stores it started");
    tokio::select! {
        () = orchestrator.shutdown() => {}
        () = signals.recv() => {
            tracing::warn!("signal: exiting now without waiting for the stores to stop");
            std::process::exit(1);
        }
    }
}

/// Loads the config's plugins, then starts the config's stores and those added through the
/// API before the last stop. A store that cannot start is logged and left out; a plugin that
/// cannot load stops the host.
async fn start_stores(
    orchestrator: &Orchestrator,
    config: &HostConfig,
    specs: Vec<(StoreId, StoreSpec, StoreSource)>,
) -> anyhow::Result<()> {
    for (name, source) in config.plugin_sources() {
        if orchestrator.is_stopping() {
            // A signal came: no store will start, so no more plugins are compiled.
            return Ok(());
        }
        let plugin = match &source {
            PluginSource::Builtin => orchestrator
                .deploy_plugin(&name, crate::BUILTIN_AGENT.to_vec())
                .await
                .map(Some),
            PluginSource::File(path) => {
                let bytes = std::fs::read(path).with_context(|| {
                    format!("could not read plugin {name:?} from {}", path.display())
                })?;
                orchestrator.deploy_plugin_file(&name, bytes, false).await
            }
        }
        .with_context(|| format!("plugin {name:?} could not be loaded"))?;
        if let Some(plugin) = plugin {
            tracing::info!(plugin = %name, sha256 = plugin.sha256(), "plugin ready");
        }
    }
    // Versions uploaded through the API (newer than their config file's, if any) replace
    // the files' before any store starts.
    orchestrator.restore_plugins().await?;

    if orchestrator.is_stopping() {
        return Ok(());
    }
    let mut not_started = 0;
    for (id, answer) in orchestrator.ensure_running_many(specs).await {
        match answer {
            Err(ControlError::ShuttingDown) => not_started += 1,
            Err(err) => tracing::error!(store_id = %id, "could not start the store: {err}"),
            Ok(_) => {}
        }
    }
    if not_started > 0 {
        tracing::info!("{not_started} stores of the config not started: the host shuts down");
    }
    let restored = orchestrator.restore_persisted().await?;
    if restored > 0 {
        tracing::info!("{restored} stores added through the API restored");
    }
    Ok(())
}

/// How long after the first shutdown signal another one is taken as the same request.
const FORCE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGTERM and Ctrl-C, listened for from the moment `serve` starts: a signal sent while the
/// stores start, or as soon as "listening" is printed, stops every store started cleanly (the
/// default action would kill the process outright, as it did when the handlers were set up on
/// the accept loop's first poll).
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal.
    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }

    /// A signal [`FORCE_AFTER`] or more after this call ends the process at once, with
    /// status 1: a second Ctrl-C or SIGTERM while the stores stop is an operator who will not
    /// wait. One sooner is the same request delivered twice (GNU `timeout` signals its child
    /// and then its process group; a terminal's Ctrl-C reaches a wrapper that forwards it
    /// too) and is ignored. No accepted event is lost — each store's databases recover at
    /// the next start as after `kill -9`, and invocations cut off run again.
    fn force_exit_on_next(mut self) {
        let first = std::time::Instant::now();
        tracing::info!(
            "send SIGTERM or Ctrl-C again, a second or more from now, to exit at once without waiting for the stores to stop"
        );
        tokio::spawn(async move {
            loop {
                self.recv().await;
                if first.elapsed() >= FORCE_AFTER {
                    break;
                }
                tracing::debug!("a signal right after the first: taken as the same request");
            }
            tracing::warn!(
                "second signal: exiting now without waiting for the stores to stop (no accepted event is lost; each store recovers at the next start, and invocations cut off run again)"
            );
            std::process::exit(1);
        });
    }
}
