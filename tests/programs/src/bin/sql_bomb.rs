//! Hostile: SQL that would use unbounded CPU, memory or disk. The payload (event, task or the
//! `hostile` query's args) is `{"kind": K}`:
//! - `cte`: counts the rows of an infinite recursive CTE (only interruption stops it);
//! - `blob`: inserts `zeroblob(2000000000)` into `bomb_blobs`;
//! - `rows`: inserts a million 1 KiB rows into `bomb_rows`, one statement at a time;
//! - `sort`: sorts the rows of an infinite recursive CTE by a random 100-byte key, which spills
//!   into temporary files until something stops it.
//!
//! The usual event is `bomb {kind}`. A statement the host stops fails the invocation with the
//! host's reason.
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::Value as Json;
use storehost_guest_sdk::{export_plugin, params, sql};
use test_programs::{Hostile, Misbehaviour};

struct SqlBomb;

#[derive(Deserialize)]
struct Bomb {
    kind: String,
}

const ROWS: u32 = 1_000_000;
const ROW_BYTES: usize = 1024;

impl Misbehaviour for SqlBomb {
    fn misbehave(input: Json) -> Result<(), String> {
        let bomb: Bomb = serde_json::from_value(input).map_err(|err| {
            format!("sql_bomb wants {{\"kind\": \"cte\"|\"blob\"|\"rows\"|\"sort\"}}: {err}")
        })?;
        match bomb.kind.as_str() {
            "cte" => {
                let rows = sql::query(
                    "WITH RECURSIVE counter(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM counter)
                     SELECT count(*) FROM counter",
                    params![],
                )?;
                Err(format!("the infinite CTE returned: {rows:?}"))
            }
            "blob" => {
                sql::execute("CREATE TABLE IF NOT EXISTS bomb_blobs (b BLOB)", params![])?;
                sql::execute(
                    "INSERT INTO bomb_blobs (b) VALUES (zeroblob(2000000000))",
                    params![],
                )?;
                Ok(())
            }
            "sort" => {
                let rows = sql::query(
                    "WITH RECURSIVE counter(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM counter)
                     SELECT n FROM counter ORDER BY randomblob(100)",
                    params![],
                )?;
                Err(format!("the endless sort returned {} rows", rows.len()))
            }
            "rows" => {
                sql::execute(
                    "CREATE TABLE IF NOT EXISTS bomb_rows (id INTEGER PRIMARY KEY, filler BLOB)",
                    params![],
                )?;
                let filler = vec![0xA5u8; ROW_BYTES];
                for i in 0..ROWS {
                    sql::execute(
                        "INSERT INTO bomb_rows (filler) VALUES (?1)",
                        params![filler],
                    )
                    .map_err(|err| format!("insert {i} of {ROWS} failed: {err}"))?;
                }
                Ok(())
            }
            other => Err(format!(
                "unknown bomb kind `{other}`: use cte, blob, rows or sort"
            )),
        }
    }
}

export_plugin!(Hostile<SqlBomb>);

fn main() {}
