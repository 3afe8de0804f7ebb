//! Bearer-token authentication of the admin and tenant routes.
//!
//! Admin routes take only the admin token. Tenant routes (a store's events, queries, tasks and
//! dead letters) also take a store token, and only for the store named in their path. Any route
//! not explicitly grouped as tenant is admin-only, so a new route is closed to store tokens
//! until someone decides otherwise.

use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use storehost_store::StoreId;

use crate::error::ApiError;
use crate::state::AppState;

/// Who a request authenticated as (a request extension on admin and tenant routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token.
    Admin,
    /// A store token of this store.
    Store(StoreId),
}

/// The bearer token of a request, or 401 saying how to send one.
fn bearer(request: &Request) -> Result<&str, ApiError> {
    bearer_of(request.headers())
}

/// [`bearer`] from a request's headers (a route that checks its caller again later).
pub(crate) fn bearer_of(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    let header = headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized(
            "missing Authorization header; send `Authorization: Bearer <token>` (the admin token is in DATA_DIR/admin.token for the embedded default)",
        )
    })?;
    header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))
}

/// The token of an `Authorization` header's value `Bearer <token>` (the scheme in any case,
/// as HTTP's auth schemes are).
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Who `token` is, or 401.
fn caller(state: &AppState, token: &str) -> Result<Caller, ApiError> {
    if state.is_admin(token) {
        return Ok(Caller::Admin);
    }
    state
        .orchestrator
        .registry()
        .verify_store_token(token)
        .map(Caller::Store)
        .ok_or_else(|| {
            ApiError::unauthorized("the token is not valid for this host (unknown or revoked)")
        })
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// Lets a request through only with `Authorization: Bearer <admin token>`; a store token gets
/// 403 (it is valid, but not here).
pub async fn require_admin(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match caller(&state, bearer(&request)?)? {
        Caller::Admin => {
            request.extensions_mut().insert(Caller::Admin);
            Ok(next.run(request).await)
        }
        Caller::Store(store) => Err(forbidden(format!(
            "this is a store token of {store}: it reaches only that store's tenant endpoints (/v1/stores/{store}/events, /query, /tasks, /dead-letters); this route needs the admin token"
        ))),
    }
}

/// Lets a request to a tenant route (`/v1/stores/{id}/...`) through with the admin token or a
/// store token of store `{id}`; a token of another store gets 403.
pub async fn require_tenant(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = caller(&state, bearer(&request)?)?;
    let (mut parts, body) = request.into_parts();
    if let Caller::Store(store) = &caller {
        let params = RawPathParams::from_request_parts(&mut parts, &state)
            .await
            .map_err(|_| forbidden("a store token reaches only its store's routes".into()))?;
        let target = params.iter().find(|(key, _)| *key == "id").map(|(_, v)| v);
        if target != Some(store.as_str()) {
            return Err(forbidden(format!(
                "this is a store token of {store}: it does not reach store {}; use a token of that store or the admin token",
                target.unwrap_or("(none)")
            )));
        }
    }
    parts.extensions.insert(caller);
    Ok(next.run(Request::from_parts(parts, body)).await)
}
