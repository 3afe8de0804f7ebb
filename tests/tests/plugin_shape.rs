//! A plugin's shape cannot take what other stores need: a component instantiating extra core
//! modules, each with a linear memory of its own, is refused when it needs more than one
//! sandbox's share of the pool (else one store held every pooled memory and no other store's
//! sandbox could start), and within its share its memories count together against its
//! `memory` quota (else each could grow to the whole quota).
//!
//! The hostile components are the `writer` program with core modules appended, built here.

use serde_json::json;
use storehost_store::Quotas;
use storehost_tests::{TestHost, TestHostOptions, programs};

/// A WebAssembly page, in bytes.
const PAGE: u32 = 64 << 10;

/// `n` as unsigned LEB128.
fn leb(mut n: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Reads an unsigned LEB128 at `*at`, moving past it.
fn read_leb(bytes: &[u8], at: &mut usize) -> u32 {
    let mut value = 0u32;
    let mut shift = 0;
    loop {
        let byte = bytes[*at];
        *at += 1;
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

/// A section of a component: its id and content.
fn section(id: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(leb(u32::try_from(content.len()).unwrap()));
    out.extend_from_slice(content);
    out
}

/// `component` with `extra` more core instances of a module defining one linear memory of
/// `pages` pages: `(module (memory pages))`, appended as a core module section and a core
/// instance section (instantiated with no arguments; nothing uses them, the instances and
/// their memories exist all the same).
fn with_extra_memories(component: &[u8], extra: u32, pages: u32) -> Vec<u8> {
    const CORE_MODULE: u8 = 1;
    const CORE_INSTANCE: u8 = 2;
    // The component's own core modules come first in its core module index space.
    let mut modules = 0;
    let mut at = 8;
    while at < component.len() {
        let id = component[at];
        at += 1;
        let size = read_leb(component, &mut at) as usize;
        if id == CORE_MODULE {
            modules += 1;
        }
        at += size;
    }
    assert_eq!(
        at,
        component.len(),
        "the component's sections end its bytes"
    );

    let mut memory_module = b"\0asm\x01\0\0\0".to_vec();
    let mut memories = leb(1);
    memories.push(0x00); // limits: a minimum, no maximum
    memories.extend(leb(pages));
    memory_module.extend(section(5, &memories));

    let mut instances = leb(extra);
    for _ in 0..extra {
        instances.push(0x00); // instantiate a module …
        instances.extend(leb(modules)); // … the one appended …
        instances.extend(leb(0)); // … with no arguments
    }
    let mut out = component.to_vec();
    out.extend(section(CORE_MODULE, &memory_module));
    out.extend(section(CORE_INSTANCE, &instances));
    out
}

fn writer_bytes() -> Vec<u8> {
    std::fs::read(programs::WRITER).unwrap()
}

/// Asserts the neighbour store `good` (on `writer`) processes `events` events, all of them.
async fn neighbour_processes(host: &TestHost, events: u64) {
    for n in 0..events {
        host.append(
            "good",
            "kv.put",
            json!({"key": format!("k{n}"), "value": n}),
        )
        .await;
    }
    host.settle("good").await;
    assert_eq!(
        host.query("good", "count", json!({})).await,
        json!({"kv": events, "applied": events}),
        "the neighbour lost events"
    );
    let (_, status) = host.get("/v1/stores/good").await;
    assert_eq!(status["errorsCount"], 0, "the neighbour was hurt: {status}");
}

/// Three extra memories (four in all) and six core instances: more than one sandbox's share.
/// Loaded, one store on it held all four pooled memories of a two-slot host, and its
/// neighbour's sandbox could not start ("no free sandbox slot").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_needing_more_than_its_share_of_the_pool_is_refused_at_upload() {
    let host = TestHost::start_with(TestHostOptions {
        pool_slots: Some(2),
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    host.add_store("good", "writer", &[]).await;

    let hog = with_extra_memories(&writer_bytes(), 3, 1);
    let (status, body) = host.upload_plugin("hog", hog).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_plugin", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    for said in [
        "6 core module instances",
        "at most 4 core module instances, 2 linear memories and 3 tables",
    ] {
        assert!(message.contains(said), "{said:?} not in: {message}");
    }
    let (_, plugins) = host.get("/v1/plugins").await;
    assert!(
        !plugins.to_string().contains("\"hog\""),
        "the refused plugin is not kept: {plugins}"
    );
    neighbour_processes(&host, 20).await;
}

/// One extra memory of 10 MiB (two in all, within a sandbox's share) under a 16 MiB quota:
/// the plugin loads and runs beside a neighbour on a two-slot host, its memories count
/// together (the peak shown is their sum), and growing its own memory by 8 MiB more — under
/// the quota alone, over it with the other memory — fails the call as `memory`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_memories_count_together_against_its_memory_quota() {
    const QUOTA: u64 = 16 << 20;
    const EXTRA_MIB: u32 = 10;
    let host = TestHost::start_with(TestHostOptions {
        pool_slots: Some(2),
        ..TestHostOptions::default()
    })
    .await;
    host.deploy("writer", programs::WRITER).await;
    let two_memories = with_extra_memories(&writer_bytes(), 1, (EXTRA_MIB << 20) / PAGE);
    let (status, body) = host.upload_plugin("two-memories", two_memories).await;
    assert_eq!(status, 201, "within one sandbox's share: {body}");
    host.add_store_with(
        "wide",
        "two-memories",
        &[],
        Quotas {
            memory: QUOTA,
            ..Quotas::default()
        },
    )
    .await;
    host.add_store("good", "writer", &[]).await;

    // Both memories held together, under the quota.
    host.append("wide", "kv.grow", json!({"mib": 2})).await;
    host.settle("wide").await;
    let (_, status) = host.get("/v1/stores/wide").await;
    assert_eq!(status["errorsCount"], 0, "{status}");
    let peak = status["usage"]["memoryPeak"].as_u64().unwrap();
    assert!(
        peak > u64::from(EXTRA_MIB + 2) << 20 && peak <= QUOTA,
        "the peak is both memories together: {peak} ({status})"
    );

    // 8 MiB more of its own memory: about 11 MiB alone, past 16 MiB with the other.
    let over = host.append("wide", "kv.grow", json!({"mib": 8})).await;
    let ping = host
        .append("wide", "kv.put", json!({"key": "after", "value": 1}))
        .await;
    host.settle("wide").await;
    let (_, letters) = host.get("/v1/stores/wide/dead-letters").await;
    let letter = &letters["deadLetters"][0];
    assert_eq!(letter["seq"], over, "{letters}");
    assert_eq!(letter["reason"], "memory", "{letter}");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("its quota is 16777216 bytes"),
        "{letter}"
    );
    let (_, status) = host.get("/v1/stores/wide").await;
    assert_eq!(status["cursor"], ping, "the store went on: {status}");
    assert_eq!(
        host.query("wide", "get", json!({"key": "after"})).await,
        json!({"value": "1"})
    );

    neighbour_processes(&host, 20).await;
}
