//! A well-behaved plugin: key/value writes, emitted events, and a record of every event applied.
//!
//! Events: `kv.put {key, value}` upserts into `kv` (a non-string `value` is stored as its JSON
//! text); `kv.emit {type, payload}` emits that event. Every event, of any type, also inserts its
//! `seq` into `applied(seq INTEGER PRIMARY KEY)`: a second application of the same event would
//! violate the key, fail the handler and so be visible to tests.
//!
//! Queries: `get {key}` → `{"value": ...|null}`; `applied` → `{"seqs": [...]}`;
//! `count` → `{"kv": N, "applied": N}`.
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::sql::{self, SqlError};
use storehost_guest_sdk::{Event, Plugin, events, export_plugin, params, query_args};

struct Writer;

#[derive(Deserialize)]
struct Put {
    key: String,
    value: Json,
}

#[derive(Deserialize)]
struct Emit {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    payload: Json,
}

#[derive(Deserialize)]
struct GetArgs {
    key: String,
}

fn ensure_schema() -> Result<(), SqlError> {
    sql::execute(
        "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT)",
        params![],
    )?;
    sql::execute(
        "CREATE TABLE IF NOT EXISTS applied (seq INTEGER PRIMARY KEY)",
        params![],
    )?;
    Ok(())
}

/// Runs a read; before the first event there are no tables, which reads as empty.
fn read(statement: &str, params: &[sql::Value]) -> Result<Option<sql::Rows>, String> {
    match sql::query(statement, params) {
        Ok(rows) => Ok(Some(rows)),
        Err(err) if err.is_missing_table() => Ok(None),
        Err(err) => Err(err.into()),
    }
}

fn count(table: &str) -> Result<i64, String> {
    Ok(
        match read(&format!("SELECT count(*) FROM {table}"), params![])? {
            Some(rows) => rows.first().map(|row| row.get(0)).transpose()?.unwrap_or(0),
            None => 0,
        },
    )
}

impl Plugin for Writer {
    fn handle_event(event: Event) -> Result<(), String> {
        ensure_schema()?;
        match event.event_type.as_str() {
            "kv.put" => {
                let put: Put = event.payload_json()?;
                let value = match put.value {
                    Json::String(text) => text,
                    other => other.to_string(),
                };
                sql::execute(
                    "INSERT INTO kv (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![put.key, value],
                )?;
            }
            "kv.emit" => {
                let emit: Emit = event.payload_json()?;
                events::emit(&emit.event_type, &emit.payload)?;
            }
            _ => {}
        }
        sql::execute(
            "INSERT INTO applied (seq) VALUES (?1)",
            params![event.seq as i64],
        )
        .map_err(|err| format!("event seq {} applied twice? {err}", event.seq))?;
        Ok(())
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        match name {
            "get" => {
                let args: GetArgs = query_args(name, args)?;
                let value: Option<String> =
                    match read("SELECT value FROM kv WHERE key = ?1", params![args.key])? {
                        Some(rows) => rows.first().map(|row| row.get(0)).transpose()?,
                        None => None,
                    };
                Ok(json!({ "value": value }))
            }
            "applied" => {
                let seqs = match read("SELECT seq FROM applied ORDER BY seq", params![])? {
                    Some(rows) => rows
                        .iter()
                        .map(|row| row.get::<i64>(0))
                        .collect::<Result<Vec<_>, _>>()?,
                    None => Vec::new(),
                };
                Ok(json!({ "seqs": seqs }))
            }
            "count" => Ok(json!({ "kv": count("kv")?, "applied": count("applied")? })),
            other => Err(format!(
                "unknown query `{other}`; writer answers get, applied, count"
            )),
        }
    }
}

export_plugin!(Writer);

fn main() {}
