//! Connects stores' `llm` capability to the host's LLM service: converts the plugin world's
//! types to the provider's and back, and applies the per-store quota.

use std::sync::Arc;

use storehost_llm as provider;
use storehost_runtime::LlmFuture;
use storehost_runtime::llm as wit;
use storehost_store::{LlmBackend, StoreId};

/// The host's [`provider::LlmService`] as every store's [`LlmBackend`].
#[derive(Debug, Clone)]
pub struct ServiceBackend {
    service: Arc<provider::LlmService>,
}

impl ServiceBackend {
    /// Serves stores' calls through `service`.
    pub fn new(service: Arc<provider::LlmService>) -> Arc<Self> {
        Arc::new(Self { service })
    }

    /// The service behind it (to change per-store limits live).
    pub fn service(&self) -> &Arc<provider::LlmService> {
        &self.service
    }
}

impl LlmBackend for ServiceBackend {
    fn set_calls_per_minute(&self, store: &StoreId, per_minute: u32) {
        self.service.set_store_limit(store.as_str(), per_minute);
    }

    fn forget(&self, store: &StoreId) {
        self.service.remove_store(store.as_str());
    }

    fn complete(
        &self,
        store: &StoreId,
        request: wit::ChatRequest,
        deadline: Option<std::time::Instant>,
    ) -> LlmFuture {
        let answer = self
            .service
            .complete_by(store.as_str(), request_from_wit(request), deadline);
        Box::pin(async move {
            answer
                .await
                .map(completion_to_wit)
                .map_err(|err| error_to_wit(&err))
        })
    }
}

fn request_from_wit(request: wit::ChatRequest) -> provider::ChatRequest {
    provider::ChatRequest {
        messages: request.messages.into_iter().map(message_from_wit).collect(),
        tools: request
            .tools
            .into_iter()
            .map(|tool| provider::ToolDef {
                name: tool.name,
                description: tool.description,
                parameters: tool.parameters,
            })
            .collect(),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
    }
}

fn message_from_wit(message: wit::Message) -> provider::Message {
    provider::Message {
        role: match message.role {
            wit::Role::System => provider::Role::System,
            wit::Role::User => provider::Role::User,
            wit::Role::Assistant => provider::Role::Assistant,
            wit::Role::Tool => provider::Role::Tool,
        },
        content: message.content,
        tool_calls: message
            .tool_calls
            .into_iter()
            .map(|call| provider::ToolCall {
                id: call.id,
                name: call.name,
                arguments: call.arguments,
            })
            .collect(),
        tool_call_id: message.tool_call_id,
    }
}

fn completion_to_wit(completion: provider::Completion) -> wit::Completion {
    wit::Completion {
        content: completion.content,
        tool_calls: completion
            .tool_calls
            .into_iter()
            .map(|call| wit::ToolCall {
                id: call.id,
                name: call.name,
                arguments: call.arguments,
            })
            .collect(),
        finish_reason: completion.finish_reason,
        model: completion.model,
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
    }
}

/// The error as the plugin gets it. Its message is the provider's: the OpenAI-compatible
/// provider keeps the operator's endpoint out of it (the host log names it instead).
fn error_to_wit(err: &provider::LlmError) -> wit::LlmError {
    use provider::ErrorClass as P;
    use wit::ErrorClass as W;
    wit::LlmError {
        class: match err.class {
            P::Auth => W::Auth,
            P::RateLimited => W::RateLimited,
            P::Transient => W::Transient,
            P::Timeout => W::Timeout,
            P::InvalidResponse => W::InvalidResponse,
            P::InvalidRequest => W::InvalidRequest,
            P::NotConfigured => W::NotConfigured,
        },
        message: err.message.clone(),
        status: err.status,
    }
}
