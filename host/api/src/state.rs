//! What every route shares.

use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use storehost_control::Orchestrator;

/// The config file's status, shown by `/health`.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// The config file, or `null` for the embedded default.
    pub path: Option<String>,
    /// When it was last loaded (ms since the Unix epoch).
    pub loaded_at: Option<i64>,
    /// The last error reading it, if the last edit was refused.
    pub last_error: Option<String>,
}

/// Shared state of the HTTP API.
#[derive(Clone)]
pub struct AppState {
    pub(crate) orchestrator: Arc<Orchestrator>,
    admin_token_sha256: [u8; 32],
    pub(crate) max_body_bytes: usize,
    pub(crate) max_plugin_bytes: usize,
    pub(crate) config_status: Arc<RwLock<ConfigStatus>>,
    pub(crate) draining: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl AppState {
    /// State for a host with `admin_token`; bodies up to `max_body_bytes`.
    pub fn new(orchestrator: Arc<Orchestrator>, admin_token: &str, max_body_bytes: usize) -> Self {
        Self {
            orchestrator,
            admin_token_sha256: Sha256::digest(admin_token.as_bytes()).into(),
            max_body_bytes,
            max_plugin_bytes: 64 << 20,
            config_status: Arc::default(),
            draining: Arc::default(),
        }
    }

    /// The config status `/health` reports (the control plane updates it on reloads).
    pub fn config_status(&self) -> Arc<RwLock<ConfigStatus>> {
        self.config_status.clone()
    }

    /// Whether `token` is the admin token (compared in constant time).
    pub(crate) fn is_admin(&self, token: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        given
            .iter()
            .zip(self.admin_token_sha256.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Marks the host as shutting down: new requests get 503.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
