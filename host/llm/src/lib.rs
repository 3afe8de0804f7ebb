//! The host side of the plugin world's `llm` capability (SPEC §8): chat completions with
//! tool definitions and tool calls, in OpenAI's function-calling shape.
//!
//! - [`types`]: the request ([`ChatRequest`], [`Message`], [`ToolDef`]) and the answer
//!   ([`Completion`], [`ToolCall`]).
//! - [`Provider`]: a backend. [`OpenAiProvider`] speaks the OpenAI chat-completions HTTP
//!   protocol (OpenAI, vLLM, Ollama, llama.cpp) with retries and a deadline;
//!   [`StubProvider`] answers offline from deterministic rules.
//! - [`LlmService`]: a provider behind the host-wide concurrency cap and the per-store
//!   `llm_calls_per_minute` quota.
//! - [`LlmError`]: every failure, classified ([`ErrorClass`]) for the plugin.
//!
//! This crate knows nothing of wasmtime or of stores beyond their id strings.

#![forbid(unsafe_code)]

pub mod error;
pub mod openai;
pub mod service;
pub mod stub;
pub mod types;

use std::time::Instant;

use futures::future::BoxFuture;

pub use error::{ErrorClass, LlmError};
pub use openai::{MaxTokensField, OpenAiConfig, OpenAiProvider};
pub use service::{LlmLimits, LlmService};
pub use stub::{DEMO_RULES_JSON, StubProvider, StubRulesError};
pub use types::{ChatRequest, Completion, Message, Role, ToolCall, ToolDef};

/// An LLM backend.
pub trait Provider: Send + Sync {
    /// Answers `req`. The future owns what it needs (it borrows nothing from `self`), so
    /// callers can move it into a task or a guest call.
    fn complete(&self, req: ChatRequest) -> BoxFuture<'static, Result<Completion, LlmError>>;

    /// Answers `req` by `deadline`, when the caller has one (a plugin's call: what its
    /// invocation has left of its wall time). A provider that retries fits its attempts and
    /// waits into it, so that a retry can still happen and a failure keeps its class; the
    /// default ignores it (the caller cuts the call at its deadline).
    fn complete_by(
        &self,
        req: ChatRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'static, Result<Completion, LlmError>> {
        let _ = deadline;
        self.complete(req)
    }
}
