//! `PUT /v1/plugins/{name}` (deploy a component; stores using the name switch after their
//! in-flight invocation) and `GET /v1/plugins`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use storehost_control::config::validate_plugin_name;

use crate::body::RawBody;
use crate::error::ApiError;
use crate::state::AppState;

/// `PUT /v1/plugins/{name}` → 201 new name, 200 replaced; 422 when the bytes are not a plugin.
pub async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawBody(wasm): RawBody,
) -> Result<impl IntoResponse, ApiError> {
    validate_plugin_name(&name)
        .map_err(|err| ApiError::bad_request("invalid_plugin_name", err.to_string()))?;
    if wasm.is_empty() {
        return Err(ApiError::bad_request(
            "empty_body",
            "the request body is empty; send the component's .wasm bytes (Content-Type: application/wasm)",
        ));
    }
    let existed = state.orchestrator.plugins().contains_key(&name);
    let plugin = state
        .orchestrator
        .deploy_plugin_persisted(&name, wasm.to_vec())
        .await?;
    let stores: Vec<String> = state
        .orchestrator
        .list()
        .await
        .into_iter()
        .filter(|s| s.plugin.name == name)
        .map(|s| s.id.to_string())
        .collect();
    tracing::info!(plugin = %name, sha256 = plugin.sha256(), stores = stores.len(), "plugin deployed through the API");
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(json!({
            "name": name,
            "sha256": plugin.sha256(),
            "size": plugin.size(),
            "stores": stores,
        })),
    ))
}

/// `GET /v1/plugins` → `{"plugins":[{"name","sha256","size","stores"}]}`
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let stores = state.orchestrator.list().await;
    let plugins: Vec<Value> = state
        .orchestrator
        .plugins()
        .into_iter()
        .map(|(name, plugin)| {
            let users = stores.iter().filter(|s| s.plugin.name == name).count();
            json!({"name": name, "sha256": plugin.sha256(), "size": plugin.size(), "stores": users})
        })
        .collect();
    Json(json!({ "plugins": plugins }))
}
