//! Event processing through the real router, real SQLite files and real WASM plugins:
//! order, exactly-once effects, idempotency, emitted events, retries and dead letters.

use serde_json::json;
use storehost_store::Quotas;
use storehost_tests::{TestHost, programs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_applied_in_seq_order_exactly_once() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("orders", "writer", &[]).await;

    let mut expected = Vec::new();
    for batch in 0..10 {
        let events: Vec<_> = (0..30)
            .map(|i| json!({"type": "kv.put", "payload": {"key": format!("k{batch}-{i}"), "value": i}}))
            .collect();
        let (status, body) = host
            .post("/v1/stores/orders/events", json!({"events": events}))
            .await;
        assert_eq!(status, 202, "{body}");
        let seqs: Vec<u64> = serde_json::from_value(body["seqs"].clone()).unwrap();
        expected.extend(seqs);
    }
    for i in 0..20 {
        expected.push(host.append("orders", "note", json!({"i": i})).await);
    }
    assert_eq!(
        expected,
        (1..=320).collect::<Vec<u64>>(),
        "seqs are gap-free and increasing"
    );

    host.settle("orders").await;
    let applied = host.query("orders", "applied", json!({})).await;
    assert_eq!(
        applied["seqs"],
        json!(expected),
        "every event applied once, in seq order"
    );
    let count = host.query("orders", "count", json!({})).await;
    assert_eq!(count, json!({"kv": 300, "applied": 320}));

    let (_, page) = host.get("/v1/stores/orders/events?after=300&limit=5").await;
    let seqs: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![301, 302, 303, 304, 305]);
    assert_eq!(page["next"], 305);
    assert_eq!(page["events"][0]["source"], "api");
    assert_eq!(page["events"][0]["payload"], json!({"i": 0}));
}

/// Under a burst, events commit several to a transaction (group commit), and an event that
/// fails in the middle of one loses only its own writes: a plugin error rolls back its
/// savepoint; an interrupted write makes SQLite drop the whole transaction, so the events
/// before it are processed again — still each applied once — and nothing the runaway guest
/// wrote after the interruption is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_commits_in_groups_and_a_failed_event_loses_only_its_own_writes() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    let quotas = Quotas {
        cpu_ms_per_call: 100,
        ..Quotas::default()
    };
    let store = host.add_store_with("burst", "writer", &[], quotas).await;

    let events: Vec<_> = (1..=300)
        .map(|i| {
            let kind = match i {
                100 => "kv.fail",
                200 => "kv.runaway",
                _ if i % 50 == 0 => "kv.emit",
                _ => "kv.put",
            };
            let payload = if kind == "kv.emit" {
                json!({"type": "kv.put", "payload": {"key": format!("emitted-{i}"), "value": i}})
            } else {
                json!({"key": format!("k{i}"), "value": i})
            };
            json!({"type": kind, "payload": payload})
        })
        .collect();
    let (status, body) = host
        .post("/v1/stores/burst/events", json!({"events": events}))
        .await;
    assert_eq!(status, 202, "{body}");
    host.settle("burst").await;

    let emitted: Vec<u64> = (301..=304).collect();
    let expected: Vec<u64> = (1..=300)
        .filter(|i| ![100, 200].contains(i))
        .chain(emitted.iter().copied())
        .collect();
    assert_eq!(
        host.query("burst", "applied", json!({})).await["seqs"],
        json!(expected),
        "every other event applied once, in order"
    );
    for key in ["k100", "k200", "k200-after", "runaway-1"] {
        assert_eq!(
            host.query("burst", "get", json!({"key": key})).await["value"],
            json!(null),
            "{key} was written by a failed invocation"
        );
    }
    assert_eq!(
        host.query("burst", "get", json!({"key": "emitted-150"}))
            .await["value"],
        "150"
    );
    let (_, letters) = host.get("/v1/stores/burst/dead-letters").await;
    let letters: Vec<_> = letters["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["seq"].as_u64().unwrap(),
                l["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        letters,
        vec![
            (100, "plugin_error".to_owned()),
            (200, "cpu_time".to_owned())
        ]
    );

    let processed = store.status().events_processed;
    assert_eq!(processed, expected.len() as u64);
    let commits = store.metrics().event_commits();
    assert!(
        commits < processed,
        "{processed} events took {commits} commits: the burst was not grouped"
    );
}

/// Events commit in batches of up to 128, and a batch the events stop arriving in before it
/// fills commits then: 30 events appended at once, and the 30 they emit, show as processed
/// (cursor, count, the emitted events in the log) at once, with nothing else asking the store
/// to commit (no query, no task, no other append), each applied once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_events_stop_arriving_in_commits_without_filling() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("trickle", "writer", &[]).await;

    let events: Vec<_> = (0..30)
        .map(|i| {
            json!({"type": "kv.emit", "payload": {"type": "kv.put", "payload": {"key": format!("k{i}"), "value": i}}})
        })
        .collect();
    let (status, body) = host
        .post("/v1/stores/trickle/events", json!({"events": events}))
        .await;
    assert_eq!(status, 202, "{body}");
    // Only the store's status is read until everything shows as processed: it asks the
    // store for nothing, so a commit can only come from the store itself.
    let status = host.wait_for_status("trickle", |s| s["cursor"] == 60).await;
    assert_eq!(status["eventsProcessed"], 60, "{status}");
    assert_eq!(status["head"], 60, "{status}");
    let (_, page) = host.get("/v1/stores/trickle/events?after=30").await;
    let emitted: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["source"].as_str().unwrap().to_owned(),
                e["payload"]["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<_> = (0..30)
        .map(|i| (31 + i, "plugin".to_owned(), format!("k{i}")))
        .collect();
    assert_eq!(
        emitted, expected,
        "each emitted event logged once, in order"
    );

    assert_eq!(
        host.query("trickle", "applied", json!({})).await["seqs"],
        json!((1..=60).collect::<Vec<u64>>()),
        "every event applied once, in seq order"
    );
    assert_eq!(
        host.query("trickle", "count", json!({})).await,
        json!({"kv": 30, "applied": 60})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_first_seq_and_appends_nothing() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("idem-a", "writer", &[]).await;
    host.add_store("idem-b", "writer", &[]).await;

    let event = json!({"type": "kv.put", "payload": {"key": "x", "value": 1}, "idempotencyKey": "order-17"});
    let (_, first) = host.post("/v1/stores/idem-a/events", event.clone()).await;
    host.append("idem-a", "note", json!({})).await;
    let (status, again) = host.post("/v1/stores/idem-a/events", event.clone()).await;
    assert_eq!(status, 202);
    assert_eq!(first["seq"], 1);
    assert_eq!(again["seq"], 1, "the same key returns the original seq");
    let (_, other_store) = host.post("/v1/stores/idem-b/events", event).await;
    assert_eq!(other_store["seq"], 1, "keys are per store");

    host.settle("idem-a").await;
    let (_, page) = host.get("/v1/stores/idem-a/events").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(
        host.query("idem-a", "applied", json!({})).await["seqs"],
        json!([1, 2])
    );
}

/// A client retrying an accepted event with its idempotency key gets the original seq even
/// when the store's ingress rate refuses new events at that moment (it used to get 429 for an
/// event the log already held); a new event is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_a_known_key_gets_its_seq_even_over_the_rate() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("strict", "writer", &[]).await;
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/strict",
            Some(json!({"quotas": {"events_per_second": 1, "burst": 1}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let event = json!({"type": "kv.put", "payload": {"key": "x", "value": 1}, "idempotencyKey": "order-18"});
    let (status, first) = host.post("/v1/stores/strict/events", event.clone()).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = host.post("/v1/stores/strict/events", event.clone()).await;
    assert_eq!(
        status, 202,
        "the retry is answered, not rate limited: {again}"
    );
    assert_eq!(again["seq"], first["seq"]);
    let batch = json!({"events": [event.clone(), event]});
    let (status, both) = host.post("/v1/stores/strict/events", batch).await;
    assert_eq!(status, 202, "{both}");
    assert_eq!(both["seqs"], json!([first["seq"], first["seq"]]));

    let new = json!({"type": "kv.put", "payload": {"key": "y", "value": 2}, "idempotencyKey": "order-19"});
    let (status, refused) = host.post("/v1/stores/strict/events", new).await;
    assert_eq!(
        status, 429,
        "a new event over the rate is refused: {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitted_events_join_the_log_once_with_source_plugin() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("emitter", "writer", &[]).await;

    let seq = host
        .append(
            "emitter",
            "kv.emit",
            json!({"type": "kv.put", "payload": {"key": "from-plugin", "value": "yes"}}),
        )
        .await;
    host.settle("emitter").await;
    let (_, page) = host
        .get(&format!("/v1/stores/emitter/events?after={seq}"))
        .await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page}");
    assert_eq!(events[0]["type"], "kv.put");
    assert_eq!(events[0]["source"], "plugin");
    let value = host
        .query("emitter", "get", json!({"key": "from-plugin"}))
        .await;
    assert_eq!(
        value["value"], "yes",
        "the plugin saw its own emitted event"
    );
}

/// Every emitted event reaches the log once, in the order of its causes, and the outbox it
/// passed through in `store.db` does not keep it: each commit clears what was already moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_empties_as_emitted_events_reach_the_log() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("relay", "writer", &[]).await;

    for i in 0..20 {
        host.append(
            "relay",
            "kv.emit",
            json!({"type": "kv.put", "payload": {"key": format!("k{i}"), "value": i}}),
        )
        .await;
        // Some causes wait for the previous reply to be logged, some arrive together.
        if i % 3 == 0 {
            host.settle("relay").await;
        }
    }
    host.settle("relay").await;
    let (_, page) = host.get("/v1/stores/relay/events?limit=1000").await;
    let emitted: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source"] == "plugin")
        .map(|e| e["payload"]["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        emitted,
        (0..20).map(|i| format!("k{i}")).collect::<Vec<_>>(),
        "each emitted event logged once, in order"
    );
    assert_eq!(host.query("relay", "count", json!({})).await["kv"], 20);

    // The store still runs: its files are read through the host's VFS, as the host reads them.
    let db =
        storehost_store::sqlite::open_reader(&host.data_dir.join("stores/relay/store.db")).unwrap();
    let left: i64 = db
        .query_row("SELECT count(*) FROM _host_outbox", [], |row| row.get(0))
        .unwrap();
    assert!(
        left <= 1,
        "the outbox holds {left} entries; only the last one moved may wait for the next commit"
    );
}

/// `storehost_store_event_commits_total` of store `id`, from `/metrics`.
async fn event_commits(host: &TestHost, id: &str) -> u64 {
    let text = host
        .client
        .get(format!("{}/metrics", host.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("storehost_store_event_commits_total{{store_id=\"{id}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_handler_leaves_no_trace_is_retried_dead_lettered_and_retried_later() {
    let host = TestHost::start().await;
    host.deploy("flaky", programs::FLAKY).await;
    host.add_store("flaky-1", "flaky", &[("fail", "trap")])
        .await;

    let risky = host.append("flaky-1", "risky", json!({"id": 1})).await;
    let after = host.append("flaky-1", "other", json!({})).await;
    host.settle("flaky-1").await;

    assert_eq!(
        host.query("flaky-1", "risky", json!({})).await["ids"],
        json!([]),
        "the rows written before the trap were rolled back"
    );
    let (_, letters) = host.get("/v1/stores/flaky-1/dead-letters").await;
    let letter = &letters["deadLetters"][0];
    assert_eq!(letter["seq"], risky);
    assert_eq!(letter["reason"], "trap");
    assert_eq!(
        letter["attempts"], 3,
        "tried the configured number of times"
    );
    assert_eq!(letter["status"], "dead");

    let (_, store) = host.get("/v1/stores/flaky-1").await;
    assert_eq!(
        store["cursor"], after,
        "the store went on with the next event"
    );
    assert_eq!(store["failuresByReason"]["trap"], 3);
    assert_eq!(store["lastFailure"]["reason"], "trap");
    assert_eq!(store["state"], "running");

    // While the cause is still there, a retry fails and says why.
    let (status, body) = host
        .post(
            &format!("/v1/stores/flaky-1/dead-letters/{risky}/retry"),
            json!({}),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "trap");

    // Remove the cause (a config value), then retry: the effect commits once.
    let (status, body) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/flaky-1",
            Some(json!({"config": {"fail": "no"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let commits_before = event_commits(&host, "flaky-1").await;
    let (status, body) = host
        .post(
            &format!("/v1/stores/flaky-1/dead-letters/{risky}/retry"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        host.query("flaky-1", "risky", json!({})).await["ids"],
        json!([1])
    );
    assert_eq!(
        event_commits(&host, "flaky-1").await,
        commits_before + 1,
        "the retry's commit is counted"
    );
    let (_, letters) = host.get("/v1/stores/flaky-1/dead-letters").await;
    assert_eq!(letters["deadLetters"][0]["status"], "resolved");
    let (status, body) = host
        .post(
            &format!("/v1/stores/flaky-1/dead-letters/{risky}/retry"),
            json!({}),
        )
        .await;
    assert_eq!(
        status, 409,
        "a resolved dead letter is not retried twice: {body}"
    );
    assert_eq!(body["error"]["code"], "dead_letter_resolved");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("already retried successfully"),
        "{message}"
    );
    let (status, body) = host
        .post("/v1/stores/flaky-1/dead-letters/9999/retry", json!({}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "dead_letter_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_plugin_errors_are_classified_with_their_message() {
    let host = TestHost::start().await;
    host.deploy("flaky", programs::FLAKY).await;
    host.add_store("panics", "flaky", &[("fail", "panic")])
        .await;
    host.add_store("refuses", "flaky", &[("fail", "err")]).await;
    for store in ["panics", "refuses"] {
        host.append(store, "risky", json!({"id": 7})).await;
        host.settle(store).await;
    }
    let (_, letters) = host.get("/v1/stores/panics/dead-letters").await;
    assert_eq!(letters["deadLetters"][0]["reason"], "panic");
    let message = letters["deadLetters"][0]["error"].as_str().unwrap();
    assert!(message.contains("flaky panicked on purpose"), "{message}");

    let (_, letters) = host.get("/v1/stores/refuses/dead-letters").await;
    assert_eq!(letters["deadLetters"][0]["reason"], "plugin_error");
    assert_eq!(letters["deadLetters"][0]["error"], "flaky refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_an_event_arrives() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("polled", "writer", &[]).await;
    let waiter = {
        let client = host.client.clone();
        let url = format!("{}/v1/stores/polled/events?after=0&waitMs=20000", host.url);
        tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(storehost_tests::TOKEN)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "nothing is there yet, so the poll waits"
    );
    host.append("polled", "note", json!({"hello": true})).await;
    let page = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("the poll answered when the event arrived")
        .unwrap();
    assert_eq!(page["events"][0]["payload"], json!({"hello": true}));
}

/// Starts `GET /v1/stores/{store}/events?after=0&waitMs=8000` with `token`: its status, body
/// and how long it took.
fn spawn_poll(
    host: &TestHost,
    store: &str,
    token: &str,
) -> tokio::task::JoinHandle<(u16, String, std::time::Duration)> {
    let client = host.client.clone();
    let url = format!("{}/v1/stores/{store}/events?after=0&waitMs=8000", host.url);
    let token = token.to_owned();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let response = client.get(url).bearer_auth(token).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap(), started.elapsed())
    })
}

/// A long-poll whose store is removed while it waits ends at once with 503 `store_stopped`,
/// and never answers the events of a store created again under the same id (another tenant,
/// at the same path). Before, the poll waited out its `waitMs` and then read whatever file
/// was at the path: 200 with the new store's events, to a client whose token was revoked
/// with the old store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_outliving_its_store_never_answers_the_next_stores_events() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("poll-gone", "writer", &[]).await;
    let (token, _) = host.issue_token("poll-gone").await;
    let poll = spawn_poll(&host, "poll-gone", &token);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/poll-gone", None)
        .await;
    assert_eq!(status, 200, "{body}");
    host.add_store("poll-gone", "writer", &[]).await;
    host.append("poll-gone", "new.tenant.secret", json!({}))
        .await;
    let (status, body, took) = poll.await.unwrap();
    assert!(
        !body.contains("new.tenant.secret"),
        "the old store's poll answered the new store's event: {body}"
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store_stopped"), "{body}");
    assert!(
        took < std::time::Duration::from_secs(6),
        "the poll waited out its waitMs after its store was removed: {took:?}"
    );
}

/// A store token revoked while its long-poll waits gets 401, not the event that wakes the
/// poll (the event stream ends alike). Before, the revoked holder got the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_whose_token_is_revoked_meanwhile_gets_nothing() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("poll-revoked", "writer", &[]).await;
    let (token, token_id) = host.issue_token("poll-revoked").await;
    let poll = spawn_poll(&host, "poll-revoked", &token);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, body) = host
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/stores/poll-revoked/tokens/{token_id}"),
            None,
        )
        .await;
    assert!(status == 200 || status == 204, "{status}: {body}");
    host.append("poll-revoked", "after.revocation", json!({}))
        .await;
    let (status, body, _) = poll.await.unwrap();
    assert!(!body.contains("after.revocation"), "{body}");
    assert_eq!(status, 401, "{body}");
}

/// A request that goes away while its append commits (the client hung up, the server timed
/// it out) does not strand the event: once kept, it is processed without waiting for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_caller_went_away_mid_append_is_still_processed() {
    use std::future::Future;
    use std::task::Context;

    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    let store = host.add_store("abandoned", "writer", &[]).await;
    let event = || storehost_store::NewEvent {
        event_type: "kv.put".into(),
        payload: json!({"key": "left", "value": 1}).to_string(),
        idempotency_key: None,
        request_id: None,
    };
    // Polled once, the append hands its commit to another thread; then its caller drops it.
    // (Should the commit already be done by that first poll, the append completed as any
    // other and the next attempt tries again.)
    let mut abandoned = false;
    for _ in 0..100 {
        let mut append = Box::pin(store.append(vec![event()], "api"));
        let mut context = Context::from_waker(std::task::Waker::noop());
        if append.as_mut().poll(&mut context).is_pending() {
            drop(append);
            abandoned = true;
            break;
        }
    }
    assert!(
        abandoned,
        "no append was still committing after its first poll"
    );

    // The event is kept, and processed although no other event follows it.
    let mut kept = Vec::new();
    for _ in 0..500 {
        kept = store.read(0, 1_000, None).await.expect("read the log");
        if kept.iter().any(|e| e.payload.contains("left")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let newest = kept
        .last()
        .expect("the abandoned append's event is kept")
        .seq;
    assert!(
        store
            .wait_processed(newest, std::time::Duration::from_secs(10))
            .await,
        "event {newest} kept but never processed: {:?}",
        store.status()
    );
}

/// A query's arguments come as `?args=JSON` or as plain parameters (`?key=k`, the form
/// `messages?conversationId=` takes in the product's contract), which reach the plugin as a
/// JSON object of strings; both at once, `args` that is not JSON, or a parameter given twice
/// (which took the last, silently) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_arguments_come_as_json_or_as_plain_parameters() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("asked", "writer", &[]).await;
    host.append("asked", "kv.put", json!({"key": "k", "value": "plain"}))
        .await;
    host.settle("asked").await;

    let (status, body) = host.get("/v1/stores/asked/query/get?key=k").await;
    assert_eq!((status, &body["value"]), (200, &json!("plain")), "{body}");
    let (status, body) = host
        .get("/v1/stores/asked/query/get?args=%7B%22key%22%3A%22k%22%7D")
        .await;
    assert_eq!((status, &body["value"]), (200, &json!("plain")), "{body}");
    for refused in [
        "/v1/stores/asked/query/get?args=%7B%7D&key=k",
        "/v1/stores/asked/query/get?args=not-json",
        "/v1/stores/asked/query/get?key=other&key=k",
    ] {
        let (status, body) = host.get(refused).await;
        assert_eq!(status, 400, "{refused}: {body}");
        assert_eq!(body["error"]["code"], "invalid_args", "{body}");
    }
}

/// Dead letters are listed a page at a time (`after`, `limit`, and `next` for the page after),
/// so a store holding hundreds of thousands cannot make one request read them all into the
/// host's memory (200,000 of 4 KB took 1.8 GB per request); a bad page is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_a_page_at_a_time() {
    let host = TestHost::start().await;
    host.deploy("flaky", programs::FLAKY).await;
    host.add_store("pages", "flaky", &[("fail", "trap")]).await;
    let mut seqs = Vec::new();
    for id in 0..3 {
        seqs.push(host.append("pages", "risky", json!({"id": id})).await);
    }
    host.settle("pages").await;

    let (status, first) = host.get("/v1/stores/pages/dead-letters?limit=2").await;
    assert_eq!(status, 200, "{first}");
    let listed = |page: &serde_json::Value| -> Vec<u64> {
        page["deadLetters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|letter| letter["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(listed(&first), seqs[..2]);
    assert_eq!(first["next"], seqs[1]);
    let (_, second) = host
        .get(&format!(
            "/v1/stores/pages/dead-letters?after={}&limit=2",
            seqs[1]
        ))
        .await;
    assert_eq!(listed(&second), seqs[2..]);
    assert_eq!(second["next"], serde_json::Value::Null, "the last page");
    // A last page exactly full says it is the last too (it gave `next`, and an empty page).
    let (_, full) = host
        .get(&format!(
            "/v1/stores/pages/dead-letters?after={}&limit=2",
            seqs[0]
        ))
        .await;
    assert_eq!(listed(&full), seqs[1..]);
    assert_eq!(
        full["next"],
        serde_json::Value::Null,
        "an exactly full last page: {full}"
    );
    let (_, whole) = host.get("/v1/stores/pages/dead-letters?limit=3").await;
    assert_eq!(listed(&whole), seqs);
    assert_eq!(whole["next"], serde_json::Value::Null, "{whole}");
    let (_, all) = host.get("/v1/stores/pages/dead-letters").await;
    assert_eq!(listed(&all), seqs, "a page of 100 by default");

    // A seq past any the store holds, even past SQLite's integers (i64::MAX), is an empty
    // page to list after and an unknown dead letter to retry (they were 500 `internal`).
    for past in [seqs[2] + 1, 1 << 63, u64::MAX] {
        let (status, page) = host
            .get(&format!("/v1/stores/pages/dead-letters?after={past}"))
            .await;
        assert_eq!(status, 200, "after={past}: {page}");
        assert_eq!(
            page,
            json!({"deadLetters": [], "next": null}),
            "after={past}"
        );
        let (status, body) = host
            .post(
                &format!("/v1/stores/pages/dead-letters/{past}/retry"),
                json!({}),
            )
            .await;
        assert_eq!(status, 404, "retry {past}: {body}");
        assert_eq!(body["error"]["code"], "dead_letter_not_found", "{body}");
    }

    for bad in ["limit=0", "limit=1001", "lmit=5", "after=-1"] {
        let (status, body) = host
            .get(&format!("/v1/stores/pages/dead-letters?{bad}"))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{bad}: {body}");
    }
}
