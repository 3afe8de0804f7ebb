//! Example: a minimal storehost plugin with its own LLM tools.
//!
//! Post a question as a `note.ask` event; the plugin asks the store's LLM, lets it call the
//! plugin's two tools (`save_note`, `list_notes`) until it answers, stores the answer and emits
//! `note.answered`. How to build, deploy and use it, step by step: README.md beside this file.
//!
//! ```sh
//! cargo build --release --target wasm32-wasip2 -p notes-agent
//! LLM_STUB_RESPONSES="$(cat examples/notes-agent/llm-rules.json)" cargo run   # another terminal
//! T=$(cat data/admin.token)
//! curl -s -X PUT -H "Authorization: Bearer $T" --data-binary @target/wasm32-wasip2/release/notes_agent.wasm \
//!      localhost:8080/v1/plugins/notes-agent
//! curl -s -X PUT -H "Authorization: Bearer $T" localhost:8080/v1/stores/my-notes -d '{"plugin":"notes-agent"}'
//! curl -s -X POST -H "Authorization: Bearer $T" localhost:8080/v1/stores/my-notes/events \
//!      -d '{"type":"note.ask","payload":{"id":"q1","question":"remember that the keys are in the drawer"}}'
//! curl -s -H "Authorization: Bearer $T" localhost:8080/v1/stores/my-notes/query/answers
//! ```
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::{Value, json};
use storehost_guest_sdk::llm::{self, ChatRequest, Message, Role, ToolDefinition};
use storehost_guest_sdk::{Event, Plugin, events, export_plugin, log, params, sql};

/// The most model calls one question may take.
const MAX_ITERATIONS: usize = 5;

struct NotesAgent;

#[derive(Deserialize)]
struct Ask {
    id: String,
    question: String,
}

impl Plugin for NotesAgent {
    fn handle_event(event: Event) -> Result<(), String> {
        if event.event_type != "note.ask" {
            return Ok(()); // including the `note.answered` events this plugin emits
        }
        let ask: Ask = event.payload_json()?;
        create_tables()?;
        // The same question delivered twice is answered once: its id is the answer's key.
        let new = sql::execute(
            "INSERT INTO answers (id, question, answer) VALUES (?1, ?2, NULL)
             ON CONFLICT (id) DO NOTHING",
            params![ask.id, ask.question],
        )?;
        if new == 0 {
            return Ok(());
        }
        let answer = answer(&ask)?;
        sql::execute(
            "UPDATE answers SET answer = ?2 WHERE id = ?1",
            params![ask.id, answer],
        )?;
        // Appended to the store's log when this handler returns Ok, together with the writes.
        events::emit(
            "note.answered",
            &json!({"id": ask.id, "question": ask.question, "answer": answer}),
        )
    }

    fn query(name: &str, _args: Value) -> Result<Value, String> {
        match name {
            "notes" => {
                let notes = read("SELECT id, text FROM notes ORDER BY rowid", |row| {
                    Ok(json!({"id": row.get::<String>("id")?, "text": row.get::<String>("text")?}))
                })?;
                Ok(json!({ "notes": notes }))
            }
            "answers" => {
                let answers = read(
                    "SELECT id, question, answer FROM answers ORDER BY rowid",
                    |row| {
                        Ok(json!({
                            "id": row.get::<String>("id")?,
                            "question": row.get::<String>("question")?,
                            "answer": row.get::<Option<String>>("answer")?,
                        }))
                    },
                )?;
                Ok(json!({ "answers": answers }))
            }
            other => Err(format!(
                "unknown query {other:?}; this plugin answers \"notes\" and \"answers\""
            )),
        }
    }
}

/// Runs a read, turning each row into JSON; before the first question there are no tables,
/// and nothing to read.
fn read(
    statement: &str,
    to_json: impl Fn(sql::Row<'_>) -> Result<Value, sql::SqlError>,
) -> Result<Vec<Value>, String> {
    let rows = match sql::query(statement, params![]) {
        Ok(rows) => rows,
        Err(err) if err.is_missing_table() => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    Ok(rows.iter().map(to_json).collect::<Result<_, _>>()?)
}

fn create_tables() -> Result<(), String> {
    sql::execute(
        "CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, text TEXT NOT NULL)",
        params![],
    )?;
    sql::execute(
        "CREATE TABLE IF NOT EXISTS answers (id TEXT PRIMARY KEY, question TEXT NOT NULL, answer TEXT)",
        params![],
    )?;
    Ok(())
}

/// The tools the model may call: each is a name, a description and a JSON schema.
fn tools() -> Vec<ToolDefinition> {
    vec![
        ToolDefinition {
            name: "save_note".into(),
            description: "Save a note the user wants remembered.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"text": {"type": "string", "description": "The note."}},
                "required": ["text"],
            })
            .to_string(),
        },
        ToolDefinition {
            name: "list_notes".into(),
            description: "List every saved note.".into(),
            parameters: json!({"type": "object", "properties": {}}).to_string(),
        },
    ]
}

/// Asks the model, runs the tools it calls and feeds their results back until it answers.
fn answer(ask: &Ask) -> Result<String, String> {
    let mut messages = vec![
        Message::text(
            Role::System,
            "You keep the user's notes. Use save_note to remember things and list_notes to recall them. Answer briefly.",
        ),
        Message::text(Role::User, ask.question.clone()),
    ];
    let request = |messages: &[Message]| ChatRequest {
        messages: messages.to_vec(),
        tools: tools(),
        max_tokens: None,
        temperature: None,
    };
    let mut saved = 0;
    for _ in 0..MAX_ITERATIONS {
        let completion = match llm::complete(&request(&messages)) {
            Ok(completion) => completion,
            // Errors are classified (auth, rate_limited, timeout...): say so, don't fail.
            Err(err) => {
                log::warn(format_args!("LLM call failed: {}", err.message));
                return Ok(format!(
                    "Sorry, I cannot think right now ({}).",
                    err.class.as_str()
                ));
            }
        };
        if completion.tool_calls.is_empty() {
            return Ok(completion.content.unwrap_or_default());
        }
        messages.push(Message::tool_calls(
            completion.content.clone(),
            completion.tool_calls.clone(),
        ));
        for call in completion.tool_calls {
            let result = match call.name.as_str() {
                "save_note" => {
                    let args: Value = serde_json::from_str(&call.arguments).unwrap_or_default();
                    let text = args["text"].as_str().unwrap_or_default().trim();
                    if text.is_empty() {
                        "error: `text` is required".to_owned()
                    } else {
                        // Ids derive from the question, never from randomness: a retried
                        // invocation must write the same rows.
                        let id = format!("{}-{saved}", ask.id);
                        saved += 1;
                        sql::execute(
                            "INSERT OR REPLACE INTO notes (id, text) VALUES (?1, ?2)",
                            params![id, text],
                        )?;
                        format!("saved note {id}")
                    }
                }
                "list_notes" => {
                    let rows = sql::query("SELECT text FROM notes ORDER BY rowid", params![])?;
                    let lines = rows
                        .iter()
                        .map(|row| row.get::<String>(0).map(|text| format!("- {text}")))
                        .collect::<Result<Vec<_>, _>>()?;
                    if lines.is_empty() {
                        "(no notes yet)".to_owned()
                    } else {
                        lines.join("\n")
                    }
                }
                other => format!("error: there is no tool named {other}"),
            };
            messages.push(Message::tool_result(call.id, result));
        }
    }
    Ok("Sorry, I could not finish that.".to_owned())
}

export_plugin!(NotesAgent);
