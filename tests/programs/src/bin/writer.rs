//! A well-behaved plugin: key/value writes, emitted events, and a record of every event applied.
//!
//! Events: `kv.put {key, value}` upserts into `kv` (a non-string `value` is stored as its JSON
//! text); `kv.emit {type, payload}` emits that event; `kv.slow {key, value, sleepMs}` writes like
//! `kv.put`, then appends `<seq>` to `/data/handler.log` (outside the transaction) and sleeps —
//! a window in which the host can be killed between the guest's writes and their commit. Every
//! event, of any type, also inserts its
//! `seq` into `applied(seq INTEGER PRIMARY KEY)`: a second application of the same event would
//! violate the key, fail the handler and so be visible to tests.
//!
//! `kv.log {message}` writes `message` to the host log (info). `kv.grow {mib}` allocates that
//! much memory, touches it and frees it: the sandbox's linear memory stays that large.
//!
//! `kv.fail {key, value}` writes like `kv.put`, then fails (a plugin error). `kv.runaway {key,
//! value}` writes like `kv.put`, then runs an insert that never ends (the host interrupts it
//! past the call's CPU budget), ignores that error, writes `<key>-after` and succeeds: the
//! host must keep none of it.
//!
//! Queries: `log {message}` writes `message` to the host log; `get {key}` → `{"value": ...|null}`; `applied` → `{"seqs": [...]}`;
//! `count` → `{"kv": N, "applied": N}`; `memory` → `{"bytes": N}`, the sandbox's linear memory.
#![forbid(unsafe_code)]

use std::io::Write as _;

use serde::Deserialize;
use serde_json::{Value as Json, json};
use storehost_guest_sdk::sql::{self, SqlError};
use storehost_guest_sdk::{Event, Plugin, events, export_plugin, log, params, query_args};

struct Writer;

#[derive(Deserialize)]
struct Put {
    key: String,
    value: Json,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Slow {
    key: String,
    value: Json,
    sleep_ms: u64,
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

fn upsert(key: String, value: Json) -> Result<(), SqlError> {
    let value = match value {
        Json::String(text) => text,
        other => other.to_string(),
    };
    sql::execute(
        "INSERT INTO kv (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
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
                upsert(put.key, put.value)?;
            }
            "kv.slow" => {
                let slow: Slow = event.payload_json()?;
                upsert(slow.key, slow.value)?;
                let mut marker = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open("/data/handler.log")
                    .map_err(|err| format!("open /data/handler.log: {err}"))?;
                // One write for the whole line, so a kill never leaves half of it.
                marker
                    .write_all(format!("{}\n", event.seq).as_bytes())
                    .map_err(|err| err.to_string())?;
                drop(marker);
                std::thread::sleep(std::time::Duration::from_millis(slow.sleep_ms));
            }
            "kv.fail" => {
                let put: Put = event.payload_json()?;
                upsert(put.key, put.value)?;
                return Err(format!("kv.fail asked event {} to fail", event.seq));
            }
            "kv.runaway" => {
                let put: Put = event.payload_json()?;
                let after = format!("{}-after", put.key);
                upsert(put.key, put.value.clone())?;
                let _ = sql::execute(
                    "INSERT INTO kv (key, value)
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)
                     SELECT 'runaway-' || i, i FROM n",
                    params![],
                );
                let _ = upsert(after, put.value);
            }
            "kv.log" => {
                let message: Json = event.payload_json()?;
                log::info(format_args!(
                    "{}",
                    message["message"].as_str().unwrap_or("")
                ));
            }
            "kv.grow" => {
                let mib = event.payload_json::<Json>()?["mib"].as_u64().unwrap_or(1) as usize;
                let mut grown = vec![0u8; mib << 20];
                for byte in grown.iter_mut().step_by(4096) {
                    *byte = 1;
                }
                std::hint::black_box(&grown);
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
            "log" => {
                log::info(format_args!("{}", args["message"].as_str().unwrap_or("")));
                Ok(json!({}))
            }
            "count" => Ok(json!({ "kv": count("kv")?, "applied": count("applied")? })),
            "memory" => Ok(json!({ "bytes": linear_memory_bytes() })),
            other => Err(format!(
                "unknown query `{other}`; writer answers get, applied, count, memory"
            )),
        }
    }
}

/// The sandbox's linear memory, in bytes.
#[cfg(target_arch = "wasm32")]
fn linear_memory_bytes() -> usize {
    core::arch::wasm32::memory_size(0) << 16
}

/// Built for the host only to be tested there: no linear memory to measure.
#[cfg(not(target_arch = "wasm32"))]
fn linear_memory_bytes() -> usize {
    0
}

export_plugin!(Writer);

fn main() {}
