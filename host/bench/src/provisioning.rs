//! Webhook provisioning latency: `POST /webhooks/workspaces` (`workspace.created`) → the store
//! runs and accepts events (its first `POST` event answers 202), one workspace after another.
//! Deliveries alternate between the `X-Webhook-Secret` form and the signed (Standard Webhooks)
//! form. The reference is the least a new store costs on disk: its directory and two SQLite
//! files created in WAL mode, and this disk's rate of file creation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storehost_control::config::Secret;
use storehost_control::webhook::{WebhookSettings, Webhooks, signature_header};
use storehost_tests::{TOKEN, TestHost, TestHostOptions, programs};

use crate::raw;
use crate::report::{Progress, Row, Table, ms, percentile, times_of};

const SECRET: &str = "whsec_YmVuY2htYXJrLXdlYmhvb2stc2VjcmV0";

pub async fn run(quick: bool, table: &mut Table) -> anyhow::Result<()> {
    let workspaces = if quick { 200 } else { 1_000 };
    eprintln!("provisioning: {workspaces} workspaces by webhook, one after another");
    let settings = WebhookSettings {
        secret: Some(Secret::new(SECRET)),
        require_signature: false,
        tolerance: Duration::from_secs(300),
        replay_retention: Duration::from_secs(3600),
    };
    let host = TestHost::start_configured(
        TestHostOptions {
            max_stores: workspaces + workspaces / 5 + 20,
            // The server's default, not the test hosts' 2.
            spare_stores: storehost_control::config::DEFAULT_SPARE_STORES,
            ..TestHostOptions::default()
        },
        &[("writer", programs::WRITER)],
        move |orchestrator, state| {
            state.with_webhooks(
                Arc::new(Webhooks::new(orchestrator.clone(), settings)),
                1_000_000,
            )
        },
    )
    .await;
    for i in 0..10 {
        provision(&host, &format!("warm-{i:02}"), i % 2 == 1).await?;
    }
    raw::settle_disk().await;
    let mut all = Vec::with_capacity(workspaces);
    let mut answered = Vec::with_capacity(workspaces);
    let mut progress = Progress::new("workspaces provisioned", workspaces);
    for i in 0..workspaces {
        let (webhook, accepting) = provision(&host, &format!("ws-{i:05}"), i % 2 == 1).await?;
        answered.push(webhook);
        all.push(accepting);
        progress.step();
    }
    // Workspaces created a few a second, as they are in a product: the spare store
    // directories refill between them.
    let paced_count = workspaces / 5;
    let mut paced = Vec::with_capacity(paced_count);
    let mut progress = Progress::new("workspaces provisioned, 10 a second", paced_count);
    for i in 0..paced_count {
        tokio::time::sleep(PACE).await;
        let (_, accepting) = provision(&host, &format!("paced-{i:05}"), i % 2 == 1).await?;
        paced.push(accepting);
        progress.step();
    }
    host.stop().await;

    raw::settle_disk().await;
    let mut floor = tokio::task::spawn_blocking(move || {
        raw::store_files(workspaces, raw::Creation::LikeStorehost)
    })
    .await??;
    let floor_p50 = percentile(&mut floor, 50.0);
    let floor_p99 = percentile(&mut floor, 99.0);
    raw::settle_disk().await;
    let mut synced =
        tokio::task::spawn_blocking(move || raw::store_files(workspaces, raw::Creation::Synced))
            .await??;
    let synced_p50 = percentile(&mut synced, 50.0);
    let synced_p99 = percentile(&mut synced, 99.0);
    raw::settle_disk().await;
    let creations = tokio::task::spawn_blocking(|| raw::file_creations_per_second(1_000)).await??;
    let inode_floor = Duration::from_secs_f64(raw::INODES_PER_STORE as f64 / creations);
    let p50 = percentile(&mut all, 50.0);
    let p99 = percentile(&mut all, 99.0);
    let webhook_p50 = percentile(&mut answered, 50.0);
    table.push(Row {
        figure: format!(
            "webhook provisioning: POST /webhooks/workspaces → store running and accepting events ({workspaces} workspaces, one at a time; the webhook's own answer p50 {} ms)",
            ms(webhook_p50)
        ),
        unit: "ms",
        p50: ms(p50),
        p99: ms(p99),
        reference: format!(
            "a store's directory + 2 SQLite files in WAL, raw, as storehost creates them: p50 {} / p99 {} (with SQLite's creation fsyncs: p50 {} / p99 {}); this disk creates {creations:.0} files/s, so the {} files of a store take {} ms at least",
            ms(floor_p50),
            ms(floor_p99),
            ms(synced_p50),
            ms(synced_p99),
            raw::INODES_PER_STORE,
            ms(inode_floor)
        ),
        ratio: format!(
            "p50 {} / p99 {}",
            times_of(p50, floor_p50),
            times_of(p99, floor_p99)
        ),
        target: "p99 ≤ 5 ms",
    });
    let paced_p50 = percentile(&mut paced, 50.0);
    let paced_p99 = percentile(&mut paced, 99.0);
    table.push(Row {
        figure: format!(
            "webhook provisioning, paced: the same, {paced_count} workspaces 10 a second (spare store directories refill in between)"
        ),
        unit: "ms",
        p50: ms(paced_p50),
        p99: ms(paced_p99),
        reference: format!(
            "back to back (above): p50 {} / p99 {}",
            ms(p50),
            ms(p99)
        ),
        ratio: format!("p99 {}", times_of(paced_p99, p99)),
        target: "p99 ≤ 5 ms",
    });
    Ok(())
}

/// The gap between paced webhooks.
const PACE: Duration = Duration::from_millis(100);

/// Provisions workspace `id` by webhook (signed or by shared secret), then appends its first
/// event; answers (webhook answered, first event accepted), both from the webhook's start.
async fn provision(
    host: &TestHost,
    id: &str,
    signed: bool,
) -> anyhow::Result<(Duration, Duration)> {
    let body = json!({
        "event": "workspace.created",
        "instanceId": id,
        "userId": "bench",
        "timestamp": "2026-01-01T00:00:00Z",
    })
    .to_string();
    let mut request = host
        .client
        .post(format!("{}/webhooks/workspaces", host.url))
        .header("content-type", "application/json");
    if signed {
        let timestamp = (storehost_store::sqlite::now_ms() / 1000).to_string();
        let webhook_id = format!("msg_{id}");
        let signature = signature_header(
            &Secret::new(SECRET),
            &webhook_id,
            &timestamp,
            body.as_bytes(),
        );
        request = request
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature);
    } else {
        request = request.header("x-webhook-secret", SECRET);
    }
    let request = request.body(body);
    let started = Instant::now();
    let response = request.send().await?;
    let status = response.status().as_u16();
    let answer: Value = response.json().await?;
    anyhow::ensure!(
        status == 200 && answer["status"] == "monitoring_started",
        "webhook for {id} answered {status}: {answer}"
    );
    let webhook = started.elapsed();
    let response = host
        .client
        .post(format!("{}/v1/stores/{id}/events", host.url))
        .bearer_auth(TOKEN)
        .json(&json!({"type": "kv.put", "payload": {"key": "first", "value": 1}}))
        .send()
        .await?;
    let status = response.status().as_u16();
    let _ = response.bytes().await?;
    anyhow::ensure!(status == 202, "first event to {id} answered {status}");
    Ok((webhook, started.elapsed()))
}
