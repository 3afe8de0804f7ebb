//! The reconciler (SPEC §7): compares the running stores with the authoritative workspace
//! registry and repairs drift — adds missing stores, removes orphans after a grace period.
//!
//! Safety rails: one pass at a time; a pass that would remove more than a configured share of
//! the stores removes nothing (an empty or truncated registry answer must not wipe the host);
//! while the registry fails, passes back off exponentially and nothing is removed; stores the
//! config file or `STORE_IDS` own are never removed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use storehost_store::{StoreId, sqlite::now_ms};

use crate::config::{HostConfig, Secret};
use crate::orchestrator::{ControlError, Orchestrator, Provisioned, StoreSource};
use crate::webhook::rfc3339;

/// First delay after a failed pass; it doubles with each further failure, up to the interval.
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Most registry pages followed in one pass (a loop of `next` links ends there).
const MAX_PAGES: usize = 10_000;

/// Largest page of the registry's list a pass reads (a page of 100,000 entries is a few MB):
/// a larger answer — a registry gone wrong, or something else at its address — was read whole
/// into the host's memory, which every store shares.
pub const MAX_PAGE_BYTES: usize = 16 << 20;

/// A request to the registry that failed, with why: every cause reqwest's own message leaves
/// out (the refused connection, the unknown host), and the timeout that ended a request when
/// one did ("error sending request" was all an operator saw of a registry that hung).
fn request_failed(url: &reqwest::Url, err: &reqwest::Error, timeout: Duration) -> ReconcileError {
    let mut why = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !why.contains(&inner_text) {
            why = format!("{why}: {inner_text}");
        }
        cause = inner.source();
    }
    if err.is_timeout() {
        why = format!(
            "no answer within {} ms (the registry's request_timeout_ms): {why}",
            timeout.as_millis()
        );
    }
    ReconcileError::Registry(format!("GET {url}: {why}"))
}

/// The body of a registry page, refused past [`MAX_PAGE_BYTES`] as soon as it passes them.
async fn read_page(
    mut response: reqwest::Response,
    url: &reqwest::Url,
    timeout: Duration,
) -> Result<Vec<u8>, ReconcileError> {
    let too_large = || {
        ReconcileError::Registry(format!(
            "GET {url}: the answer is larger than {MAX_PAGE_BYTES} bytes; a pass reads no \
             larger page (page the list with `next` links)"
        ))
    };
    if response
        .content_length()
        .is_some_and(|length| length > MAX_PAGE_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| request_failed(url, &err, timeout))?
    {
        if body.len() + chunk.len() > MAX_PAGE_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The wait before the next pass after `failures` failed passes in a row: 5 s, doubling with
/// each further failure, never longer than the regular `interval`.
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << doublings).min(interval)
}

/// How the reconciler runs.
#[derive(Debug, Clone)]
pub struct ReconcilerSettings {
    /// The registry's base URL; passes GET `{url}/internal/workspaces`.
    pub url: String,
    /// Sent as `Authorization: Bearer` (`SERVER_BYPASS_TOKEN`).
    pub token: Option<Secret>,
    /// Time between passes.
    pub interval: Duration,
    /// How long a store missing from the registry is kept.
    pub grace_period: Duration,
    /// Largest share (0 to 1) of the running stores one pass may remove.
    pub max_removal_share: f64,
    /// Shortest time between manual passes (`POST /admin/reconcile`).
    pub manual_min_interval: Duration,
    /// Deadline of one registry request.
    pub request_timeout: Duration,
}

impl ReconcilerSettings {
    /// The settings of `config`, or `None` when no registry URL is configured.
    /// `interval_from_env` says whether `WORKSPACE_RECONCILE_INTERVAL_MS` was set (it wins over
    /// `[registry] interval_ms`).
    pub fn from_config(config: &HostConfig, interval_from_env: bool) -> Option<Self> {
        let url = config
            .env
            .auth_worker_internal_url
            .clone()
            .or_else(|| config.registry.url.clone())?;
        let interval_ms = if interval_from_env {
            config.env.workspace_reconcile_interval_ms
        } else {
            config.registry.interval_ms
        };
        Some(Self {
            url: url.trim_end_matches('/').to_owned(),
            token: config.env.server_bypass_token.clone(),
            interval: Duration::from_millis(interval_ms),
            grace_period: Duration::from_millis(config.registry.grace_period_ms),
            max_removal_share: config.registry.max_removal_share,
            manual_min_interval: Duration::from_millis(config.env.manual_reconcile_min_interval_ms),
            request_timeout: Duration::from_millis(config.registry.request_timeout_ms),
        })
    }
}

/// What `/health` shows about the reconciler.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcilerStatus {
    /// Whether a registry is configured.
    pub enabled: bool,
    /// When the last pass started (ms since the Unix epoch).
    pub last_run_at: Option<i64>,
    /// When a pass last completed (ms since the Unix epoch).
    pub last_success_at: Option<i64>,
    /// Why the last pass failed or was held back, if it did.
    pub last_error: Option<String>,
    /// Stores missing plus orphans found by the last completed pass.
    pub drift: Option<usize>,
    /// Whether a pass runs now.
    pub running: bool,
    /// Failed passes in a row (the next one waits longer each time).
    pub consecutive_failures: u32,
    /// When the next scheduled pass starts (ms since the Unix epoch).
    pub next_run_at: Option<i64>,
    /// Orphans kept through their grace period, by the last pass.
    pub pending_removals: usize,
    /// Passes completed since the host started.
    pub passes_completed: u64,
    /// Passes failed (registry unreadable) since the host started.
    pub passes_failed: u64,
}

/// A store a pass could not add or remove.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedChange {
    /// The store.
    pub store_id: String,
    /// Why.
    pub error: String,
}

/// What one pass did (`result` of `POST /admin/reconcile`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassResult {
    /// Stores started because the registry lists them.
    pub added: Vec<String>,
    /// Orphans removed (their grace period was over; data archived).
    pub removed: Vec<String>,
    /// Stores that could not be started.
    pub failed_adds: Vec<FailedChange>,
    /// Orphans that could not be removed.
    pub failed_removals: Vec<FailedChange>,
    /// Valid workspaces in the registry.
    pub authoritative_count: usize,
    /// Stores running when the pass began.
    pub monitored_count: usize,
    /// Registry entries skipped because they had no valid `instanceId`.
    pub skipped_entries: usize,
    /// Orphans kept because their grace period is not over.
    pub pending_removals: Vec<String>,
    /// Why removals were held back by the max-removal guard, when they were.
    pub removals_blocked: Option<String>,
}

/// A completed pass.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassReport {
    /// Always `"completed"`.
    pub status: &'static str,
    /// How long the pass took.
    pub duration_ms: u64,
    /// What it did.
    pub result: PassResult,
    /// Stores missing plus orphans found.
    pub drift_count: usize,
    /// When the pass started (RFC 3339).
    pub triggered_at: String,
}

/// Why a pass did not run or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReconcileError {
    /// Another pass runs now.
    #[error("a reconcile pass is already running; wait for it to finish")]
    Busy,
    /// A manual pass ran too recently.
    #[error(
        "a manual reconcile ran less than MANUAL_RECONCILE_MIN_INTERVAL_MS ago; retry in {} s",
        whole_seconds(*retry_after)
    )]
    TooSoon {
        /// When the next manual pass is allowed.
        retry_after: Duration,
    },
    /// The registry could not be read; nothing was changed.
    #[error("the workspace registry could not be read: {0}; nothing was changed")]
    Registry(String),
    /// The host's own records (host.db) could not be written part-way through a pass: the
    /// stores it added stay, nothing was removed.
    #[error(
        "the host could not record which stores the registry lacks ({0}); the missing stores it added stay, nothing was removed"
    )]
    Host(String),
}

impl ReconcileError {
    /// The whole seconds a `TooSoon` asks to wait: what its message says, and so what an
    /// HTTP answer's `Retry-After` must say.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ReconcileError::TooSoon { retry_after } => Some(whole_seconds(*retry_after)),
            _ => None,
        }
    }
}

/// `wait` rounded up to whole seconds, at least one: a client waiting less than asked would
/// be refused again.
fn whole_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Keeps the running stores in line with the authoritative registry.
pub struct Reconciler {
    orchestrator: Arc<Orchestrator>,
    settings: ReconcilerSettings,
    client: reqwest::Client,
    pass: tokio::sync::Mutex<()>,
    status: std::sync::Mutex<ReconcilerStatus>,
    manual: std::sync::Mutex<ManualPacing>,
}

/// When the next manual pass may run: the moment its wait began and how long it lasts. No
/// `Instant` is moved back: where one before the clock's origin cannot be represented (as on
/// Windows, whose clock starts at boot), a "last pass" backdated by more than the machine had
/// run was `None`, and turned the pacing off.
#[derive(Debug, Default)]
struct ManualPacing {
    wait: Option<(Instant, Duration)>,
}

impl ManualPacing {
    /// Admits a manual pass at `now` and holds the next back for `min_interval`; or answers
    /// how much longer the caller must wait.
    fn admit(&mut self, now: Instant, min_interval: Duration) -> Result<(), Duration> {
        if let Some((since, wait)) = self.wait {
            let waited = now.saturating_duration_since(since);
            if waited < wait {
                return Err(wait - waited);
            }
        }
        self.wait = Some((now, min_interval));
        Ok(())
    }

    /// The registry failed the pass admitted last: the operator who fixes it may try again
    /// after the first backoff's wait, not the whole `min_interval`.
    fn registry_failed(&mut self, now: Instant, min_interval: Duration) {
        self.wait = Some((now, BACKOFF_BASE.min(min_interval)));
    }
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler for `orchestrator`'s stores.
    pub fn new(orchestrator: Arc<Orchestrator>, settings: ReconcilerSettings) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()
            .unwrap_or_default();
        Arc::new(Self {
            orchestrator,
            settings,
            client,
            pass: tokio::sync::Mutex::new(()),
            status: std::sync::Mutex::new(ReconcilerStatus {
                enabled: true,
                ..ReconcilerStatus::default()
            }),
            manual: std::sync::Mutex::new(ManualPacing::default()),
        })
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &ReconcilerSettings {
        &self.settings
    }

    /// What `/health` shows.
    pub fn status(&self) -> ReconcilerStatus {
        self.status_mut().clone()
    }

    fn status_mut(&self) -> std::sync::MutexGuard<'_, ReconcilerStatus> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs the first pass now, then one every interval (sooner, backing off, after failures).
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let delay = match this.run_pass().await {
                    Ok(_) => this.settings.interval,
                    Err(ReconcileError::Busy) => this.settings.interval,
                    Err(_) => backoff(this.status().consecutive_failures, this.settings.interval),
                };
                let next = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
                this.status_mut().next_run_at = Some(next);
                tokio::time::sleep(delay).await;
            }
        })
    }

    /// A pass asked for by an operator: refused while one runs, or too soon after the last.
    pub async fn run_manual(&self) -> Result<PassReport, ReconcileError> {
        let guard = self.pass.try_lock().map_err(|_| ReconcileError::Busy)?;
        self.manual_pacing()
            .admit(Instant::now(), self.settings.manual_min_interval)
            .map_err(|retry_after| ReconcileError::TooSoon { retry_after })?;
        let passed = self.pass_locked(guard).await;
        if matches!(passed, Err(ReconcileError::Registry(_))) {
            // The scheduled passes back off meanwhile.
            self.manual_pacing()
                .registry_failed(Instant::now(), self.settings.manual_min_interval);
        }
        passed
    }

    fn manual_pacing(&self) -> std::sync::MutexGuard<'_, ManualPacing> {
        self.manual
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One pass; refused while another runs.
    pub async fn run_pass(&self) -> Result<PassReport, ReconcileError> {
        let guard = self.pass.try_lock().map_err(|_| ReconcileError::Busy)?;
        self.pass_locked(guard).await
    }

    async fn pass_locked(
        &self,
        _guard: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<PassReport, ReconcileError> {
        let started = Instant::now();
        let started_at = now_ms();
        {
            let mut status = self.status_mut();
            status.running = true;
            status.last_run_at = Some(started_at);
        }
        let outcome = self.pass_inner().await;
        let mut status = self.status_mut();
        status.running = false;
        match outcome {
            Ok((result, drift)) => {
                status.last_success_at = Some(now_ms());
                status.passes_completed += 1;
                status.consecutive_failures = 0;
                status.drift = Some(drift);
                status.pending_removals = result.pending_removals.len();
                status.last_error = result.removals_blocked.clone().or_else(|| {
                    (!result.failed_adds.is_empty() || !result.failed_removals.is_empty()).then(
                        || {
                            format!(
                                "{} stores could not be added and {} could not be removed; see the last pass's result",
                                result.failed_adds.len(),
                                result.failed_removals.len()
                            )
                        },
                    )
                });
                tracing::info!(
                    added = result.added.len(),
                    removed = result.removed.len(),
                    failed_adds = result.failed_adds.len(),
                    failed_removals = result.failed_removals.len(),
                    pending = result.pending_removals.len(),
                    drift,
                    "reconcile pass completed"
                );
                Ok(PassReport {
                    status: "completed",
                    duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    result,
                    drift_count: drift,
                    triggered_at: rfc3339(started_at),
                })
            }
            Err(err) => {
                status.consecutive_failures += 1;
                status.passes_failed += 1;
                status.last_error = Some(err.to_string());
                tracing::warn!(
                    failures = status.consecutive_failures,
                    "reconcile pass failed: {err}"
                );
                Err(err)
            }
        }
    }

    /// The pass itself: its result and the drift it found (missing stores plus orphans).
    async fn pass_inner(&self) -> Result<(PassResult, usize), ReconcileError> {
        let (authoritative, skipped) = self.fetch_registry().await?;
        let orchestrator = &self.orchestrator;
        let sources = orchestrator.sources().await;
        let mut result = PassResult {
            authoritative_count: authoritative.len(),
            monitored_count: sources.len(),
            skipped_entries: skipped,
            ..PassResult::default()
        };
        let missing: Vec<&StoreId> = authoritative
            .iter()
            .filter(|id| !sources.contains_key(*id))
            .collect();
        for id in missing.iter().copied() {
            match orchestrator.start_if_new(id, StoreSource::Registry).await {
                Ok(Provisioned::Created) => result.added.push(id.to_string()),
                // It started meanwhile (the API, a webhook), or the config declares it.
                Ok(_) => {}
                Err(ControlError::ShuttingDown) => {
                    // The host stops: the next start's first pass adds what is missing, and
                    // removes nothing on the way out.
                    return Err(ReconcileError::Host(
                        "the pass was cut short: the host shuts down".to_owned(),
                    ));
                }
                Err(err) => {
                    tracing::error!(store_id = %id, "reconciler could not add the store: {err}");
                    result.failed_adds.push(FailedChange {
                        store_id: id.to_string(),
                        error: err.to_string(),
                    });
                }
            }
        }
        // Stores whose start (or an earlier removal) failed are candidates too, unless the
        // config owns them: a failed removal is tried again, not forgotten.
        let failed: Vec<(StoreId, StoreSource)> = orchestrator
            .failed()
            .into_keys()
            .filter(|id| !sources.contains_key(id))
            .filter_map(|id| {
                let owner = orchestrator.failed_start(&id)?.1?;
                Some((id, owner))
            })
            .collect();
        let orphans: Vec<StoreId> = sources
            .iter()
            .map(|(id, source)| (id, *source))
            .chain(failed.iter().map(|(id, source)| (id, *source)))
            .filter(|(id, source)| !source.is_config_owned() && !authoritative.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        let now = now_ms();
        let missing_since = orchestrator
            .registry()
            .mark_orphans(&orphans, now)
            .map_err(|err| ReconcileError::Host(err.to_string()))?;
        let drift = missing.len() + orphans.len();
        if orphans.is_empty() {
            return Ok((result, drift));
        }
        // The share is of the stores a pass could remove: counting the config's and
        // STORE_IDS's too would let an empty answer remove every registry store on a host
        // that declares as many stores itself.
        let removable = sources
            .values()
            .chain(failed.iter().map(|(_, source)| source))
            .filter(|source| !source.is_config_owned())
            .count();
        let limit = self.settings.max_removal_share * removable as f64;
        if orphans.len() as f64 > limit {
            let message = format!(
                "removals blocked: the registry lacks {} of the {removable} running stores it manages, more than max_removal_share ({}) allows; an empty or truncated registry answer is the usual cause. Nothing was removed",
                orphans.len(),
                self.settings.max_removal_share
            );
            tracing::error!("{message}");
            result.removals_blocked = Some(message);
            // They wait, as within the grace period, until the registry lists them again or
            // an operator removes them.
            result.pending_removals = orphans.iter().map(ToString::to_string).collect();
            return Ok((result, drift));
        }
        let grace = i64::try_from(self.settings.grace_period.as_millis()).unwrap_or(i64::MAX);
        for id in orphans {
            let since = missing_since.get(&id).copied().unwrap_or(now);
            if now.saturating_sub(since) < grace {
                result.pending_removals.push(id.to_string());
                continue;
            }
            match orchestrator.remove_unowned(&id, false).await {
                // Removed meanwhile (the API, a webhook): nothing of this pass's doing.
                Ok(false) => {
                    if let Err(err) = orchestrator.registry().clear_orphan(&id) {
                        tracing::warn!(store_id = %id, "could not forget the orphan record: {err}");
                    }
                }
                Ok(true) => {
                    if let Err(err) = orchestrator.registry().clear_orphan(&id) {
                        tracing::warn!(store_id = %id, "could not forget the orphan record: {err}");
                    }
                    tracing::info!(store_id = %id, "reconciler removed an orphan store (data archived)");
                    result.removed.push(id.to_string());
                }
                Err(ControlError::ConfigOwned(_)) => {
                    // The config declared it during the pass: no longer the registry's.
                    tracing::info!(store_id = %id, "the config now declares the store; not removed");
                    if let Err(err) = orchestrator.registry().clear_orphan(&id) {
                        tracing::warn!(store_id = %id, "could not forget the orphan record: {err}");
                    }
                }
                Err(err) => result.failed_removals.push(FailedChange {
                    store_id: id.to_string(),
                    error: err.to_string(),
                }),
            }
        }
        Ok((result, drift))
    }

    /// Every valid `instanceId` in the registry (all pages), and how many entries were skipped.
    async fn fetch_registry(&self) -> Result<(BTreeSet<StoreId>, usize), ReconcileError> {
        let first = format!("{}/internal/workspaces", self.settings.url);
        let mut url = reqwest::Url::parse(&first).map_err(|err| {
            ReconcileError::Registry(format!("invalid registry URL {first:?}: {err}"))
        })?;
        let mut seen_pages = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let mut skipped = 0;
        loop {
            if !seen_pages.insert(url.to_string()) || seen_pages.len() > MAX_PAGES {
                return Err(ReconcileError::Registry(format!(
                    "the registry's `next` links loop or exceed {MAX_PAGES} pages (at {url})"
                )));
            }
            let mut request = self.client.get(url.clone());
            if let Some(token) = &self.settings.token {
                request = request.bearer_auth(token.expose());
            }
            let response = request
                .send()
                .await
                .map_err(|err| request_failed(&url, &err, self.settings.request_timeout))?;
            let status = response.status();
            if !status.is_success() {
                return Err(ReconcileError::Registry(format!(
                    "GET {url} answered {status}{}",
                    if status.as_u16() == 401 || status.as_u16() == 403 {
                        "; check SERVER_BYPASS_TOKEN"
                    } else {
                        ""
                    }
                )));
            }
            let body = read_page(response, &url, self.settings.request_timeout).await?;
            let page: serde_json::Value = serde_json::from_slice(&body).map_err(|err| {
                ReconcileError::Registry(format!("GET {url}: the answer is not JSON: {err}"))
            })?;
            drop(body);
            let workspaces = page
                .get("workspaces")
                .and_then(|w| w.as_array())
                .ok_or_else(|| {
                    ReconcileError::Registry(format!(
                        "GET {url}: the answer has no \"workspaces\" array"
                    ))
                })?;
            for entry in workspaces {
                match entry
                    .get("instanceId")
                    .and_then(|id| id.as_str())
                    .and_then(|id| StoreId::new(id).ok())
                {
                    Some(id) => {
                        ids.insert(id);
                    }
                    None => skipped += 1,
                }
            }
            match page
                .get("next")
                .and_then(|n| n.as_str())
                .filter(|n| !n.is_empty())
            {
                Some(next) => {
                    let next_url = url.join(next).map_err(|err| {
                        ReconcileError::Registry(format!("invalid next link {next:?}: {err}"))
                    })?;
                    if next_url.origin() != url.origin() {
                        // Each request carries SERVER_BYPASS_TOKEN: it goes to the registry only.
                        return Err(ReconcileError::Registry(format!(
                            "GET {url}: the next link {next:?} leaves the registry ({}); pages must stay on the registry's scheme, host and port",
                            url.origin().ascii_serialization()
                        )));
                    }
                    url = next_url;
                }
                None => break,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "registry entries without a valid instanceId were skipped"
            );
        }
        Ok((ids, skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_environment_over_the_config() {
        use crate::config::{MapEnv, apply_env, parse_str};
        let mut config = parse_str(
            "[registry]\nurl = \"http://from-config:1\"\ninterval_ms = 60000\ngrace_period_ms = 5\n",
            "storehost.toml",
        )
        .unwrap();
        let plain = ReconcilerSettings::from_config(&config, false).unwrap();
        assert_eq!(plain.url, "http://from-config:1");
        assert_eq!(plain.interval, Duration::from_secs(60));
        assert_eq!(plain.grace_period, Duration::from_millis(5));
        assert!(plain.token.is_none());

        let env = MapEnv::new([
            ("AUTH_WORKER_INTERNAL_URL", "http://auth-worker:8787/"),
            ("SERVER_BYPASS_TOKEN", "bypass"),
            ("WORKSPACE_RECONCILE_INTERVAL_MS", "45000"),
            ("MANUAL_RECONCILE_MIN_INTERVAL_MS", "1000"),
        ]);
        let report = apply_env(&mut config, &env).unwrap();
        let interval_from_env = report.applied.contains(&"WORKSPACE_RECONCILE_INTERVAL_MS");
        let settings = ReconcilerSettings::from_config(&config, interval_from_env).unwrap();
        assert_eq!(settings.url, "http://auth-worker:8787");
        assert_eq!(settings.interval, Duration::from_secs(45));
        assert_eq!(settings.manual_min_interval, Duration::from_secs(1));
        assert_eq!(settings.token.unwrap().expose(), "bypass");

        assert!(ReconcilerSettings::from_config(&HostConfig::default(), false).is_none());
    }

    /// A wait longer than an `Instant` can be moved back paces manual passes still: a "last
    /// pass" backdated by it did not exist, and switched the pacing off. Where the clock
    /// starts at boot and `Instant` is unsigned (Windows), that is any wait longer than the
    /// machine has run; on Linux (signed seconds) only a wait like `Duration::MAX`, as here.
    #[test]
    fn manual_passes_are_paced_however_far_back_the_clock_goes() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let older_than_the_clock = Duration::MAX;
        let mut pacing = ManualPacing::default();
        assert_eq!(pacing.admit(now, older_than_the_clock), Ok(()));
        assert_eq!(
            pacing.admit(now + secs(1), older_than_the_clock),
            Err(older_than_the_clock - secs(1))
        );
        // After a failed registry, the first backoff's wait.
        pacing.registry_failed(now + secs(1), older_than_the_clock);
        assert_eq!(
            pacing.admit(now + secs(2), older_than_the_clock),
            Err(secs(4))
        );
        assert_eq!(pacing.admit(now + secs(6), older_than_the_clock), Ok(()));
        assert!(pacing.admit(now + secs(7), older_than_the_clock).is_err());

        // A minimum shorter than the backoff's wait holds back no longer after a failure.
        let mut pacing = ManualPacing::default();
        assert_eq!(pacing.admit(now, secs(2)), Ok(()));
        pacing.registry_failed(now, secs(2));
        assert_eq!(pacing.admit(now + secs(1), secs(2)), Err(secs(1)));
        assert_eq!(pacing.admit(now + secs(2), secs(2)), Ok(()));
    }

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_the_interval() {
        let interval = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n, interval).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(1_000, interval), interval);
    }
}
