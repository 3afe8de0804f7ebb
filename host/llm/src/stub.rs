//! The offline deterministic provider: answers from rules (SPEC §8), for the embedded
//! default, demos and tests.
//!
//! Rules JSON: `{"rules":[{"match","matchType":"exact"|"includes"|"regex","response",
//! "toolCalls"?}],"defaultResponse"?}`, `toolCalls` in the OpenAI shape
//! `[{"id"?,"type":"function","function":{"name","arguments":"<JSON text>"}}]`.
//!
//! - The text matched is the content of the latest turn: the last message with content that is
//!   neither a `tool` result nor an assistant message calling tools — usually the user's
//!   request, but a `system` (or assistant) message after it is matched itself, so the request
//!   before it is not answered, nor its tool calls made, a second time. Rules are tried in
//!   order; the first match answers.
//! - `exact`: the whole text, surrounding whitespace ignored, case-sensitive. `includes`: a
//!   substring, case-insensitive. `regex`: the `regex` crate's syntax (add `(?i)` for
//!   case-insensitive), searched anywhere in the text unless anchored.
//! - A rule with `toolCalls` answers with those calls while no `tool` message follows the
//!   matched message, and with its `response` once tool results are there.
//! - In a `regex` rule, `$1`, `${1}` and `${name}` in `response` and in the string values of
//!   the tool calls' `arguments` are replaced by the capture groups (`$$` is a literal `$`).
//!   Captures are inserted into argument values, not into JSON text, so they cannot break it.
//! - In any rule's `response`, `{{toolResults}}` is replaced by the contents of the tool
//!   results after the matched message, one per line.
//! - `defaultResponse` answers when no rule matches; it defaults to [`DEFAULT_RESPONSE`].

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use regex::Regex;
use serde_json::{Map, Value};

use crate::Provider;
use crate::error::LlmError;
use crate::types::{ChatRequest, Completion, Message, Role, ToolCall};

/// The model name stub completions report.
pub const STUB_MODEL: &str = "stub";

/// The answer when no rule matches and the rules set no `defaultResponse`.
pub const DEFAULT_RESPONSE: &str = "I have no scripted answer for that.";

/// Placeholder in a `response` for the tool results.
const TOOL_RESULTS: &str = "{{toolResults}}";

/// The rules [`StubProvider::demo`] uses: the embedded default's offline assistant, which
/// drives the `agent` plugin's tools.
pub const DEMO_RULES_JSON: &str = r#"{
  "rules": [
    {
      "match": "(?i)^\\s*(?:hi|hello|hey|help)\\b",
      "matchType": "regex",
      "response": "Hello! I am the offline demo assistant and I manage your tasks. Try: \"create a task to water the plants\", \"list my tasks\", \"mark task <id> as done\", \"rename task <id> to <title>\", \"show task <id>\", \"archive task <id>\" or \"remind me to stretch every day\"."
    },
    {
      "match": "(?i)^\\s*reminder:\\s*(.+?)\\s*$",
      "matchType": "regex",
      "response": "Reminder: ${1}. It is time!"
    },
    {
      "match": "(?i)^\\s*(?:please\\s+)?(?:remind me to\\s+|(?:create|add|schedule) an?\\s+(?:recurring\\s+)?task to\\s+)?(.+?),?\\s+(?:every\\s+day|daily)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "create_recurring_task", "arguments": "{\"name\":\"${1}\",\"prompt\":\"Reminder: ${1}\",\"intervalHours\":24}"}}],
      "response": "Okay, I will remind you to ${1} every day."
    },
    {
      "match": "(?i)^\\s*(?:please\\s+)?(?:remind me to\\s+|(?:create|add|schedule) an?\\s+(?:recurring\\s+)?task to\\s+)?(.+?),?\\s+(?:every\\s+hour|hourly)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "create_recurring_task", "arguments": "{\"name\":\"${1}\",\"prompt\":\"Reminder: ${1}\",\"intervalHours\":1}"}}],
      "response": "Okay, I will remind you to ${1} every hour."
    },
    {
      "match": "(?i)^\\s*(?:please\\s+)?(?:remind me to\\s+|(?:create|add|schedule) an?\\s+(?:recurring\\s+)?task to\\s+)?(.+?),?\\s+(?:every\\s+week|weekly)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "create_recurring_task", "arguments": "{\"name\":\"${1}\",\"prompt\":\"Reminder: ${1}\",\"intervalHours\":168}"}}],
      "response": "Okay, I will remind you to ${1} every week."
    },
    {
      "match": "(?i)^\\s*(?:please\\s+)?(?:create|add|schedule) an?\\s+recurring\\s+task to\\s+(.+?)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "create_recurring_task", "arguments": "{\"name\":\"${1}\",\"prompt\":\"Reminder: ${1}\",\"intervalHours\":24}"}}],
      "response": "Okay, I created a recurring task to ${1}; it runs every day."
    },
    {
      "match": "recurring",
      "matchType": "includes",
      "response": "To set up a recurring task, say for example \"remind me to water the plants every day\" (or every hour, every week)."
    },
    {
      "match": "(?i)^\\s*(?:please\\s+)?(?:create|add|make)\\s+(?:a\\s+)?(?:new\\s+)?task\\s*(?:to|called|named|for|:)?\\s+\"?(.+?)\"?[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "create_task", "arguments": "{\"title\":\"${1}\"}"}}],
      "response": "Done! I created the task \"${1}\"."
    },
    {
      "match": "(?i)^\\s*(?:please\\s+)?remind me to\\s+(.+?)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "create_task", "arguments": "{\"title\":\"${1}\"}"}}],
      "response": "Done! I added \"${1}\" to your tasks."
    },
    {
      "match": "(?i)\\b(?:(?:list|show)(?:\\s+me)?(?:\\s+all)?(?:\\s+(?:my|the))?\\s+tasks|what\\s+(?:are\\s+)?my\\s+tasks|what\\s+tasks)\\b",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "list_tasks", "arguments": "{}"}}],
      "response": "Here are your tasks:\n{{toolResults}}"
    },
    {
      "match": "(?i)\\b(?:mark|set)\\s+task\\s+(\\S+?)\\s+(?:as\\s+)?(done|todo|in-progress)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "update_task", "arguments": "{\"id\":\"${1}\",\"status\":\"${2}\"}"}}],
      "response": "Task ${1} is now ${2}."
    },
    {
      "match": "(?i)\\b(?:complete|finish)\\s+task\\s+(\\S+?)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "update_task", "arguments": "{\"id\":\"${1}\",\"status\":\"done\"}"}}],
      "response": "Task ${1} is now done."
    },
    {
      "match": "(?i)\\brename\\s+task\\s+(\\S+)\\s+to\\s+\"?(.+?)\"?[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "update_task", "arguments": "{\"id\":\"${1}\",\"title\":\"${2}\"}"}}],
      "response": "Task ${1} is now called \"${2}\"."
    },
    {
      "match": "(?i)\\b(?:archive|delete|remove)\\s+task\\s+(\\S+?)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "archive_task", "arguments": "{\"id\":\"${1}\"}"}}],
      "response": "I archived task ${1}."
    },
    {
      "match": "(?i)\\b(?:show|get|open)\\s+task\\s+(\\S+?)[.!?]*\\s*$",
      "matchType": "regex",
      "toolCalls": [{"type": "function", "function": {"name": "get_task_by_id", "arguments": "{\"id\":\"${1}\"}"}}],
      "response": "Here is task ${1}:\n{{toolResults}}"
    }
  ],
  "defaultResponse": "I am the offline demo assistant, so I only understand a few phrases. Try \"create a task to water the plants\", \"list my tasks\", \"mark task <id> as done\", \"archive task <id>\" or \"remind me to stretch every day\". For free-form chat, point storehost at a real model: [llm] provider = \"openai\"."
}"#;

/// Rules JSON that cannot be used: says where (`rules[2].matchType`) and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StubRulesError {
    /// What was wrong, where, and what to do.
    pub message: String,
}

impl StubRulesError {
    fn at(path: &str, problem: impl std::fmt::Display) -> Self {
        Self {
            message: format!("stub rules: {path}: {problem}"),
        }
    }
}

/// The offline deterministic provider. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StubProvider {
    rules: Arc<Rules>,
}

#[derive(Debug)]
struct Rules {
    rules: Vec<Rule>,
    default_response: String,
}

#[derive(Debug)]
struct Rule {
    index: usize,
    pattern: Pattern,
    response: String,
    tool_calls: Vec<RuleToolCall>,
}

#[derive(Debug)]
enum Pattern {
    /// Trimmed text, compared case-sensitively with the trimmed message.
    Exact(String),
    /// Lowercased text, searched in the lowercased message.
    Includes(String),
    Regex(Regex),
}

#[derive(Debug)]
struct RuleToolCall {
    id: Option<String>,
    name: String,
    /// Parsed, so captures go into values and never break the JSON.
    arguments: Value,
}

impl StubProvider {
    /// A provider answering by the rules in JSON `text`.
    pub fn from_json(text: &str) -> Result<Self, StubRulesError> {
        let value: Value = serde_json::from_str(text).map_err(|err| StubRulesError {
            message: format!(
                "stub rules are not valid JSON ({err}); expected {{\"rules\":[{{\"match\":\"…\",\"matchType\":\"includes\",\"response\":\"…\"}}],\"defaultResponse\":\"…\"}}"
            ),
        })?;
        Self::from_value(&value)
    }

    /// A provider answering by the rules in the JSON file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, StubRulesError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|err| StubRulesError {
            message: format!(
                "cannot read the stub rules file {}: {err}; check the path and its permissions",
                path.display()
            ),
        })?;
        Self::from_json(&text).map_err(|err| StubRulesError {
            message: format!("{}: {}", path.display(), err.message),
        })
    }

    /// A provider answering by the rules in an already parsed JSON `value`.
    pub fn from_value(value: &Value) -> Result<Self, StubRulesError> {
        let object = value.as_object().ok_or_else(|| StubRulesError {
            message: format!(
                "stub rules must be a JSON object like {{\"rules\":[…],\"defaultResponse\":\"…\"}}, found {}",
                kind(value)
            ),
        })?;
        unknown_keys(object, "(top level)", &["rules", "defaultResponse"])?;
        let rules = match object.get("rules") {
            None => Vec::new(),
            Some(Value::Array(rules)) => rules
                .iter()
                .enumerate()
                .map(|(index, rule)| parse_rule(index, rule))
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(StubRulesError::at(
                    "rules",
                    format!("must be an array of rules, found {}", kind(other)),
                ));
            }
        };
        let default_response = match object.get("defaultResponse") {
            None => DEFAULT_RESPONSE.to_owned(),
            Some(Value::String(text)) => text.clone(),
            Some(other) => {
                return Err(StubRulesError::at(
                    "defaultResponse",
                    format!("must be a string, found {}", kind(other)),
                ));
            }
        };
        Ok(Self {
            rules: Arc::new(Rules {
                rules,
                default_response,
            }),
        })
    }

    /// The built-in rules of the embedded default ([`DEMO_RULES_JSON`]): tasks, recurring
    /// reminders and a friendly fallback, driving the `agent` plugin's tools.
    pub fn demo() -> Self {
        Self::from_json(DEMO_RULES_JSON).expect("the built-in demo rules parse (unit-tested)")
    }

    /// How many rules it has.
    pub fn rule_count(&self) -> usize {
        self.rules.rules.len()
    }

    /// The answer to `req`, computed now.
    pub fn answer(&self, req: &ChatRequest) -> Completion {
        self.rules.answer(req)
    }
}

impl Provider for StubProvider {
    fn complete(&self, req: ChatRequest) -> BoxFuture<'static, Result<Completion, LlmError>> {
        let completion = self.rules.answer(&req);
        Box::pin(futures::future::ready(Ok(completion)))
    }
}

impl Rules {
    fn answer(&self, req: &ChatRequest) -> Completion {
        let messages = &req.messages;
        // The latest turn: the last message with text that is neither a tool result nor the
        // model's own call of tools. A system or assistant message after the user's request
        // is what is answered now; matching the earlier request again would replay its tool
        // calls (the history holds no tool messages to show they were made).
        let asked = messages
            .iter()
            .rposition(|m| m.role != Role::Tool && m.tool_calls.is_empty() && m.content.is_some())
            .or_else(|| messages.iter().rposition(|m| m.content.is_some()));
        let (text, after) = match asked {
            Some(i) => (
                messages[i].content.as_deref().unwrap_or(""),
                &messages[i + 1..],
            ),
            None => ("", &messages[..0]),
        };
        let tool_results: Vec<&Message> = after.iter().filter(|m| m.role == Role::Tool).collect();
        let prompt_tokens = messages
            .iter()
            .filter_map(|m| m.content.as_deref())
            .map(word_count)
            .sum();
        let Some(rule) = self.rules.iter().find(|rule| rule.pattern.matches(text)) else {
            return text_completion(self.default_response.clone(), prompt_tokens);
        };
        if !rule.tool_calls.is_empty() && tool_results.is_empty() {
            let turn = asked.unwrap_or(0);
            let tool_calls: Vec<ToolCall> = rule
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, call)| ToolCall {
                    id: call
                        .id
                        .clone()
                        .unwrap_or_else(|| format!("call_{turn}_{}_{i}", rule.index)),
                    name: call.name.clone(),
                    arguments: rule.pattern.expand_value(&call.arguments, text).to_string(),
                })
                .collect();
            let completion_tokens = tool_calls
                .iter()
                .map(|c| word_count(&c.arguments) + 1)
                .sum();
            return Completion {
                content: None,
                tool_calls,
                finish_reason: "tool_calls".to_owned(),
                model: STUB_MODEL.to_owned(),
                prompt_tokens,
                completion_tokens,
            };
        }
        let mut response = rule.pattern.expand(&rule.response, text);
        if response.contains(TOOL_RESULTS) {
            let results: Vec<&str> = tool_results
                .iter()
                .filter_map(|m| m.content.as_deref())
                .collect();
            response = response.replace(TOOL_RESULTS, &results.join("\n"));
        }
        text_completion(response, prompt_tokens)
    }
}

fn text_completion(content: String, prompt_tokens: u32) -> Completion {
    Completion {
        completion_tokens: word_count(&content),
        content: Some(content),
        tool_calls: Vec::new(),
        finish_reason: "stop".to_owned(),
        model: STUB_MODEL.to_owned(),
        prompt_tokens,
    }
}

/// A stand-in token count: whitespace-separated words.
fn word_count(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

impl Pattern {
    fn matches(&self, text: &str) -> bool {
        match self {
            Self::Exact(expected) => text.trim() == expected,
            Self::Includes(needle) => text.to_lowercase().contains(needle.as_str()),
            Self::Regex(regex) => regex.is_match(text),
        }
    }

    /// `template` with capture references replaced (regex rules only).
    fn expand(&self, template: &str, text: &str) -> String {
        match self {
            Self::Regex(regex) => match regex.captures(text) {
                Some(captures) => {
                    let mut out = String::new();
                    captures.expand(template, &mut out);
                    out
                }
                None => template.to_owned(),
            },
            _ => template.to_owned(),
        }
    }

    /// `value` with capture references replaced in every string (keys left alone).
    fn expand_value(&self, value: &Value, text: &str) -> Value {
        match value {
            Value::String(s) => Value::String(self.expand(s, text)),
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.expand_value(v, text)).collect())
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.expand_value(v, text)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

fn parse_rule(index: usize, value: &Value) -> Result<Rule, StubRulesError> {
    let path = format!("rules[{index}]");
    let rule = value.as_object().ok_or_else(|| {
        StubRulesError::at(
            &path,
            format!(
                "must be an object like {{\"match\":\"…\",\"matchType\":\"includes\",\"response\":\"…\"}}, found {}",
                kind(value)
            ),
        )
    })?;
    unknown_keys(
        rule,
        &path,
        &["match", "matchType", "response", "toolCalls"],
    )?;
    let text = required_string(rule, &path, "match", "the text or pattern to match")?;
    let match_type = required_string(
        rule,
        &path,
        "matchType",
        "\"exact\", \"includes\" or \"regex\"",
    )?;
    let pattern = match match_type {
        "exact" => Pattern::Exact(text.trim().to_owned()),
        "includes" => Pattern::Includes(text.to_lowercase()),
        "regex" => Pattern::Regex(Regex::new(text).map_err(|err| {
            StubRulesError::at(
                &format!("{path}.match"),
                format!("is not a valid regular expression: {err}"),
            )
        })?),
        other => {
            return Err(StubRulesError::at(
                &format!("{path}.matchType"),
                format!("{other:?} is not a match type; use \"exact\", \"includes\" or \"regex\""),
            ));
        }
    };
    let response = required_string(rule, &path, "response", "the text to answer")?.to_owned();
    let tool_calls = match rule.get("toolCalls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) => calls
            .iter()
            .enumerate()
            .map(|(i, call)| parse_tool_call(&format!("{path}.toolCalls[{i}]"), call))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(StubRulesError::at(
                &format!("{path}.toolCalls"),
                format!(
                    "must be an array of tool calls like [{{\"type\":\"function\",\"function\":{{\"name\":\"list_tasks\",\"arguments\":\"{{}}\"}}}}], found {}",
                    kind(other)
                ),
            ));
        }
    };
    Ok(Rule {
        index,
        pattern,
        response,
        tool_calls,
    })
}

fn parse_tool_call(path: &str, value: &Value) -> Result<RuleToolCall, StubRulesError> {
    let call = value.as_object().ok_or_else(|| {
        StubRulesError::at(
            path,
            format!(
                "must be an object like {{\"id\":\"call_1\",\"type\":\"function\",\"function\":{{\"name\":\"list_tasks\",\"arguments\":\"{{}}\"}}}}, found {}",
                kind(value)
            ),
        )
    })?;
    unknown_keys(call, path, &["id", "type", "function"])?;
    let id = match call.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(other) => {
            return Err(StubRulesError::at(
                &format!("{path}.id"),
                format!(
                    "must be a non-empty string (or left out), found {}",
                    kind(other)
                ),
            ));
        }
    };
    match call.get("type") {
        None => {}
        Some(Value::String(t)) if t == "function" => {}
        Some(other) => {
            return Err(StubRulesError::at(
                &format!("{path}.type"),
                format!("must be \"function\", found {other}"),
            ));
        }
    }
    let function_path = format!("{path}.function");
    let function = match call.get("function") {
        Some(Value::Object(function)) => function,
        None => {
            return Err(StubRulesError::at(
                &function_path,
                "is missing; add {\"name\":\"<tool>\",\"arguments\":\"<JSON text>\"}",
            ));
        }
        Some(other) => {
            return Err(StubRulesError::at(
                &function_path,
                format!(
                    "must be an object {{\"name\",\"arguments\"}}, found {}",
                    kind(other)
                ),
            ));
        }
    };
    unknown_keys(function, &function_path, &["name", "arguments"])?;
    let name = required_string(function, &function_path, "name", "the tool's name")?;
    if name.is_empty() {
        return Err(StubRulesError::at(
            &format!("{function_path}.name"),
            "is empty; give the tool's name",
        ));
    }
    let arguments_path = format!("{function_path}.arguments");
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(text)) if text.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(text)) => serde_json::from_str(text).map_err(|err| {
            StubRulesError::at(
                &arguments_path,
                format!(
                    "is not valid JSON text ({err}); write the arguments as a JSON string, like \"{{\\\"title\\\":\\\"Water the plants\\\"}}\""
                ),
            )
        })?,
        // Accepted too: the arguments written as a JSON object rather than as text.
        Some(object @ Value::Object(_)) => object.clone(),
        Some(other) => {
            return Err(StubRulesError::at(
                &arguments_path,
                format!(
                    "must be JSON text like \"{{\\\"id\\\":\\\"t1\\\"}}\", found {}",
                    kind(other)
                ),
            ));
        }
    };
    Ok(RuleToolCall {
        id,
        name: name.to_owned(),
        arguments,
    })
}

fn required_string<'v>(
    object: &'v Map<String, Value>,
    path: &str,
    key: &str,
    what: &str,
) -> Result<&'v str, StubRulesError> {
    match object.get(key) {
        Some(Value::String(text)) => Ok(text),
        None => Err(StubRulesError::at(
            &format!("{path}.{key}"),
            format!("is missing; add \"{key}\": {what}"),
        )),
        Some(other) => Err(StubRulesError::at(
            &format!("{path}.{key}"),
            format!("must be a string ({what}), found {}", kind(other)),
        )),
    }
}

fn unknown_keys(
    object: &Map<String, Value>,
    path: &str,
    known: &[&str],
) -> Result<(), StubRulesError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        None => Ok(()),
        Some(key) => Err(StubRulesError::at(
            path,
            format!(
                "unknown key {key:?}; expected {}",
                known
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// `"an array"`, `"a number"`: a JSON value's type with its article.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(provider: &StubProvider, text: &str) -> Completion {
        provider.answer(&ChatRequest {
            messages: vec![Message::system("You manage tasks."), Message::user(text)],
            ..ChatRequest::default()
        })
    }

    fn call(completion: &Completion) -> (String, Value) {
        assert_eq!(completion.tool_calls.len(), 1, "{completion:?}");
        let call = &completion.tool_calls[0];
        (
            call.name.clone(),
            serde_json::from_str(&call.arguments).unwrap(),
        )
    }

    #[test]
    fn demo_rules_drive_every_agent_tool() {
        let demo = StubProvider::demo();
        let (name, args) = call(&ask(&demo, "Create a task to water the plants."));
        assert_eq!(name, "create_task");
        assert_eq!(args, serde_json::json!({"title": "water the plants"}));

        let (name, args) = call(&ask(&demo, "remind me to call \"Mum\""));
        assert_eq!(name, "create_task");
        assert_eq!(args["title"], "call \"Mum\"", "quotes stay valid JSON");

        for text in ["list my tasks", "What are my tasks?", "show all tasks"] {
            let (name, args) = call(&ask(&demo, text));
            assert_eq!(name, "list_tasks", "{text}");
            assert_eq!(args, serde_json::json!({}), "{text}");
        }

        let (name, args) = call(&ask(&demo, "remind me to stretch every day"));
        assert_eq!(name, "create_recurring_task");
        assert_eq!(
            args,
            serde_json::json!({"name": "stretch", "prompt": "Reminder: stretch", "intervalHours": 24})
        );
        let (_, args) = call(&ask(&demo, "create a task to water the plants every week"));
        assert_eq!(args["name"], "water the plants");
        assert_eq!(args["intervalHours"], 168);
        let (_, args) = call(&ask(&demo, "Create a recurring task to back up the notes"));
        assert_eq!(args["name"], "back up the notes");

        let (name, args) = call(&ask(&demo, "mark task t-42 as done"));
        assert_eq!(name, "update_task");
        assert_eq!(args, serde_json::json!({"id": "t-42", "status": "done"}));
        let (name, args) = call(&ask(&demo, "rename task t-42 to Buy milk"));
        assert_eq!(name, "update_task");
        assert_eq!(args, serde_json::json!({"id": "t-42", "title": "Buy milk"}));
        let (name, args) = call(&ask(&demo, "archive task t-42."));
        assert_eq!(name, "archive_task");
        assert_eq!(args, serde_json::json!({"id": "t-42"}));
        let (name, args) = call(&ask(&demo, "show task t-42"));
        assert_eq!(name, "get_task_by_id");
        assert_eq!(args, serde_json::json!({"id": "t-42"}));
    }

    #[test]
    fn a_system_message_after_a_request_does_not_replay_its_tool_calls() {
        let demo = StubProvider::demo();
        let conversation = |latest: Message| ChatRequest {
            messages: vec![
                Message::system("You manage tasks."),
                Message::user("create a task to water the plants"),
                Message::assistant("Done! I created the task \"water the plants\"."),
                latest,
            ],
            ..ChatRequest::default()
        };
        let completion = demo.answer(&conversation(Message::system("note")));
        assert!(completion.tool_calls.is_empty(), "{completion:?}");
        assert!(
            completion
                .content
                .unwrap()
                .contains("offline demo assistant")
        );
        // The request that is the latest turn is answered as before.
        let again = demo.answer(&conversation(Message::user("create a task to buy milk")));
        assert_eq!(call(&again).1["title"], "buy milk");
    }

    #[test]
    fn a_recurring_prompt_does_not_create_another_recurring_task() {
        let demo = StubProvider::demo();
        let completion = ask(&demo, "Reminder: stretch");
        assert!(completion.tool_calls.is_empty(), "{completion:?}");
        assert_eq!(
            completion.content.as_deref(),
            Some("Reminder: stretch. It is time!")
        );
        let fallback = ask(&demo, "what is the weather?");
        assert!(
            fallback
                .content
                .unwrap()
                .contains("create a task to water the plants")
        );
        let hint = ask(&demo, "can you do recurring things?");
        assert!(hint.content.unwrap().contains("every day"));
    }
}
