//! Test hosts for the control plane: an in-process host whose API state carries webhooks, a
//! reconciler or a config status, on a data directory a test may reuse across "restarts".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use storehost_api::AppState;
use storehost_control::Orchestrator;

use crate::{TestHost, TestHostOptions, programs};

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
        Self::start_configured(
            TestHostOptions {
                max_stores: options.max_stores,
                data_dir: options.data_dir,
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
