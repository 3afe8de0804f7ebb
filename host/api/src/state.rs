//! What every route shares.

use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use storehost_control::Orchestrator;
use storehost_control::config::Secret;
use storehost_control::reconciler::Reconciler;
use storehost_control::watcher::{ReloadListener, ReloadOutcome};
use storehost_control::webhook::Webhooks;

/// Rate limiter of webhook calls, keyed by source address.
pub(crate) type SourceLimiter = governor::DefaultKeyedRateLimiter<String>;

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
    /// Turns `true` when the host starts shutting down (long-lived responses end on it).
    pub(crate) shutting_down: tokio::sync::watch::Sender<bool>,
    pub(crate) webhooks: Option<Arc<Webhooks>>,
    pub(crate) webhook_limiter: Option<Arc<SourceLimiter>>,
    pub(crate) reconciler: Option<Arc<Reconciler>>,
    pub(crate) metrics: Arc<crate::routes::metrics::HostCounters>,
    /// Answers the host's clients have not read yet, in KiB (see [`crate::answers`]).
    pub(crate) unread_answers: Arc<tokio::sync::Semaphore>,
    /// Places for store tokens' event streams and long-polls across all stores (see
    /// [`AppState::with_connection_limit`]).
    pub(crate) followers: Arc<tokio::sync::Semaphore>,
    bypass_token_sha256: Option<[u8; 32]>,
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
            shutting_down: tokio::sync::watch::Sender::new(false),
            webhooks: None,
            webhook_limiter: None,
            reconciler: None,
            metrics: Arc::default(),
            unread_answers: crate::answers::host_allowance(),
            followers: Arc::new(tokio::sync::Semaphore::new(followers_within(1024))),
            bypass_token_sha256: None,
        }
    }

    /// Sizes the host-wide cap on store tokens' event streams and long-polls for a server
    /// taking at most `max_connections` (half of them): each store serves at most
    /// [`storehost_store::MAX_FOLLOWERS`], but 16 stores' followers took every connection,
    /// and `/health`, the admin API and every other tenant waited in the kernel's backlog.
    pub fn with_connection_limit(mut self, max_connections: usize) -> Self {
        self.followers = Arc::new(tokio::sync::Semaphore::new(followers_within(
            max_connections,
        )));
        self
    }

    /// Serves `POST /webhooks/workspaces` with `webhooks`, at most `requests_per_minute` calls
    /// per source address (without it, webhooks answer 500: not configured).
    pub fn with_webhooks(mut self, webhooks: Arc<Webhooks>, requests_per_minute: u32) -> Self {
        let per_minute = std::num::NonZeroU32::new(requests_per_minute.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        self.webhooks = Some(webhooks);
        self.webhook_limiter = Some(Arc::new(governor::RateLimiter::keyed(
            governor::Quota::per_minute(per_minute),
        )));
        self
    }

    /// Serves `POST /admin/reconcile` and the reconciler's `/health` status with `reconciler`.
    pub fn with_reconciler(mut self, reconciler: Arc<Reconciler>) -> Self {
        self.reconciler = Some(reconciler);
        self
    }

    /// Accepts `token` (`SERVER_BYPASS_TOKEN`) on the operations routes (`/admin/reconcile`).
    pub fn with_bypass_token(mut self, token: Option<&Secret>) -> Self {
        self.bypass_token_sha256 = token.map(|t| Sha256::digest(t.expose().as_bytes()).into());
        self
    }

    /// A listener for the config watcher that keeps `/health`'s `config` current: a refused
    /// edit sets `lastError`; an applied one sets `loadedAt` (and `lastError` when some store
    /// of it failed).
    pub fn config_reload_listener(&self) -> ReloadListener {
        let status = self.config_status.clone();
        let metrics = self.metrics.clone();
        Arc::new(move |outcome: &ReloadOutcome| {
            metrics.count_reload(outcome);
            let Ok(mut status) = status.write() else {
                return;
            };
            match outcome {
                ReloadOutcome::Unchanged => {}
                ReloadOutcome::Applied(summary) => {
                    status.loaded_at = Some(storehost_store::sqlite::now_ms());
                    status.last_error = summary.failures();
                }
                ReloadOutcome::Refused(message) => status.last_error = Some(message.clone()),
            }
        })
    }

    /// Whether `token` is the `SERVER_BYPASS_TOKEN` (compared in constant time).
    pub(crate) fn is_bypass(&self, token: &str) -> bool {
        let Some(expected) = self.bypass_token_sha256 else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        subtle::ConstantTimeEq::ct_eq(&given[..], &expected[..]).into()
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

    /// Marks the host as shutting down: new requests get 503, event streams end.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shutting_down.send_replace(true);
    }
}

/// The store tokens' followers a server of `max_connections` takes at once: half of them
/// (one at least), so as many are left for everything else.
fn followers_within(max_connections: usize) -> usize {
    (max_connections / 2).max(1)
}
