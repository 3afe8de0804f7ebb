//! Operations routes kept from the service this replaces: `POST /admin/reconcile` and
//! `GET /stores`.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use storehost_control::reconciler::ReconcileError;

use crate::error::ApiError;
use crate::state::AppState;

/// Lets a request through with the admin token or `SERVER_BYPASS_TOKEN`, sent as
/// `Authorization: Bearer <token>` or `X-Server-Token: <token>`.
pub async fn require_operator(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token);
    let server_token = headers
        .get("x-server-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if bearer.is_none() && server_token.is_none() {
        return Err(ApiError::unauthorized(
            "send `Authorization: Bearer <admin token or SERVER_BYPASS_TOKEN>` or `X-Server-Token: <SERVER_BYPASS_TOKEN>`",
        ));
    }
    let allowed = bearer.is_some_and(|t| state.is_admin(t) || state.is_bypass(t))
        || server_token.is_some_and(|t| state.is_bypass(t) || state.is_admin(t));
    if !allowed {
        return Err(ApiError::unauthorized(
            "the token is neither this host's admin token nor its SERVER_BYPASS_TOKEN",
        ));
    }
    Ok(next.run(request).await)
}

/// `POST /admin/reconcile` → 200 with the pass's report; 409 while one runs; 429 inside
/// `MANUAL_RECONCILE_MIN_INTERVAL_MS`; 503 without a registry; 502 when the registry fails.
pub async fn reconcile(State(state): State<AppState>) -> Result<Response, ApiError> {
    let reconciler = state.reconciler.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "reconciler_disabled",
            "no workspace registry is configured; set AUTH_WORKER_INTERNAL_URL or [registry] url",
        )
    })?;
    match reconciler.run_manual().await {
        Ok(report) => Ok(Json(report).into_response()),
        Err(err @ ReconcileError::Busy) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "reconcile_running",
            err.to_string(),
        )),
        Err(err @ ReconcileError::TooSoon { .. }) => {
            let secs = err.retry_after_secs().unwrap_or(1);
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "reconcile_too_soon",
                err.to_string(),
            )
            .retry_after(secs))
        }
        Err(err @ ReconcileError::Registry(_)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "registry_unavailable",
            err.to_string(),
        )),
        Err(err @ ReconcileError::Host(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "host_error",
            err.to_string(),
        )),
    }
}

/// `GET /stores`: the provisioning summary of the service this replaces.
pub async fn stores(State(state): State<AppState>) -> Json<Value> {
    let stores = state.orchestrator.list().await;
    let activity = state.orchestrator.provisioning_activity();
    Json(json!({
        "monitoredStoreIds": stores.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        "lastProvisionedAt": activity.last_provisioned_at,
        "lastDeprovisionedAt": activity.last_deprovisioned_at,
        "totalProvisioned": activity.total_provisioned,
        "totalDeprovisioned": activity.total_deprovisioned,
        "stores": stores,
    }))
}
