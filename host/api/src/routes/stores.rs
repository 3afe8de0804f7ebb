//! Admin routes over stores: list, show, create/update, remove, pause/resume, dead letters.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};
use storehost_control::config::{OwnSettings, QuotasOverride, store_config_problems};
use storehost_control::{Provisioned, StoreSource};
use storehost_store::Quotas;

use super::{parse_store_id, running_store};
use crate::body::OptionalJsonBody;
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /v1/stores`: the running stores, and those whose start failed (`failed`).
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let failed: Vec<Value> = state
        .orchestrator
        .failed()
        .into_iter()
        .map(|(id, failure)| {
            let source = state
                .orchestrator
                .failed_start(&id)
                .and_then(|(_, source)| source);
            json!({
                "id": id,
                "source": source,
                "error": failure.detail,
                "at": failure.at,
            })
        })
        .collect();
    Json(json!({ "stores": state.orchestrator.list().await, "failed": failed }))
}

/// `GET /v1/stores/{id}`; a store whose start failed answers 503 `store_failed` with why.
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_store_id(&id)?;
    match state.orchestrator.view(&id).await {
        Some(view) => Ok(Json(view)),
        None => Err(super::not_running(&state, &id)),
    }
}

/// The body of `PUT /v1/stores/{id}`; every field is optional, and so is the body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutStore {
    /// A plugin's name, or `null` to follow the host's default plugin again.
    #[serde(default, deserialize_with = "present")]
    plugin: Option<Option<String>>,
    quotas: Option<serde_json::Map<String, Value>>,
    config: Option<BTreeMap<String, String>>,
}

/// A field that is present, `null` included (`Some(None)`); absent is `None` (`serde(default)`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// `PUT /v1/stores/{id}` → 201 created, 200 updated or unchanged (`change` says which).
pub async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<PutStore>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_store_id(&id)?;
    // Read and changed under the change lock: two PUTs racing each other both take effect.
    let outcome = state
        .orchestrator
        .edit_own(&id, |current, defaults| {
            let (mut own, source) = match current {
                Some((own, source)) => {
                    let config_file = state.orchestrator.settings().config_file.as_deref();
                    if let Some(refusal) = source.change_refused(&id, config_file) {
                        return Err(ApiError::new(StatusCode::CONFLICT, "config_owned", refusal));
                    }
                    (own, source)
                }
                None => (OwnSettings::default(), StoreSource::Api),
            };
            // What the body sets becomes the store's own; the rest follows the defaults.
            if let Some(plugin) = body.plugin {
                own.plugin = plugin;
            }
            if let Some(config) = body.config {
                own.config = checked_config(config)?;
            }
            if let Some(mut changes) = body.quotas {
                // `null` hands a quota back to the defaults (`fuel_per_call`'s `null` is
                // "unmetered"). An unknown name stays, for the check below to name it.
                changes.retain(|name, value| {
                    !(value.is_null() && name != "fuel_per_call" && own.reset_quota(name))
                });
                let names: Vec<String> = changes.keys().cloned().collect();
                let base = own.clone().over(defaults).quotas;
                let quotas = merge_quotas(&base, &changes)?;
                own.set_quotas(&quotas, &names);
            }
            Ok((own, source))
        })
        .await?;
    let view = state
        .orchestrator
        .view(&id)
        .await
        .ok_or_else(|| ApiError::unknown_store(id.as_str()))?;
    let (status, change) = match outcome {
        Provisioned::Created => (StatusCode::CREATED, "created"),
        Provisioned::Updated => (StatusCode::OK, "updated"),
        Provisioned::Unchanged => (StatusCode::OK, "unchanged"),
    };
    // The store's view as `GET` shows it, and what this PUT did: 200 alone does not tell an
    // update from a PUT of what the store already ran (`ctl stores add` said "updated").
    let mut body = serde_json::to_value(view).map_err(ApiError::internal)?;
    if let Some(fields) = body.as_object_mut() {
        fields.insert("change".into(), Value::from(change));
    }
    Ok((status, Json(body)))
}

/// Applies the quota fields given over `base`, in the forms a config file takes (sizes as
/// bytes or `"64MiB"`, fuel as a number or `"unmetered"`/`null`); unknown fields, wrong types
/// and values no store could run under ([`Quotas::problems`]) are errors, all of them named in
/// one answer.
fn merge_quotas(
    base: &Quotas,
    changes: &serde_json::Map<String, Value>,
) -> Result<Quotas, ApiError> {
    let (changes, refused) = QuotasOverride::from_json_fields(changes);
    let quotas = changes.apply_to(base);
    let problems: Vec<String> = refused
        .into_iter()
        .chain(quotas.problems().iter().map(ToString::to_string))
        .collect();
    if !problems.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_quotas",
            format!(
                "invalid quotas: {}; nothing was changed",
                problems.join("; ")
            ),
        ));
    }
    Ok(quotas)
}

/// `config` when the keys the host gives a meaning to (`LLM_MAX_ITERATIONS`) hold usable
/// values, as the config file checks them.
fn checked_config(config: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ApiError> {
    let problems = store_config_problems(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ApiError::bad_request(
            "invalid_config",
            format!("{}; nothing was changed", problems.join("; ")),
        ))
    }
}

/// `?purge=true`; any other parameter is refused (a misspelt `Purge=true` archived the data
/// it was meant to delete).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    #[serde(default)]
    purge: bool,
}

/// `DELETE /v1/stores/{id}[?purge=true]`
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<RemoveParams>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_store_id(&id)?;
    // A store the config file or STORE_IDS declares gets 409 `config_owned`.
    if !state.orchestrator.remove_unowned(&id, params.purge).await? {
        return Err(ApiError::unknown_store(id.as_str()));
    }
    Ok(Json(json!({
        "storeId": id,
        "status": "removed",
        "data": if params.purge { "purged" } else { "archived" },
    })))
}

/// `POST /v1/stores/{id}/pause`
pub async fn pause(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    state.orchestrator.set_paused(store.id(), true).await?;
    Ok(Json(json!({"storeId": store.id(), "state": "paused"})))
}

/// `POST /v1/stores/{id}/resume`
pub async fn resume(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    state.orchestrator.set_paused(store.id(), false).await?;
    Ok(Json(json!({"storeId": store.id(), "state": "running"})))
}

/// A page of dead letters by default, and at most: a store may hold hundreds of thousands
/// (200,000 of 4 KB read whole took 1.8 GB of the host's memory per request).
pub const DEAD_LETTERS_PAGE: usize = 100;
/// The largest `limit` a dead-letter listing takes.
pub const MAX_DEAD_LETTERS_PAGE: usize = 1_000;

/// `?after=&limit=` of `GET /v1/stores/{id}/dead-letters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterPage {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// `GET /v1/stores/{id}/dead-letters?after=SEQ&limit=N` → the dead letters of events after
/// `after`, oldest first, at most `limit` (100 by default, at most 1,000), and `next`: the
/// `after` of the next page, `null` on the last.
pub async fn dead_letters(
    State(state): State<AppState>,
    Path(id): Path<String>,
    page: Result<Query<DeadLetterPage>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(page) = page.map_err(|err| {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{}; the dead-letter listing takes `after` (a seq) and `limit` (1 to {MAX_DEAD_LETTERS_PAGE})",
                err.body_text()
            ),
        )
    })?;
    let limit = page.limit.unwrap_or(DEAD_LETTERS_PAGE);
    if !(1..=MAX_DEAD_LETTERS_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit is {limit}; it is 1 to {MAX_DEAD_LETTERS_PAGE}"),
        ));
    }
    let store = running_store(&state, &id).await?;
    // One more than the page: `next` only when a letter is left for it (an exactly full last
    // page says it is the last).
    let mut letters = store.dead_letters(page.after, limit + 1).await?;
    let next = (letters.len() > limit)
        .then(|| {
            letters.truncate(limit);
            letters.last().map(|letter| letter.seq)
        })
        .flatten();
    Ok(Json(json!({ "deadLetters": letters, "next": next })))
}

/// `GET /v1/stores/{id}/tasks` — the store's schedules and latest task executions.
pub async fn tasks(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    Ok(Json(store.tasks().await?))
}

/// `POST /v1/stores/{id}/dead-letters/{seq}/retry` — delivers the event once more and answers
/// with the outcome.
pub async fn retry_dead_letter(
    State(state): State<AppState>,
    Path((id, seq)): Path<(String, u64)>,
) -> Result<impl IntoResponse, ApiError> {
    let store = running_store(&state, &id).await?;
    store.retry_dead_letter(seq).await?;
    Ok(Json(json!({"seq": seq, "status": "resolved"})))
}
