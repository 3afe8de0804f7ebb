//! The OpenAI-compatible provider against a real local HTTP server speaking the
//! chat-completions protocol: request shape, answers, and every failure class.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use storehost_llm::{
    ChatRequest, ErrorClass, LlmError, MaxTokensField, Message, OpenAiConfig, OpenAiProvider,
    Provider, ToolCall, ToolDef,
};
use support::{FakeLlm, Reply, completion, text};

/// Settings for tests: fast backoff, generous timeouts unless a test says otherwise.
fn config(server: &FakeLlm) -> OpenAiConfig {
    OpenAiConfig {
        base_url: server.base_url.clone(),
        model: "test-model".to_owned(),
        api_key_env: Some("TEST_LLM_KEY".to_owned()),
        timeout_ms: 10_000,
        deadline_ms: 20_000,
        max_retries: 3,
        backoff_base_ms: 1,
        backoff_max_ms: 5,
        max_tokens_field: MaxTokensField::MaxTokens,
    }
}

/// A provider whose key variable holds `sk-test`.
fn provider(config: OpenAiConfig) -> OpenAiProvider {
    OpenAiProvider::with_env(config, |name| {
        (name == "TEST_LLM_KEY").then(|| "sk-test".to_owned())
    })
    .unwrap()
}

fn hello() -> ChatRequest {
    ChatRequest {
        messages: vec![Message::user("hello")],
        ..ChatRequest::default()
    }
}

/// Runs `provider.complete(req)` under a safety net far beyond any configured deadline.
async fn call(
    provider: &OpenAiProvider,
    req: ChatRequest,
) -> Result<storehost_llm::Completion, LlmError> {
    tokio::time::timeout(Duration::from_secs(60), provider.complete(req))
        .await
        .expect("the call ended by its own deadline, well before the safety net")
}

#[tokio::test]
async fn tool_calls_are_parsed_and_the_request_has_the_openai_shape() {
    let server = FakeLlm::start(vec![Reply::Json(
        200,
        completion(
            None,
            json!([{"id": "call_abc", "type": "function",
                    "function": {"name": "create_task", "arguments": "{\"title\":\"Water the plants\"}"}}]),
        ),
    )])
    .await;
    let provider = provider(config(&server));
    let request = ChatRequest {
        messages: vec![
            Message::system("You manage tasks."),
            Message::user("list my tasks"),
            Message::assistant_tool_calls(vec![ToolCall {
                id: "call_1".to_owned(),
                name: "list_tasks".to_owned(),
                arguments: "{}".to_owned(),
            }]),
            Message::tool_result("call_1", "[]"),
            Message::user("create a task to water the plants"),
        ],
        tools: vec![ToolDef {
            name: "create_task".to_owned(),
            description: "Creates a task.".to_owned(),
            parameters:
                r#"{"type":"object","properties":{"title":{"type":"string"}},"required":["title"]}"#
                    .to_owned(),
        }],
        max_tokens: Some(256),
        temperature: Some(0.5),
    };

    let answer = call(&provider, request).await.unwrap();
    assert_eq!(answer.content, None);
    assert_eq!(
        answer.tool_calls,
        [ToolCall {
            id: "call_abc".to_owned(),
            name: "create_task".to_owned(),
            arguments: r#"{"title":"Water the plants"}"#.to_owned(),
        }]
    );
    assert_eq!(answer.finish_reason, "tool_calls");
    assert_eq!(answer.model, "test-model-0613");
    assert_eq!((answer.prompt_tokens, answer.completion_tokens), (42, 7));

    let received = server.received();
    assert_eq!(received.len(), 1);
    let sent = &received[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.headers["authorization"], "Bearer sk-test");
    assert_eq!(
        sent.body,
        json!({
            "model": "test-model",
            "messages": [
                {"role": "system", "content": "You manage tasks."},
                {"role": "user", "content": "list my tasks"},
                {"role": "assistant", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "list_tasks", "arguments": "{}"}}
                ]},
                {"role": "tool", "content": "[]", "tool_call_id": "call_1"},
                {"role": "user", "content": "create a task to water the plants"},
            ],
            "tools": [{"type": "function", "function": {
                "name": "create_task",
                "description": "Creates a task.",
                "parameters": {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]},
            }}],
            "max_tokens": 256,
            "temperature": 0.5,
        })
    );
}

/// With `max_tokens_field = max_completion_tokens` the token limit goes in that field, which
/// OpenAI's o-series models want (they refuse `max_tokens`).
#[tokio::test]
async fn the_token_limit_goes_in_the_configured_field() {
    let server = FakeLlm::start(vec![Reply::Json(200, text("short"))]).await;
    let provider = provider(OpenAiConfig {
        max_tokens_field: MaxTokensField::MaxCompletionTokens,
        ..config(&server)
    });
    let request = ChatRequest {
        max_tokens: Some(300),
        ..hello()
    };
    call(&provider, request).await.unwrap();
    let sent = &server.received()[0].body;
    assert_eq!(sent["max_completion_tokens"], 300, "{sent}");
    assert!(sent.get("max_tokens").is_none(), "{sent}");
}

#[tokio::test]
async fn a_text_answer_is_returned_and_no_key_sends_no_authorization() {
    let server = FakeLlm::start(vec![Reply::Json(200, text("Hi there."))]).await;
    let provider = OpenAiProvider::with_env(
        OpenAiConfig {
            api_key_env: None,
            ..config(&server)
        },
        |_| panic!("no key variable is read when api_key_env is None"),
    )
    .unwrap();
    let answer = call(&provider, hello()).await.unwrap();
    assert_eq!(answer.content.as_deref(), Some("Hi there."));
    assert!(answer.tool_calls.is_empty());
    assert_eq!(answer.finish_reason, "stop");
    assert!(!server.received()[0].headers.contains_key("authorization"));
}

#[tokio::test]
async fn unauthorized_is_auth_and_is_not_retried() {
    let server = FakeLlm::start(vec![Reply::Json(
        401,
        json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}),
    )])
    .await;
    let err = call(&provider(config(&server)), hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Auth);
    assert_eq!(err.status, Some(401));
    assert!(
        err.message.contains("Incorrect API key provided"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("TEST_LLM_KEY"),
        "says which variable to fix: {}",
        err.message
    );
    assert_eq!(server.count(), 1, "auth failures are not retried");
}

#[tokio::test]
async fn rate_limited_then_success_succeeds_on_the_second_request() {
    let server = FakeLlm::start(vec![
        Reply::JsonWithHeader(
            429,
            "retry-after",
            "0",
            json!({"error": {"message": "Rate limit reached"}}),
        ),
        Reply::Json(200, text("after the wait")),
    ])
    .await;
    let answer = call(&provider(config(&server)), hello()).await.unwrap();
    assert_eq!(answer.content.as_deref(), Some("after the wait"));
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn rate_limits_that_outlast_the_retries_are_rate_limited() {
    let server = FakeLlm::start(vec![Reply::Json(
        429,
        json!({"error": {"message": "Rate limit reached"}}),
    )])
    .await;
    let provider = provider(OpenAiConfig {
        max_retries: 1,
        ..config(&server)
    });
    let err = call(&provider, hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::RateLimited);
    assert_eq!(err.status, Some(429));
    assert!(
        err.message.contains("gave up after 2 attempts"),
        "{}",
        err.message
    );
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn a_retry_after_beyond_the_deadline_is_not_waited_for() {
    let server = FakeLlm::start(vec![Reply::JsonWithHeader(
        429,
        "retry-after",
        "3600",
        json!({"error": {"message": "Rate limit reached"}}),
    )])
    .await;
    let err = call(&provider(config(&server)), hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::RateLimited);
    assert!(err.message.contains("Retry-After"), "{}", err.message);
    assert_eq!(
        server.count(),
        1,
        "no second request inside the hour asked for"
    );
}

/// Runs `provider.complete_by(req, deadline)`, which must end by `deadline` (and a little).
async fn call_by(
    provider: &OpenAiProvider,
    req: ChatRequest,
    deadline: Instant,
) -> Result<storehost_llm::Completion, LlmError> {
    let answer = tokio::time::timeout_at(
        (deadline + Duration::from_millis(500)).into(),
        provider.complete_by(req, Some(deadline)),
    )
    .await
    .expect("the call ended by the caller's deadline");
    assert!(Instant::now() <= deadline + Duration::from_millis(100));
    answer
}

/// A caller's deadline shorter than `timeout_ms` still leaves time for a retry: the first
/// attempt, which may be retried, gets half of what is left, and when it hangs the second is
/// answered. It used to get all of it.
#[tokio::test]
async fn a_hung_attempt_is_retried_within_the_callers_deadline() {
    let server = FakeLlm::start(vec![Reply::Hang, Reply::Json(200, text("second try"))]).await;
    let provider = provider(OpenAiConfig {
        timeout_ms: 30_000,
        deadline_ms: 60_000,
        ..config(&server)
    });
    let deadline = Instant::now() + Duration::from_secs(3);
    let answer = call_by(&provider, hello(), deadline).await.unwrap();
    assert_eq!(answer.content.as_deref(), Some("second try"));
    assert_eq!(server.count(), 2);
}

/// A 429 whose `Retry-After` (20 s) does not fit the caller's deadline (5 s) is `rate_limited`
/// with its status at once, though it fits `deadline_ms` (60 s); a call that no attempt can
/// finish in time is a `timeout` naming the caller's deadline.
#[tokio::test]
async fn a_retry_after_beyond_the_callers_deadline_is_rate_limited_at_once() {
    let server = FakeLlm::start(vec![Reply::JsonWithHeader(
        429,
        "retry-after",
        "20",
        json!({"error": {"message": "Rate limit reached"}}),
    )])
    .await;
    let limited = provider(OpenAiConfig {
        deadline_ms: 60_000,
        ..config(&server)
    });
    let started = Instant::now();
    let err = call_by(&limited, hello(), started + Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::RateLimited, "{}", err.message);
    assert_eq!(err.status, Some(429));
    assert!(err.message.contains("Retry-After"), "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(server.count(), 1);

    let hung = FakeLlm::start(vec![Reply::Hang]).await;
    let slow = provider(OpenAiConfig {
        timeout_ms: 30_000,
        deadline_ms: 60_000,
        max_retries: 1,
        ..config(&hung)
    });
    let err = call_by(
        &slow,
        hello(),
        Instant::now() + Duration::from_millis(1_500),
    )
    .await
    .unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout, "{}", err.message);
    assert!(err.message.contains("wall_ms_per_call"), "{}", err.message);
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_as_transient() {
    let server = FakeLlm::start(vec![Reply::Json(
        500,
        json!({"error": {"message": "The server had an error"}}),
    )])
    .await;
    let provider = provider(OpenAiConfig {
        max_retries: 2,
        ..config(&server)
    });
    let err = call(&provider, hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient);
    assert_eq!(err.status, Some(500));
    assert!(
        err.message.contains("The server had an error"),
        "{}",
        err.message
    );
    assert!(
        !err.message.contains("127.0.0.1"),
        "the message, which the plugin gets, does not name the endpoint: {}",
        err.message
    );
    assert_eq!(server.count(), 3, "max_retries + 1 requests");
}

#[tokio::test]
async fn a_server_error_then_success_succeeds() {
    let server = FakeLlm::start(vec![
        Reply::Text(503, "upstream overloaded"),
        Reply::Text(502, "bad gateway"),
        Reply::Json(200, text("third time lucky")),
    ])
    .await;
    let answer = call(&provider(config(&server)), hello()).await.unwrap();
    assert_eq!(answer.content.as_deref(), Some("third time lucky"));
    assert_eq!(server.count(), 3);
}

#[tokio::test]
async fn a_sleeping_server_times_out_by_the_deadline() {
    let server = FakeLlm::start(vec![Reply::Hang]).await;
    let provider = provider(OpenAiConfig {
        timeout_ms: 200,
        deadline_ms: 1_000,
        max_retries: 100,
        ..config(&server)
    });
    let err = call(&provider, hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout);
    assert!(err.message.contains("deadline"), "{}", err.message);
    assert!(
        (1..=5).contains(&server.count()),
        "attempts of 200 ms inside a 1 s deadline: {}",
        server.count()
    );
}

#[tokio::test]
async fn each_attempt_has_its_own_timeout() {
    let server = FakeLlm::start(vec![Reply::Hang]).await;
    let provider = provider(OpenAiConfig {
        timeout_ms: 100,
        deadline_ms: 30_000,
        max_retries: 1,
        ..config(&server)
    });
    let err = call(&provider, hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout);
    assert!(err.message.contains("timeout_ms"), "{}", err.message);
    assert_eq!(server.count(), 2, "a timed-out attempt is retried");
}

#[tokio::test]
async fn malformed_json_is_an_invalid_response() {
    let server = FakeLlm::start(vec![Reply::Text(200, "{\"choices\": [ {oops")]).await;
    let err = call(&provider(config(&server)), hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidResponse);
    assert!(
        err.message.contains("not the expected JSON"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("base_url"),
        "says what to check: {}",
        err.message
    );
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn an_answer_without_choices_is_an_invalid_response() {
    let server = FakeLlm::start(vec![Reply::Json(
        200,
        json!({"object": "list", "data": []}),
    )])
    .await;
    let err = call(&provider(config(&server)), hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidResponse);
    assert!(err.message.contains("no choices"), "{}", err.message);
}

#[tokio::test]
async fn other_client_errors_are_invalid_requests_carrying_the_server_message() {
    let server = FakeLlm::start(vec![Reply::Json(
        404,
        json!({"error": {"message": "The model `gpt-9` does not exist"}}),
    )])
    .await;
    let err = call(&provider(config(&server)), hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidRequest);
    assert_eq!(err.status, Some(404));
    assert!(
        err.message.contains("`gpt-9` does not exist"),
        "{}",
        err.message
    );
    assert!(err.message.contains("model name"), "{}", err.message);
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn an_unset_key_variable_is_not_configured_and_sends_nothing() {
    let server = FakeLlm::start(vec![Reply::Json(200, text("unused"))]).await;
    let provider = OpenAiProvider::with_env(config(&server), |_| None).unwrap();
    let err = call(&provider, hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::NotConfigured);
    assert!(err.message.contains("TEST_LLM_KEY"), "{}", err.message);
    assert_eq!(server.count(), 0);
}

#[tokio::test]
async fn an_unreachable_server_is_transient_after_the_retries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let provider = OpenAiProvider::with_env(
        OpenAiConfig {
            base_url: format!("http://{address}/v1"),
            api_key_env: None,
            timeout_ms: 5_000,
            deadline_ms: 20_000,
            max_retries: 2,
            backoff_base_ms: 1,
            backoff_max_ms: 5,
            ..OpenAiConfig::default()
        },
        |_| None,
    )
    .unwrap();
    let err = call(&provider, hello()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient);
    assert_eq!(err.status, None);
    assert!(
        err.message.contains("gave up after 3 attempts"),
        "{}",
        err.message
    );
    assert!(err.message.contains("check base_url"), "{}", err.message);
}

#[tokio::test]
async fn an_invalid_tool_schema_is_refused_before_sending() {
    let server = FakeLlm::start(vec![Reply::Json(200, text("unused"))]).await;
    let request = ChatRequest {
        tools: vec![ToolDef {
            name: "broken".to_owned(),
            description: String::new(),
            parameters: "{not json".to_owned(),
        }],
        ..hello()
    };
    let err = call(&provider(config(&server)), request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidRequest);
    assert!(err.message.contains("\"broken\""), "{}", err.message);
    assert_eq!(server.count(), 0);
}

#[test]
fn bad_settings_are_refused_at_construction() {
    let bad_url = OpenAiProvider::with_env(
        OpenAiConfig {
            base_url: "localhost:11434/v1".to_owned(),
            ..OpenAiConfig::default()
        },
        |_| None,
    )
    .unwrap_err();
    assert_eq!(bad_url.class, ErrorClass::NotConfigured);
    assert!(bad_url.message.contains("http://"), "{}", bad_url.message);
    let no_model = OpenAiProvider::with_env(
        OpenAiConfig {
            model: " ".to_owned(),
            ..OpenAiConfig::default()
        },
        |_| None,
    )
    .unwrap_err();
    assert!(no_model.message.contains("model"), "{}", no_model.message);
}
