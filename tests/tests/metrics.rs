//! `GET /metrics` through the real router on a real port: the exposition is valid Prometheus
//! text (every line checked), per-store counters move when events flow, failures are counted
//! by reason, a removed store's series leave, and the host-wide webhook, reconcile and config
//! reload counters count what happened.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use storehost_control::config::Secret;
use storehost_control::reconciler::{Reconciler, ReconcilerSettings};
use storehost_control::watcher::{ReloadOutcome, ReloadSummary};
use storehost_tests::control::{ControlHostOptions, with_webhooks};
use storehost_tests::{TestHost, programs};

/// One sample: metric name and its labels, sorted.
type SampleKey = (String, BTreeMap<String, String>);

/// A parsed exposition: every sample's value, and each family's declared type.
#[derive(Debug)]
struct Exposition {
    samples: BTreeMap<SampleKey, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// Like [`Exposition::value`], panicking with the exposition when the sample is missing.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {:#?}", self.samples.keys()))
    }

    /// Whether any sample carries `label="value"`.
    fn mentions(&self, label: &str, value: &str) -> bool {
        self.samples
            .keys()
            .any(|(_, labels)| labels.get(label).map(String::as_str) == Some(value))
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// Parses `{a="x",b="y"}` (escapes `\\`, `\"`, `\n`); returns the labels and the rest.
fn parse_labels(text: &str, line: &str) -> (BTreeMap<String, String>, String) {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').expect("labels start with {");
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after.to_owned());
        }
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label without =\" in {line:?}"));
        assert!(is_label_name(name), "bad label name {name:?} in {line:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        assert!(
            labels.insert(name.to_owned(), value).is_none(),
            "label {name} twice in {line:?}"
        );
        rest = &after[end + 1..];
        if let Some(after_comma) = rest.strip_prefix(',') {
            rest = after_comma;
        } else {
            assert!(rest.starts_with('}'), "labels not closed in {line:?}");
        }
    }
}

/// The family a sample belongs to: histograms' `_bucket`, `_sum` and `_count` belong to the
/// histogram's name.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        name.strip_suffix(suffix)
            .filter(|base| types.get(*base).map(String::as_str) == Some("histogram"))
    })
}

/// Parses the Prometheus text format (0.0.4) strictly: every line is a `# HELP`, a `# TYPE` or
/// a sample of a family declared before it; no sample twice; histogram buckets cumulative and
/// ending in `+Inf` equal to `_count`.
fn parse(text: &str) -> Exposition {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut samples = BTreeMap::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "no empty lines");
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let keyword = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or_default().to_owned();
            let rest = parts.next().unwrap_or_default();
            assert!(is_metric_name(&name), "bad metric name in {line:?}");
            match keyword {
                "HELP" => {
                    assert!(!rest.is_empty(), "empty help in {line:?}");
                    assert!(helped.insert(name), "HELP twice: {line:?}");
                }
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest),
                        "bad type in {line:?}"
                    );
                    assert!(
                        types.insert(name, rest.to_owned()).is_none(),
                        "TYPE twice: {line:?}"
                    );
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "comment without a space: {line:?}");
        let name_end = line.find(['{', ' ']).expect("a sample has a value");
        let name = &line[..name_end];
        assert!(is_metric_name(name), "bad metric name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], line)
        } else {
            (BTreeMap::new(), line[name_end..].to_owned())
        };
        let mut fields = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value in {line:?}"))
            .split(' ');
        let value = fields.next().and_then(parse_value);
        let value = value.unwrap_or_else(|| panic!("bad value in {line:?}"));
        if let Some(timestamp) = fields.next() {
            assert!(
                timestamp.parse::<i64>().is_ok(),
                "bad timestamp in {line:?}"
            );
        }
        assert!(fields.next().is_none(), "trailing fields in {line:?}");
        let family =
            family_of(name, &types).unwrap_or_else(|| panic!("sample before its # TYPE: {line:?}"));
        if types[family] == "counter" {
            assert!(value >= 0.0, "negative counter in {line:?}");
        }
        assert!(
            samples.insert((name.to_owned(), labels), value).is_none(),
            "sample twice: {line:?}"
        );
    }
    check_histograms(&samples, &types);
    Exposition { samples, types }
}

fn check_histograms(samples: &BTreeMap<SampleKey, f64>, types: &BTreeMap<String, String>) {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket_name = format!("{family}_bucket");
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), value) in samples {
            if *name != bucket_name {
                continue;
            }
            let mut rest = labels.clone();
            let le = rest.remove("le").expect("a bucket has le");
            series
                .entry(rest)
                .or_default()
                .push((parse_value(&le).expect("le is a number"), *value));
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels:?}: buckets are cumulative"
            );
            let last = buckets.last().expect("a bucket");
            assert_eq!(last.0, f64::INFINITY, "{family}{labels:?} ends in +Inf");
            let count = samples[&(format!("{family}_count"), labels.clone())];
            assert_eq!(last.1, count, "{family}{labels:?}: +Inf bucket == _count");
            assert!(samples.contains_key(&(format!("{family}_sum"), labels.clone())));
        }
    }
}

async fn scrape(host: &TestHost) -> Exposition {
    // Public: no token.
    let response = host
        .client
        .get(format!("{}/metrics", host.url))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "Prometheus text content type, got {content_type}"
    );
    parse(&response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_per_store_counters_move_when_events_flow() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("alpha-shop", "writer", &[]).await;
    host.add_store("beta-shop", "writer", &[]).await;

    let before = scrape(&host).await;
    for store in ["alpha-shop", "beta-shop"] {
        let id = [("store_id", store)];
        assert_eq!(
            before.get("storehost_store_events_accepted_total", &id),
            0.0
        );
        assert_eq!(
            before.get("storehost_store_events_processed_total", &id),
            0.0
        );
        assert_eq!(before.get("storehost_store_lag_events", &id), 0.0);
        assert_eq!(
            before.get("storehost_store_invocation_duration_seconds_count", &id),
            0.0
        );
        assert_eq!(before.get("storehost_store_tasks_executed_total", &id), 0.0);
        assert_eq!(before.get("storehost_store_event_commits_total", &id), 0.0);
        assert_eq!(before.get("storehost_store_llm_calls_total", &id), 0.0);
        assert_eq!(
            before.get("storehost_store_memory_quota_bytes", &id),
            (64u64 << 20) as f64,
            "the default memory quota"
        );
        assert_eq!(
            before.get(
                "storehost_store_state",
                &[("store_id", store), ("state", "running")]
            ),
            1.0
        );
    }
    assert_eq!(before.get("storehost_stores", &[("state", "running")]), 2.0);
    assert_eq!(before.get("storehost_stores", &[("state", "backoff")]), 0.0);
    assert_eq!(before.get("storehost_stores_max", &[]), 100.0);
    assert_eq!(before.get("storehost_invocation_slots", &[]), 2.0);
    assert_eq!(before.get("storehost_invocation_slots_in_use", &[]), 0.0);
    assert_eq!(
        before.types["storehost_store_invocation_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        before.types["storehost_store_events_accepted_total"],
        "counter"
    );

    let events: Vec<_> = (0..7)
        .map(|i| json!({"type": "kv.put", "payload": {"key": format!("k{i}"), "value": i}}))
        .collect();
    let (status, body) = host
        .post("/v1/stores/alpha-shop/events", json!({"events": events}))
        .await;
    assert_eq!(status, 202, "{body}");
    host.settle("alpha-shop").await;

    let after = scrape(&host).await;
    let alpha = [("store_id", "alpha-shop")];
    assert_eq!(
        after.get("storehost_store_events_accepted_total", &alpha),
        7.0
    );
    assert_eq!(
        after.get("storehost_store_events_processed_total", &alpha),
        7.0
    );
    assert_eq!(after.get("storehost_store_lag_events", &alpha), 0.0);
    let commits = after.get("storehost_store_event_commits_total", &alpha);
    assert!(
        (1.0..=7.0).contains(&commits),
        "7 events commit in 1 to 7 transactions, not {commits}"
    );
    assert_eq!(
        after.get("storehost_store_invocation_duration_seconds_count", &alpha),
        7.0,
        "one latency observation per invocation"
    );
    assert!(after.get("storehost_store_invocation_duration_seconds_sum", &alpha) > 0.0);
    assert!(
        after.get("storehost_store_disk_bytes", &alpha) > 0.0,
        "the store's database has a size"
    );
    assert!(
        after.get("storehost_store_event_log_bytes", &alpha) > 0.0,
        "so has its event log"
    );
    assert!(after.get("storehost_store_memory_peak_bytes", &alpha) > 0.0);
    let beta = [("store_id", "beta-shop")];
    assert_eq!(
        after.get("storehost_store_events_accepted_total", &beta),
        0.0,
        "another store's counters do not move"
    );
    assert_eq!(
        after.get("storehost_store_invocation_duration_seconds_count", &beta),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_reason_and_a_removed_store_leaves_the_exposition() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.deploy("panicker", programs::PANICKER).await;
    host.add_store("steady-store", "writer", &[]).await;
    host.add_store("broken-store", "panicker", &[]).await;

    host.append("broken-store", "boom", json!({})).await;
    host.wait_for_status("broken-store", |s| s["deadLettered"] == 1)
        .await;

    let metrics = scrape(&host).await;
    let broken = [("store_id", "broken-store"), ("reason", "panic")];
    assert_eq!(
        metrics.get("storehost_store_failures_total", &broken),
        3.0,
        "three attempts (the test retry policy), each a panic"
    );
    assert_eq!(
        metrics.get(
            "storehost_store_events_dead_lettered_total",
            &[("store_id", "broken-store")]
        ),
        1.0
    );
    assert_eq!(
        metrics.value(
            "storehost_store_failures_total",
            &[("store_id", "steady-store"), ("reason", "panic")]
        ),
        None,
        "a healthy store has no failure series"
    );

    let (status, body) = host
        .call(reqwest::Method::DELETE, "/v1/stores/broken-store", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let metrics = scrape(&host).await;
    assert!(
        !metrics.mentions("store_id", "broken-store"),
        "a removed store's series are gone"
    );
    assert!(metrics.mentions("store_id", "steady-store"));
    assert_eq!(
        metrics.get("storehost_stores", &[("state", "running")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_reconcile_and_config_reload_counters_count_what_happened() {
    const SECRET: &str = "metrics-webhook-secret";
    // A registry on a loopback port nothing listens on: every pass fails at once.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let registry_url = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let mut parts = None;
    let host = TestHost::start_control(ControlHostOptions::default(), |orchestrator, state| {
        let reconciler = Reconciler::new(
            orchestrator.clone(),
            ReconcilerSettings {
                url: registry_url,
                token: Some(Secret::new("bypass")),
                interval: Duration::from_secs(3600),
                grace_period: Duration::ZERO,
                max_removal_share: 0.5,
                manual_min_interval: Duration::ZERO,
                request_timeout: Duration::from_secs(10),
            },
        );
        let state =
            with_webhooks(orchestrator, state, SECRET, 10_000).with_reconciler(reconciler.clone());
        parts = Some((reconciler, state.config_reload_listener()));
        state
    })
    .await;
    let (reconciler, reload_listener) = parts.unwrap();

    let webhook = |secret: &'static str, id: &str| {
        host.client
            .post(format!("{}/webhooks/workspaces", host.url))
            .header("x-webhook-secret", secret)
            .header("content-type", "application/json")
            .body(
                json!({"event": "workspace.created", "instanceId": id, "userId": "u1",
                       "timestamp": "2026-01-01T00:00:00Z"})
                .to_string(),
            )
            .send()
    };
    assert_eq!(webhook(SECRET, "hooked-store").await.unwrap().status(), 200);
    let again = webhook(SECRET, "hooked-store").await.unwrap();
    assert_eq!(again.status(), 200);
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(
        body["status"], "already_monitored",
        "the answer passes the counter intact"
    );
    assert_eq!(
        webhook("wrong-secret", "other-store")
            .await
            .unwrap()
            .status(),
        401
    );

    assert!(reconciler.run_pass().await.is_err(), "the registry is down");
    reload_listener(&ReloadOutcome::Applied(ReloadSummary::default()));
    reload_listener(&ReloadOutcome::Refused("line 3: expected a table".into()));
    reload_listener(&ReloadOutcome::Unchanged);

    let metrics = scrape(&host).await;
    fn outcome(o: &str) -> [(&'static str, &str); 1] {
        [("outcome", o)]
    }
    assert_eq!(
        metrics.get(
            "storehost_webhook_requests_total",
            &outcome("monitoring_started")
        ),
        1.0
    );
    assert_eq!(
        metrics.get(
            "storehost_webhook_requests_total",
            &outcome("already_monitored")
        ),
        1.0
    );
    assert_eq!(
        metrics.get("storehost_webhook_requests_total", &outcome("unauthorized")),
        1.0
    );
    assert_eq!(
        metrics.get("storehost_reconcile_passes_total", &outcome("failed")),
        1.0
    );
    assert_eq!(
        metrics.get("storehost_reconcile_passes_total", &outcome("completed")),
        0.0
    );
    assert_eq!(
        metrics.get("storehost_config_reloads_total", &outcome("applied")),
        1.0
    );
    assert_eq!(
        metrics.get("storehost_config_reloads_total", &outcome("refused")),
        1.0
    );
    assert_eq!(
        metrics.get("storehost_config_reloads_total", &outcome("partial")),
        0.0
    );
    assert_eq!(
        metrics.get("storehost_config_last_reload_successful", &[]),
        0.0,
        "the last edit was refused"
    );
    assert_eq!(
        metrics.get(
            "storehost_store_events_accepted_total",
            &[("store_id", "hooked-store")]
        ),
        0.0,
        "the webhook's store has its own series"
    );
    assert_eq!(
        metrics.get("storehost_stores", &[("state", "running")]),
        1.0
    );
}

#[test]
fn the_checker_refuses_malformed_expositions() {
    let bad = [
        "no_type 1\n",
        "# TYPE a counter\na{x=\"1\" 1\n",
        "# TYPE a gauge\na one\n",
        "# TYPE a gauge\na 1\na 2\n",
        "# TYPE 1bad gauge\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
    ];
    for text in bad {
        let outcome = std::panic::catch_unwind(|| parse(text));
        assert!(
            outcome.is_err(),
            "accepted a malformed exposition: {text:?}"
        );
    }
    let good = "# HELP a A.\n# TYPE a counter\na{x=\"q\\\"\\n\"} 1\n";
    assert_eq!(parse(good).get("a", &[("x", "q\"\n")]), 1.0);
}

/// A store's disk figures are right before it commits anything and while it does not process:
/// `diskBytes` shows its database from the start, and `eventLogBytes` counts the log's WAL and
/// grows with the events appended to a paused store. Before, both read 0 until the plugin's
/// first commit, and the log's figure left out the WAL, where the latest events are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_figures_count_the_log_as_it_grows_also_while_the_store_is_paused() {
    let host = TestHost::start().await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("growing", "writer", &[]).await;
    let usage = |view: serde_json::Value| view["usage"].clone();
    let before = usage(host.get("/v1/stores/growing").await.1);
    assert!(before["diskBytes"].as_u64() > Some(0), "{before}");
    let (status, body) = host.post("/v1/stores/growing/pause", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let value = "x".repeat(1000);
    for batch in 0..10 {
        let events: Vec<_> = (0..50)
            .map(|i| json!({"type": "kv.put", "payload": {"key": batch * 50 + i, "value": value}}))
            .collect();
        let (status, body) = host
            .post("/v1/stores/growing/events", json!({"events": events}))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let after = usage(host.get("/v1/stores/growing").await.1);
    let grew = after["eventLogBytes"].as_u64().unwrap() - before["eventLogBytes"].as_u64().unwrap();
    assert!(grew >= 500 * 1000, "500 events of 1 KB: {grew} bytes");
    let scraped = scrape(&host).await;
    assert_eq!(
        scraped.get(
            "storehost_store_event_log_bytes",
            &[("store_id", "growing")]
        ) as u64,
        after["eventLogBytes"].as_u64().unwrap()
    );
    assert_eq!(
        scraped.get(
            "storehost_store_event_log_quota_bytes",
            &[("store_id", "growing")]
        ) as u64,
        storehost_store::quotas::DEFAULT_EVENT_LOG
    );
}
