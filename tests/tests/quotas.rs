//! Quotas beyond a single call: ingress rate, queue depth, the circuit breaker, the CPU budget
//! per minute, fair sharing of invocation slots, live quota changes and host capacity.

use std::time::Duration;

use serde_json::{Value, json};
use storehost_store::{Quotas, RetryPolicy};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_over_the_rate_gets_429_with_retry_after() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        events_per_second: 1,
        burst: 3,
        ..Quotas::default()
    };
    host.add_store_with("rated", "writer", &[], quotas).await;
    host.add_store("unrated", "writer", &[]).await;

    let three: Vec<_> = (0..3)
        .map(|i| json!({"type": "note", "payload": {"i": i}}))
        .collect();
    let (status, body) = host
        .post("/v1/stores/rated/events", json!({"events": three}))
        .await;
    assert_eq!(status, 202, "{body}");
    let sent = std::time::Instant::now();
    let response = host
        .client
        .post(format!("{}/v1/stores/rated/events", host.url))
        .bearer_auth(TOKEN)
        .json(&json!({"type": "note", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    // The refusal waits until the store could take an event again (~1 s at 1 per second), so
    // a client retrying at once sends at the store's rate.
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "refused after {:?}",
        sent.elapsed()
    );
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("1 events per second"), "{body}");
    // The message names the wait `Retry-After` does, in its whole seconds (it said "retry in
    // 1 ms": what was left of the wait the refusal had already made).
    assert!(
        message.contains(&format!("retry in {retry_after} s")),
        "{message} (Retry-After: {retry_after})"
    );

    // A batch larger than the burst can never pass (and no wait is offered); other stores
    // are not limited.
    let ten: Vec<_> = (0..10)
        .map(|i| json!({"type": "note", "payload": {"i": i}}))
        .collect();
    let (status, body) = host
        .post("/v1/stores/rated/events", json!({"events": ten}))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "batch_over_burst");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 3 events at once"),
        "{body}"
    );
    let (status, _) = host
        .post("/v1/stores/unrated/events", json!({"events": ten}))
        .await;
    assert_eq!(status, 202);
    host.settle("rated").await;
    let (_, store) = host.get("/v1/stores/rated").await;
    assert_eq!(store["head"], 3, "refused events were not written");
}

/// Bytes count as well as events: a store's `ingress_bytes_per_second` (with a burst of twice
/// that, at least 1 MiB) refuses large events that its event rate alone would let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_over_the_byte_rate_gets_429_and_a_body_over_its_burst_413() {
    let host = TestHost::start_with(TestHostOptions {
        max_body_bytes: 4 << 20,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        ingress_bytes_per_second: 64 << 10,
        ..Quotas::default()
    };
    host.add_store_with("narrow", "writer", &[], quotas).await;
    host.add_store("wide", "writer", &[]).await;
    let events = |count: usize, bytes: usize| {
        let events: Vec<_> = (0..count)
            .map(|i| json!({"type": "note", "payload": format!("{i}{}", "x".repeat(bytes))}))
            .collect();
        json!({ "events": events })
    };

    // 16 events of 60,000 bytes: within the 1 MiB burst.
    let (status, body) = host
        .post("/v1/stores/narrow/events", events(16, 60_000))
        .await;
    assert_eq!(status, 202, "{body}");
    // The burst is spent; 200 KB more wait for the rate (64 KiB a second).
    let response = host
        .client
        .post(format!("{}/v1/stores/narrow/events", host.url))
        .bearer_auth(TOKEN)
        .json(&events(1, 200_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("65536 bytes of events per second (burst 1048576 bytes)"),
        "{message}"
    );

    // More than the burst at once never passes, and says what to do; another store's quota
    // (16 MiB a second by default) takes it.
    let (status, body) = host
        .post("/v1/stores/narrow/events", events(25, 60_000))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "batch_over_burst");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("at most 1048576 bytes of events at once")
            && message.contains("raise the store's ingress_bytes_per_second"),
        "{message}"
    );
    let (status, body) = host
        .post("/v1/stores/wide/events", events(25, 60_000))
        .await;
    assert_eq!(status, 202, "{body}");
    host.settle("narrow").await;
    let (_, store) = host.get("/v1/stores/narrow").await;
    assert_eq!(store["head"], 16, "refused events were not written");
}

/// The byte rate counts bytes, not requests, and takes nothing from requests refused anyway:
/// two thousand tiny requests pass a 64 KiB/s rate's 1 MiB burst (each was charged a whole
/// KiB), and neither a batch over the event burst nor a full queue's refusals use up the
/// bytes the next accepted request needs (helper 35).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_rate_counts_bytes_and_nothing_refused_anyway() {
    let host = TestHost::start_with(TestHostOptions {
        max_body_bytes: 4 << 20,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    let narrow = Quotas {
        ingress_bytes_per_second: 64 << 10,
        events_per_second: 100_000,
        burst: 100_000,
        ..Quotas::default()
    };
    host.add_store_with("tiny", "writer", &[], narrow.clone())
        .await;
    for i in 0..2_000 {
        let (status, body) = host
            .post(
                "/v1/stores/tiny/events",
                json!({"type": "note", "payload": i}),
            )
            .await;
        assert_eq!(status, 202, "request {i}: {body}");
    }

    let big = |bytes: usize| json!({"type": "note", "payload": "x".repeat(bytes)});
    let few = Quotas {
        events_per_second: 1,
        burst: 7,
        max_pending_events: 8,
        ..narrow
    };
    host.add_store_with("refused", "writer", &[], few).await;
    // Eight events of 120 KB: over the event burst, refused at once.
    let eight: Vec<_> = (0..8).map(|_| big(120_000)).collect();
    let (status, body) = host
        .post("/v1/stores/refused/events", json!({"events": eight}))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "batch_over_burst");
    // Paused with its queue full, its refusals take nothing either.
    let (status, _) = host.post("/v1/stores/refused/pause", json!({})).await;
    assert_eq!(status, 200);
    host.wait_for_status("refused", |s| s["state"] == "paused")
        .await;
    let five: Vec<_> = (0..5)
        .map(|i| json!({"type": "note", "payload": i}))
        .collect();
    let (status, body) = host
        .post("/v1/stores/refused/events", json!({"events": five}))
        .await;
    assert_eq!(status, 202, "{body}");
    for _ in 0..5 {
        let four: Vec<_> = (0..4).map(|_| big(150_000)).collect();
        let (status, body) = host
            .post("/v1/stores/refused/events", json!({"events": four}))
            .await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "queue_full");
    }
    // The whole byte burst is still there (and two of the event burst): two events of 450 KB
    // pass.
    let (status, body) = host
        .post(
            "/v1/stores/refused/events",
            json!({"events": [big(450_000), big(450_000)]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gets_429_and_nothing_queued_is_lost() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        max_pending_events: 5,
        ..Quotas::default()
    };
    host.add_store_with("queued", "writer", &[], quotas).await;
    let (status, _) = host.post("/v1/stores/queued/pause", json!({})).await;
    assert_eq!(status, 200);
    host.wait_for_status("queued", |s| s["state"] == "paused")
        .await;
    for i in 0..5 {
        host.append(
            "queued",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    let (status, body) = host
        .post(
            "/v1/stores/queued/events",
            json!({"type": "kv.put", "payload": {"key": "x", "value": 0}}),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "queue_full");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("it is paused") && message.contains("resume it"),
        "retrying alone would not help: {message}"
    );

    // A live quota change while events wait: nothing queued is lost.
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/queued",
            Some(json!({"quotas": {"max_pending_events": 50, "cpu_ms_per_call": 2000}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["quotas"]["cpu_ms_per_call"], 2000);
    host.append("queued", "kv.put", json!({"key": "k5", "value": 5}))
        .await;
    let (status, _) = host.post("/v1/stores/queued/resume", json!({})).await;
    assert_eq!(status, 200);
    host.settle("queued").await;
    assert_eq!(
        host.query("queued", "count", json!({})).await,
        json!({"kv": 6, "applied": 6})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_the_circuit_and_the_store_probes_later() {
    let host = TestHost::start_with(TestHostOptions {
        retry: RetryPolicy {
            attempts: 1,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            breaker_failures: 2,
            breaker_base_delay: Duration::from_secs(2),
            breaker_max_delay: Duration::from_secs(2),
        },
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("flaky", programs::FLAKY).await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("tripping", "flaky", &[("fail", "trap")])
        .await;
    host.add_store("bystander", "writer", &[]).await;
    for id in 0..3 {
        host.append("tripping", "risky", json!({"id": id})).await;
    }
    let status = host
        .wait_for_status("tripping", |s| s["state"] == "backoff")
        .await;
    assert!(status["waitingUntil"].as_i64().is_some(), "{status}");
    assert_eq!(status["deadLettered"], 2);
    assert_eq!(
        status["cursor"], 2,
        "the third event waits while the circuit is open"
    );

    host.append("bystander", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("bystander").await;
    assert_eq!(host.query("bystander", "count", json!({})).await["kv"], 1);

    // After the rest, the store probes: the third event is tried (and dead-lettered) too.
    let status = host
        .wait_for_status("tripping", |s| s["deadLettered"] == 3)
        .await;
    assert_eq!(status["cursor"], 3, "{status}");
}

/// A run of bad events (each failing every attempt, while the plugin handles other events
/// well) lengthens the circuit's rest once per event, not once per attempt: three of them,
/// three attempts each, rest about 2 s in all before the good event behind them is processed.
/// Doubling per attempt rested 25.5 s (100 ms doubled over nine failures, 12.8 s before the
/// good event alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_bad_events_lengthens_the_rest_once_per_event() {
    let host = TestHost::start_with(TestHostOptions {
        retry: RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            breaker_failures: 2,
            breaker_base_delay: Duration::from_millis(100),
            breaker_max_delay: Duration::from_secs(60),
        },
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("flaky", programs::FLAKY).await;
    host.add_store("poisoned", "flaky", &[("fail", "trap")])
        .await;
    let started = std::time::Instant::now();
    for id in 0..3 {
        host.append("poisoned", "risky", json!({"id": id})).await;
    }
    host.append("poisoned", "harmless", json!({})).await;
    let status = host.wait_for_status("poisoned", |s| s["cursor"] == 4).await;
    let took = started.elapsed();
    assert_eq!(status["deadLettered"], 3, "{status}");
    assert_eq!(
        status["state"], "running",
        "the good event closed the circuit: {status}"
    );
    assert!(
        took < Duration::from_secs(12),
        "the rests add up to about 2 s (100 + 100 + 3 × 200 + 3 × 400 ms); they took {took:?}"
    );
}

/// A store resting with its circuit open probes at once when the operator changes it: here a
/// config edit that fixes the plugin's failures ends a rest of a minute, the waiting event is
/// processed, and the circuit is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_fix_ends_the_circuits_rest_at_once() {
    let host = TestHost::start_with(TestHostOptions {
        retry: RetryPolicy {
            attempts: 1,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            breaker_failures: 2,
            breaker_base_delay: Duration::from_secs(60),
            breaker_max_delay: Duration::from_secs(60),
        },
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("flaky", programs::FLAKY).await;
    host.add_store("resting", "flaky", &[("fail", "trap")])
        .await;
    for id in 0..3 {
        host.append("resting", "risky", json!({"id": id})).await;
    }
    let status = host
        .wait_for_status("resting", |s| s["state"] == "backoff")
        .await;
    assert_eq!(status["cursor"], 2, "the third event waits: {status}");

    let (code, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/resting",
            Some(json!({"plugin": "flaky", "config": {"fail": "no"}})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    // Within the 30 s `wait_for_status` allows, far less than the minute's rest.
    let status = host.wait_for_status("resting", |s| s["cursor"] == 3).await;
    assert_eq!(status["deadLettered"], 2, "{status}");
    assert_eq!(
        host.query("resting", "risky", json!({})).await,
        json!({"ids": [2]}),
        "the waiting event went through under the new config"
    );
    assert_eq!(status["state"], "running", "{status}");
}

/// A pause ends the circuit's rest and the resume probes at once, but a pause and resume do
/// not lengthen the rest: it is tied to the event that failed, and the probe that fails after
/// the resume is the same event, so the store rests as long again (20 s here), not twice as
/// long (40 s, then 80 s) as it would for a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_and_resume_end_the_circuits_rest_without_lengthening_it() {
    let rest = Duration::from_secs(20);
    let host = TestHost::start_with(TestHostOptions {
        retry: RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            breaker_failures: 2,
            breaker_base_delay: rest,
            breaker_max_delay: Duration::from_secs(300),
        },
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("flaky", programs::FLAKY).await;
    host.add_store("stubborn", "flaky", &[("fail", "trap")])
        .await;
    host.append("stubborn", "risky", json!({"id": 1})).await;
    // Two failed attempts open the circuit; the event's next attempt waits for the rest.
    let status = host
        .wait_for_status("stubborn", |s| s["state"] == "backoff")
        .await;
    assert_eq!(status["errorsCount"], 2, "{status}");
    let rest_ms = i64::try_from(rest.as_millis()).unwrap();
    let remaining = |status: &Value| {
        status["waitingUntil"].as_i64().expect("resting") - storehost_store::sqlite::now_ms()
    };
    assert!(remaining(&status) <= rest_ms, "{status}");
    let mut resting_until = status["waitingUntil"].as_i64().unwrap();

    for round in 1..=2 {
        let (code, body) = host.post("/v1/stores/stubborn/pause", json!({})).await;
        assert_eq!(code, 200, "{body}");
        let status = host
            .wait_for_status("stubborn", |s| s["state"] == "paused")
            .await;
        assert_eq!(
            status["waitingUntil"],
            Value::Null,
            "the pause ended the rest (round {round}): {status}"
        );

        let (code, body) = host.post("/v1/stores/stubborn/resume", json!({})).await;
        assert_eq!(code, 200, "{body}");
        let errors = 2 + round;
        let status = host
            .wait_for_status("stubborn", |s| {
                s["errorsCount"] == errors && s["state"] == "backoff"
            })
            .await;
        let until = status["waitingUntil"].as_i64().expect("resting again");
        assert!(until > resting_until, "a new rest began: {status}");
        // The new rest began when the probe failed: before the rest the pause ended would
        // have run out, had the resume waited for it.
        assert!(
            until - rest_ms < resting_until,
            "round {round}: the resume probed only once the rest ran out: {status}"
        );
        // Set to now + the rest when it began, so at most the rest from now; doubled it
        // would be about twice that.
        assert!(
            remaining(&status) <= rest_ms + 1_000,
            "round {round}: the same event's failed probe rests {} ms; the rest is {rest_ms} ms",
            remaining(&status)
        );
        resting_until = until;
    }
    let (_, status) = host.get("/v1/stores/stubborn").await;
    assert_eq!(status["cursor"], 0, "{status}");
    assert_eq!(
        status["deadLettered"], 0,
        "each resume gave the event its attempts anew: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_over_its_cpu_budget_waits_while_others_go_on() {
    let host = TestHost::start().await;
    host.deploy("spin", programs::SPIN).await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        cpu_ms_per_call: 40,
        cpu_ms_per_minute: 60,
        ..Quotas::default()
    };
    host.add_store_with("burner", "spin", &[], quotas).await;
    host.add_store("frugal", "writer", &[]).await;
    host.append("burner", "misbehave", json!({})).await;
    let status = host
        .wait_for_status("burner", |s| s["state"] == "throttled")
        .await;
    assert!(status["waitingUntil"].as_i64().is_some(), "{status}");
    assert!(status["usage"]["cpuMs"].as_u64().unwrap() >= 60, "{status}");

    for i in 0..20 {
        host.append(
            "frugal",
            "kv.put",
            json!({"key": format!("k{i}"), "value": i}),
        )
        .await;
    }
    host.settle("frugal").await;
    assert_eq!(host.query("frugal", "count", json!({})).await["kv"], 20);
    let (_, status) = host.get("/v1/stores/burner").await;
    assert_eq!(
        status["state"], "throttled",
        "still waiting for its budget: {status}"
    );

    // A query (or a dead-letter retry) would spend more of it: the caller is told when to
    // come back instead (it used to run at once, outside the budget).
    let response = host
        .client
        .get(format!("{}/v1/stores/burner/query/anything", host.url))
        .bearer_auth(storehost_tests::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().get("retry-after").is_some());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "cpu_budget_used", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_queue_does_not_starve_a_store_with_one_event() {
    let host = TestHost::start_with(TestHostOptions {
        max_concurrent_invocations: 1,
        retry: RetryPolicy {
            attempts: 1,
            breaker_failures: 1_000,
            ..RetryPolicy::default()
        },
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("spin", programs::SPIN).await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        cpu_ms_per_call: 200,
        cpu_ms_per_minute: 600_000,
        ..Quotas::default()
    };
    host.add_store_with("deep", "spin", &[], quotas).await;
    host.add_store("single", "writer", &[]).await;
    let events: Vec<_> = (0..15)
        .map(|_| json!({"type": "misbehave", "payload": {}}))
        .collect();
    let (status, _) = host
        .post("/v1/stores/deep/events", json!({"events": events}))
        .await;
    assert_eq!(status, 202);
    host.wait_for_status("deep", |s| s["cursor"].as_u64() >= Some(1))
        .await;

    host.append("single", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("single").await;
    let (_, deep) = host.get("/v1/stores/deep").await;
    assert!(
        deep["lag"].as_u64().unwrap() > 5,
        "the single event was served between the deep store's events, not after them: {deep}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_beyond_max_stores_is_refused_clearly() {
    let host = TestHost::start_with(TestHostOptions {
        max_stores: 2,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    for id in ["cap-1", "cap-2"] {
        let (status, _) = host
            .call(
                reqwest::Method::PUT,
                &format!("/v1/stores/{id}"),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 201);
    }
    let response = host
        .client
        .put(format!("{}/v1/stores/cap-3", host.url))
        .bearer_auth(storehost_tests::TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"30"[..]),
        "a client is told when to try again"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "at_capacity");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum of 2 stores"),
        "{body}"
    );
}

/// Whether the engine meters fuel is fixed at start; a store asking for `fuel_per_call` on a
/// host that does not is refused with the reason and the way out (never silently unmetered),
/// and a running store keeps its quotas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_per_call_on_a_host_without_fuel_metering_is_refused_and_changes_nothing() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/metered",
            Some(json!({"plugin": "writer", "quotas": {"fuel_per_call": 1_000_000}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "fuel_not_metered");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1000000") && message.contains("cpu_ms_per_call"),
        "says what was asked and what to do: {message}"
    );
    let (status, _) = host.get("/v1/stores/metered").await;
    assert_eq!(status, 404, "no store was created");

    host.add_store("running", "writer", &[]).await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/running",
            Some(json!({"quotas": {"fuel_per_call": 1_000_000}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (_, store) = host.get("/v1/stores/running").await;
    assert_eq!(store["quotas"]["fuel_per_call"], Value::Null, "{store}");
    host.append("running", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("running").await;
    assert_eq!(host.query("running", "count", json!({})).await["kv"], 1);
}

/// The sandbox pool's memory ceiling is fixed at start; a live change asking for more is
/// refused with the reason and the way out, and the store keeps its quotas and its work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_quota_above_the_pools_ceiling_is_refused_and_changes_nothing() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("growing", "writer", &[]).await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/growing",
            Some(json!({"quotas": {"memory": 1u64 << 30}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "quota_above_ceiling");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("268435456") && message.contains("restart"),
        "says the ceiling and what to do: {message}"
    );
    let (_, store) = host.get("/v1/stores/growing").await;
    assert_eq!(store["quotas"]["memory"], 64 << 20, "{store}");

    // Up to the ceiling is fine.
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/growing",
            Some(json!({"quotas": {"memory": 256 << 20}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    host.append("growing", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("growing").await;
    assert_eq!(host.query("growing", "count", json!({})).await["kv"], 1);
}

/// The `db_cache` quota bounds the page cache a store's database keeps in the host's memory:
/// two stores write the same 2.4 MB; the one on the default keeps about 2 MB of it cached,
/// the one with a 256 KiB quota at most that, and every row is there. Lowered live, the
/// cache shrinks to the new quota; `/metrics` shows both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_db_cache_quota_bounds_a_stores_page_cache_and_changes_live() {
    const SMALL: u64 = 256 << 10;
    const SMALLER: u64 = 128 << 10;
    // What SQLite counts beside the cached pages: its pager and one page buffer.
    const PAGER: u64 = 8 << 10;
    const ROWS: usize = 24;
    let host = TestHost::start_with(TestHostOptions {
        max_body_bytes: 1 << 20,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("cache-default", "writer", &[]).await;
    host.add_store_with(
        "cache-small",
        "writer",
        &[],
        Quotas {
            db_cache: SMALL,
            ..Quotas::default()
        },
    )
    .await;
    let value = "x".repeat(100_000);
    for id in ["cache-default", "cache-small"] {
        for batch in 0..ROWS / 8 {
            let events: Vec<Value> = (0..8)
                .map(|i| json!({"type": "kv.put", "payload": {"key": format!("k{batch}-{i}"), "value": value}}))
                .collect();
            let (status, body) = host
                .post(
                    &format!("/v1/stores/{id}/events"),
                    json!({ "events": events }),
                )
                .await;
            assert_eq!(status, 202, "{body}");
        }
        host.settle(id).await;
        assert_eq!(host.query(id, "count", json!({})).await["kv"], ROWS);
    }
    let cached = |view: &Value| view["usage"]["dbCacheBytes"].as_u64().unwrap();
    let (_, default) = host.get("/v1/stores/cache-default").await;
    let (_, small) = host.get("/v1/stores/cache-small").await;
    assert!(
        cached(&default) > 1 << 20,
        "on the default quota the written pages stay cached: {default}"
    );
    assert!(
        cached(&small) > 0 && cached(&small) <= SMALL + PAGER,
        "at most the quota: {small}"
    );
    assert_eq!(small["quotas"]["db_cache"], SMALL);

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/cache-small",
            Some(json!({"quotas": {"db_cache": SMALLER}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    host.append("cache-small", "kv.put", json!({"key": "after", "value": 1}))
        .await;
    host.settle("cache-small").await;
    let (_, small) = host.get("/v1/stores/cache-small").await;
    assert!(
        cached(&small) > 0 && cached(&small) <= SMALLER + PAGER,
        "the lowered quota applies at once: {small}"
    );
    assert_eq!(
        host.query("cache-small", "count", json!({})).await["kv"],
        ROWS + 1
    );

    let metrics = reqwest::get(format!("{}/metrics", host.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str, id: &str| -> u64 {
        let prefix = format!("storehost_{name}{{store_id=\"{id}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
    };
    assert_eq!(
        sample("store_db_cache_bytes", "cache-small"),
        cached(&small)
    );
    assert_eq!(sample("store_db_cache_quota_bytes", "cache-small"), SMALLER);
    assert!(sample("store_db_cache_bytes", "cache-default") > 1 << 20);
}

/// A lower `memory` quota applies to a guest that already holds more: its sandbox starts
/// again under the new limit. Before, the limit only stopped further growth, and a guest
/// holding 40 MiB kept them under a 16 MiB quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_memory_quota_applies_to_memory_already_held() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("grower", "writer", &[]).await;
    host.append("grower", "kv.grow", json!({"mib": 40})).await;
    host.settle("grower").await;
    let held = host.query("grower", "memory", json!({})).await["bytes"]
        .as_u64()
        .unwrap();
    assert!(held >= 40 << 20, "the guest grew to {held} bytes");

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/grower",
            Some(json!({"quotas": {"memory": "16MiB"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let held = host.query("grower", "memory", json!({})).await["bytes"]
        .as_u64()
        .unwrap();
    assert!(
        held < 16 << 20,
        "the guest holds {held} bytes under a 16 MiB quota"
    );
    host.append("grower", "kv.put", json!({"key": "k", "value": 1}))
        .await;
    host.settle("grower").await;
    assert_eq!(host.query("grower", "count", json!({})).await["kv"], 1);
}

/// A store that emitted 100 events past a budget of 10 a second (burst 20): `throttled`
/// with all of them kept, none processed yet (80 over the burst: 8 s to wait). Answers the
/// store's id and the seq of the event that emitted them.
async fn throttled_emitter(host: &TestHost, id: &str) -> u64 {
    let quotas = Quotas {
        events_per_second: 10,
        burst: 20,
        ..Quotas::default()
    };
    host.add_store_with(id, "emit_loop", &[], quotas).await;
    let first = host.append(id, "misbehave", json!({"events": 100})).await;
    let status = host
        .wait_for_status(id, |s| s["state"] == "throttled")
        .await;
    assert!(status["waitingUntil"].as_i64().is_some(), "{status}");
    assert_eq!(
        status["head"].as_u64(),
        Some(first + 100),
        "the 100 emitted events are all kept: {status}"
    );
    assert_eq!(
        status["cursor"].as_u64(),
        Some(first),
        "they wait for the rate: {status}"
    );
    assert_eq!(status["errorsCount"], 0, "nothing failed: {status}");
    first
}

/// The events a plugin emits follow the store's `events_per_second` + `burst` like a
/// client's appends: nothing is refused, but once an invocation has emitted past the burst
/// the store waits (`throttled`) until the rate has caught up, before its next event. Before,
/// a plugin emitting thousands of events per call grew the log (which no quota bounds) as
/// fast as the host could write, from a trickle of appends (77 MB from six appended events).
/// A higher rate set meanwhile ends the wait at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_emitted_past_its_event_rate_waits_for_it() {
    let host = TestHost::start().await;
    host.deploy("emit_loop", programs::EMIT_LOOP).await;
    let first = throttled_emitter(&host, "emitter").await;
    let raised = std::time::Instant::now();
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/emitter",
            Some(json!({"quotas": {"events_per_second": 1000, "burst": 2000}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    host.settle("emitter").await;
    let (_, status) = host.get("/v1/stores/emitter").await;
    assert_eq!(status["cursor"].as_u64(), Some(first + 100), "{status}");
    assert!(
        raised.elapsed() < Duration::from_secs(6),
        "the new rate ended the 8 s wait (it took {:?})",
        raised.elapsed()
    );
}

/// The bytes a plugin emits follow the store's `ingress_bytes_per_second` as its events
/// follow the event rate: 8 events of 500 KB from one small append leave the store waiting
/// until a 64 KiB/s rate has caught up. Before, only their count was budgeted, and a plugin
/// turned a few bytes of appends into 75 MB/s of log against a 64 KiB/s quota (helper 35).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_emitted_past_its_byte_rate_waits_for_it() {
    let host = TestHost::start().await;
    host.deploy("emit_loop", programs::EMIT_LOOP).await;
    let quotas = Quotas {
        ingress_bytes_per_second: 64 << 10,
        ..Quotas::default()
    };
    host.add_store_with("big-emitter", "emit_loop", &[], quotas)
        .await;
    let first = host
        .append(
            "big-emitter",
            "misbehave",
            json!({"events": 8, "padBytes": 500_000}),
        )
        .await;
    let status = host
        .wait_for_status("big-emitter", |s| s["state"] == "throttled")
        .await;
    assert_eq!(status["head"].as_u64(), Some(first + 8), "{status}");
    assert_eq!(status["cursor"].as_u64(), Some(first), "{status}");
    // 4 MB emitted, a 1 MiB burst: about 3 MB at 64 KiB a second to wait.
    let waiting = status["waitingUntil"].as_i64().unwrap() - storehost_store::sqlite::now_ms();
    assert!(waiting > 20_000, "waits {waiting} ms: {status}");
    assert_eq!(status["errorsCount"], 0, "nothing failed: {status}");
}

/// A store paused while it waits for its budget stays paused when the wait is over: it
/// processes nothing until it is resumed. Before, the event it was about to process ran once
/// the wait ended, and the rest of its queue with it, while it showed `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_paused_while_throttled_stays_paused() {
    let host = TestHost::start().await;
    host.deploy("emit_loop", programs::EMIT_LOOP).await;
    let first = throttled_emitter(&host, "paused-emitter").await;
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            "/v1/stores/paused-emitter/pause",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Past the end of the 8 s wait.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let (_, status) = host.get("/v1/stores/paused-emitter").await;
    assert_eq!(status["state"], "paused", "{status}");
    assert_eq!(
        status["cursor"].as_u64(),
        Some(first),
        "nothing processed while paused: {status}"
    );
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            "/v1/stores/paused-emitter/resume",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    host.settle("paused-emitter").await;
    let (_, status) = host.get("/v1/stores/paused-emitter").await;
    assert_eq!(status["cursor"].as_u64(), Some(first + 100), "{status}");
}

/// A settings change that leaves the event rate as it was leaves its bucket as it was too:
/// a client that used up the burst is still refused after an unrelated change (a reload
/// passes over every store). Before, a store whose `burst` was below `events_per_second` got
/// a full bucket back on every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelated_change_does_not_refill_the_event_rate() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    // A bucket of 2 events (burst is never below the rate), refilled one every 500 ms.
    let quotas = Quotas {
        events_per_second: 2,
        burst: 1,
        ..Quotas::default()
    };
    host.add_store_with("steady", "writer", &[], quotas).await;
    let two = json!({"events": [
        {"type": "kv.put", "payload": {"key": "a", "value": 1}},
        {"type": "kv.put", "payload": {"key": "b", "value": 2}},
    ]});
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            "/v1/stores/steady/events",
            Some(two.clone()),
        )
        .await;
    assert_eq!(status, 202, "the full bucket takes two: {body}");
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/steady",
            Some(json!({"quotas": {"cpu_ms_per_call": 999}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = host
        .call(reqwest::Method::POST, "/v1/stores/steady/events", Some(two))
        .await;
    assert_eq!(
        status, 429,
        "the bucket is still nearly empty after the change: {body}"
    );
}

async fn runs(host: &TestHost, id: &str) -> usize {
    host.query(id, "runs", json!({})).await["runs"]
        .as_array()
        .expect("runs")
        .len()
}

/// A store paused while it waits for its budget leaves its due task due: no execution while
/// it is paused, and the schedule goes on after the resume. Before, the task it was about to
/// run ran once the wait ended, while the store showed `paused`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_task_waits_for_the_resume_of_a_store_paused_while_throttled() {
    let host = TestHost::start().await;
    host.deploy("ticker", programs::TICKER).await;
    host.add_store("clock", "ticker", &[]).await;
    for task in ["a", "b", "c", "d"] {
        host.append(
            "clock",
            "schedule",
            json!({"taskId": task, "everyMs": 1000}),
        )
        .await;
    }
    // Each execution emits one event: four tasks due every second emit four a second, so
    // past the first execution each one waits about a second for the rate, with more due.
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/clock",
            Some(json!({"quotas": {"events_per_second": 1, "burst": 1}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    host.wait_for_status("clock", |s| {
        s["state"] == "throttled" && s["tasksExecuted"].as_u64() >= Some(2)
    })
    .await;
    let (status, body) = host.post("/v1/stores/clock/pause", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let at_pause = runs(&host, "clock").await;
    // Past the end of the one-second wait, twice over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, status) = host.get("/v1/stores/clock").await;
    assert_eq!(status["state"], "paused", "{status}");
    assert_eq!(
        runs(&host, "clock").await,
        at_pause,
        "no execution while paused: {status}"
    );

    let (status, body) = host.post("/v1/stores/clock/resume", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let status = host
        .wait_for_status("clock", |s| {
            s["tasksExecuted"].as_u64() > Some(at_pause as u64)
        })
        .await;
    assert_eq!(status["errorsCount"], 0, "{status}");
}

/// A store waiting longer than `idle_timeout` (here throttled for 8 s) gives its sandbox
/// back once it has been idle that long, as a hibernating store does: with a single pool
/// slot, another store runs in it meanwhile, and the waiting store instantiates again when
/// its wait ends. Before, a waiting store held its pool slot and its guest's memory for the
/// whole wait (a circuit open for minutes, for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_waiting_past_its_idle_timeout_gives_its_sandbox_back() {
    let host = TestHost::start_with(TestHostOptions {
        idle_timeout: Some(Duration::from_millis(300)),
        pool_slots: Some(1),
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("emit_loop", programs::EMIT_LOOP).await;
    host.deploy("writer", programs::WRITER).await;
    let first = throttled_emitter(&host, "waiter").await;
    host.wait_for_gauge("storehost_sandbox_slots_in_use", 0)
        .await;

    host.add_store("neighbour", "writer", &[]).await;
    host.append("neighbour", "kv.put", json!({"key": "k", "value": "one"}))
        .await;
    host.settle("neighbour").await;
    let (_, status) = host.get("/v1/stores/neighbour").await;
    assert_eq!(
        status["errorsCount"], 0,
        "it ran in the freed slot: {status}"
    );
    assert_eq!(
        host.query("neighbour", "get", json!({"key": "k"})).await,
        json!({"value": "one"})
    );
    let (_, status) = host.get("/v1/stores/waiter").await;
    assert_eq!(status["state"], "throttled", "still waiting: {status}");
    assert_eq!(status["cursor"].as_u64(), Some(first), "{status}");

    // The neighbour hibernates; a higher rate ends the wait, and the waiter runs again.
    host.wait_for_status("neighbour", |s| s["state"] == "hibernated")
        .await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/waiter",
            Some(json!({"quotas": {"events_per_second": 1000, "burst": 2000}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    host.settle("waiter").await;
    let (_, status) = host.get("/v1/stores/waiter").await;
    assert_eq!(status["cursor"].as_u64(), Some(first + 100), "{status}");
    assert_eq!(status["errorsCount"], 0, "{status}");
}

/// The events a retried dead letter emits count against the event rate like any others: a
/// store (or a tenant's token, which may retry its dead letters) cannot emit past its rate by
/// retrying. Before, the retry's 100 emitted events were processed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_dead_letters_emitted_events_follow_the_event_rate() {
    let host = TestHost::start().await;
    host.deploy("emit_loop", programs::EMIT_LOOP).await;
    // 100 emits do not fit a queue of 50: the invocation fails, then is dead-lettered.
    let quotas = Quotas {
        events_per_second: 10,
        burst: 20,
        max_pending_events: 50,
        ..Quotas::default()
    };
    host.add_store_with("retrier", "emit_loop", &[], quotas)
        .await;
    let seq = host
        .append("retrier", "misbehave", json!({"events": 100}))
        .await;
    host.wait_for_status("retrier", |s| s["deadLettered"] == 1)
        .await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/retrier",
            Some(json!({"quotas": {"max_pending_events": 100_000}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = host
        .post(
            &format!("/v1/stores/retrier/dead-letters/{seq}/retry"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let status = host
        .wait_for_status("retrier", |s| s["state"] == "throttled")
        .await;
    assert_eq!(status["head"].as_u64(), Some(seq + 100), "{status}");
    assert!(
        status["cursor"].as_u64() < Some(seq + 100),
        "the emitted events wait for the rate: {status}"
    );
}

/// The log keeps every event, so a tenant could fill the disk every store shares with big
/// appends: past its `event_log` quota an append gets 507 `event_log_full` saying what to do,
/// nothing of it kept, and a raised quota takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_log_at_its_quota_refuses_appends_until_the_quota_is_raised() {
    const QUOTA: u64 = 1 << 20;
    const VALUE: usize = 64 << 10;
    let host = TestHost::start_with(TestHostOptions {
        max_body_bytes: 1 << 20,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        event_log: QUOTA,
        ..Quotas::default()
    };
    host.add_store_with("logged", "writer", &[], quotas).await;
    let put = |n: usize| json!({"type": "kv.put", "payload": {"key": format!("k{n}"), "value": "x".repeat(VALUE)}});
    let mut accepted = 0;
    let (status, body) = loop {
        let (status, body) = host.post("/v1/stores/logged/events", put(accepted)).await;
        if status != 202 {
            break (status, body);
        }
        accepted += 1;
        assert!(
            (accepted * VALUE) as u64 <= QUOTA,
            "the log took {accepted} events of {VALUE} bytes under a quota of {QUOTA}"
        );
    };
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "event_log_full", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("event_log quota is {QUOTA} bytes"))
            && message.contains("raise the store's event_log quota"),
        "{message}"
    );
    let (_, store) = host.get("/v1/stores/logged").await;
    assert_eq!(
        store["head"], accepted,
        "the refused event was kept: {store}"
    );

    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/logged",
            Some(json!({"quotas": {"event_log": 64 << 20}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["quotas"]["event_log"], 64 << 20);
    let (status, body) = host.post("/v1/stores/logged/events", put(accepted)).await;
    assert_eq!(status, 202, "{body}");
    host.settle("logged").await;
    assert_eq!(
        host.query("logged", "count", json!({})).await,
        json!({"kv": accepted + 1, "applied": accepted + 1})
    );
}

/// A plugin's emitted events go to the same log: an emit past the quota is refused to the
/// plugin, whose invocation (here, not handling it) fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_past_the_event_log_quota_is_refused_to_the_plugin() {
    let host = TestHost::start_with(TestHostOptions {
        retry: RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        },
        max_body_bytes: 1 << 20,
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        event_log: 1 << 20,
        ..Quotas::default()
    };
    host.add_store_with("emitter", "writer", &[], quotas).await;
    // 600 KiB enter the log with the event; emitting as much again would pass 1 MiB.
    let big = "x".repeat(600 << 10);
    let seq = host
        .append(
            "emitter",
            "kv.emit",
            json!({"type": "echo", "payload": {"text": big}}),
        )
        .await;
    host.settle("emitter").await;
    let (_, letters) = host.get("/v1/stores/emitter/dead-letters").await;
    let letter = &letters["deadLetters"][0];
    assert_eq!(letter["seq"], seq, "{letters}");
    assert_eq!(letter["reason"], "disk_full", "{letter}");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("the store's event log is full: its event_log quota left room for"),
        "{letter}"
    );
    let (_, store) = host.get("/v1/stores/emitter").await;
    assert_eq!(
        store["head"], seq,
        "the refused emit reached the log: {store}"
    );
}
