//! storehost's HTTP API: routes, authentication, and error responses. No business rules live
//! here; every route calls the control plane or a store.
#![forbid(unsafe_code)]

pub mod answers;
pub mod auth;
pub mod body;
pub mod error;
pub mod request_id;
pub mod routes;
pub mod serve;
pub mod state;
pub mod unread_body;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};

pub use error::ApiError;
pub use serve::{ServeOptions, serve};
pub use state::{AppState, ConfigStatus};

/// The whole API as a router (tested with `oneshot`, served by [`serve`]).
pub fn app(state: AppState) -> Router {
    // Admin-only: any route not in `tenant` below (a store token gets 403 here).
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
            "/v1/stores/{id}/tokens",
            post(routes::tokens::create).get(routes::tokens::list),
        )
        .route(
            "/v1/stores/{id}/tokens/{token_id}",
            delete(routes::tokens::revoke),
        )
        .route(
            "/v1/stores/{id}/backup",
            get(routes::backup::download).put(routes::backup::restore),
        )
        .route("/v1/plugins", get(routes::plugins::list))
        .route("/v1/plugins/{name}", put(routes::plugins::put))
        .route("/stores", get(routes::admin::stores))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    // Tenant routes: the admin token, or a store token of the store `{id}` in the path.
    let tenant = Router::new()
        .route(
            "/v1/stores/{id}/events",
            post(routes::events::append).get(routes::events::read),
        )
        .route("/v1/stores/{id}/events/stream", get(routes::stream::stream))
        .route("/v1/stores/{id}/query/{name}", get(routes::events::query))
        .route("/v1/stores/{id}/tasks", get(routes::stores::tasks))
        .route(
            "/v1/stores/{id}/dead-letters",
            get(routes::stores::dead_letters),
        )
        .route(
            "/v1/stores/{id}/dead-letters/{seq}/retry",
            post(routes::stores::retry_dead_letter),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            answers::hold_until_read,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_tenant,
        ));
    let operations = Router::new()
        .route("/admin/reconcile", post(routes::admin::reconcile))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            routes::admin::require_operator,
        ));
    let webhooks = Router::new()
        .route(
            "/webhooks/workspaces",
            post(routes::webhooks::workspaces).fallback(routes::webhooks::method_not_allowed),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            routes::metrics::count_webhooks,
        ));
    Router::new()
        .route("/", get(routes::dashboard::page))
        .route("/health", get(routes::health::health))
        .route("/metrics", get(routes::metrics::metrics))
        .merge(admin)
        .merge(tenant)
        .merge(operations)
        .merge(webhooks)
        .fallback(not_found)
        .layer(middleware::from_fn(error::envelope_plain_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_while_draining,
        ))
        .layer(middleware::from_fn(request_id::assign))
        .layer(middleware::from_fn(unread_body::close_if_body_unread))
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
