//! One error type for every route: client mistakes keep their status and say what to do;
//! internal errors become a generic 500 and are logged once.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use storehost_control::ControlError;
use storehost_runtime::FailureReason;
use storehost_store::StoreError;

/// An error answered as `{"error":{"code","message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with a status, a stable code and a message for people.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for a store this host does not run.
    pub fn unknown_store(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "store_not_found",
            format!("store {id:?} does not exist on this host; create it with PUT /v1/stores/{id}"),
        )
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 503 `out_of_files`: a store's files could not be opened because the host holds as many
    /// files open as it may (`err` says which).
    fn out_of_files(err: &dyn std::fmt::Display) -> Self {
        tracing::error!("a store's files could not be opened: {err}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "out_of_files",
            format!(
                "the host holds as many files open as it may, so the store's files could not be \
                 opened ({err}). Retry once other stores have closed theirs; the operator can \
                 raise the host's hard open-file limit (systemd LimitNOFILE=, ulimit -Hn: the \
                 host log at start says how high) or have idle stores close their files sooner \
                 (close_files_after_ms)"
            ),
        )
        .retry_after(OUT_OF_FILES_RETRY_SECS)
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// A 500 whose details go to the log, not to the client.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {err}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the host log has the details",
        )
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code it answers with (`invalid_json`, `store_not_found`, …).
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut response = (self.status, body).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Invocation(failure) => {
                let (status, code) = match failure.reason {
                    FailureReason::PluginError => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "plugin_error")
                    }
                    // An invocation past a per-call cap (the events one call may emit) is
                    // a breach like the others, not a wait: the same call fails the same way.
                    FailureReason::HostError => return Self::internal(failure),
                    reason => (StatusCode::BAD_GATEWAY, reason_code(reason)),
                };
                Self::new(status, code, failure.message)
            }
            StoreError::QueueFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", err.to_string())
                    .retry_after(1)
            }
            // The message names the wait in the header's whole seconds (it named the
            // milliseconds left, "retry in 1 ms", beside `Retry-After: 1`).
            StoreError::RateLimited { .. } | StoreError::CpuBudgetUsed { .. } => {
                let code = if matches!(err, StoreError::RateLimited { .. }) {
                    "rate_limited"
                } else {
                    "cpu_budget_used"
                };
                let secs = err.retry_after_secs().unwrap_or(1);
                Self::new(StatusCode::TOO_MANY_REQUESTS, code, err.to_string()).retry_after(secs)
            }
            StoreError::EventLogFull { .. } => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "event_log_full",
                err.to_string(),
            ),
            StoreError::BatchOverBurst { .. } | StoreError::BytesOverBurst { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_over_burst",
                err.to_string(),
            ),
            StoreError::Stopped(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_stopped",
                err.to_string(),
            ),
            StoreError::NoDeadLetter { .. } => Self::new(
                StatusCode::NOT_FOUND,
                "dead_letter_not_found",
                err.to_string(),
            ),
            StoreError::DeadLetterResolved { .. } => Self::new(
                StatusCode::CONFLICT,
                "dead_letter_resolved",
                err.to_string(),
            ),
            StoreError::Storage(_) | StoreError::Directory(_) if err.is_disk_full() => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                format!(
                    "the store's disk is full, nothing was kept ({err}); free space on the \
                         filesystem of its data directory, then send it again"
                ),
            )
            .retry_after(5),
            StoreError::Directory(_) | StoreError::Storage(_) if err.is_out_of_files() => {
                Self::out_of_files(&err)
            }
            other => Self::internal(other),
        }
    }
}

/// The wait a refusal for want of open files asks for.
pub const OUT_OF_FILES_RETRY_SECS: u64 = 5;

/// The wait a refusal at `max_stores` asks for (the webhook's 503 asks the same).
pub const AT_CAPACITY_RETRY_SECS: u64 = 30;

impl From<ControlError> for ApiError {
    fn from(err: ControlError) -> Self {
        match err {
            ControlError::UnknownPlugin { .. } => {
                Self::bad_request("unknown_plugin", err.to_string())
            }
            // Room comes when a store is removed: as the webhook's 503 does, ask for a wait.
            ControlError::AtCapacity { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "at_capacity",
                err.to_string(),
            )
            .retry_after(AT_CAPACITY_RETRY_SECS),
            ControlError::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                err.to_string(),
            )
            .retry_after(1),
            ControlError::NotFound(id) => Self::unknown_store(id.as_str()),
            ControlError::MemoryAboveCeiling { .. } => {
                Self::bad_request("quota_above_ceiling", err.to_string())
            }
            ControlError::FuelNotMetered { .. } => {
                Self::bad_request("fuel_not_metered", err.to_string())
            }
            ControlError::Plugin(plugin) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_plugin",
                plugin.to_string(),
            ),
            ControlError::Store(store) => store.into(),
            ControlError::Files(_) | ControlError::Registry(_) if err.is_out_of_files() => {
                Self::out_of_files(&err)
            }
            // The config file (or STORE_IDS) would bring it back, empty after a purge.
            ControlError::ConfigOwned(refusal) => {
                Self::new(StatusCode::CONFLICT, "config_owned", refusal)
            }
            // Another host runs it: the client asked the wrong host.
            ControlError::PlacedElsewhere { .. } => Self::new(
                StatusCode::MISDIRECTED_REQUEST,
                "placed_elsewhere",
                err.to_string(),
            ),
            other => Self::internal(other),
        }
    }
}

fn reason_code(reason: FailureReason) -> &'static str {
    reason.as_str()
}

/// Middleware: an error answered without the JSON envelope — axum's own rejections, such as a
/// path segment that is not a number or a query string that does not parse (plain text), or
/// a method a route does not take (no body) — gets the envelope, with axum's text as the
/// message, so every error a client sees has the same shape.
pub async fn envelope_plain_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Rejection texts are a line or two; anything longer is cut, not buffered.
    let text = axum::body::to_bytes(body, 16 << 10)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let (code, fallback) = match status {
        StatusCode::BAD_REQUEST => ("bad_request", "the request could not be read"),
        StatusCode::NOT_FOUND => ("not_found", "no such route; see the README for the API"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not take that method; see the README for the API",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "send the body as application/json",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_request", "the request could not be read"),
        _ => ("http_error", "the request failed"),
    };
    let message = if text.is_empty() {
        format!("{method} {path}: {fallback}")
    } else {
        format!("{method} {path}: {text}")
    };
    let mut envelope = ApiError::new(status, code, message).into_response();
    // Keep what the original answer said about the method or retrying (Allow, Retry-After).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            envelope.headers_mut().insert(name.clone(), value.clone());
        }
    }
    envelope
}
