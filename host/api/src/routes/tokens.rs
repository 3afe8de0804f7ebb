//! Admin routes over store tokens: create (shown once), list, revoke.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use super::running_store;
use crate::error::ApiError;
use crate::state::AppState;

/// `POST /v1/stores/{id}/tokens` → 201 `{"id","token","storeId","createdAt"}`; the token is
/// shown this once (only its hash is kept).
pub async fn create(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let issued = state.orchestrator.create_store_token(store.id()).await?;
    tracing::info!(store_id = %store.id(), token_id = issued.id, "store token created");
    Ok((StatusCode::CREATED, Json(issued)))
}

/// `GET /v1/stores/{id}/tokens` → `{"tokens":[{"id","createdAt"}]}` (never the tokens).
pub async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let tokens = state.orchestrator.registry().store_tokens(store.id());
    Ok(Json(json!({ "storeId": store.id(), "tokens": tokens })))
}

/// `DELETE /v1/stores/{id}/tokens/{tokenId}` → 200; 404 when the store has no such token.
pub async fn revoke(
    State(state): State<AppState>,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let store_id = super::parse_store_id(&id)?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "token_not_found",
            format!(
                "store {store_id} has no token {token_id:?}; list its tokens with GET /v1/stores/{store_id}/tokens"
            ),
        )
    };
    let number: u64 = token_id.parse().map_err(|_| not_found())?;
    let orchestrator = state.orchestrator.clone();
    let target = store_id.clone();
    let revoked = tokio::task::spawn_blocking(move || {
        orchestrator.registry().revoke_store_token(&target, number)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    if !revoked {
        return Err(not_found());
    }
    tracing::info!(store_id = %store_id, token_id = number, "store token revoked");
    Ok(Json(
        json!({"storeId": store_id, "id": number, "status": "revoked"}),
    ))
}
