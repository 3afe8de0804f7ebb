//! `POST /webhooks/workspaces` through the real router on a real port: the scenarios of the
//! service this replaces (shared secret), Standard Webhooks signatures, replays, limits, and
//! webhook-created stores surviving a restart.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use storehost_control::StoreSource;
use storehost_control::config::Secret;
use storehost_control::webhook::{WebhookSettings, Webhooks, signature_header};
use storehost_store::StoreId;
use storehost_tests::TestHost;
use storehost_tests::control::ControlHostOptions;

const SECRET: &str = "whsec_c2hhcmVkLXNlY3JldC1mb3ItdGVzdHM=";

fn settings(secret: Option<&str>, require_signature: bool) -> WebhookSettings {
    WebhookSettings {
        secret: secret.map(Secret::new),
        require_signature,
        tolerance: Duration::from_secs(300),
        replay_retention: Duration::from_secs(3600),
    }
}

async fn host_with(
    settings: WebhookSettings,
    per_minute: u32,
    options: ControlHostOptions,
) -> TestHost {
    TestHost::start_control(options, move |orchestrator, state| {
        state.with_webhooks(
            Arc::new(Webhooks::new(orchestrator.clone(), settings)),
            per_minute,
        )
    })
    .await
}

async fn host() -> TestHost {
    host_with(
        settings(Some(SECRET), false),
        10_000,
        ControlHostOptions::default(),
    )
    .await
}

/// Sends a webhook with `headers` and a raw `body`; answers status, JSON and headers.
async fn send(
    host: &TestHost,
    method: reqwest::Method,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = host
        .client
        .request(method, format!("{}/webhooks/workspaces", host.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

fn event(event: &str, id: &str) -> String {
    json!({"event": event, "instanceId": id, "userId": "user-1", "timestamp": "2026-01-01T00:00:00Z"})
        .to_string()
}

fn secret_header() -> Vec<(&'static str, String)> {
    vec![("x-webhook-secret", SECRET.to_owned())]
}

/// Standard Webhooks headers for `body`, sent `age_secs` ago.
fn signed(id: &str, body: &str, age_secs: i64) -> Vec<(&'static str, String)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let timestamp = (now - age_secs).to_string();
    let signature = signature_header(&Secret::new(SECRET), id, &timestamp, body.as_bytes());
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", signature),
    ]
}

async fn post(host: &TestHost, headers: &[(&str, String)], body: &str) -> (u16, Value) {
    let (status, body, _) = send(host, reqwest::Method::POST, headers, body).await;
    (status, body)
}

async fn running(host: &TestHost, id: &str) -> bool {
    host.orchestrator
        .get(&StoreId::new(id).unwrap())
        .await
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_secret_is_401_and_changes_nothing() {
    let host = host().await;
    let body = event("workspace.created", "ws-intruder");
    let (status, answer) = post(&host, &[("x-webhook-secret", "guess".into())], &body).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["error"]["code"], "unauthorized");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Unauthorized"),
        "{answer}"
    );
    let (status, _) = post(&host, &[], &body).await;
    assert_eq!(status, 401);
    let (status, _) = post(&host, &signed("msg-x", &body, 0)[..2], &body).await;
    assert_eq!(
        status, 401,
        "a signature header set without the signature is refused"
    );
    assert!(!running(&host, "ws-intruder").await);
    assert!(
        host.orchestrator.is_empty().await,
        "nothing was provisioned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_get_400_with_the_reason_and_invalid_ids_422() {
    let host = host().await;
    let cases = [
        ("{not json", "Invalid JSON payload"),
        ("[1,2]", "Invalid JSON payload"),
        (
            r#"{"event":"workspace.renamed","instanceId":"ws-one"}"#,
            "Unsupported event type",
        ),
        (r#"{"instanceId":"ws-one"}"#, "Unsupported event type"),
        (r#"{"event":"workspace.created"}"#, "instanceId is required"),
        (
            r#"{"event":"workspace.created","instanceId":""}"#,
            "instanceId is required",
        ),
    ];
    for (body, reason) in cases {
        let (status, answer) = post(&host, &secret_header(), body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(reason),
            "{body}: {answer}"
        );
    }
    for bad_id in ["../etc", "a", "has space", "x/../../y"] {
        let (status, answer) =
            post(&host, &secret_header(), &event("workspace.created", bad_id)).await;
        assert_eq!(status, 422, "{bad_id}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("3 to 64 characters"),
            "the rule is in the message: {answer}"
        );
    }
    assert!(host.orchestrator.is_empty().await);
    assert!(
        !host.data_dir.join("etc").exists() && !host.data_dir.join("stores/a").exists(),
        "an invalid id never becomes a path"
    );
}

/// An `instanceId` with spaces around it is refused, not trimmed: the reconciler reads the
/// registry's `" ws-1 "` as it is (invalid, skipped), so a trimmed `ws-1` would be an orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_id_with_spaces_around_it_is_refused_not_trimmed() {
    let host = host().await;
    for padded in [" ws-1 ", "ws-1 ", "\tws-1", "ws-1\n"] {
        let (status, answer) =
            post(&host, &secret_header(), &event("workspace.created", padded)).await;
        assert_eq!(status, 422, "{padded:?}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_store_id", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("3 to 64 characters")
                && message.contains("spaces around it")
                && message.contains(r#"send "ws-1""#),
            "the message names the rule, the spaces and the id without them: {message}"
        );
    }
    assert!(!running(&host, "ws-1").await);
    assert!(host.orchestrator.is_empty().await, "nothing was created");

    // Nor does a padded `workspace.deleted` remove the store of the id without the spaces.
    let (status, answer) = post(&host, &secret_header(), &event("workspace.created", "ws-1")).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post(
        &host,
        &secret_header(),
        &event("workspace.deleted", " ws-1 "),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_store_id", "{answer}");
    assert!(running(&host, "ws-1").await, "ws-1 still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_already_monitored_deleted_already_stopped() {
    let host = host().await;
    let created = event("workspace.created", "ws-alpha");
    let (status, answer) = post(&host, &secret_header(), &created).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "monitoring_started");
    assert_eq!(answer["storeId"], "ws-alpha");
    assert!(
        answer["receivedAt"].as_str().unwrap().ends_with('Z'),
        "{answer}"
    );

    // The store runs and accepts events right away, on the default plugin.
    host.append("ws-alpha", "kv.put", json!({"key": "k", "value": 1}))
        .await;
    host.settle("ws-alpha").await;
    assert_eq!(host.query("ws-alpha", "count", json!({})).await["kv"], 1);
    let (_, view) = host.get("/v1/stores/ws-alpha").await;
    assert_eq!(view["source"], "webhook");

    let (status, answer) = post(&host, &secret_header(), &created).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("already_monitored"))
    );

    let deleted = event("workspace.deleted", "ws-alpha");
    let (status, answer) = post(&host, &secret_header(), &deleted).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("monitoring_stopped"))
    );
    assert!(!running(&host, "ws-alpha").await);
    let archive = std::fs::read_dir(host.data_dir.join("archive"))
        .expect("the deleted store's data is archived")
        .count();
    assert_eq!(archive, 1);

    let (status, answer) = post(&host, &secret_header(), &deleted).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("already_stopped"))
    );

    let (status, summary) = host.get("/stores").await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["totalProvisioned"], 1);
    assert_eq!(summary["totalDeprovisioned"], 1);
    assert_eq!(summary["monitoredStoreIds"], json!([]));
    assert!(summary["lastProvisionedAt"].is_i64() && summary["lastDeprovisionedAt"].is_i64());
    // `/health` says the same, though the store is gone.
    let (_, health) = host.get("/health").await;
    assert_eq!(
        health["lastProvisionedAt"], summary["lastProvisionedAt"],
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_are_verified_and_a_replayed_id_gets_the_first_answer() {
    let host = host().await;
    let created = event("workspace.created", "ws-signed");
    let (status, first) = post(&host, &signed("msg-1", &created, 0), &created).await;
    assert_eq!(
        (status, first["status"].as_str()),
        (200, Some("monitoring_started")),
        "{first}"
    );

    let tampered = event("workspace.created", "ws-tampered");
    let (status, _) = post(&host, &signed("msg-2", &created, 0), &tampered).await;
    assert_eq!(status, 401, "a body other than the signed one is refused");
    assert!(!running(&host, "ws-tampered").await);

    let old = event("workspace.created", "ws-old");
    let (status, answer) = post(&host, &signed("msg-3", &old, 330), &old).await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tolerance"),
        "{answer}"
    );
    let (status, _) = post(&host, &signed("msg-4", &old, -330), &old).await;
    assert_eq!(status, 401, "a timestamp from the future is refused too");
    assert!(!running(&host, "ws-old").await);

    let deleted = event("workspace.deleted", "ws-signed");
    let (status, stopped) = post(&host, &signed("msg-5", &deleted, 0), &deleted).await;
    assert_eq!(
        (status, stopped["status"].as_str()),
        (200, Some("monitoring_stopped"))
    );

    // msg-1 delivered again: its first answer, and the store does not come back.
    let (status, again) = post(&host, &signed("msg-1", &created, 0), &created).await;
    assert_eq!(status, 200);
    assert_eq!(again, first, "the first answer, receivedAt included");
    assert!(
        !running(&host, "ws-signed").await,
        "a replay changes nothing"
    );

    // A replayed id with a bad signature is still refused (replays need valid credentials).
    let (status, _) = post(&host, &signed("msg-1", &created, 0), &tampered).await;
    assert_eq!(status, 401);

    // The shared secret still works next to signatures, unless signatures are required.
    let other = event("workspace.created", "ws-shared");
    let (status, _) = post(&host, &secret_header(), &other).await;
    assert_eq!(status, 200);
}

/// Webhooks are applied in the order of their payloads' `timestamp`: a `workspace.created`
/// delayed (or retried after a refusal) past the `workspace.deleted` that followed it changes
/// nothing and is answered with the store's state, where it brought the deleted workspace's
/// store back. And a delivery is its `webhook-id` with its body: two messages a sender gave
/// one unsigned id are both applied, where the second got the first's answer and was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_older_than_the_last_applied_changes_nothing_and_ids_go_with_bodies() {
    let host = host().await;
    let at = |event: &str, id: &str, timestamp: &str| {
        json!({"event": event, "instanceId": id, "timestamp": timestamp}).to_string()
    };
    let created = at("workspace.created", "ws-order", "2026-12-07T12:00:00Z");
    let (status, body) = post(&host, &secret_header(), &created).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_started"))
    );
    let deleted = at("workspace.deleted", "ws-order", "2026-12-07T12:00:10.5Z");
    let (status, body) = post(&host, &secret_header(), &deleted).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_stopped"))
    );

    // The creation again, retried late (and one of the same instant in another zone's time).
    for late in [
        created,
        at("workspace.created", "ws-order", "2026-12-07T13:00:10+01:00"),
    ] {
        let (status, body) = post(&host, &secret_header(), &late).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("already_stopped")),
            "{late}"
        );
        assert!(
            !running(&host, "ws-order").await,
            "{late} brought the store back"
        );
    }
    let again = at("workspace.created", "ws-order", "2026-12-07T12:05:00Z");
    let (status, body) = post(&host, &secret_header(), &again).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_started"))
    );

    // Stamped far ahead of the host's clock: applied, but in no order (it would hold back
    // every later webhook of the store).
    let ahead = at("workspace.created", "ws-ahead", "2099-01-01T00:00:00Z");
    let (status, body) = post(&host, &secret_header(), &ahead).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_started"))
    );
    let now = at("workspace.deleted", "ws-ahead", "2026-12-07T12:00:00Z");
    let (status, body) = post(&host, &secret_header(), &now).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_stopped")),
        "{body}"
    );

    // Stamped a little ahead (a sender's clock four minutes fast, within the tolerance), then
    // deleted by a sender whose clock is right: the deletion applies. Before, it was taken for
    // older than the creation and the deleted workspace's store kept running.
    let stamp = |offset_secs: i64| {
        (chrono::Utc::now() + chrono::Duration::seconds(offset_secs))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let fast = at("workspace.created", "ws-skewed", &stamp(240));
    let (status, body) = post(&host, &secret_header(), &fast).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_started"))
    );
    let right = at("workspace.deleted", "ws-skewed", &stamp(0));
    let (status, body) = post(&host, &secret_header(), &right).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_stopped")),
        "{body}"
    );
    assert!(!running(&host, "ws-skewed").await);
    // And a creation older than that deletion still changes nothing.
    let late = at("workspace.created", "ws-skewed", &stamp(-60));
    let (status, body) = post(&host, &secret_header(), &late).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("already_stopped")),
        "{body}"
    );

    // An answer kept under the id alone, by a host before ids went with bodies.
    let kept = storehost_control::registry::WebhookAnswer {
        status: 200,
        body: json!({"Ok": {"status": "monitoring_started", "storeId": "ws-kept", "receivedAt": "2026-12-07T00:00:00.000Z"}}).to_string(),
    };
    host.orchestrator
        .registry()
        .record_webhook_answer("legacy-id", &kept, 0)
        .unwrap();
    let mut legacy = secret_header();
    legacy.push(("webhook-id", "legacy-id".to_owned()));
    let (status, body) = post(&host, &legacy, &event("workspace.deleted", "ws-kept")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("monitoring_started")),
        "{body}"
    );

    let mut first = secret_header();
    first.push(("webhook-id", "reused".to_owned()));
    for id in ["ws-plain-a", "ws-plain-b"] {
        let (status, body) = post(&host, &first, &event("workspace.created", id)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["storeId"], id, "{body}");
        assert!(running(&host, id).await, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_requires_signatures_refuses_the_shared_secret() {
    let host = host_with(
        settings(Some(SECRET), true),
        10_000,
        ControlHostOptions::default(),
    )
    .await;
    let body = event("workspace.created", "ws-strict");
    let (status, answer) = post(&host, &secret_header(), &body).await;
    assert_eq!(status, 401, "{answer}");
    assert!(!running(&host, "ws-strict").await);
    let (status, answer) = post(&host, &signed("msg-strict", &body, 0), &body).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("monitoring_started"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_webhooks_answer_500_and_other_methods_405() {
    let host = host_with(settings(None, false), 10_000, ControlHostOptions::default()).await;
    let body = event("workspace.created", "ws-none");
    let (status, answer) = post(&host, &secret_header(), &body).await;
    assert_eq!(status, 500, "{answer}");
    assert_eq!(answer["error"]["code"], "webhook_not_configured");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WEBHOOK_SECRET")
    );
    assert!(!running(&host, "ws-none").await);

    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let (status, answer, headers) = send(&host, method.clone(), &secret_header(), &body).await;
        assert_eq!(status, 405, "{method}: {answer}");
        assert_eq!(headers["allow"], "POST");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_its_rate_gets_429_with_retry_after() {
    let host = host_with(
        settings(Some(SECRET), false),
        3,
        ControlHostOptions::default(),
    )
    .await;
    let mut statuses = Vec::new();
    let mut refusals = Vec::new();
    for i in 0..6 {
        let body = event("workspace.created", &format!("ws-rate-{i}"));
        let (status, answer, headers) =
            send(&host, reqwest::Method::POST, &secret_header(), &body).await;
        statuses.push(status);
        if status == 429 {
            refusals.push((answer, headers.get("retry-after").cloned()));
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    for (answer, retry_after) in refusals {
        let secs: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
        // Three a minute: the next is let in at most 20 s after the first.
        assert!((1..=20).contains(&secs), "{secs}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("retry after {secs} s")),
            "{message}"
        );
    }
    assert_eq!(
        host.orchestrator.len().await,
        3,
        "refused calls provision nothing"
    );
}

/// Requests that fail authentication are paced apart from those that pass: a flood of
/// forgeries from the address the provisioning service also sends from (a shared load
/// balancer, here loopback) leaves its webhooks their budget, and guessing the secret is paced
/// all the same. Before, one budget per address: the sixth forgery below took the real
/// webhooks' place and they answered 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_from_a_shared_address_leave_real_webhooks_their_budget() {
    let host = host_with(
        settings(Some(SECRET), false),
        3,
        ControlHostOptions::default(),
    )
    .await;
    let wrong = vec![("x-webhook-secret", "not-the-secret".to_owned())];
    let mut forged = Vec::new();
    for i in 0..6 {
        let body = event("workspace.created", &format!("ws-forged-{i}"));
        let (status, answer, headers) = send(&host, reqwest::Method::POST, &wrong, &body).await;
        forged.push(status);
        if status == 429 {
            assert!(headers.contains_key("retry-after"), "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains("failing authentication"), "{message}");
        }
    }
    assert_eq!(forged, [401, 401, 401, 429, 429, 429]);
    for i in 0..3 {
        let body = event("workspace.created", &format!("ws-real-{i}"));
        let (status, answer, _) = send(&host, reqwest::Method::POST, &secret_header(), &body).await;
        assert_eq!(status, 200, "real webhook {i}: {answer}");
    }
    assert_eq!(
        host.orchestrator.len().await,
        3,
        "the forgeries provisioned nothing"
    );
}

/// A webhook that reaches a host shutting down gets 503 `shutting_down`, which the
/// provisioning service retries, and starts nothing. Before, it was a 500 `internal`,
/// logged as a failure of the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_shutting_down_answers_webhooks_with_503() {
    let host = host_with(
        settings(Some(SECRET), false),
        10_000,
        ControlHostOptions::default(),
    )
    .await;
    host.orchestrator.stop_starting();
    let created = event("workspace.created", "ws-late");
    let (status, answer) = post(&host, &secret_header(), &created).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "shutting_down", "{answer}");
    assert!(!running(&host, "ws-late").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_host_answers_503_and_a_config_owned_store_is_not_deleted() {
    let host = host_with(
        settings(Some(SECRET), false),
        10_000,
        ControlHostOptions {
            max_stores: 2,
            ..ControlHostOptions::default()
        },
    )
    .await;
    let spec = host.orchestrator.settings().defaults.clone();
    host.orchestrator
        .ensure_running(
            &StoreId::new("from-config").unwrap(),
            spec,
            StoreSource::Config,
        )
        .await
        .unwrap();
    let (status, _) = post(
        &host,
        &secret_header(),
        &event("workspace.created", "ws-fits"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, answer) = post(
        &host,
        &secret_header(),
        &event("workspace.created", "ws-overflow"),
    )
    .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "at_capacity");
    assert!(!running(&host, "ws-overflow").await);

    let (status, answer) = post(
        &host,
        &secret_header(),
        &event("workspace.deleted", "from-config"),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    // A host without a config file runs the embedded default's stores, and says so.
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("declared in the embedded default config")
            && message.contains("--config FILE"),
        "{message}"
    );
    assert!(running(&host, "from-config").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_stores_and_answers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = ControlHostOptions {
        data_dir: Some(dir.path().join("data")),
        ..ControlHostOptions::default()
    };
    let first_host = host_with(settings(Some(SECRET), false), 10_000, options.clone()).await;
    let created = event("workspace.created", "ws-durable");
    let (status, first) = post(&first_host, &signed("msg-durable", &created, 0), &created).await;
    assert_eq!(status, 200, "{first}");
    first_host
        .append(
            "ws-durable",
            "kv.put",
            json!({"key": "kept", "value": "seven"}),
        )
        .await;
    first_host.settle("ws-durable").await;
    first_host.stop().await;

    let host = host_with(settings(Some(SECRET), false), 10_000, options).await;
    assert_eq!(host.orchestrator.restore_persisted().await.unwrap(), 1);
    let (_, view) = host.get("/v1/stores/ws-durable").await;
    assert_eq!(view["source"], "webhook", "{view}");
    assert_eq!(
        host.query("ws-durable", "get", json!({"key": "kept"}))
            .await["value"],
        "seven"
    );
    let (status, again) = post(&host, &signed("msg-durable", &created, 0), &created).await;
    assert_eq!(
        (status, &again),
        (200, &first),
        "the replay answer is kept in host.db"
    );
}

/// `METHOD path` against a spawned server with the given headers; answers status and JSON.
async fn call_process(
    url: &str,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, String)],
    body: Option<String>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{url}{path}"));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_provisions_by_webhook_and_a_restart_keeps_the_set() {
    use storehost_tests::process::{PROCESS_TOKEN, ServerProcess};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [("WEBHOOK_SECRET", SECRET)];
    let server = ServerProcess::spawn(&data, &[], &env);
    let admin = [("authorization", format!("Bearer {PROCESS_TOKEN}"))];
    let created = event("workspace.created", "ws-binary");
    let (status, answer) = call_process(
        &server.url,
        reqwest::Method::POST,
        "/webhooks/workspaces",
        &signed("msg-binary", &created, 0),
        Some(created.clone()),
    )
    .await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("monitoring_started")),
        "{answer}"
    );
    let (status, _) = call_process(
        &server.url,
        reqwest::Method::POST,
        "/webhooks/workspaces",
        &[("x-webhook-secret", "wrong".to_owned())],
        Some(event("workspace.created", "ws-not-me")),
    )
    .await;
    assert_eq!(status, 401);
    let (_, summary) =
        call_process(&server.url, reqwest::Method::GET, "/stores", &admin, None).await;
    assert_eq!(
        summary["totalProvisioned"], 4,
        "3 demo stores and the webhook's: {summary}"
    );
    server.stop_cleanly();

    let server = ServerProcess::spawn(&data, &[], &env);
    let (_, view) = call_process(
        &server.url,
        reqwest::Method::GET,
        "/v1/stores/ws-binary",
        &admin,
        None,
    )
    .await;
    assert_eq!(view["source"], "webhook", "{view}");
    let (status, again) = call_process(
        &server.url,
        reqwest::Method::POST,
        "/webhooks/workspaces",
        &signed("msg-binary", &created, 0),
        Some(created),
    )
    .await;
    assert_eq!(
        (status, &again),
        (200, &answer),
        "the replay answer survived the restart"
    );
    let (_, health) = call_process(&server.url, reqwest::Method::GET, "/health", &[], None).await;
    let ids = health["monitoredStoreIds"].as_array().unwrap();
    assert!(
        ids.contains(&json!("ws-binary")) && !ids.contains(&json!("ws-not-me")),
        "{health}"
    );
    server.stop_cleanly();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_webhook_body_is_refused_with_413() {
    let host = host().await;
    let huge = json!({"event": "workspace.created", "instanceId": "ws-huge", "pad": "x".repeat(100 << 10)})
        .to_string();
    let (status, answer) = post(&host, &secret_header(), &huge).await;
    assert_eq!(status, 413, "{answer}");
    assert!(!running(&host, "ws-huge").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_transitions_are_recorded_and_a_store_that_cannot_open_shows_as_failed() {
    let host = host().await;
    let (status, _) = post(
        &host,
        &secret_header(),
        &event("workspace.created", "ws-life"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = host
        .call(
            reqwest::Method::PUT,
            "/v1/stores/ws-life",
            Some(json!({"config": {"mode": "b"}})),
        )
        .await;
    assert_eq!(status, 200);
    for action in ["pause", "resume"] {
        let (status, answer) = host
            .post(&format!("/v1/stores/ws-life/{action}"), json!({}))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let (_, view) = host.get("/v1/stores/ws-life").await;
    let states: Vec<&str> = view["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["provisioning", "running", "updated", "paused", "resumed"],
        "{view}"
    );
    assert_eq!(view["transitions"][0]["detail"], "webhook");
    assert!(view["transitions"][1]["at"].is_i64());

    // A plain file where the store's directory should be: the store cannot open.
    std::fs::create_dir_all(host.data_dir.join("stores")).unwrap();
    std::fs::write(host.data_dir.join("stores/ws-blocked"), b"in the way").unwrap();
    let (status, answer) = post(
        &host,
        &secret_header(),
        &event("workspace.created", "ws-blocked"),
    )
    .await;
    assert_eq!(status, 500, "{answer}");
    let (_, health) = host.get("/health").await;
    assert_eq!(health["stores"]["failed"], 1, "{health}");
    assert_eq!(health["status"], "degraded");

    // Cleared by a successful start.
    std::fs::remove_file(host.data_dir.join("stores/ws-blocked")).unwrap();
    let (status, answer) = post(
        &host,
        &secret_header(),
        &event("workspace.created", "ws-blocked"),
    )
    .await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("monitoring_started"))
    );
    let (_, health) = host.get("/health").await;
    assert!(health["stores"]["failed"].is_null(), "{health}");
    assert_eq!(health["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_start_a_store_once() {
    let host = Arc::new(host().await);
    let created = event("workspace.created", "ws-race");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (host, created) = (host.clone(), created.clone());
        tasks.push(tokio::spawn(async move {
            // Half share one webhook-id (redeliveries), half are distinct deliveries.
            let headers = if i % 2 == 0 {
                signed("msg-race", &created, 0)
            } else {
                secret_header()
            };
            (i % 2 == 0, post(&host, &headers, &created).await)
        }));
    }
    let mut started = 0;
    let mut replayed = Vec::new();
    for task in tasks {
        let (same_id, (status, answer)) = task.await.unwrap();
        if same_id {
            replayed.push(answer.clone());
        }
        assert_eq!(status, 200, "{answer}");
        match answer["status"].as_str().unwrap() {
            "monitoring_started" => started += 1,
            "already_monitored" => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(started >= 1, "the store started");
    assert!(
        replayed.windows(2).all(|w| w[0] == w[1]),
        "every delivery of msg-race got its first answer: {replayed:?}"
    );
    let (_, summary) = host.get("/stores").await;
    assert_eq!(
        summary["totalProvisioned"], 1,
        "started exactly once: {summary}"
    );
    assert_eq!(summary["monitoredStoreIds"], json!(["ws-race"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_on_a_full_disk_is_507_disk_full_and_succeeds_once_space_returns() {
    let data = tempfile::tempdir().unwrap();
    let Some(_small) = storehost_tests::fs::Tmpfs::mount(data.path(), "16m") else {
        eprintln!("skipped: could not mount a tmpfs (needs root or CAP_SYS_ADMIN)");
        return;
    };
    let host = host_with(
        settings(Some(SECRET), false),
        10_000,
        ControlHostOptions {
            data_dir: Some(data.path().to_owned()),
            ..ControlHostOptions::default()
        },
    )
    .await;
    let (status, answer) = post(&host, &secret_header(), &event("workspace.created", "w-1")).await;
    assert_eq!(status, 200, "{answer}");

    let hog = storehost_tests::fs::fill(&data.path().join("hog"));
    // w-1 may still give back space as it settles (a checkpoint truncating its log's WAL):
    // what it gave back is taken too. (Under load, w-2 once fitted in it.)
    host.settle("w-1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let top_up = storehost_tests::fs::fill(&data.path().join("hog-top-up"));
    let (status, answer) = post(&host, &secret_header(), &event("workspace.created", "w-2")).await;
    assert_eq!(status, 507, "{answer}");
    assert_eq!(answer["error"]["code"], "disk_full", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("w-2") && message.contains("free space"),
        "says what failed and what to do: {message}"
    );
    assert!(
        !running(&host, "w-2").await,
        "a store that could not be created does not run"
    );
    assert!(
        running(&host, "w-1").await,
        "the stores already running go on"
    );

    std::fs::remove_file(hog).unwrap();
    std::fs::remove_file(top_up).unwrap();
    let (status, answer) = post(&host, &secret_header(), &event("workspace.created", "w-2")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "monitoring_started");
    host.append("w-2", "kv.put", json!({"key": "a", "value": 1}))
        .await;
    host.settle("w-2").await;
    assert_eq!(host.query("w-2", "count", json!({})).await["kv"], 1);
}

/// A store `STORE_IDS` declares (source `env`) is owned like a config file's: a
/// `workspace.deleted` webhook gets 409 naming `STORE_IDS`, and the store keeps running with
/// its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_store_ids_is_not_deleted_by_a_webhook() {
    let host = host().await;
    let spec = host.orchestrator.settings().defaults.clone();
    host.orchestrator
        .ensure_running(&StoreId::new("from-env").unwrap(), spec, StoreSource::Env)
        .await
        .unwrap();
    host.append("from-env", "kv.put", json!({"key": "k", "value": "kept"}))
        .await;
    host.settle("from-env").await;

    let (status, answer) = post(
        &host,
        &secret_header(),
        &event("workspace.deleted", "from-env"),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("STORE_IDS"),
        "{answer}"
    );
    assert!(running(&host, "from-env").await);
    let (_, view) = host.get("/v1/stores/from-env").await;
    assert_eq!(view["source"], "env", "{view}");
    assert_eq!(
        host.query("from-env", "get", json!({"key": "k"})).await["value"],
        "kept"
    );
    assert!(
        !host.data_dir.join("archive").exists()
            || std::fs::read_dir(host.data_dir.join("archive"))
                .unwrap()
                .next()
                .is_none(),
        "nothing was archived"
    );
}
