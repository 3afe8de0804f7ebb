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

use storehost_store::{Store, StoreId};

use crate::error::ApiError;
use crate::state::AppState;

/// Validates a store id from a path.
pub(crate) fn parse_store_id(raw: &str) -> Result<StoreId, ApiError> {
    StoreId::new(raw).map_err(|err| ApiError::bad_request("invalid_store_id", err.to_string()))
}

/// The running store named in a path, or 400/404.
pub(crate) async fn running_store(state: &AppState, raw: &str) -> Result<Store, ApiError> {
    let id = parse_store_id(raw)?;
    state
        .orchestrator
        .get(&id)
        .await
        .ok_or_else(|| ApiError::unknown_store(id.as_str()))
}
