//! Test hosts for the control plane: an in-process host whose API state carries webhooks, a
//! reconciler or a config status, on a data directory a test may reuse across "restarts".

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use storehost_api::{AppState, ServeOptions};
use storehost_control::config::StoreSpec;
use storehost_control::{HostSettings, Orchestrator};
use storehost_runtime::RuntimeOptions;
use storehost_store::{Durability, Quotas, RetryPolicy, StoreRuntime};

use crate::{TOKEN, TestHost, programs, target_dir};

/// Options of a control-plane test host.
#[derive(Debug, Clone)]
pub struct ControlHostOptions {
    /// Most stores the host runs.
    pub max_stores: usize,
    /// Data directory to use (to restart on the same data); a fresh one when `None`.
    pub data_dir: Option<PathBuf>,
}

impl Default for ControlHostOptions {
    fn default() -> Self {
        Self {
            max_stores: 100,
            data_dir: None,
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
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let runtime = StoreRuntime::new(RuntimeOptions {
            max_live_sandboxes: 64,
            max_memory_bytes: 256 << 20,
            cache_dir: Some(target_dir().join("test-plugin-cache")),
            ..RuntimeOptions::default()
        })
        .expect("runtime");
        let orchestrator = Arc::new(
            Orchestrator::new(
                runtime,
                HostSettings {
                    data_dir: data_dir.clone(),
                    durability: Durability::Process,
                    retry: RetryPolicy {
                        attempts: 3,
                        base_delay: Duration::from_millis(10),
                        max_delay: Duration::from_millis(50),
                        ..RetryPolicy::default()
                    },
                    max_stores: options.max_stores,
                    defaults: StoreSpec {
                        plugin: "writer".into(),
                        quotas: Quotas::default(),
                        config: BTreeMap::new(),
                    },
                },
            )
            .expect("orchestrator"),
        );
        let wasm = std::fs::read(programs::WRITER).expect("read the writer program");
        orchestrator
            .deploy_plugin("writer", wasm)
            .await
            .expect("deploy writer");
        let state = configure(
            &orchestrator,
            AppState::new(orchestrator.clone(), TOKEN, 64 << 10),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(storehost_api::serve(
            listener,
            storehost_api::app(state),
            ServeOptions::default(),
            async move {
                let _ = stop.await;
            },
        ));
        Self {
            url,
            orchestrator,
            client: reqwest::Client::new(),
            data_dir,
            _dir: dir,
            shutdown: Some(shutdown),
        }
    }

    /// Stops serving and every store (as a shutdown does), so another host can open the data.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.orchestrator.shutdown().await;
    }
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
