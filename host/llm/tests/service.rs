//! The host's limits around a provider: per-store calls per minute and the host-wide cap on
//! calls in flight, with the real HTTP provider against a local chat-completions server.

mod support;

use std::sync::Arc;
use std::time::Duration;

use storehost_llm::{
    ChatRequest, ErrorClass, LlmLimits, LlmService, MaxTokensField, Message, OpenAiConfig,
    OpenAiProvider, StubProvider,
};
use support::{FakeLlm, Reply, text};

fn provider(server: &FakeLlm) -> Arc<OpenAiProvider> {
    let config = OpenAiConfig {
        base_url: server.base_url.clone(),
        model: "test-model".to_owned(),
        api_key_env: None,
        timeout_ms: 20_000,
        deadline_ms: 30_000,
        max_retries: 0,
        backoff_base_ms: 1,
        backoff_max_ms: 1,
        max_tokens_field: MaxTokensField::MaxTokens,
    };
    Arc::new(OpenAiProvider::with_env(config, |_| None).unwrap())
}

fn hello() -> ChatRequest {
    ChatRequest {
        messages: vec![Message::user("hello")],
        ..ChatRequest::default()
    }
}

/// Awaits `future` under a generous safety net.
async fn settle<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("finished well before the safety net")
}

#[tokio::test]
async fn a_store_over_its_calls_per_minute_is_rate_limited_while_another_store_gets_through() {
    let server = FakeLlm::start(vec![Reply::Json(200, text("ok"))]).await;
    let service = LlmService::new(provider(&server), LlmLimits::default());
    service.set_store_limit("store-a", 2);

    for _ in 0..2 {
        settle(service.complete("store-a", hello())).await.unwrap();
    }
    let err = settle(service.complete("store-a", hello()))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::RateLimited);
    assert!(err.message.contains("store-a"), "{}", err.message);
    assert!(
        err.message.contains("llm_calls_per_minute"),
        "{}",
        err.message
    );
    assert_eq!(
        server.count(),
        2,
        "the refused call never reached the server"
    );

    let other = settle(service.complete("store-b", hello())).await.unwrap();
    assert_eq!(other.content.as_deref(), Some("ok"));
    assert_eq!(service.store_limit("store-b"), 60, "the default quota");
    assert_eq!(server.count(), 3);
}

#[tokio::test]
async fn a_store_limit_changes_live_and_zero_denies_every_call() {
    let service = LlmService::new(Arc::new(StubProvider::demo()), LlmLimits::default());
    service.set_store_limit("store-a", 1);
    settle(service.complete("store-a", hello())).await.unwrap();
    let refused = settle(service.complete("store-a", hello()))
        .await
        .unwrap_err();
    assert_eq!(refused.class, ErrorClass::RateLimited);

    service.set_store_limit("store-a", 1);
    let still = settle(service.complete("store-a", hello()))
        .await
        .unwrap_err();
    assert_eq!(
        still.class,
        ErrorClass::RateLimited,
        "the same quota keeps its usage"
    );

    service.set_store_limit("store-a", 10);
    settle(service.complete("store-a", hello())).await.unwrap();
    assert_eq!(service.store_limit("store-a"), 10);

    service.set_store_limit("store-a", 0);
    let denied = settle(service.complete("store-a", hello()))
        .await
        .unwrap_err();
    assert_eq!(denied.class, ErrorClass::RateLimited);
    assert!(
        denied.message.contains("llm_calls_per_minute = 0"),
        "{}",
        denied.message
    );

    service.set_default_limit(1);
    settle(service.complete("store-new", hello()))
        .await
        .unwrap();
    let over_default = settle(service.complete("store-new", hello()))
        .await
        .unwrap_err();
    assert_eq!(over_default.class, ErrorClass::RateLimited);
    service.remove_store("store-new");
    assert_eq!(service.store_limit("store-new"), 1);
}

#[tokio::test]
async fn the_host_wide_cap_refuses_a_call_when_no_slot_frees_in_time() {
    let server = FakeLlm::start(vec![Reply::Gated(text("held"))]).await;
    let service = LlmService::new(
        provider(&server),
        LlmLimits {
            max_concurrent: 1,
            queue_wait_ms: 50,
            default_calls_per_minute: 100,
            ..LlmLimits::default()
        },
    );
    let held = tokio::spawn(service.complete("store-a", hello()));
    server.wait_for_requests(1).await;
    assert_eq!(service.in_flight(), 1);

    let err = settle(service.complete("store-b", hello()))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::RateLimited);
    assert!(err.message.contains("max_concurrent"), "{}", err.message);
    assert_eq!(
        server.count(),
        1,
        "the refused call never reached the server"
    );

    server.release(1);
    let answer = settle(held).await.unwrap().unwrap();
    assert_eq!(answer.content.as_deref(), Some("held"));
    assert_eq!(service.in_flight(), 0);
}

#[tokio::test]
async fn calls_beyond_the_cap_wait_for_a_slot_and_never_overlap() {
    let server = FakeLlm::start(vec![Reply::Gated(text("done"))]).await;
    let service = LlmService::new(
        provider(&server),
        LlmLimits {
            max_concurrent: 2,
            queue_wait_ms: 30_000,
            default_calls_per_minute: 100,
            ..LlmLimits::default()
        },
    );
    let calls: Vec<_> = (0..5)
        .map(|i| tokio::spawn(service.complete(&format!("store-{i}"), hello())))
        .collect();
    server.wait_for_requests(2).await;
    server.release(5);
    for call in calls {
        let answer = settle(call).await.unwrap().unwrap();
        assert_eq!(answer.content.as_deref(), Some("done"));
    }
    assert_eq!(server.count(), 5);
    assert_eq!(
        server.max_in_flight(),
        2,
        "never more than max_concurrent at the server"
    );
}

/// A plugin chooses how long a completion may be, and a completion costs (and takes) more the
/// longer it is: the host's `max_tokens` caps what it asks for, and asks for that when it
/// names no limit.
#[tokio::test]
async fn a_completion_asks_for_at_most_the_hosts_max_tokens() {
    let server = FakeLlm::start(vec![Reply::Json(200, text("ok"))]).await;
    let service = LlmService::new(
        provider(&server),
        LlmLimits {
            max_tokens: 500,
            ..LlmLimits::default()
        },
    );
    for asked in [None, Some(100_000), Some(200)] {
        let request = ChatRequest {
            max_tokens: asked,
            ..hello()
        };
        settle(service.complete("store-a", request)).await.unwrap();
    }
    let sent: Vec<_> = server
        .received()
        .iter()
        .map(|request| request.body["max_tokens"].clone())
        .collect();
    assert_eq!(sent, [500, 500, 200]);
}
