//! Tenant routes: append and read events, run queries.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use storehost_store::{LoggedEvent, NewEvent};

use super::running_store;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;

/// Most events in one append request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1_000;
/// Most events one read returns.
pub const MAX_READ_LIMIT: usize = 1_000;
/// Longest long-poll wait.
pub const MAX_WAIT_MS: u64 = 30_000;

/// One event in an append request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EventIn {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    payload: Option<Value>,
    idempotency_key: Option<String>,
}

/// `{"events":[...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    events: Vec<EventIn>,
}

/// `POST /v1/stores/{id}/events` → 202 `{"seq"}` or `{"seqs"}`; durable before it answers.
pub async fn append(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<JsonBody<Value>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let JsonBody(raw) = body?;
    let (batch, mut events) = parse_append(raw)?;
    for event in &mut events {
        event.request_id = Some(request_id.clone());
    }
    let seqs = store.append(events, "api").await?;
    let body = if batch {
        json!({ "seqs": seqs })
    } else {
        json!({ "seq": seqs[0] })
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// Reads an append body — one event `{"type","payload","idempotencyKey"}` or a batch
/// `{"events":[...]}` — into the events to append; `true` for a batch.
pub fn parse_append(raw: Value) -> Result<(bool, Vec<NewEvent>), ApiError> {
    let invalid = |err: serde_json::Error| {
        ApiError::bad_request(
            "invalid_event",
            format!(
                "{err}; send {{\"type\": \"...\", \"payload\": {{...}}, \"idempotencyKey\"?: \"...\"}} or {{\"events\": [ ... ]}}"
            ),
        )
    };
    let batch = raw.get("events").is_some();
    let events = if batch {
        serde_json::from_value::<Batch>(raw)
            .map_err(invalid)?
            .events
    } else {
        vec![serde_json::from_value::<EventIn>(raw).map_err(invalid)?]
    };
    if events.is_empty() || events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(ApiError::bad_request(
            "invalid_event",
            format!("a batch holds 1 to {MAX_EVENTS_PER_REQUEST} events"),
        ));
    }
    let events = events
        .into_iter()
        .enumerate()
        .map(|(index, event)| validate(index, event))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((batch, events))
}

fn validate(index: usize, event: EventIn) -> Result<NewEvent, ApiError> {
    if event.event_type.is_empty() || event.event_type.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_event",
            format!("event {index}: \"type\" must be 1 to 200 characters"),
        ));
    }
    if let Some(key) = &event.idempotency_key
        && (key.is_empty() || key.len() > 200)
    {
        return Err(ApiError::bad_request(
            "invalid_event",
            format!("event {index}: \"idempotencyKey\" must be 1 to 200 characters"),
        ));
    }
    Ok(NewEvent {
        event_type: event.event_type,
        payload: event
            .payload
            .map_or_else(|| "{}".to_owned(), |p| p.to_string()),
        idempotency_key: event.idempotency_key,
        request_id: None,
    })
}

/// `?after=SEQ&limit=N&waitMs=MS`
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadParams {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    wait_ms: Option<u64>,
}

/// An event as the API shows it (reads and the SSE stream).
#[derive(serde::Serialize)]
pub(crate) struct EventOut<'a> {
    seq: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
    payload: &'a RawValue,
    at: i64,
    source: &'a str,
    #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

impl<'a> EventOut<'a> {
    /// `event` with its payload already parsed.
    pub(crate) fn new(event: &'a LoggedEvent, payload: &'a RawValue) -> Self {
        Self {
            seq: event.seq,
            event_type: &event.event_type,
            payload,
            at: event.at,
            source: &event.source,
            request_id: event.request_id.as_deref(),
        }
    }
}

/// `GET /v1/stores/{id}/events` → `{"events":[...],"next":SEQ}`; long-polls with `waitMs`.
pub async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let Query(params) = params.map_err(|err| {
        ApiError::bad_request(
            "invalid_query",
            format!("{err}; use after=<seq>&limit=<1..{MAX_READ_LIMIT}>&waitMs=<0..{MAX_WAIT_MS}>"),
        )
    })?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_READ_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_READ_LIMIT}"),
        ));
    }
    let wait = params
        .wait_ms
        .map(|ms| Duration::from_millis(ms.min(MAX_WAIT_MS)));
    let events = store.read(params.after, limit, wait).await?;
    let next = events.last().map_or(params.after, |e| e.seq);
    let mut out = Vec::with_capacity(events.len());
    for event in &events {
        let payload: &RawValue =
            serde_json::from_str(&event.payload).map_err(ApiError::internal)?;
        out.push(EventOut::new(event, payload));
    }
    let body = serde_json::to_string(&json!({ "events": out, "next": next }))
        .map_err(ApiError::internal)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    ))
}

/// `?args=JSON`
#[derive(Debug, Deserialize)]
pub struct QueryParams {
    args: Option<String>,
}

/// `GET /v1/stores/{id}/query/{name}?args=JSON` → the plugin's answer.
pub async fn query(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    Query(params): Query<QueryParams>,
    Extension(RequestId(request_id)): Extension<RequestId>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let args = params.args.unwrap_or_else(|| "{}".to_owned());
    if serde_json::from_str::<serde::de::IgnoredAny>(&args).is_err() {
        return Err(ApiError::bad_request(
            "invalid_args",
            "args must be JSON, e.g. ?args={\"id\":\"t1\"} (URL-encoded)",
        ));
    }
    let answer = store.query(&name, &args, Some(&request_id)).await?;
    if serde_json::from_str::<serde::de::IgnoredAny>(&answer).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_plugin_answer",
            format!("the plugin's answer to query {name:?} is not JSON"),
        ));
    }
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer,
    ))
}
