//! Conversations: chat messages materialised into `conversations` and `messages`, and the
//! agentic loop that answers each user (or system) message.
//!
//! For a `user`/`system` message the handler emits, in this order and in the same transaction
//! as the message's row: `v1.LLMResponseStarted`, one `v1.LLMResponseReceived` (the reply, or a
//! polite explanation when the loop failed) and exactly one `v1.LLMResponseCompleted`. A message
//! whose id is already stored was handled before: it changes nothing and gets no second reply.

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use storehost_guest_sdk::llm::{Message, Role};
use storehost_guest_sdk::sql::{self, Row, SqlError};
use storehost_guest_sdk::{Event, clock, config, events, log, params, query_args};

use crate::agent_loop::{self, Settings};
use crate::ids;
use crate::limits;
use crate::tasks::PLUGIN_SOURCE;
use crate::timestamp::Timestamp;
use crate::tools::ToolContext;

/// A message was posted to a conversation.
pub const CHAT_MESSAGE_SENT: &str = "v1.ChatMessageSent";
/// The agent started answering a message.
pub const LLM_RESPONSE_STARTED: &str = "v1.LLMResponseStarted";
/// The agent's reply (or the explanation of why there is none).
pub const LLM_RESPONSE_RECEIVED: &str = "v1.LLMResponseReceived";
/// The agent finished answering a message.
pub const LLM_RESPONSE_COMPLETED: &str = "v1.LLMResponseCompleted";

/// Query: every conversation, most recently active first.
pub const QUERY_CONVERSATIONS: &str = "conversations";
/// Query: the messages of one conversation, `{"conversationId"}`, oldest first.
pub const QUERY_MESSAGES: &str = "messages";

/// Plugin config key: replaces the built-in system prompt of chats.
pub const SYSTEM_PROMPT_KEY: &str = "AGENT_SYSTEM_PROMPT";
/// The most of a conversation's latest messages the model sees (fewer when they are long).
const HISTORY_LIMIT: i64 = 50;
/// Longest conversation title, in characters (taken from its first message).
const TITLE_CHARS: usize = 80;

const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        message_count INTEGER NOT NULL DEFAULT 0,
        created_at,
        updated_at
    )",
    // Messages keep their arrival order in the rowid.
    "CREATE TABLE IF NOT EXISTS messages (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at,
        response_to TEXT,
        llm_metadata TEXT
    )",
    "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id)",
];

fn ensure_schema() -> Result<(), String> {
    for statement in SCHEMA {
        sql::execute(statement, params![])?;
    }
    Ok(())
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    User,
    Assistant,
    System,
}

impl ChatRole {
    fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::System => "system",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            "system" => Some(Self::System),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChatMessageSent {
    id: String,
    conversation_id: String,
    message: String,
    role: ChatRole,
    #[serde(default)]
    created_at: Option<Timestamp>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LlmResponseReceived {
    id: String,
    conversation_id: String,
    message: String,
    #[serde(default)]
    response_to_message_id: Option<String>,
    #[serde(default)]
    llm_metadata: Option<Json>,
    #[serde(default)]
    created_at: Option<Timestamp>,
}

/// A message to store.
struct NewMessage<'a> {
    id: &'a str,
    conversation_id: &'a str,
    role: ChatRole,
    content: &'a str,
    created_at: &'a Timestamp,
    response_to: Option<&'a str>,
    llm_metadata: Option<&'a Json>,
}

/// Stores a message (creating its conversation on first use); answers `false`, changing
/// nothing, when a message with that id is already stored.
fn store_message(message: &NewMessage<'_>) -> Result<bool, String> {
    ensure_schema()?;
    let inserted = sql::execute(
        "INSERT INTO messages (id, conversation_id, role, content, created_at, response_to, llm_metadata)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (id) DO NOTHING",
        params![
            message.id,
            message.conversation_id,
            message.role.as_str(),
            message.content,
            message.created_at,
            message.response_to,
            message.llm_metadata.map(Json::to_string),
        ],
    )?;
    if inserted == 0 {
        return Ok(false);
    }
    let title: String = message.content.trim().chars().take(TITLE_CHARS).collect();
    sql::execute(
        "INSERT INTO conversations (id, title, message_count, created_at, updated_at)
         VALUES (?1, ?2, 1, ?3, ?3)
         ON CONFLICT (id) DO UPDATE SET message_count = message_count + 1, updated_at = ?3",
        params![message.conversation_id, title, message.created_at],
    )?;
    Ok(true)
}

fn checked<'a>(event: &Event, field: &str, value: &'a str) -> Result<&'a str, String> {
    if value.trim().is_empty() {
        Err(format!(
            "invalid payload for event `{}` (seq {}): `{field}` must not be empty",
            event.event_type, event.seq
        ))
    } else {
        Ok(value)
    }
}

/// `v1.ChatMessageSent`: stores the message; a user or system message is answered.
pub fn on_message_sent(event: &Event) -> Result<(), String> {
    let sent: ChatMessageSent = event.payload_json()?;
    let id = checked(event, "id", &sent.id)?;
    let conversation_id = checked(event, "conversationId", &sent.conversation_id)?;
    let created_at = sent
        .created_at
        .unwrap_or_else(|| Timestamp::from_epoch_ms(event.at_ms));
    let stored = store_message(&NewMessage {
        id,
        conversation_id,
        role: sent.role,
        content: &sent.message,
        created_at: &created_at,
        response_to: None,
        llm_metadata: None,
    })?;
    if !stored {
        // The same message again (a redelivery) is answered once. Another message under a
        // used id is refused, so it shows as a dead letter instead of vanishing.
        let rows = sql::query(
            "SELECT conversation_id, content FROM messages WHERE id = ?1",
            params![id],
        )?;
        if let Some(row) = rows.first() {
            let (was_in, was): (String, String) =
                (row.get("conversation_id")?, row.get("content")?);
            if was_in != conversation_id || was != sent.message {
                return Err(format!(
                    "invalid payload for event `{CHAT_MESSAGE_SENT}` (seq {}): message id `{id}` is already used by another message (in conversation `{was_in}`); a message id names one message in the store: send this one with a new id",
                    event.seq
                ));
            }
        }
        log::info(format_args!(
            "{CHAT_MESSAGE_SENT} (seq {}): message `{id}` was already handled; not answering it again",
            event.seq
        ));
        return Ok(());
    }
    match sent.role {
        ChatRole::Assistant => Ok(()),
        ChatRole::User | ChatRole::System => respond(conversation_id, id),
    }
}

/// Runs the loop for message `message_id` and emits the response events.
fn respond(conversation_id: &str, message_id: &str) -> Result<(), String> {
    events::emit(
        LLM_RESPONSE_STARTED,
        &json!({"conversationId": conversation_id, "userMessageId": message_id}),
    )?;
    let now_ms = clock::now_ms();
    let prompt = limits::truncate(&system_prompt(now_ms), limits::MESSAGE_BYTES);
    let mut messages = vec![Message::text(Role::System, prompt)];
    messages.extend(history(conversation_id)?);
    let mut ctx = ToolContext::for_chat(message_id, now_ms);
    let outcome = agent_loop::run(&mut ctx, messages, &Settings::from_config())?;

    let reply_id = ids::reply_to(message_id);
    let replied_at = Timestamp::from_epoch_ms(clock::now_ms());
    store_message(&NewMessage {
        id: &reply_id,
        conversation_id,
        role: ChatRole::Assistant,
        content: &outcome.reply,
        created_at: &replied_at,
        response_to: Some(message_id),
        llm_metadata: Some(&outcome.metadata),
    })?;
    events::emit(
        LLM_RESPONSE_RECEIVED,
        &json!({
            "id": reply_id,
            "conversationId": conversation_id,
            "message": outcome.reply,
            "role": "assistant",
            "responseToMessageId": message_id,
            "llmMetadata": outcome.metadata,
            "createdAt": replied_at,
        }),
    )?;
    events::emit(
        LLM_RESPONSE_COMPLETED,
        &json!({
            "conversationId": conversation_id,
            "userMessageId": message_id,
            "iterations": outcome.iterations,
            "success": outcome.success,
        }),
    )?;
    Ok(())
}

/// The system prompt of a chat: the store's `AGENT_SYSTEM_PROMPT`, or the built-in one.
fn system_prompt(now_ms: i64) -> String {
    let now = crate::timestamp::iso8601_from_epoch_ms(now_ms);
    match config::get(SYSTEM_PROMPT_KEY) {
        Some(prompt) if !prompt.trim().is_empty() => format!("{prompt}\n\nThe time now is {now}."),
        _ => format!(
            "You are the assistant of a workspace. You help the user keep track of their tasks and recurring tasks, using the tools you are given: read and change tasks through the tools rather than guessing, refer to tasks by their ids, and never make up an id. When you are done, answer the user briefly in plain text. The time now is {now} (UTC)."
        ),
    }
}

/// The latest messages of the conversation, oldest first, as the model sees them: at most
/// [`HISTORY_LIMIT`] of them, the newest that fit in [`limits::HISTORY_BYTES`] (the message
/// being answered, the newest, always), each cut to [`limits::MESSAGE_BYTES`].
fn history(conversation_id: &str) -> Result<Vec<Message>, String> {
    // Only as much of each text as could be sent is read (`substr` counts characters, and a
    // character is at least one byte).
    let rows = sql::query(
        "SELECT role, substr(content, 1, ?3) AS content, length(CAST(content AS BLOB)) AS bytes
         FROM messages WHERE conversation_id = ?1
         ORDER BY rowid DESC LIMIT ?2",
        params![conversation_id, HISTORY_LIMIT, limits::MESSAGE_BYTES as i64],
    )?;
    let mut messages = Vec::with_capacity(rows.len());
    let mut total = 0;
    for row in &rows {
        let role: String = row.get("role")?;
        let content: String = row.get("content")?;
        let bytes: i64 = row.get("bytes")?;
        let role = match ChatRole::parse(&role) {
            Some(ChatRole::User) => Role::User,
            Some(ChatRole::Assistant) => Role::Assistant,
            Some(ChatRole::System) => Role::System,
            None => continue,
        };
        let content = limits::truncate_known(
            &content,
            usize::try_from(bytes).unwrap_or(usize::MAX),
            limits::MESSAGE_BYTES,
        );
        if !messages.is_empty() && total + content.len() > limits::HISTORY_BYTES {
            break;
        }
        total += content.len();
        messages.push(Message::text(role, content));
    }
    messages.reverse();
    Ok(messages)
}

/// `v1.LLMResponseReceived`: stores the reply as an assistant message. The agent stores its own
/// replies when it emits them, so for those this changes nothing.
pub fn on_response_received(event: &Event) -> Result<(), String> {
    let received: LlmResponseReceived = event.payload_json()?;
    let id = checked(event, "id", &received.id)?;
    let conversation_id = checked(event, "conversationId", &received.conversation_id)?;
    let created_at = received
        .created_at
        .unwrap_or_else(|| Timestamp::from_epoch_ms(event.at_ms));
    let stored = store_message(&NewMessage {
        id,
        conversation_id,
        role: ChatRole::Assistant,
        content: &received.message,
        created_at: &created_at,
        response_to: received.response_to_message_id.as_deref(),
        llm_metadata: received.llm_metadata.as_ref(),
    })?;
    if !stored && event.source != PLUGIN_SOURCE {
        log::debug(format_args!(
            "{LLM_RESPONSE_RECEIVED} (seq {}): message `{id}` is already stored",
            event.seq
        ));
    }
    Ok(())
}

/// A conversation as the `conversations` query answers it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Conversation {
    id: String,
    title: String,
    message_count: i64,
    created_at: Option<Timestamp>,
    updated_at: Option<Timestamp>,
}

impl Conversation {
    fn from_row(row: Row<'_>) -> Result<Self, SqlError> {
        Ok(Self {
            id: row.get("id")?,
            title: row.get("title")?,
            message_count: row.get("message_count")?,
            created_at: row.get("created_at")?,
            updated_at: row.get("updated_at")?,
        })
    }
}

/// A message as the `messages` query answers it (the fields of the events it came from).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StoredMessage {
    id: String,
    conversation_id: String,
    role: String,
    message: String,
    created_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_to_message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    llm_metadata: Option<Json>,
}

impl StoredMessage {
    fn from_row(row: Row<'_>) -> Result<Self, SqlError> {
        Ok(Self {
            id: row.get("id")?,
            conversation_id: row.get("conversation_id")?,
            role: row.get("role")?,
            message: row.get("content")?,
            created_at: row.get("created_at")?,
            response_to_message_id: row.get("response_to")?,
            llm_metadata: row.get("llm_metadata")?,
        })
    }
}

/// Runs a read; before the first message there are no tables, and nothing to read.
fn read<T>(
    statement: &str,
    params: &[sql::Value],
    from_row: fn(Row<'_>) -> Result<T, SqlError>,
) -> Result<Vec<T>, String> {
    let rows = match sql::query(statement, params) {
        Ok(rows) => rows,
        Err(err) if err.is_missing_table() => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    Ok(rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?)
}

/// Query `conversations`: `{"conversations": [...]}`, most recently active first.
pub fn query_conversations(_args: Json) -> Result<Json, String> {
    let conversations = read(
        "SELECT id, title, message_count, created_at, updated_at FROM conversations
         ORDER BY (SELECT MAX(rowid) FROM messages WHERE conversation_id = conversations.id) DESC",
        params![],
        Conversation::from_row,
    )?;
    Ok(json!({ "conversations": conversations }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MessagesArgs {
    conversation_id: String,
}

/// Query `messages` with `{"conversationId"}`: `{"messages": [...]}`, oldest first.
pub fn query_messages(args: Json) -> Result<Json, String> {
    let args: MessagesArgs = query_args(QUERY_MESSAGES, args).map_err(|err| {
        format!("{err}; pass the conversation, like args={{\"conversationId\":\"c1\"}}")
    })?;
    let messages = read(
        "SELECT id, conversation_id, role, content, created_at, response_to, llm_metadata
         FROM messages WHERE conversation_id = ?1 ORDER BY rowid",
        params![args.conversation_id],
        StoredMessage::from_row,
    )?;
    Ok(json!({ "messages": messages }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_message_payloads_name_their_problem() {
        let event = Event {
            seq: 9,
            event_type: CHAT_MESSAGE_SENT.into(),
            payload: r#"{"id":"m1","conversationId":"c1","message":"hi","role":"robot"}"#.into(),
            at_ms: 0,
            source: "api".into(),
        };
        let err = event.payload_json::<ChatMessageSent>().unwrap_err();
        assert!(err.contains("unknown variant `robot`"), "{err}");
        assert!(err.contains("(seq 9)"), "{err}");

        let ok: ChatMessageSent = serde_json::from_str(
            r#"{"id":"m1","conversationId":"c1","message":"hi","role":"user","createdAt":"2024-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(ok.role, ChatRole::User);
    }

    #[test]
    fn messages_args_must_name_the_conversation() {
        let err = query_args::<MessagesArgs>(QUERY_MESSAGES, json!({})).unwrap_err();
        assert!(err.contains("conversationId"), "{err}");
    }
}
