//! Tenant routes: append and read events, run queries.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;
use serde_json::json;
use serde_json::value::RawValue;
use storehost_store::{LoggedEvent, NewEvent, StoreError};

use super::running_store;
use crate::body::{JsonBytes, invalid_json};
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;

/// Most events in one append request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1_000;
/// Most events one read returns.
pub const MAX_READ_LIMIT: usize = 1_000;
/// Longest long-poll wait; a longer `waitMs` is refused.
pub const MAX_WAIT_MS: u64 = 30_000;
/// Longest an append refused over the store's ingress rate waits before it answers.
const MAX_REFUSAL_DELAY: Duration = Duration::from_secs(1);

/// One event in a batch: a JSON object only (serde's derive would also read an array as the
/// fields in order, so `["t", {…}, "key", null]` was taken as an event).
#[derive(Debug)]
struct EventIn<'a> {
    event_type: String,
    payload: Option<&'a RawValue>,
    idempotency_key: Option<String>,
}

impl<'de: 'a, 'a> Deserialize<'de> for EventIn<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EventVisitor(std::marker::PhantomData))
    }
}

struct EventVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for EventVisitor<'a> {
    type Value = EventIn<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an event object {\"type\", \"payload\", \"idempotencyKey\"}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error as _;
        const FIELDS: &[&str] = &["type", "payload", "idempotencyKey"];
        let (mut event_type, mut payload, mut idempotency_key) = (None, None, None);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "type" if event_type.is_some() => return Err(A::Error::duplicate_field("type")),
                "type" => event_type = Some(map.next_value::<String>()?),
                "payload" if payload.is_some() => {
                    return Err(A::Error::duplicate_field("payload"));
                }
                "payload" => payload = Some(map.next_value::<Option<&'de RawValue>>()?),
                "idempotencyKey" if idempotency_key.is_some() => {
                    return Err(A::Error::duplicate_field("idempotencyKey"));
                }
                "idempotencyKey" => idempotency_key = Some(map.next_value::<Option<String>>()?),
                other => return Err(A::Error::unknown_field(other, FIELDS)),
            }
        }
        Ok(EventIn {
            event_type: event_type.ok_or_else(|| A::Error::missing_field("type"))?,
            payload: payload.flatten(),
            idempotency_key: idempotency_key.flatten(),
        })
    }
}

/// An append body, read in one pass: either one event (`type`, `payload`, `idempotencyKey`)
/// or a batch (`events`). Payloads stay slices of the body, stored as they were sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AppendBody<'a> {
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    idempotency_key: Option<String>,
    #[serde(borrow)]
    events: Option<Vec<EventIn<'a>>>,
}

/// `POST /v1/stores/{id}/events` → 202 `{"seq"}` or `{"seqs"}`; durable before it answers.
pub async fn append(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<JsonBytes, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let JsonBytes(bytes) = body?;
    let (batch, mut events) = parse_append(&bytes)?;
    for event in &mut events {
        event.request_id = Some(request_id.clone());
    }
    let seqs = match store.append(events, "api").await {
        Ok(seqs) => seqs,
        // A refusal over the rate answers once the store could take an event again: a client
        // that retries at once — a loop without backoff, the usual flood — then sends at the
        // store's own rate instead of keeping the host busy refusing it.
        Err(StoreError::RateLimited {
            store,
            rate,
            retry_after_ms,
        }) => {
            let wait = Duration::from_millis(retry_after_ms).min(MAX_REFUSAL_DELAY);
            tokio::time::sleep(wait).await;
            // The wait the answer names is what is left of it once answered.
            let waited = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            return Err(StoreError::RateLimited {
                store,
                rate,
                retry_after_ms: retry_after_ms.saturating_sub(waited).max(1),
            }
            .into());
        }
        Err(err) => return Err(err.into()),
    };
    let body = if batch {
        json!({ "seqs": seqs })
    } else {
        json!({ "seq": seqs[0] })
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// Reads an append body — one event `{"type","payload","idempotencyKey"}` or a batch
/// `{"events":[...]}` — into the events to append; `true` for a batch. A body that is not
/// JSON is `invalid_json`; JSON of the wrong shape is `invalid_event`.
pub fn parse_append(body: &[u8]) -> Result<(bool, Vec<NewEvent>), ApiError> {
    const SHAPE: &str = "send {\"type\": \"...\", \"payload\": {...}, \"idempotencyKey\"?: \"...\"} or {\"events\": [ ... ]}";
    let invalid = |message: String| ApiError::bad_request("invalid_event", message);
    // Serde's derive would read an array as the fields in order.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    // (`Value`, not `IgnoredAny`: skipping a string does not check that it is UTF-8.)
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde_json::Value>(body).is_ok()
    {
        return Err(invalid(format!(
            "the request body must be a JSON object; {SHAPE}"
        )));
    }
    let parsed: AppendBody = serde_json::from_slice(body).map_err(|err| match err.classify() {
        // The shape can be wrong before the parser reaches a syntax error further on.
        Category::Data => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(_) => invalid(format!("{err}; {SHAPE}")),
            Err(syntax) => invalid_json(&syntax),
        },
        Category::Syntax | Category::Eof | Category::Io => invalid_json(&err),
    })?;
    // Whatever else is wrong with a body, one with a payload that does not read as JSON
    // values do (a number out of range, a lone surrogate escape) is not valid JSON: checked
    // before its shape, so a body without a `type` is told so only when it is JSON.
    let single = parsed.payload.map(|payload| (0, payload));
    let batched = parsed
        .events
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(index, event)| event.payload.map(|payload| (index, payload)));
    for (index, payload) in single.into_iter().chain(batched) {
        serde_json::from_str::<Checked>(payload.get()).map_err(|err| {
            ApiError::bad_request(
                "invalid_json",
                format!("event {index}: the payload is not valid JSON: {err} (line and column within the payload)"),
            )
        })?;
    }
    let (batch, events) = match parsed {
        AppendBody {
            events: Some(events),
            event_type: None,
            payload: None,
            idempotency_key: None,
        } => (true, events),
        AppendBody {
            events: Some(_), ..
        } => {
            return Err(invalid(format!(
                "a batch holds its events in \"events\" and nothing beside it; {SHAPE}"
            )));
        }
        AppendBody {
            event_type: Some(event_type),
            payload,
            idempotency_key,
            events: None,
        } => (
            false,
            vec![EventIn {
                event_type,
                payload,
                idempotency_key,
            }],
        ),
        AppendBody {
            event_type: None, ..
        } => return Err(invalid(format!("missing field `type`; {SHAPE}"))),
    };
    if events.is_empty() || events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(invalid(format!(
            "a batch holds 1 to {MAX_EVENTS_PER_REQUEST} events"
        )));
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
        payload: event.payload.map_or("{}", RawValue::get).to_owned(),
        idempotency_key: event.idempotency_key,
        request_id: None,
    })
}

/// A JSON value read as `serde_json::Value` would read it — every number in range, every
/// escape one that decodes — and dropped as it is read. A payload is kept as the slice of the
/// body it was sent as, which the parser only skipped over: this is what makes sure a plugin
/// (or a reader) can parse it.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// `?after=SEQ&limit=N&waitMs=MS&logEpoch=EPOCH`; any other parameter is refused (a
/// misspelt `wait_ms` was ignored, and the read answered at once instead of waiting).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadParams {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    wait_ms: Option<u64>,
    log_epoch: Option<i64>,
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
    headers: axum::http::HeaderMap,
    params: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let Query(params) = params.map_err(|err| {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{err}; use after=<seq>&limit=<1..{MAX_READ_LIMIT}>&waitMs=<0..{MAX_WAIT_MS}>&logEpoch=<the logEpoch read>"
            ),
        )
    })?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_READ_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_READ_LIMIT}"),
        ));
    }
    // Refused rather than cut short, as `limit` is: a client asking for a longer wait would
    // otherwise take the early answer for one that waited as long as it asked.
    if params.wait_ms.is_some_and(|ms| ms > MAX_WAIT_MS) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "waitMs must be 0 to {MAX_WAIT_MS}; to wait longer, read again after= the \
                 answer's next"
            ),
        ));
    }
    ensure_within_log(&store, params.after, params.log_epoch)?;
    let wait = params.wait_ms.map(Duration::from_millis);
    // A long-poll holds its place among the store's followers while it waits.
    let _follower = match wait {
        Some(wait) if !wait.is_zero() => follow(&state, &headers, &store)?,
        _ => None,
    };
    // A long-poll ends as the host starts shutting down (it answers what it has, as when its
    // wait runs out): a shutdown does not wait out the longest `waitMs`.
    let mut shutting_down = state.shutting_down.subscribe();
    let events = tokio::select! {
        read = store.read(params.after, limit, wait) => read?,
        _ = shutting_down.wait_for(|down| *down), if wait.is_some() => Vec::new(),
    };
    // A store token revoked while the poll waited gets nothing (the event stream checks the
    // same after each wait). Before, the revoked holder got the events that woke the poll.
    if wait.is_some()
        && let Ok(token) = crate::auth::bearer_of(&headers)
        && !state.is_admin(token)
        && state
            .orchestrator
            .registry()
            .verify_store_token(token)
            .is_none()
    {
        return Err(ApiError::unauthorized(
            "the token was revoked while the read waited",
        ));
    }
    let next = events.last().map_or(params.after, |e| e.seq);
    let mut out = Vec::with_capacity(events.len());
    for event in &events {
        let payload: &RawValue =
            serde_json::from_str(&event.payload).map_err(ApiError::internal)?;
        out.push(EventOut::new(event, payload));
    }
    let epoch = store.log_epoch();
    let body = serde_json::to_string(&json!({
        "events": out,
        "next": next,
        "logEpoch": epoch.epoch,
        "logEpochAfter": epoch.after,
        // Where the log ends as the answer is made (at least `next`): a follower starting
        // from now (`ctl events tail`) reads it with a store token too.
        "head": store.head().max(next),
    }))
    .map_err(ApiError::internal)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    ))
}

/// A place among `store`'s followers (an event stream, a long-poll), and among the host's,
/// or 429 `too_many_followers` when either serves as many as it may. The admin token's
/// followers take no place: a tenant holding them all must not keep the operator from
/// following its log.
pub(crate) fn follow(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    store: &storehost_store::Store,
) -> Result<Option<Following>, ApiError> {
    if crate::auth::bearer_of(headers).is_ok_and(|token| state.is_admin(token)) {
        return Ok(None);
    }
    let store_place = store.follow().ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_followers",
            format!(
                "store {} already serves {} event streams and long-polls at once, the most it \
                 may; close one (a consumer needs one stream), or read without waitMs",
                store.id(),
                storehost_store::MAX_FOLLOWERS
            ),
        )
        .retry_after(1)
    })?;
    let host_place = state.followers.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_followers",
            "the host serves as many event streams and long-polls as it may (half of \
             [http] max_connections, so the rest stay free for other requests); retry later, \
             or read without waitMs",
        )
        .retry_after(5)
    })?;
    Ok(Some(Following {
        _store: store_place,
        _host: host_place,
    }))
}

/// A follower's places among its store's followers and the host's, given back when dropped.
pub(crate) struct Following {
    _store: storehost_store::Follower,
    _host: tokio::sync::OwnedSemaphorePermit,
}

/// Refuses to follow the log from past its end, or from another history of it: a follower
/// whose last `seq` the log no longer reaches (the store was restored from an older backup,
/// or removed and created again), or that names the epoch it read (`logEpoch`) when the log
/// holds another (a restore began one), would otherwise skip the seqs handed out again.
pub(crate) fn ensure_within_log(
    store: &storehost_store::Store,
    after: u64,
    log_epoch: Option<i64>,
) -> Result<(), ApiError> {
    let current = store.log_epoch();
    if let Some(read) = log_epoch
        && read != current.epoch
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "log_replaced",
            format!(
                "store {}'s log is not the one read (logEpoch {read}; the log's is {}): it was \
                 restored from a backup or the store created again since, and its seqs after {} \
                 are handed out again (or the logEpoch given is not one this API answered); read \
                 on from after={} (the events up to it came from the backup, as they were if it \
                 was this store's) with logEpoch={}, or from after=0",
                store.id(),
                current.epoch,
                current.after,
                after.min(current.after),
                current.epoch
            ),
        ));
    }
    let head = store.head();
    if after <= head {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "after_beyond_head",
        format!(
            "store {} has no event after {head}, and {after} is past that; read from \
             after={head} or earlier (after=0 for the whole log). If you read further before, \
             its log was restored from an older backup or the store created again since, and \
             its seqs are handed out again (pass logEpoch to be told so)",
            store.id()
        ),
    ))
}

/// `GET /v1/stores/{id}/query/{name}?args=JSON` → the plugin's answer. Plain parameters
/// instead (`?conversationId=c1`) reach the plugin as a JSON object of strings.
pub async fn query(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    let mut params = std::collections::BTreeMap::new();
    for (key, value) in pairs {
        if params.contains_key(&key) {
            return Err(ApiError::bad_request(
                "invalid_args",
                format!(
                    "parameter {key:?} is given more than once; give it once, or pass a list in ?args=JSON"
                ),
            ));
        }
        params.insert(key, value);
    }
    let args = match params.remove("args") {
        Some(_) if !params.is_empty() => {
            return Err(ApiError::bad_request(
                "invalid_args",
                "give the arguments either as ?args=JSON or as plain parameters, not both",
            ));
        }
        Some(args) => args,
        None => serde_json::to_string(&params).unwrap_or_else(|_| "{}".to_owned()),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: &str) -> ApiError {
        parse_append(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn a_payload_is_stored_as_it_was_sent() {
        let (batch, events) =
            parse_append(br#"{"type":"t","payload":{"b":1,"a":[1, 2.50]},"idempotencyKey":"k"}"#)
                .unwrap();
        assert!(!batch);
        assert_eq!(events[0].payload, r#"{"b":1,"a":[1, 2.50]}"#);
        assert_eq!(events[0].idempotency_key.as_deref(), Some("k"));

        let (batch, events) = parse_append(
            br#"{"events":[{"type":"a","payload":"x"},{"type":"b"},{"type":"c","payload":null}]}"#,
        )
        .unwrap();
        assert!(batch);
        let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
        assert_eq!(payloads, [r#""x""#, "{}", "{}"]);
    }

    #[test]
    fn a_body_that_is_not_json_is_told_apart_from_one_of_the_wrong_shape() {
        for body in [
            r#"{"type": "#,
            r#"{"type":"t","payload":{]}"#,
            "{} {}",
            r#"[{"type":1}"#,
            r#"{"type":"t","payload":[1e400]}"#,
            r#"{"events":[{"type":"t","payload":{"\ud800":1}}]}"#,
            // Found by the `append_body` fuzz target: not JSON, and also without a `type`.
            r#"{"payload":{"k":5e5555550}}"#,
            r#"{"events":[{"payload":[1e400]}]}"#,
        ] {
            assert_eq!(refusal(body).code(), "invalid_json", "{body}");
        }
        // Found by the `append_body` fuzz target: an array, and not JSON (a key that is not
        // UTF-8).
        let not_utf8 = b"[{\"t\xc9ype\":\"a\"}]";
        assert_eq!(
            parse_append(not_utf8).expect_err("not JSON").code(),
            "invalid_json"
        );
        for (body, says) in [
            (r#"{"payload":{}}"#, "`type`"),
            (r#"{"type":3}"#, "invalid type"),
            (r#"{"type":"t","typo":1}"#, "unknown field `typo`"),
            (
                r#"{"events":[{"type":"a"}],"type":"b"}"#,
                "nothing beside it",
            ),
            (
                r#"{"events":[{"type":"a","extra":1}]}"#,
                "unknown field `extra`",
            ),
            (r#"{"events":[]}"#, "1 to 1000 events"),
            // Arrays in place of objects were read as the fields in order.
            (
                r#"["arr.Type",{"x":1},"key-1",null]"#,
                "the request body must be a JSON object",
            ),
            (" []", "the request body must be a JSON object"),
            (
                r#"{"events":[["t",{"x":1},"k"]]}"#,
                "invalid type: sequence, expected an event object",
            ),
            (
                r#"{"events":[{"type":"a","type":"b"}]}"#,
                "duplicate field `type`",
            ),
            (r#"{"events":[{"payload":{}}]}"#, "missing field `type`"),
            (r#"{"type":""}"#, "must be 1 to 200 characters"),
            (
                r#"{"events":[{"type":"a"},{"type":"b","idempotencyKey":""}]}"#,
                "event 1",
            ),
        ] {
            let err = refusal(body);
            assert_eq!(err.code(), "invalid_event", "{body}");
            let message = format!("{err:?}");
            assert!(message.contains(says), "{body}: {message}");
        }
    }
}
