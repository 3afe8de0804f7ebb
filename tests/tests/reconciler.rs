//! The reconciler against a local HTTP server that plays the workspace registry (axum on
//! 127.0.0.1:0): adds missing stores, follows pages, skips invalid entries, removes orphans
//! only after the grace period, reports failing adds, removes nothing while the registry is
//! down or answers suspiciously little (the scheduled loop retrying after 5 s, doubling, rather
//! than after its interval), and never touches config-owned stores. Plus
//! `POST /admin/reconcile` with its 200/401/409/429/503 answers and `/health`'s status.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use storehost_control::StoreSource;
use storehost_control::config::Secret;
use storehost_control::reconciler::{
    ReconcileError, Reconciler, ReconcilerSettings, ReconcilerStatus,
};
use storehost_store::StoreId;
use storehost_tests::TestHost;
use storehost_tests::control::{ControlHostOptions, eventually};

const BYPASS: &str = "bypass-token-for-tests";

/// What the fake registry answers.
#[derive(Default)]
struct Registry {
    workspaces: Vec<Value>,
    page_size: usize,
    failing: bool,
    /// When set, each request waits for a permit of it.
    hold: Option<Arc<tokio::sync::Semaphore>>,
    requests: usize,
    /// When each request arrived.
    arrivals: Vec<Instant>,
    tokens: Vec<Option<String>>,
}

type Shared = Arc<Mutex<Registry>>;

async fn workspaces(
    State(registry): State<Shared>,
    Query(query): Query<std::collections::HashMap<String, usize>>,
    headers: HeaderMap,
) -> Response {
    let hold = {
        let mut r = registry.lock().unwrap();
        r.requests += 1;
        r.arrivals.push(Instant::now());
        r.tokens.push(
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        );
        r.hold.clone()
    };
    if let Some(hold) = hold {
        hold.acquire().await.unwrap().forget();
    }
    let r = registry.lock().unwrap();
    if r.failing {
        return (StatusCode::SERVICE_UNAVAILABLE, "registry down").into_response();
    }
    let page = query.get("page").copied().unwrap_or(0);
    let size = if r.page_size == 0 {
        usize::MAX
    } else {
        r.page_size
    };
    let items: Vec<Value> = r
        .workspaces
        .iter()
        .skip(page * size)
        .take(size)
        .cloned()
        .collect();
    let more = r.page_size > 0 && (page + 1) * size < r.workspaces.len();
    let mut body = json!({ "workspaces": items });
    if more {
        body["next"] = json!(format!("/internal/workspaces?page={}", page + 1));
    }
    axum::Json(body).into_response()
}

/// Starts the fake registry; answers its base URL and its state.
async fn registry(ids: &[&str]) -> (String, Shared) {
    let shared: Shared = Arc::new(Mutex::new(Registry {
        workspaces: ids
            .iter()
            .map(|id| json!({"instanceId": id, "name": id}))
            .collect(),
        ..Registry::default()
    }));
    let app = axum::Router::new()
        .route("/internal/workspaces", get(workspaces))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, shared)
}

fn set_ids(registry: &Shared, ids: &[&str]) {
    registry.lock().unwrap().workspaces = ids.iter().map(|id| json!({"instanceId": id})).collect();
}

struct Setup {
    host: TestHost,
    reconciler: Arc<Reconciler>,
}

fn settings(url: &str, grace: Duration, manual_min_interval: Duration) -> ReconcilerSettings {
    ReconcilerSettings {
        url: url.to_owned(),
        token: Some(Secret::new(BYPASS)),
        interval: Duration::from_secs(3600),
        grace_period: grace,
        max_removal_share: 0.5,
        manual_min_interval,
        request_timeout: Duration::from_secs(30),
    }
}

async fn setup(settings: ReconcilerSettings, max_stores: usize) -> Setup {
    let mut reconciler = None;
    let host = TestHost::start_control(
        ControlHostOptions {
            max_stores,
            ..ControlHostOptions::default()
        },
        |orchestrator, state| {
            let r = Reconciler::new(orchestrator.clone(), settings);
            reconciler = Some(r.clone());
            state
                .with_reconciler(r)
                .with_bypass_token(Some(&Secret::new(BYPASS)))
        },
    )
    .await;
    Setup {
        host,
        reconciler: reconciler.unwrap(),
    }
}

async fn running(host: &TestHost) -> Vec<String> {
    host.orchestrator
        .ids()
        .await
        .iter()
        .map(ToString::to_string)
        .collect()
}

async fn manual(host: &TestHost, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let mut request = host.client.post(format!("{}/admin/reconcile", host.url));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        retry_after,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_pass_needs_a_token_reports_its_result_and_is_paced() {
    let (url, registry) = registry(&["ws-a", "ws-b"]).await;
    let s = setup(settings(&url, Duration::ZERO, Duration::from_secs(60)), 100).await;
    let host = &s.host;

    let (status, _, _) = manual(host, &[]).await;
    assert_eq!(status, 401);
    let (status, _, _) = manual(host, &[("authorization", "Bearer wrong")]).await;
    assert_eq!(status, 401);
    let (status, _, _) = manual(host, &[("x-server-token", "wrong")]).await;
    assert_eq!(status, 401);
    assert!(
        running(host).await.is_empty(),
        "refused calls change nothing"
    );

    let (status, body, _) = manual(host, &[("x-server-token", BYPASS)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["result"]["added"], json!(["ws-a", "ws-b"]));
    assert_eq!(body["result"]["removed"], json!([]));
    assert_eq!(body["result"]["failedAdds"], json!([]));
    assert_eq!(body["result"]["failedRemovals"], json!([]));
    assert_eq!(body["result"]["authoritativeCount"], 2);
    assert_eq!(body["result"]["monitoredCount"], 0);
    assert_eq!(body["driftCount"], 2);
    assert!(
        body["durationMs"].is_u64() && body["triggeredAt"].is_string(),
        "{body}"
    );
    assert_eq!(running(host).await, ["ws-a", "ws-b"]);
    let (_, view) = host.get("/v1/stores/ws-a").await;
    assert_eq!(view["source"], "registry");
    assert_eq!(
        registry.lock().unwrap().tokens.last().unwrap().as_deref(),
        Some(&*format!("Bearer {BYPASS}")),
        "the registry is called with SERVER_BYPASS_TOKEN"
    );

    for auth in [
        ("authorization", format!("Bearer {BYPASS}")),
        (
            "authorization",
            format!("Bearer {}", storehost_tests::TOKEN),
        ),
    ] {
        let (status, body, retry_after) = manual(host, &[(auth.0, &auth.1)]).await;
        assert_eq!(status, 429, "{body}");
        let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&secs), "{secs}");
        // The message names the wait the header does (it rounded down where the header rounds up).
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("retry in {secs} s")), "{message}");
    }

    let (_, health) = host.get("/health").await;
    let reconciler = &health["reconciler"];
    assert_eq!(reconciler["enabled"], true);
    assert!(reconciler["lastSuccessAt"].is_i64(), "{reconciler}");
    assert!(reconciler["lastRunAt"].is_i64());
    assert!(reconciler["lastError"].is_null());
    assert_eq!(reconciler["drift"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pass_while_one_runs_gets_409() {
    let (url, registry) = registry(&["ws-slow"]).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    registry.lock().unwrap().hold = Some(gate.clone());
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    let host = Arc::new(s.host);

    let first = {
        let host = host.clone();
        tokio::spawn(async move { manual(&host, &[("x-server-token", BYPASS)]).await })
    };
    eventually("the first pass reaches the registry", || async {
        registry.lock().unwrap().requests == 1
    })
    .await;
    let (status, body, _) = manual(&host, &[("x-server-token", BYPASS)]).await;
    assert_eq!(status, 409, "{body}");
    assert!(matches!(
        s.reconciler.run_pass().await,
        Err(ReconcileError::Busy)
    ));
    let (_, health) = host.get("/health").await;
    assert_eq!(health["reconciler"]["running"], true);

    registry.lock().unwrap().hold = None;
    gate.add_permits(1);
    let (status, body, _) = first.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["added"], json!(["ws-slow"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_registry_manual_reconcile_is_503() {
    let host = TestHost::start_control(ControlHostOptions::default(), |_, state| state).await;
    let (status, body, _) = manual(
        &host,
        &[(
            "authorization",
            &format!("Bearer {}", storehost_tests::TOKEN),
        )],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("AUTH_WORKER_INTERNAL_URL")
    );
    let (_, health) = host.get("/health").await;
    assert_eq!(health["reconciler"]["enabled"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_followed_invalid_entries_skipped_and_failing_adds_reported() {
    let (url, registry) = registry(&[]).await;
    {
        let mut r = registry.lock().unwrap();
        r.page_size = 2;
        r.workspaces = vec![
            json!({"instanceId": "page-one"}),
            json!({"instanceId": "../escape"}),
            json!({"name": "no id"}),
            json!({"instanceId": "page-two"}),
            json!({"instanceId": "page-three"}),
        ];
    }
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 2).await;
    let report = s.reconciler.run_pass().await.unwrap();
    assert_eq!(registry.lock().unwrap().requests, 3, "three pages read");
    let result = &report.result;
    assert_eq!(result.authoritative_count, 3);
    assert_eq!(result.skipped_entries, 2);
    assert_eq!(result.added.len(), 2, "{result:?}");
    assert_eq!(
        result.failed_adds.len(),
        1,
        "the host holds 2 stores: {result:?}"
    );
    assert!(
        result.failed_adds[0].error.contains("maximum"),
        "{result:?}"
    );
    assert_eq!(running(&s.host).await.len(), 2);
    let status = s.reconciler.status();
    assert!(status.last_error.unwrap().contains("could not be added"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_is_kept_through_its_grace_period_and_config_stores_are_never_removed() {
    let (url, registry) = registry(&["keep-a", "keep-b", "maybe-c"]).await;
    let s = setup(
        settings(&url, Duration::from_secs(24 * 3600), Duration::ZERO),
        100,
    )
    .await;
    let host = &s.host;
    let spec = host.orchestrator.settings().defaults.clone();
    host.orchestrator
        .ensure_running(
            &StoreId::new("config-owned").unwrap(),
            spec,
            StoreSource::Config,
        )
        .await
        .unwrap();
    s.reconciler.run_pass().await.unwrap();
    host.append("maybe-c", "kv.put", json!({"key": "k", "value": "kept"}))
        .await;
    host.settle("maybe-c").await;

    set_ids(&registry, &["keep-a", "keep-b"]);
    let report = s.reconciler.run_pass().await.unwrap();
    assert_eq!(report.result.pending_removals, ["maybe-c"]);
    assert!(report.result.removed.is_empty());
    assert_eq!(
        running(host).await.len(),
        4,
        "the orphan stays during its grace period"
    );
    assert_eq!(s.reconciler.status().pending_removals, 1);

    set_ids(&registry, &["keep-a", "keep-b", "maybe-c"]);
    let report = s.reconciler.run_pass().await.unwrap();
    assert!(report.result.pending_removals.is_empty());
    assert_eq!(
        host.query("maybe-c", "get", json!({"key": "k"})).await["value"],
        "kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_an_orphan_is_removed_and_archived() {
    let (url, registry) = registry(&["stay-a", "stay-b", "gone-c"]).await;
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    let host = &s.host;
    let spec = host.orchestrator.settings().defaults.clone();
    host.orchestrator
        .ensure_running(
            &StoreId::new("from-config").unwrap(),
            spec,
            StoreSource::Config,
        )
        .await
        .unwrap();
    s.reconciler.run_pass().await.unwrap();
    set_ids(&registry, &["stay-a", "stay-b"]);
    let report = s.reconciler.run_pass().await.unwrap();
    assert_eq!(report.result.removed, ["gone-c"]);
    assert_eq!(report.drift_count, 1);
    assert_eq!(running(host).await, ["from-config", "stay-a", "stay-b"]);
    assert!(
        std::fs::read_dir(host.data_dir.join("archive"))
            .unwrap()
            .next()
            .is_some(),
        "its data is archived"
    );
}

/// A store removed and created again under its id while the registry lacks it gets a grace
/// period of its own: when the registry began to lack the old one is forgotten with it.
/// Before, the new store inherited that time, and a pass past the old one's grace period
/// removed the new one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_created_again_gets_a_grace_period_of_its_own() {
    let (url, registry) = registry(&["stay-a", "stay-b", "again-c"]).await;
    let grace = Duration::from_secs(2);
    let s = setup(settings(&url, grace, Duration::ZERO), 100).await;
    let host = &s.host;
    s.reconciler.run_pass().await.unwrap();
    set_ids(&registry, &["stay-a", "stay-b"]);
    let report = s.reconciler.run_pass().await.unwrap();
    assert_eq!(report.result.pending_removals, ["again-c"]);
    tokio::time::sleep(grace + Duration::from_millis(500)).await;
    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/again-c", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = host
        .call(reqwest::Method::PUT, "/v1/stores/again-c", None)
        .await;
    assert_eq!(status, 201, "{body}");

    let report = s.reconciler.run_pass().await.unwrap();
    assert!(
        report.result.removed.is_empty(),
        "the new store was removed at once: {:?}",
        report.result.removed
    );
    assert_eq!(report.result.pending_removals, ["again-c"]);
    assert!(running(host).await.contains(&"again-c".to_owned()));
}

/// A registry that does not answer fails a manual pass with a message that says it timed out
/// and which setting bounds the wait (it said only "error sending request"), and a pass the
/// registry failed holds back the operator's next one for 5 s, not for
/// `MANUAL_RECONCILE_MIN_INTERVAL_MS` (the 60 s began before the pass, and a retry right after
/// the registry was fixed got 429 for a minute); a pass that succeeded holds it back the whole
/// interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_registry_is_named_and_its_failure_does_not_hold_back_a_retry() {
    let (url, registry) = registry(&["ws-a"]).await;
    let hold = Arc::new(tokio::sync::Semaphore::new(0));
    registry.lock().unwrap().hold = Some(hold.clone());
    let mut settings = settings(&url, Duration::ZERO, Duration::from_secs(60));
    settings.request_timeout = Duration::from_millis(300);
    let s = setup(settings, 100).await;
    let token = [("x-server-token", BYPASS)];

    let (status, body, _) = manual(&s.host, &token).await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no answer within 300 ms") && message.contains("request_timeout_ms"),
        "{message}"
    );

    registry.lock().unwrap().hold = None;
    hold.add_permits(1);
    let (status, body, retry_after) = manual(&s.host, &token).await;
    assert_eq!(status, 429, "{body}");
    let wait: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(
        (1..=5).contains(&wait),
        "held back {wait} s after a failed pass"
    );
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, body, _) = manual(&s.host, &token).await;
    assert_eq!(
        status, 200,
        "the retry after a failed pass was held back: {body}"
    );
    assert_eq!(running(&s.host).await, ["ws-a"]);
    let (status, body, _) = manual(&s.host, &token).await;
    assert_eq!(status, 429, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_registry_removes_nothing_and_counts_failures() {
    let (url, registry) = registry(&["up-a", "up-b"]).await;
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    s.reconciler.run_pass().await.unwrap();
    registry.lock().unwrap().failing = true;
    for expected in 1..=2 {
        let err = s.reconciler.run_pass().await.unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(s.reconciler.status().consecutive_failures, expected);
    }
    assert_eq!(running(&s.host).await, ["up-a", "up-b"], "nothing removed");
    let (status, body, _) = manual(&s.host, &[("x-server-token", BYPASS)]).await;
    assert_eq!(status, 502, "{body}");
    let (_, health) = s.host.get("/health").await;
    assert!(
        health["reconciler"]["lastError"]
            .as_str()
            .unwrap()
            .contains("nothing was changed")
    );

    registry.lock().unwrap().failing = false;
    s.reconciler.run_pass().await.unwrap();
    let status = s.reconciler.status();
    assert_eq!(status.consecutive_failures, 0);
    assert!(status.last_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_answer_is_blocked_by_the_max_removal_guard() {
    let (url, registry) = registry(&["guard-a", "guard-b", "guard-c"]).await;
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    s.reconciler.run_pass().await.unwrap();
    set_ids(&registry, &[]);
    let report = s.reconciler.run_pass().await.unwrap();
    assert!(report.result.removed.is_empty());
    let blocked = report.result.removals_blocked.expect("blocked");
    assert!(blocked.contains("3 of the 3"), "{blocked}");
    assert_eq!(running(&s.host).await.len(), 3, "nothing removed");
    assert_eq!(
        report.result.pending_removals,
        ["guard-a", "guard-b", "guard-c"],
        "the blocked removals wait"
    );
    let (_, health) = s.host.get("/health").await;
    assert!(
        health["reconciler"]["lastError"]
            .as_str()
            .unwrap()
            .contains("removals blocked"),
        "{health}"
    );
    assert_eq!(health["reconciler"]["drift"], 3);
    assert_eq!(health["reconciler"]["pendingRemovals"], 3, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_pass_runs_at_start() {
    let (url, _registry) = registry(&["at-start"]).await;
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    let task = s.reconciler.spawn();
    eventually("the start-up pass adds the store", || async {
        running(&s.host).await == ["at-start"]
    })
    .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_reconciles_at_start_and_on_demand() {
    use storehost_tests::process::ServerProcess;
    let (url, registry) = registry(&["bin-ws-one", "bin-ws-two"]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(
        &dir.path().join("data"),
        &[],
        &[
            ("AUTH_WORKER_INTERNAL_URL", url.as_str()),
            ("SERVER_BYPASS_TOKEN", BYPASS),
            ("MANUAL_RECONCILE_MIN_INTERVAL_MS", "0"),
        ],
    );
    let client = reqwest::Client::new();
    let health = || async {
        client
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    eventually("the start-up pass adds the registry's stores", || async {
        let ids = health().await["monitoredStoreIds"].clone();
        ids.as_array().is_some_and(|ids| {
            ids.contains(&json!("bin-ws-one")) && ids.contains(&json!("bin-ws-two"))
        })
    })
    .await;
    let reconciler = health().await["reconciler"].clone();
    assert_eq!(reconciler["enabled"], true, "{reconciler}");
    assert!(reconciler["lastSuccessAt"].is_i64(), "{reconciler}");
    assert_eq!(
        registry.lock().unwrap().tokens[0].as_deref(),
        Some(&*format!("Bearer {BYPASS}"))
    );

    set_ids(&registry, &["bin-ws-one", "bin-ws-two", "bin-ws-three"]);
    let response = client
        .post(format!("{}/admin/reconcile", server.url))
        .header("x-server-token", BYPASS)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"]["added"], json!(["bin-ws-three"]), "{body}");
    // The embedded default's demo stores are config-owned: never orphans.
    assert_eq!(body["result"]["pendingRemovals"], json!([]), "{body}");
    server.stop_cleanly();
}

/// The removal guard's share is of the stores the reconciler manages: a host that declares as
/// many stores in its config as the registry gave it must still refuse to remove every
/// registry store on an empty answer (counting the config's stores, 3 of 6 passed the 50%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_removal_guard_counts_only_the_stores_a_pass_could_remove() {
    let (url, registry) = registry(&["reg-a", "reg-b", "reg-c"]).await;
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    let spec = s.host.orchestrator.settings().defaults.clone();
    for (id, source) in [
        ("cfg-a", StoreSource::Config),
        ("cfg-b", StoreSource::Config),
        ("env-c", StoreSource::Env),
    ] {
        s.host
            .orchestrator
            .ensure_running(&StoreId::new(id).unwrap(), spec.clone(), source)
            .await
            .unwrap();
    }
    s.reconciler.run_pass().await.unwrap();
    assert_eq!(running(&s.host).await.len(), 6);

    set_ids(&registry, &[]);
    let report = s.reconciler.run_pass().await.unwrap();
    let blocked = report.result.removals_blocked.expect("blocked");
    assert!(blocked.contains("3 of the 3"), "{blocked}");
    assert!(report.result.removed.is_empty());
    assert_eq!(running(&s.host).await.len(), 6, "nothing removed");

    // One registry store of three gone is within the share: removed, and the config's and
    // STORE_IDS's stores are never candidates.
    set_ids(&registry, &["reg-a", "reg-b"]);
    let report = s.reconciler.run_pass().await.unwrap();
    assert_eq!(report.result.removed, ["reg-c"]);
    assert_eq!(
        running(&s.host).await,
        ["cfg-a", "cfg-b", "env-c", "reg-a", "reg-b"]
    );
}

/// Every registry request carries SERVER_BYPASS_TOKEN, so a `next` link may not send the
/// pass to another host: the pass fails naming the link, and the other host gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_link_to_another_host_fails_the_pass_without_sending_the_token() {
    let (url, _registry) = registry(&["stays"]).await;
    let (elsewhere, elsewhere_state) = registry(&["stolen"]).await;
    let app = axum::Router::new().route(
        "/internal/workspaces",
        get(move || {
            let elsewhere = elsewhere.clone();
            async move {
                axum::Json(json!({
                    "workspaces": [{"instanceId": "first-page"}],
                    "next": format!("{elsewhere}/internal/workspaces?page=1"),
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let leaky = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    drop(url);

    let s = setup(settings(&leaky, Duration::ZERO, Duration::ZERO), 100).await;
    let err = s.reconciler.run_pass().await.unwrap_err().to_string();
    assert!(err.contains("leaves the registry"), "{err}");
    assert_eq!(
        elsewhere_state.lock().unwrap().requests,
        0,
        "the other host was never asked"
    );
    assert!(
        running(&s.host).await.is_empty(),
        "a failed pass adds nothing"
    );
}

/// A registry page is read up to 16 MiB: a larger answer fails the pass, saying so, instead
/// of being read whole into the host's memory (with or without a length given first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_page_larger_than_16_mib_fails_the_pass() {
    use futures::StreamExt;
    let huge = || {
        format!(
            r#"{{"workspaces":[{{"instanceId":"big","name":"{}"}}]}}"#,
            "x".repeat(storehost_control::reconciler::MAX_PAGE_BYTES)
        )
    };
    let app = axum::Router::new()
        .route("/internal/workspaces", get(move || async move { huge() }))
        .route(
            "/chunked/internal/workspaces",
            get(move || async move {
                let chunks = futures::stream::iter(
                    huge()
                        .into_bytes()
                        .chunks(1 << 20)
                        .map(|c| {
                            Ok::<_, std::convert::Infallible>(axum::body::Bytes::copy_from_slice(c))
                        })
                        .collect::<Vec<_>>(),
                );
                axum::body::Body::from_stream(chunks.boxed())
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    for registry in [url.clone(), format!("{url}/chunked")] {
        let s = setup(settings(&registry, Duration::ZERO, Duration::ZERO), 100).await;
        let err = s.reconciler.run_pass().await.unwrap_err().to_string();
        assert!(
            err.contains("larger than 16777216 bytes"),
            "{registry}: {err}"
        );
        assert!(
            running(&s.host).await.is_empty(),
            "a failed pass adds nothing"
        );
    }
}

/// An `https://` registry is reached over TLS (the pass used to refuse it after the config
/// had accepted the URL): the first bytes the registry's port receives are a TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_registry_is_asked_over_tls() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let first_bytes = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut header = [0u8; 3];
        socket.read_exact(&mut header).await.unwrap();
        header
    });
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    let err = s.reconciler.run_pass().await.unwrap_err().to_string();
    assert!(!err.contains("plain HTTP"), "{err}");
    let header = first_bytes.await.unwrap();
    assert_eq!(header[0], 0x16, "a TLS handshake record: {header:?}");
    assert_eq!(header[1], 0x03, "TLS major version 3: {header:?}");
}

/// Milliseconds since the Unix epoch (what `next_run_at` counts).
fn epoch_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Polls the reconciler's status every 20 ms until `check` holds, for at most `limit`.
async fn status_until(
    reconciler: &Reconciler,
    limit: Duration,
    what: &str,
    check: impl Fn(&ReconcilerStatus) -> bool,
) -> ReconcilerStatus {
    let deadline = Instant::now() + limit;
    loop {
        let status = reconciler.status();
        if check(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting until {what}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// While the registry fails, the scheduled loop (`spawn`) retries after 5 s, doubling after
/// each further failure, instead of waiting its interval (an hour here): the second request
/// reaches the registry about 5 s after the first, and the status (also `/health`'s) counts
/// the failures and shows the next run 5 s, then 10 s, ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_loop_retries_a_failing_registry_after_5_s_then_10_s() {
    let (url, registry) = registry(&["never-added"]).await;
    registry.lock().unwrap().failing = true;
    let s = setup(settings(&url, Duration::ZERO, Duration::ZERO), 100).await;
    assert_eq!(s.reconciler.settings().interval, Duration::from_secs(3600));
    let task = s.reconciler.spawn();

    let status = status_until(
        &s.reconciler,
        Duration::from_secs(10),
        "the first pass fails and schedules the next",
        |status| status.consecutive_failures == 1 && status.next_run_at.is_some(),
    )
    .await;
    let ahead = status.next_run_at.unwrap() - epoch_ms();
    assert!(
        (4_000..=5_000).contains(&ahead),
        "the next run is 5 s ahead, not the interval: {ahead} ms ({status:?})"
    );
    assert!(status.last_error.unwrap().contains("503"));

    // The retry: about 5 s after the first request (bounded well below the hour).
    let deadline = Instant::now() + Duration::from_secs(9);
    while registry.lock().unwrap().requests < 2 {
        assert!(
            Instant::now() < deadline,
            "no retry within 9 s of the first failure"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = {
        let r = registry.lock().unwrap();
        r.arrivals[1] - r.arrivals[0]
    };
    assert!(
        gap >= Duration::from_millis(4_500) && gap <= Duration::from_millis(6_500),
        "the retry came {gap:?} after the first request, expected about 5 s"
    );

    let status = status_until(
        &s.reconciler,
        Duration::from_secs(10),
        "the second failure is counted",
        |status| {
            status.consecutive_failures == 2
                && status.next_run_at.is_some_and(|at| at > epoch_ms() + 5_500)
        },
    )
    .await;
    let ahead = status.next_run_at.unwrap() - epoch_ms();
    assert!(
        (8_500..=10_000).contains(&ahead),
        "the wait doubled to 10 s: {ahead} ms ({status:?})"
    );
    assert_eq!(status.passes_failed, 2);
    let (_, health) = s.host.get("/health").await;
    assert_eq!(health["reconciler"]["consecutiveFailures"], 2, "{health}");
    assert_eq!(
        health["reconciler"]["nextRunAt"],
        json!(status.next_run_at),
        "{health}"
    );
    assert_eq!(
        registry.lock().unwrap().requests,
        2,
        "no request in between"
    );
    assert!(
        running(&s.host).await.is_empty(),
        "a failed pass adds nothing"
    );
    task.abort();
}
