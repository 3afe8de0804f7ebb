//! The chat-completion request and answer, shaped like OpenAI's function calling.
//!
//! [`Message`], [`ToolCall`], [`ToolDef`] and [`ChatRequest`] serialize exactly as the OpenAI
//! chat-completions API expects them (a request body lacks only `model`); [`Completion`] is
//! the provider-neutral answer.

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions to the model.
    System,
    /// The person (or the scheduler, for a recurring task's prompt).
    User,
    /// The model: text, tool calls or both.
    Assistant,
    /// The result of one tool call, answering the call `tool_call_id`.
    Tool,
}

impl Role {
    /// The role's wire name (`"assistant"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text; `None` for an assistant message that only calls tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The tools an assistant message calls, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `tool` message: the id of the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message of `role` with text `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message with text.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// An assistant message that calls `tool_calls` (and says nothing).
    pub fn assistant_tool_calls(tool_calls: Vec<ToolCall>) -> Self {
        Self {
            role: Role::Assistant,
            content: None,
            tool_calls,
            tool_call_id: None,
        }
    }

    /// The result `content` of the tool call `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: Some(tool_call_id.into()),
        }
    }
}

/// One call of a tool by the model. Serialized in the OpenAI shape
/// `{"id","type":"function","function":{"name","arguments"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The call's id; the tool's result message names it in `tool_call_id`.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, as JSON text (normally an object).
    pub arguments: String,
}

#[derive(Serialize, Deserialize)]
struct WireToolCall {
    id: String,
    #[serde(rename = "type", default = "function_type")]
    kind: String,
    function: WireFunctionCall,
}

#[derive(Serialize, Deserialize)]
struct WireFunctionCall {
    name: String,
    arguments: String,
}

fn function_type() -> String {
    "function".to_owned()
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireToolCall {
            id: self.id.clone(),
            kind: function_type(),
            function: WireFunctionCall {
                name: self.name.clone(),
                arguments: self.arguments.clone(),
            },
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ToolCall {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireToolCall::deserialize(deserializer)?;
        if wire.kind != "function" {
            return Err(D::Error::custom(format!(
                "tool call type {:?} is not supported; only \"function\" calls are",
                wire.kind
            )));
        }
        Ok(Self {
            id: wire.id,
            name: wire.function.name,
            arguments: wire.function.arguments,
        })
    }
}

/// A tool the model may call. Serialized in the OpenAI shape
/// `{"type":"function","function":{"name","description","parameters":{...}}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolDef {
    /// The tool's name (`create_task`).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// Its parameters as a JSON Schema object, in JSON text; empty means "no parameters".
    pub parameters: String,
}

impl ToolDef {
    /// The parameters as JSON: the schema text parsed, or an empty object schema when empty.
    pub fn parameters_json(&self) -> Result<serde_json::Value, String> {
        if self.parameters.trim().is_empty() {
            return Ok(serde_json::json!({"type": "object", "properties": {}}));
        }
        serde_json::from_str(&self.parameters).map_err(|err| {
            format!(
                "the parameters of tool {:?} are not valid JSON ({err}); give a JSON Schema object like {{\"type\":\"object\",\"properties\":{{\"title\":{{\"type\":\"string\"}}}}}}",
                self.name
            )
        })
    }
}

#[derive(Serialize, Deserialize)]
struct WireToolDef {
    #[serde(rename = "type", default = "function_type")]
    kind: String,
    function: WireFunctionDef,
}

#[derive(Serialize, Deserialize)]
struct WireFunctionDef {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<serde_json::Value>,
}

impl Serialize for ToolDef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireToolDef {
            kind: function_type(),
            function: WireFunctionDef {
                name: self.name.clone(),
                description: self.description.clone(),
                parameters: Some(self.parameters_json().map_err(S::Error::custom)?),
            },
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ToolDef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireToolDef::deserialize(deserializer)?;
        if wire.kind != "function" {
            return Err(D::Error::custom(format!(
                "tool type {:?} is not supported; only \"function\" tools are",
                wire.kind
            )));
        }
        Ok(Self {
            name: wire.function.name,
            description: wire.function.description,
            parameters: wire
                .function
                .parameters
                .map(|p| p.to_string())
                .unwrap_or_default(),
        })
    }
}

/// A chat-completion request: the conversation so far and the tools the model may call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// The tools offered; empty for none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolDef>,
    /// Most tokens the answer may have; `None` for the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; `None` for the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
}

/// The model's answer: text, tool calls or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The answer's text, if any.
    pub content: Option<String>,
    /// The tools the model calls, in order; empty when it gave a final answer.
    pub tool_calls: Vec<ToolCall>,
    /// Why the model stopped: `"stop"`, `"tool_calls"`, `"length"`, ….
    pub finish_reason: String,
    /// The model that answered, as the server names it.
    pub model: String,
    /// Tokens in the request, as the server counted them (0 when it did not say).
    pub prompt_tokens: u32,
    /// Tokens in the answer, as the server counted them (0 when it did not say).
    pub completion_tokens: u32,
}
