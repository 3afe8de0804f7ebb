//! Chat completion with tool calling, through the store's LLM provider.
//!
//! The operator chooses the provider (an OpenAI-compatible endpoint, or the offline rules
//! provider); the plugin only sees messages, tools and tool calls in the OpenAI
//! function-calling shape. Waiting for the answer counts against the invocation's wall-clock
//! limit, not its CPU time.

use crate::__bindings::storehost::plugin::llm as wit;

pub use wit::{
    ChatRequest, Completion, ErrorClass, LlmError, Message, Role, ToolCall, ToolDefinition,
};

/// Asks the model for the next message of the conversation.
pub fn complete(request: &ChatRequest) -> Result<Completion, LlmError> {
    wit::complete(request)
}

impl Message {
    /// A message with text content and nothing else.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The assistant's turn that asked for `calls`.
    pub fn tool_calls(content: Option<String>, calls: Vec<ToolCall>) -> Self {
        Self {
            role: Role::Assistant,
            content,
            tool_calls: calls,
            tool_call_id: None,
        }
    }

    /// The result of tool call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.into()),
        }
    }
}

impl ErrorClass {
    /// The class as a stable snake_case name (`rate_limited`, `timeout`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::RateLimited => "rate_limited",
            Self::Transient => "transient",
            Self::Timeout => "timeout",
            Self::InvalidResponse => "invalid_response",
            Self::InvalidRequest => "invalid_request",
            Self::NotConfigured => "not_configured",
        }
    }
}
