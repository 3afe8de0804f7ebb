//! The classified failure of an LLM call: what the plugin sees and can turn into a reply.

use serde::Serialize;

/// Why an LLM call failed, in classes a plugin can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The server refused the credentials (HTTP 401/403). Not retried.
    Auth,
    /// Too many calls: the server's 429s outlasted the retries, or a host limit (per-store
    /// calls per minute, host-wide concurrency) refused the call.
    RateLimited,
    /// The server failed (5xx) or could not be reached, on every attempt.
    Transient,
    /// No answer within the per-attempt timeout or the call's deadline.
    Timeout,
    /// The server answered something that is not a chat completion.
    InvalidResponse,
    /// The request itself was refused (other 4xx), or could not be built (bad tool schema).
    InvalidRequest,
    /// The provider is missing configuration (API key variable unset, bad base URL).
    NotConfigured,
}

impl ErrorClass {
    /// The class's snake_case name (`"rate_limited"`), as plugins and metrics show it.
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

    /// Every class, in declaration order.
    pub const ALL: [ErrorClass; 7] = [
        Self::Auth,
        Self::RateLimited,
        Self::Transient,
        Self::Timeout,
        Self::InvalidResponse,
        Self::InvalidRequest,
        Self::NotConfigured,
    ];
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed LLM call: its class, a message saying what was wrong and what to do, and the
/// HTTP status of the last answer when there was one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{class}: {message}")]
pub struct LlmError {
    /// What kind of failure it is.
    pub class: ErrorClass,
    /// What was wrong and what to do.
    pub message: String,
    /// The HTTP status of the last answer, if the server answered.
    pub status: Option<u16>,
}

impl LlmError {
    /// An error of `class` with no HTTP status.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            status: None,
        }
    }

    /// The same error, recording HTTP `status`.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }
}
