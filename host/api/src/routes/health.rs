//! `GET /health`: is the host well, and what does it run.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::state::AppState;

/// `{"status","stores":{state: count},"monitoredStoreIds",...}`
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let stores = state.orchestrator.list().await;
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for store in &stores {
        let name = serde_json::to_value(store.status.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *by_state.entry(name).or_default() += 1;
    }
    let failed = state.orchestrator.failed();
    if !failed.is_empty() {
        by_state.insert("failed".to_owned(), failed.len() as u64);
    }
    let config = state
        .config_status
        .read()
        .map(|c| c.clone())
        .unwrap_or_default();
    let reconciler = state
        .reconciler
        .as_ref()
        .map(|r| r.status())
        .unwrap_or_default();
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    let degraded = draining || config.last_error.is_some() || !failed.is_empty();
    Json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "stores": by_state,
        "monitoredStoreIds": stores.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        // The same figure `GET /stores` shows: when a store last started, even one removed since.
        "lastProvisionedAt": state.orchestrator.provisioning_activity().last_provisioned_at,
        "reconciler": reconciler,
        "config": config,
    }))
}
