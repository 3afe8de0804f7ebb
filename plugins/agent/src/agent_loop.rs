//! The agentic loop: ask the model, run the tools it calls, feed the results back, until it
//! gives a final answer — or the loop is cut short by the iteration limit, a stuck loop or an
//! LLM error. Every way out ends in an [`Outcome`] with a reply fit to show a person.

use std::collections::HashMap;

use serde_json::{Map, Value as Json, json};
use storehost_guest_sdk::llm::{self, ChatRequest, ErrorClass, LlmError, Message};
use storehost_guest_sdk::{config, log};

use crate::limits;
use crate::tools::{self, ToolContext, ToolFailure};

/// Plugin config key: the most model calls one run of the loop makes.
pub const MAX_ITERATIONS_KEY: &str = "LLM_MAX_ITERATIONS";
/// The iteration limit when the config does not set one.
pub const DEFAULT_MAX_ITERATIONS: u32 = 15;
/// The largest accepted `LLM_MAX_ITERATIONS`.
const MAX_ITERATIONS_LIMIT: u32 = 100;
/// A tool called with the same arguments this many times means the loop is stuck.
pub const STUCK_REPEATS: u32 = 3;

/// How a run of the loop is bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The most model calls one run makes.
    pub max_iterations: u32,
}

impl Settings {
    /// The settings in the store's config; a value that is not usable is reported in the log
    /// and the default is used instead.
    pub fn from_config() -> Self {
        let max_iterations = match config::get(MAX_ITERATIONS_KEY) {
            None => DEFAULT_MAX_ITERATIONS,
            Some(text) => parse_max_iterations(&text).unwrap_or_else(|problem| {
                log::error(format_args!(
                    "{problem}; using the default of {DEFAULT_MAX_ITERATIONS}"
                ));
                DEFAULT_MAX_ITERATIONS
            }),
        };
        Self { max_iterations }
    }
}

/// Parses `LLM_MAX_ITERATIONS`, or says what is wrong with it.
fn parse_max_iterations(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_ITERATIONS_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!(
            "config {MAX_ITERATIONS_KEY}={text:?} is not a whole number from 1 to {MAX_ITERATIONS_LIMIT}"
        )),
    }
}

/// Why the loop stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The model answered without calling tools.
    FinalAnswer,
    /// `max_iterations` model calls were made without a final answer.
    MaxIterations,
    /// The model asked for the same tool with the same arguments [`STUCK_REPEATS`] times.
    StuckLoop { tool: String },
    /// A model call failed.
    LlmError {
        class: ErrorClass,
        status: Option<u16>,
    },
}

impl Stop {
    /// The stable name of the reason, as `llmMetadata.stopReason` shows it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::FinalAnswer => "final_answer",
            Self::MaxIterations => "max_iterations",
            Self::StuckLoop { .. } => "stuck_loop",
            Self::LlmError { .. } => "llm_error",
        }
    }
}

/// How a run of the loop ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The text to show: the model's final answer, or a polite explanation.
    pub reply: String,
    /// Whether the model gave a final answer.
    pub success: bool,
    /// How many model calls were made.
    pub iterations: u32,
    /// Why it stopped.
    pub stop: Stop,
    /// Model, token counts, tools called, stop reason and (for errors) the error class.
    pub metadata: Json,
}

impl Outcome {
    /// A one-line description of a failed run (for a task execution's `error`).
    pub fn failure(&self) -> String {
        match &self.stop {
            Stop::LlmError { class, .. } => format!("llm error {}: {}", class.as_str(), self.reply),
            other => format!("{}: {}", other.as_str(), self.reply),
        }
    }
}

/// What the loop noted on the way, for the metadata. It stays small whatever the model sends
/// (it is emitted with the reply): see [`Trace::call`].
#[derive(Debug, Default)]
struct Trace {
    model: Option<String>,
    finish_reason: Option<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
    tool_calls: Vec<Json>,
    /// Bytes of arguments traced in full so far.
    argument_bytes: usize,
    /// Tool calls made but not listed (past [`limits::TRACE_CALLS`]).
    calls_omitted: u64,
}

impl Trace {
    /// Notes a tool call: with its arguments while they fit in
    /// [`limits::TRACE_ARGUMENTS_BYTES`], then with their length only; past
    /// [`limits::TRACE_CALLS`] calls, only counted.
    fn call(&mut self, name: &str, arguments: &str, ok: bool) {
        if self.tool_calls.len() >= limits::TRACE_CALLS {
            self.calls_omitted += 1;
            return;
        }
        let name = limits::truncate(name, limits::NAME_BYTES);
        if self.argument_bytes + arguments.len() <= limits::TRACE_ARGUMENTS_BYTES {
            self.argument_bytes += arguments.len();
            self.tool_calls
                .push(json!({"name": name, "arguments": arguments, "ok": ok}));
        } else {
            self.tool_calls
                .push(json!({"name": name, "argumentsBytes": arguments.len(), "ok": ok}));
        }
    }
}

/// Runs the loop on `messages` (system prompt first, then the conversation).
///
/// Errors only when the plugin itself failed (SQL): the invocation is then rolled back.
pub fn run(
    ctx: &mut ToolContext,
    mut messages: Vec<Message>,
    settings: &Settings,
) -> Result<Outcome, String> {
    let tools = tools::definitions(ctx);
    let mut trace = Trace::default();
    let mut repeats: HashMap<(String, String), u32> = HashMap::new();
    let mut iterations = 0;
    while iterations < settings.max_iterations {
        iterations += 1;
        let request = ChatRequest {
            messages: messages.clone(),
            tools: tools.clone(),
            max_tokens: None,
            temperature: None,
        };
        let completion = match llm::complete(&request) {
            Ok(completion) => completion,
            Err(err) => return Ok(llm_failed(&err, iterations, trace)),
        };
        trace.model = Some(limits::truncate(&completion.model, limits::NAME_BYTES));
        trace.finish_reason = Some(limits::truncate(
            &completion.finish_reason,
            limits::NAME_BYTES,
        ));
        trace.prompt_tokens += u64::from(completion.prompt_tokens);
        trace.completion_tokens += u64::from(completion.completion_tokens);
        if completion.tool_calls.is_empty() {
            let reply = completion
                .content
                .filter(|text| !text.trim().is_empty())
                .unwrap_or_else(|| "I'm sorry, I have no answer to that.".to_owned());
            return Ok(finish(reply, true, iterations, Stop::FinalAnswer, trace));
        }
        let calls = completion.tool_calls.clone();
        let content = completion
            .content
            .map(|text| limits::truncate(&text, limits::MESSAGE_BYTES));
        messages.push(Message::tool_calls(content, calls.clone()));
        for call in calls {
            let seen = repeats
                .entry((call.name.clone(), canonical(&call.arguments)))
                .or_default();
            *seen += 1;
            if *seen >= STUCK_REPEATS {
                let tool = limits::truncate(&call.name, limits::NAME_BYTES);
                let reply = format!(
                    "I'm sorry, I kept repeating the same step ({tool}) without getting anywhere, so I stopped. Please rephrase your request or break it into smaller steps."
                );
                let stop = Stop::StuckLoop { tool };
                return Ok(finish(reply, false, iterations, stop, trace));
            }
            let (result, ok) = match tools::call(ctx, &call.name, &call.arguments) {
                Ok(result) => (result, true),
                Err(ToolFailure::Rejected(problem)) => (json!({ "error": problem }), false),
                Err(ToolFailure::Internal(problem)) => {
                    return Err(format!("tool {} failed: {problem}", call.name));
                }
            };
            trace.call(&call.name, &call.arguments, ok);
            let result = limits::truncate(&result.to_string(), limits::TOOL_RESULT_BYTES);
            messages.push(Message::tool_result(call.id, result));
        }
    }
    let reply = format!(
        "I'm sorry, I couldn't finish this within {iterations} steps, so I stopped. Some of it may already be done: please check your tasks, and try again with a simpler request."
    );
    Ok(finish(reply, false, iterations, Stop::MaxIterations, trace))
}

/// The arguments in a canonical form (keys sorted, no spacing), so that the same call spelled
/// differently still counts as a repeat.
fn canonical(arguments: &str) -> String {
    serde_json::from_str::<Json>(arguments)
        .map(|value| value.to_string())
        .unwrap_or_else(|_| arguments.trim().to_owned())
}

fn llm_failed(err: &LlmError, iterations: u32, trace: Trace) -> Outcome {
    // The provider's message can name the operator's endpoint or key variable: it goes to the
    // host log (tagged with the store), and the conversation gets the class and a polite reply.
    log::warn(format_args!(
        "LLM call failed ({}): {}",
        err.class.as_str(),
        err.message
    ));
    let stop = Stop::LlmError {
        class: err.class,
        status: err.status,
    };
    finish(polite_reply(err.class), false, iterations, stop, trace)
}

/// What to tell a person when the model could not be reached.
pub fn polite_reply(class: ErrorClass) -> String {
    match class {
        ErrorClass::RateLimited => "I'm getting too many requests right now. Please try again in a minute.",
        ErrorClass::Auth => "I can't reach the language model: it refused my credentials. Please ask your administrator to check the API key.",
        ErrorClass::Transient => "The language model service is having trouble right now. Please try again in a little while.",
        ErrorClass::Timeout => "The language model took too long to answer. Please try again.",
        ErrorClass::InvalidResponse => "The language model sent an answer I couldn't understand. Please try again.",
        ErrorClass::InvalidRequest => "The language model refused the request. Please ask your administrator to check the model settings.",
        ErrorClass::NotConfigured => "No language model is set up for this workspace yet, so I can't answer. Please ask your administrator to configure one.",
    }
    .to_owned()
}

/// The outcome; a reply longer than [`limits::REPLY_BYTES`] is cut (it is stored and emitted,
/// and an emitted payload holds at most 1 MiB).
fn finish(reply: String, success: bool, iterations: u32, stop: Stop, trace: Trace) -> Outcome {
    let reply = if reply.len() > limits::REPLY_BYTES {
        limits::truncate(&reply, limits::REPLY_BYTES)
    } else {
        reply
    };
    let mut metadata = Map::new();
    metadata.insert("stopReason".into(), json!(stop.as_str()));
    metadata.insert("iterations".into(), json!(iterations));
    metadata.insert("model".into(), json!(trace.model));
    metadata.insert("finishReason".into(), json!(trace.finish_reason));
    metadata.insert("promptTokens".into(), json!(trace.prompt_tokens));
    metadata.insert("completionTokens".into(), json!(trace.completion_tokens));
    metadata.insert("toolCalls".into(), Json::Array(trace.tool_calls));
    if trace.calls_omitted > 0 {
        metadata.insert("toolCallsOmitted".into(), json!(trace.calls_omitted));
    }
    match &stop {
        Stop::LlmError { class, status } => {
            metadata.insert("errorClass".into(), json!(class.as_str()));
            metadata.insert("httpStatus".into(), json!(status));
        }
        Stop::StuckLoop { tool } => {
            metadata.insert("stuckTool".into(), json!(tool));
        }
        Stop::FinalAnswer | Stop::MaxIterations => {}
    }
    Outcome {
        reply,
        success,
        iterations,
        stop,
        metadata: Json::Object(metadata),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_iterations_must_be_a_small_positive_number() {
        assert_eq!(parse_max_iterations(" 3 "), Ok(3));
        assert_eq!(parse_max_iterations("100"), Ok(100));
        for bad in ["0", "-1", "abc", "101", "2.5", ""] {
            let err = parse_max_iterations(bad).unwrap_err();
            assert!(err.contains("LLM_MAX_ITERATIONS"), "{err}");
        }
    }

    #[test]
    fn repeated_calls_are_recognised_however_their_arguments_are_spelled() {
        assert_eq!(
            canonical(r#"{ "b": 1, "a": "x" }"#),
            canonical(r#"{"a":"x","b":1}"#)
        );
        assert_eq!(canonical(" not json "), "not json");
    }

    #[test]
    fn the_trace_lists_arguments_within_its_budget_and_counts_calls_past_its_limit() {
        let mut trace = Trace::default();
        let big = "x".repeat(limits::TRACE_ARGUMENTS_BYTES);
        trace.call("a", "{}", true);
        trace.call("b", &big, true);
        for _ in 0..limits::TRACE_CALLS {
            trace.call("c", "{}", false);
        }
        assert_eq!(trace.tool_calls[0]["arguments"], "{}");
        assert_eq!(trace.tool_calls[1]["argumentsBytes"], big.len());
        assert_eq!(trace.tool_calls[1].get("arguments"), None);
        assert_eq!(trace.tool_calls.len(), limits::TRACE_CALLS);
        assert_eq!(trace.calls_omitted, 2);
        let outcome = finish("y".repeat(1 << 20), true, 1, Stop::FinalAnswer, trace);
        assert!(outcome.reply.len() <= limits::REPLY_BYTES);
        assert_eq!(outcome.metadata["toolCallsOmitted"], 2);
    }

    #[test]
    fn every_error_class_has_a_polite_reply() {
        for class in [
            ErrorClass::Auth,
            ErrorClass::RateLimited,
            ErrorClass::Transient,
            ErrorClass::Timeout,
            ErrorClass::InvalidResponse,
            ErrorClass::InvalidRequest,
            ErrorClass::NotConfigured,
        ] {
            let reply = polite_reply(class);
            assert!(reply.ends_with('.'), "{reply}");
            assert!(!reply.contains("http"), "{reply}");
        }
    }
}
