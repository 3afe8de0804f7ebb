//! A hostile tenant's plugin (from a security audit): each event or query kind pushes one of
//! the host's limits (result sizes, error sizes, log volume, foreign keys onto the host's
//! tables, emitted bytes, schedules) and answers what it saw.
#![forbid(unsafe_code)]

use serde_json::{Value as Json, json};
use storehost_guest_sdk::{
    Event, Plugin, clock, events, export_plugin, log, params, scheduler, sql,
};

struct Abuse;

fn num(v: &Json, key: &str, default: u64) -> u64 {
    v.get(key).and_then(Json::as_u64).unwrap_or(default)
}

fn act(kind: &str, args: &Json) -> Result<Json, String> {
    let started = clock::now_ms();
    let out = match kind {
        // Schedules n one-shot tasks far in the future with `bytes`-byte payloads.
        "sched_fill" => {
            let n = num(args, "n", 100);
            let start = num(args, "start", 0);
            let bytes = num(args, "bytes", 60_000) as usize;
            let payload = "x".repeat(bytes);
            for i in start..start + n {
                scheduler::once(&format!("t{i:08}"), 4_102_444_800_000, &payload)?;
            }
            json!({"scheduled": n})
        }
        // Answers `bytes` bytes of padding (a query answer the size the client asks for).
        "pad" => json!({"pad": "x".repeat(num(args, "bytes", 0) as usize)}),
        // Lists the store's tasks (host reads them all).
        "sched_list" => {
            let tasks = scheduler::scheduled();
            json!({"tasks": tasks.len()})
        }
        // Schedules one cron task `times` times with expression `expr`, or with `pad` commas
        // padding a yearly one (`0,,,… 0 0 1 1 *`: croner skips empty list items).
        "cron" => {
            let padded = args
                .get("pad")
                .and_then(Json::as_u64)
                .map(|pad| format!("0{} 0 0 1 1 *", ",".repeat(pad as usize)));
            let expr = padded.as_deref().unwrap_or_else(|| {
                args.get("expr")
                    .and_then(Json::as_str)
                    .unwrap_or("* * * * *")
            });
            let times = num(args, "times", 1);
            let mut last = Json::Null;
            for _ in 0..times {
                last = match scheduler::cron("c", expr, &json!({})) {
                    Ok(next) => json!(next),
                    Err(err) => json!(err),
                };
            }
            json!({"last": last})
        }
        // One query returning n rows of `cols` NULL columns.
        "nulls" => {
            let n = num(args, "n", 1000);
            let cols = num(args, "cols", 1);
            let select: Vec<String> = (0..cols).map(|i| format!("NULL AS c{i}")).collect();
            let statement = format!(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1) SELECT {} FROM c",
                select.join(", ")
            );
            match sql::query(&statement, params![n as i64]) {
                Ok(rows) => json!({"rows": rows.len()}),
                Err(err) => json!({"error": err.to_string()}),
            }
        }
        // `stmts` statements, each counting a recursive CTE of n rows (each under the budget).
        "sql_loop" => {
            let stmts = num(args, "stmts", 5);
            let n = num(args, "n", 1_000_000);
            let mut done = 0;
            for _ in 0..stmts {
                match sql::query(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1) SELECT count(*) FROM c",
                    params![n as i64],
                ) {
                    Ok(_) => done += 1,
                    Err(err) => {
                        return Ok(
                            json!({"done": done, "error": err.to_string(), "ms": clock::now_ms() - started}),
                        );
                    }
                }
            }
            json!({"done": done})
        }
        "log_flood" => {
            let n = num(args, "n", 100);
            let line = "L".repeat(4000);
            for _ in 0..n {
                log::info(&line);
            }
            json!({"logged": n})
        }
        "emit" => {
            let t = args.get("type").and_then(Json::as_str).unwrap_or("x");
            let payload = args.get("payload").cloned().unwrap_or(json!({}));
            events::emit(t, &payload).map_err(|e| e.to_string())?;
            json!({"emitted": true})
        }
        "sql" => {
            let stmt = args.get("sql").and_then(Json::as_str).unwrap_or("SELECT 1");
            match sql::query(stmt, params![]) {
                Ok(rows) => {
                    json!({"rows": rows.into_values().iter().map(|r| format!("{r:?}")).collect::<Vec<_>>()})
                }
                Err(err) => json!({"error": err.to_string()}),
            }
        }
        "exec" => {
            let stmt = args.get("sql").and_then(Json::as_str).unwrap_or("SELECT 1");
            match sql::execute(stmt, params![]) {
                Ok(n) => json!({"changed": n}),
                Err(err) => json!({"error": err.to_string()}),
            }
        }
        "ping" | "big" => json!({}),
        // Creates tables heavy_{start..start+n} of `fks` foreign keys each (errors counted).
        "fk_fill" => {
            let start = num(args, "start", 0);
            let n = num(args, "n", 20);
            let _ = sql::execute(
                "CREATE TABLE IF NOT EXISTS p (id INTEGER PRIMARY KEY)",
                params![],
            );
            let fks: Vec<String> = (0..num(args, "fks", 500))
                .map(|_| "FOREIGN KEY(a) REFERENCES p(id)".to_owned())
                .collect();
            let mut errors = Vec::new();
            for i in start..start + n {
                let statement = format!("CREATE TABLE heavy_{i} (a, {})", fks.join(","));
                if let Err(err) = sql::execute(&statement, params![]) {
                    errors.push(format!("{i}: {err}"));
                }
            }
            json!({"errors": errors})
        }
        // Emits one event and pins its outbox row from `evil` (origin `{seq}:0`).
        "pin" => {
            let origin = args.get("origin").and_then(Json::as_str).unwrap_or("0:0");
            events::emit_json("ping", "{}")?;
            let changed =
                sql::execute("INSERT INTO evil (a, x) VALUES (NULL, ?1)", params![origin])?;
            json!({"pinned": changed})
        }
        "fail" => {
            let bytes = num(args, "bytes", 100) as usize;
            return Err("E".repeat(bytes));
        }
        "emit_big" => {
            let n = num(args, "n", 15);
            let bytes = num(args, "bytes", 1_000_000) as usize;
            let payload = format!("\"{}\"", "p".repeat(bytes.saturating_sub(2)));
            for _ in 0..n {
                events::emit_json("big", &payload)?;
            }
            json!({"emitted": n})
        }
        other => return Err(format!("unknown kind {other}")),
    };
    Ok(json!({"out": out, "ms": clock::now_ms() - started}))
}

impl Plugin for Abuse {
    fn handle_event(event: Event) -> Result<(), String> {
        if event.event_type == "big" || event.event_type == "ping" {
            return Ok(());
        }
        let args: Json = serde_json::from_str(&event.payload).unwrap_or(Json::Null);
        // Runs `sql`, ignores how it went, emits `swallowed` and answers success.
        if event.event_type == "swallow" {
            let statement = args.get("sql").and_then(Json::as_str).unwrap_or("SELECT 1");
            let _ = sql::query(statement, params![]);
            events::emit_json("swallowed", "{}")?;
            return Ok(());
        }
        let answer = act(&event.event_type, &args)?;
        // (Its check may be interrupted on a huge schema; the table is created anyway.)
        let _ = sql::execute(
            "CREATE TABLE IF NOT EXISTS audit_out (seq INTEGER, answer TEXT)",
            params![],
        );
        sql::execute(
            "INSERT INTO audit_out (seq, answer) VALUES (?1, ?2)",
            params![event.seq as i64, answer.to_string()],
        )?;
        Ok(())
    }

    fn query(name: &str, args: Json) -> Result<Json, String> {
        if name == "out" {
            let rows = sql::query("SELECT seq, answer FROM audit_out ORDER BY seq", params![])?;
            let list: Vec<Json> = rows
                .iter()
                .map(|row| {
                    let answer: String = row.get("answer").unwrap_or_default();
                    json!({"seq": row.get::<i64>("seq").unwrap_or(0), "answer": serde_json::from_str::<Json>(&answer).unwrap_or(Json::Null)})
                })
                .collect();
            return Ok(json!(list));
        }
        act(name, &args)
    }
}

export_plugin!(Abuse);

fn main() {}
