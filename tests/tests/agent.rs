//! The `agent` plugin (SPEC §8a) on a real host: chat messages answered by the agentic loop
//! with tools, its limits and error classes, and recurring tasks. The LLM is either the
//! offline rules provider or a local HTTP server speaking the OpenAI chat-completions protocol
//! (the vendor boundary), behind the host's real OpenAI-compatible client.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use storehost_control::llm_backend::ServiceBackend;
use storehost_llm::{
    LlmLimits, LlmService, MaxTokensField, OpenAiConfig, OpenAiProvider, Provider, StubProvider,
};
use storehost_store::{LlmBackend, Quotas};
use storehost_tests::{TestHost, TestHostOptions, programs};

use fake_llm::{FakeLlm, Reply};

/// The host's LLM service over `provider`, as every store's backend.
fn backend(provider: Arc<dyn Provider>) -> Arc<dyn LlmBackend> {
    ServiceBackend::new(Arc::new(LlmService::new(provider, LlmLimits::default())))
}

/// The offline rules provider with `rules`.
fn stub(rules: Value) -> Arc<dyn LlmBackend> {
    backend(Arc::new(
        StubProvider::from_json(&rules.to_string()).expect("valid stub rules"),
    ))
}

/// The OpenAI-compatible client pointed at `server`, with short retries.
fn openai(server: &FakeLlm, tweak: impl FnOnce(&mut OpenAiConfig)) -> Arc<dyn LlmBackend> {
    let mut config = OpenAiConfig {
        base_url: server.base_url.clone(),
        model: "fake-model".into(),
        api_key_env: None,
        timeout_ms: 10_000,
        deadline_ms: 20_000,
        max_retries: 2,
        backoff_base_ms: 10,
        backoff_max_ms: 50,
        max_tokens_field: MaxTokensField::MaxTokens,
    };
    tweak(&mut config);
    backend(Arc::new(
        OpenAiProvider::new(config).expect("valid provider"),
    ))
}

/// A host whose stores call `llm`, with the agent deployed as `agent`.
async fn agent_host(llm: Arc<dyn LlmBackend>) -> TestHost {
    agent_host_with(llm, TestHostOptions::default()).await
}

async fn agent_host_with(llm: Arc<dyn LlmBackend>, options: TestHostOptions) -> TestHost {
    let host = TestHost::start_with(TestHostOptions {
        llm: Some(llm),
        ..options
    })
    .await;
    host.deploy("agent", programs::AGENT).await;
    host
}

/// Appends a `v1.ChatMessageSent`.
async fn chat(host: &TestHost, store: &str, id: &str, role: &str, text: &str) -> u64 {
    host.append(
        store,
        "v1.ChatMessageSent",
        json!({
            "id": id,
            "conversationId": "conv-1",
            "message": text,
            "role": role,
            "createdAt": "2025-01-01T10:00:00.000Z",
        }),
    )
    .await
}

/// Every event of `store`, in order.
async fn all_events(host: &TestHost, store: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = host
            .get(&format!(
                "/v1/stores/{store}/events?after={after}&limit=500"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let batch = page["events"].as_array().expect("events").clone();
        if batch.is_empty() {
            return events;
        }
        after = page["next"].as_u64().expect("next");
        events.extend(batch);
    }
}

/// The events of type `event_type`.
fn of_type<'a>(events: &'a [Value], event_type: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == event_type).collect()
}

/// The response events for user message `message_id`: (started, received, completed), each
/// checked to be exactly one and in that order in the log.
fn one_response<'a>(events: &'a [Value], message_id: &str) -> (&'a Value, &'a Value, &'a Value) {
    let find = |event_type: &str, field: &str| -> Vec<&'a Value> {
        events
            .iter()
            .filter(|e| e["type"] == event_type && e["payload"][field] == message_id)
            .collect()
    };
    let started = find("v1.LLMResponseStarted", "userMessageId");
    let received = find("v1.LLMResponseReceived", "responseToMessageId");
    let completed = find("v1.LLMResponseCompleted", "userMessageId");
    assert_eq!(
        started.len(),
        1,
        "one LLMResponseStarted for {message_id}: {events:#?}"
    );
    assert_eq!(
        received.len(),
        1,
        "one LLMResponseReceived for {message_id}: {events:#?}"
    );
    assert_eq!(
        completed.len(),
        1,
        "one LLMResponseCompleted for {message_id}: {events:#?}"
    );
    let (started, received, completed) = (started[0], received[0], completed[0]);
    assert!(
        started["seq"].as_u64() < received["seq"].as_u64()
            && received["seq"].as_u64() < completed["seq"].as_u64(),
        "Started → Received → Completed: {started} {received} {completed}"
    );
    for event in [started, received, completed] {
        assert_eq!(event["source"], "plugin");
        assert_eq!(event["payload"]["conversationId"], "conv-1");
    }
    assert_eq!(received["payload"]["role"], "assistant");
    (started, received, completed)
}

/// A rule that answers "water the plants" by creating that task.
fn create_task_rules() -> Value {
    json!({
        "rules": [{
            "match": "water the plants",
            "matchType": "includes",
            "toolCalls": [{"type": "function", "function": {
                "name": "create_task",
                "arguments": "{\"title\":\"Water the plants\"}"
            }}],
            "response": "Done: {{toolResults}}"
        }],
        "defaultResponse": "I did not understand."
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_message_with_a_tool_call_creates_a_task_and_gets_one_reply() {
    let host = agent_host(stub(create_task_rules())).await;
    host.add_store("ws-one", "agent", &[]).await;

    chat(&host, "ws-one", "m1", "user", "Please water the plants").await;
    host.settle("ws-one").await;

    let tasks = host.query("ws-one", "tasks", json!({})).await;
    let tasks = tasks["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "one task, also after its echo: {tasks:?}");
    assert_eq!(tasks[0]["title"], "Water the plants");
    assert_eq!(tasks[0]["status"], "todo");
    let task_id = tasks[0]["id"].as_str().unwrap();

    let events = all_events(&host, "ws-one").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(received["payload"]["id"], "m1-response");
    let reply = received["payload"]["message"].as_str().unwrap();
    assert!(reply.starts_with("Done: "), "{reply}");
    assert!(
        reply.contains(task_id),
        "the tool result names the task: {reply}"
    );
    let metadata = &received["payload"]["llmMetadata"];
    assert_eq!(metadata["stopReason"], "final_answer");
    assert_eq!(metadata["model"], "stub");
    assert_eq!(metadata["toolCalls"][0]["name"], "create_task");
    assert_eq!(metadata["toolCalls"][0]["ok"], true);
    assert_eq!(
        completed["payload"],
        json!({"conversationId": "conv-1", "userMessageId": "m1", "iterations": 2, "success": true})
    );

    // The tool emitted the domain event, which other readers of the log see.
    let created = of_type(&events, "v2.TaskCreated");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0]["source"], "plugin");
    assert_eq!(created[0]["payload"]["id"], task_id);
    assert_eq!(created[0]["payload"]["title"], "Water the plants");

    let messages = host
        .query("ws-one", "messages", json!({"conversationId": "conv-1"}))
        .await;
    let messages = messages["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["id"], "m1");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[1]["id"], "m1-response");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["responseToMessageId"], "m1");
    assert_eq!(messages[1]["message"], reply);

    let conversations = host.query("ws-one", "conversations", json!({})).await;
    assert_eq!(conversations["conversations"][0]["id"], "conv-1");
    assert_eq!(conversations["conversations"][0]["messageCount"], 2);
    assert_eq!(
        conversations["conversations"][0]["title"],
        "Please water the plants"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_demo_rules_drive_the_agents_tools() {
    // What a newcomer sees on the embedded default: the offline demo rules and the agent.
    let host = agent_host(backend(Arc::new(StubProvider::demo()))).await;
    host.add_store("ws-demo", "agent", &[]).await;
    let mut transcript = Vec::new();
    let mut say = async |id: &str, text: &str| -> String {
        chat(&host, "ws-demo", id, "user", text).await;
        host.settle("ws-demo").await;
        let events = all_events(&host, "ws-demo").await;
        let (_, received, completed) = one_response(&events, id);
        assert_eq!(completed["payload"]["success"], true, "{received}");
        let reply = received["payload"]["message"].as_str().unwrap().to_owned();
        transcript.push(format!("user: {text}\nassistant: {reply}"));
        reply
    };

    let reply = say("d1", "create a task to water the plants").await;
    assert_eq!(reply, "Done! I created the task \"water the plants\".");
    let tasks = host.query("ws-demo", "tasks", json!({})).await;
    let id = tasks["tasks"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(tasks["tasks"][0]["title"], "water the plants");

    let reply = say("d2", "list my tasks").await;
    assert!(
        reply.contains(&id) && reply.contains("water the plants"),
        "{reply}"
    );
    let reply = say("d3", &format!("mark task {id} as done")).await;
    assert_eq!(reply, format!("Task {id} is now done."));
    let tasks = host.query("ws-demo", "tasks", json!({})).await;
    assert_eq!(tasks["tasks"][0]["status"], "done");

    let reply = say("d4", "remind me to stretch every day").await;
    assert_eq!(reply, "Okay, I will remind you to stretch every day.");
    let recurring = host.query("ws-demo", "recurring-tasks", json!({})).await;
    assert_eq!(
        recurring["recurringTasks"][0]["prompt"],
        "Reminder: stretch"
    );
    assert_eq!(recurring["recurringTasks"][0]["intervalHours"], 24.0);

    let reply = say("d5", &format!("archive task {id}")).await;
    assert_eq!(reply, format!("I archived task {id}."));
    let tasks = host.query("ws-demo", "tasks", json!({})).await;
    assert_eq!(tasks["tasks"], json!([]));
    println!("{}", transcript.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_delivered_twice_gets_one_response() {
    let host = agent_host(stub(create_task_rules())).await;
    host.add_store("ws-twice", "agent", &[]).await;

    chat(&host, "ws-twice", "m1", "user", "water the plants").await;
    chat(&host, "ws-twice", "m1", "user", "water the plants").await;
    host.settle("ws-twice").await;

    let events = all_events(&host, "ws-twice").await;
    one_response(&events, "m1");
    assert_eq!(of_type(&events, "v2.TaskCreated").len(), 1);
    let tasks = host.query("ws-twice", "tasks", json!({})).await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1, "{tasks}");
    let messages = host
        .query("ws-twice", "messages", json!({"conversationId": "conv-1"}))
        .await;
    assert_eq!(
        messages["messages"].as_array().unwrap().len(),
        2,
        "{messages}"
    );
}

/// Another message under an id already used (another conversation, other text) is not
/// taken for a redelivery and silently dropped: it is refused, and shows as a dead letter
/// that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_message_under_a_used_id_is_refused_not_dropped() {
    let host = agent_host(stub(create_task_rules())).await;
    host.add_store("ws-clash", "agent", &[]).await;
    chat(&host, "ws-clash", "m1", "user", "water the plants").await;
    let clash = host
        .append(
            "ws-clash",
            "v1.ChatMessageSent",
            json!({"id": "m1", "conversationId": "conv-2", "message": "feed the cat", "role": "user"}),
        )
        .await;
    host.settle("ws-clash").await;
    let (status, letters) = host.get("/v1/stores/ws-clash/dead-letters").await;
    assert_eq!(status, 200, "{letters}");
    let letters = letters["deadLetters"].as_array().expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["seq"], clash);
    let message = letters[0]["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("`m1` is already used by another message"),
        "{:?}",
        letters[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assistant_messages_are_stored_not_answered_and_system_messages_are_answered() {
    let host = agent_host(stub(create_task_rules())).await;
    host.add_store("ws-roles", "agent", &[]).await;

    chat(&host, "ws-roles", "a1", "assistant", "How can I help?").await;
    host.settle("ws-roles").await;
    let events = all_events(&host, "ws-roles").await;
    assert_eq!(
        events.len(),
        1,
        "nothing emitted for an assistant message: {events:#?}"
    );
    let messages = host
        .query("ws-roles", "messages", json!({"conversationId": "conv-1"}))
        .await;
    assert_eq!(messages["messages"][0]["role"], "assistant");
    assert_eq!(messages["messages"][0]["message"], "How can I help?");

    chat(&host, "ws-roles", "s1", "system", "Say hello.").await;
    host.settle("ws-roles").await;
    let events = all_events(&host, "ws-roles").await;
    let (_, received, completed) = one_response(&events, "s1");
    assert_eq!(received["payload"]["message"], "I did not understand.");
    assert_eq!(completed["payload"]["success"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_read_and_change_tasks_in_one_conversation() {
    // The model lists the tasks, then marks the first one done and archives the second,
    // reading ids from the tool results like a real model would.
    let server = FakeLlm::start(|request| {
        let results = request.tool_results();
        match results.len() {
            0 => Reply::tool_calls(&[("list_tasks", json!({}))]),
            1 => {
                let listed: Value = serde_json::from_str(&results[0]).unwrap();
                let first = listed["tasks"][0]["id"].as_str().unwrap().to_owned();
                let second = listed["tasks"][1]["id"].as_str().unwrap().to_owned();
                Reply::tool_calls(&[
                    ("update_task", json!({"id": first, "status": "done"})),
                    ("archive_task", json!({"id": second})),
                    ("get_task_by_id", json!({"id": "no-such-task"})),
                ])
            }
            _ => Reply::text("Marked one done and archived the other."),
        }
    })
    .await;
    let host = agent_host(openai(&server, |_| {})).await;
    host.add_store("ws-tools", "agent", &[]).await;
    for (id, title) in [("t1", "Buy milk"), ("t2", "Call mum")] {
        host.append(
            "ws-tools",
            "v2.TaskCreated",
            json!({"id": id, "title": title}),
        )
        .await;
    }
    chat(&host, "ws-tools", "m1", "user", "tidy up my tasks").await;
    host.settle("ws-tools").await;

    let all = host
        .query("ws-tools", "tasks", json!({"includeArchived": true}))
        .await;
    assert_eq!(all["tasks"][0]["status"], "done");
    assert_eq!(all["tasks"][1]["archived"], true);
    let events = all_events(&host, "ws-tools").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(completed["payload"]["iterations"], 3);
    assert_eq!(completed["payload"]["success"], true);
    let calls = received["payload"]["llmMetadata"]["toolCalls"]
        .as_array()
        .unwrap();
    let outcome: Vec<(&str, bool)> = calls
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        outcome,
        [
            ("list_tasks", true),
            ("update_task", true),
            ("archive_task", true),
            ("get_task_by_id", false)
        ]
    );
    assert_eq!(of_type(&events, "v1.TaskUpdated").len(), 1);
    assert_eq!(of_type(&events, "v1.TaskArchived").len(), 1);

    // The model saw the conversation, the tools and, for the unknown id, an error it can use.
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    let tools: Vec<&str> = requests[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        tools,
        [
            "create_task",
            "update_task",
            "archive_task",
            "get_task_by_id",
            "list_tasks",
            "create_recurring_task"
        ]
    );
    assert_eq!(requests[0]["messages"][0]["role"], "system");
    assert_eq!(requests[0]["messages"][1]["content"], "tidy up my tasks");
    let last = requests[2]["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["role"], "tool");
    assert!(
        last["content"]
            .as_str()
            .unwrap()
            .contains("no task with id `no-such-task`"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_stops_at_llm_max_iterations() {
    // A model that never stops calling tools, each time with new arguments.
    let server = FakeLlm::start(|request| {
        Reply::tool_calls(&[(
            "create_task",
            json!({"title": format!("step {}", request.index)}),
        )])
    })
    .await;
    let host = agent_host(openai(&server, |_| {})).await;
    host.add_store("ws-max", "agent", &[("LLM_MAX_ITERATIONS", "3")])
        .await;

    chat(&host, "ws-max", "m1", "user", "keep going").await;
    host.settle("ws-max").await;

    assert_eq!(
        server.requests().len(),
        3,
        "three model calls, then it stops"
    );
    let events = all_events(&host, "ws-max").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(completed["payload"]["iterations"], 3);
    assert_eq!(completed["payload"]["success"], false);
    assert_eq!(
        received["payload"]["llmMetadata"]["stopReason"],
        "max_iterations"
    );
    let reply = received["payload"]["message"].as_str().unwrap();
    assert!(reply.contains("within 3 steps"), "{reply}");

    // Without the key, the default: 15 model calls.
    host.add_store("ws-default", "agent", &[]).await;
    chat(&host, "ws-default", "m2", "user", "keep going").await;
    host.settle("ws-default").await;
    assert_eq!(
        server.requests().len(),
        3 + 15,
        "the default stops at 15 calls"
    );
    let events = all_events(&host, "ws-default").await;
    let (_, _, completed) = one_response(&events, "m2");
    assert_eq!(completed["payload"]["iterations"], 15);
}

/// Tasks changed by the client's own events (not the agent's tools): `v1.TaskUpdated` changes
/// the fields it carries (`description: null` clears it), `v1.TaskArchived` hides the task from
/// `tasks` unless `includeArchived`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_task_events_update_and_archive_the_materialised_task() {
    let host = agent_host(stub(json!({}))).await;
    host.add_store("ws-tasks", "agent", &[]).await;
    host.append(
        "ws-tasks",
        "v2.TaskCreated",
        json!({"id": "t1", "title": "Write the report", "description": "by Friday"}),
    )
    .await;
    host.append(
        "ws-tasks",
        "v1.TaskUpdated",
        json!({"id": "t1", "status": "done", "description": null}),
    )
    .await;
    host.settle("ws-tasks").await;
    let listed = host.query("ws-tasks", "tasks", json!({})).await;
    let task = &listed["tasks"][0];
    assert_eq!(task["id"], "t1", "{listed}");
    assert_eq!(task["status"], "done", "{listed}");
    assert_eq!(task["title"], "Write the report", "untouched: {listed}");
    assert!(task["description"].is_null(), "cleared: {listed}");

    host.append("ws-tasks", "v1.TaskArchived", json!({"id": "t1"}))
        .await;
    host.settle("ws-tasks").await;
    let listed = host.query("ws-tasks", "tasks", json!({})).await;
    assert_eq!(listed["tasks"], json!([]), "{listed}");
    let all = host
        .query("ws-tasks", "tasks", json!({"includeArchived": true}))
        .await;
    assert_eq!(all["tasks"][0]["archived"], true, "{all}");
    assert_eq!(all["tasks"][0]["status"], "done", "{all}");
    // The same as a plain query parameter, which reaches the plugin as text (422 before).
    let (status, plain) = host
        .get("/v1/stores/ws-tasks/query/tasks?includeArchived=true")
        .await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain, all);
    let (status, executions) = host
        .get("/v1/stores/ws-tasks/query/executions?limit=5")
        .await;
    assert_eq!(status, 200, "{executions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_loop_is_stopped_at_the_third_identical_call() {
    let server = FakeLlm::start(|_| Reply::tool_calls(&[("list_tasks", json!({}))])).await;
    let host = agent_host(openai(&server, |_| {})).await;
    host.add_store("ws-stuck", "agent", &[]).await;

    chat(&host, "ws-stuck", "m1", "user", "what do I have?").await;
    host.settle("ws-stuck").await;

    assert_eq!(server.requests().len(), 3);
    let events = all_events(&host, "ws-stuck").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(completed["payload"]["iterations"], 3);
    assert_eq!(completed["payload"]["success"], false);
    let metadata = &received["payload"]["llmMetadata"];
    assert_eq!(metadata["stopReason"], "stuck_loop");
    assert_eq!(metadata["stuckTool"], "list_tasks");
    assert_eq!(
        metadata["toolCalls"].as_array().unwrap().len(),
        2,
        "the third identical call is not run"
    );
}

/// Sends one user message to a store whose LLM is `server`; answers the response events and
/// how many requests the server got.
async fn chat_through(
    server: &FakeLlm,
    tweak: impl FnOnce(&mut OpenAiConfig),
) -> (Value, Value, usize) {
    let host = agent_host(openai(server, tweak)).await;
    host.add_store("ws-llm", "agent", &[]).await;
    chat(&host, "ws-llm", "m1", "user", "hello there").await;
    host.settle("ws-llm").await;
    let events = all_events(&host, "ws-llm").await;
    let (_, received, completed) = one_response(&events, "m1");
    (received.clone(), completed.clone(), server.requests().len())
}

/// Checks a response that failed with `class` (and `status`) after `iterations` calls.
fn assert_failed(received: &Value, completed: &Value, class: &str, status: Option<u16>) {
    let metadata = &received["payload"]["llmMetadata"];
    assert_eq!(metadata["stopReason"], "llm_error", "{received}");
    assert_eq!(metadata["errorClass"], class, "{received}");
    assert_eq!(metadata["httpStatus"], json!(status), "{received}");
    assert_eq!(completed["payload"]["success"], false);
    assert_eq!(completed["payload"]["iterations"], 1);
    let reply = received["payload"]["message"].as_str().unwrap();
    assert!(
        !reply.contains("127.0.0.1") && reply.ends_with('.'),
        "a polite reply without the operator's details: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_is_an_auth_error_and_not_retried() {
    let server = FakeLlm::start(|_| Reply::error(401, "invalid api key")).await;
    let (received, completed, requests) = chat_through(&server, |_| {}).await;
    assert_failed(&received, &completed, "auth", Some(401));
    assert_eq!(requests, 1);
    let reply = received["payload"]["message"].as_str().unwrap();
    assert!(reply.contains("API key"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_call_is_retried_and_then_answered() {
    let server = FakeLlm::start(|request| match request.index {
        0 => Reply::error(429, "slow down"),
        _ => Reply::text("Hello! All good."),
    })
    .await;
    let (received, completed, requests) = chat_through(&server, |_| {}).await;
    assert_eq!(requests, 2);
    assert_eq!(received["payload"]["message"], "Hello! All good.");
    assert_eq!(
        received["payload"]["llmMetadata"]["stopReason"],
        "final_answer"
    );
    assert_eq!(completed["payload"]["success"], true);
    assert_eq!(completed["payload"]["iterations"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_rate_limiting_gets_a_polite_reply() {
    let server = FakeLlm::start(|_| Reply::error(429, "slow down")).await;
    let (received, completed, requests) = chat_through(&server, |c| c.max_retries = 1).await;
    assert_failed(&received, &completed, "rate_limited", Some(429));
    assert_eq!(requests, 2);
    let reply = received["payload"]["message"].as_str().unwrap();
    assert!(reply.contains("too many requests"), "{reply}");
}

/// A 429 asking for a wait longer than the invocation has left for its LLM call (the default
/// `wall_ms_per_call` of 10 s leaves about 9) is a `rate_limited` error with its status at
/// once. The provider used to wait 20 s, since that fit its own `deadline_ms` (60 s), holding
/// a host-wide LLM slot, until the invocation's budget cut the call as a `timeout` with no
/// status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_the_invocation_has_left_is_rate_limited_at_once() {
    let server =
        FakeLlm::start(|_| Reply::error(429, "slow down").with_header("retry-after", "20")).await;
    let started = std::time::Instant::now();
    let (received, completed, requests) = chat_through(&server, |c| {
        c.timeout_ms = 30_000;
        c.deadline_ms = 60_000;
    })
    .await;
    assert_failed(&received, &completed, "rate_limited", Some(429));
    assert_eq!(requests, 1, "no retry inside the 20 s asked for");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered without waiting: {:?}",
        started.elapsed()
    );
}

/// An attempt that hangs is retried within the invocation's wall time: with `timeout_ms`
/// (30 s) longer than the invocation has left for the call (about 9 s), an attempt that may be
/// retried gets half of what is left, and the retry is answered. The first attempt used to
/// get all of it, and the call ended as a `timeout` with no retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_attempt_is_retried_within_the_invocations_wall_time() {
    let server = FakeLlm::start(|request| match request.index {
        0 => Reply::text("much too late").after(Duration::from_secs(20)),
        _ => Reply::text("Second time lucky."),
    })
    .await;
    let (received, completed, requests) = chat_through(&server, |c| {
        c.timeout_ms = 30_000;
        c.deadline_ms = 60_000;
    })
    .await;
    assert_eq!(requests, 2);
    assert_eq!(received["payload"]["message"], "Second time lucky.");
    assert_eq!(completed["payload"]["success"], true, "{received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_server_is_a_transient_error_after_the_retries() {
    let server = FakeLlm::start(|_| Reply::error(500, "boom")).await;
    let (received, completed, requests) = chat_through(&server, |c| c.max_retries = 2).await;
    assert_failed(&received, &completed, "transient", Some(500));
    assert_eq!(requests, 3, "the first attempt and two retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_answer_in_time_is_a_timeout() {
    let server = FakeLlm::start(|_| Reply::text("too late").after(Duration::from_secs(30))).await;
    let (received, completed, requests) = chat_through(&server, |c| {
        c.timeout_ms = 200;
        c.deadline_ms = 600;
        c.max_retries = 1;
    })
    .await;
    assert_failed(&received, &completed, "timeout", None);
    assert_eq!(requests, 2);
}

/// An answer the model stopped at the token limit reaches the plugin with its finish reason
/// (the plugin world's `completion.finish-reason`), so the plugin can tell it from a final
/// answer: the agent records it in `llmMetadata.finishReason`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finish_reason_of_a_cut_answer_reaches_the_plugin() {
    let server = FakeLlm::start(|_| Reply::finished("The first half of an ans", "length")).await;
    let (received, _, requests) = chat_through(&server, |_| {}).await;
    assert_eq!(requests, 1);
    assert_eq!(
        received["payload"]["llmMetadata"]["finishReason"], "length",
        "{received}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_json_is_an_invalid_response() {
    let server = FakeLlm::start(|_| Reply::raw(200, "<html>surprise</html>")).await;
    let (received, completed, requests) = chat_through(&server, |_| {}).await;
    assert_failed(&received, &completed, "invalid_response", Some(200));
    assert_eq!(requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_an_llm_provider_says_so_politely() {
    let host = TestHost::start().await;
    host.deploy("agent", programs::AGENT).await;
    host.add_store("ws-none", "agent", &[]).await;
    chat(&host, "ws-none", "m1", "user", "hello").await;
    host.settle("ws-none").await;
    let events = all_events(&host, "ws-none").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_failed(
        &received.clone(),
        &completed.clone(),
        "not_configured",
        None,
    );
}

/// A model slower than the store's `wall_ms_per_call` allows gets the chat a `timeout` error
/// reply (one Started, one Received with the error class, one Completed `success: false`),
/// committed like any other outcome: the `llm` call waits only for what the invocation has
/// left of its wall time, less a reserve for the plugin to record it. It used to fail the whole
/// invocation as `wall_time`, leaving no trace, retried with fresh LLM calls, then
/// dead-lettered: the user never got an answer. Meanwhile another store is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_llm_gets_a_timeout_reply_within_the_wall_time_while_another_store_is_answered() {
    let server = FakeLlm::start(|request| {
        if request.last_user_text().contains("slow") {
            Reply::text("much too late").after(Duration::from_secs(60))
        } else {
            Reply::text("quick answer")
        }
    })
    .await;
    let host = agent_host_with(
        openai(&server, |c| {
            c.timeout_ms = 120_000;
            c.deadline_ms = 120_000;
        }),
        TestHostOptions::default(),
    )
    .await;
    let quotas = Quotas {
        wall_ms_per_call: 3_000,
        ..Quotas::default()
    };
    host.add_store_with("ws-slow", "agent", &[], quotas).await;
    host.add_store("ws-fast", "agent", &[]).await;

    chat(&host, "ws-slow", "m1", "user", "a slow question").await;
    server.wait_for_slow_request().await;
    chat(&host, "ws-fast", "m2", "user", "a quick question").await;
    host.settle("ws-fast").await;
    assert!(
        server.fast_arrived_while_slow_in_flight(),
        "the quick store's call went out while the slow store was waiting for its answer"
    );
    let events = all_events(&host, "ws-fast").await;
    let (_, received, completed) = one_response(&events, "m2");
    assert_eq!(received["payload"]["message"], "quick answer");
    assert_eq!(completed["payload"]["success"], true);

    host.settle("ws-slow").await;
    let events = all_events(&host, "ws-slow").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_failed(&received.clone(), &completed.clone(), "timeout", None);
    let (_, status) = host.get("/v1/stores/ws-slow").await;
    assert_eq!(status["lag"], 0, "{status}");
    assert_eq!(status["deadLettered"], 0, "{status}");
    assert_eq!(
        status["errorsCount"], 0,
        "nothing failed as wall_time: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurring_task_created_in_chat_is_stored_and_scheduled() {
    let rules = json!({
        "rules": [{
            "match": "(?i)remind me to (.+) every day",
            "matchType": "regex",
            "toolCalls": [{"type": "function", "function": {
                "name": "create_recurring_task",
                "arguments": "{\"name\":\"${1}\",\"prompt\":\"Reminder: ${1}\",\"intervalHours\":24}"
            }}],
            "response": "Okay, every day."
        }]
    });
    let host = agent_host(stub(rules)).await;
    host.add_store("ws-remind", "agent", &[]).await;
    chat(
        &host,
        "ws-remind",
        "m1",
        "user",
        "remind me to stretch every day",
    )
    .await;
    host.settle("ws-remind").await;

    let recurring = host.query("ws-remind", "recurring-tasks", json!({})).await;
    let recurring = recurring["recurringTasks"].as_array().unwrap();
    assert_eq!(
        recurring.len(),
        1,
        "one, also after the echo: {recurring:?}"
    );
    let task = &recurring[0];
    assert_eq!(task["name"], "stretch");
    assert_eq!(task["prompt"], "Reminder: stretch");
    assert_eq!(task["intervalHours"], 24.0);
    assert_eq!(task["enabled"], true);
    assert_eq!(task["scheduleError"], Value::Null);
    let id = task["id"].as_str().unwrap();

    let events = all_events(&host, "ws-remind").await;
    let created = of_type(&events, "v1.RecurringTaskCreated");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["payload"]["id"], id);
    assert_eq!(created[0]["payload"]["intervalHours"], 24.0);

    let schedules = schedules(&host, "ws-remind").await;
    assert_eq!(schedules.len(), 1, "{schedules:?}");
    assert_eq!(schedules[0]["taskId"], id);
    assert_eq!(schedules[0]["kind"], "every");
    assert_eq!(schedules[0]["spec"], "86400000");
    assert_eq!(
        millis(&task["nextExecutionAt"]),
        schedules[0]["nextRunAt"].as_i64().unwrap(),
        "the task shows when the host will run it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_task_events_schedule_reschedule_and_cancel() {
    let host = agent_host(stub(json!({}))).await;
    host.add_store("ws-rt", "agent", &[]).await;

    host.append(
        "ws-rt",
        "v1.RecurringTaskCreated",
        json!({"id": "rt1", "name": "Standup", "prompt": "Summarise my tasks", "cron": "0 9 * * MON-FRI"}),
    )
    .await;
    host.settle("ws-rt").await;
    let s = schedules(&host, "ws-rt").await;
    assert_eq!(
        (s[0]["taskId"].as_str(), s[0]["kind"].as_str()),
        (Some("rt1"), Some("cron"))
    );
    assert_eq!(s[0]["spec"], "0 9 * * MON-FRI");

    host.append(
        "ws-rt",
        "v1.RecurringTaskUpdated",
        json!({"id": "rt1", "intervalHours": 2}),
    )
    .await;
    host.settle("ws-rt").await;
    let s = schedules(&host, "ws-rt").await;
    assert_eq!(
        (s[0]["kind"].as_str(), s[0]["spec"].as_str()),
        (Some("every"), Some("7200000"))
    );
    let task = recurring_task(&host, "ws-rt", "rt1").await;
    assert_eq!(task["intervalHours"], 2.0);
    assert_eq!(task.get("cron"), None);

    host.append("ws-rt", "v1.RecurringTaskDisabled", json!({"id": "rt1"}))
        .await;
    host.settle("ws-rt").await;
    assert!(schedules(&host, "ws-rt").await.is_empty());
    let task = recurring_task(&host, "ws-rt", "rt1").await;
    assert_eq!(task["enabled"], false);
    assert_eq!(task["nextExecutionAt"], Value::Null);

    host.append("ws-rt", "v1.RecurringTaskEnabled", json!({"id": "rt1"}))
        .await;
    host.settle("ws-rt").await;
    assert_eq!(schedules(&host, "ws-rt").await.len(), 1);
    assert_eq!(recurring_task(&host, "ws-rt", "rt1").await["enabled"], true);

    // A schedule the scheduler refuses is shown on the task instead of failing the event.
    host.append(
        "ws-rt",
        "v1.RecurringTaskCreated",
        json!({"id": "rt2", "name": "Broken", "prompt": "x", "cron": "every tuesday"}),
    )
    .await;
    host.settle("ws-rt").await;
    let broken = recurring_task(&host, "ws-rt", "rt2").await;
    let problem = broken["scheduleError"].as_str().unwrap();
    assert!(problem.contains("invalid cron expression"), "{problem}");
    assert_eq!(schedules(&host, "ws-rt").await.len(), 1);

    host.append("ws-rt", "v1.RecurringTaskDeleted", json!({"id": "rt1"}))
        .await;
    host.settle("ws-rt").await;
    assert!(schedules(&host, "ws-rt").await.is_empty());
    let listed = host.query("ws-rt", "recurring-tasks", json!({})).await;
    let ids: Vec<&str> = listed["recurringTasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["rt2"]);
    let (_, status) = host.get("/v1/stores/ws-rt").await;
    assert_eq!(status["deadLettered"], 0, "{status}");
}

/// A run's `RecurringTaskUpdated {nextExecutionAt}` echo can be processed after a disable or a
/// new schedule (a due run goes before queued events): the task then shows when the host's
/// scheduler will really run it — nothing once disabled — not the echo's stale time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_next_execution_echo_does_not_overwrite_the_schedule() {
    let host = agent_host(stub(json!({}))).await;
    host.add_store("ws-echo", "agent", &[]).await;
    host.append(
        "ws-echo",
        "v1.RecurringTaskCreated",
        json!({"id": "re1", "name": "Digest", "prompt": "Summarise", "intervalHours": 1}),
    )
    .await;
    let stale = json!({"id": "re1", "nextExecutionAt": "2030-01-01T00:00:00.000Z"});
    host.append("ws-echo", "v1.RecurringTaskUpdated", stale.clone())
        .await;
    host.settle("ws-echo").await;
    let scheduled = schedules(&host, "ws-echo").await[0]["nextRunAt"]
        .as_i64()
        .unwrap();
    let task = recurring_task(&host, "ws-echo", "re1").await;
    assert_eq!(millis(&task["nextExecutionAt"]), scheduled, "{task}");

    host.append("ws-echo", "v1.RecurringTaskDisabled", json!({"id": "re1"}))
        .await;
    host.append("ws-echo", "v1.RecurringTaskUpdated", stale)
        .await;
    host.settle("ws-echo").await;
    let task = recurring_task(&host, "ws-echo", "re1").await;
    assert_eq!(task["enabled"], false, "{task}");
    assert_eq!(task["nextExecutionAt"], Value::Null, "{task}");
}

/// Polls the events of `store` until `check` holds (a 30 s safety net); answers them.
async fn wait_for_events(
    host: &TestHost,
    store: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut last = Vec::new();
    for _ in 0..300 {
        last = all_events(host, store).await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the events of {store} never reached the expected state: {last:#?}");
}

/// The execution events with id `execution_id`.
fn execution_events<'a>(events: &'a [Value], execution_id: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| {
            e["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("v1.TaskExecution"))
                && e["payload"]["id"] == execution_id
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_recurring_task_runs_the_loop_and_reports_its_next_execution() {
    let rules = json!({
        "rules": [{
            "match": "Reminder: stretch",
            "matchType": "exact",
            "toolCalls": [{"type": "function", "function": {
                "name": "create_task",
                "arguments": "{\"title\":\"Stretch\"}"
            }}],
            "response": "Added a stretch task."
        }]
    });
    let host = agent_host(stub(rules)).await;
    host.add_store("ws-every", "agent", &[]).await;
    // Every second (intervalHours is fractional), counted from the end of each execution.
    host.append(
        "ws-every",
        "v1.RecurringTaskCreated",
        json!({"id": "rt-stretch", "name": "Stretch", "prompt": "Reminder: stretch",
               "intervalHours": 1.0 / 3600.0}),
    )
    .await;
    let events = wait_for_events(&host, "ws-every", |events| {
        of_type(events, "v1.TaskExecutionCompleted").len() >= 2
    })
    .await;
    host.append(
        "ws-every",
        "v1.RecurringTaskDisabled",
        json!({"id": "rt-stretch"}),
    )
    .await;
    host.settle("ws-every").await;
    assert!(
        schedules(&host, "ws-every").await.is_empty(),
        "disabling cancels the schedule"
    );

    let started = of_type(&events, "v1.TaskExecutionStarted");
    let first_id = started[0]["payload"]["id"].as_str().unwrap();
    let second_id = started[1]["payload"]["id"].as_str().unwrap();
    assert!(first_id.starts_with("rt-stretch@"), "{first_id}");
    assert_eq!(started[0]["payload"]["recurringTaskId"], "rt-stretch");

    // Started → Completed → RecurringTaskUpdated, once each, with the spec's fields.
    let first = execution_events(&events, first_id);
    let kinds: Vec<&str> = first.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["v1.TaskExecutionStarted", "v1.TaskExecutionCompleted"]
    );
    let completed = &first[1]["payload"];
    assert_eq!(completed["output"], "Added a stretch task.");
    let updates: Vec<&Value> = of_type(&events, "v1.RecurringTaskUpdated")
        .into_iter()
        .filter(|e| e["seq"].as_u64() > first[1]["seq"].as_u64())
        .collect();
    assert_eq!(
        updates[0]["seq"].as_u64(),
        Some(first[1]["seq"].as_u64().unwrap() + 1)
    );
    assert_eq!(updates[0]["payload"]["id"], "rt-stretch");

    // The next execution is due an interval after this one completed, and the host ran the
    // next one exactly then.
    let completed_at = millis(&completed["completedAt"]);
    let next_at = millis(&updates[0]["payload"]["nextExecutionAt"]);
    let gap = next_at - completed_at;
    assert!(
        (1_000..2_000).contains(&gap),
        "next execution {gap} ms after completion"
    );
    assert_eq!(second_id, format!("rt-stretch@{next_at}"));

    // Each run's tool calls act on the workspace, with ids derived from the execution.
    let tasks = host.query("ws-every", "tasks", json!({})).await;
    let tasks = tasks["tasks"].as_array().unwrap();
    let all = all_events(&host, "ws-every").await;
    let executions = of_type(&all, "v1.TaskExecutionCompleted").len();
    assert!(tasks.len() >= 2 && tasks.len() == executions, "{tasks:?}");
    assert_ne!(tasks[0]["id"], tasks[1]["id"]);
    assert!(tasks.iter().all(|t| t["title"] == "Stretch"));

    let listed = host
        .query(
            "ws-every",
            "executions",
            json!({"recurringTaskId": "rt-stretch"}),
        )
        .await;
    let listed = listed["executions"].as_array().unwrap();
    let oldest = listed.last().unwrap();
    assert_eq!(oldest["id"], first_id);
    assert_eq!(oldest["status"], "completed");
    assert_eq!(oldest["output"], "Added a stretch task.");
    assert_eq!(oldest["iterations"], 2);
    let task = recurring_task(&host, "ws-every", "rt-stretch").await;
    assert_eq!(task["enabled"], false);
    assert!(task["lastExecutionAt"].is_string(), "{task}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_recurring_task_runs_on_its_expression_until_deleted() {
    let rules = json!({"rules": [], "defaultResponse": "Nothing to report."});
    let host = agent_host(stub(rules)).await;
    host.add_store("ws-cron", "agent", &[]).await;
    host.append(
        "ws-cron",
        "v1.RecurringTaskCreated",
        json!({"id": "rt-tick", "name": "Tick", "prompt": "Report", "cron": "*/1 * * * * *"}),
    )
    .await;
    let events = wait_for_events(&host, "ws-cron", |events| {
        !of_type(events, "v1.TaskExecutionCompleted").is_empty()
    })
    .await;
    host.append(
        "ws-cron",
        "v1.RecurringTaskDeleted",
        json!({"id": "rt-tick"}),
    )
    .await;
    host.settle("ws-cron").await;
    assert!(schedules(&host, "ws-cron").await.is_empty());
    let listed = host.query("ws-cron", "recurring-tasks", json!({})).await;
    assert_eq!(listed["recurringTasks"], json!([]));

    let started = of_type(&events, "v1.TaskExecutionStarted")[0];
    let scheduled_for: i64 = started["payload"]["id"]
        .as_str()
        .unwrap()
        .strip_prefix("rt-tick@")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        scheduled_for % 1_000,
        0,
        "on a whole second, as the expression says"
    );
    let completed = of_type(&events, "v1.TaskExecutionCompleted")[0];
    assert_eq!(completed["payload"]["output"], "Nothing to report.");
    let update = of_type(&events, "v1.RecurringTaskUpdated")[0];
    let next_at = millis(&update["payload"]["nextExecutionAt"]);
    assert_eq!(next_at % 1_000, 0, "{update}");
    assert!(
        next_at > millis(&completed["payload"]["completedAt"]),
        "{update}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurring_task_whose_llm_fails_reports_a_failed_execution() {
    let server = FakeLlm::start(|_| Reply::error(401, "invalid api key")).await;
    let host = agent_host(openai(&server, |_| {})).await;
    host.add_store("ws-fail", "agent", &[]).await;
    host.append(
        "ws-fail",
        "v1.RecurringTaskCreated",
        json!({"id": "rt-fail", "name": "Fail", "prompt": "Do something", "cron": "*/1 * * * * *"}),
    )
    .await;
    let events = wait_for_events(&host, "ws-fail", |events| {
        !of_type(events, "v1.TaskExecutionFailed").is_empty()
    })
    .await;
    host.append(
        "ws-fail",
        "v1.RecurringTaskDisabled",
        json!({"id": "rt-fail"}),
    )
    .await;
    host.settle("ws-fail").await;

    let failed = of_type(&events, "v1.TaskExecutionFailed")[0];
    let id = failed["payload"]["id"].as_str().unwrap();
    let kinds: Vec<&str> = execution_events(&events, id)
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["v1.TaskExecutionStarted", "v1.TaskExecutionFailed"]);
    let error = failed["payload"]["error"].as_str().unwrap();
    assert!(error.starts_with("llm error auth"), "{error}");
    assert!(failed["payload"]["failedAt"].is_string());
    assert!(
        of_type(&events, "v1.RecurringTaskUpdated")
            .iter()
            .any(|e| e["seq"].as_u64() == Some(failed["seq"].as_u64().unwrap() + 1)),
        "the next execution time follows a failure too"
    );
    assert!(of_type(&events, "v1.TaskExecutionCompleted").is_empty());

    let listed = host.query("ws-fail", "executions", json!({})).await;
    let oldest = listed["executions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(oldest["status"], "failed");
    assert_eq!(oldest["llmMetadata"]["errorClass"], "auth");
    // For the host the run itself succeeded: the failure is the plugin's recorded outcome.
    let (_, tasks) = host.get("/v1/stores/ws-fail/tasks").await;
    assert_eq!(
        tasks["executions"].as_array().unwrap().last().unwrap()["status"],
        "completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_explain_bad_arguments() {
    let host = agent_host(stub(json!({}))).await;
    host.add_store("ws-q", "agent", &[]).await;
    let (status, body) = host.get("/v1/stores/ws-q/query/messages").await;
    assert!(status >= 400, "{status} {body}");
    assert!(body.to_string().contains("conversationId"), "{body}");
    let (status, body) = host.get("/v1/stores/ws-q/query/nope").await;
    assert!(status >= 400, "{status} {body}");
    assert!(body.to_string().contains("recurring-tasks"), "{body}");
    // Before any event, every query answers an empty list.
    for (name, key) in [
        ("tasks", "tasks"),
        ("conversations", "conversations"),
        ("recurring-tasks", "recurringTasks"),
        ("executions", "executions"),
    ] {
        let answer = host.query("ws-q", name, json!({})).await;
        assert_eq!(answer[key], json!([]), "{name}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notes_agent_example_deploys_over_http_and_uses_its_tools() {
    // The steps of examples/notes-agent/README.md, with the rules file it ships.
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/notes-agent/llm-rules.json");
    let provider = StubProvider::from_file(&rules).expect("the example's rules load");
    let host = TestHost::start_with(TestHostOptions {
        llm: Some(backend(Arc::new(provider))),
        ..TestHostOptions::default()
    })
    .await;
    let wasm = std::fs::read(programs::NOTES_AGENT_EXAMPLE).unwrap();
    let (status, body) = host.upload_plugin("notes-agent", wasm).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/my-notes",
            Some(json!({"plugin": "notes-agent"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    for (id, question) in [
        ("q1", "remember that the keys are in the drawer"),
        ("q2", "what do you remember?"),
    ] {
        host.append(
            "my-notes",
            "note.ask",
            json!({"id": id, "question": question}),
        )
        .await;
    }
    host.settle("my-notes").await;

    let answers = host.query("my-notes", "answers", json!({})).await;
    assert_eq!(
        answers["answers"],
        json!([
            {"id": "q1", "question": "remember that the keys are in the drawer",
             "answer": "Noted: the keys are in the drawer."},
            {"id": "q2", "question": "what do you remember?",
             "answer": "Here is what I remember:\n- the keys are in the drawer"},
        ])
    );
    let notes = host.query("my-notes", "notes", json!({})).await;
    assert_eq!(
        notes,
        json!({"notes": [{"id": "q1-0", "text": "the keys are in the drawer"}]})
    );
    let events = all_events(&host, "my-notes").await;
    let answered = of_type(&events, "note.answered");
    assert_eq!(answered.len(), 2);
    assert_eq!(answered[0]["source"], "plugin");
}

/// The host's schedules of `store` (`GET /v1/stores/{id}/tasks`).
async fn schedules(host: &TestHost, store: &str) -> Vec<Value> {
    let (status, body) = host.get(&format!("/v1/stores/{store}/tasks")).await;
    assert_eq!(status, 200, "{body}");
    body["schedules"].as_array().expect("schedules").clone()
}

/// The recurring task `id` as the `recurring-tasks` query answers it.
async fn recurring_task(host: &TestHost, store: &str, id: &str) -> Value {
    let listed = host.query(store, "recurring-tasks", json!({})).await;
    listed["recurringTasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("no recurring task {id}: {listed}"))
        .clone()
}

/// An ISO 8601 time as milliseconds since the epoch.
fn millis(time: &Value) -> i64 {
    let text = time
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {time}"));
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|err| panic!("{text}: {err}"))
        .timestamp_millis()
}

/// A local HTTP server speaking the OpenAI chat-completions protocol, answering each request
/// by a script: the LLM vendor's side of the boundary, on 127.0.0.1.
mod fake_llm {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};

    /// One request, as the script sees it.
    #[derive(Debug)]
    pub struct Request {
        /// 0 for the first request the server got, 1 for the second...
        pub index: usize,
        pub body: Value,
    }

    impl Request {
        /// The content of the last user message.
        pub fn last_user_text(&self) -> String {
            self.messages()
                .iter()
                .rev()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default()
                .to_owned()
        }

        /// The contents of the tool results after the last user message.
        pub fn tool_results(&self) -> Vec<String> {
            let messages = self.messages();
            let start = messages
                .iter()
                .rposition(|m| m["role"] == "user")
                .map_or(0, |i| i + 1);
            messages[start..]
                .iter()
                .filter(|m| m["role"] == "tool")
                .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
                .collect()
        }

        fn messages(&self) -> Vec<Value> {
            self.body["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }
    }

    /// What the server answers.
    #[derive(Debug, Clone)]
    pub struct Reply {
        status: u16,
        body: String,
        delay: Duration,
        headers: Vec<(&'static str, &'static str)>,
    }

    impl Reply {
        /// A final answer in text.
        pub fn text(content: &str) -> Self {
            Self::completion(json!({"role": "assistant", "content": content}), "stop")
        }

        /// A text answer the model stopped for `finish_reason` (`"length"`: cut at the token
        /// limit).
        pub fn finished(content: &str, finish_reason: &str) -> Self {
            Self::completion(
                json!({"role": "assistant", "content": content}),
                finish_reason,
            )
        }

        /// An answer calling `calls` (name, arguments) in order.
        pub fn tool_calls(calls: &[(&str, Value)]) -> Self {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (name, arguments))| {
                    json!({"id": format!("call_{i}"), "type": "function",
                           "function": {"name": name, "arguments": arguments.to_string()}})
                })
                .collect();
            Self::completion(
                json!({"role": "assistant", "content": null, "tool_calls": calls}),
                "tool_calls",
            )
        }

        /// An OpenAI-style error answer.
        pub fn error(status: u16, message: &str) -> Self {
            let body = json!({"error": {"message": message, "type": "test_error"}});
            Self::raw(status, &body.to_string())
        }

        /// Any status and body.
        pub fn raw(status: u16, body: &str) -> Self {
            Self {
                status,
                body: body.to_owned(),
                delay: Duration::ZERO,
                headers: Vec::new(),
            }
        }

        /// The same answer, sent after `delay`.
        pub fn after(self, delay: Duration) -> Self {
            Self { delay, ..self }
        }

        /// The same answer, with the header `name: value` too.
        pub fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.push((name, value));
            self
        }

        fn completion(message: Value, finish_reason: &str) -> Self {
            let body = json!({
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": "fake-model",
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            });
            Self::raw(200, &body.to_string())
        }
    }

    type Script = dyn Fn(&Request) -> Reply + Send + Sync;

    struct ServerState {
        script: Box<Script>,
        requests: Mutex<Vec<Value>>,
        /// Requests being answered after a delay.
        slow_in_flight: AtomicUsize,
        /// Whether an immediate answer was asked for while a delayed one was pending.
        fast_while_slow: AtomicBool,
    }

    /// The running server; it stops when dropped.
    pub struct FakeLlm {
        /// `http://127.0.0.1:PORT/v1`.
        pub base_url: String,
        state: Arc<ServerState>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeLlm {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FakeLlm {
        /// Serves `script` on a port-0 listener.
        pub async fn start(script: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
            let state = Arc::new(ServerState {
                script: Box::new(script),
                requests: Mutex::new(Vec::new()),
                slow_in_flight: AtomicUsize::new(0),
                fast_while_slow: AtomicBool::new(false),
            });
            let app = Router::new()
                .fallback(handle)
                .with_state(Arc::clone(&state));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let task = tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            });
            Self {
                base_url: format!("http://{address}/v1"),
                state,
                task,
            }
        }

        /// The bodies of the requests received so far.
        pub fn requests(&self) -> Vec<Value> {
            self.state.requests.lock().unwrap().clone()
        }

        /// Waits (with a generous safety net) until a delayed answer is pending.
        pub async fn wait_for_slow_request(&self) {
            let wait = async {
                while self.state.slow_in_flight.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(30), wait)
                .await
                .expect("a slow request arrives");
        }

        /// Whether an immediate answer was asked for while a delayed one was pending.
        pub fn fast_arrived_while_slow_in_flight(&self) -> bool {
            self.state.fast_while_slow.load(Ordering::SeqCst)
        }
    }

    /// Counts a delayed answer as pending until dropped (also when the client gives up).
    struct Pending<'a>(&'a AtomicUsize);

    impl Drop for Pending<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    async fn handle(State(state): State<Arc<ServerState>>, body: Bytes) -> Response {
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let index = {
            let mut requests = state.requests.lock().unwrap();
            requests.push(body.clone());
            requests.len() - 1
        };
        let reply = (state.script)(&Request { index, body });
        let _pending = if reply.delay.is_zero() {
            if state.slow_in_flight.load(Ordering::SeqCst) > 0 {
                state.fast_while_slow.store(true, Ordering::SeqCst);
            }
            None
        } else {
            state.slow_in_flight.fetch_add(1, Ordering::SeqCst);
            let pending = Pending(&state.slow_in_flight);
            tokio::time::sleep(reply.delay).await;
            Some(pending)
        };
        let status = StatusCode::from_u16(reply.status).unwrap();
        let mut response =
            (status, [("content-type", "application/json")], reply.body).into_response();
        for (name, value) in reply.headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        response
    }
}

/// The host's work for an LLM call is the store's CPU time: an offline provider with 2,000
/// rules to match against a 55 KB message takes far more of the host than a 100 ms
/// `cpu_ms_per_call`, and the call fails as `cpu_time` (a dead letter), while the same call
/// on a store with room for it is answered. Before, that work was charged to no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_work_of_an_llm_call_is_the_stores_cpu_time() {
    let rules: Vec<Value> = (0..2_000)
        .map(|i| json!({"match": format!("never-{i}"), "matchType": "includes", "response": "no"}))
        .collect();
    let host = agent_host(stub(
        json!({"rules": rules, "defaultResponse": "matched nothing"}),
    ))
    .await;
    let narrow = Quotas {
        cpu_ms_per_call: 100,
        ..Quotas::default()
    };
    host.add_store_with("ws-narrow", "agent", &[], narrow).await;
    let wide = Quotas {
        cpu_ms_per_call: 20_000,
        wall_ms_per_call: 60_000,
        ..Quotas::default()
    };
    host.add_store_with("ws-wide", "agent", &[], wide).await;
    let long = "a question ".repeat(5_000);
    chat(&host, "ws-narrow", "m1", "user", &long).await;
    chat(&host, "ws-wide", "m1", "user", &long).await;
    host.settle("ws-narrow").await;
    host.settle("ws-wide").await;

    let (_, letters) = host.get("/v1/stores/ws-narrow/dead-letters").await;
    assert_eq!(letters["deadLetters"][0]["reason"], "cpu_time", "{letters}");
    let events = all_events(&host, "ws-wide").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(received["payload"]["message"], "matched nothing");
    assert_eq!(completed["payload"]["success"], true);
}

/// A long conversation is sent to the model as its newest part that fits: after twenty
/// messages of 60 KB (more than the 1 MiB the host lets a request hold, taken together), the
/// conversation is still answered. Before, every later message got "The language model
/// refused the request" until fifty newer ones had pushed the long ones out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_is_sent_as_its_newest_part_that_fits() {
    let rules = json!({
        "rules": [
            {"match": "hello", "matchType": "exact", "response": "Hello!"},
            // What the model sees of a message cut for being too long.
            {"match": "cut here: (\\d+) more bytes", "matchType": "regex", "response": "cut ${1}"},
        ],
        "defaultResponse": "Noted."
    });
    let host = agent_host_with(
        stub(rules),
        TestHostOptions {
            max_body_bytes: 2 << 20,
            ..TestHostOptions::default()
        },
    )
    .await;
    host.add_store("ws-long", "agent", &[]).await;
    for i in 0..20 {
        let text = format!("{i} {}", "lorem ipsum ".repeat(5_000));
        chat(&host, "ws-long", &format!("big-{i}"), "user", &text).await;
    }
    chat(&host, "ws-long", "after", "user", "hello").await;
    host.settle("ws-long").await;

    let events = all_events(&host, "ws-long").await;
    for i in 0..20 {
        let (_, received, completed) = one_response(&events, &format!("big-{i}"));
        assert_eq!(completed["payload"]["success"], true, "{i}: {received}");
    }
    let (_, received, completed) = one_response(&events, "after");
    assert_eq!(received["payload"]["message"], "Hello!", "{received}");
    assert_eq!(completed["payload"]["success"], true);

    // One message too long for a request on its own is cut, not refused.
    let huge = "x".repeat(1_100_000);
    chat(&host, "ws-long", "huge", "user", &huge).await;
    host.settle("ws-long").await;
    let events = all_events(&host, "ws-long").await;
    let (_, received, completed) = one_response(&events, "huge");
    assert_eq!(completed["payload"]["success"], true, "{received}");
    let reply = received["payload"]["message"].as_str().unwrap();
    let left_out: usize = reply.strip_prefix("cut ").unwrap().parse().unwrap();
    assert!(
        (1_000_000..1_100_000).contains(&left_out),
        "most of it left out: {reply}"
    );
    let (_, letters) = host.get("/v1/stores/ws-long/dead-letters").await;
    assert_eq!(letters["deadLetters"], json!([]), "{letters}");
}

/// A tool's answer is bounded: `list_tasks` over many tasks answers the first ones that fit,
/// with how many more there are and the offset to read on from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_tasks_answers_a_bounded_page_saying_more_exist() {
    let rules = json!({
        "rules": [{
            "match": "list",
            "matchType": "includes",
            "toolCalls": [{"type": "function", "function": {"name": "list_tasks", "arguments": "{}"}}],
            "response": "{{toolResults}}"
        }]
    });
    let host = agent_host(stub(rules)).await;
    host.add_store("ws-many", "agent", &[]).await;
    for batch in 0..4 {
        let events: Vec<Value> = (0..50)
            .map(|i| {
                let n = batch * 50 + i;
                json!({"type": "v2.TaskCreated", "payload": {
                    "id": format!("t{n:03}"),
                    "title": format!("Task {n:03} {}", "with a long title ".repeat(10)),
                }})
            })
            .collect();
        let (status, body) = host
            .post("/v1/stores/ws-many/events", json!({"events": events}))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    chat(&host, "ws-many", "m1", "user", "list my tasks").await;
    host.settle("ws-many").await;

    let events = all_events(&host, "ws-many").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(completed["payload"]["success"], true);
    let text = received["payload"]["message"].as_str().unwrap();
    assert!(text.len() <= 16 * 1024, "{} bytes", text.len());
    let page: Value = serde_json::from_str(text).expect("a whole JSON answer, not a cut one");
    let shown = page["tasks"].as_array().unwrap().len();
    assert!(shown > 10 && shown < 200, "{shown} shown");
    assert_eq!(page["count"], 200);
    assert_eq!(page["more"], 200 - shown);
    assert_eq!(page["nextOffset"], shown);
    assert_eq!(page["tasks"][0]["id"], "t000");
    assert!(page["note"].as_str().unwrap().contains("offset"), "{page}");
}

/// A reply longer than an event may hold (1 MiB) is cut with a marker, stored and emitted:
/// the message gets its one `LLMResponseCompleted`. Before, the emit failed, the message was
/// retried with new model calls and dead-lettered, with no response at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_long_for_an_event_is_cut_and_the_message_still_completes() {
    let host = agent_host(stub(
        json!({"rules": [], "defaultResponse": "y".repeat(1_100_000)}),
    ))
    .await;
    host.add_store("ws-wordy", "agent", &[]).await;
    chat(&host, "ws-wordy", "m1", "user", "tell me everything").await;
    host.settle("ws-wordy").await;

    let (_, letters) = host.get("/v1/stores/ws-wordy/dead-letters").await;
    assert_eq!(letters["deadLetters"], json!([]), "{letters}");
    let events = all_events(&host, "ws-wordy").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(completed["payload"]["success"], true);
    let reply = received["payload"]["message"].as_str().unwrap();
    assert!(reply.len() <= 128 * 1024, "{} bytes", reply.len());
    assert!(reply.starts_with("yyyy"), "{}", &reply[..20]);
    assert!(
        reply.ends_with("more bytes not shown]"),
        "{}",
        &reply[reply.len() - 80..]
    );
    let messages = host
        .query("ws-wordy", "messages", json!({"conversationId": "conv-1"}))
        .await;
    assert_eq!(
        messages["messages"][1]["message"], reply,
        "stored as emitted"
    );
}

/// The metadata trace stays bounded however long the model's tool-call arguments are: past a
/// budget a call is traced with the length of its arguments, and the reply (here the polite
/// one, as the conversation outgrew what a request may hold) is emitted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_tool_call_arguments_are_traced_by_their_length() {
    let server = FakeLlm::start(|request| {
        let padding = ["a", "b", "c"][request.index.min(2)].repeat(600_000);
        Reply::tool_calls(&[("list_tasks", json!({"padding": padding}))])
    })
    .await;
    let host = agent_host(openai(&server, |_| {})).await;
    host.add_store("ws-args", "agent", &[]).await;
    chat(&host, "ws-args", "m1", "user", "go").await;
    host.settle("ws-args").await;

    let (_, letters) = host.get("/v1/stores/ws-args/dead-letters").await;
    assert_eq!(letters["deadLetters"], json!([]), "{letters}");
    let events = all_events(&host, "ws-args").await;
    let (_, received, completed) = one_response(&events, "m1");
    assert_eq!(completed["payload"]["success"], false);
    let calls = received["payload"]["llmMetadata"]["toolCalls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in calls {
        assert_eq!(call["name"], "list_tasks");
        assert_eq!(call["ok"], false, "an unknown argument is refused");
        assert!(call["argumentsBytes"].as_u64().unwrap() > 600_000, "{call}");
        assert_eq!(call.get("arguments"), None);
    }
}

/// A recurring task's run may not create recurring tasks: a prompt that asks for one (here
/// the demo rules' "remind me to stretch every hour", run every second) would otherwise add
/// a schedule on every run, without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurring_run_does_not_create_more_recurring_tasks() {
    let host = agent_host(backend(Arc::new(StubProvider::demo()))).await;
    host.add_store("ws-breed", "agent", &[]).await;
    host.append(
        "ws-breed",
        "v1.RecurringTaskCreated",
        json!({"id": "rt-stretch", "name": "Stretch", "prompt": "remind me to stretch every hour",
               "intervalHours": 1.0 / 3600.0}),
    )
    .await;
    wait_for_events(&host, "ws-breed", |events| {
        of_type(events, "v1.TaskExecutionCompleted").len() >= 2
    })
    .await;
    host.append(
        "ws-breed",
        "v1.RecurringTaskDisabled",
        json!({"id": "rt-stretch"}),
    )
    .await;
    host.settle("ws-breed").await;

    let recurring = host.query("ws-breed", "recurring-tasks", json!({})).await;
    let recurring = recurring["recurringTasks"].as_array().unwrap();
    assert_eq!(recurring.len(), 1, "{recurring:#?}");
    let events = all_events(&host, "ws-breed").await;
    assert_eq!(
        of_type(&events, "v1.RecurringTaskCreated").len(),
        1,
        "only the client's"
    );
    let executions = host
        .query(
            "ws-breed",
            "executions",
            json!({"recurringTaskId": "rt-stretch"}),
        )
        .await;
    let call = &executions["executions"][0]["llmMetadata"]["toolCalls"][0];
    assert_eq!(call["name"], "create_recurring_task");
    assert_eq!(call["ok"], false, "refused in a run: {call}");

    // In a chat the tool is there, but not for more than once a minute.
    chat(
        &host,
        "ws-breed",
        "m1",
        "user",
        "remind me to stretch every hour",
    )
    .await;
    host.settle("ws-breed").await;
    let recurring = host.query("ws-breed", "recurring-tasks", json!({})).await;
    assert_eq!(recurring["recurringTasks"].as_array().unwrap().len(), 2);
}

/// The tool refuses a schedule more often than once a minute, saying so to the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_recurring_task_refuses_a_schedule_under_a_minute() {
    let rules = json!({
        "rules": [{
            "match": "every second",
            "matchType": "includes",
            "toolCalls": [{"type": "function", "function": {"name": "create_recurring_task",
                "arguments": "{\"name\":\"Tick\",\"prompt\":\"Tick\",\"intervalHours\":0.005}"}}],
            "response": "{{toolResults}}"
        }]
    });
    let host = agent_host(stub(rules)).await;
    host.add_store("ws-tick", "agent", &[]).await;
    chat(&host, "ws-tick", "m1", "user", "tick every second").await;
    host.settle("ws-tick").await;
    let events = all_events(&host, "ws-tick").await;
    let (_, received, _) = one_response(&events, "m1");
    let reply = received["payload"]["message"].as_str().unwrap();
    assert!(reply.contains("at most once a minute"), "{reply}");
    let recurring = host.query("ws-tick", "recurring-tasks", json!({})).await;
    assert_eq!(recurring["recurringTasks"], json!([]));
}

/// A system message after a request is answered as itself: the demo rules do not match the
/// request before it again and create its task a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_message_does_not_replay_the_previous_request() {
    let host = agent_host(backend(Arc::new(StubProvider::demo()))).await;
    host.add_store("ws-note", "agent", &[]).await;
    chat(
        &host,
        "ws-note",
        "u1",
        "user",
        "create a task to water the plants",
    )
    .await;
    host.settle("ws-note").await;
    chat(&host, "ws-note", "s1", "system", "note").await;
    host.settle("ws-note").await;

    let tasks = host.query("ws-note", "tasks", json!({})).await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1, "{tasks}");
    let events = all_events(&host, "ws-note").await;
    let (_, received, completed) = one_response(&events, "s1");
    assert_eq!(completed["payload"]["success"], true);
    assert_eq!(received["payload"]["llmMetadata"]["toolCalls"], json!([]));
}
