//! `GET /metrics`: Prometheus text exposition (format 0.0.4), rendered at scrape time from what
//! the stores and the control plane already track. A removed store's series disappear with it,
//! so the number of series is bounded by `max_stores`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use storehost_control::watcher::ReloadOutcome;
use storehost_store::metrics::{LATENCY_BUCKETS_SECONDS, LatencyHistogram};

use crate::error::ApiError;
use crate::state::AppState;

/// Store states always exported by `storehost_stores` (zero when no store is in them), so a
/// dashboard sees every series from the first scrape.
const KNOWN_STATES: [&str; 8] = [
    "running",
    "retrying",
    "paused",
    "throttled",
    "backoff",
    "stopped",
    "hibernated",
    "failed",
];

/// Outcomes of a config reload.
const RELOAD_OUTCOMES: [&str; 3] = ["applied", "partial", "refused"];

/// Most distinct webhook outcomes kept (the route answers with a fixed set of codes; this only
/// guards the series count should that ever change).
const MAX_WEBHOOK_OUTCOMES: usize = 32;

/// Counters of the API layer that nothing below it keeps: webhook answers and config reloads.
#[derive(Debug, Default)]
pub struct HostCounters {
    webhooks: Mutex<BTreeMap<String, u64>>,
    reloads: [AtomicU64; RELOAD_OUTCOMES.len()],
}

impl HostCounters {
    /// Counts one webhook answered with `outcome` (its `status` or error `code`).
    pub fn count_webhook(&self, outcome: &str) {
        let mut webhooks = self
            .webhooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = if webhooks.contains_key(outcome) || webhooks.len() < MAX_WEBHOOK_OUTCOMES {
            outcome
        } else {
            "other"
        };
        *webhooks.entry(outcome.to_owned()).or_default() += 1;
    }

    /// Counts one config reload (an unchanged file is not a reload).
    pub fn count_reload(&self, outcome: &ReloadOutcome) {
        let index = match outcome {
            ReloadOutcome::Unchanged => return,
            ReloadOutcome::Applied(summary) if summary.failures().is_none() => 0,
            ReloadOutcome::Applied(_) => 1,
            ReloadOutcome::Refused(_) => 2,
        };
        self.reloads[index].fetch_add(1, Ordering::Relaxed);
    }

    fn webhooks(&self) -> BTreeMap<String, u64> {
        self.webhooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Middleware on `POST /webhooks/workspaces`: counts each answer by its outcome
/// (`monitoring_started`, `already_monitored`, ..., or the error code: `unauthorized`, ...).
pub async fn count_webhooks(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    // Webhook answers are a few hundred bytes of JSON; anything else is counted by status.
    let bytes = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let outcome = webhook_outcome(&bytes).unwrap_or_else(|| parts.status.as_str().to_owned());
    state.metrics.count_webhook(&outcome);
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// `status` of an accepted webhook or `error.code` of a refused one.
fn webhook_outcome(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let outcome = value
        .get("status")
        .or_else(|| value.get("error").and_then(|e| e.get("code")))?
        .as_str()?;
    let well_formed = !outcome.is_empty()
        && outcome.len() <= 40
        && outcome.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    well_formed.then(|| outcome.to_owned())
}

/// `GET /metrics` (public).
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = Snapshot::take(&state).await;
    let mut registry = Registry::with_prefix("storehost");
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .map_err(ApiError::internal)?;
    Ok((
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response())
}

/// Everything one scrape shows, read once so the exposition is consistent.
#[derive(Debug)]
struct Snapshot {
    stores: Vec<StoreSample>,
    states: BTreeMap<String, u64>,
    max_stores: u64,
    slots_in_use: u64,
    slots_total: u64,
    sandboxes_live: u64,
    sandboxes_total: u64,
    guest_files_held: u64,
    guest_files_total: u64,
    guest_files_refused: u64,
    webhooks: BTreeMap<String, u64>,
    reconcile: Option<ReconcileSample>,
    reloads: [u64; RELOAD_OUTCOMES.len()],
    config_ok: bool,
}

#[derive(Debug)]
struct StoreSample {
    id: String,
    state: String,
    accepted: u64,
    processed: u64,
    event_commits: u64,
    dead_lettered: u64,
    lag: u64,
    failures: BTreeMap<String, u64>,
    cpu_ms: u64,
    fuel: u64,
    memory_peak: u64,
    memory_quota: u64,
    disk_bytes: u64,
    disk_quota: u64,
    event_log_bytes: u64,
    event_log_quota: u64,
    files_bytes: u64,
    files_quota: u64,
    db_cache_bytes: u64,
    db_cache_quota: u64,
    tasks: u64,
    llm_calls: u64,
    latency: LatencyHistogram,
}

#[derive(Debug)]
struct ReconcileSample {
    completed: u64,
    failed: u64,
    drift: Option<u64>,
    last_success_at: Option<i64>,
}

impl Snapshot {
    async fn take(state: &AppState) -> Self {
        let orchestrator = &state.orchestrator;
        let views = orchestrator.list().await;
        let mut stores = Vec::with_capacity(views.len());
        let mut states: BTreeMap<String, u64> =
            KNOWN_STATES.iter().map(|s| ((*s).to_owned(), 0)).collect();
        for view in views {
            // A store removed between the two reads has no series in this scrape.
            let Some(store) = orchestrator.get(&view.id).await else {
                continue;
            };
            let status = view.status;
            let state_name = state_name(status.state);
            *states.entry(state_name.clone()).or_default() += 1;
            let metrics = store.metrics();
            stores.push(StoreSample {
                id: view.id.as_str().to_owned(),
                state: state_name,
                accepted: metrics.events_accepted(),
                processed: status.events_processed,
                event_commits: metrics.event_commits(),
                dead_lettered: status.dead_lettered,
                lag: status.lag,
                failures: status.failures_by_reason,
                cpu_ms: status.usage.cpu_ms,
                fuel: status.usage.fuel,
                memory_peak: status.usage.memory_peak,
                memory_quota: view.quotas.memory,
                disk_bytes: status.usage.disk_bytes,
                disk_quota: view.quotas.disk,
                event_log_bytes: status.usage.event_log_bytes,
                event_log_quota: view.quotas.event_log,
                files_bytes: status.usage.files_bytes,
                files_quota: view.quotas.files,
                db_cache_bytes: status.usage.db_cache_bytes,
                db_cache_quota: view.quotas.db_cache,
                tasks: metrics.tasks_executed(),
                llm_calls: metrics.llm_calls(),
                latency: metrics.invocation_latency(),
            });
        }
        *states.entry("failed".to_owned()).or_default() += orchestrator.failed().len() as u64;
        let (slots_in_use, slots_total) = orchestrator.runtime().invocation_slots();
        let (sandboxes_live, sandboxes_total) = orchestrator.runtime().sandbox_slots();
        let guest_files = orchestrator.runtime().guest_open_files();
        let reconcile = state.reconciler.as_ref().map(|r| {
            let status = r.status();
            ReconcileSample {
                completed: status.passes_completed,
                failed: status.passes_failed,
                drift: status.drift.map(|d| d as u64),
                last_success_at: status.last_success_at,
            }
        });
        let config_ok = state
            .config_status
            .read()
            .map(|c| c.last_error.is_none())
            .unwrap_or(false);
        Self {
            stores,
            states,
            max_stores: orchestrator.settings().max_stores as u64,
            slots_in_use: slots_in_use as u64,
            slots_total: slots_total as u64,
            sandboxes_live: sandboxes_live as u64,
            sandboxes_total: sandboxes_total as u64,
            guest_files_held: guest_files.held() as u64,
            guest_files_total: guest_files.limit() as u64,
            guest_files_refused: guest_files.refusals(),
            webhooks: state.metrics.webhooks(),
            reconcile,
            reloads: std::array::from_fn(|i| state.metrics.reloads[i].load(Ordering::Relaxed)),
            config_ok,
        }
    }
}

/// The state's name as the API spells it.
fn state_name(state: storehost_store::StoreState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor, then one sample per label set.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter family with one sample per store.
fn per_store_counter<V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    stores: &[StoreSample],
    name: &str,
    help: &str,
    value: impl Fn(&StoreSample) -> V,
) -> Result<(), std::fmt::Error> {
    family(
        encoder,
        name,
        help,
        MetricType::Counter,
        stores.iter().map(|s| {
            (
                vec![("store_id", s.id.as_str())],
                ConstCounter::new(value(s)),
            )
        }),
    )
}

/// A gauge family with one sample per store.
fn per_store_gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    stores: &[StoreSample],
    name: &str,
    help: &str,
    value: impl Fn(&StoreSample) -> V,
) -> Result<(), std::fmt::Error> {
    family(
        encoder,
        name,
        help,
        MetricType::Gauge,
        stores
            .iter()
            .map(|s| (vec![("store_id", s.id.as_str())], ConstGauge::new(value(s)))),
    )
}

fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> Result<(), std::fmt::Error> {
    family(
        encoder,
        name,
        help,
        MetricType::Gauge,
        [(Labels::new(), ConstGauge::new(value))],
    )
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let stores = &self.stores[..];
        per_store_counter(
            e,
            stores,
            "store_events_accepted",
            "Events accepted through the API since the host started.",
            |s| s.accepted,
        )?;
        per_store_counter(
            e,
            stores,
            "store_events_processed",
            "Events whose effects the plugin committed since the host started.",
            |s| s.processed,
        )?;
        per_store_counter(
            e,
            stores,
            "store_events_dead_lettered",
            "Events dead-lettered after their last attempt since the host started.",
            |s| s.dead_lettered,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_lag_events",
            "Events accepted but not yet processed.",
            |s| s.lag,
        )?;
        family(
            e,
            "store_failures",
            "Failed invocations by classified reason since the host started (a reason appears once it happened).",
            MetricType::Counter,
            stores.iter().flat_map(|s| {
                s.failures.iter().map(|(reason, count)| {
                    (
                        vec![("store_id", s.id.as_str()), ("reason", reason.as_str())],
                        ConstCounter::new(*count),
                    )
                })
            }),
        )?;
        per_store_counter(
            e,
            stores,
            "store_cpu_seconds",
            "CPU time used by the store's guest.",
            |s| s.cpu_ms as f64 / 1_000.0,
        )?;
        per_store_counter(
            e,
            stores,
            "store_fuel_consumed",
            "Fuel used by the store's guest (0 unless fuel is metered).",
            |s| s.fuel,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_memory_peak_bytes",
            "Peak linear memory of the store's guest.",
            |s| s.memory_peak,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_memory_quota_bytes",
            "The store's memory quota.",
            |s| s.memory_quota,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_disk_bytes",
            "Size of the store's database (store.db, which the disk quota caps).",
            |s| s.disk_bytes,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_event_log_bytes",
            "Size of the store's event log (events.db and its WAL, which the event_log quota caps; the log keeps every event).",
            |s| s.event_log_bytes,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_event_log_quota_bytes",
            "The store's event_log quota.",
            |s| s.event_log_quota,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_disk_quota_bytes",
            "The store's disk quota.",
            |s| s.disk_quota,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_files_bytes",
            "What the store's files directory holds, as its files quota counts it (bytes plus 4 KiB per file, directory and link).",
            |s| s.files_bytes,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_files_quota_bytes",
            "The store's files quota.",
            |s| s.files_quota,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_db_cache_bytes",
            "Page cache the store's database holds in the host's memory (as of its last commit; 0 while it hibernates).",
            |s| s.db_cache_bytes,
        )?;
        per_store_gauge(
            e,
            stores,
            "store_db_cache_quota_bytes",
            "The store's db_cache quota: the most page cache its database may keep.",
            |s| s.db_cache_quota,
        )?;
        per_store_counter(
            e,
            stores,
            "store_event_commits",
            "Transactions that committed processed events; under load several events commit in one.",
            |s| s.event_commits,
        )?;
        per_store_counter(
            e,
            stores,
            "store_tasks_executed",
            "Scheduled task executions since the host started.",
            |s| s.tasks,
        )?;
        per_store_counter(
            e,
            stores,
            "store_llm_calls",
            "Calls of the llm capability since the host started.",
            |s| s.llm_calls,
        )?;
        family(
            e,
            "store_state",
            "The store's lifecycle state (1 for its current state).",
            MetricType::Gauge,
            stores.iter().map(|s| {
                (
                    vec![("store_id", s.id.as_str()), ("state", s.state.as_str())],
                    ConstGauge::new(1),
                )
            }),
        )?;
        {
            let mut histograms = e.encode_descriptor(
                "store_invocation_duration_seconds",
                "Wall time of plugin invocations (events and queries).",
                None,
                MetricType::Histogram,
            )?;
            for store in stores {
                let labels = vec![("store_id", store.id.as_str())];
                let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_SECONDS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .zip(store.latency.buckets.iter().copied())
                    .collect();
                histograms
                    .encode_family(&labels)?
                    .encode_histogram::<Labels<'_>>(
                        store.latency.sum_seconds,
                        store.latency.count,
                        &buckets,
                        None,
                    )?;
            }
        }

        family(
            e,
            "stores",
            "Stores on this host by state (failed: stores whose last start failed).",
            MetricType::Gauge,
            self.states
                .iter()
                .map(|(state, count)| (vec![("state", state.as_str())], ConstGauge::new(*count))),
        )?;
        gauge(
            e,
            "stores_max",
            "Most stores this host runs (max_stores).",
            self.max_stores,
        )?;
        gauge(
            e,
            "invocation_slots_in_use",
            "Invocation slots held by running guests now.",
            self.slots_in_use,
        )?;
        gauge(
            e,
            "invocation_slots",
            "Invocation slots in all (guests that may run at once).",
            self.slots_total,
        )?;
        gauge(
            e,
            "sandbox_slots_in_use",
            "Sandboxes live now, each holding a pool slot (a hibernated store, or one paused or waiting past idle_timeout, holds none).",
            self.sandboxes_live,
        )?;
        gauge(
            e,
            "sandbox_slots",
            "Pool slots in all (sandboxes that may be live at once).",
            self.sandboxes_total,
        )?;
        gauge(
            e,
            "guest_open_files_in_use",
            "Files, directories and listings all plugins hold open now, each one of the host's open files.",
            self.guest_files_held,
        )?;
        gauge(
            e,
            "guest_open_files",
            "Most files, directories and listings all plugins together may hold open (what the open-file limit leaves beside the host's own files and its API connections).",
            self.guest_files_total,
        )?;
        family(
            e,
            "guest_open_files_refused",
            "Plugin opens and listings refused with WASI quota because all plugins together held storehost_guest_open_files.",
            MetricType::Counter,
            [(
                Vec::<(&str, &str)>::new(),
                ConstCounter::new(self.guest_files_refused),
            )],
        )?;
        family(
            e,
            "webhook_requests",
            "Provisioning webhooks answered, by outcome (status or error code).",
            MetricType::Counter,
            self.webhooks.iter().map(|(outcome, count)| {
                (
                    vec![("outcome", outcome.as_str())],
                    ConstCounter::new(*count),
                )
            }),
        )?;
        if let Some(reconcile) = &self.reconcile {
            family(
                e,
                "reconcile_passes",
                "Reconcile passes against the workspace registry, by outcome.",
                MetricType::Counter,
                [
                    (
                        vec![("outcome", "completed")],
                        ConstCounter::new(reconcile.completed),
                    ),
                    (
                        vec![("outcome", "failed")],
                        ConstCounter::new(reconcile.failed),
                    ),
                ],
            )?;
            if let Some(drift) = reconcile.drift {
                gauge(
                    e,
                    "reconcile_drift",
                    "Stores missing plus orphans found by the last completed pass.",
                    drift,
                )?;
            }
            if let Some(at) = reconcile.last_success_at {
                gauge(
                    e,
                    "reconcile_last_success_timestamp_seconds",
                    "When a reconcile pass last completed (Unix time).",
                    at as f64 / 1_000.0,
                )?;
            }
        }
        family(
            e,
            "config_reloads",
            "Reloads of the watched config file, by outcome (partial: applied, some stores failed or removals were held back).",
            MetricType::Counter,
            RELOAD_OUTCOMES
                .iter()
                .zip(self.reloads)
                .map(|(outcome, count)| (vec![("outcome", *outcome)], ConstCounter::new(count))),
        )?;
        gauge(
            e,
            "config_last_reload_successful",
            "1 when the last config load or edit applied cleanly, 0 when it was refused, some store failed or removals were held back.",
            u64::from(self.config_ok),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_outcomes_come_from_the_answer() {
        assert_eq!(
            webhook_outcome(br#"{"status":"monitoring_started","storeId":"abc"}"#).as_deref(),
            Some("monitoring_started")
        );
        assert_eq!(
            webhook_outcome(br#"{"error":{"code":"unauthorized","message":"no"}}"#).as_deref(),
            Some("unauthorized")
        );
        assert_eq!(webhook_outcome(b"not json"), None);
        assert_eq!(webhook_outcome(br#"{"status":"Weird Value!"}"#), None);
    }

    #[test]
    fn webhook_outcomes_are_bounded() {
        let counters = HostCounters::default();
        for i in 0..100 {
            counters.count_webhook(&format!("outcome_{i}"));
        }
        let outcomes = counters.webhooks();
        assert_eq!(outcomes.len(), MAX_WEBHOOK_OUTCOMES + 1);
        assert_eq!(outcomes["other"], 100 - MAX_WEBHOOK_OUTCOMES as u64);
    }
}
