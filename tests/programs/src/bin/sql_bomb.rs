//! Hostile: SQL that would use unbounded CPU, memory or disk. The payload (event, task or the
//! `hostile` query's args) is `{"kind": K}`:
//! - `cte`: counts the rows of an infinite recursive CTE (only interruption stops it);
//! - `blob`: inserts `zeroblob(2000000000)` into `bomb_blobs`;
//! - `rows`: inserts a million 1 KiB rows into `bomb_rows`, one statement at a time;
//! - `sort`: sorts the rows of an infinite recursive CTE by a random 100-byte key, which spills
//!   into temporary files until something stops it;
//! - `journal_table`: creates `bomb_journal`, 600 rows of 1 KB (succeeds; send it first);
//! - `journal`: in one event, rewrites the first 200 rows of `bomb_journal` again and again,
//!   each time with one row more whose page the transaction has not changed yet: SQLite then
//!   keeps each statement's copy of the pages in the savepoint journal, which grows by about
//!   200 KB a statement until something stops it.
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
            format!("sql_bomb wants {{\"kind\": \"cte\"|\"blob\"|\"rows\"|\"sort\"|\"journal_table\"|\"journal\"}}: {err}")
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
            "journal_table" => {
                sql::execute(
                    "CREATE TABLE bomb_journal (id INTEGER PRIMARY KEY, b BLOB NOT NULL)",
                    params![],
                )?;
                sql::execute(
                    "INSERT INTO bomb_journal (id, b) \
                     WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 600) \
                     SELECT x, randomblob(1000) FROM c",
                    params![],
                )?;
                Ok(())
            }
            "journal" => {
                for k in 1..=100i64 {
                    sql::execute(
                        "UPDATE bomb_journal SET b = randomblob(1000) WHERE id <= 200 OR id = ?1",
                        params![200 + 4 * k],
                    )
                    .map_err(|err| format!("rewrite {k}: {err}"))?;
                }
                Err("a hundred rewrites passed".into())
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
                "unknown bomb kind `{other}`: use cte, blob, rows, sort, journal_table or journal"
            )),
        }
    }
}

export_plugin!(Hostile<SqlBomb>);

fn main() {}
