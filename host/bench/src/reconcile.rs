//! A reconcile pass over a large workspace registry with 1% drift: a local HTTP server speaks
//! the registry format of SPEC §7 (`{"workspaces":[{"instanceId"}…],"next"}`, paged); the host
//! runs every workspace but the drifted ones; `POST /admin/reconcile` runs the pass (half the
//! drift are new workspaces to add, half deleted ones to remove, with a zero grace period) and
//! reports `durationMs`. The reference is a pass over the same registry with no drift: the cost
//! of reading the registry and comparing.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use storehost_control::config::Secret;
use storehost_control::reconciler::{Reconciler, ReconcilerSettings};
use storehost_tests::{TestHost, TestHostOptions, programs};

use crate::report::{Row, Table, ms, percentile, thousands, times_of};

const BYPASS: &str = "bench-bypass-token";
/// Workspaces per registry page.
const PAGE: usize = 500;
/// Open files the process keeps besides its stores.
const SPARE_FILES: usize = 2_000;

/// The registry's pages, rendered once per change.
#[derive(Default)]
struct Registry {
    pages: Vec<String>,
}

type Shared = Arc<RwLock<Registry>>;

impl Registry {
    fn set(&mut self, ids: &[String]) {
        let chunks: Vec<&[String]> = ids.chunks(PAGE).collect();
        let count = chunks.len().max(1);
        self.pages = (0..count)
            .map(|page| {
                let items: Vec<Value> = chunks
                    .get(page)
                    .map(|ids| {
                        ids.iter()
                            .map(|id| json!({"instanceId": id, "name": id}))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut body = json!({ "workspaces": items });
                if page + 1 < count {
                    body["next"] = json!(format!("/internal/workspaces?page={}", page + 1));
                }
                body.to_string()
            })
            .collect();
    }
}

async fn workspaces(
    State(registry): State<Shared>,
    Query(query): Query<std::collections::HashMap<String, usize>>,
    headers: HeaderMap,
) -> Response {
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {BYPASS}"));
    if !authorized {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    let page = query.get("page").copied().unwrap_or(0);
    let registry = registry.read().unwrap_or_else(|e| e.into_inner());
    match registry.pages.get(page) {
        Some(body) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.clone(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such page").into_response(),
    }
}

/// Starts the registry server; answers its base URL and its state.
async fn start_registry() -> anyhow::Result<(String, Shared)> {
    let shared: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/internal/workspaces", axum::routing::get(workspaces))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, shared))
}

/// Open file descriptors of this process now.
fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Idle time after which the bench's stores hibernate (and close their files).
const HIBERNATE_AFTER: Duration = Duration::from_millis(300);

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let wanted = if quick { 1_000 } else { 10_000 };
    let runs = if quick { 1 } else { 3 };
    let (url, registry) = start_registry().await?;
    let settings = ReconcilerSettings {
        url,
        token: Some(Secret::new(BYPASS)),
        interval: Duration::from_secs(3_600),
        grace_period: Duration::ZERO,
        max_removal_share: 0.5,
        manual_min_interval: Duration::ZERO,
        request_timeout: Duration::from_secs(60),
    };
    let mut reconciler = None;
    // Stores with nothing to do hibernate and close their files, as on a host that relies on
    // hibernation: the open-file limit then holds 10,000 stores.
    let host = TestHost::start_configured(
        TestHostOptions {
            max_stores: wanted + wanted / 50 + 10,
            idle_timeout: Some(HIBERNATE_AFTER),
            close_files_after: Duration::ZERO,
            ..TestHostOptions::default()
        },
        &[("writer", programs::WRITER)],
        |orchestrator, state| {
            let r = Reconciler::new(orchestrator.clone(), settings);
            reconciler = Some(r.clone());
            state
                .with_reconciler(r)
                .with_bypass_token(Some(&Secret::new(BYPASS)))
        },
    )
    .await;
    let reconciler = reconciler.ok_or_else(|| anyhow::anyhow!("the host was not configured"))?;

    // A first pass over 100 workspaces tells how many files a store keeps open, so the row
    // scales down instead of failing when the open-file limit cannot hold `wanted` stores.
    let before = open_files();
    let mut current = ids("ws", 0..100);
    registry
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .set(&current);
    reconciler.run_pass().await?;
    tokio::time::sleep(HIBERNATE_AFTER * 3).await;
    let per_store = (open_files().saturating_sub(before)).div_ceil(100).max(1);
    let limit = storehost_store::open_files::limit();
    let fits = limit.saturating_sub(SPARE_FILES) / per_store;
    let workspaces = wanted.min(fits);
    eprintln!(
        "reconcile: a store keeps about {per_store} files open; the open-file limit is {limit}"
    );
    if workspaces < wanted {
        eprintln!(
            "reconcile: measuring {workspaces} workspaces instead of {wanted}, which need about {} open files (raise the limit, e.g. `ulimit -n {}`, for the full row)",
            wanted * per_store,
            (wanted + wanted / 50) * per_store + SPARE_FILES
        );
    }

    eprintln!(
        "reconcile: setting up: the host starts {workspaces} stores from the registry (not measured)"
    );
    current = ids("ws", 0..workspaces);
    registry
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .set(&current);
    let setup_started = Instant::now();
    let counter = {
        let orchestrator = host.orchestrator.clone();
        tokio::spawn(async move {
            let mut progress = crate::report::Progress::new("stores running", workspaces);
            let mut shown = 0;
            while shown < workspaces {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = orchestrator.len().await;
                progress.advance(now.saturating_sub(shown));
                shown = shown.max(now);
            }
        })
    };
    let setup = reconciler.run_pass().await?;
    counter.abort();
    anyhow::ensure!(
        setup.result.failed_adds.is_empty(),
        "{} stores failed to start: {:?}",
        setup.result.failed_adds.len(),
        setup.result.failed_adds.first()
    );
    let setup_elapsed = setup_started.elapsed();
    eprintln!(
        "  {workspaces} stores running after {:.1} s (an initial pass adding {} stores)",
        setup_elapsed.as_secs_f64(),
        setup.result.added.len()
    );

    let drift = (workspaces / 100).max(2);
    let half = drift / 2;
    let mut steady = Vec::with_capacity(runs);
    let mut drifted = Vec::with_capacity(runs);
    let mut client = Vec::with_capacity(runs);
    for run in 0..runs {
        let (report, _) = manual_pass(&host).await?;
        anyhow::ensure!(
            report["driftCount"] == json!(0),
            "the no-drift pass found drift: {report}"
        );
        steady.push(duration_ms(&report)?);

        // 1% drift: `half` workspaces deleted from the registry, `half` new ones created.
        current.drain(..half);
        current.extend(ids(&format!("new{run}"), 0..half));
        current.sort();
        registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set(&current);
        let (report, elapsed) = manual_pass(&host).await?;
        let added = report["result"]["added"].as_array().map_or(0, Vec::len);
        let removed = report["result"]["removed"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(
            added == half && removed == half,
            "the drift pass added {added} and removed {removed} stores, expected {half} each: {report}"
        );
        drifted.push(duration_ms(&report)?);
        client.push(elapsed);
        eprintln!(
            "  pass {}/{runs}: {} ms with {drift} drifted ({} ms with none)",
            run + 1,
            ms(drifted[run]),
            ms(steady[run])
        );
    }
    host.stop().await;

    let p50 = percentile(&mut drifted, 50.0);
    let worst = percentile(&mut drifted, 100.0);
    let steady_p50 = percentile(&mut steady, 50.0);
    let client_p50 = percentile(&mut client, 50.0);
    let scaled = if workspaces < wanted {
        format!(
            " — scaled down from {}: a store keeps about {per_store} files open and the open-file limit is {limit}",
            thousands(wanted as f64)
        )
    } else {
        String::new()
    };
    table.push(Row {
        figure: format!(
            "reconcile pass: {} workspaces (idle ones hibernated, files closed), 1% drift ({half} added + {half} removed), pages of {PAGE}; durationMs (median of {runs}; POST /admin/reconcile answered in {} ms){scaled}",
            thousands(workspaces as f64),
            ms(client_p50)
        ),
        unit: "ms",
        p50: ms(p50),
        p99: format!("max {}", ms(worst)),
        reference: format!("the same pass with no drift: {} ms", ms(steady_p50)),
        ratio: times_of(p50, steady_p50),
        target: "≤ 500 ms",
    });
    Ok(())
}

/// `POST /admin/reconcile` with the bypass token; answers its report and the request's time.
async fn manual_pass(host: &TestHost) -> anyhow::Result<(Value, Duration)> {
    crate::raw::settle_disk().await;
    let started = Instant::now();
    let response = host
        .client
        .post(format!("{}/admin/reconcile", host.url))
        .header("x-server-token", BYPASS)
        .send()
        .await?;
    let status = response.status().as_u16();
    let report: Value = response.json().await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        status == 200,
        "POST /admin/reconcile answered {status}: {report}"
    );
    Ok((report, elapsed))
}

fn duration_ms(report: &Value) -> anyhow::Result<Duration> {
    report["durationMs"]
        .as_u64()
        .map(Duration::from_millis)
        .ok_or_else(|| anyhow::anyhow!("no durationMs in {report}"))
}
