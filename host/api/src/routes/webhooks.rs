//! `POST /webhooks/workspaces`: provisioning webhooks (SPEC §6). Authentication, replays and
//! store changes are the control plane's; this route paces callers (those that authenticate
//! apart from those that do not) and maps the answers.

use std::net::SocketAddr;

use axum::Extension;
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use storehost_control::webhook::{WebhookError, WebhookRequest};

use crate::error::ApiError;
use crate::state::AppState;

/// How many webhook calls pass between two prunings of the rate limiter's idle sources.
const PRUNE_EVERY: u64 = 1024;

/// `POST /webhooks/workspaces`
pub async fn workspaces(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(webhooks) = state.webhooks.clone() else {
        return refusal(&WebhookError::NotConfigured);
    };
    // Read before pacing, and no more than an ordinary request body: the pace depends on
    // whether the request authenticates.
    let collected = match crate::body::collect_within(body, state.max_body_bytes).await {
        Ok(collected) => collected,
        Err(too_slow) => return too_slow.into_response(),
    };
    let body = match collected {
        Ok(bytes) => bytes,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "Invalid JSON payload: a webhook body may hold at most {} bytes",
                    state.max_body_bytes
                ),
            )
            .into_response();
        }
    };
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let request = WebhookRequest {
        secret: text("x-webhook-secret"),
        id: text("webhook-id"),
        timestamp: text("webhook-timestamp"),
        signature: text("webhook-signature"),
        body: &body,
    };
    // Keyed by the connection's address (without one, a server that does not record it,
    // every caller shares one budget) and by whether the request authenticated: forgeries
    // sent through the load balancer the provisioning service also comes through do not use
    // up its budget, and guessing the secret is paced all the same.
    let source = peer.map_or_else(
        || "unknown".to_owned(),
        |Extension(ConnectInfo(addr))| addr.ip().to_string(),
    );
    let request = match webhooks.authenticate(request) {
        Ok(request) => request,
        Err(err @ WebhookError::Unauthorized(_)) => {
            let key = format!("{source} unauthenticated");
            let what = format!("requests failing authentication from {source}");
            return match pace(&state, &key, &what) {
                Some(refused) => refused,
                None => refusal(&err),
            };
        }
        Err(err) => return refusal(&err),
    };
    if let Some(refused) = pace(&state, &source, &format!("webhooks from {source}")) {
        return refused;
    }
    match webhooks.handle(request).await {
        Ok(accepted) => Json(accepted).into_response(),
        Err(err) => refusal(&err),
    }
}

/// Counts one call against `key`'s budget: the 429 to answer when it is spent.
fn pace(state: &AppState, key: &str, what: &str) -> Option<Response> {
    let limiter = state.webhook_limiter.as_ref()?;
    if CALLS
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .is_multiple_of(PRUNE_EVERY)
    {
        limiter.retain_recent();
    }
    let not_until = limiter.check_key(&key.to_owned()).err()?;
    let wait = not_until.wait_time_from(limiter.clock().now());
    // Rounded up: a sender retrying after the floor of 1.5 s would be refused again.
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    Some(
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many {what}; retry after {secs} s (limit: [webhook] requests_per_minute)"),
        )
        .retry_after(secs)
        .into_response(),
    )
}

static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn refusal(err: &WebhookError) -> Response {
    let status =
        StatusCode::from_u16(err.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = ApiError::new(status, err.code(), err.to_string()).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        let wait = match err {
            WebhookError::OutOfFiles(_) => crate::error::OUT_OF_FILES_RETRY_SECS,
            _ => crate::error::AT_CAPACITY_RETRY_SECS,
        };
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(wait));
    }
    response
}

/// Any other method on the webhook path: 405 with `Allow: POST`.
pub async fn method_not_allowed() -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "webhooks are delivered with POST",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    response
}
