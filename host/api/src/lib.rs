//! storehost's HTTP API: routes, authentication, and error responses. No business rules live
//! here; every route calls the control plane or a store.
#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod error;
pub mod routes;
pub mod serve;
pub mod state;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

pub use error::ApiError;
pub use serve::{ServeOptions, serve};
pub use state::{AppState, ConfigStatus};

/// The whole API as a router (tested with `oneshot`, served by [`serve`]).
pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/stores", get(routes::stores::list))
        .route(
            "/v1/stores/{id}",
            get(routes::stores::show)
                .put(routes::stores::put)
                .delete(routes::stores::remove),
        )
        .route("/v1/stores/{id}/pause", post(routes::stores::pause))
        .route("/v1/stores/{id}/resume", post(routes::stores::resume))
        .route(
            "/v1/stores/{id}/dead-letters",
            get(routes::stores::dead_letters),
        )
        .route(
            "/v1/stores/{id}/dead-letters/{seq}/retry",
            post(routes::stores::retry_dead_letter),
        )
        .route(
            "/v1/stores/{id}/events",
            post(routes::events::append).get(routes::events::read),
        )
        .route("/v1/stores/{id}/query/{name}", get(routes::events::query))
        .route("/v1/plugins", get(routes::plugins::list))
        .route("/v1/plugins/{name}", put(routes::plugins::put))
        .route("/stores", get(routes::admin::stores))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let operations = Router::new()
        .route("/admin/reconcile", post(routes::admin::reconcile))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            routes::admin::require_operator,
        ));
    let webhooks = Router::new().route(
        "/webhooks/workspaces",
        post(routes::webhooks::workspaces).fallback(routes::webhooks::method_not_allowed),
    );
    Router::new()
        .route("/health", get(routes::health::health))
        .merge(admin)
        .merge(operations)
        .merge(webhooks)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_while_draining,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see the README for the API",
    )
}

/// While the host shuts down, new requests get 503 (health still answers).
async fn refuse_while_draining(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    if draining && request.uri().path() != "/health" {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the host is shutting down; retry against another host or after it restarts",
        )
        .retry_after(1)
        .into_response();
    }
    next.run(request).await
}
