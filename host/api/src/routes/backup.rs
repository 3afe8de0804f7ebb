//! `GET /v1/stores/{id}/backup` (a consistent snapshot of a running store, as a `.tar.gz` with
//! a manifest) and `PUT /v1/stores/{id}/backup` (restore: the archive is checked whole before
//! the store's data is replaced).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;
use storehost_control::ControlError;
use storehost_control::orchestrator::backup::{RestoreFailure, archive_limit};
use storehost_store::backup::{RestoreError, ScratchDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{not_running, parse_store_id};
use crate::error::ApiError;
use crate::state::AppState;

/// The largest archive a restore accepts, whatever the store's quotas (less when they are
/// smaller: see `archive_limit`).
pub const MAX_RESTORE_BYTES: u64 = 16 << 30;

/// `GET /v1/stores/{id}/backup` → the archive (`application/gzip`), with its seq range in
/// `X-Backup-*` headers; 404 no such store, 503 `store_failed` for one whose start failed.
pub async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_store_id(&id)?;
    let (scratch, archive) =
        state
            .orchestrator
            .backup_store(&id)
            .await
            .map_err(|err| match err {
                // A store whose start failed says so, as its other routes do.
                ControlError::NotFound(id) => not_running(&state, &id),
                err => err.into(),
            })?;
    let file = tokio::fs::File::open(&archive.path)
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(
        store_id = %id,
        bytes = archive.size,
        last_seq = archive.manifest.seq.last,
        cursor = archive.manifest.cursor,
        "backup taken"
    );
    // The scratch directory (and the archive in it) lives until the body is sent.
    let chunks = futures::stream::unfold(Some((file, scratch)), |state| async move {
        let (mut file, scratch) = state?;
        let mut buffer = vec![0u8; 256 << 10];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(Bytes::from(buffer)), Some((file, scratch))))
            }
            Err(err) => Some((Err(err), None)),
        }
    });
    let manifest = &archive.manifest;
    let filename = format!(
        "attachment; filename=\"{id}-{}.storehost-backup.tar.gz\"",
        manifest.created_at
    );
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("content-type", "application/gzip".into());
    set("content-length", archive.size.to_string());
    set("content-disposition", filename);
    set("x-backup-store-id", manifest.store_id.clone());
    set("x-backup-seq-first", manifest.seq.first.to_string());
    set("x-backup-seq-last", manifest.seq.last.to_string());
    set("x-backup-cursor", manifest.cursor.to_string());
    Ok(response)
}

/// `?allowDifferentStore=true`
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreParams {
    #[serde(default)]
    allow_different_store: bool,
}

/// `PUT /v1/stores/{id}/backup` (body: an archive from `GET`) → 200 with what was restored;
/// 400 unreadable archive, 409 backup of another store, 422 invalid backup, 404 no such store,
/// 503 `store_failed` for one whose start failed.
pub async fn restore(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<RestoreParams>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_store_id(&id)?;
    let Query(params) = params.map_err(|err| {
        ApiError::bad_request(
            "invalid_query",
            format!("{err}; the only parameter is allowDifferentStore=true|false"),
        )
    })?;
    let Some(view) = state.orchestrator.view(&id).await else {
        return Err(not_running(&state, &id));
    };
    let max = archive_limit(&view.quotas).min(MAX_RESTORE_BYTES);
    let data_dir = state.orchestrator.settings().data_dir.clone();
    let scratch_id = id.clone();
    let scratch =
        tokio::task::spawn_blocking(move || ScratchDir::new(&data_dir, "restore", &scratch_id))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
    let upload = scratch.path().join("upload");
    let received = receive(body, &upload, max).await.map_err(|err| match err {
        Received::TooLarge => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the archive is larger than {max} bytes, more than store {id}'s quotas (disk, \
                 event_log and files) could hold once unpacked; raise them first, or send the \
                 archive of this store"
            ),
        ),
        Received::Refused(err) => err,
    })?;
    if received == 0 {
        return Err(ApiError::bad_request(
            "empty_body",
            "the request body is empty; send the archive GET /v1/stores/{id}/backup produced",
        ));
    }
    let report = state
        .orchestrator
        .restore_store(&id, &upload, &scratch, params.allow_different_store)
        .await
        .map_err(|err| restore_error(&state, err))?;
    Ok(Json(json!({
        "storeId": report.store_id,
        "status": "restored",
        "state": if report.paused { "paused" } else { "running" },
        "restoredFrom": {
            "storeId": report.manifest.store_id,
            "createdAt": report.manifest.created_at,
            "plugin": report.manifest.plugin,
        },
        "seq": report.manifest.seq,
        "cursor": report.manifest.cursor,
        "previousData": report.previous_data,
        "warnings": report.warnings,
    })))
}

/// How long the upload of an archive may pause: no byte for this long → 408 `body_too_slow`.
/// (An archive may take hours to arrive, so the whole upload has no deadline; a client that
/// sent its headers and then nothing held its connection for ever.)
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Why an upload was not received.
#[derive(Debug)]
enum Received {
    /// It held more than the most asked for.
    TooLarge,
    /// It could not be read or kept.
    Refused(ApiError),
}

impl From<ApiError> for Received {
    fn from(err: ApiError) -> Self {
        Self::Refused(err)
    }
}

/// Writes the request body to `path`, up to `max` bytes; returns its length.
async fn receive(body: Body, path: &std::path::Path, max: u64) -> Result<u64, Received> {
    receive_pausing(body, path, max, UPLOAD_IDLE).await
}

/// [`receive`], with a body that pauses for `idle` refused.
async fn receive_pausing(
    body: Body,
    path: &std::path::Path,
    max: u64,
    idle: std::time::Duration,
) -> Result<u64, Received> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(ApiError::internal)?;
    let mut body = body;
    let mut received: u64 = 0;
    loop {
        let Ok(frame) = tokio::time::timeout(idle, body.frame()).await else {
            return Err(Received::Refused(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_too_slow",
                format!(
                    "the archive stopped arriving: no byte for {} s after {received} bytes; \
                     send it again without pausing (the store's data was not changed)",
                    idle.as_secs()
                ),
            )));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|err| {
            ApiError::bad_request(
                "body_unreadable",
                format!("could not read the archive from the request: {err}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if received > max {
            return Err(Received::TooLarge);
        }
        file.write_all(&data).await.map_err(ApiError::internal)?;
    }
    file.flush().await.map_err(ApiError::internal)?;
    Ok(received)
}

fn restore_error(state: &AppState, err: RestoreFailure) -> ApiError {
    match err {
        RestoreFailure::NotFound(id) => not_running(state, &id),
        RestoreFailure::StoreMismatch { .. } => {
            ApiError::new(StatusCode::CONFLICT, "store_mismatch", err.to_string())
        }
        RestoreFailure::Archive(RestoreError::Unreadable(_)) => ApiError::bad_request(
            "invalid_archive",
            format!("{err}; the store's data was not changed"),
        ),
        RestoreFailure::Archive(RestoreError::Invalid(message)) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_backup",
            format!("{message}; the store's data was not changed"),
        ),
        RestoreFailure::Archive(RestoreError::TooLarge { .. }) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "archive_too_large",
            format!("{err}; the store's data was not changed"),
        ),
        RestoreFailure::Archive(RestoreError::Io(err)) => ApiError::internal(err),
        RestoreFailure::Control(err) => err.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload that stops arriving is refused once it has paused `idle`, whatever it sent
    /// before; one that keeps arriving is taken whole, however long it takes.
    #[tokio::test]
    async fn an_upload_that_pauses_or_grows_past_its_limit_is_refused() {
        use futures::StreamExt;
        let path = std::env::temp_dir().join(format!("storehost-upload-{}", std::process::id()));
        let chunk = || Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"));
        let idle = std::time::Duration::from_millis(200);

        let steady = futures::stream::iter(0..10).then(move |_| async move {
            tokio::time::sleep(idle / 4).await;
            chunk()
        });
        let received = receive_pausing(Body::from_stream(steady), &path, u64::MAX, idle).await;
        assert_eq!(
            received.unwrap(),
            100,
            "a steady upload slower than idle in all"
        );
        let ten = futures::stream::iter((0..10).map(move |_| chunk()));
        let over = receive_pausing(Body::from_stream(ten), &path, 50, idle).await;
        assert!(matches!(over, Err(Received::TooLarge)), "{over:?}");

        let stalled = futures::stream::iter([chunk()]).chain(futures::stream::pending());
        let Err(Received::Refused(refused)) =
            receive_pausing(Body::from_stream(stalled), &path, u64::MAX, idle).await
        else {
            panic!("a pausing upload is refused");
        };
        let refused = refused.into_response();
        assert_eq!(refused.status(), StatusCode::REQUEST_TIMEOUT);
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("body_too_slow") && body.contains("after 10 bytes"),
            "{body}"
        );
        let _ = std::fs::remove_file(&path);
    }
}
