//! The routes of the HTTP API, one module per resource.

pub mod admin;
pub mod backup;
pub mod dashboard;
pub mod events;
pub mod health;
pub mod metrics;
pub mod plugins;
pub mod stores;
pub mod stream;
pub mod tokens;
pub mod webhooks;

use axum::http::StatusCode;
use storehost_control::StoreSource;
use storehost_store::{Store, StoreId};

use crate::error::ApiError;
use crate::state::AppState;

/// Validates a store id from a path.
pub(crate) fn parse_store_id(raw: &str) -> Result<StoreId, ApiError> {
    StoreId::new(raw).map_err(|err| ApiError::bad_request("invalid_store_id", err.to_string()))
}

/// The running store named in a path, or 400, or [`not_running`]'s answer.
pub(crate) async fn running_store(state: &AppState, raw: &str) -> Result<Store, ApiError> {
    let id = parse_store_id(raw)?;
    match state.orchestrator.get(&id).await {
        Some(store) => Ok(store),
        None => Err(not_running(state, &id)),
    }
}

/// Why store `id` does not run: 503 `store_failed` with why and what to do for a store whose
/// start (or removal) failed — on its tenant routes too, which answered 404 "does not exist"
/// for it —, else 404.
pub(crate) fn not_running(state: &AppState, id: &StoreId) -> ApiError {
    let Some((failure, owner)) = state.orchestrator.failed_start(id) else {
        return ApiError::unknown_store(id.as_str());
    };
    let removing = state.orchestrator.is_removing(id);
    // A store the config declares is the config's to start again or remove.
    let next = match owner {
        _ if removing => {
            format!("its removal is not finished: fix the cause, then DELETE /v1/stores/{id} again (a restart of the host finishes the removal too); a PUT /v1/stores/{id} starts it again instead")
        }
        Some(StoreSource::Config) => {
            "fix the cause, then change the config file (any change) or restart the host to start it again; remove it from the config to drop it".to_owned()
        }
        Some(StoreSource::Env) => {
            "fix the cause, then restart the host to start it again; remove it from STORE_IDS to drop it".to_owned()
        }
        _ => format!(
            "fix the cause, then PUT /v1/stores/{id} (or restart the host) to start it again, or DELETE /v1/stores/{id}"
        ),
    };
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_failed",
        format!(
            "store {id} {} (at {} ms since the epoch): {}; {next}",
            if removing {
                "could not be removed"
            } else {
                "could not start"
            },
            failure.at,
            failure.detail.as_deref().unwrap_or("no detail"),
        ),
    )
}
