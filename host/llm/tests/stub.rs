//! The offline rules provider (SPEC §8): matching, tool calls then the response, the default,
//! and clear errors for bad rules.

use serde_json::json;
use storehost_llm::stub::DEFAULT_RESPONSE;
use storehost_llm::{ChatRequest, Completion, Message, Provider, StubProvider, ToolCall};

fn rules(json: serde_json::Value) -> StubProvider {
    StubProvider::from_json(&json.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

async fn ask(provider: &StubProvider, messages: Vec<Message>) -> Completion {
    provider
        .complete(ChatRequest {
            messages,
            ..ChatRequest::default()
        })
        .await
        .unwrap()
}

async fn say(provider: &StubProvider, text: &str) -> Option<String> {
    ask(
        provider,
        vec![Message::system("be brief"), Message::user(text)],
    )
    .await
    .content
}

fn error(json: &str) -> String {
    StubProvider::from_json(json).unwrap_err().message
}

#[tokio::test]
async fn exact_includes_and_regex_rules_match_the_last_user_message() {
    let provider = rules(json!({
        "rules": [
            {"match": "ping", "matchType": "exact", "response": "pong"},
            {"match": "Weather", "matchType": "includes", "response": "Sunny."},
            {"match": "^call me (?P<name>\\w+)$", "matchType": "regex", "response": "Hello, ${name}! ($1, $$5)"},
        ],
        "defaultResponse": "No idea.",
    }));
    assert_eq!(say(&provider, "  ping \n").await.as_deref(), Some("pong"));
    assert_eq!(
        say(&provider, "Ping").await.as_deref(),
        Some("No idea."),
        "exact is case-sensitive"
    );
    assert_eq!(
        say(&provider, "ping please").await.as_deref(),
        Some("No idea.")
    );
    assert_eq!(
        say(&provider, "how is the WEATHER today?").await.as_deref(),
        Some("Sunny.")
    );
    assert_eq!(
        say(&provider, "call me Ada").await.as_deref(),
        Some("Hello, Ada! (Ada, $5)")
    );
    let earlier_question = ask(
        &provider,
        vec![
            Message::user("ping"),
            Message::assistant("pong"),
            Message::user("and the weather?"),
        ],
    )
    .await;
    assert_eq!(
        earlier_question.content.as_deref(),
        Some("Sunny."),
        "only the last user message counts"
    );
    assert_eq!(earlier_question.model, "stub");
    assert_eq!(earlier_question.finish_reason, "stop");
}

#[tokio::test]
async fn the_first_matching_rule_wins_and_no_match_gets_the_default() {
    let provider = rules(json!({
        "rules": [
            {"match": "task", "matchType": "includes", "response": "first"},
            {"match": "tasks", "matchType": "includes", "response": "second"},
        ],
        "defaultResponse": "fallback",
    }));
    assert_eq!(say(&provider, "my tasks").await.as_deref(), Some("first"));
    assert_eq!(say(&provider, "hello").await.as_deref(), Some("fallback"));
    let without_default = rules(json!({"rules": []}));
    assert_eq!(
        say(&without_default, "hello").await.as_deref(),
        Some(DEFAULT_RESPONSE)
    );
}

#[tokio::test]
async fn a_rule_with_tool_calls_answers_with_them_first_then_with_its_response() {
    let provider = rules(json!({
        "rules": [{
            "match": "(?i)create a task to (.+)",
            "matchType": "regex",
            "toolCalls": [
                {"id": "call_1", "type": "function", "function": {"name": "create_task", "arguments": "{\"title\":\"$1\",\"priority\":2}"}},
                {"type": "function", "function": {"name": "list_tasks", "arguments": "{}"}},
            ],
            "response": "Created \"$1\". Now: {{toolResults}}",
        }],
        "defaultResponse": "?",
    }));
    let question = Message::user("Create a task to say \"hi\"");
    let first = ask(&provider, vec![Message::system("s"), question.clone()]).await;
    assert_eq!(first.content, None);
    assert_eq!(first.finish_reason, "tool_calls");
    assert_eq!(first.tool_calls.len(), 2);
    assert_eq!(first.tool_calls[0].id, "call_1");
    assert_eq!(first.tool_calls[0].name, "create_task");
    let args: serde_json::Value = serde_json::from_str(&first.tool_calls[0].arguments).unwrap();
    assert_eq!(
        args,
        json!({"title": "say \"hi\"", "priority": 2}),
        "captures stay valid JSON"
    );
    assert_eq!(first.tool_calls[1].name, "list_tasks");
    assert_ne!(
        first.tool_calls[1].id, first.tool_calls[0].id,
        "every call has its own id"
    );

    let again = ask(&provider, vec![Message::system("s"), question.clone()]).await;
    assert_eq!(again, first, "deterministic");

    let second = ask(
        &provider,
        vec![
            Message::system("s"),
            question.clone(),
            Message::assistant_tool_calls(first.tool_calls.clone()),
            Message::tool_result(&first.tool_calls[0].id, "{\"id\":\"t1\"}"),
            Message::tool_result(&first.tool_calls[1].id, "[t1]"),
        ],
    )
    .await;
    assert!(second.tool_calls.is_empty());
    assert_eq!(
        second.content.as_deref(),
        Some("Created \"say \"hi\"\". Now: {\"id\":\"t1\"}\n[t1]")
    );

    // A new question in the same conversation starts over: earlier tool results do not count.
    let next_turn = ask(
        &provider,
        vec![
            question,
            Message::assistant_tool_calls(first.tool_calls.clone()),
            Message::tool_result("call_1", "{}"),
            Message::assistant("Created."),
            Message::user("create a task to rest"),
        ],
    )
    .await;
    assert_eq!(next_turn.tool_calls.len(), 2);
    let ToolCall {
        id,
        name,
        arguments,
    } = &next_turn.tool_calls[0];
    assert_eq!((id.as_str(), name.as_str()), ("call_1", "create_task"));
    let args: serde_json::Value = serde_json::from_str(arguments).unwrap();
    assert_eq!(args, json!({"title": "rest", "priority": 2}));
}

#[tokio::test]
async fn rules_load_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.json");
    std::fs::write(
        &path,
        r#"{"rules":[{"match":"hi","matchType":"exact","response":"hello"}],"defaultResponse":"x"}"#,
    )
    .unwrap();
    let provider = StubProvider::from_file(&path).unwrap();
    assert_eq!(provider.rule_count(), 1);
    assert_eq!(say(&provider, "hi").await.as_deref(), Some("hello"));

    let missing = StubProvider::from_file(dir.path().join("absent.json")).unwrap_err();
    assert!(
        missing.message.contains("absent.json"),
        "{}",
        missing.message
    );
    std::fs::write(&path, "{\"rules\": 5}").unwrap();
    let bad = StubProvider::from_file(&path).unwrap_err();
    assert!(
        bad.message.contains("rules.json") && bad.message.contains("rules: must be an array"),
        "{}",
        bad.message
    );
}

#[test]
fn bad_rules_are_refused_saying_where_and_what_to_do() {
    let cases = [
        ("{rules: []}", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (
            r#"{"rules": [], "default": "x"}"#,
            "unknown key \"default\"",
        ),
        (r#"{"rules": ["hi"]}"#, "rules[0]: must be an object"),
        (
            r#"{"rules": [{"match": "a", "matchType": "exact", "response": "b"}, {"match": "a", "response": "b"}]}"#,
            "rules[1].matchType: is missing; add \"matchType\": \"exact\", \"includes\" or \"regex\"",
        ),
        (
            r#"{"rules": [{"match": "a", "matchType": "fuzzy", "response": "b"}]}"#,
            "rules[0].matchType: \"fuzzy\" is not a match type",
        ),
        (
            r#"{"rules": [{"match": "(unclosed", "matchType": "regex", "response": "b"}]}"#,
            "rules[0].match: is not a valid regular expression",
        ),
        (
            r#"{"rules": [{"match": "a", "matchType": "exact"}]}"#,
            "rules[0].response: is missing",
        ),
        (
            r#"{"rules": [{"match": 1, "matchType": "exact", "response": "b"}]}"#,
            "rules[0].match: must be a string",
        ),
        (
            r#"{"rules": [{"match": "a", "matchType": "exact", "response": "b", "respond": "c"}]}"#,
            "rules[0]: unknown key \"respond\"",
        ),
        (
            r#"{"rules": [{"match": "a", "matchType": "exact", "response": "b", "toolCalls": {}}]}"#,
            "rules[0].toolCalls: must be an array",
        ),
        (
            r#"{"rules": [{"match": "a", "matchType": "exact", "response": "b", "toolCalls": [{"type": "function"}]}]}"#,
            "rules[0].toolCalls[0].function: is missing",
        ),
        (
            r#"{"rules": [{"match": "a", "matchType": "exact", "response": "b", "toolCalls": [{"type": "function", "function": {"name": "x", "arguments": "{title: 1}"}}]}]}"#,
            "rules[0].toolCalls[0].function.arguments: is not valid JSON text",
        ),
        (
            r#"{"rules": [{"match": "a", "matchType": "exact", "response": "b", "toolCalls": [{"type": "tool", "function": {"name": "x"}}]}]}"#,
            "rules[0].toolCalls[0].type: must be \"function\"",
        ),
        (
            r#"{"rules": [], "defaultResponse": 3}"#,
            "defaultResponse: must be a string",
        ),
    ];
    for (json, expected) in cases {
        let message = error(json);
        assert!(
            message.contains(expected),
            "for {json}:\n  got {message}\n  expected {expected}"
        );
    }
}

#[tokio::test]
async fn the_demo_rules_create_a_task_and_confirm_once_the_tool_ran() {
    let demo = StubProvider::demo();
    let question = Message::user("create a task to water the plants");
    let first = ask(&demo, vec![question.clone()]).await;
    assert_eq!(first.tool_calls.len(), 1);
    assert_eq!(first.tool_calls[0].name, "create_task");
    let second = ask(
        &demo,
        vec![
            question,
            Message::assistant_tool_calls(first.tool_calls.clone()),
            Message::tool_result(&first.tool_calls[0].id, "{\"id\":\"t1\"}"),
        ],
    )
    .await;
    assert_eq!(
        second.content.as_deref(),
        Some("Done! I created the task \"water the plants\".")
    );
    let fallback = say(&demo, "tell me a joke").await.unwrap();
    assert!(fallback.contains("offline demo assistant"), "{fallback}");
}
