//! `GET /v1/stores/{id}/events/stream?after=SEQ`: the store's events as Server-Sent Events.
//!
//! Each event is one SSE message: `id:` its seq, `event:` its type, `data:` the event's JSON as
//! `GET /v1/stores/{id}/events` shows it. A client that reconnects with `Last-Event-ID` (which
//! browsers' `EventSource` send by themselves) resumes right after the last event it saw, so
//! it gets every event exactly once. Waiting uses the store's head notification: nothing polls.
//! Streams end when the store stops or the host starts shutting down (so shutdown does not
//! wait for them), and a stream opened with a store token ends once that token is revoked
//! (before the next events, or within `WAIT` when none come).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::value::RawValue;
use storehost_store::{LoggedEvent, Store};

use super::events::EventOut;
use super::running_store;
use crate::error::ApiError;
use crate::state::AppState;

/// Events read from the log at a time.
const BATCH: usize = 256;
/// How long one wait for new events lasts before the stream checks in again (a safety net:
/// new events and the store stopping both wake it at once).
const WAIT: Duration = Duration::from_secs(30);
/// How often a comment keeps an idle connection (and proxies on the way) alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Most payload bytes of the log one stream holds at once (one event at least): a stream
/// holds its page while it sends it, and a store serves 64 streams (a page of the log read
/// through `GET …/events` is 4 MiB, but that answer counts among the store's unread answers).
pub const PAGE_BYTES: usize = 256 << 10;

/// `?after=SEQ&logEpoch=EPOCH`
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamParams {
    after: Option<u64>,
    /// The log's epoch the follower read (see `events::ensure_within_log`): a client puts it
    /// in the stream's URL, so a reconnect after a restore gets 409 instead of skipping.
    log_epoch: Option<i64>,
    /// `Last-Event-ID` as some `EventSource` polyfills send it on a reconnect (the header
    /// wins when both come).
    last_event_id: Option<u64>,
}

/// `GET /v1/stores/{id}/events/stream`
pub async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let store = running_store(&state, &id).await?;
    let Query(params) = params.map_err(|err| {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{err}; use ?after=<seq> (a whole number, 0 for the whole log) and optionally \
                 &logEpoch=<the logEpoch read>"
            ),
        )
    })?;
    let after = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_last_event_id",
                    "Last-Event-ID must be the seq of the last event received (a whole number)",
                )
            })?,
        None => params.last_event_id.or(params.after).unwrap_or(0),
    };
    super::events::ensure_within_log(&store, after, params.log_epoch)?;
    let follower = super::events::follow(&state, &headers, &store)?;
    // A store token is checked again as the stream goes on: revoking it ends the stream.
    let store_token = crate::auth::bearer_of(&headers)
        .ok()
        .filter(|token| !state.is_admin(token))
        .map(str::to_owned);
    let events = futures::stream::unfold(
        Cursor {
            store,
            after,
            buffered: VecDeque::new(),
            shutting_down: state.shutting_down.subscribe(),
            store_token: store_token.map(|token| (state.clone(), token)),
            _follower: follower,
        },
        Cursor::next,
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive")))
}

/// Where one stream is in the store's log.
struct Cursor {
    store: Store,
    after: u64,
    buffered: VecDeque<LoggedEvent>,
    shutting_down: tokio::sync::watch::Receiver<bool>,
    /// The store token the stream was opened with (none for the admin token).
    store_token: Option<(AppState, String)>,
    /// The stream's place among the store's followers, given back when it ends (none for
    /// the admin token's).
    _follower: Option<super::events::Following>,
}

impl Cursor {
    /// The next SSE message; `None` ends the stream (the store stopped, the host shuts down,
    /// or the log failed). A client reconnecting with `Last-Event-ID` misses nothing.
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                self.after = event.seq;
                return Some((Ok(message(&event)), self));
            }
            let read = tokio::select! {
                read = self.store.read_within(self.after, BATCH, PAGE_BYTES, Some(WAIT)) => read,
                () = self.store.stopped() => return None,
                _ = self.shutting_down.wait_for(|down| *down) => return None,
            };
            if let Some((state, token)) = &self.store_token
                && state
                    .orchestrator
                    .registry()
                    .verify_store_token(token)
                    .is_none()
            {
                tracing::info!(store_id = %self.store.id(), "event stream ended: its store token was revoked");
                return None;
            }
            match read {
                Ok(events) => self.buffered.extend(events),
                Err(err) => {
                    tracing::warn!(store_id = %self.store.id(), "event stream ended: {err}");
                    return None;
                }
            }
        }
    }
}

fn message(event: &LoggedEvent) -> Event {
    let fallback = RawValue::NULL;
    let payload: &RawValue = serde_json::from_str(&event.payload).unwrap_or(fallback);
    // The event's JSON, as `GET /v1/stores/{id}/events` shows it.
    let data =
        serde_json::to_string(&EventOut::new(event, payload)).unwrap_or_else(|_| "null".to_owned());
    let message = Event::default().id(event.seq.to_string()).data(data);
    // An SSE field cannot span lines: a type with a line break is left to the data.
    if event.event_type.contains(['\n', '\r']) {
        message
    } else {
        message.event(&event.event_type)
    }
}
