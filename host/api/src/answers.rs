//! Answers held until their client reads them.
//!
//! An answer stays in the host's memory until its client has read it, and a client that reads
//! slowly enough (a segment every few seconds) keeps its connection, and the answer, for as
//! long as it likes: the write timeout cannot tell it from a slow network. So a tenant route's
//! answer of [`COUNTED_FROM_BYTES`] or more holds a share of its store's allowance
//! ([`storehost_store::MAX_UNREAD_ANSWER_KIB`]) and of the host's ([`MAX_UNREAD_ANSWERS_KIB`])
//! until its last byte is written or its connection is gone; an answer that finds no room is
//! refused, and its memory let go at once. The admin token's answers hold none (a tenant using
//! its store's allowance must not keep the operator from reading the store).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::state::AppState;

/// Answers smaller than this hold no allowance: the host's connection cap bounds them (1,024
/// connections of 64 KiB are 64 MiB).
pub const COUNTED_FROM_BYTES: u64 = 64 << 10;

/// How much of its answers every store's clients together may leave unread at once, in KiB.
pub const MAX_UNREAD_ANSWERS_KIB: usize = 512 << 10;

/// The host's allowance of unread answers (one per [`AppState`]).
pub(crate) fn host_allowance() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_UNREAD_ANSWERS_KIB))
}

/// An answer's bytes with the allowance they hold: hyper keeps them until they are written,
/// and the allowance goes back when they are dropped.
struct Held {
    bytes: Bytes,
    _permits: [OwnedSemaphorePermit; 2],
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Middleware on the tenant routes: see the module's documentation. Answers of unknown size
/// (the event stream, which the store's follower cap bounds) pass as they are.
pub async fn hold_until_read(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    // `require_tenant`, outside this layer, said who calls.
    let admin = matches!(
        request.extensions().get::<crate::auth::Caller>(),
        Some(crate::auth::Caller::Admin)
    );
    let response = next.run(request).await;
    let size = match response.body().size_hint().exact() {
        Some(size) if size >= COUNTED_FROM_BYTES && !admin => size,
        _ => return response,
    };
    let Some(id) = params.get("id") else {
        return response;
    };
    let Ok(store) = crate::routes::running_store(&state, id).await else {
        // Removed while it answered: its allowance is gone with it.
        return response;
    };
    let kib = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
    let max = storehost_store::MAX_UNREAD_ANSWER_KIB;
    if kib as usize > max {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "answer_too_large",
            format!(
                "the answer is {size} bytes, more than a store's clients may have unread at \
                 once ({max} KiB); ask for less (a smaller page, a narrower query)"
            ),
        )
        .into_response();
    }
    let Ok(of_store) = store.unread_answers().try_acquire_many_owned(kib) else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "answers_unread",
            format!(
                "store {id}'s clients have not yet read answers taking most of the {max} KiB \
                 they may leave unread at once, and this one is {size} bytes; read those \
                 answers (or close their connections), then retry"
            ),
        )
        .retry_after(1)
        .into_response();
    };
    let Ok(of_host) = state.unread_answers.clone().try_acquire_many_owned(kib) else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "host_busy",
            format!(
                "the host holds {MAX_UNREAD_ANSWERS_KIB} KiB of answers its clients have not \
                 read yet, the most it may, and this one is {size} bytes; retry shortly"
            ),
        )
        .retry_after(1)
        .into_response();
    };
    let (parts, body) = response.into_parts();
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => {
            let held = Held {
                bytes,
                _permits: [of_store, of_host],
            };
            Response::from_parts(parts, Body::from(Bytes::from_owner(held)))
        }
        Err(err) => ApiError::internal(err).into_response(),
    }
}
